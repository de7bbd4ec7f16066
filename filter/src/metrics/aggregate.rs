//! Aggregation of Istio's request metrics per label set, with a cap on the number of series.
//!
//! The same types serve three places: a worker's local deltas, the deltas merged from all
//! workers in the proxy's shared data, and the exporting worker's cumulative totals.

use std::rc::Rc;

use foldhash::fast::RandomState;
use hashbrown::{Equivalent, HashMap, HashSet};
use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
use prost::Message;

use crate::otlp::wire::Writer;

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
        key.0.len() == self.0.len() && key.0.iter().zip(self.0).all(|(a, b)| a.as_ref() == b.as_ref())
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
}

impl SeriesData {
    fn record(&mut self, m: &Measurement) {
        self.requests += 1;
        self.duration.get_or_insert_with(Histogram::default).record(m.duration_ms);
        self.request_bytes.get_or_insert_with(Histogram::default).record(m.request_bytes as f64);
        self.response_bytes.get_or_insert_with(Histogram::default).record(m.response_bytes as f64);
    }

    fn merge(&mut self, other: &SeriesData) {
        self.requests += other.requests;
        let merge = |a: &mut Option<Histogram>, b: &Option<Histogram>| {
            if let Some(b) = b {
                a.get_or_insert_with(Histogram::default).merge(b);
            }
        };
        merge(&mut self.duration, &other.duration);
        merge(&mut self.request_bytes, &other.request_bytes);
        merge(&mut self.response_bytes, &other.response_bytes);
    }
}

// Field numbers of `SharedAggregate` and `SharedSeries`, for the series-by-series writer and reader.
const SHARED_SERIES: u32 = 1;
const SHARED_SINCE: u32 = 2;
const SERIES_LABELS: u32 = 1;
const SERIES_OVERFLOW: u32 = 2;
const SERIES_DATA: u32 = 3;

#[derive(Clone, PartialEq, Message)]
struct SharedSeries {
    #[prost(string, repeated, tag = "1")]
    labels: Vec<String>,
    #[prost(bool, tag = "2")]
    overflow: bool,
    #[prost(message, optional, tag = "3")]
    data: Option<SeriesData>,
}

/// The shared-data entry's schema: what [`Aggregator::encode`] writes and [`Aggregator::decode`]
/// reads series by series (the tests hold both to it).
#[cfg(test)]
#[derive(Clone, PartialEq, Message)]
struct SharedAggregate {
    #[prost(message, repeated, tag = "1")]
    series: Vec<SharedSeries>,
    #[prost(uint64, tag = "2")]
    since_unix_nanos: u64,
}

/// Series per label set, at most `max_series` of them; past that, new label sets are folded
/// into one overflow series (OpenTelemetry's cardinality limit), and a label set once admitted
/// keeps its own series.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Aggregator {
    // foldhash: several times faster than SipHash over the 25 label strings hashed per request,
    // and seeded per process, so peers cannot choose colliding label values ahead of time.
    series: HashMap<SeriesKey, SeriesData, RandomState>,
    /// The distinct label values of `series`, one allocation each.
    strings: HashSet<Rc<str>, RandomState>,
    overflow: Option<SeriesData>,
    max_series: usize,
    folded: u64,
}

impl Aggregator {
    /// An empty aggregator admitting at most `max_series` label sets.
    pub fn new(max_series: usize) -> Self {
        Self { max_series, ..Default::default() }
    }

    /// The key of a new series, its values interned.
    fn key<S: AsRef<str>>(&mut self, labels: &[S]) -> SeriesKey {
        let strings = &mut self.strings;
        SeriesKey(
            labels
                .iter()
                .map(|l| match strings.get(l.as_ref()) {
                    Some(s) => s.clone(),
                    None => {
                        let s: Rc<str> = Rc::from(l.as_ref());
                        strings.insert(s.clone());
                        s
                    }
                })
                .collect(),
        )
    }

    /// Record one request; the label values are copied only for a new series.
    pub fn record<S: AsRef<str>>(&mut self, labels: &[S], m: &Measurement) {
        if let Some(s) = self.series.get_mut(&Borrowed(labels)) {
            s.record(m);
        } else if self.series.len() < self.max_series {
            let key = self.key(labels);
            self.series.entry(key).or_default().record(m);
        } else {
            self.folded += 1;
            self.overflow.get_or_insert_with(SeriesData::default).record(m);
        }
    }

    /// Add everything in `other`, under this aggregator's cap.
    pub fn merge(&mut self, other: &Aggregator) {
        for (labels, data) in &other.series {
            self.merge_series(&labels.0, data);
        }
        if let Some(o) = &other.overflow {
            self.merge_overflow(o);
        }
    }

    /// Add one series' data, under the cap.
    fn merge_series<S: AsRef<str>>(&mut self, labels: &[S], data: &SeriesData) {
        if let Some(s) = self.series.get_mut(&Borrowed(labels)) {
            s.merge(data);
        } else if self.series.len() < self.max_series {
            let key = self.key(labels);
            self.series.entry(key).or_default().merge(data);
        } else {
            self.folded += data.requests;
            self.merge_overflow(data);
        }
    }

