//! The allow-list: which `HOST:PORT` destinations a build's proxy may reach, and which of
//! the addresses a name resolves to it may connect to.
//!
//! The worker's `[egress] allow` is the ceiling; a job asks for a subset of it (never more:
//! a typed rejection). A destination is allowed when its host and port are on the job's
//! list, compared exactly (host names case-insensitively; no wildcards). Its name is
//! resolved on the host once, and only an address that passes [`AllowList::address_allowed`]
//! is connected to: loopback, link-local (cloud metadata at 169.254.169.254 included),
//! private, shared, multicast and unspecified addresses, and the worker's own, are refused
//! unless that address itself is on the list with that port (so a test index on
//! `127.0.0.2:8443` is allowed by naming it, and a name that an attacker rebinds to
//! 127.0.0.1 reaches nothing).

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use corral_protocol::split_host_port;

/// A bad allow-list entry, or a job asking for more than its worker allows.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EgressError {
    #[error("{entry:?}: {why}")]
    Entry { entry: String, why: String },
    #[error("{entry} is not on this worker's egress allow-list")]
    NotAllowed { entry: String },
}

/// A `HOST:PORT` the build may ask the proxy for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Destination {
    /// Lower-cased; an IPv6 address without its brackets.
    pub host: String,
    pub port: u16,
}

impl Destination {
    /// `HOST:PORT`, `[V6]:PORT`.
    pub fn parse(entry: &str) -> Result<Destination, EgressError> {
        split_host_port(entry)
            .map(|(host, port)| Destination { host, port })
            .map_err(|why| EgressError::Entry {
                entry: entry.to_owned(),
                why,
            })
    }

    /// The host as an address, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host.contains(':') {
            true => write!(f, "[{}]:{}", self.host, self.port),
            false => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// A set of allowed destinations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: BTreeSet<Destination>,
}

