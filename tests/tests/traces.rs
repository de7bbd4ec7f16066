//! Traces end to end: HTTP through real Envoy running meshtel, spans decoded at the receiver.

use std::collections::HashSet;
use std::thread;
use std::time::Duration;

use meshtel_tests::app::{App, Behavior};
use meshtel_tests::collector::{Collector, ReceivedSpan};
use meshtel_tests::envoy::Envoy;
use meshtel_tests::mesh::{gateway, plugin_config, Sidecar, SidecarSpec};
use meshtel_tests::{free_port, request};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// A sidecar in front of an echo app, exporting to `collector`.
fn echo_sidecar(collector: &Collector, config: Value) -> (App, Sidecar) {
    let app = App::start(Behavior::Echo);
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.port).config(config).start();
    (app, sidecar)
}

/// Send a request to the inbound listener; returns the headers the app received.
fn send(sidecar: &Sidecar, path: &str, headers: &[(&str, &str)]) -> Value {
    let (status, body) = request(&format!("http://127.0.0.1:{}{path}", sidecar.inbound), headers).expect("an answer");
    assert_eq!(status, 200, "{body}");
    let echoed: Value = serde_json::from_str(&body).expect("the echo app's JSON");
    echoed["headers"].clone()
}

fn header<'a>(headers: &'a Value, name: &str) -> &'a str {
    headers[name].as_str().unwrap_or_else(|| panic!("upstream got no {name}: {headers}"))
}

/// Send a sampled request with a fresh trace and wait for its span: every span recorded before
/// it by the same worker has been exported by then.
fn barrier(collector: &Collector, sidecar: &Sidecar) {
    let barrier_parent = "1111111111111111";
    send(sidecar, "/barrier", &[("traceparent", &format!("00-{}-{barrier_parent}-01", "b".repeat(32)))]);
    collector.wait_for_child_of(barrier_parent, WAIT);
}

fn kind(s: &ReceivedSpan) -> SpanKind {
    SpanKind::try_from(s.span.kind).expect("a known span kind")
}

#[test]
fn gateway_to_a_to_b_forms_one_trace() {
    let collector = Collector::start();
    let app_b = App::start(Behavior::Echo);
    let sidecar_b = SidecarSpec::new("b", "ns-b", app_b.port, collector.port).start();
    let a_outbound = free_port();
    let app_a = App::start(Behavior::Forward(a_outbound));
    let sidecar_a = SidecarSpec::new("a", "ns-a", app_a.port, collector.port)
        .outbound_port(a_outbound)
        .upstream("b.ns-b.svc.cluster.local", sidecar_b.inbound)
        .start();
    let gw = gateway("a.ns-a.svc.cluster.local", sidecar_a.inbound, collector.port, plugin_config(json!({})));

    let (status, body) = request(&format!("http://127.0.0.1:{}/checkout?cart=1", gw.port), &[]).unwrap();
    assert_eq!(status, 200, "{body}");
    let b_headers: Value = serde_json::from_str::<Value>(&body).unwrap()["headers"].clone();

    let spans = collector.wait_for_spans(4, WAIT);
    assert_eq!(spans.len(), 4);
    let by = |service: &str, k: SpanKind| {
        spans
            .iter()
            .find(|s| s.service() == service && kind(s) == k)
            .unwrap_or_else(|| panic!("no {k:?} span from {service}"))
    };
    let gw_span = by("istio-ingressgateway", SpanKind::Server);
    let a_server = by("a", SpanKind::Server);
    let a_client = by("a", SpanKind::Client);
    let b_server = by("b", SpanKind::Server);

    let trace = gw_span.trace_id();
    assert!(spans.iter().all(|s| s.trace_id() == trace), "one trace");
    assert_eq!(gw_span.parent_span_id(), "", "the gateway starts the trace");
    assert_eq!(a_server.parent_span_id(), gw_span.span_id());
    assert_eq!(a_client.parent_span_id(), a_server.span_id());
    assert_eq!(b_server.parent_span_id(), a_client.span_id());
    assert_eq!(
        header(&b_headers, "traceparent"),
        format!("00-{trace}-{}-01", b_server.span_id()),
        "B's app sees B's span as its parent"
    );

    assert_eq!(gw_span.resource_attr("k8s.namespace.name").as_deref(), Some("istio-system"));
    assert_eq!(a_server.resource_attr("service.version").as_deref(), Some("v1"));
    assert_eq!(a_server.resource_attr("k8s.pod.name").as_deref(), Some("a-v1-6d8f7c9b5-x2x7k"));
    assert_eq!(b_server.resource_attr("service.namespace").as_deref(), Some("ns-b"));
    assert_eq!(b_server.resource_attr("k8s.cluster.name").as_deref(), Some("Kubernetes"));
    assert_eq!(a_client.attr("upstream_cluster").as_deref(), Some("outbound|8080||b.ns-b.svc.cluster.local"));
    assert_eq!(a_client.attr("url.full").as_deref(), Some(&*format!("http://127.0.0.1:{a_outbound}/checkout")));
    assert_eq!(gw_span.attr("url.path").as_deref(), Some("/checkout"), "no query string");
    assert_eq!(gw_span.span.name, "GET", "the method alone by default, as the HTTP conventions ask");
    for s in &spans {
        assert_eq!(s.attr("http.response.status_code").as_deref(), Some("200"));
        assert_eq!(s.attr("istio.mesh_id").as_deref(), Some("cluster.local"));
        assert!(s.span.end_time_unix_nano >= s.span.start_time_unix_nano);
    }
    assert!(collector.requests().iter().all(|(path, ct)| path == "/v1/traces" && ct == "application/x-protobuf"));
}

