//! Per-project host identities: each project gets its own uid/gid from a configured range,
//! never shared between two projects on a worker. Persisted as JSON in the worker's data
//! dir, under an exclusive `flock` so concurrent workers agree.
//!
//! Fleet-stable: a project's uid is derived from its id, `uid_start + fnv1a64(project) mod
//! id_count` (FNV-1a, 64 bit, over the id's bytes), so every worker configured with the same
//! range runs the project as the same host uid, and files an app writes read the same
//! everywhere. A collision (another project already holds that uid here) is detected from
//! the map, which knows each uid's holder: the project then takes the next free uid after
//! its slot, and the allocation says so ([`Allocation::collided_with`]) so the worker can
//! warn; such a project's uid depends on the order projects arrived and may differ between
//! workers. With `id_count` 65 536 and P projects about P²/131 072 collisions are expected
//! (8 for 1 000 projects); a wider range makes them rarer. Projects already in a map keep the
//! uid they have.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, Write};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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

/// The allocator. Cheap to clone (clones share what they know); a project not yet known to
/// this process is looked up, or allocated, in the file under the lock.
#[derive(Debug, Clone)]
pub struct IdentityMap {
    path: PathBuf,
    range: RangeInclusive<u32>,
    /// The gid of the range's first uid; a project's gid sits at its uid's offset from it.
    gid_start: u32,
    /// Uids this process has read from or written to the map, shared by clones. An entry
    /// never changes once written, so a known project costs no read of the file (which
    /// grows with the projects a worker has seen: one open, lock and parse per job).
    known: Arc<Mutex<HashMap<String, u32>>>,
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
            known: Arc::default(),
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

    /// The uid a project gets when its slot is free: the same on every worker with this
    /// range.
    pub fn slot(&self, project: &str) -> u32 {
        let span = u64::from(self.range.end() - self.range.start()) + 1;
        let offset = u32::try_from(fnv1a64(project.as_bytes()) % span)
            .expect("an offset within a u32 range");
        self.range.start() + offset
    }

    /// The project's identity, its uid derived from its id on first use (see the module doc).
    pub fn identity(&self, project: &str) -> Result<Identity, IdentityError> {
        self.allocate(project).map(|a| a.identity)
    }

    /// As [`IdentityMap::identity`], saying whether the project's slot was taken. A project
    /// this process has already seen is answered from memory.
    pub fn allocate(&self, project: &str) -> Result<Allocation, IdentityError> {
        let known = self.lock_known().get(project).copied();
        if let Some(uid) = known {
            return Ok(Allocation {
                identity: self.identity_of(uid),
                collided_with: None,
            });
        }
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
            self.lock_known().insert(project.to_owned(), uid);
            return Ok(Allocation {
                identity: self.identity_of(uid),
                collided_with: None,
            });
        }
        // What this process knows stays held, even if the file lost it (an operator's edit):
        // two projects must never share a uid. Written back with the new entry.
        for (known, &uid) in self.lock_known().iter() {
            map.entry(known.clone()).or_insert(uid);
        }
        let holders: BTreeMap<u32, &str> = map.iter().map(|(p, &u)| (u, p.as_str())).collect();
        let slot = self.slot(project);
        let collided_with = holders.get(&slot).map(|p| (*p).to_owned());
        // From the slot to the range's end, then from its start: the first free uid.
        let uid = (slot..=*self.range.end())
            .chain(*self.range.start()..slot)
            .find(|u| !holders.contains_key(u))
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
        self.lock_known().insert(project.to_owned(), uid);
        Ok(Allocation {
            identity: self.identity_of(uid),
            collided_with,
        })
    }

    fn lock_known(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // The map is only ever inserted into: a panic elsewhere cannot leave it half-made.
        self.known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A project's identity and, when its derived uid was already held by another project on
/// this worker, that project (the identity is then the next free uid, not fleet-stable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub identity: Identity,
    pub collided_with: Option<String>,
}

/// FNV-1a, 64 bit: small, fixed forever (a change would move every project's uid), and
/// spreads short ids well enough for a slot in a range.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv1a64() {
        // The published FNV-1a test vectors: the uids of a fleet depend on them.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn two_workers_give_a_project_the_same_uid_whatever_came_first() {
        let (w1, w2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let range = 1_000_000..=1_065_535;
        let one = IdentityMap::open(w1.path(), range.clone()).unwrap();
        let two = IdentityMap::open(w2.path(), range).unwrap();
        let projects: Vec<String> = (0..50).map(|i| format!("project-{i}")).collect();
        let first: Vec<_> = projects.iter().map(|p| one.allocate(p).unwrap()).collect();
        let second: Vec<_> = projects
            .iter()
            .rev()
            .map(|p| two.allocate(p).unwrap())
            .collect();
        for (a, b) in first.iter().zip(second.iter().rev()) {
            assert_eq!(a.identity, b.identity);
            assert_eq!(a.collided_with, None);
        }
        assert_eq!(first[0].identity.host_uid, one.slot("project-0"));
    }

    #[test]
    fn a_collision_is_detected_and_takes_the_next_free_uid() {
        let dir = tempfile::tempdir().unwrap();
        let map = IdentityMap::open(dir.path(), 200_000..=200_002).unwrap();
        // Two project ids whose slots coincide in a range of 3.
        let first = "p0".to_owned();
        let second = (1..)
            .map(|i| format!("p{i}"))
            .find(|p| map.slot(p) == map.slot(&first))
            .unwrap();
        let a = map.allocate(&first).unwrap();
        assert_eq!(a.identity.host_uid, map.slot(&first));
        assert_eq!(a.collided_with, None);
        let b = map.allocate(&second).unwrap();
        assert_eq!(b.collided_with.as_deref(), Some(first.as_str()));
        assert_ne!(b.identity.host_uid, a.identity.host_uid);
        // Remembered: asked again, no new collision and the same uid.
        assert_eq!(
            map.allocate(&second).unwrap(),
            Allocation {
                identity: b.identity,
                collided_with: None
            }
        );
    }

    #[test]
    fn stable_distinct_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let map = IdentityMap::open(dir.path(), 200_000..=200_009).unwrap();
        let a = map.identity("alpha").unwrap();
        let b = map.identity("beta").unwrap();
        assert_ne!(a.host_uid, b.host_uid);
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
        assert_eq!(a.host_gid - 500_000, a.host_uid - 200_000);
        assert_eq!(b.host_gid - 500_000, b.host_uid - 200_000);
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
    fn a_known_project_is_answered_from_memory_and_stays_held() {
        let dir = tempfile::tempdir().unwrap();
        let map = IdentityMap::open(dir.path(), 200_000..=200_001).unwrap();
        let alpha = map.identity("alpha").unwrap();
        let file = dir.path().join("identities.json");
        // The file is not read again for a project this process knows (nor by its clones).
        std::fs::write(&file, "{not json").unwrap();
        assert_eq!(map.clone().identity("alpha").unwrap(), alpha);
        assert!(matches!(
            map.identity("beta"),
            Err(IdentityError::Corrupt { .. })
        ));
        // Emptied behind its back, the map still never gives alpha's uid to another project,
        // and writes alpha back.
        std::fs::write(&file, "").unwrap();
        let beta = map.identity("beta").unwrap();
        assert_ne!(beta.host_uid, alpha.host_uid);
        let reopened = IdentityMap::open(dir.path(), 200_000..=200_001).unwrap();
        assert_eq!(reopened.identity("alpha").unwrap(), alpha);
        assert!(matches!(
            reopened.identity("gamma"),
            Err(IdentityError::Exhausted { .. })
        ));
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
