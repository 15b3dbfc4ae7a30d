//! Job cgroups made ahead of demand and removed in the background, so that neither the
//! `mkdir` of one directory per hierarchy (four or five on cgroup v1, each allocating a
//! controller's state) nor the `rmdir`s are on a job's critical path.
//!
//! Every cgroup is used by exactly one job: [`CgroupPool::take`] hands out a cgroup that
//! no process has ever been in, so its counters (v1 `memory.max_usage_in_bytes`,
//! `memory.oom_control`'s `oom_kill`, `pids.events`, `cpuacct.usage`…, v2 `memory.peak`,
//! `memory.events`…) start at zero for the job as for a cgroup made on the spot; the
//! limits are written for each job. Each comes with its accounting files already open
//! ([`Counters`]), so reading them when the job ends skips the path walks and opens. A
//! cgroup given back (every process in it dead) is never handed out again: the background
//! thread removes it (killing what may be left, as [`JobCgroup::destroy`] does). Reusing
//! a cgroup instead would carry the last job's counters and its page cache charges (v1
//! cannot reset `oom_kill`, `pids.events` or `pids.peak`), so it is not done.
//!
//! Names are `job-<pid>-<n>` as for every job cgroup: if the worker is killed, the next
//! start's [`super::remove_stale`] removes the spares and the cgroups still queued.
//! Dropping the pool removes both before it returns.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{CgroupError, Counters, JobCgroup, Layout};

/// A few fresh job cgroups under one parent, and a queue of used ones to remove.
pub struct CgroupPool {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for CgroupPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("CgroupPool")
            .field("parent", &self.shared.parent)
            .field("ready", &state.ready.len())
            .field("to_remove", &state.used.len())
            .finish()
    }
}

struct Shared {
    layout: Layout,
    parent: String,
    spares: usize,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// Made, never used.
    ready: Vec<(JobCgroup, Option<Counters>)>,
    /// Used, to remove.
    used: Vec<JobCgroup>,
    /// Removals that failed (logged), kept for [`CgroupPool::stats`].
    failures: u64,
    closing: bool,
    /// The background thread is between taking work and finishing it.
    busy: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new cgroup, with its counters open unless that failed (they are then read by
    /// path at the end, where a failure is the job's error to report).
    fn make(&self) -> Result<(JobCgroup, Option<Counters>), CgroupError> {
        let cg = JobCgroup::create(&self.layout, &self.parent, &super::job_cgroup_name())?;
        let counters = cg.version().counters().ok();
        Ok((cg, counters))
    }
}

/// What a pool holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupPoolStats {
    pub ready: usize,
    pub to_remove: usize,
    pub failures: u64,
}

