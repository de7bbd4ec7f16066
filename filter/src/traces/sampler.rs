//! Parent-based sampling with a trace-id ratio for new traces.
//!
//! The ratio decision is a pure function of the trace id (as in OpenTelemetry's
//! `TraceIdRatioBased`), so every meshtel hop that sees the same new trace decides alike.

use crate::traces::trace_context::TraceId;

/// Samples a fraction of new traces, keyed on the low 8 bytes of the trace id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RatioSampler {
    threshold: u64,
}

impl RatioSampler {
    /// A sampler keeping `ratio` (clamped to 0..=1) of new traces.
    pub fn new(ratio: f64) -> Self {
        let ratio = ratio.clamp(0.0, 1.0);
        // Compare 63 random bits against ratio * 2^63; ratio 1.0 gives 2^63, above every value.
        let threshold = (ratio * (1u64 << 63) as f64) as u64;
        Self { threshold }
    }

    /// Whether a new trace with this id is sampled.
    pub fn samples(&self, trace_id: &TraceId) -> bool {
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id.0[8..]);
        (u64::from_be_bytes(low) >> 1) < self.threshold
    }

    /// Parent-based decision: keep the caller's decision when it made one.
    pub fn decide(&self, incoming: Option<bool>, trace_id: &TraceId) -> bool {
        incoming.unwrap_or_else(|| self.samples(trace_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(low: u64) -> TraceId {
        let mut b = [0u8; 16];
        b[0] = 1;
        b[8..].copy_from_slice(&low.to_be_bytes());
        TraceId(b)
    }

    #[test]
    fn ratio_one_samples_everything_and_zero_nothing() {
        for low in [0, 1, u64::MAX / 2, u64::MAX] {
            assert!(RatioSampler::new(1.0).samples(&id(low)));
            assert!(!RatioSampler::new(0.0).samples(&id(low)));
        }
    }

    #[test]
    fn ratio_splits_on_the_trace_id() {
        let s = RatioSampler::new(0.5);
        assert!(s.samples(&id(u64::MAX / 2 - 10)));
        assert!(!s.samples(&id(u64::MAX / 2 + 10)));
        assert_eq!(s.samples(&id(12345)), s.samples(&id(12345)), "deterministic");
    }

    #[test]
    fn ratio_is_close_to_requested_over_many_ids() {
        let s = RatioSampler::new(0.1);
        let mut rng = fastrand::Rng::with_seed(7);
        let n = 100_000;
        let kept = (0..n).filter(|_| s.samples(&id(rng.u64(..)))).count();
        assert!((9_000..11_000).contains(&kept), "{kept}");
    }

    #[test]
    fn incoming_decision_wins() {
        assert!(RatioSampler::new(0.0).decide(Some(true), &id(1)));
        assert!(!RatioSampler::new(1.0).decide(Some(false), &id(1)));
        assert!(RatioSampler::new(1.0).decide(None, &id(1)));
    }
}
