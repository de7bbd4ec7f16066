//! The HTTP context: decide and propagate the trace on request headers, record the span on log.

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use super::host::{self, property_string, property_u64};
use crate::propagation::HeaderOp;
use crate::response_flags;
use crate::span::{span_kind, Completion};
use crate::telemetry::{ActiveRequest, Telemetry};

/// One request's context.
pub struct Http {
    telemetry: Option<Rc<RefCell<Telemetry>>>,
    active: Option<ActiveRequest>,
}

impl Http {
    pub fn new(telemetry: Option<Rc<RefCell<Telemetry>>>) -> Self {
        Self {
            telemetry,
            active: None,
        }
    }
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(shared) = &self.telemetry else {
            return Action::Continue;
        };
        let headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
        let now = host::now_ns();
        let started = match shared.try_borrow_mut() {
            Ok(mut telemetry) => telemetry.start_request(&headers, now),
            Err(_) => None,
        };
        let Some((active, ops)) = started else {
            return Action::Continue;
        };
        for op in ops {
            // A header the proxy refuses to change costs propagation, never the request.
            let _ = match op {
                HeaderOp::Set(name, value) => {
                    hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(&value))
                }
                HeaderOp::Remove(name) => {
                    hostcalls::remove_map_value(MapType::HttpRequestHeaders, name)
                }
            };
        }
        self.active = Some(active);
        Action::Continue
    }

    fn on_log(&mut self) {
        let (Some(shared), Some(active)) = (&self.telemetry, self.active.take()) else {
            return;
        };
        if !active.trace.sampled {
            return;
        }
        let Ok(mut telemetry) = shared.try_borrow_mut() else {
            return;
        };
        let cluster = property_string(&["xds", "cluster_name"]);
        let direction = property_u64(&["xds", "listener_direction"]);
        let completion = Completion {
            end_unix_nanos: host::now_ns(),
            status_code: property_u64(&["response", "code"])
                .and_then(|c| u32::try_from(c).ok())
                .unwrap_or(0),
            response_flags: response_flags::short_string(
                property_u64(&["response", "flags"]).unwrap_or(0),
            ),
            kind: span_kind(telemetry.node(), direction, cluster.as_deref()),
            upstream_cluster: cluster,
            protocol: property_string(&["request", "protocol"]),
            client_address: property_string(&["source", "address"]),
        };
        telemetry.finish_request(active, completion);
    }
}
