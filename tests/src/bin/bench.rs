//! The end-to-end benchmark: the same Envoy 1.40 binary and load, in one run, with no filter, a
//! no-op Wasm filter, Envoy's native OpenTelemetry tracer at 100%, meshtel traces + metrics at
//! 100%, meshtel metrics only, and meshtel traces at 1% + metrics.
//!
//! For each: Envoy's CPU time per request (from /proc), throughput at saturation (wrk), latency at
//! a fixed moderate rate, resident memory, and spans received. Prints a Markdown report.
//!
//! `make bench` runs it; `BENCH_SECONDS` (default 10) sets the saturation run's length.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use meshtel_tests::app::{App, Behavior};
use meshtel_tests::collector::Collector;
use meshtel_tests::envoy::{envoy_bin, Envoy};
use meshtel_tests::mesh::{plugin_config, SidecarSpec};
use meshtel_tests::{repo_root, request};
use serde_json::{json, Value};

/// Requests per second of the fixed-rate latency run: moderate for 2 cores.
const FIXED_RATE: u64 = 400;
const FIXED_SECONDS: u64 = 5;

enum Filter {
    None,
    Noop,
    Native,
    Meshtel(Value),
}

struct Scenario {
    name: &'static str,
    filter: Filter,
}

#[derive(Default, Clone)]
struct Result {
    name: &'static str,
    rps: f64,
    cpu_us_per_request: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mb: f64,
    spans: u64,
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at state; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Run wrk; returns (requests, requests/s).
fn wrk(url: &str, seconds: u64, connections: u32) -> (u64, f64) {
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{connections}"), &format!("-d{seconds}s"), url])
        .output()
        .expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let rps =
        text.lines().find_map(|l| l.strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0);
    (requests, rps)
}

/// Latency at a fixed rate: 8 paced clients sending FIXED_RATE requests/s in all.
fn fixed_rate_latency(url: &str) -> (f64, f64) {
    let clients = 8;
    let interval = Duration::from_nanos(1_000_000_000 * clients / FIXED_RATE);
    let samples = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (url, samples) = (url.to_string(), samples.clone());
            thread::spawn(move || {
                let start = Instant::now() + interval.mul_f64(c as f64 / clients as f64);
                let mut next = start;
                while next < start + Duration::from_secs(FIXED_SECONDS) {
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    let t = Instant::now();
                    if request(&url, &[]).map(|r| r.0) == Some(200) {
                        samples.lock().unwrap().push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    next += interval;
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let mut s = samples.lock().unwrap().clone();
    s.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| s.get(((s.len() as f64 * p) as usize).min(s.len().saturating_sub(1))).copied().unwrap_or(0.0);
    (q(0.5), q(0.99))
}

fn run(s: &Scenario, seconds: u64) -> Result {
    let collector = Collector::start_counting();
    let app = App::start(Behavior::Echo);
    let mut spec = SidecarSpec::new("a", "ns-a", app.port, collector.port).concurrency(2);
    spec.plugin_config = None;
    match &s.filter {
        Filter::None | Filter::Native => {}
        Filter::Noop => {
            spec = spec.module(repo_root().join("target/wasm32-wasip1/release/meshtel_noop_filter.wasm"), "FAIL_OPEN");
            spec.plugin_config = Some(json!({}));
        }
        Filter::Meshtel(overrides) => spec.plugin_config = Some(plugin_config(overrides.clone())),
    }
    let (mut proxy, inbound, _) = spec.proxy();
    if matches!(s.filter, Filter::Native) {
        proxy.native_tracer = Some(collector.port);
    }
    let envoy = Envoy::start(&proxy);
    let url = format!("http://127.0.0.1:{inbound}/bench");
    wrk(&url, 2, 16);
    let pid = envoy.pid();
    let cpu0 = cpu_seconds(pid);
    let (requests, rps) = wrk(&url, seconds, 32);
    let cpu = cpu_seconds(pid) - cpu0;
    let rss = rss_mb(pid);
    let (p50, p99) = fixed_rate_latency(&url);
    thread::sleep(Duration::from_secs(2));
    Result {
        name: s.name,
        rps,
        cpu_us_per_request: cpu * 1e6 / requests.max(1) as f64,
        p50_ms: p50,
        p99_ms: p99,
        rss_mb: rss,
        spans: collector.counted_spans(),
    }
}

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let fast = json!({"export": {"flush_interval_ms": 1000}, "metrics": {"export_interval_ms": 10000}});
    let with = |extra: Value| {
        let mut v = fast.clone();
        meshtel_tests::mesh::merge(&mut v, extra);
        v
    };
    let scenarios = [
        Scenario { name: "Envoy alone (baseline)", filter: Filter::None },
        Scenario { name: "no-op Wasm filter", filter: Filter::Noop },
        Scenario { name: "native OTel tracer, 100%", filter: Filter::Native },
        Scenario { name: "meshtel traces + metrics, 100%", filter: Filter::Meshtel(with(json!({}))) },
        Scenario { name: "meshtel metrics only", filter: Filter::Meshtel(with(json!({"traces": {"enabled": false}}))) },
        Scenario {
            name: "meshtel traces 1% + metrics",
            filter: Filter::Meshtel(with(json!({"traces": {"sampling_ratio": 0.01}}))),
        },
    ];
    let version = Command::new(envoy_bin())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    eprintln!("benchmarking {} scenarios, {seconds} s of saturation each ...", scenarios.len());
    let results: Vec<Result> = scenarios
        .iter()
        .map(|s| {
            eprintln!("  {}", s.name);
            run(s, seconds)
        })
        .collect();
    let base = results[0].clone();
    let native_overhead = results[2].cpu_us_per_request - base.cpu_us_per_request;
    let noop_overhead = results[1].cpu_us_per_request - base.cpu_us_per_request;
    println!("Envoy: {version}");
    println!("Machine: {} cores, {}; load: wrk -t2 -c32 -d{seconds}s on loopback, Envoy --concurrency 2, echo upstream; latency at {FIXED_RATE} req/s for {FIXED_SECONDS} s\n", num_cores(), cpu_model());
    println!("| configuration | Envoy CPU µs/request | overhead µs | / native overhead | / no-op overhead | req/s at saturation | p50 ms @{FIXED_RATE}/s | p99 ms | RSS MB | spans received |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        let overhead = r.cpu_us_per_request - base.cpu_us_per_request;
        println!(
            "| {} | {:.1} | {:+.1} | {} | {} | {:.0} | {:.2} | {:.2} | {:.0} | {} |",
            r.name,
            r.cpu_us_per_request,
            overhead,
            ratio(overhead, native_overhead),
            ratio(overhead, noop_overhead),
            r.rps,
            r.p50_ms,
            r.p99_ms,
            r.rss_mb,
            r.spans
        );
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b.abs() < 0.05 {
        "-".into()
    } else {
        format!("{:.2}", a / b)
    }
}

fn num_cores() -> usize {
    thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default()
}
