//! [`Publisher`]: results, events and log chunks go out on their OWN connection, on
//! confirm-mode channels, so a resource alarm that blocks publishing never freezes the
//! consumer connection's acks. Every publish is persistent and counts only once the broker
//! confirmed it.
//!
//! Two kinds of publish, on separate channels of that connection:
//!
//! - [`Publisher::publish`] (results, replies): mandatory, and the caller waits for its
//!   confirm. A `basic.return` carries no delivery tag, and the client pairs a return with
//!   the next confirm of its channel, so each mandatory publish has a channel of its own
//!   while it is in flight (a small pool): the pairing is exact, and results of concurrent
//!   jobs are in flight together instead of queueing behind each other or behind logs.
//! - [`Publisher::send`] (log chunks, events): not mandatory (nobody following a job's log
//!   or subscribed to an event kind is fine, so a return would only be ignored), pipelined on
//!   one channel: it returns once the message is on its way, with a [`Pending`] confirm to
//!   wait for later, so many are in flight at once. Without `mandatory` the broker never
//!   returns them, so no return can be paired with the wrong confirm. [`super::ordered`]
//!   keeps such a stream in order across failures.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
};
use tokio::sync::{Mutex, Semaphore};

use super::settings::Nodes;

/// Why one publish did not count.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("connecting the publisher: {0}")]
    Connect(#[source] lapin::Error),
    #[error("publishing to {exchange:?} with key {key:?}: {source}")]
    Send {
        exchange: String,
        key: String,
        #[source]
        source: lapin::Error,
    },
    #[error(
        "the broker returned the message to {exchange:?} with key {key:?} as unroutable ({reply})"
    )]
    Unroutable {
        exchange: String,
        key: String,
        reply: String,
    },
    #[error("the broker refused (nack) the message to {exchange:?} with key {key:?}")]
    Nacked { exchange: String, key: String },
    #[error("the broker has blocked publishing ({0:?} so far); giving up this attempt")]
    Blocked(Duration),
    #[error("no confirm from the broker within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("the broker node did not let the publisher in within {0:?}")]
    ConnectTimeout(Duration),
}

/// The broker's confirm of one [`Publisher::send`], to wait for when it matters.
pub type Pending = Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send>>;

/// How long a confirm may take while the connection is not blocked before the connection is
/// presumed dead and replaced.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);
/// Mandatory publishes in flight at once, each on its own channel.
const MANDATORY_CHANNELS: usize = 8;
/// Nacks in a row on one connection after which it is replaced (on the next node).
const NACKS_BEFORE_RESET: u64 = 3;
/// How long closing a channel or connection the publisher gives up may take.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Bounds connecting and opening a confirm channel: a node killed while the publisher
/// connects may never answer, and every publish waits behind the connection being made.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// One connection of the publisher and its channels.
#[derive(Clone)]
struct Link {
    /// Tells this connection from its successors: a publish that failed on an old one does
    /// not close the new one.
    generation: u64,
    node: usize,
    conn: Arc<Connection>,
    /// The pipelined channel of [`Publisher::send`]. Its lock is held across each
    /// `basic.publish` call: lapin numbers a publish before queueing its frames, so two
    /// concurrent calls could be numbered in one order and sent in the other.
    stream: Arc<Mutex<Channel>>,
    /// Idle channels for mandatory publishes, one publish in flight on each.
    idle: Arc<std::sync::Mutex<Vec<Channel>>>,
    /// Publishes nacked since the last one the broker took.
    nacks: Arc<AtomicU64>,
}

pub struct Publisher {
    /// The broker cluster's nodes, shared with the consumer so both move on together.
    nodes: Arc<Nodes>,
    name: String,
    blocked_wait: Duration,
    link: Mutex<Option<Link>>,
    generations: AtomicU64,
    /// Channels taken for mandatory publishes.
    mandatory: Semaphore,
}

impl Publisher {
    /// Lazy: connects on the first publish and after every failure.
    pub fn new(nodes: Arc<Nodes>, name: String, blocked_wait: Duration) -> Self {
        Publisher {
            nodes,
            name,
            blocked_wait,
            link: Mutex::new(None),
            generations: AtomicU64::new(0),
            mandatory: Semaphore::new(MANDATORY_CHANNELS),
        }
    }

