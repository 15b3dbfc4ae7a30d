//! Where a sandbox run's time goes (`corral sandbox --trace-timings`, the in-process
//! benchmark): named marks on the monotonic clock, taken by the caller, the supervisor
//! and the job's pid 1, merged into one timeline of per-phase durations.
//!
//! A supervising process turns tracing on with [`enable`] before it clones pid 1: the
//! marks then go to a small `MAP_SHARED` page that pid 1 inherits, so both write to it
//! without a message, and the supervisor reads pid 1's marks back with [`take`]. Off (the
//! default), a mark is one atomic load. The caller's side of a [`crate::Sandbox::spawn`]
//! (the worker, many jobs at once) keeps its marks per run instead ([`Timings::mark`]);
//! a shim sends its own and pid 1's marks back in its report.

use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::sys::{self, SharedWords};

/// Who takes a mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The command or the worker: makes or takes the cgroup, starts the shim, reads the
    /// counters, removes the cgroup.
    Caller,
    /// The shim (or the `corral sandbox` process itself): clones pid 1, writes its id maps,
    /// supervises the job.
    Supervisor,
    /// The job's pid 1: builds and enters the root, starts and reaps the job.
    Init,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Caller => "caller",
            Role::Supervisor => "supervisor",
            Role::Init => "init",
        }
    }
}

macro_rules! marks {
    ($($mark:ident = $role:ident, $label:literal;)*) => {
        /// A point of a run; its phase is the time since the previous mark of its role.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u8)]
        pub enum Mark { $($mark,)* }

        const ALL: &[Mark] = &[$(Mark::$mark,)*];

        impl Mark {
            /// Who takes it.
            pub fn role(self) -> Role {
                match self { $(Mark::$mark => Role::$role,)* }
            }
            /// What ended at this mark.
            pub fn label(self) -> &'static str {
                match self { $(Mark::$mark => $label,)* }
            }
        }
    };
}

marks! {
    Start = Caller, "start";
    Parsed = Caller, "arguments parsed, config";
    UpperReady = Caller, "upper dir prepared";
    SpecBuilt = Caller, "spec built";
    CallerCgroupMade = Caller, "cgroup made";
    ShimForked = Caller, "shim forked";
    RequestSent = Caller, "request sent, reader started";
    ReportReceived = Caller, "job ran (report received)";
    ShimGone = Caller, "shim exited";
    CountersRead = Caller, "cgroup counters read";
    CgroupRemoved = Caller, "cgroup removed";
    Printed = Caller, "outcome printed";

    RequestRead = Supervisor, "request read";
    Prepared = Supervisor, "thread check, signalfd, output";
    GroupsCleared = Supervisor, "groups cleared, root mount point";
    LinkMade = Supervisor, "link, CPU check";
    Cloned = Supervisor, "clone (pid, net, ipc, uts namespaces)";
    Placed = Supervisor, "CPU placement, stdio";
    JobSent = Supervisor, "job sent to init";
    MountinfoRead = Supervisor, "mountinfo read";
    CgroupFound = Supervisor, "cgroup layout found";
    CgroupMade = Supervisor, "cgroup made";
    CgroupLimits = Supervisor, "cgroup limits written";
    CgroupSent = Supervisor, "cgroup handed to init";
    InitUnshared = Supervisor, "waited for init (root built, user ns made)";
    IdMaps = Supervisor, "id maps written";
    MappedSent = Supervisor, "maps announced";
    Watching = Supervisor, "watches, pidfd";
    StatusReceived = Supervisor, "job ran (status received)";
    InitDone = Supervisor, "init's end handled";

    InitStarted = Init, "init running";
    DeathSignal = Init, "death signal, umask";
    Staged = Init, "/dev, devpts, proc staged";
    Signals = Init, "signals reset";
    JobReceived = Init, "job received";
    MountNamespace = Init, "mount namespace made";
    RootPrivate = Init, "mounts made private";
    Scratch = Init, "scratch tmpfs, upper dirs";
    Overlay = Init, "overlay mounted";
    Dev = Init, "/dev tmpfs, nodes, links";
    Tmp = Init, "/dev/shm and /tmp tmpfs";
    DevReadOnly = Init, "/dev read-only";
    Binds = Init, "binds, cwd";
    CgroupWait = Init, "waited for the cgroup";
    CgroupJoined = Init, "cgroup joined";
    Proc = Init, "proc mounted";
    ProcMasked = Init, "proc masked";
    Devpts = Init, "devpts";
    Pivot = Init, "pivot_root, old root detached";
    Host = Init, "cwd, hostname, loopback";
    UserNs = Init, "user ns made, announced";
    Caps = Init, "cgroup ns, dumpable, caps, rlimits";
    Seccomp = Init, "seccomp installed, listener sent";
    ExecPrepared = Init, "exec prepared";
    MapsWait = Init, "waited for the id maps";
    Spawned = Init, "job cloned and exec'd";
    Reaped = Init, "job ran (reaped)";
    RestKilled = Init, "rest killed and reaped";
    DiskChecked = Init, "disk-full check";
    LeftCgroup = Init, "cgroup left";
    StatusSent = Init, "status sent";
}

