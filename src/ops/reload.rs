//! Hot reload: re-read the config file and swap in a new routing snapshot.
//!
//! Three triggers end up in [`Reloader::reload`]: SIGHUP, `POST /reload` on
//! the admin port, and a change of the file's content (polled by the
//! reloader's file watcher). A reload parses and validates the whole file
//! and builds a complete new [`RoutingTable`] before one atomic swap, so a
//! request sees either the old table or the new one, never a mix. Requests
//! in flight finish with the backend they already chose; WebSocket tunnels
//! stay open on theirs. A file that fails validation changes nothing.
//!
//! Listen addresses, `server.workers`, `server.log_format` and the upstream
//! connection pool's settings (including `upstream.connect_timeout`) are fixed
//! at start: a reload that changes them reports them as needing a restart,
//! keeps the running values, and applies everything else.
//!
//! The watcher polls the file's content rather than using inotify: polling
//! survives editors that save by rename and Kubernetes ConfigMap updates
//! (an atomic swap of a symlinked directory), which inotify watches lose,
//! and reading a small file once a second costs nothing measurable. The
//! files the config refers to (TLS certificates and keys, CA files, the
//! admin token file) are polled with it, so a renewed certificate reloads
//! even though the config itself did not change.
//!
//! Backends found by `[[discovery]]` (`ops::discovery`) take the same path:
//! the running config with its discovered backends replaced
//! ([`Config::with_discovered`]) is swapped in by the same code as a reload
//! (one swap, health carried over by id, metrics of removed backends
//! retired, tunnels rebalanced by the rebalancer that watches swaps). A
//! reload keeps the backends last discovered.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{referenced_files, BackendConfig, Config, ConfigError};
use crate::metrics::Metrics;
use crate::routing::{Router, RoutingTable};
use crate::util::fs::{read_capped, read_capped_async};
use crate::util::shutdown::raised;

/// After the watcher sees a change, the content must stay the same this
/// long before it is loaded, so a save in several writes reloads once.
const SETTLE: Duration = Duration::from_millis(200);
/// Bound on settle rounds for a file that keeps changing.
const MAX_SETTLE_ROUNDS: usize = 25;

/// What asked for a reload (for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// The watcher saw the config file (or a file it names) change.
    FileChange,
    /// `POST /reload` on the admin API.
    Admin,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::FileChange => "file change",
            Trigger::Admin => "POST /reload",
        }
    }
}

/// A reload that took effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Generation of the routing table now in use.
    pub generation: u64,
    /// Backends in the new config.
    pub backends: usize,
    /// Ids of backends the new config adds.
    pub added: Vec<String>,
    /// Ids of backends the new config no longer has.
    pub removed: Vec<String>,
    /// Changed settings that only a restart applies (their old values stay).
    pub needs_restart: Vec<&'static str>,
    /// How long the reload took (read, validate, build, swap).
    pub took: Duration,
    /// What the new config has that is accepted but probably not meant
    /// (see [`Config::warnings`]), each logged as a warning.
    pub warnings: Vec<String>,
}

/// Reload progress, published for anyone waiting on it (tests, mostly).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Reload attempts so far, successful or not.
    pub attempts: u64,
    /// Generation of the table in use.
    pub generation: u64,
    /// The error of the last attempt, if it failed.
    pub last_error: Option<String>,
}

/// Owns reloading for one running proxy.
#[derive(Debug)]
pub struct Reloader {
    path: Option<PathBuf>,
    router: Router,
    metrics: Arc<Metrics>,
    /// Serialises reloads; holds the hash of the content last read (the
    /// file's and that of the files it refers to), so the watcher neither
    /// reloads unchanged content nor retries a bad file every second.
    last_seen: Mutex<Option<u64>>,
    status: watch::Sender<ReloadStatus>,
    /// The backends each `[[discovery]]` name last resolved to (by name),
    /// merged into every config this reloader swaps in.
    discovered: Mutex<BTreeMap<String, Vec<BackendConfig>>>,
}

