//! The metrics of one label set (one series): what a request or a TCP report adds to it, and how
//! two of them add up.

use prost::Message;

use super::exponential::ExpHistogram;
use super::overrides::{Metric, REQUEST_METRICS};
use crate::config::Histograms;

/// Histogram bucket bounds Istio uses for durations (ms) and sizes (bytes): Envoy's defaults.
pub const BUCKET_BOUNDS: [f64; 19] = [
    0.5,
    1.0,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1_000.0,
    2_500.0,
    5_000.0,
    10_000.0,
    30_000.0,
    60_000.0,
    300_000.0,
    600_000.0,
    1_800_000.0,
    3_600_000.0,
];

/// A fixed-bucket histogram.
#[derive(Clone, PartialEq, Message)]
pub struct Histogram {
    /// Counts per bucket: `BUCKET_BOUNDS.len() + 1` entries, the last one is +Inf.
    #[prost(uint64, repeated, tag = "1")]
    pub buckets: Vec<u64>,
    /// Sum of recorded values.
    #[prost(double, tag = "2")]
    pub sum: f64,
    /// Number of recorded values.
    #[prost(uint64, tag = "3")]
    pub count: u64,
}

impl Histogram {
    /// Record one value (bucket upper bounds are inclusive, as in OTLP and Prometheus).
    pub fn record(&mut self, value: f64) {
        if self.buckets.len() != BUCKET_BOUNDS.len() + 1 {
            self.buckets.resize(BUCKET_BOUNDS.len() + 1, 0);
        }
        let i = BUCKET_BOUNDS.iter().position(|b| value <= *b).unwrap_or(BUCKET_BOUNDS.len());
        self.buckets[i] += 1;
        self.sum += value;
        self.count += 1;
    }

    /// Add another histogram's counts.
    pub fn merge(&mut self, other: &Histogram) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.sum += other.sum;
        self.count += other.count;
    }
}

/// What one request measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Measurement {
    /// Request start to completion, milliseconds.
    pub duration_ms: f64,
    /// Request wire bytes, headers included.
    pub request_bytes: u64,
    /// Response wire bytes, headers included.
    pub response_bytes: u64,
    /// A sampled request's trace and span ids and end time: an exemplar of its duration.
    pub traced: Option<([u8; 16], [u8; 8], u64)>,
}

/// Exemplars kept per series and interval: the slowest requests' (a latency panel's slow
/// buckets are the ones worth a trace).
pub const MAX_EXEMPLARS: usize = 4;

/// A sampled request behind a duration: OTLP's `Exemplar` of `istio_request_duration_milliseconds`.
#[derive(Clone, PartialEq, Message)]
pub struct Exemplar {
    /// The request's trace id.
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    /// Its span id.
    #[prost(bytes = "vec", tag = "2")]
    pub span_id: Vec<u8>,
    /// When it ended, nanoseconds since the Unix epoch.
    #[prost(fixed64, tag = "3")]
    pub time_ns: u64,
    /// Its duration, milliseconds.
    #[prost(double, tag = "4")]
    pub value: f64,
}

/// Whether an exemplar of `value` would be kept among `kept` (the [`MAX_EXEMPLARS`] slowest).
fn would_keep(kept: &[Exemplar], value: f64) -> bool {
    kept.len() < MAX_EXEMPLARS || kept.iter().any(|k| value > k.value)
}

/// Keep `e` among `kept` if it is one of the [`MAX_EXEMPLARS`] slowest.
pub(super) fn keep_exemplar(kept: &mut Vec<Exemplar>, e: Exemplar) {
    if kept.len() < MAX_EXEMPLARS {
        kept.push(e);
    } else if let Some(fastest) = kept.iter_mut().min_by(|a, b| a.value.total_cmp(&b.value)) {
        if e.value > fastest.value {
            *fastest = e;
        }
    }
}

/// What one TCP connection moved since it last reported (Istio's network stats filter reports
/// a connection's bytes on an interval while it is open, then at its close).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpDelta {
    /// 1 when the connection is first reported.
    pub opened: u64,
    /// 1 when it closed.
    pub closed: u64,
    /// Bytes written to the downstream peer.
    pub sent_bytes: u64,
    /// Bytes read from the downstream peer.
    pub received_bytes: u64,
}

impl TcpDelta {
    /// The counts of the TCP metrics in `metrics` alone (a set of [`Metric`] bits).
    pub fn only(&self, metrics: u16) -> Self {
        let keep = |metric: Metric, n: u64| if metrics & metric as u16 != 0 { n } else { 0 };
        Self {
            opened: keep(Metric::TcpOpened, self.opened),
            closed: keep(Metric::TcpClosed, self.closed),
            sent_bytes: keep(Metric::TcpSent, self.sent_bytes),
            received_bytes: keep(Metric::TcpReceived, self.received_bytes),
        }
    }

