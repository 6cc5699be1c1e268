//! The operator's side: hot [`reload`] of the config file and the [`admin`]
//! API on its own listener.

pub mod admin;
pub mod reload;
