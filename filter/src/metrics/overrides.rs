//! Istio's metric customization carried over: Telemetry's `metrics[].overrides[]` as
//! `metrics.overrides`, applied as Istio applies it.
//!
//! - Merging, in istio/istio `pilot/pkg/model/telemetry.go` (`mergeMetrics`): overrides apply
//!   in order, per mode and metric (`ALL_METRICS` or no `match.metric`: every metric; no
//!   `match.mode`: both sides); `disabled` replaces the one before when set; tag overrides merge
//!   tag by tag, a later one replacing an earlier one. CLIENT is a gateway's and a sidecar's
//!   outbound side, SERVER a sidecar's inbound side and a waypoint (`MetricsForClass`;
//!   waypoints are built as `ListenerClassSidecarInbound`).
//! - Labelling, in envoyproxy/envoy `contrib/istio/filters/http/istio_stats/source/istio_stats.cc`
//!   (`overrideTags`): the standard labels in their order, an UPSERT of one replacing its value
//!   where it stands, a REMOVE dropping it; the UPSERTs of other names appended in name order; a
//!   value that fails to evaluate is `unknown` (`StreamOverrides::evaluate`). The UPSERT of a
//!   standard label a metric does not have (`response_code` on a TCP metric) changes nothing.
//!
//! A metric whose labels differ from Istio's standard set is recorded under a series whose first
//! label value describes it (see [`Family`]): the aggregates, the batches between VMs and the
//! encoder carry it as any value, and a series recorded under another configuration keeps its
//! own names.

use std::rc::Rc;

pub use crate::config::metric_overrides::{
    expressions, Metric, MetricOverride, Mode, TagOperation, ALL_METRICS, REQUEST_METRICS, TCP_METRICS,
};
use crate::istio::labels::{self, LABEL_NAMES, NOT_TCP_LABELS, UNKNOWN};

/// Longest UPSERT value kept, in bytes: a longer one is cut at a character boundary, so that an
/// expression evaluating to a huge string costs at most this per series.
pub const MAX_VALUE_LEN: usize = 256;

/// Where a label's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Istio's standard label at this position of [`LABEL_NAMES`].
    Standard(usize),
    /// UPSERT expression at this position of [`expressions`].
    Upsert(usize),
}

/// Metrics of one side that share one label set, recorded in one series per label values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    /// The series' first label value: [`DESCRIPTOR_PREFIX`], the metrics, the label names.
    descriptor: Rc<str>,
    /// The metrics (a set of [`Metric`] bits).
    pub metrics: u16,
    sources: Vec<Source>,
}

/// How a series describing its own labels starts. No label Istio derives starts with U+0001.
const DESCRIPTOR_PREFIX: &str = "\u{1}meshtel:";

impl Family {
    fn new(metrics: u16, names: &[&str], sources: Vec<Source>) -> Self {
        let descriptor = format!("{DESCRIPTOR_PREFIX}{metrics}:{}", names.join(",")).into();
        Self { descriptor, metrics, sources }
    }

    /// This family's label values of a request or connection whose standard ones are
    /// `standard` ([`LABEL_NAMES`] order) and whose UPSERT expressions came to `upserts`
    /// ([`Shapes::expressions`] order), the descriptor first.
    pub fn values<'a>(&'a self, standard: &[&'a str], upserts: &'a [String]) -> Vec<&'a str> {
        let mut out = Vec::with_capacity(self.sources.len() + 1);
        out.push(&*self.descriptor);
        out.extend(self.sources.iter().map(|s| match *s {
            Source::Standard(i) => standard.get(i).copied().unwrap_or(UNKNOWN),
            Source::Upsert(i) => upserts.get(i).map_or(UNKNOWN, String::as_str),
        }));
        out
    }
}

/// How one side records one kind of traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Istio's standard labels on every metric: no override touches them.
    Standard,
    /// These families (none: every metric is disabled).
    Families(Vec<Family>),
}

