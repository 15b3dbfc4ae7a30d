//! `corral doctor [--json] [--config FILE]`: can this host run builds? One line per check,
//! the fix beside each warning and failure; exit 0 when nothing failed, 1 otherwise.

use anyhow::Context;

use crate::cli::DoctorArgs;
use crate::config::{Config, ConfigFlags, Sources};
use crate::doctor::{self, Scope};
use crate::exit;

pub fn run(args: DoctorArgs) -> anyhow::Result<u8> {
    let flags = ConfigFlags {
        data_dir: args.data_dir.clone(),
        ..ConfigFlags::default()
    };
    let config = match Config::load(&Sources::from_process(args.config.clone(), flags)) {
        Ok(loaded) => loaded.config,
        Err(err) => {
            eprintln!("corral: {err}");
            return Ok(exit::INVALID_INPUT);
        }
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
