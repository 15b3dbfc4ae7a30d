//! Who owns what under a pool root, and the clean-up of what a dead worker left there.
//!
//! Each [`super::JobDirPool`] keeps its slots in its own instance dir, `pool-<pid>-<n>/`,
//! next to a lock file `pool-<pid>-<n>.lock` that it holds (`flock`) for its lifetime. A
//! new pool removes every other entry of the root unless its lock is held by another live
//! process: instance dirs of crashed workers (their mounted slots and images), job-named dirs
//! and images from before the pool, stray files. Mounts are unmounted first (lazily when
//! busy); the loop devices, attached with autoclear, detach themselves once unmounted. An
//! instance of this very process is stale too: the only way one survives is a pool leaked
//! with `mem::forget`, so one root serves one pool per process.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::JobDirError;

/// What [`super::JobDirPool::open`] found and removed under its root.
#[derive(Debug, Default)]
pub struct PoolRecovery {
    /// Entries of the root that were removed.
    pub removed: Vec<PathBuf>,
    /// Mount points that were unmounted (lazily when busy).
    pub unmounted: Vec<PathBuf>,
    /// What could not be cleaned; the pool works regardless.
    pub errors: Vec<JobDirError>,
}

impl PoolRecovery {
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.unmounted.is_empty() && self.errors.is_empty()
    }
}

const INSTANCE_PREFIX: &str = "pool-";
const LOCK_SUFFIX: &str = ".lock";

/// The instance dir name `pool-<pid>-<n>` parsed into the owner's pid.
fn instance_pid(name: &str) -> Option<u32> {
    let name = name.strip_suffix(LOCK_SUFFIX).unwrap_or(name);
    let rest = name.strip_prefix(INSTANCE_PREFIX)?;
    let (pid, seq) = rest.split_once('-')?;
    seq.parse::<u64>().ok()?;
    pid.parse().ok()
}

pub(super) fn instance_name(pid: u32, seq: u64) -> String {
    format!("{INSTANCE_PREFIX}{pid}-{seq}")
}

pub(super) fn lock_path(instance_dir: &Path) -> PathBuf {
    let mut name = instance_dir.as_os_str().to_owned();
    name.push(LOCK_SUFFIX);
    PathBuf::from(name)
}

/// Creates and locks `path` for as long as the returned file stays open. A concurrent
/// recovery may remove the file between its creation and our lock: then start over.
pub(super) fn lock_instance(path: &Path) -> Result<File, JobDirError> {
    let err = |source| JobDirError::Lock {
        path: path.to_path_buf(),
        source,
    };
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(err)?;
        file.lock().map_err(err)?;
        let held = file.metadata().map_err(err)?;
        match std::fs::metadata(path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => return Ok(file),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(err(e)),
        }
    }
}

/// Whether the instance `name` (a dir or its lock file) belongs to another live pool. When
/// it does not, the returned lock (if any) keeps a late starter out until the removal ends.
fn is_live(root: &Path, name: &str, own_pid: u32) -> (bool, Option<File>) {
    let Some(pid) = instance_pid(name) else {
        return (false, None);
    };
    let base = name.strip_suffix(LOCK_SUFFIX).unwrap_or(name);
    let Ok(file) = File::open(root.join(format!("{base}{LOCK_SUFFIX}"))) else {
        return (false, None);
    };
    match file.try_lock() {
        Ok(()) => (false, Some(file)),
        // Held: by a live process, or by a pool of ours that was leaked.
        Err(TryLockError::WouldBlock) => (pid != own_pid, None),
        Err(TryLockError::Error(_)) => (false, None),
    }
}

/// Removes everything under `root` that no live pool owns. `mountinfo` is the text of
/// `/proc/self/mountinfo`, a parameter so that tests can give a fake one.
pub(super) fn recover(root: &Path, mountinfo: &str, own_pid: u32) -> PoolRecovery {
    let mut recovery = PoolRecovery::default();
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(source) => {
            recovery.errors.push(JobDirError::Inspect {
                path: root.to_path_buf(),
                source,
            });
            return recovery;
        }
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // Dirs before their lock files: the lock is held while the dir goes.
    names.sort_by_key(|n| n.ends_with(LOCK_SUFFIX));
    for name in names {
        let (live, _lock) = is_live(root, &name, own_pid);
        if live {
            continue;
        }
        let path = root.join(&name);
        for mount in mount_points_under(mountinfo, &path) {
            match unmount(&mount) {
                Ok(()) => recovery.unmounted.push(mount),
                Err(e) => recovery.errors.push(e),
            }
        }
        let removed = match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => recovery.removed.push(path),
            Err(source) => recovery.errors.push(JobDirError::Remove { path, source }),
        }
    }
    recovery
}

