//! `meshtel-prune-exports IN.wasm OUT.wasm`: the module with only the exports meshtel needs.
//!
//! The proxy-wasm Rust SDK exports every ABI callback, and Envoy enters the VM for each one a
//! module exports (proxy-wasm-cpp-host `ContextBase::onResponseHeaders` and the others return
//! at once when the export is absent). meshtel does its work in the request-headers and log
//! callbacks, so the callbacks of the body, trailer and response phases cost a VM entry each per
//! request for nothing. This drops them after linking; every other section is copied unchanged.

use std::process::ExitCode;

use wasm_encoder::{ExportKind, ExportSection, RawSection};
use wasmparser::{ExternalKind, Parser, Payload};

/// The exports meshtel's module keeps: what Envoy needs to run it, and the callbacks its glue
/// implements (filter/src/glue: root, HTTP and TCP contexts).
pub const KEPT: &[&str] = &[
    "memory",
    "_initialize",
    "proxy_abi_version_0_2_1",
    "proxy_on_memory_allocate",
    "proxy_on_vm_start",
    "proxy_on_configure",
    "proxy_on_context_create",
    "proxy_on_tick",
    "proxy_on_done",
    // The SDK frees a context's state here: without it every request would leak its context.
    "proxy_on_delete",
    "proxy_on_http_call_response",
    // A unary gRPC call's answer: its message, then its status.
    "proxy_on_grpc_receive",
    "proxy_on_grpc_close",
    "proxy_on_request_headers",
    "proxy_on_log",
    // The TCP network filter.
    "proxy_on_new_connection",
    "proxy_on_downstream_data",
    "proxy_on_upstream_data",
    "proxy_on_downstream_connection_close",
];

fn prune(wasm: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = wasm_encoder::Module::new();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(|e| e.to_string())?;
        match payload {
            Payload::Version { .. } | Payload::End(_) => {}
            Payload::ExportSection(reader) => {
                let mut exports = ExportSection::new();
                for export in reader {
                    let export = export.map_err(|e| e.to_string())?;
                    if KEPT.contains(&export.name) {
                        exports.export(export.name, kind(export.kind)?, export.index);
                    }
                }
                out.section(&exports);
            }
            // The code section is one payload with its entries after it: copy it whole.
            Payload::CodeSectionStart { range, .. } => {
                out.section(&RawSection { id: 10, data: &wasm[range] });
            }
            Payload::CodeSectionEntry(_) => {}
            other => {
                if let Some((id, range)) = other.as_section() {
                    out.section(&RawSection { id, data: &wasm[range] });
                }
            }
        }
    }
    Ok(out.finish())
}

fn kind(kind: ExternalKind) -> Result<ExportKind, String> {
    Ok(match kind {
        ExternalKind::Func => ExportKind::Func,
        ExternalKind::Table => ExportKind::Table,
        ExternalKind::Memory => ExportKind::Memory,
        ExternalKind::Global => ExportKind::Global,
        ExternalKind::Tag => ExportKind::Tag,
        other => return Err(format!("an export of kind {other:?}")),
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, input, output] = args.as_slice() else {
        eprintln!("usage: meshtel-prune-exports IN.wasm OUT.wasm");
        return ExitCode::from(2);
    };
    let result = std::fs::read(input)
        .map_err(|e| format!("{input}: {e}"))
        .and_then(|wasm| prune(&wasm))
        .and_then(|pruned| std::fs::write(output, pruned).map_err(|e| format!("{output}: {e}")));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshtel-prune-exports: {e}");
            ExitCode::FAILURE
        }
    }
}
