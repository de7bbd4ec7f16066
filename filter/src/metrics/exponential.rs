//! Base-2 exponential histograms, the OTLP `ExponentialHistogram` point
//! (<https://opentelemetry.io/docs/specs/otel/metrics/data-model/#exponentialhistogram>).
//!
//! Bucket `index` at `scale` holds the values in `(base^index, base^(index+1)]`, with
//! `base = 2^(2^-scale)`. A histogram starts at [`MAX_SCALE`] and halves its resolution
//! (scale - 1 merges each pair of buckets) whenever its values would need more than
//! [`MAX_BUCKETS`] buckets, as the SDKs' `Base2ExponentialHistogram` aggregation does with its
//! defaults (max size 160, max scale 20). Two histograms merge at the smaller of their scales,
//! further reduced until their union fits: a worker's and the leader's, whatever each has seen.

use prost::Message;

use crate::wire::Writer;

/// The finest scale: 2^20 buckets per power of two (the SDKs' default `max_scale`).
pub const MAX_SCALE: i32 = 20;
/// The coarsest scale: one bucket per 2^1024, which holds every finite double.
pub const MIN_SCALE: i32 = -10;
/// Most buckets of a histogram (the SDKs' default `max_size`).
pub const MAX_BUCKETS: usize = 160;

/// One base-2 exponential histogram of non-negative values, its positive range only.
///
/// Also the schema of its place in a worker's delta batch.
#[derive(Clone, PartialEq, Message)]
pub struct ExpHistogram {
    /// Resolution of `counts`; meaningless while `counts` is empty.
    #[prost(sint32, tag = "1")]
    pub scale: i32,
    /// Values too small for a bucket: zero (and, were any recorded, subnormals).
    #[prost(uint64, tag = "2")]
    pub zero_count: u64,
    /// Index of `counts[0]`.
    #[prost(sint32, tag = "3")]
    pub offset: i32,
    /// Counts of the buckets `offset..offset + counts.len()`.
    #[prost(uint64, repeated, tag = "4")]
    pub counts: Vec<u64>,
    /// Sum of recorded values.
    #[prost(double, tag = "5")]
    pub sum: f64,
    /// Number of recorded values, `zero_count` included.
    #[prost(uint64, tag = "6")]
    pub count: u64,
}

/// The bucket of a positive normal `value` at `scale`.
///
/// As the specification's mappings compute it, and as the Rust SDK does to the bit: for
/// `scale <= 0` from the IEEE exponent alone, an exact power of two belonging to the bucket
/// below; above, from the exponent and the natural logarithm of the significand (in `[0.5, 1)`,
/// where `ln` is most precise), exact powers of two exactly
/// (<https://opentelemetry.io/docs/specs/otel/metrics/data-model/#all-scales-use-the-logarithm-function>).
pub fn index(value: f64, scale: i32) -> i32 {
    let bits = value.to_bits();
    // Normal values only (the caller counts the rest as zeros): the biased exponent is 1..=2046.
    let exponent = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let significand = bits & ((1 << 52) - 1);
    if scale <= 0 {
        return (exponent - i32::from(significand == 0)) >> -scale;
    }
    if significand == 0 {
        return (exponent << scale) - 1;
    }
    // value = fraction * 2^(exponent + 1), fraction in (0.5, 1): its logarithm is negative, and
    // the cast truncates it upwards, which is the spec's ceil(log) - 1 for a value off a boundary.
    let fraction = f64::from_bits(significand | (1022 << 52));
    let scale_factor = f64::from(1u32 << scale) * std::f64::consts::LOG2_E;
    ((exponent + 1) << scale) + (fraction.ln() * scale_factor) as i32 - 1
}

/// The lower boundary of bucket `index` at `scale` (exclusive: the bucket holds larger values).
pub fn lower_boundary(index: i32, scale: i32) -> f64 {
    (f64::from(index) / f64::from(scale).exp2()).exp2()
}

impl ExpHistogram {
    /// Record one value. Non-positive and subnormal values (and NaN) count as zeros.
    pub fn record(&mut self, value: f64) {
        self.count += 1;
        if value.is_nan() || value < f64::MIN_POSITIVE {
            self.zero_count += 1;
            return;
        }
        self.sum += value;
        if self.counts.is_empty() {
            self.scale = MAX_SCALE;
            self.offset = index(value, self.scale);
            self.counts.push(1);
            return;
        }
        let mut i = index(value, self.scale);
        let change = self.change_to_fit(i, i);
        if change > 0 {
            self.downscale(change);
            i = index(value, self.scale);
        }
        self.widen(i, i);
        self.counts[(i - self.offset) as usize] += 1;
    }

