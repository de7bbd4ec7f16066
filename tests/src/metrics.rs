//! A flat view of received OTLP metrics, and the sums the tests assert on.

use std::collections::{BTreeMap, HashMap};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, AggregationTemporality};

use base64::Engine;
use prost::Message;
use prost_types::{value::Kind, Struct, Value};

use crate::collector::value_string;
use crate::envoy::Node;

/// An `x-envoy-peer-metadata` value as an Istio sidecar sends it: base64 of a `Struct` of its
/// node metadata, for the workload `{app}-v1` in `namespace` (as [`Node::sidecar`] describes it).
pub fn peer_metadata(app: &str, namespace: &str) -> String {
    peer_metadata_of(&Node::sidecar(app, namespace))
}

/// The `x-envoy-peer-metadata` value of a proxy's node metadata.
pub fn peer_metadata_of(node: &Node) -> String {
    fn to_value(v: &serde_json::Value) -> Value {
        let kind = match v {
            serde_json::Value::Object(map) => {
                Kind::StructValue(Struct { fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect() })
            }
            serde_json::Value::String(s) => Kind::StringValue(s.clone()),
            other => Kind::StringValue(other.to_string()),
        };
        Value { kind: Some(kind) }
    }
    let Some(Kind::StructValue(st)) = to_value(&node.metadata).kind else { return String::new() };
    base64::engine::general_purpose::STANDARD.encode(st.encode_to_vec())
}

/// One data point of one export.
#[derive(Debug, Clone)]
pub struct Point {
    /// Metric name.
    pub metric: String,
    /// Metric unit.
    pub unit: String,
    /// Point attributes (Istio labels), as strings.
    pub labels: BTreeMap<String, String>,
    /// `service.instance.id` of the resource.
    pub instance: String,
    /// Start of the period.
    pub start: u64,
    /// End of the period.
    pub time: u64,
    /// Whether the point is cumulative.
    pub cumulative: bool,
    /// Counter value, or histogram count.
    pub value: u64,
    /// Histogram sum.
    pub sum: f64,
    /// Histogram bucket counts.
    pub buckets: Vec<u64>,
    /// Histogram bounds.
    pub bounds: Vec<f64>,
    /// An exponential histogram's scale, offset and zero count (its positive bucket counts are
    /// `buckets`).
    pub exponential: Option<Exponential>,
}

/// What an exponential histogram point has beside its bucket counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exponential {
    /// Resolution: bucket `i` is `(2^(i/2^scale), 2^((i+1)/2^scale)]`.
    pub scale: i32,
    /// Index of the first bucket count.
    pub offset: i32,
    /// Values counted as zero.
    pub zero_count: u64,
}

/// The bucket of `value` at `scale` by the data model's definition, computed independently of
/// meshtel: `ceil(log2(value) * 2^scale) - 1` (`log2` is exact at powers of two).
pub fn exponential_index(value: f64, scale: i32) -> i32 {
    (value.log2() * 2f64.powi(scale)).ceil() as i32 - 1
}

/// One exponential series as [`exponential_series`] reads it: (labels, scale, zero count,
/// bucket counts by index).
pub type ExponentialSeries = (BTreeMap<String, String>, i32, u64, BTreeMap<i32, u64>);

/// The histogram of an exponential `metric` series as the points say: the latest point of a
/// cumulative series, or its delta points summed at the coarsest scale among them.
pub fn exponential_series(points: &[Point], metric: &str) -> Vec<ExponentialSeries> {
    let mut out = Vec::new();
    for p in series(points, metric) {
        let same = |q: &&Point| q.metric == metric && q.labels == p.labels && q.instance == p.instance;
        let mine: Vec<&Point> = points.iter().filter(same).collect();
        let chosen: Vec<&Point> =
            if p.cumulative { mine.iter().copied().filter(|q| q.time == p.time).take(1).collect() } else { mine };
        let exp = |q: &Point| q.exponential.expect("an exponential histogram point");
        let scale = chosen.iter().map(|q| exp(q).scale).min().unwrap_or(0);
        let mut buckets = BTreeMap::new();
        let mut zeros = 0;
        for q in chosen {
            let e = exp(q);
            zeros += e.zero_count;
            for (k, c) in q.buckets.iter().enumerate().filter(|(_, c)| **c > 0) {
                *buckets.entry((e.offset + k as i32) >> (e.scale - scale)).or_default() += c;
            }
        }
        out.push((p.labels.clone(), scale, zeros, buckets));
    }
    out
}

impl Point {
    /// A label's value, `""` when absent.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map(String::as_str).unwrap_or("")
    }
}

/// Flatten exports into points.
pub fn flatten(exports: &[ExportMetricsServiceRequest]) -> Vec<Point> {
    let mut out = Vec::new();
    for export in exports {
        for rm in &export.resource_metrics {
            let instance = rm
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.instance.id"))
                .and_then(|kv| value_string(&kv.value))
                .unwrap_or_default();
            for m in rm.scope_metrics.iter().flat_map(|sm| &sm.metrics) {
                metric_points(m, &instance, &mut out);
            }
        }
    }
    out
}

