//! Access logs in real Envoy: one OTLP log record per request (per `logs.mode`), decoded with
//! `opentelemetry-proto`, carrying the trace and span ids of the request's span and Istio's
//! access-log fields, under the same privacy rules as spans.

use std::collections::HashMap;
use std::time::Duration;

use meshtel_tests::app::{App, Behavior};
use meshtel_tests::collector::Collector;
use meshtel_tests::mesh::{Sidecar, SidecarSpec};
use meshtel_tests::request;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

fn sidecar(collector: &Collector, config: Value) -> (App, Sidecar) {
    let app = App::start(Behavior::Echo);
    let mut c = collector.protocol_config();
    meshtel_tests::mesh::merge(&mut c, config);
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.endpoint()).config(c).start();
    (app, sidecar)
}

fn get(sidecar: &Sidecar, path: &str, headers: &[(&str, &str)]) -> u16 {
    request(&format!("http://127.0.0.1:{}{path}", sidecar.inbound), headers).expect("an answer").0
}

#[test]
fn each_request_logs_with_its_spans_ids_and_istios_fields() {
    let collector = Collector::start();
    let (app, sidecar) = sidecar(&collector, json!({"logs": {"enabled": true}, "metrics": {"enabled": false}}));
    for i in 0..3 {
        let id = format!("req-{i}");
        assert_eq!(
            get(&sidecar, &format!("/items/{i}?token=secret"), &[("x-request-id", &id), ("user-agent", "t/1")]),
            200
        );
    }
    assert_eq!(get(&sidecar, "/status/503", &[]), 503);
    let logs = collector.wait_for_logs(4, WAIT);
    let spans = collector.wait_for_spans(4, WAIT);
    assert_eq!((logs.len(), spans.len()), (4, 4));
    let by_id: HashMap<String, _> = spans.iter().map(|s| (s.span_id(), s)).collect();
    for log in &logs {
        let span = by_id.get(&log.span_id()).unwrap_or_else(|| panic!("no span {} for {}", log.span_id(), log.body()));
        assert_eq!(log.trace_id(), span.trace_id());
        assert_eq!(log.record.flags & 1, 1, "sampled flag");
        assert_eq!(log.attr("url.path"), span.attr("url.path"));
        assert_eq!(log.attr("http.response.status_code"), span.attr("http.response.status_code"));
        assert_eq!(log.record.event_name, "meshtel.access_log");
        assert!(log.record.time_unix_nano > 0 && log.record.observed_time_unix_nano >= log.record.time_unix_nano);
        assert_eq!(log.attr("upstream_host"), Some(format!("127.0.0.1:{}", app.port)));
        assert!(
            log.attr("upstream_cluster").is_some_and(|c| c.starts_with("inbound|")),
            "{:?}",
            log.attr("upstream_cluster")
        );
        assert_eq!(log.attr("network.protocol.version").as_deref(), Some("1.1"));
        assert_eq!(log.attr("client.address").as_deref(), Some("127.0.0.1"));
        assert!(log.attr("http.response.body.size").and_then(|v| v.parse::<u64>().ok()).is_some_and(|n| n > 0));
        assert!(!format!("{:?}", log.record).contains("secret"), "no query string: {:?}", log.record);
    }
    let ok = logs.iter().find(|l| l.attr("request_id").as_deref() == Some("req-1")).expect("the log of req-1");
    assert_eq!(ok.attr("url.path").as_deref(), Some("/items/1"));
    assert_eq!(ok.attr("user_agent.original").as_deref(), Some("t/1"));
    assert_eq!((ok.record.severity_number, ok.record.severity_text.as_str()), (9, "INFO"));
    assert!(ok.body().starts_with("\"GET /items/1 HTTP/1.1\" 200 - 0 "), "{}", ok.body());
    assert!(ok.body().contains("\"req-1\""), "{}", ok.body());
    let failed = logs.iter().find(|l| l.attr("url.path").as_deref() == Some("/status/503")).expect("the 503");
    assert_eq!((failed.record.severity_number, failed.record.severity_text.as_str()), (17, "ERROR"));
    assert_eq!(failed.attr("error.type").as_deref(), Some("503"));
    let resource = |k: &str| failed.resource.iter().any(|kv| kv.key == k);
    assert!(resource("service.name") && resource("k8s.namespace.name"));
    assert_eq!(sidecar.envoy.stat("wasmcustom.meshtel.logs_recorded"), 4);
}

#[test]
fn errors_mode_logs_failures_only() {
    let collector = Collector::start();
    let config = json!({"logs": {"enabled": true, "mode": "errors"}, "traces": {"enabled": false}, "metrics": {"enabled": false}});
    let (_app, sidecar) = sidecar(&collector, config);
    for path in ["/ok", "/status/404", "/ok", "/status/500", "/status/201"] {
        get(&sidecar, path, &[]);
    }
    let logs = collector.wait_for_logs(2, WAIT);
    std::thread::sleep(Duration::from_millis(500));
    let mut codes: Vec<String> = collector.logs().iter().filter_map(|l| l.attr("http.response.status_code")).collect();
    codes.sort();
    assert_eq!(codes, ["404", "500"], "{:?}", logs.iter().map(|l| l.body()).collect::<Vec<_>>());
    assert!(collector.logs().iter().all(|l| l.trace_id().is_empty()), "tracing off: no ids");
    assert!(collector.spans().is_empty());
}

