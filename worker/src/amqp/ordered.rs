//! [`Ordered`]: an ordered stream of confirmed publishes with several confirms outstanding
//! (a job's log chunks, the worker's events). Publishing never waits for a confirm unless
//! the window is full; confirms are settled in publish order, whatever order they arrive in.
//!
//! On a failed publish (a nack, a lost connection, no confirm in time) the stream goes back
//! to the failed message and publishes it and everything after it again, in order
//! ("go-back-N"): a reader that keeps only the message it expects next (by sequence number)
//! sees every message exactly once and in order, and one that keeps everything sees
//! repeats, never a gap it cannot fill. A message that fails `attempts` times is given up
//! and handed back to the caller.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;

use super::publisher::{Pending, PublishError, Publisher};

/// One message of an ordered stream.
#[derive(Debug, Clone)]
pub struct Message {
    pub exchange: String,
    pub key: String,
    pub body: Vec<u8>,
    pub props: BasicProperties,
}

/// Where an ordered stream publishes: sends one message (it returns once the message is
/// on its way) and hands back the wait for its confirm.
pub trait Outlet: Send + Sync {
    fn send<'a>(
        &'a self,
        msg: &'a Message,
    ) -> impl Future<Output = Result<Pending, PublishError>> + Send + 'a;
}

impl Outlet for Arc<Publisher> {
    fn send<'a>(
        &'a self,
        msg: &'a Message,
    ) -> impl Future<Output = Result<Pending, PublishError>> + Send + 'a {
        Publisher::send(self, &msg.exchange, &msg.key, &msg.body, msg.props.clone())
    }
}

/// A message given up after its last attempt.
#[derive(Debug)]
pub struct GaveUp {
    pub message: Message,
    pub error: PublishError,
}

enum State {
    Waiting(Pending),
    Done(Result<(), PublishError>),
}

struct Slot {
    msg: Message,
    failures: u32,
    state: State,
}

/// See the module documentation.
pub struct Ordered<O> {
    outlet: O,
    /// Publishes whose confirm is not settled yet, at most this many.
    window: usize,
    /// Attempts per message before it is given up.
    attempts: u32,
    /// The pause before going back after the n-th failure of a message: `backoff << n-1`.
    backoff: Duration,
    slots: VecDeque<Slot>,
}

impl<O: Outlet> Ordered<O> {
    pub fn new(outlet: O, window: usize, attempts: u32, backoff: Duration) -> Self {
        Ordered {
            outlet,
            window: window.max(1),
            attempts: attempts.max(1),
            backoff,
            slots: VecDeque::new(),
        }
    }

    /// Messages published whose confirm is not settled yet.
    #[cfg(test)]
    pub fn outstanding(&self) -> usize {
        self.slots.len()
    }

    /// Publishes `msg` after those pushed before it. Waits only while the window is full;
    /// returns the messages given up meanwhile.
    pub async fn push(&mut self, msg: Message) -> Vec<GaveUp> {
        let mut gave_up = Vec::new();
        while self.slots.len() >= self.window {
            self.ready().await;
            gave_up.extend(self.settle().await);
        }
        let state = send(&self.outlet, &msg).await;
        self.slots.push_back(Slot {
            msg,
            failures: 0,
            state,
        });
        gave_up
    }

    /// Resolves once the oldest outstanding publish has its confirm (or failed); never
    /// while nothing is outstanding. Cancel-safe: for `select!` next to other work, followed
    /// by [`Ordered::settle`].
    pub async fn ready(&mut self) {
        let Some(slot) = self.slots.front_mut() else {
            return std::future::pending().await;
        };
        if let State::Waiting(confirm) = &mut slot.state {
            let outcome = confirm.await;
            slot.state = State::Done(outcome);
        }
    }

