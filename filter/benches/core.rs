//! Micro-benchmarks of the pure core, natively: trace context, one request's whole path through
//! the host seam (`Telemetry::on_request_headers` + `on_log` over the mock host) per
//! configuration, and OTLP encoding per span, log record and metric point. Also prints, per
//! configuration, the heap allocations and the host calls of one request in the steady state (a
//! known series on a kept-alive connection).
//!
//! `cargo bench -p meshtel-filter --features mock-host --bench core`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // benchmark code

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use meshtel_filter::access_log::AccessLog;
use meshtel_filter::config;
use meshtel_filter::headers::HeaderMap;
use meshtel_filter::headers::HeaderPairs;
use meshtel_filter::host::mock::MockHost;
use meshtel_filter::istio::labels::LABEL_NAMES;
use meshtel_filter::istio::node::NodeInfo;
use meshtel_filter::istio::peer::{encode_filter_state, encode_peer_metadata};
use meshtel_filter::metrics::aggregate::{Aggregator, Measurement};
use meshtel_filter::metrics::encoder::MetricsEncoder;
use meshtel_filter::metrics::shared::{hand_over, take_over, MemoryStore, SharedStore};
use meshtel_filter::otlp::{self, LogEncoder, TraceEncoder};
use meshtel_filter::telemetry::{ActiveRequest, MetricFacts, Telemetry};
use meshtel_filter::traces::propagation::{IdGenerator, TraceDecision};
use meshtel_filter::traces::span::{Completion, RequestInfo, SpanKind, SpanRecord};
use meshtel_filter::traces::trace_context::{
    format_traceparent, parse_b3_single, parse_traceparent, sanitize_tracestate,
};