#[test]
fn w3c_request_is_continued_and_leaves_with_both_formats() {
    let collector = Collector::start();
    let (_app, sidecar) = echo_sidecar(&collector, json!({}));
    let seen = send(
        &sidecar,
        "/w3c",
        &[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
        ],
    );
    let span = collector.wait_for_spans(1, WAIT).remove(0);
    assert_eq!((span.trace_id(), span.parent_span_id()), (TRACE.to_string(), PARENT.to_string()));
    assert_eq!(span.span.trace_state, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7");
    let own = span.span_id();
    assert_eq!(header(&seen, "traceparent"), format!("00-{TRACE}-{own}-01"));
    assert_eq!(header(&seen, "tracestate"), "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7");
    assert_eq!(header(&seen, "x-b3-traceid"), TRACE);
    assert_eq!(header(&seen, "x-b3-spanid"), own);
    assert_eq!(header(&seen, "x-b3-parentspanid"), PARENT);
    assert_eq!(header(&seen, "x-b3-sampled"), "1");
    assert_eq!(span.span.flags & 0x300, 0x300, "the parent is marked remote");
}

#[test]
fn b3_multi_header_request_is_continued_and_bridged_to_w3c() {
    let collector = Collector::start();
    let (_app, sidecar) = echo_sidecar(&collector, json!({}));
    let seen = send(&sidecar, "/b3", &[("x-b3-traceid", TRACE), ("x-b3-spanid", PARENT), ("x-b3-sampled", "1")]);
    let span = collector.wait_for_spans(1, WAIT).remove(0);
    assert_eq!((span.trace_id(), span.parent_span_id()), (TRACE.to_string(), PARENT.to_string()));
    let own = span.span_id();
    assert_eq!(header(&seen, "traceparent"), format!("00-{TRACE}-{own}-01"));
    assert_eq!(header(&seen, "x-b3-spanid"), own);
    assert_eq!(header(&seen, "x-b3-parentspanid"), PARENT);
}

#[test]
fn b3_single_header_request_is_continued_in_every_format() {
    let collector = Collector::start();
    let (_app, sidecar) = echo_sidecar(&collector, json!({}));
    let seen = send(&sidecar, "/b3single", &[("b3", &format!("{TRACE}-{PARENT}-1"))]);
    let span = collector.wait_for_spans(1, WAIT).remove(0);
    assert_eq!((span.trace_id(), span.parent_span_id()), (TRACE.to_string(), PARENT.to_string()));
    let own = span.span_id();
    assert_eq!(header(&seen, "b3"), format!("{TRACE}-{own}-1-{PARENT}"));
    assert_eq!(header(&seen, "traceparent"), format!("00-{TRACE}-{own}-01"));
    assert_eq!(header(&seen, "x-b3-traceid"), TRACE);
}

#[test]
fn b3_64_bit_trace_ids_are_widened() {
    let collector = Collector::start();
    let (_app, sidecar) = echo_sidecar(&collector, json!({}));
    let seen = send(
        &sidecar,
        "/b3-64",
        &[("x-b3-traceid", "a3ce929d0e0e4736"), ("x-b3-spanid", PARENT), ("x-b3-sampled", "1")],
    );
    let span = collector.wait_for_spans(1, WAIT).remove(0);
    assert_eq!(span.trace_id(), "0000000000000000a3ce929d0e0e4736");
    assert_eq!(header(&seen, "traceparent"), format!("00-0000000000000000a3ce929d0e0e4736-{}-01", span.span_id()));
}

#[test]
fn request_with_both_formats_yields_one_span_and_consistent_headers() {
    let collector = Collector::start();
    let (_app, sidecar) = echo_sidecar(&collector, json!({}));
    let seen = send(
        &sidecar,
        "/both",
        &[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", PARENT),
            ("x-b3-sampled", "1"),
        ],
    );
    barrier(&collector, &sidecar);
    let spans: Vec<_> = collector.spans().into_iter().filter(|s| s.trace_id() == TRACE).collect();
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].parent_span_id(), PARENT);
    let own = spans[0].span_id();
    assert_eq!(header(&seen, "traceparent"), format!("00-{TRACE}-{own}-01"));
    assert_eq!(header(&seen, "x-b3-spanid"), own);
}

