//! `corral check-config [FILE]`: load the config exactly as `corral work` would (defaults,
//! the file, `CORRAL_*` environment, flags), print the effective config with secrets
//! redacted (with `--effective`, each key followed by where its value came from), or name
//! every bad key and exit 65. Every command that reads the config reports a bad one this way.

use crate::cli::{CheckConfigArgs, GlobalArgs};
use crate::config::{Config, ConfigError, Loaded, Sources};
use crate::exit;

pub fn run(args: CheckConfigArgs, global: &GlobalArgs) -> anyhow::Result<u8> {
    if let Some(code) = super::work::refuse_retired_runner() {
        return Ok(code);
    }
    let mut flags = global.config_flags();
    flags.extend(args.flags.values());
    let sources = Sources::from_process(args.file.clone(), flags);
    let loaded = match load(&sources) {
        Ok(loaded) => loaded,
        Err(code) => return Ok(code),
    };
    for warning in &loaded.warnings {
        eprintln!("corral: warning: {warning}");
    }
    if let Some(warning) = crate::datadisk::warning(&loaded.config.data_dir) {
        eprintln!("corral: warning: {warning}");
    }
    if args.quiet {
        return Ok(exit::SUCCESS);
    }
    let file = args.file.as_ref().map(|f| f.display().to_string());
    if args.effective {
        let file = file.map(|f| format!("{f} < ")).unwrap_or_default();
        crate::outln!("# effective config: defaults < {file}CORRAL_* environment < flags")?;
        crate::out!("{}", loaded.annotated_toml())?;
    } else {
        let file = file.unwrap_or_else(|| "the defaults".to_string());
        crate::outln!("# effective config of {file}")?;
        crate::out!("{}", loaded.config.to_toml())?;
    }
    Ok(exit::SUCCESS)
}

/// The config, or the exit code after its errors were printed, one bad key a line.
pub fn load(sources: &Sources) -> Result<Loaded, u8> {
    Config::load(sources).map_err(|err| {
        eprintln!("corral: {}", describe(&err, sources));
        exit::INVALID_INPUT
    })
}

/// A config error as printed: the config named, then every bad key on its own line.
pub fn describe(err: &ConfigError, sources: &Sources) -> String {
    match err {
        ConfigError::Invalid(_) => {
            let what = match &sources.file {
                Some(file) => file.display().to_string(),
                None => "the config".to_string(),
            };
            let mut text = format!("{what} is invalid:");
            for line in err.to_string().lines() {
                text.push_str(&format!("\n  {line}"));
            }
            text
        }
        err => err.to_string(),
    }
}
