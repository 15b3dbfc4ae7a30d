//! `corral work`: the production entry point. Consumes the pool's job queue until SIGTERM
//! or SIGINT, then drains; a second signal stops running builds at once (they are requeued).

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::amqp::{AmqpSettings, ProcessRunner, Worker};
use crate::cli::{RunnerKind, WorkArgs};
use crate::config::{Config, ConfigFlags, Sources};
use crate::exit;
use crate::metrics::Metrics;
use crate::pipeline::{self, Pipeline, PipelineRunner, Settings};

pub fn run(args: WorkArgs) -> anyhow::Result<u8> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
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
        match args.runner {
            RunnerKind::Pipeline => {
                let sources = Sources::from_process(args.config.clone(), ConfigFlags::default());
                let loaded = Config::load(&sources).map_err(|e| anyhow::anyhow!("{e}"))?;
                for warning in &loaded.warnings {
                    tracing::warn!("config: {warning}");
                }
                let config = loaded.config;
                let amqp = match &args.config {
                    Some(_) => AmqpSettings::from_config(&config, args.amqp),
                    None => args.amqp,
                };
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
                let store = pipeline::open_store(&config)
                    .await
                    .context("opening the store")?;
                let settings = Settings::from_config(&config).context("setting up the sandbox")?;
                let pipeline = Arc::new(
                    Pipeline::open(settings, store, metrics.clone())
                        .context("opening the data dir")?,
                );
                if let Some(warning) = crate::datadisk::warning(&config.data_dir) {
                    tracing::warn!("{warning}");
                }
                let worker = Worker::with_metrics(amqp, PipelineRunner::new(pipeline), metrics)?;
                worker.run(drain, kill).await?;
            }
            RunnerKind::Process => {
                tracing::warn!("runner `process`: jobs run WITHOUT a sandbox (tests only)");
                let worker = Worker::new(args.amqp, ProcessRunner::from_env())?;
                worker.run(drain, kill).await?;
            }
        }
        Ok(exit::SUCCESS)
    })
}
