//! [`Flights`]: the builds running on this worker and the cancels it has heard of. The
//! control fanout delivers every Cancel to every worker, so a cancel for a job that is not
//! running here is remembered for a while: the job may still be queued and reach this
//! worker later, which then answers `cancelled` without building.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use corral_protocol::JobId;
use tokio_util::sync::CancellationToken;

/// Why a build was stopped from outside. The first cause wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// A Cancel message: the job ends `cancelled`.
    CancelMessage(Option<String>),
    /// The build wrote more than `limits.log_bytes`: the job ends `killed` / `log_limit`.
    LogLimit,
    /// The delivery died with its connection or channel: no result, the broker redelivers.
    Lost,
    /// The drain deadline passed or a second signal came: requeued for another worker.
    Drain,
}

/// One running build.
#[derive(Debug)]
pub struct Flight {
    pub job_id: JobId,
    pub session: u64,
    pub token: CancellationToken,
    cause: OnceLock<Cause>,
}

impl Flight {
    /// Stops the build for `cause` unless it was already stopped for another.
    pub fn stop(&self, cause: Cause) {
        let _ = self.cause.set(cause);
        self.token.cancel();
    }

    pub fn cause(&self) -> Option<&Cause> {
        self.cause.get()
    }
}

#[derive(Debug, Default)]
pub struct Flights {
    next: AtomicU64,
    running: Mutex<HashMap<u64, Arc<Flight>>>,
    cancelled: Mutex<HashMap<JobId, Instant>>,
}

impl Flights {
    pub fn start(&self, job_id: JobId, session: u64) -> (u64, Arc<Flight>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let flight = Arc::new(Flight {
            job_id,
            session,
            token: CancellationToken::new(),
            cause: OnceLock::new(),
        });
        lock(&self.running).insert(id, flight.clone());
        (id, flight)
    }

    pub fn finish(&self, id: u64) {
        lock(&self.running).remove(&id);
    }

    pub fn running(&self) -> usize {
        lock(&self.running).len()
    }

    /// A Cancel message arrived: stop the job if it runs here, and remember it either way
    /// (a redelivered copy must not build again).
    pub fn cancel(&self, job_id: &JobId, reason: Option<String>, memory: Duration) -> bool {
        let now = Instant::now();
        {
            let mut cancelled = lock(&self.cancelled);
            cancelled.retain(|_, at| now.duration_since(*at) < memory);
            cancelled.insert(job_id.clone(), now);
        }
        let mut hit = false;
        for flight in lock(&self.running).values() {
            if &flight.job_id == job_id {
                flight.stop(Cause::CancelMessage(reason.clone()));
                hit = true;
            }
        }
        hit
    }

    pub fn was_cancelled(&self, job_id: &JobId, memory: Duration) -> bool {
        lock(&self.cancelled)
            .get(job_id)
            .is_some_and(|at| at.elapsed() < memory)
    }

    /// Stops every build of `session` (its deliveries died), or of every session.
    pub fn stop_all(&self, session: Option<u64>, cause: Cause) {
        for flight in lock(&self.running).values() {
            if session.is_none_or(|s| s == flight.session) {
                flight.stop(cause.clone());
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these maps leaves them consistent (single inserts/removes).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_cause_wins_and_cancels_are_remembered() {
        let flights = Flights::default();
        let job = JobId::new("j1").unwrap();
        let (id, flight) = flights.start(job.clone(), 1);
        assert!(flights.cancel(&job, None, Duration::from_secs(60)));
        flights.stop_all(Some(1), Cause::Lost);
        assert_eq!(flight.cause(), Some(&Cause::CancelMessage(None)));
        assert!(flight.token.is_cancelled());
        flights.finish(id);
        assert_eq!(flights.running(), 0);
        assert!(flights.was_cancelled(&job, Duration::from_secs(60)));
        assert!(!flights.was_cancelled(&JobId::new("j2").unwrap(), Duration::from_secs(60)));
    }
}
