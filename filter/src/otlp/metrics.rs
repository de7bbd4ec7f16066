//! Istio's request metrics to `ExportMetricsServiceRequest`, named so that the Collector's
//! Prometheus exporters produce Istio's own series names.

use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use super::common::string_kv;
use crate::config::Temporality;
use crate::metrics::aggregate::{self, Aggregator, SeriesData, BUCKET_BOUNDS};
use crate::metrics::labels::LABEL_NAMES;

/// `istio_requests_total`: a monotonic sum; the name already ends in `_total`.
pub const REQUESTS_TOTAL: &str = "istio_requests_total";
/// `istio_request_duration_milliseconds`: a histogram in `ms`.
pub const REQUEST_DURATION: &str = "istio_request_duration_milliseconds";
/// `istio_request_bytes`: a histogram in `By`.
pub const REQUEST_BYTES: &str = "istio_request_bytes";
/// `istio_response_bytes`: a histogram in `By`.
pub const RESPONSE_BYTES: &str = "istio_response_bytes";
/// Attribute marking the series that collects label sets past `metrics.max_series`.
pub const OVERFLOW_ATTRIBUTE: &str = "otel.metric.overflow";

/// Encodes metric exports for one workload; built once per VM.
#[derive(Debug, Clone)]
pub struct MetricsEncoder {
    resource: Resource,
    scope: InstrumentationScope,
}

fn point_attributes(labels: Option<&aggregate::LabelValues>) -> Vec<KeyValue> {
    match labels {
        Some(values) => LABEL_NAMES.iter().zip(values).map(|(k, v)| string_kv(k, v.as_str())).collect(),
        None => vec![KeyValue {
            key: OVERFLOW_ATTRIBUTE.to_string(),
            value: Some(AnyValue { value: Some(any_value::Value::BoolValue(true)) }),
            key_strindex: 0,
        }],
    }
}

impl MetricsEncoder {
    /// An encoder for metrics of the workload `resource` describes.
    pub fn new(resource: Resource) -> Self {
        Self { resource, scope: super::common::scope() }
    }

    /// The export request for an aggregate covering `start_ns..now_ns`.
    pub fn request(
        &self,
        agg: &Aggregator,
        temporality: Temporality,
        start_ns: u64,
        now_ns: u64,
    ) -> ExportMetricsServiceRequest {
        let temporality = match temporality {
            Temporality::Cumulative => AggregationTemporality::Cumulative,
            Temporality::Delta => AggregationTemporality::Delta,
        } as i32;
        let mut requests = Vec::with_capacity(agg.len());
        let (mut duration, mut req_bytes, mut resp_bytes) = (Vec::new(), Vec::new(), Vec::new());
        for (labels, data) in agg.series() {
            let attributes = point_attributes(labels);
            requests.push(NumberDataPoint {
                attributes: attributes.clone(),
                start_time_unix_nano: start_ns,
                time_unix_nano: now_ns,
                exemplars: Vec::new(),
                flags: 0,
                value: Some(number_data_point::Value::AsInt(i64::try_from(data.requests).unwrap_or(i64::MAX))),
            });
            let hist = |h: &Option<aggregate::Histogram>, attributes: Vec<KeyValue>| {
                let h = h.clone().unwrap_or_default();
                let mut buckets = h.buckets;
                buckets.resize(BUCKET_BOUNDS.len() + 1, 0);
                HistogramDataPoint {
                    attributes,
                    start_time_unix_nano: start_ns,
                    time_unix_nano: now_ns,
                    count: h.count,
                    sum: Some(h.sum),
                    bucket_counts: buckets,
                    explicit_bounds: BUCKET_BOUNDS.to_vec(),
                    exemplars: Vec::new(),
                    flags: 0,
                    min: None,
                    max: None,
                }
            };
            let SeriesData { duration: d, request_bytes: rq, response_bytes: rs, .. } = data;
            duration.push(hist(d, attributes.clone()));
            req_bytes.push(hist(rq, attributes.clone()));
            resp_bytes.push(hist(rs, attributes));
        }
        let metric = |name: &str, description: &str, unit: &str, data: metric::Data| Metric {
            name: name.to_string(),
            description: description.to_string(),
            unit: unit.to_string(),
            metadata: Vec::new(),
            data: Some(data),
        };
        let histogram =
            |points| metric::Data::Histogram(Histogram { data_points: points, aggregation_temporality: temporality });
        let metrics = vec![
            metric(
                REQUESTS_TOTAL,
                "Requests handled by the proxy",
                "",
                metric::Data::Sum(Sum {
                    data_points: requests,
                    aggregation_temporality: temporality,
                    is_monotonic: true,
                }),
            ),
            metric(REQUEST_DURATION, "Request duration", "ms", histogram(duration)),
            metric(REQUEST_BYTES, "Request size, headers included", "By", histogram(req_bytes)),
            metric(RESPONSE_BYTES, "Response size, headers included", "By", histogram(resp_bytes)),
        ];
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(self.resource.clone()),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(self.scope.clone()),
                    metrics,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    /// The protobuf body of an OTLP/HTTP metrics export, and its number of data points.
    pub fn encode(&self, agg: &Aggregator, temporality: Temporality, start_ns: u64, now_ns: u64) -> (Vec<u8>, u64) {
        let points = agg.len() as u64 * 4;
        (self.request(agg, temporality, start_ns, now_ns).encode_to_vec(), points)
    }
}

/// Data points the collector refused, from an OTLP/HTTP metrics response body.
pub fn rejected_points(body: &[u8]) -> u64 {
    ExportMetricsServiceResponse::decode(body)
        .ok()
        .and_then(|r| r.partial_success)
        .map_or(0, |p| u64::try_from(p.rejected_data_points).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::aggregate::Measurement;

    fn find<'a>(req: &'a ExportMetricsServiceRequest, name: &str) -> &'a Metric {
        req.resource_metrics[0].scope_metrics[0].metrics.iter().find(|m| m.name == name).unwrap()
    }

    #[test]
    fn encodes_istio_metrics_with_labels_and_buckets() {
        let mut agg = Aggregator::new(1);
        let labels: Vec<String> = LABEL_NAMES.iter().map(|n| format!("v-{n}")).collect();
        agg.record(labels.clone(), &Measurement { duration_ms: 7.0, request_bytes: 300, response_bytes: 70_000 });
        agg.record(labels, &Measurement { duration_ms: 20.0, request_bytes: 300, response_bytes: 10 });
        agg.record(vec!["other".into(); 25], &Measurement::default());
        let req = MetricsEncoder::new(Resource::default()).request(&agg, Temporality::Cumulative, 5, 9);

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
    fn delta_temporality_is_marked() {
        let req = MetricsEncoder::new(Resource::default()).request(&Aggregator::new(1), Temporality::Delta, 0, 1);
        let Some(metric::Data::Histogram(h)) = &find(&req, REQUEST_BYTES).data else { panic!("a histogram") };
        assert_eq!(h.aggregation_temporality, AggregationTemporality::Delta as i32);
    }

    #[test]
    fn reads_partial_success() {
        use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsPartialSuccess;
        let body = ExportMetricsServiceResponse {
            partial_success: Some(ExportMetricsPartialSuccess {
                rejected_data_points: 4,
                error_message: String::new(),
            }),
        }
        .encode_to_vec();
        assert_eq!(rejected_points(&body), 4);
        assert_eq!(rejected_points(b"junk"), 0);
    }
}