    fn merge_overflow(&mut self, data: &SeriesData) {
        self.overflow.get_or_insert_with(SeriesData::default).merge(data);
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

    /// Requests folded into the overflow series by this aggregator, and reset that count.
    pub fn take_folded(&mut self) -> u64 {
        std::mem::take(&mut self.folded)
    }

    /// Serialize for the proxy's shared data, with the start of the period it covers: a
    /// `SharedAggregate` written series by series from the labels where they lie (building the
    /// message first would copy every label value once more, at every merge).
    pub fn encode(&self, since_unix_nanos: u64) -> Vec<u8> {
        let mut w = Writer::with_capacity(16 + self.len() * 1_024);
        for (labels, data) in self.series() {
            w.message(SHARED_SERIES, |w| {
                for label in labels.into_iter().flatten() {
                    w.repeated_string(SERIES_LABELS, label);
                }
                w.bool(SERIES_OVERFLOW, labels.is_none());
                w.encoded_message(SERIES_DATA, &data.encode_to_vec());
            });
        }
        w.varint(SHARED_SINCE, since_unix_nanos);
        w.into_bytes()
    }

    /// Deserialize shared data written by [`Aggregator::encode`], under a cap of `max_series`.
    /// Returns the aggregate and the start of its period; `None` for undecodable bytes. Read
    /// series by series, each one's labels moved into the aggregate, so that at most one series
    /// exists twice while decoding.
    pub fn decode(bytes: &[u8], max_series: usize) -> Option<(Aggregator, u64)> {
        let mut agg = Aggregator::new(max_series);
        let mut since = 0;
        let mut buf = bytes;
        while !buf.is_empty() {
            let (tag, wire_type) = decode_key(&mut buf).ok()?;
            match (tag, wire_type) {
                (SHARED_SERIES, WireType::LengthDelimited) => {
                    let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
                    let (one, rest) = buf.split_at_checked(len)?;
                    let s = SharedSeries::decode(one).ok()?;
                    let data = s.data.unwrap_or_default();
                    match s.overflow {
                        false => agg.merge_series(&s.labels, &data),
                        true => agg.merge_overflow(&data),
                    }
                    buf = rest;
                }
                (SHARED_SINCE, WireType::Varint) => since = decode_varint(&mut buf).ok()?,
                _ => skip_field(wire_type, tag, &mut buf, DecodeContext::default()).ok()?,
            }
        }
        agg.folded = 0;
        Some((agg, since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_stored_once_per_aggregator() {
        let mut a = Aggregator::new(10);
        for i in 0..5 {
            let mut l = vec!["same".to_string(); 25];
            l[0] = format!("peer-{i}");
            a.record(&l, &m(1.0));
        }
        assert_eq!(a.len(), 5);
        assert_eq!(a.strings.len(), 6, "the five callers and the one value they share");
        let (b, _) = Aggregator::decode(&a.encode(0), 10).unwrap();
        assert_eq!(b.strings.len(), 6, "decoded values are interned too");
        let mut c = Aggregator::new(10);
        c.merge(&b);
        assert_eq!((c.len(), c.strings.len()), (5, 6));
    }

    #[test]
    fn the_shared_entry_is_written_and_read_as_its_schema() {
        let mut a = Aggregator::new(2);
        let mut with_empty = labels(1);
        with_empty[3] = String::new();
        a.record(&with_empty, &m(3.0));
        a.record(&labels(2), &m(30.0));
        a.record(&labels(3), &m(1.0)); // past the cap: the overflow series
        let bytes = a.encode(42);
        let schema = SharedAggregate::decode(bytes.as_slice()).unwrap();
        assert_eq!(schema.since_unix_nanos, 42);
        assert_eq!(schema.series.len(), 3);
        let own = schema.series.iter().find(|s| s.labels.first().map(String::as_str) == Some("w1")).unwrap();
        assert_eq!(own.labels, with_empty, "empty values keep their place");
        assert!(schema.series.iter().any(|s| s.overflow && s.labels.is_empty()));
        // And what the schema writes reads back the same.
        let (back, since) = Aggregator::decode(&schema.encode_to_vec(), 2).unwrap();
        assert_eq!((since, back.len(), back.requests()), (42, 3, 3));
        let (again, _) = Aggregator::decode(&bytes, 2).unwrap();
        assert_eq!(again, back);
    }

    fn labels(i: usize) -> Vec<String> {
        vec![format!("w{i}"); 25]
    }

    fn m(ms: f64) -> Measurement {
        Measurement { duration_ms: ms, request_bytes: 100, response_bytes: 2_000 }
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
        total.merge(&a);
        let mut b = Aggregator::new(5);
        b.record(&labels(3), &m(1.0));
        b.record(&labels(1), &m(1.0));
        total.merge(&b);
        assert_eq!(total.requests(), 4);
        assert_eq!(total.len(), 3);
        assert_eq!(total.take_folded(), 1, "label set 3 came after the cap");
    }

    #[test]
    fn shared_encoding_round_trips() {
        let mut a = Aggregator::new(2);
        for i in 0..4 {
            a.record(&labels(i), &m(i as f64));
        }
        let (back, since) = Aggregator::decode(&a.encode(42), 2).unwrap();
        assert_eq!(since, 42);
        assert_eq!(back.requests(), 4);
        assert_eq!(back.len(), 3);
        assert!(Aggregator::decode(&[0xff, 0xff, 0xff], 2).is_none());
    }
}
