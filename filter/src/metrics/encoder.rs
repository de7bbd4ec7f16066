//! Istio's request metrics to `ExportMetricsServiceRequest`, named so that the Collector's
//! Prometheus exporters produce Istio's own series names.

use opentelemetry_proto::tonic::metrics::v1::AggregationTemporality;
use opentelemetry_proto::tonic::resource::v1::Resource;
use std::rc::Rc;

use crate::config::{Histograms, Temporality};
use crate::metrics::aggregate::{self, Aggregator, SeriesData, BUCKET_BOUNDS};
use crate::metrics::exponential::ExpHistogram;
use crate::metrics::overrides::{Described, Metric, REQUEST_METRICS, TCP_METRICS};
use crate::otlp::Envelope;
use crate::wire::Writer;

/// `istio_requests_total`: a monotonic sum; the name already ends in `_total`.
pub const REQUESTS_TOTAL: &str = "istio_requests_total";
/// `istio_request_duration_milliseconds`: a histogram in `ms`.
pub const REQUEST_DURATION: &str = "istio_request_duration_milliseconds";
/// `istio_request_bytes`: a histogram in `By`.
pub const REQUEST_BYTES: &str = "istio_request_bytes";
/// `istio_response_bytes`: a histogram in `By`.
pub const RESPONSE_BYTES: &str = "istio_response_bytes";
/// The exponential twin of [`REQUEST_DURATION`] (`metrics.histograms`): a name of its own, since
/// one OTLP metric has one point kind, ending in its unit so that the Collector's Prometheus
/// translation (any strategy) adds no suffix.
pub const REQUEST_DURATION_EXPONENTIAL: &str = "istio_request_duration_exponential_milliseconds";
/// The exponential twin of [`REQUEST_BYTES`].
pub const REQUEST_BYTES_EXPONENTIAL: &str = "istio_request_exponential_bytes";
/// The exponential twin of [`RESPONSE_BYTES`].
pub const RESPONSE_BYTES_EXPONENTIAL: &str = "istio_response_exponential_bytes";
/// `istio_tcp_connections_opened_total`: a monotonic sum.
pub const TCP_OPENED: &str = "istio_tcp_connections_opened_total";
/// `istio_tcp_connections_closed_total`: a monotonic sum.
pub const TCP_CLOSED: &str = "istio_tcp_connections_closed_total";
/// `istio_tcp_sent_bytes_total`: a monotonic sum in `By`.
pub const TCP_SENT_BYTES: &str = "istio_tcp_sent_bytes_total";
/// `istio_tcp_received_bytes_total`: a monotonic sum in `By`.
pub const TCP_RECEIVED_BYTES: &str = "istio_tcp_received_bytes_total";
/// Attribute marking the series that collects label sets past `metrics.max_series`.
pub const OVERFLOW_ATTRIBUTE: &str = "otel.metric.overflow";

/// `metrics.proto` field numbers.
mod field {
    pub const METRIC_NAME: u32 = 1;
    pub const METRIC_DESCRIPTION: u32 = 2;
    pub const METRIC_UNIT: u32 = 3;
    pub const METRIC_SUM: u32 = 7;
    pub const METRIC_HISTOGRAM: u32 = 9;
    pub const METRIC_EXPONENTIAL_HISTOGRAM: u32 = 10;
    /// `Sum` and `Histogram`.
    pub const DATA_POINTS: u32 = 1;
    pub const AGGREGATION_TEMPORALITY: u32 = 2;
    pub const SUM_IS_MONOTONIC: u32 = 3;
    /// Both data point kinds.
    pub const POINT_START_TIME: u32 = 2;
    pub const POINT_TIME: u32 = 3;
    pub const NUMBER_AS_INT: u32 = 6;
    pub const NUMBER_ATTRIBUTES: u32 = 7;
    pub const HISTOGRAM_COUNT: u32 = 4;
    pub const HISTOGRAM_SUM: u32 = 5;
    pub const HISTOGRAM_BUCKET_COUNTS: u32 = 6;
    pub const HISTOGRAM_EXPLICIT_BOUNDS: u32 = 7;
    pub const HISTOGRAM_ATTRIBUTES: u32 = 9;
    pub const HISTOGRAM_EXEMPLARS: u32 = 8;
    /// `ExponentialHistogramDataPoint` (times, count and sum as in `HistogramDataPoint`).
    pub const EXPONENTIAL_ATTRIBUTES: u32 = 1;
    pub const EXPONENTIAL_SCALE: u32 = 6;
    pub const EXPONENTIAL_ZERO_COUNT: u32 = 7;
    pub const EXPONENTIAL_POSITIVE: u32 = 8;
    pub const EXPONENTIAL_EXEMPLARS: u32 = 11;
    pub const BUCKETS_OFFSET: u32 = 1;
    pub const BUCKETS_COUNTS: u32 = 2;
    /// `Exemplar`.
    pub const EXEMPLAR_TIME: u32 = 2;
    pub const EXEMPLAR_AS_DOUBLE: u32 = 3;
    pub const EXEMPLAR_SPAN_ID: u32 = 4;
    pub const EXEMPLAR_TRACE_ID: u32 = 5;
}

