//! Leaf helpers every layer may use: the shutdown signal, socket options,
//! a small PRNG. Nothing here knows about requests or backends.

pub mod rng;
pub mod shutdown;
pub mod socket;
