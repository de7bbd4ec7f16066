//! Istio's standard request metrics: recorded per request into a worker-local aggregate,
//! merged proxy-wide through shared data off the request path, exported by one elected VM.

pub mod aggregate;
pub mod shared;

use opentelemetry_proto::tonic::resource::v1::Resource;

use crate::config::{Config, Temporality};
use crate::export::{duration_ns, Payload, Sender};
use crate::otlp::{MetricsEncoder, METRICS_PATH};
use aggregate::{Aggregator, Measurement};
use shared::SharedStore;

/// The format of meshtel's shared-data entries, part of every key. Istio sets no `vm_id`, so
/// during an upgrade the old and the new module share one shared-data namespace (REFERENCE
/// section 4; proxy-wasm-cpp-host keys shared data by vm_id): a build that changes what an
/// entry holds (the encoding of [`aggregate::Aggregator`], the leader entry) bumps this, and
/// each version then keeps to its own entries instead of reading the other's as garbage.
pub const SHARED_FORMAT_VERSION: u32 = 1;

/// The shared-data key of `entry` for the plugin `scope`: `meshtel/v{format}/{scope}/{entry}`.
pub fn shared_key(scope: &str, entry: &str) -> String {
    format!("meshtel/v{SHARED_FORMAT_VERSION}/{scope}/{entry}")
}

/// Most series in one export body. Istio's 25 labels make a series ~6.4 KB of OTLP (four points):
/// 200 keep a body near 1.3 MB, under the Collector's limits (4 MiB per OTLP/gRPC message by
/// default, 20 MiB per OTLP/HTTP body) and the memory a body costs the VM and Envoy while in flight.
pub const MAX_SERIES_PER_EXPORT: usize = 200;

/// An export being sent in parts.
#[derive(Debug)]
struct ExportInProgress {
    /// The drained deltas (delta temporality); `None`: the cumulative totals.
    delta: Option<Aggregator>,
    /// The first series not sent yet.
    next: usize,
    start_ns: u64,
    now_ns: u64,
}

/// Heartbeats a leader may miss before another VM takes over.
const LEADER_MISSED_HEARTBEATS: u64 = 5;

/// Counters of the metric pipeline of one VM, cumulative.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricStats {
    /// Requests recorded.
    pub recorded: u64,
    /// Requests folded into the overflow series because of `metrics.max_series`.
    pub overflowed: u64,
}

/// One VM's metric state.
#[derive(Debug)]
pub struct MetricsPipeline {
    temporality: Temporality,
    max_series: usize,
    export_interval_ns: u64,
    merge_interval_ns: u64,
    pending_key: String,
    leader_key: String,
    token: u64,
    local: Aggregator,
    cumulative: Aggregator,
    cumulative_start_ns: u64,
    leading: bool,
    in_progress: Option<ExportInProgress>,
    last_merge_ns: u64,
    last_export_ns: u64,
    encoder: MetricsEncoder,
    sender: Sender,
    stats: MetricStats,
}

impl MetricsPipeline {
    /// The pipeline of one VM. `scope` names the shared-data entries (the plugin name, so that
    /// two meshtel plugins in one proxy stay apart); `token` identifies this VM in elections.
    pub fn new(config: &Config, resource: Resource, scope: &str, token: u64, now_ns: u64) -> Self {
        let m = &config.metrics;
        let export_interval_ns = duration_ns(m.export_interval);
        Self {
            temporality: m.temporality,
            max_series: m.max_series,
            export_interval_ns,
            merge_interval_ns: duration_ns(config.export.flush_interval).min(export_interval_ns / 2),
            pending_key: shared_key(scope, "metrics/pending"),
            leader_key: shared_key(scope, "metrics/leader"),
            token,
            local: Aggregator::new(m.max_series),
            cumulative: Aggregator::new(m.max_series),
            cumulative_start_ns: now_ns,
            leading: false,
            in_progress: None,
            last_merge_ns: now_ns,
            last_export_ns: now_ns,
            encoder: MetricsEncoder::new(resource),
            sender: Sender::new(config.export.max_in_flight, config.export.max_retries),
            stats: MetricStats::default(),
        }
    }

    /// Create the shared entries if this is the first VM (at configure time, before traffic).
    pub fn init_shared(&self, store: &dyn SharedStore, now_ns: u64) {
        shared::init(store, &self.pending_key, &Aggregator::new(self.max_series).encode(now_ns));
        shared::init(store, &self.leader_key, b"");
    }

