//! The two URLs in the config: the broker's (`amqp://user@host:port/vhost`, never with a
//! password) and the store's (`oci-dir:/path`, `oci://host:port/repo`, `oci+http://…`).

use std::fmt;
use std::path::PathBuf;

/// A broker address without its password (that comes from `amqp.password[_file]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    pub tls: bool,
    pub username: String,
    pub host: String,
    pub port: u16,
    /// Decoded: `/` for the default vhost.
    pub vhost: String,
    /// Query parameters as given (`heartbeat=…` is refused: it belongs to the config).
    pub query: Option<String>,
}

impl AmqpUrl {
    /// A URL without a password (one in it is an error naming where it belongs).
    pub fn parse(text: &str) -> Result<AmqpUrl, String> {
        match AmqpUrl::parse_with_password(text)? {
            (url, None) => Ok(url),
            (_, Some(_)) => Err(
                "contains a password; put it in amqp.password_file (or amqp.password / CORRAL_AMQP_PASSWORD)"
                    .into(),
            ),
        }
    }

    /// A URL and the password in it, if any (decoded).
    pub fn parse_with_password(text: &str) -> Result<(AmqpUrl, Option<String>), String> {
        let (tls, rest) = if let Some(rest) = text.strip_prefix("amqps://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("amqp://") {
            (false, rest)
        } else {
            return Err(format!("{text:?} must start with amqp:// or amqps://"));
        };
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query.to_string())),
            None => (rest, None),
        };
        if let Some(query) = &query
            && query.split('&').any(|kv| kv.starts_with("heartbeat="))
        {
            return Err("sets heartbeat in the URL; use amqp.heartbeat_seconds".into());
        }
        let (authority, path) = match rest.split_once('/') {
            Some((authority, path)) => (authority, Some(path)),
            None => (rest, None),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((user, hostport)) => (Some(user), hostport),
            None => (None, authority),
        };
        let (username, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
            Some((user, "")) => (decode(user)?, None),
            Some((user, password)) => (decode(user)?, Some(decode(password)?)),
            None => ("guest".to_string(), None),
        };
        let default_port = if tls { 5671 } else { 5672 };
        let (host, port) = split_host_port(hostport, default_port)?;
        let vhost = match path {
            None => "/".to_string(),
            Some(path) => decode(path)?,
        };
        let url = AmqpUrl {
            tls,
            username,
            host,
            port,
            vhost,
            query,
        };
        Ok((url, password))
    }

    /// The full URI a client library connects with, the password percent-encoded in.
    pub fn with_password(&self, password: Option<&str>) -> String {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        let auth = match password {
            Some(p) => format!("{}:{}", encode(&self.username), encode(p)),
            None => encode(&self.username),
        };
        let query = self
            .query
            .as_ref()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        format!(
            "{scheme}://{auth}@{}:{}/{}{query}",
            host_for_url(&self.host),
            self.port,
            encode(&self.vhost)
        )
    }

    pub fn is_loopback(&self) -> bool {
        matches!(self.host.as_str(), "localhost" | "::1") || self.host.starts_with("127.")
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.with_password(None))
    }
}

/// Where build artifacts go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// An OCI image-layout directory on this host.
    Dir(PathBuf),
    /// An OCI registry (distribution API), over HTTPS unless `tls` is false (`oci+http://`).
    Registry {
        tls: bool,
        host: String,
        port: Option<u16>,
        repository: String,
    },
}

