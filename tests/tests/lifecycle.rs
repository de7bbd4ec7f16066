//! Updates and shutdown in real Envoy, with meshtel delivered as Istio delivers a WasmPlugin: by
//! extension config discovery (ECDS), here from a watched file instead of istiod. Under steady
//! load from several clients, a new `pluginConfig`, a refused one, a new module and the drain
//! before SIGTERM must answer every request and deliver every span and count exactly once.
//!
//! What Envoy 1.40 does, observed here with a probe module before this was built: a new
//! `pluginConfig` for the same module gives a new root context in the same VM, first in a
//! canary VM that checks it (proxy-wasm-cpp-host `WasmHandleBase::canary`), and the old root
//! context gets `on_done` once its filter chains drained; one that returns false is kept, its
//! calls are answered and its ticks go on until it calls `proxy_done`. A refused `pluginConfig`
//! fails in the canary only: Envoy counts an ECDS `config_fail` and keeps the old config. A new
//! module gives new VMs; the old VM's root contexts get `on_done`, and Envoy deletes the old VM
//! right after, cancelling its calls. At SIGTERM every root context gets `on_done`, and nothing
//! dispatched then reaches the collector.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use meshtel_tests::app::{App, Behavior};
use meshtel_tests::collector::Collector;
use meshtel_tests::envoy::{wasm_path, Envoy, COLLECTOR_CLUSTER};
use meshtel_tests::mesh::{plugin_config, SidecarSpec};
use meshtel_tests::metrics::{starts, total_across_resets};
use meshtel_tests::request;
use serde_json::{json, Value};

const CLIENTS: usize = 4;