/// Unmounts `path`, lazily when something still uses it.
pub(super) fn unmount(path: &Path) -> Result<(), JobDirError> {
    match crate::sys::umount2(path, 0) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(_) => {
            crate::sys::umount2(path, libc::MNT_DETACH).map_err(|source| JobDirError::Unmount {
                path: path.to_path_buf(),
                source,
            })
        }
    }
}

/// Mount points at or under `dir` in `mountinfo`, deepest (and latest) first, once per
/// mount so that stacked mounts all go.
fn mount_points_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = crate::mountinfo::entries(mountinfo)
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.reverse();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 7:3 / /var/lib/corral/jobs/pool-17-0/slot-0 rw,nosuid,nodev shared:20 - ext4 /dev/loop3 rw
41 22 7:4 / /var/lib/corral/jobs/pool-17-0/slot-1 rw,nosuid,nodev shared:21 - ext4 /dev/loop4 rw
42 22 7:5 / /var/lib/corral/jobs/old\\040job rw shared:22 - ext4 /dev/loop5 rw
43 40 0:50 / /var/lib/corral/jobs/pool-17-0/slot-0/upper/x rw shared:23 - tmpfs tmpfs rw
44 22 7:6 / /var/lib/corral/jobs/pool-17-0/slot-0 rw shared:24 - ext4 /dev/loop6 rw
45 22 7:7 / /var/lib/corral/jobs/pool-170-0/slot-0 rw shared:25 - ext4 /dev/loop7 rw
";

    #[test]
    fn finds_the_mounts_under_a_dir_deepest_and_latest_first() {
        let points = mount_points_under(MOUNTINFO, Path::new("/var/lib/corral/jobs/pool-17-0"));
        assert_eq!(
            points,
            [
                "/var/lib/corral/jobs/pool-17-0/slot-0/upper/x",
                "/var/lib/corral/jobs/pool-17-0/slot-0",
                "/var/lib/corral/jobs/pool-17-0/slot-1",
                "/var/lib/corral/jobs/pool-17-0/slot-0",
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn unescapes_mount_points() {
        let points = mount_points_under(MOUNTINFO, Path::new("/var/lib/corral/jobs/old job"));
        assert_eq!(points, [PathBuf::from("/var/lib/corral/jobs/old job")]);
        assert_eq!(
            crate::mountinfo::unescape("a\\134b\\011c"),
            PathBuf::from("a\\b\tc")
        );
        assert_eq!(
            crate::mountinfo::unescape("trailing\\04"),
            PathBuf::from("trailing\\04")
        );
    }

    #[test]
    fn parses_instance_names() {
        assert_eq!(instance_pid("pool-17-0"), Some(17));
        assert_eq!(instance_pid("pool-17-3.lock"), Some(17));
        assert_eq!(instance_pid(&instance_name(4242, 9)), Some(4242));
        for other in ["job-1", "pool-x-1", "pool-17", "pool-17-a", "slot-0"] {
            assert_eq!(instance_pid(other), None, "{other}");
        }
    }

    #[test]
    fn removes_what_no_live_pool_holds_and_keeps_what_one_does() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        // A live pool of another process: its lock is held (by this test, standing in).
        let live = root.join(instance_name(u32::MAX, 0));
        std::fs::create_dir_all(live.join("slot-0")).unwrap();
        let _held = lock_instance(&lock_path(&live)).unwrap();
        // A dead pool: its lock file exists but nobody holds it.
        let dead = root.join(instance_name(u32::MAX - 1, 0));
        std::fs::create_dir_all(dead.join("slot-0/upper")).unwrap();
        std::fs::write(dead.join("slot-0.img"), b"").unwrap();
        std::fs::write(lock_path(&dead), b"").unwrap();
        // A leaked pool of this process: held, but by us.
        let leaked = root.join(instance_name(7, 0));
        std::fs::create_dir_all(&leaked).unwrap();
        let _leaked_lock = lock_instance(&lock_path(&leaked)).unwrap();
        // Job-named leftovers from before the pool.
        std::fs::create_dir_all(root.join("job-1/upper")).unwrap();
        std::fs::write(root.join("job-1.img"), b"").unwrap();

        let recovery = recover(root, "", 7);
        assert!(recovery.errors.is_empty(), "{:?}", recovery.errors);
        let mut left: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let live_name = instance_name(u32::MAX, 0);
        assert_eq!(left, [live_name.clone(), format!("{live_name}.lock")]);
        assert_eq!(recovery.removed.len(), 6, "{:?}", recovery.removed);
    }
}
