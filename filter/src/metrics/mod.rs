//! Istio's standard request metrics: recorded per request into a worker-local aggregate,
//! merged proxy-wide through shared data off the request path, exported by one elected VM.

pub mod aggregate;
pub mod shared;

use opentelemetry_proto::tonic::resource::v1::Resource;

use crate::config::{Config, Temporality};
use crate::export::{duration_ns, Payload, Sender};
use crate::otlp::{MetricsEncoder, METRICS_PATH};
use aggregate::{Aggregator, Measurement, Stamp, Values};
use shared::SharedStore;

/// The format of meshtel's shared entries and queue, part of every name. Istio sets no `vm_id`,
/// so during an upgrade the old and the new module share one namespace (REFERENCE section 4;
/// proxy-wasm-cpp-host keys shared data and queues by vm_id): a build that changes what they
/// hold bumps this, and each version then keeps to its own instead of reading the other's as
/// garbage. Version 2: per-worker delta batches on a queue (version 1: one merged entry).
pub const SHARED_FORMAT_VERSION: u32 = 2;

/// The shared name of `entry` for the plugin `scope`: `meshtel/v{format}/{scope}/{entry}`.
pub fn shared_key(scope: &str, entry: &str) -> String {
    format!("meshtel/v{SHARED_FORMAT_VERSION}/{scope}/{entry}")
}

/// Most series in one export body. Istio's 25 labels make a series ~6.4 KB of OTLP (four points):
/// 100 keep a body near 640 KB, well under the Collector's limits (4 MiB per OTLP/gRPC message
/// by default, 20 MiB per OTLP/HTTP body), and bound the memory a body costs the VM (which keeps
/// it for a retry) and Envoy while it is in flight. One part goes out per tick.
pub const MAX_SERIES_PER_EXPORT: usize = 100;

/// Most batches the leader takes from the queue per export: each worker hands over one per
/// export interval, so this bounds an export's work without letting the queue grow.
const MAX_BATCHES_PER_EXPORT: usize = 256;

/// An export being sent in parts.
#[derive(Debug)]
struct ExportInProgress {
    /// The taken deltas (delta temporality); `None`: the cumulative totals.
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
    /// Series dropped from the cumulative totals after `metrics.series_expiry_ms` without requests.
    pub expired: u64,
    /// Batches taken from the queue that could not be read (dropped).
    pub unreadable: u64,
}

/// One VM's metric state.
#[derive(Debug)]
pub struct MetricsPipeline {
    temporality: Temporality,
    max_series: usize,
    export_interval_ns: u64,
    /// Between two heartbeats of the leader election (and queue lookups).
    heartbeat_interval_ns: u64,
    series_expiry_ns: Option<u64>,
    queue_name: String,
    /// The deltas queue, once the proxy has given it.
    queue: Option<u32>,
    leader_key: String,
    token: u64,
    /// The label values of all of this VM's aggregators, one copy each.
    values: Values,
    /// This VM's deltas since its last hand-over (or, as the leader, its last export).
    local: Aggregator,
    /// As the leader under cumulative temporality: the totals of this term.
    cumulative: Aggregator,
    cumulative_start_ns: u64,
    leading: bool,
    in_progress: Option<ExportInProgress>,
    last_heartbeat_ns: u64,
    last_handover_ns: u64,
    last_export_ns: u64,
    /// The tick that produced the last export part: one part per tick.
    last_part_ns: Option<u64>,
    encoder: MetricsEncoder,
    sender: Sender,
    stats: MetricStats,
}

impl MetricsPipeline {
    /// The pipeline of one VM. `scope` names the shared entries (the plugin name, so that two
    /// meshtel plugins in one proxy stay apart); `token` identifies this VM in elections.
    pub fn new(config: &Config, resource: Resource, scope: &str, token: u64, now_ns: u64) -> Self {
        let m = &config.metrics;
        let export_interval_ns = duration_ns(m.export_interval);
        let values = Values::default();
        Self {
            temporality: m.temporality,
            max_series: m.max_series,
            export_interval_ns,
            heartbeat_interval_ns: duration_ns(config.export.flush_interval).min(export_interval_ns / 2),
            series_expiry_ns: m.series_expiry.map(duration_ns),
            queue_name: shared_key(scope, "metrics/deltas"),
            queue: None,
            leader_key: shared_key(scope, "metrics/leader"),
            token,
            local: Aggregator::with_values(m.max_series, &values),
            cumulative: Aggregator::with_values(m.max_series, &values),
            values,
            cumulative_start_ns: now_ns,
            leading: false,
            in_progress: None,
            last_heartbeat_ns: now_ns,
            last_handover_ns: now_ns,
            last_export_ns: now_ns,
            last_part_ns: None,
            encoder: MetricsEncoder::new(resource),
            sender: Sender::new(config.export.max_in_flight, config.export.max_retries),
            stats: MetricStats::default(),
        }
    }

