//! One TCP connection as the network filter tracks it: its bytes not counted yet and its labels,
//! once known. [`super::connection`] counts it.

/// Longest wait for Istio's metadata exchange before a connection is labelled with what is
/// known: Istio's default TCP reporting interval (`tcp_reporting_duration`, 5 s).
pub const PEER_WAIT_NS: u64 = 5_000_000_000;

/// What meshtel knows of a connection so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Labels {
    /// Not labelled yet: waiting for the peer (or for the proxy to say what the chain is).
    Waiting,
    /// Not proxied as a whole (an HTTP chain): never counted.
    NotProxied,
    /// Counted under these labels.
    Counted(Box<ConnectionLabels>),
}

/// What a counted connection's series are derived from, read once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLabels {
    /// Istio's standard label values ([`crate::istio::labels::LABEL_NAMES`] order).
    pub standard: Box<[String]>,
    /// The values of `metrics.overrides`' UPSERT expressions.
    pub upserts: Vec<String>,
    /// Whether the proxy serves the connection (the server side of `metrics.overrides`).
    pub server: bool,
}

/// One downstream connection of the network filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConnection {
    pub(crate) opened_ns: u64,
    pub(crate) labels: Labels,
    /// Bytes not counted yet.
    pub(crate) received: u64,
    pub(crate) sent: u64,
    pub(crate) closed: bool,
}

impl TcpConnection {
    /// A connection opened at `now_ns`.
    pub fn new(now_ns: u64) -> Self {
        Self { opened_ns: now_ns, labels: Labels::Waiting, received: 0, sent: 0, closed: false }
    }

    /// `n` bytes read from the downstream peer (`on_downstream_data`).
    pub fn received(&mut self, n: usize) {
        if self.labels != Labels::NotProxied {
            self.received = self.received.saturating_add(n as u64);
        }
    }

    /// `n` bytes written to the downstream peer (`on_upstream_data`).
    pub fn sent(&mut self, n: usize) {
        if self.labels != Labels::NotProxied {
            self.sent = self.sent.saturating_add(n as u64);
        }
    }

    /// Whether its close was counted.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Whether it is counted (labelled), as opposed to waiting or not proxied.
    #[cfg(test)]
    pub fn is_counted(&self) -> bool {
        matches!(self.labels, Labels::Counted(_))
    }

    /// Whether a report can still count anything (it is not closed, nor an HTTP connection).
    pub fn is_reported(&self) -> bool {
        !self.closed && self.labels != Labels::NotProxied
    }
}
