//! The delta batch: what a worker hands the exporting VM through the shared queue, the series it
//! touched since its last hand-over with each distinct label value written once. Written and read
//! by hand, field for field what prost would write and read for the schema below (the tests hold
//! the two together), so that a worker's data is added where it lies, without a decoded copy.

use std::rc::Rc;

use foldhash::fast::RandomState;
use hashbrown::HashMap;
use prost::encoding::{decode_varint, skip_field, DecodeContext, WireType};
use prost::Message;

use super::aggregate::Aggregator;
use super::series::{keep_exemplar, Exemplar, Histogram, SeriesData, Stamp, BUCKET_BOUNDS};
use crate::metrics::exponential::ExpHistogram;
use crate::wire::Writer;

// Field numbers of `DeltaBatch` and `BatchSeries`, for the writer and reader below.
pub(super) const BATCH_VALUES: u32 = 1;
pub(super) const BATCH_SERIES: u32 = 2;
pub(super) const SERIES_LABELS: u32 = 1;
pub(super) const SERIES_OVERFLOW: u32 = 2;
pub(super) const SERIES_DATA: u32 = 3;

/// One series of a `DeltaBatch`: its labels as positions in the batch's `values`.
#[cfg(test)]
#[derive(Clone, PartialEq, Message)]
pub(super) struct BatchSeries {
    #[prost(uint32, repeated, tag = "1")]
    pub(super) labels: Vec<u32>,
    #[prost(bool, tag = "2")]
    pub(super) overflow: bool,
    #[prost(message, optional, tag = "3")]
    pub(super) data: Option<SeriesData>,
}

/// The schema of what a worker hands the exporting VM: the series it touched since its last
/// hand-over, each distinct label value written once. [`Aggregator::encode_batch`] writes it and
/// [`Aggregator::merge_batch`] reads it without building this message (the tests hold both to it).
#[cfg(test)]
#[derive(Clone, PartialEq, Message)]
pub(super) struct DeltaBatch {
    #[prost(string, repeated, tag = "1")]
    pub(super) values: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    pub(super) series: Vec<BatchSeries>,
}

/// Bytes that are not a batch written by [`Aggregator::encode_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadBatch;

// The batch's series data written and read by hand, field for field what prost's derived
// `Message` of `SeriesData` and `Histogram` writes and reads (the tests hold the two together):
// a worker's data is added into the leader's series where it lies, without a decoded copy (five
// allocations per series through prost).
pub(super) const DATA_REQUESTS: u32 = 1;
pub(super) const DATA_DURATION: u32 = 2;
pub(super) const DATA_REQUEST_BYTES: u32 = 3;
pub(super) const DATA_RESPONSE_BYTES: u32 = 4;
pub(super) const DATA_TCP_OPENED: u32 = 7;
pub(super) const DATA_TCP_CLOSED: u32 = 8;
pub(super) const DATA_TCP_SENT_BYTES: u32 = 9;
pub(super) const DATA_TCP_RECEIVED_BYTES: u32 = 10;
pub(super) const DATA_EXEMPLARS: u32 = 11;
pub(super) const DATA_DURATION_EXP: u32 = 12;
pub(super) const DATA_REQUEST_BYTES_EXP: u32 = 13;
pub(super) const DATA_RESPONSE_BYTES_EXP: u32 = 14;
pub(super) const HISTOGRAM_BUCKETS: u32 = 1;
pub(super) const HISTOGRAM_SUM: u32 = 2;
pub(super) const HISTOGRAM_COUNT: u32 = 3;

impl Histogram {
    pub(super) fn write(&self, w: &mut Writer) {
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
    pub(super) fn merge_encoded(&mut self, mut buf: &[u8]) -> Result<(), BadBatch> {
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
    pub(super) fn write(&self, w: &mut Writer) {
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
    pub(super) fn merge_encoded(&mut self, mut buf: &[u8]) -> Result<(), BadBatch> {
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

impl Aggregator {
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
