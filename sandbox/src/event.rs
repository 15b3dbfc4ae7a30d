//! What the sandbox saw a job do while it ran, as it happens: the kernel enforcing a limit
//! (an OOM kill, a refused fork) and the seccomp filter refusing a call. The job may well
//! survive each of these and exit 0; the [`crate::Outcome`] sums them up at the end.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// One observation, stamped when the supervisor saw it (within milliseconds of the
/// kernel's notification).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveEvent {
    /// Seconds since the Unix epoch, as a float in JSON.
    #[serde(with = "unix_secs")]
    pub at: SystemTime,
    #[serde(flatten)]
    pub kind: LiveEventKind,
}

/// What was seen. Counts are totals since the job started, so a later event of the same
/// kind supersedes an earlier one and a lost one loses no count. The first of each kind
/// (and of each syscall name or address family) is sent at once, later ones at most once
/// a second each, so a job looping on a refused call costs a second's worth of events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LiveEventKind {
    /// The memory controller killed a process of the job: the last one killed, as the
    /// kernel log names it, when it can be read (its pid is the host's, not the job's).
    Oom {
        oom_kills: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host_pid: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        comm: Option<String>,
    },
    /// The pids controller refused a fork or clone.
    PidsLimit { refused: u64, limit: Option<u64> },
    /// The seccomp filter refused a syscall (named as in
    /// [`crate::Outcome::denied_syscalls`]).
    SeccompDenied { syscall: String, count: u64 },
    /// A socket of a network family under [`crate::Network::None`].
    NetworkAttempt {
        syscall: String,
        family: String,
        count: u64,
    },
    /// The job used all the CPU its quota gives (`cpus`) for `seconds` on end, as a miner
    /// does. Once per job.
    CpuSaturated { cpus: f64, seconds: u64 },
    /// A filesystem the job writes to (`/`, its overlay's upper, or `/tmp`) is full: its
    /// writes fail with ENOSPC from now on. Once per filesystem.
    DiskLimit {
        mount: String,
        bytes_total: u64,
        bytes_available: u64,
    },
}

impl LiveEventKind {
    /// The name of the kind, as in JSON.
    pub fn name(&self) -> &'static str {
        match self {
            LiveEventKind::Oom { .. } => "oom",
            LiveEventKind::PidsLimit { .. } => "pids_limit",
            LiveEventKind::SeccompDenied { .. } => "seccomp_denied",
            LiveEventKind::NetworkAttempt { .. } => "network_attempt",
            LiveEventKind::CpuSaturated { .. } => "cpu_saturated",
            LiveEventKind::DiskLimit { .. } => "disk_limit",
        }
    }

    /// Events of one key are rate-limited together.
    pub(crate) fn key(&self) -> String {
        match self {
            LiveEventKind::Oom { .. }
            | LiveEventKind::PidsLimit { .. }
            | LiveEventKind::CpuSaturated { .. } => self.name().to_owned(),
            LiveEventKind::DiskLimit { mount, .. } => format!("disk_limit/{mount}"),
            LiveEventKind::SeccompDenied { syscall, .. } => format!("seccomp_denied/{syscall}"),
            LiveEventKind::NetworkAttempt { family, .. } => format!("network_attempt/{family}"),
        }
    }
}

/// The address family of a `socket(2)` call, named as `<sys/socket.h>` does without `AF_`.
pub(crate) fn family_name(domain: u64) -> String {
    match domain as i32 {
        libc::AF_INET => "inet".to_owned(),
        libc::AF_INET6 => "inet6".to_owned(),
        libc::AF_PACKET => "packet".to_owned(),
        libc::AF_NETLINK => "netlink".to_owned(),
        libc::AF_UNIX => "unix".to_owned(),
        other => format!("af_{other}"),
    }
}

mod unix_secs {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        s.serialize_f64(since.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let secs = f64::deserialize(d)?;
        Ok(SystemTime::UNIX_EPOCH + Duration::try_from_secs_f64(secs).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_flat_json_with_a_kind_and_a_float_time() {
        let event = LiveEvent {
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250),
            kind: LiveEventKind::Oom {
                oom_kills: 1,
                host_pid: None,
                comm: None,
            },
        };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(json, r#"{"at":1700000000.25,"kind":"oom","oom_kills":1}"#);
        let back: LiveEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(back, event);
        let net = LiveEventKind::NetworkAttempt {
            syscall: "socket".into(),
            family: family_name(libc::AF_INET6 as u64),
            count: 2,
        };
        assert_eq!(net.key(), "network_attempt/inet6");
        assert_eq!(net.name(), "network_attempt");
    }
}
