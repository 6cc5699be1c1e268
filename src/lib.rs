//! sticky-proxy: a reverse proxy that sends every request about a device,
//! WebSocket upgrade and plain HTTP alike, to the one backend that owns it.
//!
//! How a request flows through the modules:
//!
//! 1. [`server`] accepts a connection, does the TLS handshake on the TLS
//!    listener (certificates from [`tls`]), and serves HTTP/1.1 or HTTP/2 on it;
//! 2. [`proxy`] loads the current [`routing::RoutingTable`], which uses
//!    [`key`] to find the device ID and [`ring`] to find its owner;
//! 3. [`proxy`] forwards plain requests over a pooled upstream connection
//!    (to the backend holding the device's open tunnel, if [`registry`] knows
//!    one; TLS to `tls = true` backends, by [`tls`]'s connector), or hands an
//!    `Upgrade: websocket` request (or an HTTP/2 extended CONNECT, turned
//!    into an HTTP/1.1 upgrade by [`h2ws`]) to [`tunnel`], which joins the
//!    two upgraded connections with a [`splice`] that follows their frames
//!    ([`wsframe`]);
//! 4. when the ring changes, [`rebalance`] moves tunnels whose device now
//!    has another owner.
//!
//! [`config`] parses and validates the TOML file, [`reload`] swaps in a new
//! one, [`health`] judges backends, [`metrics`] counts, [`admin`] serves the
//! operator's API on its own listener, [`demo`] is a small app used by the
//! `demo` command, the tests and the benchmarks, and [`cli`] is the
//! command line. [`nginx_import`] translates an nginx config into a
//! sticky-proxy one (`import-nginx`).

pub mod admin;
pub mod cli;
pub mod config;
pub mod demo;
pub mod h2ws;
pub mod health;
pub mod key;
pub mod metrics;
pub mod nginx_import;
mod pool;
pub mod proxy;
pub mod rebalance;
pub mod registry;
pub mod reload;
pub mod ring;
pub mod routing;
pub mod sample;
pub mod server;
pub mod splice;
pub mod tls;
pub mod tunnel;
pub mod wsframe;
