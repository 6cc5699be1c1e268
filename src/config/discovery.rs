//! `[[discovery]]`: backends found in DNS, and how they join the file's.
//!
//! Validation checks the entries' shape only; nothing here asks a DNS
//! server (`sticky-proxy check` must pass with the server down). The
//! resolving is `ops::discovery`'s; what it finds comes back here through
//! [`Config::with_discovered`], which builds the config a reload would.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{
    plain_id, validate_address, BackendConfig, Config, ConfigError, HealthConfig, RawHealth, Validator, MAX_RING_POINTS,
};
use crate::routing::ring;

/// Which records a `[[discovery]]` name is looked up for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordKind {
    /// `kind = "srv"`: each SRV target is a backend, its id the target's
    /// host name.
    Srv,
    /// `kind = "a"`: each A/AAAA address is a backend at `port`, its id
    /// `ip:port`.
    A,
}

/// One `[[discovery]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// `dns`: the name looked up, without a trailing dot; always absolute
    /// (no search domains).
    pub dns: String,
    /// `kind` (default `"srv"`).
    pub kind: RecordKind,
    /// `port`: the backends' port (`kind = "a"` only; SRV records carry it).
    pub port: Option<u16>,
    /// `resolver`: the DNS server asked; `None`: the system's
    /// (`/etc/resolv.conf`).
    pub resolver: Option<SocketAddr>,
    /// `interval` (default 5s): the shortest time between two lookups; a
    /// longer TTL waits for the TTL.
    pub interval: Duration,
    /// `empty_after` (default 30s): how long an empty answer (NXDOMAIN, no
    /// records) must hold before the backends found before are removed.
    pub empty_after: Duration,
    /// `weight` (default 1): every backend found gets it.
    pub weight: u32,
    /// `[health]` as the file's static backends get it.
    pub health: HealthConfig,
}

/// Where a backend came from (`"source"` in the admin API's `/backends`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BackendSource {
    /// A `[[backends]]` table of the file.
    #[default]
    Config,
    /// The `[[discovery]]` entry of this `dns` name.
    Dns(String),
}

impl fmt::Display for BackendSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSource::Config => f.write_str("config"),
            BackendSource::Dns(name) => write!(f, "dns:{name}"),
        }
    }
}

impl DiscoveryConfig {
    /// A backend found through this entry, or `None` when the id or
    /// address can't be a backend's (a host name with odd characters).
    pub fn backend(&self, id: &str, address: &str) -> Option<BackendConfig> {
        if !plain_id(id) || validate_address(address, false).is_err() {
            return None;
        }
        Some(BackendConfig {
            id: id.to_string(),
            address: address.to_string(),
            server: address.to_string(),
            weight: self.weight,
            health: self.health.clone(),
            draining: false,
            tls: None,
            source: BackendSource::Dns(self.dns.clone()),
        })
    }
}

