//! [`AmqpSettings`]: what `corral work` needs to know about the broker and its own capacity,
//! from flags with `CORRAL_*` environment fallbacks (the config file fills the same struct).

use std::time::Duration;

use corral_protocol::PoolName;

/// Broker and capacity settings of a worker. Defaults follow `ARCHITECTURE.md`.
#[derive(Debug, Clone, clap::Args)]
pub struct AmqpSettings {
    /// Broker URL. A `heartbeat` query parameter, when absent, is set from `--heartbeat`.
    #[arg(
        long,
        env = "CORRAL_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Worker pool: the routing key on the job exchange and the suffix of the job queue.
    #[arg(long, env = "CORRAL_POOL", default_value = "default", value_parser = parse_pool)]
    pub pool: PoolName,
    /// Builds run at once; also the prefetch count, so the broker never hands this worker
    /// more jobs than it has free slots.
    #[arg(long, env = "CORRAL_CONCURRENCY", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// On SIGTERM, how long running builds may finish before they are cancelled and requeued.
    #[arg(long, env = "CORRAL_DRAIN_DEADLINE", default_value = "5m", value_parser = parse_duration)]
    pub drain_deadline: Duration,
    /// `x-delivery-limit` of the job queue: deliveries after the first before a job is
    /// dead-lettered. Also when a platform failure stops being retried.
    #[arg(long, env = "CORRAL_DELIVERY_LIMIT", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub delivery_limit: u32,
    /// How long the broker lets this worker hold a delivery (its `consumer_timeout`). A job
    /// whose wall limit plus a margin for fetch and upload exceeds it is refused up front.
    #[arg(long, env = "CORRAL_LEASE", default_value = "30m", value_parser = parse_duration)]
    pub lease: Duration,
    /// AMQP heartbeat, 10 to 20 seconds: dead connections are noticed within two of these.
    #[arg(long, env = "CORRAL_HEARTBEAT", default_value_t = 15, value_parser = clap::value_parser!(u16).range(10..=20))]
    pub heartbeat: u16,
    /// Prefix of every exchange and queue name (`<prefix>.jobs`, `<prefix>.jobs.<pool>`…).
    #[arg(long, env = "CORRAL_AMQP_PREFIX", default_value = "corral")]
    pub prefix: String,
    /// How long publishing waits while the broker has blocked the connection (resource
    /// alarm) before the attempt counts as failed and is retried.
    #[arg(long, env = "CORRAL_BLOCKED_WAIT", default_value = "5m", value_parser = parse_duration)]
    pub blocked_wait: Duration,
    /// How long a Cancel for a job this worker is not running is remembered, so the job is
    /// answered `cancelled` if it is delivered here later.
    #[arg(long, env = "CORRAL_CANCEL_MEMORY", default_value = "1h", value_parser = parse_duration)]
    pub cancel_memory: Duration,
    /// Longest pause between reconnect attempts and platform-failure retries.
    #[arg(long, env = "CORRAL_BACKOFF_MAX", default_value = "30s", value_parser = parse_duration)]
    pub backoff_max: Duration,
    /// This worker's id in results and events. Default: `<hostname>-<pid>`.
    #[arg(long, env = "CORRAL_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Exchange and queue names set one by one (from the config file) instead of from
    /// `prefix`.
    #[arg(skip)]
    pub names_override: Option<Names>,
}

fn parse_pool(s: &str) -> Result<PoolName, String> {
    PoolName::new(s).map_err(|e| e.to_string())
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

impl AmqpSettings {
    pub fn names(&self) -> Names {
        self.names_override
            .clone()
            .unwrap_or_else(|| Names::new(&self.prefix, &self.pool))
    }

    /// The settings a config file gives (it names every exchange and queue itself).
    pub fn from_config(config: &crate::config::Config, base: AmqpSettings) -> AmqpSettings {
        let a = &config.amqp;
        AmqpSettings {
            amqp_url: a.connection_uri(),
            pool: a.pool.clone(),
            concurrency: config.concurrency,
            drain_deadline: config.drain_deadline,
            delivery_limit: a.delivery_limit,
            lease: a.lease,
            heartbeat: u16::try_from(a.heartbeat.as_secs()).unwrap_or(15),
            backoff_max: a.reconnect_max,
            worker_id: Some(config.worker.id.clone()),
            names_override: Some(Names {
                jobs_exchange: a.jobs_exchange.clone(),
                jobs_queue: a.jobs_queue.clone(),
                dead_exchange: a.dead_letter_exchange.clone(),
                dead_queue: a.dead_letter_queue.clone(),
                results: a.results_exchange.clone(),
                events: a.events_exchange.clone(),
                logs: a.logs_exchange.clone(),
                control: a.control_exchange.clone(),
            }),
            ..base
        }
    }

    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "worker".into());
            format!("{host}-{}", std::process::id())
        })
    }

    /// The broker URI with the heartbeat set (unless the URL sets its own).
    pub fn uri(&self) -> Result<lapin::uri::AMQPUri, super::AmqpError> {
        let mut uri: lapin::uri::AMQPUri =
            self.amqp_url
                .parse()
                .map_err(|reason| super::AmqpError::Url {
                    url: redact(&self.amqp_url),
                    reason,
                })?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(self.heartbeat);
        }
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout = Some(10_000);
        }
        Ok(uri)
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

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host"), "amqp://host");
    }
}
