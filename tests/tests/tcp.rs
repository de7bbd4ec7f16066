//! Istio's TCP metrics from the network filter (root id `meshtel-tcp`) in real Envoy 1.40, on
//! listeners shaped like Istio's inbound and outbound TCP chains. The expectations are those of
//! istio/proxy's `TestTCPMetadataExchange` (`test/envoye2e/tcp_metadata_exchange/`, golden files
//! `testdata/metric/tcp_*.yaml.tmpl`): `received` counts what the downstream peer sent, `sent`
//! what it got, both without the exchange's own bytes; the label rules are checked against those
//! golden files through the host seam (`filter/src/telemetry/connection.rs`), since upstream Envoy has no
//! Istio metadata exchange to produce the peer here.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use meshtel_tests::app::{App, Behavior};
use meshtel_tests::collector::Collector;
use meshtel_tests::envoy::{wasm_path, Cluster, Direction, Envoy, Listener, Node, Proxy, COLLECTOR_CLUSTER};
use meshtel_tests::free_port;
use meshtel_tests::mesh::plugin_config;
use meshtel_tests::metrics::{series, Point};
use meshtel_tests::tcp::{exchange, exchange_done, network_filter, tcp_listener, TcpApp, GREETING};
use serde_json::{json, Value};

const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";
const SENT: &str = "istio_tcp_sent_bytes_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";

/// What the test proxy serves.
struct TcpProxy {
    envoy: Envoy,
    /// Inbound TCP (`inbound|9000||` to the app, Istio's exchange done).
    inbound: u16,
    /// Outbound TCP to `db.default.svc.cluster.local`.
    outbound: u16,
    /// Outbound TCP to a cluster whose endpoint refuses connections.
    refused: u16,
    /// Outbound TCP listeners to five more services, for the cardinality cap.
    services: Vec<u16>,
    /// An HTTP listener with the network filter in front of its connection manager.
    http: u16,
    _web: App,
}

fn config(overrides: Value) -> Value {
    let mut c = plugin_config(json!({"metrics": {"export_interval_ms": 1000}}));
    meshtel_tests::mesh::merge(&mut c, overrides);
    c
}

fn start(collector: &Collector, app: &TcpApp, concurrency: u32, plugin: Value) -> TcpProxy {
    let wasm = wasm_path();
    let filters = || vec![exchange_done(), network_filter(&wasm, &plugin)];
    let (inbound, outbound, refused, http) = (free_port(), free_port(), free_port(), free_port());
    let services: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let closed_port = free_port();
    let web = App::start(Behavior::Echo);
    let mut raw = vec![
        tcp_listener("inbound_tcp", inbound, Direction::Inbound, "inbound|9000||", filters()),
        tcp_listener(
            "outbound_db",
            outbound,
            Direction::Outbound,
            "outbound|5432||db.default.svc.cluster.local",
            filters(),
        ),
        tcp_listener(
            "outbound_refused",
            refused,
            Direction::Outbound,
            "outbound|5432||gone.default.svc.cluster.local",
            filters(),
        ),
    ];
    let mut clusters = vec![
        Cluster::new("inbound|9000||", app.port).istio_service("ratings.default.svc.cluster.local", false),
        Cluster::new("outbound|5432||db.default.svc.cluster.local", app.port)
            .istio_service("db.default.svc.cluster.local", true),
        Cluster::new("outbound|5432||gone.default.svc.cluster.local", closed_port)
            .istio_service("gone.default.svc.cluster.local", false),
        Cluster::to(COLLECTOR_CLUSTER, collector.endpoint()),
        Cluster::new("outbound|8080||web.default.svc.cluster.local", web.port),
    ];
    for (i, port) in services.iter().enumerate() {
        let name = format!("outbound|5432||svc{i}.default.svc.cluster.local");
        raw.push(tcp_listener(&format!("outbound_svc{i}"), *port, Direction::Outbound, &name, filters()));
        clusters.push(Cluster::new(&name, app.port).istio_service(&format!("svc{i}.default.svc.cluster.local"), true));
    }
    // An HTTP chain: Istio puts a NETWORK WasmPlugin in front of the connection manager too.
    let mut http_listener =
        Listener::new("0.0.0.0_8080", http, Direction::Outbound, "outbound|8080||web.default.svc.cluster.local");
    http_listener.network_filters = vec![network_filter(&wasm, &plugin)];
    // And the HTTP filter on it, as `meshtel render` deploys the two: one module, two roots.
    let mut proxy =
        Proxy::new(Node::sidecar("ratings", "default"), vec![http_listener], clusters, Some(plugin.clone()));
    proxy.raw_listeners = raw;
    proxy.concurrency = concurrency;
    TcpProxy { envoy: Envoy::start(&proxy), inbound, outbound, refused, services, http, _web: web }
}

