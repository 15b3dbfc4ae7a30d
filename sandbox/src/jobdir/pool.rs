//! Ready job filesystems, so that formatting, attaching and mounting one (several ms) and
//! tearing it down (several more) happen off the job's critical path.
//!
//! [`JobDirPool::take`] hands out a ready filesystem of the asked size at once, or makes
//! one on the spot when none is ready. When the job is over, its [`PooledJobDir`] goes back:
//! a background thread wipes it (everything removed, fresh empty `upper/` and `work/`) and
//! keeps it only if the filesystem is then exactly as freshly made — the same free blocks and
//! inodes as recorded right after `mkfs`, the same owner, mode, link count and extended
//! attributes on its root, `upper/` and `work/`. Otherwise (an inode still held open, a
//! failed wipe, more files than are worth removing, enough slots of that size already) the
//! filesystem is torn down, also in the background. Per size the pool keeps at most `ready_per_size` slots (in use, being wiped
//! or ready), creates missing ones ahead of demand for sizes taken recently, and drops the
//! ready slots of a size not taken for a while.
//!
//! # What a reused filesystem gives the next job
//!
//! Nothing of the previous one: no file, directory, link, xattr or ACL survives the wipe,
//! and the free-block and free-inode check proves that no unlinked file is still held open.
//! The blocks of deleted files keep their old bytes on the image, but they are reachable only
//! through the block device or the image file, neither of which exists inside a sandbox (no
//! device nodes but the usual character devices, `nodev`, the image is on the worker's data
//! disk): through the filesystem a newly allocated block reads as zeros until written
//! (ext4 marks new extents unwritten).
//!
//! # Crash recovery
//!
//! See [`super::recovery`]: a new pool removes what a dead worker left under the root.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::recovery::{self, PoolRecovery};
use super::{FsState, JobDir, JobDirError, fs_bytes};
use crate::error_chain;

/// How a [`JobDirPool`] behaves.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Slots kept per filesystem size, in use or ready: the worker's concurrency. 0 keeps
    /// nothing (every dir is made on take and torn down after use, in the background).
    pub ready_per_size: usize,
    /// A size not taken for this long loses its ready slots and is not refilled.
    pub idle_size_after: Duration,
    /// How long dropping the pool waits for the background thread.
    pub shutdown_wait: Duration,
}

impl PoolOptions {
    pub fn new(ready_per_size: usize) -> Self {
        PoolOptions {
            ready_per_size,
            idle_size_after: Duration::from_secs(600),
            shutdown_wait: Duration::from_secs(30),
        }
    }
}

/// Counters since the pool was opened, and the ready slots now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Takes answered with a ready slot.
    pub hits: u64,
    /// Takes that had to make a filesystem on the spot.
    pub misses: u64,
    /// Slots wiped and made ready again.
    pub reused: u64,
    /// Slots torn down after use: not fresh after the wipe, not quiescent, or not needed.
    pub discarded: u64,
    /// Slots made ahead of demand by the background thread.
    pub made_ahead: u64,
    /// Background failures (a wipe, a teardown, making a slot ahead).
    pub failures: u64,
    /// Ready slots now, all sizes.
    pub ready: usize,
}

/// Ready, formatted and mounted job filesystems, per size. See the module docs.
pub struct JobDirPool {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    recovery: PoolRecovery,
    _lock: File,
}

impl std::fmt::Debug for JobDirPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobDirPool")
            .field("dir", &self.shared.dir)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// A job dir from the pool. Dropped, it goes back to the pool for a wipe and reuse if
/// [`PooledJobDir::mark_quiescent`] was called, and is torn down otherwise; both happen on
/// the pool's background thread.
pub struct PooledJobDir {
    slot: Option<Slot>,
    bytes: u64,
    shared: Arc<Shared>,
    quiescent: bool,
    was_ready: bool,
}

