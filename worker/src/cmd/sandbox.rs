//! `corral sandbox`: run one command in a sandbox and print its `Outcome` as JSON, for
//! operators poking at a base image and for the benchmark. The command's output goes
//! straight to ours (or nowhere with `--quiet`); Ctrl-C cancels the job and still prints
//! the outcome. `--events` writes what the job does while it runs as JSON lines.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use corral_sandbox::{
    Ended, Identity, JobDir, LiveEvent, Network, Outcome, Output, Sandbox, SandboxConfig,
    SandboxLimits, SandboxSpec, Scratch,
};

use crate::cli::{SandboxArgs, SandboxNetwork};
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
    let config = SandboxConfig::new().context("locating the corral binary")?;
    let upper = prepare_upper(&args, &config)?;
    let result = run_in(&args, &config, &upper).and_then(|ended| {
        let printed = print(ended.outcome());
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
    // This process is single-threaded: it supervises the job itself (no shim to start).
    let output = if args.quiet {
        Output::Discard
    } else {
        Output::Inherit
    };
    let mut events = match &args.events {
        None => None,
        Some(path) if path.as_os_str() == "-" => {
            Some(Box::new(std::io::stderr()) as Box<dyn std::io::Write>)
        }
        Some(path) => Some(Box::new(
            std::fs::File::create(path)
                .with_context(|| format!("creating the events file {}", path.display()))?,
        ) as Box<dyn std::io::Write>),
    };
    let mut on_event = |event: LiveEvent| {
        if let Some(out) = events.as_mut()
            && let Ok(mut line) = serde_json::to_vec(&event)
        {
            line.push(b'\n');
            // One write per event, so lines stay whole beside the job's own stderr; a
            // failed write loses the live copy only (the outcome still counts it).
            let _ = out.write_all(&line);
        }
    };
    Ok(Sandbox::run_with_events(
        &spec,
        config,
        output,
        &mut on_event,
    )?)
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
