//! Per-project host identities: each project gets its own uid/gid from a configured range,
//! stable on this worker and never shared between two projects. Persisted as JSON in the
//! worker's data dir, under an exclusive `flock` so concurrent workers agree.

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use crate::spec::Identity;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("opening the identity map {path}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("locking the identity map {path}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the identity map {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the identity map {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("writing the identity map {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("every uid in {start}..={end} is taken; widen the configured range")]
    Exhausted { start: u32, end: u32 },
    #[error("the id range {start}..={end} is empty, overflows or includes id 0")]
    BadRange { start: u32, end: u32 },
}

/// The allocator. Cheap to clone; every call re-reads the file under the lock.
#[derive(Debug, Clone)]
pub struct IdentityMap {
    path: PathBuf,
    range: RangeInclusive<u32>,
    /// The gid of the range's first uid; a project's gid sits at its uid's offset from it.
    gid_start: u32,
}

impl IdentityMap {
    /// Map stored in `<data_dir>/identities.json`, allocating from `range`.
    pub fn open(data_dir: &Path, range: RangeInclusive<u32>) -> Result<Self, IdentityError> {
        if range.is_empty() || *range.start() == 0 {
            return Err(IdentityError::BadRange {
                start: *range.start(),
                end: *range.end(),
            });
        }
        std::fs::create_dir_all(data_dir).map_err(|source| IdentityError::Open {
            path: data_dir.to_owned(),
            source,
        })?;
        Ok(IdentityMap {
            path: data_dir.join("identities.json"),
            gid_start: *range.start(),
            range,
        })
    }

    /// Gids from their own range: a project's gid is `gid_start` plus its uid's offset in
    /// the uid range (by default the gid equals the uid).
    pub fn with_gid_start(self, gid_start: u32) -> Result<Self, IdentityError> {
        let span = self.range.end() - self.range.start();
        match gid_start.checked_add(span) {
            Some(_) if gid_start != 0 => Ok(IdentityMap { gid_start, ..self }),
            _ => Err(IdentityError::BadRange {
                start: gid_start,
                end: gid_start.saturating_add(span),
            }),
        }
    }

    fn identity_of(&self, uid: u32) -> Identity {
        let host_gid = if self.range.contains(&uid) {
            self.gid_start + (uid - self.range.start())
        } else {
            // Allocated from an earlier range, when gids equalled uids: its files on disk
            // keep that gid.
            uid
        };
        Identity {
            host_uid: uid,
            host_gid,
        }
    }

    /// The project's identity, allocating the lowest free uid (and its gid) on first use.
    pub fn identity(&self, project: &str) -> Result<Identity, IdentityError> {
        let path = &self.path;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| IdentityError::Open {
                path: path.clone(),
                source,
            })?;
        crate::sys::flock_exclusive(&file).map_err(|source| IdentityError::Lock {
            path: path.clone(),
            source,
        })?;
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|source| IdentityError::Read {
                path: path.clone(),
                source,
            })?;
        let mut map: BTreeMap<String, u32> = if text.trim().is_empty() {
            BTreeMap::new()
        } else {
            serde_json::from_str(&text).map_err(|e| IdentityError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?
        };
        if let Some(&uid) = map.get(project) {
            return Ok(self.identity_of(uid));
        }
        let taken: std::collections::BTreeSet<u32> = map.values().copied().collect();
        let uid =
            self.range
                .clone()
                .find(|u| !taken.contains(u))
                .ok_or(IdentityError::Exhausted {
                    start: *self.range.start(),
                    end: *self.range.end(),
                })?;
        map.insert(project.to_owned(), uid);
        let json = serde_json::to_string_pretty(&map).unwrap_or_default();
        // Rewrite in place under the lock (a rename would swap the inode others lock on).
        let write = (|| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(json.as_bytes())?;
            file.sync_data()
        })();
        write.map_err(|source| IdentityError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(self.identity_of(uid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_distinct_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let map = IdentityMap::open(dir.path(), 200_000..=200_009).unwrap();
        let a = map.identity("alpha").unwrap();
        let b = map.identity("beta").unwrap();
        assert_eq!(a.host_uid, 200_000);
        assert_eq!(b.host_uid, 200_001);
        assert_eq!(a.host_gid, a.host_uid);
        assert_eq!(map.identity("alpha").unwrap(), a);
        let reopened = IdentityMap::open(dir.path(), 200_000..=200_009).unwrap();
        assert_eq!(reopened.identity("beta").unwrap(), b);
    }

    #[test]
    fn gids_sit_at_the_uids_offset_in_their_own_range() {
        let dir = tempfile::tempdir().unwrap();
        let map = IdentityMap::open(dir.path(), 200_000..=200_009)
            .unwrap()
            .with_gid_start(500_000)
            .unwrap();
        let a = map.identity("alpha").unwrap();
        let b = map.identity("beta").unwrap();
        assert_eq!((a.host_uid, a.host_gid), (200_000, 500_000));
        assert_eq!((b.host_uid, b.host_gid), (200_001, 500_001));
        assert_eq!(map.identity("beta").unwrap(), b);
        let open = || IdentityMap::open(dir.path(), 200_000..=200_009).unwrap();
        assert!(open().with_gid_start(0).is_err());
        assert!(open().with_gid_start(u32::MAX - 5).is_err());
    }

    #[test]
    fn exhaustion_is_an_error_not_sharing() {
        let dir = tempfile::tempdir().unwrap();
        let map = IdentityMap::open(dir.path(), 300_000..=300_001).unwrap();
        map.identity("a").unwrap();
        map.identity("b").unwrap();
        assert!(matches!(
            map.identity("c"),
            Err(IdentityError::Exhausted { .. })
        ));
        assert!(matches!(
            IdentityMap::open(dir.path(), 0..=10),
            Err(IdentityError::BadRange { .. })
        ));
    }

    #[test]
    fn concurrent_allocations_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let map = IdentityMap::open(&path, 400_000..=400_099).unwrap();
                    (0..5)
                        .map(|j| map.identity(&format!("p{i}-{j}")).unwrap().host_uid)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u32> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort_unstable();
        let n = all.len();
        all.dedup();
        assert_eq!(all.len(), n, "two projects got the same uid");
    }

    #[test]
    fn corrupt_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("identities.json"), "{not json").unwrap();
        let map = IdentityMap::open(dir.path(), 200_000..=200_001).unwrap();
        assert!(matches!(
            map.identity("x"),
            Err(IdentityError::Corrupt { .. })
        ));
    }
}
