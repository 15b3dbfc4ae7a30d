//! corral-worker: the library of the `corral` and `corral-worker` binaries. It owns the CLI
//! commands, a job's life (spec, stage, build, publish, verdict), the layer writer
//! (snapshots), the stores and the AMQP worker. Raw syscalls live in `corral-sandbox`; wire
//! types in `corral-protocol`.
#![forbid(unsafe_code)]
// Standard output goes through `outln!`/`out!`, which turn a closed stdout into a quiet
// exit (`exit::code`) instead of `println!`'s panic.
#![warn(clippy::print_stdout)]

/// The AMQP worker: topology, consumer, confirming publisher, cancels, drain.
pub mod amqp;
/// App servers from built images: layer cache, published port, lifecycle (`corral run`).
pub mod app;
/// Capped exponential backoff with jitter, for reconnects and retries.
pub mod backoff;
/// Base rootfs catalogue: debootstrap, import, each base's layer.
pub mod base;
/// The action cache: canonical inputs → the result they gave.
pub mod cache;
/// The command line (clap).
pub mod cli;
/// One module per `corral` command.
pub mod cmd;
/// The worker's configuration: defaults, file, environment, flags.
pub mod config;
/// Warnings about the data disk the worker runs on.
pub mod datadisk;
/// `corral doctor`: whether this host can run builds.
pub mod doctor;
/// The egress proxy of builds that may download: allow-list, accounting, limits.
pub mod egress;
/// A job's events: the per-kind rate limit, the sinks, the human line.
pub mod events;
/// Exit codes that say whose fault a failure is.
pub mod exit;
/// Which version of a file a cache holds.
mod file_id;
/// What a fixture job needs on its first replay, made once and announced.
pub mod firstrun;
/// OCI image config and manifest.
pub mod image;
/// A job's life: spec → stage → build → publish → verdict.
pub mod job;
/// The deterministic layer writer (snapshots).
pub mod layer;
/// `tracing` subscribers of the binaries.
pub mod logging;
/// Prometheus metrics and the health endpoints.
pub mod metrics;
/// systemd's `sd_notify`.
pub mod notify;
/// Source bundles: packing, fetching, hostile-input-safe extraction.
pub mod source;
/// Content-addressed stores: an OCI layout directory, an OCI registry.
pub mod store;
