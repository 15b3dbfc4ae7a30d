//! One module per subcommand. Each exposes `run(args) -> anyhow::Result<u8>` returning the
//! process exit code (see [`crate::exit`]).

pub mod sandbox;
pub mod schema;
pub mod validate;
