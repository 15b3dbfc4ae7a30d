//! The published port in userspace (the fallback of [`super::route`], which has the kernel
//! carry connections instead): the worker listens on the host address and, for each connection it
//! accepts, connects to `127.0.0.1:$PORT` inside the app's network namespace through a
//! socket made there ([`JobNetwork::tcp_socket`]), then splices the two. The app's
//! namespace has no other way in; while the app is down (booting, restarting) a connection
//! is closed at once.
//!
//! The forwarding runs on a thread of its own with a single-threaded runtime
//! ([`Forwarder::start`]): every connection's copies wake that one thread, never a pool's
//! worker on another CPU, which leaves the other CPU to the app and its clients (measured by
//! `scripts/bench-run`).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use corral_sandbox::JobNetwork;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

/// Where the app is right now: its namespace while a process of it runs.
pub type Target = watch::Receiver<Option<Arc<JobNetwork>>>;

/// Connects to `port` on the loopback of `network`.
pub async fn connect_inside(network: &JobNetwork, port: u16) -> std::io::Result<TcpStream> {
    let fd = network.tcp_socket(false)?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    let stream = socket
        .connect(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)))
        .await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The forwarding thread; stopped (its connections closed) when dropped.
pub struct Forwarder {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    /// Serves `listener` on a new thread until dropped.
    pub fn start(
        listener: std::net::TcpListener,
        target: Target,
        port: u16,
    ) -> std::io::Result<Forwarder> {
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("forwarder".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        _ = serve(listener, target, port) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime drops every connection's task: both sockets close.
            })?;
        Ok(Forwarder {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts on `listener` until dropped, forwarding each connection to `port`
/// in the current target.
pub async fn serve(listener: TcpListener, target: Target, port: u16) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let network = target.borrow().clone();
        tokio::spawn(async move {
            let Some(network) = network else { return };
            let _ = client.set_nodelay(true);
            let Ok(mut app) = connect_inside(&network, port).await else {
                return;
            };
            let mut client = client;
            let _ = tokio::io::copy_bidirectional(&mut client, &mut app).await;
        });
    }
}
