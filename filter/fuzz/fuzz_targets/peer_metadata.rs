//! Any peer metadata, endpoint or cluster metadata and node labels: decoded or unknown, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
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