impl std::fmt::Debug for PooledJobDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledJobDir")
            .field("path", &self.path())
            .field("bytes", &self.bytes)
            .field("quiescent", &self.quiescent)
            .finish()
    }
}

impl PooledJobDir {
    fn slot(&self) -> &Slot {
        self.slot.as_ref().expect("present until dropped")
    }

    pub fn path(&self) -> &Path {
        self.slot().dir.path()
    }

    pub fn upper(&self) -> PathBuf {
        self.slot().dir.upper()
    }

    pub fn work(&self) -> PathBuf {
        self.slot().dir.work()
    }

    /// Whether it was ready when taken (a pool hit) rather than made on the spot.
    pub fn was_ready(&self) -> bool {
        self.was_ready
    }

    /// Declares that no process uses the dir any more (the sandbox has reported every job
    /// process dead and its overlay gone): once dropped, it may be wiped and reused.
    pub fn mark_quiescent(&mut self) {
        self.quiescent = true;
    }

    /// [`PooledJobDir::mark_quiescent`] for a job whose pid 1 may still be exiting
    /// ([`crate::Running::wait_outcome`]): the pool's background thread waits for
    /// `teardown` (the overlay over this dir gone with pid 1's mount namespace) before it
    /// wipes or tears the dir down.
    pub fn mark_quiescent_after(&mut self, teardown: crate::Teardown) {
        if let Some(slot) = self.slot.as_mut() {
            slot.teardown = Some(teardown);
        }
        self.quiescent = true;
    }
}

impl Drop for PooledJobDir {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.shared.give_back(self.bytes, slot, self.quiescent);
        }
    }
}

/// Past this many files and dirs, removing them one by one costs more than tearing the
/// filesystem down and making a new one (about 10 ms of `mkfs`, loop and mount work).
const MAX_WIPE_FILES: u64 = 10_000;

/// One mounted filesystem and its state when fresh.
struct Slot {
    dir: JobDir,
    fresh: FsState,
    /// The end of the last job's pid 1, waited for before the dir is wiped or torn down.
    teardown: Option<crate::Teardown>,
}

impl Slot {
    fn make(root: &Path, name: &str, bytes: u64) -> Result<Slot, JobDirError> {
        let dir = JobDir::create(root, name, bytes)?;
        let fresh = dir.state()?;
        Ok(Slot {
            dir,
            fresh,
            teardown: None,
        })
    }

    /// Waits until no overlay of the last job holds the dir any more.
    fn settle(&mut self) {
        if let Some(teardown) = self.teardown.take() {
            teardown.wait();
        }
    }

    /// Wipes the dir; `Err` says why it cannot be reused.
    fn wipe(&mut self) -> Result<(), String> {
        self.settle();
        let files = self
            .dir
            .inodes_since(&self.fresh)
            .map_err(|e| error_chain(&e))?;
        if files > MAX_WIPE_FILES {
            return Err(format!(
                "{files} files to remove: making a new filesystem is cheaper"
            ));
        }
        self.dir.wipe().map_err(|e| error_chain(&e))?;
        let now = self.dir.state().map_err(|e| error_chain(&e))?;
        match now.differs_from(&self.fresh) {
            None => Ok(()),
            Some(diff) => Err(format!("not fresh after the wipe: {diff}")),
        }
    }

    fn tear_down(mut self) -> Result<(), JobDirError> {
        self.settle();
        self.dir.teardown()
    }
}

struct Shared {
    dir: PathBuf,
    options: PoolOptions,
    state: Mutex<State<Slot>>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State<Slot>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn give_back(&self, bytes: u64, slot: Slot, quiescent: bool) {
        let inline = self.lock().give_back(bytes, slot, quiescent);
        self.wake.notify_all();
        // Only once the pool is closing: nobody is left to do it in the background.
        if let Some(slot) = inline
            && let Err(err) = slot.tear_down()
        {
            tracing::warn!(error = %error_chain(&err), "could not tear down a job dir");
        }
    }
}