/// The overrides resolved for each side and kind of traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shapes {
    /// The UPSERT expressions, each once.
    pub expressions: Vec<String>,
    client_requests: Layout,
    server_requests: Layout,
    client_tcp: Layout,
    server_tcp: Layout,
}

impl Shapes {
    /// Resolve `overrides` as istiod merges them (see the module's sources).
    pub fn new(overrides: &[MetricOverride]) -> Self {
        let expressions: Vec<String> = expressions(overrides).into_iter().map(|(e, _)| e).collect();
        let layout = |server: bool, kind: u16| layout(overrides, &expressions, server, kind);
        Self {
            client_requests: layout(false, REQUEST_METRICS),
            server_requests: layout(true, REQUEST_METRICS),
            client_tcp: layout(false, TCP_METRICS),
            server_tcp: layout(true, TCP_METRICS),
            expressions,
        }
    }

    /// Whether nothing is overridden.
    pub fn is_standard(&self) -> bool {
        [&self.client_requests, &self.server_requests, &self.client_tcp, &self.server_tcp]
            .iter()
            .all(|l| **l == Layout::Standard)
    }

    /// How a request of the server side (or the client side) is recorded.
    pub fn requests(&self, server: bool) -> &Layout {
        if server {
            &self.server_requests
        } else {
            &self.client_requests
        }
    }

    /// How a TCP connection of the server side (or the client side) is recorded.
    pub fn tcp(&self, server: bool) -> &Layout {
        if server {
            &self.server_tcp
        } else {
            &self.client_tcp
        }
    }

    /// The metrics exported on either side: the overflow series carries these.
    pub fn exported(&self) -> u16 {
        let of = |l: &Layout, kind: u16| match l {
            Layout::Standard => kind,
            Layout::Families(f) => f.iter().fold(0, |m, f| m | f.metrics),
        };
        of(&self.client_requests, REQUEST_METRICS)
            | of(&self.server_requests, REQUEST_METRICS)
            | of(&self.client_tcp, TCP_METRICS)
            | of(&self.server_tcp, TCP_METRICS)
    }
}

/// A metric's state after the overrides of its side: disabled, and its tag operations.
#[derive(Default, Clone, PartialEq)]
struct Merged<'a> {
    disabled: bool,
    /// In name order.
    tags: Vec<(&'a str, &'a TagOperation)>,
}

impl<'a> Merged<'a> {
    /// Set `name`'s operation, replacing the one before.
    fn set(&mut self, name: &'a str, op: &'a TagOperation) {
        match self.tags.binary_search_by(|(n, _)| (*n).cmp(name)) {
            Ok(at) => self.tags[at].1 = op,
            Err(at) => self.tags.insert(at, (name, op)),
        }
    }

    fn get(&self, name: &str) -> Option<&'a TagOperation> {
        self.tags.binary_search_by(|(n, _)| (*n).cmp(name)).ok().map(|at| self.tags[at].1)
    }
}

fn layout(overrides: &[MetricOverride], expressions: &[String], server: bool, kind: u16) -> Layout {
    let covers = |m: Mode| m == Mode::ClientAndServer || (m == Mode::Server) == server;
    let bits = (0..16).map(|b| 1u16 << b).filter(|b| kind & b != 0);
    let merged: Vec<(u16, Merged)> = bits
        .map(|bit| {
            let mut state = Merged::default();
            for o in overrides.iter().filter(|o| o.metrics & bit != 0 && covers(o.mode)) {
                state.disabled = o.disabled.unwrap_or(state.disabled);
                for (name, op) in &o.tags {
                    state.set(name, op);
                }
            }
            (bit, state)
        })
        .collect();
    if merged.iter().all(|(_, s)| *s == Merged::default()) {
        return Layout::Standard;
    }
    let tcp = kind == TCP_METRICS;
    let mut families: Vec<(Vec<&str>, Vec<Source>, u16)> = Vec::new();
    for (bit, state) in merged.iter().filter(|(_, s)| !s.disabled) {
        let (names, sources) = labels_of(state, expressions, tcp);
        match families.iter_mut().find(|(n, s, _)| *n == names && *s == sources) {
            Some(f) => f.2 |= bit,
            None => families.push((names, sources, *bit)),
        }
    }
    Layout::Families(families.into_iter().map(|(names, sources, bits)| Family::new(bits, &names, sources)).collect())
}