    /// Drops the confirmed messages at the front; on a failed one, goes back to it (after a
    /// pause) or gives it up. Returns the messages given up.
    pub async fn settle(&mut self) -> Vec<GaveUp> {
        let mut gave_up = Vec::new();
        while let Some(front) = self.slots.front_mut() {
            match &mut front.state {
                State::Waiting(_) => break,
                State::Done(Ok(())) => {
                    self.slots.pop_front();
                }
                State::Done(Err(_)) => {
                    front.failures += 1;
                    if front.failures >= self.attempts {
                        let Some(Slot {
                            msg,
                            state: State::Done(Err(error)),
                            ..
                        }) = self.slots.pop_front()
                        else {
                            unreachable!("the front was a failed publish")
                        };
                        gave_up.push(GaveUp {
                            message: msg,
                            error,
                        });
                        continue;
                    }
                    let pause = self.backoff * (1 << (front.failures - 1).min(16));
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                    self.go_back().await;
                }
            }
        }
        gave_up
    }

    /// Waits until every message pushed so far is confirmed or given up.
    pub async fn finish(&mut self) -> Vec<GaveUp> {
        let mut gave_up = Vec::new();
        while !self.slots.is_empty() {
            self.ready().await;
            gave_up.extend(self.settle().await);
        }
        gave_up
    }

    /// Forgets every outstanding message (their confirms are no longer waited for).
    pub fn clear(&mut self) {
        self.slots.clear();
    }

    /// Publishes every outstanding message again, in order, from the oldest.
    async fn go_back(&mut self) {
        for i in 0..self.slots.len() {
            let state = send(&self.outlet, &self.slots[i].msg).await;
            self.slots[i].state = state;
        }
    }
}