    /// Add another histogram, at the scale that holds both.
    pub fn merge(&mut self, other: &ExpHistogram) {
        self.count = self.count.saturating_add(other.count);
        self.zero_count = self.zero_count.saturating_add(other.zero_count);
        self.sum += other.sum;
        if other.counts.is_empty() {
            return;
        }
        if self.counts.is_empty() {
            self.scale = other.scale;
            self.offset = other.offset;
            self.counts.clone_from(&other.counts);
            return;
        }
        let target = self.scale.min(other.scale);
        self.downscale(self.scale - target);
        let mut shift = other.scale - target;
        let (low, high) = (other.offset >> shift, other.last() >> shift);
        let change = self.change_to_fit(low, high);
        self.downscale(change);
        shift += change;
        self.widen(other.offset >> shift, other.last() >> shift);
        for (k, c) in other.counts.iter().enumerate() {
            let i = (other.offset + k as i32) >> shift;
            let slot = &mut self.counts[(i - self.offset) as usize];
            *slot = slot.saturating_add(*c);
        }
    }

    /// Forget everything recorded; the next value starts again at [`MAX_SCALE`].
    pub fn clear(&mut self) {
        self.counts.clear();
        self.offset = 0;
        self.scale = 0;
        self.zero_count = 0;
        self.sum = 0.0;
        self.count = 0;
    }

    /// Whether its fields are ones [`Self::record`] and [`Self::merge`] could have produced: a
    /// batch from another VM is read only if so.
    pub fn is_valid(&self) -> bool {
        // Only buckets a double can fall in: then any two histograms fit together at some scale
        // down to MIN_SCALE, and a merge never grows past MAX_BUCKETS.
        self.counts.is_empty()
            || ((MIN_SCALE..=MAX_SCALE).contains(&self.scale)
                && self.counts.len() <= MAX_BUCKETS
                && self.offset >= index(f64::MIN_POSITIVE, self.scale)
                && self
                    .offset
                    .checked_add(self.counts.len() as i32 - 1)
                    .is_some_and(|last| last <= index(f64::MAX, self.scale)))
    }

    /// Index of the last bucket (`counts` not empty).
    fn last(&self) -> i32 {
        self.offset + self.counts.len() as i32 - 1
    }

    /// How many halvings of the scale make the buckets `low..=high` fit beside the ones held.
    fn change_to_fit(&self, low: i32, high: i32) -> i32 {
        let (mut low, mut high) = (low.min(self.offset), high.max(self.last()));
        let mut change = 0;
        while i64::from(high) - i64::from(low) >= MAX_BUCKETS as i64 && self.scale - change > MIN_SCALE {
            low >>= 1;
            high >>= 1;
            change += 1;
        }
        change
    }

    /// Lower the scale by `change`, merging the buckets each new one covers.
    fn downscale(&mut self, change: i32) {
        if change <= 0 || self.counts.is_empty() {
            return;
        }
        let offset = self.offset >> change;
        let mut counts = vec![0; ((self.last() >> change) - offset + 1) as usize];
        for (k, c) in self.counts.iter().enumerate() {
            counts[(((self.offset + k as i32) >> change) - offset) as usize] += c;
        }
        self.offset = offset;
        self.counts = counts;
        self.scale -= change;
    }

    /// Make room for the buckets `low..=high` (they fit: see [`Self::change_to_fit`]).
    fn widen(&mut self, low: i32, high: i32) {
        if low < self.offset {
            let before = (self.offset - low) as usize;
            self.counts.splice(0..0, std::iter::repeat_n(0, before));
            self.offset = low;
        }
        if high > self.last() {
            let len = (high - self.offset + 1) as usize;
            self.counts.resize(len, 0);
        }
    }

    /// The bucket boundaries `(lower, upper]` of `counts[k]`.
    pub fn bounds(&self, k: usize) -> (f64, f64) {
        let i = self.offset + k as i32;
        (lower_boundary(i, self.scale), lower_boundary(i + 1, self.scale))
    }

    /// Write it as prost writes the message (the batch's hand-written writer; tests hold the two
    /// together).
    pub(crate) fn write(&self, w: &mut Writer) {
        w.sint32(1, self.scale);
        w.varint(2, self.zero_count);
        w.sint32(3, self.offset);
        w.packed_varint(4, &self.counts);
        if self.sum != 0.0 {
            w.double(5, self.sum);
        }
        w.varint(6, self.count);
    }

