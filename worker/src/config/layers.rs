//! Where each key's value came from: the TOML file, `CORRAL_*` environment variables and
//! command-line flags, merged in that order as TOML tables, with the origin of every key kept
//! so an error can say which layer to fix.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::Value as Json;
use toml::{Table, Value};

use super::raw::RawConfig;

/// The layer a key's effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(PathBuf),
    Env(String),
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(path) => write!(f, "file {}", path.display()),
            Origin::Env(var) => write!(f, "environment {var}"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// One settable key: its dotted name and the TOML types it accepts.
#[derive(Debug, Clone)]
pub struct Key {
    pub name: String,
    types: Vec<String>,
}

impl Key {
    /// `amqp.heartbeat_seconds` → `CORRAL_AMQP_HEARTBEAT_SECONDS`.
    pub fn env_var(&self) -> String {
        format!("CORRAL_{}", self.name.replace('.', "_").to_uppercase())
    }

    /// Types a string from the environment or `--set` the way the key expects, so that
    /// `CORRAL_WORKER_INSTANCE=1` stays a string and `CORRAL_CONCURRENCY=4` becomes a number.
    pub fn typed(&self, text: &str) -> Value {
        let accepts = |t: &str| self.types.iter().any(|have| have == t);
        if accepts("integer")
            && let Ok(n) = text.trim().parse::<i64>()
        {
            return Value::Integer(n);
        }
        if accepts("number")
            && let Ok(x) = text.trim().parse::<f64>()
        {
            return Value::Float(x);
        }
        if accepts("boolean")
            && let Ok(b) = text.trim().parse::<bool>()
        {
            return Value::Boolean(b);
        }
        // A list from one variable: separated by commas or spaces
        // (`CORRAL_EGRESS_ALLOW=a:443,b:443`, `CORRAL_AMQP_URL="amqp://n1 amqp://n2"`); no
        // item of a list key (URLs, HOST:PORT) holds either.
        if accepts("array") {
            let items = text
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|i| !i.is_empty());
            return Value::Array(items.map(|i| Value::String(i.to_owned())).collect());
        }
        Value::String(text.to_string())
    }
}

/// Every leaf key of [`RawConfig`], read off its JSON Schema so the list cannot drift from
/// the struct.
pub fn keys() -> &'static [Key] {
    static KEYS: OnceLock<Vec<Key>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let schema = schemars::schema_for!(RawConfig);
        let root = schema.as_value();
        let defs = root.get("$defs").cloned().unwrap_or(Json::Null);
        let mut out = Vec::new();
        collect(root, &defs, "", &mut out);
        out
    })
}

fn resolve<'a>(node: &'a Json, defs: &'a Json) -> &'a Json {
    if let Some(reference) = node.get("$ref").and_then(Json::as_str) {
        let name = reference.rsplit('/').next().unwrap_or_default();
        return defs.get(name).map_or(node, |def| resolve(def, defs));
    }
    for combinator in ["anyOf", "oneOf"] {
        if let Some(branches) = node.get(combinator).and_then(Json::as_array) {
            let not_null = branches
                .iter()
                .find(|b| b.get("type").and_then(Json::as_str) != Some("null"));
            if let Some(branch) = not_null {
                return resolve(branch, defs);
            }
        }
    }
    node
}

fn collect(node: &Json, defs: &Json, prefix: &str, out: &mut Vec<Key>) {
    let node = resolve(node, defs);
    if let Some(props) = node.get("properties").and_then(Json::as_object) {
        for (name, child) in props {
            let dotted = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            collect(child, defs, &dotted, out);
        }
        return;
    }
    let types = match node.get("type") {
        Some(Json::String(t)) => vec![t.clone()],
        Some(Json::Array(ts)) => ts
            .iter()
            .filter_map(Json::as_str)
            .map(str::to_string)
            .collect(),
        _ => vec!["string".to_string()],
    };
    out.push(Key {
        name: prefix.to_string(),
        types,
    });
}

