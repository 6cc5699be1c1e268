//! HTTP as the proxy speaks it, independent of where a request goes:
//! header rewriting, body types, and the proxy's own responses.

pub mod body;
pub mod headers;
pub mod response;

pub use body::{BodyLimits, ClientBody, ClientBodyError, ProxyBody, UpstreamBody};
pub use response::{json_response, text_response};