    /// Whether it changes anything.
    pub fn is_empty(&self) -> bool {
        *self == TcpDelta::default()
    }
}

/// The metrics of one label set.
#[derive(Clone, PartialEq, Message)]
pub struct SeriesData {
    /// `istio_requests_total`.
    #[prost(uint64, tag = "1")]
    pub requests: u64,
    /// `istio_request_duration_milliseconds`.
    #[prost(message, optional, tag = "2")]
    pub duration: Option<Histogram>,
    /// `istio_request_bytes`.
    #[prost(message, optional, tag = "3")]
    pub request_bytes: Option<Histogram>,
    /// `istio_response_bytes`.
    #[prost(message, optional, tag = "4")]
    pub response_bytes: Option<Histogram>,
    /// When the cumulative totals began counting this series (set by
    /// a [`Stamp`] of [`super::aggregate::Aggregator::merge_batch`]; zero, and so not on the wire, in deltas).
    #[prost(uint64, tag = "5")]
    pub start_ns: u64,
    /// When the cumulative totals last saw this series change (as `start_ns`).
    #[prost(uint64, tag = "6")]
    pub updated_ns: u64,
    /// `istio_tcp_connections_opened_total`.
    #[prost(uint64, tag = "7")]
    pub tcp_opened: u64,
    /// `istio_tcp_connections_closed_total`.
    #[prost(uint64, tag = "8")]
    pub tcp_closed: u64,
    /// `istio_tcp_sent_bytes_total`.
    #[prost(uint64, tag = "9")]
    pub tcp_sent_bytes: u64,
    /// `istio_tcp_received_bytes_total`.
    #[prost(uint64, tag = "10")]
    pub tcp_received_bytes: u64,
    /// Exemplars of the duration since the last clear (or, in cumulative totals, since the
    /// last export).
    #[prost(message, repeated, tag = "11")]
    pub exemplars: Vec<Exemplar>,
    /// `istio_request_duration_milliseconds`, exponential (`metrics.histograms`).
    #[prost(message, optional, tag = "12")]
    pub duration_exp: Option<ExpHistogram>,
    /// `istio_request_bytes`, exponential.
    #[prost(message, optional, tag = "13")]
    pub request_bytes_exp: Option<ExpHistogram>,
    /// `istio_response_bytes`, exponential.
    #[prost(message, optional, tag = "14")]
    pub response_bytes_exp: Option<ExpHistogram>,
}

impl SeriesData {
    /// Whether anything was recorded into it (since its last clear). A series of a family
    /// without `istio_requests_total` (see [`super::overrides`]) holds histograms alone.
    pub fn touched(&self) -> bool {
        self.requests > 0 || self.has_tcp() || self.has_histograms()
    }

    /// Whether a histogram holds a request.
    pub fn has_histograms(&self) -> bool {
        let explicit = [&self.duration, &self.request_bytes, &self.response_bytes];
        let exponential = [&self.duration_exp, &self.request_bytes_exp, &self.response_bytes_exp];
        explicit.iter().any(|h| h.as_ref().is_some_and(|h| h.count > 0))
            || exponential.iter().any(|h| h.as_ref().is_some_and(|h| h.count > 0))
    }

    /// Whether it holds TCP connection counts.
    pub fn has_tcp(&self) -> bool {
        (self.tcp_opened | self.tcp_closed | self.tcp_sent_bytes | self.tcp_received_bytes) != 0
    }

    pub(super) fn clear(&mut self) {
        self.requests = 0;
        self.tcp_opened = 0;
        self.tcp_closed = 0;
        self.tcp_sent_bytes = 0;
        self.tcp_received_bytes = 0;
        self.exemplars.clear();
        for h in [&mut self.duration, &mut self.request_bytes, &mut self.response_bytes].into_iter().flatten() {
            h.buckets.fill(0);
            h.sum = 0.0;
            h.count = 0;
        }
        for h in self.exponential_mut().into_iter().flatten() {
            h.clear();
        }
    }

    pub(super) fn exponential_mut(&mut self) -> [&mut Option<ExpHistogram>; 3] {
        [&mut self.duration_exp, &mut self.request_bytes_exp, &mut self.response_bytes_exp]
    }

