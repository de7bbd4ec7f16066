//! The seam between meshtel's logic and the proxy: the calls the request path makes.
//!
//! The glue implements [`Host`] over `proxy_wasm::hostcalls`; unit tests use [`mock::MockHost`].
//! Every read tolerates absence: a property or header the proxy does not have is `None`, and
//! each caller decides what "unknown" means for it.

use crate::headers::HeaderMap;
use crate::headers::HeaderPairs;
use crate::query::Query;

/// What the request path asks of the proxy.
pub trait Host {
    /// A property's raw bytes (`["xds", "cluster_name"]`, ...); `None` when absent or unreadable.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;

    /// One header's value; `None` when absent.
    fn header(&self, map: HeaderMap, name: &str) -> Option<Vec<u8>>;

    /// Every header of a map, in order, in the proxy's encoding; empty when unreadable.
    fn headers(&self, map: HeaderMap) -> HeaderPairs;

    /// Set (`Some`) or remove (`None`) one request header. A refusal costs propagation only.
    fn set_request_header(&self, name: &str, value: Option<&str>);

    /// Now, in nanoseconds since the Unix epoch; 0 when the proxy cannot tell.
    fn now_ns(&self) -> u64;

    /// Compile a CEL expression for this root context (Envoy's `expr_create`); `None` when the
    /// proxy refuses it (a build without the CEL parser, or an expression it cannot compile).
    fn compile(&self, expression: &str) -> Option<u32>;

    /// Evaluate a compiled query for the current request (`expr_evaluate`): a CEL list in the
    /// ABI's pairs encoding (see [`crate::query`]); `None` when the evaluation failed.
    fn evaluate(&self, query: &Query) -> Option<Vec<u8>>;

    /// A UTF-8 string property.
    fn property_string(&self, path: &[&str]) -> Option<String> {
        self.property(path).and_then(|b| String::from_utf8(b).ok())
    }

    /// A non-empty UTF-8 string property.
    fn property_non_empty(&self, path: &[&str]) -> Option<String> {
        self.property_string(path).filter(|s| !s.is_empty())
    }

    /// An integer property (Envoy encodes them as 8 bytes, little-endian).
    fn property_u64(&self, path: &[&str]) -> Option<u64> {
        let bytes: [u8; 8] = self.property(path)?.try_into().ok()?;
        Some(u64::from_le_bytes(bytes))
    }

    /// A boolean property (Envoy encodes them as one byte).
    fn property_bool(&self, path: &[&str]) -> bool {
        self.property(path).is_some_and(|b| b.first() == Some(&1))
    }
}

/// A property path in the ABI's encoding (segments joined by NUL), written into `stack` when it
/// fits (meshtel's own paths do) and into `heap` otherwise: no allocation per property read.
pub fn property_path<'a>(path: &[&str], stack: &'a mut [u8], heap: &'a mut Vec<u8>) -> &'a [u8] {
    let len = path.iter().map(|p| p.len() + 1).sum::<usize>().saturating_sub(1);
    let buffer: &mut [u8] = if len <= stack.len() {
        &mut stack[..len]
    } else {
        heap.clear();
        heap.resize(len, 0);
        heap
    };
    let mut rest = &mut buffer[..];
    for (i, segment) in path.iter().enumerate() {
        if i > 0 {
            let Some((separator, tail)) = std::mem::take(&mut rest).split_first_mut() else { break };
            *separator = 0;
            rest = tail;
        }
        let n = segment.len().min(rest.len());
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
        head.copy_from_slice(&segment.as_bytes()[..n]);
        rest = tail;
    }
    buffer
}

/// A host for unit tests and the micro-benchmarks: properties and headers set up front, every
/// call counted and, unless [`mock::MockHost::counting_only`], recorded.
#[cfg(any(test, feature = "mock-host"))]
pub mod mock {
    use std::cell::{Cell, RefCell};

    use super::{HeaderMap, Host};
    use crate::headers::HeaderPairs;
    use crate::query::{encode_list, Fact, Query};

    /// What the code under test asked for and changed (not kept in counting-only mode).
    #[derive(Debug, Default)]
    pub struct Calls {
        /// Property paths read, joined with `.`, in order.
        pub properties: Vec<String>,
        /// Request headers set or removed, in order.
        pub set: Vec<(String, Option<String>)>,
    }

