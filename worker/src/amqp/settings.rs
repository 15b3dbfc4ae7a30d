//! [`AmqpSettings`]: what the AMQP worker needs to know about the broker and its own
//! capacity, derived from the one [`Config`] (defaults, file, environment and flags are
//! layered there; nothing here has a default of its own).

use std::time::Duration;

use corral_protocol::PoolName;

use crate::config::Config;

/// Broker and capacity settings of a worker.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    /// Broker URI, password included: never log it (see [`redact`]). The first of
    /// `amqp_urls`.
    pub amqp_url: String,
    /// Every node of the broker cluster, the first one first: a worker rotates through them
    /// when it cannot connect or loses its connection.
    pub amqp_urls: Vec<String>,
    pub pool: PoolName,
    /// Builds (with their snapshots) run at once: the worker's build slots.
    pub concurrency: u16,
    /// Deliveries held at once (at least `concurrency`): a job leaves its build slot once
    /// its layers are made and stays held, storing its image and publishing its result,
    /// until it is acked; the next delivery takes the slot meanwhile.
    pub prefetch: u16,
    /// On SIGTERM, how long running builds may finish before they are cancelled and requeued.
    pub drain_deadline: Duration,
    /// `x-delivery-limit` of the job queue; also when a platform failure stops being retried.
    pub delivery_limit: u32,
    /// How long the broker lets this worker hold a delivery (its `consumer_timeout`).
    pub lease: Duration,
    /// A job whose wall limit plus this exceeds the lease is refused up front.
    pub lease_margin: Duration,
    pub heartbeat: u16,
    /// How long publishing waits while the broker has blocked the connection.
    pub blocked_wait: Duration,
    /// How long a Cancel for a job not running here is remembered.
    pub cancel_memory: Duration,
    /// How long a worker holding no job waits for a delivery before it consumes afresh.
    pub consumer_refresh: Duration,
    /// Longest pause between reconnect attempts and platform-failure retries.
    pub backoff_max: Duration,
    pub worker_id: String,
    pub names: Names,
}

impl AmqpSettings {
    pub fn from_config(config: &Config) -> AmqpSettings {
        let a = &config.amqp;
        AmqpSettings {
            amqp_url: a.connection_uri(),
            amqp_urls: a.connection_uris(),
            pool: a.pool.clone(),
            concurrency: config.concurrency,
            prefetch: a.prefetch,
            drain_deadline: config.drain_deadline,
            delivery_limit: a.delivery_limit,
            lease: a.lease,
            lease_margin: a.lease_margin,
            // Range-checked to 5..=60 by the config.
            heartbeat: u16::try_from(a.heartbeat.as_secs()).unwrap_or(u16::MAX),
            blocked_wait: a.blocked_wait,
            cancel_memory: a.cancel_memory,
            consumer_refresh: a.consumer_refresh,
            backoff_max: a.reconnect_max,
            worker_id: config.worker.id.clone(),
            names: Names {
                jobs_exchange: a.jobs_exchange.clone(),
                jobs_queue: a.jobs_queue.clone(),
                dead_exchange: a.dead_letter_exchange.clone(),
                dead_queue: a.dead_letter_queue.clone(),
                results: a.results_exchange.clone(),
                events: a.events_exchange.clone(),
                logs: a.logs_exchange.clone(),
                control: a.control_exchange.clone(),
            },
        }
    }

    pub fn names(&self) -> Names {
        self.names.clone()
    }

    pub fn worker_id(&self) -> String {
        self.worker_id.clone()
    }

    /// The broker URI with the heartbeat and a connection timeout set.
    pub fn uri(&self) -> Result<lapin::uri::AMQPUri, super::AmqpError> {
        self.uri_of(&self.amqp_url)
    }

    /// The URI of every broker node, in the configured order, each with the heartbeat and a
    /// connection timeout set.
    pub fn uris(&self) -> Result<Vec<Node>, super::AmqpError> {
        let urls = if self.amqp_urls.is_empty() {
            std::slice::from_ref(&self.amqp_url)
        } else {
            &self.amqp_urls[..]
        };
        urls.iter()
            .map(|url| {
                Ok(Node {
                    uri: self.uri_of(url)?,
                    name: redact(url),
                })
            })
            .collect()
    }

    fn uri_of(&self, url: &str) -> Result<lapin::uri::AMQPUri, super::AmqpError> {
        node_uri(url, self.heartbeat)
    }
}

