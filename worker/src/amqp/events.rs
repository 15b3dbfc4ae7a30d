//! [`EventQueue`]: the broker sink of events. A job's events are queued, never awaited, and
//! one task publishes them in order on `<prefix>.events` under
//! `<severity>.<kind>.<project>`, so an event never delays a build or an ack, and a job's
//! `job_started` reaches the broker before its `job_finished`. The task does not wait for
//! each confirm before the next event: up to [`WINDOW`] are in flight, settled in order (see
//! [`super::ordered`]; after a broker failure an event may come twice).
//!
//! The queue is bounded: past [`CAPACITY`] waiting events (a broker blocked for long), new
//! ones are dropped and counted in `corral_events_dropped_total` rather than held in memory
//! without end. Per-job rate limits keep this far from happening.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use corral_protocol::Event;
use lapin::BasicProperties;
use tokio::sync::{mpsc, oneshot};

use super::ordered::{Message, Ordered};
use super::publisher::Publisher;
use crate::events::EventSink;
use crate::metrics::Metrics;

/// Events waiting for the publisher before new ones are dropped.
pub const CAPACITY: usize = 4096;
/// Events published and not yet confirmed, at most.
const WINDOW: usize = 64;
/// Attempts per event before it is given up.
const ATTEMPTS: u32 = 3;

enum Item {
    Event(Box<Event>),
    /// Answered once everything queued before it was published (or given up).
    Flush(oneshot::Sender<()>),
}

/// The sending side; clones share the queue.
#[derive(Clone)]
pub struct EventQueue {
    tx: mpsc::Sender<Item>,
    rx: Arc<Mutex<Option<mpsc::Receiver<Item>>>>,
    metrics: Arc<Metrics>,
}

impl EventQueue {
    /// A queue whose publishing task starts with [`EventQueue::start`].
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(CAPACITY);
        EventQueue {
            tx,
            rx: Arc::new(Mutex::new(Some(rx))),
            metrics,
        }
    }

    /// Starts the task that publishes the queue to `exchange` (once; later calls do
    /// nothing). Needs a tokio runtime.
    pub fn start(&self, publisher: Arc<Publisher>, exchange: String) {
        let Some(mut rx) = self
            .rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        tokio::spawn(async move {
            let mut out = Ordered::new(publisher, WINDOW, ATTEMPTS, Duration::from_millis(200));
            loop {
                let item = tokio::select! {
                    item = rx.recv() => item,
                    () = out.ready() => {
                        gave_up(out.settle().await);
                        continue;
                    }
                };
                match item {
                    Some(Item::Event(event)) => gave_up(out.push(message(&exchange, &event)).await),
                    Some(Item::Flush(done)) => {
                        gave_up(out.finish().await);
                        let _ = done.send(());
                    }
                    None => break,
                }
            }
            gave_up(out.finish().await);
        });
    }

    /// Waits until every event queued so far is published (or given up), at most `limit`.
    pub async fn flush(&self, limit: Duration) {
        let (done, flushed) = oneshot::channel();
        if self.tx.try_send(Item::Flush(done)).is_ok() {
            let _ = tokio::time::timeout(limit, flushed).await;
        }
    }
}

impl EventSink for EventQueue {
    fn send(&self, event: &Event) {
        if self
            .tx
            .try_send(Item::Event(Box::new(event.clone())))
            .is_err()
        {
            self.metrics.event_dropped(event.kind.as_str());
            tracing::warn!(
                kind = event.kind.as_str(),
                "event queue full: event dropped"
            );
        }
    }
}

fn message(exchange: &str, event: &Event) -> Message {
    Message {
        exchange: exchange.to_owned(),
        key: event.routing_key(),
        body: serde_json::to_vec(event).unwrap_or_default(),
        props: BasicProperties::default()
            .with_content_type("application/json".into())
            .with_type("corral.event.v1".into()),
    }
}

fn gave_up(events: Vec<super::ordered::GaveUp>) {
    for event in events {
        tracing::warn!(key = event.message.key, error = %event.error, "event not published");
    }
}

#[cfg(test)]
mod tests {
    use corral_protocol::{EventKind, Severity};

    use super::*;
    use crate::events::alerts;

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let metrics = Arc::new(Metrics::new());
        let queue = EventQueue::new(metrics.clone());
        let event = alerts::event(
            EventKind::WorkerStarted,
            Severity::Info,
            None,
            None,
            "w1",
            "started",
        );
        // Nothing publishes (the task is not started): the queue fills, then drops.
        for _ in 0..CAPACITY + 5 {
            queue.send(&event);
        }
        let text = metrics.render();
        assert!(
            text.contains(r#"corral_events_dropped_total{kind="worker_started"} 5"#),
            "{text}"
        );
    }
}
