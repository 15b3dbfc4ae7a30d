//! The AMQP worker: topology, the consumer that turns deliveries into builds, the confirming
//! publisher of results, events and log chunks, cancels, reconnects and drain.
//!
//! The build itself is behind [`crate::job::Runner`] and what happens to a delivery is
//! [`crate::job::verdict`]'s decision: this module owns the I/O between the broker and a
//! runner (decode, run, publish, then ack, requeue or reject as the verdict says), and
//! nothing about sandboxes or stores.
//!
//! Delivery guarantees, in short: a job is acked only after its final result is confirmed by
//! the broker; a job whose delivery died (connection or channel lost, consumer timeout) is
//! stopped and left to the broker to redeliver; invalid input and final platform failures are
//! dead-lettered after their `rejected` / `error` result is published.

mod control;
mod dead;
mod events;
mod logs;
mod ordered;
mod publisher;
mod settings;
mod topology;
mod worker;

pub use control::Flights;
pub use events::EventQueue;
pub use logs::LogPump;
pub use publisher::{Pending, PublishError, Publisher};
pub use settings::{AmqpSettings, Names, Node, Nodes, parse_duration, redact};
pub use topology::declare;
pub use worker::{Worker, WorkerExit};

/// Failures of the AMQP layer that end a session (the worker reconnects) or the command.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("connecting to the broker at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
    },
    #[error("invalid broker URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("declaring {what}: {source}")]
    Declare {
        what: String,
        #[source]
        source: lapin::Error,
    },
    #[error("opening a channel: {0}")]
    Channel(#[source] lapin::Error),
    #[error("starting to consume {queue}: {source}")]
    Consume {
        queue: String,
        #[source]
        source: lapin::Error,
    },
}

pub use crate::job::now_ms;

/// Connects to the first node of `uris` (a broker cluster's, in order) that answers: what a
/// one-shot command (`corral submit`, `corral events`) needs to work while a node is down.
/// Fails with the last node's error when none answers. Returns the connection and the
/// node's URL without its password.
pub async fn connect_any(
    uris: &[String],
    props: &lapin::ConnectionProperties,
) -> Result<(lapin::Connection, String), AmqpError> {
    let mut last = None;
    for uri in uris {
        match lapin::Connection::connect(uri, props.clone()).await {
            Ok(conn) => return Ok((conn, redact(uri))),
            Err(source) => {
                tracing::warn!(node = %redact(uri), error = %source, "broker node unreachable; trying the next");
                last = Some(AmqpError::Connect {
                    url: redact(uri),
                    source,
                });
            }
        }
    }
    Err(last.unwrap_or_else(|| AmqpError::Url {
        url: String::new(),
        reason: "no broker URL".into(),
    }))
}

/// Consumes `queue` without acks (an exclusive, auto-delete queue whose messages are only
/// looked at: cancels, events), naming the queue when the broker refuses.
pub async fn consume_unacked(
    channel: &lapin::Channel,
    queue: &lapin::Queue,
) -> Result<lapin::Consumer, AmqpError> {
    channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..lapin::options::BasicConsumeOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .map_err(|source| AmqpError::Consume {
            queue: queue.name().to_string(),
            source,
        })
}
