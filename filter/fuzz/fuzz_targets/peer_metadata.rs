//! Any peer metadata, endpoint or cluster metadata and node labels: decoded or unknown, never a
//! panic; and base64 decoded as the `base64` crate decodes it.
#![no_main]

use base64::Engine;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // meshtel's own base64 decodes exactly what the crate's STANDARD engine does.
    assert_eq!(meshtel_filter::base64::decode(data), base64::engine::general_purpose::STANDARD.decode(data).ok());
    let _ = meshtel_filter::istio::peer::from_peer_metadata_header(data);
    let _ = meshtel_filter::istio::xds_metadata::cluster_service(data);
    let _ = meshtel_filter::istio::xds_metadata::host_workload(data);
    let _ = meshtel_filter::istio::node::decode_pairs(data);
    let _ = meshtel_filter::istio::peer::from_filter_state(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = meshtel_filter::istio::peer::from_host_workload(s);
        let _ = meshtel_filter::istio::peer::spiffe_namespace(s);
    }
});