#[test]
fn invalid_traceparent_starts_a_new_trace() {
    let collector = Collector::start();
    let (_app, sidecar) = echo_sidecar(&collector, json!({}));
    let upper = format!("00-{}-{PARENT}-01", TRACE.to_uppercase());
    let seen = send(&sidecar, "/invalid", &[("traceparent", &upper), ("tracestate", "a=1")]);
    let span = collector.wait_for_spans(1, WAIT).remove(0);
    assert_ne!(span.trace_id(), TRACE.to_lowercase());
    assert_eq!(span.parent_span_id(), "", "no parent from an invalid header");
    assert_eq!(header(&seen, "traceparent"), format!("00-{}-{}-01", span.trace_id(), span.span_id()));
    assert!(seen.get("tracestate").is_none(), "tracestate of a discarded parent is dropped: {seen}");
}

#[test]
fn unsampled_traceparent_propagates_without_a_span() {
    let collector = Collector::start();
    let (_app, sidecar) = echo_sidecar(&collector, json!({}));
    let seen = send(&sidecar, "/unsampled", &[("traceparent", &format!("00-{TRACE}-{PARENT}-00"))]);
    let tp = header(&seen, "traceparent");
    assert!(tp.starts_with(&format!("00-{TRACE}-")) && tp.ends_with("-00"), "{tp}");
    assert!(!tp.contains(PARENT), "our span id replaces the caller's");
    assert_eq!(header(&seen, "x-b3-sampled"), "0");
    barrier(&collector, &sidecar);
    assert!(collector.spans().iter().all(|s| s.trace_id() != TRACE), "no span for an unsampled request");
}

#[test]
fn sampling_ratio_zero_records_only_traces_sampled_upstream() {
    let collector = Collector::start();
    let (_app, sidecar) = echo_sidecar(&collector, json!({"traces": {"sampling_ratio": 0.0}}));
    for _ in 0..20 {
        let seen = send(&sidecar, "/new", &[]);
        assert!(header(&seen, "traceparent").ends_with("-00"), "new traces leave unsampled");
    }
    barrier(&collector, &sidecar);
    let spans = collector.spans();
    assert_eq!(spans.len(), 1, "only the barrier, sampled by its caller, is recorded");
    assert_eq!(spans[0].span.name, "GET");
}

#[test]
fn sampling_ratio_one_records_every_new_trace() {
    let collector = Collector::start();
    let (_app, sidecar) = echo_sidecar(&collector, json!({"traces": {"sampling_ratio": 1.0}}));
    let mut traces = HashSet::new();
    for _ in 0..20 {
        let seen = send(&sidecar, "/new", &[]);
        let tp = header(&seen, "traceparent");
        assert!(tp.ends_with("-01"));
        traces.insert(tp[3..35].to_string());
    }
    let spans = collector.wait_for_spans(20, WAIT);
    let got: HashSet<String> = spans.iter().map(ReceivedSpan::trace_id).collect();
    assert_eq!(got, traces, "one new trace per request, each recorded");
    // With metrics on, a server span's protocol and client address are the connection's,
    // read once per kept-alive connection: every request's span still has them.
    for s in &spans {
        assert_eq!(s.attr("network.protocol.version").as_deref(), Some("1.1"));
        assert_eq!(s.attr("client.address").as_deref(), Some("127.0.0.1"));
    }
}