    /// Record one request: a map update, nothing shared, nothing encoded.
    pub fn record<S: AsRef<str>>(&mut self, labels: &[S], m: &Measurement) {
        self.stats.recorded += 1;
        self.local.record(labels, m);
    }

    /// This VM's label sets recorded since the last merge, with their request counts.
    #[cfg(test)]
    pub(crate) fn local_series(&self) -> Vec<(Vec<String>, u64)> {
        self.local
            .series()
            .filter_map(|(l, d)| Some((l?.iter().map(|s| s.to_string()).collect(), d.requests)))
            .collect()
    }

    /// Periodic work: merge local deltas into shared data, keep or claim leadership, and as the
    /// leader produce the export that is due, if any.
    pub fn tick(&mut self, store: &dyn SharedStore, now_ns: u64) -> Option<Payload> {
        if now_ns.saturating_sub(self.last_merge_ns) >= self.merge_interval_ns {
            self.last_merge_ns = now_ns;
            self.merge(store);
            let stale_after = self.merge_interval_ns.saturating_mul(LEADER_MISSED_HEARTBEATS).max(1);
            let leading = shared::lead(store, &self.leader_key, self.token, now_ns, stale_after);
            if leading && !self.leading {
                // A new term starts new totals: the collector sees a reset, never a double count.
                self.cumulative = Aggregator::new(self.max_series);
                self.cumulative_start_ns = now_ns;
                self.last_export_ns = now_ns;
                if self.temporality == Temporality::Cumulative {
                    self.in_progress = None;
                }
            }
            self.leading = leading;
        }
        if let Some(retry) = self.sender.due_retry(now_ns) {
            return Some(retry);
        }
        if !self.sender.has_capacity() {
            return None;
        }
        // An export in progress is finished before the next one starts: its remaining parts
        // go out as the sender has room, one part per call.
        if self.in_progress.is_none() {
            self.in_progress = self.start_export(store, now_ns);
        }
        let export = self.in_progress.as_mut()?;
        let agg = export.delta.as_ref().unwrap_or(&self.cumulative);
        let part = export.next..(export.next + MAX_SERIES_PER_EXPORT).min(agg.len());
        let (body, points) =
            self.encoder.encode_part(agg, self.temporality, export.start_ns, export.now_ns, part.clone());
        export.next = part.end;
        if export.next >= agg.len() {
            self.in_progress = None;
        }
        (points > 0).then(|| Payload::new(METRICS_PATH, body, points))
    }

    /// Drain the proxy's deltas if this VM leads and an export is due.
    fn start_export(&mut self, store: &dyn SharedStore, now_ns: u64) -> Option<ExportInProgress> {
        if !self.leading || now_ns.saturating_sub(self.last_export_ns) < self.export_interval_ns {
            return None;
        }
        self.last_export_ns = now_ns;
        let (drained, since) = shared::drain(store, &self.pending_key, self.max_series, now_ns).ok()?;
        match self.temporality {
            Temporality::Cumulative => {
                self.cumulative.merge(&drained);
                self.stats.overflowed += self.cumulative.take_folded();
                let start_ns = self.cumulative_start_ns;
                (!self.cumulative.is_empty()).then_some(ExportInProgress { delta: None, next: 0, start_ns, now_ns })
            }
            Temporality::Delta => (!drained.is_empty()).then_some(ExportInProgress {
                delta: Some(drained),
                next: 0,
                start_ns: since,
                now_ns,
            }),
        }
    }

    fn merge(&mut self, store: &dyn SharedStore) {
        if self.local.is_empty() {
            return;
        }
        let folded_locally = self.local.take_folded();
        self.stats.overflowed += folded_locally;
        // On failure the deltas stay local (bounded by max_series) and merge on a later tick.
        if let Ok(folded) = shared::merge_into(store, &self.pending_key, &mut self.local, self.max_series) {
            self.stats.overflowed += folded;
        }
    }

    /// The sender of metric exports.
    pub fn sender(&mut self) -> &mut Sender {
        &mut self.sender
    }

    /// Whether export call `token` is a metrics one.
    pub fn owns(&self, token: u32) -> bool {
        self.sender.owns(token)
    }

    /// Whether this VM exports the proxy's metrics.
    pub fn is_leader(&self) -> bool {
        self.leading
    }

