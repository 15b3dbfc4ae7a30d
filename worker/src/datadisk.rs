//! A check of the worker's data disk that operators should hear about at start: on ext4
//! without a journal, the kernel avoids reusing recently deleted inodes by scanning the
//! inode table at every file creation. A worker creates and deletes some twenty files per
//! job (scratch, spooled layers, blobs, cache entries), so on such a disk the scan grows with
//! the job rate: measured here, trivial jobs ran at two thirds of the rate of a journaled
//! data disk (`DATA_FS=journaled scripts/bench-amqp`).

use std::path::Path;

use corral_sandbox::mountinfo::MountEntry;

/// The warning for `dir`, if its filesystem is ext4 without a journal.
pub fn warning(dir: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let mountinfo = corral_sandbox::mountinfo::read_own().ok()?;
    let journals: Vec<String> = std::fs::read_dir("/proc/fs/jbd2")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let device = unjournaled_ext4(&mountinfo, &dir, &journals)?;
    Some(format!(
        "the data dir {} is on ext4 without a journal ({device}): the kernel then scans \
         recently deleted inodes at every file creation, which costs a large share of the \
         job rate; put the data dir on a journaled filesystem",
        dir.display()
    ))
}

/// The source device of the mount holding `dir` when that mount is ext4 and no jbd2
/// journal (`/proc/fs/jbd2/<device>-<inode>`) belongs to it.
fn unjournaled_ext4(mountinfo: &str, dir: &Path, journals: &[String]) -> Option<String> {
    // The deepest mount point holding `dir`; of equal ones, the latest (it is on top).
    let mut best: Option<(usize, MountEntry)> = None;
    for entry in corral_sandbox::mountinfo::entries(mountinfo) {
        let depth = entry.mount_point.components().count();
        if dir.starts_with(&entry.mount_point) && best.as_ref().is_none_or(|(d, _)| depth >= *d) {
            best = Some((depth, entry));
        }
    }
    let (_, mount) = best?;
    if mount.fstype != "ext4" {
        return None;
    }
    let name = Path::new(&mount.source).file_name()?.to_str()?;
    let prefix = format!("{name}-");
    (!journals.iter().any(|j| j.starts_with(&prefix))).then_some(mount.source)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
30 22 7:1 / /var/lib/corral rw,relatime shared:2 - ext4 /dev/loop1 rw
31 22 0:40 / /tmp rw shared:3 - tmpfs tmpfs rw
32 22 7:2 / /srv/data\\040disk rw shared:4 - ext4 /dev/loop2 rw
";

    #[test]
    fn only_ext4_without_its_journal_is_reported() {
        let journals = vec!["loop1-8".to_owned()];
        assert_eq!(
            unjournaled_ext4(MOUNTINFO, Path::new("/var/tmp/data"), &journals).as_deref(),
            Some("/dev/vda"),
            "the root fs has no journal"
        );
        assert_eq!(
            unjournaled_ext4(MOUNTINFO, Path::new("/var/lib/corral/data"), &journals),
            None,
            "the longest mount point wins, and it has a journal"
        );
        assert_eq!(
            unjournaled_ext4(MOUNTINFO, Path::new("/tmp/x"), &journals),
            None,
            "not ext4"
        );
        assert_eq!(
            unjournaled_ext4(MOUNTINFO, Path::new("/srv/data disk/x"), &journals).as_deref(),
            Some("/dev/loop2"),
            "mount points are unescaped"
        );
        let all = vec![
            "vda-8".to_owned(),
            "loop1-8".to_owned(),
            "loop2-8".to_owned(),
        ];
        assert_eq!(unjournaled_ext4(MOUNTINFO, Path::new("/srv"), &all), None);
    }
}
