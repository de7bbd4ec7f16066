//! Bounded buffering and the export call state machine, independent of the proxy.
//!
//! Items wait in a [`BoundedQueue`] (oldest dropped and counted past its cap). The root context
//! drains batches on its tick, encodes them, and hands each payload to a [`Sender`], which tracks
//! calls in flight, classifies answers, schedules retries with backoff within a fixed budget, and
//! reports when failures start and when they settle, so that the proxy logs once per change,
//! never once per request or tick.

pub mod handoff;

use std::collections::VecDeque;
use std::time::Duration;

use crate::episode::Episode;
use crate::otlp::Signal;
use crate::quote::quote;

/// A FIFO with a hard cap: pushing onto a full queue drops the oldest item.
#[derive(Debug)]
pub struct BoundedQueue<T> {
    items: VecDeque<T>,
    cap: usize,
    dropped: u64,
}

impl<T> BoundedQueue<T> {
    /// An empty queue holding at most `cap` items (at least one).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        // Grows with use: a signal that is off or quiet costs no memory up front.
        Self { items: VecDeque::new(), cap, dropped: 0 }
    }

    /// Append an item, dropping the oldest one if the queue is full.
    pub fn push(&mut self, item: T) {
        if self.items.len() >= self.cap {
            self.items.pop_front();
            self.dropped += 1;
        }
        self.items.push_back(item);
    }

    /// Take up to `max` of the oldest items.
    pub fn take(&mut self, max: usize) -> Vec<T> {
        let n = max.min(self.items.len());
        self.items.drain(..n).collect()
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Items dropped because the queue was full, since creation.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// Decides when a batch is due: when a full batch waits, or the flush interval has passed.
#[derive(Debug, Clone)]
pub struct FlushTimer {
    interval_ns: u64,
    last_flush_ns: u64,
}

impl FlushTimer {
    /// A timer flushing at least every `interval`.
    pub fn new(interval: Duration, now_ns: u64) -> Self {
        Self { interval_ns: duration_ns(interval), last_flush_ns: now_ns }
    }

    /// Whether a batch should be sent now, given how many items wait and the batch size.
    pub fn due(&self, waiting: usize, max_batch: usize, now_ns: u64) -> bool {
        waiting >= max_batch || (waiting > 0 && now_ns.saturating_sub(self.last_flush_ns) >= self.interval_ns)
    }

    /// Record that a flush happened.
    pub fn flushed(&mut self, now_ns: u64) {
        self.last_flush_ns = now_ns;
    }
}

/// An encoded export request and the number of items it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// What it carries (and so where it goes).
    pub signal: Signal,
    /// OTLP protobuf body.
    pub body: Vec<u8>,
    /// Spans, data points or log records in it.
    pub items: u64,
    /// Calls already made with this payload.
    pub attempts: u32,
}

impl Payload {
    /// A payload of `signal` not yet sent.
    pub fn new(signal: Signal, body: Vec<u8>, items: u64) -> Self {
        Self { signal, body, items, attempts: 0 }
    }
}

/// How an export call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted; `rejected` items were refused by the collector (OTLP partial success), for the
    /// reason in `message`.
    Success {
        /// Items the collector refused.
        rejected: u64,
        /// The collector's `error_message` for them (empty when it gave none).
        message: String,
    },
    /// A transient failure worth retrying; `after` is the collector's `Retry-After`, if any.
    Retry {
        /// What went wrong.
        reason: String,
        /// Delay the collector asked for.
        after: Option<Duration>,
    },
    /// A permanent failure: the payload is dropped.
    Fail {
        /// What went wrong.
        reason: String,
    },
}

impl Outcome {
    /// Accepted whole.
    pub fn success() -> Self {
        Outcome::Success { rejected: 0, message: String::new() }
    }
}

/// Classify an OTLP/HTTP answer (OTLP spec, "Failures"): 2xx succeeds; 429, 502, 503 and 504
/// are retryable; no answer at all (connection refused, timeout, reset) is retryable too;
/// everything else is a permanent failure.
pub fn classify(status: Option<u32>, retry_after: Option<&str>) -> Outcome {
    match status {
        Some(200..=299) => Outcome::success(),
        Some(code @ (429 | 502 | 503 | 504)) => Outcome::Retry {
            reason: format!("collector answered {code}"),
            after: retry_after.and_then(parse_retry_after),
        },
        Some(code) => Outcome::Fail { reason: format!("collector answered {code}") },
        None => {
            Outcome::Retry { reason: "no answer from the collector (refused, reset or timed out)".into(), after: None }
        }
    }
}