impl AllowList {
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<AllowList, EgressError> {
        let entries = entries
            .iter()
            .map(|e| Destination::parse(e.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(AllowList { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> impl Iterator<Item = &Destination> {
        self.entries.iter()
    }

    /// The job's list when every entry of it is on this (the worker's) list.
    pub fn subset<S: AsRef<str>>(&self, job: &[S]) -> Result<AllowList, EgressError> {
        let asked = AllowList::parse(job)?;
        match asked.entries.iter().find(|d| !self.entries.contains(d)) {
            Some(d) => Err(EgressError::NotAllowed {
                entry: d.to_string(),
            }),
            None => Ok(asked),
        }
    }

    /// Whether the build may ask for `dest` at all.
    pub fn permits(&self, dest: &Destination) -> bool {
        self.entries.contains(dest)
    }

    /// Whether the proxy may connect to `ip` for `dest` (already [`AllowList::permits`]ed):
    /// a public address that is not the worker's own, or any address listed itself with
    /// the destination's port.
    pub fn address_allowed(&self, dest: &Destination, ip: IpAddr, own: &[IpAddr]) -> bool {
        let ip = canonical(ip);
        if !is_special(ip) && !own.contains(&ip) {
            return true;
        }
        self.entries
            .iter()
            .any(|e| e.port == dest.port && e.ip().map(canonical) == Some(ip))
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Addresses a build must not reach by name: the host itself, its networks, the cloud's
/// metadata service, anything not globally routed.
pub fn is_special(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        // Shared address space (carrier-grade NAT), 100.64.0.0/10.
        || (a == 100 && (64..128).contains(&b))
        // Benchmarking 198.18.0.0/15 and the reserved 240.0.0.0/4.
        || (a == 198 && (b == 18 || b == 19))
        || a >= 240
}

fn special_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // Unique local fc00::/7, link-local fe80::/10, site-local fec0::/10.
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        || (first & 0xffc0) == 0xfec0
        // NAT64 and 6to4 carry IPv4 addresses the checks above did not see.
        || first == 0x0064
        || first == 0x2002
}

/// The host's own addresses (every interface), from `/proc/net/fib_trie` (IPv4 `/32 host
/// LOCAL` entries) and `/proc/net/if_inet6`. Read once per job: interfaces may change.
pub fn own_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Ok(trie) = std::fs::read_to_string("/proc/net/fib_trie") {
        out.extend(local_v4(&trie).into_iter().map(IpAddr::V4));
    }
    if let Ok(v6) = std::fs::read_to_string("/proc/net/if_inet6") {
        out.extend(v6.lines().filter_map(parse_inet6).map(IpAddr::V6));
    }
    out.sort();
    out.dedup();
    out
}

/// The `LOCAL` host addresses of a `fib_trie` dump: a `|-- ADDR` line followed by
/// `/32 host LOCAL`.
fn local_v4(trie: &str) -> Vec<Ipv4Addr> {
    let mut last = None;
    let mut out = Vec::new();
    for line in trie.lines() {
        let line = line.trim_start_matches([' ', '|', '+', '-']).trim();
        if let Ok(ip) = line.parse::<Ipv4Addr>() {
            last = Some(ip);
        } else if line.starts_with("/32 host LOCAL")
            && let Some(ip) = last
        {
            out.push(ip);
        }
    }
    out
}

fn parse_inet6(line: &str) -> Option<Ipv6Addr> {
    let hex = line.split_whitespace().next()?;
    let n = u128::from_str_radix(hex, 16).ok()?;
    (hex.len() == 32).then(|| Ipv6Addr::from(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(s: &str) -> Destination {
        Destination::parse(s).unwrap()
    }

    #[test]
    fn a_job_asks_for_a_subset_of_the_ceiling() {
        let ceiling = AllowList::parse(&["pypi.org:443", "files.pythonhosted.org:443"]).unwrap();
        let job = ceiling.subset(&["PyPI.org:443"]).unwrap();
        assert!(job.permits(&dest("pypi.org:443")));
        assert!(!job.permits(&dest("pypi.org:80")));
        assert!(!job.permits(&dest("files.pythonhosted.org:443")));
        assert_eq!(
            ceiling.subset(&["evil.example:443"]).unwrap_err(),
            EgressError::NotAllowed {
                entry: "evil.example:443".into()
            }
        );
        assert!(matches!(
            AllowList::parse(&["pypi.org"]),
            Err(EgressError::Entry { .. })
        ));
        assert!(matches!(
            AllowList::parse(&["pypi.org:0"]),
            Err(EgressError::Entry { .. })
        ));
        assert_eq!(dest("[::1]:443").to_string(), "[::1]:443");
    }

    #[test]
    fn names_reach_only_public_addresses_unless_the_address_is_listed() {
        let list = AllowList::parse(&["index.test:443", "127.0.0.2:8443"]).unwrap();
        let name = dest("index.test:443");
        let own = [IpAddr::from([203, 0, 113, 9])];
        let ok = |ip: [u8; 4]| list.address_allowed(&name, IpAddr::from(ip), &own);
        assert!(ok([151, 101, 0, 223]));
        for refused in [
            [127, 0, 0, 1],
            [169, 254, 169, 254],
            [10, 0, 0, 1],
            [192, 168, 1, 1],
            [172, 16, 0, 1],
            [100, 64, 0, 1],
            [0, 0, 0, 0],
            [203, 0, 113, 9],
        ] {
            assert!(!ok(refused), "{refused:?}");
        }
        // The listed address with its own port, by address.
        let by_ip = dest("127.0.0.2:8443");
        assert!(list.address_allowed(&by_ip, IpAddr::from([127, 0, 0, 2]), &own));
        // Another port of that address is not listed.
        let other_port = dest("127.0.0.2:22");
        assert!(!list.address_allowed(&other_port, IpAddr::from([127, 0, 0, 2]), &own));
        // A mapped loopback is loopback.
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(!list.address_allowed(&name, mapped, &own));
        for v6 in ["::1", "fe80::1", "fd00::1", "::", "64:ff9b::a9fe:a9fe"] {
            assert!(is_special(v6.parse().unwrap()), "{v6}");
        }
        assert!(!is_special("2a04:4e42::223".parse().unwrap()));
    }

    #[test]
    fn own_addresses_from_the_kernels_tables() {
        let trie = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     |-- 10.0.2.15\n        /32 host LOCAL\n     |-- 10.0.2.255\n        /32 link BROADCAST\n";
        assert_eq!(local_v4(trie), [Ipv4Addr::new(10, 0, 2, 15)]);
        assert_eq!(
            parse_inet6("00000000000000000000000000000001 01 80 10 80       lo"),
            Some(Ipv6Addr::LOCALHOST)
        );
        assert!(own_addresses().contains(&IpAddr::from([127, 0, 0, 1])));
    }
}
