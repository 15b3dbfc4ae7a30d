//! The command line as the highest layer of the config: each flag names one key, and
//! `--set KEY=VALUE` reaches any key, after every other flag. Values stay text until the
//! loader types and validates them, so a bad flag is reported like a bad file entry: by key,
//! naming the flag.

use std::path::PathBuf;
use std::time::Duration;

/// One key set on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagValue {
    /// The dotted key.
    pub key: String,
    /// The value as text, or why the flag's text is not one.
    pub value: Result<String, String>,
    /// The flag as typed (`--lease`, `--set amqp.pool`), shown as the value's origin.
    pub flag: String,
}

impl FlagValue {
    pub fn new(key: &str, value: impl Into<String>, flag: &str) -> FlagValue {
        FlagValue {
            key: key.to_string(),
            value: Ok(value.into()),
            flag: flag.to_string(),
        }
    }

    /// A duration flag (`90`, `90s`, `5m`, `2h`) for a key counted in whole seconds.
    pub fn seconds(key: &str, text: &str, flag: &str) -> FlagValue {
        let value = crate::amqp::parse_duration(text).and_then(|d| whole_seconds(d, text));
        FlagValue {
            key: key.to_string(),
            value,
            flag: flag.to_string(),
        }
    }

    /// `--set KEY=VALUE`.
    pub fn set(item: &str) -> FlagValue {
        match item.split_once('=') {
            Some((key, value)) => {
                FlagValue::new(key.trim(), value, &format!("--set {}", key.trim()))
            }
            None => FlagValue {
                key: item.trim().to_string(),
                value: Err(format!("--set {item:?} is not KEY=VALUE")),
                flag: format!("--set {}", item.trim()),
            },
        }
    }
}

fn whole_seconds(d: Duration, text: &str) -> Result<String, String> {
    if d.subsec_nanos() != 0 {
        return Err(format!("{text:?} is not a whole number of seconds"));
    }
    Ok(d.as_secs().to_string())
}

/// The flags of `corral work` (and `corral check-config`, which checks what `work` would run
/// with). Each sets the config key named in its help; the environment variable of that key
/// is `CORRAL_` and the key in capitals, `.` as `_`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WorkerFlags {
    /// Set any config key, e.g. `--set amqp.pool=gpu` (repeatable; applied after every other
    /// flag).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// `worker.instance`: the instance name (the systemd template unit passes `%i`); names
    /// the worker `<hostname>-<instance>` and its scratch dir `<data_dir>/<instance>`.
    #[arg(long, value_name = "NAME")]
    pub instance: Option<String>,
    /// `worker.id`: this worker's id in results, events and consumer tags.
    #[arg(long, value_name = "ID")]
    pub worker_id: Option<String>,
    /// `data_dir`: bases, the local store, caches and job dirs.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// `concurrency`: builds run at once; also one less than the number of job filesystems
    /// kept ready, and than the AMQP prefetch unless `amqp.prefetch` is set.
    #[arg(long, value_name = "N")]
    pub concurrency: Option<String>,
    /// `drain_deadline_seconds`: on SIGTERM, how long running builds may finish before they
    /// are cancelled and requeued (`90`, `90s`, `5m`).
    #[arg(long, value_name = "DURATION")]
    pub drain_deadline: Option<String>,
    /// `amqp.url`: the broker. A password in it is taken as `amqp.password`.
    #[arg(long, value_name = "URL")]
    pub amqp_url: Option<String>,
    /// `amqp.pool`: the routing key on the job exchange and the suffix of the job queue.
    #[arg(long, value_name = "POOL")]
    pub pool: Option<String>,
    /// `amqp.prefix`: prefix of every exchange and queue name (`<prefix>.jobs`, …).
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// `amqp.delivery_limit`: deliveries after the first before a job is dead-lettered.
    #[arg(long, value_name = "N")]
    pub delivery_limit: Option<String>,
    /// `amqp.lease_seconds`: how long the broker lets this worker hold a delivery (its
    /// `consumer_timeout`), e.g. `30m`.
    #[arg(long, value_name = "DURATION")]
    pub lease: Option<String>,
    /// `amqp.lease_margin_seconds`: kept after a job's wall limit for snapshot, upload and
    /// result; a job whose wall limit plus this exceeds the lease is refused.
    #[arg(long, value_name = "DURATION")]
    pub lease_margin: Option<String>,
    /// `amqp.heartbeat_seconds`: AMQP heartbeat.
    #[arg(long, value_name = "DURATION")]
    pub heartbeat: Option<String>,
    /// `amqp.blocked_wait_seconds`: how long publishing waits while the broker blocks the
    /// connection (resource alarm) before the attempt fails and is retried.
    #[arg(long, value_name = "DURATION")]
    pub blocked_wait: Option<String>,
    /// `amqp.cancel_memory_seconds`: how long a Cancel for a job not running here is
    /// remembered.
    #[arg(long, value_name = "DURATION")]
    pub cancel_memory: Option<String>,
    /// `amqp.consumer_refresh_seconds`: how long a worker holding no job waits for a
    /// delivery before it consumes afresh on a new channel.
    #[arg(long, value_name = "DURATION")]
    pub consumer_refresh: Option<String>,
    /// `amqp.reconnect_max_seconds`: longest pause between reconnect attempts and
    /// platform-failure retries.
    #[arg(long, value_name = "DURATION")]
    pub backoff_max: Option<String>,
    /// `metrics.listen`: Prometheus listener address (empty: off).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

