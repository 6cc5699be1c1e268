//! `[[discovery]]`: backends from DNS records, kept up to date.
//!
//! One task looks up every `[[discovery]]` name of the running config
//! (hickory-resolver, over UDP and TCP to the entry's `resolver` or the
//! system's), each at its record's TTL but no more often than its
//! `interval`. A set of backends that changed goes through
//! [`Reloader::apply_discovered`], the code a reload uses: one snapshot
//! swap, health carried over for the backends that stay.
//!
//! - **SRV** (`kind = "srv"`): each target is a backend whose id is the
//!   target's host name (without the trailing dot), so a pod that comes
//!   back under the same name keeps its devices. Its address is the
//!   target's lowest A/AAAA address (looked up through the same resolver,
//!   so the additional section of the SRV answer, cached by the resolver,
//!   usually answers it) with the SRV port; a target without address
//!   records keeps its name (`target:port`), which the connector then
//!   resolves through the system at connect time, like any DNS-name
//!   backend. The SRV priority and weight are not used: every backend gets
//!   the entry's `weight`.
//! - **A/AAAA** (`kind = "a"`): each address is a backend at `port`, its id
//!   `ip:port`. That identity is the address: a pod rescheduled with a new
//!   IP is a new backend, and its devices move.
//!
//! Failures never empty the ring. A lookup that fails (timeout, SERVFAIL,
//! no server) keeps the last good set; an empty answer (NXDOMAIN, or the
//! name without records) is applied only once it has held for
//! `empty_after`. Each change of a name's state (resolving, empty,
//! failing) is logged once, and every lookup is counted in
//! `sticky_proxy_discovery_resolutions_total{dns, result}`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{ResolveError, Resolver, TokioResolver};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::reload::Reloader;
use crate::config::{BackendConfig, DiscoveryConfig, RecordKind};
use crate::metrics::Metrics;
use crate::routing::Router;
use crate::util::shutdown::raised;

/// Longest wait between two lookups of a name, whatever its TTL.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// One query's timeout (each of up to two attempts).
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// What a name's last lookup said; a change is logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    New,
    Resolving,
    Empty,
    Failing,
}

/// Why a lookup gave no backends.
enum Failure {
    /// NXDOMAIN, or the name has no such records: an answer.
    Empty,
    /// No answer to trust: timeout, SERVFAIL, refused, no server.
    Error(String),
}

/// One `[[discovery]]` name being watched.
struct Watched {
    config: DiscoveryConfig,
    /// Built on first use; `None` after the system's config could not be read.
    resolver: Option<TokioResolver>,
    due: Instant,
    /// The set last applied.
    good: Vec<BackendConfig>,
    state: State,
    /// Since when the answers have been empty while `good` is not.
    empty_since: Option<Instant>,
}

/// Watches the running config's `[[discovery]]` names until `stop` is
/// raised; a reload that adds, changes or removes entries is followed.
pub(crate) async fn run(
    reloader: Arc<Reloader>,
    router: Router,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut watched: BTreeMap<String, Watched> = BTreeMap::new();
    let mut swaps = router.subscribe();
    loop {
        let config = router.load().config().clone();
        let mut changed = false;
        watched.retain(|name, w| {
            let keep = config.discovery.iter().any(|d| d.dns == *name);
            changed |= !keep && !w.good.is_empty();
            keep
        });
        let now = Instant::now();
        for d in &config.discovery {
            match watched.get_mut(&d.dns) {
                Some(w) if w.config == *d => {}
                // Changed by a reload: keep the backends found (with the new
                // weight and health) and look again now.
                Some(w) => {
                    if w.config.resolver != d.resolver {
                        w.resolver = None;
                    }
                    w.good = w.good.iter().filter_map(|b| d.backend(&b.id, &b.address)).collect();
                    w.config = d.clone();
                    w.due = now;
                    changed = true;
                }
                None => {
                    watched.insert(
                        d.dns.clone(),
                        Watched {
                            config: d.clone(),
                            resolver: None,
                            due: now,
                            good: Vec::new(),
                            state: State::New,
                            empty_since: None,
                        },
                    );
                }
            }
        }
        let due = watched.values_mut().filter(|w| w.due <= now).map(|w| w.refresh(&metrics));
        changed |= futures_util::future::join_all(due).await.into_iter().any(|c| c);
        if changed {
            let found: BTreeMap<String, Vec<BackendConfig>> =
                watched.iter().map(|(name, w)| (name.clone(), w.good.clone())).collect();
            let reloader = Arc::clone(&reloader);
            match tokio::task::spawn_blocking(move || reloader.apply_discovered(found)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => error!("backends found by DNS could not be applied: {e}"),
                Err(e) => error!("backends found by DNS could not be applied (a bug: {e})"),
            }
            // Our own swap: nothing to look at in it.
            swaps.mark_unchanged();
        }
        let next = watched.values().map(|w| w.due).min();
        tokio::select! {
            _ = sleep_until(next) => {}
            seen = swaps.changed() => {
                if seen.is_err() {
                    return;
                }
            }
            _ = raised(&mut stop) => return,
        }
    }
}

async fn sleep_until(when: Option<Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(when).await,
        None => std::future::pending().await,
    }
}

