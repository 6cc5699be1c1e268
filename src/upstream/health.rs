//! Backend health: active checks, failures seen on real traffic, and the
//! up/down transitions that send a down backend's devices to their failover
//! owner, and back when it recovers.
//!
//! HAProxy's model: `fall` consecutive failures mark a backend down, `rise`
//! consecutive successful active checks mark it up. Failures count from two
//! sources: active checks (`GET health.path` every `interval`, answered
//! 2xx/3xx within `timeout`) and real traffic (a connect that fails or a
//! response that times out). Without active checks (no `health.path`), a
//! backend that failed stays down for `fail_timeout`, then a TCP connect
//! probe decides, like nginx's `max_fails`/`fail_timeout`.
//!
//! A transition builds a new routing snapshot with that backend's health
//! flipped (the ring is shared, not rebuilt) and swaps it in.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{HeaderValue, HOST};
use hyper::{Request, StatusCode};
use tokio::sync::watch;
use tracing::{info, warn};

use super::connector::{Connector, Endpoint};
use super::error::UpstreamFailure;
use crate::config::{HealthConfig, Observe};
use crate::metrics::Metrics;
use crate::routing::{Backend, Router};
use crate::util::shutdown::raised;

/// How often the checker looks for checks that are due.
const TICK: Duration = Duration::from_millis(50);

/// Health bookkeeping for one running proxy.
#[derive(Debug)]
pub struct Health {
    router: Router,
    metrics: Arc<Metrics>,
    tracks: Mutex<HashMap<String, Track>>,
    /// Counts transitions; `changed()` fires after each one.
    transitions: watch::Sender<u64>,
}

/// Streaks and schedule of one backend, by id (survives reloads).
#[derive(Debug, Default)]
struct Track {
    streak: Streak,
    down_since: Option<Instant>,
    next_check: Option<Instant>,
    checking: bool,
}

/// Where an observation came from (for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// An active check (`GET health.path`).
    Check,
    /// A TCP probe of a down backend in passive-only mode.
    Probe,
    /// A real request that failed.
    Traffic,
}

impl Health {
    /// Health bookkeeping over the live table; run [`Health::run`] for checks.
    pub fn new(router: Router, metrics: Arc<Metrics>) -> Arc<Health> {
        let (transitions, _) = watch::channel(0);
        Arc::new(Health { router, metrics, tracks: Mutex::new(HashMap::new()), transitions })
    }

