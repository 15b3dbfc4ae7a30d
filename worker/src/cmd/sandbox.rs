//! `corral sandbox`: run one command in a sandbox and print its `Outcome` as JSON, for
//! operators poking at a base image and for the benchmark. The command's output goes
//! straight to ours (or nowhere with `--quiet`); Ctrl-C cancels the job and still prints
//! the outcome. `--events` writes what the job does while it runs as JSON lines.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use corral_sandbox::{
    Ended, Identity, JobDir, LiveEvent, Network, Outcome, Output, Sandbox, SandboxConfig,
    SandboxLimits, SandboxSpec, Scratch,
};

use crate::cli::{SandboxArgs, SandboxNetwork};
use crate::egress::proxy::Denial;
use crate::egress::{Ledger, Proxy, ProxyLimits};
use crate::exit;

/// Where the upper dir lives for this run, and how it goes away.
enum Upper {
    Given(PathBuf),
    /// On a tmpfs mounted on this (shared, empty) dir inside the job's own mount namespace:
    /// it goes away with the job, and the host sees nothing of it.
    Scratch(PathBuf),
    Limited(JobDir),
}

impl Upper {
    fn dirs(&self) -> (PathBuf, PathBuf) {
        match self {
            Upper::Given(p) | Upper::Scratch(p) => (p.join("upper"), p.join("work")),
            Upper::Limited(j) => (j.upper(), j.work()),
        }
    }
}

pub fn run(args: SandboxArgs) -> anyhow::Result<u8> {
    run_timed(args, None)
}

/// [`run`], from a process that started at `started` (see `corral_sandbox::trace::now`):
/// the first mark of `--trace-timings`.
pub fn run_timed(args: SandboxArgs, started: Option<u64>) -> anyhow::Result<u8> {
    use corral_sandbox::trace::{self, Mark};
    // Before anything else: the job's pid 1, cloned later, inherits the marks' page.
    if args.trace_timings && trace::enable() {
        trace::mark_at(Mark::Start, started.unwrap_or_else(trace::now));
    }
    let config = SandboxConfig::new().context("locating the corral binary")?;
    trace::mark(Mark::Parsed);
    let upper = prepare_upper(&args, &config)?;
    trace::mark(Mark::UpperReady);
    let result = run_in(&args, &config, &upper).and_then(|ended| {
        let printed = print(ended.outcome());
        if args.trace_timings {
            trace::mark(Mark::Printed);
            // The page holds every mark of this run: ours, the supervisor's and pid 1's.
            eprint!(
                "corral sandbox --trace-timings:\n{}",
                trace::take().render()
            );
        }
        // The job's pid 1 may still be exiting, its overlay with it: a job filesystem can
        // only be unmounted once it is gone; anything else needs no waiting (we exit next,
        // and our own reaper collects pid 1, as after `bwrap`).
        match upper {
            Upper::Limited(_) => drop(ended.wait()),
            Upper::Given(_) | Upper::Scratch(_) => drop(ended.detach()),
        }
        printed
    });
    if let Upper::Limited(j) = upper {
        j.remove().context("removing the job dir")?;
    }
    result
}

fn prepare_upper(args: &SandboxArgs, config: &SandboxConfig) -> anyhow::Result<Upper> {
    let upper = if let Some(size) = args.disk {
        let name = format!("sandbox-{}", std::process::id());
        std::fs::create_dir_all(&args.disk_dir)
            .with_context(|| format!("creating {}", args.disk_dir.display()))?;
        Upper::Limited(JobDir::create(&args.disk_dir, &name, size.0)?)
    } else if let Some(dir) = &args.upper {
        Upper::Given(dir.clone())
    } else {
        let dir = config.run_dir.join("scratch");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        return Ok(Upper::Scratch(dir));
    };
    let (u, w) = upper.dirs();
    for d in [&u, &w] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    Ok(upper)
}