impl Watched {
    /// Looks the name up once and updates `good` by the failure policy;
    /// `true` when `good` changed.
    async fn refresh(&mut self, metrics: &Metrics) -> bool {
        let d = &self.config;
        let looked_up = match &self.resolver {
            Some(resolver) => lookup(resolver, d).await,
            None => match build_resolver(d) {
                Ok(resolver) => lookup(self.resolver.insert(resolver), d).await,
                Err(e) => Err(Failure::Error(format!("cannot read the system's DNS config: {e}"))),
            },
        };
        let now = Instant::now();
        let (name, before) = (d.dns.as_str(), self.good.len());
        match looked_up {
            Ok((found, ttl)) if !found.is_empty() => {
                metrics.discovery_resolution(name, "ok");
                self.due = now + ttl.clamp(d.interval, MAX_WAIT.max(d.interval));
                self.empty_since = None;
                if self.state != State::Resolving {
                    info!(dns = name, backends = found.len(), "DNS discovery: resolving");
                    self.state = State::Resolving;
                }
                let changed = found != self.good;
                self.good = found;
                changed
            }
            Ok(_) | Err(Failure::Empty) => {
                metrics.discovery_resolution(name, "empty");
                self.due = now + d.interval;
                if self.good.is_empty() {
                    if self.state != State::Empty {
                        warn!(dns = name, "DNS discovery: the name has no records; no backends from it");
                        self.state = State::Empty;
                    }
                    return false;
                }
                let since = *self.empty_since.get_or_insert(now);
                if self.state != State::Empty {
                    warn!(
                        dns = name,
                        backends = before,
                        empty_after = ?d.empty_after,
                        "DNS discovery: the name has no records; keeping the backends found before until it has had none for empty_after"
                    );
                    self.state = State::Empty;
                }
                let removal = since + d.empty_after;
                if now >= removal {
                    warn!(
                        dns = name,
                        backends = before,
                        "DNS discovery: no records for empty_after; removing the backends found before"
                    );
                    self.good.clear();
                    self.empty_since = None;
                    return true;
                }
                self.due = self.due.min(removal);
                false
            }
            Err(Failure::Error(e)) => {
                metrics.discovery_resolution(name, "error");
                self.due = now + d.interval;
                if self.state != State::Failing {
                    warn!(
                        dns = name,
                        backends = before,
                        "DNS discovery: lookup failed, keeping the backends found before: {e}"
                    );
                    self.state = State::Failing;
                }
                false
            }
        }
    }
}

fn build_resolver(d: &DiscoveryConfig) -> Result<TokioResolver, ResolveError> {
    let (config, mut opts) = match d.resolver {
        Some(server) => {
            let servers = NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true);
            let mut opts = ResolverOpts::default();
            opts.use_hosts_file = ResolveHosts::Never;
            (ResolverConfig::from_parts(None, Vec::new(), servers), opts)
        }
        None => hickory_resolver::system_conf::read_system_conf()?,
    };
    opts.timeout = QUERY_TIMEOUT;
    opts.attempts = 2;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    // An empty answer is looked at again every interval, not at the SOA's TTL.
    opts.negative_max_ttl = Some(d.interval);
    opts.cache_size = 256;
    Ok(Resolver::builder_with_config(config, TokioConnectionProvider::default()).with_options(opts).build())
}

/// The backends `d`'s records name now, and how long the answer holds.
async fn lookup(resolver: &TokioResolver, d: &DiscoveryConfig) -> Result<(Vec<BackendConfig>, Duration), Failure> {
    // Absolute: no search domains.
    let name = format!("{}.", d.dns);
    let mut found = Vec::new();
    let valid_until;
    match (d.kind, d.port) {
        (RecordKind::A, Some(port)) => {
            let ips = resolver.lookup_ip(name).await.map_err(failure)?;
            valid_until = ips.valid_until();
            for ip in ips.iter() {
                let address = SocketAddr::new(ip, port).to_string();
                found.extend(d.backend(&address, &address));
            }
        }
        (RecordKind::A, None) => return Err(Failure::Error("kind = \"a\" without a port".into())),
        (RecordKind::Srv, _) => {
            let srv = resolver.srv_lookup(name).await.map_err(failure)?;
            let mut until = srv.as_lookup().valid_until();
            for record in srv.iter() {
                let target = record.target().to_ascii().trim_end_matches('.').to_ascii_lowercase();
                // "." is RFC 2782's "not available here".
                if target.is_empty() {
                    continue;
                }
                let ip: Option<IpAddr> = match resolver.lookup_ip(format!("{target}.")).await {
                    Ok(ips) => {
                        until = until.min(ips.valid_until());
                        ips.iter().min()
                    }
                    Err(e) => match failure(e) {
                        Failure::Empty => None,
                        error => return Err(error),
                    },
                };
                let address = match ip {
                    Some(ip) => SocketAddr::new(ip, record.port()).to_string(),
                    None => format!("{target}:{}", record.port()),
                };
                found.extend(d.backend(&target, &address));
            }
            valid_until = until;
        }
    }
    Ok((found, valid_until.saturating_duration_since(std::time::Instant::now())))
}

fn failure(e: ResolveError) -> Failure {
    let empty = e.proto().is_some_and(|p| {
        matches!(
            p.kind(),
            ProtoErrorKind::NoRecordsFound { response_code: ResponseCode::NXDomain | ResponseCode::NoError, .. }
        )
    });
    if empty {
        Failure::Empty
    } else {
        Failure::Error(e.to_string())
    }
}