/// The shared page of this process's run, once [`prepare`]d: a word per mark, then the
/// word that turns marks on.
static PAGE: OnceLock<SharedWords> = OnceLock::new();

/// The page's last word: nonzero once [`enable`]d.
const ON: usize = ALL.len();

/// Maps the shared page without turning marks on, so that a process cloned now (a pid 1
/// cloned before its job is known) takes marks once [`enable`] is called later. False if
/// no page could be mapped.
pub fn prepare() -> bool {
    if PAGE.get().is_some() {
        return true;
    }
    match SharedWords::new(ALL.len() + 1) {
        Ok(words) => PAGE.set(words).is_ok() || PAGE.get().is_some(),
        Err(_) => false,
    }
}

/// Turns marks on for this process, every process it forks or clones from now on, and
/// any cloned since [`prepare`]. Call in the single-threaded supervisor. False if no page
/// could be mapped (tracing then stays off; the run does not care).
pub fn enable() -> bool {
    prepare();
    match PAGE.get() {
        Some(page) => {
            page.word(ON).store(1, Ordering::Relaxed);
            true
        }
        None => false,
    }
}

/// The page, when marks are on.
fn on() -> Option<&'static SharedWords> {
    PAGE.get()
        .filter(|page| page.word(ON).load(Ordering::Relaxed) != 0)
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    on().is_some()
}

/// Records `mark` now (nothing unless [`enable`]d). Safe in a vfork-free child: a store.
pub fn mark(mark: Mark) {
    if let Some(page) = on() {
        page.word(mark as usize)
            .store(sys::monotonic_ns(), Ordering::Relaxed);
    }
}

/// Records `mark` as taken at `at` (nothing unless [`enable`]d): for a time read before
/// tracing could be turned on, such as a command's start.
pub fn mark_at(mark: Mark, at: u64) {
    if let Some(page) = on() {
        page.word(mark as usize).store(at, Ordering::Relaxed);
    }
}

/// The marks taken so far in this process and its children (empty unless enabled).
pub fn take() -> Timings {
    let mut timings = Timings::default();
    if let Some(page) = on() {
        for &m in ALL {
            let at = page.word(m as usize).load(Ordering::Relaxed);
            if at != 0 {
                timings.marks.push((m as u8, at));
            }
        }
    }
    timings
}

/// The clock marks are taken on, in nanoseconds.
pub fn now() -> u64 {
    sys::monotonic_ns()
}

/// Marks of one run, on the monotonic clock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// (mark, nanoseconds); unknown marks (another build's) are skipped when read.
    marks: Vec<(u8, u64)>,
}

/// One phase of a run: what ended at a mark, and how long it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    pub role: Role,
    pub label: &'static str,
    /// From the run's first mark to the end of this phase.
    pub end_ns: u64,
    /// Since the previous mark of the same role (for a role's first mark: since the
    /// latest earlier mark of any role, e.g. pid 1's start since the clone).
    pub duration_ns: u64,
}

impl Timings {
    /// Records `mark` at `at` (see [`now`]).
    pub fn mark_at(&mut self, mark: Mark, at: u64) {
        self.marks.push((mark as u8, at));
    }

