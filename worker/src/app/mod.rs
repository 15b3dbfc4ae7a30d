//! Running what was built: an app server from an image, in the same sandbox as builds.
//!
//! The image's layers are unpacked once into the layer cache ([`layers`]) and become the
//! overlay's read-only lower dirs; the writable upper is a size-limited tmpfs inside the
//! app's own mount namespace, gone with the app. The app runs as its project's uid with
//! every namespace, no capabilities, seccomp and cgroup limits, in a network namespace of
//! its own with loopback only, and with `--egress` a proxy of its own as builds have.
//! Exactly one way in: the worker binds the published host address; once the app is ready
//! and listens on every address inside, the kernel carries connections to `$PORT` over a
//! guarded link ([`route`]), else the worker copies each to `127.0.0.1:$PORT` inside
//! ([`forward`]).
//! While it runs, the namespace's kernel is asked a few times a second which sockets listen
//! (sock_diag, not the app): `$PORT` in LISTEN and accepting makes the app ready (and with
//! a health path, an HTTP 2xx there); anything else listening raises `unexpected_listen`.
//!
//! The life of one app, [`run`], ends in one [`Ending`]: stopped when asked (SIGTERM to
//! every process, a grace period, then SIGKILL of the cgroup), `boot_timeout` when
//! nothing listened on `$PORT` in time, `crashed` with its typed [`CrashReason`] when it
//! ended by itself, or `crash_loop` when restarts (`Restart::OnFailure`, exponential
//! backoff) came too fast. Every step is an event on the app's [`JobEvents`].
//!
//! `corral run` (worker/src/cmd/run.rs) drives this; a later AMQP "run" message can too.

pub mod forward;
pub mod layers;
pub mod route;

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_protocol::{EventKind, JobId, NetworkUsage, ProjectId, Severity};
use corral_sandbox::{
    DeathReason, Exit, Identity, JobNetwork, Listener, Network, Outcome, Sandbox, SandboxConfig,
    SandboxLimits, SandboxSpec, Scratch, Transport,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::egress::proxy::Denial;
use crate::egress::{Ledger, Proxy, ProxyLimits};
use crate::events::{Fact, JobEvents};
use crate::job::build::{denial_fact, live_fact};
use layers::ResolvedImage;

/// Why an app could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{what}")]
    Store {
        what: String,
        #[source]
        source: crate::store::StoreError,
    },
    #[error("the image: {reason}")]
    Image { reason: String },
    #[error("unpacking layer {digest}")]
    Layer {
        digest: corral_protocol::Digest,
        #[source]
        source: Box<crate::source::SourceError>,
    },
    #[error("{what}: {path}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("publishing on {address}")]
    Publish {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the sandbox")]
    Sandbox(#[source] Box<corral_sandbox::Error>),
    #[error(
        "the image has no command (no Entrypoint or Cmd, no `web:` line in a Procfile in its \
         workdir): give one after `--`"
    )]
    NoCommand,
}

impl AppError {
    /// Whether the request was at fault (a missing or bad image, no command, a bad layer),
    /// rather than the platform.
    pub fn is_input(&self) -> bool {
        match self {
            AppError::Image { .. } | AppError::Layer { .. } | AppError::NoCommand => true,
            AppError::Store { source, .. } => source.is_not_found(),
            _ => false,
        }
    }
}

