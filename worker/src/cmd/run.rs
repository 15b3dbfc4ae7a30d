//! `corral run IMAGE`: an image from the store as an app server (see [`crate::app`]), on
//! the same config, data dir and store as `replay`. Exit 0 when it was stopped (SIGINT or
//! SIGTERM), 1 when it ended otherwise (boot timeout, crash, crash loop), 65 when the image
//! or the request is unusable, 75 when the platform failed.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use corral_protocol::{JobId, ProjectId};
use corral_sandbox::IdentityMap;

use crate::app::{self, AppError, AppSpec, Ending, Host, Restart, layers::LayerCache};
use crate::cli::{RestartPolicy, RunArgs};
use crate::config::{Config, Sources};
use crate::events::JobEvents;
use crate::exit;
use crate::job::{Settings, error_chain};

pub fn run(args: RunArgs) -> anyhow::Result<u8> {
    let sources = Sources::from_process(args.config.clone(), args.config_flags());
    let (config, broker) = match super::check_config::load(&sources) {
        // Events go to the broker too when one is configured (not the default URL alone).
        Ok(loaded) => {
            let broker = loaded.origin("amqp.url") != crate::config::Origin::Default;
            (loaded.config, broker)
        }
        Err(code) => return Ok(code),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args, config, broker))
}

fn say(text: impl std::fmt::Display) {
    // Never a panic when stderr is gone (a closed pipe): stopping must not depend on it.
    let _ = writeln!(std::io::stderr(), "corral: {text}");
}

fn seconds(flag: &str, value: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value).map_err(|_| format!("{flag} {value}: not a duration"))
}

