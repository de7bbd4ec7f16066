//! The stream context of the network filter (root id `meshtel-tcp`): counts a connection's
//! bytes and hands its open and close to the host-independent path ([`crate::telemetry::connection`]).

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, PeerType};

use super::host::{now_ns, ProxyHost};
use crate::telemetry::tcp::TcpConnection;
use crate::telemetry::Telemetry;

/// One downstream connection's context.
pub struct Tcp {
    id: u32,
    telemetry: Option<Rc<RefCell<Telemetry>>>,
    connection: Option<Rc<RefCell<TcpConnection>>>,
}

impl Tcp {
    pub fn new(id: u32, telemetry: Option<Rc<RefCell<Telemetry>>>) -> Self {
        Self { id, telemetry, connection: None }
    }

    fn count(&self, f: impl FnOnce(&mut TcpConnection)) {
        if let Some(Ok(mut c)) = self.connection.as_ref().map(|c| c.try_borrow_mut()) {
            f(&mut c);
        }
    }

    fn close(&mut self) {
        let (Some(telemetry), Some(connection)) = (&self.telemetry, self.connection.take()) else { return };
        let (Ok(mut t), Ok(mut c)) = (telemetry.try_borrow_mut(), connection.try_borrow_mut()) else { return };
        t.close_connection(&ProxyHost, self.id, &mut c);
    }
}

impl Context for Tcp {}

impl StreamContext for Tcp {
    fn on_new_connection(&mut self) -> Action {
        if let Some(Ok(mut t)) = self.telemetry.as_ref().map(|t| t.try_borrow_mut()) {
            self.connection = Some(t.open_connection(self.id, now_ns()));
        }
        Action::Continue
    }

    fn on_downstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        self.count(|c| c.received(data_size));
        Action::Continue
    }

    fn on_upstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        self.count(|c| c.sent(data_size));
        Action::Continue
    }

    // Istio counts the close on the downstream connection's close event (istio_stats.cc,
    // `onEvent`); the log callback is the fallback.
    fn on_downstream_close(&mut self, _peer_type: PeerType) {
        self.close();
    }

    fn on_log(&mut self) {
        self.close();
    }
}
