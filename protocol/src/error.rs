//! The one error type of the protocol: which field broke which rule.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The rule a message broke. Stable, snake_case names: they travel in `rejected` results
/// and producers may match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The bytes are not JSON (or not a JSON object).
    Syntax,
    /// The `schema` tag is missing or names a message or version this build does not speak.
    Schema,
    /// A field that the message type does not have.
    UnknownField,
    /// A required field is absent.
    MissingField,
    /// A value of the wrong JSON type, or an unknown enum value.
    Type,
    /// A string with characters outside the documented charset.
    Charset,
    /// A string or list that is too short or too long.
    Length,
    /// Not a `sha256:<64 lowercase hex>` digest.
    Digest,
    /// A path that is not absolute, not normalized, or contains `..`.
    Path,
    /// A number above its maximum (the hard maximum or a worker's lower one).
    Maximum,
    /// A number below its minimum.
    Minimum,
    /// A total size (all of `env`, say) above its budget.
    Size,
    /// A well-formed name that this worker does not know (a base, say).
    Unknown,
    /// A referenced object that is missing or not what its reference says (a source bundle
    /// whose bytes do not match its digest, say).
    Content,
    /// A well-formed value this worker's config does not permit (an egress destination
    /// outside its allow-list, say).
    NotAllowed,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Syntax => "syntax",
            Rule::Schema => "schema",
            Rule::UnknownField => "unknown_field",
            Rule::MissingField => "missing_field",
            Rule::Type => "type",
            Rule::Charset => "charset",
            Rule::Length => "length",
            Rule::Digest => "digest",
            Rule::Path => "path",
            Rule::Maximum => "maximum",
            Rule::Minimum => "minimum",
            Rule::Size => "size",
            Rule::Unknown => "unknown",
            Rule::Content => "content",
            Rule::NotAllowed => "not_allowed",
        }
    }

    fn from_prefix(message: &str) -> Option<(Rule, &str)> {
        let (head, rest) = message.split_once(": ")?;
        let rule = [
            Rule::Charset,
            Rule::Length,
            Rule::Digest,
            Rule::Path,
            Rule::Maximum,
            Rule::Minimum,
            Rule::Size,
        ]
        .into_iter()
        .find(|rule| rule.as_str() == head)?;
        Some((rule, rest))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message failed to decode or validate. Prints as `field: what is wrong`, for example
/// `limits.memory_bytes: 64 GiB exceeds the maximum of 16 GiB`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{field}: {message}")]
pub struct ProtocolError {
    /// Dotted path of the offending field (`limits.memory_bytes`, `command[0]`), or `$` for
    /// the message as a whole.
    pub field: String,
    pub rule: Rule,
    pub message: String,
}

impl ProtocolError {
    pub fn new(field: impl Into<String>, rule: Rule, message: impl Into<String>) -> Self {
        ProtocolError {
            field: field.into(),
            rule,
            message: message.into(),
        }
    }

    /// A newtype's parse error, before it knows which field it sits in.
    pub(crate) fn rule(rule: Rule, message: impl Into<String>) -> FieldError {
        FieldError {
            rule,
            message: message.into(),
        }
    }

    /// Maps a serde error (with the path where it happened) onto a field and a rule.
    ///
    /// Newtypes report their rule through serde's custom-error string as `"<rule>: <text>"`
    /// (see [`FieldError`]); serde's own errors are recognised by their stable wording.
    pub(crate) fn from_serde(path: &serde_path_to_error::Path, err: &serde_json::Error) -> Self {
        let mut field = path_to_field(path);
        let text = err.to_string();
        // serde_json appends " at line L column C"; the field path says where already.
        let text = match text.rfind(" at line ") {
            Some(at) => text[..at].to_string(),
            None => text,
        };
        if err.is_syntax() || err.is_eof() {
            return ProtocolError::new("$", Rule::Syntax, text);
        }
        if let Some((rule, rest)) = Rule::from_prefix(&text) {
            return ProtocolError::new(field, rule, rest);
        }
        if let Some(rest) = text.strip_prefix("unknown field `") {
            // serde_path_to_error's path already ends at the unknown key.
            let name = rest.split('`').next().unwrap_or_default();
            if field != name && !field.ends_with(&format!(".{name}")) {
                field = join(&field, name);
            }
            return ProtocolError::new(
                field,
                Rule::UnknownField,
                format!("unknown field `{name}`"),
            );
        }
        if let Some(rest) = text.strip_prefix("missing field `") {
            let name = rest.split('`').next().unwrap_or_default();
            field = join(&field, name);
            return ProtocolError::new(field, Rule::MissingField, "is required");
        }
        ProtocolError::new(field, Rule::Type, text)
    }
}

/// A rule broken by one value, before the field it belongs to is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub rule: Rule,
    pub message: String,
}

impl FieldError {
    /// Attach the field name.
    pub fn at(self, field: impl Into<String>) -> ProtocolError {
        ProtocolError::new(field, self.rule, self.message)
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // This exact shape is parsed back by `ProtocolError::from_serde`.
        write!(f, "{}: {}", self.rule, self.message)
    }
}

impl std::error::Error for FieldError {}

fn join(parent: &str, name: &str) -> String {
    if parent == "$" || parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}.{name}")
    }
}

fn path_to_field(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Enum { variant } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(variant);
            }
            Segment::Unknown => {}
        }
    }
    if out.is_empty() { "$".to_string() } else { out }
}
