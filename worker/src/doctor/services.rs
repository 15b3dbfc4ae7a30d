//! The services a config names: the broker (connect with the worker's credentials, then
//! look for the topology without declaring anything) and the store (open it and ask it
//! for a blob, which needs the same access a build's upload does).

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;

use super::Check;
use crate::config::Config;

const TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn broker(config: &Config) -> Check {
    let id = "broker";
    let amqp = &config.amqp;
    let url = amqp.url.to_string();
    let props = ConnectionProperties::default().with_connection_name("corral doctor".into());
    let connected =
        tokio::time::timeout(TIMEOUT, Connection::connect(&amqp.connection_uri(), props)).await;
    let conn = match connected {
        Err(_) => {
            return Check::fail(
                id,
                format!("no answer from {url} within {}s", TIMEOUT.as_secs()),
                "check amqp.url and that the broker is up and reachable from this host",
            );
        }
        Ok(Err(err)) => {
            let text = err.to_string();
            let refused = text.contains("ACCESS_REFUSED") || text.contains("403");
            return Check::fail(
                id,
                format!("connecting to {url}: {text}"),
                if refused {
                    "the broker refused the credentials: check the user in amqp.url and \
                     amqp.password_file, and that the user may use the vhost"
                } else {
                    "check amqp.url and that the broker is up and reachable from this host"
                },
            );
        }
        Ok(Ok(conn)) => conn,
    };
    let exchanges = [
        (&amqp.jobs_exchange, ExchangeKind::Direct),
        (&amqp.dead_letter_exchange, ExchangeKind::Fanout),
        (&amqp.results_exchange, ExchangeKind::Topic),
        (&amqp.events_exchange, ExchangeKind::Topic),
        (&amqp.logs_exchange, ExchangeKind::Topic),
        (&amqp.control_exchange, ExchangeKind::Fanout),
    ];
    let mut missing = Vec::new();
    let mut present = Vec::new();
    // A passive declare that fails closes its channel: one channel per name.
    for (name, kind) in exchanges {
        let found = match conn.create_channel().await {
            Ok(ch) => ch
                .exchange_declare(
                    name.as_str().into(),
                    kind,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .is_ok(),
            Err(_) => false,
        };
        let label = format!("exchange {name}");
        if found {
            present.push(label)
        } else {
            missing.push(label)
        }
    }
    for name in [&amqp.jobs_queue, &amqp.dead_letter_queue] {
        let found = match conn.create_channel().await {
            Ok(ch) => ch
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .is_ok(),
            Err(_) => false,
        };
        let label = format!("queue {name}");
        if found {
            present.push(label)
        } else {
            missing.push(label)
        }
    }
    let _ = conn.close(200, "doctor done".into()).await;
    let details = json!({ "url": url, "present": present, "missing": missing });
    if missing.is_empty() {
        Check::ok(
            id,
            format!(
                "connected to {url}; the topology is declared ({} names)",
                present.len()
            ),
        )
        .with_details(details)
    } else {
        Check::warn(
            id,
            format!(
                "connected to {url}; not declared yet: {}",
                missing.join(", ")
            ),
            "a worker declares them when it starts (`corral work`); a producer publishing \
             before that has its jobs dropped",
        )
        .with_details(details)
    }
}

/// The other nodes of a broker cluster (`amqp.url` as a list): each must answer, or the
/// workers' failover has nowhere to go when the first node fails.
pub(super) async fn broker_nodes(config: &Config) -> Check {
    let id = "broker_nodes";
    let amqp = &config.amqp;
    let uris = amqp.connection_uris();
    let mut answering = Vec::new();
    let mut silent = Vec::new();
    for (url, uri) in amqp.urls().zip(&uris).skip(1) {
        let props = ConnectionProperties::default().with_connection_name("corral doctor".into());
        match tokio::time::timeout(TIMEOUT, Connection::connect(uri, props)).await {
            Ok(Ok(conn)) => {
                let _ = conn.close(200, "doctor done".into()).await;
                answering.push(url.to_string());
            }
            Ok(Err(err)) => silent.push(format!("{url} ({err})")),
            Err(_) => silent.push(format!("{url} (no answer within {}s)", TIMEOUT.as_secs())),
        }
    }
    let details = json!({ "answering": answering, "silent": silent });
    if silent.is_empty() {
        Check::ok(
            id,
            format!(
                "the other {} node(s) of the broker cluster answer",
                answering.len()
            ),
        )
        .with_details(details)
    } else {
        Check::warn(
            id,
            format!("broker nodes not answering: {}", silent.join(", ")),
            "the worker fails over past them, but a cluster short of nodes may lose its \
             quorum: check that every node in amqp.url is up and reachable from this host",
        )
        .with_details(details)
    }
}

pub(super) async fn store(config: &Config) -> Check {
    let id = "store";
    let url = config.store.url.to_string();
    let details = json!({ "url": url });
    let opened = tokio::time::timeout(TIMEOUT, crate::job::open_store(config)).await;
    let store = match opened {
        Err(_) => {
            return Check::fail(
                id,
                format!("no answer from {url} within {}s", TIMEOUT.as_secs()),
                "check store.url and that the registry is up",
            )
            .with_details(details);
        }
        Ok(Err(err)) => {
            return Check::fail(
                id,
                format!("opening {url}: {}", crate::job::error_chain(&err)),
                "check store.url, its credentials, and that the registry is up (or the \
                 directory writable)",
            )
            .with_details(details);
        }
        Ok(Ok(store)) => store,
    };
    // The digest of no bytes: asking for it needs the read access every build uses.
    let probe: corral_protocol::Digest =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            .parse()
            .expect("a valid digest");
    match tokio::time::timeout(TIMEOUT, store.has_blob(&probe)).await {
        Ok(Ok(_)) => Check::ok(id, format!("{url} answers")).with_details(details),
        Ok(Err(err)) => Check::fail(
            id,
            format!("asking {url} for a blob: {}", crate::job::error_chain(&err)),
            "check store.url and its credentials (store.username, store.password_file)",
        )
        .with_details(details),
        Err(_) => Check::fail(
            id,
            format!("no answer from {url} within {}s", TIMEOUT.as_secs()),
            "check store.url and that the registry is up",
        )
        .with_details(details),
    }
}
