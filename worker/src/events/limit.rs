//! The per-job, per-kind rate limit every event of a job passes: the first occurrence of a
//! kind goes out at once; after it, at most one per window, carrying how many occurrences
//! were held back since the last one sent. A job that trips a limit 10⁵ times a second thus
//! costs the broker one message per kind and window, and the totals stay exact.
//!
//! The clock is a parameter, so the limiter is a pure state machine and tested as one.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use corral_protocol::EventKind;

/// The window of the rate limit: Falco's and journald's order of magnitude, short enough
/// that an ongoing attack is seen again within seconds.
pub const WINDOW: Duration = Duration::from_secs(10);

/// What to do with one occurrence of a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Send it: the first of its kind, or the first after a window, with the occurrences
    /// held back since the last one sent.
    Send { suppressed: u64 },
    /// Hold it back: counted, sent later as part of the next one's `suppressed`.
    Hold,
}

#[derive(Debug, Clone, Copy)]
struct KindState {
    last_sent: Instant,
    /// Held back since `last_sent`.
    pending: u64,
    /// Held back in all, including `pending`.
    held: u64,
}

/// The rate limit of one job.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    window: Duration,
    kinds: BTreeMap<EventKind, KindState>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new(WINDOW)
    }
}

impl RateLimiter {
    pub fn new(window: Duration) -> Self {
        RateLimiter {
            window,
            kinds: BTreeMap::new(),
        }
    }

    /// Decides about one occurrence of `kind` at `now`.
    pub fn admit(&mut self, kind: EventKind, now: Instant) -> Admit {
        let Some(state) = self.kinds.get_mut(&kind) else {
            self.kinds.insert(
                kind,
                KindState {
                    last_sent: now,
                    pending: 0,
                    held: 0,
                },
            );
            return Admit::Send { suppressed: 0 };
        };
        if now.saturating_duration_since(state.last_sent) >= self.window {
            let suppressed = std::mem::take(&mut state.pending);
            state.last_sent = now;
            return Admit::Send { suppressed };
        }
        state.pending += 1;
        state.held += 1;
        Admit::Hold
    }

    /// Whether an occurrence of `kind` was ever admitted.
    pub fn seen(&self, kind: EventKind) -> bool {
        self.kinds.contains_key(&kind)
    }

    /// Occurrences held back and never sent, per kind (kinds without any are left out).
    pub fn held(&self) -> BTreeMap<EventKind, u64> {
        self.kinds
            .iter()
            .filter(|(_, state)| state.held > 0)
            .map(|(kind, state)| (*kind, state.held))
            .collect()
    }

    /// Held back since the last sent one, per kind: what no summary has reported yet.
    pub fn unreported(&self) -> BTreeMap<EventKind, u64> {
        self.kinds
            .iter()
            .filter(|(_, state)| state.pending > 0)
            .map(|(kind, state)| (*kind, state.pending))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_first_goes_out_at_once_then_one_summary_per_window() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(10 * S);
        assert_eq!(
            limiter.admit(EventKind::Oom, t0),
            Admit::Send { suppressed: 0 }
        );
        // A flood within the window is held back and counted.
        for i in 1..=1000u32 {
            assert_eq!(
                limiter.admit(EventKind::Oom, t0 + S * i / 1000 * 9),
                Admit::Hold
            );
        }
        // The first after the window carries what was held back.
        assert_eq!(
            limiter.admit(EventKind::Oom, t0 + 10 * S),
            Admit::Send { suppressed: 1000 }
        );
        assert_eq!(limiter.admit(EventKind::Oom, t0 + 11 * S), Admit::Hold);
        assert_eq!(
            limiter.admit(EventKind::Oom, t0 + 20 * S),
            Admit::Send { suppressed: 1 }
        );
        assert_eq!(limiter.held(), BTreeMap::from([(EventKind::Oom, 1001)]));
        assert!(limiter.unreported().is_empty());
    }

    #[test]
    fn kinds_are_limited_independently() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::default();
        assert_eq!(
            limiter.admit(EventKind::SeccompDenied, t0),
            Admit::Send { suppressed: 0 }
        );
        assert_eq!(
            limiter.admit(EventKind::PidsLimit, t0),
            Admit::Send { suppressed: 0 }
        );
        assert_eq!(limiter.admit(EventKind::SeccompDenied, t0 + S), Admit::Hold);
        assert_eq!(limiter.admit(EventKind::SeccompDenied, t0 + S), Admit::Hold);
        assert!(limiter.seen(EventKind::PidsLimit));
        assert!(!limiter.seen(EventKind::Oom));
        assert_eq!(
            limiter.unreported(),
            BTreeMap::from([(EventKind::SeccompDenied, 2)])
        );
    }

    #[test]
    fn a_flood_of_any_length_sends_one_per_window() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(10 * S);
        let mut sent = 0u64;
        let mut reported = 0u64;
        // 10⁵ occurrences a second for a minute, one every 10 µs.
        let total = 6_000_000u64;
        for i in 0..total {
            let at = t0 + Duration::from_micros(i * 10);
            if let Admit::Send { suppressed } = limiter.admit(EventKind::SeccompDenied, at) {
                sent += 1;
                reported += suppressed;
            }
        }
        assert_eq!(sent, 6, "one at once, then one per 10 s window");
        let unreported: u64 = limiter.unreported().values().sum();
        assert_eq!(sent + reported + unreported, total);
        assert_eq!(
            limiter.held()[&EventKind::SeccompDenied],
            reported + unreported
        );
    }
}
