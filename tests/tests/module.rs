//! The module `make wasm` builds exports only the ABI callbacks meshtel implements: Envoy enters
//! the VM for every callback a module exports (BENCHMARKS.md, "Only the callbacks meshtel
//! uses"), and the SDK exports them all until tools/prune-exports drops the rest.

use meshtel_tests::envoy::wasm_path;
use wasmparser::{Parser, Payload};

fn exports(wasm: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        if let Ok(Payload::ExportSection(reader)) = payload {
            names.extend(reader.into_iter().map(|e| e.unwrap().name.to_string()));
        }
    }
    names.sort();
    names
}

#[test]
fn the_module_exports_only_the_callbacks_meshtel_implements() {
    let wasm = std::fs::read(wasm_path()).unwrap();
    let want = [
        "_initialize",
        "memory",
        "proxy_abi_version_0_2_1",
        "proxy_on_configure",
        "proxy_on_context_create",
        "proxy_on_delete",
        "proxy_on_done",
        "proxy_on_downstream_connection_close",
        "proxy_on_downstream_data",
        "proxy_on_grpc_close",
        "proxy_on_grpc_receive",
        "proxy_on_http_call_response",
        "proxy_on_log",
        "proxy_on_memory_allocate",
        "proxy_on_new_connection",
        "proxy_on_request_headers",
        "proxy_on_tick",
        "proxy_on_upstream_data",
        "proxy_on_vm_start",
    ];
    assert_eq!(exports(&wasm), want, "a callback exported costs a VM entry per request: price it first");
    // Not exported: the phases meshtel does nothing in.
    for absent in ["proxy_on_response_headers", "proxy_on_response_body", "proxy_on_request_body"] {
        assert!(!exports(&wasm).iter().any(|e| e == absent), "{absent}");
    }
}