#[test]
fn server_errors_and_upstream_failures_mark_spans() {
    let collector = Collector::start();
    let (_app, sidecar) = echo_sidecar(&collector, json!({}));
    let (status, _) = request(&format!("http://127.0.0.1:{}/status/503", sidecar.inbound), &[]).unwrap();
    assert_eq!(status, 503);
    let (status, _) = request(&format!("http://127.0.0.1:{}/status/404", sidecar.inbound), &[]).unwrap();
    assert_eq!(status, 404);
    let spans = collector.wait_for_spans(2, WAIT);
    let by_path = |p: &str| spans.iter().find(|s| s.attr("url.path").as_deref() == Some(p)).unwrap();
    let err = by_path("/status/503");
    assert_eq!(err.span.status.as_ref().unwrap().code, StatusCode::Error as i32);
    assert_eq!(err.attr("error.type").as_deref(), Some("503"));
    let not_found = by_path("/status/404");
    assert_eq!(not_found.span.status.as_ref().unwrap().code, StatusCode::Unset as i32, "4xx is not a server error");

    // An app that is down: Envoy answers 503 with the UF flag.
    let down = SidecarSpec::new("c", "ns-c", free_port(), collector.port).start();
    let (status, _) = request(&format!("http://127.0.0.1:{}/down", down.inbound), &[]).unwrap();
    assert_eq!(status, 503);
    let span = collector.wait_for_spans(3, WAIT).into_iter().find(|s| s.service() == "c").unwrap();
    assert_eq!(span.attr("response_flags").as_deref(), Some("UF"));
    assert_eq!(span.attr("error.type").as_deref(), Some("503"));
}

#[test]
fn outbound_requests_get_client_spans_with_4xx_errors() {
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let sidecar = SidecarSpec::new("a", "ns-a", free_port(), collector.port)
        .upstream("b.ns-b.svc.cluster.local", app.port)
        .start();
    let (status, _) = request(&format!("http://127.0.0.1:{}/status/404", sidecar.outbound), &[]).unwrap();
    assert_eq!(status, 404);
    let span = collector.wait_for_spans(1, WAIT).remove(0);
    assert_eq!(kind(&span), SpanKind::Client);
    assert_eq!(span.span.status.as_ref().unwrap().code, StatusCode::Error as i32);
    assert_eq!(span.attr("error.type").as_deref(), Some("404"));
    assert_eq!(span.attr("upstream_cluster").as_deref(), Some("outbound|8080||b.ns-b.svc.cluster.local"));
}

#[test]
fn two_workers_lose_no_span() {
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.port).concurrency(2).start();
    let (threads, per_thread) = (8, 50);
    let url = format!("http://127.0.0.1:{}/load", sidecar.inbound);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let url = url.clone();
            thread::spawn(move || (0..per_thread).map(|_| request(&url, &[])).collect::<Vec<_>>())
        })
        .collect();
    let answers: Vec<_> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let failed: Vec<_> = answers.iter().filter(|a| a.as_ref().map(|r| r.0) != Some(200)).collect();
    assert!(failed.is_empty(), "{failed:?}");
    let ok = answers.len();
    let spans = collector.wait_for_spans(ok, WAIT);
    thread::sleep(Duration::from_millis(300));
    let spans_now = collector.spans();
    assert_eq!(spans_now.len(), spans.len(), "no duplicates arrive later");
    let ids: HashSet<String> = spans_now.iter().map(ReceivedSpan::span_id).collect();
    assert_eq!(ids.len(), ok, "every request's span, each once");
    let exported = sidecar.envoy.stat("wasmcustom.meshtel.spans_exported");
    assert!(exported as usize <= ok);
}

