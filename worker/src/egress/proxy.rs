//! The proxy's serving loop: accepts the build's connections on its listening socket (made
//! in the job's network namespace), reads one request head, and either tunnels a `CONNECT
//! host:port` (HTTPS: it never sees plaintext) or forwards one plain HTTP request in
//! absolute form (`GET http://host/path`), rewritten to origin form with `Connection:
//! close`. Everything else is refused with a status and a [`Denial`].
//!
//! A slow client cannot hold the proxy: at most `connections` of the job's connections are
//! served at once (the rest are answered 503 and closed at once), and a request head must
//! arrive whole within `head_timeout`. Each job has its own listener and tasks, so one
//! job's clients never wait on another's.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::allow::{AllowList, Destination};
use super::ledger::{Direction, Ledger};

/// The proxy's bounds for one job.
#[derive(Debug, Clone, Copy)]
pub struct ProxyLimits {
    /// Client connections served at once.
    pub connections: usize,
    /// Time for a request head to arrive whole.
    pub head_timeout: Duration,
    /// Time to connect to a destination.
    pub connect_timeout: Duration,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            connections: 32,
            head_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// The longest request head read.
const MAX_HEAD: usize = 16 << 10;

/// A refused request: what was asked and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// `HOST:PORT` when the request named one.
    pub destination: Option<Destination>,
    /// `not_allowed`, `address`, `bad_request`, `connection_cap`, `head_timeout`,
    /// `unreachable`.
    pub reason: &'static str,
    /// A sentence for people.
    pub detail: String,
}

type OnDenial = Arc<dyn Fn(&Denial) + Send + Sync>;

/// One job's proxy.
pub struct Proxy {
    allow: AllowList,
    own: Vec<IpAddr>,
    limits: ProxyLimits,
    ledger: Arc<Ledger>,
    on_denial: OnDenial,
}

