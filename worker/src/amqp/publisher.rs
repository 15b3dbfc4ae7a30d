//! [`Publisher`]: results, events and log chunks go out on their OWN connection, on a
//! confirm-mode channel, so a resource alarm that blocks publishing never freezes the
//! consumer connection's acks. Every publish is persistent and mandatory and counts only
//! once the broker confirmed it and did not return it as unroutable.
//!
//! One publish is in flight at a time. A `basic.return` carries no delivery tag: with
//! several publishes outstanding on a channel, the client can only pair a return with the
//! next confirm, so an unroutable log chunk could fail a routable result, and an
//! unroutable result could pass as delivered. With one outstanding publish the pairing is
//! exact (and a return naming another exchange or key is ignored, never blamed on ours).

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

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
}

/// How long a confirm may take while the connection is not blocked before the connection is
/// presumed dead and replaced.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

pub struct Publisher {
    /// The broker cluster's nodes, shared with the consumer so both move on together.
    nodes: Arc<Nodes>,
    /// The node of the current connection.
    node: std::sync::atomic::AtomicUsize,
    name: String,
    blocked_wait: Duration,
    link: Mutex<Option<(Arc<Connection>, Channel)>>,
    /// Held from `basic.publish` to its confirm.
    in_flight: Mutex<()>,
}

impl Publisher {
    /// Lazy: connects on the first publish and after every failure.
    pub fn new(nodes: Arc<Nodes>, name: String, blocked_wait: Duration) -> Self {
        Publisher {
            nodes,
            node: std::sync::atomic::AtomicUsize::new(0),
            name,
            blocked_wait,
            link: Mutex::new(None),
            in_flight: Mutex::new(()),
        }
    }

    async fn channel(&self) -> Result<(Arc<Connection>, Channel), PublishError> {
        let mut link = self.link.lock().await;
        if let Some((conn, ch)) = link.as_ref()
            && conn.status().connected()
            && ch.status().connected()
        {
            return Ok((conn.clone(), ch.clone()));
        }
        if let Some((conn, _)) = link.take() {
            let _ = conn.close(320, "replaced".into()).await;
        }
        let props = ConnectionProperties::default().with_connection_name(self.name.clone().into());
        let (i, node) = self.nodes.current();
        let conn = match Connection::connect_uri(node.uri.clone(), props).await {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(node = %node.name, error = %err, "publisher cannot reach this broker node; trying the next one");
                self.nodes.failed(i);
                return Err(PublishError::Connect(err));
            }
        };
        tracing::info!(node = %node.name, "publisher connected");
        self.node.store(i, std::sync::atomic::Ordering::Relaxed);
        let conn = Arc::new(conn);
        let ch = conn.create_channel().await.map_err(PublishError::Connect)?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(PublishError::Connect)?;
        *link = Some((conn.clone(), ch.clone()));
        Ok((conn, ch))
    }

    /// Drops the current connection so the next publish opens a fresh one, on the next
    /// node: a publish that failed on its connection most likely lost the node.
    async fn reset(&self) {
        if let Some((conn, _)) = self.link.lock().await.take() {
            self.nodes
                .failed(self.node.load(std::sync::atomic::Ordering::Relaxed));
            let _ = conn.close(320, "reset after a failed publish".into()).await;
        }
    }

    /// Publishes once and waits for the broker's confirm. While the broker blocks the
    /// connection (`connection.blocked`: memory or disk alarm) the wait is bounded by the
    /// configured blocked wait.
    pub async fn publish(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        let _one_at_a_time = self.in_flight.lock().await;
        let (conn, ch) = self.channel().await?;
        let blocked_since = Instant::now();
        while conn.status().blocked() {
            if blocked_since.elapsed() >= self.blocked_wait {
                return Err(PublishError::Blocked(blocked_since.elapsed()));
            }
            tokio::time::sleep(POLL).await;
        }
        let fail = |source| PublishError::Send {
            exchange: exchange.to_owned(),
            key: key.to_owned(),
            source,
        };
        let opts = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let props = props.with_delivery_mode(2);
        let confirm = match ch
            .basic_publish(exchange.into(), ShortString::from(key), opts, body, props)
            .await
        {
            Ok(confirm) => confirm,
            Err(err) => {
                self.reset().await;
                return Err(fail(err));
            }
        };
        // Wait for the confirm; time spent blocked counts against the blocked wait, the rest
        // against the confirm timeout.
        let mut confirm = std::pin::pin!(confirm);
        let mut unblocked_wait = Duration::ZERO;
        let mut blocked_wait = Duration::ZERO;
        let confirmation = loop {
            match tokio::time::timeout(POLL * 4, &mut confirm).await {
                Ok(Ok(c)) => break c,
                Ok(Err(err)) => {
                    self.reset().await;
                    return Err(fail(err));
                }
                Err(_) if conn.status().blocked() => {
                    blocked_wait += POLL * 4;
                    if blocked_wait >= self.blocked_wait {
                        self.reset().await;
                        return Err(PublishError::Blocked(blocked_wait));
                    }
                }
                Err(_) => {
                    unblocked_wait += POLL * 4;
                    if unblocked_wait >= CONFIRM_TIMEOUT {
                        self.reset().await;
                        return Err(PublishError::ConfirmTimeout(CONFIRM_TIMEOUT));
                    }
                }
            }
        };
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
                // A late return of an earlier, abandoned publish: not ours.
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

    pub async fn close(&self) {
        if let Some((conn, _)) = self.link.lock().await.take() {
            let _ = conn.close(200, "worker stopping".into()).await;
        }
    }
}