#[test]
fn collector_down_costs_telemetry_not_requests() {
    let dead_collector = free_port();
    let app = App::start(Behavior::Echo);
    let sidecar =
        SidecarSpec::new("a", "ns-a", app.port, dead_collector).config(json!({"export": {"max_batch": 5}})).start();
    for i in 0..50 {
        let (status, _) = request(&format!("http://127.0.0.1:{}/req/{i}", sidecar.inbound), &[]).unwrap();
        assert_eq!(status, 200);
    }
    // Counters reach Envoy's stats on the tick after the change.
    let deadline = std::time::Instant::now() + WAIT;
    while sidecar.envoy.stat("wasmcustom.meshtel.export_failures") == 0
        || sidecar.envoy.stat("wasmcustom.meshtel.spans_recorded") < 50
    {
        assert!(std::time::Instant::now() < deadline, "no export failure counted");
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sidecar.envoy.stat("wasmcustom.meshtel.spans_recorded"), 50);
    assert_eq!(sidecar.envoy.stat("wasmcustom.meshtel.spans_exported"), 0);
    let log = sidecar.envoy.log();
    assert_eq!(log.matches("export failing").count(), 1, "one line per state change:\n{log}");
}

#[test]
fn invalid_plugin_config_is_refused_with_the_field_named() {
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let (proxy, _, _) = SidecarSpec::new("a", "ns-a", app.port, collector.port)
        .config(json!({"traces": {"sampling_ratio": 1.5}}))
        .proxy();
    let log = match Envoy::try_start(&proxy) {
        Err(log) => log,
        Ok(envoy) => envoy.log(),
    };
    assert!(
        log.contains("invalid pluginConfig, refused: traces.sampling_ratio: must be between 0 and 1, got 1.5"),
        "{log}"
    );
}

#[test]
fn collector_credentials_come_from_the_proxy_environment_and_are_never_logged() {
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let secret = "s3cret-token-for-the-collector";
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.port)
        .host_env("MESHTEL_TEST_API_KEY", secret)
        .config(json!({"collector": {
            "headers": {"x-tenant": "team-a"},
            "headers_from_env": {"x-api-key": "MESHTEL_TEST_API_KEY", "x-missing": "MESHTEL_TEST_UNSET"},
        }}))
        .start();
    send(&sidecar, "/", &[]);
    collector.wait_for_spans(1, WAIT);
    let headers = &collector.request_headers()[0];
    let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    assert_eq!(get("x-api-key"), Some(secret));
    assert_eq!(get("x-tenant"), Some("team-a"));
    assert_eq!(get("x-missing"), None);
    let log = sidecar.envoy.log();
    assert!(log.contains("MESHTEL_TEST_UNSET is not set"), "{log}");
    assert!(!log.contains(secret), "the secret leaked into the log");
}

#[test]
fn only_configured_headers_are_recorded_and_never_credentials_or_queries() {
    let collector = Collector::start();
    let (_app, sidecar) = echo_sidecar(&collector, json!({"traces": {"request_headers": ["x-tenant"]}}));
    send(
        &sidecar,
        "/account?session=topsecret-query",
        &[
            ("authorization", "Bearer topsecret-token"),
            ("cookie", "sid=topsecret-cookie"),
            ("x-tenant", "acme"),
            ("x-other", "not-recorded"),
        ],
    );
    let span = collector.wait_for_spans(1, WAIT).remove(0);
    let rendered = format!("{:?}", span.span);
    assert!(!rendered.contains("topsecret"), "a credential or query reached the span: {rendered}");
    assert!(!rendered.contains("not-recorded"));
    let tenant =
        span.span.attributes.iter().find(|kv| kv.key == "http.request.header.x-tenant").expect("the configured header");
    assert!(format!("{tenant:?}").contains("acme"));
    assert_eq!(span.attr("url.path").as_deref(), Some("/account"));

    let (proxy, _, _) = SidecarSpec::new("a", "ns-a", free_port(), collector.port)
        .config(json!({"traces": {"request_headers": ["authorization"]}}))
        .proxy();
    let log = match Envoy::try_start(&proxy) {
        Err(log) => log,
        Ok(envoy) => envoy.log(),
    };
    assert!(log.contains("traces.request_headers[0]: authorization is sensitive and can never be recorded"), "{log}");
}