/// Encodes metric exports for one workload; built once per VM.
#[derive(Debug, Clone)]
pub struct MetricsEncoder {
    envelope: Envelope,
    histograms: Histograms,
    /// The metrics exported (a set of [`Metric`] bits): those the overflow series carries.
    exported: u16,
}

/// A series' point attributes: its labels by their names, or the overflow mark.
fn point_attributes(w: &mut Writer, field: u32, labels: Option<&[Rc<str>]>) {
    match labels {
        Some(values) => {
            for (k, v) in Described::of(values).into_iter().flat_map(|d| d.attributes(values)) {
                w.string_attribute(field, k, v);
            }
        }
        None => w.bool_attribute(field, OVERFLOW_ATTRIBUTE, true),
    }
}

/// A TCP counter of a series.
type CounterOf = fn(&SeriesData) -> u64;

/// Which histogram of a series.
type HistogramOf = fn(&SeriesData) -> &Option<aggregate::Histogram>;

/// Which exponential histogram of a series.
type ExponentialOf = fn(&SeriesData) -> &Option<ExpHistogram>;

/// One series of an export: its labels (`None`: the overflow series) and data.
type Series<'a> = (Option<&'a [Rc<str>]>, &'a SeriesData);

/// Writes what a point has beside its times.
type PointOf<'a> = dyn Fn(&mut Writer, Option<&[Rc<str>]>, &SeriesData) + 'a;

/// One export body being written: its series and their common times.
struct Part<'a> {
    /// Each series with the metrics it carries (a set of [`Metric`] bits), read once.
    series: Vec<(Series<'a>, u16)>,
    temporality: u64,
    start_ns: u64,
    now_ns: u64,
}

impl<'a> Part<'a> {
    /// The series of `agg` in `range`, each with its metrics: a series as its labels say, the
    /// overflow series those of `exported` it holds traffic of.
    fn carried(agg: &'a Aggregator, range: std::ops::Range<usize>, exported: u16) -> Vec<(Series<'a>, u16)> {
        let carried = |(labels, data): &Series| match labels {
            Some(values) => Described::of(values).map_or(0, |d| d.metrics),
            None => {
                let requests = if data.requests > 0 || data.has_histograms() { REQUEST_METRICS } else { 0 };
                let tcp = if data.has_tcp() { TCP_METRICS } else { 0 };
                exported & (requests | tcp)
            }
        };
        agg.series().skip(range.start).take(range.len()).map(|s| (s, carried(&s))).collect()
    }