static INSTANCES: AtomicU64 = AtomicU64::new(0);

impl JobDirPool {
    /// Opens a pool under `root` (created if missing) that keeps `ready_per_size` slots per
    /// size; first removes what a dead worker left there (see [`JobDirPool::recovery`]).
    pub fn open(root: &Path, ready_per_size: usize) -> Result<JobDirPool, JobDirError> {
        JobDirPool::with_options(root, PoolOptions::new(ready_per_size))
    }

    pub fn with_options(root: &Path, options: PoolOptions) -> Result<JobDirPool, JobDirError> {
        std::fs::create_dir_all(root).map_err(|source| JobDirError::Create {
            path: root.to_path_buf(),
            source,
        })?;
        // Mount points in mountinfo are canonical paths.
        let root = std::fs::canonicalize(root).map_err(|source| JobDirError::Inspect {
            path: root.to_path_buf(),
            source,
        })?;
        let mountinfo = crate::mountinfo::read_own().map_err(|source| JobDirError::Inspect {
            path: PathBuf::from("/proc/self/mountinfo"),
            source,
        })?;
        let pid = std::process::id();
        let recovery = recovery::recover(&root, &mountinfo, pid);
        // A name the recovery could not free (a mount it could not remove) is skipped.
        let (dir, lock) = loop {
            let dir = root.join(recovery::instance_name(
                pid,
                INSTANCES.fetch_add(1, Ordering::Relaxed),
            ));
            let lock = recovery::lock_instance(&recovery::lock_path(&dir))?;
            match std::fs::create_dir(&dir) {
                Ok(()) => break (dir, lock),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(JobDirError::Create { path: dir, source }),
            }
        };
        let shared = Arc::new(Shared {
            dir,
            state: Mutex::new(State::new(options.ready_per_size)),
            options,
            wake: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("job-dir-pool".into())
                .spawn(move || {
                    let _exited = Exited(&shared);
                    background(&shared);
                })
                .map_err(|source| JobDirError::SpawnThread { source })?
        };
        Ok(JobDirPool {
            shared,
            thread: Some(thread),
            recovery,
            _lock: lock,
        })
    }

    /// What was left under the root by a previous worker and has been cleaned.
    pub fn recovery(&self) -> &PoolRecovery {
        &self.recovery
    }

    /// This pool's own dir under the root, which holds its slots.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// A ready job dir for a job of `disk_bytes`, if one is ready now. Never blocks.
    pub fn take_ready(&self, disk_bytes: u64) -> Option<PooledJobDir> {
        let bytes = fs_bytes(disk_bytes);
        let slot = {
            let mut state = self.shared.lock();
            let slot = state.take_ready(bytes, Instant::now())?;
            state.stats.hits += 1;
            slot
        };
        // Taking one may call for another one ahead of demand.
        self.shared.wake.notify_all();
        Some(self.lease(bytes, slot, true))
    }

    /// A job dir for a job of `disk_bytes`: a ready one, or one made now (blocking, several
    /// ms: call it from a blocking thread).
    pub fn take(&self, disk_bytes: u64) -> Result<PooledJobDir, JobDirError> {
        if let Some(dir) = self.take_ready(disk_bytes) {
            return Ok(dir);
        }
        let bytes = fs_bytes(disk_bytes);
        let name = {
            let mut state = self.shared.lock();
            state.stats.misses += 1;
            state.reserve(bytes, Instant::now())
        };
        self.shared.wake.notify_all();
        match Slot::make(&self.shared.dir, &name, bytes) {
            Ok(slot) => Ok(self.lease(bytes, slot, false)),
            Err(err) => {
                self.shared.lock().unreserve(bytes);
                Err(err)
            }
        }
    }

    fn lease(&self, bytes: u64, slot: Slot, was_ready: bool) -> PooledJobDir {
        PooledJobDir {
            slot: Some(slot),
            bytes,
            shared: self.shared.clone(),
            quiescent: false,
            was_ready,
        }
    }

    pub fn stats(&self) -> PoolStats {
        let state = self.shared.lock();
        PoolStats {
            ready: state.ready_count(),
            ..state.stats
        }
    }

    /// Waits until the background thread has nothing left to do (wipes, teardowns, slots to
    /// make ahead), at most `timeout`; says whether it got there. For tests and benchmarks.
    pub fn settle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if state.is_settled(Instant::now(), &self.shared.options) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .shared
                .wake
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for JobDirPool {
    fn drop(&mut self) {
        let ready = self.shared.lock().close();
        self.shared.wake.notify_all();
        for slot in ready {
            if let Err(err) = slot.tear_down() {
                tracing::warn!(error = %error_chain(&err), "could not tear down a job dir");
            }
        }
        let deadline = Instant::now() + self.shared.options.shutdown_wait;
        let mut state = self.shared.lock();
        while !state.exited {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    dir = %self.shared.dir.display(),
                    "the job dir pool's background work did not end in time; leaving it"
                );
                return;
            }
            state = self
                .shared
                .wake
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(state);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Slots still leased are torn down by their holders; the instance dir then waits
        // for the next start's recovery, and so does its lock file.
        if std::fs::remove_dir(&self.shared.dir).is_ok() {
            let _ = std::fs::remove_file(recovery::lock_path(&self.shared.dir));
        }
    }
}

/// Tells the pool's drop that the background thread is gone, even after a panic.
struct Exited<'a>(&'a Shared);

