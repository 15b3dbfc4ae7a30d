//! Resource limits of one job: documented defaults, hard maxima, and the lower maxima a
//! worker's config may set ([`Limits::within`]).
//!
//! | field | default | hard maximum | minimum |
//! |---|---|---|---|
//! | `wall_seconds` | 900 (15 min) | 7200 (2 h) | 1 |
//! | `cpu_seconds` | 1800 | 14400 | 1 |
//! | `memory_bytes` | 2 GiB | 16 GiB | 16 MiB |
//! | `pids` | 512 | 4096 | 8 |
//! | `disk_bytes` | 4 GiB | 64 GiB | 1 MiB |
//! | `open_files` | 1024 | 65536 | 64 |
//! | `log_bytes` | 4 MiB | 64 MiB | 4 KiB |
//! | `disk_bytes_per_second` | 256 MiB | 4 GiB | 1 MiB |
//! | `network_bytes` | 1 GiB | 16 GiB | 1 MiB |

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::bytesize::{ByteSize, GIB, KIB, MIB};
use crate::error::{ProtocolError, Rule};

/// What a job may use. Every field is optional on the wire and takes its default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Wall-clock seconds from exec to the end of the build.
    #[schemars(range(min = 1, max = 7200))]
    pub wall_seconds: u64,
    /// CPU seconds (user + system) the build may consume in all its processes.
    #[schemars(range(min = 1, max = 14400))]
    pub cpu_seconds: u64,
    /// Memory (no swap) for all processes of the build, in bytes.
    #[schemars(range(min = 16777216, max = 17179869184_u64))]
    pub memory_bytes: ByteSize,
    /// Processes and threads alive at once.
    #[schemars(range(min = 8, max = 4096))]
    pub pids: u64,
    /// Bytes the build may write to its filesystem (the overlay's upper dir and /tmp).
    #[schemars(range(min = 1048576, max = 68719476736_u64))]
    pub disk_bytes: ByteSize,
    /// Open file descriptors per process (RLIMIT_NOFILE).
    #[schemars(range(min = 64, max = 65536))]
    pub open_files: u64,
    /// Bytes of build output (stdout + stderr) kept and streamed.
    #[schemars(range(min = 4096, max = 67108864))]
    pub log_bytes: ByteSize,
    /// Disk bandwidth of the build, in bytes per second, for reads and for writes each, on
    /// its filesystem's device (cgroup `io.max`; on cgroup v1, `blkio` throttles the I/O the
    /// build issues itself, not the kernel's buffered writeback).
    #[schemars(range(min = 1048576, max = 4294967296_u64))]
    pub disk_bytes_per_second: ByteSize,
    /// Bytes (in plus out) the build may move through its egress proxy; past it the
    /// build's connections are cut and it ends as `network_limit`. Only egress jobs use it.
    #[schemars(range(min = 1048576, max = 17179869184_u64))]
    pub network_bytes: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        wall_seconds: 900,
        cpu_seconds: 1800,
        memory_bytes: ByteSize(2 * GIB),
        pids: 512,
        disk_bytes: ByteSize(4 * GIB),
        open_files: 1024,
        log_bytes: ByteSize(4 * MIB),
        disk_bytes_per_second: ByteSize(256 * MIB),
        network_bytes: ByteSize(GIB),
    };

    /// The hard maxima: no worker accepts more, whatever its config says.
    pub const MAX: Limits = Limits {
        wall_seconds: 7200,
        cpu_seconds: 14400,
        memory_bytes: ByteSize(16 * GIB),
        pids: 4096,
        disk_bytes: ByteSize(64 * GIB),
        open_files: 65536,
        log_bytes: ByteSize(64 * MIB),
        disk_bytes_per_second: ByteSize(4 * GIB),
        network_bytes: ByteSize(16 * GIB),
    };

    pub const MIN: Limits = Limits {
        wall_seconds: 1,
        cpu_seconds: 1,
        memory_bytes: ByteSize(16 * MIB),
        pids: 8,
        disk_bytes: ByteSize(MIB),
        open_files: 64,
        log_bytes: ByteSize(4 * KIB),
        disk_bytes_per_second: ByteSize(MIB),
        network_bytes: ByteSize(MIB),
    };

    fn fields(&self) -> [(&'static str, u64, bool); 9] {
        [
            ("wall_seconds", self.wall_seconds, false),
            ("cpu_seconds", self.cpu_seconds, false),
            ("memory_bytes", self.memory_bytes.0, true),
            ("pids", self.pids, false),
            ("disk_bytes", self.disk_bytes.0, true),
            ("open_files", self.open_files, false),
            ("log_bytes", self.log_bytes.0, true),
            ("disk_bytes_per_second", self.disk_bytes_per_second.0, true),
            ("network_bytes", self.network_bytes.0, true),
        ]
    }

    /// Checks every limit against [`Limits::MIN`] and the given maxima (a worker's lowered
    /// ones, or [`Limits::MAX`]). Field names in errors are prefixed with `limits.`.
    pub fn within(&self, max: &Limits) -> Result<(), ProtocolError> {
        let show = |value: u64, bytes: bool| {
            if bytes {
                ByteSize(value).to_string()
            } else {
                value.to_string()
            }
        };
        for (((name, value, bytes), (_, lo, _)), (_, hi, _)) in self
            .fields()
            .into_iter()
            .zip(Limits::MIN.fields())
            .zip(max.fields())
        {
            let field = format!("limits.{name}");
            if value > hi {
                let which = if hi == Limits::MAX.field(name) {
                    "the maximum"
                } else {
                    "this worker's maximum"
                };
                return Err(ProtocolError::new(
                    field,
                    Rule::Maximum,
                    format!(
                        "{} exceeds {which} of {}",
                        show(value, bytes),
                        show(hi, bytes)
                    ),
                ));
            }
            if value < lo {
                return Err(ProtocolError::new(
                    field,
                    Rule::Minimum,
                    format!(
                        "{} is below the minimum of {}",
                        show(value, bytes),
                        show(lo, bytes)
                    ),
                ));
            }
        }
        Ok(())
    }

    fn field(&self, name: &str) -> u64 {
        self.fields()
            .into_iter()
            .find(|f| f.0 == name)
            .map_or(0, |f| f.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_within_bounds() {
        Limits::DEFAULT.within(&Limits::MAX).unwrap();
        Limits::MAX.within(&Limits::MAX).unwrap();
        Limits::MIN.within(&Limits::MAX).unwrap();
    }

    #[test]
    fn names_field_and_rule() {
        let limits = Limits {
            memory_bytes: ByteSize(64 * GIB),
            ..Limits::DEFAULT
        };
        let err = limits.within(&Limits::MAX).unwrap_err();
        assert_eq!(
            err.to_string(),
            "limits.memory_bytes: 64 GiB exceeds the maximum of 16 GiB"
        );
        assert_eq!(err.rule, Rule::Maximum);

        let lowered = Limits {
            wall_seconds: 600,
            ..Limits::MAX
        };
        let err = Limits::DEFAULT.within(&lowered).unwrap_err();
        assert_eq!(
            err.to_string(),
            "limits.wall_seconds: 900 exceeds this worker's maximum of 600"
        );

        let tiny = Limits {
            pids: 1,
            ..Limits::DEFAULT
        };
        assert_eq!(tiny.within(&Limits::MAX).unwrap_err().rule, Rule::Minimum);

        let fast = Limits {
            disk_bytes_per_second: ByteSize(8 * GIB),
            ..Limits::DEFAULT
        };
        assert_eq!(
            fast.within(&Limits::MAX).unwrap_err().to_string(),
            "limits.disk_bytes_per_second: 8 GiB exceeds the maximum of 4 GiB"
        );
    }
}