/// Publishes `msg`: its confirm to wait for, or the failure as a settled outcome. (A free
/// function: holding `&Ordered` across the await would need its pending confirms `Sync`.)
async fn send<O: Outlet>(outlet: &O, msg: &Message) -> State {
    match outlet.send(msg).await {
        Ok(confirm) => State::Waiting(confirm),
        Err(err) => State::Done(Err(err)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::sync::oneshot;

    use super::*;

    /// A publish's key and the way to confirm it.
    type Confirm = (String, oneshot::Sender<bool>);

    /// An outlet whose confirms the test gives, in any order: `true` acks, `false` nacks.
    #[derive(Default, Clone)]
    struct Fake {
        sent: Arc<Mutex<Vec<String>>>,
        confirms: Arc<Mutex<Vec<Confirm>>>,
    }

    impl Fake {
        fn sent(&self) -> Vec<String> {
            self.sent.lock().unwrap().clone()
        }

        /// Confirms the oldest unconfirmed publish of `key`.
        fn confirm(&self, key: &str, ack: bool) {
            let mut confirms = self.confirms.lock().unwrap();
            let i = confirms
                .iter()
                .position(|(k, _)| k == key)
                .unwrap_or_else(|| panic!("{key} has no confirm outstanding"));
            let (_, tx) = confirms.remove(i);
            // A superseded publish's confirm is no longer listened to.
            let _ = tx.send(ack);
        }
    }

    impl Outlet for Fake {
        fn send<'a>(
            &'a self,
            msg: &'a Message,
        ) -> impl Future<Output = Result<Pending, PublishError>> + Send + 'a {
            let (tx, rx) = oneshot::channel();
            self.sent.lock().unwrap().push(msg.key.clone());
            self.confirms.lock().unwrap().push((msg.key.clone(), tx));
            let exchange = msg.exchange.clone();
            let key = msg.key.clone();
            async move {
                let pending: Pending = Box::pin(async move {
                    match rx.await {
                        Ok(true) => Ok(()),
                        _ => Err(PublishError::Nacked { exchange, key }),
                    }
                });
                Ok(pending)
            }
        }
    }

    fn msg(key: &str) -> Message {
        Message {
            exchange: "x".into(),
            key: key.into(),
            body: Vec::new(),
            props: BasicProperties::default(),
        }
    }

    async fn ready_now(o: &mut Ordered<Fake>) -> bool {
        tokio::time::timeout(Duration::from_millis(20), o.ready())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn publishes_without_waiting_and_settles_confirms_in_publish_order() {
        let fake = Fake::default();
        let mut o = Ordered::new(fake.clone(), 8, 3, Duration::ZERO);
        for k in ["a", "b", "c"] {
            assert!(o.push(msg(k)).await.is_empty());
        }
        assert_eq!(fake.sent(), ["a", "b", "c"], "three in flight at once");
        // Confirms arrive out of order: c, then b. Nothing settles before a's.
        fake.confirm("c", true);
        fake.confirm("b", true);
        assert!(!ready_now(&mut o).await, "a is not confirmed yet");
        assert!(o.settle().await.is_empty());
        assert_eq!(o.outstanding(), 3);
        fake.confirm("a", true);
        assert!(o.finish().await.is_empty());
        assert_eq!(o.outstanding(), 0);
        assert_eq!(fake.sent(), ["a", "b", "c"], "nothing published twice");
    }

    #[tokio::test]
    async fn a_nack_goes_back_to_the_failed_message_and_republishes_the_rest_in_order() {
        let fake = Fake::default();
        let mut o = Ordered::new(fake.clone(), 8, 3, Duration::ZERO);
        for k in ["a", "b", "c", "d"] {
            o.push(msg(k)).await;
        }
        // d is confirmed before b is nacked; a is fine.
        fake.confirm("d", true);
        fake.confirm("a", true);
        fake.confirm("b", false);
        // a settles; then b's nack.
        for _ in 0..2 {
            o.ready().await;
            assert!(o.settle().await.is_empty());
        }
        // b, c and d again, in order, after the originals.
        assert_eq!(fake.sent(), ["a", "b", "c", "d", "b", "c", "d"]);
        // The first c's confirm comes late and is not waited for any more.
        fake.confirm("c", true);
        for k in ["b", "c", "d"] {
            fake.confirm(k, true);
        }
        assert!(o.finish().await.is_empty());
        // A reader keeping only the next expected message gets each once, in order.
        let mut expected = 0;
        let keys = ["a", "b", "c", "d"];
        for k in fake.sent() {
            if keys.get(expected) == Some(&k.as_str()) {
                expected += 1;
            }
        }
        assert_eq!(expected, keys.len());
    }

    #[tokio::test]
    async fn a_message_failing_every_attempt_is_given_up_and_the_rest_go_on() {
        let fake = Fake::default();
        let mut o = Ordered::new(fake.clone(), 8, 2, Duration::ZERO);
        o.push(msg("a")).await;
        o.push(msg("b")).await;
        fake.confirm("a", false);
        o.ready().await;
        assert!(o.settle().await.is_empty(), "one failure of two allowed");
        fake.confirm("b", true); // the first b: superseded
        fake.confirm("a", false);
        o.ready().await;
        let gave_up = o.settle().await;
        assert_eq!(gave_up.len(), 1);
        assert_eq!(gave_up[0].message.key, "a");
        assert!(matches!(gave_up[0].error, PublishError::Nacked { .. }));
        fake.confirm("b", true);
        assert!(o.finish().await.is_empty());
        assert_eq!(fake.sent(), ["a", "b", "a", "b"]);
    }

    #[tokio::test]
    async fn a_full_window_waits_for_the_oldest_confirm() {
        let fake = Fake::default();
        let mut o = Ordered::new(fake.clone(), 2, 3, Duration::ZERO);
        o.push(msg("a")).await;
        o.push(msg("b")).await;
        let confirmer = {
            let fake = fake.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                assert_eq!(fake.sent(), ["a", "b"], "c waits for room in the window");
                fake.confirm("a", true);
            })
        };
        o.push(msg("c")).await;
        confirmer.await.unwrap();
        assert_eq!(fake.sent(), ["a", "b", "c"]);
        assert_eq!(o.outstanding(), 2);
    }
}
