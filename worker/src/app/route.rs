//! Kernel forwarding of the published port: a veth pair between the host and the app's
//! network namespace and a DNAT rule, so the host's kernel carries each connection to the
//! app (as netavark and Docker do when they are not asked for a userland proxy). The
//! userspace forwarder ([`super::forward`]) stays as the fallback and keeps the published
//! port bound while the app is down.
//!
//! What the app can reach does not grow: its namespace gets one interface with a /30 and
//! no default route, and `table inet corral_guard` on the host turns away everything that
//! comes in from a `crl*` link but the replies of connections the DNAT rule sent there,
//! lets nothing be routed through the host from or to such a link except those DNAT'd
//! connections, and lets no host process connect to an app's address directly. So the
//! host's services (the broker, say), other apps and the app's other ports stay out of reach.
//!
//! Used only where it is sure to work: as root, for an IPv4 published address that is
//! loopback or on a host that forwards IPv4 (a connection from another machine is routed
//! to the link), and for an app listening on every address of its namespace (`0.0.0.0` or
//! `::`); an app bound to `127.0.0.1` inside is reached by the userspace forwarder only.
//! Everything is removed when the [`KernelRoute`] is dropped; a table left by a worker that
//! was killed is removed by the next route set up once its link is gone.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::sync::Arc;

use corral_sandbox::JobNetwork;

/// How connections to the published port reach the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Forwarding {
    /// Through the kernel (veth + DNAT) where that can be used, else in userspace.
    Auto,
    /// Always through the worker's userspace forwarder.
    Userspace,
}

/// Names of the host ends: `crl0` … `crl16383`, one /30 of `10.213.0.0/16` each.
const LINK_PREFIX: &str = "crl";
const LINKS: u32 = 16384;
const SUBNET: [u8; 2] = [10, 213];
/// The host table that keeps every app link closed but for its DNAT'd connections.
const GUARD_TABLE: &str = "corral_guard";

/// Why the kernel path is not used for an app (it is then forwarded in userspace).
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("kernel forwarding needs root on the host")]
    NotRoot,
    #[error("kernel forwarding serves IPv4 published addresses only, not {0}")]
    NotIpv4(SocketAddr),
    #[error(
        "{0} is not a loopback address and this host does not forward IPv4 (net.ipv4.ip_forward is 0)"
    )]
    HostDoesNotForward(Ipv4Addr),
    #[error("every app link name ({LINK_PREFIX}0 to {LINK_PREFIX}{}) is taken", LINKS - 1)]
    NoFreeLink,
    #[error("{what}: {detail}")]
    Command { what: String, detail: String },
}

/// An app's link and DNAT rule, removed on drop.
#[derive(Debug)]
pub struct KernelRoute {
    link: String,
    app_address: Ipv4Addr,
    /// Held so the namespace, and with it the link's name, stays the route's until its
    /// rules are gone: no other app can take `crlN` (and so its table) in between.
    network: Arc<JobNetwork>,
}

impl KernelRoute {
    /// Connects the app's network namespace to the host by a link of its own and sends
    /// connections to `publish` to port `port` on it.
    pub fn open(
        network: Arc<JobNetwork>,
        publish: SocketAddr,
        port: u16,
    ) -> Result<KernelRoute, RouteError> {
        if crate::base::prerequisites::effective_uid() != Some(0) {
            return Err(RouteError::NotRoot);
        }
        let SocketAddr::V4(publish) = publish else {
            return Err(RouteError::NotIpv4(publish));
        };
        let ip = *publish.ip();
        if !ip.is_loopback() {
            let forwards = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                .is_ok_and(|v| v.trim() == "1");
            if !forwards {
                return Err(RouteError::HostDoesNotForward(ip));
            }
        }
        remove_stale_tables();
        // The guard goes first: a link is never up without it, not even for a moment.
        run(
            "installing the guard rules",
            Command::new("nft").args(["-f", "-"]),
            &guard_rules(),
        )?;
        let start = std::process::id().wrapping_mul(2_654_435_761) % LINKS;
        let mut made = None;
        for i in 0..LINKS {
            let n = (start + i) % LINKS;
            let link = format!("{LINK_PREFIX}{n}");
            if create_pair(&link, &network)? {
                made = Some((n, link));
                break;
            }
        }
        let Some((n, link)) = made else {
            return Err(RouteError::NoFreeLink);
        };
        let (host_address, app_address) = addresses(n);
        // From here on, dropping the route removes what was made.
        let route = KernelRoute {
            link,
            app_address,
            network,
        };
        route.configure_host(host_address)?;
        let mut inside = Command::new("ip");
        inside.args(["-batch", "-"]);
        let input = format!("addr add {app_address}/30 dev eth0\nlink set eth0 up\n");
        checked(
            "configuring the app's end of the link",
            "ip",
            route.network.run(inside, input.as_bytes()),
        )?;
        run(
            "installing the forwarding rules",
            Command::new("nft").args(["-f", "-"]),
            &dnat_rules(&route.link, publish, app_address, port),
        )?;
        Ok(route)
    }

