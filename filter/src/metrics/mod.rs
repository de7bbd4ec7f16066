//! Istio's standard request metrics: recorded per request into a worker-local aggregate,
//! merged proxy-wide through shared data off the request path, exported by one elected VM.

pub mod aggregate;
pub mod batch;
pub mod encoder;
pub mod exponential;
pub mod overrides;
pub mod series;
pub mod shared;

use opentelemetry_proto::tonic::resource::v1::Resource;

use crate::config::{Config, Histograms, Temporality};
use crate::episode::CounterEpisode;
use crate::export::{duration_ns, Payload, Sender};
use crate::otlp::Signal;
use aggregate::{Aggregator, Measurement, Stamp, TcpDelta, Values};
use encoder::MetricsEncoder;
use overrides::{Layout, Shapes};
use shared::SharedStore;

/// The format of meshtel's shared entries and queue, part of every name. Istio sets no `vm_id`,
/// so during an upgrade the old and the new module share one namespace (proxy-wasm-cpp-host keys
/// shared data and queues by vm_id): a build that changes what they hold bumps this, and each
/// version then keeps to its own instead of reading the other's as garbage. Version 3: a series
/// may start with a descriptor of its own labels (`metrics.overrides`), which version 2 would
/// export as a label value; version 2: per-worker delta batches on a queue (version 1: one merged
/// entry).
pub const SHARED_FORMAT_VERSION: u32 = 3;

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
    /// The taken deltas (delta temporality), or the cumulative totals' series an export
    /// brought forward changed; `None`: all the cumulative totals.
    delta: Option<Aggregator>,
    /// The first series not sent yet.
    next: usize,
    start_ns: u64,
    now_ns: u64,
}

/// Between two heartbeats of the leader election: the flush interval, at most half the export
/// interval. A VM's quiet spell lasts one, and TCP connections report once per heartbeat.
pub fn heartbeat_interval_ns(config: &Config) -> u64 {
    duration_ns(config.export.flush_interval).min(duration_ns(config.metrics.export_interval) / 2)
}

/// Heartbeats a leader may miss before another VM takes over.
const LEADER_MISSED_HEARTBEATS: u64 = 5;

/// An export brought forward (see [`MetricsPipeline::tick`]) comes at least this share of the
/// export interval after the previous one: a proxy whose traffic comes in bursts exports at most
/// four times per interval.
const EARLY_EXPORT_SPACING_DIVISOR: u64 = 4;

/// Counters of the metric pipeline of one VM, cumulative.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricStats {
    /// Requests recorded.
    pub recorded: u64,
    /// TCP connections recorded (at their close).
    pub connections: u64,
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
    /// Written by a VM that handed deltas over because its traffic went quiet (or because it
    /// ends): the leader then exports without waiting for the rest of the interval.
    flush_key: String,
    /// The flush entry as the leader last saw it; `None`: not read in this term yet.
    seen_flush: Option<Vec<u8>>,
    /// Recordings (requests and TCP reports) since the VM started.
    updates: u64,
    /// Recordings as of the last tick, and the tick that last saw the count change.
    seen_updates: u64,
    last_activity_ns: u64,
    /// Recordings as of the last hand-over (or, as the leader, the last export).
    handed_updates: u64,
    token: u64,
    /// The kinds of histogram requests are recorded in.
    histograms: Histograms,
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
    /// The last export, and the last one of every series (not brought forward).
    last_export_ns: u64,
    last_full_export_ns: u64,
    /// The tick that produced the last export part: one part per tick.
    last_part_ns: Option<u64>,
    encoder: MetricsEncoder,
    /// How `metrics.overrides` labels each side's metrics.
    shapes: Shapes,
    sender: Sender,
    stats: MetricStats,
    /// Unreadable batches, as an episode.
    unreadable: CounterEpisode,
}

