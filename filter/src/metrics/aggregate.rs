//! Aggregation of Istio's request metrics per label set, with a cap on the number of series.
//!
//! The same types serve three places: a worker's local deltas, the deltas merged from all
//! workers in the proxy's shared data, and the exporting worker's cumulative totals.

use std::cell::RefCell;
use std::rc::Rc;

use foldhash::fast::RandomState;
use hashbrown::{Equivalent, HashMap, HashSet};
use prost::encoding::{decode_varint, skip_field, DecodeContext, WireType};
use prost::Message;

use super::exponential::ExpHistogram;
use super::overrides::{Metric, REQUEST_METRICS};
use crate::config::Histograms;
use crate::wire::Writer;

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

/// A series' key: its label values, each shared with every other series of the aggregator that
/// has the same value (most of Istio's 25 labels repeat across series), hashed by [`hash_labels`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct SeriesKey(Box<[Rc<str>]>);

impl SeriesKey {
    /// The key of a new series, its values interned.
    fn of<S: AsRef<str>>(labels: &[S], values: &Values) -> Self {
        SeriesKey(labels.iter().map(|l| values.intern(l.as_ref())).collect())
    }
}

impl std::hash::Hash for SeriesKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        hash_labels(&self.0, state);
    }
}

/// Label values borrowed for a lookup, hashed as their [`SeriesKey`]: a known series is found
/// without building its key.
struct Borrowed<'a, S>(&'a [S]);

impl<S: AsRef<str>> std::hash::Hash for Borrowed<'_, S> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        hash_labels(self.0, state);
    }
}

impl<S: AsRef<str>> Equivalent<SeriesKey> for Borrowed<'_, S> {
    fn equivalent(&self, key: &SeriesKey) -> bool {
        // Values interned by the same aggregator (a batch being taken) are the same allocation:
        // equal by address, without comparing bytes.
        let same = |a: &str, b: &str| std::ptr::eq(a, b) || a == b;
        key.0.len() == self.0.len() && key.0.iter().zip(self.0).all(|(a, b)| same(a, b.as_ref()))
    }
}

