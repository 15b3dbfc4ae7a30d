//! Watching a running job's cgroup event counters through the kernel's own notifications
//! (inotify on v2 event files, an eventfd on v1 `memory.oom_control`), and the rate limit
//! that keeps a hostile job's events to a trickle. The supervisor polls the fds here with
//! its own; nothing is read until the kernel says something changed, except counters the
//! kernel does not notify on, read at most every [`UNNOTIFIED_EVERY`]. What the kernel
//! has no notification for at all is sampled ([`Gauges`]): the job's CPU use against its
//! quota, and the free space of the filesystems it writes to.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use crate::cgroup::{CgroupVersion, EnforcedLimit, EventCounter, Notice, keyed};
use crate::event::{LiveEvent, LiveEventKind};
use crate::sys;

/// How often a counter without kernel notification (v1 `pids.events`: measured, none on
/// Linux 6.18) is read while the job runs: one small file, well within the aim of an event
/// 100 ms after its cause.
pub(crate) const UNNOTIFIED_EVERY: Duration = Duration::from_millis(100);

/// After the v1 OOM eventfd fires (when the cgroup runs out of memory, before the kill is
/// counted), how often and for how long the counter is reread until the kill shows.
const RECHECK_EVERY: Duration = Duration::from_millis(10);
const RECHECK_FOR: Duration = Duration::from_secs(1);

/// After the first event of a key, at most one more per this interval.
pub(crate) const SUMMARY_EVERY: Duration = Duration::from_secs(1);

struct Watched {
    counter: EventCounter,
    seen: u64,
    /// The v1 eventfd, when registered.
    eventfd: Option<OwnedFd>,
    /// No notification works for this counter: it is read now and then.
    unnotified: bool,
}

/// A job cgroup's event counters under watch.
pub(crate) struct Watch {
    counters: Vec<Watched>,
    inotify: Option<OwnedFd>,
    last_read: Instant,
    recheck_until: Option<Instant>,
}

/// A limit the kernel enforced, with its total so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Enforced {
    pub limit: EnforcedLimit,
    pub total: u64,
    /// For an OOM kill: the last process killed in the job's cgroup, as the kernel log
    /// names it (host pid, command), when the log can be read.
    pub victim: Option<(u32, String)>,
}

impl Watch {
    /// Registers for the notifications `cg` offers; a counter whose registration fails is
    /// read now and then instead (a watch never stops a job). A few syscalls.
    pub fn start(cg: &dyn CgroupVersion) -> Watch {
        let mut inotify: Option<OwnedFd> = None;
        let counters = cg
            .event_counters()
            .into_iter()
            .map(|counter| {
                let mut watched = Watched {
                    seen: 0,
                    eventfd: None,
                    unnotified: false,
                    counter,
                };
                let registered = match &watched.counter.notice {
                    Notice::Inotify => {
                        let fd = match inotify.take() {
                            Some(fd) => Ok(fd),
                            None => sys::inotify(),
                        };
                        fd.and_then(|fd| {
                            let added =
                                sys::inotify_watch_modify(fd.as_raw_fd(), &watched.counter.file);
                            inotify = Some(fd);
                            added
                        })
                        .is_ok()
                    }
                    Notice::EventControl(control) => {
                        match register_event_control(control, &watched.counter) {
                            Ok(fd) => {
                                watched.eventfd = Some(fd);
                                true
                            }
                            Err(_) => false,
                        }
                    }
                    Notice::None => false,
                };
                watched.unnotified = !registered;
                watched
            })
            .collect();
        Watch {
            counters,
            inotify,
            last_read: Instant::now(),
            recheck_until: None,
        }
    }

    /// The fds to poll for readability.
    pub fn fds(&self) -> Vec<RawFd> {
        self.inotify
            .iter()
            .chain(self.counters.iter().filter_map(|w| w.eventfd.as_ref()))
            .map(|fd| fd.as_raw_fd())
            .collect()
    }

