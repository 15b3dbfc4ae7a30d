//! `corral work`: the production entry point. Consumes the pool's job queue until SIGTERM
//! or SIGINT, then drains; a second signal stops running builds at once (they are requeued).
//! Every job runs in the sandbox: there is no other runner in this binary.

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::amqp::{AmqpSettings, Worker};
use crate::cli::{GlobalArgs, WorkArgs};
use crate::config::Sources;
use crate::exit;
use crate::job::{self, Sandboxed, Settings};
use crate::metrics::Metrics;

/// Older workers took `CORRAL_RUNNER=process` to run jobs outside the sandbox. A unit file
/// that still sets it expects something this binary no longer does: refuse to start rather
/// than guess.
pub const RETIRED_RUNNER_VAR: &str = "CORRAL_RUNNER";

pub fn run(args: WorkArgs, global: &GlobalArgs) -> anyhow::Result<u8> {
    if let Some(code) = refuse_retired_runner() {
        return Ok(code);
    }
    // Every setting, the broker's and the log's included, comes from the one layered config.
    let mut flags = global.config_flags();
    flags.extend(args.flags.values());
    let sources = Sources::from_process(args.config.clone(), flags);
    let loaded = match super::check_config::load(&sources) {
        Ok(loaded) => loaded,
        Err(code) => return Ok(code),
    };
    crate::logging::install(loaded.config.log.format, global.verbose);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let (drain, kill) = on_signals()?;
        for warning in &loaded.warnings {
            tracing::warn!("config: {warning}");
        }
        let config = loaded.config;
        // The same checks as `corral doctor`: refuse to start on a host that cannot build.
        if let Err(failures) = crate::doctor::preflight(&config).await {
            tracing::error!("refusing to start: this host failed checks:\n{failures}");
            return Ok(exit::PLATFORM_ERROR);
        }
        let amqp = AmqpSettings::from_config(&config);
        let metrics = Arc::new(Metrics::new());
        if let Some(addr) = config.metrics.listen {
            let listener = crate::metrics::bind(addr)
                .await
                .with_context(|| format!("binding the metrics listener {addr}"))?;
            let stop = kill.clone();
            tokio::spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
                async move {
                    stop.cancelled().await;
                },
            ));
        }
        let store = job::open_store(&config)
            .await
            .context("opening the store")?;
        let settings = Settings::from_config(&config).context("setting up the sandbox")?;
        let runner =
            Sandboxed::open(settings, store, metrics.clone()).context("opening the data dir")?;
        if let Some(warning) = crate::datadisk::warning(&config.data_dir) {
            tracing::warn!("{warning}");
        }
        let worker = Worker::with_metrics(amqp, runner, metrics)?;
        worker.run(drain, kill).await?;
        Ok(exit::SUCCESS)
    })
}
/// Exit [`exit::USAGE`] (after saying why) when [`RETIRED_RUNNER_VAR`] is set; `corral
/// check-config` refuses the environment `corral work` would refuse.
pub fn refuse_retired_runner() -> Option<u8> {
    let value = std::env::var_os(RETIRED_RUNNER_VAR)?;
    eprintln!(
        "corral: {RETIRED_RUNNER_VAR}={} is set, but `corral work` runs every job in the \
         sandbox and has no other runner; remove {RETIRED_RUNNER_VAR} from the worker's \
         environment",
        value.to_string_lossy()
    );
    Some(exit::USAGE)
}

/// Tokens fired by the first SIGTERM or SIGINT (drain) and the second (stop builds now).
/// Installed before anything else, so an early signal drains instead of killing. Needs a
/// tokio runtime.
pub fn on_signals() -> anyhow::Result<(CancellationToken, CancellationToken)> {
    let drain = CancellationToken::new();
    let kill = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    {
        let (drain, kill) = (drain.clone(), kill.clone());
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                seen += 1;
                if seen == 1 {
                    tracing::info!("signal: draining (a second signal stops builds now)");
                    drain.cancel();
                } else {
                    tracing::warn!("second signal: stopping builds now");
                    kill.cancel();
                }
            }
        });
    }
    Ok((drain, kill))
}
