//! The local demo: an ingress gateway and two workloads (`a` calls `b`), each behind a real
//! Envoy running meshtel with the pluginConfig `meshtel render` produces; some traffic; and what
//! the collector received: traces as trees, Istio metrics as a table, meshtel's own counters.
//!
//! With `OTEL_EXPORTER_OTLP_ENDPOINT=http://HOST:PORT` (OTLP/HTTP) the proxies export there
//! instead of to the built-in receiver.

use std::time::Duration;

use meshtel::cli::{CollectorProtocol, RenderArgs};
use meshtel_tests::app::{App, Behavior};
use meshtel_tests::collector::Collector;
use meshtel_tests::envoy::{Endpoint, Envoy};
use meshtel_tests::mesh::{gateway_with, SidecarSpec};
use meshtel_tests::report::{print_metrics, print_traces};
use meshtel_tests::{free_port, request};
use serde_json::Value;

/// What the demo's proxies export more often than the defaults, so that it finishes in seconds.
const DEMO_CONFIG: &str = "logs: all\npluginConfig:\n  export: {flush_interval_ms: 200}\n  metrics: {export_interval_ms: 1000}\n  traces: {span_name: method_path}\n";

/// The pluginConfig `meshtel render <args> --config demo.yaml` puts in the WasmPlugin.
fn rendered_plugin_config(mut args: RenderArgs, config_file: &std::path::Path) -> Value {
    args.config = Some(config_file.to_path_buf());
    let opts = meshtel::options::render_options(&args).unwrap_or_else(|e| fail(&format!("meshtel render: {e}")));
    let resources = meshtel::render::resources(&opts).unwrap_or_else(|e| fail(&e));
    resources[0]["spec"]["pluginConfig"].clone()
}

fn fail(message: &str) -> ! {
    eprintln!("demo failed: {message}");
    std::process::exit(1)
}

/// The collector endpoint from `OTEL_EXPORTER_OTLP_ENDPOINT` (`http://host:port`), if set;
/// port 4317 means OTLP/gRPC, as the installer takes it.
fn external_collector() -> Option<Endpoint> {
    let url = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|u| !u.is_empty())?;
    let rest =
        url.strip_prefix("http://").unwrap_or_else(|| fail("OTEL_EXPORTER_OTLP_ENDPOINT must be http://HOST:PORT"));
    let (host, port) = rest.trim_end_matches('/').rsplit_once(':').unwrap_or((rest, "4318"));
    let port = port.parse().unwrap_or_else(|_| fail(&format!("bad port in OTEL_EXPORTER_OTLP_ENDPOINT: {url}")));
    Some(Endpoint { host: host.trim_matches(['[', ']']).to_string(), port, http2: port == 4317 })
}