/// Whether an app that ended by itself is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    Never,
    /// After an exit other than a clean `exit 0`, with exponential backoff.
    OnFailure,
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct AppSpec {
    /// Stands where a job id does in events.
    pub app_id: JobId,
    pub project: ProjectId,
    /// What the user named (a tag or digest), for messages.
    pub image_name: String,
    pub image: ResolvedImage,
    /// The layer cache's dirs of the image, top first.
    pub lower_dirs: Vec<PathBuf>,
    /// The host address connections arrive on.
    pub publish: SocketAddr,
    /// `$PORT` inside.
    pub port: u16,
    /// Replaces the image's Entrypoint and Cmd when not empty.
    pub command: Vec<String>,
    /// Added to (and overriding) the image's env.
    pub env: Vec<(String, String)>,
    pub memory_bytes: u64,
    pub pids: u64,
    pub cpus: f64,
    /// Size of the writable layer (a tmpfs, charged to the app's memory).
    pub disk_bytes: u64,
    pub boot_timeout: Duration,
    pub grace: Duration,
    pub restart: Restart,
    /// With it, ready means this path answers HTTP 2xx on `$PORT`.
    pub health_path: Option<String>,
    /// Whether connections may be routed through the kernel ([`route`]).
    pub forwarding: route::Forwarding,
    /// What the app may reach through its egress proxy; `None`: nothing.
    pub egress: Option<crate::egress::AllowList>,
    /// This many crashes within [`AppSpec::crash_window`] is a crash loop.
    pub crash_loop_after: u32,
    pub crash_window: Duration,
    /// The first restart's delay; it doubles per crash up to [`AppSpec::backoff_max`].
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

/// How often the app's listening sockets are looked at.
pub const LISTEN_POLL: Duration = Duration::from_millis(200);

/// Why an app that ended by itself ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashReason {
    Oom,
    PidsLimit,
    ExitCode,
    Signal,
}

/// An app's end by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Crash {
    pub reason: CrashReason,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
}

impl Crash {
    /// Read from the sandbox's outcome: a limit the kernel enforced wins over the exit.
    pub fn from_outcome(outcome: &Outcome) -> Crash {
        let (exit_code, signal) = match outcome.exit {
            Exit::Code(code) => (Some(code), None),
            Exit::Signal(signal) => (None, Some(signal)),
        };
        let reason = match (outcome.reason, outcome.exit) {
            (DeathReason::Oom, _) => CrashReason::Oom,
            (DeathReason::PidsLimit, _) => CrashReason::PidsLimit,
            (_, Exit::Signal(_)) => CrashReason::Signal,
            (_, Exit::Code(_)) => CrashReason::ExitCode,
        };
        Crash {
            reason,
            exit_code,
            signal,
        }
    }

    /// A clean `exit 0`: not a failure, though a server should not do it.
    pub fn clean(&self) -> bool {
        self.reason == CrashReason::ExitCode && self.exit_code == Some(0)
    }

    fn describe(&self) -> String {
        match self.reason {
            CrashReason::Oom => "was killed out of memory".into(),
            CrashReason::PidsLimit => "failed at its process limit".into(),
            CrashReason::Signal => format!("was killed by signal {}", self.signal.unwrap_or(0)),
            CrashReason::ExitCode => format!("exited with code {}", self.exit_code.unwrap_or(0)),
        }
    }
}

/// How an app's life ended: the outcome's wire names are `stopped`, `boot_timeout`,
/// `crashed` and `crash_loop`.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// Asked to stop (SIGINT/SIGTERM to `corral run`, or the caller's stop).
    Stopped,
    /// Nothing listened on `$PORT` within the boot timeout.
    BootTimeout,
    /// Ended by itself and not restarted.
    Crashed(Crash),
    /// Crashed too often too fast; the last crash.
    CrashLoop(Crash),
}

impl Ending {
    pub fn wire_name(&self) -> &'static str {
        match self {
            Ending::Stopped => "stopped",
            Ending::BootTimeout => "boot_timeout",
            Ending::Crashed(_) => "crashed",
            Ending::CrashLoop(_) => "crash_loop",
        }
    }

    fn crash(&self) -> Option<&Crash> {
        match self {
            Ending::Crashed(crash) | Ending::CrashLoop(crash) => Some(crash),
            _ => None,
        }
    }
}

/// What [`run`] returns.
#[derive(Debug, Clone)]
pub struct AppOutcome {
    pub ending: Ending,
    /// Times the app was started again after a crash.
    pub restarts: u32,
    /// The sandbox's outcome of the last process tree.
    pub last: Option<Outcome>,
    /// Unexpected listeners seen over the app's life.
    pub unexpected: BTreeSet<Listener>,
}

/// What every run of this worker shares.
#[derive(Debug, Clone)]
pub struct Host {
    pub sandbox: SandboxConfig,
    pub identity: Identity,
    pub worker_id: String,
}

/// A stop request: `true` once the app should stop.
pub type StopSignal = watch::Receiver<bool>;

/// What one start of the app came to.
enum Attempt {
    Stopped(Outcome),
    BootTimeout(Outcome),
    Ended(Outcome),
}

