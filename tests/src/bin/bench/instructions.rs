//! The same rows counted in instructions per request under callgrind, which do not move with the
//! machine's load.

use std::thread;
use std::time::{Duration, Instant};

use meshtel_tests::app::{App, Behavior};
use meshtel_tests::collector::Collector;
use meshtel_tests::envoy::Envoy;
use meshtel_tests::{callgrind, repo_root, request};

use super::{proxy_for, Scenario};

/// Instructions per request of one scenario under callgrind, and the spans its collector got.
struct Counted {
    name: &'static str,
    per_request: f64,
    spans: u64,
    requests: u64,
}

/// Count the instructions Envoy (one worker) executes for `requests` requests of scenario `s`,
/// sent one after another on one kept-alive connection after a warm-up, counters zeroed between.
/// A row that traces waits until its spans arrived: a row that traced nothing would price a
/// no-op (Envoy's native tracer samples nothing for a client's non-UUID `x-request-id`).
fn count_instructions(s: &Scenario, requests: u64) -> std::result::Result<Counted, String> {
    const WARMUP: u64 = 300;
    let collector = Collector::start_counting();
    let app = App::start(Behavior::Echo);
    let (mut proxy, inbound) = proxy_for(s, collector.port, app.port, 1);
    let dir = repo_root().join("target/callgrind").join(s.name.replace(|c: char| !c.is_ascii_alphanumeric(), "-"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    proxy.wrapper = callgrind::wrapper(&dir);
    let envoy = Envoy::try_start(&proxy)?;
    let url = format!("http://127.0.0.1:{inbound}/bench");
    let headers: Vec<(String, String)> =
        (0..s.extra_headers).map(|i| (format!("x-bench-{i:02}"), format!("value-{i:02}"))).collect();
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let send = |n: u64| -> std::result::Result<(), String> {
        for _ in 0..n {
            match request(&url, &headers) {
                Some((200, _)) => {}
                other => return Err(format!("{}: a request got {other:?}", s.name)),
            }
        }
        Ok(())
    };
    send(WARMUP)?;
    callgrind::zero(envoy.pid())?;
    send(requests)?;
    let total = callgrind::dump(envoy.pid(), &dir)?;
    let want = WARMUP + requests;
    if s.traces_every_request() {
        let deadline = Instant::now() + Duration::from_secs(60);
        while collector.counted_spans() < want && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(200));
        }
        if collector.counted_spans() < want {
            return Err(format!(
                "{}: {} spans for {want} requests: the row did not trace",
                s.name,
                collector.counted_spans()
            ));
        }
    }
    Ok(Counted {
        name: s.name,
        per_request: total as f64 / requests as f64,
        spans: collector.counted_spans(),
        requests: want,
    })
}

/// The instruction table: every configuration row (not the series sweep) and every call kind of
/// the probe, each against Envoy alone and the native tracer, the probe rows per call.
pub(super) fn instruction_table(scenarios: &[&Scenario]) {
    let requests: u64 = std::env::var("BENCH_CALLGRIND_REQUESTS").ok().and_then(|s| s.parse().ok()).unwrap_or(3_000);
    let rows: Vec<&Scenario> = scenarios.iter().copied().filter(|s| s.peers == 0).collect();
    let mut counted = Vec::new();
    for s in &rows {
        eprintln!("  callgrind: {}", s.name);
        match count_instructions(s, requests) {
            Ok(c) => counted.push(c),
            Err(e) => eprintln!("    skipped: {e}"),
        }
    }
    let per = |name: &str| counted.iter().find(|c| c.name == name).map(|c| c.per_request);
    let starts = |prefix: &str| counted.iter().find(|c| c.name.starts_with(prefix)).map(|c| c.per_request);
    let (Some(base), native) = (starts("Envoy alone"), starts("native")) else { return };
    let native_over = native.map(|n| n - base);
    println!("\nInstructions per request under callgrind (valgrind --tool=callgrind, Envoy --concurrency 1, {requests} requests on one kept-alive connection after 300 warm-up requests, counters zeroed in between; deterministic to ~0.3%):\n");
    println!(
        "| configuration | instructions/request | over Envoy alone | / native tracer's | spans received / requests |"
    );
    println!("|---|---|---|---|---|");
    for c in counted.iter().filter(|c| !rows.iter().any(|s| s.name == c.name && s.is_probe())) {
        let over = c.per_request - base;
        let share = native_over.filter(|n| *n > 0.0).map_or("-".into(), |n| format!("{:.2}", over / n));
        println!(
            "| {} | {:.1} k | {:+.1} k | {share} | {} / {} |",
            c.name,
            c.per_request / 1e3,
            over / 1e3,
            c.spans,
            c.requests
        );
    }
    if rows.iter().any(|s| s.is_probe()) {
        println!("\n| host call or callback (probe) | calls per request | instructions/request | over reference | per call | reference |");
        println!("|---|---|---|---|---|---|");
        for s in rows.iter().filter(|s| s.is_probe()) {
            let (Some(own), Some(reference)) = (per(s.name), per(s.reference)) else { continue };
            let over = own - reference;
            let each = if s.calls == 0 { "-".to_string() } else { format!("{:.2} k", over / s.calls as f64 / 1e3) };
            println!(
                "| {} | {} | {:.1} k | {:+.1} k | {each} | {} |",
                s.name.trim_start_matches("probe: "),
                s.calls,
                own / 1e3,
                over / 1e3,
                s.reference
            );
        }
    }
}
