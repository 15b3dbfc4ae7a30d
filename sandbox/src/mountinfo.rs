//! `/proc/self/mountinfo`, parsed once for everyone who reads it: the cgroup discovery, the
//! job dir recovery and the worker's data disk check.

use std::path::PathBuf;

/// The fields of one mountinfo line that corral uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted (unescaped).
    pub mount_point: PathBuf,
    pub fstype: String,
    /// The mount source, e.g. a device (as the kernel escaped it).
    pub source: String,
    /// Per-superblock options, e.g. the controllers of a cgroup v1 hierarchy.
    pub super_options: String,
}

/// The calling process's `/proc/self/mountinfo`. The kernel renders it anew for every
/// `read`, and `read_to_string` starts with a 32-byte probe and doubles from there (seven
/// reads for a small table): one large buffer makes it two.
pub fn read_own() -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open("/proc/self/mountinfo")?;
    let mut text = String::with_capacity(16 << 10);
    file.read_to_string(&mut text)?;
    Ok(text)
}

/// The entries of mountinfo `text`, in its order; malformed lines are passed over.
pub fn entries(text: &str) -> impl Iterator<Item = MountEntry> + '_ {
    text.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split(' ').nth(4)?;
        let mut right = right.split(' ');
        let (fstype, source) = (right.next()?, right.next()?);
        Some(MountEntry {
            mount_point: unescape(mount_point),
            fstype: fstype.to_owned(),
            source: source.to_owned(),
            super_options: right.next().unwrap_or("").to_owned(),
        })
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub(crate) fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(octal) = bytes.get(i + 1..i + 4)
            && octal.iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let value = octal
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_carry_unescaped_mount_points_and_skip_malformed_lines() {
        let text = "36 25 0:31 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                    garbage\n\
                    30 22 7:1 / /srv/a\\040b rw shared:2 - ext4 /dev/loop1 rw\n";
        let all: Vec<MountEntry> = entries(text).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].fstype, "cgroup");
        assert_eq!(all[0].super_options, "rw,cpu,cpuacct");
        assert_eq!(all[1].mount_point, PathBuf::from("/srv/a b"));
        assert_eq!(all[1].source, "/dev/loop1");
    }
}
