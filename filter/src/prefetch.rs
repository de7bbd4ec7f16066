//! The log phase's reads in one host call: a CEL list of the facts a request's telemetry needs,
//! compiled once per root context and evaluated once per request.
//!
//! Each value a proxy-wasm host hands a module costs a call and a VM entry to allocate it
//! (BENCHMARKS.md, cost model: ~11.7 k instructions per property that returns a value). Envoy
//! compiles a CEL expression with the `expr_create` foreign function and evaluates it for the
//! current request with `expr_evaluate` (envoyproxy/envoy
//! `source/extensions/common/wasm/foreign.cc`). The result of a list comes back in the ABI's
//! pairs encoding, one key per element and every value empty, and each element in the encoding
//! `get_property` gives the same attribute (`serializeValue` in
//! `source/extensions/common/wasm/context.cc`: 8 bytes little-endian for integers, 1 byte for
//! booleans, raw bytes for strings, a message serialized, a map as pairs). `tests/tests/cel.rs`
//! pins that format in Envoy 1.40.
//!
//! One evaluation costs ~19 k instructions plus ~2 k per element, ~4 k for an element guarded
//! against absence (BENCHMARKS.md, the probe's `expr_evaluate` rows): it pays from the second
//! value it replaces, and only for facts a request actually needs. So the lists hold what each
//! side reads in steady state, and a sidecar's query is split on its cluster's name: one
//! condition in the proxy picks the inbound or the outbound list.
//!
//! An attribute that is absent makes CEL return an error, and Envoy fails the whole evaluation
//! on one. So each element that can be absent is guarded (`'k' in m ? m['k'] : b''`), and an
//! absent fact and an empty one both come back empty: every reader treats an empty value as
//! unknown. The few Envoy always has in the log phase go unguarded ([`Fact::Present`]).
//!
//! [`Prefetched`] answers the request path's reads from one evaluation and passes every other
//! call to the proxy; where the proxy has no CEL (`expr_create` refused) or an evaluation
//! fails, every read goes to the proxy, as before: the telemetry is the same, only dearer.

use std::ops::Range;

use crate::config::{Config, SpanNaming};
use crate::headers::HeaderMap;
use crate::headers::{HeaderPairs, Headers};
use crate::host::Host;
use crate::istio::facts::{DOWNSTREAM_PEER, LOCAL_PRINCIPAL, PEER_PRINCIPAL, UPSTREAM_PEER};
use crate::istio::node::{NodeInfo, ProxyKind};
use crate::istio::peer::PEER_METADATA_HEADER;
use crate::metrics::overrides;
pub use crate::query::{encode_list, Condition, Fact, Query};

/// Compile `query` in the proxy; `false` when it refused it.
pub fn compile(query: &mut Query, host: &dyn Host) -> bool {
    query.compile_with(|e| host.compile(e))
}

/// The queries of the HTTP log phase for one configuration and proxy kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogQueries {
    /// What every request reads.
    pub request: Query,
    /// What the first request of a downstream connection reads (cached for the others).
    pub connection: Query,
    /// `request` with the user's expressions after its facts: what a request evaluates when
    /// there are any.
    pub joined: Option<Query>,
    /// Each user expression alone, for a request whose joined evaluation failed: one that
    /// fails does not take the others, nor meshtel's facts, with it. `logs.filter` first when
    /// set, then the UPSERT expressions of `metrics.overrides`.
    pub user: Vec<Query>,
    /// The configuration field of each user expression and the expression as written there,
    /// for errors.
    fields: Vec<(String, String)>,
    /// Whether the first user expression is `logs.filter`.
    filter: bool,
}

/// What compiling the queries came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compiled {
    /// All compiled.
    Done,
    /// The proxy refused meshtel's own queries: it has no CEL. Requests are read fact by fact,
    /// and the user's expressions are not applied.
    NoCel,
    /// The proxy compiles meshtel's queries but refused the user expression in this field.
    Refused {
        /// The configuration field that holds it.
        field: String,
        /// The expression.
        expression: String,
    },
}

/// What one request's log phase read: the facts, and the user's expressions' raw values (`None`
/// for one that failed or was not evaluated).
pub struct LogPhase<'a> {
    /// The proxy, with the facts answered.
    pub host: Prefetched<'a>,
    /// How the evaluation of meshtel's facts went.
    pub evaluation: Evaluation,
    /// Each user expression's value, in `LogQueries::user` order.
    pub user: Vec<Option<Vec<u8>>>,
}

