//! The README's first command runs this demo (`make demo` = build, then the `demo` binary): it
//! must finish, print the traces, the metric table and meshtel's counters, and leave nothing behind.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use meshtel_tests::collector::Collector;

fn demo() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_demo"));
    c.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT").stdin(Stdio::null());
    c
}

/// Envoy processes started by the demo with this pid (their bootstrap lives in a directory named after it).
fn envoys_of(pid: u32) -> Vec<String> {
    let marker = format!("meshtel-envoy-{pid}-");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&marker))
        .collect()
}

/// Ports from the line `proxies up: gateway :P, a :Q (outbound :R), b :S`.
fn ports(out: &str) -> Vec<u16> {
    let line = out.lines().find(|l| l.starts_with("proxies up:")).expect("the proxies line");
    line.split(':')
        .skip(1)
        .filter_map(|p| p.trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect()
}

fn wait_gone(pid: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !envoys_of(pid).is_empty() {
        assert!(std::time::Instant::now() < deadline, "Envoy left running: {:?}", envoys_of(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn demo_prints_traces_metrics_and_counters_and_cleans_up() {
    let child = demo().stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for expect in [
        "the collector received 20 spans in 5 traces",
        "GET /checkout                    SERVER  istio-ingressgateway",
        "└─ GET /checkout",
        "CLIENT  a",
        "SERVER  b",
        "error.type=503",
        "log INFO  \"GET /cart HTTP/1.1\" 200 - 0 ",
        "log ERROR \"GET /status/503 HTTP/1.1\" 503 - 0 ",
        "logs exported   5",
        "trace 80f198ee56343ba864fe8b2a57d3eff7",
        "istio_requests_total",
        "destination  istio-ingressgateway.istio-system  a-v1.ns-a                           200      3",
        "source       a-v1.ns-a                          b-v1.ns-b                           503      1",
        "p50",
        "meshtel's own counters",
        "done: every proxy and server the demo started is stopped.",
    ] {
        assert!(stdout.contains(expect), "missing {expect:?} in:\n{stdout}");
    }
    wait_gone(pid);
    let ports = ports(&stdout);
    assert_eq!(ports.len(), 4);
    for p in ports {
        assert!(TcpListener::bind(("127.0.0.1", p)).is_ok(), "port {p} still bound");
    }
}

#[test]
fn demo_exports_to_the_collector_otel_exporter_otlp_endpoint_names() {
    let collector = Collector::start();
    let out =
        demo().env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{}", collector.port)).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("sent 20 spans"), "{stdout}");
    assert_eq!(collector.wait_for_spans(20, Duration::from_secs(10)).len(), 20);
}

#[test]
fn killing_the_demo_stops_its_proxies() {
    let mut child = demo().stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().starts_with("proxies up:")), "the demo never started its proxies");
    assert!(!envoys_of(pid).is_empty());
    child.kill().unwrap();
    child.wait().unwrap();
    wait_gone(pid);
}
