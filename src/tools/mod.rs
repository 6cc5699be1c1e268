//! Tools around the proxy, not on its request path: `import-nginx`
//! ([`nginx_import`]), the demo app ([`demo`]) used by the `demo` command,
//! the tests and the benchmarks, and deterministic [`sample`] data.

pub mod demo;
pub mod nginx_import;
pub mod sample;