/// What the log phase reads in steady state, by the reporter's side ([`crate::telemetry::request`]);
/// anything else it reads (a route name behind a non-Istio cluster, a gRPC status, a cluster's
/// metadata the first time) goes to the proxy.
fn side_facts(config: &Config, server: bool, kind: ProxyKind) -> Vec<Fact> {
    let metrics = config.metrics.enabled;
    let mut facts = vec![
        Fact::Property(&["xds", "cluster_name"]),
        Fact::Property(&["response", "code"]),
        Fact::Present(&["response", "flags"]),
    ];
    if config.traces.span_name == SpanNaming::MethodRoute {
        facts.push(Fact::Property(&["xds", "route_name"]));
    }
    // The server side's metrics take these from the connection's cache.
    if (config.traces.enabled || config.logs.enabled) && !(server && metrics) {
        facts.extend([Fact::Property(&["request", "protocol"]), Fact::Property(&["source", "address"])]);
    }
    if config.logs.enabled {
        facts.extend([
            Fact::Property(&["upstream", "address"]),
            Fact::Present(&["request", "size"]),
            Fact::Present(&["response", "size"]),
        ]);
    }
    if metrics {
        facts.extend([Fact::Present(&["request", "total_size"]), Fact::Present(&["response", "total_size"])]);
        if server {
            facts.push(Fact::Present(&["connection", "id"]));
        }
        // The upstream peer: the client side's, and a waypoint's destination.
        if !server || kind == ProxyKind::Waypoint {
            facts.push(Fact::Property(&["filter_state", UPSTREAM_PEER]));
            if config.metrics.peer_metadata_headers {
                facts.push(Fact::Header(HeaderMap::Response, PEER_METADATA_HEADER));
            }
        }
        if !server {
            facts.extend([
                Fact::Property(&["upstream", "uri_san_peer_certificate"]),
                Fact::Property(&["upstream", "uri_san_local_certificate"]),
                Fact::Message(&["xds", "upstream_host_metadata"]),
            ]);
        }
    }
    facts
}

impl LogQueries {
    /// The queries for `config` on a proxy of `node`'s kind. A gateway is always the client
    /// side and a waypoint always the server side with an upstream peer; a sidecar learns its
    /// side per request, so its query is split on Istio's inbound cluster names (a request to
    /// another cluster, such as a passthrough, reads what its side needs beyond that list from
    /// the proxy).
    pub fn new(config: &Config, node: &NodeInfo) -> Self {
        let kind = node.kind();
        let request = match kind {
            ProxyKind::Gateway => Query::new(side_facts(config, false, kind)),
            ProxyKind::Waypoint => Query::new(side_facts(config, true, kind)),
            ProxyKind::Sidecar => Query::split(
                Condition::ClusterPrefix("inbound|"),
                side_facts(config, true, kind),
                side_facts(config, false, kind),
            ),
        };
        let connection = vec![
            Fact::Property(&["filter_state", PEER_PRINCIPAL]),
            Fact::Property(&["filter_state", LOCAL_PRINCIPAL]),
            Fact::Property(&["connection", "mtls"]),
            Fact::Property(&["connection", "uri_san_peer_certificate"]),
            Fact::Property(&["connection", "uri_san_local_certificate"]),
            Fact::Property(&["filter_state", DOWNSTREAM_PEER]),
            Fact::Property(&["request", "protocol"]),
            Fact::Property(&["source", "address"]),
        ];
        let filter = config.logs.filter.as_ref().filter(|_| config.logs.enabled);
        let upserts = overrides::expressions(&config.metrics.overrides);
        let upserts = upserts.into_iter().filter(|_| config.metrics.enabled);
        let (expressions, fields): (Vec<String>, Vec<(String, String)>) = filter
            .map(|f| (f.clone(), ("logs.filter".to_string(), f.clone())))
            .into_iter()
            .chain(upserts.map(|(e, field)| (overrides::as_string_expression(&e), (field, e))))
            .unzip();
        let joined = (!expressions.is_empty()).then(|| request.clone().with_tail(expressions.clone()));
        let user = expressions.into_iter().map(|e| Query::new(Vec::new()).with_tail(vec![e])).collect();
        Self { request, connection: Query::new(connection), joined, user, fields, filter: filter.is_some() }
    }