impl Config {
    /// This config with its discovered backends replaced by `found` (by
    /// `dns` name; names this config has no `[[discovery]]` for are
    /// ignored). The static backends come first, in file order, then each
    /// `[[discovery]]` entry's in file order, each sorted by id, so the
    /// same records make the same list, and the same ring, whatever order
    /// the answers came in. An id seen before (a static backend's, or an
    /// earlier entry's) is skipped, as are backends past the ring's limits.
    pub fn with_discovered(&self, found: &BTreeMap<String, Vec<BackendConfig>>) -> Config {
        let mut backends: Vec<BackendConfig> =
            self.backends.iter().filter(|b| b.source == BackendSource::Config).cloned().collect();
        let mut seen: HashSet<String> = backends.iter().map(|b| b.id.clone()).collect();
        let mut points: u64 = backends.iter().map(|b| u64::from(b.weight) * u64::from(self.routing.replicas)).sum();
        for d in &self.discovery {
            let Some(list) = found.get(&d.dns) else { continue };
            let mut list: Vec<&BackendConfig> = list.iter().collect();
            list.sort_by(|a, b| (&a.id, &a.address).cmp(&(&b.id, &b.address)));
            for b in list {
                let cost = u64::from(b.weight) * u64::from(self.routing.replicas);
                if backends.len() >= ring::MAX_MEMBERS || points + cost > MAX_RING_POINTS || seen.contains(&b.id) {
                    continue;
                }
                seen.insert(b.id.clone());
                points += cost;
                backends.push(BackendConfig { source: BackendSource::Dns(d.dns.clone()), ..b.clone() });
            }
        }
        Config { backends, ..self.clone() }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiscovery {
    dns: Spanned<String>,
    kind: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    resolver: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    empty_after: Option<Spanned<String>>,
    weight: Option<Spanned<i64>>,
}

impl Validator<'_> {
    pub(super) fn discovery(
        &self,
        raw: &[RawDiscovery],
        global_health: Option<&RawHealth>,
    ) -> Result<Vec<DiscoveryConfig>, ConfigError> {
        let health = self.global_health(global_health)?;
        let mut names: HashSet<String> = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, d) in raw.iter().enumerate() {
            let field = |name: &str| format!("discovery[{i}].{name}");
            let dns = d.dns.get_ref().trim().trim_end_matches('.').to_ascii_lowercase();
            let valid = !dns.is_empty()
                && dns.len() <= 253
                && dns.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !valid {
                return self.err(
                    d.dns.span(),
                    &field("dns"),
                    format!(
                        "{:?} is not a DNS name; write e.g. \"_http._tcp.app.default.svc.cluster.local\" or \"app.internal\"",
                        d.dns.get_ref()
                    ),
                );
            }
            if !names.insert(dns.clone()) {
                return self.err(d.dns.span(), &field("dns"), format!("{dns:?} is discovered twice"));
            }
            let kind = match d.kind.as_ref().map(|k| (k.get_ref().as_str(), k.span())) {
                None | Some(("srv", _)) => RecordKind::Srv,
                Some(("a", _)) => RecordKind::A,
                Some((other, span)) => {
                    return self.err(span, &field("kind"), format!("{other:?}: use \"srv\" or \"a\""))
                }
            };
            let port = match (&d.port, kind) {
                (None, RecordKind::Srv) => None,
                (Some(p), RecordKind::Srv) => {
                    return self.err(
                        p.span(),
                        &field("port"),
                        "SRV records carry their port; remove port (or use kind = \"a\")".into(),
                    )
                }
                (None, RecordKind::A) => {
                    return self.err(
                        d.dns.span(),
                        &field("port"),
                        "kind = \"a\" needs the backends' port, e.g. port = 8080".into(),
                    )
                }
                (Some(p), RecordKind::A) => match u16::try_from(*p.get_ref()) {
                    Ok(n) if n != 0 => Some(n),
                    _ => return self.err(p.span(), &field("port"), format!("must be 1 to 65535, got {}", p.get_ref())),
                },
            };
            let resolver = match &d.resolver {
                None => None,
                Some(r) => {
                    let text = r.get_ref().trim();
                    let parsed = text
                        .parse::<SocketAddr>()
                        .ok()
                        .or_else(|| text.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)));
                    match parsed {
                        Some(addr) if addr.port() != 0 => Some(addr),
                        _ => {
                            return self.err(
                                r.span(),
                                &field("resolver"),
                                format!("{text:?} is not an IP address (with an optional port), e.g. \"10.96.0.10\" or \"127.0.0.1:5353\""),
                            )
                        }
                    }
                }
            };
            let weight = match &d.weight {
                None => 1,
                Some(w) => match u32::try_from(*w.get_ref()) {
                    Ok(w) if (1..=10_000).contains(&w) => w,
                    _ => {
                        return self.err(w.span(), &field("weight"), format!("must be 1 to 10000, got {}", w.get_ref()))
                    }
                },
            };
            out.push(DiscoveryConfig {
                dns,
                kind,
                port,
                resolver,
                interval: self.duration(d.interval.as_ref(), &field("interval"), Duration::from_secs(5))?,
                empty_after: self.duration(d.empty_after.as_ref(), &field("empty_after"), Duration::from_secs(30))?,
                weight,
                health: health.clone(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:8080"

[routing]
key = ["header:x-device-id"]
"#;

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("{BASE}{extra}"))
    }

    #[test]
    fn discovery_alone_is_a_config() {
        let c = parse(
            "[[discovery]]\ndns = \"_http._tcp.app.test.\"\nresolver = \"127.0.0.1:5353\"\ninterval = \"2s\"\n\
             [[discovery]]\ndns = \"App.Test\"\nkind = \"a\"\nport = 8080\nweight = 2\nempty_after = \"1m\"\n",
        )
        .expect("valid");
        assert!(c.backends.is_empty());
        assert_eq!(c.discovery.len(), 2);
        let (srv, a) = (&c.discovery[0], &c.discovery[1]);
        assert_eq!((srv.dns.as_str(), srv.kind, srv.port), ("_http._tcp.app.test", RecordKind::Srv, None));
        assert_eq!(srv.resolver, Some("127.0.0.1:5353".parse().expect("addr")));
        assert_eq!((srv.interval, srv.empty_after, srv.weight), (Duration::from_secs(2), Duration::from_secs(30), 1));
        assert_eq!((a.dns.as_str(), a.kind, a.port, a.resolver), ("app.test", RecordKind::A, Some(8080), None));
        assert_eq!((a.weight, a.empty_after, a.interval), (2, Duration::from_secs(60), Duration::from_secs(5)));
        // Still an error without either.
        assert_eq!(parse("").expect_err("no backends").field.as_deref(), Some("backends"));
    }

    #[test]
    fn bad_entries_name_their_field() {
        for (entry, field) in [
            ("dns = \"a..b\"", "discovery[0].dns"),
            ("dns = \"x.test\"\nkind = \"mx\"", "discovery[0].kind"),
            ("dns = \"x.test\"\nport = 80", "discovery[0].port"),
            ("dns = \"x.test\"\nkind = \"a\"", "discovery[0].port"),
            ("dns = \"x.test\"\nkind = \"a\"\nport = 0", "discovery[0].port"),
            ("dns = \"x.test\"\nresolver = \"dns.google\"", "discovery[0].resolver"),
            ("dns = \"x.test\"\ninterval = \"0s\"", "discovery[0].interval"),
            ("dns = \"x.test\"\nweight = 0", "discovery[0].weight"),
        ] {
            let e = parse(&format!("[[discovery]]\n{entry}\n")).expect_err(entry);
            assert_eq!(e.field.as_deref(), Some(field), "{entry}: {e}");
            assert!(e.line.is_some(), "{entry}: {e}");
        }
        let e = parse("[[discovery]]\ndns = \"x.test\"\n[[discovery]]\ndns = \"X.test.\"\n").expect_err("twice");
        assert_eq!(e.field.as_deref(), Some("discovery[1].dns"), "{e}");
        assert_eq!(
            parse("[[discovery]]\ndns = \"x.test\"\nresolver = \"127.0.0.1\"\n").expect("port 53").discovery[0]
                .resolver,
            Some("127.0.0.1:53".parse().expect("addr"))
        );
    }

    #[test]
    fn discovered_backends_join_sorted_after_the_static_ones() {
        let c = parse(
            "[[backends]]\nid = \"static\"\naddress = \"127.0.0.1:1\"\n\
             [[discovery]]\ndns = \"b.test\"\n[[discovery]]\ndns = \"a.test\"\nkind = \"a\"\nport = 9\n",
        )
        .expect("valid");
        let (b, a) = (&c.discovery[0], &c.discovery[1]);
        let of = |d: &DiscoveryConfig, ids: &[(&str, &str)]| -> Vec<BackendConfig> {
            ids.iter().map(|(id, addr)| d.backend(id, addr).expect("valid backend")).collect()
        };
        let mut found = BTreeMap::new();
        found.insert("a.test".to_string(), of(a, &[("127.0.0.3:9", "127.0.0.3:9"), ("127.0.0.2:9", "127.0.0.2:9")]));
        found.insert(
            "b.test".to_string(),
            of(b, &[("z.test", "127.0.0.9:1"), ("static", "127.0.0.8:1"), ("m.test", "127.0.0.7:1")]),
        );
        found.insert("gone.test".to_string(), of(b, &[("x.test", "127.0.0.6:1")]));
        let merged = c.with_discovered(&found);
        let ids: Vec<(String, String)> = merged.backends.iter().map(|b| (b.id.clone(), b.source.to_string())).collect();
        let want = [
            ("static", "config"),
            ("m.test", "dns:b.test"),
            ("z.test", "dns:b.test"),
            ("127.0.0.2:9", "dns:a.test"),
            ("127.0.0.3:9", "dns:a.test"),
        ];
        assert_eq!(ids, want.map(|(i, s)| (i.to_string(), s.to_string())));
        // Answers in another order give the same list; a second merge
        // replaces the discovered backends rather than adding to them.
        for list in found.values_mut() {
            list.reverse();
        }
        let again = merged.with_discovered(&found);
        assert_eq!(again.backends, merged.backends);
        assert_eq!(merged.with_discovered(&BTreeMap::new()).backends.len(), 1);
        assert!(b.backend("bad id!", "127.0.0.1:1").is_none());
    }
}