    /// The series that carry `metric`.
    fn of(&self, metric: Metric) -> Vec<Series<'a>> {
        self.series.iter().filter(|(_, m)| m & metric as u16 != 0).map(|(s, _)| *s).collect()
    }

    /// One metric: its name, one point per series, and its temporality (sums are monotonic).
    fn metric(&self, w: &mut Writer, about: (&str, &str, &str), kind: u32, series: &[Series], point: &PointOf) {
        let (name, description, unit) = about;
        w.message(Envelope::ITEMS, |w| {
            w.string(field::METRIC_NAME, name);
            w.string(field::METRIC_DESCRIPTION, description);
            w.string(field::METRIC_UNIT, unit);
            w.message(kind, |w| {
                for (labels, data) in series {
                    w.message(field::DATA_POINTS, |w| {
                        // A series the cumulative totals began counting later (or again, after
                        // its expiry) carries its own start.
                        w.fixed64(
                            field::POINT_START_TIME,
                            if data.start_ns != 0 { data.start_ns } else { self.start_ns },
                        );
                        w.fixed64(field::POINT_TIME, self.now_ns);
                        point(w, *labels, data);
                    });
                }
                w.varint(field::AGGREGATION_TEMPORALITY, self.temporality);
                if kind == field::METRIC_SUM {
                    w.bool(field::SUM_IS_MONOTONIC, true);
                }
            });
        });
    }

    fn counter(&self, w: &mut Writer, about: (&str, &str, &str), series: &[Series], of: CounterOf) {
        self.metric(w, about, field::METRIC_SUM, series, &|w, labels, data| {
            w.sfixed64(field::NUMBER_AS_INT, i64::try_from(of(data)).unwrap_or(i64::MAX));
            point_attributes(w, field::NUMBER_ATTRIBUTES, labels);
        });
    }

    fn histogram(
        &self,
        w: &mut Writer,
        about: (&str, &str, &str),
        series: &[Series],
        of: HistogramOf,
        exemplars: bool,
    ) {
        let none = aggregate::Histogram::default();
        self.metric(w, about, field::METRIC_HISTOGRAM, series, &|w, labels, data| {
            let h = of(data).as_ref().unwrap_or(&none);
            w.fixed64(field::HISTOGRAM_COUNT, h.count);
            w.double(field::HISTOGRAM_SUM, h.sum);
            let buckets = (0..BUCKET_BOUNDS.len() + 1).map(|i| h.buckets.get(i).copied().unwrap_or(0));
            w.packed_fixed64(field::HISTOGRAM_BUCKET_COUNTS, buckets);
            w.packed_double(field::HISTOGRAM_EXPLICIT_BOUNDS, &BUCKET_BOUNDS);
            point_attributes(w, field::HISTOGRAM_ATTRIBUTES, labels);
            for e in data.exemplars.iter().filter(|_| exemplars) {
                w.message(field::HISTOGRAM_EXEMPLARS, |w| exemplar(w, e));
            }
        });
    }

    fn exponential(
        &self,
        w: &mut Writer,
        about: (&str, &str, &str),
        series: &[Series],
        of: ExponentialOf,
        exemplars: bool,
    ) {
        let none = ExpHistogram::default();
        self.metric(w, about, field::METRIC_EXPONENTIAL_HISTOGRAM, series, &|w, labels, data| {
            let h = of(data).as_ref().unwrap_or(&none);
            point_attributes(w, field::EXPONENTIAL_ATTRIBUTES, labels);
            w.fixed64(field::HISTOGRAM_COUNT, h.count);
            w.double(field::HISTOGRAM_SUM, h.sum);
            w.sint32(field::EXPONENTIAL_SCALE, h.scale);
            w.fixed64(field::EXPONENTIAL_ZERO_COUNT, h.zero_count);
            w.message(field::EXPONENTIAL_POSITIVE, |w| {
                w.sint32(field::BUCKETS_OFFSET, h.offset);
                w.packed_varint(field::BUCKETS_COUNTS, &h.counts);
            });
            for e in data.exemplars.iter().filter(|_| exemplars) {
                w.message(field::EXPONENTIAL_EXEMPLARS, |w| exemplar(w, e));
            }
        });
    }
}

/// One of the three request histograms.
struct RequestHistogram {
    /// The metric that selects its series.
    metric: Metric,
    name: &'static str,
    /// The name of its exponential twin.
    exponential_name: &'static str,
    description: &'static str,
    unit: &'static str,
    explicit: HistogramOf,
    exponential: ExponentialOf,
    /// Whether the duration's exemplars go with it.
    exemplars: bool,
}

const HISTOGRAMS: [RequestHistogram; 3] = [
    RequestHistogram {
        metric: Metric::RequestDuration,
        name: REQUEST_DURATION,
        exponential_name: REQUEST_DURATION_EXPONENTIAL,
        description: "Request duration",
        unit: "ms",
        explicit: |d| &d.duration,
        exponential: |d| &d.duration_exp,
        exemplars: true,
    },
    RequestHistogram {
        metric: Metric::RequestSize,
        name: REQUEST_BYTES,
        exponential_name: REQUEST_BYTES_EXPONENTIAL,
        description: "Request size, headers included",
        unit: "By",
        explicit: |d| &d.request_bytes,
        exponential: |d| &d.request_bytes_exp,
        exemplars: false,
    },
    RequestHistogram {
        metric: Metric::ResponseSize,
        name: RESPONSE_BYTES,
        exponential_name: RESPONSE_BYTES_EXPONENTIAL,
        description: "Response size, headers included",
        unit: "By",
        explicit: |d| &d.response_bytes,
        exponential: |d| &d.response_bytes_exp,
        exemplars: false,
    },
];

