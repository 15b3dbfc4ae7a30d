//! Identifier newtypes. Each is validated on construction and on decode, so a value of the
//! type is always safe to use in a path component, a routing key and a log line.
//!
//! | type | charset | length |
//! |---|---|---|
//! | [`JobId`], [`ProjectId`] | ASCII letters, digits, `_`, `-`; starts with a letter or digit | 1–64 |
//! | [`PoolName`] | lowercase letters, digits, `_`, `-`; starts with a letter or digit | 1–32 |
//! | [`BaseName`] | lowercase letters, digits, `_`, `-`, `.`; starts with a letter or digit | 1–64 |
//!
//! Dots are kept out of job, project and pool ids because they separate words in AMQP topic
//! routing keys (`<project>.<job_id>`).

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{FieldError, ProtocolError, Rule};

struct IdRule {
    what: &'static str,
    max: usize,
    lowercase: bool,
    dots: bool,
    pattern: &'static str,
    charset: &'static str,
}

impl IdRule {
    fn check(&self, s: &str) -> Result<(), FieldError> {
        if s.is_empty() || s.len() > self.max {
            return Err(ProtocolError::rule(
                Rule::Length,
                format!(
                    "{} must be 1 to {} characters, got {}",
                    self.what,
                    self.max,
                    s.len()
                ),
            ));
        }
        let ok_first = |c: char| {
            c.is_ascii_digit()
                || c.is_ascii_lowercase()
                || (!self.lowercase && c.is_ascii_uppercase())
        };
        let ok_rest = |c: char| ok_first(c) || c == '_' || c == '-' || (self.dots && c == '.');
        let mut chars = s.chars();
        let first = chars.next().unwrap_or(' ');
        if !ok_first(first) || !chars.all(ok_rest) {
            return Err(ProtocolError::rule(
                Rule::Charset,
                format!("{} {:?} must be {}", self.what, s, self.charset),
            ));
        }
        Ok(())
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $rule:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            const RULE: IdRule = $rule;

            /// Validates `s` against this id's charset and length.
            pub fn new(s: impl Into<String>) -> Result<Self, FieldError> {
                let s = s.into();
                Self::RULE.check(&s)?;
                Ok($name(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = FieldError;
            fn from_str(s: &str) -> Result<Self, FieldError> {
                Self::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                let rule = Self::RULE;
                json_schema!({
                    "type": "string",
                    "description": format!("{}: {}, 1 to {} characters", rule.what, rule.charset, rule.max),
                    "pattern": rule.pattern,
                    "minLength": 1,
                    "maxLength": rule.max,
                })
            }
        }
    };
}

id_type!(
    /// A job's id, unique per job (a UUID or ULID suits).
    JobId,
    IdRule {
        what: "job id",
        max: 64,
        lowercase: false,
        dots: false,
        pattern: "^[A-Za-z0-9][A-Za-z0-9_-]*$",
        charset: "ASCII letters, digits, '_' or '-', starting with a letter or digit",
    }
);

id_type!(
    /// A project (customer) id. Each project builds under its own host uid.
    ProjectId,
    IdRule {
        what: "project id",
        max: 64,
        lowercase: false,
        dots: false,
        pattern: "^[A-Za-z0-9][A-Za-z0-9_-]*$",
        charset: "ASCII letters, digits, '_' or '-', starting with a letter or digit",
    }
);

id_type!(
    /// A worker pool: jobs are routed to `corral.jobs.<pool>`.
    PoolName,
    IdRule {
        what: "pool name",
        max: 32,
        lowercase: true,
        dots: false,
        pattern: "^[a-z0-9][a-z0-9_-]*$",
        charset: "lowercase letters, digits, '_' or '-', starting with a letter or digit",
    }
);

id_type!(
    /// The name of a base root filesystem known to the worker, e.g. `python-3.11`.
    BaseName,
    IdRule {
        what: "base name",
        max: 64,
        lowercase: true,
        dots: true,
        pattern: "^[a-z0-9][a-z0-9._-]*$",
        charset: "lowercase letters, digits, '_', '-' or '.', starting with a letter or digit",
    }
);

impl Default for PoolName {
    fn default() -> Self {
        PoolName("default".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_documented_charset() {
        assert!(JobId::new("01HZX-job_42").is_ok());
        assert!(ProjectId::new("acme").is_ok());
        assert!(BaseName::new("python-3.11").is_ok());
        assert!(PoolName::new("default").is_ok());
    }

    #[test]
    fn ids_reject_forbidden_characters_and_lengths() {
        assert_eq!(JobId::new("a.b").unwrap_err().rule, Rule::Charset);
        assert_eq!(JobId::new("../etc").unwrap_err().rule, Rule::Charset);
        assert_eq!(JobId::new("-x").unwrap_err().rule, Rule::Charset);
        assert_eq!(JobId::new("").unwrap_err().rule, Rule::Length);
        assert_eq!(JobId::new("x".repeat(65)).unwrap_err().rule, Rule::Length);
        assert_eq!(PoolName::new("Big").unwrap_err().rule, Rule::Charset);
        assert_eq!(BaseName::new("..").unwrap_err().rule, Rule::Charset);
        assert_eq!(ProjectId::new("é").unwrap_err().rule, Rule::Charset);
    }
}
