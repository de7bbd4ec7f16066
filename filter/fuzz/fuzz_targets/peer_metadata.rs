//! Any peer metadata, endpoint or cluster metadata and node labels: decoded or unknown, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = meshtel_filter::peer::from_peer_metadata_header(data);
    let _ = meshtel_filter::xds_metadata::cluster_service(data);
    let _ = meshtel_filter::xds_metadata::host_workload(data);
    let _ = meshtel_filter::node::decode_pairs(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = meshtel_filter::peer::from_host_workload(s);
        let _ = meshtel_filter::peer::spiffe_namespace(s);
        let _ = meshtel_filter::xds_metadata::service_from_host(s);
    }
});