impl Reloader {
    /// `path` is the file the running config came from (`None` for an
    /// embedded config, which can't be reloaded).
    pub fn new(path: Option<PathBuf>, router: Router, metrics: Arc<Metrics>) -> Reloader {
        let last_seen = path.as_ref().and_then(|p| read_capped(p).ok().map(|bytes| fingerprint(p, &bytes)));
        let generation = router.load().generation();
        let (status, _) = watch::channel(ReloadStatus { attempts: 0, generation, last_error: None });
        Reloader {
            path,
            router,
            metrics,
            last_seen: Mutex::new(last_seen),
            status,
            discovered: Mutex::new(BTreeMap::new()),
        }
    }

    /// Reload progress; `changed()` fires after every attempt.
    pub fn subscribe(&self) -> watch::Receiver<ReloadStatus> {
        self.status.subscribe()
    }

    /// Runs [`reload`](Self::reload) on a thread of its own in the idle
    /// scheduling class, so that on a busy machine the rebuild (tens of
    /// milliseconds for a thousand backends) yields to request threads.
    pub(crate) async fn reload_in_background(self: &Arc<Self>, trigger: Trigger) -> Result<Applied, ConfigError> {
        let (done, result) = tokio::sync::oneshot::channel();
        let this = Arc::clone(self);
        let spawned = std::thread::Builder::new().name("sticky-reload".into()).spawn(move || {
            lower_this_threads_priority();
            // A bug that panics while loading must not go unreported: it
            // fails this reload like a bad file, logged and counted, and
            // the running config stays.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| this.reload(trigger)));
            let result = outcome.unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown".to_string());
                this.metrics.reload(false);
                error!(trigger = trigger.as_str(), "config reload failed (a bug: {what}), the running config stays");
                Err(ConfigError::whole_file(
                    None,
                    format!("the reload failed on a bug ({what}); the running config stays"),
                ))
            });
            let _ = done.send(result);
        });
        match spawned {
            Ok(_) => result.await.unwrap_or_else(|_| Err(ConfigError::whole_file(None, "the reload thread failed"))),
            Err(e) => Err(ConfigError::whole_file(None, format!("cannot start a reload thread: {e}"))),
        }
    }

    /// Re-reads the config file and, if it is valid, swaps in a new table.
    /// Blocking (file read, ring build): call it off the async workers.
    pub fn reload(&self, trigger: Trigger) -> Result<Applied, ConfigError> {
        let mut last_seen = self.last_seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let started = Instant::now();
        let result = self.load_and_swap(&mut last_seen, started);
        match &result {
            Ok(applied) => {
                self.metrics.reload(true);
                self.router.load().publish_states(&self.metrics);
                info!(
                    trigger = trigger.as_str(),
                    generation = applied.generation,
                    backends = applied.backends,
                    added = ?applied.added,
                    removed = ?applied.removed,
                    took = ?applied.took,
                    "config reloaded"
                );
                for warning in &applied.warnings {
                    warn!("config: {warning}");
                }
                if !applied.needs_restart.is_empty() {
                    warn!(
                        settings = ?applied.needs_restart,
                        "config reloaded, but these changed settings need a restart; their old values stay in effect"
                    );
                }
            }
            Err(e) => {
                self.metrics.reload(false);
                error!(trigger = trigger.as_str(), "config reload failed, the running config stays: {e}");
            }
        }
        self.status.send_modify(|s| {
            s.attempts += 1;
            s.generation = self.router.load().generation();
            s.last_error = result.as_ref().err().map(ToString::to_string);
        });
        result
    }

    fn load_and_swap(&self, last_seen: &mut Option<u64>, started: Instant) -> Result<Applied, ConfigError> {
        let Some(path) = &self.path else {
            return Err(ConfigError::whole_file(
                None,
                "this proxy runs an embedded config (demo), there is no file to reload",
            ));
        };
        let bytes = read_capped(path)
            .map_err(|e| ConfigError::whole_file(Some(path), format!("cannot read config file: {e}")))?;
        // Before parsing: a file changed during the parse is seen as changed.
        *last_seen = Some(fingerprint(path, &bytes));
        let new = Config::from_file_bytes(path, &bytes)?;
        let new = new.with_discovered(&self.discovered.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        self.swap(new, started)
    }

    /// Swaps in the running config with its discovered backends replaced
    /// by `found` (every `[[discovery]]` name's last good set), through
    /// the same code as a reload. `None` when the backends are unchanged
    /// (nothing is swapped). Blocking (ring build): call it off the async
    /// workers.
    pub(crate) fn apply_discovered(
        &self,
        found: BTreeMap<String, Vec<BackendConfig>>,
    ) -> Result<Option<Applied>, ConfigError> {
        // Serialised with reloads: a reload merges what is stored here.
        let _turn = self.last_seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let started = Instant::now();
        let new = self.router.load().config().with_discovered(&found);
        *self.discovered.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = found;
        if new.backends == self.router.load().config().backends {
            return Ok(None);
        }
        let applied = self.swap(new, started)?;
        self.metrics.set_backend_states(self.router.load().state_counts());
        info!(
            generation = applied.generation,
            backends = applied.backends,
            added = ?applied.added,
            removed = ?applied.removed,
            took = ?applied.took,
            "backends changed by DNS discovery"
        );
        self.status.send_modify(|s| s.generation = applied.generation);
        Ok(Some(applied))
    }

    /// One atomic swap to a table built from `new`: health carried over by
    /// backend id, settings only a restart applies kept, removed backends'
    /// metrics retired.
    fn swap(&self, mut new: Config, started: Instant) -> Result<Applied, ConfigError> {
        let warnings = new.warnings.iter().map(ToString::to_string).collect();
        let metrics = &self.metrics;
        let (old, (generation, backends, added, removed, needs_restart)) = self.router.update(|old| {
            let needs_restart = keep_fixed_settings(old.config(), &mut new);
            let old_ids: HashSet<&str> = old.backends().iter().map(|b| b.id.as_str()).collect();
            let new_ids: HashSet<&str> = new.backends.iter().map(|b| b.id.as_str()).collect();
            let removed: Vec<String> =
                old.backends().iter().filter(|b| !new_ids.contains(b.id.as_str())).map(|b| b.id.clone()).collect();
            let added: Vec<String> =
                new.backends.iter().filter(|b| !old_ids.contains(b.id.as_str())).map(|b| b.id.clone()).collect();
            let generation = old.generation() + 1;
            let table = RoutingTable::after(Arc::new(new), generation, metrics, old);
            let backends = table.backends().len();
            Ok::<_, ConfigError>((table, (generation, backends, added, removed, needs_restart)))
        })?;
        for id in &removed {
            self.metrics.remove_backend(id);
        }
        free_here(old);
        Ok(Applied { generation, backends, added, removed, needs_restart, took: started.elapsed(), warnings })
    }

    /// Polls the config file and reloads when its content changes, until
    /// `stop` is raised. Uses `reload.watch` and `reload.interval` of the
    /// running config, so both can be changed by a reload.
    pub(crate) async fn watch_file(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let Some(path) = self.path.clone() else { return };
        // The files referred to by the config content last seen (by its hash).
        let mut referred: Option<(u64, Vec<PathBuf>)> = None;
        loop {
            let reload = self.router.load().config().reload.clone();
            tokio::select! {
                _ = tokio::time::sleep(reload.interval) => {}
                _ = raised(&mut stop) => return,
            }
            if !reload.watch {
                continue;
            }
            let Some(mut seen) = content_hash(&path, &mut referred).await else { continue };
            // A reload holds this lock while it runs; never wait for it on
            // an async worker: check again next tick.
            let unchanged = match self.last_seen.try_lock() {
                Ok(last_seen) => Some(seen) == *last_seen,
                Err(_) => true,
            };
            if unchanged {
                continue;
            }
            // Changed: wait until it holds still, then load it once.
            for _ in 0..MAX_SETTLE_ROUNDS {
                tokio::select! {
                    _ = tokio::time::sleep(SETTLE) => {}
                    _ = raised(&mut stop) => return,
                }
                match content_hash(&path, &mut referred).await {
                    Some(now) if now != seen => seen = now,
                    _ => break,
                }
            }
            // The outcome is logged and counted by `reload` itself.
            let _ = self.reload_in_background(Trigger::FileChange).await;
        }
    }
}

