//! [`Worker`]: the consumer side. One session per broker connection: declare the topology,
//! set the prefetch, consume the pool's queue and the worker's control queue, run each
//! delivery through a [`Runner`] once it has one of the `concurrency` build slots, publish
//! its result on the publisher's own connection, and ack only once the broker confirmed the
//! result. A job gives its slot back when its build and snapshots are over, so the prefetch
//! (`concurrency` + 1 by default) lets the next job build while one stores its image and
//! publishes its result. A lost session stops the builds whose deliveries died and
//! reconnects with capped, jittered backoff.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use corral_protocol::{
    Cancel, EventKind, Job, JobId, JobResult, Limits, ProjectId, Severity, Status, WorkerInfo,
};
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::control::Flights;
use super::events::EventQueue;
use super::logs::LogPump;
use super::publisher::{PublishError, Publisher};
use super::settings::{AmqpSettings, Names, Nodes};
use super::{AmqpError, now_ms};
use crate::backoff::Backoff;
use crate::events::{EventSink, JobEvents, alerts};
use crate::job::{self, Action, Ending, Facts, RunContext, Runner, Stop, Verdict};

/// Log output buffered between a build and its log pump before the build waits.
const LOG_QUEUE: usize = 64;

/// While a worker that is consuming afresh waits for deliveries that reached its cancelled
/// consumer to be answered, how often it looks.
const RECONSUME_CHECK: Duration = Duration::from_secs(1);

/// A deadline that does not come: a feed with no consumer has nothing to refresh.
const NEVER: Duration = Duration::from_secs(365 * 86_400);
/// How long the worker waits for the broker's answer to a cancel or a close it sends on
/// its way to something else (consuming afresh, draining): a node that stopped answering
/// must not hold the worker's loop. A consumer whose cancel went unanswered goes when its
/// channel is closed.
const BROKER_ANSWER: Duration = Duration::from_secs(10);

/// Which queue a [`Feed`] consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FeedKind {
    /// The pool's job queue, prefetch = `amqp.prefetch`.
    Jobs,
    /// What the broker dead-lettered without an answer (`amqp/dead.rs`), one at a time.
    Unanswered,
}

/// A consumer on a channel of its own, made afresh when idle ([`Worker::refresh`]).
struct Feed {
    kind: FeedKind,
    ch: lapin::Channel,
    /// `None` while paused, or when the queue cannot be consumed.
    consumer: Option<lapin::Consumer>,
    /// Deliveries of this feed still being handled.
    held: TaskTracker,
    generation: u64,
    /// When to look at the feed again: `consumer_refresh` after its last delivery.
    due: tokio::time::Instant,
    /// Cancelled while deliveries were on their way: consume again once they are answered.
    paused: bool,
}

/// How the worker stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// Drained: every build finished or was requeued, connections closed cleanly.
    Drained,
}

pub struct Worker<R: Runner> {
    settings: AmqpSettings,
    names: Names,
    /// The broker cluster's nodes: each session connects to the current one.
    nodes: Arc<Nodes>,
    info: WorkerInfo,
    runner: Arc<R>,
    /// The build slots: `concurrency` permits.
    slots: Arc<Semaphore>,
    publisher: Arc<Publisher>,
    flights: Flights,
    tracker: TaskTracker,
    draining: CancellationToken,
    metrics: Arc<crate::metrics::Metrics>,
    /// Events on their way to the events exchange, off every job's critical path.
    events: EventQueue,
    /// The drain deadline passed or a second signal came: stop waiting to publish results
    /// and hand the jobs back.
    abandon: CancellationToken,
}

/// Whether the job's delivery was a redelivery: the broker's flag and the quorum queue's
/// `x-delivery-count`, repeated on the result as headers (`corral-redelivered`,
/// `corral-delivery-count`) so a consumer can tell a duplicate result of a job whose ack
/// was lost (identical to the first, by determinism) from a second job.
#[derive(Debug, Clone, Copy)]
struct Redelivery {
    redelivered: bool,
    count: u32,
}

impl Redelivery {
    /// A job that went round the dead-letter queue (`amqp/dead.rs`) is redelivered too.
    fn of(d: &Delivery) -> Self {
        Redelivery {
            redelivered: d.redelivered || super::dead::rounds(d.properties.headers().as_ref()) > 0,
            count: delivery_count(&d.properties),
        }
    }