    /// Decode and check one written by a VM of this proxy.
    pub fn decode_checked(bytes: &[u8]) -> Option<Self> {
        Self::decode(bytes).ok().filter(Self::is_valid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(values: impl IntoIterator<Item = f64>) -> ExpHistogram {
        let mut h = ExpHistogram::default();
        values.into_iter().for_each(|v| h.record(v));
        h
    }

    /// Each value lies in the bucket it was counted in (to a relative 1e-12: the boundaries are
    /// computed, and the mapping may be one bucket off right at one, as in the SDKs).
    fn assert_holds(h: &ExpHistogram, values: &[f64]) {
        for v in values.iter().filter(|v| **v > 0.0) {
            let k = (index(*v, h.scale) - h.offset) as usize;
            assert!(h.counts[k] > 0, "{v}: its bucket is counted");
            let (low, high) = h.bounds(k);
            assert!(*v > low * (1.0 - 1e-12) && *v <= high * (1.0 + 1e-12), "{v} in ({low}, {high}]");
        }
    }

    #[test]
    fn mapping_follows_the_specifications_examples() {
        // Scale 0: bucket i is (2^i, 2^(i+1)], powers of two at the top of their bucket.
        assert_eq!([1.0, 1.5, 2.0, 3.0, 4.0, 0.5].map(|v| index(v, 0)), [-1, 0, 0, 1, 1, -2]);
        // Scale -1: (4^i, 4^(i+1)].
        assert_eq!([1.0, 4.0, 5.0, 16.0, 17.0].map(|v| index(v, -1)), [-1, 0, 1, 1, 2]);
        // Scale 1: (sqrt2^i, sqrt2^(i+1)].
        assert_eq!([1.0, 1.4, 1.5, 2.0, 2.5, 3.0, 4.0].map(|v| index(v, 1)), [-1, 0, 1, 1, 2, 3, 3]);
        // The extremes of the double range.
        assert_eq!(index(f64::MAX, 0), 1023);
        assert_eq!(index(f64::MAX, MAX_SCALE), (1024 << MAX_SCALE) - 1);
        assert_eq!(index(f64::MIN_POSITIVE, MIN_SCALE), -1);
        assert_eq!(index(f64::MAX, MIN_SCALE), 0);
        for scale in MIN_SCALE..=MAX_SCALE {
            for v in [0.001, 0.5, 1.0, 3.0, 7.5, 1000.0, 123_456.0, 3.6e6] {
                let i = index(v, scale);
                let (low, high) = (lower_boundary(i, scale), lower_boundary(i + 1, scale));
                assert!(v > low * (1.0 - 1e-12) && v <= high * (1.0 + 1e-12), "scale {scale}: {v} in ({low}, {high}]");
            }
        }
    }

    #[test]
    fn starts_at_the_finest_scale_and_downscales_to_fit() {
        let h = recorded([1.5]);
        assert_eq!((h.scale, h.counts.len(), h.count), (MAX_SCALE, 1, 1));
        // 1 ms to 10 s is 13.3 powers of two: 160 buckets fit at scale 3 (8 per power of two).
        let values: Vec<f64> = (0..2_000).map(|i| 1.0 + f64::from(i) * 5.0).collect();
        let h = recorded(values.iter().copied());
        assert_eq!(h.scale, 3);
        assert!(h.counts.len() <= MAX_BUCKETS);
        assert_eq!(h.counts.iter().sum::<u64>(), 2_000);
        assert_eq!(h.sum, values.iter().sum::<f64>());
        assert_holds(&h, &values);
        // The whole double range still fits.
        let h = recorded([f64::MIN_POSITIVE, 1.0, f64::MAX]);
        assert!(h.scale >= MIN_SCALE && h.counts.len() <= MAX_BUCKETS);
        assert_eq!(h.counts.iter().sum::<u64>(), 3);
    }

    #[test]
    fn zeros_and_values_without_a_bucket_go_to_the_zero_count() {
        let h = recorded([0.0, -1.0, f64::NAN, 5e-324, 2.0]);
        assert_eq!((h.zero_count, h.count, h.counts.iter().sum::<u64>()), (4, 5, 1));
        assert_eq!(h.sum, 2.0, "only positive values add to the sum");
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        // Two workers that saw different ranges: one narrow and fine, one wide and coarse.
        let a: Vec<f64> = (1..200).map(|i| 10.0 + f64::from(i) * 0.001).collect();
        let b: Vec<f64> = (1..500).map(|i| f64::from(i).powi(3)).collect();
        let (mut ha, hb) = (recorded(a.iter().copied()), recorded(b.iter().copied()));
        assert!(ha.scale > hb.scale);
        ha.merge(&hb);
        let all = recorded(a.iter().chain(&b).copied());
        assert_eq!(ha.count, all.count);
        assert_eq!(ha.counts.iter().sum::<u64>(), all.counts.iter().sum::<u64>());
        assert!(ha.counts.len() <= MAX_BUCKETS);
        assert_holds(&ha, &[a, b].concat());
        // Merged the other way round, the same.
        let mut hb2 = recorded((1..500).map(|i| f64::from(i).powi(3)));
        hb2.merge(&recorded((1..200).map(|i| 10.0 + f64::from(i) * 0.001)));
        assert_eq!((hb2.scale, hb2.offset, &hb2.counts), (ha.scale, ha.offset, &ha.counts));
        // Empty sides change nothing but the counts they carry.
        let mut e = ExpHistogram::default();
        e.merge(&ha);
        assert_eq!(e, ha);
        ha.merge(&ExpHistogram { zero_count: 2, count: 2, ..Default::default() });
        assert_eq!((ha.zero_count, ha.count), (e.zero_count + 2, e.count + 2));
    }

    #[test]
    fn merges_disjoint_ranges_far_apart() {
        let mut h = recorded([1e-3]);
        h.merge(&recorded([1e9]));
        assert_eq!(h.counts.iter().sum::<u64>(), 2);
        assert!(h.counts.len() <= MAX_BUCKETS);
        assert_holds(&h, &[1e-3, 1e9]);
    }

    #[test]
    fn cleared_starts_again_at_the_finest_scale() {
        let mut h = recorded([1.0, 1e6]);
        assert!(h.scale < MAX_SCALE);
        h.clear();
        assert_eq!(h, ExpHistogram::default());
        h.record(3.0);
        assert_eq!(h.scale, MAX_SCALE);
    }

    #[test]
    fn is_written_as_prost_writes_it() {
        for h in [
            recorded([1.0, 2.0, 700.0, 0.0]),
            recorded([1e-3, 1e9]),
            ExpHistogram { scale: -3, offset: -7, counts: vec![0, 4], ..Default::default() },
            ExpHistogram::default(),
        ] {
            let mut w = Writer::default();
            h.write(&mut w);
            assert_eq!(w.into_bytes(), h.encode_to_vec(), "{h:?}");
        }
    }

    #[test]
    fn batches_from_elsewhere_are_checked() {
        let good = recorded([1.0, 2.0, 700.0]);
        assert_eq!(ExpHistogram::decode_checked(&good.encode_to_vec()), Some(good));
        for bad in [
            ExpHistogram { scale: 21, counts: vec![1], ..Default::default() },
            ExpHistogram { scale: -11, counts: vec![1], ..Default::default() },
            ExpHistogram { counts: vec![1; MAX_BUCKETS + 1], ..Default::default() },
            ExpHistogram { offset: i32::MAX, counts: vec![1, 1], ..Default::default() },
            // Buckets no double falls in, at the coarsest scale and at scale 0.
            ExpHistogram { scale: MIN_SCALE, offset: i32::MIN, counts: vec![1], ..Default::default() },
            ExpHistogram { scale: 0, offset: 1024, counts: vec![1], ..Default::default() },
            ExpHistogram { scale: 0, offset: -1024, counts: vec![1], ..Default::default() },
        ] {
            assert_eq!(ExpHistogram::decode_checked(&bad.encode_to_vec()), None, "{bad:?}");
        }
        assert_eq!(ExpHistogram::decode_checked(b"\xff"), None);
        // The widest valid ones still merge within MAX_BUCKETS.
        let mut low = ExpHistogram {
            scale: MIN_SCALE,
            offset: index(f64::MIN_POSITIVE, MIN_SCALE),
            counts: vec![1],
            ..Default::default()
        };
        let high = ExpHistogram {
            scale: MAX_SCALE,
            offset: index(f64::MAX, MAX_SCALE),
            counts: vec![1],
            ..Default::default()
        };
        assert!(low.is_valid() && high.is_valid());
        low.merge(&high);
        assert!(low.counts.len() <= MAX_BUCKETS && low.counts.iter().sum::<u64>() == 2);
    }
}