    /// What `logs.filter` came to in `phase`; `None` when it failed or is not set.
    pub fn filter_value<'p>(&self, phase: &'p LogPhase) -> Option<&'p [u8]> {
        phase.user.first().filter(|_| self.filter)?.as_deref()
    }

    /// The label values the UPSERT expressions came to in `phase`, in
    /// [`overrides::Shapes::expressions`] order.
    pub fn upsert_values(&self, phase: &LogPhase) -> Vec<String> {
        let upserts = phase.user.iter().skip(usize::from(self.filter));
        upserts.map(|v| overrides::label_value(v.as_deref())).collect()
    }

    /// The UPSERT expressions' label values, each evaluated alone (a TCP connection's, once).
    pub fn upsert_values_alone(&self, host: &dyn Host) -> Vec<String> {
        let upserts = self.user.iter().skip(usize::from(self.filter)).map(|q| {
            let (p, evaluation) = Prefetched::new(host, q);
            overrides::label_value((evaluation == Evaluation::Done).then(|| p.tail(0)).flatten())
        });
        upserts.collect()
    }

    /// Compile the user expressions alone (a TCP root context, which reads no request).
    pub fn compile_user(&mut self, host: &dyn Host) -> Compiled {
        for (user, (field, expression)) in self.user.iter_mut().zip(&self.fields) {
            if !compile(user, host) {
                return Compiled::Refused { field: field.clone(), expression: expression.clone() };
            }
        }
        Compiled::Done
    }

    /// Compile them all in the proxy.
    pub fn compile(&mut self, host: &dyn Host) -> Compiled {
        if !(compile(&mut self.request, host) && compile(&mut self.connection, host)) {
            self.request.token = None;
            self.connection.token = None;
            return Compiled::NoCel;
        }
        if let refused @ Compiled::Refused { .. } = self.compile_user(host) {
            return refused;
        }
        // Both parts compile, so the two together do; if not, the parts serve alone.
        if let Some(joined) = self.joined.as_mut() {
            compile(joined, host);
        }
        Compiled::Done
    }

    /// Read one request's log phase: the joined query where there is one, else meshtel's; when
    /// the joined one fails, meshtel's, then each user expression alone.
    pub fn evaluate<'a>(&self, host: &'a dyn Host) -> LogPhase<'a> {
        if let Some(joined) = self.joined.as_ref().filter(|j| j.token.is_some()) {
            let (prefetched, evaluation) = Prefetched::new(host, joined);
            if evaluation == Evaluation::Done {
                let user = (0..self.user.len()).map(|i| prefetched.tail(i).map(<[u8]>::to_vec)).collect();
                return LogPhase { host: prefetched, evaluation, user };
            }
            // A user expression failed it (meshtel's facts are guarded): read those apart.
            let (prefetched, evaluation) = Prefetched::new(host, &self.request);
            return LogPhase { host: prefetched, evaluation, user: self.user_alone(host) };
        }
        let (prefetched, evaluation) = Prefetched::new(host, &self.request);
        LogPhase { host: prefetched, evaluation, user: self.user_alone(host) }
    }

    fn user_alone(&self, host: &dyn Host) -> Vec<Option<Vec<u8>>> {
        self.user
            .iter()
            .map(|q| {
                let (p, evaluation) = Prefetched::new(host, q);
                (evaluation == Evaluation::Done).then(|| p.tail(0).map(<[u8]>::to_vec)).flatten()
            })
            .collect()
    }
}

/// The proxy, with the facts of one query read in one evaluation.
pub struct Prefetched<'a> {
    host: &'a dyn Host,
    query: Option<Query>,
    /// Which list of a split query the proxy evaluated.
    holds: bool,
    /// The evaluation's bytes; the facts' values are ranges of it.
    bytes: Vec<u8>,
    values: Vec<Range<usize>>,
}

/// How an evaluation went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evaluation {
    /// The query is not compiled: every read goes to the proxy.
    NotCompiled,
    /// Evaluated: its facts are answered from the result.
    Done,
    /// The proxy refused the evaluation or answered something unreadable: every read goes to
    /// the proxy for this request.
    Failed,
}