impl Drop for Exited<'_> {
    fn drop(&mut self) {
        self.0.lock().exited = true;
        self.0.wake.notify_all();
    }
}

/// The background thread: wipes and tears down what comes back, makes slots ahead of
/// demand, drops idle sizes. Work that comes back is done before anything is made ahead.
fn background(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        let now = Instant::now();
        let Some(work) = state.next_work(now, &shared.options) else {
            if state.closing {
                return;
            }
            let wait = state
                .next_deadline(now, &shared.options)
                .map_or(Duration::from_secs(60), |at| {
                    at.saturating_duration_since(now)
                })
                .max(Duration::from_millis(10));
            state = shared
                .wake
                .wait_timeout(state, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            continue;
        };
        drop(state);
        let done = match work {
            Work::Wipe { bytes, mut slot } => match slot.wipe() {
                Ok(()) => Done::Wiped { bytes, slot },
                Err(why) => {
                    tracing::info!(slot = %slot.dir.path().display(), why, "job dir not reused");
                    Done::NotReusable { bytes, slot }
                }
            },
            Work::TearDown(slot) => {
                let path = slot.dir.path().to_path_buf();
                match slot.tear_down() {
                    Ok(()) => Done::TornDown,
                    Err(err) => {
                        tracing::warn!(slot = %path.display(), error = %error_chain(&err),
                            "could not tear down a job dir");
                        Done::Failed
                    }
                }
            }
            Work::Make { bytes, name } => match Slot::make(&shared.dir, &name, bytes) {
                Ok(slot) => Done::Made { bytes, slot },
                Err(err) => {
                    tracing::warn!(bytes, error = %error_chain(&err),
                        "could not make a job dir ahead of demand");
                    Done::MakeFailed { bytes }
                }
            },
        };
        state = shared.lock();
        state.finish(done, Instant::now());
        shared.wake.notify_all();
    }
}

// ---- The bookkeeping, generic over the slot so that tests can use plain values. ----

/// Slots of one filesystem size.
#[derive(Debug)]
struct Size<S> {
    ready: Vec<S>,
    leased: usize,
    wiping: usize,
    making: usize,
    last_taken: Instant,
}

impl<S> Size<S> {
    fn new(now: Instant) -> Self {
        Size {
            ready: Vec::new(),
            leased: 0,
            wiping: 0,
            making: 0,
            last_taken: now,
        }
    }

