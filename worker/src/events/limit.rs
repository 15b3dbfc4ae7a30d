//! The per-job rate limit every event of a job passes, keyed by kind and, where one kind
//! covers different things (`seccomp_denied`: one key per system call), by its subject: the
//! first occurrence of a key goes out at once; after it, at most one per window, carrying
//! how many occurrences were held back since the last one sent. A job that trips a limit
//! 10⁵ times a second thus costs the broker one message per key and window, and the totals
//! stay exact. So that one noisy call cannot hide a different one, each gets its own key;
//! so that a job cannot flood the broker by trying many calls, a kind has at most
//! [`MAX_SUBJECTS`] subject keys, and the rest share one.
//!
//! The clock is a parameter, so the limiter is a pure state machine and tested as one.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use corral_protocol::EventKind;

/// The window of the rate limit: Falco's and journald's order of magnitude, short enough
/// that an ongoing attack is seen again within seconds.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Subjects of one kind limited apart; beyond them, a kind's further subjects share one key.
/// The seccomp filter refuses a few dozen calls, so a build hitting many is rare and
/// hostile either way, and at most this many plus one messages a window is still a trickle.
pub const MAX_SUBJECTS: usize = 16;

/// What the limit keys on: a kind, and the subject within it when it has one (`None` for
/// kinds without subjects and for the shared key of a kind past [`MAX_SUBJECTS`]).
pub type Key = (EventKind, Option<String>);

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
    keys: BTreeMap<Key, KindState>,
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
            keys: BTreeMap::new(),
        }
    }

    /// Decides about one occurrence of `kind` at `now`.
    pub fn admit(&mut self, kind: EventKind, now: Instant) -> Admit {
        self.admit_about(kind, None, now)
    }

    /// Decides about one occurrence of `kind` about `subject` (e.g. a system call's name)
    /// at `now`.
    pub fn admit_about(&mut self, kind: EventKind, subject: Option<&str>, now: Instant) -> Admit {
        let key = self.key(kind, subject);
        let Some(state) = self.keys.get_mut(&key) else {
            self.keys.insert(
                key,
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

    /// The key of `subject` within `kind`: its own while the kind has fewer than
    /// [`MAX_SUBJECTS`], the kind's shared one after.
    fn key(&self, kind: EventKind, subject: Option<&str>) -> Key {
        let Some(subject) = subject else {
            return (kind, None);
        };
        let own = (kind, Some(subject.to_owned()));
        if self.keys.contains_key(&own) {
            return own;
        }
        let subjects = self
            .keys
            .keys()
            .filter(|(k, s)| *k == kind && s.is_some())
            .count();
        if subjects < MAX_SUBJECTS {
            own
        } else {
            (kind, None)
        }
    }

    /// Whether an occurrence of `kind` was ever admitted.
    pub fn seen(&self, kind: EventKind) -> bool {
        self.keys.keys().any(|(k, _)| *k == kind)
    }

    /// Occurrences held back and never sent, per kind (kinds without any are left out).
    pub fn held(&self) -> BTreeMap<EventKind, u64> {
        self.per_kind(|state| state.held)
    }

    /// Held back since the last sent one, per kind: what no summary has reported yet.
    pub fn unreported(&self) -> BTreeMap<EventKind, u64> {
        self.per_kind(|state| state.pending)
    }

    fn per_kind(&self, count: impl Fn(&KindState) -> u64) -> BTreeMap<EventKind, u64> {
        let mut out = BTreeMap::new();
        for ((kind, _), state) in &self.keys {
            let n = count(state);
            if n > 0 {
                *out.entry(*kind).or_default() += n;
            }
        }
        out
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

    #[test]
    fn one_noisy_call_does_not_hide_another() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(10 * S);
        let denied = EventKind::SeccompDenied;
        assert_eq!(
            limiter.admit_about(denied, Some("keyctl"), t0),
            Admit::Send { suppressed: 0 }
        );
        for _ in 0..1000 {
            assert_eq!(
                limiter.admit_about(denied, Some("keyctl"), t0 + S),
                Admit::Hold
            );
        }
        // A different call within the same window is news, and goes out at once.
        assert_eq!(
            limiter.admit_about(denied, Some("bpf"), t0 + 2 * S),
            Admit::Send { suppressed: 0 }
        );
        assert_eq!(
            limiter.admit_about(denied, Some("bpf"), t0 + 3 * S),
            Admit::Hold
        );
        assert_eq!(limiter.held(), BTreeMap::from([(denied, 1001)]));
        // Each key has its own window.
        assert_eq!(
            limiter.admit_about(denied, Some("keyctl"), t0 + 10 * S),
            Admit::Send { suppressed: 1000 }
        );
        assert_eq!(
            limiter.admit_about(denied, Some("bpf"), t0 + 10 * S),
            Admit::Hold
        );
    }

    #[test]
    fn a_job_trying_many_calls_shares_one_key_past_the_subject_bound() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(10 * S);
        let denied = EventKind::SeccompDenied;
        let mut sent = 0;
        // 10⁵ refusals of 400 different calls within one window.
        for i in 0..100_000u32 {
            let name = format!("call{}", i % 400);
            if let Admit::Send { .. } = limiter.admit_about(denied, Some(&name), t0 + S) {
                sent += 1;
            }
        }
        assert_eq!(sent, MAX_SUBJECTS + 1, "one per subject key and one shared");
        assert_eq!(limiter.held()[&denied] + sent as u64, 100_000);
        // A kind without subjects is not affected.
        assert_eq!(
            limiter.admit(EventKind::Oom, t0 + S),
            Admit::Send { suppressed: 0 }
        );
    }
}