/// Carries over settings a reload can't change, naming those that differ.
fn keep_fixed_settings(running: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if new.server.listen != running.server.listen {
        changed.push("server.listen");
        new.server.listen = running.server.listen;
    }
    if new.server.workers != running.server.workers {
        changed.push("server.workers");
        new.server.workers = running.server.workers;
    }
    if new.server.runtime != running.server.runtime {
        changed.push("server.runtime");
        new.server.runtime = running.server.runtime;
    }
    if new.server.log_format != running.server.log_format {
        // The tracing subscriber is installed once, at start.
        changed.push("server.log_format");
        new.server.log_format = running.server.log_format;
    }
    if new.admin.listen != running.admin.listen {
        changed.push("admin.listen");
        new.admin.listen = running.admin.listen;
    }
    match (&running.server.tls, &mut new.server.tls) {
        (None, Some(_)) => {
            changed.push("server.tls");
            new.server.tls = None;
        }
        (Some(old), None) => {
            changed.push("server.tls");
            new.server.tls = Some(old.clone());
        }
        (Some(old), Some(tls)) if tls.listen != old.listen => {
            changed.push("server.tls.listen");
            tls.listen = old.listen;
        }
        _ => {}
    }
    if new.upstream.connect_timeout != running.upstream.connect_timeout {
        changed.push("upstream.connect_timeout");
        new.upstream.connect_timeout = running.upstream.connect_timeout;
    }
    if new.upstream.pool_max_idle != running.upstream.pool_max_idle {
        changed.push("upstream.pool_max_idle");
        new.upstream.pool_max_idle = running.upstream.pool_max_idle;
    }
    if new.server.max_connections != running.server.max_connections {
        changed.push("server.max_connections");
        new.server.max_connections = running.server.max_connections;
    }
    if new.upstream.max_connections != running.upstream.max_connections {
        changed.push("upstream.max_connections");
        new.upstream.max_connections = running.upstream.max_connections;
    }
    if new.upstream.queue_timeout != running.upstream.queue_timeout {
        changed.push("upstream.queue_timeout");
        new.upstream.queue_timeout = running.upstream.queue_timeout;
    }
    if new.upstream.pool_idle_timeout != running.upstream.pool_idle_timeout {
        changed.push("upstream.pool_idle_timeout");
        new.upstream.pool_idle_timeout = running.upstream.pool_idle_timeout;
    }
    changed
}

