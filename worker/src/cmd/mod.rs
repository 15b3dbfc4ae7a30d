//! One module per subcommand. Each exposes `run(args) -> anyhow::Result<u8>` returning the
//! process exit code (see [`crate::exit`]).

pub mod base;
pub mod bench_sandbox;
pub mod check_config;
pub mod doctor;
pub mod events;
pub mod replay;
pub mod run;
pub mod sandbox;
pub mod schema;
pub mod snapshot;
pub mod source;
pub mod submit;
pub mod validate;
pub mod work;

/// The bytes of a message file, or of standard input for `-`.
pub(crate) fn read_input(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    use std::io::Read;
    if path == std::path::Path::new("-") {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("reading standard input")?;
        return Ok(bytes);
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The event sinks of a command run by hand (`replay`, `run`): human lines on stderr (only
/// the alerts with `alerts_only`), and with `--events FILE|-` every event as JSON lines.
pub(crate) fn event_sinks(
    events: Option<&std::path::Path>,
    alerts_only: bool,
) -> anyhow::Result<Vec<std::sync::Arc<dyn crate::events::EventSink>>> {
    use crate::events::{EventSink, HumanLines, JsonLines};
    use anyhow::Context;
    use std::sync::Arc;
    let mut sinks: Vec<Arc<dyn EventSink>> =
        vec![Arc::new(HumanLines::new(std::io::stderr(), alerts_only))];
    match events {
        Some(path) if path == std::path::Path::new("-") => {
            sinks.push(Arc::new(JsonLines::new(std::io::stdout())));
        }
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("creating the events file {}", path.display()))?;
            sinks.push(Arc::new(JsonLines::new(file)));
        }
        None => {}
    }
    Ok(sinks)
}

/// What a command run by hand (`replay`, `run`) needs before its work: a data dir it may
/// use (first-run checks) and the configured store. `Err` is the exit code, the reason
/// already said on stderr.
pub(crate) async fn data_dir_and_store(
    config: &crate::config::Config,
) -> Result<crate::store::Store, u8> {
    if let Err(err) = crate::firstrun::check_data_dir(&config.data_dir) {
        eprintln!("corral: error: {:#}", err.error);
        return Err(err.code);
    }
    crate::job::open_store(config).await.map_err(|err| {
        eprintln!(
            "corral: opening the store: {}",
            crate::job::error_chain(&err)
        );
        crate::exit::PLATFORM_ERROR
    })
}