    fn headers(self) -> FieldTable {
        let mut headers = FieldTable::default();
        headers.insert(
            "corral-redelivered".into(),
            AMQPValue::Boolean(self.redelivered || self.count > 0),
        );
        headers.insert(
            "corral-delivery-count".into(),
            AMQPValue::LongLongInt(i64::from(self.count)),
        );
        headers
    }
}

/// The next delivery of a consumer that may be absent (never, then).
async fn next_of(
    consumer: &mut Option<lapin::Consumer>,
) -> Option<<lapin::Consumer as futures_lite::Stream>::Item> {
    match consumer {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

/// A delivery's place in the line for a build slot.
type SlotQueue = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// Joins the line for a build slot as the delivery arrives. Handlers run concurrently; the
/// semaphore serves its line first come, first served, so jobs start in the order the
/// broker delivered them.
fn queue_for_slot(slots: &Arc<Semaphore>) -> SlotQueue {
    let mut acquire: SlotQueue = Box::pin(slots.clone().acquire_owned());
    // The first poll takes a free slot or joins the line; later polls (by the handler)
    // keep the place.
    match acquire
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(permit) => Box::pin(std::future::ready(permit)),
        Poll::Pending => acquire,
    }
}

/// A build slot held: counted in the metrics until given back.
struct Held {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Held {
    fn new(permit: OwnedSemaphorePermit, metrics: Arc<crate::metrics::Metrics>) -> Self {
        metrics.in_flight.inc();
        metrics.free_slots.dec();
        Held {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        self.metrics.free_slots.inc();
    }
}

enum SessionEnd {
    Drained,
    Lost(String),
}

fn delivery_count(props: &BasicProperties) -> u32 {
    let Some(value) = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count"))
    else {
        return 0;
    };
    let n: i64 = match value {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => *v,
        _ => 0,
    };
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

impl<R: Runner> Worker<R> {
    pub fn new(settings: AmqpSettings, runner: R) -> Result<Arc<Self>, AmqpError> {
        Self::with_metrics(settings, runner, Arc::new(crate::metrics::Metrics::new()))
    }

    /// A worker that keeps `metrics` current (slots, connection, readiness, alerts).
    pub fn with_metrics(
        settings: AmqpSettings,
        runner: R,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Arc<Self>, AmqpError> {
        metrics.free_slots.set(i64::from(settings.concurrency));
        let nodes = Arc::new(Nodes::new(settings.uris()?));
        let id = settings.worker_id();
        let publisher = Publisher::new(
            nodes.clone(),
            format!("corral {id} publisher"),
            settings.blocked_wait,
        );
        Ok(Arc::new(Worker {
            names: settings.names(),
            nodes,
            info: WorkerInfo {
                id,
                version: env!("CARGO_PKG_VERSION").into(),
            },
            runner: Arc::new(runner),
            slots: Arc::new(Semaphore::new(usize::from(settings.concurrency))),
            publisher: Arc::new(publisher),
            flights: Flights::default(),
            tracker: TaskTracker::new(),
            draining: CancellationToken::new(),
            events: EventQueue::new(metrics.clone()),
            metrics,
            abandon: CancellationToken::new(),
            settings,
        }))
    }

    /// Runs until `drain` fires and the drain is over. `kill` (a second signal) cuts the
    /// drain short: running builds are stopped at once and requeued.
    pub async fn run(
        self: Arc<Self>,
        drain: CancellationToken,
        kill: CancellationToken,
    ) -> Result<WorkerExit, AmqpError> {
        tracing::info!(
            brokers = self.nodes.len(),
            queue = %self.names.jobs_queue,
            concurrency = self.settings.concurrency,
            prefetch = self.settings.prefetch,
            worker = %self.info.id,
            "worker starting"
        );
        self.events
            .start(self.publisher.clone(), self.names.events.clone());
        let mut backoff = Backoff::new(Duration::from_millis(200), self.settings.backoff_max);
        let mut session = 0u64;
        loop {
            if drain.is_cancelled() {
                break;
            }
            session += 1;
            let lost = CancellationToken::new();
            let (node, _) = self.nodes.current();
            let end = self
                .clone()
                .session(session, node, &drain, &kill, &lost, &mut backoff)
                .await;
            lost.cancel();
            self.metrics.set_consuming(false);
            self.metrics.set_connected(false);
            match end {
                Ok(SessionEnd::Drained) => break,
                Ok(SessionEnd::Lost(why)) => {
                    tracing::warn!(session, reason = %why, "broker session lost; stopping its builds")
                }
                Err(err) => tracing::warn!(session, error = %err, "broker session failed"),
            }
            // The next attempt goes to the next node of the cluster: the one just lost may
            // be down, partitioned away or restarting.
            self.nodes.failed(node);
            // Their deliveries died with the session: the broker hands them out again.
            self.flights.stop_all(Some(session), Stop::Lost);
            let delay = backoff.next_delay();
            tracing::info!(?delay, "reconnecting");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = drain.cancelled() => break,
            }
        }
        self.draining.cancel();
        // Builds of a lost session may still be stopping.
        self.tracker.close();
        tokio::select! {
            () = self.tracker.wait() => {}
            () = kill.cancelled() => {
                self.flights.stop_all(None, Stop::Drain);
                self.abandon.cancel();
            }
        }
        self.tracker.wait().await;
        let stopped = alerts::event(
            EventKind::WorkerStopped,
            Severity::Info,
            None,
            None,
            &self.info.id,
            format!("worker {} stopped", self.info.id),
        );
        self.emit(stopped);
        self.events.flush(Duration::from_secs(5)).await;
        self.publisher.close().await;
        tracing::info!("worker stopped");
        Ok(WorkerExit::Drained)
    }

    async fn session(
        self: Arc<Self>,
        session: u64,
        node: usize,
        drain: &CancellationToken,
        kill: &CancellationToken,
        lost: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<SessionEnd, AmqpError> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("corral {} consumer", self.info.id).into());
        let broker = self.nodes.get(node).clone();
        tracing::info!(session, node = %broker.name, "connecting to the broker");
        let conn = Connection::connect_uri(broker.uri.clone(), props)
            .await
            .map_err(|source| AmqpError::Connect {
                url: broker.name.clone(),
                source,
            })?;
        super::topology::declare(
            &conn,
            &self.names,
            self.settings.pool.as_str(),
            self.settings.delivery_limit,
        )
        .await?;
        let mut jobs = self.open_feed(&conn, FeedKind::Jobs, session, 0).await?;
        // systemd's Type=notify: ready means consuming (repeated after a reconnect, harmless).
        crate::notify::notify(&format!(
            "READY=1\nSTATUS=consuming {}",
            self.names.jobs_queue
        ));
        let ctl = conn.create_channel().await.map_err(AmqpError::Channel)?;
        let ctl_queue = ctl
            .queue_declare(
                "".into(),
                QueueDeclareOptions::exclusive().auto_delete(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| AmqpError::Declare {
                what: "the control queue".into(),
                source,
            })?;
        ctl.queue_bind(
            ctl_queue.name().clone(),
            self.names.control.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| AmqpError::Declare {
            what: "the control binding".into(),
            source,
        })?;
        let mut cancels = super::consume_unacked(&ctl, &ctl_queue).await?;
        // What the broker dead-lettered without an answer; one at a time, acked when done.
        let mut unanswered = self
            .open_feed(&conn, FeedKind::Unanswered, session, 0)
            .await?;
        backoff.reset();
        tracing::info!(session, node = %broker.name, queue = %self.names.jobs_queue, "consuming");
        self.metrics.set_connected(true);
        self.metrics.set_consuming(true);
        if session == 1 {
            // Only now does the events exchange surely exist.
            self.emit(alerts::event(
                EventKind::WorkerStarted,
                Severity::Info,
                None,
                None,
                &self.info.id,
                format!(
                    "worker {} consuming {}",
                    self.info.id, self.names.jobs_queue
                ),
            ));
        }
        if session > 1 {
            self.metrics.reconnects.inc();
            self.emit(alerts::event(
                EventKind::BrokerReconnected,
                Severity::Warning,
                None,
                None,
                &self.info.id,
                format!("worker {} reconnected (session {session})", self.info.id),
            ));
        }
        let quiet = tokio::time::sleep_until(jobs.due.min(unanswered.due));
        tokio::pin!(quiet);
        loop {
            tokio::select! {
                biased;
                () = drain.cancelled() => break,
                () = &mut quiet => {
                    let now = tokio::time::Instant::now();
                    if jobs.due <= now {
                        self.refresh(&conn, &mut jobs, session, lost).await?;
                    }
                    if unanswered.due <= now {
                        self.refresh(&conn, &mut unanswered, session, lost).await?;
                    }
                    quiet.as_mut().reset(jobs.due.min(unanswered.due));
                }
                dead = next_of(&mut unanswered.consumer) => match dead {
                    Some(Ok(d)) => {
                        unanswered.due = tokio::time::Instant::now() + self.settings.consumer_refresh;
                        quiet.as_mut().reset(jobs.due.min(unanswered.due));
                        self.take(&unanswered, d, session, lost);
                    }
                    Some(Err(err)) => return Ok(SessionEnd::Lost(format!("dead-letter channel: {err}"))),
                    None => unanswered.consumer = None,
                },
                cancel = cancels.next() => match cancel {
                    Some(Ok(d)) => self.on_cancel(&d.data),
                    Some(Err(err)) => return Ok(SessionEnd::Lost(format!("control channel: {err}"))),
                    None => return Ok(SessionEnd::Lost("control consumer cancelled by the broker".into())),
                },
                delivery = next_of(&mut jobs.consumer) => match delivery {
                    Some(Ok(d)) => {
                        jobs.due = tokio::time::Instant::now() + self.settings.consumer_refresh;
                        quiet.as_mut().reset(jobs.due.min(unanswered.due));
                        self.take(&jobs, d, session, lost);
                    }
                    // A closed channel (consumer timeout: the lease is lost) or connection.
                    Some(Err(err)) => return Ok(SessionEnd::Lost(err.to_string())),
                    // The broker cancelled the consumer (queue deleted): start over, which
                    // redeclares the queue.
                    None => return Ok(SessionEnd::Lost("job consumer cancelled by the broker".into())),
                },
            }
        }
        // Drain: no new jobs; deliveries already pushed to us but not started are requeued
        // by the handler (it sees `draining`).
        tracing::info!(running = self.flights.running(), deadline = ?self.settings.drain_deadline, "draining");
        self.draining.cancel();
        self.metrics.set_draining(true);
        self.emit(alerts::event(
            EventKind::WorkerDraining,
            Severity::Info,
            None,
            None,
            &self.info.id,
            format!("worker {} draining", self.info.id),
        ));
        self.stop_consuming(&mut jobs, session, lost).await;
        self.tracker.close();
        let deadline = tokio::time::sleep(self.settings.drain_deadline);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = self.tracker.wait() => break,
                () = &mut deadline => {
                    tracing::warn!(running = self.flights.running(), "drain deadline passed; cancelling builds (they are requeued)");
                    self.flights.stop_all(None, Stop::Drain);
                    self.abandon.cancel();
                    self.tracker.wait().await;
                    break;
                }
                () = kill.cancelled() => {
                    tracing::warn!(running = self.flights.running(), "second signal: stopping builds now (they are requeued)");
                    self.flights.stop_all(None, Stop::Drain);
                    self.abandon.cancel();
                    self.tracker.wait().await;
                    break;
                }
                cancel = cancels.next() => if let Some(Ok(d)) = cancel { self.on_cancel(&d.data) },
            }
        }
        let _ = tokio::time::timeout(BROKER_ANSWER, ctl.close(200, "draining done".into())).await;
        let _ =
            tokio::time::timeout(BROKER_ANSWER, jobs.ch.close(200, "draining done".into())).await;
        let _ =
            tokio::time::timeout(BROKER_ANSWER, conn.close(200, "worker stopping".into())).await;
        Ok(SessionEnd::Drained)
    }

    /// A channel of its own consuming `kind`'s queue, tagged
    /// `<worker>.<session>.<generation>` (`.dead` for the unanswered dead letters).
    async fn open_feed(
        &self,
        conn: &Connection,
        kind: FeedKind,
        session: u64,
        generation: u64,
    ) -> Result<Feed, AmqpError> {
        let ch = conn.create_channel().await.map_err(AmqpError::Channel)?;
        let tag = format!("{}.{session}.{generation}", self.info.id);
        let consumer = match kind {
            FeedKind::Jobs => {
                // Prefetch before consuming: the broker must never push more jobs than the
                // worker means to hold.
                ch.basic_qos(self.settings.prefetch, BasicQosOptions::default())
                    .await
                    .map_err(AmqpError::Channel)?;
                let jobs = ch
                    .basic_consume(
                        self.names.jobs_queue.as_str().into(),
                        tag.into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|source| AmqpError::Consume {
                        queue: self.names.jobs_queue.clone(),
                        source,
                    })?;
                Some(jobs)
            }
            // A broker without the queue (its declaration warned) costs the worker nothing
            // else.
            FeedKind::Unanswered => match ch.basic_qos(1, BasicQosOptions::default()).await {
                Ok(()) => ch
                    .basic_consume(
                        self.names.dead_unanswered().as_str().into(),
                        format!("{tag}.dead").into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .inspect_err(|err| {
                        tracing::warn!(error = %err, "not consuming the unanswered dead-letter queue");
                    })
                    .ok(),
                Err(_) => None,
            },
        };
        let due = tokio::time::Instant::now()
            + if consumer.is_some() {
                self.settings.consumer_refresh
            } else {
                NEVER
            };
        Ok(Feed {
            kind,
            ch,
            consumer,
            held: TaskTracker::new(),
            generation,
            due,
            paused: false,
        })
    }

    /// Handles a delivery of `feed`, counted as held by it until answered.
    fn take(self: &Arc<Self>, feed: &Feed, d: Delivery, session: u64, lost: &CancellationToken) {
        let this = self.clone();
        let lost = lost.clone();
        match feed.kind {
            FeedKind::Jobs => {
                let slot = queue_for_slot(&self.slots);
                self.tracker.spawn(
                    feed.held
                        .track_future(async move { this.handle(d, session, lost, slot).await }),
                )
            }
            FeedKind::Unanswered => self.tracker.spawn(
                feed.held
                    .track_future(async move { this.handle_dead(d, lost).await }),
            ),
        };
    }

    /// Cancels the feed's consumer, then handles the deliveries that were on their way
    /// before the cancel (a draining worker's handler requeues jobs).
    async fn stop_consuming(
        self: &Arc<Self>,
        feed: &mut Feed,
        session: u64,
        lost: &CancellationToken,
    ) {
        let Some(mut consumer) = feed.consumer.take() else {
            return;
        };
        let _ = tokio::time::timeout(
            BROKER_ANSWER,
            feed.ch
                .basic_cancel(consumer.tag(), BasicCancelOptions::default()),
        )
        .await;
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
        {
            self.take(feed, d, session, lost);
        }
    }

    /// The feed's `due` passed. If it holds no delivery, it got none for `consumer_refresh`:
    /// cancel the consumer, close its channel and consume afresh on a new one. A quorum
    /// queue whose leader died may count deliveries the dead leader sent (and that never
    /// arrived) as held by this consumer until its channel closes; closing hands them back
    /// to the queue. A worker busy meanwhile does this once idle again, so such a job is
    /// delayed, never lost. (A safeguard: the fleet stalls first put down to this were
    /// results the broker nacked on and on, which the publisher now handles.)
    async fn refresh(
        self: &Arc<Self>,
        conn: &Connection,
        feed: &mut Feed,
        session: u64,
        lost: &CancellationToken,
    ) -> Result<(), AmqpError> {
        let now = tokio::time::Instant::now();
        if !feed.held.is_empty() {
            feed.due = now
                + if feed.paused {
                    RECONSUME_CHECK
                } else {
                    self.settings.consumer_refresh
                };
            return Ok(());
        }
        if feed.consumer.is_none() && !feed.paused {
            // Not consuming at all (no such queue, or the broker cancelled it).
            feed.due = now + NEVER;
            return Ok(());
        }
        self.stop_consuming(feed, session, lost).await;
        if !feed.held.is_empty() {
            // Deliveries came while cancelling. A new consumer would get prefetch credit of
            // its own beside them: consume again once they are answered.
            feed.paused = true;
            feed.due = now + RECONSUME_CHECK;
            return Ok(());
        }
        let _ = tokio::time::timeout(BROKER_ANSWER, feed.ch.close(200, "consuming afresh".into()))
            .await;
        *feed = self
            .open_feed(conn, feed.kind, session, feed.generation + 1)
            .await?;
        Ok(())
    }

    fn on_cancel(&self, data: &[u8]) {
        match corral_protocol::decode::<Cancel>(data) {
            Ok(cancel) => {
                let here = self.flights.cancel(
                    &cancel.job_id,
                    cancel.reason.clone(),
                    self.settings.cancel_memory,
                );
                tracing::info!(job = %cancel.job_id, running_here = here, "cancel received");
            }
            Err(err) => tracing::warn!(error = %err, "ignoring an invalid cancel message"),
        }
    }

    /// One delivery, from decode to ack. Never panics on input; every path acks, rejects,
    /// requeues, or (when the delivery died) leaves the job to the broker, as the verdict
    /// says.
    async fn handle(
        self: Arc<Self>,
        d: Delivery,
        session: u64,
        lost: CancellationToken,
        slot: SlotQueue,
    ) {
        let delivery = job::Delivery {
            count: delivery_count(&d.properties),
            limit: self.settings.delivery_limit,
            backoff_max: self.settings.backoff_max,
        };
        let prop_reply = d.properties.reply_to().as_ref().map(|s| s.to_string());
        let prop_corr = d
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.to_string());
        let job = match corral_protocol::decode_job_within(&d.data, &Limits::MAX) {
            Ok(job) => job,
            Err(err) => {
                let (job_id, project) = corral_protocol::recover_ids(&d.data);
                tracing::warn!(job = ?job_id, error = %err, "invalid job message: dead-lettering");
                if job_id.is_none() {
                    self.emit(alerts::event(
                        EventKind::InvalidJob,
                        Severity::Warning,
                        project.clone(),
                        None,
                        &self.info.id,
                        format!("unreadable job message dead-lettered: {err}"),
                    ));
                }
                let facts = Facts::unreadable(job_id, project, err, self.info.clone(), now_ms());
                let verdict = job::verdict(facts);
                if let Some(result) = &verdict.result {
                    for event in alerts::for_result(result, &self.info.id) {
                        self.emit(event);
                    }
                }
                return self
                    .execute(&d, None, verdict, prop_reply, prop_corr, &lost)
                    .await;
            }
        };
        tracing::info!(job = %job.job_id, session, redelivered = d.redelivered, "job received");
        let reply_to = job.reply_to.clone().or(prop_reply);
        let corr = job.correlation_id.clone().or(prop_corr);
        let before_start = |ending| {
            job::verdict(Facts {
                delivery,
                ..Facts::new(&job, ending, self.info.clone(), now_ms())
            })
        };
        let (lease, margin) = (self.settings.lease, self.settings.lease_margin);
        let lease_refused = job::spec::check_lease(&job, lease, margin).err();
        // In flight from here: a Cancel or a lost session reaches a job waiting for a slot.
        let (flight_id, flight) = self.flights.start(job.job_id.clone(), session);
        if lost.is_cancelled() {
            flight.stop.stop(Stop::Lost);
        }
        // A delivery beyond the build slots waits here for one.
        let permit = match lease_refused {
            None => tokio::select! {
                biased;
                () = flight.stop.stopped() => None,
                () = self.draining.cancelled() => None,
                permit = slot => permit.ok(),
            },
            Some(_) => None,
        };
        let unstarted = if let Some(err) = lease_refused {
            tracing::warn!(job = %job.job_id, error = %err, "job refused: wall limit above the lease");
            Some(before_start(Ending::Rejected(err)))
        } else if matches!(flight.stop.cause(), Some(Stop::Lost)) {
            self.flights.finish(flight_id);
            tracing::info!(job = %job.job_id, "its delivery died before the build started; the broker redelivers it");
            return;
        } else if matches!(flight.stop.cause(), Some(Stop::Cancel(_)))
            || self
                .flights
                .was_cancelled(&job.job_id, self.settings.cancel_memory)
        {
            Some(before_start(Ending::CancelledEarly))
        } else if self.draining.is_cancelled() || permit.is_none() {
            // Not started: hand it back for another worker, untouched.
            Some(before_start(Ending::NotStarted))
        } else {
            None
        };
        let (None, Some(permit)) = (unstarted.as_ref(), permit) else {
            self.flights.finish(flight_id);
            let verdict = unstarted.unwrap_or_else(|| before_start(Ending::NotStarted));
            let events = JobEvents::new(
                &job,
                &self.info.id,
                vec![Arc::new(self.events.clone())],
                Some(self.metrics.clone()),
            );
            events.finished(&verdict);
            return self
                .execute(&d, Some(&job), verdict, reply_to, corr, &lost)
                .await;
        };
        let slot = job::BuildSlot::holding(Held::new(permit, self.metrics.clone()));
        let events = JobEvents::new(
            &job,
            &self.info.id,
            vec![Arc::new(self.events.clone())],
            Some(self.metrics.clone()),
        );
        if d.redelivered || delivery.count > 0 {
            events.redelivered(delivery.count);
        }
        let (log_tx, log_rx) = mpsc::channel(LOG_QUEUE);
        let pump = LogPump {
            publisher: self.publisher.clone(),
            exchange: self.names.logs.clone(),
            job_id: job.job_id.clone(),
            project: job.project.clone(),
        };
        // The pump outlives the build: it says when the log's last chunk is on its way
        // (the result may follow it), then waits for the broker's confirms on its own.
        let (log_sent, log_out) = tokio::sync::oneshot::channel();
        let pump = self.tracker.spawn(pump.run(log_rx, log_sent));
        let ctx = RunContext {
            stop: flight.stop.clone(),
            logs: log_tx,
            redelivered: d.redelivered,
            delivery,
            worker: self.info.clone(),
            events,
            slot,
        };
        let verdict = job::run(&*self.runner, &job, ctx).await;
        let tally = log_out.await.unwrap_or_default();
        self.flights.finish(flight_id);
        tracing::debug!(job = %job.job_id, ?tally, "build ended");
        self.execute(&d, Some(&job), verdict, reply_to, corr, &lost)
            .await;
        // The ack is out (or the delivery handed back); the live log's confirms may still be
        // coming. Drain waits for them through the tracker.
        drop(pump);
    }

    /// A job the broker dead-lettered (see `amqp/dead.rs`): dropped when a worker answered
    /// it, sent round again, or answered `error` after the last round.
    async fn handle_dead(self: Arc<Self>, d: Delivery, lost: CancellationToken) {
        use super::dead::{Decision, ROUNDS, ROUNDS_HEADER, decide};
        let headers = d.properties.headers().as_ref();
        let (job_id, _) = corral_protocol::recover_ids(&d.data);
        match decide(headers, ROUNDS) {
            Decision::Answered => {
                let _ = d.acker.ack(BasicAckOptions::default()).await;
            }
            Decision::Retry { queue, round } => {
                tracing::warn!(job = ?job_id, queue, round, "the broker dead-lettered a job without an answer (its deliveries were lost with workers or connections): another round");
                let mut headers = headers.cloned().unwrap_or_default();
                headers.insert(ROUNDS_HEADER.into(), AMQPValue::LongUInt(round));
                let props = d.properties.clone().with_headers(headers);
                match self.publisher.publish("", &queue, &d.data, props).await {
                    Ok(()) => {
                        let _ = d.acker.ack(BasicAckOptions::default()).await;
                    }
                    Err(err) => {
                        tracing::warn!(job = ?job_id, error = %err, "could not send a dead-lettered job round again; it stays queued");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => self.requeue(&d, None).await,
                            () = lost.cancelled() => {}
                        }
                    }
                }
            }
            Decision::GiveUp { rounds, reason } => {
                let Ok(job) = corral_protocol::decode_job_within(&d.data, &Limits::MAX) else {
                    // Unreadable: it has no job to answer for (a worker would have said
                    // `rejected` where it had ids).
                    let _ = d.acker.ack(BasicAckOptions::default()).await;
                    return;
                };
                let ending = Ending::Failed(job::JobError::GivenUp { rounds, reason });
                let verdict = job::verdict(Facts::new(&job, ending, self.info.clone(), now_ms()));
                if let Some(result) = &verdict.result {
                    for event in alerts::for_result(result, &self.info.id) {
                        self.emit(event);
                    }
                }
                let reply_to = job
                    .reply_to
                    .clone()
                    .or_else(|| d.properties.reply_to().as_ref().map(|s| s.to_string()));
                let corr = job.correlation_id.clone().or_else(|| {
                    d.properties
                        .correlation_id()
                        .as_ref()
                        .map(|s| s.to_string())
                });
                // Its action is to dead-letter, which on this queue (no dead-letter exchange
                // of its own) drops it once the result is out.
                self.execute(&d, Some(&job), verdict, reply_to, corr, &lost)
                    .await;
            }
        }
    }

    /// Carries out a verdict: publishes its result (retried until confirmed, or until the
    /// delivery dies), then acks, dead-letters or requeues the delivery.
    async fn execute(
        &self,
        d: &Delivery,
        job: Option<&Job>,
        verdict: Verdict,
        reply_to: Option<String>,
        corr: Option<String>,
        lost: &CancellationToken,
    ) {
        let job_id = job.map(|job| &job.job_id);
        let Verdict { result, action } = verdict;
        match action {
            Action::Leave => {
                tracing::info!(job = ?job_id, "build stopped: its delivery died; the broker redelivers it");
                return;
            }
            Action::Requeue { after } => {
                if !after.is_zero() {
                    let delay = after.mul_f64(0.5 + fastrand::f64() / 2.0);
                    tracing::warn!(job = ?job_id, ?delay, "platform failure: retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = lost.cancelled() => return,
                        () = self.draining.cancelled() => {}
                    }
                }
                return self.requeue(d, job_id).await;
            }
            Action::Ack | Action::DeadLetter => {}
        }
        if let Some(mut result) = result {
            result.worker = self.info.clone();
            if let Some(job) = job
                && result.timings.queued_ms.is_none()
            {
                result.timings.queued_ms =
                    job.submitted_at_ms.map(|at| now_ms().saturating_sub(at));
            }
            let redelivery = Redelivery::of(d);
            if !self
                .publish_result(&result, reply_to.as_deref(), corr, redelivery, lost)
                .await
            {
                if !lost.is_cancelled() {
                    self.requeue(d, job_id).await;
                }
                return;
            }
            self.metrics.job_finished(
                &job::wire_name(result.status),
                &result.reason.map(job::wire_name).unwrap_or_default(),
            );
            if result.status == Status::Error {
                tracing::error!(job = %result.job_id, message = ?result.message, "platform failure is final: dead-lettering");
            }
        }
        match action {
            Action::DeadLetter => {
                let _ = d.acker.reject(BasicRejectOptions { requeue: false }).await;
            }
            _ => {
                if let Err(err) = d.acker.ack(BasicAckOptions::default()).await {
                    tracing::warn!(job = ?job_id, error = %err, "ack failed after the result was published; the broker will redeliver (identical result)");
                }
            }
        }
    }

    async fn requeue(&self, d: &Delivery, job_id: Option<&JobId>) {
        tracing::info!(job = ?job_id, "requeueing");
        let _ = d
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await;
    }

    /// Publishes a result to the results exchange (required: retried until confirmed, or
    /// until the job's delivery dies) and to `reply_to` (best effort: a producer that went
    /// away must not hold the job hostage). Returns whether the result is out.
    async fn publish_result(
        &self,
        result: &JobResult,
        reply_to: Option<&str>,
        corr: Option<String>,
        redelivery: Redelivery,
        lost: &CancellationToken,
    ) -> bool {
        let mut result = result.clone();
        result.correlation_id = corr;
        if result.finished_at_ms == 0 {
            result.finished_at_ms = now_ms();
        }
        let body = serde_json::to_vec(&result).unwrap_or_default();
        let id = result.job_id.as_str();
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_type("corral.result.v1".into())
            .with_message_id(id.into())
            .with_correlation_id(id.into())
            .with_timestamp(now_ms() / 1000)
            .with_headers(redelivery.headers());
        let project = result.project.as_ref().map_or("-", ProjectId::as_str);
        let key = format!("{project}.{id}");
        let mut backoff = Backoff::new(Duration::from_millis(100), self.settings.backoff_max);
        let mut replied = false;
        loop {
            // The result and the reply are in flight together, each on a channel of its own.
            let to_results =
                self.publisher
                    .publish(&self.names.results, &key, &body, props.clone());
            let to_reply = async {
                match reply_to {
                    Some(queue) if !replied => Some(
                        self.publisher
                            .publish("", queue, &body, props.clone())
                            .await,
                    ),
                    _ => None,
                }
            };
            let (to_results, to_reply) = tokio::join!(to_results, to_reply);
            // The reply queue counts as a route: a request/reply producer needs no binding
            // on the results exchange. A reply queue that is gone does not hold the job.
            match to_reply {
                Some(Ok(())) => replied = true,
                Some(Err(err)) => tracing::warn!(job = id, error = %err, "reply not published"),
                None => {}
            }
            match to_results {
                Ok(()) => break,
                Err(PublishError::Unroutable { .. }) if replied => break,
                Err(err) => {
                    tracing::error!(job = id, error = %err, "result not published; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                        () = lost.cancelled() => return false,
                        () = self.abandon.cancelled() => return false,
                    }
                }
            }
        }
        tracing::info!(job = id, status = ?result.status, "result published");
        true
    }

    /// A worker-level event (no job of its own): queued for the publisher, never awaited.
    fn emit(&self, event: corral_protocol::Event) {
        self.metrics
            .event_sent(event.kind.as_str(), !event.kind.is_lifecycle());
        self.events.send(&event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_count_reads_the_quorum_queue_header() {
        assert_eq!(delivery_count(&BasicProperties::default()), 0);
        for value in [
            AMQPValue::LongLongInt(3),
            AMQPValue::LongInt(3),
            AMQPValue::ShortShortUInt(3),
        ] {
            let mut headers = FieldTable::default();
            headers.insert("x-delivery-count".into(), value);
            let props = BasicProperties::default().with_headers(headers);
            assert_eq!(delivery_count(&props), 3);
        }
    }
}