    /// When [`Watch::wake`] must run next even if no fd is ready.
    pub fn deadline(&self) -> Option<Instant> {
        let unnotified = self
            .counters
            .iter()
            .any(|w| w.unnotified)
            .then(|| self.last_read + UNNOTIFIED_EVERY);
        let recheck = self.recheck_until.map(|_| Instant::now() + RECHECK_EVERY);
        match (unnotified, recheck) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Called on every wake-up of the supervisor, `ready` when one of [`Watch::fds`] was.
    /// Returns the counters that grew.
    pub fn wake(&mut self, ready: bool, now: Instant) -> Vec<Enforced> {
        let mut eventfd_fired = false;
        if ready {
            if let Some(fd) = &self.inotify {
                sys::drain(fd.as_raw_fd());
            }
            for fd in self.counters.iter().filter_map(|w| w.eventfd.as_ref()) {
                eventfd_fired |= sys::drain(fd.as_raw_fd());
            }
        }
        if eventfd_fired {
            self.recheck_until = Some(now + RECHECK_FOR);
        }
        let rechecking = self.recheck_until.is_some_and(|until| now < until);
        if !rechecking {
            self.recheck_until = None;
        }
        let poll_due = now >= self.last_read + UNNOTIFIED_EVERY;
        if poll_due {
            self.last_read = now;
        }
        let mut grew = Vec::new();
        for w in &mut self.counters {
            let read = ready || rechecking || (w.unnotified && poll_due);
            if !read {
                continue;
            }
            let Ok(total) = keyed(&w.counter.file, w.counter.key) else {
                continue;
            };
            if total > w.seen {
                w.seen = total;
                if w.eventfd.is_some() {
                    self.recheck_until = None;
                }
                let victim = match w.counter.limit {
                    EnforcedLimit::Oom => w
                        .counter
                        .file
                        .parent()
                        .and_then(|dir| dir.file_name())
                        .and_then(|name| name.to_str())
                        .and_then(|name| oom_victim(name, Path::new("/dev/kmsg"))),
                    EnforcedLimit::Pids => None,
                };
                grew.push(Enforced {
                    limit: w.counter.limit,
                    total,
                    victim,
                });
            }
        }
        grew
    }
}

/// The last OOM victim in the cgroup named `cgroup` (its last path component, unique per
/// job) from the kernel log at `kmsg`: the kernel logs `oom-kill:…,task_memcg=<path>,
/// task=<comm>,pid=<pid>,…` before it counts the kill, so it is there when the counter
/// has grown. Read only after an OOM kill, never on the way of a job that has none.
fn oom_victim(cgroup: &str, kmsg: &Path) -> Option<(u32, String)> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut log = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(kmsg)
        .ok()?;
    let mut victim = None;
    let mut record = vec![0u8; 8192];
    // /dev/kmsg gives one record per read, oldest first; a bound keeps a huge log cheap.
    for _ in 0..100_000 {
        let n = match log.read(&mut record) {
            Ok(0) => break,
            Ok(n) => n,
            // A record overwritten while we read: skip to the next.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        };
        let text = String::from_utf8_lossy(&record[..n]);
        let Some((_, message)) = text.split_once(';') else {
            continue;
        };
        if let Some(found) = parse_oom_kill(message.lines().next().unwrap_or(""), cgroup) {
            victim = Some(found);
        }
    }
    victim
}

fn parse_oom_kill(message: &str, cgroup: &str) -> Option<(u32, String)> {
    let fields = message.strip_prefix("oom-kill:")?;
    let field = |key: &str| {
        fields
            .split(',')
            .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
    };
    let memcg = field("task_memcg")?;
    if memcg.rsplit('/').next() != Some(cgroup) {
        return None;
    }
    Some((field("pid")?.parse().ok()?, field("task")?.to_owned()))
}

/// Registers a v1 eventfd for `counter`'s file: `<eventfd> <fd of the file>` written to
/// `cgroup.event_control`. The kernel keeps its own reference; the file may be closed.
fn register_event_control(
    control: &std::path::Path,
    counter: &EventCounter,
) -> std::io::Result<OwnedFd> {
    let efd = sys::eventfd()?;
    let file = std::fs::File::open(&counter.file)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(control)?
        .write_all(format!("{} {}", efd.as_raw_fd(), file.as_raw_fd()).as_bytes())?;
    Ok(efd)
}

/// How often the job's filesystems' free space is read: two `fstatvfs` calls.
pub(crate) const DISK_EVERY: Duration = Duration::from_millis(100);

/// How often the job's CPU time is read: one cgroup file. Longer than a bandwidth period,
/// so that one sample interval can tell a job at its quota from one that is not.
pub(crate) const CPU_EVERY: Duration = Duration::from_millis(250);

/// A job counts as saturated when it used this share of its quota since the saturation
/// began, and no sample interval fell short of it by more than one bandwidth period's
/// quota (the kernel hands out quota per [`CPU_PERIOD`], so a sample that does not line up
/// with the periods sees one more or one fewer).
const SATURATED_SHARE: f64 = 0.9;
const CPU_PERIOD: Duration = Duration::from_millis(100);

/// Whether a job has used all of its CPU quota for a window on end: fed the cgroup's
/// total CPU time at each sample, says once when the window is reached. The clock is a
/// parameter, so this is a pure state machine.
#[derive(Debug)]
pub(crate) struct Saturation {
    cpus: f64,
    window: Duration,
    last: Option<(Instant, Duration)>,
    /// The end of the first saturated interval of the current run of them, and the CPU
    /// time used by then.
    since: Option<(Instant, Duration)>,
    raised: bool,
}

impl Saturation {
    pub fn new(cpus: f64, window: Duration) -> Self {
        Saturation {
            cpus,
            window,
            last: None,
            since: None,
            raised: false,
        }
    }

