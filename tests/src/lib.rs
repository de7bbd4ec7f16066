//! Test harness: real Envoy running meshtel's `.wasm`, stand-in apps, and an OTLP receiver.

pub mod app;
pub mod bootstrap;
pub mod callgrind;
pub mod collector;
pub mod envoy;
mod grpc;
pub mod istio;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod report;
pub mod server;
pub mod tcp;
pub mod tls;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A port free on 127.0.0.1 right now, and never handed out before in this process.
///
/// Tests run in parallel threads; the kernel may give two of them the same ephemeral port between
/// one's probe and its Envoy's bind, so ports are remembered here.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port =
            TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port");
        if given.insert(port) {
            return port;
        }
    }
}

fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(15)))
            .build()
            .into()
    })
}

/// GET `url` with extra headers; `(status, body)`, or `None` if no HTTP answer came.
pub fn request(url: &str, headers: &[(&str, &str)]) -> Option<(u16, String)> {
    let mut req = agent().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.call().ok()?;
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    Some((status, body))
}

/// POST `url` with an empty body.
pub fn http_post(url: &str) -> Option<(u16, String)> {
    let mut resp = agent().post(url).send_empty().ok()?;
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    Some((status, body))
}

/// GET `url`.
pub fn http_get(url: &str) -> Option<(u16, String)> {
    request(url, &[])
}
