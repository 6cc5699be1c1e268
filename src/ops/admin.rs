//! The admin API, on its own listener (loopback by default) so that
//! clients of the proxy can never reach it.
//!
//! | endpoint | answers |
//! |---|---|
//! | `GET /healthz` | 200 while the process serves (liveness) |
//! | `GET /readyz` | 200 when a config is loaded and a backend is usable, else 503 |
//! | `GET /metrics` | Prometheus text format |
//! | `POST /reload` | re-reads the config file: 200 JSON, or 400 with the error |
//! | `GET /backends` | JSON: each backend's address, source (`config` or `dns:NAME`), weight, state, tunnels, requests, ring share |
//! | `GET /route?key=ID` | JSON: the backend that owns a device, and why |
//! | `GET /devices/{id}` | JSON: the device's open tunnels, and where its HTTP goes now and why |
//!
//! With `admin.token` set, all but `/healthz`, `/readyz` and `/metrics`
//! need `Authorization: Bearer <token>`; the comparison takes the same time
//! wherever the first wrong byte is.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::reload::{Reloader, Trigger};
use crate::http::{json_response, text_response, ProxyBody};
use crate::metrics::Metrics;
use crate::proxy::DeliveryLog;
use crate::routing::key::percent_decode;
use crate::routing::{Explanation, Reason, Router, RoutingTable};
use crate::tunnel::registry::{is_misplaced, TunnelRegistry};