/// The current value of each TCP metric for the series whose labels match `filter`.
fn totals(points: &[Point], filter: impl Fn(&Point) -> bool) -> [u64; 4] {
    [OPENED, CLOSED, SENT, RECEIVED].map(|m| series(points, m).iter().filter(|p| filter(p)).map(|p| p.value).sum())
}

fn wait_for(collector: &Collector, what: &str, ok: impl Fn(&[Point]) -> bool) -> Vec<Point> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let points = collector.points();
        if ok(&points) {
            return points;
        }
        assert!(Instant::now() < deadline, "{what}: never; TCP series:\n{:#?}", tcp_series(&points));
        thread::sleep(Duration::from_millis(50));
    }
}

fn tcp_series(points: &[Point]) -> Vec<(String, u64, BTreeMap<String, String>)> {
    [OPENED, CLOSED, SENT, RECEIVED]
        .iter()
        .flat_map(|m| series(points, m))
        .map(|p| (p.metric.clone(), p.value, p.labels.clone()))
        .collect()
}

fn reporter(r: &'static str) -> impl Fn(&Point) -> bool {
    move |p| p.label("reporter") == r
}

#[test]
fn exact_bytes_and_connections_on_the_inbound_and_outbound_chains() {
    let collector = Collector::start();
    let app = TcpApp::start();
    let proxy = start(&collector, &app, 1, config(json!({})));
    for _ in 0..10 {
        assert_eq!(exchange(proxy.inbound, b"world\n"), b"hello world\n");
        assert_eq!(exchange(proxy.outbound, b"world\n"), b"hello world\n");
    }
    // As Istio's golden files: 10 connections, 60 bytes received, 120 sent, on each side.
    let points = wait_for(&collector, "both sides", |p| {
        totals(p, reporter("destination")) == [10, 10, 120, 60] && totals(p, reporter("source")) == [10, 10, 120, 60]
    });
    let inbound = series(&points, SENT).into_iter().find(|p| p.label("reporter") == "destination").unwrap();
    let l = |k: &str| inbound.label(k).to_string();
    assert_eq!(inbound.labels.len(), 23, "Istio's TCP label set: {:?}", inbound.labels);
    assert!(!inbound.labels.contains_key("response_code") && !inbound.labels.contains_key("grpc_response_status"));
    assert_eq!((l("request_protocol"), l("response_flags")), ("tcp".into(), "-".into()));
    assert_eq!(
        (l("destination_workload"), l("destination_service")),
        ("ratings-v1".into(), "ratings.default.svc.cluster.local".into())
    );
    assert_eq!((l("source_workload"), l("connection_security_policy")), ("unknown".into(), "none".into()));
    let outbound = series(&points, SENT).into_iter().find(|p| p.label("reporter") == "source").unwrap();
    // The peer from the endpoint's `istio.workload` metadata, as Istio's client side falls back.
    assert_eq!(outbound.label("destination_workload"), "db-v1");
    assert_eq!(outbound.label("destination_service_name"), "db");
    assert_eq!(outbound.label("source_workload"), "ratings-v1");
    assert_eq!(outbound.label("connection_security_policy"), "unknown");
    assert_eq!(outbound.unit, "By");
}