/// Runs the app until it is stopped or ends for good. `target` is updated with the app's
/// namespace while a process tree of it runs (the forwarder reads it); `ready` counts the
/// times it became ready.
pub async fn run(
    spec: &AppSpec,
    host: &Host,
    events: &JobEvents,
    target: &watch::Sender<Option<Arc<JobNetwork>>>,
    mut stop: StopSignal,
) -> Result<AppOutcome, AppError> {
    let mut backoff = Backoff::new(spec.backoff_base, spec.backoff_max);
    let mut crashes: VecDeque<Instant> = VecDeque::new();
    let mut unexpected = BTreeSet::new();
    let mut restarts = 0u32;
    let sandbox_spec = sandbox_spec(spec, host)?;
    // One proxy for the app's whole life: its ledger sums every start's traffic.
    let proxy = spec.egress.clone().map(|allow| {
        let events = events.clone();
        Proxy::new(
            allow,
            crate::egress::allow::own_addresses(),
            ProxyLimits::default(),
            Arc::new(Ledger::new(u64::MAX)),
            Arc::new(move |denial: &Denial| {
                events.raise(denial_fact(denial));
            }),
        )
    });
    let network = || proxy.as_ref().map(|p| p.ledger().usage());
    loop {
        let attempt = restarts + 1;
        let outcome = run_once(
            spec,
            host,
            &sandbox_spec,
            events,
            target,
            &mut stop,
            attempt,
            &mut unexpected,
            proxy.as_ref(),
        )
        .await?;
        let (ending, last) = match outcome {
            Attempt::Stopped(last) => (Ending::Stopped, last),
            Attempt::BootTimeout(last) => (Ending::BootTimeout, last),
            Attempt::Ended(last) => {
                let crash = Crash::from_outcome(&last);
                let now = Instant::now();
                crashes.push_back(now);
                while crashes
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > spec.crash_window)
                {
                    crashes.pop_front();
                }
                let restart = spec.restart == Restart::OnFailure && !crash.clean();
                let looping = restart && crashes.len() as u32 >= spec.crash_loop_after;
                let delay = backoff.next_delay();
                let mut fact = Fact::new(
                    EventKind::AppCrashed,
                    Severity::Warning,
                    format!(
                        "the app {}{}",
                        crash.describe(),
                        if restart && !looping {
                            format!("; restarting in {} ms", delay.as_millis())
                        } else {
                            String::new()
                        }
                    ),
                )
                .with("reason", crash.reason)
                .with("exit_code", crash.exit_code)
                .with("signal", crash.signal)
                .with("restarts", restarts);
                if restart && !looping {
                    fact = fact.with("restart_in_ms", delay.as_millis() as u64);
                }
                events.raise(fact);
                if looping {
                    events.raise(
                        Fact::new(
                            EventKind::CrashLoop,
                            Severity::Critical,
                            format!(
                                "the app crashed {} times within {} s; not restarting it",
                                crashes.len(),
                                spec.crash_window.as_secs()
                            ),
                        )
                        .with("crashes", crashes.len())
                        .with("within_seconds", spec.crash_window.as_secs()),
                    );
                    (Ending::CrashLoop(crash), last)
                } else if restart {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|stop| *stop) => {
                            return Ok(finish(events, spec, Ending::Stopped, restarts, Some(last), unexpected, network()));
                        }
                    }
                    restarts += 1;
                    continue;
                } else {
                    (Ending::Crashed(crash), last)
                }
            }
        };
        return Ok(finish(
            events,
            spec,
            ending,
            restarts,
            Some(last),
            unexpected,
            network(),
        ));
    }
}