    async fn link(&self) -> Result<Link, PublishError> {
        let mut link = self.link.lock().await;
        if let Some(current) = link.as_ref()
            && current.conn.status().connected()
        {
            return Ok(current.clone());
        }
        if let Some(old) = link.take() {
            let _ = tokio::time::timeout(CLOSE_WAIT, old.conn.close(320, "replaced".into())).await;
        }
        let props = ConnectionProperties::default().with_connection_name(self.name.clone().into());
        let (i, node) = self.nodes.current();
        let connect = Connection::connect_uri(node.uri.clone(), props);
        let connected = match tokio::time::timeout(CONNECT_WAIT, connect).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(err)) => Err(PublishError::Connect(err)),
            Err(_) => Err(PublishError::ConnectTimeout(CONNECT_WAIT)),
        };
        let conn = match connected {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(node = %node.name, error = %err, "publisher cannot reach this broker node; trying the next one");
                self.nodes.failed(i);
                return Err(err);
            }
        };
        tracing::info!(node = %node.name, "publisher connected");
        let conn = Arc::new(conn);
        let stream = match confirm_channel(&conn).await {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(node = %node.name, error = %err, "publisher connected but got no channel; trying the next node");
                self.nodes.failed(i);
                let _ =
                    tokio::time::timeout(CLOSE_WAIT, conn.close(320, "no channel".into())).await;
                return Err(err);
            }
        };
        let current = Link {
            generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
            node: i,
            conn,
            stream: Arc::new(Mutex::new(stream)),
            idle: Arc::default(),
            nacks: Arc::default(),
        };
        *link = Some(current.clone());
        Ok(current)
    }

    /// Drops the connection `failed` so the next publish opens a fresh one, on the next
    /// node: a publish that failed on its connection most likely lost the node. A newer
    /// connection is left alone.
    async fn reset(&self, failed: &Link) {
        let mut link = self.link.lock().await;
        if link
            .as_ref()
            .is_some_and(|current| current.generation == failed.generation)
        {
            link.take();
            self.nodes.failed(failed.node);
            // Bounded: a node that stopped answering never sends close-ok.
            let _ = tokio::time::timeout(
                CLOSE_WAIT,
                failed
                    .conn
                    .close(320, "reset after a failed publish".into()),
            )
            .await;
        }
    }

    /// A publish that failed on `link`: the connection is replaced, the error names where
    /// the message was going.
    async fn send_failed(
        &self,
        link: &Link,
        source: lapin::Error,
        exchange: &str,
        key: &str,
    ) -> PublishError {
        self.reset(link).await;
        PublishError::Send {
            exchange: exchange.to_owned(),
            key: key.to_owned(),
            source,
        }
    }

    /// Waits while the broker blocks the connection (`connection.blocked`: memory or disk
    /// alarm), at most the configured blocked wait.
    async fn unblocked(&self, conn: &Connection) -> Result<(), PublishError> {
        let blocked_since = Instant::now();
        while conn.status().blocked() {
            if blocked_since.elapsed() >= self.blocked_wait {
                return Err(PublishError::Blocked(blocked_since.elapsed()));
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    /// Waits for the broker's confirm of a publish on `link`. Time spent blocked counts
    /// against the blocked wait, the rest against the confirm timeout; a failure replaces
    /// the connection.
    async fn confirmed(
        &self,
        link: &Link,
        confirm: PublisherConfirm,
        exchange: &str,
        key: &str,
    ) -> Result<Confirmation, PublishError> {
        let mut confirm = std::pin::pin!(confirm);
        let mut unblocked_wait = Duration::ZERO;
        let mut blocked_wait = Duration::ZERO;
        loop {
            match tokio::time::timeout(POLL * 4, &mut confirm).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(source)) => {
                    return Err(self.send_failed(link, source, exchange, key).await);
                }
                Err(_) if link.conn.status().blocked() => {
                    blocked_wait += POLL * 4;
                    if blocked_wait >= self.blocked_wait {
                        self.reset(link).await;
                        return Err(PublishError::Blocked(blocked_wait));
                    }
                }
                Err(_) => {
                    unblocked_wait += POLL * 4;
                    if unblocked_wait >= CONFIRM_TIMEOUT {
                        self.reset(link).await;
                        return Err(PublishError::ConfirmTimeout(CONFIRM_TIMEOUT));
                    }
                }
            }
        }
    }

    /// Publishes once, mandatory, and waits for the broker's confirm: `Ok` only when the
    /// broker took the message and routed it to a queue.
    pub async fn publish(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        let _channel = self
            .mandatory
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let link = self.link().await?;
        self.unblocked(&link.conn).await?;
        let idle = link.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let ch = match idle {
            Some(ch) if ch.status().connected() => ch,
            _ => match confirm_channel(&link.conn).await {
                Ok(ch) => ch,
                Err(err) => {
                    self.reset(&link).await;
                    return Err(err);
                }
            },
        };
        let opts = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirmation = async {
            let confirm = match ch
                .basic_publish(
                    exchange.into(),
                    ShortString::from(key),
                    opts,
                    body,
                    props.with_delivery_mode(2),
                )
                .await
            {
                Ok(confirm) => confirm,
                Err(source) => {
                    return Err(self.send_failed(&link, source, exchange, key).await);
                }
            };
            self.confirmed(&link, confirm, exchange, key).await
        }
        .await?;
        if confirmation.is_nack() {
            // The broker could not take it into a queue through this channel. Seen with
            // RabbitMQ 3.10: a channel opened while a quorum queue elected its leader had
            // every later publish to that queue nacked, for minutes. The next try gets a fresh
            // channel, and nacks in a row a fresh connection.
            close_channel(ch);
            self.nacked(&link).await;
        } else {
            link.nacks.store(0, Ordering::Relaxed);
            // Its one publish is settled: the channel can carry the next.
            link.idle.lock().unwrap_or_else(|e| e.into_inner()).push(ch);
        }
        mandatory_outcome(confirmation, exchange, key)
    }

    /// A publish on `link` was nacked: after [`NACKS_BEFORE_RESET`] in a row the
    /// connection is replaced, on the next node.
    async fn nacked(&self, link: &Link) {
        let nacks = link.nacks.fetch_add(1, Ordering::Relaxed) + 1;
        if nacks >= NACKS_BEFORE_RESET {
            tracing::warn!(
                nacks,
                "the broker nacks every publish on this connection; replacing it"
            );
            self.reset(link).await;
        }
    }

    /// Publishes once, not mandatory, on the pipelined channel: returns as soon as the
    /// message is on its way, with its confirm to wait for. An unroutable message is
    /// confirmed like any other (and dropped by the broker).
    pub async fn send(
        self: &Arc<Self>,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<Pending, PublishError> {
        let link = self.link().await?;
        self.unblocked(&link.conn).await?;
        let published = {
            let ch = link.stream.lock().await;
            ch.basic_publish(
                exchange.into(),
                ShortString::from(key),
                BasicPublishOptions::default(),
                body,
                props.with_delivery_mode(2),
            )
            .await
        };
        let confirm = match published {
            Ok(confirm) => confirm,
            Err(source) => {
                return Err(self.send_failed(&link, source, exchange, key).await);
            }
        };
        let this = self.clone();
        let (exchange, key) = (exchange.to_owned(), key.to_owned());
        Ok(Box::pin(async move {
            let confirmation = this.confirmed(&link, confirm, &exchange, &key).await?;
            if confirmation.is_nack() {
                // The pipelined channel is shared: nacks in a row replace the connection.
                this.nacked(&link).await;
                return Err(PublishError::Nacked { exchange, key });
            }
            link.nacks.store(0, Ordering::Relaxed);
            Ok(())
        }))
    }

    pub async fn close(&self) {
        if let Some(link) = self.link.lock().await.take() {
            let _ = link.conn.close(200, "worker stopping".into()).await;
        }
    }
}

/// Closes a channel the publisher gives up, in the background and bounded: nothing waits
/// for the broker's close-ok.
fn close_channel(ch: Channel) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(CLOSE_WAIT, ch.close(200, "nacked".into())).await;
    });
}

