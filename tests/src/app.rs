//! Stand-ins for the workloads behind the sidecars.

use std::sync::Arc;
use std::thread;

use serde_json::{json, Map, Value};
use tiny_http::{Header, Response, Server};

/// Headers an instrumented app forwards so that its outgoing call joins the trace.
pub const TRACE_HEADERS: &[&str] = &[
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-request-id",
];

/// What the app does with a request.
#[derive(Debug, Clone, Copy)]
pub enum Behavior {
    /// Answer with the request's headers as JSON; `/status/NNN` answers with status NNN.
    Echo,
    /// Call `http://127.0.0.1:<port><same path>` (its sidecar's outbound listener) with the
    /// trace headers, and answer with what came back.
    Forward(u16),
}

/// A running app on 127.0.0.1; stops when dropped.
pub struct App {
    /// Port it listens on.
    pub port: u16,
    server: Arc<Server>,
    workers: Vec<thread::JoinHandle<()>>,
}

impl App {
    /// Start an app with this behaviour on a free port.
    pub fn start(behavior: Behavior) -> App {
        let server = Arc::new(Server::http("127.0.0.1:0").expect("bind the app"));
        let port = server.server_addr().to_ip().expect("an IP address").port();
        let workers = (0..8)
            .map(|_| {
                let server = server.clone();
                thread::spawn(move || {
                    while let Ok(req) = server.recv() {
                        handle(req, behavior);
                    }
                })
            })
            .collect();
        App {
            port,
            server,
            workers,
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        for _ in &self.workers {
            self.server.unblock();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn handle(req: tiny_http::Request, behavior: Behavior) {
    let path = req.url().to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|h| {
            (
                h.field.as_str().as_str().to_ascii_lowercase(),
                h.value.as_str().to_string(),
            )
        })
        .collect();
    let (status, body) = match behavior {
        Behavior::Echo => {
            let status = path
                .strip_prefix("/status/")
                .and_then(|s| s.parse().ok())
                .unwrap_or(200);
            let mut map = Map::new();
            for (k, v) in &headers {
                map.insert(k.clone(), Value::String(v.clone()));
            }
            (status, json!({"path": path, "headers": map}).to_string())
        }
        Behavior::Forward(port) => {
            let forward: Vec<(&str, &str)> = headers
                .iter()
                .filter(|(k, _)| TRACE_HEADERS.contains(&k.as_str()))
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            match crate::request(&format!("http://127.0.0.1:{port}{path}"), &forward) {
                Some((status, body)) => (status, body),
                None => (502, "upstream call failed".to_string()),
            }
        }
    };
    let ct =
        Header::from_bytes(&b"content-type"[..], &b"application/json"[..]).expect("valid header");
    let _ = req.respond(
        Response::from_string(body)
            .with_status_code(status)
            .with_header(ct),
    );
}
