//! [`ByteSize`]: a number of bytes that prints for humans (`16 GiB`) and parses from config
//! (`16GiB`, `512 MiB`, `4096`). On the wire it is a plain integer.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::error::{FieldError, ProtocolError, Rule};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

impl ByteSize {
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
            if n >= size {
                return if n.is_multiple_of(size) {
                    write!(f, "{} {unit}", n / size)
                } else {
                    // Precision is for display only; the wire value is exact.
                    #[allow(clippy::cast_precision_loss)]
                    let value = n as f64 / size as f64;
                    write!(f, "{value:.1} {unit}")
                };
            }
        }
        write!(f, "{n} B")
    }
}

impl std::str::FromStr for ByteSize {
    type Err = FieldError;

    /// Accepts `4096`, `4KiB`, `512 MiB`, `2G` (powers of 1024), `1kB`/`1MB`/`1GB` (powers of 1000).
    fn from_str(s: &str) -> Result<Self, FieldError> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let bad = || {
            ProtocolError::rule(
                Rule::Size,
                format!("{s:?} is not a byte size such as 4096, 512MiB or 2GiB"),
            )
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let mult = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" | "k" => KIB,
            "M" | "MiB" => MIB,
            "G" | "GiB" => GIB,
            "T" | "TiB" => TIB,
            "kB" | "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "integer", "minimum": 0, "description": "A number of bytes" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_for_humans() {
        assert_eq!(ByteSize(64 * GIB).to_string(), "64 GiB");
        assert_eq!(ByteSize(1536 * KIB).to_string(), "1.5 MiB");
        assert_eq!(ByteSize(12).to_string(), "12 B");
    }

    #[test]
    fn parses_config_forms() {
        assert_eq!("16GiB".parse::<ByteSize>().unwrap(), ByteSize(16 * GIB));
        assert_eq!("512 MiB".parse::<ByteSize>().unwrap(), ByteSize(512 * MIB));
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert_eq!("2GB".parse::<ByteSize>().unwrap(), ByteSize(2_000_000_000));
        assert!("lots".parse::<ByteSize>().is_err());
        assert!("99999999999999999999T".parse::<ByteSize>().is_err());
    }
}