pub fn key(name: &str) -> Option<&'static Key> {
    keys().iter().find(|k| k.name == name)
}

fn is_section(name: &str) -> bool {
    let prefix = format!("{name}.");
    keys().iter().any(|k| k.name.starts_with(&prefix))
}

/// The merged tables and the origin of each key set along the way.
#[derive(Debug, Default)]
pub struct Layers {
    pub table: Table,
    pub origins: BTreeMap<String, Origin>,
}

impl Layers {
    pub fn origin(&self, key: &str) -> Origin {
        self.origins.get(key).cloned().unwrap_or(Origin::Default)
    }

    /// Lays `table` over what is there. Returns the dotted names of keys that no
    /// [`RawConfig`] field accepts.
    pub fn overlay(&mut self, table: Table, origin: &Origin) -> Vec<String> {
        let mut unknown = Vec::new();
        merge(
            &mut self.table,
            table,
            "",
            origin,
            &mut self.origins,
            &mut unknown,
        );
        unknown
    }

    /// Drops a dotted key from the merged table. `false` if it is not there.
    pub fn remove(&mut self, name: &str) -> bool {
        let mut parts: Vec<&str> = name.split('.').collect();
        let Some(leaf) = parts.pop() else {
            return false;
        };
        let mut table = &mut self.table;
        for part in parts {
            match table.get_mut(part) {
                Some(Value::Table(inner)) => table = inner,
                _ => return false,
            }
        }
        table.remove(leaf).is_some()
    }

    /// Sets one dotted key from a string typed as the key expects. `Err` if no such key.
    pub fn set(&mut self, name: &str, text: &str, origin: &Origin) -> Result<(), String> {
        let key = key(name).ok_or_else(|| name.to_string())?;
        let value = key.typed(text);
        let mut table = Table::new();
        let mut parts: Vec<&str> = name.split('.').collect();
        let leaf = parts.pop().unwrap_or_default();
        let mut inner = Table::new();
        inner.insert(leaf.to_string(), value);
        while let Some(part) = parts.pop() {
            let mut outer = Table::new();
            outer.insert(part.to_string(), Value::Table(inner));
            inner = outer;
        }
        table.extend(inner);
        self.overlay(table, origin);
        Ok(())
    }
}

fn merge(
    into: &mut Table,
    from: Table,
    prefix: &str,
    origin: &Origin,
    origins: &mut BTreeMap<String, Origin>,
    unknown: &mut Vec<String>,
) {
    for (name, value) in from {
        let dotted = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            Value::Table(sub) if is_section(&dotted) => {
                let slot = into
                    .entry(name)
                    .or_insert_with(|| Value::Table(Table::new()));
                if let Value::Table(slot) = slot {
                    merge(slot, sub, &dotted, origin, origins, unknown);
                } else {
                    *slot = Value::Table(sub);
                }
            }
            value => {
                if key(&dotted).is_none() && !is_section(&dotted) {
                    unknown.push(dotted);
                    continue;
                }
                origins.insert(dotted, origin.clone());
                into.insert(name, value);
            }
        }
    }
}

/// Variables that once set a worker setting under another name, and the key they set. A
/// worker that silently ignored `CORRAL_POOL=gpu` would serve the wrong pool, so they are
/// refused with their new name.
const RENAMED_VARS: [(&str, &str); 9] = [
    ("CORRAL_POOL", "amqp.pool"),
    ("CORRAL_DRAIN_DEADLINE", "drain_deadline_seconds"),
    ("CORRAL_DELIVERY_LIMIT", "amqp.delivery_limit"),
    ("CORRAL_LEASE", "amqp.lease_seconds"),
    ("CORRAL_HEARTBEAT", "amqp.heartbeat_seconds"),
    ("CORRAL_BLOCKED_WAIT", "amqp.blocked_wait_seconds"),
    ("CORRAL_CANCEL_MEMORY", "amqp.cancel_memory_seconds"),
    ("CORRAL_BACKOFF_MAX", "amqp.reconnect_max_seconds"),
    ("CORRAL_STORE", "store.url"),
];