impl MetricsPipeline {
    /// The pipeline of one VM. `scope` names the shared entries (the plugin name, so that two
    /// meshtel plugins in one proxy stay apart); `token` identifies this VM in elections.
    pub fn new(config: &Config, resource: Resource, scope: &str, token: u64, now_ns: u64) -> Self {
        let m = &config.metrics;
        let export_interval_ns = duration_ns(m.export_interval);
        let values = Values::default();
        let shapes = Shapes::new(&m.overrides);
        Self {
            temporality: m.temporality,
            max_series: m.max_series,
            export_interval_ns,
            heartbeat_interval_ns: heartbeat_interval_ns(config),
            series_expiry_ns: m.series_expiry.map(duration_ns),
            queue_name: shared_key(scope, "metrics/deltas"),
            queue: None,
            leader_key: shared_key(scope, "metrics/leader"),
            flush_key: shared_key(scope, "metrics/flush"),
            seen_flush: None,
            updates: 0,
            seen_updates: 0,
            last_activity_ns: now_ns,
            handed_updates: 0,
            token,
            local: Aggregator::with_values(m.max_series, &values).recording(m.histograms),
            histograms: m.histograms,
            cumulative: Aggregator::with_values(m.max_series, &values),
            values,
            cumulative_start_ns: now_ns,
            leading: false,
            in_progress: None,
            last_heartbeat_ns: now_ns,
            last_handover_ns: now_ns,
            last_export_ns: now_ns,
            last_full_export_ns: now_ns,
            last_part_ns: None,
            encoder: MetricsEncoder::new(resource, m.histograms).exporting(shapes.exported()),
            shapes,
            sender: Sender::new(config.export.max_in_flight, config.export.max_retries).with_seed(token),
            stats: MetricStats::default(),
            unreadable: CounterEpisode::default(),
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
        Aggregator::with_values(self.max_series, &self.values).recording(self.histograms)
    }

    /// Record one request: a map update, nothing shared, nothing encoded.
    pub fn record<S: AsRef<str>>(&mut self, labels: &[S], m: &Measurement) {
        self.stats.recorded += 1;
        self.updates += 1;
        self.local.record(labels, m);
    }

    /// Record one request of the server side (or the client side) whose standard label values
    /// are `standard` and whose UPSERT expressions came to `upserts`, as `metrics.overrides`
    /// shapes that side (see [`overrides`]).
    pub fn record_request(&mut self, standard: &[&str; 25], upserts: &[String], server: bool, m: &Measurement) {
        let Layout::Families(families) = self.shapes.requests(server) else {
            return self.record(standard, m);
        };
        if families.is_empty() {
            return;
        }
        self.stats.recorded += 1;
        self.updates += 1;
        for f in families {
            self.local.record_parts(&f.values(standard, upserts), m, f.metrics);
        }
    }

    /// Record what a TCP connection moved since its last report, as [`Self::record_request`].
    pub fn record_connection(&mut self, standard: &[String], upserts: &[String], server: bool, d: &TcpDelta) {
        let Layout::Families(families) = self.shapes.tcp(server) else {
            return self.record_tcp(standard, d);
        };
        if d.is_empty() || families.is_empty() {
            return;
        }
        self.stats.connections += d.closed;
        self.updates += 1;
        let standard: Vec<&str> = standard.iter().map(String::as_str).collect();
        for f in families {
            self.local.record_tcp(&f.values(&standard, upserts), &d.only(f.metrics));
        }
    }

    /// Record what a TCP connection moved since its last report (see [`TcpDelta`]).
    pub fn record_tcp<S: AsRef<str>>(&mut self, labels: &[S], d: &TcpDelta) {
        if d.is_empty() {
            return;
        }
        self.stats.connections += d.closed;
        self.updates += 1;
        self.local.record_tcp(labels, d);
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

    /// This VM's TCP series recorded since the last merge, with their counters.
    #[cfg(test)]
    pub(crate) fn local_tcp_series(&self) -> Vec<(Vec<String>, [u64; 4])> {
        self.local
            .series()
            .filter(|(_, d)| d.has_tcp())
            .filter_map(|(l, d)| {
                let counts = [d.tcp_opened, d.tcp_closed, d.tcp_sent_bytes, d.tcp_received_bytes];
                Some((l?.iter().map(|s| s.to_string()).collect(), counts))
            })
            .collect()
    }

    /// Periodic work: keep or claim leadership, hand this VM's deltas to the queue once per
    /// export interval (at once when its traffic went quiet), and as the leader take the queued
    /// deltas when an export is due and produce its next part.
    pub fn tick(&mut self, store: &dyn SharedStore, now_ns: u64) -> Option<Payload> {
        if now_ns.saturating_sub(self.last_heartbeat_ns) >= self.heartbeat_interval_ns {
            self.last_heartbeat_ns = now_ns;
            self.heartbeat(store, now_ns);
        }
        if self.updates != self.seen_updates {
            self.seen_updates = self.updates;
            self.last_activity_ns = now_ns;
        }
        // Deltas followed by a quiet spell (the end of a burst, or the drain before the proxy
        // stops) leave within about two heartbeats instead of two export intervals: Istio gives
        // a proxy 5 s between draining its listeners and SIGTERM (`terminationDrainDuration`),
        // and no call made after SIGTERM reaches the collector.
        let quiet = self.updates != self.handed_updates
            && now_ns.saturating_sub(self.last_activity_ns) >= self.heartbeat_interval_ns;
        // The leader adds its own deltas when it exports; the others hand theirs over once
        // per export interval, so the queue holds about one batch per worker. Until the
        // leader takes them, the deltas are in the queue and survive a change of leader.
        let since_handover = now_ns.saturating_sub(self.last_handover_ns);
        if !self.leading
            && (since_handover >= self.export_interval_ns || (quiet && since_handover >= self.heartbeat_interval_ns))
        {
            self.last_handover_ns = now_ns;
            if self.hand_over(store) && quiet {
                self.request_flush(store, now_ns);
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
            self.in_progress = self.start_export(store, now_ns, quiet, false);
        }
        self.last_part_ns = Some(now_ns);
        self.next_part()
    }

    /// The next part of the export in progress; `None` when it has no points (or none is in
    /// progress).
    fn next_part(&mut self) -> Option<Payload> {
        let export = self.in_progress.as_mut()?;
        let agg = export.delta.as_ref().unwrap_or(&self.cumulative);
        let part = export.next..(export.next + MAX_SERIES_PER_EXPORT).min(agg.len());
        let (body, points) =
            self.encoder.encode_part(agg, self.temporality, export.start_ns, export.now_ns, part.clone());
        export.next = part.end;
        if export.next >= agg.len() {
            self.in_progress = None;
        }
        (points > 0).then(|| Payload::new(Signal::Metrics, body, points))
    }

    /// Hand this VM's deltas to the queue. On failure they stay local (bounded by
    /// `max_series`) for the next time.
    fn hand_over(&mut self, store: &dyn SharedStore) -> bool {
        self.stats.overflowed += self.local.take_folded();
        let Some(queue) = self.find_queue(store) else { return false };
        let handed = shared::hand_over(store, queue, &mut self.local).is_ok();
        if handed {
            self.handed_updates = self.updates;
        }
        handed
    }

    /// Ask the leader to export now rather than at the end of its interval.
    fn request_flush(&self, store: &dyn SharedStore, now_ns: u64) {
        // Any new value will do: the leader compares, it does not count.
        let _ = store.set(&self.flush_key, format!("{}:{now_ns}", self.token).as_bytes(), 0);
    }

    /// Whether a VM asked for an export since the leader last looked (at a new term: whether
    /// one ever did, as the VM that resigned does).
    fn flush_requested(&mut self, store: &dyn SharedStore) -> bool {
        let now = store.get(&self.flush_key).map(|(value, _)| value).unwrap_or_default();
        let changed = match &self.seen_flush {
            Some(seen) => *seen != now,
            None => !now.is_empty(),
        };
        self.seen_flush = Some(now);
        changed
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
            self.last_full_export_ns = now_ns;
            self.seen_flush = None;
            if self.temporality == Temporality::Cumulative {
                self.in_progress = None;
            }
        }
        self.leading = leading;
    }

    /// As the leader, when an export is due (or brought forward because this VM's traffic
    /// went `quiet` or another VM asked, or `forced`): this VM's deltas and the batches the
    /// others handed over, added to the cumulative totals or exported as they are. An export
    /// brought forward sends, of the cumulative totals, only the series it changed; every
    /// series goes out once per export interval.
    fn start_export(
        &mut self,
        store: &dyn SharedStore,
        now_ns: u64,
        quiet: bool,
        forced: bool,
    ) -> Option<ExportInProgress> {
        if !self.leading {
            return None;
        }
        let regular = forced || now_ns.saturating_sub(self.last_full_export_ns) >= self.export_interval_ns;
        let spacing = self.export_interval_ns / EARLY_EXPORT_SPACING_DIVISOR;
        if !regular && now_ns.saturating_sub(self.last_export_ns) < spacing {
            return None;
        }
        // Read also before a regular export, so that a request it answers brings no other one
        // forward.
        let asked = self.flush_requested(store);
        if !(regular || quiet || asked) {
            return None;
        }
        let since = std::mem::replace(&mut self.last_export_ns, now_ns);
        if regular {
            self.last_full_export_ns = now_ns;
        }
        self.stats.overflowed += self.local.take_folded();
        self.handed_updates = self.updates;
        let mut taken = self.empty();
        if self.temporality == Temporality::Cumulative {
            // An exemplar belongs to the interval it was seen in: the last export showed these.
            self.cumulative.clear_exemplars();
        }
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
                let mut changed = (!regular).then(|| self.cumulative.updated_at(now_ns));
                if changed.as_ref().is_some_and(|c| c.len() == self.cumulative.len()) {
                    // It changed every series: it is this interval's full export.
                    changed = None;
                    self.last_full_export_ns = now_ns;
                }
                let empty = changed.as_ref().unwrap_or(&self.cumulative).is_empty();
                (!empty).then_some(ExportInProgress { delta: changed, next: 0, start_ns, now_ns })
            }
            Temporality::Delta => {
                (!taken.is_empty()).then_some(ExportInProgress { delta: Some(taken), next: 0, start_ns: since, now_ns })
            }
        }
    }

