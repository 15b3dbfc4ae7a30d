//! The AMQP worker: topology, the consumer that turns deliveries into builds, the confirming
//! publisher of results, events and log chunks, cancels, reconnects and drain.
//!
//! The build itself is behind [`JobRunner`]: this module owns everything between the broker
//! and a runner, and nothing about sandboxes or stores.
//!
//! Delivery guarantees, in short: a job is acked only after its final result is confirmed by
//! the broker; a job whose delivery died (connection or channel lost, consumer timeout) is
//! stopped and left to the broker to redeliver; invalid input and final platform failures are
//! dead-lettered after their `rejected` / `error` result is published.

mod alerts;
mod backoff;
mod control;
mod logs;
mod publisher;
mod runner;
mod settings;
mod topology;
mod worker;

pub use backoff::Backoff;
pub use control::{Cause, Flights};
pub use logs::LogPump;
pub use publisher::{PublishError, Publisher};
pub use runner::{JobRunner, LogSink, ProcessRunner, RunContext, RunOutcome};
pub use settings::{AmqpSettings, Names, parse_duration, redact};
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

/// Milliseconds since the Unix epoch, as the wire messages carry time.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
