//! sticky-proxy: a reverse proxy that sends every request about a device,
//! WebSocket upgrade and plain HTTP alike, to the one backend that owns it.
//!
//! How a request flows through the modules:
//!
//! 1. [`server`] accepts a connection and serves HTTP/1.1 on it;
//! 2. [`proxy`] loads the current [`routing::RoutingTable`], which uses
//!    [`key`] to find the device ID and [`ring`] to find its owner;
//! 3. [`proxy`] forwards plain requests over a pooled upstream connection, or
//!    hands an `Upgrade: websocket` request to [`tunnel`], which joins the two
//!    upgraded connections.
//!
//! [`config`] parses and validates the TOML file, [`admin`] serves the
//! operator's API on its own listener, [`demo`] is a small app used by the
//! `demo` command, the tests and the benchmarks, and [`cli`] is the
//! command line.

pub mod admin;
pub mod cli;
pub mod config;
pub mod demo;
pub mod h2ws;
pub mod health;
pub mod key;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod ring;
pub mod routing;
pub mod sample;
pub mod server;
pub mod tls;
pub mod tunnel;
