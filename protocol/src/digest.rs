//! [`Digest`]: a content address, `sha256:<64 lowercase hex>`. The only algorithm corral
//! speaks; anything else is refused rather than guessed at.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{FieldError, ProtocolError, Rule};

/// A sha256 content digest in OCI form: `sha256:` followed by 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Digest(String);

const PREFIX: &str = "sha256:";

impl Digest {
    pub const PATTERN: &'static str = "^sha256:[0-9a-f]{64}$";

    pub fn parse(s: impl Into<String>) -> Result<Self, FieldError> {
        let s = s.into();
        let ok = s.strip_prefix(PREFIX).is_some_and(|hex| {
            hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if !ok {
            let shown: String = s.chars().take(80).collect();
            return Err(ProtocolError::rule(
                Rule::Digest,
                format!("{shown:?} is not a digest of the form sha256:<64 lowercase hex digits>"),
            ));
        }
        Ok(Digest(s))
    }

    /// Builds a digest from a finished sha256 hash.
    pub fn from_sha256(hash: [u8; 32]) -> Self {
        let mut s = String::with_capacity(PREFIX.len() + 64);
        s.push_str(PREFIX);
        for byte in hash {
            s.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
            s.push(char::from(b"0123456789abcdef"[usize::from(byte & 0xf)]));
        }
        Digest(s)
    }

    /// The 64 hex digits, as used in OCI blob paths (`blobs/sha256/<hex>`).
    pub fn hex(&self) -> &str {
        &self.0[PREFIX.len()..]
    }

    pub fn algorithm(&self) -> &'static str {
        "sha256"
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Digest {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, FieldError> {
        Digest::parse(s)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(s).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Digest {
    fn schema_name() -> Cow<'static, str> {
        "Digest".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A sha256 content digest: sha256:<64 lowercase hex digits>",
            "pattern": Digest::PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        let d = Digest::from_sha256([0xab; 32]);
        assert_eq!(d.hex(), "ab".repeat(32));
        assert_eq!(Digest::parse(d.to_string()).unwrap(), d);
    }

    #[test]
    fn refuses_other_forms() {
        for bad in [
            "sha256:abc",
            "sha512:".to_string().leak(),
            &format!("sha256:{}", "A".repeat(64)),
            &format!("md5:{}", "a".repeat(64)),
            &"a".repeat(64),
        ] {
            assert_eq!(Digest::parse(bad).unwrap_err().rule, Rule::Digest, "{bad}");
        }
    }
}