/// Requests from `CLIENTS` threads until stopped.
struct Load {
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, pause: Duration) -> Load {
        let (sent, failed, stop) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let threads = (0..CLIENTS)
            .map(|i| {
                let (sent, failed, stop) = (sent.clone(), failed.clone(), stop.clone());
                thread::spawn(move || {
                    let url = format!("http://127.0.0.1:{port}/client/{i}");
                    while !stop.load(Ordering::Relaxed) {
                        sent.fetch_add(1, Ordering::Relaxed);
                        if request(&url, &[]).map(|(status, _)| status) != Some(200) {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        thread::sleep(pause);
                    }
                })
            })
            .collect();
        Load { sent, failed, stop, threads }
    }

    /// Stop and return (sent, failed).
    fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        (self.sent.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

/// A sidecar with two workers that takes meshtel by ECDS, in front of an echo app.
fn sidecar(collector: &Collector, config: &Value) -> (Envoy, u16, App) {
    let app = App::start(Behavior::Echo);
    let spec = SidecarSpec {
        plugin_config: Some(config.clone()),
        ..SidecarSpec::new("b", "ns-b", app.port, collector.endpoint())
    }
    .concurrency(2);
    let (mut proxy, inbound, _) = spec.proxy();
    proxy.ecds = true;
    (Envoy::start(&proxy), inbound, app)
}

/// The test configuration: short flush and export intervals, so that the test is quick.
fn quick(overrides: Value) -> Value {
    let mut config =
        plugin_config(json!({"metrics": {"export_interval_ms": 1000}, "export": {"flush_interval_ms": 200}}));
    meshtel_tests::mesh::merge(&mut config, overrides);
    config
}

/// Wait until the collector counted `requests` in `istio_requests_total`, across resets.
fn wait_for_total(collector: &Collector, requests: u64, timeout: Duration) -> Vec<meshtel_tests::metrics::Point> {
    collector.wait_for_points(timeout, |points| total_across_resets(points, "istio_requests_total") >= requests)
}

/// meshtel's counters, for a failure message (empty once Envoy has stopped).
fn counters(envoy: &Envoy) -> String {
    let url = format!("http://127.0.0.1:{}/stats?filter=wasmcustom", envoy.admin_port);
    meshtel_tests::http_get(&url).map(|(_, body)| body).unwrap_or_default()
}

/// Every span recorded arrived: as many distinct span ids as `expected`. Returns how many
/// arrived twice.
fn assert_every_span(collector: &Collector, expected: u64, timeout: Duration, envoy: &Envoy) -> usize {
    let deadline = Instant::now() + timeout;
    while (collector.spans().len() as u64) < expected && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(500));
    let spans = collector.spans();
    let ids: std::collections::HashSet<String> = spans.iter().map(|s| s.span_id()).collect();
    assert_eq!(ids.len() as u64, expected, "every span recorded\n{}", counters(envoy));
    spans.len() - ids.len()
}

/// Every span recorded arrived, once.
fn assert_spans_once(collector: &Collector, expected: u64, timeout: Duration, envoy: &Envoy) {
    assert_eq!(assert_every_span(collector, expected, timeout, envoy), 0, "no span twice\n{}", counters(envoy));
}

/// The module under another build: the same code with a custom section appended, so that its
/// bytes (and Envoy's key for its VMs) differ, as a rebuild from another commit would.
fn another_build(tag: &str) -> PathBuf {
    let mut bytes = std::fs::read(wasm_path()).expect("the release module");
    let name = b"meshtel-test-build";
    let payload: Vec<u8> = [&[name.len() as u8][..], name, tag.as_bytes()].concat();
    assert!(payload.len() < 128, "one LEB128 byte");
    bytes.extend_from_slice(&[0, payload.len() as u8]);
    bytes.extend_from_slice(&payload);
    let path = std::env::temp_dir().join(format!("meshtel-{}-{tag}.wasm", std::process::id()));
    std::fs::write(&path, bytes).expect("a temporary file");
    path
}

fn log_lines(envoy: &Envoy, needle: &str) -> usize {
    envoy.log().lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn pushed_plugin_configs_take_effect_within_a_flush_and_lose_or_double_nothing() {
    let collector = Collector::start();
    let (envoy, port, _app) = sidecar(&collector, &quick(json!({})));
    let load = Load::start(port, Duration::from_millis(2));
    let pushes = [
        quick(json!({"traces": {"sampling_ratio": 0.5}})),
        quick(json!({"metrics": {"export_interval_ms": 2000}})),
        quick(json!({"resource": {"attributes": {"deployment.environment.name": "canary"}}})),
        quick(json!({})),
    ];
    for (i, config) in pushes.iter().enumerate() {
        thread::sleep(Duration::from_millis(1500));
        assert!(envoy.push_plugin(&wasm_path(), config), "push {i} taken");
        if i == 2 {
            // A request after the push is served by the new config: its span carries the new
            // resource attribute, and arrives within one flush (200 ms) and a margin.
            let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let sent = Instant::now();
            assert_eq!(request(&format!("http://127.0.0.1:{port}/marked"), &[("traceparent", parent)]).unwrap().0, 200);
            let span = collector.wait_for_child_of("00f067aa0ba902b7", Duration::from_secs(3));
            assert_eq!(span.resource_attr("deployment.environment.name").as_deref(), Some("canary"));
            assert!(sent.elapsed() < Duration::from_secs(2), "took {:?}", sent.elapsed());
        }
    }
    thread::sleep(Duration::from_millis(1000));
    let (sent, failed) = load.stop();
    let sent = sent + 1;
    assert_eq!(failed, 0, "every request answered");
    let points = wait_for_total(&collector, sent, Duration::from_secs(20));
    thread::sleep(Duration::from_secs(3));
    let points = if collector.points().len() > points.len() { collector.points() } else { points };
    assert_eq!(total_across_resets(&points, "istio_requests_total"), sent, "every request counted once");
    let recorded = envoy.wait_meshtel_stat("spans_recorded", Duration::from_secs(5), |n| n > 0);
    assert!(recorded < sent, "sampling 0.5 for a while: {recorded} of {sent}");
    assert_eq!(envoy.stat("wasmcustom.meshtel.spans_dropped"), 0);
    assert_eq!(envoy.stat("wasmcustom.meshtel.spans_failed"), 0);
    assert_spans_once(&collector, recorded, Duration::from_secs(10), &envoy);
}

#[test]
fn a_refused_plugin_config_leaves_the_last_good_one_serving() {
    let collector = Collector::start();
    let (envoy, port, _app) = sidecar(&collector, &quick(json!({})));
    let load = Load::start(port, Duration::from_millis(2));
    thread::sleep(Duration::from_millis(1000));
    assert!(!envoy.push_plugin(&wasm_path(), &quick(json!({"traces": {"sampling_ratio": 2}}))), "refused");
    thread::sleep(Duration::from_millis(1500));
    let (sent, failed) = load.stop();
    assert_eq!(failed, 0, "every request answered");
    let refused = "meshtel: invalid pluginConfig, refused: traces.sampling_ratio: must be between 0 and 1";
    assert_eq!(log_lines(&envoy, refused), 1, "logged once, naming the field\n{}", envoy.log());
    wait_for_total(&collector, sent, Duration::from_secs(20));
    thread::sleep(Duration::from_secs(2));
    assert_eq!(total_across_resets(&collector.points(), "istio_requests_total"), sent, "counts stay exact");
    assert_spans_once(&collector, sent, Duration::from_secs(10), &envoy);
}

#[test]
fn a_new_module_takes_over_with_totals_exact_and_the_old_vms_spans_delivered() {
    let collector = Collector::start();
    let config = quick(json!({}));
    let (envoy, port, _app) = sidecar(&collector, &config);
    let load = Load::start(port, Duration::from_millis(2));
    thread::sleep(Duration::from_millis(2500));
    let rebuilt = another_build("upgrade");
    assert!(envoy.push_plugin(&rebuilt, &config), "the new module is taken");
    thread::sleep(Duration::from_millis(2500));
    let (sent, failed) = load.stop();
    assert_eq!(failed, 0, "every request answered");
    let points = wait_for_total(&collector, sent, Duration::from_secs(20));
    thread::sleep(Duration::from_secs(2));
    let points = if collector.points().len() > points.len() { collector.points() } else { points };
    assert_eq!(total_across_resets(&points, "istio_requests_total"), sent, "totals exact across the switch");
    assert!(starts(&points, "istio_requests_total").len() >= 2, "the new exporter's totals start anew");
    // Envoy cancels the old VM's calls in flight when it deletes the VM; meshtel hands copies
    // of them over, so such a batch may arrive twice (at least once, as OTLP retries are).
    let twice = assert_every_span(&collector, sent, Duration::from_secs(10), &envoy);
    assert!(twice <= 2 * 4 * 512, "at most the calls in flight of the old VMs: {twice}");
    assert!(envoy.stat("wasmcustom.meshtel.exports_handed_over") >= 1, "the old leader's last export");
    let _ = std::fs::remove_file(rebuilt);
}

#[test]
fn what_was_recorded_before_the_drain_reaches_the_collector_before_sigterm() {
    let collector = Collector::start();
    // The defaults: a 1 s flush and a 10 s metric export interval.
    let (mut envoy, port, _app) = sidecar(&collector, &json!({"collector": {"cluster": COLLECTOR_CLUSTER}}));
    let load = Load::start(port, Duration::from_millis(2));
    thread::sleep(Duration::from_millis(3000));
    let (sent, failed) = load.stop();
    assert_eq!(failed, 0);
    // Kubernetes deletes the pod: Istio's agent drains the listeners gracefully, waits
    // `terminationDrainDuration` (5 s by default), then Envoy gets SIGTERM.
    envoy.drain_gracefully();
    thread::sleep(Duration::from_secs(5));
    envoy.terminate();
    let points = collector.points();
    assert_eq!(total_across_resets(&points, "istio_requests_total"), sent, "every request counted");
    assert_spans_once(&collector, sent, Duration::ZERO, &envoy);
}

#[test]
fn fifty_pushes_in_a_row_keep_memory_bounded_and_every_request_answered() {
    let collector = Collector::start();
    let (envoy, port, _app) = sidecar(&collector, &quick(json!({})));
    let load = Load::start(port, Duration::from_millis(5));
    let push = |i: usize| {
        let config = quick(json!({"resource": {"attributes": {"push": i.to_string()}}}));
        assert!(envoy.push_plugin(&wasm_path(), &config), "push {i}");
        thread::sleep(Duration::from_millis(100));
    };
    for i in 0..10 {
        push(i);
    }
    let after_ten = envoy.rss_kb();
    for i in 10..50 {
        push(i);
    }
    thread::sleep(Duration::from_secs(1));
    let after_fifty = envoy.rss_kb();
    let (sent, failed) = load.stop();
    assert_eq!(failed, 0, "every request answered");
    eprintln!("RSS after 10 pushes {after_ten} KiB, after 50 {after_fifty} KiB ({sent} requests)");
    assert!(after_fifty < after_ten + 32 * 1024, "RSS grew from {after_ten} to {after_fifty} KiB");
    wait_for_total(&collector, sent, Duration::from_secs(20));
    thread::sleep(Duration::from_secs(2));
    assert_eq!(total_across_resets(&collector.points(), "istio_requests_total"), sent, "counts stay exact");
}
