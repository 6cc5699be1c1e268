//! Deciding where a request goes: [`key`] finds the device ID, [`ring`]
//! places it, [`table`] holds one immutable snapshot of backends, ring,
//! health and drains (swapped atomically, read without locks), and
//! [`candidates`] is the one walk over it that routing, retries and the
//! admin API's explanations share.

pub mod candidates;
pub mod key;
pub mod ring;
pub mod table;

pub use candidates::{Candidate, Candidates, Decision, Explanation, Reason};
pub use table::{Backend, LiveTable, Router, RoutingTable};
