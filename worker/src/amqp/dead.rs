//! Jobs the broker dead-lettered without an answer.
//!
//! A quorum queue counts a job's deliveries and dead-letters it once they pass
//! `x-delivery-limit`. That limit is meant for poison jobs, but the broker also counts the
//! deliveries that died with a worker or a connection (a host killed, a node restarted,
//! connections closed), and no worker answers those: without more, a job caught by enough
//! faults would end in `<prefix>.jobs.dead` and its producer would never hear of it.
//!
//! So the dead-letter exchange (a fanout) feeds a second queue,
//! `<prefix>.jobs.dead.unanswered`, besides the one operators inspect, and every worker
//! consumes it. What a worker dead-lettered itself (`x-death` reason `rejected`) was answered
//! first (`rejected` or `error`) and is dropped here. What the broker dead-lettered
//! (`delivery_limit`, and `expired` or `maxlen` where a policy sets those) goes back to its
//! queue for another round of deliveries, the round counted in a header; after
//! [`ROUNDS`] rounds it is answered `error`. A round re-runs the job, and jobs are
//! deterministic, so a result an earlier round published before its ack was lost is repeated,
//! not contradicted.

use lapin::types::{AMQPValue, FieldTable};

/// The header counting the rounds a job went through the dead-letter queue.
pub const ROUNDS_HEADER: &str = "corral-dead-letter-rounds";

/// Rounds of `x-delivery-limit` deliveries before a job the broker gave up on is answered.
pub const ROUNDS: u32 = 3;

/// What to do with a message on the unanswered queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A worker dead-lettered it after answering, or it carries no `x-death`: drop it.
    Answered,
    /// Back to `queue` for round `round` of deliveries.
    Retry { queue: String, round: u32 },
    /// Answer `error`: the broker gave up on it `rounds` times, last for `reason`.
    GiveUp { rounds: u32, reason: String },
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn number(value: &AMQPValue) -> Option<u64> {
    match *value {
        AMQPValue::ShortShortUInt(n) => Some(u64::from(n)),
        AMQPValue::ShortUInt(n) => Some(u64::from(n)),
        AMQPValue::LongUInt(n) => Some(u64::from(n)),
        AMQPValue::ShortShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongLongInt(n) => u64::try_from(n).ok(),
        _ => None,
    }
}

/// The rounds a message went through already (its [`ROUNDS_HEADER`]).
pub fn rounds(headers: Option<&FieldTable>) -> u32 {
    headers
        .and_then(|h| h.inner().get(ROUNDS_HEADER))
        .and_then(number)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// Decides from the message's headers: the latest `x-death` entry (the broker puts it
/// first) names the reason and the queue it died in.
pub fn decide(headers: Option<&FieldTable>, max_rounds: u32) -> Decision {
    let latest = headers
        .and_then(|h| h.inner().get("x-death"))
        .and_then(|d| match d {
            AMQPValue::FieldArray(a) => a.as_slice().first().cloned(),
            _ => None,
        });
    let Some(AMQPValue::FieldTable(death)) = latest else {
        return Decision::Answered;
    };
    let field = |k: &str| death.inner().get(k).and_then(text);
    let (Some(reason), Some(queue)) = (field("reason"), field("queue")) else {
        return Decision::Answered;
    };
    if reason == "rejected" {
        return Decision::Answered;
    }
    let done = rounds(headers);
    if done + 1 >= max_rounds {
        Decision::GiveUp {
            rounds: done + 1,
            reason,
        }
    } else {
        Decision::Retry {
            queue,
            round: done + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    fn died(reason: &str, rounds: Option<AMQPValue>) -> FieldTable {
        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        death.insert(
            "queue".into(),
            AMQPValue::LongString(LongString::from("corral.jobs.default")),
        );
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        if let Some(n) = rounds {
            headers.insert(ROUNDS_HEADER.into(), n);
        }
        headers
    }

    #[test]
    fn what_a_worker_rejected_was_answered() {
        assert_eq!(decide(Some(&died("rejected", None)), 3), Decision::Answered);
        assert_eq!(decide(None, 3), Decision::Answered);
        assert_eq!(decide(Some(&FieldTable::default()), 3), Decision::Answered);
    }

    #[test]
    fn what_the_broker_gave_up_on_goes_round_again_then_is_answered() {
        assert_eq!(
            decide(Some(&died("delivery_limit", None)), 3),
            Decision::Retry {
                queue: "corral.jobs.default".into(),
                round: 1
            }
        );
        assert_eq!(
            decide(
                Some(&died("delivery_limit", Some(AMQPValue::LongUInt(1)))),
                3
            ),
            Decision::Retry {
                queue: "corral.jobs.default".into(),
                round: 2
            }
        );
        // A producer's client may type the number otherwise.
        assert_eq!(
            decide(Some(&died("expired", Some(AMQPValue::LongLongInt(2)))), 3),
            Decision::GiveUp {
                rounds: 3,
                reason: "expired".into()
            }
        );
        assert_eq!(
            decide(Some(&died("maxlen", None)), 1),
            Decision::GiveUp {
                rounds: 1,
                reason: "maxlen".into()
            }
        );
    }
}
