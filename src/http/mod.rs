//! HTTP as the proxy speaks it, independent of where a request goes:
//! header rewriting, body types, and the proxy's own responses.

pub mod body;
pub mod headers;
pub mod request_id;
pub mod response;

pub use body::{BodyLimits, ClientBody, ClientBodyError, ProxyBody, Upload, UpstreamBody};
pub use response::{json_response, text_response};
