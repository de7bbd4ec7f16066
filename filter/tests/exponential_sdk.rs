//! meshtel's exponential histograms against the OpenTelemetry Rust SDK's
//! `Base2ExponentialHistogram` aggregation with the same limits (max size 160, max scale 20):
//! the same values give the same scale, offset and bucket counts, whether meshtel recorded
//! them in one histogram or merged them from several workers.

#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use meshtel_filter::metrics::exponential::{ExpHistogram, MAX_BUCKETS, MAX_SCALE};
use opentelemetry::metrics::MeterProvider;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{
    Aggregation, InMemoryMetricExporterBuilder, Instrument, SdkMeterProvider, Stream, Temporality,
};

/// What the SDK exports for `values`: (scale, zero count, offset, counts).
fn sdk(values: &[f64]) -> (i32, u64, i32, Vec<u64>) {
    let exporter = InMemoryMetricExporterBuilder::new().with_temporality(Temporality::Delta).build();
    let view = |_: &Instrument| {
        Stream::builder()
            .with_aggregation(Aggregation::Base2ExponentialHistogram {
                max_size: MAX_BUCKETS as u32,
                max_scale: MAX_SCALE as i8,
                record_min_max: false,
            })
            .build()
            .ok()
    };
    let provider = SdkMeterProvider::builder().with_periodic_exporter(exporter.clone()).with_view(view).build();
    let histogram = provider.meter("reference").f64_histogram("h").build();
    values.iter().for_each(|v| histogram.record(*v, &[]));
    provider.force_flush().unwrap();
    let exported = exporter.get_finished_metrics().unwrap();
    let metric = exported[0].scope_metrics().next().unwrap().metrics().next().unwrap();
    let AggregatedMetrics::F64(MetricData::ExponentialHistogram(h)) = metric.data() else { panic!("{metric:?}") };
    let p = h.data_points().next().unwrap();
    let bucket = p.positive_bucket();
    (i32::from(p.scale()), p.zero_count(), bucket.offset(), bucket.counts().collect())
}

fn ours(h: &ExpHistogram) -> (i32, u64, i32, Vec<u64>) {
    (h.scale, h.zero_count, h.offset, h.counts.clone())
}

/// Request durations as a proxy sees them: mostly a few ms, a long tail, some zeros.
fn durations(seed: u64, n: usize) -> Vec<f64> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|_| match rng.u8(..100) {
            0 => 0.0,
            1..=90 => 0.2 + rng.f64() * 20.0,
            91..=98 => 20.0 + rng.f64() * 2_000.0,
            _ => 2_000.0 + rng.f64() * 60_000.0,
        })
        .map(|ms: f64| (ms * 1000.0).round() / 1000.0)
        .collect()
}

#[test]
fn records_as_the_sdk_does() {
    for (seed, values) in [
        (1, durations(1, 5_000)),
        (2, durations(2, 50)),
        (3, vec![1.0, 2.0, 4.0, 1024.0]),
        (4, vec![0.001, 0.002, 0.0035]),
        (5, (1..=2_000).map(|b| f64::from(b * 97)).collect()),
        (6, vec![3.0]),
    ] {
        let mut h = ExpHistogram::default();
        values.iter().for_each(|v| h.record(*v));
        assert_eq!(ours(&h), sdk(&values), "values {seed}");
        assert_eq!(h.count, values.len() as u64);
    }
}

#[test]
fn merged_from_workers_equals_the_sdk_recording_everything() {
    // Four workers with different ranges, so at different scales before the merge.
    let workers = [durations(10, 2_000), vec![0.5, 0.51, 0.52], durations(11, 300), vec![45_000.0, 59_000.0]];
    let mut merged = ExpHistogram::default();
    for values in &workers {
        let mut h = ExpHistogram::default();
        values.iter().for_each(|v| h.record(*v));
        merged.merge(&h);
    }
    let all: Vec<f64> = workers.concat();
    assert_eq!(ours(&merged), sdk(&all));
    assert_eq!(merged.count, all.len() as u64);
}