/// The key a renamed variable sets now.
pub fn renamed_var(var: &str) -> Option<&'static str> {
    RENAMED_VARS
        .iter()
        .find(|(old, _)| *old == var)
        .map(|(_, key)| *key)
}

/// `CORRAL_*` variables that are not config keys but are read by corral itself: the config
/// file's path, what `replay` may install and where it caches wheels, the cgroup version the
/// sandbox must find, and the test and benchmark harnesses' own.
pub fn read_elsewhere(var: &str) -> bool {
    matches!(
        var,
        "CORRAL_CONFIG" | "CORRAL_NO_INSTALL" | "CORRAL_WHEEL_CACHE"
    ) || var == corral_sandbox::REQUIRE_CGROUP_ENV
        || ["CORRAL_TEST_", "CORRAL_BENCH_", "CORRAL_FAULT_"]
            .iter()
            .any(|prefix| var.starts_with(prefix))
}

/// The `CORRAL_*` variables that name a key, as a table, plus those that name none (which
/// are ignored: other tools share the prefix, but a typo deserves a warning).
pub fn from_env(vars: &[(String, String)], layers: &mut Layers) -> Vec<String> {
    let mut ignored = Vec::new();
    for (var, text) in vars {
        if !var.starts_with("CORRAL_") {
            continue;
        }
        match keys().iter().find(|k| k.env_var() == *var) {
            Some(key) => {
                let _ = layers.set(&key.name, text, &Origin::Env(var.clone()));
            }
            None => ignored.push(var.clone()),
        }
    }
    ignored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_the_raw_struct() {
        let names: Vec<&str> = keys().iter().map(|k| k.name.as_str()).collect();
        assert!(names.contains(&"amqp.heartbeat_seconds"), "{names:?}");
        assert!(names.contains(&"limits.memory_bytes"));
        assert!(names.contains(&"data_dir"));
        assert!(!names.contains(&"amqp"));
    }

    #[test]
    fn env_names_are_unique() {
        let mut vars: Vec<String> = keys().iter().map(Key::env_var).collect();
        let count = vars.len();
        vars.sort();
        vars.dedup();
        assert_eq!(vars.len(), count);
    }

    #[test]
    fn env_values_take_the_key_type() {
        let mut layers = Layers::default();
        let vars = vec![
            ("CORRAL_WORKER_INSTANCE".to_string(), "1".to_string()),
            ("CORRAL_CONCURRENCY".to_string(), "4".to_string()),
            ("CORRAL_LIMITS_MEMORY_BYTES".to_string(), "1GiB".to_string()),
            (
                "CORRAL_SANDBOX_CPUS_PER_BUILD".to_string(),
                "1.5".to_string(),
            ),
            ("CORRAL_TYPO".to_string(), "x".to_string()),
        ];
        let ignored = from_env(&vars, &mut layers);
        assert_eq!(ignored, vec!["CORRAL_TYPO".to_string()]);
        let t = &layers.table;
        assert_eq!(t["worker"]["instance"], Value::String("1".into()));
        assert_eq!(t["concurrency"], Value::Integer(4));
        assert_eq!(t["limits"]["memory_bytes"], Value::String("1GiB".into()));
        assert_eq!(t["sandbox"]["cpus_per_build"], Value::Float(1.5));
        assert_eq!(
            layers.origin("concurrency"),
            Origin::Env("CORRAL_CONCURRENCY".into())
        );
    }

    #[test]
    fn unknown_keys_are_named_in_full() {
        let mut layers = Layers::default();
        let table: Table = "bogus = 1\n[amqp]\nheartbeat = 3\n[nope]\nx = 1\n"
            .parse()
            .unwrap();
        let mut unknown = layers.overlay(table, &Origin::Default);
        unknown.sort();
        assert_eq!(unknown, vec!["amqp.heartbeat", "bogus", "nope"]);
    }
}
