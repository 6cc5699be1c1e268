//! The operator's side: hot [`reload`] of the config file and the [`admin`]
//! API on its own listener; backends from DNS ([`discovery`]) are applied
//! through the reload's code.

pub mod admin;
pub(crate) mod discovery;
pub mod reload;
