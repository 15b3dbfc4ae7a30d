//! `corral-worker bench-sandbox` (hidden): the in-worker sandbox start benchmark. It runs
//! a command `--runs` times through [`Sandbox::spawn`] from this one long-lived process,
//! with shims forked from a zygote, as `corral work` runs its jobs, interleaved round by
//! round with `bwrap --unshare-all` over the same root running the same command, and
//! prints both medians and their ratio. With `--trace-timings` it also prints the median
//! of each phase (the caller's, the shim's and pid 1's marks, see
//! `corral_sandbox::trace`). `scripts/bench-sandbox` runs it after the CLI rounds.
//!
//! The job's upper dir is a tmpfs in its own mount namespace (as `corral sandbox` without
//! `--upper`). A run is timed from the call to `Sandbox::spawn` to the outcome, as the
//! worker gets it (`Running::wait_outcome_live`: the output, live events and report read on
//! the waiting thread as they come); the wait for the shim's exit that follows is not counted,
//! as the worker leaves it to its job dir pool, but it is done before the next round, and so
//! is the rest of the background work a worker does between jobs (the cgroup pool's, the next
//! shim forked ahead with its pid 1), so that neither corral's next round nor the peer's
//! shares the machine with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use corral_sandbox::{
    Identity, Network, Sandbox, SandboxConfig, SandboxLimits, SandboxSpec, Scratch, Zygote,
};

#[derive(Debug, clap::Args)]
pub struct BenchSandboxArgs {
    /// Read-only root filesystem the command runs on.
    #[arg(long)]
    pub rootfs: PathBuf,
    /// Measured rounds (after 5 warm-up rounds).
    #[arg(long, default_value_t = 100)]
    pub runs: usize,
    /// Also print the median of every phase of corral's runs.
    #[arg(long)]
    pub trace_timings: bool,
    /// Leave bwrap out (corral's figures only).
    #[arg(long)]
    pub no_peer: bool,
    /// Make and remove each job's cgroup on the spot instead of through a pool (as
    /// before the pool, for comparison).
    #[arg(long)]
    pub no_pool: bool,
    /// The command (default `/bin/true`).
    #[arg(last = true)]
    pub command: Vec<String>,
}

const WARM_UP: usize = 5;