/// Counts heap allocations, to report what one request costs.
struct Counting;
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn headers() -> HeaderPairs {
    HeaderPairs::from_pairs(&[
        (":method", "GET"),
        (":path", "/api/items?page=2"),
        (":scheme", "http"),
        (":authority", "shop.ns-a.svc.cluster.local:8080"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("x-request-id", "5b0c4b0e-5f2c-4a8e-9a51-6d1c0f6a7b1e"),
        ("traceparent", TP),
        ("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
    ])
}

fn node() -> NodeInfo {
    NodeInfo {
        id: "sidecar~10.0.0.1~a-v1-abc.ns-a~ns-a.svc.cluster.local".into(),
        name: "a-v1-abc".into(),
        namespace: "ns-a".into(),
        workload_name: "a-v1".into(),
        labels: [("app".to_string(), "a".to_string()), ("version".to_string(), "v1".to_string())].into(),
        mesh_id: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
    }
}

fn telemetry(extra: &str) -> Telemetry {
    let json = format!(
        r#"{{"collector":{{"cluster":"outbound|4318||otel.obs.svc.cluster.local"}},"export":{{"max_queue":1048576}}{extra}}}"#
    );
    Telemetry::new(config::parse(json.as_bytes()).unwrap(), node(), 7, "bench", 0)
}

fn completion() -> Completion {
    Completion {
        end_unix_nanos: 2_000_000,
        status_code: 200,
        response_flags: "-".into(),
        upstream_cluster: Some("inbound|8080||".into()),
        protocol: Some("HTTP/1.1".into()),
        client_address: Some("10.0.0.9:51234".into()),
        kind: SpanKind::Server,
        upstream_host: Some("10.0.0.2:8080".into()),
        bytes_received: 0,
        bytes_sent: 1_500,
        route_name: None,
    }
}

fn facts() -> MetricFacts {
    MetricFacts { request_bytes: 420, response_bytes: 1_800, ..Default::default() }
}

fn request(t: &mut Telemetry, hs: &HeaderPairs) {
    let (active, _ops): (ActiveRequest, _) = t.start_request(hs.view(), 1_000_000).unwrap();
    let metrics = t.metrics_enabled().then(facts);
    t.finish_request(active, completion(), metrics);
}

/// The bench's inbound request as Envoy hands it to a sidecar's inbound chain: wrk's request
/// (`tests/src/bin/bench.rs`) with what Envoy adds, and the log-phase properties meshtel reads.
fn inbound_host() -> MockHost {
    let mut host = MockHost::new().counting_only().at(1_000_000);
    for (k, v) in [
        (":authority", "127.0.0.1:15006"),
        (":path", "/bench"),
        (":method", "GET"),
        (":scheme", "http"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "5b0c4b0e-5f2c-4a8e-9a51-6d1c0f6a7b1e"),
    ] {
        host = host.with_header(HeaderMap::Request, k, v);
    }
    host.with_header(HeaderMap::Response, ":status", "200")
        .with_property("xds.cluster_name", "inbound|8080||")
        .with_u64("xds.listener_direction", 1)
        .with_u64("response.code", 200)
        .with_u64("response.flags", 0)
        .with_property("request.protocol", "HTTP/1.1")
        .with_property("source.address", "127.0.0.1:51234")
        .with_u64("connection.id", 7)
        .with_u64("request.total_size", 120)
        .with_u64("response.total_size", 310)
        .with_u64("request.size", 0)
        .with_u64("response.size", 220)
        .with_property("upstream.address", "127.0.0.1:8080")
}

/// The same request in a mesh: Istio's peer metadata filter has put the caller in filter state
/// and Istio's authn filter its principals (cached per connection), and the caller's peer header
/// arrived too.
fn mesh_inbound_host() -> MockHost {
    let peer = [("workload", "productpage-v1"), ("namespace", "default"), ("cluster", "Kubernetes")];
    let labels = [("app", "productpage"), ("version", "v1"), ("service.istio.io/canonical-name", "productpage")];
    inbound_host()
        .with_property("filter_state.downstream_peer", encode_filter_state(&peer, &labels))
        .with_property("filter_state.io.istio.peer_principal", "spiffe://cluster.local/ns/default/sa/productpage")
        .with_property("filter_state.io.istio.local_principal", "spiffe://cluster.local/ns/ns-a/sa/a")
        .with_header(
            HeaderMap::Request,
            "x-envoy-peer-metadata",
            &encode_peer_metadata(&[("WORKLOAD_NAME", "productpage-v1"), ("NAMESPACE", "default")], &labels),
        )
}

/// One request through the host seam, as the glue drives it.
fn seam_request(t: &mut Telemetry, host: &MockHost) {
    let active = t.on_request_headers(host);
    t.on_log(host, active);
}

/// The configurations of `make bench`, by name and config.
/// A configuration: its name, its pluginConfig fields, and the proxy it runs in.
type Config = (&'static str, &'static str, fn() -> MockHost);

const CONFIGS: [Config; 6] = [
    ("traces + metrics, 100%", "", inbound_host),
    ("metrics only", r#","traces":{"enabled":false}"#, inbound_host),
    ("traces 1% + metrics", r#","traces":{"sampling_ratio":0.01}"#, inbound_host),
    ("traces + metrics + access logs", r#","logs":{"enabled":true}"#, inbound_host),
    (
        "metrics only, in a mesh (peer filter state, principals, peer header)",
        r#","traces":{"enabled":false}"#,
        mesh_inbound_host,
    ),
    ("traces + metrics, 100%, in a mesh", "", mesh_inbound_host),
];

fn seam(c: &mut Criterion) {
    let mut g = c.benchmark_group("request path through the host seam");
    for (name, extra, host) in CONFIGS {
        let mut t = telemetry(extra);
        let host = host();
        g.bench_function(name, |b| b.iter(|| seam_request(&mut t, &host)));
    }
    g.finish();
    // The steady state: the series and the connection are known; 1000 requests after one.
    println!("\nper request in the steady state (inbound sidecar, known series, kept-alive connection):");
    println!("| configuration | heap allocations | of them meshtel's own | host calls | properties | header reads | map reads | header writes | clock |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, extra, host) in CONFIGS {
        let mut t = telemetry(extra);
        let host = host();
        seam_request(&mut t, &host);
        host.reset();
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..1000 {
            seam_request(&mut t, &host);
        }
        let allocations = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / 1000.0;
        let n = host.counts();
        let per = |v: usize| v as f64 / 1000.0;
        println!(
            "| {name} | {allocations:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            allocations - per(n.returned_buffers),
            per(n.total()),
            per(n.properties),
            per(n.header_reads),
            per(n.map_reads),
            per(n.header_writes),
            per(n.time_reads)
        );
    }
}

fn trace_context(c: &mut Criterion) {
    let mut g = c.benchmark_group("trace_context");
    g.bench_function("parse_traceparent", |b| b.iter(|| parse_traceparent(std::hint::black_box(TP))));
    let (p, _) = parse_traceparent(TP).unwrap();
    g.bench_function("format_traceparent", |b| b.iter(|| format_traceparent(&p.trace_id, &p.span_id, true)));
    g.bench_function("sanitize_tracestate", |b| {
        b.iter(|| sanitize_tracestate(std::hint::black_box("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")))
    });
    g.bench_function("parse_b3_single", |b| {
        b.iter(|| parse_b3_single(std::hint::black_box("4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1")))
    });
    g.finish();
}

fn per_request(c: &mut Criterion) {
    let hs = headers();
    let mut g = c.benchmark_group("per_request");
    let mut t = telemetry(r#","metrics":{"enabled":false}"#);
    g.bench_function("span_record (start + finish, sampled)", |b| b.iter(|| request(&mut t, &hs)));
    let mut t = telemetry(r#","traces":{"enabled":false}"#);
    g.bench_function("metric_record (start + finish, metrics only)", |b| b.iter(|| request(&mut t, &hs)));
    let mut t = telemetry(r#","traces":{"enabled":false},"metrics":{"histograms":"both"}"#);
    g.bench_function("metric_record, histograms: both", |b| b.iter(|| request(&mut t, &hs)));
    let mut t = telemetry("");
    g.bench_function("span + metrics", |b| b.iter(|| request(&mut t, &hs)));
    let mut t = telemetry(r#","logs":{"enabled":true}"#);
    g.bench_function("span + metrics + access log", |b| b.iter(|| request(&mut t, &hs)));
    g.finish();

    // Allocations of one request on the request path, traces + metrics.
    let mut t = telemetry("");
    request(&mut t, &hs);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..1000 {
        request(&mut t, &hs);
    }
    let per = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / 1000.0;
    println!("allocations per request (traces + metrics, request path): {per:.1}");
}

fn encoding(c: &mut Criterion) {
    let hs = headers();
    let mut g = c.benchmark_group("otlp");
    // A batch of 512 spans as the request path records them, encoded at flush time.
    let mut ids = IdGenerator::with_seed(1);
    let (parent, _) = parse_traceparent(TP).unwrap();
    let spans: Vec<SpanRecord> = (0..512)
        .map(|_| {
            let trace = TraceDecision {
                trace_id: parent.trace_id,
                span_id: ids.span_id(),
                parent_span_id: Some(parent.span_id),
                sampled: true,
                tracestate: None,
            };
            let request = RequestInfo::from_headers(hs.view(), &[]);
            SpanRecord::new(trace, config::SpanNaming::MethodPath, 1_000_000, request, completion())
        })
        .collect();
    let traces = TraceEncoder::new(otlp::resource(&node(), &Default::default()), &node());
    g.throughput(Throughput::Elements(512));
    g.bench_function("encode 512 spans", |b| b.iter(|| traces.encode(&spans)));
    let logs: Vec<AccessLog> = spans
        .iter()
        .map(|s| AccessLog {
            trace: Some(s.trace.clone()),
            start_unix_nanos: s.start_unix_nanos,
            request: s.request.clone(),
            completion: s.completion.clone(),
        })
        .collect();
    let log_encoder = LogEncoder::new(&otlp::resource(&node(), &Default::default()));
    g.bench_function("encode 512 access logs", |b| b.iter(|| log_encoder.encode(&logs)));
    let encoder = MetricsEncoder::new(otlp::resource(&node(), &Default::default()), Default::default());
    let mut agg = Aggregator::new(10_000);
    for i in 0..100 {
        let labels: Vec<String> = LABEL_NAMES.iter().map(|n| format!("{n}-{}", i % 100)).collect();
        agg.record(&labels, &Measurement { duration_ms: 3.0, request_bytes: 300, response_bytes: 900, traced: None });
    }
    g.throughput(Throughput::Elements(400));
    g.bench_function("encode 100 series (400 points)", |b| {
        b.iter(|| encoder.encode(&agg, config::Temporality::Cumulative, 0, 1))
    });
    g.finish();
}

/// Istio-shaped label values of series `i`: one caller per series, the rest the same.
fn series_labels(i: usize) -> Vec<String> {
    LABEL_NAMES
        .iter()
        .map(|n| match *n {
            "source_workload" | "source_app" | "source_canonical_service" => format!("peer-{i}-v1"),
            "source_principal" => format!("spiffe://cluster.local/ns/ns-peers/sa/peer-{i}"),
            _ => format!("{n}-value"),
        })
        .collect()
}

/// The exporter's tick at 2,000 live series, every one of them touched since the last tick (the
/// worst case): a worker handing its deltas over; the leader adding its own and taking another
/// worker's batch, and encoding one export part (one part per tick), and a whole export for scale.
fn exporter_tick(c: &mut Criterion) {
    const SERIES: usize = 2000;
    let mut local = Aggregator::new(SERIES);
    for i in 0..SERIES {
        local.record(
            &series_labels(i),
            &Measurement { duration_ms: 3.0, request_bytes: 300, response_bytes: 900, traced: None },
        );
    }
    let store = MemoryStore::default();
    let queue = store.queue("meshtel/bench/metrics/deltas").unwrap();
    let mut g = c.benchmark_group("exporter tick, 2000 series");
    g.sample_size(20);
    g.bench_function("worker: hand its deltas over", |b| {
        b.iter_batched(
            || local.clone(),
            |mut l| {
                hand_over(&store, queue, &mut l).unwrap();
                store.dequeue(queue)
            },
            BatchSize::LargeInput,
        )
    });
    let batch = local.encode_batch();
    let mut totals = Aggregator::new(SERIES);
    totals.merge_batch(&batch, None).unwrap();
    g.bench_function("leader: add its own deltas", |b| b.iter(|| totals.merge_deltas(&local, None)));
    g.bench_function("leader: take another worker's batch", |b| {
        b.iter(|| {
            store.enqueue(queue, &batch).unwrap();
            take_over(&store, queue, &mut totals, 256, None)
        })
    });
    let encoder = MetricsEncoder::new(otlp::resource(&node(), &Default::default()), Default::default());
    let part = 0..meshtel_filter::metrics::MAX_SERIES_PER_EXPORT;
    g.bench_function("leader: encode one export part (100 series)", |b| {
        b.iter(|| encoder.encode_part(&totals, config::Temporality::Cumulative, 0, 1, part.clone()))
    });
    g.bench_function("leader: encode the whole export (20 parts)", |b| {
        b.iter(|| encoder.encode(&totals, config::Temporality::Cumulative, 0, 1))
    });
    g.finish();
    let (body, points) = encoder.encode(&local, config::Temporality::Cumulative, 0, 1);
    println!(
        "\n2000 series: export body {} bytes ({points} points), one worker's batch {} bytes",
        body.len(),
        batch.len()
    );
}

criterion_group!(benches, trace_context, seam, per_request, encoding, exporter_tick);
criterion_main!(benches);
