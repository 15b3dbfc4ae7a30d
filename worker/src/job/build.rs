//! The build: the sandbox runs the job's command over its staged root while its output is
//! streamed, capped at the job's `log_bytes` (the one place the log limit is enforced), to
//! the log file and to whoever follows the job live.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use corral_protocol::{
    Artifact, BuildInputs, ByteSize, EventKind, Job, LogRef, NetworkPolicy, NetworkUsage, Severity,
    Stream,
};
use corral_sandbox::{
    Identity, LiveEventKind, Network, Outcome, PooledJobDir, Sandbox, SandboxLimits, SandboxSpec,
    Teardown,
};

use super::error::JobError;
use super::{LogSink, RunContext, Settings, blocking};
use crate::egress::proxy::Denial;
use crate::egress::{AllowList, Ledger, Proxy, ProxyLimits};
use crate::events::{Fact, JobEvents};

/// A build that ran to its end, and what became of its output.
#[derive(Debug, Clone)]
pub struct Built {
    pub outcome: Outcome,
    /// The build wrote more than its log limit (and was stopped for it).
    pub log_truncated: bool,
    /// Bytes of regular files the build left in its upper dir.
    pub upper_bytes: u64,
    /// The stored build log.
    pub log: Option<LogRef>,
    pub output: Output,
    /// What the output's digest depends on (the action key's inputs).
    pub inputs: Option<Box<BuildInputs>>,
    /// What went through the egress proxy (egress jobs).
    pub network: Option<NetworkUsage>,
    /// The build passed its `network_bytes` (and was stopped for it).
    pub network_cut: bool,
}

/// What the proxy saw of a build, once the build is over.
#[derive(Debug, Clone)]
pub struct NetworkEnd {
    pub usage: NetworkUsage,
    /// The build passed its `network_bytes`: its connections were cut and it was stopped.
    pub cut: bool,
}

/// The job's proxy: its allow-list, the worker's own addresses (read now), its byte limit,
/// and refusals raised on the job's events as `egress_denied`.
pub fn proxy(job: &Job, allow: AllowList, settings: &Settings, ctx: &RunContext) -> Arc<Proxy> {
    let events = ctx.events.clone();
    let limits = ProxyLimits {
        connections: settings.egress.connections,
        ..ProxyLimits::default()
    };
    Proxy::new(
        allow,
        crate::egress::allow::own_addresses(),
        limits,
        Arc::new(Ledger::new(job.limits.network_bytes.bytes())),
        Arc::new(move |denial: &Denial| {
            events.raise(denial_fact(denial));
        }),
    )
}

/// The `egress_denied` event of a refusal.
pub fn denial_fact(denial: &Denial) -> Fact {
    let mut fact = Fact::new(
        EventKind::EgressDenied,
        Severity::Warning,
        format!("egress refused ({}): {}", denial.reason, denial.detail),
    )
    .with("reason", denial.reason);
    if let Some(dest) = &denial.destination {
        fact = fact.with("host", &dest.host).with("port", dest.port);
    }
    fact
}

/// What became of a build's output.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Not snapshotted: the build failed, or this runner keeps no output.
    NotTaken,
    /// Snapshotted and stored as an image.
    Stored(Box<Artifact>),
    /// The tree cannot be stored (too large, an unacceptable entry): the job's fault.
    Refused(String),
}

/// Output faster than this within one second raises `log_flood`. A chatty `pip install`
/// writes tens of KiB a second; a build writing a MiB a second for long reaches any log
/// limit within minutes and is more likely spamming the log pipeline than building.
pub const LOG_FLOOD_BYTES_PER_SECOND: u64 = 1 << 20;

/// Output bytes per one-second window, against a threshold: says when a window passes it
/// (once per window). The clock is a parameter, so this is a pure state machine.
#[derive(Debug, Clone)]
pub struct FloodMeter {
    threshold: u64,
    window_start: Option<Instant>,
    bytes: u64,
    flagged: bool,
}

impl FloodMeter {
    const WINDOW: Duration = Duration::from_secs(1);

    pub fn new(threshold: u64) -> Self {
        FloodMeter {
            threshold,
            window_start: None,
            bytes: 0,
            flagged: false,
        }
    }