/// What the admin API reads and drives.
#[derive(Debug, Clone)]
pub(crate) struct AdminState {
    /// The live routing table (backends, health, drain, config).
    pub(crate) router: Router,
    /// Runs `POST /reload`.
    pub(crate) reloader: Arc<Reloader>,
    /// Served at `/metrics`; counts refused calls.
    pub(crate) metrics: Arc<Metrics>,
    /// Open tunnels, for `/devices/{id}` and misplaced counts.
    pub(crate) tunnels: Arc<TunnelRegistry>,
    /// How each device's last redelivered request ended.
    pub(crate) deliveries: Arc<DeliveryLog>,
    /// Set when shutdown begins: `/readyz` answers 503 from then on.
    pub(crate) stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// Answers one admin request.
pub(crate) async fn handle(req: Request<Incoming>, state: &AdminState) -> Response<ProxyBody> {
    let path = req.uri().path();
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD);
    if let Some(why) = mutating.then(|| cross_site(&req)).flatten() {
        state.metrics.admin_unauthorized();
        return text_response(StatusCode::FORBIDDEN, format!("refused: {why}\n"));
    }
    let open = matches!(path, "/healthz" | "/readyz" | "/metrics");
    if !open {
        let table = state.router.load();
        if let Some(token) = &table.config().admin.token {
            if !authorized(&req, token) {
                state.metrics.admin_unauthorized();
                let mut response = text_response(StatusCode::UNAUTHORIZED, "missing or wrong admin token\n");
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
        }
    }
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    match (path, get) {
        ("/healthz", true) => text_response(StatusCode::OK, "ok\n"),
        ("/readyz", true) => readyz(state),
        ("/metrics", true) => {
            let table = state.router.load();
            let misplaced = misplaced_by_backend(state, &table);
            state.metrics.set_misplaced(table.backends().iter().map(|b| b.id.as_str()).zip(misplaced));
            // OpenMetrics when the scraper asks for it, else text 0.0.4.
            let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
            let (text, content_type) = state.metrics.encode_for(accept);
            let mut response = text_response(StatusCode::OK, text);
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            response
        }
        ("/backends", true) => backends(state),
        (p, false) if req.method() == Method::POST && p.starts_with("/backends/") => drain(p, state),
        ("/route", true) => route(&req, state),
        (p, true) if p.starts_with("/devices/") => device(p, state),
        ("/reload", false) if req.method() == Method::POST => reload(state).await,
        ("/reload", _) => method_not_allowed("POST"),
        ("/healthz" | "/readyz" | "/metrics" | "/backends" | "/route", false) => method_not_allowed("GET"),
        _ => text_response(
            StatusCode::NOT_FOUND,
            format!(
                "no admin endpoint {path}; see /healthz, /readyz, /metrics, /backends, /route?key=ID, /devices/ID, POST /reload\n"
            ),
        ),
    }
}

fn readyz(state: &AdminState) -> Response<ProxyBody> {
    if state.stopping.load(std::sync::atomic::Ordering::Relaxed) {
        return text_response(StatusCode::SERVICE_UNAVAILABLE, "not ready: shutting down\n");
    }
    let table = state.router.load();
    match table.backends_usable() {
        0 => text_response(StatusCode::SERVICE_UNAVAILABLE, "not ready: no backend is up and not draining\n"),
        n => text_response(
            StatusCode::OK,
            format!("ready: config generation {}, {n} of {} backends up\n", table.generation(), table.backends().len()),
        ),
    }
}

/// Misplaced tunnels per backend of `table`, in its backend order.
fn misplaced_by_backend(state: &AdminState, table: &RoutingTable) -> Vec<usize> {
    let mut counts = vec![0; table.backends().len()];
    for tunnel in state.tunnels.misplaced(table) {
        if let Some(i) = table.position(&tunnel.backend.id) {
            counts[i] += 1;
        }
    }
    counts
}

fn backends(state: &AdminState) -> Response<ProxyBody> {
    let table = state.router.load();
    let shares = table.ring_shares();
    let misplaced = misplaced_by_backend(state, &table);
    let list: Vec<_> = table
        .backends()
        .iter()
        .enumerate()
        .map(|(i, b)| {
            json!({
                "id": b.id,
                "address": b.address,
                "source": table.config().backends.get(i).map_or_else(|| "config".to_string(), |c| c.source.to_string()),
                "weight": b.weight,
                "state": if table.draining_since(&b.id).is_some() {
                    "draining"
                } else if table.is_up(&b.id) == Some(false) {
                    "down"
                } else {
                    "up"
                },
                "health": if table.is_up(&b.id) == Some(false) { "down" } else { "up" },
                "open_websockets": b.stats.open_tunnels(),
                "misplaced_websockets": misplaced.get(i).copied().unwrap_or(0),
                "requests_served": b.stats.served(),
                "ring_share": shares.get(i).copied().unwrap_or(0.0),
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "generation": table.generation(), "backends": list }))
}

/// `POST /backends/{id}/drain` and `/undrain`.
fn drain(path: &str, state: &AdminState) -> Response<ProxyBody> {
    let rest = path.trim_start_matches("/backends/");
    let (id, drain) = match rest.rsplit_once('/') {
        Some((id, "drain")) => (id, true),
        Some((id, "undrain")) => (id, false),
        _ => return text_response(StatusCode::NOT_FOUND, "use POST /backends/{id}/drain or /undrain\n"),
    };
    let id = String::from_utf8_lossy(&percent_decode(id.as_bytes(), false)).into_owned();
    match state.router.update(|t| t.with_drain(&id, drain).map(|next| (next, ())).ok_or(())) {
        Ok(_) => {
            state.router.load().publish_states(&state.metrics);
            tracing::info!(backend = %id, drain, "backend drain set on the admin API");
            json_response(StatusCode::OK, &json!({ "id": id, "state": if drain { "draining" } else { "active" } }))
        }
        Err(()) => text_response(StatusCode::NOT_FOUND, format!("no backend {id:?}\n")),
    }
}

fn route(req: &Request<Incoming>, state: &AdminState) -> Response<ProxyBody> {
    let key = req.uri().query().and_then(|q| {
        q.split('&').find_map(|pair| pair.strip_prefix("key=").map(|v| percent_decode(v.as_bytes(), true).into_owned()))
    });
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return text_response(StatusCode::BAD_REQUEST, "give the device ID as /route?key=ID (percent-encoded)\n");
    };
    let table = state.router.load();
    let held = state.tunnels.holder(&key, &table);
    match table.explain(&key, held) {
        Some(why) => {
            let first = why.candidates.first();
            json_response(
                StatusCode::OK,
                &json!({
                    "key": String::from_utf8_lossy(&key),
                    "backend": first.map(|c| json!({ "id": c.backend.id, "address": c.backend.address })),
                    "ring_owner": { "id": why.owner.id, "address": why.owner.address, "up": table.is_up(&why.owner.id) },
                    "reason": reason_of(&why),
                    "via": first.map_or("none", |c| c.reason.via()),
                    "candidates": candidates_json(&why),
                    "last_redelivery": last_redelivery(state, &key),
                    "ring_hash": why.hash,
                    "failover_order": why.failover_order,
                    "generation": table.generation(),
                }),
            )
        }
        None => text_response(StatusCode::SERVICE_UNAVAILABLE, "no backend on the ring\n"),
    }
}

/// Why the first candidate serves the device.
fn reason_of(why: &Explanation<'_>) -> &'static str {
    why.candidates.first().map_or("no backend is up and not draining", |c| c.reason.describe())
}

/// The walk as the admin API shows it: each candidate's id and reason.
fn candidates_json(why: &Explanation<'_>) -> Vec<serde_json::Value> {
    why.candidates.iter().map(|c| json!({ "id": c.backend.id, "reason": c.reason.describe() })).collect()
}

/// `GET /devices/{id}`: the device's tunnels through this proxy, and where
/// its HTTP requests go now.
fn device(path: &str, state: &AdminState) -> Response<ProxyBody> {
    let raw = path.trim_start_matches("/devices/");
    let id = percent_decode(raw.as_bytes(), false).into_owned();
    if id.is_empty() {
        return text_response(StatusCode::BAD_REQUEST, "give the device ID as /devices/ID (percent-encoded)\n");
    }
    let table = state.router.load();
    let now = std::time::SystemTime::now();
    let tunnels: Vec<_> = state
        .tunnels
        .tunnels_of(&id)
        .iter()
        .map(|t| {
            json!({
                "backend": t.backend.id,
                "address": t.backend.address,
                "since_unix": t.opened_at.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
                "open_seconds": now.duration_since(t.opened_at).map_or(0.0, |d| d.as_secs_f64()),
                "misplaced": is_misplaced(t, &table),
            })
        })
        .collect();
    let held = state.tunnels.holder(&id, &table);
    let Some(why) = table.explain(&id, held) else {
        return text_response(StatusCode::SERVICE_UNAVAILABLE, "no backend on the ring\n");
    };
    let first = why.candidates.first();
    let reason = match first {
        Some(c) if c.reason != Reason::Tunnel && !tunnels.is_empty() => {
            format!("{}; its tunnels are on backends that are down", c.reason.describe())
        }
        _ => reason_of(&why).to_string(),
    };
    json_response(
        StatusCode::OK,
        &json!({
            "device": String::from_utf8_lossy(&id),
            "tunnels": tunnels,
            "http": {
                "backend": first.map(|c| json!({ "id": c.backend.id, "address": c.backend.address })),
                "via": first.map_or("none", |c| c.reason.via()),
                "reason": reason,
                "candidates": candidates_json(&why),
            },
            "last_redelivery": last_redelivery(state, &id),
            "ring_owner": { "id": why.owner.id, "address": why.owner.address, "up": table.is_up(&why.owner.id) },
            "generation": table.generation(),
        }),
    )
}

/// How the device's last request that met a "not here" answer ended
/// (`null` when none is remembered: its requests were answered at once).
fn last_redelivery(state: &AdminState, device: &[u8]) -> serde_json::Value {
    match state.deliveries.last(device) {
        Some(r) => json!({
            "outcome": r.outcome,
            "tries": r.tries,
            "backend": r.backend,
            "took_ms": r.took.as_secs_f64() * 1000.0,
            "at_unix": r.at.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        }),
        None => serde_json::Value::Null,
    }
}

async fn reload(state: &AdminState) -> Response<ProxyBody> {
    match state.reloader.reload_in_background(Trigger::Admin).await {
        Ok(applied) => json_response(
            StatusCode::OK,
            &json!({
                "reloaded": true,
                "generation": applied.generation,
                "backends": applied.backends,
                "added": applied.added,
                "removed": applied.removed,
                "needs_restart": applied.needs_restart,
                "warnings": applied.warnings,
                "took_ms": applied.took.as_secs_f64() * 1000.0,
            }),
        ),
        Err(e) => text_response(StatusCode::BAD_REQUEST, format!("reload failed, the running config stays: {e}\n")),
    }
}

fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let presented = req.headers().get(header::AUTHORIZATION).map_or(&b""[..], |v| bearer_token(v.as_bytes()));
    constant_time_eq(presented, token.as_bytes())
}

/// Why a mutating admin request looks like it came from a web page
/// elsewhere (a browser on the operator's machine can reach a loopback
/// admin port): an `Origin` other than the admin's own, or a body type an
/// HTML form can send without asking first. `None`: go on.
fn cross_site<B>(req: &Request<B>) -> Option<&'static str> {
    let headers = req.headers();
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).map(HeaderValue::as_bytes).unwrap_or_default();
        let own = origin
            .as_bytes()
            .strip_prefix(b"http://")
            .or_else(|| origin.as_bytes().strip_prefix(b"https://"))
            .is_some_and(|authority| !host.is_empty() && authority.eq_ignore_ascii_case(host));
        if !own {
            return Some("a request from another origin (Origin differs from the admin's own)");
        }
    }
    let form = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        let media = v.split(';').next().unwrap_or("").trim();
        ["application/x-www-form-urlencoded", "multipart/form-data", "text/plain"]
            .iter()
            .any(|f| media.eq_ignore_ascii_case(f))
    });
    form.then_some("a body type an HTML form can send; send none, or application/json")
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is
/// case-insensitive (RFC 9110 §11.1), spaces around the token don't count.
/// Empty for any other scheme.
fn bearer_token(value: &[u8]) -> &[u8] {
    let value = value.trim_ascii();
    match value.iter().position(|b| *b == b' ') {
        Some(at) if value[..at].eq_ignore_ascii_case(b"bearer") => value[at..].trim_ascii(),
        _ => b"",
    }
}