impl Proxy {
    pub fn new(
        allow: AllowList,
        own: Vec<IpAddr>,
        limits: ProxyLimits,
        ledger: Arc<Ledger>,
        on_denial: OnDenial,
    ) -> Arc<Proxy> {
        Arc::new(Proxy {
            allow,
            own,
            limits,
            ledger,
            on_denial,
        })
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Serves `listener` until the ledger cuts (the byte limit) or the task is dropped
    /// (the job ended); every connection's task ends with it.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(self.limits.connections));
        // Ends every connection task when the limit cuts (its parent) or when this loop
        // ends or is dropped (the job is over).
        let stop = self.ledger.cut().child_token();
        let _stop_on_drop = stop.clone().drop_guard();
        let cut = stop.clone();
        loop {
            let accepted = tokio::select! {
                () = cut.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let Ok((mut client, _)) = accepted else {
                // EMFILE and the like: the next accept may do better.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                self.deny(
                    None,
                    "connection_cap",
                    format!("more than {} connections at once", self.limits.connections),
                );
                tokio::spawn(async move {
                    let _ = client.write_all(&status(503, "Too many connections")).await;
                });
                continue;
            };
            let proxy = self.clone();
            let cut = cut.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = cut.cancelled() => {}
                    () = proxy.handle(client) => {}
                }
                drop(slot);
            });
        }
    }

    fn deny(&self, destination: Option<&Destination>, reason: &'static str, detail: String) {
        self.ledger
            .denied(destination.map(ToString::to_string).as_deref());
        (self.on_denial)(&Denial {
            destination: destination.cloned(),
            reason,
            detail,
        });
    }

    async fn handle(&self, mut client: TcpStream) {
        let head = tokio::time::timeout(self.limits.head_timeout, read_head(&mut client)).await;
        let (head, rest) = match head {
            Ok(Ok(Some(got))) => got,
            Ok(Ok(None) | Err(_)) => return,
            Err(_) => {
                self.deny(
                    None,
                    "head_timeout",
                    format!(
                        "no whole request within {} s",
                        self.limits.head_timeout.as_secs()
                    ),
                );
                let _ = client.write_all(&status(408, "Request Timeout")).await;
                return;
            }
        };
        let request = match Request::parse(&head) {
            Ok(r) => r,
            Err(why) => {
                self.deny(None, "bad_request", why);
                let _ = client.write_all(&status(400, "Bad Request")).await;
                return;
            }
        };
        let dest = request.destination.clone();
        if !self.allow.permits(&dest) {
            self.deny(
                Some(&dest),
                "not_allowed",
                format!("{dest} is not on the job's egress list"),
            );
            let _ = client.write_all(&status(403, "Forbidden")).await;
            return;
        }
        let upstream = match self.connect(&dest).await {
            Ok(u) => u,
            Err((reason, detail, code)) => {
                self.deny(Some(&dest), reason, detail);
                let text = if code == 403 {
                    "Forbidden"
                } else {
                    "Bad Gateway"
                };
                let _ = client.write_all(&status(code, text)).await;
                return;
            }
        };
        let key = dest.to_string();
        let opening = match &request.forward {
            // The tunnel is up: what the client sent after its head is the start of the
            // TLS stream.
            None => {
                if client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                rest
            }
            Some(head) => [head.as_slice(), &rest].concat(),
        };
        self.relay(client, upstream, &key, opening).await;
    }

    /// Resolves `dest` once and connects to the first address it may reach.
    async fn connect(&self, dest: &Destination) -> Result<TcpStream, (&'static str, String, u16)> {
        let addrs: Vec<SocketAddr> = match dest.ip() {
            Some(ip) => vec![SocketAddr::new(ip, dest.port)],
            None => match tokio::net::lookup_host((dest.host.as_str(), dest.port)).await {
                Ok(found) => found.collect(),
                Err(e) => return Err(("unreachable", format!("{dest}: {e}"), 502)),
            },
        };
        let (allowed, refused): (Vec<_>, Vec<_>) = addrs
            .into_iter()
            .partition(|a| self.allow.address_allowed(dest, a.ip(), &self.own));
        if allowed.is_empty() {
            let shown: Vec<String> = refused.iter().map(|a| a.ip().to_string()).collect();
            return Err((
                "address",
                format!(
                    "{dest} resolves to {} (loopback, link-local, private or the worker's own), which is not on the egress list",
                    shown.join(", ")
                ),
                403,
            ));
        }
        let mut last = String::new();
        for addr in allowed {
            match tokio::time::timeout(self.limits.connect_timeout, TcpStream::connect(addr)).await
            {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    self.ledger.connected(&dest.to_string(), &addr.to_string());
                    return Ok(stream);
                }
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: connect timed out"),
            }
        }
        Err(("unreachable", format!("{dest}: {last}"), 502))
    }

    /// Passes bytes both ways, counted, until both sides are done or the limit cuts.
    async fn relay(&self, client: TcpStream, upstream: TcpStream, key: &str, opening: Vec<u8>) {
        let (client_r, client_w) = client.into_split();
        let (upstream_r, mut upstream_w) = upstream.into_split();
        if !opening.is_empty() {
            if !self.ledger.pass(key, Direction::Out, opening.len() as u64) {
                return;
            }
            if upstream_w.write_all(&opening).await.is_err() {
                return;
            }
        }
        let out = pump(client_r, upstream_w, &self.ledger, key, Direction::Out);
        let back = pump(upstream_r, client_w, &self.ledger, key, Direction::In);
        let _ = tokio::join!(out, back);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    ledger: &Ledger,
    key: &str,
    direction: Direction,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        if !ledger.pass(key, direction, n as u64) {
            return Err(std::io::ErrorKind::QuotaExceeded.into());
        }
        to.write_all(&buf[..n]).await?;
    }
}

