//! Tools around the proxy, not on its request path: `import-nginx`
//! ([`nginx_import`]), the demo app ([`demo`]) used by the `demo` command,
//! the tests and the benchmarks, deterministic [`sample`] data, `probe`
//! ([`probe`]: the image's health check) and `demo --tour` ([`tour`]).

pub mod demo;
pub mod nginx_import;
pub mod probe;
pub mod sample;
pub mod tour;
