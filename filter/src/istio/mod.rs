//! Everything that encodes Istio's behaviour, each rule in one place with the Istio or Envoy
//! source it follows.

pub mod facts;
pub mod golden;
pub mod labels;
pub mod node;
pub mod peer;
pub mod response_flags;
pub mod xds_metadata;
