//! Leaf helpers every layer may use: the shutdown signal, socket options,
//! a small PRNG. Nothing here knows about requests or backends.

pub(crate) mod rng;
pub(crate) mod shutdown;
pub(crate) mod socket;
pub(crate) mod time;