    /// How many host calls of each kind were made.
    #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
    pub struct Counts {
        /// `get_property`.
        pub properties: usize,
        /// `get_map_value` (one header).
        pub header_reads: usize,
        /// `get_map_bytes` (a whole map).
        pub map_reads: usize,
        /// `replace_map_value` / `remove_map_value` (one header).
        pub header_writes: usize,
        /// `get_current_time_nanoseconds`.
        pub time_reads: usize,
        /// `expr_evaluate` (one CEL query).
        pub evaluations: usize,
        /// Buffers the host allocated in the module to return a value (one per non-empty answer).
        pub returned_buffers: usize,
    }

    impl Counts {
        /// All host calls.
        pub fn total(&self) -> usize {
            self.properties
                + self.header_reads
                + self.map_reads
                + self.header_writes
                + self.time_reads
                + self.evaluations
        }
    }

    /// A proxy that answers from tables.
    #[derive(Debug, Default)]
    pub struct MockHost {
        /// Dotted path and value.
        properties: Vec<(String, Vec<u8>)>,
        headers: Vec<(HeaderMap, String, Vec<u8>)>,
        now_ns: Cell<u64>,
        counting_only: bool,
        /// A proxy built without the CEL parser: `expr_create` refused.
        no_cel: bool,
        /// Every `expr_evaluate` fails (an attribute the guards did not foresee).
        failing_evaluations: bool,
        /// User expressions and what they evaluate to (`None`: an error); any other fails.
        expressions: Vec<(String, Option<Vec<u8>>)>,
        /// Expressions `expr_create` refuses.
        refused: Vec<String>,
        compiled: Cell<u32>,
        counts: Cell<Counts>,
        /// Everything asked and changed so far.
        pub calls: RefCell<Calls>,
    }

    impl MockHost {
        /// A host with nothing set.
        pub fn new() -> Self {
            Self::default()
        }

        /// Count calls without recording them (a benchmark's host: no allocation of its own
        /// beyond the values it returns, as a real host's returned buffers).
        pub fn counting_only(mut self) -> Self {
            self.counting_only = true;
            self
        }

        /// Set a property (path written with `.`, e.g. `xds.cluster_name`) to raw bytes.
        pub fn with_property(mut self, path: &str, value: impl Into<Vec<u8>>) -> Self {
            self.properties.retain(|(k, _)| k != path);
            self.properties.push((path.to_string(), value.into()));
            self
        }

        /// Set an integer property, encoded as Envoy does.
        pub fn with_u64(self, path: &str, value: u64) -> Self {
            self.with_property(path, value.to_le_bytes().to_vec())
        }

        /// Add a header.
        pub fn with_header(mut self, map: HeaderMap, name: &str, value: &str) -> Self {
            self.headers.push((map, name.to_string(), value.as_bytes().to_vec()));
            self
        }

        /// A proxy without the CEL parser.
        pub fn without_cel(mut self) -> Self {
            self.no_cel = true;
            self
        }

        /// A user expression (e.g. `logs.filter`) that evaluates to `value` (`None`: an error,
        /// which fails the whole evaluation it is in).
        pub fn with_expression(mut self, expression: &str, value: Option<Vec<u8>>) -> Self {
            self.expressions.push((expression.to_string(), value));
            self
        }

        /// A proxy that refuses to compile `expression` (a syntax error).
        pub fn refusing(mut self, expression: &str) -> Self {
            self.refused.push(expression.to_string());
            self
        }

        /// A proxy whose CEL evaluations fail.
        pub fn failing_evaluations(mut self) -> Self {
            self.failing_evaluations = true;
            self
        }

        /// Set the clock.
        pub fn at(self, now_ns: u64) -> Self {
            self.now_ns.set(now_ns);
            self
        }

        /// Move the clock.
        pub fn set_now(&self, now_ns: u64) {
            self.now_ns.set(now_ns);
        }

        /// How many times a property was read.
        pub fn reads(&self, path: &str) -> usize {
            self.calls.borrow().properties.iter().filter(|p| *p == path).count()
        }

        /// The host calls made so far, by kind.
        pub fn counts(&self) -> Counts {
            self.counts.get()
        }

        /// Start counting from zero.
        pub fn reset(&self) {
            self.counts.set(Counts::default());
            *self.calls.borrow_mut() = Calls::default();
        }

        fn count(&self, f: impl FnOnce(&mut Counts)) {
            let mut c = self.counts.get();
            f(&mut c);
            self.counts.set(c);
        }

        fn returned(&self, value: Option<Vec<u8>>) -> Option<Vec<u8>> {
            if value.as_ref().is_some_and(|v| !v.is_empty()) {
                self.count(|c| c.returned_buffers += 1);
            }
            value
        }

