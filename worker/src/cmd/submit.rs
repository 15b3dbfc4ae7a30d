//! `corral submit JOB.json [--wait]`: publish a job to the config's job exchange (routing key = its
//! pool) with publisher confirms; with `--wait`, receive its result on an exclusive reply
//! queue (AMQP `reply_to`, correlation id = job id) and print it.

use anyhow::{Context, bail};
use corral_protocol::JobResult;
use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ConnectionProperties};

use crate::amqp::AmqpError;
use crate::cli::SubmitArgs;
use crate::config::Sources;
use crate::exit;

pub fn run(args: SubmitArgs) -> anyhow::Result<u8> {
    let bytes = super::read_input(&args.job)?;
    let mut job = match corral_protocol::decode_job(&bytes) {
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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        if let Some(dir) = &args.source {
            let store = crate::job::open_store(&config)
                .await
                .with_context(|| format!("opening the store {}", config.store.url))?;
            let (digest, size) = super::source::push_dir(&store, dir).await?;
            eprintln!("corral: source {} uploaded as {digest}", dir.display());
            job.source = corral_protocol::SourceRef { digest, size: Some(size) };
        }
        let (conn, _) = crate::amqp::connect_any(
            &config.amqp.connection_uris(),
            &ConnectionProperties::default(),
        )
        .await?;
        let ch = conn.create_channel().await.map_err(AmqpError::Channel)?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(AmqpError::Channel)?;
        let id = job.job_id.to_string();
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(id.as_str().into())
            .with_correlation_id(id.as_str().into());
        let mut replies = None;
        if args.wait {
            let queue = ch
                .queue_declare("".into(), QueueDeclareOptions::exclusive().auto_delete(), FieldTable::default())
                .await
                .map_err(AmqpError::Channel)?;
            props = props.with_reply_to(queue.name().clone());
            let consumer = ch
                .basic_consume(
                    queue.name().clone(),
                    "".into(),
                    BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
                    FieldTable::default(),
                )
                .await
                .map_err(AmqpError::Channel)?;
            replies = Some(consumer);
        }
        job.submitted_at_ms.get_or_insert_with(crate::amqp::now_ms);
        let body = serde_json::to_vec(&job).context("encoding the job")?;
        let exchange = config.amqp.jobs_exchange.clone();
        let confirm = ch
            .basic_publish(
                exchange.as_str().into(),
                job.pool.as_str().into(),
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                &body,
                props,
            )
            .await
            .context("publishing the job")?
            .await
            .context("waiting for the broker's confirm")?;
        if confirm.is_nack() {
            bail!("the broker refused the job (nack)");
        }
        if confirm.take_message().is_some() {
            eprintln!(
                "corral: no queue is bound for pool {:?} on {exchange:?}: start a worker of that pool first",
                job.pool.as_str()
            );
            return Ok(exit::PLATFORM_ERROR);
        }
        eprintln!("corral: submitted job {id} to pool {}", job.pool);
        let Some(mut replies) = replies else {
            return Ok(exit::SUCCESS);
        };
        let wait = async {
            while let Some(delivery) = replies.next().await {
                let delivery = delivery.context("receiving the result")?;
                let Ok(result) = corral_protocol::decode::<JobResult>(&delivery.data) else {
                    continue;
                };
                if result.job_id == job.job_id {
                    return Ok(Some(result));
                }
            }
            anyhow::Ok(None)
        };
        let result = match tokio::time::timeout(args.timeout, wait).await {
            Ok(Ok(Some(result))) => result,
            Ok(Ok(None)) => bail!("the reply queue was closed before the result came"),
            Ok(Err(err)) => return Err(err),
            Err(_) => {
                eprintln!("corral: no result for job {id} within {:?}", args.timeout);
                return Ok(exit::PLATFORM_ERROR);
            }
        };
        crate::outln!("{}", serde_json::to_string(&result)?)?;
        let _ = conn.close(200, "done".into()).await;
        Ok(exit::for_status(result.status))
    })
}
