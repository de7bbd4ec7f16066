//! The local demo: an ingress gateway and two workloads (`a` calls `b`), each behind real Envoy
//! running meshtel, some traffic, and the traces the built-in OTLP receiver got, as trees.

use std::collections::BTreeMap;
use std::time::Duration;

use meshtel_tests::app::{App, Behavior};
use meshtel_tests::collector::{Collector, ReceivedSpan};
use meshtel_tests::mesh::{gateway_with, plugin_config, SidecarSpec};
use meshtel_tests::metrics::{quantile, series, total};
use meshtel_tests::{free_port, request};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use serde_json::json;

fn main() {
    println!("meshtel demo: gateway -> a -> b, each proxy a real Envoy 1.40 with meshtel");
    let collector = Collector::start();
    let app_b = App::start(Behavior::Echo);
    let sidecar_b =
        SidecarSpec::new("b", "ns-b", app_b.port, collector.port).config(fast_metrics()).exchange_metadata().start();
    let a_outbound = free_port();
    let app_a = App::start(Behavior::Forward(a_outbound));
    let sidecar_a = SidecarSpec::new("a", "ns-a", app_a.port, collector.port)
        .outbound_port(a_outbound)
        .upstream("b.ns-b.svc.cluster.local", sidecar_b.inbound)
        .config(fast_metrics())
        .exchange_metadata()
        .start();
    let gw = gateway_with(
        "a.ns-a.svc.cluster.local",
        sidecar_a.inbound,
        collector.port,
        plugin_config(fast_metrics()),
        None,
        true,
    );
    println!(
        "proxies up: gateway :{}, a :{} (outbound :{}), b :{}; OTLP receiver :{}\n",
        gw.port, sidecar_a.inbound, sidecar_a.outbound, sidecar_b.inbound, collector.port
    );

    let paths = ["/checkout", "/cart", "/status/404", "/status/503", "/checkout"];
    let b3 = ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1");
    for (i, path) in paths.iter().enumerate() {
        let headers: &[(&str, &str)] = if i == 1 { &[b3] } else { &[] };
        let status = request(&format!("http://127.0.0.1:{}{path}", gw.port), headers).map_or(0, |r| r.0);
        println!("GET {path:<12} -> {status}{}", if i == 1 { "   (arrived with a B3 header)" } else { "" });
    }

    let spans = collector.wait_for_spans(paths.len() * 4, Duration::from_secs(15));
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
        print_children(&spans, "", 1);
    }
    print_metrics(&collector, paths.len() as u64);
    // Counters reach Envoy's stats on the next tick after the collector answered.
    std::thread::sleep(Duration::from_millis(500));
    println!("\nmeshtel stats (Envoy /stats, wasmcustom.meshtel.*):");
    for (name, envoy) in [("gateway", &gw.envoy), ("a", &sidecar_a.envoy), ("b", &sidecar_b.envoy)] {
        println!(
            "  {name:<8} recorded {:>3}  exported {:>3}  dropped {}  failed {}",
            envoy.stat("wasmcustom.meshtel.spans_recorded"),
            envoy.stat("wasmcustom.meshtel.spans_exported"),
            envoy.stat("wasmcustom.meshtel.spans_dropped"),
            envoy.stat("wasmcustom.meshtel.spans_failed"),
        );
    }
}

/// Export metrics every second so that the demo does not wait for the 10 s default.
fn fast_metrics() -> serde_json::Value {
    json!({"metrics": {"export_interval_ms": 1000}})
}

fn print_metrics(collector: &Collector, requests_sent: u64) {
    // Four proxies see each request: gateway, a inbound, a outbound, b inbound.
    let points = collector
        .wait_for_points(Duration::from_secs(15), |p| total(p, "istio_requests_total", |_| true) >= requests_sent * 4);
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

fn print_children(spans: &[ReceivedSpan], parent: &str, depth: usize) {
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
        print_children(spans, &s.span_id(), depth + 1);
    }
}