    /// Every slot of this size that exists or will: the pool's limit applies to this.
    fn total(&self) -> usize {
        self.ready.len() + self.leased + self.wiping + self.making
    }
}

#[derive(Debug)]
enum Work<S> {
    Wipe { bytes: u64, slot: S },
    TearDown(S),
    Make { bytes: u64, name: String },
}

#[derive(Debug)]
enum Done<S> {
    Wiped { bytes: u64, slot: S },
    NotReusable { bytes: u64, slot: S },
    TornDown,
    Failed,
    Made { bytes: u64, slot: S },
    MakeFailed { bytes: u64 },
}

/// After a failure to make a slot ahead (no loop device, disk full), wait this long before
/// the next attempt; takes still make their own.
const MAKE_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct State<S> {
    sizes: BTreeMap<u64, Size<S>>,
    queue: VecDeque<Work<S>>,
    /// Work taken by the background thread and not finished yet.
    running: usize,
    limit: usize,
    closing: bool,
    /// The background thread has returned.
    exited: bool,
    next_slot: u64,
    make_paused_until: Option<Instant>,
    stats: PoolStats,
}

impl<S> State<S> {
    fn new(limit: usize) -> Self {
        State {
            sizes: BTreeMap::new(),
            queue: VecDeque::new(),
            running: 0,
            limit,
            closing: false,
            exited: false,
            next_slot: 0,
            make_paused_until: None,
            stats: PoolStats::default(),
        }
    }

    fn slot_name(&mut self) -> String {
        let name = format!("slot-{}", self.next_slot);
        self.next_slot += 1;
        name
    }

    fn ready_count(&self) -> usize {
        self.sizes.values().map(|s| s.ready.len()).sum()
    }

    /// A ready slot of `bytes`, now leased.
    fn take_ready(&mut self, bytes: u64, now: Instant) -> Option<S> {
        let size = self.sizes.entry(bytes).or_insert_with(|| Size::new(now));
        size.last_taken = now;
        let slot = size.ready.pop()?;
        size.leased += 1;
        Some(slot)
    }

    /// Leases a slot of `bytes` that the caller makes now; returns its name.
    fn reserve(&mut self, bytes: u64, now: Instant) -> String {
        let size = self.sizes.entry(bytes).or_insert_with(|| Size::new(now));
        size.last_taken = now;
        size.leased += 1;
        self.slot_name()
    }

    /// The caller could not make the slot it reserved.
    fn unreserve(&mut self, bytes: u64) {
        if let Some(size) = self.sizes.get_mut(&bytes) {
            size.leased = size.leased.saturating_sub(1);
        }
    }

    /// A leased slot comes back: queued for a wipe when it may be reused and is wanted,
    /// for a teardown otherwise. Returned when the pool is closing, for the caller to tear
    /// down at once.
    fn give_back(&mut self, bytes: u64, slot: S, quiescent: bool) -> Option<S> {
        let size = self.sizes.get_mut(&bytes);
        let wanted = match size {
            Some(size) => {
                size.leased = size.leased.saturating_sub(1);
                // Room left once this one is counted out (misses can overshoot the limit).
                quiescent && size.total() < self.limit
            }
            None => false,
        };
        if self.closing {
            self.stats.discarded += 1;
            return Some(slot);
        }
        if wanted {
            if let Some(size) = self.sizes.get_mut(&bytes) {
                size.wiping += 1;
            }
            self.queue.push_back(Work::Wipe { bytes, slot });
        } else {
            self.stats.discarded += 1;
            self.queue.push_back(Work::TearDown(slot));
        }
        None
    }