    /// The job had used `used` CPU time in all at `now`; the saturated time so far when
    /// it reaches the window for the first time.
    pub fn sample(&mut self, now: Instant, used: Duration) -> Option<Duration> {
        let (then, before) = self.last.replace((now, used))?;
        let wall = now.saturating_duration_since(then);
        if wall.is_zero() {
            return None;
        }
        let busy = used.saturating_sub(before).as_secs_f64();
        let slack = CPU_PERIOD.as_secs_f64();
        if busy < self.cpus * (SATURATED_SHARE * wall.as_secs_f64() - slack) {
            self.since = None;
            return None;
        }
        // Counted from the end of the first saturated interval: never early.
        let (since, used_then) = *self.since.get_or_insert((now, used));
        let saturated = now.saturating_duration_since(since);
        if self.raised || saturated < self.window {
            return None;
        }
        let busy = used.saturating_sub(used_then).as_secs_f64();
        if busy < SATURATED_SHARE * self.cpus * saturated.as_secs_f64() {
            return None;
        }
        self.raised = true;
        Some(saturated)
    }
}

/// The filesystems a job writes to, by the name the job sees them under, open from the
/// job's own root (`/proc/<pid 1>/root`): the overlay (whose free space is its upper's)
/// and `/tmp`. Full means what [`crate::shim::is_full`] says at the end of the job.
pub(crate) struct Disks {
    mounts: Vec<(String, std::fs::File, bool)>,
}

impl Disks {
    /// Opens the job's `/` and `/tmp` through pid 1's root, which it entered before asking
    /// for its id maps; a filesystem that cannot be opened is not watched.
    pub fn open(pid1: libc::pid_t) -> Disks {
        let root = std::path::PathBuf::from(format!("/proc/{pid1}/root"));
        let mounts = [("/", root.clone()), ("/tmp", root.join("tmp"))]
            .into_iter()
            .filter_map(|(name, path)| {
                let dir = std::fs::File::open(path).ok()?;
                Some((name.to_owned(), dir, false))
            })
            .collect();
        Disks { mounts }
    }

    /// Filesystems that are full now and were not before (each once per job).
    pub fn sample(&mut self) -> Vec<LiveEventKind> {
        let mut full = Vec::new();
        for (name, dir, raised) in &mut self.mounts {
            if *raised {
                continue;
            }
            let Ok(space) = sys::fstatvfs(dir) else {
                continue;
            };
            if crate::shim::full(
                space.bytes_total,
                space.bytes_available,
                space.files_total,
                space.files_available,
            ) {
                *raised = true;
                full.push(LiveEventKind::DiskLimit {
                    mount: name.clone(),
                    bytes_total: space.bytes_total,
                    bytes_available: space.bytes_available,
                });
            }
        }
        full
    }
}

/// What is sampled while a job runs, every [`DISK_EVERY`] and [`CPU_EVERY`].
pub(crate) struct Gauges {
    saturation: Option<Saturation>,
    disks: Disks,
    next_disk: Instant,
    next_cpu: Instant,
}

impl Gauges {
    pub fn start(limits: &crate::SandboxLimits, pid1: libc::pid_t, now: Instant) -> Gauges {
        Gauges {
            saturation: limits
                .cpu_quota
                .map(|cpus| Saturation::new(cpus, limits.cpu_saturated_after)),
            disks: Disks::open(pid1),
            next_disk: now,
            next_cpu: now,
        }
    }

