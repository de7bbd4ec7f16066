//! The CEL queries the log phase hands the proxy: lists of facts (properties and headers), each
//! guarded against absence, compiled once and evaluated once per request. What the answers mean,
//! and when a query is worth it, is [`crate::prefetch`]'s.

use std::rc::Rc;

use crate::headers::{HeaderMap, HeaderPairs};

/// One read of the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fact {
    /// A property, by its path (`["xds", "cluster_name"]`).
    Property(&'static [&'static str]),
    /// A property Envoy has for every HTTP request in the log phase (`response.flags`, the
    /// total sizes, `connection.id`): not guarded, which saves a lookup. Should it be absent
    /// after all, the evaluation fails and that request is read fact by fact (counted).
    Present(&'static [&'static str]),
    /// A property that is a protobuf message (`["xds", "upstream_host_metadata"]`). An empty
    /// one is CEL's `null`, which Envoy cannot serialize in a list: it is guarded too.
    Message(&'static [&'static str]),
    /// One header of the request's request or response headers.
    Header(HeaderMap, &'static str),
}

impl Fact {
    /// The CEL that yields this fact, or empty bytes when it is absent.
    pub(crate) fn cel(&self) -> String {
        let (top, keys): (&str, Vec<&str>) = match self {
            Fact::Property(path) | Fact::Message(path) | Fact::Present(path) => match path.split_first() {
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
        match self {
            Fact::Message(_) => guards.push(format!("{value} != null")),
            Fact::Present(_) => return value,
            _ => {}
        }
        format!("({} ? {value} : b'')", guards.join(" && "))
    }
}

/// What decides, in the proxy, which of a split query's two lists to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// The request's cluster name starts with this (`inbound|`: a sidecar's inbound side).
    ClusterPrefix(&'static str),
}

impl Condition {
    fn cel(&self) -> String {
        match self {
            Condition::ClusterPrefix(prefix) => {
                format!("('cluster_name' in xds && xds['cluster_name'].startsWith('{prefix}'))")
            }
        }
    }

    /// Whether it holds where `property` reads the properties (what a mock host evaluates).
    pub fn holds<'a>(&self, property: impl Fn(&[&str]) -> Option<&'a [u8]>) -> bool {
        match self {
            Condition::ClusterPrefix(prefix) => {
                property(&["xds", "cluster_name"]).is_some_and(|c| c.starts_with(prefix.as_bytes()))
            }
        }
    }
}

/// A list of facts, read in one evaluation once the proxy compiled it. A split query holds two
/// lists and a condition the proxy evaluates first, so that each request pays only for the
/// facts its side needs; its answer starts with the condition's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The facts, or those read when the condition holds.
    pub(crate) facts: Rc<[Fact]>,
    /// The condition, and the facts read when it does not hold.
    pub(crate) otherwise: Option<(Condition, Rc<[Fact]>)>,
    /// The user's expressions (`logs.filter`), evaluated after the facts in either list.
    pub(crate) tail: Rc<[String]>,
    /// The proxy's token for the compiled expression; `None` until compiled, or when refused.
    pub(crate) token: Option<u32>,
}

fn list(facts: &[Fact], head: Option<&str>, tail: &[String]) -> String {
    let items: Vec<String> = head
        .map(str::to_string)
        .into_iter()
        .chain(facts.iter().map(Fact::cel))
        .chain(tail.iter().map(|e| format!("({e})")))
        .collect();
    format!("[{}]", items.join(", "))
}

impl Query {
    /// A query for `facts`, not compiled yet.
    pub fn new(facts: Vec<Fact>) -> Self {
        Self { facts: facts.into(), otherwise: None, tail: Rc::from([]), token: None }
    }

    /// This query with the user's `expressions` evaluated after its facts.
    pub fn with_tail(mut self, expressions: Vec<String>) -> Self {
        self.tail = expressions.into();
        self.token = None;
        self
    }

    /// The user's expressions.
    pub fn tail(&self) -> &[String] {
        &self.tail
    }

    /// A query that reads `then` where `condition` holds and `otherwise` elsewhere.
    pub fn split(condition: Condition, then: Vec<Fact>, otherwise: Vec<Fact>) -> Self {
        Self { facts: then.into(), otherwise: Some((condition, otherwise.into())), tail: Rc::from([]), token: None }
    }

    /// The facts a request reads: those of the list the condition picks.
    pub fn facts(&self, condition_holds: bool) -> &[Fact] {
        match &self.otherwise {
            Some((_, otherwise)) if !condition_holds => otherwise,
            _ => &self.facts,
        }
    }

    /// The condition of a split query.
    pub fn condition(&self) -> Option<Condition> {
        self.otherwise.as_ref().map(|(c, _)| *c)
    }

    /// The CEL expression: a list of the facts, each guarded against absence (a split query:
    /// `COND ? [true, ...] : [false, ...]`).
    pub fn expression(&self) -> String {
        match &self.otherwise {
            None => list(&self.facts, None, &self.tail),
            Some((condition, otherwise)) => format!(
                "{} ? {} : {}",
                condition.cel(),
                list(&self.facts, Some("true"), &self.tail),
                list(otherwise, Some("false"), &self.tail)
            ),
        }
    }

    /// Compile the expression with `compile` (the proxy's `expr_create`); `false` when it was
    /// refused.
    pub fn compile_with(&mut self, compile: impl FnOnce(&str) -> Option<u32>) -> bool {
        self.token = compile(&self.expression());
        self.token.is_some()
    }

    /// The proxy's token, once compiled.
    pub fn token(&self) -> Option<u32> {
        self.token
    }
}

/// Encode `values` as Envoy encodes a CEL list (mock hosts and tests).
pub fn encode_list(values: &[Vec<u8>]) -> Vec<u8> {
    let pairs: Vec<(&[u8], &[u8])> = values.iter().map(|v| (v.as_slice(), &[][..])).collect();
    HeaderPairs::from_pairs(&pairs).into_bytes()
}
