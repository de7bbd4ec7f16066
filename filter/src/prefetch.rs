//! The log phase's reads in one host call: a CEL list of every fact a request's telemetry may
//! need, compiled once per root context and evaluated once per request.
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
//! An attribute that is absent makes CEL return an error, and Envoy fails the whole evaluation
//! on one. So each element is guarded (`'k' in m ? m['k'] : b''`), and an absent fact and an
//! empty one both come back empty: every reader treats an empty value as unknown.
//!
//! [`Prefetched`] answers the request path's reads from one evaluation and passes every other
//! call to the proxy; where the proxy has no CEL (`expr_create` refused) or an evaluation
//! fails, every read goes to the proxy, as before: the telemetry is the same, only dearer.

use std::ops::Range;
use std::rc::Rc;

use crate::config::{Config, SpanNaming};
use crate::headers::{HeaderPairs, Headers};
use crate::host::{HeaderMap, Host};
use crate::istio::facts::{DOWNSTREAM_PEER, LOCAL_PRINCIPAL, PEER_PRINCIPAL, UPSTREAM_PEER};
use crate::istio::node::{NodeInfo, ProxyKind};
use crate::istio::peer::PEER_METADATA_HEADER;

/// One read of the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fact {
    /// A property, by its path (`["xds", "cluster_name"]`).
    Property(&'static [&'static str]),
    /// A property that is a protobuf message (`["xds", "upstream_host_metadata"]`). An empty
    /// one is CEL's `null`, which Envoy cannot serialize in a list: it is guarded too.
    Message(&'static [&'static str]),
    /// One header of the request's request or response headers.
    Header(HeaderMap, &'static str),
}

impl Fact {
    /// The CEL that yields this fact, or empty bytes when it is absent.
    fn cel(&self) -> String {
        let (top, keys): (&str, Vec<&str>) = match self {
            Fact::Property(path) | Fact::Message(path) => match path.split_first() {
                Some((top, rest)) => (top, rest.to_vec()),
                None => return "b''".into(),
            },
            Fact::Header(HeaderMap::Request, name) => ("request", vec!["headers", name]),
            Fact::Header(HeaderMap::Response, name) => ("response", vec!["headers", name]),
        };
        let mut value = top.to_string();
        let mut guards = Vec::with_capacity(keys.len());
        for key in keys {
            // meshtel's own constants: no quote or backslash to escape.
            guards.push(format!("'{key}' in {value}"));
            value = format!("{value}['{key}']");
        }
        if matches!(self, Fact::Message(_)) {
            guards.push(format!("{value} != null"));
        }
        if guards.is_empty() {
            return value;
        }
        format!("({} ? {value} : b'')", guards.join(" && "))
    }
}

/// A list of facts, read in one evaluation once the proxy compiled it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    facts: Rc<[Fact]>,
    /// The proxy's token for the compiled expression; `None` until compiled, or when refused.
    token: Option<u32>,
}

impl Query {
    /// A query for `facts`, not compiled yet.
    pub fn new(facts: Vec<Fact>) -> Self {
        Self { facts: facts.into(), token: None }
    }

    /// The facts, in the order of the list.
    pub fn facts(&self) -> &[Fact] {
        &self.facts
    }

    /// The CEL expression: a list of the facts, each guarded against absence.
    pub fn expression(&self) -> String {
        let items: Vec<String> = self.facts.iter().map(Fact::cel).collect();
        format!("[{}]", items.join(", "))
    }

    /// Compile the expression in the proxy; `false` when the proxy refused it.
    pub fn compile(&mut self, host: &dyn Host) -> bool {
        self.token = host.compile(&self.expression());
        self.token.is_some()
    }

    /// The proxy's token, once compiled.
    pub fn token(&self) -> Option<u32> {
        self.token
    }
}

/// The queries of the HTTP log phase for one configuration and proxy kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogQueries {
    /// What every request reads.
    pub request: Query,
    /// What the first request of a downstream connection reads (cached for the others).
    pub connection: Query,
}