fn finish(
    events: &JobEvents,
    spec: &AppSpec,
    ending: Ending,
    restarts: u32,
    last: Option<Outcome>,
    unexpected: BTreeSet<Listener>,
    network: Option<NetworkUsage>,
) -> AppOutcome {
    let crash = ending.crash().copied();
    let mut fact = Fact::new(
        EventKind::AppStopped,
        if matches!(ending, Ending::Stopped) {
            Severity::Info
        } else {
            Severity::Warning
        },
        format!("the app {} ended: {}", spec.app_id, ending.wire_name()),
    )
    .with("outcome", ending.wire_name())
    .with("reason", crash.map(|c| c.reason));
    // How the last process tree ended, stopped or not (a SIGKILL after the grace shows).
    let exit = last.as_ref().map(Crash::from_outcome);
    fact = fact
        .with("exit_code", exit.and_then(|c| c.exit_code))
        .with("signal", exit.and_then(|c| c.signal))
        .with("restarts", restarts);
    if let Some(outcome) = &last {
        fact = fact.with("usage", &outcome.usage);
    }
    if let Some(network) = &network {
        fact = fact.with("network", network);
    }
    events.lifecycle(fact);
    AppOutcome {
        ending,
        restarts,
        last,
        unexpected,
    }
}

/// The sandbox spec of the app: its image's command and env unless given.
fn sandbox_spec(spec: &AppSpec, host: &Host) -> Result<SandboxSpec, AppError> {
    let config = &spec.image.config;
    let workdir = config.working_dir.as_deref().unwrap_or("/");
    let mut argv: Vec<String> = if spec.command.is_empty() {
        config
            .entrypoint
            .iter()
            .chain(&config.cmd)
            .cloned()
            .collect()
    } else {
        spec.command.clone()
    };
    if argv.is_empty() {
        argv = layers::procfile_command(&spec.lower_dirs, workdir).unwrap_or_default();
    }
    if argv.is_empty() {
        return Err(AppError::NoCommand);
    }
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |key: &str, value: &str| {
        env.retain(|(k, _)| k != key);
        env.push((key.to_owned(), value.to_owned()));
    };
    set(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    set("HOME", "/tmp");
    for pair in &config.env {
        if let Some((key, value)) = pair.split_once('=') {
            set(key, value);
        }
    }
    for (key, value) in &spec.env {
        set(key, value);
    }
    set("PORT", &spec.port.to_string());
    if spec.egress.is_some() {
        let url = format!("http://127.0.0.1:{}", corral_sandbox::EGRESS_PORT);
        for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            set(name, &url);
        }
        for name in ["NO_PROXY", "no_proxy"] {
            set(name, "localhost,127.0.0.1");
        }
    }
    let scratch = host.sandbox.run_dir.join("scratch");
    std::fs::create_dir_all(&scratch).map_err(|source| AppError::Io {
        what: "creating the scratch mount point".into(),
        path: scratch.clone(),
        source,
    })?;
    Ok(SandboxSpec {
        lower_dirs: spec.lower_dirs.clone(),
        upper: scratch.join("upper"),
        work: scratch.join("work"),
        identity: host.identity,
        argv,
        env,
        cwd: PathBuf::from(workdir),
        limits: SandboxLimits {
            memory_bytes: Some(spec.memory_bytes),
            pids: Some(spec.pids),
            cpu_quota: Some(spec.cpus),
            // An app runs until it is stopped.
            wall: Duration::from_secs(10 * 365 * 24 * 3600),
            cpu_seconds: None,
            open_files: 4096,
            tmp_bytes: spec.disk_bytes,
            file_size_bytes: Some(spec.disk_bytes),
            cpu_saturated_after: corral_sandbox::CPU_SATURATED_AFTER,
            // The writable layer is a tmpfs: no block device to throttle.
            disk_bytes_per_second: None,
            disk_device: None,
        },
        network: match spec.egress {
            Some(_) => Network::Egress {
                port: corral_sandbox::EGRESS_PORT,
            },
            None => Network::Loopback,
        },
        read_only_binds: Vec::new(),
        hostname: "corral".to_owned(),
        scratch: Some(Scratch {
            dir: scratch,
            size_bytes: spec.disk_bytes,
        }),
    })
}

