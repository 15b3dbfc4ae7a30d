//! What went through a build's proxy: bytes each way and connections per destination,
//! refusals, and the job's `limits.network_bytes` (in plus out). Past the limit the ledger
//! cuts: every connection of the job ends and the build is stopped (`network_limit`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use corral_protocol::{DestinationUsage, NetworkUsage};
use tokio_util::sync::CancellationToken;

/// Which way bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the destination to the build.
    In,
    /// From the build to the destination.
    Out,
}

#[derive(Debug)]
pub struct Ledger {
    limit: u64,
    total: AtomicU64,
    usage: Mutex<NetworkUsage>,
    rows: Mutex<BTreeMap<String, DestinationUsage>>,
    cut: CancellationToken,
}

impl Ledger {
    /// A ledger for a job that may move `limit` bytes.
    pub fn new(limit: u64) -> Ledger {
        Ledger {
            limit,
            total: AtomicU64::new(0),
            usage: Mutex::new(NetworkUsage::default()),
            rows: Mutex::new(BTreeMap::new()),
            cut: CancellationToken::new(),
        }
    }

    /// Cancelled once the job passed its limit.
    pub fn cut(&self) -> &CancellationToken {
        &self.cut
    }

    /// Whether the job passed its limit.
    pub fn limit_passed(&self) -> bool {
        self.cut.is_cancelled()
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn row<T>(&self, destination: &str, f: impl FnOnce(&mut DestinationUsage) -> T) -> T {
        let mut rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        let row = rows
            .entry(destination.to_owned())
            .or_insert_with(|| DestinationUsage {
                destination: destination.to_owned(),
                ..DestinationUsage::default()
            });
        f(row)
    }

    fn totals<T>(&self, f: impl FnOnce(&mut NetworkUsage) -> T) -> T {
        f(&mut self.usage.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A connection to `destination` at `address` was made.
    pub fn connected(&self, destination: &str, address: &str) {
        self.row(destination, |r| {
            r.connections += 1;
            address.clone_into(&mut r.address);
        });
        self.totals(|u| u.connections += 1);
    }

    /// A request was refused; `destination` when it named one.
    pub fn denied(&self, destination: Option<&str>) {
        if let Some(d) = destination {
            self.row(d, |r| r.denied += 1);
        }
        self.totals(|u| u.denied += 1);
    }

    /// Counts `n` bytes about to be passed on. `false` when they would take the job past
    /// its limit: they are not passed on, and the job's connections are cut.
    pub fn pass(&self, destination: &str, direction: Direction, n: u64) -> bool {
        let before = self.total.fetch_add(n, Ordering::SeqCst);
        if before.saturating_add(n) > self.limit {
            self.cut.cancel();
            return false;
        }
        self.row(destination, |r| match direction {
            Direction::In => r.bytes_in += n,
            Direction::Out => r.bytes_out += n,
        });
        self.totals(|u| match direction {
            Direction::In => u.bytes_in += n,
            Direction::Out => u.bytes_out += n,
        });
        true
    }

    /// The usage so far, destinations sorted.
    pub fn usage(&self) -> NetworkUsage {
        let mut usage = self.totals(|u| u.clone());
        usage.destinations = self
            .rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_destination_and_cuts_at_the_limit() {
        let ledger = Ledger::new(100);
        ledger.connected("b.test:443", "192.0.2.7:443");
        assert!(ledger.pass("b.test:443", Direction::Out, 10));
        assert!(ledger.pass("b.test:443", Direction::In, 80));
        ledger.denied(Some("a.test:22"));
        ledger.denied(None);
        assert!(!ledger.limit_passed());
        assert!(!ledger.pass("b.test:443", Direction::In, 11));
        assert!(ledger.limit_passed());
        let usage = ledger.usage();
        assert_eq!(
            (
                usage.bytes_in,
                usage.bytes_out,
                usage.connections,
                usage.denied
            ),
            (80, 10, 1, 2)
        );
        let rows: Vec<_> = usage
            .destinations
            .iter()
            .map(|r| (r.destination.as_str(), r.bytes_in, r.denied))
            .collect();
        assert_eq!(rows, [("a.test:22", 0, 1), ("b.test:443", 80, 0)]);
    }
}