impl WorkerFlags {
    /// The keys these flags set, in order: named flags, then `--set`.
    pub fn values(&self) -> Vec<FlagValue> {
        let mut out = Vec::new();
        let plain = [
            ("worker.instance", &self.instance, "--instance"),
            ("worker.id", &self.worker_id, "--worker-id"),
            ("concurrency", &self.concurrency, "--concurrency"),
            ("amqp.url", &self.amqp_url, "--amqp-url"),
            ("amqp.pool", &self.pool, "--pool"),
            ("amqp.prefix", &self.prefix, "--prefix"),
            (
                "amqp.delivery_limit",
                &self.delivery_limit,
                "--delivery-limit",
            ),
            ("metrics.listen", &self.metrics_listen, "--metrics-listen"),
        ];
        for (key, value, flag) in plain {
            if let Some(value) = value {
                out.push(FlagValue::new(key, value.as_str(), flag));
            }
        }
        if let Some(dir) = &self.data_dir {
            out.push(FlagValue::new(
                "data_dir",
                dir.display().to_string(),
                "--data-dir",
            ));
        }
        let durations = [
            (
                "drain_deadline_seconds",
                &self.drain_deadline,
                "--drain-deadline",
            ),
            ("amqp.lease_seconds", &self.lease, "--lease"),
            (
                "amqp.lease_margin_seconds",
                &self.lease_margin,
                "--lease-margin",
            ),
            ("amqp.heartbeat_seconds", &self.heartbeat, "--heartbeat"),
            (
                "amqp.blocked_wait_seconds",
                &self.blocked_wait,
                "--blocked-wait",
            ),
            (
                "amqp.cancel_memory_seconds",
                &self.cancel_memory,
                "--cancel-memory",
            ),
            (
                "amqp.consumer_refresh_seconds",
                &self.consumer_refresh,
                "--consumer-refresh",
            ),
            (
                "amqp.reconnect_max_seconds",
                &self.backoff_max,
                "--backoff-max",
            ),
        ];
        for (key, value, flag) in durations {
            if let Some(text) = value {
                out.push(FlagValue::seconds(key, text, flag));
            }
        }
        out.extend(self.set.iter().map(|item| FlagValue::set(item)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_become_whole_seconds() {
        assert_eq!(
            FlagValue::seconds("amqp.lease_seconds", "30m", "--lease").value,
            Ok("1800".into())
        );
        assert_eq!(
            FlagValue::seconds("amqp.heartbeat_seconds", "15", "--heartbeat").value,
            Ok("15".into())
        );
        assert!(
            FlagValue::seconds("amqp.lease_seconds", "1500ms", "--lease")
                .value
                .is_err()
        );
        assert!(
            FlagValue::seconds("amqp.lease_seconds", "soon", "--lease")
                .value
                .is_err()
        );
    }

    #[test]
    fn set_comes_last_and_needs_an_equals_sign() {
        let flags = WorkerFlags {
            set: vec!["concurrency=9".into(), "amqp.pool".into()],
            concurrency: Some("3".into()),
            ..WorkerFlags::default()
        };
        let values = flags.values();
        assert_eq!(
            values[0],
            FlagValue::new("concurrency", "3", "--concurrency")
        );
        assert_eq!(
            values[1],
            FlagValue::new("concurrency", "9", "--set concurrency")
        );
        assert!(values[2].value.is_err());
    }
}