/// One process tree of the app, from its start to its end.
#[allow(clippy::too_many_arguments)]
async fn run_once(
    spec: &AppSpec,
    host: &Host,
    sandbox_spec: &SandboxSpec,
    events: &JobEvents,
    target: &watch::Sender<Option<Arc<JobNetwork>>>,
    stop: &mut StopSignal,
    attempt: u32,
    unexpected: &mut BTreeSet<Listener>,
    proxy: Option<&Arc<Proxy>>,
) -> Result<Attempt, AppError> {
    let started = Instant::now();
    let (s, config) = (sandbox_spec.clone(), host.sandbox.clone());
    let mut running = tokio::task::spawn_blocking(move || Sandbox::spawn(&s, &config))
        .await
        .map_err(|err| {
            AppError::Sandbox(Box::new(corral_sandbox::Error::ControlSocket {
                source: std::io::Error::other(err),
            }))
        })?
        .map_err(|err| AppError::Sandbox(Box::new(err)))?;
    events.lifecycle(
        Fact::new(
            EventKind::AppStarted,
            Severity::Info,
            format!(
                "the app {} started from {} (attempt {attempt})",
                spec.app_id, spec.image_name
            ),
        )
        .with("image", spec.image.manifest_digest.as_str())
        .with("port", spec.port)
        .with("publish", spec.publish.to_string())
        .with("attempt", attempt),
    );
    let cancel = running.cancel_handle();
    // The proxy serves the socket pid 1 made on the app's loopback, until this start ends.
    let serving = match (proxy, running.egress_listener()) {
        (Some(proxy), Some(handed)) => {
            let proxy = proxy.clone();
            Some(tokio::spawn(async move {
                let Ok(Ok(fd)) = tokio::task::spawn_blocking(move || handed.recv()).await else {
                    return;
                };
                let listener = std::net::TcpListener::from(fd);
                if let Ok(listener) = listener
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpListener::from_std(listener))
                {
                    proxy.serve(listener).await;
                }
            }))
        }
        _ => None,
    };
    let mut threads = Vec::new();
    // The app's output goes to ours (stderr: stdout may carry the events).
    for pipe in [running.stdout.take(), running.stderr.take()]
        .into_iter()
        .flatten()
    {
        threads.push(std::thread::spawn(move || {
            let mut pipe = pipe;
            let _ = std::io::copy(&mut pipe, &mut std::io::stderr());
        }));
    }
    if let Some(live) = running.events() {
        let events = events.clone();
        threads.push(std::thread::spawn(move || {
            for event in live {
                events.raise(live_fact(&event.kind));
            }
        }));
    }
    // The namespace exists once the app's first process is in its cgroup.
    let mut network = None;
    let until = Instant::now() + Duration::from_secs(10);
    while network.is_none() && Instant::now() < until {
        match running.network() {
            Ok(found) => network = Some(Arc::new(found)),
            Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
    let mut waiting = tokio::task::spawn_blocking(move || running.wait());
    target.send_replace(network.clone());

    let boot_deadline = tokio::time::Instant::from_std(started + spec.boot_timeout);
    let mut ready = false;
    let mut route: Option<route::KernelRoute> = None;
    let mut ending: Option<fn(Outcome) -> Attempt> = None;
    let mut poll = tokio::time::interval(LISTEN_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            done = &mut waiting => break done,
            _ = poll.tick(), if network.is_some() => {
                let Some(net) = network.clone() else { continue };
                let listening = tokio::task::spawn_blocking(move || net.listeners()).await;
                let Ok(Ok(listening)) = listening else { continue };
                for listener in &listening {
                    let ours = listener.transport == Transport::Tcp
                        && (listener.port == spec.port
                            || (proxy.is_some()
                                && listener.port == corral_sandbox::EGRESS_PORT
                                && listener.address.is_loopback()));
                    if !ours && unexpected.insert(*listener) {
                        raise_unexpected(events, spec, listener);
                    }
                }
                let on_port = listening
                    .iter()
                    .any(|l| l.transport == Transport::Tcp && l.port == spec.port);
                let answered = match &network {
                    Some(net) if !ready && on_port => answers(net, spec).await,
                    _ => false,
                };
                if answered {
                    ready = true;
                    let boot_ms = started.elapsed().as_millis() as u64;
                    let mut why_userspace = None;
                    if let Some(net) = &network {
                        match open_route(spec, net.clone(), &listening).await {
                            Ok(opened) => route = Some(opened),
                            Err(reason) => why_userspace = reason,
                        }
                    }
                    let forwarding = if route.is_some() { "kernel" } else { "userspace" };
                    events.lifecycle(
                        Fact::new(
                            EventKind::AppReady,
                            Severity::Info,
                            format!(
                                "the app {} is ready on {} (port {} inside, forwarded {}{}) after {} ms",
                                spec.app_id,
                                spec.publish,
                                spec.port,
                                if route.is_some() { "by the kernel" } else { "in userspace" },
                                why_userspace.as_deref().map(|why| format!(": {why}")).unwrap_or_default(),
                                boot_ms
                            ),
                        )
                        .with("port", spec.port)
                        .with("publish", spec.publish.to_string())
                        .with("boot_ms", boot_ms)
                        .with("attempt", attempt)
                        .with("forwarding", forwarding)
                        .with("forwarding_note", why_userspace)
                        .with("link", route.as_ref().map(route::KernelRoute::link))
                        .with(
                            "app_address",
                            route.as_ref().map(|r| r.app_address().to_string()),
                        ),
                    );
                }
            }
            () = tokio::time::sleep_until(boot_deadline), if !ready && ending.is_none() => {
                events.raise(
                    Fact::new(
                        EventKind::BootTimeout,
                        Severity::Warning,
                        format!(
                            "nothing listened on port {} within {} s; stopping the app",
                            spec.port,
                            spec.boot_timeout.as_secs_f64()
                        ),
                    )
                    .with("port", spec.port)
                    .with("boot_timeout_seconds", spec.boot_timeout.as_secs_f64()),
                );
                ending = Some(Attempt::BootTimeout);
                cancel.cancel(spec.grace);
            }
            _ = stop.wait_for(|stop| *stop), if ending.is_none() => {
                ending = Some(Attempt::Stopped);
                cancel.cancel(spec.grace);
            }
        }
    };
    if let Some(route) = route.take() {
        let _ = tokio::task::spawn_blocking(move || drop(route)).await;
    }
    if let Some(serving) = serving {
        serving.abort();
    }
    target.send_replace(None);
    for thread in threads {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    let outcome = result
        .map_err(|err| {
            AppError::Sandbox(Box::new(corral_sandbox::Error::ControlSocket {
                source: std::io::Error::other(err),
            }))
        })?
        .map_err(|err| AppError::Sandbox(Box::new(err)))?;
    Ok(match ending {
        Some(make) => make(outcome),
        None => Attempt::Ended(outcome),
    })
}

/// The kernel route to the app once it is ready, when allowed and possible; else why not
/// (`None` when userspace forwarding was asked for).
async fn open_route(
    spec: &AppSpec,
    network: Arc<JobNetwork>,
    listening: &[Listener],
) -> Result<route::KernelRoute, Option<String>> {
    if spec.forwarding == route::Forwarding::Userspace {
        return Err(None);
    }
    if !listens_on_every_ipv4_address(listening, spec.port) {
        return Err(Some(format!(
            "the app listens on port {} of loopback only, not on 0.0.0.0",
            spec.port
        )));
    }
    let (publish, port) = (spec.publish, spec.port);
    tokio::task::spawn_blocking(move || route::KernelRoute::open(network, publish, port))
        .await
        .map_err(|err| Some(err.to_string()))?
        .map_err(|err| Some(err.to_string()))
}

/// Whether IPv4 connections to any address of the namespace reach `port`: a listener on
/// 0.0.0.0, or one on `::` while no IPv4 socket listens there (the app answered on
/// 127.0.0.1 before it was ready, so that `::` socket takes IPv4 too: it is dual-stack, not
/// `IPV6_V6ONLY`).
fn listens_on_every_ipv4_address(listening: &[Listener], port: u16) -> bool {
    let on_port = || {
        listening
            .iter()
            .filter(move |l| l.transport == Transport::Tcp && l.port == port)
    };
    let any_v4 = on_port().any(|l| l.address == std::net::Ipv4Addr::UNSPECIFIED);
    let any_v6 = on_port().any(|l| l.address == std::net::Ipv6Addr::UNSPECIFIED);
    let some_v4 = on_port().any(|l| l.address.is_ipv4());
    any_v4 || (any_v6 && !some_v4)
}

fn raise_unexpected(events: &JobEvents, spec: &AppSpec, listener: &Listener) {
    events.raise(
        Fact::new(
            EventKind::UnexpectedListen,
            Severity::Warning,
            format!(
                "the app listens on {} port {} ({}); only port {} is published",
                listener.transport.as_str(),
                listener.port,
                listener.address,
                spec.port
            ),
        )
        .with("port", listener.port)
        .with("protocol", listener.transport.as_str())
        .with("address", listener.address.to_string()),
    );
}

/// Whether `$PORT` accepts a connection (and answers the health path with a 2xx).
async fn answers(network: &JobNetwork, spec: &AppSpec) -> bool {
    let check = async {
        let mut stream = forward::connect_inside(network, spec.port).await.ok()?;
        let Some(path) = &spec.health_path else {
            return Some(true);
        };
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 64];
        let mut got = 0;
        while got < 12 {
            let n = stream.read(&mut head[got..]).await.ok()?;
            if n == 0 {
                break;
            }
            got += n;
        }
        let line = String::from_utf8_lossy(&head[..got]).into_owned();
        let status = line.split_whitespace().nth(1)?;
        Some(status.starts_with('2') && status.len() == 3)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), check).await,
        Ok(Some(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn kernel_forwarding_needs_a_listener_every_ipv4_address_reaches() {
        let tcp = |address: &str, port: u16| Listener {
            transport: Transport::Tcp,
            address: address.parse().unwrap(),
            port,
        };
        let every = |listening: &[Listener]| listens_on_every_ipv4_address(listening, 8080);
        assert!(every(&[tcp("0.0.0.0", 8080)]));
        // `::` alone answered on 127.0.0.1: dual-stack.
        assert!(every(&[tcp("::", 8080)]));
        assert!(every(&[tcp("::", 8080), tcp("0.0.0.0", 8080)]));
        // `::` beside an IPv4 socket on loopback: may be IPV6_V6ONLY.
        assert!(!every(&[tcp("::", 8080), tcp("127.0.0.1", 8080)]));
        assert!(!every(&[tcp("127.0.0.1", 8080)]));
        assert!(!every(&[tcp("0.0.0.0", 9000), tcp("127.0.0.1", 8080)]));
        let udp = Listener {
            transport: Transport::Udp,
            address: "0.0.0.0".parse().unwrap(),
            port: 8080,
        };
        assert!(!every(&[udp, tcp("127.0.0.1", 8080)]));
    }

    fn outcome(exit: Exit, reason: DeathReason) -> Outcome {
        Outcome {
            exit,
            reason,
            usage: Default::default(),
            denied_syscalls: BTreeMap::new(),
            network_attempts: 0,
            oom_kills: 0,
            pids_limit_hits: 0,
            events_dropped: 0,
        }
    }

    #[test]
    fn a_crash_is_named_by_the_limit_before_the_exit() {
        let oom = Crash::from_outcome(&outcome(Exit::Signal(9), DeathReason::Oom));
        assert_eq!(oom.reason, CrashReason::Oom);
        assert_eq!(oom.signal, Some(9));
        let pids = Crash::from_outcome(&outcome(Exit::Code(1), DeathReason::PidsLimit));
        assert_eq!(pids.reason, CrashReason::PidsLimit);
        let killed = Crash::from_outcome(&outcome(Exit::Signal(11), DeathReason::Completed));
        assert_eq!(killed.reason, CrashReason::Signal);
        let exited = Crash::from_outcome(&outcome(Exit::Code(3), DeathReason::Completed));
        assert_eq!(
            (exited.reason, exited.exit_code, exited.clean()),
            (CrashReason::ExitCode, Some(3), false)
        );
        assert!(Crash::from_outcome(&outcome(Exit::Code(0), DeathReason::Completed)).clean());
    }

    #[test]
    fn endings_have_their_wire_names() {
        let crash = Crash {
            reason: CrashReason::Oom,
            exit_code: None,
            signal: Some(9),
        };
        assert_eq!(Ending::Stopped.wire_name(), "stopped");
        assert_eq!(Ending::BootTimeout.wire_name(), "boot_timeout");
        assert_eq!(Ending::Crashed(crash).wire_name(), "crashed");
        assert_eq!(Ending::CrashLoop(crash).wire_name(), "crash_loop");
        assert_eq!(serde_json::json!(CrashReason::PidsLimit), "pids_limit");
    }
}