async fn confirm_channel(conn: &Connection) -> Result<Channel, PublishError> {
    let open = async {
        let ch = conn.create_channel().await.map_err(PublishError::Connect)?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(PublishError::Connect)?;
        Ok(ch)
    };
    tokio::time::timeout(CONNECT_WAIT, open)
        .await
        .map_err(|_| PublishError::ConnectTimeout(CONNECT_WAIT))?
}

/// What the confirm of a mandatory publish on a channel of its own says. The channel had
/// no other publish in flight, so a returned message is this one's (a return naming
/// another exchange or key is not blamed on it).
#[allow(clippy::result_large_err)] // the one error type of every publish, returned as is
fn mandatory_outcome(
    confirmation: Confirmation,
    exchange: &str,
    key: &str,
) -> Result<(), PublishError> {
    if confirmation.is_nack() {
        return Err(PublishError::Nacked {
            exchange: exchange.to_owned(),
            key: key.to_owned(),
        });
    }
    if let Some(returned) = confirmation.take_message() {
        if returned.delivery.exchange.as_str() != exchange
            || returned.delivery.routing_key.as_str() != key
        {
            tracing::debug!(
                exchange = returned.delivery.exchange.as_str(),
                key = returned.delivery.routing_key.as_str(),
                "ignoring a returned message that belongs to another publish"
            );
            return Ok(());
        }
        return Err(PublishError::Unroutable {
            exchange: exchange.to_owned(),
            key: key.to_owned(),
            reply: format!("{} {}", returned.reply_code, returned.reply_text),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::settings::Node;

    /// A node that takes the TCP connection and never speaks AMQP (a broker killed or
    /// frozen while the publisher connects): the publish fails with a timeout, the node is
    /// marked failed, and the publisher moves on, instead of every later publish waiting
    /// behind that connection for ever.
    #[tokio::test]
    async fn a_node_that_never_answers_fails_the_publish_instead_of_hanging_it() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let node = |name: &str, port: u16| Node {
            uri: format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
                .parse()
                .unwrap(),
            name: name.into(),
        };
        let nodes = Arc::new(Nodes::new(vec![node("silent", port), node("next", port)]));
        let publisher = Arc::new(Publisher::new(
            nodes.clone(),
            "test".into(),
            Duration::from_secs(1),
        ));
        let sent = publisher
            .send("", "q", b"x", BasicProperties::default())
            .await;
        assert!(
            matches!(sent, Err(PublishError::ConnectTimeout(_))),
            "{:?}",
            sent.err()
        );
        assert_eq!(
            nodes.current().1.name,
            "next",
            "the silent node is passed over"
        );
        drop(silent);
    }
}
