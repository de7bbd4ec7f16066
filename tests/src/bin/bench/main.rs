//! The end-to-end benchmark: the same Envoy 1.40 binary and load, in one run, with no filter, a
//! no-op Wasm filter, Envoy's native OpenTelemetry tracer at 100%, meshtel traces + metrics at
//! 100%, meshtel metrics only, meshtel traces at 1% + metrics, and two meshtel variants that show
//! where the cost goes: W3C-only propagation, and access logs on top.
//!
//! For each: Envoy's CPU time per request (from /proc), throughput at saturation (wrk), latency at
//! a fixed moderate rate, resident memory, and spans received. Prints a Markdown report.
//!
//! `make bench` runs it. `BENCH_SECONDS` (default 10) sets the saturation run's length,
//! `BENCH_ROUNDS` (default 3) how many times every scenario runs (figures are medians),
//! `BENCH_ONLY=text` keeps the baseline and the scenarios whose name contains `text` (several
//! texts separated by `|`), and
//! `BENCH_PERF=1` profiles Envoy with `perf` during each saturation run, and
//! `BENCH_COMPARE_WASM=path.wasm` adds that build of the filter (traces + metrics) for an A/B.
//!
//! Then the same rows (and the probe's) counted in instructions per request under callgrind,
//! which do not move with the machine's load (`BENCH_CALLGRIND=0` skips them,
//! `BENCH_CALLGRIND_REQUESTS` sets the requests counted, default 3000, and `BENCH_WALLCLOCK=0`
//! runs only them).
//!
//! Then the cost model of the ABI: the probe module (`tests/probe-filter`) making N host calls of
//! one kind per request, each row against the probe making none, so that one run prices every call
//! kind meshtel makes or could make (`BENCH_PROBE_SECONDS`, default 6, per saturation run; no
//! fixed-rate run). `BENCH_ONLY=probe` runs only that table.

mod instructions;
mod probe;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use meshtel_tests::app::{App, Behavior};
use meshtel_tests::collector::Collector;
use meshtel_tests::envoy::{envoy_bin, Envoy, Proxy};
use meshtel_tests::mesh::{plugin_config, SidecarSpec};
use meshtel_tests::{repo_root, request};
use serde_json::{json, Value};

/// Requests per second of the fixed-rate latency run: moderate for 2 cores.
const FIXED_RATE: u64 = 400;
const FIXED_SECONDS: u64 = 5;

#[derive(Clone)]
enum Filter {
    None,
    Noop,
    Native,
    Meshtel(Value),
    /// meshtel built elsewhere (`BENCH_COMPARE_WASM`), with this config.
    Other(std::path::PathBuf, Value),
    /// The probe module (file name under target/wasm32-wasip1/release) with this config.
    Probe(&'static str, Value),
}

#[derive(Clone)]
struct Scenario {
    name: &'static str,
    filter: Filter,
    /// Request headers sent on top of wrk's own (`host`), `x-bench-NN: ...`.
    extra_headers: usize,
    /// Distinct callers cycled through (Istio's `x-envoy-peer-metadata` of `peer-I` workloads):
    /// this many live series. 0: no peer header.
    peers: usize,
    /// For probe rows: host calls made per request, and the row they are priced against.
    calls: usize,
    reference: &'static str,
    /// Also meshtel's TCP network filter in front of the HTTP connection manager, where Istio
    /// puts a NETWORK WasmPlugin (`meshtel render --tcp`).
    tcp_filter: bool,
    /// A new connection per request (`Connection: close`): the per-connection costs.
    close: bool,
}

impl Scenario {
    fn config(name: &'static str, filter: Filter) -> Self {
        Scenario { name, filter, extra_headers: 0, peers: 0, calls: 0, reference: "", tcp_filter: false, close: false }
    }

    fn is_probe(&self) -> bool {
        matches!(self.filter, Filter::Probe(..))
    }

    /// Whether every request makes a span (so that the spans received prove the row traced).
    fn traces_every_request(&self) -> bool {
        match &self.filter {
            Filter::Native => true,
            Filter::Meshtel(c) | Filter::Other(_, c) => {
                c["traces"]["enabled"].as_bool() != Some(false)
                    && c["traces"]["sampling_ratio"].as_f64().unwrap_or(1.0) >= 1.0
            }
            _ => false,
        }
    }