    /// The host end of the link.
    pub fn link(&self) -> &str {
        &self.link
    }

    /// The app's address on its link.
    pub fn app_address(&self) -> Ipv4Addr {
        self.app_address
    }

    fn configure_host(&self, address: Ipv4Addr) -> Result<(), RouteError> {
        let link = &self.link;
        // No IPv6 on the host end: nothing for the app to reach by a link-local address.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{link}/disable_ipv6"), "1");
        // A client on the host's loopback keeps 127.0.0.1 as its source until the rule
        // masquerades it; without this the kernel drops such a packet on a real link.
        std::fs::write(
            format!("/proc/sys/net/ipv4/conf/{link}/route_localnet"),
            "1",
        )
        .map_err(|e| RouteError::Command {
            what: format!("allowing loopback sources on {link}"),
            detail: e.to_string(),
        })?;
        run(
            "configuring the host's end of the link",
            Command::new("ip").args(["-batch", "-"]),
            &format!("addr add {address}/30 dev {link}\nlink set {link} up\n"),
        )
    }
}

impl Drop for KernelRoute {
    fn drop(&mut self) {
        let _ = run(
            "removing the forwarding rules",
            Command::new("nft").args(["delete", "table", "ip", &table_name(&self.link)]),
            "",
        );
        // The namespace is still held (`network`), so `crlN` is still this route's link.
        let _ = run(
            "removing the link",
            Command::new("ip").args(["link", "del", &self.link]),
            "",
        );
    }
}

fn table_name(link: &str) -> String {
    format!("corral_{link}")
}

/// The host's and the app's addresses on link `n`.
fn addresses(n: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = n * 4;
    let (hi, lo) = ((base / 256) as u8, (base % 256) as u8);
    (
        Ipv4Addr::new(SUBNET[0], SUBNET[1], hi, lo + 1),
        Ipv4Addr::new(SUBNET[0], SUBNET[1], hi, lo + 2),
    )
}

/// Creates the pair `link` (host) / `eth0` (in the app's namespace); `false` when `link`
/// exists already.
fn create_pair(link: &str, network: &JobNetwork) -> Result<bool, RouteError> {
    let path = network.path();
    let mut command = Command::new("ip");
    command
        .args([
            "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns",
        ])
        .arg(&path);
    match run("creating the app's link", &mut command, "") {
        Ok(()) => Ok(true),
        Err(RouteError::Command { detail, .. }) if detail.contains("File exists") => Ok(false),
        Err(err) => Err(err),
    }
}

/// Whether the kernel accepts the rules an app gets (`nft --check`: nothing is installed).
pub fn check_rules() -> Result<(), RouteError> {
    let rules = rules(
        "crl0",
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 1),
        Ipv4Addr::new(SUBNET[0], SUBNET[1], 0, 2),
        1,
    );
    run(
        "checking the forwarding rules",
        Command::new("nft").args(["--check", "-f", "-"]),
        &rules,
    )
}

/// The guard table and the app's DNAT table, as [`KernelRoute::open`] installs them (the
/// guard first, before the link exists).
fn rules(link: &str, publish: SocketAddrV4, app: Ipv4Addr, port: u16) -> String {
    guard_rules() + &dnat_rules(link, publish, app, port)
}