    /// The next thing for the background thread: returned work first, then slots to make
    /// ahead for sizes taken recently, then ready slots of sizes gone idle.
    fn next_work(&mut self, now: Instant, options: &PoolOptions) -> Option<Work<S>> {
        if let Some(work) = self.queue.pop_front() {
            self.running += 1;
            return Some(work);
        }
        if let Some(bytes) = self.size_to_fill(now, options) {
            let name = self.slot_name();
            if let Some(size) = self.sizes.get_mut(&bytes) {
                size.making += 1;
            }
            self.running += 1;
            return Some(Work::Make { bytes, name });
        }
        let idle: Vec<u64> = self
            .sizes
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_taken) >= options.idle_size_after)
            .map(|(bytes, _)| *bytes)
            .collect();
        for bytes in idle {
            let Some(size) = self.sizes.get_mut(&bytes) else {
                continue;
            };
            let drained: Vec<S> = size.ready.drain(..).collect();
            if size.total() == 0 {
                self.sizes.remove(&bytes);
            }
            self.queue
                .extend(drained.into_iter().map(|slot| Work::TearDown(slot)));
        }
        let work = self.queue.pop_front()?;
        self.running += 1;
        Some(work)
    }

    /// A recently taken size below the limit, unless the pool is closing or making slots
    /// failed a moment ago.
    fn size_to_fill(&self, now: Instant, options: &PoolOptions) -> Option<u64> {
        if self.closing || self.make_paused_until.is_some_and(|until| now < until) {
            return None;
        }
        self.sizes
            .iter()
            .find(|(_, s)| {
                s.total() < self.limit
                    && now.saturating_duration_since(s.last_taken) < options.idle_size_after
            })
            .map(|(bytes, _)| *bytes)
    }

    /// A slot whose wipe or making ended: the size's `in_flight` counter goes down, and the
    /// slot joins that size's ready ones when it is `usable`, the pool is open and still
    /// serves that size; otherwise it is torn down. Returns whether it joined.
    fn settle(
        &mut self,
        bytes: u64,
        slot: S,
        usable: bool,
        in_flight: fn(&mut Size<S>) -> &mut usize,
    ) -> bool {
        let open = !self.closing;
        if let Some(size) = self.sizes.get_mut(&bytes) {
            *in_flight(size) -= 1;
            if usable && open {
                size.ready.push(slot);
                return true;
            }
        }
        self.queue.push_back(Work::TearDown(slot));
        false
    }

    /// When the background thread should look again without being woken: the next size to
    /// go idle, or the end of a pause in making slots.
    fn next_deadline(&self, now: Instant, options: &PoolOptions) -> Option<Instant> {
        let idle = self
            .sizes
            .values()
            .map(|s| s.last_taken + options.idle_size_after)
            .min();
        let paused = self.make_paused_until.filter(|until| *until > now);
        idle.into_iter().chain(paused).min()
    }

    fn finish(&mut self, done: Done<S>, now: Instant) {
        self.running = self.running.saturating_sub(1);
        match done {
            Done::Wiped { bytes, slot } => {
                if self.settle(bytes, slot, true, |size| &mut size.wiping) {
                    self.stats.reused += 1;
                } else {
                    self.stats.discarded += 1;
                }
            }
            Done::NotReusable { bytes, slot } => {
                self.settle(bytes, slot, false, |size| &mut size.wiping);
                self.stats.discarded += 1;
            }
            Done::TornDown => {}
            Done::Failed => self.stats.failures += 1,
            Done::Made { bytes, slot } => {
                if self.settle(bytes, slot, true, |size| &mut size.making) {
                    self.stats.made_ahead += 1;
                }
            }
            Done::MakeFailed { bytes } => {
                if let Some(size) = self.sizes.get_mut(&bytes) {
                    size.making -= 1;
                }
                self.stats.failures += 1;
                self.make_paused_until = Some(now + MAKE_BACKOFF);
            }
        }
    }

    /// Nothing queued, nothing running, nothing to make.
    fn is_settled(&self, now: Instant, options: &PoolOptions) -> bool {
        self.queue.is_empty() && self.running == 0 && self.size_to_fill(now, options).is_none()
    }

    /// No more slots are made or kept; returns the ready ones to tear down.
    fn close(&mut self) -> Vec<S> {
        self.closing = true;
        let mut ready = Vec::new();
        for size in self.sizes.values_mut() {
            ready.append(&mut size.ready);
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn options() -> PoolOptions {
        PoolOptions::new(2)
    }

    /// Runs the background thread's loop by hand: every piece of work succeeds (wipes
    /// restore the fresh state unless the slot is in `dirty`), made slots are numbered
    /// from 100.
    fn settle(state: &mut State<u32>, now: Instant, dirty: &[u32]) -> Vec<String> {
        let mut log = Vec::new();
        let mut made = 100;
        while let Some(work) = state.next_work(now, &options()) {
            let done = match work {
                Work::Wipe { bytes, slot } if dirty.contains(&slot) => {
                    log.push(format!("wipe {slot} (not fresh)"));
                    Done::NotReusable { bytes, slot }
                }
                Work::Wipe { bytes, slot } => {
                    log.push(format!("wipe {slot}"));
                    Done::Wiped { bytes, slot }
                }
                Work::TearDown(slot) => {
                    log.push(format!("tear down {slot}"));
                    Done::TornDown
                }
                Work::Make { bytes, name } => {
                    log.push(format!("make {name} of {} MiB", bytes / MIB));
                    made += 1;
                    Done::Made { bytes, slot: made }
                }
            };
            state.finish(done, now);
        }
        log
    }

    #[test]
    fn first_take_misses_then_the_size_is_filled_up_to_the_limit() {
        let now = Instant::now();
        let mut state = State::<u32>::new(2);
        assert_eq!(state.take_ready(64 * MIB, now), None);
        assert_eq!(state.reserve(64 * MIB, now), "slot-0");
        // One in use: one more is made ahead, not two.
        assert_eq!(settle(&mut state, now, &[]), ["make slot-1 of 64 MiB"]);
        assert_eq!(state.take_ready(64 * MIB, now), Some(101));
        // Both in use: the limit is reached, nothing is made.
        assert!(settle(&mut state, now, &[]).is_empty());
        assert!(state.is_settled(now, &options()));
    }

    #[test]
    fn a_quiescent_slot_is_wiped_and_handed_out_again() {
        let now = Instant::now();
        let mut state = State::<u32>::new(2);
        state.reserve(64 * MIB, now);
        settle(&mut state, now, &[]);
        assert_eq!(state.give_back(64 * MIB, 7, true), None);
        assert_eq!(settle(&mut state, now, &[]), ["wipe 7"]);
        let mut ready = [
            state.take_ready(64 * MIB, now).unwrap(),
            state.take_ready(64 * MIB, now).unwrap(),
        ];
        ready.sort();
        assert_eq!(ready, [7, 101]);
        assert_eq!(state.stats.reused, 1);
        assert_eq!(state.stats.discarded, 0);
    }

    #[test]
    fn a_slot_not_marked_quiescent_is_torn_down() {
        let now = Instant::now();
        let mut state = State::<u32>::new(2);
        state.reserve(64 * MIB, now);
        assert_eq!(state.give_back(64 * MIB, 7, false), None);
        let log = settle(&mut state, now, &[]);
        assert_eq!(log[0], "tear down 7");
        assert_eq!(state.stats.discarded, 1);
    }

    #[test]
    fn a_slot_not_fresh_after_its_wipe_is_torn_down_and_replaced() {
        let now = Instant::now();
        let mut state = State::<u32>::new(1);
        state.reserve(64 * MIB, now);
        state.give_back(64 * MIB, 7, true);
        assert_eq!(
            settle(&mut state, now, &[7]),
            ["wipe 7 (not fresh)", "tear down 7", "make slot-1 of 64 MiB"]
        );
        assert_eq!(state.take_ready(64 * MIB, now), Some(101));
        assert_eq!(state.stats.discarded, 1);
        assert_eq!(state.stats.reused, 0);
    }

    #[test]
    fn sizes_are_kept_apart() {
        let now = Instant::now();
        let mut state = State::<u32>::new(1);
        state.reserve(64 * MIB, now);
        state.give_back(64 * MIB, 7, true);
        settle(&mut state, now, &[]);
        assert_eq!(state.take_ready(128 * MIB, now), None);
        state.reserve(128 * MIB, now);
        state.give_back(128 * MIB, 8, true);
        settle(&mut state, now, &[]);
        assert_eq!(state.take_ready(128 * MIB, now), Some(8));
        assert_eq!(state.take_ready(64 * MIB, now), Some(7));
    }

    #[test]
    fn beyond_the_limit_slots_coming_back_are_torn_down() {
        let now = Instant::now();
        let mut state = State::<u32>::new(1);
        // Two takes at once: both miss, the size now has two slots for a limit of one.
        state.reserve(64 * MIB, now);
        state.reserve(64 * MIB, now);
        state.give_back(64 * MIB, 7, true);
        state.give_back(64 * MIB, 8, true);
        assert_eq!(settle(&mut state, now, &[]), ["tear down 7", "wipe 8"]);
        assert_eq!(state.ready_count(), 1);
    }

    #[test]
    fn a_limit_of_zero_keeps_nothing() {
        let now = Instant::now();
        let mut state = State::<u32>::new(0);
        state.reserve(64 * MIB, now);
        state.give_back(64 * MIB, 7, true);
        assert_eq!(settle(&mut state, now, &[]), ["tear down 7"]);
        assert_eq!(state.ready_count(), 0);
    }

    #[test]
    fn an_idle_size_loses_its_ready_slots() {
        let start = Instant::now();
        let mut state = State::<u32>::new(1);
        state.reserve(64 * MIB, start);
        state.give_back(64 * MIB, 7, true);
        settle(&mut state, start, &[]);
        let later = start + options().idle_size_after;
        assert_eq!(
            state.next_deadline(start, &options()),
            Some(start + options().idle_size_after)
        );
        assert_eq!(settle(&mut state, later, &[]), ["tear down 7"]);
        assert!(state.sizes.is_empty());
        assert_eq!(state.next_deadline(later, &options()), None);
    }

    #[test]
    fn a_failure_to_make_ahead_pauses_making() {
        let now = Instant::now();
        let mut state = State::<u32>::new(2);
        state.reserve(64 * MIB, now);
        let Some(Work::Make { bytes, .. }) = state.next_work(now, &options()) else {
            panic!("a slot should be made ahead");
        };
        state.finish(Done::MakeFailed { bytes }, now);
        assert!(state.next_work(now, &options()).is_none());
        assert!(state.is_settled(now, &options()));
        let Some(Work::Make { .. }) = state.next_work(now + MAKE_BACKOFF, &options()) else {
            panic!("making resumes after the pause");
        };
    }

    #[test]
    fn closing_hands_back_the_ready_slots_and_makes_nothing() {
        let now = Instant::now();
        let mut state = State::<u32>::new(2);
        state.reserve(64 * MIB, now);
        settle(&mut state, now, &[]);
        assert_eq!(state.close(), [101]);
        assert_eq!(state.give_back(64 * MIB, 7, true), Some(7));
        assert!(state.next_work(now, &options()).is_none());
        assert!(state.is_settled(now, &options()));
    }

    #[test]
    fn a_wipe_finishing_after_close_is_torn_down() {
        let now = Instant::now();
        let mut state = State::<u32>::new(2);
        state.reserve(64 * MIB, now);
        state.give_back(64 * MIB, 7, true);
        let Some(Work::Wipe { bytes, slot }) = state.next_work(now, &options()) else {
            panic!("a wipe first");
        };
        assert!(state.close().is_empty());
        state.finish(Done::Wiped { bytes, slot }, now);
        assert_eq!(settle(&mut state, now, &[]), ["tear down 7"]);
        assert_eq!(state.ready_count(), 0);
    }
}
