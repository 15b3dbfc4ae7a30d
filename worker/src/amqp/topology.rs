//! The broker topology, declared idempotently at every (re)connect: redeclaring with the same
//! arguments is a no-op, and a deleted queue comes back.
//!
//! | name | kind |
//! |---|---|
//! | `<prefix>.jobs` | direct exchange, routing key = pool |
//! | `<prefix>.jobs.<pool>` | durable quorum queue: `x-delivery-limit`, dead-letters to `<prefix>.dead` |
//! | `<prefix>.dead` → `<prefix>.jobs.dead` | fanout exchange + durable quorum queue of poison and invalid jobs |
//! | `<prefix>.dead` → `<prefix>.jobs.dead.unanswered` | the same messages, for the workers: those the broker dead-lettered get another round or an answer (`amqp/dead.rs`) |
//! | `<prefix>.results` | topic exchange, key `<project>.<job_id>` |
//! | `<prefix>.events` | topic exchange, key `<severity>.<kind>.<project>` |
//! | `<prefix>.logs` | topic exchange, key `<project>.<job_id>` |
//! | `<prefix>.control` | fanout exchange of Cancel messages; one exclusive queue per worker |

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

use super::AmqpError;
use super::settings::Names;

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// Declares every exchange and durable queue and binds them, on channels of its own. The
/// per-worker control queue is declared by the consumer, since it lives and dies with its
/// connection.
///
/// Both queues are quorum queues, replicated over a broker cluster, so a worker can declare
/// them and consume while any node is down. The dead-letter queue is declared last and on
/// its own channel, and a failure there only warns: a deployment made before it was a quorum
/// queue keeps its classic queue (a queue's type cannot change; the broker answers
/// `PRECONDITION_FAILED`), and a classic queue whose node is down (`NOT_FOUND`) must not keep
/// the workers from their jobs.
pub async fn declare(
    conn: &Connection,
    names: &Names,
    pool: &str,
    delivery_limit: u32,
) -> Result<(), AmqpError> {
    let ch = conn.create_channel().await.map_err(AmqpError::Channel)?;
    declare_jobs(&ch, names, pool, delivery_limit).await?;
    let _ = ch.close(200, "declared".into()).await;
    let ch = conn.create_channel().await.map_err(AmqpError::Channel)?;
    match declare_queue(&ch, &names.dead_queue, quorum(), &names.dead_exchange, "").await {
        Ok(()) => {
            let unanswered = names.dead_unanswered();
            if let Err(err) =
                declare_queue(&ch, &unanswered, quorum(), &names.dead_exchange, "").await
            {
                tracing::warn!(error = %err, "the unanswered dead-letter queue could not be declared");
            }
            let _ = ch.close(200, "declared".into()).await;
        }
        Err(err) => tracing::warn!(
            error = %err,
            "the dead-letter queue could not be declared; jobs still run, dead-lettered \
             messages go where the broker has it"
        ),
    }
    Ok(())
}

async fn declare_jobs(
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
    let mut args = quorum();
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(delivery_limit)),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(names.dead_exchange.as_str().into()),
    );
    declare_queue(ch, &names.jobs_queue, args, &names.jobs_exchange, pool).await
}

async fn declare_queue(
    ch: &Channel,
    queue: &str,
    args: FieldTable,
    exchange: &str,
    key: &str,
) -> Result<(), AmqpError> {
    ch.queue_declare(queue.into(), QueueDeclareOptions::durable(), args)
        .await
        .map_err(|source| AmqpError::Declare {
            what: format!("queue {queue}"),
            source,
        })?;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|source| AmqpError::Declare {
        what: format!("binding {queue} to {exchange}"),
        source,
    })
}