    /// Counts `n` bytes read at `now`; `Some(bytes in this window)` when this read passes
    /// the threshold.
    pub fn add(&mut self, n: u64, now: Instant) -> Option<u64> {
        match self.window_start {
            Some(start) if now.saturating_duration_since(start) < Self::WINDOW => {}
            _ => {
                self.window_start = Some(now);
                self.bytes = 0;
                self.flagged = false;
            }
        }
        self.bytes += n;
        if self.bytes > self.threshold && !self.flagged {
            self.flagged = true;
            return Some(self.bytes);
        }
        None
    }
}

/// A build's output on its way to the log file and the live log, capped at `limit` bytes:
/// past it, the notice goes to the live log, `on_limit` stops the build, and the rest of the
/// output is read and dropped so the build never blocks on a full pipe while it dies. Output
/// past [`LOG_FLOOD_BYTES_PER_SECOND`] raises `log_flood` on the job's events while it runs.
pub struct BuildLog {
    file: Option<Mutex<std::fs::File>>,
    sink: LogSink,
    limit: u64,
    written: AtomicU64,
    truncated: AtomicBool,
    flood: Mutex<FloodMeter>,
    events: JobEvents,
}

impl BuildLog {
    pub fn new(
        limit: u64,
        file: Option<std::fs::File>,
        sink: LogSink,
        events: JobEvents,
    ) -> Arc<Self> {
        Arc::new(BuildLog {
            file: file.map(Mutex::new),
            sink,
            limit,
            written: AtomicU64::new(0),
            truncated: AtomicBool::new(false),
            flood: Mutex::new(FloodMeter::new(LOG_FLOOD_BYTES_PER_SECOND)),
            events,
        })
    }

    /// Raises `log_flood` when `n` more bytes of `stream` pass the rate threshold.
    fn meter(&self, stream: Stream, n: usize) {
        let passed = self
            .flood
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .add(n as u64, Instant::now());
        if let Some(bytes) = passed {
            self.events.raise(
                Fact::new(
                    EventKind::LogFlood,
                    Severity::Warning,
                    format!(
                        "the build wrote {} of output within a second (threshold {}/s)",
                        ByteSize(bytes),
                        ByteSize(LOG_FLOOD_BYTES_PER_SECOND)
                    ),
                )
                .with("bytes_per_second", bytes)
                .with("threshold_bytes_per_second", LOG_FLOOD_BYTES_PER_SECOND)
                .with("stream", stream),
            );
        }
    }

    /// Whether the build passed its limit.
    pub fn truncated(&self) -> bool {
        self.truncated.load(Ordering::SeqCst)
    }

    /// Reads the build's `stdout` and `stderr` to their ends on one thread, whichever has
    /// output first ([`corral_sandbox::OutputPipes`]), so a job costs one reader thread (and
    /// its wakeups) rather than one per stream.
    pub fn read_pipes(
        self: &Arc<Self>,
        stdout: Option<std::io::PipeReader>,
        stderr: Option<std::io::PipeReader>,
        on_limit: impl Fn() + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let log = self.clone();
        std::thread::spawn(move || {
            corral_sandbox::OutputPipes::new(stdout, stderr).drain(&mut |pipe, bytes| {
                if log.append(stream_of(pipe), bytes) {
                    on_limit();
                }
            });
        })
    }

    /// Takes what fits of `chunk`; true when this chunk passed the limit.
    fn append(&self, stream: Stream, chunk: &[u8]) -> bool {
        self.meter(stream, chunk.len());
        let before = self.written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        let room = self.limit.saturating_sub(before);
        let take = usize::try_from(room.min(chunk.len() as u64)).unwrap_or(chunk.len());
        if take > 0 {
            if let Some(file) = &self.file {
                let mut file = file
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let _ = file.write_all(&chunk[..take]);
            }
            let _ = self
                .sink
                .blocking_send((stream, Bytes::copy_from_slice(&chunk[..take])));
        }
        if take == chunk.len() || self.truncated.swap(true, Ordering::SeqCst) {
            return false;
        }
        let notice = format!(
            "corral: the build's output reached its limit of {} bytes; stopping it\n",
            self.limit
        );
        let _ = self
            .sink
            .blocking_send((Stream::System, Bytes::from(notice)));
        true
    }
}