impl LogQueries {
    /// The facts [`crate::request`] reads for `config` on a proxy of `node`'s kind: the union of
    /// what each reporter may need, since a sidecar learns per request which side it is on.
    pub fn new(config: &Config, node: &NodeInfo) -> Self {
        let kind = node.kind();
        let metrics = config.metrics.enabled;
        let mut request = vec![
            Fact::Property(&["xds", "cluster_name"]),
            Fact::Property(&["response", "flags"]),
            Fact::Header(HeaderMap::Response, ":status"),
            Fact::Property(&["response", "code"]),
        ];
        if kind == ProxyKind::Sidecar {
            request.push(Fact::Property(&["xds", "listener_direction"]));
        }
        if metrics || config.traces.span_name == SpanNaming::MethodRoute {
            request.push(Fact::Property(&["xds", "route_name"]));
        }
        if config.traces.enabled || config.logs.enabled {
            request.extend([Fact::Property(&["request", "protocol"]), Fact::Property(&["source", "address"])]);
        }
        if config.logs.enabled {
            request.extend([
                Fact::Property(&["upstream", "address"]),
                Fact::Property(&["request", "size"]),
                Fact::Property(&["response", "size"]),
            ]);
        }
        if metrics {
            request.extend([
                Fact::Property(&["request", "total_size"]),
                Fact::Property(&["response", "total_size"]),
                Fact::Property(&["response", "grpc_status"]),
            ]);
            if kind != ProxyKind::Gateway {
                request.push(Fact::Property(&["connection", "id"]));
            }
            // The upstream peer: a client side's (sidecar outbound, gateway) and a waypoint's.
            request.push(Fact::Property(&["filter_state", UPSTREAM_PEER]));
            if config.metrics.peer_metadata_headers {
                request.push(Fact::Header(HeaderMap::Response, PEER_METADATA_HEADER));
            }
            if kind != ProxyKind::Waypoint {
                request.extend([
                    Fact::Property(&["upstream", "uri_san_peer_certificate"]),
                    Fact::Property(&["upstream", "uri_san_local_certificate"]),
                    Fact::Message(&["xds", "upstream_host_metadata"]),
                ]);
            }
        }
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
        Self { request: Query::new(request), connection: Query::new(connection) }
    }

    /// Compile both; `false` when the proxy refused either (then neither is used).
    pub fn compile(&mut self, host: &dyn Host) -> bool {
        let compiled = self.request.compile(host) && self.connection.compile(host);
        if !compiled {
            self.request.token = None;
            self.connection.token = None;
        }
        compiled
    }
}

/// The proxy, with the facts of one query read in one evaluation.
pub struct Prefetched<'a> {
    host: &'a dyn Host,
    facts: Rc<[Fact]>,
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
        let mut prefetched = Self { host, facts: Rc::from([]), bytes: Vec::new(), values: Vec::new() };
        if query.token.is_none() {
            return (prefetched, Evaluation::NotCompiled);
        }
        let Some(bytes) = host.evaluate(query) else {
            return (prefetched, Evaluation::Failed);
        };
        match ranges(&bytes, query.facts.len()) {
            Some(values) => {
                prefetched.facts = query.facts.clone();
                prefetched.bytes = bytes;
                prefetched.values = values;
                (prefetched, Evaluation::Done)
            }
            None => (prefetched, Evaluation::Failed),
        }
    }

    fn answer(&self, fact: Fact) -> Option<Option<Vec<u8>>> {
        let at = self.facts.iter().position(|f| *f == fact)?;
        let value = self.bytes.get(self.values.get(at)?.clone())?;
        Some((!value.is_empty()).then(|| value.to_vec()))
    }
}

/// Where each of `n` list elements lies in an evaluation's bytes; `None` unless the buffer holds
/// exactly `n` whole elements.
fn ranges(bytes: &[u8], n: usize) -> Option<Vec<Range<usize>>> {
    let list = Headers::over(bytes);
    if list.declared()? != n {
        return None;
    }
    let base = bytes.as_ptr() as usize;
    let values: Vec<Range<usize>> = list
        .iter()
        .map(|(element, _)| {
            let start = element.as_ptr() as usize - base;
            start..start + element.len()
        })
        .collect();
    (values.len() == n).then_some(values)
}

