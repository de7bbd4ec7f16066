//! A fault inside the Wasm VM (a trap, as a bug would cause) costs telemetry, never traffic, under
//! the fail-open policy the installer renders; with FAIL_RELOAD telemetry comes back.
//! Uses the test-only build of the filter that traps on a request marked `x-meshtel-test-trap`.

use std::time::{Duration, Instant};

use meshtel::cli::RenderArgs;
use meshtel_tests::app::{App, Behavior};
use meshtel_tests::collector::Collector;
use meshtel_tests::envoy::trap_wasm_path;
use meshtel_tests::mesh::{Sidecar, SidecarSpec};
use meshtel_tests::request;

const WAIT: Duration = Duration::from_secs(15);

/// Envoy's policy for what `meshtel render` writes by default, mapped as Istio maps failStrategy.
fn rendered_failure_policy() -> &'static str {
    let opts = meshtel::options::render_options(&RenderArgs { namespaces: vec!["shop".into()], ..Default::default() })
        .unwrap();
    match opts.fail_strategy.as_str() {
        "FAIL_OPEN" => "FAIL_OPEN",
        "FAIL_CLOSE" => "FAIL_CLOSED",
        "FAIL_RELOAD" => "FAIL_RELOAD",
        other => panic!("unexpected failStrategy {other}"),
    }
}

fn status(sidecar: &Sidecar, path: &str, trap: bool) -> u16 {
    let headers: &[(&str, &str)] = if trap { &[("x-meshtel-test-trap", "1")] } else { &[] };
    request(&format!("http://127.0.0.1:{}{path}", sidecar.inbound), headers).map_or(0, |r| r.0)
}

fn start(collector: &Collector, policy: &'static str) -> (App, Sidecar) {
    let app = App::start(Behavior::Echo);
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.port)
        .config(serde_json::json!({"metrics": {"enabled": false}}))
        .module(trap_wasm_path(), policy)
        .start();
    (app, sidecar)
}

#[test]
fn a_vm_fault_costs_telemetry_not_traffic_under_the_rendered_policy() {
    let policy = rendered_failure_policy();
    assert_eq!(policy, "FAIL_OPEN", "the installer renders fail-open by default");
    let collector = Collector::start();
    let (_app, sidecar) = start(&collector, policy);
    for i in 0..3 {
        assert_eq!(status(&sidecar, &format!("/before/{i}"), false), 200);
    }
    collector.wait_for_spans(3, WAIT);
    // The request in flight when the VM faults gets Envoy's local 503; every later one goes through.
    assert_eq!(status(&sidecar, "/trap", true), 503, "the faulting request is answered");
    for i in 0..20 {
        assert_eq!(status(&sidecar, &format!("/after/{i}"), false), 200, "request {i} after the fault");
    }
    let log = sidecar.envoy.log();
    assert!(
        log.contains("proxy_on_request_headers failed: Uncaught RuntimeError: unreachable"),
        "the VM did fault:\n{log}"
    );
}

#[test]
fn fail_reload_brings_telemetry_back_after_a_vm_fault() {
    let collector = Collector::start();
    let (_app, sidecar) = start(&collector, "FAIL_RELOAD");
    assert_eq!(status(&sidecar, "/before", false), 200);
    collector.wait_for_spans(1, WAIT);
    assert_eq!(status(&sidecar, "/trap", true), 503, "the faulting request is answered");
    // Envoy reloads the VM (with backoff) on the next requests; until then it answers 503.
    let deadline = Instant::now() + WAIT;
    let (mut ok, mut refused) = (0, 0);
    loop {
        match status(&sidecar, &format!("/after/{}", ok + refused), false) {
            200 => ok += 1,
            503 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
        if collector.spans().iter().any(|s| s.attr("url.path").is_some_and(|p| p.starts_with("/after/"))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "telemetry did not come back ({ok} ok, {refused} refused):\n{}",
            sidecar.envoy.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("FAIL_RELOAD: {refused} request(s) refused before the VM came back");
    assert!(sidecar.envoy.stat("wasm.istio-system.meshtel.vm_reload_success") >= 1);
}
