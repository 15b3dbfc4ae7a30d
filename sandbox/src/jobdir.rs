//! A job's upper and work dirs on a size-limited backing: a sparse ext4 image, loop-mounted
//! in the worker's own mount namespace so the upper dir survives the sandbox shim and
//! the worker can snapshot it.
//!
//! Why a loop filesystem and not a tmpfs: tmpfs pages are charged to the memory cgroup of
//! the writer, so a job's files would count against its RAM limit (a disk fill would end as
//! an OOM, not `disk_limit`), would occupy host RAM until the snapshot finishes, and would
//! keep the dead job's memory cgroup pinned. A loop ext4 gives a real ENOSPC at exactly the
//! configured size, a bounded inode count, and costs only the blocks written.
//!
//! Formatting and mounting one costs several milliseconds, so the worker keeps them in a
//! [`JobDirPool`] (see [`pool`]): ready filesystems per size, wiped back to their freshly
//! formatted state in the background between jobs.

mod pool;
mod recovery;

pub use pool::{JobDirPool, PoolOptions, PoolStats, PooledJobDir};
pub use recovery::PoolRecovery;

use std::fs::{DirBuilder, Permissions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum JobDirError {
    #[error("creating {path}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("running mkfs.ext4 on {path}: {message}")]
    Mkfs { path: PathBuf, message: String },
    #[error("attaching {path} to a loop device (is the `loop` module loaded?)")]
    Loop {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mounting {device} on {path}")]
    Mount {
        device: PathBuf,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unmounting {path}")]
    Unmount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("removing {path}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the state of {path}")]
    Inspect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("locking the job dir pool at {path}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the job dir pool's background thread")]
    SpawnThread { source: std::io::Error },
}

/// `<root>/<job>/` (the mounted filesystem) holding `upper/` and `work/`, backed by
/// `<root>/<job>.img`. Unmounted and deleted by [`JobDir::remove`] or on drop.
#[derive(Debug)]
pub struct JobDir {
    dir: PathBuf,
    image: PathBuf,
    removed: bool,
}

/// Bytes per inode: about one file per 16 KiB, like ext4's default.
const BYTES_PER_INODE: u64 = 16 * 1024;
/// ext4 needs some room for its own metadata.
const MIN_BYTES: u64 = 8 << 20;
/// The mode of a fresh `upper/` and `work/`, set explicitly so that neither the worker's
/// umask nor an earlier job changes what the next job finds.
const DIR_MODE: u32 = 0o755;

/// The size of the filesystem made for a job asking for `disk_bytes`.
pub(crate) fn fs_bytes(disk_bytes: u64) -> u64 {
    disk_bytes.max(MIN_BYTES)
}

impl JobDir {
    pub fn create(root: &Path, job: &str, disk_bytes: u64) -> Result<JobDir, JobDirError> {
        let dir = root.join(job);
        let image = root.join(format!("{job}.img"));
        std::fs::create_dir_all(&dir).map_err(|source| JobDirError::Create {
            path: dir.clone(),
            source,
        })?;
        let mut jd = JobDir {
            dir,
            image,
            removed: false,
        };
        jd.build(fs_bytes(disk_bytes))?;
        Ok(jd)
    }

    fn build(&mut self, bytes: u64) -> Result<(), JobDirError> {
        let img = &self.image;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(img)
            .map_err(|source| JobDirError::Create {
                path: img.clone(),
                source,
            })?;
        file.set_len(bytes).map_err(|source| JobDirError::Create {
            path: img.clone(),
            source,
        })?;
        // No journal (the image dies with the job), no reserved blocks (ENOSPC exactly at
        // the limit), lazy init so mkfs writes almost nothing.
        let out = Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-m",
                "0",
                "-O",
                "^has_journal,^resize_inode",
                "-E",
                "nodiscard,lazy_itable_init=1",
            ])
            .arg("-i")
            .arg(BYTES_PER_INODE.to_string())
            .arg(img)
            .output()
            .map_err(|e| JobDirError::Mkfs {
                path: img.clone(),
                message: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(JobDirError::Mkfs {
                path: img.clone(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        // The device detaches itself once unmounted; `_hold` keeps it until mounted.
        let (device, _hold) =
            crate::sys::loop_attach(&file).map_err(|source| JobDirError::Loop {
                path: img.clone(),
                source,
            })?;
        drop(file);
        crate::sys::mount(
            Some(&device),
            &self.dir,
            Some("ext4"),
            libc::MS_NOSUID | libc::MS_NODEV,
            None,
        )
        .map_err(|source| JobDirError::Mount {
            device: device.clone(),
            path: self.dir.clone(),
            source,
        })?;
        let _ = std::fs::remove_dir(self.dir.join("lost+found"));
        make_fresh_dirs(&self.dir)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }

    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }

    /// Unmounts, detaches and deletes everything. Call once the snapshot is taken.
    pub fn remove(mut self) -> Result<(), JobDirError> {
        self.teardown()
    }

    /// Removes everything on the filesystem — `upper/`, `work/` with overlay's own
    /// `work/work`, and anything else — and makes empty `upper/` and `work/` exactly as
    /// [`JobDir::create`] does. Only call it once no process uses the dir.
    ///
    /// The walk keeps its own stack rather than recursing (as `remove_dir_all` does): a
    /// build can nest directories far deeper than a thread's stack. Paths past `PATH_MAX`
    /// fail the wipe, and the caller tears the filesystem down instead.
    pub(crate) fn wipe(&self) -> Result<(), JobDirError> {
        let remove_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JobDirError::Remove { path, source }
        };
        // (dir, its entries are gone)
        let mut pending = vec![(self.dir.clone(), false)];
        while let Some((dir, emptied)) = pending.pop() {
            if emptied {
                if dir != self.dir {
                    std::fs::remove_dir(&dir).map_err(remove_err(&dir))?;
                }
                continue;
            }
            pending.push((dir.clone(), true));
            for entry in std::fs::read_dir(&dir).map_err(remove_err(&dir))? {
                let entry = entry.map_err(remove_err(&dir))?;
                let path = entry.path();
                // The entry's own type: a symlink is unlinked, never followed.
                if entry.file_type().map_err(remove_err(&path))?.is_dir() {
                    pending.push((path, false));
                } else {
                    std::fs::remove_file(&path).map_err(remove_err(&path))?;
                }
            }
        }
        make_fresh_dirs(&self.dir)
    }

    /// Inodes in use beyond those of `fresh`: what a wipe would have to remove.
    pub(crate) fn inodes_since(&self, fresh: &FsState) -> Result<u64, JobDirError> {
        let space = crate::sys::statvfs(&self.dir).map_err(|source| JobDirError::Inspect {
            path: self.dir.clone(),
            source,
        })?;
        Ok(fresh.files_available.saturating_sub(space.files_available))
    }

    /// What a fresh dir looks like: free blocks and inodes, and the owner, mode, link count
    /// and extended attributes of the root, `upper/` and `work/`.
    pub(crate) fn state(&self) -> Result<FsState, JobDirError> {
        FsState::read(&self.dir)
    }

    fn teardown(&mut self) -> Result<(), JobDirError> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        if let Err(source) = crate::sys::umount2(&self.dir, 0)
            && source.raw_os_error() != Some(libc::EINVAL)
        {
            // Busy (someone still reads it): detach so it goes away when they finish.
            crate::sys::umount2(&self.dir, libc::MNT_DETACH).map_err(|source| {
                JobDirError::Unmount {
                    path: self.dir.clone(),
                    source,
                }
            })?;
        }
        std::fs::remove_dir(&self.dir).map_err(|source| JobDirError::Remove {
            path: self.dir.clone(),
            source,
        })?;
        std::fs::remove_file(&self.image).map_err(|source| JobDirError::Remove {
            path: self.image.clone(),
            source,
        })
    }
}

/// Empty `upper/` and `work/` under `root`, mode [`DIR_MODE`], owned by the caller.
fn make_fresh_dirs(root: &Path) -> Result<(), JobDirError> {
    for sub in ["upper", "work"] {
        let path = root.join(sub);
        DirBuilder::new()
            .mode(DIR_MODE)
            .create(&path)
            .and_then(|()| std::fs::set_permissions(&path, Permissions::from_mode(DIR_MODE)))
            .map_err(|source| JobDirError::Create { path, source })?;
    }
    Ok(())
}

/// The parts of a job filesystem's state that a job can change and a fresh one fixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FsState {
    bytes_available: u64,
    files_available: u64,
    root: Inode,
    upper: Inode,
    work: Inode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Inode {
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    xattr_bytes: usize,
}

impl Inode {
    fn read(path: &Path) -> Result<Inode, JobDirError> {
        let err = |source| JobDirError::Inspect {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::symlink_metadata(path).map_err(err)?;
        Ok(Inode {
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            nlink: meta.nlink(),
            xattr_bytes: crate::sys::llistxattr_size(path).map_err(err)?,
        })
    }
}

impl FsState {
    fn read(dir: &Path) -> Result<FsState, JobDirError> {
        let space = crate::sys::statvfs(dir).map_err(|source| JobDirError::Inspect {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(FsState {
            bytes_available: space.bytes_available,
            files_available: space.files_available,
            root: Inode::read(dir)?,
            upper: Inode::read(&dir.join("upper"))?,
            work: Inode::read(&dir.join("work"))?,
        })
    }

    /// How `self` differs from `fresh`, in words; `None` when it does not.
    pub(crate) fn differs_from(&self, fresh: &FsState) -> Option<String> {
        if self == fresh {
            return None;
        }
        let mut what = Vec::new();
        if self.bytes_available != fresh.bytes_available {
            what.push(format!(
                "{} bytes free, {} when fresh",
                self.bytes_available, fresh.bytes_available
            ));
        }
        if self.files_available != fresh.files_available {
            what.push(format!(
                "{} inodes free, {} when fresh",
                self.files_available, fresh.files_available
            ));
        }
        for (name, now, then) in [
            ("the root", self.root, fresh.root),
            ("upper/", self.upper, fresh.upper),
            ("work/", self.work, fresh.work),
        ] {
            if now != then {
                what.push(format!("{name} is {now:?}, {then:?} when fresh"));
            }
        }
        Some(what.join("; "))
    }
}

impl Drop for JobDir {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}