/// Compares without an early exit, so timing reveals nothing about where
/// the first difference is (only whether the lengths match).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn method_not_allowed(allowed: &'static str) -> Response<ProxyBody> {
    let mut response = text_response(StatusCode::METHOD_NOT_ALLOWED, format!("use {allowed}\n"));
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allowed));
    response
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, constant_time_eq, cross_site};

    #[test]
    fn cross_site_requests_are_told_apart() {
        let post = |headers: &[(&str, &str)]| {
            let mut req = hyper::Request::post("/reload");
            for (n, v) in headers {
                req = req.header(*n, *v);
            }
            cross_site(&req.body(()).expect("request"))
        };
        assert_eq!(post(&[("host", "127.0.0.1:9901")]), None, "curl: no Origin, no body type");
        assert_eq!(post(&[("host", "127.0.0.1:9901"), ("origin", "http://127.0.0.1:9901")]), None, "its own page");
        assert!(post(&[("host", "127.0.0.1:9901"), ("origin", "https://evil.example")]).is_some());
        assert!(post(&[("host", "127.0.0.1:9901"), ("origin", "null")]).is_some());
        assert!(post(&[("content-type", "application/x-www-form-urlencoded")]).is_some());
        assert!(post(&[("content-type", "Text/Plain; charset=utf-8")]).is_some());
        assert!(post(&[("content-type", "multipart/form-data; boundary=x")]).is_some());
        assert_eq!(post(&[("content-type", "application/json")]), None);
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token(b"Bearer s3cret"), b"s3cret");
        assert_eq!(bearer_token(b"bearer s3cret"), b"s3cret");
        assert_eq!(bearer_token(b"BEARER   s3cret "), b"s3cret");
        assert_eq!(bearer_token(b"Basic czNjcmV0"), b"");
        assert_eq!(bearer_token(b"Bearers3cret"), b"");
        assert_eq!(bearer_token(b"s3cret"), b"");
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