#[test]
fn sampled_mode_logs_only_sampled_requests() {
    let collector = Collector::start();
    let config = json!({"logs": {"enabled": true, "mode": "sampled"}, "traces": {"sampling_ratio": 0.0}, "metrics": {"enabled": false}});
    let (_app, sidecar) = sidecar(&collector, config);
    let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for _ in 0..3 {
        get(&sidecar, "/unsampled", &[]);
    }
    get(&sidecar, "/sampled", &[("traceparent", sampled)]);
    let logs = collector.wait_for_logs(1, WAIT);
    std::thread::sleep(Duration::from_millis(500));
    let logs = if collector.logs().len() > logs.len() { collector.logs() } else { logs };
    assert_eq!(logs.len(), 1, "{:?}", logs.iter().map(|l| l.body()).collect::<Vec<_>>());
    assert_eq!(logs[0].attr("url.path").as_deref(), Some("/sampled"));
    assert_eq!(logs[0].trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(collector.wait_for_spans(1, WAIT)[0].span_id(), logs[0].span_id());
}

#[test]
fn logs_keep_the_privacy_rules_of_spans() {
    let collector = Collector::start();
    let config =
        json!({"logs": {"enabled": true}, "traces": {"request_headers": ["x-tenant"]}, "metrics": {"enabled": false}});
    let (_app, sidecar) = sidecar(&collector, config);
    let headers = [("x-tenant", "blue"), ("authorization", "Bearer hunter2"), ("cookie", "session=hunter2")];
    get(&sidecar, "/p?password=hunter2", &headers);
    let log = &collector.wait_for_logs(1, WAIT)[0];
    let recorded = log.record.attributes.iter().find(|kv| kv.key == "http.request.header.x-tenant");
    assert!(format!("{recorded:?}").contains("blue"), "configured header recorded: {:?}", log.record.attributes);
    let all = format!("{:?}", log.record);
    assert!(!all.contains("hunter2") && !all.contains("password"), "{all}");
}

/// `logs.filter` as Envoy's CEL access-log filter decides, which is what Istio renders
/// `accessLogging[].filter.expression` to (envoyproxy/envoy
/// `source/extensions/access_loggers/filters/cel/cel.cc`): a request is logged when the expression
/// is `true`; an error (a header the request lacks) or `false` does not log.
#[test]
fn logs_filter_keeps_exactly_the_requests_it_selects() {
    let collector = Collector::start();
    let (_app, first) = sidecar(&collector, json!({"logs": {"enabled": true, "filter": "response.code >= 400"}}));
    for (path, code) in [("/ok", 200), ("/status/404", 404), ("/status/503", 503), ("/ok", 200)] {
        assert_eq!(get(&first, path, &[]), code);
    }
    // Spans of every request, logs of the selected ones: wait for the spans, then the logs.
    collector.wait_for_spans(4, WAIT);
    let logs = collector.wait_for_logs(2, WAIT);
    let mut codes: Vec<String> = logs.iter().filter_map(|l| l.attr("http.response.status_code")).collect();
    codes.sort();
    assert_eq!(codes, ["404", "503"]);

    let collector = Collector::start();
    let filter = "request.headers['x-debug'] == '1'";
    let (_app, second) = sidecar(&collector, json!({"logs": {"enabled": true, "filter": filter}}));
    let requests = [vec![("x-debug", "1")], vec![], vec![("x-debug", "0")], vec![("x-debug", "1")]];
    for (i, headers) in requests.into_iter().enumerate() {
        assert_eq!(get(&second, &format!("/r{i}"), &headers), 200);
    }
    collector.wait_for_spans(4, WAIT);
    let logs = collector.wait_for_logs(2, WAIT);
    let mut paths: Vec<String> = logs.iter().filter_map(|l| l.attr("url.path")).collect();
    paths.sort();
    assert_eq!(paths, ["/r0", "/r3"]);
    assert_eq!(
        second.envoy.wait_meshtel_stat("log_filter_errors", WAIT, |n| n >= 1),
        1,
        "the request without the header"
    );
    second.envoy.wait_log("logs.filter fails to evaluate for some requests", WAIT);
}

#[test]
fn a_logs_filter_envoy_cannot_compile_is_refused_with_the_expression() {
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let mut c = collector.protocol_config();
    meshtel_tests::mesh::merge(&mut c, json!({"logs": {"enabled": true, "filter": "response.code >>= 400"}}));
    let (proxy, _, _) = SidecarSpec::new("a", "ns-a", app.port, collector.endpoint()).config(c).proxy();
    let log = meshtel_tests::envoy::Envoy::try_start(&proxy).err().expect("Envoy refuses the plugin");
    assert!(log.contains("logs.filter: the proxy cannot compile \"response.code >>= 400\""), "{log}");
    assert!(log.contains("expr_create parse error"), "Envoy's own reason, in its log: {log}");
}
