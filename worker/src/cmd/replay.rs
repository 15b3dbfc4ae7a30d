//! `corral replay JOB.json`: a job's whole life locally, on the embedded defaults (a
//! directory store under the data dir). For fixture jobs, missing bases and source bundles
//! are created on first use from `fixtures/bases/` and `fixtures/bundles/`.

use std::io::Write as _;
use std::sync::Arc;

use anyhow::Context;
use corral_protocol::{Job, JobResult, Stream, WorkerInfo};

use crate::base::Catalogue;
use crate::base::prerequisites::Install;
use crate::cli::ReplayArgs;
use crate::config::{Config, Sources};
use crate::events::JobEvents;
use crate::exit;
use crate::job::{self, Delivery, RunContext, Sandboxed, Settings, Stop, Stopper, wire_name};
use crate::metrics::Metrics;

pub fn run(args: ReplayArgs) -> anyhow::Result<u8> {
    let bytes =
        std::fs::read(&args.job).with_context(|| format!("reading {}", args.job.display()))?;
    let job = match corral_protocol::decode_job(&bytes) {
        Ok(job) => job,
        Err(err) => {
            eprintln!(
                "corral: {}: invalid job: {err} [{}]",
                args.job.display(),
                err.rule
            );
            return Ok(exit::INVALID_INPUT);
        }
    };
    let sources = Sources::from_process(args.config.clone(), args.config_flags());
    let config = match super::check_config::load(&sources) {
        Ok(loaded) => loaded.config,
        Err(code) => return Ok(code),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(replay(job, &args, config))
}

async fn replay(job: Job, args: &ReplayArgs, config: Config) -> anyhow::Result<u8> {
    let say = |text: String| eprintln!("corral: {text}");
    let store = match super::data_dir_and_store(&config).await {
        Ok(store) => store,
        Err(code) => return Ok(code),
    };
    let mut settings = Settings::from_config(&config).context("setting up the sandbox")?;
    settings.use_cache = !args.no_cache;
    // One job: one job filesystem, wiped after the build and torn down at exit.
    settings.job_dir_pool = 1;
    let catalogue = Catalogue::open(&config.data_dir).context("opening the bases")?;
    let install = Install::for_host(args.no_install);
    let mut prepared = crate::firstrun::ensure_run_tools(&install);
    if let (Ok(()), Some(fixtures)) = (&prepared, crate::firstrun::fixtures_dir(&args.job)) {
        prepared = crate::firstrun::prepare(&catalogue, &store, &job, &fixtures, &install).await;
    }
    if let Err(err) = prepared {
        eprintln!("corral: error: {:#}", err.error);
        return Ok(err.code);
    }
    let runner = Sandboxed::open(settings, store, Arc::new(Metrics::new()))
        .context("opening the data dir")?;

    let stop = Stopper::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ncorral: interrupted: stopping the build and cleaning up");
                stop.stop(Stop::Cancel(None));
            }
        });
    }
    let (logs, mut output) = tokio::sync::mpsc::channel::<(Stream, bytes::Bytes)>(64);
    let json = args.json;
    let printer = tokio::spawn(async move {
        while let Some((stream, chunk)) = output.recv().await {
            // With --json, stdout carries the result alone; the build's output goes to stderr.
            if stream == Stream::Stdout && !json {
                let _ = std::io::stdout().write_all(&chunk);
                let _ = std::io::stdout().flush();
            } else {
                let _ = std::io::stderr().write_all(&chunk);
            }
        }
    });
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let worker = WorkerInfo {
        id: format!("replay@{}", host.trim()),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let events = JobEvents::new(
        &job,
        &worker.id,
        super::event_sinks(args.events.as_deref(), true)?,
        None,
    );
    let ctx = RunContext {
        stop,
        logs,
        redelivered: false,
        delivery: Delivery::ONCE,
        worker,
        events,
        slot: job::BuildSlot::default(),
    };
    say(format!(
        "running job {} of project {} on base {}",
        job.job_id, job.project, job.base
    ));
    let verdict = job::run(&runner, &job, ctx).await;
    let _ = printer.await;
    let Some(result) = verdict.result else {
        // Only a lost delivery or a drain end without a result; replay has neither.
        say("the job ended without a result".into());
        return Ok(exit::PLATFORM_ERROR);
    };
    if args.json {
        crate::outln!("{}", serde_json::to_string_pretty(&result)?)?;
    } else {
        summarise(&result)?;
    }
    Ok(exit::for_status(result.status))
}

fn summarise(result: &JobResult) -> anyhow::Result<()> {
    let mut out = format!(
        "\n{} {}",
        result.job_id,
        wire_name(result.status).to_uppercase()
    );
    if let Some(reason) = result.reason {
        out.push_str(&format!(" ({})", wire_name(reason)));
    }
    if result.cached {
        out.push_str(" — from the action cache, not rebuilt");
    }
    if let Some(message) = &result.message {
        out.push_str(&format!("\n  {message}"));
    }
    if let Some(code) = result.exit_code {
        out.push_str(&format!("\n  exit code {code}"));
    }
    if let Some(signal) = result.signal {
        out.push_str(&format!("\n  killed by signal {signal}"));
    }
    let t = &result.timings;
    out.push_str(&format!(
        "\n  stages: fetch {} ms, build {} ms, snapshot {} ms, upload {} ms (total {} ms)",
        t.fetch_ms, t.build_ms, t.snapshot_ms, t.upload_ms, t.total_ms
    ));
    if let Some(usage) = &result.usage {
        out.push_str(&format!(
            "\n  usage: cpu {} ms user + {} ms system, memory peak {}, pids peak {}, wrote {}",
            usage.cpu_user_ms,
            usage.cpu_system_ms,
            corral_protocol::ByteSize(usage.memory_peak_bytes),
            usage.pids_peak,
            corral_protocol::ByteSize(usage.upper_bytes)
        ));
        for (name, count) in &usage.denied_syscalls {
            out.push_str(&format!("\n  denied system call {name} ×{count}"));
        }
        if usage.network_attempts > 0 {
            out.push_str(&format!(
                "\n  network attempts blocked: {}",
                usage.network_attempts
            ));
        }
    }
    if let Some(artifact) = &result.artifact {
        out.push_str(&format!(
            "\n  image:  {}\n  digest: {}",
            artifact.reference, artifact.manifest_digest
        ));
        for (name, layer) in ["base", "source", "build"].iter().zip(&artifact.layers) {
            out.push_str(&format!(
                "\n    {name:<6} {} ({})",
                layer.digest,
                corral_protocol::ByteSize(layer.size)
            ));
        }
    }
    if let Some(log) = &result.log {
        out.push_str(&format!(
            "\n  log:    {} ({}{})",
            log.digest,
            corral_protocol::ByteSize(log.size),
            if log.truncated { ", truncated" } else { "" }
        ));
    }
    crate::outln!("{out}")
}