/// A metric's label names and their sources, by `overrideTags`.
fn labels_of<'a>(state: &Merged<'a>, expressions: &[String], tcp: bool) -> (Vec<&'a str>, Vec<Source>) {
    let upsert = |e: &str| expressions.iter().position(|x| x == e).map(Source::Upsert);
    let mut names = Vec::new();
    let mut sources = Vec::new();
    let standard = (0..LABEL_NAMES.len()).filter(|i| !(tcp && NOT_TCP_LABELS.contains(i)));
    for i in standard {
        let name = LABEL_NAMES[i];
        let source = match state.get(name) {
            Some(TagOperation::Remove) => None,
            Some(TagOperation::Upsert(e)) => upsert(e),
            None => Some(Source::Standard(i)),
        };
        if let Some(s) = source {
            names.push(name);
            sources.push(s);
        }
    }
    for (name, op) in state.tags.iter().copied() {
        if let (TagOperation::Upsert(e), false) = (op, LABEL_NAMES.contains(&name)) {
            if let Some(s) = upsert(e) {
                names.push(name);
                sources.push(s);
            }
        }
    }
    (names, sources)
}

/// An UPSERT expression's value as a label value: its string, cut to [`MAX_VALUE_LEN`];
/// `unknown` when it failed to evaluate or is not text (`StreamOverrides::evaluate`).
pub fn label_value(raw: Option<&[u8]>) -> String {
    let Some(s) = raw.and_then(|r| std::str::from_utf8(r).ok()) else {
        return UNKNOWN.to_string();
    };
    let mut end = s.len().min(MAX_VALUE_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The CEL the proxy evaluates for an UPSERT `expression`: its value as a string, as Istio
/// prints it into the label (a value `string()` cannot convert fails, and is `unknown`).
pub fn as_string_expression(expression: &str) -> String {
    format!("string({expression})")
}

/// A series' metrics and label names, as its labels say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Described<'a> {
    /// The metrics the series carries (a set of [`Metric`] bits).
    pub metrics: u16,
    names: Names<'a>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Names<'a> {
    /// Istio's standard labels; a TCP series' without those only requests have.
    Standard { tcp: bool },
    /// Listed in a descriptor, for the values after it.
    Listed(&'a str),
}

impl<'a> Described<'a> {
    /// How the series of `values` is labelled; `None` for values that are neither Istio's
    /// standard set nor described (a series that cannot be exported).
    pub fn of<S: AsRef<str>>(values: &'a [S]) -> Option<Self> {
        let first = values.first()?.as_ref();
        if let Some(rest) = first.strip_prefix(DESCRIPTOR_PREFIX) {
            let (metrics, names) = rest.split_once(':')?;
            let listed = if names.is_empty() { 0 } else { names.split(',').count() };
            return (listed + 1 == values.len())
                .then_some(Self { metrics: metrics.parse().ok()?, names: Names::Listed(names) });
        }
        if values.len() != LABEL_NAMES.len() {
            return None;
        }
        let tcp = labels::is_tcp(values);
        Some(Self { metrics: if tcp { TCP_METRICS } else { REQUEST_METRICS }, names: Names::Standard { tcp } })
    }

    /// Whether the series carries `metric`.
    pub fn has(&self, metric: Metric) -> bool {
        self.metrics & metric as u16 != 0
    }

    /// The series' attributes: each name with its value from `values` (those it was read from).
    pub fn attributes<S: AsRef<str>>(self, values: &'a [S]) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let (standard, listed, skip) = match self.names {
            Names::Standard { tcp } => (Some(tcp), None, 0),
            Names::Listed(names) => (None, Some(names.split(',').filter(|n| !n.is_empty())), 1),
        };
        let standard = standard.into_iter().flat_map(move |tcp| {
            LABEL_NAMES.iter().enumerate().filter(move |(i, _)| !(tcp && NOT_TCP_LABELS.contains(i))).map(|(_, n)| *n)
        });
        let values = values.iter().skip(skip).enumerate().filter_map(move |(i, v)| match self.names {
            Names::Standard { tcp: true } if NOT_TCP_LABELS.contains(&i) => None,
            _ => Some(v.as_ref()),
        });
        standard.chain(listed.into_iter().flatten()).zip(values)
    }
}

/// A series' attributes by name (`None` for values that cannot be exported).
#[cfg(test)]
pub(crate) fn attribute_map<S: AsRef<str>>(values: &[S]) -> std::collections::BTreeMap<String, String> {
    let attributes = Described::of(values).into_iter().flat_map(|d| d.attributes(values));
    attributes.map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn shapes(overrides: &str) -> Shapes {
        let json = format!(r#"{{"collector":{{"cluster":"outbound|4317||c"}},"metrics":{{"overrides":{overrides}}}}}"#);
        Shapes::new(&config::parse(json.as_bytes()).unwrap().metrics.overrides)
    }

    fn families(l: &Layout) -> &[Family] {
        match l {
            Layout::Families(f) => f,
            Layout::Standard => panic!("overridden"),
        }
    }

    /// The label names and values one family gives a request whose standard labels are their
    /// own names (`reporter` = "reporter", ...).
    fn labelled(f: &Family, upserts: &[&str]) -> Vec<(String, String)> {
        let upserts: Vec<String> = upserts.iter().map(|s| s.to_string()).collect();
        let values = f.values(&LABEL_NAMES, &upserts);
        let d = Described::of(&values).unwrap();
        assert_eq!(d.metrics, f.metrics);
        d.attributes(&values).map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn no_overrides_keep_istios_standard_labels_everywhere() {
        let s = shapes("[]");
        assert!(s.is_standard());
        assert_eq!(s.exported(), REQUEST_METRICS | TCP_METRICS);
        // A REMOVE of a label Istio does not have changes nothing either.
        assert!(shapes(r#"[{"tag_overrides":{}}]"#).is_standard());
    }

    #[test]
    fn the_issues_override_removes_and_upserts_in_istios_order() {
        let s = shapes(
            r#"[{"match":{"metric":"REQUEST_COUNT","mode":"CLIENT_AND_SERVER"},
                 "tag_overrides":{"request_protocol":{"operation":"REMOVE"},"response_flags":{"operation":"REMOVE"},
                   "request_host":{"value":"request.host"},"destination_port":{"value":"string(destination.port)"}}}]"#,
        );
        assert_eq!(s.expressions, ["string(destination.port)", "request.host"]);
        for server in [false, true] {
            let f = families(s.requests(server));
            assert_eq!(f.len(), 2, "requests_total apart from the three histograms");
            assert_eq!(f[0].metrics, Metric::RequestCount as u16);
            assert_eq!(f[1].metrics, REQUEST_METRICS & !(Metric::RequestCount as u16));
            let got = labelled(&f[0], &["8080", "example.com"]);
            let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
            let mut expected: Vec<&str> =
                LABEL_NAMES.iter().copied().filter(|n| !["request_protocol", "response_flags"].contains(n)).collect();
            // Added labels come after Istio's, in name order.
            expected.extend(["destination_port", "request_host"]);
            assert_eq!(names, expected);
            assert!(got.contains(&("request_host".into(), "example.com".into())));
            assert!(got.contains(&("destination_port".into(), "8080".into())));
            assert_eq!(labelled(&f[1], &[]).len(), 25, "the histograms keep Istio's labels");
            assert_eq!(*s.tcp(server), Layout::Standard);
        }
    }

    #[test]
    fn an_upsert_of_a_standard_label_replaces_its_value_where_it_stands() {
        let s = shapes(r#"[{"tag_overrides":{"source_principal":{"value":"'malicious'"}}}]"#);
        let f = families(s.requests(true));
        assert_eq!(f.len(), 1);
        let got = labelled(&f[0], &["malicious"]);
        assert_eq!(got[3], ("source_principal".into(), "malicious".into()));
        assert_eq!(got.len(), 25);
        // On TCP metrics too, but response_code is not theirs to replace (`overrideTags`).
        let t = shapes(r#"[{"tag_overrides":{"response_code":{"value":"'x'"}}}]"#);
        let tcp = families(t.tcp(false));
        assert_eq!(labelled(&tcp[0], &["x"]).len(), 23);
        assert!(!labelled(&tcp[0], &["x"]).iter().any(|(k, _)| k == "response_code"));
    }

    #[test]
    fn later_overrides_win_per_tag_and_disabled_per_metric_and_side() {
        let s = shapes(
            r#"[{"match":{"metric":"ALL_METRICS","mode":"CLIENT"},"disabled":true},
                {"match":{"metric":"REQUEST_COUNT","mode":"CLIENT"},"disabled":false},
                {"match":{"mode":"SERVER"},"tag_overrides":{"source_app":{"value":"'a'"}}},
                {"match":{"metric":"REQUEST_DURATION","mode":"SERVER"},"tag_overrides":{"source_app":{"operation":"REMOVE"}}}]"#,
        );
        let client = families(s.requests(false));
        assert_eq!(client.len(), 1);
        assert_eq!(client[0].metrics, Metric::RequestCount as u16);
        assert_eq!(s.tcp(false), &Layout::Families(Vec::new()), "every client TCP metric is off");
        let server = families(s.requests(true));
        assert_eq!(server.len(), 2);
        let duration = server.iter().find(|f| f.metrics == Metric::RequestDuration as u16).unwrap();
        assert!(!labelled(duration, &["a"]).iter().any(|(k, _)| k == "source_app"));
        assert_eq!(s.exported(), REQUEST_METRICS | TCP_METRICS);
    }

    #[test]
    fn described_series_and_istios_standard_ones_are_told_apart() {
        let standard: Vec<&str> = LABEL_NAMES.to_vec();
        let d = Described::of(&standard).unwrap();
        assert_eq!(d.metrics, REQUEST_METRICS);
        assert_eq!(d.attributes(&standard).count(), 25);
        let mut tcp = standard.clone();
        tcp[labels::REQUEST_PROTOCOL] = labels::TCP_PROTOCOL;
        let d = Described::of(&tcp).unwrap();
        assert_eq!((d.metrics, d.attributes(&tcp).count()), (TCP_METRICS, 23));
        assert!(Described::of(&["a", "b"]).is_none(), "neither standard nor described");
        let bad = ["\u{1}meshtel:1:a,b", "x"];
        assert!(Described::of(&bad).is_none(), "names and values disagree");
        let empty = ["\u{1}meshtel:1:"];
        assert_eq!(Described::of(&empty).unwrap().attributes(&empty).count(), 0);
    }

    #[test]
    fn values_are_strings_cut_short_or_unknown() {
        assert_eq!(label_value(Some(b"host")), "host");
        assert_eq!(label_value(None), UNKNOWN);
        assert_eq!(label_value(Some(&[0xff, 0xfe])), UNKNOWN);
        let long = "é".repeat(MAX_VALUE_LEN);
        let cut = label_value(Some(long.as_bytes()));
        assert!(cut.len() <= MAX_VALUE_LEN && cut.len() >= MAX_VALUE_LEN - 1);
    }
}
