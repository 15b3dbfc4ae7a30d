//! `corral replay JOB.json`: a job's whole life locally, on the embedded defaults (a
//! directory store under the data dir). For fixture jobs, missing bases and source bundles
//! are created on first use from `fixtures/bases/` and `fixtures/bundles/`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use corral_protocol::{Job, JobResult, Stream, WorkerInfo};

use crate::base::{BaseError, Catalogue, IfExists, Recipe};
use crate::cli::ReplayArgs;
use crate::config::{Config, ConfigFlags, Sources};
use crate::exit;
use crate::job::{
    self, Delivery, RunContext, Sandboxed, Settings, Stop, Stopper, error_chain, open_store,
    wire_name,
};
use crate::metrics::Metrics;
use crate::store::Store;

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
    let flags = ConfigFlags {
        data_dir: args.data_dir.clone(),
        ..ConfigFlags::default()
    };
    let mut config = match Config::load(&Sources::from_process(args.config.clone(), flags)) {
        Ok(loaded) => loaded.config,
        Err(err) => {
            eprintln!("corral: {err}");
            return Ok(exit::INVALID_INPUT);
        }
    };
    if let Some(url) = &args.store {
        config.store.url =
            crate::config::StoreUrl::parse(url).map_err(|e| anyhow::anyhow!("--store: {e}"))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(replay(job, &args, config))
}

async fn replay(job: Job, args: &ReplayArgs, config: Config) -> anyhow::Result<u8> {
    let say = |text: String| eprintln!("corral: {text}");
    let store = match open_store(&config).await {
        Ok(store) => store,
        Err(err) => {
            say(format!("opening the store: {}", error_chain(&err)));
            return Ok(exit::PLATFORM_ERROR);
        }
    };
    let mut settings = Settings::from_config(&config).context("setting up the sandbox")?;
    settings.use_cache = !args.no_cache;
    // One job: one job filesystem, wiped after the build and torn down at exit.
    settings.job_dir_pool = 1;
    let fixtures = fixtures_dir(&args.job);
    let catalogue = Catalogue::open(&config.data_dir).context("opening the bases")?;
    if let Some(fixtures) = &fixtures {
        prepare_base(&catalogue, &job, fixtures).await?;
        prepare_source(&store, &job, fixtures).await?;
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
    let ctx = RunContext {
        stop,
        logs,
        redelivered: false,
        delivery: Delivery::ONCE,
        worker: WorkerInfo {
            id: format!("replay@{}", host.trim()),
            version: env!("CARGO_PKG_VERSION").to_string(),
        },
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
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        summarise(&result);
    }
    Ok(exit::for_status(result.status))
}

/// `fixtures/` when the job file sits in `fixtures/jobs/` (or any `jobs/` beside `bases/`
/// and `bundles/`).
fn fixtures_dir(job_file: &Path) -> Option<PathBuf> {
    let dir = std::fs::canonicalize(job_file)
        .ok()?
        .parent()?
        .parent()?
        .to_path_buf();
    (dir.join("bundles").is_dir() || dir.join("bases").is_dir()).then_some(dir)
}

async fn prepare_base(catalogue: &Catalogue, job: &Job, fixtures: &Path) -> anyhow::Result<()> {
    match catalogue.get(&job.base) {
        Ok(_) => return Ok(()),
        Err(BaseError::Unknown { .. }) => {}
        Err(err) => return Err(err.into()),
    }
    let recipe_path = fixtures.join("bases").join(format!("{}.json", job.base));
    if !recipe_path.is_file() {
        return Ok(()); // The run answers with the typed unknown-base error.
    }
    let recipe = Recipe::load(&recipe_path)?;
    eprintln!(
        "corral: base {} is missing; creating it from {} (once; about 1 to 3 minutes)",
        job.base,
        recipe_path.display()
    );
    let (catalogue, name) = (catalogue.clone(), job.base.clone());
    tokio::task::spawn_blocking(move || {
        super::base::build_with_progress(&catalogue, &name, &recipe, IfExists::Keep)
    })
    .await??;
    Ok(())
}

/// Finds the fixture bundle whose deterministic packing has the job's source digest and
/// pushes it, when the store lacks it.
async fn prepare_source(store: &Store, job: &Job, fixtures: &Path) -> anyhow::Result<()> {
    let digest = &job.source.digest;
    if store.has_blob(digest).await? {
        return Ok(());
    }
    let bundles = fixtures.join("bundles");
    let Ok(entries) = std::fs::read_dir(&bundles) else {
        return Ok(());
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let setup = fixtures.parent().map(|repo| repo.join("scripts/fixtures"));
    if let Some(setup) = setup.filter(|s| s.is_file()) {
        eprintln!(
            "corral: source {digest} is not in the store; preparing the fixture bundles ({})",
            setup.display()
        );
        let status = tokio::process::Command::new(&setup).status().await?;
        anyhow::ensure!(status.success(), "{} failed", setup.display());
    }
    for dir in dirs {
        let (file, packed) = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || super::source::pack_dir(&dir)).await??
        };
        if &packed != digest {
            continue;
        }
        super::source::put_bundle(store, file, digest).await?;
        eprintln!(
            "corral: pushed fixture bundle {} as {digest}",
            dir.display()
        );
        return Ok(());
    }
    Ok(())
}

fn summarise(result: &JobResult) {
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
    println!("{out}");
}
