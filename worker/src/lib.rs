//! corral-worker: the library of the `corral` and `corral-worker` binaries. It owns the CLI
//! commands, the job pipeline, the layer writer (snapshots), the stores and the AMQP
//! worker. Raw syscalls live in `corral-sandbox`; wire types in `corral-protocol`.
#![forbid(unsafe_code)]

pub mod amqp;
pub mod base;
pub mod cache;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod datadisk;
pub mod exit;
pub mod image;
pub mod layer;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod source;
pub mod store;
