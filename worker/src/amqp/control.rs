//! [`Flights`]: the jobs this worker holds (waiting for a build slot, building, or storing
//! and answering) and the cancels it has heard of. The control fanout delivers every Cancel
//! to every worker, so a cancel for a job that is not held here is remembered for a while:
//! the job may still be queued and reach this worker later, which then answers `cancelled`
//! without building.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_protocol::JobId;

use crate::job::{Stop, Stopper};

/// One job held: from its delivery's decode until its build is over and answered.
#[derive(Debug)]
pub struct Flight {
    pub job_id: JobId,
    pub session: u64,
    /// Stops the build; the first cause wins.
    pub stop: Stopper,
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
            stop: Stopper::new(),
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
                flight.stop.stop(Stop::Cancel(reason.clone()));
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
    pub fn stop_all(&self, session: Option<u64>, cause: Stop) {
        for flight in lock(&self.running).values() {
            if session.is_none_or(|s| s == flight.session) {
                flight.stop.stop(cause.clone());
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
        flights.stop_all(Some(1), Stop::Lost);
        assert_eq!(flight.stop.cause(), Some(&Stop::Cancel(None)));
        assert!(flight.stop.is_stopped());
        flights.finish(id);
        assert_eq!(flights.running(), 0);
        assert!(flights.was_cancelled(&job, Duration::from_secs(60)));
        assert!(!flights.was_cancelled(&JobId::new("j2").unwrap(), Duration::from_secs(60)));
    }
}
