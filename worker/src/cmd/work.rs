//! `corral work`: the production entry point. Consumes the pool's job queue until SIGTERM
//! or SIGINT, then drains; a second signal stops running builds at once (they are requeued).

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::amqp::{ProcessRunner, Worker};
use crate::cli::{RunnerKind, WorkArgs};
use crate::exit;

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
            RunnerKind::Process => {
                tracing::warn!("runner `process`: jobs run WITHOUT a sandbox (tests only)");
                let worker = Worker::new(args.amqp, ProcessRunner::from_env())?;
                worker.run(drain, kill).await?;
            }
        }
        Ok(exit::SUCCESS)
    })
}