/// What the sandbox runs: the job's command, env and limits over `lower_dirs` (topmost
/// first) and the job dir's upper, as the project's identity.
pub fn spec(
    job: &Job,
    settings: &Settings,
    lower_dirs: Vec<PathBuf>,
    job_dir: &PooledJobDir,
    identity: Identity,
) -> SandboxSpec {
    let disk = job.limits.disk_bytes.bytes();
    SandboxSpec {
        lower_dirs,
        upper: job_dir.upper(),
        work: job_dir.work(),
        identity,
        argv: job.command.clone(),
        env: {
            let mut env = super::spec::build_env(job);
            let ca = settings.egress.ca.is_some();
            for (k, v) in super::spec::proxy_env(job, ca) {
                env.retain(|(key, _)| *key != k);
                env.push((k, v));
            }
            env
        },
        cwd: PathBuf::from(job.workdir.as_str()),
        limits: SandboxLimits {
            memory_bytes: Some(job.limits.memory_bytes.bytes()),
            pids: Some(job.limits.pids),
            cpu_quota: Some(settings.cpus_per_build),
            wall: Duration::from_secs(job.limits.wall_seconds),
            cpu_seconds: Some(job.limits.cpu_seconds),
            open_files: job.limits.open_files,
            tmp_bytes: (disk / 4).max(16 << 20),
            file_size_bytes: Some(disk),
            cpu_saturated_after: settings.cpu_saturated_after,
            disk_bytes_per_second: Some(job.limits.disk_bytes_per_second.bytes()),
            disk_device: None,
        },
        network: match job.network {
            NetworkPolicy::None => Network::None,
            NetworkPolicy::Loopback => Network::Loopback,
            NetworkPolicy::Egress(_) => Network::Egress {
                port: corral_sandbox::EGRESS_PORT,
            },
        },
        read_only_binds: match &settings.egress.ca {
            Some(ca) if !job.network.egress().is_empty() => {
                vec![(ca.clone(), PathBuf::from(crate::egress::BUILD_CA))]
            }
            _ => Vec::new(),
        },
        hostname: "corral".to_string(),
        scratch: None,
    }
}

/// Runs the sandbox on a blocking thread, its output through a [`BuildLog`] into `log_path`
/// and `ctx.logs`, stopping it when `ctx.stop` fires or the log limit is passed. Returns the
/// outcome, whether the log limit was passed, with a `proxy` (egress jobs) what went
/// through it (the proxy serves the socket the sandbox hands over, and passing the byte
/// limit stops the build), and the job's pid 1 still exiting: the job dir may be reused
/// once that [`Teardown`] is over.
pub async fn sandbox(
    spec: SandboxSpec,
    settings: &Settings,
    log_limit: u64,
    log_path: &Path,
    ctx: &RunContext,
    proxy: Option<Arc<Proxy>>,
) -> Result<(Outcome, bool, Option<NetworkEnd>, Teardown), JobError> {
    let config = settings.sandbox.clone();
    let running = blocking(move || Sandbox::spawn(&spec, &config))
        .await?
        .map_err(JobError::Sandbox)?;
    ctx.events.started();
    let cancel = running.cancel_handle();
    let grace = settings.kill_grace;
    // The shim hands the proxy's socket over the link that the wait below reads.
    let (egress_tx, handed) = tokio::sync::oneshot::channel::<std::os::fd::OwnedFd>();
    let serving = match &proxy {
        Some(proxy) => {
            let (proxy, cancel) = (proxy.clone(), cancel.clone());
            Some(tokio::spawn(async move {
                // The receiver yields the socket before the job starts, or closes when the
                // sandbox could not be built.
                let Ok(fd) = handed.await else {
                    return;
                };
                let listener = std::net::TcpListener::from(fd);
                let Ok(listener) = listener
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpListener::from_std(listener))
                else {
                    return;
                };
                // Serving ends only when the job passes its byte limit (or is aborted
                // when the job is over): then the build stops too.
                proxy.clone().serve(listener).await;
                if proxy.ledger().limit_passed() {
                    cancel.cancel(Duration::ZERO);
                }
            }))
        }
        None => None,
    };
    let log_file = std::fs::File::create(log_path).map_err(|source| JobError::Log {
        path: log_path.to_path_buf(),
        source,
    })?;
    let log = BuildLog::new(
        log_limit,
        Some(log_file),
        ctx.logs.clone(),
        ctx.events.clone(),
    );
    let watcher = {
        let (stop, cancel) = (ctx.stop.clone(), cancel.clone());
        tokio::spawn(async move {
            stop.stopped().await;
            cancel.cancel(grace);
        })
    };
    // Back as soon as every process of the job is dead and its cgroup removed: pid 1's
    // namespaces (the overlay among them) go away meanwhile. One blocking thread reads the
    // job's output into the log, the sandbox's live events (the kernel's OOM kills and
    // refused forks, seccomp's refusals) into the job's one event path, and the shim's
    // report, as they come.
    let mut live = BuildLive {
        log: log.clone(),
        cancel: cancel.clone(),
        grace,
        events: ctx.events.clone(),
        egress: Some(egress_tx),
    };
    let ended = blocking(move || running.wait_outcome_live(&mut live)).await;
    watcher.abort();
    if let Some(serving) = serving {
        serving.abort();
    }
    let network = proxy.map(|p| NetworkEnd {
        usage: p.ledger().usage(),
        cut: p.ledger().limit_passed(),
    });
    let (outcome, teardown) = ended?;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(err) => {
            // Waiting for the shim's end blocks: not on the runtime's threads.
            blocking(move || teardown.wait()).await?;
            return Err(JobError::Sandbox(err));
        }
    };
    Ok((outcome, log.truncated(), network, teardown))
}