/// Classify an OTLP/gRPC answer by its status (OTLP spec, "Failures"; gRPC status codes): OK
/// succeeds; CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE and DATA_LOSS are
/// retryable (the proxy reports an unreachable collector as UNAVAILABLE); everything else
/// (INVALID_ARGUMENT, UNAUTHENTICATED, UNIMPLEMENTED, ...) is permanent. RESOURCE_EXHAUSTED is
/// retryable only when the server says recovery is possible, with a `RetryInfo` in the status
/// details; the ABI's unary gRPC call shows no details (Envoy hands the module the status code
/// and message only), and the spec makes an answer without `RetryInfo` permanent.
pub fn classify_grpc(status: u32) -> Outcome {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    let name = NAMES.get(status as usize).copied().unwrap_or("an unknown status");
    let reason = format!("collector answered gRPC status {status} ({name})");
    match status {
        0 => Outcome::success(),
        1 | 4 | 10 | 11 | 14 | 15 => Outcome::Retry { reason, after: None },
        _ => Outcome::Fail { reason },
    }
}

/// Longest `Retry-After` honoured; a collector asking for more gets this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// First retry delay; it doubles per attempt up to [`MAX_BACKOFF`].
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Longest computed backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// `Retry-After` in delay-seconds form; HTTP dates are ignored (the backoff applies instead).
fn parse_retry_after(v: &str) -> Option<Duration> {
    let secs: u64 = v.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// Backoff before retry number `attempt` (1-based), before its jitter.
pub fn backoff(attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(16);
    INITIAL_BACKOFF.saturating_mul(1 << exp).min(MAX_BACKOFF)
}

/// The delay before retry `attempt`: [`backoff`] with "equal jitter", a point of its upper half
/// picked by `random`, so that VMs and proxies that failed together do not retry together
/// (OTLP spec, "Retrying": exponential backoff with jitter).
pub fn jittered_backoff(attempt: u32, random: u64) -> Duration {
    let full = backoff(attempt);
    let half = full / 2;
    half + Duration::from_nanos(random % (duration_ns(full - half) + 1))
}

/// Counters of one signal's export, cumulative since the VM started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Items the collector accepted.
    pub exported: u64,
    /// Items refused by the collector or dropped after a permanent failure or exhausted retries.
    pub failed: u64,
    /// Export calls that failed (each retry counts).
    pub failed_requests: u64,
    /// Retries scheduled.
    pub retries: u64,
}

/// Failed calls of one signal: an episode from the first failure until calls succeed again
/// (see [`Episode`]), with what it cost.
#[derive(Debug, Default)]
struct Failing {
    episode: Episode,
    /// The reason of the failure that started it, and of the latest one.
    first_reason: String,
    last_reason: String,
    /// [`ExportStats::failed`] when it started.
    failed_before: u64,
}

/// Items the collector refused in calls it accepted (OTLP partial success), as an episode.
#[derive(Debug, Default)]
struct Refusing {
    episode: Episode,
    /// [`ExportStats::exported`] when it started.
    exported_before: u64,
}

/// Tracks export calls of one signal: in flight, waiting for a retry, and their outcomes.
#[derive(Debug)]
pub struct Sender {
    in_flight: Vec<(u32, Payload)>,
    waiting: VecDeque<(u64, Payload)>,
    max_in_flight: usize,
    max_retries: u32,
    stats: ExportStats,
    failing: Failing,
    refusing: Refusing,
    /// The jitter's generator (xorshift64; never zero).
    random: u64,
}

