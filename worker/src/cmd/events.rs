//! `corral events [--follow] [--kind K] [--project P] [--json]`: the workers' events as an
//! operator sees them. A queue of its own (server-named, exclusive, auto-deleted) is bound
//! to the events exchange with one topic pattern per kind asked for
//! (`*.<kind>.<project>`, `#` for everything), so the broker does the filtering.

use anyhow::Context;
use corral_protocol::{Event, EventKind};
use futures_lite::StreamExt;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{ConnectionProperties, ExchangeKind};

use crate::amqp::AmqpError;
use crate::cli::EventsArgs;
use crate::config::Sources;
use crate::events::human;
use crate::exit;

/// The topic patterns that select `kinds` (all when empty) of `project` (any when none):
/// routing keys are `<severity>.<kind>.<project>`.
pub fn patterns(kinds: &[EventKind], project: Option<&str>) -> Vec<String> {
    let project = project.unwrap_or("*");
    if kinds.is_empty() {
        return vec![format!("*.*.{project}")];
    }
    let mut out: Vec<String> = kinds
        .iter()
        .map(|kind| format!("*.{}.{project}", kind.as_str()))
        .collect();
    out.sort();
    out.dedup();
    out
}

pub fn run(args: EventsArgs) -> anyhow::Result<u8> {
    let sources = Sources::from_process(args.config.clone(), args.config_flags());
    let config = match super::check_config::load(&sources) {
        Ok(loaded) => loaded.config,
        Err(code) => return Ok(code),
    };
    let (urls, exchange) = (
        config.amqp.connection_uris(),
        config.amqp.events_exchange.clone(),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(follow(args, urls, exchange))
}

async fn follow(args: EventsArgs, urls: Vec<String>, exchange: String) -> anyhow::Result<u8> {
    let (conn, node) = crate::amqp::connect_any(&urls, &ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await.map_err(AmqpError::Channel)?;
    // Passive: a mistyped prefix or config must not leave a durable exchange behind.
    if let Err(err) = ch
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
    {
        eprintln!(
            "corral: the events exchange {exchange} is not on the broker at {} ({err}): \
             no worker with this prefix or config has started there yet",
            node
        );
        return Ok(exit::PLATFORM_ERROR);
    }
    let queue = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions::exclusive().auto_delete(),
            FieldTable::default(),
        )
        .await
        .map_err(AmqpError::Channel)?;
    let project = args.project.as_ref().map(|p| p.as_str());
    for pattern in patterns(&args.kind, project) {
        ch.queue_bind(
            queue.name().clone(),
            exchange.as_str().into(),
            pattern.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| AmqpError::Declare {
            what: format!("the binding {pattern} to {exchange}"),
            source,
        })?;
    }
    let mut deliveries = crate::amqp::consume_unacked(&ch, &queue).await?;
    eprintln!(
        "corral: following {exchange} at {}{}",
        node,
        if args.follow {
            String::new()
        } else {
            format!(" for {:?}", args.wait)
        }
    );
    let until = async {
        if args.follow {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r,
                _ = term.recv() => Ok(()),
            }
        } else {
            tokio::time::sleep(args.wait).await;
            Ok(())
        }
    };
    tokio::pin!(until);
    loop {
        let delivery = tokio::select! {
            r = &mut until => {
                r.context("waiting for a signal")?;
                break;
            }
            next = deliveries.next() => next,
        };
        let Some(delivery) = delivery else {
            eprintln!("corral: the broker cancelled the subscription");
            return Ok(exit::PLATFORM_ERROR);
        };
        let delivery = delivery.context("receiving events")?;
        let event = match corral_protocol::decode::<Event>(&delivery.data) {
            Ok(event) => event,
            Err(err) => {
                eprintln!(
                    "corral: skipping a message on {exchange} that is not a corral event: {err}"
                );
                continue;
            }
        };
        let line = if args.json {
            serde_json::to_string(&event)?
        } else {
            human::line(&event)
        };
        // A closed pipe (`| head`) ends the command quietly (exit 141), its queue with it.
        if let Err(err) = crate::outln!("{line}") {
            let _ = conn.close(200, "stdout closed".into()).await;
            return Err(err);
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(exit::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_select_kinds_and_projects_on_the_routing_key() {
        assert_eq!(patterns(&[], None), ["*.*.*"]);
        assert_eq!(patterns(&[], Some("acme")), ["*.*.acme"]);
        assert_eq!(
            patterns(
                &[EventKind::Oom, EventKind::LogFlood, EventKind::Oom],
                Some("acme")
            ),
            ["*.log_flood.acme", "*.oom.acme"]
        );
    }
}