    /// Whether the fixed-rate latency run is made (not for the cost model and the series sweep).
    fn latency(&self) -> bool {
        !self.is_probe() && self.peers == 0
    }
}

/// The series sweep: metrics only, with this many distinct callers (live series).
fn sweep_scenarios(metrics_only: &Value) -> Vec<Scenario> {
    [(1, "series sweep: metrics only, 1 live series"), (100, "series sweep: metrics only, 100 live series")]
        .into_iter()
        .chain([
            (1000, "series sweep: metrics only, 1000 live series"),
            (2000, "series sweep: metrics only, 2000 live series"),
        ])
        .map(|(peers, name)| Scenario { peers, ..Scenario::config(name, Filter::Meshtel(metrics_only.clone())) })
        .collect()
}

/// A wrk script that sends each request as the next of `peers` distinct callers.
fn peers_script(peers: usize) -> std::path::PathBuf {
    let path = repo_root().join(format!("target/bench-peers-{peers}.lua"));
    let values: Vec<String> = (0..peers)
        .map(|i| format!("  \"{}\",", meshtel_tests::metrics::peer_metadata(&format!("peer-{i}"), "ns-peers")))
        .collect();
    let script = format!(
        "local peers = {{\n{}\n}}\nlocal i = 0\nrequest = function()\n  i = i % #peers + 1\n  return wrk.format(nil, nil, {{[\"x-envoy-peer-metadata\"] = peers[i]}})\nend\n",
        values.join("\n")
    );
    std::fs::write(&path, script).expect("write the wrk script");
    path
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

/// Run wrk with the scenario's request headers or callers; returns (requests, requests/s).
fn wrk(url: &str, seconds: u64, connections: u32, s: &Scenario) -> (u64, f64) {
    let close = s.close.then(|| ["-H".to_string(), "Connection: close".to_string()]);
    let headers = (0..s.extra_headers)
        .flat_map(|i| ["-H".to_string(), format!("x-bench-{i:02}: value-{i:02}")])
        .chain(close.into_iter().flatten());
    let script = (s.peers > 0).then(|| ["-s".to_string(), peers_script(s.peers).display().to_string()]);
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{connections}"), &format!("-d{seconds}s")])
        .args(headers)
        .args(script.into_iter().flatten())
        .arg(url)
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

/// The sidecar of scenario `s` in front of `app_port`, exporting to `collector_port`; and its
/// inbound port.
fn proxy_for(s: &Scenario, collector_port: u16, app_port: u16, concurrency: u32) -> (Proxy, u16) {
    let mut spec = SidecarSpec::new("a", "ns-a", app_port, collector_port).concurrency(concurrency);
    spec.plugin_config = None;
    match &s.filter {
        Filter::None | Filter::Native => {}
        Filter::Noop => {
            spec = spec.module(repo_root().join("target/wasm32-wasip1/release/meshtel_noop_filter.wasm"), "FAIL_OPEN");
            spec.plugin_config = Some(json!({}));
        }
        Filter::Meshtel(overrides) => spec.plugin_config = Some(plugin_config(overrides.clone())),
        Filter::Other(path, overrides) => {
            spec = spec.module(path.clone(), "FAIL_OPEN");
            spec.plugin_config = Some(plugin_config(overrides.clone()));
        }
        Filter::Probe(file, config) => {
            spec = spec.module(repo_root().join("target/wasm32-wasip1/release").join(file), "FAIL_OPEN");
            spec.plugin_config = Some(config.clone());
        }
    }
    let (mut proxy, inbound, _) = spec.proxy();
    if s.tcp_filter {
        let config = proxy.plugin_config.clone().unwrap_or_default();
        let wasm = proxy.wasm.clone().unwrap_or_else(meshtel_tests::envoy::wasm_path);
        for l in &mut proxy.listeners {
            l.network_filters.push(meshtel_tests::tcp::network_filter(&wasm, &config));
        }
    }
    if matches!(s.filter, Filter::Native) {
        proxy.native_tracer = Some(collector_port);
    }
    (proxy, inbound)
}

fn run(s: &Scenario, seconds: u64) -> Result {
    let collector = Collector::start_counting();
    let app = App::start(Behavior::Echo);
    let (proxy, inbound) = proxy_for(s, collector.port, app.port, 2);
    let envoy = Envoy::start(&proxy);
    let url = format!("http://127.0.0.1:{inbound}/bench");
    wrk(&url, 2, 16, s);
    let pid = envoy.pid();
    let perf = profile_start(pid, s.name, seconds);
    let cpu0 = cpu_seconds(pid);
    let (requests, rps) = wrk(&url, seconds, 32, s);
    let cpu = cpu_seconds(pid) - cpu0;
    profile_report(perf);
    let rss = rss_mb(pid);
    let (p50, p99) = if s.latency() { fixed_rate_latency(&url) } else { (0.0, 0.0) };
    if s.latency() {
        thread::sleep(Duration::from_secs(2));
    }
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
    let rounds_count: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let version = Command::new(envoy_bin())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let probe_seconds: u64 = std::env::var("BENCH_PROBE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    let scenarios = scenarios();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let scenarios: Vec<&Scenario> = scenarios
        .iter()
        .filter(|s| only.split('|').any(|o| s.name.contains(o)) || s.name.contains("baseline"))
        .collect();
    if std::env::var("BENCH_WALLCLOCK").as_deref() == Ok("0") {
        println!("Envoy: {version}");
        instructions::instruction_table(&scenarios);
        return;
    }
    eprintln!("benchmarking {} scenarios, {rounds_count} rounds ...", scenarios.len());
    // Rounds run every scenario in turn, so slow phases of a shared machine hit all of them alike;
    // each figure is the median over the rounds.
    let mut rounds: Vec<Vec<Result>> = vec![Vec::new(); scenarios.len()];
    for round in 1..=rounds_count {
        for (i, s) in scenarios.iter().enumerate() {
            eprintln!("  round {round}/{rounds_count}: {}", s.name);
            rounds[i].push(run(s, if s.is_probe() { probe_seconds } else { seconds }));
        }
    }
    let results: Vec<Result> = rounds.iter().map(|r| median(r)).collect();
    wallclock_table(&version, &results, &scenarios, seconds, rounds_count);
    if scenarios.iter().any(|s| s.is_probe()) {
        probe::cost_table(&scenarios, &results, probe_seconds);
    }
    if std::env::var("BENCH_CALLGRIND").as_deref() != Ok("0") {
        instructions::instruction_table(&scenarios);
    }
}

/// Every configuration: the baselines and meshtel's variants, the A/B build when
/// `BENCH_COMPARE_WASM` names one, the series sweep and the probe's cost model.
fn scenarios() -> Vec<Scenario> {
    let fast = json!({"export": {"flush_interval_ms": 1000}, "metrics": {"export_interval_ms": 10000}});
    let with = |extra: Value| {
        let mut v = fast.clone();
        meshtel_tests::mesh::merge(&mut v, extra);
        v
    };
    let scenarios = [
        Scenario::config("Envoy alone (baseline)", Filter::None),
        Scenario::config("no-op Wasm filter", Filter::Noop),
        Scenario::config("native OTel tracer, 100%", Filter::Native),
        Scenario::config("meshtel traces + metrics, 100%", Filter::Meshtel(with(json!({})))),
        Scenario::config("meshtel metrics only", Filter::Meshtel(with(json!({"traces": {"enabled": false}})))),
        Scenario::config(
            "meshtel metrics only, two UPSERTs (request_host, destination_port)",
            Filter::Meshtel(with(json!({"traces": {"enabled": false}, "metrics": {"overrides": [{"tag_overrides": {
                "request_host": {"value": "request.host"},
                "destination_port": {"value": "string(destination.port)"},
            }}]}}))),
        ),
        Scenario::config(
            "meshtel traces 1% + metrics",
            Filter::Meshtel(with(json!({"traces": {"sampling_ratio": 0.01}}))),
        ),
        Scenario::config(
            "meshtel traces + metrics, W3C only",
            Filter::Meshtel(with(json!({"traces": {"propagation": ["w3c"]}}))),
        ),
        Scenario::config(
            "meshtel traces + metrics, 100%, histograms: both",
            Filter::Meshtel(with(json!({"metrics": {"histograms": "both"}}))),
        ),
        Scenario::config(
            "meshtel traces + metrics + access logs",
            Filter::Meshtel(with(json!({"logs": {"enabled": true}}))),
        ),
        Scenario {
            tcp_filter: true,
            ..Scenario::config(
                "meshtel traces + metrics, 100%, + the TCP network filter on the HTTP chain",
                Filter::Meshtel(with(json!({}))),
            )
        },
        Scenario { close: true, ..Scenario::config("connection: close, Envoy alone", Filter::None) },
        Scenario {
            close: true,
            ..Scenario::config("connection: close, meshtel traces + metrics", Filter::Meshtel(with(json!({}))))
        },
        Scenario {
            close: true,
            tcp_filter: true,
            ..Scenario::config(
                "connection: close, meshtel traces + metrics + the TCP network filter",
                Filter::Meshtel(with(json!({}))),
            )
        },
    ];
    let mut scenarios = scenarios.to_vec();
    let (full, metrics_only) = (with(json!({})), with(json!({"traces": {"enabled": false}})));
    let compare = std::env::var("BENCH_COMPARE_WASM").ok();
    if let Some(path) = &compare {
        scenarios.extend(compared(path, &full, &metrics_only));
    }
    scenarios.extend(sweep_scenarios(&metrics_only));
    if let Some(path) = &compare {
        // The ends of the sweep for the other build too: the A/B of a change to the series path.
        for (peers, name) in [
            (1, "series sweep: BENCH_COMPARE_WASM, 1 live series"),
            (2000, "series sweep: BENCH_COMPARE_WASM, 2000 live series"),
        ] {
            let filter = Filter::Other(path.into(), metrics_only.clone());
            scenarios.push(Scenario { peers, ..Scenario::config(name, filter) });
        }
    }
    scenarios.extend(probe::probe_scenarios());
    scenarios
}

/// The A/B against another build of the filter (e.g. the previous commit's), in the same run:
/// traces + metrics, and metrics only.
fn compared(path: &str, full: &Value, metrics_only: &Value) -> [Scenario; 2] {
    [
        Scenario::config(
            "meshtel traces + metrics, 100%, BENCH_COMPARE_WASM",
            Filter::Other(path.into(), full.clone()),
        ),
        Scenario::config("meshtel metrics only, BENCH_COMPARE_WASM", Filter::Other(path.into(), metrics_only.clone())),
    ]
}

/// The wall-clock table: CPU per request over the baseline, throughput, latency, memory.
fn wallclock_table(version: &str, results: &[Result], scenarios: &[&Scenario], seconds: u64, rounds_count: usize) {
    let base = results[0].clone();
    let overhead_of = |prefix: &str| {
        results
            .iter()
            .find(|r| r.name.starts_with(prefix))
            .map_or(0.0, |r| r.cpu_us_per_request - base.cpu_us_per_request)
    };
    let native_overhead = overhead_of("native");
    let noop_overhead = overhead_of("no-op");
    println!("Envoy: {version}");
    println!("Machine: {} cores, {}; medians of {rounds_count} rounds; load: wrk -t2 -c32 -d{seconds}s on loopback, Envoy --concurrency 2, echo upstream; latency at {FIXED_RATE} req/s for {FIXED_SECONDS} s\n", num_cores(), cpu_model());
    println!("| configuration | Envoy CPU µs/request | overhead µs | / native overhead | / no-op overhead | req/s at saturation | p50 ms @{FIXED_RATE}/s | p99 ms | RSS MB | spans received |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let probe_names: Vec<&str> = scenarios.iter().filter(|s| s.is_probe()).map(|s| s.name).collect();
    for r in results.iter().filter(|r| !probe_names.contains(&r.name)) {
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

/// With `BENCH_PERF=1`, samples Envoy with `perf record` during the saturation run.
fn profile_start(pid: u32, name: &str, seconds: u64) -> Option<(std::process::Child, String)> {
    std::env::var_os("BENCH_PERF")?;
    let file = format!("target/perf-{}.data", name.split_whitespace().collect::<Vec<_>>().join("-"));
    let child = Command::new("perf")
        .args(["record", "-q", "-F", "2000", "-p", &pid.to_string(), "-o", &file, "--", "sleep"])
        .arg(seconds.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    Some((child, file))
}

/// Prints where Envoy's samples went: by shared object (JIT-compiled Wasm shows as `[JIT]` or
/// anonymous memory) and the top symbols.
fn profile_report(perf: Option<(std::process::Child, String)>) {
    let Some((mut child, file)) = perf else { return };
    let _ = child.wait();
    for sort in ["dso", "dso,sym"] {
        if let Ok(out) = Command::new("perf")
            .args(["report", "-i", &file, "--stdio", "--sort", sort, "--percent-limit", "1.5"])
            .output()
        {
            let text = String::from_utf8_lossy(&out.stdout);
            for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
                eprintln!("    {line}");
            }
        }
    }
}

/// Each figure's median over the rounds of one scenario.
fn median(rounds: &[Result]) -> Result {
    let m = |f: fn(&Result) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    Result {
        name: rounds.first().map_or("", |r| r.name),
        rps: m(|r| r.rps),
        cpu_us_per_request: m(|r| r.cpu_us_per_request),
        p50_ms: m(|r| r.p50_ms),
        p99_ms: m(|r| r.p99_ms),
        rss_mb: m(|r| r.rss_mb),
        spans: m(|r| r.spans as f64) as u64,
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
