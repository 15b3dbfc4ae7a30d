//! One module per subcommand. Each exposes `run(args) -> anyhow::Result<u8>` returning the
//! process exit code (see [`crate::exit`]).

pub mod schema;
pub mod snapshot;
pub mod validate;
