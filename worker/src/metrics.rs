//! Prometheus metrics and the health endpoints. Libraries and the pipeline update
//! [`Metrics`]; only `corral work` serves them, on the address the config names.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `corral_jobs_total` | counter | `status`, `reason` |
//! | `corral_build_seconds`, `corral_snapshot_seconds`, `corral_upload_seconds` | histogram | |
//! | `corral_uploaded_bytes_total`, `corral_deduplicated_bytes_total` | counter | |
//! | `corral_cache_hits_total` | counter | |
//! | `corral_job_dir_takes_total` | counter | `outcome` (`ready`: from the pool, `made`: formatted on the spot) |
//! | `corral_builds_in_flight`, `corral_free_slots` | gauge | |
//! | `corral_broker_connected` | gauge (0/1) | |
//! | `corral_broker_reconnects_total` | counter | |
//! | `corral_alerts_total` | counter | `kind`: alerts sent (lifecycle events left out) |
//! | `corral_events_total` | counter | `kind`: every event sent, alerts and lifecycle |
//! | `corral_events_dropped_total` | counter | `kind`: held back by a job's rate limit, or lost because the publisher's queue was full |

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    status: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobDirLabels {
    outcome: &'static str,
}

/// Every metric the worker exports, plus the readiness state behind `/readyz`.
pub struct Metrics {
    registry: Registry,
    jobs: Family<JobLabels, Counter>,
    alerts: Family<AlertLabels, Counter>,
    events: Family<AlertLabels, Counter>,
    events_dropped: Family<AlertLabels, Counter>,
    job_dir_takes: Family<JobDirLabels, Counter>,
    pub build_seconds: Histogram,
    pub snapshot_seconds: Histogram,
    pub upload_seconds: Histogram,
    pub uploaded_bytes: Counter,
    pub deduplicated_bytes: Counter,
    pub cache_hits: Counter,
    pub in_flight: Gauge,
    pub free_slots: Gauge,
    pub broker_connected: Gauge,
    pub reconnects: Counter,
    connected: AtomicBool,
    consuming: AtomicBool,
    draining: AtomicBool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // 10 ms to ~45 min: trivial builds and long pip installs both land in a bucket.
        let durations = || Histogram::new(exponential_buckets(0.01, 2.5, 14));
        let mut registry = Registry::with_prefix("corral");
        let metrics = Metrics {
            jobs: Family::default(),
            alerts: Family::default(),
            events: Family::default(),
            events_dropped: Family::default(),
            job_dir_takes: Family::default(),
            build_seconds: durations(),
            snapshot_seconds: durations(),
            upload_seconds: durations(),
            uploaded_bytes: Counter::default(),
            deduplicated_bytes: Counter::default(),
            cache_hits: Counter::default(),
            in_flight: Gauge::default(),
            free_slots: Gauge::default(),
            broker_connected: Gauge::default(),
            reconnects: Counter::default(),
            connected: AtomicBool::new(false),
            consuming: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            registry: Registry::default(),
        };
        registry.register(
            "jobs",
            "Jobs finished, by status and reason",
            metrics.jobs.clone(),
        );
        registry.register(
            "alerts",
            "Operator alerts raised, by kind",
            metrics.alerts.clone(),
        );
        registry.register(
            "events",
            "Events sent (alerts and lifecycle), by kind",
            metrics.events.clone(),
        );
        registry.register(
            "events_dropped",
            "Events not sent: held back by a job's rate limit or a full publisher queue, by kind",
            metrics.events_dropped.clone(),
        );
        registry.register(
            "job_dir_takes",
            "Job filesystems taken: ready from the pool, or made on the spot",
            metrics.job_dir_takes.clone(),
        );
        registry.register(
            "build_seconds",
            "Wall time of sandboxed builds",
            metrics.build_seconds.clone(),
        );
        registry.register(
            "snapshot_seconds",
            "Time to snapshot an upper dir into a layer",
            metrics.snapshot_seconds.clone(),
        );
        registry.register(
            "upload_seconds",
            "Time to store a build's image",
            metrics.upload_seconds.clone(),
        );
        registry.register(
            "uploaded_bytes",
            "Blob bytes written to the store",
            metrics.uploaded_bytes.clone(),
        );
        registry.register(
            "deduplicated_bytes",
            "Blob bytes not written because the store had them",
            metrics.deduplicated_bytes.clone(),
        );
        registry.register(
            "cache_hits",
            "Jobs answered from the action cache",
            metrics.cache_hits.clone(),
        );
        registry.register(
            "builds_in_flight",
            "Build slots held now: builds and their snapshots",
            metrics.in_flight.clone(),
        );
        registry.register(
            "free_slots",
            "Build slots free for new jobs",
            metrics.free_slots.clone(),
        );
        registry.register(
            "broker_connected",
            "1 while connected to the broker",
            metrics.broker_connected.clone(),
        );
        registry.register(
            "broker_reconnects",
            "Reconnections to the broker",
            metrics.reconnects.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Counts a finished job. `reason` is empty for successes.
    pub fn job_finished(&self, status: &str, reason: &str) {
        let labels = JobLabels {
            status: status.to_string(),
            reason: reason.to_string(),
        };
        self.jobs.get_or_create(&labels).inc();
    }

    pub fn alert(&self, kind: &str) {
        self.alerts
            .get_or_create(&AlertLabels {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Counts an event sent to the sinks; `alert` counts it as an alert too.
    pub fn event_sent(&self, kind: &str, alert: bool) {
        let labels = AlertLabels {
            kind: kind.to_string(),
        };
        self.events.get_or_create(&labels).inc();
        if alert {
            self.alerts.get_or_create(&labels).inc();
        }
    }

    /// Counts an event that was not sent.
    pub fn event_dropped(&self, kind: &str) {
        self.events_dropped
            .get_or_create(&AlertLabels {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Counts a job filesystem taken for a build: `ready` from the pool or not.
    pub fn job_dir_taken(&self, ready: bool) {
        let outcome = if ready { "ready" } else { "made" };
        self.job_dir_takes
            .get_or_create(&JobDirLabels { outcome })
            .inc();
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::SeqCst);
        self.broker_connected.set(i64::from(connected));
    }

    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::SeqCst);
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::SeqCst);
    }

    /// Ready means: connected, consuming, and not draining.
    pub fn is_ready(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
            && self.consuming.load(Ordering::SeqCst)
            && !self.draining.load(Ordering::SeqCst)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the metrics listener (so a bad address fails at start-up, not later).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn render(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
}

async fn ready(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let metrics = Arc::new(Metrics::new());
        metrics.job_finished("succeeded", "");
        metrics.job_finished("succeeded", "");
        metrics.job_finished("killed", "oom");
        metrics.alert("oom");
        metrics.event_sent("job_started", false);
        metrics.event_dropped("seccomp_denied");
        metrics.job_dir_taken(true);
        metrics.job_dir_taken(true);
        metrics.job_dir_taken(false);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, metrics.clone(), async move {
            let _ = stopped.await;
        }));

        let text = get(addr, "/metrics").await;
        assert!(
            text.contains(r#"corral_jobs_total{status="succeeded",reason=""} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"corral_jobs_total{status="killed",reason="oom"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"corral_alerts_total{kind="oom"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"corral_events_total{kind="job_started"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"corral_events_dropped_total{kind="seccomp_denied"} 1"#),
            "{text}"
        );
        assert!(text.contains("corral_build_seconds_bucket"), "{text}");
        assert!(
            text.contains(r#"corral_job_dir_takes_total{outcome="ready"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"corral_job_dir_takes_total{outcome="made"} 1"#),
            "{text}"
        );

        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        metrics.set_connected(true);
        metrics.set_consuming(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        metrics.set_draining(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
