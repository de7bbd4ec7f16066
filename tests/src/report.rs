//! Readable views of what the OTLP receiver got: traces as trees with each span's access log,
//! Istio metrics as a table.

use std::collections::BTreeMap;
use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

use crate::collector::{Collector, ReceivedLog, ReceivedSpan};
use crate::metrics::{quantile, series, total};

/// Print every trace of `spans` as a tree, oldest trace first, each span followed by the body
/// of its access-log record in `logs` (matched by span id).
pub fn print_traces(spans: Vec<ReceivedSpan>, logs: &[ReceivedLog]) {
    let mut traces: BTreeMap<String, Vec<ReceivedSpan>> = BTreeMap::new();
    for s in spans {
        traces.entry(s.trace_id()).or_default().push(s);
    }
    println!(
        "\nthe collector received {} spans in {} traces:",
        traces.values().map(Vec::len).sum::<usize>(),
        traces.len()
    );
    let mut ordered: Vec<_> = traces.into_iter().collect();
    ordered.sort_by_key(|(_, spans)| spans.iter().map(|s| s.span.start_time_unix_nano).min());
    for (trace, spans) in ordered {
        println!("\ntrace {trace}");
        print_children(&spans, logs, "", 1);
    }
}

/// Print `istio_requests_total` by reporter, source, destination and code, and latency
/// percentiles, once the receiver has `expected_requests` counted.
pub fn print_metrics(collector: &Collector, expected_requests: u64) {
    // Four proxies see each request: gateway, a inbound, a outbound, b inbound.
    let points = collector
        .wait_for_points(Duration::from_secs(15), |p| total(p, "istio_requests_total", |_| true) >= expected_requests);
    println!("\nistio_requests_total (as Prometheus will show it after the Collector):");
    println!("  {:<12} {:<34} {:<34} {:>4} {:>6}", "reporter", "source", "destination", "code", "count");
    let mut rows: Vec<_> = series(&points, "istio_requests_total")
        .into_iter()
        .map(|p| {
            let side = |s: &str| {
                format!("{}.{}", p.label(&format!("{s}_workload")), p.label(&format!("{s}_workload_namespace")))
            };
            (
                p.label("reporter").to_string(),
                side("source"),
                side("destination"),
                p.label("response_code").to_string(),
                p.value,
            )
        })
        .collect();
    rows.sort();
    for (reporter, src, dst, code, count) in rows {
        println!("  {reporter:<12} {src:<34} {dst:<34} {code:>4} {count:>6}");
    }
    println!("\nistio_request_duration_milliseconds by reporting proxy (from the histogram buckets):");
    let mut latencies: Vec<_> = series(&points, "istio_request_duration_milliseconds")
        .into_iter()
        .filter(|p| p.label("response_code") == "200")
        .map(|p| {
            let who = match p.label("reporter") {
                "destination" => format!("{} (inbound)", p.label("destination_workload")),
                _ => format!("{} (outbound)", p.label("source_workload")),
            };
            (who, p.value, quantile(&p, 0.5), quantile(&p, 0.99))
        })
        .collect();
    latencies.sort_by(|a, b| a.0.cmp(&b.0));
    for (who, count, p50, p99) in latencies {
        println!("  {who:<34} {count:>3} requests (2xx)  p50 {p50:>6.2} ms  p99 {p99:>6.2} ms");
    }
}

fn print_children(spans: &[ReceivedSpan], logs: &[ReceivedLog], parent: &str, depth: usize) {
    let roots: Vec<&ReceivedSpan> = if parent.is_empty() {
        // Roots: spans whose parent is not in this trace (or that have none).
        spans.iter().filter(|s| !spans.iter().any(|p| p.span_id() == s.parent_span_id())).collect()
    } else {
        spans.iter().filter(|s| s.parent_span_id() == parent).collect()
    };
    for s in roots {
        let kind = match SpanKind::try_from(s.span.kind) {
            Ok(SpanKind::Server) => "SERVER",
            Ok(SpanKind::Client) => "CLIENT",
            _ => "OTHER",
        };
        let ms = s.span.end_time_unix_nano.saturating_sub(s.span.start_time_unix_nano) as f64 / 1e6;
        let error = s.attr("error.type").map(|e| format!("  error.type={e}")).unwrap_or_default();
        let indent = if depth > 1 { format!("{}└─ ", "   ".repeat(depth - 2)) } else { String::new() };
        let label = format!("{indent}{}", s.span.name);
        println!(
            "  {label:<32} {kind}  {:<21} {}  {ms:>6.2} ms{error}",
            s.service(),
            s.attr("http.response.status_code").unwrap_or_else(|| "-".into()),
        );
        if let Some(log) = logs.iter().find(|l| l.span_id() == s.span_id()) {
            let pad = "   ".repeat(depth.saturating_sub(1));
            println!("  {pad}   log {:<5} {}", log.record.severity_text, log.body());
        }
        print_children(spans, logs, &s.span_id(), depth + 1);
    }
}