impl Sender {
    /// A sender allowing `max_in_flight` concurrent calls and `max_retries` retries per payload.
    pub fn new(max_in_flight: usize, max_retries: u32) -> Self {
        Self {
            in_flight: Vec::new(),
            waiting: VecDeque::new(),
            max_in_flight: max_in_flight.max(1),
            max_retries,
            stats: ExportStats::default(),
            failing: Failing::default(),
            refusing: Refusing::default(),
            random: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// The same, its retry jitter seeded with `seed` (each VM its own).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.random = seed | 1;
        self
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.random;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.random = x;
        x
    }

    /// Whether call `token` is one of this sender's.
    pub fn owns(&self, token: u32) -> bool {
        self.in_flight.iter().any(|(t, _)| *t == token)
    }

    /// Whether another call may start now.
    pub fn has_capacity(&self) -> bool {
        self.in_flight.len() < self.max_in_flight
    }

    /// A payload whose retry delay has passed, if a call may start.
    pub fn due_retry(&mut self, now_ns: u64) -> Option<Payload> {
        if !self.has_capacity() {
            return None;
        }
        let pos = self.waiting.iter().position(|(due, _)| *due <= now_ns)?;
        self.waiting.remove(pos).map(|(_, p)| p)
    }

    /// Record a call made with `payload`, answered later under `token`.
    pub fn sent(&mut self, token: u32, mut payload: Payload) {
        payload.attempts += 1;
        self.in_flight.push((token, payload));
    }

    /// Record a call the proxy refused to make (e.g. unknown cluster); it is retried like a
    /// failed call. Returns a line to log when this starts an episode of failures.
    pub fn not_sent(&mut self, mut payload: Payload, reason: String, now_ns: u64) -> Option<String> {
        payload.attempts += 1;
        self.failed(payload, Outcome::Retry { reason, after: None }, now_ns)
    }

    /// Record the answer to call `token`. Returns a line to log when this starts an episode
    /// (of failures, or of refused items). Unknown tokens are ignored.
    pub fn completed(&mut self, token: u32, outcome: Outcome, now_ns: u64) -> Option<String> {
        let pos = self.in_flight.iter().position(|(t, _)| *t == token)?;
        let (_, payload) = self.in_flight.swap_remove(pos);
        match outcome {
            Outcome::Success { rejected, message } => {
                let rejected = rejected.min(payload.items);
                let exported_before = self.stats.exported;
                self.stats.exported += payload.items - rejected;
                self.stats.failed += rejected;
                self.failing.episode.went_well();
                if rejected == 0 {
                    self.refusing.episode.went_well();
                    return None;
                }
                let started = self.refusing.episode.occurred(rejected, now_ns);
                if started {
                    self.refusing.exported_before = exported_before;
                }
                started.then(|| {
                    let why = if message.is_empty() { String::new() } else { format!(": {}", quote(&message)) };
                    format!("the collector refused {rejected} of {} items (OTLP partial success){why}", payload.items)
                })
            }
            failure => self.failed(payload, failure, now_ns),
        }
    }

    fn failed(&mut self, payload: Payload, outcome: Outcome, now_ns: u64) -> Option<String> {
        let failed_before = self.stats.failed;
        self.stats.failed_requests += 1;
        let reason = match outcome {
            Outcome::Retry { reason, after } if payload.attempts <= self.max_retries => {
                let random = self.next_random();
                let delay = after.unwrap_or_else(|| jittered_backoff(payload.attempts, random));
                self.stats.retries += 1;
                // Retries wait in a buffer no larger than the in-flight limit: the oldest gives way.
                if self.waiting.len() >= self.max_in_flight {
                    if let Some((_, old)) = self.waiting.pop_front() {
                        self.stats.failed += old.items;
                    }
                }
                self.waiting.push_back((now_ns.saturating_add(duration_ns(delay)), payload));
                reason
            }
            Outcome::Retry { reason, .. } | Outcome::Fail { reason } => {
                self.stats.failed += payload.items;
                reason
            }
            Outcome::Success { .. } => return None,
        };
        let f = &mut self.failing;
        if !f.episode.occurred(1, now_ns) {
            f.last_reason = reason;
            return None;
        }
        f.failed_before = failed_before;
        f.first_reason.clone_from(&reason);
        f.last_reason = reason;
        Some(format!("export failing: {}", f.first_reason))
    }

    /// Lines ending the episodes that settled by `now_ns`: calls succeed again, and no failure
    /// (or refusal) came for [`crate::episode::SETTLE_NS`].
    pub fn settle(&mut self, now_ns: u64) -> Vec<String> {
        let mut lines = Vec::new();
        let f = &mut self.failing;
        if let Some(s) = f.episode.settle(now_ns) {
            let lost = self.stats.failed.saturating_sub(f.failed_before);
            let last =
                if f.last_reason == f.first_reason { String::new() } else { format!("; the last: {}", f.last_reason) };
            lines.push(format!(
                "export recovered: {} calls failed over {} s, {lost} items lost{last}",
                s.count, s.seconds
            ));
        }
        if let Some(s) = self.refusing.episode.settle(now_ns) {
            let accepted = self.stats.exported.saturating_sub(self.refusing.exported_before);
            lines.push(format!(
                "the collector accepts every item again: {} refused over {} s, {accepted} accepted",
                s.count, s.seconds
            ));
        }
        lines
    }

    /// Whether calls are failing (an episode of failures is under way).
    #[cfg(test)]
    fn is_failing(&self) -> bool {
        self.failing.episode.is_open()
    }

    /// Counters since the VM started.
    pub fn stats(&self) -> &ExportStats {
        &self.stats
    }

    /// Payloads waiting for a retry.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Copies of the payloads in flight (their VM is about to be deleted, and Envoy cancels
    /// its calls: whether they arrived is unknown).
    pub fn in_flight_payloads(&self) -> Vec<Payload> {
        self.in_flight.iter().map(|(_, p)| p.clone()).collect()
    }

    /// Take every payload waiting for a retry (their root context ends and hands them on).
    pub fn take_waiting(&mut self) -> Vec<Payload> {
        self.waiting.drain(..).map(|(_, p)| p).collect()
    }

    /// Count `items` as failed: their payload could be neither sent nor handed over.
    pub fn lost(&mut self, items: u64) {
        self.stats.failed += items;
    }

    /// Whether [`Sender::adopt`] has room.
    pub fn can_adopt(&self) -> bool {
        self.waiting.len() < self.max_in_flight
    }

    /// Send `payload`, another root context's, as soon as a call may start: it waits with the
    /// retries, due now, within their cap.
    pub fn adopt(&mut self, payload: Payload, now_ns: u64) {
        if !self.can_adopt() {
            if let Some((_, old)) = self.waiting.pop_front() {
                self.stats.failed += old.items;
            }
        }
        self.waiting.push_back((now_ns, payload));
    }
}

/// Nanoseconds in a duration, saturating.
pub fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn payload(items: u64) -> Payload {
        Payload::new(Signal::Traces, vec![1, 2, 3], items)
    }