    /// Records `mark` now.
    pub fn mark(&mut self, mark: Mark) {
        self.mark_at(mark, now());
    }

    /// Adds another process's marks.
    pub fn extend(&mut self, other: Timings) {
        self.marks.extend(other.marks);
    }

    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }

    /// The phases in time order.
    pub fn phases(&self) -> Vec<Phase> {
        let mut marks: Vec<(Mark, u64)> = self
            .marks
            .iter()
            .filter_map(|&(m, at)| ALL.get(m as usize).map(|&mark| (mark, at)))
            .collect();
        marks.sort_by_key(|&(m, at)| (at, m as u8));
        let Some(&(_, first)) = marks.first() else {
            return Vec::new();
        };
        let mut phases = Vec::with_capacity(marks.len());
        for (i, &(mark, at)) in marks.iter().enumerate() {
            let before = &marks[..i];
            let since = before
                .iter()
                .rev()
                .find(|(m, _)| m.role() == mark.role())
                .or_else(|| before.last())
                .map_or(at, |&(_, t)| t);
            phases.push(Phase {
                role: mark.role(),
                label: mark.label(),
                end_ns: at - first,
                duration_ns: at.saturating_sub(since),
            });
        }
        phases
    }

    /// From the first mark to the last, in nanoseconds.
    pub fn span_ns(&self) -> u64 {
        let at = self.marks.iter().map(|&(_, at)| at);
        at.clone().max().unwrap_or(0) - at.min().unwrap_or(0)
    }

    /// One line per phase: its end (ms since the first mark), its role, its duration.
    pub fn render(&self) -> String {
        let mut out = String::from("     at ms  role        phase ms  phase\n");
        for p in self.phases() {
            out.push_str(&format!(
                "{:10.3}  {:<10} {:9.3}  {}\n",
                p.end_ns as f64 / 1e6,
                p.role.name(),
                p.duration_ns as f64 / 1e6,
                p.label
            ));
        }
        out.push_str(&format!(
            "{:10.3}  total (first mark to last)\n",
            self.span_ns() as f64 / 1e6
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_run_from_the_previous_mark_of_their_role() {
        let mut t = Timings::default();
        t.mark_at(Mark::Start, 1_000);
        t.mark_at(Mark::Cloned, 3_000);
        t.mark_at(Mark::InitStarted, 3_500);
        t.mark_at(Mark::CgroupMade, 4_000);
        t.mark_at(Mark::Overlay, 6_000);
        t.mark_at(Mark::Printed, 9_000);
        let p = t.phases();
        let d = |label: &str| {
            p.iter()
                .find(|p| p.label == label)
                .map(|p| (p.end_ns, p.duration_ns))
                .unwrap()
        };
        assert_eq!(d("start"), (0, 0));
        // The supervisor's first mark: since the caller's.
        assert_eq!(d(Mark::Cloned.label()), (2_000, 2_000));
        // Pid 1's first: since the clone, the latest mark before it.
        assert_eq!(d(Mark::InitStarted.label()), (2_500, 500));
        assert_eq!(d(Mark::CgroupMade.label()), (3_000, 1_000));
        assert_eq!(d(Mark::Overlay.label()), (5_000, 2_500));
        assert_eq!(d(Mark::Printed.label()), (8_000, 8_000));
        assert_eq!(t.span_ns(), 8_000);
        assert!(t.render().contains("overlay mounted"));
    }

    #[test]
    fn marks_reach_the_parent_from_a_forked_child() {
        // Another test's process may have enabled it already: either way it is on now.
        assert!(enable());
        mark(Mark::Start);
        match sys::fork().unwrap() {
            sys::Forked::Child => {
                mark(Mark::InitStarted);
                sys::exit_now(0);
            }
            sys::Forked::Parent(pid) => {
                sys::wait4(pid, 0).unwrap();
            }
        }
        let taken = take();
        let labels: Vec<_> = taken.phases().iter().map(|p| p.label).collect();
        assert!(labels.contains(&"init running"), "{labels:?}");
        assert!(labels.contains(&"start"), "{labels:?}");
    }
}
