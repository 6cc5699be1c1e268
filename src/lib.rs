//! sticky-proxy: a reverse proxy that sends every request about a device,
//! WebSocket upgrade and plain HTTP alike, to the one backend that owns it.
//!
//! The modules are layers; each imports only from the layers above it in
//! this list (`tests/layers.rs` checks it):
//!
//! 1. `util`: the shutdown signal, socket options, a small PRNG.
//! 2. [`metrics`] and [`tls`]: leaves that count and encrypt.
//! 3. [`routing::ring`] and [`routing::key`]: where a device ID hashes,
//!    and how it is found in a request (the config names their rules).
//! 4. [`config`]: the TOML file, parsed and validated.
//! 5. [`routing`]: the live snapshot of backends, ring and health, and the
//!    one candidates walk that decides where a device's request goes.
//! 6. [`http`]: headers, bodies and the proxy's own responses.
//! 7. [`upstream`]: the one connector to backends, the pool, failures and
//!    whether they may be retried, and health.
//! 8. [`tunnel`]: WebSocket tunnels: handshake, session, splice, the
//!    registry of open tunnels and the rebalancer that moves them.
//! 9. `server`: listeners and connections; `proxy`: one request's path.
//! 10. [`ops`]: hot reload and the admin API.
//! 11. [`app`]: the wiring, the only module that knows every part.
//! 12. [`cli`] and [`tools`] (import-nginx, the demo app, sample data).
//!
//! A request flows down the same list from the bottom: `server` accepts
//! it, `proxy` asks [`routing`] for its device's candidates, and sends
//! it through [`upstream`] or opens a [`tunnel`].

#![warn(missing_docs, unreachable_pub)]

pub mod app;
pub mod cli;
pub mod config;
#[cfg(test)]
mod fuzz_tests;
pub mod http;
pub mod metrics;
pub mod ops;
mod proxy;
pub mod routing;
mod server;
pub mod tls;
pub mod tools;
pub mod tunnel;
pub mod upstream;
mod util;
