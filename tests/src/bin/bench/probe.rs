//! The cost model of the ABI: the probe module making N host calls of one kind per request, each
//! row against the probe making none.

use meshtel_tests::mesh::plugin_config;
use serde_json::json;

use super::{Filter, Result, Scenario};

/// The probe module without, and with, a response-headers callback.
const PROBE: &str = "meshtel_probe_filter.wasm";
const PROBE_RESPONSE: &str = "meshtel_probe_filter_response_headers.wasm";
const PROBE_NO_LOG: &str = "meshtel_probe_filter_no_log.wasm";
const PROBE_REQUEST_ONLY: &str = "probe: a request-headers callback alone (context included)";
const PROBE_NONE: &str = "probe: + a log callback (no calls: the reference below)";
const PROBE_NONE_HEADERS: &str = "probe: no calls, 16 more request headers (the reference of those rows)";

/// The cost-model rows: N calls of one kind per request, priced against a probe making none.
pub(super) fn probe_scenarios() -> Vec<Scenario> {
    let row = |name: &'static str, kind: &str, n: usize, arg: &str| Scenario {
        name,
        filter: Filter::Probe(PROBE, json!({"kind": kind, "n": n, "arg": arg})),
        extra_headers: 0,
        peers: 0,
        calls: n,
        reference: PROBE_NONE,
        tcp_filter: false,
        close: false,
    };
    let reads = 48;
    let writes = 24;
    let evaluations = 12;
    let queries = meshtel_queries();
    let with_headers = |mut s: Scenario| {
        s.extra_headers = 16;
        s.reference = PROBE_NONE_HEADERS;
        s
    };
    vec![
        Scenario {
            filter: Filter::Probe(PROBE_NO_LOG, json!({"kind": "none"})),
            reference: "Envoy alone (baseline)",
            calls: 1,
            ..row(PROBE_REQUEST_ONLY, "none", 0, "")
        },
        Scenario { reference: PROBE_REQUEST_ONLY, calls: 1, ..row(PROBE_NONE, "none", 0, "") },
        Scenario {
            filter: Filter::Probe(PROBE_RESPONSE, json!({"kind": "none"})),
            calls: 1,
            ..row("probe: a response-headers callback", "none", 0, "")
        },
        Scenario { extra_headers: 16, ..row(PROBE_NONE_HEADERS, "none", 0, "") },
        row("probe: get_current_time_nanoseconds", "time", reads, ""),
        row("probe: get_property response.code", "property", reads, "response.code"),
        row("probe: get_property response.flags", "property", reads, "response.flags"),
        row("probe: get_property response.total_size", "property", reads, "response.total_size"),
        row("probe: get_property request.protocol", "property", reads, "request.protocol"),
        row("probe: get_property source.address", "property", reads, "source.address"),
        row("probe: get_property connection.id", "property", reads, "connection.id"),
        row("probe: get_property xds.cluster_name", "property", reads, "xds.cluster_name"),
        row("probe: get_property xds.cluster_metadata", "property", reads, "xds.cluster_metadata"),
        row("probe: get_property node.metadata", "property", reads, "node.metadata"),
        row("probe: get_map_bytes (wrk's request)", "get_map_bytes", reads, ""),
        with_headers(row("probe: get_map_bytes (16 more headers)", "get_map_bytes", reads, "")),
        row("probe: get_map_value traceparent (absent)", "get_map_value", reads, "traceparent"),
        with_headers(row("probe: get_map_value x-bench-15 (16 more headers)", "get_map_value", reads, "x-bench-15")),
        row("probe: set_map_bytes (wrk's request + 4)", "set_map_bytes", writes, ""),
        with_headers(row("probe: set_map_bytes (16 more headers + 4)", "set_map_bytes", writes, "")),
        row("probe: replace_map_value (new header)", "replace_map_value", writes, ""),
        row("probe: add_map_value (new header)", "add_map_value", writes, ""),
        row("probe: remove_map_value (absent header)", "remove_map_value", writes, ""),
        row("probe: expr_evaluate, a list of 1 property", "cel", evaluations, "[response.flags]"),
        row(
            "probe: expr_evaluate, a list of 12 properties",
            "cel",
            evaluations,
            &format!("[{}]", [FLAGS; 12].join(", ")),
        ),
        row(
            "probe: expr_evaluate, 12 guarded properties",
            "cel",
            evaluations,
            &format!("[{}]", [GUARDED; 12].join(", ")),
        ),
        row(
            "probe: expr_evaluate, 12 guarded absent ones",
            "cel",
            evaluations,
            &format!("[{}]", [ABSENT; 12].join(", ")),
        ),
        row("probe: expr_evaluate, a list of 6 properties", "cel", evaluations, SIX_PROPERTIES),
        row("probe: expr_evaluate, meshtel's request query", "cel", evaluations, &queries.request.expression()),
        row("probe: expr_evaluate, meshtel's connection query", "cel", evaluations, &queries.connection.expression()),
    ]
}

/// One property in CEL: as it is, guarded against absence, and absent.
const FLAGS: &str = "response.flags";
const GUARDED: &str = "('flags' in response ? response['flags'] : b'')";
const ABSENT: &str = "('upstream_peer' in filter_state ? filter_state['upstream_peer'] : b'')";

/// The log phase's six most common reads, as one CEL list.
const SIX_PROPERTIES: &str =
    "[response.code, response.flags, xds.cluster_name, request.total_size, response.total_size, connection.id]";

/// meshtel's log-phase queries for the benchmark's sidecar and default configuration.
fn meshtel_queries() -> meshtel_filter::prefetch::LogQueries {
    let config = plugin_config(json!({})).to_string();
    let config = meshtel_filter::config::parse(config.as_bytes()).expect("the benchmark's configuration");
    let node = meshtel_filter::istio::node::NodeInfo {
        id: "sidecar~10.0.0.1~a.ns-a~ns-a.svc.cluster.local".into(),
        ..Default::default()
    };
    meshtel_filter::prefetch::LogQueries::new(&config, &node)
}

/// The cost model: per probe row, the CPU it adds over its reference row, divided by its calls.
pub(super) fn cost_table(scenarios: &[&Scenario], results: &[Result], seconds: u64) {
    let cpu = |name: &str| results.iter().find(|r| r.name == name).map(|r| r.cpu_us_per_request);
    println!("\nCost model of the ABI (probe module; wrk -t2 -c32 -d{seconds}s per row; each row against its reference row in the same run):\n");
    println!("| host call or callback | calls per request | Envoy CPU µs/request | over reference µs | µs per call | reference |");
    println!("|---|---|---|---|---|---|");
    for s in scenarios.iter().filter(|s| s.is_probe()) {
        let (Some(own), Some(reference)) = (cpu(s.name), cpu(s.reference)) else { continue };
        let over = own - reference;
        let per = if s.calls == 0 { "-".to_string() } else { format!("{:.3}", over / s.calls as f64) };
        println!(
            "| {} | {} | {own:.1} | {over:+.1} | {per} | {} |",
            s.name.trim_start_matches("probe: "),
            s.calls,
            s.reference
        );
    }
}