fn main() {
    let dir = std::env::temp_dir().join(format!("meshtel-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(&e.to_string()));
    let config_file = dir.join("demo.yaml");
    std::fs::write(&config_file, DEMO_CONFIG).unwrap_or_else(|e| fail(&e.to_string()));
    run(&config_file);
    let _ = std::fs::remove_dir_all(&dir);
    println!("\ndone: every proxy and server the demo started is stopped.");
}

fn run(config_file: &std::path::Path) {
    println!("meshtel demo: ingress gateway -> a -> b, each proxy a real Envoy 1.40 running meshtel");
    let external = external_collector();
    let receiver = Collector::start();
    let collector: Endpoint = external.clone().unwrap_or_else(|| receiver.port.into());
    match &external {
        Some(e) => println!("exporting to the collector at {}:{} (OTEL_EXPORTER_OTLP_ENDPOINT)", e.host, e.port),
        None => println!("exporting to the built-in OTLP receiver on 127.0.0.1:{}", receiver.port),
    }
    let protocol = collector.http2.then_some(CollectorProtocol::Grpc);
    let sidecar_config = |ns: &str| {
        let args = RenderArgs { namespaces: vec![ns.into()], collector_protocol: protocol, ..Default::default() };
        rendered_plugin_config(args, config_file)
    };
    println!("pluginConfig of each proxy: meshtel render --namespace <ns> --config {}", config_file.display());

    let start = |what: &str| println!("starting {what} ...");
    start("app b and its sidecar");
    let app_b = App::start(Behavior::Echo);
    let mut spec_b = SidecarSpec::new("b", "ns-b", app_b.port, collector.clone()).exchange_metadata();
    spec_b.plugin_config = Some(sidecar_config("ns-b"));
    let sidecar_b = spec_b.start();
    start("app a (it calls b) and its sidecar");
    let a_outbound = free_port();
    let app_a = App::start(Behavior::Forward(a_outbound));
    let mut spec_a = SidecarSpec::new("a", "ns-a", app_a.port, collector.clone())
        .outbound_port(a_outbound)
        .upstream("b.ns-b.svc.cluster.local", sidecar_b.inbound)
        .exchange_metadata();
    spec_a.plugin_config = Some(sidecar_config("ns-a"));
    let sidecar_a = spec_a.start();
    start("the ingress gateway");
    let gateway_config = rendered_plugin_config(
        RenderArgs { gateway: true, metrics: true, collector_protocol: protocol, ..Default::default() },
        config_file,
    );
    let gw = gateway_with("a.ns-a.svc.cluster.local", sidecar_a.inbound, collector, gateway_config, None, true);
    println!(
        "proxies up: gateway :{}, a :{} (outbound :{}), b :{}\n",
        gw.port, sidecar_a.inbound, sidecar_a.outbound, sidecar_b.inbound
    );

    let paths = ["/checkout", "/cart", "/status/404", "/status/503", "/checkout"];
    let b3 = ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1");
    for (i, path) in paths.iter().enumerate() {
        let headers: &[(&str, &str)] = if i == 1 { &[b3] } else { &[] };
        let status = request(&format!("http://127.0.0.1:{}{path}", gw.port), headers).map_or(0, |r| r.0);
        println!("GET {path:<12} -> {status}{}", if i == 1 { "   (arrived with a B3 header)" } else { "" });
    }

    // Four proxies see each request: gateway, a inbound, a outbound, b inbound.
    let proxies_per_request = 4;
    let expected = paths.len() * proxies_per_request;
    let envoys = [("gateway", &gw.envoy), ("a", &sidecar_a.envoy), ("b", &sidecar_b.envoy)];
    if external.is_some() {
        wait_for_exports(&envoys, expected as u64);
        println!("\nsent {expected} spans and the Istio metrics to your collector: look for service.name a, b and istio-ingressgateway");
    } else {
        let spans = receiver.wait_for_spans(expected, Duration::from_secs(15));
        print_traces(spans, &receiver.wait_for_logs(expected, Duration::from_secs(15)));
        print_metrics(&receiver, expected as u64);
    }
    // Counters reach Envoy's stats on the next tick after the collector answered.
    std::thread::sleep(Duration::from_millis(500));
    println!("\nmeshtel's own counters (Envoy /stats, wasmcustom.meshtel.*):");
    for (name, envoy) in envoys {
        let stat = |s: &str| envoy.stat(&format!("wasmcustom.meshtel.{s}"));
        println!(
            "  {name:<8} spans recorded {:>3} exported {:>3} dropped {} failed {}   logs exported {:>3}   metric points exported {:>3}",
            stat("spans_recorded"),
            stat("spans_exported"),
            stat("spans_dropped"),
            stat("spans_failed"),
            stat("logs_exported"),
            stat("metric_points_exported"),
        );
    }
}

/// With an external collector, wait until the proxies report the spans exported (or failed).
fn wait_for_exports(envoys: &[(&str, &Envoy)], expected: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let done: u64 = envoys
            .iter()
            .map(|(_, e)| e.stat("wasmcustom.meshtel.spans_exported") + e.stat("wasmcustom.meshtel.spans_failed"))
            .sum();
        if done >= expected || std::time::Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