    /// Create the shared leader entry if this is the first VM, and find the deltas queue (at
    /// configure time, before traffic).
    pub fn init_shared(&mut self, store: &dyn SharedStore) {
        shared::init(store, &self.leader_key, b"");
        self.find_queue(store);
    }

    /// The deltas queue, asked of the proxy until it gives it.
    fn find_queue(&mut self, store: &dyn SharedStore) -> Option<u32> {
        if self.queue.is_none() {
            self.queue = store.queue(&self.queue_name);
        }
        self.queue
    }

    fn empty(&self) -> Aggregator {
        Aggregator::with_values(self.max_series, &self.values)
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
            .filter(|(_, d)| d.requests > 0)
            .filter_map(|(l, d)| Some((l?.iter().map(|s| s.to_string()).collect(), d.requests)))
            .collect()
    }

    /// Periodic work: keep or claim leadership, hand this VM's deltas to the queue once per
    /// export interval, and as the leader take the queued deltas when an export is due and
    /// produce its next part.
    pub fn tick(&mut self, store: &dyn SharedStore, now_ns: u64) -> Option<Payload> {
        if now_ns.saturating_sub(self.last_heartbeat_ns) >= self.heartbeat_interval_ns {
            self.last_heartbeat_ns = now_ns;
            self.heartbeat(store, now_ns);
        }
        // The leader adds its own deltas when it exports; the others hand theirs over once
        // per export interval, so the queue holds about one batch per worker. Until the
        // leader takes them, the deltas are in the queue and survive a change of leader.
        if !self.leading && now_ns.saturating_sub(self.last_handover_ns) >= self.export_interval_ns {
            self.last_handover_ns = now_ns;
            self.stats.overflowed += self.local.take_folded();
            if let Some(queue) = self.queue {
                // On failure the deltas stay local (bounded by max_series) for the next time.
                let _ = shared::hand_over(store, queue, &mut self.local);
            }
        }
        if let Some(retry) = self.sender.due_retry(now_ns) {
            return Some(retry);
        }
        // One part per tick: a large export is spread over ticks, and at most one body it
        // makes is new in the VM and in Envoy at a time.
        if !self.sender.has_capacity() || self.last_part_ns == Some(now_ns) {
            return None;
        }
        // An export in progress is finished before the next one starts.
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
        self.last_part_ns = Some(now_ns);
        (points > 0).then(|| Payload::new(METRICS_PATH, body, points))
    }

    /// Find the queue if not found yet, and renew or claim leadership.
    fn heartbeat(&mut self, store: &dyn SharedStore, now_ns: u64) {
        self.find_queue(store);
        let stale_after = self.heartbeat_interval_ns.saturating_mul(LEADER_MISSED_HEARTBEATS).max(1);
        let leading = shared::lead(store, &self.leader_key, self.token, now_ns, stale_after);
        if leading != self.leading {
            // A new term starts new totals: the collector sees a reset, never a double count.
            // A VM that lost the lead holds nothing another VM needs: what it took, it exported.
            self.cumulative = self.empty();
            self.cumulative_start_ns = now_ns;
            self.last_export_ns = now_ns;
            if self.temporality == Temporality::Cumulative {
                self.in_progress = None;
            }
        }
        self.leading = leading;
    }