impl<'a> Prefetched<'a> {
    /// Evaluate `query` for the current request (when compiled).
    pub fn new(host: &'a dyn Host, query: &Query) -> (Self, Evaluation) {
        let mut prefetched = Self { host, query: None, holds: true, bytes: Vec::new(), values: Vec::new() };
        if query.token.is_none() {
            return (prefetched, Evaluation::NotCompiled);
        }
        let Some(bytes) = host.evaluate(query) else {
            return (prefetched, Evaluation::Failed);
        };
        let Some(mut values) = ranges(&bytes) else {
            return (prefetched, Evaluation::Failed);
        };
        if query.otherwise.is_some() {
            // The condition's value comes first: a boolean, one byte.
            match values.first().and_then(|r| bytes.get(r.clone())) {
                Some([flag]) if *flag <= 1 => prefetched.holds = *flag == 1,
                _ => return (prefetched, Evaluation::Failed),
            }
            values.remove(0);
        }
        if values.len() != query.facts(prefetched.holds).len() + query.tail.len() {
            return (prefetched, Evaluation::Failed);
        }
        prefetched.query = Some(query.clone());
        prefetched.bytes = bytes;
        prefetched.values = values;
        (prefetched, Evaluation::Done)
    }

    /// The raw value of the user's expression `i` (see [`Query::with_tail`]); `None` unless this
    /// evaluation holds it.
    pub fn tail(&self, i: usize) -> Option<&[u8]> {
        let query = self.query.as_ref()?;
        let at = query.facts(self.holds).len() + i;
        (i < query.tail.len()).then(|| self.bytes.get(self.values.get(at)?.clone())).flatten()
    }

    /// The answer for the fact `is` picks, when this evaluation holds it: `Some(None)` for an
    /// absent or empty value.
    fn answer(&self, is: impl Fn(&Fact) -> bool) -> Option<Option<Vec<u8>>> {
        let facts = self.query.as_ref()?.facts(self.holds);
        let at = facts.iter().position(is)?;
        let value = self.bytes.get(self.values.get(at)?.clone())?;
        Some((!value.is_empty()).then(|| value.to_vec()))
    }
}

/// Where each element of a list lies in an evaluation's bytes; `None` unless the buffer holds
/// as many whole elements as it declares.
fn ranges(bytes: &[u8]) -> Option<Vec<Range<usize>>> {
    let list = Headers::over(bytes);
    let declared = list.declared()?;
    // The elements are slices of `bytes`: their offsets are where they start in it.
    let base = bytes.as_ptr() as usize;
    let values: Vec<Range<usize>> = list
        .iter()
        .map(|(element, _)| {
            let start = element.as_ptr() as usize - base;
            start..start + element.len()
        })
        .collect();
    (values.len() == declared).then_some(values)
}