pub fn run(args: BenchSandboxArgs) -> anyhow::Result<u8> {
    let command = if args.command.is_empty() {
        vec!["/bin/true".to_owned()]
    } else {
        args.command.clone()
    };
    let mut config = SandboxConfig::new().context("locating the corral-worker binary")?;
    config.cgroup_parent = "corral-bench".to_owned();
    config.run_dir = PathBuf::from("/run/corral-bench");
    config.helper_exe = crate::job::spec::self_helper(&config.helper_exe);
    config.zygote = Some(Arc::new(Zygote::new(&config.helper_exe)));
    if !args.no_pool {
        // As `corral work` does: job cgroups made ahead, removed in the background.
        let layout = corral_sandbox::host_cgroup_layout()?;
        config.cgroup_pool = Some(Arc::new(corral_sandbox::CgroupPool::new(
            layout,
            &config.cgroup_parent,
            2,
        )?));
    }
    let scratch = config.run_dir.join("scratch");
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let spec = SandboxSpec {
        lower_dirs: vec![args.rootfs.clone()],
        upper: scratch.join("upper"),
        work: scratch.join("work"),
        identity: Identity {
            host_uid: 65_000,
            host_gid: 65_000,
        },
        argv: command.clone(),
        env: vec![
            ("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned()),
            ("HOME".to_owned(), "/tmp".to_owned()),
        ],
        cwd: PathBuf::from("/"),
        limits: SandboxLimits {
            memory_bytes: Some(1 << 30),
            wall: Duration::from_secs(600),
            ..SandboxLimits::default()
        },
        network: Network::None,
        read_only_binds: Vec::new(),
        hostname: "corral".to_owned(),
        scratch: Some(Scratch {
            dir: scratch,
            size_bytes: 1 << 30,
        }),
    };
    let mut corral = Vec::with_capacity(args.runs);
    let mut bwrap = Vec::with_capacity(args.runs);
    // (role, label) → (durations, ends), in nanoseconds.
    type Samples = (Vec<u64>, Vec<u64>);
    let mut phases: BTreeMap<(u8, &'static str), Samples> = BTreeMap::new();
    let mut spans = Vec::new();
    let load_before = load_average();
    for round in 0..args.runs + WARM_UP {
        let (took, timings) = corral_once(&spec, &config, args.trace_timings)?;
        if !args.no_peer {
            let peer = bwrap_once(&args.rootfs, &command)?;
            if round >= WARM_UP {
                bwrap.push(peer);
            }
        }
        if round < WARM_UP {
            continue;
        }
        corral.push(took);
        if let Some(t) = timings {
            spans.push(t.span_ns());
            for p in t.phases() {
                let (durations, ends) = phases.entry((p.role as u8, p.label)).or_default();
                durations.push(p.duration_ns);
                ends.push(p.end_ns);
            }
        }
    }
    let load_after = load_average();
    let ms = |d: &[Duration]| {
        let mut v: Vec<f64> = d.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let (c, b) = (ms(&corral), ms(&bwrap));
    crate::outln!(
        "in-worker path: {} interleaved runs each, {} (load {load_before} → {load_after})",
        args.runs,
        command.join(" ")
    )?;
    print_line("corral", &c)?;
    if !args.no_peer {
        print_line("bwrap", &b)?;
        crate::outln!("  corral/bwrap   = {:.2}", median(&c) / median(&b))?;
    }
    if args.trace_timings && !phases.is_empty() {
        crate::outln!(
            "  medians per phase (ms): end since the first mark, duration since the previous \
             mark of its role"
        )?;
        let mid = |mut v: Vec<u64>| {
            v.sort_unstable();
            v[v.len() / 2]
        };
        let mut rows: Vec<_> = phases
            .into_iter()
            .map(|((role, label), (d, e))| (mid(e), role, label, mid(d)))
            .collect();
        rows.sort();
        for (end, role, label, duration) in rows {
            let role = match role {
                0 => "caller",
                1 => "supervisor",
                _ => "init",
            };
            crate::outln!(
                "    {:8.3}  {role:<10} {:8.3}  {label}",
                end as f64 / 1e6,
                duration as f64 / 1e6
            )?;
        }
        spans.sort_unstable();
        crate::outln!(
            "    {:<10} {:8.3}  first mark to last",
            "total",
            spans[spans.len() / 2] as f64 / 1e6
        )?;
    }
    Ok(crate::exit::SUCCESS)
}

fn print_line(name: &str, sorted: &[f64]) -> anyhow::Result<()> {
    let pct = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    crate::outln!(
        "  {name:8} median {:6.3} ms   p10 {:6.3}   p90 {:6.3}",
        median(sorted),
        pct(0.1),
        pct(0.9)
    )?;
    Ok(())
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// What a run printed.
#[derive(Default)]
struct Collected {
    err: Vec<u8>,
}

impl corral_sandbox::Live for Collected {
    fn output(&mut self, pipe: corral_sandbox::OutputPipe, bytes: &[u8]) {
        if pipe == corral_sandbox::OutputPipe::Stderr {
            self.err.extend_from_slice(bytes);
        }
    }
}

/// One run through `Sandbox::spawn`, timed from the call to the outcome.
fn corral_once(
    spec: &SandboxSpec,
    config: &SandboxConfig,
    traced: bool,
) -> anyhow::Result<(Duration, Option<corral_sandbox::Timings>)> {
    let start = Instant::now();
    let running = if traced {
        Sandbox::spawn_traced(spec, config)?
    } else {
        Sandbox::spawn(spec, config)?
    };
    // As the worker waits: the output, the live events and the report read on this thread
    // as they come, the outcome once every process of the job is dead and its cgroup
    // removed; pid 1's exit (its namespaces going away) is waited for off the clock, as
    // the worker's job dir pool does before it reuses the dir.
    let mut output = Collected::default();
    let (ended, teardown) = running.wait_outcome_live_timed(&mut output);
    let err = output.err;
    let took = start.elapsed();
    teardown.wait();
    let (outcome, timings) = ended?;
    // The pool's background work (removing this job's cgroup, making the next spare) is
    // not counted either, but it is done before the next round, as on a worker between
    // jobs.
    if let Some(pool) = &config.cgroup_pool {
        pool.settle();
    }
    // So is the zygote's: the next job's shim, forked ahead a few milliseconds after this
    // one was taken, and the work it does before its request (its pid 1's clone and staged
    // mounts, a fraction of a millisecond, given one here).
    if let Some(zygote) = &config.zygote {
        zygote.settle(Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(1));
    }
    if !outcome.success() {
        bail!(
            "the sandboxed command failed: {outcome:?}: {}",
            String::from_utf8_lossy(&err)
        );
    }
    Ok((took, traced.then_some(timings)))
}

fn bwrap_once(rootfs: &Path, command: &[String]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let status = Command::new("bwrap")
        .args(["--unshare-all", "--ro-bind"])
        .arg(rootfs)
        .args(["/", "--proc", "/proc", "--dev", "/dev"])
        .args(command)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running bwrap")?;
    let took = start.elapsed();
    if !status.success() {
        bail!("bwrap failed: {status}");
    }
    Ok(took)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}
