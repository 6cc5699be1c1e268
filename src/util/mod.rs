//! Leaf helpers every layer may use: the shutdown signal, socket options,
//! a small PRNG, a log throttle, capped file reads, returning a burst's
//! freed memory. Nothing here knows about requests or backends.

pub(crate) mod fs;
pub(crate) mod memory;
pub(crate) mod rng;
pub(crate) mod shutdown;
pub(crate) mod socket;
pub(crate) mod throttle;
pub(crate) mod time;