impl StoreUrl {
    pub fn parse(text: &str) -> Result<StoreUrl, String> {
        if let Some(path) = text.strip_prefix("oci-dir:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(format!(
                    "{text:?}: the directory of oci-dir: must be an absolute path"
                ));
            }
            return Ok(StoreUrl::Dir(path));
        }
        let (tls, rest) = if let Some(rest) = text.strip_prefix("oci://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("oci+http://") {
            (false, rest)
        } else {
            return Err(format!(
                "{text:?} must be oci-dir:/ABSOLUTE/PATH, oci://HOST[:PORT]/REPOSITORY or oci+http://HOST[:PORT]/REPOSITORY"
            ));
        };
        let Some((hostport, repository)) = rest.split_once('/') else {
            return Err(format!("{text:?} names no repository after the host"));
        };
        if hostport.contains('@') {
            return Err("contains credentials; use store.username and store.password_file or store.token_file".into());
        }
        let (host, port) = split_host_port(hostport, 0)?;
        let port = (port != 0).then_some(port);
        if !valid_repository(repository) {
            return Err(format!(
                "repository {repository:?} is not an OCI repository name (lowercase letters, digits, '.', '_', '-' separated by '/')"
            ));
        }
        Ok(StoreUrl::Registry {
            tls,
            host,
            port,
            repository: repository.to_string(),
        })
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Dir(path) => write!(f, "oci-dir:{}", path.display()),
            StoreUrl::Registry {
                tls,
                host,
                port,
                repository,
            } => {
                let scheme = if *tls { "oci" } else { "oci+http" };
                write!(f, "{scheme}://{}", host_for_url(host))?;
                if let Some(port) = port {
                    write!(f, ":{port}")?;
                }
                write!(f, "/{repository}")
            }
        }
    }
}

fn valid_repository(repo: &str) -> bool {
    !repo.is_empty()
        && repo.len() <= 255
        && repo.split('/').all(|part| {
            let bytes = part.as_bytes();
            !bytes.is_empty()
                && bytes[0].is_ascii_alphanumeric()
                && bytes[bytes.len() - 1].is_ascii_alphanumeric()
                && bytes.iter().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
        })
}

fn split_host_port(hostport: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{hostport:?}: unclosed '[' in an IPv6 address"))?;
        (host, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err("names no host".into());
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
    {
        return Err(format!("{host:?} is not a host name or address"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {p:?} is not a number from 1 to 65535"))?,
    };
    Ok((host.to_string(), port))
}

fn host_for_url(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{text:?} has a bad percent escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} does not decode to UTF-8"))
}

fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqp_url_round_trips_and_refuses_passwords() {
        let url = AmqpUrl::parse("amqp://corral@10.0.0.5/corral").unwrap();
        assert_eq!(url.port, 5672);
        assert_eq!(url.vhost, "corral");
        assert_eq!(url.to_string(), "amqp://corral@10.0.0.5:5672/corral");
        assert_eq!(
            url.with_password(Some("p@ss/w")),
            "amqp://corral:p%40ss%2Fw@10.0.0.5:5672/corral"
        );
        assert_eq!(
            AmqpUrl::parse("amqps://h:5999/%2f").unwrap().vhost,
            "/".to_string()
        );
        assert!(
            AmqpUrl::parse("amqp://u:secret@h/v")
                .unwrap_err()
                .contains("password")
        );
        assert!(AmqpUrl::parse("http://h").is_err());
        assert!(AmqpUrl::parse("amqp://h:99999/").is_err());
        assert!(AmqpUrl::parse("amqp://h/v?heartbeat=5").is_err());
    }

    #[test]
    fn a_password_in_the_url_is_split_off() {
        let (url, password) =
            AmqpUrl::parse_with_password("amqp://builder:p%40ss@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(password.as_deref(), Some("p@ss"));
        assert_eq!(url.to_string(), "amqp://builder@127.0.0.1:5672/%2F");
        assert_eq!(
            url.with_password(password.as_deref()),
            "amqp://builder:p%40ss@127.0.0.1:5672/%2F"
        );
        let (_, none) = AmqpUrl::parse_with_password("amqp://builder@h/v").unwrap();
        assert_eq!(none, None);
    }

    #[test]
    fn store_urls() {
        assert_eq!(
            StoreUrl::parse("oci-dir:/var/lib/corral/store").unwrap(),
            StoreUrl::Dir("/var/lib/corral/store".into())
        );
        assert!(StoreUrl::parse("oci-dir:relative").is_err());
        let reg = StoreUrl::parse("oci+http://127.0.0.1:5000/corral/builds").unwrap();
        assert_eq!(reg.to_string(), "oci+http://127.0.0.1:5000/corral/builds");
        assert!(matches!(
            reg,
            StoreUrl::Registry {
                tls: false,
                port: Some(5000),
                ..
            }
        ));
        assert!(StoreUrl::parse("oci://registry.example/Upper").is_err());
        assert!(StoreUrl::parse("oci://registry.example").is_err());
        assert!(StoreUrl::parse("s3://bucket/x").is_err());
    }
}
