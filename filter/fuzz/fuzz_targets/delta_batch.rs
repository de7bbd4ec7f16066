//! Any bytes as a delta batch off the shared queue: read or refused, never a panic, and what was
//! read writes a batch that reads back to the same totals.
#![no_main]

use meshtel_filter::metrics::aggregate::{Aggregator, Stamp};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut totals = Aggregator::new(16);
    let _ = totals.merge_batch(data, Some(Stamp { start_ns: 1, now_ns: 2 }));
    let mut again = Aggregator::new(16);
    assert!(again.merge_batch(&totals.encode_batch(), None).is_ok(), "our own batch reads back");
    assert_eq!(again.requests(), totals.requests());
    totals.clear_deltas();
    let _ = totals.expire(2);
});