/// The one hash of a label set, owned or borrowed: each value's bytes and a terminator.
fn hash_labels<S: AsRef<str>, H: std::hash::Hasher>(labels: &[S], state: &mut H) {
    for l in labels {
        state.write(l.as_ref().as_bytes());
        state.write_u8(0xff);
    }
}

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
fn keep_exemplar(kept: &mut Vec<Exemplar>, e: Exemplar) {
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
    /// a [`Stamp`] of [`Aggregator::merge_batch`]; zero, and so not on the wire, in deltas).
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

    fn clear(&mut self) {
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

    fn exponential_mut(&mut self) -> [&mut Option<ExpHistogram>; 3] {
        [&mut self.duration_exp, &mut self.request_bytes_exp, &mut self.response_bytes_exp]
    }

    // Inlined into `Aggregator::update` as before `record_parts` became its second caller:
    // un-inlined, a traced request cost ~2 k instructions more (callgrind, BENCHMARKS.md).
    #[inline]
    fn record(&mut self, m: &Measurement, histograms: Histograms) {
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
    fn record_parts(&mut self, m: &Measurement, histograms: Histograms, metrics: u16) {
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

    fn record_tcp(&mut self, d: &TcpDelta) {
        self.tcp_opened = self.tcp_opened.saturating_add(d.opened);
        self.tcp_closed = self.tcp_closed.saturating_add(d.closed);
        self.tcp_sent_bytes = self.tcp_sent_bytes.saturating_add(d.sent_bytes);
        self.tcp_received_bytes = self.tcp_received_bytes.saturating_add(d.received_bytes);
    }

    fn merge(&mut self, other: &SeriesData) {
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

// Field numbers of `DeltaBatch` and `BatchSeries`, for the writer and reader below.
const BATCH_VALUES: u32 = 1;
const BATCH_SERIES: u32 = 2;
const SERIES_LABELS: u32 = 1;
const SERIES_OVERFLOW: u32 = 2;
const SERIES_DATA: u32 = 3;

/// One series of a `DeltaBatch`: its labels as positions in the batch's `values`.
#[cfg(test)]
#[derive(Clone, PartialEq, Message)]
struct BatchSeries {
    #[prost(uint32, repeated, tag = "1")]
    labels: Vec<u32>,
    #[prost(bool, tag = "2")]
    overflow: bool,
    #[prost(message, optional, tag = "3")]
    data: Option<SeriesData>,
}

/// The schema of what a worker hands the exporting VM: the series it touched since its last
/// hand-over, each distinct label value written once. [`Aggregator::encode_batch`] writes it and
/// [`Aggregator::merge_batch`] reads it without building this message (the tests hold both to it).
#[cfg(test)]
#[derive(Clone, PartialEq, Message)]
struct DeltaBatch {
    #[prost(string, repeated, tag = "1")]
    values: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    series: Vec<BatchSeries>,
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
    fn apply(self, s: &mut SeriesData) {
        if s.start_ns == 0 {
            s.start_ns = self.start_ns;
        }
        s.updated_ns = self.now_ns;
    }
}

/// Bytes that are not a batch written by [`Aggregator::encode_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadBatch;

// The batch's series data written and read by hand, field for field what prost's derived
// `Message` of `SeriesData` and `Histogram` writes and reads (the tests hold the two together):
// a worker's data is added into the leader's series where it lies, without a decoded copy (five
// allocations per series through prost).
const DATA_REQUESTS: u32 = 1;
const DATA_DURATION: u32 = 2;
const DATA_REQUEST_BYTES: u32 = 3;
const DATA_RESPONSE_BYTES: u32 = 4;
const DATA_TCP_OPENED: u32 = 7;
const DATA_TCP_CLOSED: u32 = 8;
const DATA_TCP_SENT_BYTES: u32 = 9;
const DATA_TCP_RECEIVED_BYTES: u32 = 10;
const DATA_EXEMPLARS: u32 = 11;
const DATA_DURATION_EXP: u32 = 12;
const DATA_REQUEST_BYTES_EXP: u32 = 13;
const DATA_RESPONSE_BYTES_EXP: u32 = 14;
const HISTOGRAM_BUCKETS: u32 = 1;
const HISTOGRAM_SUM: u32 = 2;
const HISTOGRAM_COUNT: u32 = 3;

impl Histogram {
    fn write(&self, w: &mut Writer) {
        // Trailing empty buckets are left out (a shorter list reads the same): most requests
        // fall in a few low buckets.
        let used = self.buckets.iter().rposition(|c| *c != 0).map_or(0, |last| last + 1);
        w.packed_varint(HISTOGRAM_BUCKETS, &self.buckets[..used]);
        if self.sum != 0.0 {
            w.double(HISTOGRAM_SUM, self.sum);
        }
        w.varint(HISTOGRAM_COUNT, self.count);
    }

    /// Add an encoded histogram; more buckets than Istio's are refused.
    fn merge_encoded(&mut self, mut buf: &[u8]) -> Result<(), BadBatch> {
        let mut next = 0;
        let mut add = |h: &mut Histogram, v: u64| {
            if next > BUCKET_BOUNDS.len() {
                return Err(BadBatch);
            }
            if h.buckets.len() <= next {
                h.buckets.resize(BUCKET_BOUNDS.len() + 1, 0);
            }
            h.buckets[next] = h.buckets[next].saturating_add(v);
            next += 1;
            Ok(())
        };
        while !buf.is_empty() {
            match read_key(&mut buf)? {
                (HISTOGRAM_BUCKETS, WireType::LengthDelimited) => {
                    let mut packed = length_delimited(&mut buf)?;
                    while !packed.is_empty() {
                        add(self, read_varint(&mut packed)?)?;
                    }
                }
                (HISTOGRAM_BUCKETS, WireType::Varint) => add(self, read_varint(&mut buf)?)?,
                (HISTOGRAM_SUM, WireType::SixtyFourBit) => {
                    let (bytes, rest) = buf.split_first_chunk::<8>().ok_or(BadBatch)?;
                    self.sum += f64::from_le_bytes(*bytes);
                    buf = rest;
                }
                (HISTOGRAM_COUNT, WireType::Varint) => self.count = self.count.saturating_add(read_varint(&mut buf)?),
                (tag, wire_type) => {
                    skip_field(wire_type, tag, &mut buf, DecodeContext::default()).map_err(|_| BadBatch)?
                }
            }
        }
        Ok(())
    }
}

impl SeriesData {
    /// Write the deltas (the cumulative-only stamps are not part of a batch).
    fn write(&self, w: &mut Writer) {
        w.varint(DATA_REQUESTS, self.requests);
        for (field, h) in [
            (DATA_DURATION, &self.duration),
            (DATA_REQUEST_BYTES, &self.request_bytes),
            (DATA_RESPONSE_BYTES, &self.response_bytes),
        ] {
            if let Some(h) = h {
                w.message(field, |w| h.write(w));
            }
        }
        for (field, n) in [
            (DATA_TCP_OPENED, self.tcp_opened),
            (DATA_TCP_CLOSED, self.tcp_closed),
            (DATA_TCP_SENT_BYTES, self.tcp_sent_bytes),
            (DATA_TCP_RECEIVED_BYTES, self.tcp_received_bytes),
        ] {
            if n != 0 {
                w.varint(field, n);
            }
        }
        for e in &self.exemplars {
            w.message(DATA_EXEMPLARS, |w| {
                w.bytes(1, &e.trace_id);
                w.bytes(2, &e.span_id);
                w.fixed64(3, e.time_ns);
                w.double(4, e.value);
            });
        }
        for (field, h) in [
            (DATA_DURATION_EXP, &self.duration_exp),
            (DATA_REQUEST_BYTES_EXP, &self.request_bytes_exp),
            (DATA_RESPONSE_BYTES_EXP, &self.response_bytes_exp),
        ] {
            if let Some(h) = h {
                w.message(field, |w| h.write(w));
            }
        }
    }

    /// Add encoded deltas.
    fn merge_encoded(&mut self, mut buf: &[u8]) -> Result<(), BadBatch> {
        while !buf.is_empty() {
            let (tag, wire_type) = read_key(&mut buf)?;
            let histogram = match (tag, wire_type) {
                (DATA_REQUESTS, WireType::Varint) => {
                    self.requests = self.requests.saturating_add(read_varint(&mut buf)?);
                    continue;
                }
                (DATA_TCP_OPENED..=DATA_TCP_RECEIVED_BYTES, WireType::Varint) => {
                    let counter = match tag {
                        DATA_TCP_OPENED => &mut self.tcp_opened,
                        DATA_TCP_CLOSED => &mut self.tcp_closed,
                        DATA_TCP_SENT_BYTES => &mut self.tcp_sent_bytes,
                        _ => &mut self.tcp_received_bytes,
                    };
                    *counter = counter.saturating_add(read_varint(&mut buf)?);
                    continue;
                }
                (DATA_EXEMPLARS, WireType::LengthDelimited) => {
                    let e = Exemplar::decode(length_delimited(&mut buf)?).map_err(|_| BadBatch)?;
                    keep_exemplar(&mut self.exemplars, e);
                    continue;
                }
                // Decoded, then merged at the scale both hold: the opt-in kind, a copy is fine.
                (DATA_DURATION_EXP..=DATA_RESPONSE_BYTES_EXP, WireType::LengthDelimited) => {
                    let h = ExpHistogram::decode_checked(length_delimited(&mut buf)?).ok_or(BadBatch)?;
                    let [duration, request, response] = self.exponential_mut();
                    let into = match tag {
                        DATA_DURATION_EXP => duration,
                        DATA_REQUEST_BYTES_EXP => request,
                        _ => response,
                    };
                    into.get_or_insert_with(ExpHistogram::default).merge(&h);
                    continue;
                }
                (DATA_DURATION, WireType::LengthDelimited) => &mut self.duration,
                (DATA_REQUEST_BYTES, WireType::LengthDelimited) => &mut self.request_bytes,
                (DATA_RESPONSE_BYTES, WireType::LengthDelimited) => &mut self.response_bytes,
                _ => {
                    skip_field(wire_type, tag, &mut buf, DecodeContext::default()).map_err(|_| BadBatch)?;
                    continue;
                }
            };
            histogram.get_or_insert_with(Histogram::default).merge_encoded(length_delimited(&mut buf)?)?;
        }
        Ok(())
    }
}

/// Label values shared by the aggregators of one VM, one allocation each: a worker's deltas
/// and the exporting VM's totals point at the same copy.
#[derive(Debug, Clone, Default)]
pub struct Values(Rc<RefCell<HashSet<Rc<str>, RandomState>>>);

impl Values {
    /// The one copy of `value`.
    fn intern(&self, value: &str) -> Rc<str> {
        // A VM is one thread and nothing here reenters, so the table is never borrowed twice;
        // if it were, a private copy rather than a panic.
        let Ok(mut values) = self.0.try_borrow_mut() else { return Rc::from(value) };
        match values.get(value) {
            Some(s) => s.clone(),
            None => {
                let s: Rc<str> = Rc::from(value);
                values.insert(s.clone());
                s
            }
        }
    }

    /// Free the values no series uses any more.
    fn release_unused(&self) {
        if let Ok(mut values) = self.0.try_borrow_mut() {
            values.retain(|s| Rc::strong_count(s) > 1);
        }
    }

    /// Distinct values held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.borrow().len()
    }
}

/// Series per label set, at most `max_series` of them; past that, new label sets are folded
/// into one overflow series (OpenTelemetry's cardinality limit), and a label set once admitted
/// keeps its own series.
#[derive(Debug, Clone)]
pub struct Aggregator {
    // foldhash: several times faster than SipHash over the 25 label strings hashed per request,
    // and seeded per process, so peers cannot choose colliding label values ahead of time.
    series: HashMap<SeriesKey, SeriesData, RandomState>,
    values: Values,
    overflow: Option<SeriesData>,
    max_series: usize,
    folded: u64,
    histograms: Histograms,
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        if !self.series.is_empty() {
            self.series.clear();
            self.values.release_unused();
        }
    }
}

impl Aggregator {
    /// An empty aggregator admitting at most `max_series` label sets, with its own values.
    pub fn new(max_series: usize) -> Self {
        Self::with_values(max_series, &Values::default())
    }

    /// An empty aggregator whose label values are kept in `values`.
    pub fn with_values(max_series: usize, values: &Values) -> Self {
        Self {
            series: HashMap::default(),
            values: values.clone(),
            overflow: None,
            max_series,
            folded: 0,
            histograms: Histograms::Explicit,
        }
    }

    /// The same, recording requests into the `histograms` given (Istio's explicit ones by default).
    pub fn recording(mut self, histograms: Histograms) -> Self {
        self.histograms = histograms;
        self
    }

    /// Record one request; the label values are copied only for a new series.
    pub fn record<S: AsRef<str>>(&mut self, labels: &[S], m: &Measurement) {
        let histograms = self.histograms;
        if self.update(labels, |s| s.record(m, histograms)).is_none() {
            self.folded += 1;
            self.overflow.get_or_insert_with(SeriesData::default).record(m, histograms);
        }
    }

    /// Record one request into a series of a family that exports only `metrics` (see
    /// [`super::overrides::Family`]).
    pub fn record_parts<S: AsRef<str>>(&mut self, labels: &[S], m: &Measurement, metrics: u16) {
        let histograms = self.histograms;
        if self.update(labels, |s| s.record_parts(m, histograms, metrics)).is_none() {
            self.folded += 1;
            self.overflow.get_or_insert_with(SeriesData::default).record_parts(m, histograms, metrics);
        }
    }

    /// Record one TCP connection's report (see [`TcpDelta`]).
    pub fn record_tcp<S: AsRef<str>>(&mut self, labels: &[S], d: &TcpDelta) {
        if self.update(labels, |s| s.record_tcp(d)).is_none() {
            self.folded += 1;
            self.overflow.get_or_insert_with(SeriesData::default).record_tcp(d);
        }
    }

    /// Apply `f` to the series of `labels`, found with one lookup or admitted while the cap
    /// allows; `None` past the cap, where the caller folds into the overflow series.
    fn update<S: AsRef<str>, R>(&mut self, labels: &[S], f: impl FnOnce(&mut SeriesData) -> R) -> Option<R> {
        let admit = self.series.len() < self.max_series;
        match self.series.get_mut(&Borrowed(labels)) {
            Some(s) => Some(f(s)),
            None if admit => Some(f(self.series.entry(SeriesKey::of(labels, &self.values)).or_default())),
            None => None,
        }
    }

    /// Add the deltas in `other` (its series with requests), under this aggregator's cap; with
    /// a `stamp`, as cumulative totals do. The exporting VM adds its own deltas this way, without
    /// a batch.
    pub fn merge_deltas(&mut self, other: &Aggregator, stamp: Option<Stamp>) {
        for (labels, data) in other.series.iter().filter(|(_, d)| d.touched()) {
            self.merge_series(&labels.0, data, stamp);
        }
        if let Some(o) = &other.overflow {
            self.merge_overflow(o);
        }
    }

    /// Add one series' data, under the cap.
    fn merge_series<S: AsRef<str>>(&mut self, labels: &[S], data: &SeriesData, stamp: Option<Stamp>) {
        let merged = self.update(labels, |s| {
            s.merge(data);
            if let Some(stamp) = stamp {
                stamp.apply(s);
            }
        });
        if merged.is_none() {
            self.folded += data.requests;
            self.merge_overflow(data);
        }
    }

    /// Add a series' encoded deltas; `labels` (`None`: the overflow series) are this
    /// aggregator's own interned values.
    fn merge_encoded_series(
        &mut self,
        labels: Option<&[Rc<str>]>,
        data: &[u8],
        stamp: Option<Stamp>,
    ) -> Result<(), BadBatch> {
        let Some(labels) = labels else {
            return self.overflow.get_or_insert_with(SeriesData::default).merge_encoded(data);
        };
        let merged = self.update(labels, |s| {
            s.merge_encoded(data)?;
            if let Some(stamp) = stamp {
                stamp.apply(s);
            }
            Ok(())
        });
        if let Some(result) = merged {
            return result;
        }
        let mut folded = SeriesData::default();
        folded.merge_encoded(data)?;
        self.folded = self.folded.saturating_add(folded.requests);
        self.merge_overflow(&folded);
        Ok(())
    }

    fn merge_overflow(&mut self, data: &SeriesData) {
        self.overflow.get_or_insert_with(SeriesData::default).merge(data);
    }

    /// A copy of the series a merge stamped at `now_ns` (and the overflow series): what an
    /// export brought forward sends of the cumulative totals.
    pub fn updated_at(&self, now_ns: u64) -> Aggregator {
        let mut out = Aggregator::with_values(self.max_series, &self.values);
        let updated = self.series.iter().filter(|(_, d)| d.updated_ns == now_ns);
        out.series.extend(updated.map(|(k, d)| (k.clone(), d.clone())));
        out.overflow = self.overflow.clone();
        out
    }

    /// Forget every series' exemplars (the cumulative totals, after an export showed them).
    pub fn clear_exemplars(&mut self) {
        for data in self.series.values_mut().chain(self.overflow.as_mut()) {
            data.exemplars.clear();
        }
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.series.is_empty() && self.overflow.is_none()
    }

    /// Series with their labels, the overflow series (labels `None`) last.
    pub fn series(&self) -> impl Iterator<Item = (Option<&[Rc<str>]>, &SeriesData)> {
        self.series.iter().map(|(l, d)| (Some(&l.0[..]), d)).chain(self.overflow.iter().map(|d| (None, d)))
    }

    /// Number of series, the overflow series included.
    pub fn len(&self) -> usize {
        self.series.len() + usize::from(self.overflow.is_some())
    }

    /// Total requests across all series.
    pub fn requests(&self) -> u64 {
        self.series().map(|(_, d)| d.requests).sum()
    }

    /// Requests (and TCP reports) folded into the overflow series by this aggregator, and reset
    /// that count.
    pub fn take_folded(&mut self) -> u64 {
        std::mem::take(&mut self.folded)
    }

    /// The batch of the series with requests in this aggregator (a `DeltaBatch`): each
    /// distinct label value once, each series as positions in that table. For a worker's
    /// deltas, the series it touched since it last handed over ([`Aggregator::clear_deltas`]).
    pub fn encode_batch(&self) -> Vec<u8> {
        let mut index: HashMap<*const u8, u32, RandomState> = HashMap::default();
        let mut table: Vec<&str> = Vec::new();
        // One buffer, the series first and the table after them (a reader takes the fields in
        // any order), sized for Istio's labels: ~40 bytes of positions and ~120 of data a series.
        let mut w = Writer::with_capacity(self.len() * 216);
        let mut positions = Vec::new();
        for (labels, data) in self.series().filter(|(_, d)| d.touched()) {
            positions.clear();
            for value in labels.into_iter().flatten() {
                // Interned: one value, one pointer. The table grows as values are first met.
                let at = *index.entry(value.as_ptr()).or_insert_with(|| {
                    table.push(value);
                    table.len() as u32 - 1
                });
                positions.push(at);
            }
            w.message(BATCH_SERIES, |w| {
                w.packed_varint(SERIES_LABELS, &positions);
                w.bool(SERIES_OVERFLOW, labels.is_none());
                w.message(SERIES_DATA, |w| data.write(w));
            });
        }
        for value in table {
            w.repeated_string(BATCH_VALUES, value);
        }
        w.into_bytes()
    }

    /// Add a batch written by [`Aggregator::encode_batch`], under this aggregator's cap: each
    /// distinct value is interned once, each series found by the values it points at.
    /// `Err` for bytes that are not such a batch; the series read before the error are kept.
    /// With a `stamp`, the series merged are stamped as cumulative totals are.
    pub fn merge_batch(&mut self, bytes: &[u8], stamp: Option<Stamp>) -> Result<(), BadBatch> {
        let mut values = Vec::new();
        let mut buf = bytes;
        while !buf.is_empty() {
            let (tag, wire_type) = read_key(&mut buf)?;
            if (tag, wire_type) == (BATCH_VALUES, WireType::LengthDelimited) {
                let value = std::str::from_utf8(length_delimited(&mut buf)?).map_err(|_| BadBatch)?;
                values.push(self.values.intern(value));
            } else {
                skip_field(wire_type, tag, &mut buf, DecodeContext::default()).map_err(|_| BadBatch)?;
            }
        }
        let mut labels: Vec<Rc<str>> = Vec::new();
        let mut buf = bytes;
        while !buf.is_empty() {
            let (tag, wire_type) = read_key(&mut buf)?;
            if (tag, wire_type) != (BATCH_SERIES, WireType::LengthDelimited) {
                skip_field(wire_type, tag, &mut buf, DecodeContext::default()).map_err(|_| BadBatch)?;
                continue;
            }
            let (mut series, mut overflow, mut data) = (length_delimited(&mut buf)?, false, &[][..]);
            labels.clear();
            while !series.is_empty() {
                let mut label = |at: u64| match values.get(usize::try_from(at).unwrap_or(usize::MAX)) {
                    Some(v) => {
                        labels.push(Rc::clone(v));
                        Ok(())
                    }
                    None => Err(BadBatch),
                };
                match read_key(&mut series)? {
                    (SERIES_LABELS, WireType::LengthDelimited) => {
                        let mut packed = length_delimited(&mut series)?;
                        while !packed.is_empty() {
                            label(read_varint(&mut packed)?)?;
                        }
                    }
                    (SERIES_LABELS, WireType::Varint) => label(read_varint(&mut series)?)?,
                    (SERIES_OVERFLOW, WireType::Varint) => overflow = read_varint(&mut series)? != 0,
                    (SERIES_DATA, WireType::LengthDelimited) => data = length_delimited(&mut series)?,
                    (tag, wire_type) => {
                        skip_field(wire_type, tag, &mut series, DecodeContext::default()).map_err(|_| BadBatch)?
                    }
                }
            }
            self.merge_encoded_series((!overflow).then_some(&labels[..]), data, stamp)?;
        }
        // What a batch folded was counted by the worker that wrote it; a shared cap folds anew.
        Ok(())
    }

    /// Drop the series last updated before `cutoff_ns` (by a [`Stamp`]) and the label values
    /// no series uses any more. Returns how many series were dropped.
    pub fn expire(&mut self, cutoff_ns: u64) -> usize {
        self.retain(|d| d.updated_ns >= cutoff_ns)
    }

    /// After the deltas were handed over: zero every series in place, keeping its key and its
    /// buckets for the requests to come (a known series costs a lookup, not a new entry), and
    /// drop the series that had no request since the last clear and the values only they used.
    pub fn clear_deltas(&mut self) {
        self.retain(SeriesData::touched);
        for data in self.series.values_mut() {
            data.clear();
        }
        self.overflow = None;
    }

    /// Whether any request was recorded since the last [`Aggregator::clear_deltas`].
    pub fn has_deltas(&self) -> bool {
        self.series().any(|(_, d)| d.touched())
    }

    fn retain(&mut self, keep: impl Fn(&SeriesData) -> bool) -> usize {
        let before = self.series.len();
        self.series.retain(|_, d| keep(d));
        let dropped = before - self.series.len();
        if dropped > 0 {
            self.values.release_unused();
        }
        dropped
    }
}

/// A varint, read with a one-byte fast path: most values in a batch (label positions, bucket
/// counts, keys) are below 128, and prost's general reader is not inlined at the size-optimized
/// `opt-level` meshtel ships with (profiled: 30% of taking a batch).
#[inline(always)]
fn read_varint(buf: &mut &[u8]) -> Result<u64, BadBatch> {
    match buf.first() {
        Some(&b) if b < 0x80 => {
            *buf = &buf[1..];
            Ok(u64::from(b))
        }
        _ => decode_varint(buf).map_err(|_| BadBatch),
    }
}

/// A field key: its number and wire type.
#[inline(always)]
fn read_key(buf: &mut &[u8]) -> Result<(u32, WireType), BadBatch> {
    let key = read_varint(buf)?;
    let wire_type = WireType::try_from(key & 0x7).map_err(|_| BadBatch)?;
    let tag = u32::try_from(key >> 3).map_err(|_| BadBatch)?;
    if tag == 0 {
        return Err(BadBatch);
    }
    Ok((tag, wire_type))
}

/// The bytes of the length-delimited field whose key was just read.
fn length_delimited<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], BadBatch> {
    let len = usize::try_from(read_varint(buf)?).map_err(|_| BadBatch)?;
    let (one, rest) = buf.split_at_checked(len).ok_or(BadBatch)?;
    *buf = rest;
    Ok(one)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch's series with their labels as strings, sorted, read with the schema.
    fn schema_series(bytes: &[u8]) -> Vec<(Vec<String>, bool, u64)> {
        let batch = DeltaBatch::decode(bytes).unwrap();
        let mut all: Vec<_> = batch
            .series
            .iter()
            .map(|s| {
                let labels = s.labels.iter().map(|i| batch.values[*i as usize].clone()).collect();
                (labels, s.overflow, s.data.as_ref().map_or(0, |d| d.requests))
            })
            .collect();
        all.sort();
        all
    }

    #[test]
    fn label_values_are_stored_once_per_aggregator_and_once_per_batch() {
        let values = Values::default();
        let mut a = Aggregator::with_values(10, &values);
        for i in 0..5 {
            let mut l = vec!["same".to_string(); 25];
            l[0] = format!("peer-{i}");
            a.record(&l, &m(1.0));
        }
        assert_eq!(a.len(), 5);
        assert_eq!(values.len(), 6, "the five callers and the one value they share");
        let before = a.encode_batch();
        let bytes = a.encode_batch();
        assert_eq!(DeltaBatch::decode(bytes.as_slice()).unwrap().values.len(), 6, "each value written once");
        let mut b = Aggregator::with_values(10, &values);
        b.merge_batch(&bytes, None).unwrap();
        assert_eq!((b.len(), values.len()), (5, 6), "read values are the same copies");
        drop(a);
        assert_eq!(values.len(), 6, "b still uses them");
        assert_eq!(b.encode_batch().len(), before.len());
        b.merge_batch(&bytes, None).unwrap();
        assert_eq!((b.len(), b.requests(), values.len()), (5, 10, 6));
    }

    #[test]
    fn the_batch_is_written_and_read_as_its_schema() {
        let mut a = Aggregator::new(2);
        let mut with_empty = labels(1);
        with_empty[3] = String::new();
        a.record(&with_empty, &m(3.0));
        a.record(&labels(2), &m(30.0));
        a.record(&labels(3), &m(1.0)); // past the cap: the overflow series
        let bytes = a.encode_batch();
        let series = schema_series(&bytes);
        assert_eq!(series.len(), 3);
        assert!(series.contains(&(with_empty.clone(), false, 1)), "empty values keep their place");
        assert!(series.contains(&(labels(2), false, 1)));
        assert!(series.contains(&(vec![], true, 1)), "the overflow series, without labels");
        // What the schema writes (in any field order) reads back the same.
        let mut schema = DeltaBatch::decode(bytes.as_slice()).unwrap();
        schema.series.reverse();
        let mut reordered = schema
            .series
            .iter()
            .map(|s| {
                let mut w = Vec::new();
                prost::encoding::message::encode(BATCH_SERIES, s, &mut w);
                w
            })
            .collect::<Vec<_>>()
            .concat();
        for v in &schema.values {
            prost::encoding::string::encode(BATCH_VALUES, v, &mut reordered);
        }
        let (mut back, mut again) = (Aggregator::new(2), Aggregator::new(2));
        back.merge_batch(&reordered, None).unwrap();
        again.merge_batch(&bytes, None).unwrap();
        assert_eq!((back.len(), back.requests()), (3, 3));
        assert_eq!(schema_series(&back.encode_batch()), schema_series(&again.encode_batch()));
    }

    /// `d` as the batch writer writes it, checked to read back as prost reads it and to read
    /// what prost writes.
    fn written_as_prost_does(d: &SeriesData) -> Vec<u8> {
        let mut w = Writer::default();
        d.write(&mut w);
        let ours = w.into_bytes();
        assert_eq!(&SeriesData::decode(ours.as_slice()).unwrap(), d, "prost reads what we write");
        let mut back = SeriesData::default();
        back.merge_encoded(&d.encode_to_vec()).unwrap();
        assert_eq!(&back, d, "we read what prost writes");
        ours
    }

    #[test]
    fn tcp_counters_are_written_and_read_as_prost_does_and_add_up() {
        let mut d = SeriesData::default();
        d.record_tcp(&TcpDelta { opened: 1, closed: 0, sent_bytes: 120, received_bytes: 60 });
        d.record_tcp(&TcpDelta { opened: 0, closed: 1, sent_bytes: 3, received_bytes: 0 });
        let ours = written_as_prost_does(&d);
        let mut back = d.clone();
        back.merge_encoded(&ours).unwrap();
        assert_eq!(
            (back.tcp_opened, back.tcp_closed, back.tcp_sent_bytes, back.tcp_received_bytes, back.requests),
            (2, 2, 246, 120, 0)
        );
        // Through a batch, and into the overflow series past the cap.
        let mut a = Aggregator::new(1);
        a.record_tcp(&labels(1), &TcpDelta { opened: 1, ..Default::default() });
        a.record_tcp(&labels(2), &TcpDelta { opened: 1, sent_bytes: 9, ..Default::default() });
        assert_eq!(a.take_folded(), 1);
        let mut total = Aggregator::new(5);
        total.merge_batch(&a.encode_batch(), None).unwrap();
        let sent: u64 = total.series().map(|(_, d)| d.tcp_sent_bytes).sum();
        let opened: u64 = total.series().map(|(_, d)| d.tcp_opened).sum();
        assert_eq!((total.len(), opened, sent), (2, 2, 9));
        a.clear_deltas();
        assert!(!a.has_deltas(), "a connection's counters are deltas like a request's");
    }

    #[test]
    fn series_data_is_written_and_read_as_prost_does() {
        let mut d = SeriesData::default();
        for (i, (ms, bytes)) in [(0.3, 0), (7.0, 120), (70_000.0, 5_000_000), (1e9, 1)].into_iter().enumerate() {
            // Sampled requests carry exemplars (tag 11) through the batch as well.
            let traced = (i % 2 == 1).then_some(([i as u8; 16], [i as u8; 8], i as u64));
            let m = Measurement { duration_ms: ms, request_bytes: bytes, response_bytes: 2 * bytes, traced };
            d.record(&m, Histograms::Both);
        }
        assert_eq!(d.exemplars.len(), 2);
        // Exponential histograms (tags 12-14) too.
        assert_eq!(d.duration_exp.as_ref().map(|h| h.count), Some(4));
        assert_eq!(d.request_bytes_exp.as_ref().map(|h| h.zero_count), Some(1));
        let ours = written_as_prost_does(&d);
        let mut back = d.clone();
        back.merge_encoded(&ours).unwrap();
        assert_eq!((back.requests, back.duration.as_ref().unwrap().count), (8, 8), "and add it");
        assert_eq!(back.duration_exp.as_ref().map(|h| h.counts.iter().sum::<u64>()), Some(8));
        // An exponential histogram no VM could have written is refused.
        let bad = SeriesData {
            duration_exp: Some(ExpHistogram { scale: 40, counts: vec![1], ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(SeriesData::default().merge_encoded(&bad.encode_to_vec()), Err(BadBatch));
        let only_requests = SeriesData { requests: 3, ..Default::default() };
        let mut back = SeriesData::default();
        back.merge_encoded(&only_requests.encode_to_vec()).unwrap();
        assert_eq!(back, only_requests);
        // More buckets than Istio's are refused.
        let wide = Histogram { buckets: vec![1; BUCKET_BOUNDS.len() + 2], sum: 1.0, count: 1 };
        assert_eq!(Histogram::default().merge_encoded(&wide.encode_to_vec()), Err(BadBatch));
    }

    #[test]
    fn cleared_deltas_keep_live_series_and_drop_idle_ones() {
        let mut a = Aggregator::new(10);
        a.record(&labels(1), &m(1.0));
        a.record(&labels(2), &m(1.0));
        a.clear_deltas();
        assert!(!a.has_deltas());
        assert_eq!(a.len(), 2, "kept for the requests to come");
        assert!(a.encode_batch().is_empty(), "nothing to hand over");
        let d = a.series().next().unwrap().1;
        assert_eq!((d.requests, d.duration.as_ref().map(|h| (h.count, h.sum))), (0, Some((0, 0.0))));
        a.record(&labels(2), &m(5.0));
        let mut b = Aggregator::new(10);
        b.merge_batch(&a.encode_batch(), None).unwrap();
        assert_eq!((b.len(), b.requests()), (1, 1), "only what was touched since");
        a.clear_deltas();
        assert_eq!(a.len(), 1, "series 1 was idle for a whole interval");
        assert_eq!(a.values.len(), 1, "and its values went with it");
    }

    #[test]
    fn bad_batches_are_refused() {
        let mut a = Aggregator::new(10);
        a.record(&labels(1), &m(1.0));
        let good = a.encode_batch();
        let mut agg = Aggregator::new(10);
        assert_eq!(agg.merge_batch(&[0xff, 0xff, 0xff], None), Err(BadBatch));
        assert_eq!(agg.merge_batch(&good[..good.len() - 3], None), Err(BadBatch), "truncated");
        // A series pointing past the value table.
        let mut w = Writer::default();
        w.message(BATCH_SERIES, |w| w.packed_varint(SERIES_LABELS, &[7u32]));
        assert_eq!(agg.merge_batch(&w.into_bytes(), None), Err(BadBatch));
        // A value that is not UTF-8.
        let mut w = Writer::default();
        w.bytes(BATCH_VALUES, &[0xc3, 0x28]);
        assert_eq!(agg.merge_batch(&w.into_bytes(), None), Err(BadBatch));
        assert_eq!(agg.merge_batch(&[], None), Ok(()), "an empty batch is nothing");
        assert_eq!(agg.merge_batch(&good, None), Ok(()));
        assert_eq!(agg.requests(), 1);
    }

    #[test]
    fn cumulative_totals_stamp_and_expire_series() {
        let mut total = Aggregator::new(10);
        let batch = |of: &[usize]| {
            let mut d = Aggregator::new(10);
            for i in of {
                d.record(&labels(*i), &m(1.0));
            }
            d.encode_batch()
        };
        total.merge_batch(&batch(&[1, 2]), Some(Stamp { start_ns: 100, now_ns: 200 })).unwrap();
        total.merge_batch(&batch(&[2]), Some(Stamp { start_ns: 200, now_ns: 300 })).unwrap();
        let stamps = |t: &Aggregator, i: usize| {
            let want = labels(i);
            t.series()
                .find(|(l, _)| l.is_some_and(|l| l.iter().map(|v| &**v).eq(want.iter())))
                .map(|(_, d)| (d.start_ns, d.updated_ns))
        };
        assert_eq!(stamps(&total, 1), Some((100, 200)));
        assert_eq!(stamps(&total, 2), Some((100, 300)), "the start is kept, the update moves");
        assert_eq!(total.expire(250), 1);
        assert_eq!((stamps(&total, 1), total.len()), (None, 1));
        assert_eq!(total.values.len(), 1, "the dropped series' values went with it");
        // A series back after its expiry starts anew.
        total.merge_batch(&batch(&[1]), Some(Stamp { start_ns: 400, now_ns: 500 })).unwrap();
        assert_eq!(stamps(&total, 1), Some((400, 500)));
        assert_eq!(total.requests(), 3, "1 for series 1 since its return, 2 for series 2");
    }

    fn labels(i: usize) -> Vec<String> {
        vec![format!("w{i}"); 25]
    }

    fn m(ms: f64) -> Measurement {
        Measurement { duration_ms: ms, request_bytes: 100, response_bytes: 2_000, traced: None }
    }

    #[test]
    fn histogram_buckets_are_upper_inclusive() {
        let mut h = Histogram::default();
        for v in [0.0, 0.5, 0.6, 1.0, 5_000_000.0] {
            h.record(v);
        }
        assert_eq!(h.buckets.len(), 20);
        assert_eq!(&h.buckets[..3], &[2, 2, 0]);
        assert_eq!(h.buckets[19], 1);
        assert_eq!((h.count, h.sum), (5, 5_000_002.1));
    }

    #[test]
    fn records_per_label_set() {
        let mut a = Aggregator::new(10);
        a.record(&labels(1), &m(3.0));
        a.record(&labels(1), &m(30.0));
        a.record(&labels(2), &m(3.0));
        assert_eq!((a.len(), a.requests()), (2, 3));
        let want = labels(1);
        let (_, d) = a.series().find(|(l, _)| l.is_some_and(|l| l.iter().map(|v| &**v).eq(want.iter()))).unwrap();
        assert_eq!(d.requests, 2);
        let dur = d.duration.as_ref().unwrap();
        assert_eq!((dur.count, dur.sum), (2, 33.0));
        assert_eq!(dur.buckets[2] + dur.buckets[5], 2, "3 ms in (1,5], 30 ms in (25,50]");
        assert_eq!(d.request_bytes.as_ref().unwrap().sum, 200.0);
    }

    #[test]
    fn caps_series_and_folds_the_rest_into_overflow() {
        let mut a = Aggregator::new(3);
        for i in 0..10 {
            a.record(&labels(i), &m(1.0));
        }
        a.record(&labels(0), &m(1.0));
        assert_eq!(a.len(), 4, "3 series plus overflow");
        assert_eq!(a.requests(), 11, "nothing is lost");
        assert_eq!(a.take_folded(), 7);
        assert_eq!(a.take_folded(), 0);
        let (_, o) = a.series().find(|(l, _)| l.is_none()).unwrap();
        assert_eq!(o.requests, 7);
    }

    #[test]
    fn merge_keeps_admitted_series_and_respects_the_cap() {
        let mut total = Aggregator::new(2);
        let mut a = Aggregator::new(5);
        a.record(&labels(1), &m(1.0));
        a.record(&labels(2), &m(1.0));
        total.merge_deltas(&a, None);
        let mut b = Aggregator::new(5);
        b.record(&labels(3), &m(1.0));
        b.record(&labels(1), &m(1.0));
        total.merge_deltas(&b, None);
        assert_eq!(total.requests(), 4);
        assert_eq!(total.len(), 3);
        assert_eq!(total.take_folded(), 1, "label set 3 came after the cap");
    }

    #[test]
    fn exponential_histograms_merge_through_batches_as_if_one_worker_recorded_all() {
        // Four workers, each its own range of durations (so each its own scale).
        let durations = |w: usize| (1..300).map(move |i| 10f64.powi(w as i32 - 1) * (1.0 + f64::from(i) * 0.01));
        let (mut leader, mut one) = (Aggregator::new(10), Aggregator::new(10).recording(Histograms::Both));
        for w in 0..4 {
            let mut worker = Aggregator::new(10).recording(Histograms::Exponential);
            for ms in durations(w) {
                worker.record(&labels(0), &m(ms));
                one.record(&labels(0), &m(ms));
            }
            leader.merge_batch(&worker.encode_batch(), None).unwrap();
        }
        let merged = leader.series().next().unwrap().1;
        let all = one.series().next().unwrap().1;
        assert!(merged.duration.is_none(), "only the kind asked for is recorded");
        let (h, expected) = (merged.duration_exp.as_ref().unwrap(), all.duration_exp.as_ref().unwrap());
        assert_eq!(
            (h.scale, h.offset, &h.counts, h.count),
            (expected.scale, expected.offset, &expected.counts, 4 * 299)
        );
        assert!((h.sum - expected.sum).abs() < 1e-6);
        assert_eq!(all.duration.as_ref().unwrap().count, 4 * 299, "both kinds side by side");
    }

    #[test]
    fn batches_round_trip_under_the_readers_cap() {
        let mut a = Aggregator::new(4);
        for i in 0..4 {
            a.record(&labels(i), &m(i as f64));
        }
        let mut back = Aggregator::new(2);
        back.merge_batch(&a.encode_batch(), None).unwrap();
        assert_eq!(back.requests(), 4);
        assert_eq!(back.len(), 3, "two series and the overflow");
        assert_eq!(back.take_folded(), 2);
    }
}