/// The log stream of one of the sandbox's output pipes.
fn stream_of(pipe: corral_sandbox::OutputPipe) -> Stream {
    match pipe {
        corral_sandbox::OutputPipe::Stdout => Stream::Stdout,
        corral_sandbox::OutputPipe::Stderr => Stream::Stderr,
    }
}

/// Where a build's output, live events and egress socket go as the sandbox hands them on.
struct BuildLive {
    log: Arc<BuildLog>,
    cancel: corral_sandbox::CancelHandle,
    grace: Duration,
    events: JobEvents,
    egress: Option<tokio::sync::oneshot::Sender<std::os::fd::OwnedFd>>,
}

impl corral_sandbox::Live for BuildLive {
    fn output(&mut self, pipe: corral_sandbox::OutputPipe, bytes: &[u8]) {
        if self.log.append(stream_of(pipe), bytes) {
            self.cancel.cancel(self.grace);
        }
    }

    fn event(&mut self, event: corral_sandbox::LiveEvent) {
        self.events.raise(live_fact(&event.kind));
    }

    fn egress(&mut self, listener: std::os::fd::OwnedFd) {
        if let Some(tx) = self.egress.take() {
            let _ = tx.send(listener);
        }
    }
}

/// The job event of what the sandbox saw. Counts are the job's totals so far.
pub fn live_fact(kind: &LiveEventKind) -> Fact {
    match kind {
        LiveEventKind::Oom {
            oom_kills,
            host_pid,
            comm,
        } => {
            let who = match (host_pid, comm) {
                (Some(pid), Some(comm)) => format!("host pid {pid} ({comm})"),
                (Some(pid), None) => format!("host pid {pid}"),
                (None, Some(comm)) => format!("a process ({comm})"),
                (None, None) => "a process".to_owned(),
            };
            let mut fact = Fact::new(
                EventKind::Oom,
                Severity::Warning,
                format!("{who} of the job was killed out of memory ({oom_kills} so far)"),
            )
            .with("oom_kills", oom_kills);
            if let Some(pid) = host_pid {
                fact = fact.with("host_pid", pid);
            }
            if let Some(comm) = comm {
                fact = fact.with("command", comm);
            }
            fact
        }
        LiveEventKind::PidsLimit { refused, limit } => {
            let at = limit.map_or_else(String::new, |limit| format!(" of {limit}"));
            Fact::new(
                EventKind::PidsLimit,
                Severity::Warning,
                format!("a fork was refused at the pids limit{at} ({refused} refused so far)"),
            )
            .with("refused", refused)
            .with("limit", limit)
        }
        LiveEventKind::SeccompDenied { syscall, count } => Fact::new(
            EventKind::SeccompDenied,
            Severity::Critical,
            format!("denied system call {syscall} ({count} so far)"),
        )
        .about(syscall)
        .with(
            "syscalls",
            std::collections::BTreeMap::from([(syscall, count)]),
        ),
        LiveEventKind::NetworkAttempt {
            syscall,
            family,
            count,
        } => Fact::new(
            EventKind::NetworkAttempt,
            Severity::Warning,
            format!(
                "{syscall} of a {family} socket refused: the job has no network ({count} so far)"
            ),
        )
        .with("syscall", syscall)
        .with("family", family)
        .with("attempts", count),
        LiveEventKind::CpuSaturated { cpus, seconds } => Fact::new(
            EventKind::CpuSaturated,
            Severity::Warning,
            format!("the job has used all of its {cpus} CPUs for {seconds} s on end"),
        )
        .with("cpus", cpus)
        .with("seconds", seconds),
        LiveEventKind::DiskLimit {
            mount,
            bytes_total,
            bytes_available,
        } => Fact::new(
            EventKind::DiskLimit,
            Severity::Warning,
            format!("the job's {mount} is full: its writes there fail from now on"),
        )
        .about(mount)
        .with("mount", mount)
        .with("bytes_total", bytes_total)
        .with("bytes_available", bytes_available),
    }
}