    /// Health transitions so far; `changed()` fires after each one.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.transitions.subscribe()
    }

    /// A request to `backend` got no response: counted in its metrics, and
    /// told to health when `health.observe` says it counts (see
    /// [`UpstreamFailure::counts_against_backend`]).
    pub fn upstream_failed(&self, backend: &Backend, failure: UpstreamFailure) {
        if let Some(kind) = failure.metric_kind() {
            backend.stats.upstream_error(kind);
        }
        let observe = {
            let table = self.router.load();
            let i = table.position(&backend.id);
            i.and_then(|i| table.config().backends.get(i)).map_or(Observe::Connect, |b| b.health.observe)
        };
        if failure.counts_against_backend(observe) {
            self.observe(&backend.id, Err(&failure), Source::Traffic);
        }
    }

    /// Counts one observation, `Ok` or failed with its reason, and flips
    /// the backend's health when a streak reaches `fall` (down, logged with
    /// the reason of the failure that made it) or `rise` (up).
    pub fn observe(&self, id: &str, outcome: Result<(), &dyn fmt::Display>, source: Source) {
        let ok = outcome.is_ok();
        let table = self.router.load_full();
        let Some(index) = table.position(id) else { return };
        let Some(config) = table.config().backends.get(index).map(|b| b.health.clone()) else { return };
        let Some(up) = table.is_up(id) else { return };
        let mut tracks = self.tracks.lock().unwrap_or_else(|p| p.into_inner());
        let track = tracks.entry(id.to_string()).or_default();
        let flip = track.streak.observe(up, ok, source, config.fall, config.rise);
        if flip.is_none() && !ok && source == Source::Check && track.streak.fails >= config.fall {
            // Down by traffic alone so far; now the checks agree, and the
            // backend's tunnels move too.
            if let (true, Err(why)) = (table.is_down_by_traffic(id), outcome) {
                drop(tracks);
                self.confirm_down(id, why);
            }
            return;
        }
        let Some(now_up) = flip else { return };
        track.down_since = (!now_up).then(Instant::now);
        let Streak { fails, oks } = track.streak;
        drop(tracks);

        let updated = self.router.update(|current| {
            // A reload in between may have removed the backend: nothing to do.
            match current.is_up(id) {
                Some(was) if was != now_up && !now_up && source == Source::Traffic => {
                    Ok((current.with_traffic_down(id), ()))
                }
                Some(was) if was != now_up => Ok((current.with_health(id, now_up), ())),
                _ => Err(()),
            }
        });
        if updated.is_err() {
            return;
        }
        let table = self.router.load();
        self.metrics.health_transition(id, now_up);
        table.publish_states(&self.metrics);
        self.transitions.send_modify(|n| *n += 1);
        if now_up {
            info!(backend = id, ?source, successes = oks, "backend is up again; its devices come back to it");
        } else {
            let last_failure = outcome.err().map(|why| why.to_string());
            warn!(
                backend = id,
                ?source,
                failures = fails,
                last_failure,
                "backend is down; its devices fail over to the next backend up"
            );
        }
    }

    /// Turns a backend that is down by traffic alone into one that active
    /// checks found down, so that its tunnels move.
    fn confirm_down(&self, id: &str, why: &dyn fmt::Display) {
        let updated = self.router.update(|current| match current.is_down_by_traffic(id) {
            true => Ok((current.with_health(id, false), ())),
            false => Err(()),
        });
        if updated.is_ok() {
            // Not a transition (it was down already); the swap itself wakes
            // the rebalancer.
            warn!(backend = id, last_failure = %why, "active checks confirm the backend is down; its tunnels move");
        }
    }

    /// Runs active checks and probes until `stop` is raised.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = raised(&mut stop) => return,
            }
            self.start_due_checks();
        }
    }

    fn start_due_checks(self: &Arc<Self>) {
        let table = self.router.load_full();
        let now = Instant::now();
        let mut tracks = self.tracks.lock().unwrap_or_else(|p| p.into_inner());
        tracks.retain(|id, _| table.is_up(id).is_some());
        for (backend, config) in table.backends().iter().zip(&table.config().backends) {
            let up = table.is_up(&backend.id).unwrap_or(true);
            let track = tracks.entry(backend.id.clone()).or_default();
            if track.checking {
                continue;
            }
            let config = config.health.clone();
            let due = match &config.path {
                Some(_) => track.next_check.is_none_or(|at| at <= now),
                // Passive only: probe a down backend once fail_timeout has passed.
                None => !up && track.down_since.is_some_and(|since| now >= since + config.fail_timeout),
            };
            if !due {
                continue;
            }
            track.checking = true;
            track.next_check = Some(now + config.interval);
            let (health, backend) = (Arc::clone(self), Arc::clone(backend));
            tokio::spawn(async move { health.check(backend, config).await });
        }
    }

    async fn check(&self, backend: Arc<Backend>, config: HealthConfig) {
        let started = Instant::now();
        let (outcome, source) = match &config.path {
            Some(path) => (self.http_check(&backend, path, config.timeout).await, Source::Check),
            None => {
                let probe = Connector::new(config.timeout).stream(endpoint(&backend)).await;
                (probe.map(drop).map_err(|failure| failure.to_string()), Source::Probe)
            }
        };
        let ok = outcome.is_ok();
        self.metrics.health_check(&backend.id, ok, started.elapsed());
        {
            let mut tracks = self.tracks.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(track) = tracks.get_mut(&backend.id) {
                track.checking = false;
                if !ok && source == Source::Probe {
                    // Still dead: wait another fail_timeout before probing again.
                    track.down_since = Some(Instant::now());
                }
            }
        }
        self.observe(&backend.id, outcome.as_ref().map(|_| ()).map_err(|why| why as &dyn fmt::Display), source);
    }

    /// `GET path` on a fresh connection (a check must see a dead listener),
    /// over TLS for a TLS backend with the same verification as traffic;
    /// healthy if answered 2xx or 3xx within `timeout`, handshakes included.
    /// The error says why not.
    async fn http_check(&self, backend: &Backend, path: &str, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, get_status(backend, path, timeout)).await {
            Ok(Ok(s)) if s.is_success() || s.is_redirection() => Ok(()),
            Ok(Ok(s)) => Err(format!("GET {path} answered {}", s.as_u16())),
            Ok(Err(why)) => Err(format!("GET {path}: {why}")),
            Err(_) => Err(format!("GET {path}: no answer within {timeout:?}")),
        }
    }
}