async fn serve(args: RunArgs, config: Config, broker: bool) -> anyhow::Result<u8> {
    let project = match ProjectId::new(args.project.clone()) {
        Ok(id) => id,
        Err(err) => {
            say(format!("--project {:?}: {err}", args.project));
            return Ok(exit::INVALID_INPUT);
        }
    };
    let app_id_text = args
        .app_id
        .clone()
        .unwrap_or_else(|| format!("app-{}", args.project));
    let app_id = match JobId::new(app_id_text.clone()) {
        Ok(id) => id,
        Err(err) => {
            say(format!("--app-id {app_id_text:?}: {err}"));
            return Ok(exit::INVALID_INPUT);
        }
    };
    let mut env = Vec::new();
    for pair in &args.env {
        match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() && key != "PORT" => {
                env.push((key.to_owned(), value.to_owned()));
            }
            _ => {
                say(format!(
                    "--env {pair:?}: expected KEY=VALUE (PORT is set by --port)"
                ));
                return Ok(exit::INVALID_INPUT);
            }
        }
    }
    if let Some(path) = &args.health_path
        && (!path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        say(format!(
            "--health-path {path:?}: expected an absolute path without spaces"
        ));
        return Ok(exit::INVALID_INPUT);
    }
    let durations = (|| {
        Ok::<_, String>((
            seconds("--boot-timeout", args.boot_timeout)?,
            seconds("--grace", args.grace)?,
        ))
    })();
    let (boot_timeout, grace) = match durations {
        Ok(d) => d,
        Err(err) => {
            say(err);
            return Ok(exit::INVALID_INPUT);
        }
    };
    if !args.cpus.is_finite() || args.cpus <= 0.0 || args.port == 0 {
        say("--cpus must be above 0 and --port above 0");
        return Ok(exit::INVALID_INPUT);
    }

    let store = match super::data_dir_and_store(&config).await {
        Ok(store) => store,
        Err(code) => return Ok(code),
    };
    let settings = Settings::from_config(&config).context("setting up the sandbox")?;
    let egress = match args.egress.is_empty() {
        true => None,
        false => match settings.egress.allow.subset(&args.egress) {
            Ok(allow) => Some(allow),
            Err(err) => {
                say(format!(
                    "error: --egress: {err} (the config's [egress] allow is the ceiling)"
                ));
                return Ok(exit::INVALID_INPUT);
            }
        },
    };
    let identity = IdentityMap::open(&settings.data_dir, settings.uid_range.clone())
        .and_then(|ids| ids.with_gid_start(settings.gid_start))
        .and_then(|ids| ids.identity(project.as_str()))
        .context("the project's identity")?;

    let prepared = async {
        let image = app::layers::resolve(&store, &args.image).await?;
        let cache = LayerCache::open(&settings.data_dir)?;
        let started = std::time::Instant::now();
        let (lower_dirs, unpacked) = cache.lower_dirs(&store, &image).await?;
        say(format!(
            "image {} ({}): {} layers, {} unpacked now in {} ms, {} from the layer cache",
            args.image,
            image.manifest_digest,
            image.layers.len(),
            unpacked,
            started.elapsed().as_millis(),
            image.layers.len() - unpacked
        ));
        let listener = tokio::net::TcpListener::bind(args.publish)
            .await
            .map_err(|source| AppError::Publish {
                address: args.publish,
                source,
            })?;
        Ok::<_, AppError>((image, lower_dirs, listener))
    }
    .await;
    let (image, lower_dirs, listener) = match prepared {
        Ok(ready) => ready,
        Err(err) => {
            say(format!("error: {}", error_chain(&err)));
            return Ok(if err.is_input() {
                exit::INVALID_INPUT
            } else {
                exit::PLATFORM_ERROR
            });
        }
    };
    let publish = listener.local_addr().unwrap_or(args.publish);
    let spec = AppSpec {
        app_id: app_id.clone(),
        project: project.clone(),
        image_name: args.image.clone(),
        image,
        lower_dirs,
        publish,
        port: args.port,
        command: args.command.clone(),
        env,
        memory_bytes: args.memory.bytes(),
        pids: args.pids,
        cpus: args.cpus,
        disk_bytes: args.disk.bytes(),
        boot_timeout,
        grace,
        restart: match args.restart {
            RestartPolicy::No => Restart::Never,
            RestartPolicy::OnFailure => Restart::OnFailure,
        },
        health_path: args.health_path.clone(),
        forwarding: args.forwarding,
        egress,
        crash_loop_after: 5,
        crash_window: Duration::from_secs(60),
        backoff_base: Duration::from_millis(500),
        backoff_max: Duration::from_secs(30),
    };
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = Host {
        sandbox: settings.sandbox.clone(),
        identity,
        worker_id: format!("run@{}", host_name.trim()),
    };
    let mut sinks = super::event_sinks(args.events.as_deref(), false)?;
    let queue = if broker {
        match broker_events(&config, &host.worker_id).await {
            Ok(queue) => {
                sinks.push(Arc::new(queue.clone()));
                Some(queue)
            }
            Err(err) => {
                say(format!("error: the broker's events exchange: {err:#}"));
                return Ok(exit::PLATFORM_ERROR);
            }
        }
    } else {
        None
    };
    let events = JobEvents::for_app(app_id, project, &host.worker_id, sinks, None);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            say("stopping the app (SIGTERM, then SIGKILL after the grace period)");
            stop_tx.send_replace(true);
        });
    }
    let (target_tx, target_rx) = tokio::sync::watch::channel(None);
    let forwarder = match listener
        .into_std()
        .and_then(|l| app::forward::Forwarder::start(l, target_rx, spec.port))
    {
        Ok(forwarder) => forwarder,
        Err(err) => {
            say(format!("error: starting the port forwarder: {err}"));
            return Ok(exit::PLATFORM_ERROR);
        }
    };
    say(format!(
        "serving {} on http://{publish} (port {} inside)",
        spec.image_name, spec.port
    ));
    let outcome = app::run(&spec, &host, &events, &target_tx, stop_rx).await;
    drop(forwarder);
    if let Some(queue) = queue {
        queue.flush(Duration::from_secs(10)).await;
    }
    match outcome {
        Ok(outcome) => Ok(match outcome.ending {
            Ending::Stopped => exit::SUCCESS,
            _ => exit::JOB_FAILED,
        }),
        Err(err) => {
            say(format!("error: {}", error_chain(&err)));
            Ok(if err.is_input() {
                exit::INVALID_INPUT
            } else {
                exit::PLATFORM_ERROR
            })
        }
    }
}

/// The broker sink: `corral.events` (declared when missing, as `corral work` does) and a
/// queue that publishes to it with confirms, never holding the app up.
async fn broker_events(config: &Config, worker: &str) -> anyhow::Result<crate::amqp::EventQueue> {
    use lapin::ExchangeKind;
    use lapin::options::ExchangeDeclareOptions;
    use lapin::types::FieldTable;
    let settings = crate::amqp::AmqpSettings::from_config(config);
    let names = settings.names();
    let nodes = settings.uris()?;
    // The first node of the broker cluster that answers declares the exchange; the
    // publisher rotates through all of them.
    let (conn, _) = crate::amqp::connect_any(
        &config.amqp.connection_uris(),
        &lapin::ConnectionProperties::default(),
    )
    .await
    .context("connecting to the broker")?;
    let ch = conn.create_channel().await.context("opening a channel")?;
    ch.exchange_declare(
        names.events.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .with_context(|| format!("declaring {}", names.events))?;
    let _ = conn.close(200, "declared".into()).await;
    let publisher = crate::amqp::Publisher::new(
        Arc::new(crate::amqp::Nodes::new(nodes)),
        format!("corral {worker} events"),
        Duration::from_secs(30),
    );
    let queue = crate::amqp::EventQueue::new(Arc::new(crate::metrics::Metrics::new()));
    queue.start(Arc::new(publisher), names.events);
    Ok(queue)
}
