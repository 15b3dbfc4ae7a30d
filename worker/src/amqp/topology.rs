//! The broker topology, declared idempotently at every (re)connect: redeclaring with the same
//! arguments is a no-op, and a deleted queue comes back.
//!
//! | name | kind |
//! |---|---|
//! | `<prefix>.jobs` | direct exchange, routing key = pool |
//! | `<prefix>.jobs.<pool>` | durable quorum queue: `x-delivery-limit`, dead-letters to `<prefix>.dead` |
//! | `<prefix>.dead` → `<prefix>.jobs.dead` | fanout exchange + durable queue of poison and invalid jobs |
//! | `<prefix>.results` | topic exchange, key `<project>.<job_id>` |
//! | `<prefix>.events` | topic exchange, key `<severity>.<kind>.<project>` |
//! | `<prefix>.logs` | topic exchange, key `<project>.<job_id>` |
//! | `<prefix>.control` | fanout exchange of Cancel messages; one exclusive queue per worker |

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use super::AmqpError;
use super::settings::Names;

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

/// Declares every exchange and durable queue and binds them. The per-worker control queue
/// is declared by the consumer, since it lives and dies with its connection.
pub async fn declare(
    ch: &Channel,
    names: &Names,
    pool: &str,
    delivery_limit: u32,
) -> Result<(), AmqpError> {
    let exchanges = [
        (&names.jobs_exchange, ExchangeKind::Direct),
        (&names.dead_exchange, ExchangeKind::Fanout),
        (&names.results, ExchangeKind::Topic),
        (&names.events, ExchangeKind::Topic),
        (&names.logs, ExchangeKind::Topic),
        (&names.control, ExchangeKind::Fanout),
    ];
    for (name, kind) in exchanges {
        ch.exchange_declare(
            name.as_str().into(),
            kind,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| AmqpError::Declare {
            what: format!("exchange {name}"),
            source,
        })?;
    }
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(delivery_limit)),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(names.dead_exchange.as_str().into()),
    );
    let queues = [
        (&names.jobs_queue, args, &names.jobs_exchange, pool),
        (
            &names.dead_queue,
            FieldTable::default(),
            &names.dead_exchange,
            "",
        ),
    ];
    for (queue, args, exchange, key) in queues {
        ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .map_err(|source| AmqpError::Declare {
                what: format!("queue {queue}"),
                source,
            })?;
        ch.queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| AmqpError::Declare {
            what: format!("binding {queue} to {exchange}"),
            source,
        })?;
    }
    Ok(())
}
