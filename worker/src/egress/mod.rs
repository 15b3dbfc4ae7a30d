//! The egress proxy of a build: an HTTP proxy the worker serves, from outside the sandbox, on
//! a socket that exists only inside the job's network namespace (made there by the job's
//! pid 1 and handed over before the job starts). The namespace has no route out, so this
//! proxy is the build's only way to anything beyond its own loopback.
//!
//! - [`allow`]: the allow-list (`HOST:PORT` entries), the job's subset of the worker's
//!   ceiling, and which resolved addresses a destination may reach.
//! - [`ledger`]: bytes and connections per destination, refusals, the byte limit.
//! - [`proxy`]: the listener's accept loop, `CONNECT` tunnels and plain HTTP forwarding,
//!   the connection cap and the time limits that keep a slow client from holding it.

pub mod allow;
pub mod ledger;
pub mod proxy;

pub use allow::{AllowList, Destination, EgressError};

/// Where an egress build finds the CA certificates of `[egress] ca`: on the job's private
/// `/tmp` (a tmpfs), so neither the mount point nor the file reaches the build's layer.
pub const BUILD_CA: &str = "/tmp/.corral/egress-ca.pem";
pub use ledger::Ledger;
pub use proxy::{Proxy, ProxyLimits};
