//! The HTTP context: hands each callback to the host-independent request path
//! ([`crate::telemetry::request`]); nothing is decided here.

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::host::ProxyHost;
use crate::telemetry::{ActiveRequest, Telemetry};

/// One request's context.
pub struct Http {
    telemetry: Option<Rc<RefCell<Telemetry>>>,
    active: Option<ActiveRequest>,
}

impl Http {
    pub fn new(telemetry: Option<Rc<RefCell<Telemetry>>>) -> Self {
        Self { telemetry, active: None }
    }
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        #[cfg(feature = "test-trap")]
        if proxy_wasm::hostcalls::get_map_value(proxy_wasm::types::MapType::HttpRequestHeaders, "x-meshtel-test-trap")
            .ok()
            .flatten()
            .is_some()
        {
            core::arch::wasm32::unreachable();
        }
        if let Some(Ok(mut telemetry)) = self.telemetry.as_ref().map(|t| t.try_borrow_mut()) {
            self.active = telemetry.on_request_headers(&ProxyHost);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(Ok(mut telemetry)) = self.telemetry.as_ref().map(|t| t.try_borrow_mut()) {
            telemetry.on_log(&ProxyHost, self.active.take());
        }
    }
}