/// The points of one metric, each a [`Point`] of `instance`.
fn metric_points(m: &opentelemetry_proto::tonic::metrics::v1::Metric, instance: &str, out: &mut Vec<Point>) {
    let point = |attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue], start, time, temporality: i32| Point {
        metric: m.name.clone(),
        unit: m.unit.clone(),
        labels: attrs.iter().map(|kv| (kv.key.clone(), value_string(&kv.value).unwrap_or_default())).collect(),
        instance: instance.to_string(),
        start,
        time,
        cumulative: temporality == AggregationTemporality::Cumulative as i32,
        value: 0,
        sum: 0.0,
        buckets: Vec::new(),
        bounds: Vec::new(),
        exponential: None,
    };
    match &m.data {
        Some(metric::Data::Sum(sum)) => {
            for p in &sum.data_points {
                let value = match p.value {
                    Some(number_data_point::Value::AsInt(v)) => v as u64,
                    Some(number_data_point::Value::AsDouble(v)) => v as u64,
                    None => 0,
                };
                let at = point(&p.attributes, p.start_time_unix_nano, p.time_unix_nano, sum.aggregation_temporality);
                out.push(Point { value, ..at });
            }
        }
        Some(metric::Data::Histogram(h)) => {
            for p in &h.data_points {
                out.push(Point {
                    value: p.count,
                    sum: p.sum.unwrap_or(0.0),
                    buckets: p.bucket_counts.clone(),
                    bounds: p.explicit_bounds.clone(),
                    ..point(&p.attributes, p.start_time_unix_nano, p.time_unix_nano, h.aggregation_temporality)
                });
            }
        }
        Some(metric::Data::ExponentialHistogram(h)) => {
            for p in &h.data_points {
                let positive = p.positive.clone().unwrap_or_default();
                out.push(Point {
                    value: p.count,
                    sum: p.sum.unwrap_or(0.0),
                    buckets: positive.bucket_counts,
                    exponential: Some(Exponential {
                        scale: p.scale,
                        offset: positive.offset,
                        zero_count: p.zero_count,
                    }),
                    ..point(&p.attributes, p.start_time_unix_nano, p.time_unix_nano, h.aggregation_temporality)
                });
            }
        }
        _ => {}
    }
}

/// The current value of every series of `metric`: the latest cumulative point per
/// (instance, labels), or the sum of all delta points.
pub fn series(points: &[Point], metric: &str) -> Vec<Point> {
    let mut by: HashMap<(String, BTreeMap<String, String>), Point> = HashMap::new();
    for p in points.iter().filter(|p| p.metric == metric) {
        let key = (p.instance.clone(), p.labels.clone());
        match by.get_mut(&key) {
            None => {
                by.insert(key, p.clone());
            }
            Some(cur) if p.cumulative => {
                if p.time >= cur.time {
                    *cur = p.clone();
                }
            }
            Some(cur) => {
                cur.value += p.value;
                cur.sum += p.sum;
                // Exponential points' buckets differ from point to point: see `exponential_series`.
                for (a, b) in cur.buckets.iter_mut().zip(&p.buckets).filter(|_| p.exponential.is_none()) {
                    *a += b;
                }
                cur.time = cur.time.max(p.time);
            }
        }
    }
    by.into_values().collect()
}

/// The current total of `metric` over series matching `filter`.
pub fn total(points: &[Point], metric: &str, filter: impl Fn(&Point) -> bool) -> u64 {
    series(points, metric).iter().filter(|p| filter(p)).map(|p| p.value).sum()
}

/// The total of cumulative `metric` over every series and every run of it: a series the
/// exporter restarted (a new leader, a new module) is a new run, with a new start time, and
/// what the old run counted still counts. The latest point of each run is its total.
pub fn total_across_resets(points: &[Point], metric: &str) -> u64 {
    let mut runs: HashMap<(&str, &BTreeMap<String, String>, u64), u64> = HashMap::new();
    for p in points.iter().filter(|p| p.metric == metric) {
        assert!(p.cumulative, "{metric} is cumulative");
        let run = runs.entry((p.instance.as_str(), &p.labels, p.start)).or_default();
        *run = (*run).max(p.value);
    }
    runs.values().sum()
}

/// The start times of the runs of cumulative `metric` (see [`total_across_resets`]).
pub fn starts(points: &[Point], metric: &str) -> std::collections::BTreeSet<u64> {
    points.iter().filter(|p| p.metric == metric).map(|p| p.start).collect()
}

/// A readable dump of the current `istio_requests_total` series.
pub fn describe(points: &[Point]) -> String {
    let mut lines: Vec<String> = series(points, "istio_requests_total")
        .iter()
        .map(|p| {
            let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{} {{{}}}", p.value, labels.join(","))
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// Estimate quantile `q` (0..1) of a histogram point by linear interpolation inside its bucket,
/// as Prometheus' `histogram_quantile` does.
pub fn quantile(p: &Point, q: f64) -> f64 {
    let total: u64 = p.buckets.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, &count) in p.buckets.iter().enumerate() {
        if count > 0 && (seen + count) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { p.bounds[i - 1] };
            let upper = p.bounds.get(i).copied().unwrap_or(lower);
            return lower + (upper - lower) * ((rank - seen as f64) / count as f64);
        }
        seen += count;
    }
    p.bounds.last().copied().unwrap_or(0.0)
}
