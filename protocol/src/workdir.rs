//! [`WorkDir`]: an absolute, normalized path inside the sandbox.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{FieldError, ProtocolError, Rule};

/// Longest accepted path, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;

/// An absolute path with no `.` or `..` components, no empty components (`//`), no trailing
/// slash (but for `/` itself) and no NUL: the sandbox can join it to its root without
/// resolving anything.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct WorkDir(String);

impl WorkDir {
    pub const PATTERN: &'static str = r"^/$|^(/(?!\.\.?(/|$))[^/\u0000]+)+$";

    pub fn new(s: impl Into<String>) -> Result<Self, FieldError> {
        let s = s.into();
        let fail = |why: &str| Err(ProtocolError::rule(Rule::Path, format!("{s:?} {why}")));
        if s.len() > MAX_PATH_BYTES {
            return fail("is longer than 1024 bytes");
        }
        if !s.starts_with('/') {
            return fail("must be absolute");
        }
        if s.contains('\0') {
            return fail("must not contain NUL");
        }
        if s == "/" {
            return Ok(WorkDir(s));
        }
        for component in s[1..].split('/') {
            match component {
                ".." => return fail("must not contain '..'"),
                "." | "" => return fail("must be normalized (no '.', '//' or trailing '/')"),
                _ => {}
            }
        }
        Ok(WorkDir(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for WorkDir {
    fn default() -> Self {
        WorkDir("/app".to_string())
    }
}

impl fmt::Display for WorkDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for WorkDir {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        WorkDir::new(s).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for WorkDir {
    fn schema_name() -> Cow<'static, str> {
        "WorkDir".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "An absolute, normalized path without '..'",
            "default": "/app",
            "maxLength": MAX_PATH_BYTES,
            "pattern": WorkDir::PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_normal_absolute_paths() {
        for ok in ["/", "/app", "/app/src", "/a/.hidden", "/a/..b", "/a/b..c"] {
            WorkDir::new(ok).unwrap();
        }
    }

    #[test]
    fn refuses_relative_dotted_and_unnormalized() {
        for bad in [
            "app",
            "",
            "/app/../etc",
            "/..",
            "/app/.",
            "/app//x",
            "/app/",
            "/a\0b",
            "./x",
        ] {
            assert_eq!(WorkDir::new(bad).unwrap_err().rule, Rule::Path, "{bad:?}");
        }
    }
}