/// The four TCP counters: the metric, name, description, unit and data.
const TCP_COUNTERS: [(Metric, &str, &str, &str, CounterOf); 4] = [
    (Metric::TcpOpened, TCP_OPENED, "TCP connections opened", "", |d| d.tcp_opened),
    (Metric::TcpClosed, TCP_CLOSED, "TCP connections closed", "", |d| d.tcp_closed),
    (Metric::TcpSent, TCP_SENT_BYTES, "Bytes sent to the downstream peer", "By", |d| d.tcp_sent_bytes),
    (Metric::TcpReceived, TCP_RECEIVED_BYTES, "Bytes received from the downstream peer", "By", |d| {
        d.tcp_received_bytes
    }),
];

impl MetricsEncoder {
    /// An encoder for metrics of the workload `resource` describes, with the `histograms` given.
    pub fn new(resource: Resource, histograms: Histograms) -> Self {
        Self { envelope: Envelope::new(&resource), histograms, exported: REQUEST_METRICS | TCP_METRICS }
    }

    /// The same, exporting only the metrics in `metrics` for the overflow series (a series
    /// says its own; see [`crate::metrics::overrides`]).
    pub fn exporting(mut self, metrics: u16) -> Self {
        self.exported = metrics;
        self
    }

    /// The protobuf body of an OTLP metrics export (`ExportMetricsServiceRequest`) of an aggregate
    /// covering `start_ns..now_ns`, and its number of data points.
    pub fn encode(&self, agg: &Aggregator, temporality: Temporality, start_ns: u64, now_ns: u64) -> (Vec<u8>, u64) {
        self.encode_part(agg, temporality, start_ns, now_ns, 0..agg.len())
    }

    /// [`Self::encode`] of the series at positions `part` of the aggregate's order (stable while
    /// the aggregate is not changed): one export of a large aggregate goes out in several bodies.
    /// A point starts at its series' own `start_ns` when it has one, else at `start_ns`.
    pub fn encode_part(
        &self,
        agg: &Aggregator,
        temporality: Temporality,
        start_ns: u64,
        now_ns: u64,
        part: std::ops::Range<usize>,
    ) -> (Vec<u8>, u64) {
        let temporality = match temporality {
            Temporality::Cumulative => AggregationTemporality::Cumulative,
            Temporality::Delta => AggregationTemporality::Delta,
        } as u64;
        let series = Part::carried(agg, part, self.exported);
        let p = Part { series, temporality, start_ns, now_ns };
        let requests = p.of(Metric::RequestCount);
        let histograms = HISTOGRAMS.each_ref().map(|h| p.of(h.metric));
        let counters = TCP_COUNTERS.map(|c| p.of(c.0));
        let kinds = u64::from(self.histograms.explicit()) + u64::from(self.histograms.exponential());
        let points = requests.len() as u64
            + histograms.iter().map(|s| s.len() as u64 * kinds).sum::<u64>()
            + counters.iter().map(|s| s.len() as u64).sum::<u64>();
        let body = self.envelope.encode(self.capacity(p.series.iter().map(|(s, _)| s)), |w| {
            // An export without any point still names the request metrics.
            let none = points == 0;
            if !requests.is_empty() || none {
                p.counter(w, (REQUESTS_TOTAL, "Requests handled by the proxy", ""), &requests, |d| d.requests);
            }
            for (h, series) in HISTOGRAMS.iter().zip(&histograms).filter(|(_, s)| !s.is_empty() || none) {
                if self.histograms.explicit() {
                    p.histogram(w, (h.name, h.description, h.unit), series, h.explicit, h.exemplars);
                }
                if self.histograms.exponential() {
                    p.exponential(w, (h.exponential_name, h.description, h.unit), series, h.exponential, h.exemplars);
                }
            }
            for ((_, name, description, unit, of), series) in TCP_COUNTERS.iter().zip(&counters) {
                if !series.is_empty() {
                    p.counter(w, (name, description, unit), series, *of);
                }
            }
        });
        (body, points)
    }

