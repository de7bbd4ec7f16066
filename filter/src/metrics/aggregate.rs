//! Aggregation of Istio's request metrics per label set, with a cap on the number of series.
//!
//! The same types serve three places: a worker's local deltas, the deltas merged from all
//! workers in the proxy's shared data, and the exporting worker's cumulative totals.

use std::cell::RefCell;
use std::rc::Rc;

pub use super::series::{Exemplar, Histogram, Measurement, SeriesData, Stamp, TcpDelta, BUCKET_BOUNDS, MAX_EXEMPLARS};
use crate::config::Histograms;
use foldhash::fast::RandomState;
use hashbrown::{Equivalent, HashMap, HashSet};

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

/// Label values shared by the aggregators of one VM, one allocation each: a worker's deltas
/// and the exporting VM's totals point at the same copy.
#[derive(Debug, Clone, Default)]
pub struct Values(Rc<RefCell<HashSet<Rc<str>, RandomState>>>);

impl Values {
    /// The one copy of `value`.
    pub(super) fn intern(&self, value: &str) -> Rc<str> {
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
    pub(super) values: Values,
    pub(super) overflow: Option<SeriesData>,
    max_series: usize,
    pub(super) folded: u64,
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
    pub(super) fn update<S: AsRef<str>, R>(&mut self, labels: &[S], f: impl FnOnce(&mut SeriesData) -> R) -> Option<R> {
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

    pub(super) fn merge_overflow(&mut self, data: &SeriesData) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::batch::*;
    use crate::metrics::exponential::ExpHistogram;
    use crate::wire::Writer;
    use prost::Message;

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