    /// Counters since the VM started.
    pub fn stats(&self) -> MetricStats {
        self.stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
    use prost::Message;
    use shared::MemoryStore;

    const MS: u64 = 1_000_000;

    fn pipeline(temporality: &str, token: u64) -> MetricsPipeline {
        let json = format!(
            r#"{{"collector":{{"cluster":"outbound|4318||c.ns.svc.cluster.local"}},
                "metrics":{{"export_interval_ms":1000,"temporality":"{temporality}","max_series":3}},
                "export":{{"flush_interval_ms":100}}}}"#
        );
        MetricsPipeline::new(&config::parse(json.as_bytes()).unwrap(), Resource::default(), "p", token, 0)
    }

    fn requests(p: &Payload) -> u64 {
        let req = ExportMetricsServiceRequest::decode(p.body.as_slice()).unwrap();
        let m = &req.resource_metrics[0].scope_metrics[0].metrics[0];
        let Some(metric::Data::Sum(sum)) = &m.data else { panic!("a sum") };
        sum.data_points
            .iter()
            .map(|d| match d.value {
                Some(number_data_point::Value::AsInt(v)) => v as u64,
                _ => 0,
            })
            .sum()
    }

    fn record(p: &mut MetricsPipeline, n: usize, label: &str) {
        for _ in 0..n {
            p.record(&[label; 25], &Measurement::default());
        }
    }

    /// Run ticks every 100 ms for all workers until `until_ns`, collecting exports.
    fn run(workers: &mut [MetricsPipeline], store: &MemoryStore, from_ns: u64, until_ns: u64) -> Vec<Payload> {
        let mut out = Vec::new();
        let mut t = from_ns;
        while t <= until_ns {
            for w in workers.iter_mut() {
                if let Some(p) = w.tick(store, t) {
                    let token = t as u32;
                    w.sender().sent(token, p.clone());
                    w.sender().completed(token, crate::export::Outcome::Success { rejected: 0 }, t);
                    out.push(p);
                }
            }
            t += 100 * MS;
        }
        out
    }

    fn pipeline_of(temporality: &str, max_series: usize) -> MetricsPipeline {
        let json = format!(
            r#"{{"collector":{{"cluster":"outbound|4318||c.ns.svc.cluster.local"}},
                "metrics":{{"export_interval_ms":1000,"temporality":"{temporality}","max_series":{max_series}}},
                "export":{{"flush_interval_ms":100,"max_in_flight":2}}}}"#
        );
        MetricsPipeline::new(&config::parse(json.as_bytes()).unwrap(), Resource::default(), "p", 1, 0)
    }

    /// Each data point's `label` attribute, per payload.
    fn series_of(p: &Payload) -> Vec<String> {
        let req = ExportMetricsServiceRequest::decode(p.body.as_slice()).unwrap();
        let m = &req.resource_metrics[0].scope_metrics[0].metrics[0];
        let Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Sum(sum)) = &m.data else { panic!() };
        sum.data_points.iter().map(|d| format!("{:?}", d.attributes.first().map(|a| &a.value))).collect()
    }

    #[test]
    fn a_large_export_goes_out_in_parts_each_series_once_as_the_sender_has_room() {
        for temporality in ["cumulative", "delta"] {
            let store = MemoryStore::default();
            let mut w = pipeline_of(temporality, 1000);
            w.init_shared(&store, 0);
            for i in 0..450 {
                w.record(&vec![format!("s{i}"); 25], &Measurement::default());
            }
            // As the root context does: every tick, take parts while the sender has room, and
            // send each; no answer comes back yet.
            let (mut parts, mut token, mut t) = (Vec::new(), 0u32, 0);
            let mut send_all = |w: &mut MetricsPipeline, parts: &mut Vec<(u32, Payload)>, t: u64| {
                while let Some(p) = w.tick(&store, t) {
                    token += 1;
                    w.sender().sent(token, p.clone());
                    parts.push((token, p));
                }
            };
            while t <= 1_500 * MS {
                send_all(&mut w, &mut parts, t);
                t += 100 * MS;
            }
            assert_eq!(parts.len(), 2, "{temporality}: max_in_flight parts, then it waits");
            for (token, _) in &parts {
                w.sender().completed(*token, crate::export::Outcome::Success { rejected: 0 }, t);
            }
            send_all(&mut w, &mut parts, t);
            assert_eq!(parts.len(), 3, "{temporality}: the rest once answered");
            let parts: Vec<Payload> = parts.into_iter().map(|(_, p)| p).collect();
            let sizes: Vec<usize> = parts.iter().map(|p| series_of(p).len()).collect();
            assert_eq!(sizes, [200, 200, 50]);
            let all: std::collections::HashSet<String> = parts.iter().flat_map(series_of).collect();
            assert_eq!(all.len(), 450, "{temporality}: every series once");
            assert_eq!(parts.iter().map(requests).sum::<u64>(), 450);
            assert!(w.tick(&store, t + 100 * MS).is_none(), "{temporality}: done until the next interval");
        }
    }

    #[test]
    fn another_format_version_in_the_same_namespace_is_neither_read_nor_disturbed() {
        // An older module (unversioned keys, another encoding) still leads and has deltas pending.
        let store = MemoryStore::default();
        let (old_leader, old_pending) = ("meshtel/p/metrics/leader", "meshtel/p/metrics/pending");
        store.set(old_leader, format!("99:{}", 10_000 * MS).as_bytes(), 0).unwrap();
        store.set(old_pending, b"\xffan older encoding", 0).unwrap();
        let mut workers = vec![pipeline("cumulative", 1), pipeline("cumulative", 2)];
        workers[0].init_shared(&store, 0);
        record(&mut workers[0], 5, "a");
        record(&mut workers[1], 2, "a");
        let exports = run(&mut workers, &store, 100 * MS, 1_500 * MS);
        assert_eq!(exports.iter().map(requests).max(), Some(7), "this version elects and exports on its own");
        assert_eq!(store.get(old_pending).unwrap().0, b"\xffan older encoding");
        assert!(store.get(old_leader).unwrap().0.starts_with(b"99:"));
        assert!(store.get(&shared_key("p", "metrics/pending")).is_some());
        assert!(shared_key("p", "metrics/leader").starts_with("meshtel/v1/p/"));
    }

    #[test]
    fn workers_add_up_to_one_cumulative_series_set() {
        let store = MemoryStore::default();
        let mut workers = vec![pipeline("cumulative", 1), pipeline("cumulative", 2), pipeline("cumulative", 3)];
        workers[0].init_shared(&store, 0);
        record(&mut workers[0], 5, "a");
        record(&mut workers[1], 7, "a");
        record(&mut workers[2], 1, "b");
        let exports = run(&mut workers, &store, 100 * MS, 1_500 * MS);
        assert_eq!(workers.iter().filter(|w| w.is_leader()).count(), 1, "one exporter");
        assert_eq!(exports.len(), 1);
        assert_eq!(requests(&exports[0]), 13);
        record(&mut workers[1], 4, "a");
        let exports = run(&mut workers, &store, 1_600 * MS, 2_600 * MS);
        assert_eq!(requests(exports.last().unwrap()), 17, "cumulative totals keep growing");
    }

    #[test]
    fn delta_exports_sum_to_the_total() {
        let store = MemoryStore::default();
        let mut workers = vec![pipeline("delta", 1), pipeline("delta", 2)];
        workers[0].init_shared(&store, 0);
        let mut all = Vec::new();
        for round in 0..4u64 {
            record(&mut workers[(round % 2) as usize], 10, "a");
            all.extend(run(&mut workers, &store, round * 1_000 * MS + 100 * MS, (round + 1) * 1_000 * MS));
        }
        all.extend(run(&mut workers, &store, 4_100 * MS, 6_000 * MS));
        assert_eq!(all.iter().map(requests).sum::<u64>(), 40);
    }

    #[test]
    fn a_new_leader_starts_new_totals() {
        let store = MemoryStore::default();
        let mut a = vec![pipeline("cumulative", 1)];
        a[0].init_shared(&store, 0);
        record(&mut a[0], 3, "a");
        let first = run(&mut a, &store, 100 * MS, 1_200 * MS);
        assert_eq!(requests(&first[0]), 3);
        // Leader 1 goes silent; 2 takes over once the heartbeat is stale.
        let mut b = vec![pipeline("cumulative", 2)];
        record(&mut b[0], 2, "a");
        let later = run(&mut b, &store, 1_300 * MS, 4_000 * MS);
        assert!(b[0].is_leader());
        assert_eq!(requests(later.last().unwrap()), 2, "a reset, not 5");
    }

    #[test]
    fn overflow_is_counted() {
        let store = MemoryStore::default();
        let mut w = vec![pipeline("cumulative", 1)];
        w[0].init_shared(&store, 0);
        for i in 0..10 {
            record(&mut w[0], 1, &format!("peer{i}"));
        }
        let exports = run(&mut w, &store, 100 * MS, 1_200 * MS);
        assert_eq!(requests(&exports[0]), 10);
        assert_eq!(w[0].stats().overflowed, 7);
        let req = ExportMetricsServiceRequest::decode(exports[0].body.as_slice()).unwrap();
        let Some(metric::Data::Sum(sum)) = &req.resource_metrics[0].scope_metrics[0].metrics[0].data else { panic!() };
        assert_eq!(sum.data_points.len(), 4, "3 series plus overflow");
    }
}