    /// The body's size, nearly: each of the four points of a series carries its attributes
    /// (key, value and ~8 bytes of framing each) and ~230 bytes of times, counts and buckets.
    /// Sized right, the body is written without regrowing, and holds no unused capacity while
    /// it is in flight.
    fn capacity<'s>(&self, series: impl Iterator<Item = &'s Series<'s>>) -> usize {
        let attributes =
            |labels: Option<&[Rc<str>]>| -> usize { labels.map_or(32, |v| v.iter().map(|v| v.len() + 32).sum()) };
        // An exponential point: up to 160 buckets of a few bytes each.
        let per_series = if self.histograms.exponential() { 4 + 3 } else { 4 };
        let exponential_bytes = if self.histograms.exponential() { 3 * 400 } else { 0 };
        512 + series.map(|(labels, _)| per_series * (attributes(*labels) + 230) + exponential_bytes).sum::<usize>()
    }
}

fn exemplar(w: &mut Writer, e: &aggregate::Exemplar) {
    w.fixed64(field::EXEMPLAR_TIME, e.time_ns);
    w.double(field::EXEMPLAR_AS_DOUBLE, e.value);
    w.bytes(field::EXEMPLAR_SPAN_ID, &e.span_id);
    w.bytes(field::EXEMPLAR_TRACE_ID, &e.trace_id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::istio::labels::LABEL_NAMES;
    use crate::metrics::aggregate::Measurement;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, Metric as OtlpMetric};
    use prost::Message;

    fn decoded(agg: &Aggregator, temporality: Temporality, start_ns: u64, now_ns: u64) -> ExportMetricsServiceRequest {
        let (bytes, points) =
            MetricsEncoder::new(Resource::default(), Histograms::Explicit).encode(agg, temporality, start_ns, now_ns);
        assert_eq!(points, agg.len() as u64 * 4);
        ExportMetricsServiceRequest::decode(bytes.as_slice()).unwrap()
    }

    fn find<'a>(req: &'a ExportMetricsServiceRequest, name: &str) -> &'a OtlpMetric {
        req.resource_metrics[0].scope_metrics[0].metrics.iter().find(|m| m.name == name).unwrap()
    }

    #[test]
    fn encodes_istio_metrics_with_labels_and_buckets() {
        let mut agg = Aggregator::new(1);
        let labels: Vec<String> = LABEL_NAMES.iter().map(|n| format!("v-{n}")).collect();
        agg.record(
            &labels,
            &Measurement { duration_ms: 7.0, request_bytes: 300, response_bytes: 70_000, traced: None },
        );
        agg.record(&labels, &Measurement { duration_ms: 20.0, request_bytes: 300, response_bytes: 10, traced: None });
        agg.record(&["other"; 25], &Measurement::default());
        let req = decoded(&agg, Temporality::Cumulative, 5, 9);

        let Some(metric::Data::Sum(sum)) = &find(&req, REQUESTS_TOTAL).data else { panic!("a sum") };
        assert!(sum.is_monotonic);
        assert_eq!(sum.aggregation_temporality, AggregationTemporality::Cumulative as i32);
        let labelled = sum.data_points.iter().find(|p| p.attributes.len() == 25).unwrap();
        assert_eq!(labelled.value, Some(number_data_point::Value::AsInt(2)));
        assert_eq!((labelled.start_time_unix_nano, labelled.time_unix_nano), (5, 9));
        assert_eq!(labelled.attributes[0].key, "reporter");
        let overflow = sum.data_points.iter().find(|p| p.attributes.len() == 1).unwrap();
        assert_eq!(overflow.attributes[0].key, "otel.metric.overflow");

        let dur = find(&req, REQUEST_DURATION);
        assert_eq!(dur.unit, "ms");
        let Some(metric::Data::Histogram(h)) = &dur.data else { panic!("a histogram") };
        let p = h.data_points.iter().find(|p| p.attributes.len() == 25).unwrap();
        assert_eq!((p.count, p.sum), (2, Some(27.0)));
        assert_eq!(p.explicit_bounds.len(), 19);
        assert_eq!(p.bucket_counts.len(), 20);
        assert_eq!((p.bucket_counts[3], p.bucket_counts[4]), (1, 1), "7 ms in (5,10], 20 ms in (10,25]");
        assert_eq!(find(&req, RESPONSE_BYTES).unit, "By");
    }

    #[test]
    fn tcp_series_get_istios_tcp_metrics_and_only_their_labels() {
        let mut agg = Aggregator::new(2);
        let mut tcp: Vec<String> = LABEL_NAMES.iter().map(|n| format!("v-{n}")).collect();
        tcp[crate::istio::labels::REQUEST_PROTOCOL] = "tcp".into();
        let delta = crate::metrics::aggregate::TcpDelta { opened: 1, closed: 1, sent_bytes: 120, received_bytes: 60 };
        agg.record_tcp(&tcp, &delta);
        agg.record(&["http"; 25], &Measurement::default());
        let (bytes, points) =
            MetricsEncoder::new(Resource::default(), Histograms::Explicit).encode(&agg, Temporality::Cumulative, 1, 2);
        assert_eq!(points, 8, "four metrics for each kind of series");
        let req = ExportMetricsServiceRequest::decode(bytes.as_slice()).unwrap();
        let names: Vec<&str> =
            req.resource_metrics[0].scope_metrics[0].metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                REQUESTS_TOTAL,
                REQUEST_DURATION,
                REQUEST_BYTES,
                RESPONSE_BYTES,
                TCP_OPENED,
                TCP_CLOSED,
                TCP_SENT_BYTES,
                TCP_RECEIVED_BYTES
            ]
        );
        for (name, value, unit) in
            [(TCP_OPENED, 1, ""), (TCP_CLOSED, 1, ""), (TCP_SENT_BYTES, 120, "By"), (TCP_RECEIVED_BYTES, 60, "By")]
        {
            let m = find(&req, name);
            let Some(metric::Data::Sum(sum)) = &m.data else { panic!("a sum") };
            assert!(sum.is_monotonic);
            assert_eq!((m.unit.as_str(), sum.data_points.len()), (unit, 1), "{name}: the TCP series only");
            let p = &sum.data_points[0];
            assert_eq!(p.value, Some(number_data_point::Value::AsInt(value)));
            let keys: Vec<&str> = p.attributes.iter().map(|a| a.key.as_str()).collect();
            assert_eq!(keys.len(), 23);
            assert!(!keys.contains(&"response_code") && !keys.contains(&"grpc_response_status"));
        }
        let Some(metric::Data::Sum(requests)) = &find(&req, REQUESTS_TOTAL).data else { panic!() };
        assert_eq!(requests.data_points.len(), 1, "the HTTP series only");
    }

    #[test]
    fn duration_points_carry_the_slowest_sampled_requests_as_exemplars() {
        let mut agg = Aggregator::new(1);
        for (i, ms) in [5.0, 900.0, 1.0, 30.0, 2500.0, 12.0].into_iter().enumerate() {
            let traced = Some(([i as u8 + 1; 16], [i as u8 + 1; 8], 100 + i as u64));
            agg.record(&["a"; 25], &Measurement { duration_ms: ms, traced, ..Default::default() });
        }
        agg.record(&["a"; 25], &Measurement { duration_ms: 9999.0, ..Default::default() });
        let req = decoded(&agg, Temporality::Cumulative, 0, 1);
        let Some(metric::Data::Histogram(h)) = &find(&req, REQUEST_DURATION).data else { panic!() };
        let mut values: Vec<f64> = h.data_points[0]
            .exemplars
            .iter()
            .map(|e| match e.value {
                Some(opentelemetry_proto::tonic::metrics::v1::exemplar::Value::AsDouble(v)) => v,
                _ => panic!("a double"),
            })
            .collect();
        values.sort_by(f64::total_cmp);
        assert_eq!(values, [12.0, 30.0, 900.0, 2500.0], "the four slowest of the sampled requests");
        let slowest = h.data_points[0].exemplars.iter().find(|e| e.time_unix_nano == 104).unwrap();
        assert_eq!((slowest.trace_id.clone(), slowest.span_id.clone()), (vec![5; 16], vec![5; 8]));
        let Some(metric::Data::Histogram(bytes)) = &find(&req, REQUEST_BYTES).data else { panic!() };
        assert!(bytes.data_points[0].exemplars.is_empty(), "sizes carry none");
    }

    #[test]
    fn exponential_histograms_get_their_own_names_and_leave_istios_as_they_are() {
        let mut explicit = Aggregator::new(2);
        let mut both = Aggregator::new(2).recording(Histograms::Both);
        let durations = [0.0, 0.7, 3.0, 42.0, 42.5, 900.0, 30_000.0];
        for (i, ms) in durations.into_iter().enumerate() {
            let traced = (i == 5).then_some(([7; 16], [8; 8], 99));
            let m = Measurement { duration_ms: ms, request_bytes: 500 + i as u64, response_bytes: 0, traced };
            explicit.record(&["a"; 25], &m);
            both.record(&["a"; 25], &m);
        }
        let encode = |agg: &Aggregator, h: Histograms| {
            let (bytes, points) = MetricsEncoder::new(Resource::default(), h).encode(agg, Temporality::Delta, 1, 2);
            (ExportMetricsServiceRequest::decode(bytes.as_slice()).unwrap(), points)
        };
        let (istio, istio_points) = encode(&explicit, Histograms::Explicit);
        let (req, points) = encode(&both, Histograms::Both);
        assert_eq!((istio_points, points), (4, 7));
        let metrics = &req.resource_metrics[0].scope_metrics[0].metrics;
        for m in &istio.resource_metrics[0].scope_metrics[0].metrics {
            assert_eq!(metrics.iter().find(|n| n.name == m.name), Some(m), "{}: as without them", m.name);
        }
        let exp = find(&req, REQUEST_DURATION_EXPONENTIAL);
        assert_eq!(exp.unit, "ms");
        let Some(metric::Data::ExponentialHistogram(h)) = &exp.data else { panic!("an exponential histogram") };
        assert_eq!(h.aggregation_temporality, AggregationTemporality::Delta as i32);
        let p = &h.data_points[0];
        assert_eq!((p.count, p.zero_count, p.sum), (7, 1, Some(durations.iter().sum())));
        assert_eq!((p.attributes.len(), p.start_time_unix_nano, p.time_unix_nano), (25, 1, 2));
        let positive = p.positive.as_ref().unwrap();
        assert_eq!(positive.bucket_counts.iter().sum::<u64>(), 6);
        assert!(positive.bucket_counts.len() <= crate::metrics::exponential::MAX_BUCKETS);
        // Each duration lies in its bucket, by the boundaries the data model defines:
        // bucket i is (base^i, base^(i+1)], base = 2^(2^-scale).
        let base = 2f64.powf(2f64.powi(-p.scale));
        for ms in durations.into_iter().filter(|ms| *ms > 0.0) {
            let i = (ms.ln() / base.ln()).ceil() as i32 - 1;
            let k = usize::try_from(i - positive.offset).unwrap();
            assert!(positive.bucket_counts[k] > 0, "{ms} ms counted in bucket {i}");
        }
        assert_eq!(p.exemplars.len(), 1, "the duration's exemplars, as on Istio's histogram");
        for (name, unit) in [(REQUEST_BYTES_EXPONENTIAL, "By"), (RESPONSE_BYTES_EXPONENTIAL, "By")] {
            let m = find(&req, name);
            let Some(metric::Data::ExponentialHistogram(h)) = &m.data else { panic!("{name}") };
            assert_eq!((m.unit.as_str(), h.data_points[0].count), (unit, 7));
        }
        assert_eq!(
            find(&req, RESPONSE_BYTES_EXPONENTIAL).data.as_ref().map(|d| match d {
                metric::Data::ExponentialHistogram(h) => h.data_points[0].zero_count,
                _ => 0,
            }),
            Some(7),
            "empty responses are zeros"
        );

        // Exponential only: Istio's histograms are not sent at all.
        let (req, points) = encode(&both, Histograms::Exponential);
        let names: Vec<&str> =
            req.resource_metrics[0].scope_metrics[0].metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [REQUESTS_TOTAL, REQUEST_DURATION_EXPONENTIAL, REQUEST_BYTES_EXPONENTIAL, RESPONSE_BYTES_EXPONENTIAL]
        );
        assert_eq!(points, 4);
    }

    #[test]
    fn delta_temporality_is_marked() {
        let req = decoded(&Aggregator::new(1), Temporality::Delta, 0, 1);
        let Some(metric::Data::Histogram(h)) = &find(&req, REQUEST_BYTES).data else { panic!("a histogram") };
        assert_eq!(h.aggregation_temporality, AggregationTemporality::Delta as i32);
    }
}