/// The guard table, replaced whole in one transaction: it names every `crl*` link, present
/// or to come.
fn guard_rules() -> String {
    format!(
        r#"table inet {GUARD_TABLE} {{}}
flush table inet {GUARD_TABLE}
table inet {GUARD_TABLE} {{
    chain input {{
        type filter hook input priority -10; policy accept;
        iifname "{LINK_PREFIX}*" ct state established,related accept
        iifname "{LINK_PREFIX}*" meta l4proto tcp reject with tcp reset
        iifname "{LINK_PREFIX}*" drop
    }}
    chain forward {{
        type filter hook forward priority -10; policy accept;
        iifname "{LINK_PREFIX}*" drop
        oifname "{LINK_PREFIX}*" ct status dnat accept
        oifname "{LINK_PREFIX}*" drop
    }}
    chain output {{
        type filter hook output priority -10; policy accept;
        oifname "{LINK_PREFIX}*" ct status dnat accept
        oifname "{LINK_PREFIX}*" ct state established,related accept
        oifname "{LINK_PREFIX}*" drop
    }}
}}
"#
    )
}

/// The app's DNAT table (a stale one of the same name replaced in the same transaction).
fn dnat_rules(link: &str, publish: SocketAddrV4, app: Ipv4Addr, port: u16) -> String {
    let table = table_name(link);
    let to_publish = if publish.ip().is_unspecified() {
        "fib daddr type local".to_owned()
    } else {
        format!("ip daddr {}", publish.ip())
    };
    let published = format!("{to_publish} tcp dport {}", publish.port());
    format!(
        r#"table ip {table} {{}}
flush table ip {table}
table ip {table} {{
    chain prerouting {{
        type nat hook prerouting priority -100; policy accept;
        {published} dnat to {app}:{port}
    }}
    chain output {{
        type nat hook output priority -100; policy accept;
        {published} dnat to {app}:{port}
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        oifname "{link}" masquerade
    }}
}}
"#
    )
}

/// Removes the tables of links that are gone (a worker killed before it could).
fn remove_stale_tables() {
    for name in stale_tables() {
        let _ = run(
            "removing a stale table",
            Command::new("nft").args(["delete", "table", "ip", &name]),
            "",
        );
    }
}

/// The forwarding tables whose link is gone: what a `corral run` killed before it could
/// clean up left (their DNAT rules still take the published port's connections).
pub fn stale_tables() -> Vec<String> {
    let Ok(listed) = Command::new("nft").args(["list", "tables", "ip"]).output() else {
        return Vec::new();
    };
    let prefix = table_name(LINK_PREFIX);
    String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|line| line.trim().strip_prefix("table ip "))
        .filter(|name| {
            name.strip_prefix(&prefix)
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| {
                    !std::path::Path::new("/sys/class/net")
                        .join(format!("{LINK_PREFIX}{n}"))
                        .exists()
                })
        })
        .map(str::to_owned)
        .collect()
}

/// Runs `command` with `input` on its stdin; its stderr is the error.
fn run(what: &str, command: &mut Command, input: &str) -> Result<(), RouteError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(input.as_bytes())?;
            }
            child.wait_with_output()
        });
    checked(what, &program, output)
}

/// A command's end as a route step's result: its stderr is the error.
fn checked(
    what: &str,
    program: &str,
    output: std::io::Result<std::process::Output>,
) -> Result<(), RouteError> {
    let failed = |detail: String| RouteError::Command {
        what: what.to_owned(),
        detail,
    };
    let out = output.map_err(|e| failed(format!("{program}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_get_disjoint_slash_30s() {
        assert_eq!(
            addresses(0),
            (Ipv4Addr::new(10, 213, 0, 1), Ipv4Addr::new(10, 213, 0, 2))
        );
        assert_eq!(
            addresses(64),
            (Ipv4Addr::new(10, 213, 1, 1), Ipv4Addr::new(10, 213, 1, 2))
        );
        assert_eq!(
            addresses(LINKS - 1),
            (
                Ipv4Addr::new(10, 213, 255, 253),
                Ipv4Addr::new(10, 213, 255, 254)
            )
        );
    }

    #[test]
    fn a_wildcard_publish_matches_every_local_address() {
        let any = rules(
            "crl7",
            "0.0.0.0:8080".parse().unwrap(),
            Ipv4Addr::new(10, 213, 0, 30),
            5000,
        );
        assert!(any.contains("fib daddr type local tcp dport 8080 dnat to 10.213.0.30:5000"));
        assert!(any.contains("table ip corral_crl7 {"));
        assert!(any.contains(r#"oifname "crl7" masquerade"#));
        let one = rules(
            "crl7",
            "127.0.0.1:8080".parse().unwrap(),
            Ipv4Addr::new(10, 213, 0, 30),
            5000,
        );
        assert!(one.contains("ip daddr 127.0.0.1 tcp dport 8080 dnat to 10.213.0.30:5000"));
    }
}