    pub fn deadline(&self) -> Instant {
        if self.saturation.is_some() {
            self.next_disk.min(self.next_cpu)
        } else {
            self.next_disk
        }
    }

    /// The events the samples due at `now` give.
    pub fn wake(&mut self, cg: &dyn CgroupVersion, now: Instant) -> Vec<LiveEvent> {
        let mut kinds = Vec::new();
        if now >= self.next_disk {
            self.next_disk = now + DISK_EVERY;
            kinds = self.disks.sample();
        }
        if now >= self.next_cpu
            && let Some(saturation) = &mut self.saturation
        {
            self.next_cpu = now + CPU_EVERY;
            if let Ok(used) = cg.cpu_usage()
                && let Some(saturated) = saturation.sample(now, used)
            {
                kinds.push(LiveEventKind::CpuSaturated {
                    cpus: saturation.cpus,
                    seconds: saturated.as_secs(),
                });
            }
        }
        kinds
            .into_iter()
            .map(|kind| LiveEvent {
                at: SystemTime::now(),
                kind,
            })
            .collect()
    }
}

/// Sends the first event of each key at once and at most one more per [`SUMMARY_EVERY`]
/// after, holding back the latest (whose counts are totals, so nothing is lost by
/// skipping the ones in between).
#[derive(Default)]
pub(crate) struct Throttle {
    keys: HashMap<String, Key>,
}

struct Key {
    last_sent: Instant,
    held: Option<LiveEvent>,
}

impl Throttle {
    /// `event`, when it may go now.
    pub fn offer(&mut self, event: LiveEvent, now: Instant) -> Option<LiveEvent> {
        match self.keys.get_mut(&event.kind.key()) {
            None => {
                self.keys.insert(
                    event.kind.key(),
                    Key {
                        last_sent: now,
                        held: None,
                    },
                );
                Some(event)
            }
            Some(key) if now >= key.last_sent + SUMMARY_EVERY => {
                key.last_sent = now;
                key.held = None;
                Some(event)
            }
            Some(key) => {
                key.held = Some(event);
                None
            }
        }
    }

    /// Held events whose interval has passed (all of them with `now = None`: the end).
    pub fn due(&mut self, now: Option<Instant>) -> Vec<LiveEvent> {
        let mut out = Vec::new();
        for key in self.keys.values_mut() {
            if now.is_none_or(|now| now >= key.last_sent + SUMMARY_EVERY)
                && let Some(event) = key.held.take()
            {
                if let Some(now) = now {
                    key.last_sent = now;
                }
                out.push(event);
            }
        }
        out.sort_by_key(|e| e.at);
        out
    }

