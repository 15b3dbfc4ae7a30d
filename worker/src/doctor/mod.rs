//! `corral doctor`: whether this host can run builds, checked the way the sandbox and the
//! worker will use it, one line per check (`ok`, `warn`, `fail`), each failure with its fix.
//! `corral work` runs the same host checks at start-up and refuses to start on a failure.
//!
//! The JSON form (`corral doctor --json`) is one object with stable keys:
//!
//! ```text
//! { "ok": bool,                          no check failed
//!   "checks": [ { "id": string,          kernel, user_namespaces, overlayfs, cgroups,
//!                                        cgroup_parent, seccomp, disk_limit, data_dir,
//!                                        tool:<package>, broker, store
//!                 "status": "ok" | "warn" | "fail",
//!                 "summary": string,     what was found
//!                 "fix": string | null,  what to do, for warn and fail
//!                 "details": object } ] }  per check; for `cgroups`:
//!                                          { "controllers": { memory|pids|cpu|io:
//!                                              { "version": "v1"|"v2"|null, "path": string|null } },
//!                                            "v2": { "path": string, "controllers": [string] } | null,
//!                                            "used": "v1" | "v2" | null }
//! ```

mod host;
mod services;

use serde::Serialize;

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One check's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub id: String,
    pub status: Status,
    pub summary: String,
    pub fix: Option<String>,
    pub details: serde_json::Value,
}

impl Check {
    pub fn ok(id: impl Into<String>, summary: impl Into<String>) -> Check {
        Check {
            id: id.into(),
            status: Status::Ok,
            summary: summary.into(),
            fix: None,
            details: serde_json::json!({}),
        }
    }

    pub fn warn(
        id: impl Into<String>,
        summary: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            status: Status::Warn,
            fix: Some(fix.into()),
            ..Check::ok(id, summary)
        }
    }

    pub fn fail(
        id: impl Into<String>,
        summary: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            status: Status::Fail,
            fix: Some(fix.into()),
            ..Check::ok(id, summary)
        }
    }

    fn with_details(mut self, details: serde_json::Value) -> Check {
        self.details = details;
        self
    }
}

/// Every check's verdict, in the order they ran.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    fn new(checks: Vec<Check>) -> Report {
        Report {
            ok: checks.iter().all(|c| c.status != Status::Fail),
            checks,
        }
    }

    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Fail)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Warn)
    }

    /// One line per check, the fix indented below each warning and failure, then a total.
    pub fn to_text(&self) -> String {
        let width = self.checks.iter().map(|c| c.id.len()).max().unwrap_or(0);
        let mut out = String::new();
        for check in &self.checks {
            out.push_str(&format!(
                "{:<4}  {:<width$}  {}\n",
                check.status.as_str(),
                check.id,
                check.summary
            ));
            if let Some(fix) = &check.fix {
                out.push_str(&format!("{:<4}  {:<width$}  fix: {fix}\n", "", ""));
            }
        }
        let (warnings, failures) = (self.warnings().count(), self.failures().count());
        out.push_str(&format!(
            "{} checks: {} ok, {warnings} warning{}, {failures} failure{}\n",
            self.checks.len(),
            self.checks.len() - warnings - failures,
            if warnings == 1 { "" } else { "s" },
            if failures == 1 { "" } else { "s" },
        ));
        out
    }
}

/// What to check besides the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    /// The broker and the store the config names.
    pub services: bool,
    /// Every tool of the host package list but the test-only ones; otherwise only those
    /// every worker host needs (a worker never builds bases or fixture bundles).
    pub all_tools: bool,
}

/// Runs the checks for `config`. Blocking host checks run on a blocking thread.
pub async fn run(config: &Config, scope: Scope) -> Report {
    let host_config = config.clone();
    let mut checks = tokio::task::spawn_blocking(move || host::checks(&host_config, scope))
        .await
        .unwrap_or_else(|err| {
            vec![Check::fail(
                "host",
                format!("the host checks stopped: {err}"),
                "report this as a bug",
            )]
        });
    if scope.services {
        checks.push(services::broker(config).await);
        if !config.amqp.more_urls.is_empty() {
            checks.push(services::broker_nodes(config).await);
        }
        checks.push(services::store(config).await);
    }
    Report::new(checks)
}

/// `corral work`'s start-up check: the host checks (the worker itself reaches the broker
/// and the store, with retries). Each warning is logged; failures come back, one per line,
/// each with its fix, for the worker to refuse to start with.
pub async fn preflight(config: &Config) -> Result<(), String> {
    let scope = Scope {
        services: false,
        all_tools: false,
    };
    let report = run(config, scope).await;
    for check in report.warnings() {
        tracing::warn!(
            check = %check.id,
            "host check: {} (fix: {})",
            check.summary,
            check.fix.as_deref().unwrap_or("-")
        );
    }
    let failures: Vec<String> = report
        .failures()
        .map(|c| {
            format!(
                "{}: {} (fix: {})",
                c.id,
                c.summary,
                c.fix.as_deref().unwrap_or("-")
            )
        })
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_one_line_per_check_the_fix_below_and_a_total() {
        let report = Report::new(vec![
            Check::ok("kernel", "Linux 6.1"),
            Check::warn("data_dir", "little space", "free some"),
            Check::fail("seccomp", "missing", "upgrade"),
        ]);
        assert!(!report.ok);
        let fix = " ".repeat(16) + "fix: ";
        let expected = [
            "ok    kernel    Linux 6.1".to_string(),
            "warn  data_dir  little space".to_string(),
            fix.clone() + "free some",
            "fail  seccomp   missing".to_string(),
            fix + "upgrade",
            "3 checks: 1 ok, 1 warning, 1 failure".to_string(),
        ];
        assert_eq!(report.to_text().lines().collect::<Vec<_>>(), expected);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["checks"][2]["status"], "fail");
        assert_eq!(json["checks"][0]["fix"], serde_json::Value::Null);
        assert!(Report::new(vec![Check::warn("a", "b", "c")]).ok);
    }
}
