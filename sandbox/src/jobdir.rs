//! A job's upper and work dirs on a size-limited backing: a sparse ext4 image, loop-mounted
//! in the worker's own mount namespace so the upper dir survives the sandbox helper and
//! the worker can snapshot it.
//!
//! Why a loop filesystem and not a tmpfs: tmpfs pages are charged to the memory cgroup of
//! the writer, so a job's files would count against its RAM limit (a disk fill would end as
//! an OOM, not `disk_limit`), would occupy host RAM until the snapshot finishes, and would
//! keep the dead job's memory cgroup pinned. A loop ext4 gives a real ENOSPC at exactly the
//! configured size, a bounded inode count, and costs only the blocks written.

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
        jd.build(disk_bytes.max(MIN_BYTES))?;
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
        for sub in ["upper", "work"] {
            let p = self.dir.join(sub);
            std::fs::create_dir(&p).map_err(|source| JobDirError::Create { path: p, source })?;
        }
        let _ = std::fs::remove_dir(self.dir.join("lost+found"));
        Ok(())
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

impl Drop for JobDir {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}