    /// When the next held event falls due.
    pub fn deadline(&self) -> Option<Instant> {
        self.keys
            .values()
            .filter(|k| k.held.is_some())
            .map(|k| k.last_sent + SUMMARY_EVERY)
            .min()
    }
}

/// A live event for a counter that grew.
pub(crate) fn enforced_event(e: Enforced, pids_limit: Option<u64>) -> LiveEvent {
    LiveEvent {
        at: SystemTime::now(),
        kind: match e.limit {
            EnforcedLimit::Oom => {
                let (host_pid, comm) = e.victim.map_or((None, None), |(p, c)| (Some(p), Some(c)));
                LiveEventKind::Oom {
                    oom_kills: e.total,
                    host_pid,
                    comm,
                }
            }
            EnforcedLimit::Pids => LiveEventKind::PidsLimit {
                refused: e.total,
                limit: pids_limit,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{V1, V2};

    fn ready(watch: &Watch) -> bool {
        let fds: Vec<_> = watch
            .fds()
            .into_iter()
            .map(|fd| (fd, libc::POLLIN))
            .collect();
        sys::poll(&fds, 0).unwrap().iter().any(|&r| r != 0)
    }

    /// A v2 job dir with the two event files; inotify works on plain files too.
    fn v2(dir: &Path) -> V2 {
        std::fs::write(dir.join("memory.events"), "oom 0\noom_kill 0\n").unwrap();
        std::fs::write(dir.join("pids.events"), "max 0\n").unwrap();
        V2 {
            dir: dir.to_owned(),
        }
    }

    #[test]
    fn v2_counters_are_read_only_when_the_kernel_says_they_changed() {
        let t = tempfile::tempdir().unwrap();
        let cg = v2(t.path());
        let mut watch = Watch::start(&cg);
        assert_eq!(watch.fds().len(), 1, "one inotify for both files");
        assert_eq!(watch.deadline(), None, "nothing to poll on v2");
        assert!(!ready(&watch));

        std::fs::write(t.path().join("memory.events"), "oom 1\noom_kill 1\n").unwrap();
        assert!(ready(&watch));
        let grew = watch.wake(true, Instant::now());
        assert_eq!(grew.len(), 1);
        assert_eq!((grew[0].limit, grew[0].total), (EnforcedLimit::Oom, 1));
        assert!(!ready(&watch), "the notification was drained");
        // The same totals again are not news.
        assert!(watch.wake(true, Instant::now()).is_empty());

        std::fs::write(t.path().join("pids.events"), "max 7\n").unwrap();
        assert!(ready(&watch));
        assert_eq!(
            watch.wake(true, Instant::now()),
            [Enforced {
                limit: EnforcedLimit::Pids,
                total: 7,
                victim: None
            }]
        );
    }

    #[test]
    fn an_unnotified_counter_is_read_at_most_every_interval() {
        let t = tempfile::tempdir().unwrap();
        let dir = |c: &str| {
            let d = t.path().join(c);
            std::fs::create_dir(&d).unwrap();
            d
        };
        let cg = V1 {
            memory: dir("memory"),
            pids: dir("pids"),
            cpu: dir("cpu"),
            cpuacct: dir("cpuacct"),
            blkio: None,
        };
        std::fs::write(cg.memory.join("memory.oom_control"), "oom_kill 0\n").unwrap();
        std::fs::write(cg.pids.join("pids.events"), "max 0\n").unwrap();
        // No cgroup.event_control in a fake tree: the OOM counter falls back to polling.
        let mut watch = Watch::start(&cg);
        assert!(watch.fds().is_empty());
        let start = Instant::now();
        let deadline = watch.deadline().expect("polled counters set a deadline");
        assert!(deadline <= start + UNNOTIFIED_EVERY);

        std::fs::write(cg.pids.join("pids.events"), "max 3\n").unwrap();
        assert!(
            watch.wake(false, start).is_empty(),
            "not read before its interval"
        );
        let later = start + UNNOTIFIED_EVERY + Duration::from_millis(1);
        assert_eq!(
            watch.wake(false, later),
            [Enforced {
                limit: EnforcedLimit::Pids,
                total: 3,
                victim: None
            }]
        );
        assert!(watch.deadline().unwrap() > later);
    }

    #[test]
    fn saturation_is_said_once_after_a_window_of_full_use() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Saturation::new(0.5, Duration::from_secs(3));
        assert_eq!(s.sample(t0, ms(0)), None, "the first sample is a baseline");
        // Idle, then half a CPU used per second (the quota) from t0 + 1 s on.
        assert_eq!(s.sample(t0 + ms(1000), ms(10)), None);
        let mut used = ms(10);
        let mut said = Vec::new();
        for i in 1..=40u32 {
            used += ms(125);
            if let Some(d) = s.sample(t0 + ms(1000) + ms(250) * i, used) {
                said.push((i, d));
            }
        }
        // Saturated from the first interval's end (1.25 s), said 3 s later, once.
        assert_eq!(said, [(13, Duration::from_secs(3))]);

        // The quota handed out per 100 ms period, sampled every 250 ms: 40 and 60 ms.
        let mut periods = Saturation::new(0.2, Duration::from_secs(2));
        let mut used = Duration::ZERO;
        let mut said = None;
        for i in 0..20u32 {
            used += if i % 2 == 0 { ms(40) } else { ms(60) };
            if let Some(d) = periods.sample(t0 + ms(250) * i, used) {
                said.get_or_insert((i, d));
            }
        }
        assert_eq!(said, Some((9, Duration::from_secs(2))));
        // A build busy in bursts never is: at times idle for most of an interval, or at
        // 80 % of its quota over the whole run.
        let mut bursty = Saturation::new(1.0, Duration::from_secs(1));
        let mut used = Duration::ZERO;
        for i in 0..100u32 {
            used += if i % 4 == 0 { ms(100) } else { ms(240) };
            assert_eq!(bursty.sample(t0 + ms(250) * i, used), None);
        }
        let mut steady = Saturation::new(1.0, Duration::from_secs(1));
        let mut used = Duration::ZERO;
        for i in 0..100u32 {
            used += ms(200);
            assert_eq!(steady.sample(t0 + ms(250) * i, used), None);
        }
        // A pause restarts the count.
        let mut paused = Saturation::new(1.0, Duration::from_secs(2));
        let mut used = Duration::ZERO;
        let mut said = None;
        for i in 0..20u32 {
            used += if i == 6 { ms(0) } else { ms(250) };
            if let Some(d) = paused.sample(t0 + ms(250) * i, used) {
                said.get_or_insert(i);
                assert_eq!(d, Duration::from_secs(2));
            }
        }
        assert_eq!(
            said,
            Some(15),
            "2 s after the interval ending at 7 × 250 ms"
        );
    }

    #[test]
    fn the_oom_victim_is_the_last_of_this_job_in_the_kernel_log() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("kmsg");
        // A plain file reads as one record; the parser sees each line the same way.
        let line = |memcg: &str, task: &str, pid: u32| {
            format!(
                "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,\
                 oom_memcg={memcg},task_memcg={memcg},task={task},pid={pid},uid=1000000"
            )
        };
        assert_eq!(
            parse_oom_kill(&line("/corral/job-7-1", "python3", 4242), "job-7-1"),
            Some((4242, "python3".to_owned()))
        );
        assert_eq!(
            parse_oom_kill(&line("/corral/job-7-11", "cc1", 1), "job-7-1"),
            None,
            "another job's kill"
        );
        assert_eq!(
            parse_oom_kill("Memory cgroup out of memory: Killed process 1", "job-7-1"),
            None
        );
        std::fs::write(&log, format!("6,1,2,-;{}\n", line("/c/job-7-1", "sh", 9))).unwrap();
        assert_eq!(oom_victim("job-7-1", &log), Some((9, "sh".to_owned())));
        assert_eq!(oom_victim("job-7-1", &t.path().join("absent")), None);
    }

    fn denied(count: u64) -> LiveEvent {
        LiveEvent {
            at: SystemTime::now(),
            kind: LiveEventKind::SeccompDenied {
                syscall: "keyctl".into(),
                count,
            },
        }
    }

    #[test]
    fn the_first_event_goes_at_once_then_the_latest_once_a_second() {
        let mut throttle = Throttle::default();
        let kind = |e: Option<LiveEvent>| e.map(|e| e.kind);
        let t0 = Instant::now();
        assert_eq!(kind(throttle.offer(denied(1), t0)), Some(denied(1).kind));
        assert_eq!(throttle.deadline(), None, "nothing held");
        // A loop of refusals: held back, the latest total kept.
        for n in 2..=1000 {
            assert!(throttle.offer(denied(n), t0).is_none());
        }
        assert_eq!(throttle.deadline(), Some(t0 + SUMMARY_EVERY));
        assert!(throttle.due(Some(t0 + SUMMARY_EVERY / 2)).is_empty());
        let due = throttle.due(Some(t0 + SUMMARY_EVERY));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].kind, denied(1000).kind);
        // Another key is not held back by this one.
        let net = LiveEvent {
            at: SystemTime::now(),
            kind: LiveEventKind::NetworkAttempt {
                syscall: "socket".into(),
                family: "inet".into(),
                count: 1,
            },
        };
        assert!(throttle.offer(net, t0 + SUMMARY_EVERY).is_some());
        // At the end, whatever is held goes regardless of the interval.
        let t1 = t0 + SUMMARY_EVERY + Duration::from_millis(1);
        assert!(throttle.offer(denied(1001), t1).is_none());
        let last = throttle.due(None);
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].kind, denied(1001).kind);
        assert_eq!(throttle.deadline(), None);
    }
}