#[test]
fn a_client_forces_a_trace_at_ratio_zero_unless_forcing_is_off() {
    for (force, sampled) in [(true, true), (false, false)] {
        let collector = Collector::start();
        let config = json!({"traces": {"sampling_ratio": 0.0, "force_headers": force}});
        let (_app, sidecar) = echo_sidecar(&collector, config);
        let seen = send(&sidecar, "/forced", &[("x-client-trace-id", "debug-42")]);
        let flag = if sampled { "-01" } else { "-00" };
        assert!(header(&seen, "traceparent").ends_with(flag), "force_headers {force}: {seen}");
        // Not internal: `x-envoy-force-trace` alone forces nothing (Envoy: internal requests only).
        let seen = send(&sidecar, "/not-internal", &[("x-envoy-force-trace", "true")]);
        assert!(header(&seen, "traceparent").ends_with("-00"), "{seen}");
        barrier(&collector, &sidecar);
        let names: Vec<String> = collector.spans().iter().map(|s| s.attr("url.path").unwrap_or_default()).collect();
        assert_eq!(names.contains(&"/forced".to_string()), sampled, "force_headers {force}: {names:?}");
        assert!(!names.contains(&"/not-internal".to_string()));
    }
}

#[test]
fn spans_are_named_by_method_route_or_path_as_configured() {
    use meshtel_tests::envoy::{Direction, Envoy, Listener, Node, Proxy};
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let name_of = |naming: &str, route: Option<&str>| {
        let port = meshtel_tests::free_port();
        let mut listener = Listener::new("virtualInbound", port, Direction::Inbound, "inbound|8080||");
        listener.route_name = route.map(Into::into);
        let config = meshtel_tests::mesh::plugin_config(json!({"traces": {"span_name": naming}}));
        let clusters = vec![
            meshtel_tests::envoy::Cluster::new("inbound|8080||", app.port),
            meshtel_tests::envoy::Cluster::to(meshtel_tests::envoy::COLLECTOR_CLUSTER, collector.port),
        ];
        let envoy = Envoy::start(&Proxy::new(Node::sidecar("a", "ns-a"), vec![listener], clusters, Some(config)));
        let parent = format!("{:016x}", port);
        let url = format!("http://127.0.0.1:{port}/items/42?q=1");
        assert_eq!(request(&url, &[("traceparent", &format!("00-{TRACE}-{parent}-01"))]).unwrap().0, 200);
        let span = collector.wait_for_child_of(&parent, WAIT);
        drop(envoy);
        (span.span.name.clone(), span.attr("http.route"))
    };
    assert_eq!(name_of("method", Some("reviews-v2")), ("GET".into(), None));
    assert_eq!(name_of("method_path", None), ("GET /items/42".into(), None));
    // A route's name is not a path template: never `http.route`.
    assert_eq!(name_of("method_route", Some("reviews-v2")), ("GET reviews-v2".into(), None));
    assert_eq!(name_of("method_route", Some("default")), ("GET".into(), None), "Istio's unnamed default route");
}

#[test]
fn tracestate_is_forwarded_as_the_current_w3c_draft_reads_it() {
    // W3C Trace Context Level 2: a key is `(lcalpha / DIGIT) 0*255(keychar)`, `@` among the
    // keychars; a duplicate key is the sender's fault, and the first member is kept.
    let collector = Collector::start();
    let (_app, sidecar) = echo_sidecar(&collector, json!({}));
    let long_key = format!("{}@{}", "t".repeat(100), "vendorsystemidlongerthan14");
    let state = format!("1tenant@sys=a,{long_key}=b,rojo=c,rojo=d");
    let seen = send(&sidecar, "/state", &[("traceparent", &format!("00-{TRACE}-{PARENT}-01")), ("tracestate", &state)]);
    assert_eq!(header(&seen, "tracestate"), format!("1tenant@sys=a,{long_key}=b,rojo=c"));
    let seen =
        send(&sidecar, "/state", &[("traceparent", &format!("00-{TRACE}-{PARENT}-01")), ("tracestate", "Bad=1")]);
    assert!(seen.get("tracestate").is_none(), "an invalid one is dropped: {seen}");
}