/// The status of `GET path` on a new connection to `backend`, or why there
/// is none.
async fn get_status(backend: &Backend, path: &str, timeout: Duration) -> Result<StatusCode, String> {
    let connect = Connector::new(timeout).http1::<Empty<Bytes>>(endpoint(backend)).await;
    let (mut sender, connection) = connect.map_err(|failure| failure.to_string())?;
    let host = HeaderValue::from_str(&backend.address).map_err(|_| "the address is not a valid Host".to_string())?;
    let request = Request::get(path).header(HOST, host).body(Empty::new()).map_err(|e| e.to_string())?;
    let mut connection = std::pin::pin!(connection);
    // Driven here, not spawned: the connection ends with the check.
    tokio::select! {
        biased; // a response that came with the close still counts
        response = sender.send_request(request) => match response {
            Ok(r) => Ok(r.status()),
            Err(e) => Err(UpstreamFailure::classify(&e, false).to_string()),
        },
        _ = &mut connection => Err(UpstreamFailure::Broken.to_string()),
    }
}

fn endpoint(backend: &Backend) -> Endpoint<'_> {
    Endpoint { address: &backend.address, tls: backend.tls.as_ref() }
}

/// Consecutive outcomes of one backend: the pure part of health, HAProxy's
/// `fall`/`rise` rule.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Streak {
    /// Failures in a row.
    pub fails: u32,
    /// Successes in a row.
    pub oks: u32,
}

impl Streak {
    /// Counts one observation of a backend that is `up` now and says
    /// whether its health flips: `Some(false)` after `fall` failures in a
    /// row, from any source; `Some(true)` after `rise` successful active
    /// checks in a row, or one successful probe (passive-only mode).
    /// Traffic never brings a backend up: a down backend gets none.
    pub fn observe(&mut self, up: bool, ok: bool, source: Source, fall: u32, rise: u32) -> Option<bool> {
        if ok {
            self.oks = self.oks.saturating_add(1);
            self.fails = 0;
        } else {
            self.fails = self.fails.saturating_add(1);
            self.oks = 0;
        }
        let rise = if source == Source::Probe { 1 } else { rise };
        match (up, ok) {
            (true, false) if self.fails >= fall => Some(false),
            (false, true) if self.oks >= rise && source != Source::Traffic => Some(true),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `(ok, source)` observations to a backend that starts `up`,
    /// applying each flip; returns the health after each one.
    fn run(up: bool, fall: u32, rise: u32, seen: &[(bool, Source)]) -> Vec<bool> {
        let (mut streak, mut up) = (Streak::default(), up);
        seen.iter()
            .map(|&(ok, source)| {
                if let Some(now) = streak.observe(up, ok, source, fall, rise) {
                    up = now;
                }
                up
            })
            .collect()
    }

    #[test]
    fn fall_failures_in_a_row_mark_a_backend_down() {
        use Source::Check;
        let seen = [(false, Check), (false, Check), (false, Check)];
        assert_eq!(run(true, 3, 2, &seen), [true, true, false]);
    }

    #[test]
    fn a_success_breaks_a_failure_streak() {
        use Source::Check;
        let seen = [(false, Check), (false, Check), (true, Check), (false, Check), (false, Check)];
        assert_eq!(run(true, 3, 2, &seen), [true; 5], "never three failures in a row");
    }

    #[test]
    fn failures_from_traffic_and_checks_add_up() {
        let seen = [(false, Source::Traffic), (false, Source::Check)];
        assert_eq!(run(true, 2, 2, &seen), [true, false]);
    }

    #[test]
    fn rise_successful_checks_bring_a_backend_back() {
        use Source::Check;
        let seen = [(true, Check), (false, Check), (true, Check), (true, Check)];
        assert_eq!(run(false, 3, 2, &seen), [false, false, false, true]);
    }

    #[test]
    fn traffic_never_brings_a_backend_up() {
        let seen = [(true, Source::Traffic); 5];
        assert_eq!(run(false, 1, 1, &seen), [false; 5]);
    }

    #[test]
    fn one_probe_success_is_enough_in_passive_mode() {
        let seen = [(false, Source::Probe), (true, Source::Probe)];
        assert_eq!(run(false, 1, 5, &seen), [false, true]);
    }

    #[test]
    fn observations_that_agree_with_the_state_change_nothing() {
        let mut streak = Streak::default();
        assert_eq!(streak.observe(true, true, Source::Check, 1, 1), None);
        assert_eq!(streak.observe(false, false, Source::Check, 1, 1), None);
        assert_eq!(streak, Streak { fails: 1, oks: 0 });
    }
}