    /// Lines for the episodes that started or settled (see [`crate::episode`]): batches of
    /// other VMs that could not be read, and failing exports.
    pub fn notices(&mut self, now_ns: u64, lines: &mut Vec<String>) {
        let queue = &self.queue_name;
        lines.extend(self.unreadable.line(
            self.stats.unreadable,
            now_ns,
            |new| format!("metric batches from other VMs unreadable ({new} dropped): a module of another format shares the queue {queue}"),
            |s| format!("metric batches readable again: {} dropped over {} s", s.count, s.seconds),
        ));
        let path = Signal::Metrics.path();
        lines.extend(self.sender.settle(now_ns).into_iter().map(|l| format!("{path}: {l}")));
    }

    /// The sender of metric exports.
    pub fn sender(&mut self) -> &mut Sender {
        &mut self.sender
    }

    /// Whether export call `token` is a metrics one.
    pub fn owns(&self, token: u32) -> bool {
        self.sender.owns(token)
    }

    /// This pipeline is ending: its root context is done because a new `pluginConfig` or a
    /// new module replaced it, or the proxy stops. Returns what is left to send, for the root
    /// contexts that go on (see [`crate::export::handoff`]):
    /// - the leader makes its last export at once, of everything this VM and the queue hold
    ///   (under delta temporality after the rest of an export in progress), and gives up the
    ///   lead, so that another pipeline takes over at its next heartbeat and starts new totals:
    ///   the collector sees a reset, never a double count, and nothing is left behind;
    /// - any other pipeline hands its deltas over, and returns the retries it still holds.
    ///
    /// Either way the leader is asked to export soon.
    pub fn shutdown(&mut self, store: &dyn SharedStore, now_ns: u64) -> Vec<Payload> {
        let mut out = Vec::new();
        let leading = self.leading;
        if leading && self.temporality == Temporality::Cumulative {
            // The last export carries newer totals of every series.
            self.in_progress = None;
            let _ = self.sender.take_waiting();
        }
        while self.in_progress.is_some() {
            out.extend(self.next_part());
        }
        if leading {
            self.in_progress = self.start_export(store, now_ns, false, true);
            while self.in_progress.is_some() {
                out.extend(self.next_part());
            }
            shared::resign(store, &self.leader_key, self.token);
            self.leading = false;
        } else {
            self.hand_over(store);
        }
        out.extend(self.sender.take_waiting());
        self.request_flush(store, now_ns);
        out
    }

