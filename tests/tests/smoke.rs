use std::time::Duration;

use meshtel_tests::app::{App, Behavior};
use meshtel_tests::collector::{value_string, Collector};
use meshtel_tests::mesh::SidecarSpec;
use meshtel_tests::request;

#[test]
fn smoke() {
    let collector = Collector::start();
    let app = App::start(Behavior::Echo);
    let sidecar = SidecarSpec::new("a", "ns-a", app.port, collector.port).start();
    let (status, body) = request(&format!("http://127.0.0.1:{}/hello?x=1", sidecar.inbound), &[]).unwrap();
    println!("{status} {body}");
    let spans = collector.wait_for_spans(1, Duration::from_secs(10));
    let s = &spans[0];
    println!("{} kind={} flags={:x} status={:?}", s.span.name, s.span.kind, s.span.flags, s.span.status);
    for kv in &s.span.attributes { println!("  {} = {:?}", kv.key, value_string(&kv.value)); }
    println!("{}", sidecar.envoy.log());
}