        fn record(&self, f: impl FnOnce(&mut Calls)) {
            if !self.counting_only {
                f(&mut self.calls.borrow_mut());
            }
        }
    }

    /// Whether `key` is `path` joined with `.` (segments may hold dots themselves).
    fn is_dotted(key: &str, path: &[&str]) -> bool {
        let mut rest = key;
        for (i, segment) in path.iter().enumerate() {
            let Some(after) = rest.strip_prefix(segment) else { return false };
            rest = match after.strip_prefix('.') {
                Some(r) if i + 1 < path.len() => r,
                _ if i + 1 < path.len() => return false,
                _ => after,
            };
        }
        rest.is_empty()
    }

    impl Host for MockHost {
        fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
            self.count(|c| c.properties += 1);
            self.record(|c| c.properties.push(path.join(".")));
            let found = self.properties.iter().find(|(k, _)| is_dotted(k, path));
            self.returned(found.map(|(_, v)| v.clone()))
        }

        fn header(&self, map: HeaderMap, name: &str) -> Option<Vec<u8>> {
            self.count(|c| c.header_reads += 1);
            self.returned(self.headers.iter().find(|(m, k, _)| *m == map && k == name).map(|(_, _, v)| v.clone()))
        }

        fn headers(&self, map: HeaderMap) -> HeaderPairs {
            self.count(|c| c.map_reads += 1);
            let pairs: Vec<(&str, &[u8])> =
                self.headers.iter().filter(|(m, _, _)| *m == map).map(|(_, k, v)| (k.as_str(), v.as_slice())).collect();
            self.count(|c| c.returned_buffers += 1);
            HeaderPairs::from_pairs(&pairs)
        }

        fn set_request_header(&self, name: &str, value: Option<&str>) {
            self.count(|c| c.header_writes += 1);
            self.record(|c| c.set.push((name.to_string(), value.map(str::to_string))));
        }

        fn now_ns(&self) -> u64 {
            self.count(|c| c.time_reads += 1);
            self.now_ns.get()
        }

        fn compile(&self, expression: &str) -> Option<u32> {
            if self.no_cel || self.refused.iter().any(|r| expression.contains(r.as_str())) {
                return None;
            }
            self.compiled.set(self.compiled.get() + 1);
            Some(self.compiled.get())
        }

        // What Envoy answers: each fact as `get_property` / `get_header_map_value` would give
        // it, absent ones empty, in the pairs encoding of a CEL list.
        fn evaluate(&self, query: &Query) -> Option<Vec<u8>> {
            self.count(|c| c.evaluations += 1);
            if self.failing_evaluations || query.token().is_none() {
                return None;
            }
            let table = |path: &[&str]| self.properties.iter().find(|(k, _)| is_dotted(k, path)).map(|(_, v)| &v[..]);
            let holds = query.condition().is_none_or(|c| c.holds(table));
            let head = query.condition().map(|_| vec![u8::from(holds)]);
            let values: Vec<Vec<u8>> = head
                .into_iter()
                .chain(query.facts(holds).iter().map(|fact| {
                    let found = match fact {
                        Fact::Property(path) | Fact::Message(path) | Fact::Present(path) => table(path),
                        Fact::Header(map, name) => {
                            self.headers.iter().find(|(m, k, _)| m == map && k == name).map(|(_, _, v)| &v[..])
                        }
                    };
                    found.unwrap_or_default().to_vec()
                }))
                .collect();
            let mut values = values;
            for expression in query.tail() {
                let found = self.expressions.iter().find(|(e, _)| e == expression);
                values.push(found.and_then(|(_, v)| v.clone())?);
            }
            self.count(|c| c.returned_buffers += 1);
            Some(encode_list(&values))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::property_path;

    #[test]
    fn property_paths_are_joined_by_nul_on_the_stack_or_the_heap() {
        let (mut stack, mut heap) = ([0xaa; 16], Vec::new());
        assert_eq!(property_path(&["xds", "node", "id"], &mut stack, &mut heap), b"xds\0node\0id");
        assert_eq!(property_path(&["plugin_name"], &mut stack, &mut heap), b"plugin_name");
        assert_eq!(property_path(&[], &mut stack, &mut heap), b"");
        let long = ["filter_state", "io.istio.peer_principal"];
        assert_eq!(property_path(&long, &mut stack, &mut heap), b"filter_state\0io.istio.peer_principal");
        assert!(heap.len() > 16, "too long for the stack buffer");
    }
}