#[test]
fn malformed_trace_headers_leave_requests_unaffected() {
    let collector = Collector::start();
    let (_app, sidecar) = echo_sidecar(&collector, json!({}));
    let huge = "a".repeat(8 * 1024);
    let long_state: Vec<String> = (0..40).map(|i| format!("k{i}=v")).collect();
    let cases: Vec<Vec<(&str, String)>> = vec![
        vec![("traceparent", format!("00-{TRACE}-{PARENT}"))],
        vec![("traceparent", format!("00-{}-{PARENT}-01", TRACE.to_uppercase()))],
        vec![("traceparent", format!("00-{TRACE}-{PARENT}-01-extra"))],
        vec![("traceparent", format!("zz-{TRACE}-{PARENT}-01"))],
        vec![("traceparent", huge.clone())],
        vec![("traceparent", format!("00-{TRACE}-{PARENT}-01")), ("tracestate", long_state.join(","))],
        vec![("traceparent", format!("00-{TRACE}-{PARENT}-01")), ("tracestate", "a=1,a=2".into())],
        vec![("traceparent", format!("00-{TRACE}-{PARENT}-01")), ("tracestate", huge.clone())],
        vec![("b3", "garbage".into())],
        vec![("b3", format!("{TRACE}-{PARENT}-1-{PARENT}-extra"))],
        vec![("x-b3-traceid", "xyz".into()), ("x-b3-spanid", PARENT.into())],
        vec![("x-b3-traceid", TRACE.into())],
        vec![("x-b3-sampled", "maybe".into())],
        vec![("x-envoy-peer-metadata", "%%%".into())],
        vec![("x-envoy-peer-metadata", huge.clone())],
    ];
    for headers in &cases {
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let seen = send(&sidecar, "/malformed", &pairs);
        let tp = header(&seen, "traceparent");
        assert!(meshtel_filter::traces::trace_context::parse_traceparent(tp).is_some(), "{headers:?} left with {tp}");
    }
    // Repeated and non-UTF-8 values, which a client library will not send, over a raw socket.
    use std::io::{Read, Write};
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", sidecar.inbound)).unwrap();
    let mut bytes = format!("GET /raw HTTP/1.1\r\nhost: a\r\ntraceparent: 00-{TRACE}-{PARENT}-01\r\ntraceparent: 00-{TRACE}-{PARENT}-01\r\n").into_bytes();
    bytes.extend(b"tracestate: \xff\xfe\r\nb3: \xc3\x28\r\nconnection: close\r\n\r\n");
    raw.write_all(&bytes).unwrap();
    let mut answer = String::new();
    let _ = raw.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    barrier(&collector, &sidecar);
    assert_eq!(collector.spans().len(), cases.len() + 2, "every request still got its span");
}

/// Istio's `customTags` as Envoy applies them (envoyproxy/envoy
/// `source/common/tracing/custom_tag_impl.cc`): a literal always; an environment variable of the
/// proxy, else its default; a request header, else its default, and no tag when both are empty.
#[test]
fn custom_tags_are_set_on_spans_as_envoy_sets_istios() {
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let tags = json!({
        "zone": {"literal": {"value": "east-1"}},
        "pod": {"environment": {"name": "MESHTEL_TEST_POD", "default_value": "unknown"}},
        "node": {"environment": {"name": "MESHTEL_TEST_UNSET", "default_value": "no-node"}},
        "user": {"header": {"name": "x-user", "default_value": "anonymous"}},
        "tenant": {"header": {"name": "x-tenant"}},
    });
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.port)
        .config(json!({"traces": {"custom_tags": tags}}))
        .host_env("MESHTEL_TEST_POD", "a-v1-7d9f")
        .start();
    send(&sidecar, "/with", &[("x-user", "alice"), ("x-tenant", "t1")]);
    send(&sidecar, "/without", &[]);
    let spans = collector.wait_for_spans(2, WAIT);
    let with = spans.iter().find(|s| s.attr("url.path").as_deref() == Some("/with")).expect("the first span");
    let without = spans.iter().find(|s| s.attr("url.path").as_deref() == Some("/without")).expect("the second");
    for (span, user, tenant) in [(with, "alice", Some("t1")), (without, "anonymous", None)] {
        assert_eq!(span.attr("zone").as_deref(), Some("east-1"));
        assert_eq!(span.attr("pod").as_deref(), Some("a-v1-7d9f"), "the proxy's environment");
        assert_eq!(span.attr("node").as_deref(), Some("no-node"), "unset: the default");
        assert_eq!(span.attr("user").as_deref(), Some(user));
        assert_eq!(span.attr("tenant").as_deref(), tenant, "no header, no default: no tag");
    }
}
