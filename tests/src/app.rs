//! Stand-ins for the workloads behind the sidecars.

use serde_json::{json, Map, Value};

use crate::server::{HttpServer, Req, Resp};

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

/// Request header asking the echo app to answer with `x-envoy-peer-metadata` set to its value.
pub const PEER_METADATA_REQUEST: &str = "x-test-answer-peer-metadata";

/// What the app does with a request.
#[derive(Debug, Clone, Copy)]
pub enum Behavior {
    /// Answer with the request's headers as JSON; `/status/NNN` answers with status NNN;
    /// `/grpc/N` answers as a gRPC server with `grpc-status: N`; `/delay/MS` answers after MS
    /// milliseconds.
    Echo,
    /// Call `http://127.0.0.1:<port><same path>` (its sidecar's outbound listener) with the
    /// trace headers, and answer with what came back.
    Forward(u16),
}

/// A running app on 127.0.0.1; stops when dropped.
pub struct App {
    /// Port it listens on.
    pub port: u16,
    _server: HttpServer,
}

impl App {
    /// Start an app with this behaviour on a free port.
    pub fn start(behavior: Behavior) -> App {
        let server = HttpServer::start(move |req| handle(req, behavior));
        App { port: server.port, _server: server }
    }
}

fn handle(req: Req, behavior: Behavior) -> Resp {
    match behavior {
        Behavior::Echo => {
            if let Some(ms) = req.path.strip_prefix("/delay/").and_then(|s| s.parse().ok()) {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            let status = req.path.strip_prefix("/status/").and_then(|s| s.parse().ok()).unwrap_or(200);
            let mut map = Map::new();
            for (k, v) in &req.headers {
                map.insert(k.clone(), Value::String(v.clone()));
            }
            let mut resp = Resp::new(status, "application/json", json!({"path": req.path, "headers": map}).to_string());
            // `/grpc/<status>` answers like a gRPC server (trailers-only form: status in headers).
            if let Some(code) = req.path.strip_prefix("/grpc/") {
                resp.headers =
                    vec![("content-type".into(), "application/grpc".into()), ("grpc-status".into(), code.into())];
                resp.body.clear();
            }
            // Lets a test play an upstream sidecar that answers with its Istio peer metadata.
            if let Some(md) = req.header(PEER_METADATA_REQUEST) {
                resp.headers.push(("x-envoy-peer-metadata".into(), md.to_string()));
            }
            resp
        }
        Behavior::Forward(port) => {
            let forward: Vec<(&str, &str)> = req
                .headers
                .iter()
                .filter(|(k, _)| TRACE_HEADERS.contains(&k.as_str()))
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            match crate::request(&format!("http://127.0.0.1:{port}{}", req.path), &forward) {
                Some((status, body)) => Resp::new(status, "application/json", body),
                None => Resp::new(502, "text/plain", "upstream call failed"),
            }
        }
    }
}