#[test]
fn a_long_lived_connection_reports_its_bytes_before_it_closes() {
    let collector = Collector::start();
    let app = TcpApp::start();
    let proxy = start(&collector, &app, 1, config(json!({})));
    let mut s = TcpStream::connect(("127.0.0.1", proxy.inbound)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = vec![0u8; GREETING.len() + 4];
    for round in 1..=3u64 {
        s.write_all(b"ping").unwrap();
        s.read_exact(&mut answer).unwrap();
        // Counted while the connection is open: opened once, no close, the bytes so far.
        wait_for(&collector, &format!("round {round} while open"), |p| {
            totals(p, reporter("destination")) == [1, 0, 10 * round, 4 * round]
        });
        thread::sleep(Duration::from_millis(1500));
    }
    drop(s);
    wait_for(&collector, "the close", |p| totals(p, reporter("destination")) == [1, 1, 30, 12]);
}

#[test]
fn a_refused_upstream_is_counted_with_uf() {
    let collector = Collector::start();
    let app = TcpApp::start();
    let proxy = start(&collector, &app, 1, config(json!({})));
    for _ in 0..3 {
        let mut s = TcpStream::connect(("127.0.0.1", proxy.refused)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)), "Envoy closes the connection");
    }
    let points =
        wait_for(&collector, "refused", |p| totals(p, |p| p.label("destination_service_name") == "gone")[1] == 3);
    let closed = series(&points, CLOSED).into_iter().find(|p| p.label("destination_service_name") == "gone").unwrap();
    assert!(closed.label("response_flags").split(',').any(|f| f == "UF"), "{:?}", closed.labels);
    assert_eq!(totals(&points, |p| p.label("destination_service_name") == "gone"), [3, 3, 0, 0]);
}

#[test]
fn two_workers_add_up_to_exact_totals() {
    let collector = Collector::start();
    let app = TcpApp::start();
    let proxy = start(&collector, &app, 2, config(json!({})));
    let port = proxy.outbound;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(move || {
                for _ in 0..25 {
                    assert_eq!(exchange(port, b"0123456789"), b"hello 0123456789");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    wait_for(&collector, "100 connections", |p| totals(p, reporter("source")) == [100, 100, 1600, 1000]);
}

#[test]
fn a_burst_of_connections_holds_the_cardinality_cap() {
    let collector = Collector::start();
    let app = TcpApp::start();
    let proxy = start(&collector, &app, 1, config(json!({"metrics": {"max_series": 2}})));
    for round in 0..4 {
        for port in &proxy.services {
            assert_eq!(exchange(*port, &[b'a' + round; 5]), [GREETING, &[b'a' + round; 5]].concat());
        }
    }
    let points = wait_for(&collector, "all 20", |p| totals(p, |_| true)[1] == 20);
    let labelled = series(&points, CLOSED).iter().filter(|p| !p.labels.contains_key("otel.metric.overflow")).count();
    assert_eq!(labelled, 2, "max_series labelled series, the rest in the overflow series");
    assert_eq!(totals(&points, |_| true), [20, 20, 220, 100], "nothing lost");
    assert!(proxy.envoy.stat("wasmcustom.meshtel.metric_overflow") > 0);
}

#[test]
fn the_network_filter_on_an_http_chain_reports_no_tcp_metrics() {
    let collector = Collector::start();
    let app = TcpApp::start();
    let proxy = start(&collector, &app, 1, config(json!({})));
    let url = format!("http://127.0.0.1:{}/", proxy.http);
    for _ in 0..5 {
        assert_eq!(meshtel_tests::request(&url, &[]).map(|r| r.0), Some(200));
    }
    // The HTTP filter beside it counts the requests as ever.
    wait_for(&collector, "the HTTP requests", |p| {
        meshtel_tests::metrics::total(p, "istio_requests_total", |_| true) == 5
    });
    // A TCP connection afterwards is counted: the filter works, and had the time to report.
    assert_eq!(exchange(proxy.outbound, b"x"), b"hello x");
    let points = wait_for(&collector, "the TCP connection", |p| totals(p, |_| true)[1] >= 1);
    thread::sleep(Duration::from_millis(1500));
    let points = if collector.points().len() > points.len() { collector.points() } else { points };
    assert_eq!(totals(&points, |_| true), [1, 1, 7, 1], "only the TCP connection: {:#?}", tcp_series(&points));
}