    #[test]
    fn adopted_payloads_go_out_like_retries_due_now_within_their_cap() {
        let mut s = Sender::new(2, 3);
        assert!(s.can_adopt());
        s.adopt(payload(1), 10);
        s.adopt(payload(2), 10);
        assert!(!s.can_adopt());
        s.adopt(payload(4), 10);
        assert_eq!(s.stats().failed, 1, "past the cap the oldest gives way, counted");
        let first = s.due_retry(10).unwrap();
        assert_eq!((first.items, first.attempts), (2, 0));
        s.sent(1, first);
        assert_eq!(s.in_flight_payloads().len(), 1);
        assert_eq!(s.take_waiting().iter().map(|p| p.items).collect::<Vec<_>>(), [4]);
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn queue_drops_oldest_past_its_cap() {
        let mut q = BoundedQueue::new(3);
        for i in 0..5 {
            q.push(i);
        }
        assert_eq!((q.len(), q.dropped()), (3, 2));
        assert_eq!(q.take(2), vec![2, 3]);
        assert_eq!(q.take(10), vec![4]);
        assert!(q.is_empty());
    }

    #[test]
    fn flush_is_due_on_full_batch_or_interval() {
        let mut t = FlushTimer::new(Duration::from_secs(1), 0);
        assert!(!t.due(0, 10, 5 * S));
        assert!(!t.due(3, 10, S / 2));
        assert!(t.due(10, 10, S / 2));
        assert!(t.due(3, 10, S));
        t.flushed(S);
        assert!(!t.due(3, 10, S + 1));
    }

    #[test]
    fn classifies_per_otlp_http() {
        assert_eq!(classify(Some(200), None), Outcome::success());
        for code in [429, 502, 503, 504] {
            assert!(matches!(classify(Some(code), None), Outcome::Retry { after: None, .. }));
        }
        assert!(
            matches!(classify(Some(503), Some("7")), Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(7))
        );
        assert!(
            matches!(classify(Some(503), Some("99999")), Outcome::Retry { after: Some(d), .. } if d == MAX_RETRY_AFTER)
        );
        assert!(matches!(
            classify(Some(429), Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            Outcome::Retry { after: None, .. }
        ));
        for code in [400, 401, 404, 500, 501] {
            assert!(matches!(classify(Some(code), None), Outcome::Fail { .. }), "{code}");
        }
        assert!(matches!(classify(None, None), Outcome::Retry { .. }));
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(100), MAX_BACKOFF);
    }

    #[test]
    fn the_jitter_stays_in_the_upper_half_of_the_backoff_and_spreads() {
        let mut s = Sender::new(1, 1).with_seed(42);
        for attempt in [1, 2, 3, 6, 100] {
            let full = backoff(attempt);
            let delays: Vec<Duration> = (0..200).map(|_| jittered_backoff(attempt, s.next_random())).collect();
            assert!(delays.iter().all(|d| *d >= full / 2 && *d <= full), "attempt {attempt}: {delays:?}");
            let (min, max) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
            assert!(*max - *min > full / 4, "attempt {attempt}: spread {min:?}..{max:?}");
        }
        assert_eq!(jittered_backoff(1, 0), Duration::from_millis(500));
        assert_eq!(jittered_backoff(1, duration_ns(Duration::from_millis(500))), Duration::from_secs(1));
    }

    #[test]
    fn grpc_statuses_are_classified_as_the_otlp_spec_says() {
        // OTLP spec, "OTLP/gRPC Throttling" and "Failures": the retryable codes; RESOURCE_EXHAUSTED
        // only with a RetryInfo, which a unary call through the ABI never shows.
        for (code, retry) in [
            (0, None),
            (1, Some(true)),
            (2, Some(false)),
            (3, Some(false)),
            (4, Some(true)),
            (5, Some(false)),
            (7, Some(false)),
            (8, Some(false)),
            (9, Some(false)),
            (10, Some(true)),
            (11, Some(true)),
            (12, Some(false)),
            (13, Some(false)),
            (14, Some(true)),
            (15, Some(true)),
            (16, Some(false)),
            (99, Some(false)),
        ] {
            let outcome = classify_grpc(code);
            let got = match outcome {
                Outcome::Success { .. } => None,
                Outcome::Retry { .. } => Some(true),
                Outcome::Fail { .. } => Some(false),
            };
            assert_eq!(got, retry, "gRPC status {code}");
        }
        for (status, retry) in [
            (Some(200), None),
            (Some(204), None),
            (Some(429), Some(true)),
            (Some(502), Some(true)),
            (Some(503), Some(true)),
            (Some(504), Some(true)),
            (Some(400), Some(false)),
            (Some(401), Some(false)),
            (Some(404), Some(false)),
            (Some(413), Some(false)),
            (Some(500), Some(false)),
            (None, Some(true)),
        ] {
            let got = match classify(status, None) {
                Outcome::Success { .. } => None,
                Outcome::Retry { .. } => Some(true),
                Outcome::Fail { .. } => Some(false),
            };
            assert_eq!(got, retry, "HTTP {status:?}");
        }
    }

    fn partial(rejected: u64, message: &str) -> Outcome {
        Outcome::Success { rejected, message: message.into() }
    }

    #[test]
    fn success_counts_exported_and_partial_rejections() {
        let mut s = Sender::new(2, 3);
        s.sent(1, payload(10));
        let line = s.completed(1, partial(3, "bad span name"), 0);
        assert_eq!(
            line.as_deref(),
            Some("the collector refused 3 of 10 items (OTLP partial success): \"bad span name\"")
        );
        assert_eq!((s.stats().exported, s.stats().failed), (7, 3));
        assert_eq!(s.completed(1, Outcome::success(), 0), None, "unknown token ignored");
        assert_eq!(s.stats().exported, 7);
    }

    #[test]
    fn partial_successes_are_one_episode_logged_when_it_starts_and_settles() {
        let mut s = Sender::new(1, 3);
        let mut lines = Vec::new();
        // A minute of answers refusing some items each: one line.
        for t in 0..60 {
            s.sent(t as u32, payload(10));
            lines.extend(s.completed(t as u32, partial(2, &"x".repeat(100_000)), t * S));
            lines.extend(s.settle(t * S));
        }
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].len() < 300 && lines[0].ends_with("(cut, 100000 bytes)"), "the collector's answer is cut");
        s.sent(99, payload(10));
        assert_eq!(s.completed(99, Outcome::success(), 60 * S), None);
        assert!(s.settle(63 * S).is_empty(), "settles SETTLE_NS after the last refusal");
        assert_eq!(s.settle(64 * S), ["the collector accepts every item again: 120 refused over 59 s, 490 accepted"]);
        assert!(s.settle(100 * S).is_empty());
    }

    #[test]
    fn retries_within_budget_then_drops() {
        let mut s = Sender::new(1, 2);
        s.sent(1, payload(5));
        assert!(!s.has_capacity());
        let log = s.completed(1, classify(Some(503), None), 0);
        assert_eq!(log.as_deref(), Some("export failing: collector answered 503"));
        assert_eq!(s.due_retry(S / 2 - 1), None, "waits for the 1 s backoff, jittered to 0.5-1 s");
        let p = s.due_retry(S).unwrap();
        assert_eq!(p.attempts, 1);
        s.sent(2, p);
        assert_eq!(s.completed(2, classify(Some(503), None), S), None, "same state, no new log line");
        assert_eq!(s.due_retry(2 * S - 1), None, "second backoff is 2 s, jittered to 1-2 s");
        let p = s.due_retry(3 * S).unwrap();
        s.sent(3, p);
        s.completed(3, classify(Some(503), None), 3 * S);
        assert_eq!(s.waiting(), 0, "budget of 2 retries spent");
        assert_eq!(*s.stats(), ExportStats { exported: 0, failed: 5, failed_requests: 3, retries: 2 });
    }

    #[test]
    fn permanent_failures_are_dropped_at_once_and_recovery_is_logged() {
        let mut s = Sender::new(4, 3);
        s.sent(1, payload(4));
        let log = s.completed(1, classify(Some(400), None), 0);
        assert_eq!(log.as_deref(), Some("export failing: collector answered 400"));
        assert_eq!((s.waiting(), s.stats().failed), (0, 4));
        s.sent(2, payload(1));
        assert_eq!(s.completed(2, classify(Some(200), None), S), None, "recovery waits until it settles");
        assert!(s.is_failing() && s.settle(5 * S - 1).is_empty());
        assert_eq!(s.settle(5 * S), ["export recovered: 1 calls failed over 0 s, 4 items lost"]);
        assert!(!s.is_failing());
    }

    /// A collector down for an hour: one line when it starts, one when it settles, whatever the
    /// reasons in between.
    #[test]
    fn an_outage_logs_its_start_and_its_end_only() {
        let mut s = Sender::new(4, 2);
        let mut lines = Vec::new();
        for t in 0..3_600u64 {
            s.sent(t as u32, payload(5));
            let answer = if t % 3 == 0 { classify(None, None) } else { classify(Some(503), None) };
            lines.extend(s.completed(t as u32, answer, t * S));
            lines.extend(s.settle(t * S));
        }
        assert_eq!(lines, ["export failing: no answer from the collector (refused, reset or timed out)"]);
        s.sent(1, payload(5));
        s.completed(1, Outcome::success(), 3_600 * S);
        let end = s.settle(3_606 * S);
        assert_eq!(end.len(), 1);
        assert!(
            end[0].starts_with("export recovered: 3600 calls failed over 3599 s, ")
                && end[0].ends_with("; the last: collector answered 503"),
            "{end:?}"
        );
    }

    /// Calls that fail one in two are one episode, not a line per call.
    #[test]
    fn a_flapping_collector_is_one_episode() {
        let mut s = Sender::new(1, 0);
        let mut lines = 0;
        for t in 0..1_000u64 {
            s.sent(t as u32, payload(1));
            let answer = if t % 2 == 0 { classify(Some(500), None) } else { Outcome::success() };
            lines += usize::from(s.completed(t as u32, answer, t * S / 2).is_some());
            lines += s.settle(t * S / 2).len();
        }
        assert_eq!(lines, 1);
    }

    #[test]
    fn retry_after_is_honoured() {
        let mut s = Sender::new(1, 3);
        s.sent(1, payload(1));
        s.completed(1, classify(Some(429), Some("5")), 0);
        assert_eq!(s.due_retry(4 * S), None);
        assert!(s.due_retry(5 * S).is_some());
    }

    #[test]
    fn calls_the_proxy_refused_are_retried_then_dropped() {
        let mut s = Sender::new(1, 1);
        let log = s.not_sent(payload(2), "cluster not found".into(), 0);
        assert_eq!(log.as_deref(), Some("export failing: cluster not found"));
        let p = s.due_retry(S).unwrap();
        assert_eq!(s.not_sent(p, "cluster not found".into(), S), None);
        assert_eq!((s.waiting(), s.stats().failed), (0, 2));
    }

    #[test]
    fn waiting_retries_are_bounded() {
        let mut s = Sender::new(2, 5);
        for t in 0..2 {
            s.sent(t, payload(1));
        }
        s.completed(0, classify(None, None), 0);
        s.completed(1, classify(None, None), 0);
        s.not_sent(payload(1), "x".into(), 0);
        assert_eq!(s.waiting(), 2);
        assert_eq!(s.stats().failed, 1, "the oldest waiting payload gave way");
    }
}