    /// Whether this VM exports the proxy's metrics.
    #[cfg(test)]
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
                    w.sender().completed(token, crate::export::Outcome::success(), t);
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
                    w.sender().completed(*token, crate::export::Outcome::success(), t);
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
            if temporality == "delta" {
                assert!(w.tick(&store, t).is_none(), "delta: nothing new");
            }
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
        assert!(shared_key("p", "metrics/leader").starts_with("meshtel/v3/p/"));
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
        assert_eq!(requests(exports.last().unwrap()), 13);
        record(&mut workers[1], 4, "a");
        let exports = run(&mut workers, &store, 1_600 * MS, 2_600 * MS);
        assert_eq!(requests(exports.last().unwrap()), 17, "cumulative totals keep growing");
    }

    /// Batches the leader cannot read are dropped and counted; the log hears of it when it
    /// starts and once it settled, not at every export.
    #[test]
    fn unreadable_batches_are_logged_when_they_start_and_settle() {
        let store = MemoryStore::default();
        let mut w = vec![pipeline("delta", 1)];
        w[0].init_shared(&store);
        let queue = w[0].queue.unwrap();
        let mut lines = Vec::new();
        let mut t = 100 * MS;
        for _ in 0..30 {
            store.enqueue(queue, b"\xffan older encoding").unwrap();
            run(&mut w, &store, t, t + 900 * MS);
            t += 1_000 * MS;
            w[0].notices(t, &mut lines);
        }
        assert_eq!(w[0].stats().unreadable, 30);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("metric batches from other VMs unreadable ("), "{lines:?}");
        for _ in 0..6 {
            run(&mut w, &store, t, t + 900 * MS);
            t += 1_000 * MS;
            w[0].notices(t, &mut lines);
        }
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[1].starts_with("metric batches readable again: 30 dropped over 2"), "{lines:?}");
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
        assert!(one.tick(&store, 100 * MS).is_none());
        for t in [100, 200, 300] {
            assert!(two.tick(&store, t * MS).is_none());
        }
        assert!(one.is_leader() && !two.is_leader());
        assert_eq!(store.queued(&shared_key("p", "metrics/deltas")), 1, "2 handed over after a quiet heartbeat");
        // 1 stops before its first export; 2 takes over once 1's heartbeat is stale and
        // exports the batch 1 never took. Back, 1 steps down and hands over its own deltas
        // like any worker.
        let mut two = vec![two];
        let exports = run(&mut two, &store, 400 * MS, 2_000 * MS);
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
        // When each export was made, and whether it carried the quiet series. Leadership from
        // 100 ms; each second's requests are followed by a quiet spell, which brings an export
        // forward; every series goes out at least once a second.
        let seen: Vec<(u64, bool)> =
            exports.iter().map(|p| (request_points_at(p), series_of(p).iter().any(|s| s.contains("quiet")))).collect();
        assert!(seen.contains(&(2_400 * MS, true)), "the quiet series is exported for 2 s more: {seen:?}");
        assert!(seen.iter().all(|&(t, quiet)| !quiet || t <= 2_400 * MS), "then it is dropped: {seen:?}");
        assert!(seen.last().is_some_and(|&(t, quiet)| t > 4_000 * MS && !quiet), "{seen:?}");
        assert_eq!(w[0].stats().expired, 1);
        record(&mut w[0], 2, "quiet");
        let back = run(&mut w, &store, 5_100 * MS, 6_000 * MS);
        let req = ExportMetricsServiceRequest::decode(back[0].body.as_slice()).unwrap();
        let Some(metric::Data::Sum(sum)) = &req.resource_metrics[0].scope_metrics[0].metrics[0].data else { panic!() };
        let quiet = sum.data_points.iter().find(|d| format!("{:?}", d.attributes[0].value).contains("quiet")).unwrap();
        let busy = sum.data_points.iter().find(|d| format!("{:?}", d.attributes[0].value).contains("busy")).unwrap();
        assert_eq!(quiet.value, Some(number_data_point::Value::AsInt(2)), "counted anew");
        assert_eq!(quiet.start_time_unix_nano, 4_200 * MS, "from the export before its return");
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
        // Leadership from 100 ms, and a quiet spell: the first export is brought forward.
        let mut t = 100 * MS;
        while w.tick(&store, t).is_none() {
            t += 100 * MS;
            assert!(t < 1_200 * MS);
        }
        assert!(w.tick(&store, t).is_none(), "the next part waits for the next tick");
        assert!(w.tick(&store, t + 1).is_some());
    }

    /// When the points of an export were taken.
    fn request_points_at(p: &Payload) -> u64 {
        let req = ExportMetricsServiceRequest::decode(p.body.as_slice()).unwrap();
        let Some(metric::Data::Sum(sum)) = &req.resource_metrics[0].scope_metrics[0].metrics[0].data else { panic!() };
        sum.data_points[0].time_unix_nano
    }

    /// `(start, value)` of each `istio_requests_total` point.
    fn request_points(p: &Payload) -> Vec<(u64, u64)> {
        let req = ExportMetricsServiceRequest::decode(p.body.as_slice()).unwrap();
        let Some(metric::Data::Sum(sum)) = &req.resource_metrics[0].scope_metrics[0].metrics[0].data else { panic!() };
        let value = |d: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint| match d.value {
            Some(number_data_point::Value::AsInt(v)) => v as u64,
            _ => 0,
        };
        sum.data_points.iter().map(|d| (d.start_time_unix_nano, value(d))).collect()
    }

    #[test]
    fn a_worker_that_ends_hands_its_deltas_over_and_a_leader_its_lead_and_last_export() {
        let store = MemoryStore::default();
        let (mut old, mut new) = (pipeline("delta", 1), pipeline("delta", 2));
        old.init_shared(&store);
        record(&mut old, 4, "a");
        assert!(old.tick(&store, 100 * MS).is_none());
        assert!(new.tick(&store, 100 * MS).is_none());
        assert!(old.is_leader());
        record(&mut new, 2, "a");
        assert_eq!(new.shutdown(&store, 150 * MS), vec![], "a worker hands its deltas to the queue");
        // The old root context is done (a new pluginConfig replaced it) before its first export:
        // its last export carries its own deltas and the worker's, at once.
        let last = old.shutdown(&store, 200 * MS);
        assert!(!old.is_leader());
        assert_eq!(last.iter().map(requests).sum::<u64>(), 6);
        let mut next = vec![pipeline("delta", 3)];
        record(&mut next[0], 3, "a");
        let exports = run(&mut next, &store, 200 * MS, 1_200 * MS);
        assert!(next[0].is_leader(), "at its next heartbeat, not 5 heartbeats later");
        assert_eq!(exports.iter().map(requests).sum::<u64>(), 3, "nothing twice");
    }

    #[test]
    fn a_leader_that_ends_exports_its_totals_and_the_next_one_starts_new_ones() {
        let store = MemoryStore::default();
        let mut old = vec![pipeline("cumulative", 1)];
        old[0].init_shared(&store);
        record(&mut old[0], 3, "a");
        let first = run(&mut old, &store, 100 * MS, 1_200 * MS);
        assert_eq!(first.iter().flat_map(request_points).collect::<Vec<_>>(), vec![(100 * MS, 3)]);
        record(&mut old[0], 2, "a");
        let mut worker = pipeline("cumulative", 2);
        assert!(worker.tick(&store, 1_250 * MS).is_none());
        record(&mut worker, 1, "a");
        assert_eq!(worker.shutdown(&store, 1_300 * MS), vec![]);
        let last = old[0].shutdown(&store, 1_400 * MS);
        assert_eq!(
            last.iter().flat_map(request_points).collect::<Vec<_>>(),
            vec![(100 * MS, 6)],
            "one series, all of it"
        );
        let mut next = vec![pipeline("cumulative", 3)];
        record(&mut next[0], 4, "a");
        let later = run(&mut next, &store, 1_500 * MS, 3_000 * MS);
        let points: Vec<_> = later.iter().flat_map(request_points).collect();
        assert!(!points.is_empty() && points.iter().all(|&(start, v)| start > 1_400 * MS && v == 4), "{points:?}");
    }

    #[test]
    fn deltas_followed_by_a_quiet_spell_reach_the_collector_well_before_the_interval_ends() {
        let json = r#"{"collector":{"cluster":"outbound|4318||c.ns.svc.cluster.local"},
            "metrics":{"export_interval_ms":10000},"export":{"flush_interval_ms":1000}}"#;
        let config = config::parse(json.as_bytes()).unwrap();
        let mut vms: Vec<_> = (1..=3).map(|t| MetricsPipeline::new(&config, Resource::default(), "p", t, 0)).collect();
        let store = MemoryStore::default();
        vms[0].init_shared(&store);
        let mut exported = run(&mut vms, &store, 100 * MS, 20_000 * MS);
        assert_eq!(exported.len(), 0, "no traffic, nothing to export");
        // A burst on every VM at 20 s, then nothing (the proxy is drained, then stopped).
        for vm in vms.iter_mut() {
            record(vm, 5, "a");
        }
        exported = run(&mut vms, &store, 20_100 * MS, 24_000 * MS);
        let points: Vec<_> = exported.iter().flat_map(request_points).collect();
        assert_eq!(points.last().map(|p| p.1), Some(15), "within 4 s, not 10 to 20: {points:?}");
    }

    #[test]
    fn bursts_bring_exports_forward_at_most_four_times_per_interval() {
        let store = MemoryStore::default();
        let mut vms = vec![pipeline("cumulative", 1), pipeline("cumulative", 2)];
        vms[0].init_shared(&store);
        let mut exports = 0;
        // One request every 300 ms on one VM: each is followed by a quiet spell of 3 heartbeats.
        for i in 0..100 {
            record(&mut vms[1], 1, "a");
            exports += run(&mut vms, &store, (1 + 3 * i) * 100 * MS, (3 + 3 * i) * 100 * MS).len();
        }
        assert!((30..=4 * 30).contains(&exports), "{exports} exports in 30 intervals of 1 s");
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

    /// An override's families go out under their own labels, each metric once: a series past
    /// `max_series` folds into the overflow series with only the metrics of its family, so the
    /// totals stay exact; a disabled metric is not exported at all.
    #[test]
    fn overridden_metrics_go_out_under_their_labels_and_overflow_keeps_each_total_exact() {
        let json = r#"{"collector":{"cluster":"outbound|4318||c.ns.svc.cluster.local"},
            "metrics":{"export_interval_ms":1000,"max_series":2,"overrides":[
              {"match":{"metric":"REQUEST_COUNT"},"tag_overrides":{"request_host":{"value":"request.host"},"reporter":{"operation":"REMOVE"}}},
              {"match":{"metric":"RESPONSE_SIZE"},"disabled":true}]},
            "export":{"flush_interval_ms":100}}"#;
        let store = MemoryStore::default();
        let mut w = MetricsPipeline::new(&config::parse(json.as_bytes()).unwrap(), Resource::default(), "p", 1, 0);
        w.init_shared(&store);
        let standard: [&str; 25] = std::array::from_fn(|i| crate::istio::labels::LABEL_NAMES[i]);
        let m = Measurement { duration_ms: 5.0, request_bytes: 10, response_bytes: 20, traced: None };
        // Two hosts: the requests family takes two series, the histograms' one; the third
        // series is past the cap of two and folds.
        for host in ["a", "a", "b"] {
            w.record_request(&standard, &[host.to_string()], true, &m);
        }
        let exports = run(std::slice::from_mut(&mut w), &store, 0, 1_500 * MS);
        let req = ExportMetricsServiceRequest::decode(exports[0].body.as_slice()).unwrap();
        let metrics = &req.resource_metrics[0].scope_metrics[0].metrics;
        let names: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["istio_requests_total", "istio_request_duration_milliseconds", "istio_request_bytes"]);
        let Some(metric::Data::Sum(sum)) = &metrics[0].data else { panic!("a sum") };
        let mut counted = 0;
        for p in &sum.data_points {
            let keys: Vec<&str> = p.attributes.iter().map(|a| a.key.as_str()).collect();
            counted += match p.value {
                Some(number_data_point::Value::AsInt(v)) => v,
                _ => 0,
            };
            if keys == ["otel.metric.overflow"] {
                continue;
            }
            assert_eq!(keys.len(), 25, "reporter removed, request_host added: {keys:?}");
            assert_eq!(keys.last(), Some(&"request_host"));
            assert!(!keys.contains(&"reporter"));
        }
        assert_eq!(counted, 3, "every request counted once");
        let Some(metric::Data::Histogram(h)) = &metrics[1].data else { panic!("a histogram") };
        assert_eq!(h.data_points.iter().map(|p| p.count).sum::<u64>(), 3, "every request once");
        for p in &h.data_points {
            assert!(p.attributes.len() == 25 || p.attributes.len() == 1, "Istio's labels, or the overflow mark");
        }
    }
}