/// A node's URI as the worker connects to it: its heartbeat, a connect timeout and
/// [`FRAME_MAX`] unless the URL sets them.
fn node_uri(url: &str, heartbeat: u16) -> Result<lapin::uri::AMQPUri, super::AmqpError> {
    let mut uri: lapin::uri::AMQPUri = url.parse().map_err(|reason| super::AmqpError::Url {
        url: redact(url),
        reason,
    })?;
    uri.query.heartbeat = Some(heartbeat);
    if uri.query.connection_timeout.is_none() {
        uri.query.connection_timeout = Some(10_000);
    }
    if uri.query.frame_max.is_none() {
        uri.query.frame_max = Some(FRAME_MAX);
    }
    Ok(uri)
}

/// The largest AMQP frame a worker's connections negotiate, unless the URL says
/// `frame_max`. lapin keeps a receive and a send buffer of 32 frames per connection, all of
/// it touched over time: at RabbitMQ's default of 128 KiB that is 16 MiB resident for the
/// worker's two connections, idle or not. Messages larger than a frame (a 64 KiB log chunk
/// as JSON) simply go in several frames.
pub const FRAME_MAX: u32 = 16 * 1024;

/// One node of the broker cluster: its URI (password included) and its redacted URL for
/// logs.
#[derive(Debug, Clone)]
pub struct Node {
    pub uri: lapin::uri::AMQPUri,
    pub name: String,
}

/// The nodes of a broker cluster and the one in use: a connection goes to the current node;
/// a failure to connect, or a lost connection, moves to the next one, so a worker whose
/// node died reaches a live one at its next attempt instead of retrying the dead one.
#[derive(Debug)]
pub struct Nodes {
    nodes: Vec<Node>,
    current: std::sync::atomic::AtomicUsize,
}

impl Nodes {
    /// `nodes` must not be empty.
    pub fn new(nodes: Vec<Node>) -> Self {
        assert!(!nodes.is_empty(), "at least one broker node");
        Nodes {
            nodes,
            current: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The node to connect to now, and its position in the list.
    pub fn current(&self) -> (usize, &Node) {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed) % self.nodes.len();
        (i, &self.nodes[i])
    }

    /// Gives up on node `failed` (if it is still the current one) and moves to the next.
    pub fn failed(&self, failed: usize) {
        let next = (failed + 1) % self.nodes.len();
        let _ = self.current.compare_exchange(
            failed,
            next,
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Node `i` of the list (wrapping).
    pub fn get(&self, i: usize) -> &Node {
        &self.nodes[i % self.nodes.len()]
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// Parses `90`, `90s`, `500ms`, `5m`, `2h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m or 500ms"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Ok(d)
}

/// Exchange and queue names of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub jobs_exchange: String,
    pub jobs_queue: String,
    pub dead_exchange: String,
    pub dead_queue: String,
    pub results: String,
    pub events: String,
    pub logs: String,
    pub control: String,
}

impl Names {
    /// The second queue on the dead-letter exchange: what the broker dead-lettered without
    /// an answer, for the workers (`amqp/dead.rs`).
    pub fn dead_unanswered(&self) -> String {
        format!("{}.unanswered", self.dead_queue)
    }

    pub fn new(prefix: &str, pool: &PoolName) -> Self {
        Names {
            jobs_exchange: format!("{prefix}.jobs"),
            jobs_queue: format!("{prefix}.jobs.{pool}"),
            dead_exchange: format!("{prefix}.dead"),
            dead_queue: format!("{prefix}.jobs.dead"),
            results: format!("{prefix}.results"),
            events: format!("{prefix}.events"),
            logs: format!("{prefix}.logs"),
            control: format!("{prefix}.control"),
        }
    }
}

/// The URL without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("5 weeks").is_err());
    }

    fn node(name: &str) -> Node {
        Node {
            uri: format!("amqp://{name}").parse().unwrap(),
            name: name.into(),
        }
    }

    #[test]
    fn nodes_rotate_past_the_one_that_failed() {
        let nodes = Nodes::new(vec![node("a"), node("b"), node("c")]);
        assert_eq!(nodes.current().1.name, "a");
        nodes.failed(0);
        assert_eq!(nodes.current().1.name, "b");
        // A second report of the same failure (publisher and consumer both saw node a go)
        // does not skip node b.
        nodes.failed(0);
        assert_eq!(nodes.current().1.name, "b");
        nodes.failed(1);
        nodes.failed(2);
        assert_eq!(nodes.current().1.name, "a");
    }

    #[test]
    fn frames_are_small_unless_the_url_says_otherwise() {
        let uri = node_uri("amqp://guest:guest@host/%2f", 15).unwrap();
        assert_eq!(uri.query.frame_max, Some(FRAME_MAX));
        assert_eq!(uri.query.heartbeat, Some(15));
        let uri = node_uri("amqp://host/%2f?frame_max=131072", 15).unwrap();
        assert_eq!(uri.query.frame_max, Some(131_072));
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host"), "amqp://host");
    }
}
