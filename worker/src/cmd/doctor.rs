//! `corral doctor [--json] [--config FILE]`: can this host run builds? One line per check,
//! the fix beside each warning and failure; exit 0 when nothing failed, 1 otherwise.

use anyhow::Context;

use crate::cli::DoctorArgs;
use crate::config::{FlagValue, Sources};
use crate::doctor::{self, Scope};
use crate::exit;

pub fn run(args: DoctorArgs) -> anyhow::Result<u8> {
    let flags = args
        .data_dir
        .iter()
        .map(|dir| FlagValue::new("data_dir", dir.display().to_string(), "--data-dir"))
        .collect();
    let config = match super::check_config::load(&Sources::from_process(args.config.clone(), flags))
    {
        Ok(loaded) => loaded.config,
        Err(code) => return Ok(code),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // The broker and the store are checked when a config names them.
    let scope = Scope {
        services: args.config.is_some(),
        all_tools: true,
    };
    let report = runtime.block_on(doctor::run(&config, scope));
    if args.json {
        crate::outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        crate::out!("{}", report.to_text())?;
    }
    Ok(if report.ok {
        exit::SUCCESS
    } else {
        exit::JOB_FAILED
    })
}
