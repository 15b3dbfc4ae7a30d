//! `corral check-config FILE`: load a config exactly as `corral work` would (file, then
//! `CORRAL_*` environment, then flags), print the effective config with secrets redacted,
//! or name every bad key and exit 65.

use crate::cli::CheckConfigArgs;
use crate::config::{Config, ConfigError, Sources};
use crate::exit;

pub fn run(args: CheckConfigArgs) -> anyhow::Result<u8> {
    let sources = Sources::from_process(Some(args.file.clone()), args.flags);
    match Config::load(&sources) {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                eprintln!("corral: warning: {warning}");
            }
            if let Some(warning) = crate::datadisk::warning(&loaded.config.data_dir) {
                eprintln!("corral: warning: {warning}");
            }
            if !args.quiet {
                crate::outln!("# effective config of {}", args.file.display())?;
                crate::out!("{}", loaded.config.to_toml())?;
            }
            Ok(exit::SUCCESS)
        }
        Err(err @ ConfigError::Invalid(_)) => {
            eprintln!("corral: {} is invalid:", args.file.display());
            for line in err.to_string().lines() {
                eprintln!("  {line}");
            }
            Ok(exit::INVALID_INPUT)
        }
        Err(err) => {
            eprintln!("corral: {err}");
            Ok(exit::INVALID_INPUT)
        }
    }
}