    // Inlined into `Aggregator::update` as before `record_parts` became its second caller:
    // un-inlined, a traced request cost ~2 k instructions more (callgrind, BENCHMARKS.md).
    #[inline]
    pub(super) fn record(&mut self, m: &Measurement, histograms: Histograms) {
        self.requests += 1;
        // The ids are copied only for a request that would be kept.
        if let Some((trace_id, span_id, time_ns)) = m.traced.filter(|_| would_keep(&self.exemplars, m.duration_ms)) {
            let e = Exemplar { trace_id: trace_id.to_vec(), span_id: span_id.to_vec(), time_ns, value: m.duration_ms };
            keep_exemplar(&mut self.exemplars, e);
        }
        let values = [m.duration_ms, m.request_bytes as f64, m.response_bytes as f64];
        if histograms.explicit() {
            for (h, v) in
                [&mut self.duration, &mut self.request_bytes, &mut self.response_bytes].into_iter().zip(values)
            {
                h.get_or_insert_with(Histogram::default).record(v);
            }
        }
        if histograms.exponential() {
            for (h, v) in self.exponential_mut().into_iter().zip(values) {
                h.get_or_insert_with(ExpHistogram::default).record(v);
            }
        }
    }

    /// Record only the request metrics in `metrics` (a set of [`Metric`] bits): a series or an
    /// overflow holds what its family exports, so that a metric is never counted twice.
    pub(super) fn record_parts(&mut self, m: &Measurement, histograms: Histograms, metrics: u16) {
        if metrics & REQUEST_METRICS == REQUEST_METRICS {
            return self.record(m, histograms);
        }
        if metrics & Metric::RequestCount as u16 != 0 {
            self.requests += 1;
        }
        let duration = metrics & Metric::RequestDuration as u16 != 0;
        if let Some((trace_id, span_id, time_ns)) =
            m.traced.filter(|_| duration && would_keep(&self.exemplars, m.duration_ms))
        {
            let e = Exemplar { trace_id: trace_id.to_vec(), span_id: span_id.to_vec(), time_ns, value: m.duration_ms };
            keep_exemplar(&mut self.exemplars, e);
        }
        let parts = [
            (Metric::RequestDuration, m.duration_ms, &mut self.duration, &mut self.duration_exp),
            (Metric::RequestSize, m.request_bytes as f64, &mut self.request_bytes, &mut self.request_bytes_exp),
            (Metric::ResponseSize, m.response_bytes as f64, &mut self.response_bytes, &mut self.response_bytes_exp),
        ];
        for (_, v, explicit, exponential) in parts.into_iter().filter(|p| metrics & p.0 as u16 != 0) {
            if histograms.explicit() {
                explicit.get_or_insert_with(Histogram::default).record(v);
            }
            if histograms.exponential() {
                exponential.get_or_insert_with(ExpHistogram::default).record(v);
            }
        }
    }

    pub(super) fn record_tcp(&mut self, d: &TcpDelta) {
        self.tcp_opened = self.tcp_opened.saturating_add(d.opened);
        self.tcp_closed = self.tcp_closed.saturating_add(d.closed);
        self.tcp_sent_bytes = self.tcp_sent_bytes.saturating_add(d.sent_bytes);
        self.tcp_received_bytes = self.tcp_received_bytes.saturating_add(d.received_bytes);
    }

    pub(super) fn merge(&mut self, other: &SeriesData) {
        self.requests += other.requests;
        for e in &other.exemplars {
            keep_exemplar(&mut self.exemplars, e.clone());
        }
        self.record_tcp(&TcpDelta {
            opened: other.tcp_opened,
            closed: other.tcp_closed,
            sent_bytes: other.tcp_sent_bytes,
            received_bytes: other.tcp_received_bytes,
        });
        let merge = |a: &mut Option<Histogram>, b: &Option<Histogram>| {
            if let Some(b) = b {
                a.get_or_insert_with(Histogram::default).merge(b);
            }
        };
        merge(&mut self.duration, &other.duration);
        merge(&mut self.request_bytes, &other.request_bytes);
        merge(&mut self.response_bytes, &other.response_bytes);
        let others = [&other.duration_exp, &other.request_bytes_exp, &other.response_bytes_exp];
        for (a, b) in self.exponential_mut().into_iter().zip(others) {
            if let Some(b) = b {
                a.get_or_insert_with(ExpHistogram::default).merge(b);
            }
        }
    }
}

/// The period a merge into cumulative totals covers: a series met for the first time starts
/// at `start_ns`, and every series merged is marked updated at `now_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Start of the period.
    pub start_ns: u64,
    /// End of the period: now.
    pub now_ns: u64,
}

impl Stamp {
    pub(super) fn apply(self, s: &mut SeriesData) {
        if s.start_ns == 0 {
            s.start_ns = self.start_ns;
        }
        s.updated_ns = self.now_ns;
    }
}