/// Reads up to the end of a request head (`\r\n\r\n`): the head and what followed it.
async fn read_head(client: &mut TcpStream) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = from + end + 4;
            let rest = buf.split_off(end);
            return Ok(Some((buf, rest)));
        }
        if buf.len() > MAX_HEAD {
            return Ok(Some((buf, Vec::new())));
        }
    }
}

/// A parsed proxy request.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    destination: Destination,
    /// The head to send upstream for a plain HTTP request; `None` for a `CONNECT`.
    forward: Option<Vec<u8>>,
}

impl Request {
    fn parse(head: &[u8]) -> Result<Request, String> {
        if head.len() > MAX_HEAD || !head.ends_with(b"\r\n\r\n") {
            return Err(format!("a request head longer than {MAX_HEAD} bytes"));
        }
        let text = std::str::from_utf8(head).map_err(|_| "a request head that is not UTF-8")?;
        let mut lines = text.split("\r\n");
        let line = lines.next().unwrap_or_default();
        let mut words = line.split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(format!("a malformed request line {line:?}"));
        };
        if !version.starts_with("HTTP/1.") {
            return Err(format!("unsupported version {version:?}"));
        }
        if method.eq_ignore_ascii_case("CONNECT") {
            let destination = Destination::parse(target).map_err(|e| e.to_string())?;
            return Ok(Request {
                destination,
                forward: None,
            });
        }
        let Some(after) = target.strip_prefix("http://") else {
            return Err(format!(
                "{method} {target}: only CONNECT and absolute http:// requests are proxied"
            ));
        };
        let (authority, path) = match after.find('/') {
            Some(i) => (&after[..i], &after[i..]),
            None => (after, "/"),
        };
        if authority.contains('@') {
            return Err("credentials in the request target".to_owned());
        }
        let with_port = match authority.rsplit_once(':') {
            Some((_, p)) if !p.contains(']') => authority.to_owned(),
            _ => format!("{authority}:80"),
        };
        let destination = Destination::parse(&with_port).map_err(|e| e.to_string())?;
        let mut out = format!("{method} {path} {version}\r\n");
        for header in lines.filter(|l| !l.is_empty()) {
            let name = header.split(':').next().unwrap_or_default().trim();
            let hop = [
                "connection",
                "proxy-connection",
                "proxy-authorization",
                "keep-alive",
            ];
            if hop.iter().any(|h| name.eq_ignore_ascii_case(h)) {
                continue;
            }
            out.push_str(header);
            out.push_str("\r\n");
        }
        out.push_str("Connection: close\r\n\r\n");
        Ok(Request {
            destination,
            forward: Some(out.into_bytes()),
        })
    }
}

/// A complete response with an empty body.
fn status(code: u16, text: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {code} {text}\r\nContent-Length: 0\r\nConnection: close\r\nX-Corral-Egress: refused\r\n\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_into_destinations() {
        let connect =
            Request::parse(b"CONNECT Index.test:443 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(connect.destination.to_string(), "index.test:443");
        assert_eq!(connect.forward, None);

        let get = Request::parse(
            b"GET http://a.test/simple/flask/ HTTP/1.1\r\nHost: a.test\r\nProxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n",
        )
        .unwrap();
        assert_eq!(get.destination.to_string(), "a.test:80");
        assert_eq!(
            String::from_utf8(get.forward.unwrap()).unwrap(),
            "GET /simple/flask/ HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let v6 = Request::parse(b"GET http://[::1]:8080 HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(v6.destination.to_string(), "[::1]:8080");

        for bad in [
            &b"GET /direct HTTP/1.1\r\n\r\n"[..],
            b"CONNECT a.test HTTP/1.1\r\n\r\n",
            b"CONNECT a.test:443 SPDY/3\r\n\r\n",
            b"GET http://user:pw@a.test/ HTTP/1.1\r\n\r\n",
            b"GARBAGE\r\n\r\n",
        ] {
            assert!(
                Request::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
