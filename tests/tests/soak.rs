//! Soak: a couple of hundred thousand requests with the collector down (hanging), then up. Requests never fail,
//! meshtel's queue and series caps hold (drops are counted), and Envoy's memory stays within a
//! fixed bound after warm-up. Prints the figures (run with --nocapture to see them).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use meshtel_tests::app::{App, Behavior};
use meshtel_tests::collector::{Answer, Collector};
use meshtel_tests::mesh::{Sidecar, SidecarSpec};
use meshtel_tests::metrics::{peer_metadata, series};
use meshtel_tests::request;
use serde_json::json;

const THREADS: usize = 8;
const PEERS: usize = 80;
const MAX_SERIES: usize = 40;
/// Allowed growth of Envoy's resident memory between warm-up and the end of the soak.
const MAX_GROWTH_KB: u64 = 48 * 1024;

fn rss_kb(sidecar: &Sidecar) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", sidecar.envoy.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Send `count` requests from THREADS threads (or stop at `limit`); returns (sent, failed).
fn load(sidecar: &Sidecar, count: u64, limit: Duration) -> (u64, u64) {
    let peers: Arc<Vec<String>> = Arc::new((0..PEERS).map(|i| peer_metadata(&format!("peer{i}"), "soak")).collect());
    let (sent, failed, stop) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let deadline = Instant::now() + limit;
    let url = format!("http://127.0.0.1:{}", sidecar.inbound);
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (peers, sent, failed, stop, url) =
                (peers.clone(), sent.clone(), failed.clone(), stop.clone(), url.clone());
            thread::spawn(move || loop {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                if n >= count || stop.load(Ordering::Relaxed) {
                    sent.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                let peer = &peers[n as usize % PEERS];
                let ok = request(&format!("{url}/soak/{}", n % 1000), &[("x-envoy-peer-metadata", peer)]).map(|r| r.0)
                    == Some(200);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                if Instant::now() > deadline {
                    stop.store(true, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

#[test]
fn collector_down_then_up_under_load_keeps_memory_and_caps_bounded() {
    let collector = Collector::start();
    // The outage: every export call hangs until collector.timeout_ms, so calls pile up in flight
    // and spans in the queue.
    collector.answer_with(Answer::DelayMs(2_000));
    let app = App::start(Behavior::Echo);
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.port)
        .concurrency(2)
        .config(json!({
            "collector": {"timeout_ms": 1000},
            "export": {"max_queue": 2048, "max_batch": 256, "max_in_flight": 1, "flush_interval_ms": 200, "max_retries": 2},
            "metrics": {"export_interval_ms": 1000, "max_series": MAX_SERIES},
            "logs": {"enabled": true},
        }))
        .start();
    let started = Instant::now();
    let (warm, failed) = load(&sidecar, 20_000, Duration::from_secs(30));
    assert_eq!(failed, 0);
    let rss_warm = rss_kb(&sidecar);

    let (down, failed) = load(&sidecar, 120_000, Duration::from_secs(90));
    assert_eq!(failed, 0, "requests failed while the collector was down");
    // The collector was down from the start, through the warm-up.
    let outage_lines = meshtel_lines(&sidecar);
    let rss_down = rss_kb(&sidecar);
    let dropped = sidecar.envoy.stat("wasmcustom.meshtel.spans_dropped");
    let logs_dropped = sidecar.envoy.stat("wasmcustom.meshtel.logs_dropped");
    let failed_spans = sidecar.envoy.stat("wasmcustom.meshtel.spans_failed");

    collector.answer_with(Answer::Ok);
    let (up, failed) = load(&sidecar, 50_000, Duration::from_secs(60));
    assert_eq!(failed, 0);
    thread::sleep(Duration::from_millis(2_500));
    let rss_end = rss_kb(&sidecar);
    let points = collector.points();
    let requests_series = series(&points, "istio_requests_total");
    let exported = sidecar.envoy.stat("wasmcustom.meshtel.spans_exported");
    let logs_exported = sidecar.envoy.stat("wasmcustom.meshtel.logs_exported");
    let total = warm + down + up;
    eprintln!(
        "soak: {total} requests in {:.0} s ({warm} warm-up, {down} collector down, {up} up), 0 failed\n\
         soak: Envoy RSS {} MB after warm-up, {} MB after the outage, {} MB at the end\n\
         soak: spans dropped (queue full) {dropped}, failed after retries {failed_spans}, exported {exported}\n\
         soak: access logs dropped (queue full) {logs_dropped}, exported {logs_exported}\n\
         soak: {} istio_requests_total series for {PEERS} peers (max_series {MAX_SERIES} + overflow)",
        started.elapsed().as_secs_f64(),
        rss_warm / 1024,
        rss_down / 1024,
        rss_end / 1024,
        requests_series.len(),
    );
    assert!(down >= 50_000, "the outage phase sent only {down} requests");
    assert!(dropped > 0, "with the collector down, the queue cap drops the oldest spans and counts them");
    assert!(logs_dropped > 0, "and the oldest access logs");
    assert!(
        rss_down.max(rss_end) <= rss_warm + MAX_GROWTH_KB,
        "memory grew from {rss_warm} kB to {} kB",
        rss_down.max(rss_end)
    );
    assert!(requests_series.len() <= MAX_SERIES + 1, "series cap: {}", requests_series.len());
    assert!(requests_series.iter().any(|p| p.label("otel.metric.overflow") == "true"));
    assert!(exported > 0, "spans flow again once the collector is back");
    assert!(logs_exported > 0, "access logs too");

    // The log tells each state change once (filter/src/episode.rs): per worker, the two queues
    // filling and the three signals' exports failing, not a line per tick or per call.
    assert!(
        outage_lines.len() <= 2 * 5,
        "{} meshtel lines during the outage:\n{}",
        outage_lines.len(),
        outage_lines.join("\n")
    );
    for needle in ["span queue full", "access-log queue full", "/v1/traces: export failing", "/v1/logs: export failing"]
    {
        assert!(outage_lines.iter().any(|l| l.contains(needle)), "{needle:?} logged:\n{}", outage_lines.join("\n"));
    }
    // And once it recovered, what the outage cost.
    sidecar.envoy.wait_log("span queue has room again: dropped ", Duration::from_secs(30));
    let log = sidecar.envoy.wait_log("/v1/traces: export recovered: ", Duration::from_secs(30));
    let recovered: Vec<&str> = log.lines().filter(|l| l.contains("export recovered: ")).collect();
    assert!(recovered.iter().all(|l| l.contains(" calls failed over ") && l.contains(" items lost")), "{recovered:?}");
    let after = meshtel_lines(&sidecar).len();
    eprintln!("soak: {} meshtel log lines during the outage, {after} with the recovery", outage_lines.len());
    assert!(after <= 2 * 10, "{after} meshtel lines over the outage and the recovery:\n{log}");
}

/// The lines meshtel logged so far, but for the one each VM logs when it is configured.
fn meshtel_lines(sidecar: &Sidecar) -> Vec<String> {
    let log = sidecar.envoy.log();
    log.lines().filter(|l| l.contains("wasm log") && !l.contains(" configured: ")).map(str::to_string).collect()
}