/// Bytes of regular files under `dir`, without following links (best effort).
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use corral_protocol::Event;

    use super::*;
    use crate::events::JsonLines;

    fn job() -> Job {
        corral_protocol::decode_job(
            br#"{"schema":"corral.job.v1","job_id":"j1","project":"acme","base":"python-3.11",
                 "source":{"digest":"sha256:69a629b3319f1fe501bfbdaec2ece11fc3aed33e39c8e3f1fbc7a16167281cbe"},
                 "command":["true"]}"#,
        )
        .unwrap()
    }

    #[test]
    fn live_sandbox_events_read_as_job_alerts() {
        let oom = live_fact(&LiveEventKind::Oom {
            oom_kills: 1,
            host_pid: Some(4242),
            comm: Some("python3".into()),
        });
        assert_eq!(oom.kind, EventKind::Oom);
        assert_eq!(
            oom.message,
            "host pid 4242 (python3) of the job was killed out of memory (1 so far)"
        );
        assert_eq!(oom.details["command"], "python3");
        let denied = live_fact(&LiveEventKind::SeccompDenied {
            syscall: "keyctl".into(),
            count: 7,
        });
        assert_eq!(denied.severity, Severity::Critical);
        assert_eq!(denied.details["syscalls"], serde_json::json!({"keyctl": 7}));
        let pids = live_fact(&LiveEventKind::PidsLimit {
            refused: 3,
            limit: Some(64),
        });
        assert_eq!(
            pids.message,
            "a fork was refused at the pids limit of 64 (3 refused so far)"
        );
        let net = live_fact(&LiveEventKind::NetworkAttempt {
            syscall: "socket".into(),
            family: "inet".into(),
            count: 1,
        });
        assert_eq!(net.kind, EventKind::NetworkAttempt);
        assert_eq!(net.details["family"], "inet");
        let cpu = live_fact(&LiveEventKind::CpuSaturated {
            cpus: 0.5,
            seconds: 60,
        });
        assert_eq!(cpu.kind, EventKind::CpuSaturated);
        assert_eq!(cpu.details["cpus"], 0.5);
        assert_eq!(cpu.details["seconds"], 60);
        let disk = live_fact(&LiveEventKind::DiskLimit {
            mount: "/tmp".into(),
            bytes_total: 1 << 30,
            bytes_available: 0,
        });
        assert_eq!(disk.kind, EventKind::DiskLimit);
        assert_eq!(disk.subject.as_deref(), Some("/tmp"));
        assert_eq!(
            disk.message,
            "the job's /tmp is full: its writes there fail from now on"
        );
    }

    #[test]
    fn the_flood_meter_flags_a_window_once_past_its_threshold() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut meter = FloodMeter::new(1000);
        assert_eq!(meter.add(600, t0), None);
        assert_eq!(meter.add(600, t0 + ms(500)), Some(1200));
        assert_eq!(meter.add(5000, t0 + ms(900)), None, "once per window");
        // A new window starts from zero.
        assert_eq!(meter.add(900, t0 + ms(1000)), None);
        assert_eq!(meter.add(200, t0 + ms(1999)), Some(1100));
        // Slow output never passes.
        let mut slow = FloodMeter::new(1000);
        for i in 0..100u32 {
            assert_eq!(slow.add(500, t0 + ms(600) * i), None);
        }
    }

    #[test]
    fn a_flooding_build_raises_log_flood_while_it_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let sink = Arc::new(JsonLines::new(std::fs::File::create(&path).unwrap()));
        let events = JobEvents::new(&job(), "w1", vec![sink], None);
        let (live, mut rx) = tokio::sync::mpsc::channel(1024);
        let drain = std::thread::spawn(move || while rx.blocking_recv().is_some() {});
        let log = BuildLog::new(64 << 20, None, live, events.clone());
        // 4 MiB at once: past the threshold within the first second.
        log.read_pipes(Some(piped(vec![b'y'; 4 << 20])), None, || {
            panic!("within the log limit")
        })
        .join()
        .unwrap();
        drop(log);
        drain.join().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let flood: Vec<Event> = text
            .lines()
            .map(|l| corral_protocol::decode::<Event>(l.as_bytes()).unwrap())
            .collect();
        assert_eq!(flood.len(), 1, "{text}");
        assert_eq!(flood[0].kind, EventKind::LogFlood);
        assert_eq!(flood[0].details["stream"], "stdout");
        assert!(
            flood[0].details["bytes_per_second"].as_u64().unwrap() > LOG_FLOOD_BYTES_PER_SECOND
        );
        assert!(events.raised().contains(&EventKind::LogFlood));
    }

    #[test]
    fn the_log_stops_at_its_limit_once_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("build.log");
        let (sink, mut live) = tokio::sync::mpsc::channel(64);
        let log = BuildLog::new(
            10,
            Some(std::fs::File::create(&path).unwrap()),
            sink,
            JobEvents::unwatched(&job()),
        );
        let stops = Arc::new(AtomicUsize::new(0));
        let counted = stops.clone();
        // The limit falls inside the first read; a later read on another stream adds nothing.
        let out = log.read_pipes(
            Some(piped(b"0123456789abcdef".repeat(8))),
            None,
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
            },
        );
        out.join().unwrap();
        let err = log.read_pipes(None, Some(piped(b"late".to_vec())), || {
            panic!("the limit stops the build once")
        });
        err.join().unwrap();
        drop(log);
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789");
        let mut chunks = Vec::new();
        while let Ok(chunk) = live.try_recv() {
            chunks.push(chunk);
        }
        assert_eq!(
            chunks[0],
            (Stream::Stdout, Bytes::from_static(b"0123456789"))
        );
        assert_eq!(chunks[1].0, Stream::System);
        assert!(
            String::from_utf8_lossy(&chunks[1].1).contains("limit of 10 bytes"),
            "{chunks:?}"
        );
        assert_eq!(
            chunks.len(),
            2,
            "nothing past the limit goes live: {chunks:?}"
        );
        assert_eq!(stops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn output_within_the_limit_is_kept_whole() {
        let (sink, mut live) = tokio::sync::mpsc::channel(64);
        let log = BuildLog::new(100, None, sink, JobEvents::unwatched(&job()));
        log.read_pipes(None, Some(piped(b"hello\n".to_vec())), || {
            panic!("within the limit")
        })
        .join()
        .unwrap();
        assert!(!log.truncated());
        assert_eq!(
            live.try_recv().unwrap(),
            (Stream::Stderr, Bytes::from_static(b"hello\n"))
        );
    }

    /// A pipe whose writer (a thread of its own) writes `bytes` and closes it.
    fn piped(bytes: Vec<u8>) -> std::io::PipeReader {
        let (reader, mut writer) = std::io::pipe().unwrap();
        std::thread::spawn(move || writer.write_all(&bytes));
        reader
    }

    #[test]
    fn one_thread_reads_both_streams_to_their_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("build.log");
        let (sink, mut live) = tokio::sync::mpsc::channel(1024);
        let drained = std::thread::spawn(move || {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            while let Some((stream, chunk)) = live.blocking_recv() {
                let chunk: Bytes = chunk;
                match stream {
                    Stream::Stdout => out.extend_from_slice(&chunk),
                    Stream::Stderr => err.extend_from_slice(&chunk),
                    Stream::System => panic!("within the limit: {chunk:?}"),
                }
            }
            (out, err)
        });
        let log = BuildLog::new(
            64 << 20,
            Some(std::fs::File::create(&path).unwrap()),
            sink,
            JobEvents::unwatched(&job()),
        );
        // Several pipe buffers' worth on stdout while stderr ends early: neither stream
        // waits for the other.
        let out: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (err_reader, mut err_writer) = std::io::pipe().unwrap();
        err_writer.write_all(b"warning: early\n").unwrap();
        drop(err_writer);
        log.read_pipes(Some(piped(out.clone())), Some(err_reader), || {
            panic!("within the limit")
        })
        .join()
        .unwrap();
        drop(log);
        let (got_out, got_err) = drained.join().unwrap();
        assert!(
            got_out == out,
            "stdout: {} of {} bytes",
            got_out.len(),
            out.len()
        );
        assert_eq!(got_err, b"warning: early\n");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            (out.len() + got_err.len()) as u64
        );
    }
}