fn run_in(args: &SandboxArgs, config: &SandboxConfig, upper: &Upper) -> anyhow::Result<Ended> {
    let (upper_dir, work_dir) = upper.dirs();
    let mut lower_dirs = args.layers.clone();
    lower_dirs.push(args.rootfs.clone());
    let mut env = vec![
        ("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned()),
        ("HOME".to_owned(), "/tmp".to_owned()),
    ];
    for kv in &args.env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--env {kv:?} is not KEY=VALUE"))?;
        env.retain(|(key, _)| key != k);
        env.push((k.to_owned(), v.to_owned()));
    }
    let allow = match args.egress.is_empty() {
        true => None,
        false => Some(crate::egress::AllowList::parse(&args.egress).context("--egress")?),
    };
    if allow.is_some() {
        let url = format!("http://127.0.0.1:{}", corral_sandbox::EGRESS_PORT);
        for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            env.push((name.to_owned(), url.clone()));
        }
        for name in ["NO_PROXY", "no_proxy"] {
            env.push((name.to_owned(), "localhost,127.0.0.1".to_owned()));
        }
    }
    let mut read_only_binds = Vec::new();
    for b in &args.binds {
        let (h, s) = b
            .split_once(':')
            .with_context(|| format!("--bind {b:?} is not HOST:SANDBOX"))?;
        read_only_binds.push((PathBuf::from(h), PathBuf::from(s)));
    }
    let spec = SandboxSpec {
        lower_dirs,
        upper: upper_dir,
        work: work_dir,
        identity: Identity {
            host_uid: args.uid,
            host_gid: args.uid,
        },
        argv: args.command.clone(),
        env,
        cwd: args.cwd.clone(),
        limits: SandboxLimits {
            memory_bytes: Some(args.memory.0),
            pids: Some(args.pids),
            cpu_quota: Some(args.cpus),
            wall: Duration::try_from_secs_f64(args.wall).context("--wall")?,
            cpu_seconds: args.cpu_seconds,
            open_files: 4096,
            tmp_bytes: args.tmp.0,
            file_size_bytes: None,
            cpu_saturated_after: Duration::from_secs(args.cpu_saturated_after),
            disk_bytes_per_second: args.disk_bandwidth.map(|b| b.0),
            disk_device: None,
        },
        network: match args.network {
            _ if allow.is_some() => Network::Egress {
                port: corral_sandbox::EGRESS_PORT,
            },
            SandboxNetwork::None => Network::None,
            SandboxNetwork::Loopback => Network::Loopback,
        },
        read_only_binds,
        hostname: "corral".to_owned(),
        scratch: match upper {
            Upper::Scratch(dir) => Some(Scratch {
                dir: dir.clone(),
                size_bytes: args.memory.0,
            }),
            Upper::Given(_) | Upper::Limited(_) => None,
        },
    };
    corral_sandbox::trace::mark(corral_sandbox::trace::Mark::SpecBuilt);
    // This process is single-threaded: it supervises the job itself (no shim to start).
    let output = if args.quiet {
        Output::Discard
    } else {
        Output::Inherit
    };
    let events = match &args.events {
        None => None,
        Some(path) if path.as_os_str() == "-" => {
            Some(Box::new(std::io::stderr()) as Box<dyn std::io::Write + Send>)
        }
        Some(path) => Some(Box::new(
            std::fs::File::create(path)
                .with_context(|| format!("creating the events file {}", path.display()))?,
        ) as Box<dyn std::io::Write + Send>),
    };
    let events = Arc::new(Mutex::new(events));
    // One write per event, so lines stay whole beside the job's own stderr; a failed
    // write loses the live copy only (the outcome still counts it).
    let write_line = {
        let events = events.clone();
        move |value: &dyn erased::Json| {
            let mut out = events
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(out) = out.as_mut()
                && let Some(mut line) = value.line()
            {
                line.push(b'\n');
                let _ = out.write_all(&line);
            }
        }
    };
    let write_event = write_line.clone();
    let mut on_event = move |event: LiveEvent| write_event(&event);
    let ledger = Arc::new(Ledger::new(
        corral_protocol::Limits::MAX.network_bytes.bytes(),
    ));
    let mut on_egress = |fd: OwnedFd| {
        let Some(allow) = allow.clone() else { return };
        let write_denial = write_line.clone();
        let proxy = Proxy::new(
            allow,
            crate::egress::allow::own_addresses(),
            ProxyLimits::default(),
            ledger.clone(),
            Arc::new(move |denial: &Denial| {
                write_denial(&serde_json::json!({
                    "kind": "egress_denied",
                    "host": denial.destination.as_ref().map(|d| d.host.clone()),
                    "port": denial.destination.as_ref().map(|d| d.port),
                    "reason": denial.reason,
                    "message": denial.detail,
                }));
            }),
        );
        // The job's pid 1 is cloned by now: a thread of ours no longer matters to it.
        let _ = std::thread::Builder::new()
            .name("corral-egress".to_owned())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    let listener = std::net::TcpListener::from(fd);
                    if listener.set_nonblocking(true).is_ok()
                        && let Ok(listener) = tokio::net::TcpListener::from_std(listener)
                    {
                        proxy.serve(listener).await;
                    }
                });
            });
    };
    let ended = Sandbox::run_with_egress(&spec, config, output, &mut on_event, &mut on_egress)?;
    if args.egress.is_empty() {
        return Ok(ended);
    }
    write_line(&serde_json::json!({"kind": "egress_usage", "usage": ledger.usage()}));
    Ok(ended)
}

/// A value that can be written as one JSON line.
mod erased {
    pub trait Json {
        fn line(&self) -> Option<Vec<u8>>;
    }

    impl<T: serde::Serialize> Json for T {
        fn line(&self) -> Option<Vec<u8>> {
            serde_json::to_vec(self).ok()
        }
    }
}

/// Prints the outcome as one JSON line; the exit code says whether the job succeeded.
fn print(outcome: &Outcome) -> anyhow::Result<u8> {
    crate::outln!("{}", serde_json::to_string(outcome)?)?;
    Ok(if outcome.success() {
        exit::SUCCESS
    } else {
        exit::JOB_FAILED
    })
}