impl Host for Prefetched<'_> {
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let is = |f: &Fact| matches!(f, Fact::Property(p) | Fact::Message(p) | Fact::Present(p) if *p == path);
        self.answer(is).unwrap_or_else(|| self.host.property(path))
    }

    fn header(&self, map: HeaderMap, name: &str) -> Option<Vec<u8>> {
        let is = |f: &Fact| matches!(f, Fact::Header(m, n) if *m == map && *n == name);
        self.answer(is).unwrap_or_else(|| self.host.header(map, name))
    }

    fn headers(&self, map: HeaderMap) -> HeaderPairs {
        self.host.headers(map)
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) {
        self.host.set_request_header(name, value);
    }

    fn now_ns(&self) -> u64 {
        self.host.now_ns()
    }

    fn compile(&self, expression: &str) -> Option<u32> {
        self.host.compile(expression)
    }

    fn evaluate(&self, query: &Query) -> Option<Vec<u8>> {
        self.host.evaluate(query)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::host::mock::MockHost;

    fn queries(extra: &str, node_id: &str) -> LogQueries {
        let json = format!(r#"{{"collector":{{"cluster":"outbound|4318||otel.obs"}}{extra}}}"#);
        let node = NodeInfo { id: node_id.into(), ..Default::default() };
        LogQueries::new(&config::parse(json.as_bytes()).unwrap(), &node)
    }

    #[test]
    fn each_fact_is_guarded_against_absence() {
        assert_eq!(
            Fact::Property(&["xds", "cluster_name"]).cel(),
            "('cluster_name' in xds ? xds['cluster_name'] : b'')"
        );
        assert_eq!(
            Fact::Property(&["filter_state", "io.istio.peer_principal"]).cel(),
            "('io.istio.peer_principal' in filter_state ? filter_state['io.istio.peer_principal'] : b'')"
        );
        assert_eq!(
            Fact::Header(HeaderMap::Response, ":status").cel(),
            "('headers' in response && ':status' in response['headers'] ? response['headers'][':status'] : b'')"
        );
        assert_eq!(
            Fact::Message(&["xds", "upstream_host_metadata"]).cel(),
            "('upstream_host_metadata' in xds && xds['upstream_host_metadata'] != null ? xds['upstream_host_metadata'] : b'')"
        );
        assert_eq!(Fact::Present(&["response", "flags"]).cel(), "response['flags']", "always there: no guard");
        let q = Query::new(vec![Fact::Property(&["response", "code"]), Fact::Property(&["connection", "mtls"])]);
        assert_eq!(
            q.expression(),
            "[('code' in response ? response['code'] : b''), ('mtls' in connection ? connection['mtls'] : b'')]"
        );
        let split = Query::split(
            Condition::ClusterPrefix("inbound|"),
            vec![Fact::Present(&["connection", "id"])],
            vec![Fact::Present(&["response", "flags"])],
        );
        assert_eq!(
            split.expression(),
            "('cluster_name' in xds && xds['cluster_name'].startsWith('inbound|')) \
             ? [true, connection['id']] : [false, response['flags']]"
        );
    }

    #[test]
    fn the_queries_follow_the_configuration_and_the_proxy_kind() {
        let sidecar = "sidecar~10.0.0.1~a.ns~ns.svc.cluster.local";
        let has = |q: &Query, holds: bool, f: Fact| q.facts(holds).contains(&f);
        let connection = Fact::Present(&["connection", "id"]);
        let upstream_peer = Fact::Property(&["filter_state", UPSTREAM_PEER]);
        let size = Fact::Present(&["request", "size"]);
        let total = Fact::Present(&["request", "total_size"]);
        let protocol = Fact::Property(&["request", "protocol"]);
        let all = queries("", sidecar);
        assert_eq!(all.request.condition(), Some(Condition::ClusterPrefix("inbound|")));
        let (inbound, outbound) = (true, false);
        assert!(has(&all.request, inbound, connection) && !has(&all.request, inbound, upstream_peer));
        assert!(!has(&all.request, outbound, connection) && has(&all.request, outbound, upstream_peer));
        assert!(!has(&all.request, inbound, protocol), "the connection's cache has it");
        assert!(has(&all.request, outbound, protocol) && has(&all.request, outbound, total));
        assert!(!has(&all.request, inbound, size), "logs are off");
        let gateway = queries("", "router~10.0.0.2~gw.istio-system~istio-system.svc.cluster.local");
        assert_eq!(gateway.request.condition(), None, "a gateway is always the client side");
        assert!(!has(&gateway.request, true, connection) && has(&gateway.request, true, upstream_peer));
        let waypoint = queries("", "waypoint~10.0.0.3~wp.ns~ns.svc.cluster.local");
        assert!(has(&waypoint.request, true, connection) && has(&waypoint.request, true, upstream_peer));
        let logs = queries(r#","logs":{"enabled":true},"metrics":{"enabled":false}"#, sidecar);
        assert!(has(&logs.request, inbound, size) && !has(&logs.request, inbound, total));
        assert!(has(&logs.request, inbound, protocol), "no metrics, no connection cache");
        let no_headers = queries(r#","metrics":{"peer_metadata_headers":false}"#, sidecar);
        assert!(!has(&no_headers.request, outbound, Fact::Header(HeaderMap::Response, PEER_METADATA_HEADER)));
    }

    #[test]
    fn a_split_query_reads_the_list_its_condition_picks() {
        let q = || {
            let mut q = Query::split(
                Condition::ClusterPrefix("inbound|"),
                vec![Fact::Present(&["connection", "id"])],
                vec![Fact::Property(&["upstream", "address"])],
            );
            assert!(compile(&mut q, &MockHost::new()));
            q
        };
        let inbound = MockHost::new().with_property("xds.cluster_name", "inbound|80||").with_u64("connection.id", 7);
        let (p, e) = Prefetched::new(&inbound, &q());
        assert_eq!((e, p.property_u64(&["connection", "id"])), (Evaluation::Done, Some(7)));
        assert_eq!(inbound.counts().properties, 0);
        let outbound =
            MockHost::new().with_property("xds.cluster_name", "outbound|80||a").with_property("upstream.address", "x");
        let (p, _) = Prefetched::new(&outbound, &q());
        assert_eq!(p.property_string(&["upstream", "address"]).as_deref(), Some("x"));
        assert_eq!(outbound.counts().properties, 0);
        assert_eq!(p.property(&["connection", "id"]), None, "not in its list: asked of the proxy");
        assert_eq!(outbound.counts().properties, 1);
    }

    #[test]
    fn one_evaluation_answers_the_facts_and_the_proxy_the_rest() {
        let host = MockHost::new()
            .with_property("xds.cluster_name", "inbound|9080||")
            .with_u64("response.code", 200)
            .with_property("request.protocol", "HTTP/1.1");
        let mut q = Query::new(vec![
            Fact::Property(&["xds", "cluster_name"]),
            Fact::Property(&["response", "code"]),
            Fact::Property(&["xds", "route_name"]),
        ]);
        assert!(compile(&mut q, &host));
        let (p, evaluation) = Prefetched::new(&host, &q);
        assert_eq!(evaluation, Evaluation::Done);
        assert_eq!(p.property_string(&["xds", "cluster_name"]).as_deref(), Some("inbound|9080||"));
        assert_eq!(p.property_u64(&["response", "code"]), Some(200));
        assert_eq!(p.property(&["xds", "route_name"]), None, "absent: empty in the list");
        assert_eq!(host.counts().properties, 0, "all three from the one evaluation");
        assert_eq!(p.property_string(&["request", "protocol"]).as_deref(), Some("HTTP/1.1"));
        assert_eq!(host.counts().properties, 1, "not in the query: asked of the proxy");
        assert_eq!(host.counts().evaluations, 1);
    }

    #[test]
    fn without_cel_or_a_readable_answer_every_read_goes_to_the_proxy() {
        let q = || Query::new(vec![Fact::Property(&["response", "code"])]);
        let host = MockHost::new().with_u64("response.code", 503).without_cel();
        let mut query = q();
        assert!(!compile(&mut query, &host));
        let (p, evaluation) = Prefetched::new(&host, &query);
        assert_eq!((evaluation, p.property_u64(&["response", "code"])), (Evaluation::NotCompiled, Some(503)));
        assert_eq!((host.counts().evaluations, host.counts().properties), (0, 1));

        let host = MockHost::new().with_u64("response.code", 503).failing_evaluations();
        let mut query = q();
        assert!(compile(&mut query, &host));
        let (p, evaluation) = Prefetched::new(&host, &query);
        assert_eq!((evaluation, p.property_u64(&["response", "code"])), (Evaluation::Failed, Some(503)));
    }

    #[test]
    fn a_list_of_the_wrong_length_or_shape_is_not_read() {
        let two = encode_list(&[b"a".to_vec(), 7u64.to_le_bytes().to_vec()]);
        assert_eq!(ranges(&two), Some(vec![20..21, 23..31]));
        assert_eq!(ranges(&two[..two.len() - 3]), None, "cut");
        assert_eq!(ranges(&[]), None, "no count");
        assert_eq!(ranges(&encode_list(&[])), Some(vec![]));
        let host = MockHost::new().with_u64("response.code", 200);
        let mut q = Query::new(vec![Fact::Property(&["response", "code"]), Fact::Present(&["response", "flags"])]);
        assert!(compile(&mut q, &host));
        let one_short = encode_list(&[200u64.to_le_bytes().to_vec()]);
        assert!(ranges(&one_short).is_some());
        struct Short<'a>(&'a MockHost, Vec<u8>);
        impl Host for Short<'_> {
            fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
                self.0.property(path)
            }
            fn header(&self, map: HeaderMap, name: &str) -> Option<Vec<u8>> {
                self.0.header(map, name)
            }
            fn headers(&self, map: HeaderMap) -> HeaderPairs {
                self.0.headers(map)
            }
            fn set_request_header(&self, name: &str, value: Option<&str>) {
                self.0.set_request_header(name, value)
            }
            fn now_ns(&self) -> u64 {
                0
            }
            fn compile(&self, expression: &str) -> Option<u32> {
                self.0.compile(expression)
            }
            fn evaluate(&self, _: &Query) -> Option<Vec<u8>> {
                Some(self.1.clone())
            }
        }
        let short = Short(&host, one_short);
        let (p, e) = Prefetched::new(&short, &q);
        assert_eq!((e, p.property_u64(&["response", "code"])), (Evaluation::Failed, Some(200)), "one fact short");
    }

    #[test]
    fn any_bytes_read_as_whole_elements_inside_the_buffer_or_as_nothing() {
        let mut rng = fastrand::Rng::with_seed(25);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            // Mostly small counts and sizes, so that some buffers parse.
            if len >= 4 && rng.bool() {
                bytes[..4].copy_from_slice(&rng.u32(0..4).to_le_bytes());
            }
            if let Some(values) = ranges(&bytes) {
                assert!(values.iter().all(|r| r.start <= r.end && r.end <= bytes.len()), "{bytes:?}");
            }
        }
    }
}