    /// As the leader, when an export is due: this VM's deltas and the batches the others
    /// handed over, added to the cumulative totals or exported as they are.
    fn start_export(&mut self, store: &dyn SharedStore, now_ns: u64) -> Option<ExportInProgress> {
        if !self.leading || now_ns.saturating_sub(self.last_export_ns) < self.export_interval_ns {
            return None;
        }
        let since = std::mem::replace(&mut self.last_export_ns, now_ns);
        self.stats.overflowed += self.local.take_folded();
        let mut taken = self.empty();
        let (into, stamp) = match self.temporality {
            Temporality::Cumulative => (&mut self.cumulative, Some(Stamp { start_ns: since, now_ns })),
            Temporality::Delta => (&mut taken, None),
        };
        into.merge_deltas(&self.local, stamp);
        self.local.clear_deltas();
        if let Some(queue) = self.queue {
            let (_, unreadable) = shared::take_over(store, queue, into, MAX_BATCHES_PER_EXPORT, stamp);
            self.stats.unreadable += unreadable as u64;
        }
        self.stats.overflowed += into.take_folded();
        match self.temporality {
            Temporality::Cumulative => {
                if let Some(expiry) = self.series_expiry_ns {
                    self.stats.expired += self.cumulative.expire(now_ns.saturating_sub(expiry)) as u64;
                }
                let start_ns = self.cumulative_start_ns;
                (!self.cumulative.is_empty()).then_some(ExportInProgress { delta: None, next: 0, start_ns, now_ns })
            }
            Temporality::Delta => {
                (!taken.is_empty()).then_some(ExportInProgress { delta: Some(taken), next: 0, start_ns: since, now_ns })
            }
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

    /// This pipeline is ending (its root context is done: a config change replaced it, or the
    /// proxy stops): hand this VM's deltas over for the next leader to export, and give up the
    /// lead so that another pipeline takes over at its next heartbeat. What a leader exported
    /// already restarts there as new totals (a reset, never a double count).
    pub fn shutdown(&mut self, store: &dyn SharedStore) {
        self.stats.overflowed += self.local.take_folded();
        if let Some(queue) = self.find_queue(store) {
            let _ = shared::hand_over(store, queue, &mut self.local);
        }
        if self.leading {
            shared::resign(store, &self.leader_key, self.token);
            self.leading = false;
        }
        self.in_progress = None;
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
            w.init_shared(&store);
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
            // Answered: the rest goes out, one part per tick.
            let mut answered = 0;
            for _ in 0..3 {
                for (token, _) in &parts[answered..] {
                    w.sender().completed(*token, crate::export::Outcome::Success { rejected: 0 }, t);
                }
                answered = parts.len();
                send_all(&mut w, &mut parts, t);
                t += 100 * MS;
            }
            let parts: Vec<Payload> = parts.into_iter().map(|(_, p)| p).collect();
            let sizes: Vec<usize> = parts.iter().map(|p| series_of(p).len()).collect();
            assert_eq!(sizes, [100, 100, 100, 100, 50], "{temporality}");
            let all: std::collections::HashSet<String> = parts.iter().flat_map(series_of).collect();
            assert_eq!(all.len(), 450, "{temporality}: every series once");
            assert_eq!(parts.iter().map(requests).sum::<u64>(), 450);
            assert!(w.tick(&store, t).is_none(), "{temporality}: done until the next interval");
        }
    }

    #[test]
    fn another_format_version_in_the_same_namespace_is_neither_read_nor_disturbed() {
        // Older modules still lead and have deltas pending: an unversioned one and version 1
        // (one merged `pending` entry), each in its own encoding.
        let store = MemoryStore::default();
        let old = ["meshtel/p/metrics", "meshtel/v1/p/metrics"];
        for prefix in old {
            store.set(&format!("{prefix}/leader"), format!("99:{}", 10_000 * MS).as_bytes(), 0).unwrap();
            store.set(&format!("{prefix}/pending"), b"\xffan older encoding", 0).unwrap();
        }
        let mut workers = vec![pipeline("cumulative", 1), pipeline("cumulative", 2)];
        workers[0].init_shared(&store);
        record(&mut workers[0], 5, "a");
        record(&mut workers[1], 2, "a");
        let exports = run(&mut workers, &store, 100 * MS, 1_500 * MS);
        assert_eq!(exports.iter().map(requests).max(), Some(7), "this version elects and exports on its own");
        for prefix in old {
            assert_eq!(store.get(&format!("{prefix}/pending")).unwrap().0, b"\xffan older encoding");
            assert!(store.get(&format!("{prefix}/leader")).unwrap().0.starts_with(b"99:"));
        }
        assert!(shared_key("p", "metrics/leader").starts_with("meshtel/v2/p/"));
        assert!(store.get(&shared_key("p", "metrics/leader")).unwrap().0.starts_with(b"1:"));
        assert_eq!(store.queued(&shared_key("p", "metrics/deltas")), 0, "every batch taken");
    }

    #[test]
    fn workers_add_up_to_one_cumulative_series_set() {
        let store = MemoryStore::default();
        let mut workers = vec![pipeline("cumulative", 1), pipeline("cumulative", 2), pipeline("cumulative", 3)];
        workers[0].init_shared(&store);
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
        workers[0].init_shared(&store);
        let mut all = Vec::new();
        for round in 0..4u64 {
            record(&mut workers[(round % 2) as usize], 10, "a");
            all.extend(run(&mut workers, &store, round * 1_000 * MS + 100 * MS, (round + 1) * 1_000 * MS));
        }
        all.extend(run(&mut workers, &store, 4_100 * MS, 6_000 * MS));
        assert_eq!(all.iter().map(requests).sum::<u64>(), 40);
    }

    fn pipeline_with(metrics: &str, token: u64) -> MetricsPipeline {
        let json = format!(
            r#"{{"collector":{{"cluster":"outbound|4318||c.ns.svc.cluster.local"}},
                "metrics":{{"export_interval_ms":1000,{metrics}}},"export":{{"flush_interval_ms":100}}}}"#
        );
        MetricsPipeline::new(&config::parse(json.as_bytes()).unwrap(), Resource::default(), "p", token, 0)
    }

    /// The series of each batch waiting in the deltas queue, taken one batch at a time.
    fn queued_batches(store: &MemoryStore) -> Vec<usize> {
        let q = store.queue(&shared_key("p", "metrics/deltas")).unwrap();
        std::iter::from_fn(|| store.dequeue(q))
            .map(|b| {
                let mut a = Aggregator::new(10_000);
                a.merge_batch(&b, None).unwrap();
                a.len()
            })
            .collect()
    }

    #[test]
    fn a_worker_hands_over_only_the_series_it_touched_since_its_last_merge() {
        let store = MemoryStore::default();
        // Another VM leads, so the batches stay in the queue to be looked at.
        store.set(&shared_key("p", "metrics/leader"), format!("99:{}", 10_000 * MS).as_bytes(), 0).unwrap();
        let mut w = pipeline_with(r#""max_series":1000"#, 1);
        w.init_shared(&store);
        for i in 0..300 {
            record(&mut w, 1, &format!("peer{i}"));
        }
        // Hand-overs once per export interval (1 s).
        assert!(w.tick(&store, 500 * MS).is_none());
        assert_eq!(store.queued(&shared_key("p", "metrics/deltas")), 0, "not yet");
        assert!(w.tick(&store, 1_000 * MS).is_none());
        record(&mut w, 3, "peer7");
        assert!(w.tick(&store, 2_000 * MS).is_none());
        assert!(w.tick(&store, 3_000 * MS).is_none(), "nothing touched, nothing handed over");
        assert_eq!(queued_batches(&store), [300, 1]);
        assert!(!w.is_leader());
    }

    #[test]
    fn batches_in_the_queue_outlive_the_leader_they_were_handed_to() {
        let store = MemoryStore::default();
        let (mut one, mut two) = (pipeline("delta", 1), pipeline("delta", 2));
        one.init_shared(&store);
        record(&mut one, 4, "a");
        record(&mut two, 3, "a");
        let mut t = 100 * MS;
        while t <= 1_000 * MS {
            assert!(one.tick(&store, t).is_none());
            assert!(two.tick(&store, t).is_none());
            t += 100 * MS;
        }
        assert!(one.is_leader() && !two.is_leader());
        assert_eq!(store.queued(&shared_key("p", "metrics/deltas")), 1, "2 handed over at 1 s");
        // 1 stops before its first export (due at 1.1 s); 2 takes over once 1's heartbeat is
        // stale and exports the batch 1 never took. Back, 1 steps down and hands over its own
        // deltas like any worker.
        let mut two = vec![two];
        let exports = run(&mut two, &store, 1_100 * MS, 2_000 * MS);
        assert!(two[0].is_leader());
        assert!(one.tick(&store, 2_100 * MS).is_none());
        assert!(!one.is_leader());
        let later = run(&mut two, &store, 2_100 * MS, 4_000 * MS);
        let total: u64 = exports.iter().chain(&later).map(requests).sum();
        assert_eq!(total, 7, "nothing lost, nothing twice");
    }

    #[test]
    fn a_series_without_requests_expires_and_comes_back_with_a_new_start() {
        let store = MemoryStore::default();
        let mut w = vec![pipeline_with(r#""max_series":10,"series_expiry_ms":2000"#, 1)];
        w[0].init_shared(&store);
        record(&mut w[0], 1, "quiet");
        record(&mut w[0], 1, "busy");
        let mut exports = run(&mut w, &store, 100 * MS, 1_000 * MS);
        for s in 1..5 {
            record(&mut w[0], 1, "busy");
            exports.extend(run(&mut w, &store, s * 1_000 * MS + 100 * MS, (s + 1) * 1_000 * MS));
        }
        let series: Vec<Vec<String>> = exports.iter().map(series_of).collect();
        // Leadership from 100 ms; exports at 1.1 s (the quiet series' last requests), 2.1, 3.1
        // and 4.1 s.
        assert_eq!(series.len(), 4, "one export a second");
        assert!(series[..3].iter().all(|s| s.len() == 2), "the quiet series is exported for 2 s more");
        assert_eq!(series[3].len(), 1, "then it is dropped");
        assert_eq!(w[0].stats().expired, 1);
        record(&mut w[0], 2, "quiet");
        let back = run(&mut w, &store, 5_100 * MS, 6_000 * MS);
        let req = ExportMetricsServiceRequest::decode(back[0].body.as_slice()).unwrap();
        let Some(metric::Data::Sum(sum)) = &req.resource_metrics[0].scope_metrics[0].metrics[0].data else { panic!() };
        let quiet = sum.data_points.iter().find(|d| format!("{:?}", d.attributes[0].value).contains("quiet")).unwrap();
        let busy = sum.data_points.iter().find(|d| format!("{:?}", d.attributes[0].value).contains("busy")).unwrap();
        assert_eq!(quiet.value, Some(number_data_point::Value::AsInt(2)), "counted anew");
        assert_eq!(quiet.start_time_unix_nano, 4_100 * MS, "from the export before its return");
        assert_eq!((busy.value, busy.start_time_unix_nano), (Some(number_data_point::Value::AsInt(5)), 100 * MS));
    }

    #[test]
    fn one_export_part_per_tick() {
        let store = MemoryStore::default();
        let mut w = pipeline_of("cumulative", 1000);
        w.init_shared(&store);
        for i in 0..450 {
            w.record(&vec![format!("s{i}"); 25], &Measurement::default());
        }
        // Leadership from 100 ms: the first export is due at 1.1 s.
        let mut t = 100 * MS;
        while t < 1_100 * MS {
            assert!(w.tick(&store, t).is_none());
            t += 100 * MS;
        }
        assert!(w.tick(&store, t).is_some());
        assert!(w.tick(&store, t).is_none(), "the next part waits for the next tick");
        assert!(w.tick(&store, t + 1).is_some());
    }

    #[test]
    fn a_pipeline_that_ends_hands_its_deltas_over_and_its_lead_on_at_once() {
        let store = MemoryStore::default();
        let (mut old, mut new) = (pipeline("delta", 1), pipeline("delta", 2));
        old.init_shared(&store);
        record(&mut old, 4, "a");
        assert!(old.tick(&store, 100 * MS).is_none());
        assert!(new.tick(&store, 100 * MS).is_none());
        assert!(old.is_leader());
        // The old root context is done (a new pluginConfig replaced it) before its first export.
        old.shutdown(&store);
        assert!(!old.is_leader());
        record(&mut new, 3, "a");
        let mut new = vec![new];
        let exports = run(&mut new, &store, 200 * MS, 1_200 * MS);
        assert!(new[0].is_leader(), "at its next heartbeat, not 5 heartbeats later");
        assert_eq!(exports.iter().map(requests).sum::<u64>(), 7, "the old deltas are exported by the new leader");
    }

    #[test]
    fn a_new_leader_starts_new_totals() {
        let store = MemoryStore::default();
        let mut a = vec![pipeline("cumulative", 1)];
        a[0].init_shared(&store);
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
        w[0].init_shared(&store);
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