/// Encode `values` as Envoy encodes a CEL list (mock hosts and tests).
pub fn encode_list(values: &[Vec<u8>]) -> Vec<u8> {
    let pairs: Vec<(&[u8], &[u8])> = values.iter().map(|v| (v.as_slice(), &[][..])).collect();
    HeaderPairs::from_pairs(&pairs).into_bytes()
}

impl Host for Prefetched<'_> {
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let found = self.facts.iter().position(|f| matches!(f, Fact::Property(p) | Fact::Message(p) if *p == path));
        match found.and_then(|at| self.answer(self.facts[at])) {
            Some(answer) => answer,
            None => self.host.property(path),
        }
    }

    fn header(&self, map: HeaderMap, name: &str) -> Option<Vec<u8>> {
        let found = self.facts.iter().position(|f| matches!(f, Fact::Header(m, n) if *m == map && *n == name));
        match found.and_then(|at| self.answer(self.facts[at])) {
            Some(answer) => answer,
            None => self.host.header(map, name),
        }
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
        let q = Query::new(vec![Fact::Property(&["response", "code"]), Fact::Property(&["connection", "mtls"])]);
        assert_eq!(
            q.expression(),
            "[('code' in response ? response['code'] : b''), ('mtls' in connection ? connection['mtls'] : b'')]"
        );
    }

    #[test]
    fn the_queries_follow_the_configuration_and_the_proxy_kind() {
        let sidecar = "sidecar~10.0.0.1~a.ns~ns.svc.cluster.local";
        let has = |q: &Query, f: Fact| q.facts().contains(&f);
        let direction = Fact::Property(&["xds", "listener_direction"]);
        let size = Fact::Property(&["request", "size"]);
        let total = Fact::Property(&["request", "total_size"]);
        let all = queries("", sidecar);
        assert!(has(&all.request, direction) && has(&all.request, total) && !has(&all.request, size));
        let gateway = queries("", "router~10.0.0.2~gw.istio-system~istio-system.svc.cluster.local");
        assert!(!has(&gateway.request, direction), "a gateway always reports as the source");
        assert!(!has(&gateway.request, Fact::Property(&["connection", "id"])), "and caches no connection");
        let logs = queries(r#","logs":{"enabled":true},"metrics":{"enabled":false}"#, sidecar);
        assert!(has(&logs.request, size) && !has(&logs.request, total));
        let no_headers = queries(r#","metrics":{"peer_metadata_headers":false}"#, sidecar);
        assert!(!has(&no_headers.request, Fact::Header(HeaderMap::Response, PEER_METADATA_HEADER)));
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
        assert!(q.compile(&host));
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
        assert!(!query.compile(&host));
        let (p, evaluation) = Prefetched::new(&host, &query);
        assert_eq!((evaluation, p.property_u64(&["response", "code"])), (Evaluation::NotCompiled, Some(503)));
        assert_eq!((host.counts().evaluations, host.counts().properties), (0, 1));

        let host = MockHost::new().with_u64("response.code", 503).failing_evaluations();
        let mut query = q();
        assert!(query.compile(&host));
        let (p, evaluation) = Prefetched::new(&host, &query);
        assert_eq!((evaluation, p.property_u64(&["response", "code"])), (Evaluation::Failed, Some(503)));
    }

    #[test]
    fn a_list_of_the_wrong_length_or_shape_is_not_read() {
        let two = encode_list(&[b"a".to_vec(), 7u64.to_le_bytes().to_vec()]);
        assert_eq!(ranges(&two, 2), Some(vec![20..21, 23..31]));
        assert_eq!(ranges(&two, 3), None, "one fact short");
        assert_eq!(ranges(&two[..two.len() - 3], 2), None, "cut");
        assert_eq!(ranges(&[], 0), None, "no count");
        assert_eq!(ranges(&encode_list(&[]), 0), Some(vec![]));
    }
}