impl CgroupPool {
    /// A pool of `spares` fresh cgroups under `parent` (relative to each hierarchy's
    /// root) on `layout`, made by a background thread from now on.
    pub fn new(layout: Layout, parent: &str, spares: usize) -> std::io::Result<CgroupPool> {
        let shared = Arc::new(Shared {
            layout,
            parent: parent.to_owned(),
            spares,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("corral-cgroups".to_owned())
                .spawn(move || background(&shared))?
        };
        Ok(CgroupPool {
            shared,
            thread: Some(thread),
        })
    }

    /// The layout the pool's cgroups are made on.
    pub fn layout(&self) -> &Layout {
        &self.shared.layout
    }

    /// A fresh cgroup and its open counters: a ready one, or one made now when none is.
    pub fn take(&self) -> Result<(JobCgroup, Option<Counters>), CgroupError> {
        let ready = self.shared.lock().ready.pop();
        self.shared.wake.notify_all();
        match ready {
            Some(cg) => Ok(cg),
            None => self.shared.make(),
        }
    }

    /// A cgroup whose job is over (every process in it dead): removed in the background,
    /// never handed out again.
    pub fn give_back(&self, cg: JobCgroup) {
        self.shared.lock().used.push(cg);
        self.shared.wake.notify_all();
    }

    pub fn stats(&self) -> CgroupPoolStats {
        let state = self.shared.lock();
        CgroupPoolStats {
            ready: state.ready.len(),
            to_remove: state.used.len(),
            failures: state.failures,
        }
    }

    /// Waits until the background thread has nothing left to do: every used cgroup
    /// removed and the spares made (for tests and benchmarks).
    pub fn settle(&self) {
        let mut state = self.shared.lock();
        while !state.closing
            && (state.busy
                || !state.used.is_empty()
                || (state.ready.len() < self.shared.spares && state.failures == 0))
        {
            state = self
                .shared
                .wake
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for CgroupPool {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // The thread removed everything on its way out; anything given back since goes now.
        let mut state = self.shared.lock();
        let mut left: Vec<JobCgroup> = state.ready.drain(..).map(|(cg, _)| cg).collect();
        left.append(&mut state.used);
        drop(state);
        for cg in left {
            let _ = cg.destroy();
        }
    }
}

/// Removes used cgroups first, then makes spares; on close, removes everything.
fn background(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        if let Some(cg) = state.used.pop() {
            state.busy = true;
            drop(state);
            let removed = cg.destroy();
            state = shared.lock();
            if let Err(err) = removed {
                state.failures += 1;
                tracing::warn!(error = %crate::error_chain(&err), "could not remove a job cgroup");
            }
            state.busy = false;
            shared.wake.notify_all();
            continue;
        }
        if state.closing {
            let ready: Vec<JobCgroup> = state.ready.drain(..).map(|(cg, _)| cg).collect();
            drop(state);
            for cg in ready {
                let _ = cg.destroy();
            }
            return;
        }
        // A failure to make one (the parent gone, no permission) stops making ahead until
        // the next take: `take` then makes its own and reports the error.
        if state.ready.len() < shared.spares && state.failures == 0 {
            state.busy = true;
            drop(state);
            let made = shared.make();
            state = shared.lock();
            state.busy = false;
            match made {
                Ok(made) if !state.closing => state.ready.push(made),
                Ok((cg, _)) => state.used.push(cg),
                Err(err) => {
                    state.failures += 1;
                    tracing::warn!(error = %crate::error_chain(&err),
                        "could not make a job cgroup ahead of demand");
                }
            }
            shared.wake.notify_all();
            continue;
        }
        state = shared
            .wake
            .wait_timeout(state, Duration::from_secs(60))
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fake_v1() -> (tempfile::TempDir, Layout) {
        let (t, mounts) = super::super::v1::fake_mounts();
        (t, Layout::V1 { mounts })
    }

    fn jobs_in(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn cgroups_are_made_ahead_used_once_and_all_removed_on_drop() {
        let (t, layout) = fake_v1();
        let parent = t.path().join("memory/corral");
        let pool = CgroupPool::new(layout, "corral", 2).unwrap();
        pool.settle();
        assert_eq!(pool.stats().ready, 2);
        assert_eq!(
            jobs_in(&parent).len(),
            2,
            "the spares exist in each hierarchy"
        );
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..5 {
            let (cg, _) = pool.take().unwrap();
            let JobCgroup::V1(v1) = &cg else { panic!() };
            assert!(v1.memory.is_dir());
            assert!(seen.insert(v1.memory.clone()), "a cgroup handed out twice");
            pool.give_back(cg);
        }
        pool.settle();
        // Every used one removed, two fresh spares waiting, none of them used before.
        let left: Vec<PathBuf> = jobs_in(&parent).iter().map(|n| parent.join(n)).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.iter().all(|p| !seen.contains(p)), "{left:?}");
        // Taken and not given back: the holder's to remove; given back after the drop
        // started is removed by the drop.
        let (held, _) = pool.take().unwrap();
        drop(pool);
        assert_eq!(jobs_in(&parent).len(), 1, "only the held one is left");
        held.destroy().unwrap();
        assert!(jobs_in(&parent).is_empty());
        for ctl in ["pids", "cpu", "cpuacct"] {
            assert!(
                jobs_in(&t.path().join(ctl).join("corral")).is_empty(),
                "{ctl}"
            );
        }
    }

    #[test]
    fn take_makes_one_when_none_is_ready() {
        let (t, layout) = fake_v1();
        let pool = CgroupPool::new(layout, "corral", 0).unwrap();
        let (cg, _) = pool.take().unwrap();
        let JobCgroup::V1(v1) = &cg else { panic!() };
        assert!(v1.pids.starts_with(t.path().join("pids/corral")));
        pool.give_back(cg);
        pool.settle();
        assert!(jobs_in(&t.path().join("pids/corral")).is_empty());
    }
}
