//! One module per subcommand. Each exposes `run(args) -> anyhow::Result<u8>` returning the
//! process exit code (see [`crate::exit`]).

pub mod base;
pub mod check_config;
pub mod replay;
pub mod sandbox;
pub mod schema;
pub mod snapshot;
pub mod source;
pub mod submit;
pub mod validate;
pub mod work;
