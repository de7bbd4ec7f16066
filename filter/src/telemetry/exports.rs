//! The export side of [`Telemetry`], off the request path: the next call to make, the answers,
//! and what a root context hands over when it ends (see [`crate::export::handoff`]).

use super::Telemetry;
use crate::export::handoff;
use crate::export::{Outcome, Payload, Sender};
use crate::metrics::shared::SharedStore;
use crate::otlp;

impl Telemetry {
    /// Create the proxy-wide shared entries if this is the first VM, and find the queues.
    pub fn init_shared(&mut self, store: &dyn SharedStore) {
        self.handoff_queue(store);
        if let Some(m) = &mut self.metrics {
            m.init_shared(store);
        }
    }

    /// The hand-over queue, asked of the proxy until it gives it.
    fn handoff_queue(&mut self, store: &dyn SharedStore) -> Option<u32> {
        if self.handoff.is_none() {
            self.handoff = store.queue(&self.handoff_name);
        }
        self.handoff
    }

    /// The root context is done (a new `pluginConfig` or module replaced it, or the proxy
    /// stops): everything not sent yet (queued spans and access logs, retries, the metrics'
    /// last export or deltas: [`crate::metrics::MetricsPipeline::shutdown`]) goes to the hand-over queue for
    /// the root contexts that go on; from then on this one sends nothing new, and a call that
    /// fails is handed over too instead of retried. Call it again after each answer. Returns
    /// whether no call is in flight any more, i.e. the root context may be deleted.
    ///
    /// When the whole VM ends (`vm_ends`: no other root context lives in it, as when a new
    /// module replaced it), Envoy cancels its calls in flight whether or not the collector got
    /// them: copies of them are handed over too, so that they are sent at least once, as
    /// OTLP's retries are (a batch may then arrive twice).
    pub fn shutdown(&mut self, store: &dyn SharedStore, now_ns: u64, vm_ends: bool) -> bool {
        let mut unsent = Vec::new();
        if vm_ends {
            unsent.extend(self.spans.sender.in_flight_payloads());
            unsent.extend(self.logs.sender.in_flight_payloads());
            if let Some(m) = &mut self.metrics {
                unsent.extend(m.sender().in_flight_payloads());
            }
        }
        if !self.ending {
            self.ending = true;
            let max_batch = self.config.export.max_batch;
            let encoder = &self.encoder;
            unsent.extend(self.spans.drain(max_batch, |batch| encoder.encode(batch)));
            let encoder = &self.log_encoder;
            unsent.extend(self.logs.drain(max_batch, |batch| encoder.encode(batch)));
            if let Some(m) = &mut self.metrics {
                unsent.extend(m.shutdown(store, now_ns));
            }
        }
        // Retries, now and after each answer (the metrics' own were settled by their shutdown).
        unsent.extend(self.spans.sender.take_waiting());
        unsent.extend(self.logs.sender.take_waiting());
        if let Some(m) = &mut self.metrics {
            unsent.extend(m.sender().take_waiting());
        }
        let queue = self.handoff_queue(store);
        for payload in unsent {
            if queue.is_some_and(|q| store.enqueue(q, &handoff::encode(&payload)).is_ok()) {
                self.handed_over += 1;
            } else {
                self.sender_for(payload.signal).lost(payload.items);
            }
        }
        vm_ends || self.in_flight() == 0
    }

    fn in_flight(&mut self) -> usize {
        let metrics = self.metrics.as_mut().map_or(0, |m| m.sender().in_flight());
        self.spans.sender.in_flight() + self.logs.sender.in_flight() + metrics
    }

    /// Take what root contexts that ended handed over, while every sender has room for it:
    /// it is sent like a retry due now.
    fn take_handed_over(&mut self, store: &dyn SharedStore, now_ns: u64) {
        let Some(queue) = self.handoff_queue(store) else { return };
        loop {
            let metrics_room = self.metrics.as_mut().is_none_or(|m| m.sender().can_adopt());
            if !(self.spans.sender.can_adopt() && self.logs.sender.can_adopt() && metrics_room) {
                return;
            }
            let Some(bytes) = store.dequeue(queue) else { return };
            // Nothing meshtel writes is unreadable; anything else is dropped.
            if let Some(payload) = handoff::decode(&bytes) {
                self.taken_over += 1;
                self.sender_for(payload.signal).adopt(payload, now_ns);
            }
        }
    }

    /// The next export call to make now, if any: spans, then access logs (retries before new
    /// batches), then metrics. Encoding happens here, off the request path.
    pub fn next_export(&mut self, store: &dyn SharedStore, now_ns: u64) -> Option<Payload> {
        if self.ending {
            return None;
        }
        self.take_handed_over(store, now_ns);
        let max_batch = self.config.export.max_batch;
        let encoder = &self.encoder;
        if let Some(p) = self.spans.next(max_batch, now_ns, |batch| encoder.encode(batch)) {
            return Some(p);
        }
        let encoder = &self.log_encoder;
        if let Some(p) = self.logs.next(max_batch, now_ns, |batch| encoder.encode(batch)) {
            return Some(p);
        }
        self.metrics.as_mut()?.tick(store, now_ns)
    }

    fn sender_for(&mut self, signal: otlp::Signal) -> &mut Sender {
        match (&mut self.metrics, signal) {
            (Some(m), otlp::Signal::Metrics) => m.sender(),
            (_, otlp::Signal::Logs) => &mut self.logs.sender,
            // Metrics taken over by a root context whose metrics are off go with its spans.
            _ => &mut self.spans.sender,
        }
    }

    /// Record that `payload` went out as call `token`.
    pub fn sent(&mut self, token: u32, payload: Payload) {
        self.sender_for(payload.signal).sent(token, payload);
    }

    /// Record that the proxy refused to make the call. Returns a line to log on a state change.
    pub fn not_sent(&mut self, payload: Payload, reason: String, now_ns: u64) -> Option<String> {
        let path = payload.signal.path();
        self.sender_for(payload.signal).not_sent(payload, reason, now_ns).map(|l| format!("{path}: {l}"))
    }

    /// Record the collector's answer to call `token`: its status, `Retry-After` and body.
    /// Returns a line to log on a state change.
    pub fn completed(
        &mut self,
        token: u32,
        status: Option<u32>,
        retry_after: Option<&str>,
        body: &[u8],
        now_ns: u64,
    ) -> Option<String> {
        self.answered(token, crate::export::classify(status, retry_after), body, now_ns)
    }

    /// Record the collector's answer to gRPC call `token`: its gRPC status and response message.
    /// Returns a line to log on a state change.
    pub fn completed_grpc(&mut self, token: u32, status: u32, body: &[u8], now_ns: u64) -> Option<String> {
        self.answered(token, crate::export::classify_grpc(status), body, now_ns)
    }

    fn answered(&mut self, token: u32, outcome: Outcome, body: &[u8], now_ns: u64) -> Option<String> {
        let signal = if self.metrics.as_ref().is_some_and(|m| m.owns(token)) {
            otlp::Signal::Metrics
        } else if self.logs.sender.owns(token) {
            otlp::Signal::Logs
        } else {
            otlp::Signal::Traces
        };
        let outcome = match outcome {
            Outcome::Success { .. } => {
                let (rejected, message) = signal.rejected(body);
                Outcome::Success { rejected, message }
            }
            other => other,
        };
        let path = signal.path();
        self.sender_for(signal).completed(token, outcome, now_ns).map(|l| format!("{path}: {l}"))
    }
}