/// Puts the calling thread in Linux's SCHED_IDLE class: it runs only when
/// no normal thread wants the CPU (stronger than nice 19, which still takes
/// whole time slices from request threads). Scheduling is per thread.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: a plain syscall about the calling thread; `param` outlives it.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        let _ = libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
    }
}

/// Drops the replaced table on this (blocking) thread rather than on a
/// request thread: whoever lets go of the last reference frees it, and a
/// big ring is megabytes to free. Readers hold a table only while they
/// decide a route, so the wait is short; it is bounded all the same.
fn free_here(old: Arc<RoutingTable>) {
    for _ in 0..10_000 {
        if Arc::strong_count(&old) == 1 {
            break;
        }
        std::thread::yield_now();
    }
    drop(old);
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Hash of a config's content and of each file it refers to (path and
/// content; an unreadable file counts as absent).
fn combine(config: u64, files: &[(&Path, Option<Vec<u8>>)]) -> u64 {
    let mut h = DefaultHasher::new();
    config.hash(&mut h);
    for (path, content) in files {
        path.hash(&mut h);
        content.hash(&mut h);
    }
    h.finish()
}

fn base_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// What the watcher compares, for config content `bytes` read from `path`.
fn fingerprint(path: &Path, bytes: &[u8]) -> u64 {
    let files = referenced_files(&String::from_utf8_lossy(bytes), base_of(path));
    let contents: Vec<(&Path, Option<Vec<u8>>)> = files.iter().map(|f| (f.as_path(), read_capped(f).ok())).collect();
    combine(hash(bytes), &contents)
}

/// [`fingerprint`] for the watcher: async reads, and the config is parsed
/// for the files it names only when its content changed (`referred` caches
/// them by content hash).
async fn content_hash(path: &Path, referred: &mut Option<(u64, Vec<PathBuf>)>) -> Option<u64> {
    let bytes = read_capped_async(path).await.ok()?;
    let config = hash(&bytes);
    let files = match referred {
        Some((seen, files)) if *seen == config => files,
        _ => &mut referred.insert((config, referenced_files(&String::from_utf8_lossy(&bytes), base_of(path)))).1,
    };
    let mut contents = Vec::with_capacity(files.len());
    for file in files.iter() {
        contents.push((file.as_path(), read_capped_async(file).await.ok()));
    }
    Some(combine(config, &contents))
}
