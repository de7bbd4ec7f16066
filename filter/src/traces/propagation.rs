//! Continue or start a trace from request headers, and compute the headers the request leaves with.
//!
//! With W3C and B3 both enabled, a request that arrived with either format leaves with both,
//! carrying the same trace and our span as the parent: meshtel bridges B3 and W3C meshes.

use crate::config::Propagation;
use crate::headers::Headers;
use crate::traces::sampler::RatioSampler;
use crate::traces::trace_context::{
    format_b3_single, format_traceparent, parse_b3_multi, parse_b3_single, parse_traceparent, sanitize_tracestate,
    Extracted, SpanId, TraceId,
};

/// Source of new trace and span ids: a fast non-cryptographic generator seeded per VM.
#[derive(Debug, Clone)]
pub struct IdGenerator(fastrand::Rng);

impl IdGenerator {
    /// A generator seeded with `seed` (use real entropy in production).
    pub fn with_seed(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
    }

    /// A new non-zero trace id.
    pub fn trace_id(&mut self) -> TraceId {
        loop {
            let id = self.0.u128(..).to_be_bytes();
            if id != [0; 16] {
                return TraceId(id);
            }
        }
    }

    /// A new non-zero span id.
    pub fn span_id(&mut self) -> SpanId {
        loop {
            let id = self.0.u64(..).to_be_bytes();
            if id != [0; 8] {
                return SpanId(id);
            }
        }
    }
}

/// The trace decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceDecision {
    /// The trace the request belongs to (continued or new).
    pub trace_id: TraceId,
    /// The span this proxy records for the request, and the parent it propagates.
    pub span_id: SpanId,
    /// The caller's span, when the trace was continued.
    pub parent_span_id: Option<SpanId>,
    /// Whether the span is recorded and the request leaves marked sampled.
    pub sampled: bool,
    /// The W3C `tracestate` continued with the trace, after validation.
    pub tracestate: Option<String>,
}

/// A change to the request headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderOp {
    /// Set (replace) the header.
    Set(&'static str, String),
    /// Remove the header.
    Remove(&'static str),
}

/// Header names this module reads and writes.
pub mod names {
    /// W3C parent.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C vendor state.
    pub const TRACESTATE: &str = "tracestate";
    /// B3 single header.
    pub const B3: &str = "b3";
    /// B3 multi-header trace id.
    pub const B3_TRACE_ID: &str = "x-b3-traceid";
    /// B3 multi-header span id.
    pub const B3_SPAN_ID: &str = "x-b3-spanid";
    /// B3 multi-header parent span id.
    pub const B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
    /// B3 multi-header sampling state.
    pub const B3_SAMPLED: &str = "x-b3-sampled";
    /// B3 multi-header debug flag.
    pub const B3_FLAGS: &str = "x-b3-flags";
}
use names::*;

/// Decide the trace for a request and the header changes that propagate it.
///
/// Formats are read in `formats` order and the first valid parent wins; when no format carries
/// a parent, the first sampling decision found is kept for the new trace.
pub fn start_trace(
    formats: &[Propagation],
    sampler: &RatioSampler,
    headers: Headers<'_>,
    ids: &mut IdGenerator,
    forced: bool,
) -> (TraceDecision, Vec<HeaderOp>) {
    let mut chosen: Option<(Propagation, Extracted)> = None;
    let mut decision_only: Option<bool> = None;
    for &format in formats {
        let Some(extracted) = extract(format, headers) else {
            continue;
        };
        if extracted.parent.is_some() {
            chosen = Some((format, extracted));
            break;
        }
        decision_only = decision_only.or(extracted.sampled);
    }

    let parent = chosen.and_then(|(_, e)| e.parent);
    let incoming = match chosen {
        Some((_, e)) => e.sampled.or(decision_only),
        None => decision_only,
    };
    let trace_id = parent.map(|p| p.trace_id).unwrap_or_else(|| ids.trace_id());
    let continued_w3c = matches!(chosen, Some((Propagation::W3c, _)));
    let original_tracestate = headers.joined(TRACESTATE);
    let tracestate = if continued_w3c {
        original_tracestate.as_deref().and_then(sanitize_tracestate).filter(|s| !s.is_empty())
    } else {
        None
    };
    let decision = TraceDecision {
        trace_id,
        span_id: ids.span_id(),
        parent_span_id: parent.map(|p| p.span_id),
        // A forced trace is a new one sampled whatever the ratio; an incoming decision stands,
        // as in Envoy's OpenTelemetry tracer (it samples a span with a parent by the parent).
        sampled: if incoming.is_none() && forced { true } else { sampler.decide(incoming, &trace_id) },
        tracestate,
    };

    let mut ops = Vec::with_capacity(6);
    for format in formats {
        match format {
            Propagation::W3c => {
                ops.push(HeaderOp::Set(
                    TRACEPARENT,
                    format_traceparent(&decision.trace_id, &decision.span_id, decision.sampled),
                ));
                match (&original_tracestate, &decision.tracestate) {
                    (Some(orig), Some(kept)) if orig == kept => {}
                    (_, Some(kept)) => ops.push(HeaderOp::Set(TRACESTATE, kept.clone())),
                    (Some(_), None) => ops.push(HeaderOp::Remove(TRACESTATE)),
                    (None, None) => {}
                }
            }
            Propagation::B3 => push_b3_ops(&decision, headers, &mut ops),
        }
    }
    (decision, ops)
}

fn extract(format: Propagation, headers: Headers<'_>) -> Option<Extracted> {
    match format {
        Propagation::W3c => {
            let (parent, sampled) = parse_traceparent(headers.single(TRACEPARENT)?)?;
            Some(Extracted { parent: Some(parent), sampled: Some(sampled) })
        }
        Propagation::B3 => {
            // The single header takes precedence when both forms are present.
            if headers.contains(B3) {
                if let Some(e) = headers.single(B3).and_then(parse_b3_single) {
                    return Some(e);
                }
            }
            parse_b3_multi(
                headers.single(B3_TRACE_ID),
                headers.single(B3_SPAN_ID),
                headers.single(B3_SAMPLED),
                headers.single(B3_FLAGS),
            )
        }
    }
}

fn push_b3_ops(d: &TraceDecision, headers: Headers<'_>, ops: &mut Vec<HeaderOp>) {
    ops.push(HeaderOp::Set(B3_TRACE_ID, d.trace_id.to_hex()));
    ops.push(HeaderOp::Set(B3_SPAN_ID, d.span_id.to_hex()));
    ops.push(HeaderOp::Set(B3_SAMPLED, if d.sampled { "1" } else { "0" }.into()));
    match d.parent_span_id {
        Some(p) => ops.push(HeaderOp::Set(B3_PARENT_SPAN_ID, p.to_hex())),
        None if headers.contains(B3_PARENT_SPAN_ID) => ops.push(HeaderOp::Remove(B3_PARENT_SPAN_ID)),
        None => {}
    }
    if !d.sampled && headers.contains(B3_FLAGS) {
        ops.push(HeaderOp::Remove(B3_FLAGS));
    }
    // Keep a single `b3` header consistent when the caller used that form.
    if headers.contains(B3) {
        ops.push(HeaderOp::Set(B3, format_b3_single(&d.trace_id, &d.span_id, d.sampled, d.parent_span_id.as_ref())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::HeaderPairs;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";
    const BOTH: &[Propagation] = &[Propagation::W3c, Propagation::B3];

    fn run(formats: &[Propagation], ratio: f64, pairs: &[(&str, &str)]) -> (TraceDecision, Vec<HeaderOp>) {
        let headers = HeaderPairs::from_pairs(pairs);
        start_trace(formats, &RatioSampler::new(ratio), headers.view(), &mut IdGenerator::with_seed(1), false)
    }

    fn set<'a>(ops: &'a [HeaderOp], name: &str) -> Option<&'a str> {
        ops.iter().find_map(|op| match op {
            HeaderOp::Set(n, v) if *n == name => Some(v.as_str()),
            _ => None,
        })
    }

    fn removed(ops: &[HeaderOp], name: &str) -> bool {
        ops.contains(&HeaderOp::Remove(match name {
            "tracestate" => TRACESTATE,
            "x-b3-parentspanid" => B3_PARENT_SPAN_ID,
            "x-b3-flags" => B3_FLAGS,
            _ => unreachable!(),
        }))
    }

    #[test]
    fn w3c_parent_is_continued_and_bridged_to_b3() {
        let (d, ops) = run(BOTH, 0.0, &[("traceparent", &format!("00-{TRACE}-{SPAN}-01")), ("tracestate", "a=1")]);
        assert_eq!(d.trace_id.to_hex(), TRACE);
        assert_eq!(d.parent_span_id.unwrap().to_hex(), SPAN);
        assert!(d.sampled, "incoming decision beats ratio 0");
        assert_eq!(d.tracestate.as_deref(), Some("a=1"));
        let own = d.span_id.to_hex();
        assert_eq!(set(&ops, "traceparent").unwrap(), format!("00-{TRACE}-{own}-01"));
        assert_eq!(set(&ops, "tracestate"), None, "a valid tracestate is left as it is");
        assert_eq!(set(&ops, "x-b3-traceid"), Some(TRACE));
        assert_eq!(set(&ops, "x-b3-spanid"), Some(own.as_str()));
        assert_eq!(set(&ops, "x-b3-parentspanid"), Some(SPAN));
        assert_eq!(set(&ops, "x-b3-sampled"), Some("1"));
        assert_eq!(set(&ops, "b3"), None, "the single form is only written when it arrived");
    }

    #[test]
    fn b3_multi_parent_is_continued_and_bridged_to_w3c() {
        let (d, ops) = run(BOTH, 1.0, &[("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN), ("x-b3-sampled", "0")]);
        assert_eq!(d.trace_id.to_hex(), TRACE);
        assert!(!d.sampled, "incoming 'not sampled' beats ratio 1");
        let own = d.span_id.to_hex();
        assert_eq!(set(&ops, "traceparent").unwrap(), format!("00-{TRACE}-{own}-00"));
        assert_eq!(set(&ops, "x-b3-sampled"), Some("0"));
    }

    #[test]
    fn b3_single_parent_is_rewritten_in_both_b3_forms() {
        let (d, ops) = run(BOTH, 0.0, &[("b3", &format!("{TRACE}-{SPAN}-1"))]);
        let own = d.span_id.to_hex();
        assert_eq!(set(&ops, "b3").unwrap(), format!("{TRACE}-{own}-1-{SPAN}"));
        assert_eq!(set(&ops, "x-b3-spanid"), Some(own.as_str()));
        assert_eq!(set(&ops, "traceparent").unwrap(), format!("00-{TRACE}-{own}-01"));
    }

    #[test]
    fn b3_without_decision_defers_to_the_ratio() {
        let (d, _) = run(BOTH, 1.0, &[("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)]);
        assert!(d.sampled);
        let (d, _) = run(BOTH, 0.0, &[("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)]);
        assert!(!d.sampled);
    }

    #[test]
    fn first_configured_format_wins() {
        let other = "11111111111111111111111111111111";
        let pairs = [
            ("traceparent", format!("00-{TRACE}-{SPAN}-01")),
            ("x-b3-traceid", other.to_string()),
            ("x-b3-spanid", SPAN.to_string()),
        ];
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(run(BOTH, 1.0, &pairs).0.trace_id.to_hex(), TRACE);
        assert_eq!(run(&[Propagation::B3, Propagation::W3c], 1.0, &pairs).0.trace_id.to_hex(), other);
    }

    #[test]
    fn invalid_traceparent_restarts_the_trace_and_drops_tracestate() {
        let (d, ops) = run(BOTH, 1.0, &[("traceparent", &format!("00-{TRACE}-{SPAN}-1")), ("tracestate", "a=1")]);
        assert_ne!(d.trace_id.to_hex(), TRACE);
        assert_eq!(d.parent_span_id, None);
        assert!(removed(&ops, "tracestate"));
        assert!(set(&ops, "traceparent").unwrap().starts_with(&format!("00-{}-", d.trace_id.to_hex())));
    }

    #[test]
    fn repeated_traceparent_is_invalid() {
        let tp = format!("00-{TRACE}-{SPAN}-01");
        let (d, _) = run(BOTH, 1.0, &[("traceparent", &tp), ("traceparent", &tp)]);
        assert_ne!(d.trace_id.to_hex(), TRACE);
    }

    #[test]
    fn invalid_tracestate_is_dropped_but_the_parent_kept() {
        let (d, ops) =
            run(BOTH, 1.0, &[("traceparent", &format!("00-{TRACE}-{SPAN}-01")), ("tracestate", "a=1,Bad=2")]);
        assert_eq!(d.trace_id.to_hex(), TRACE);
        assert_eq!(d.tracestate, None);
        assert!(removed(&ops, "tracestate"));
        // A duplicate key is the sender's fault: the first member stays (W3C Level 2).
        let (d, _) = run(BOTH, 1.0, &[("traceparent", &format!("00-{TRACE}-{SPAN}-01")), ("tracestate", "a=1,a=2")]);
        assert_eq!(d.tracestate.as_deref(), Some("a=1"));
    }

    #[test]
    fn repeated_tracestate_headers_combine() {
        let (d, ops) = run(
            BOTH,
            1.0,
            &[("traceparent", &format!("00-{TRACE}-{SPAN}-01")), ("tracestate", "a=1"), ("tracestate", "b=2")],
        );
        assert_eq!(d.tracestate.as_deref(), Some("a=1,b=2"));
        assert_eq!(set(&ops, "tracestate"), None, "repeated lines are equivalent to the joined value");
    }

    #[test]
    fn no_context_starts_a_new_sampled_trace_by_ratio() {
        let (d, ops) = run(BOTH, 1.0, &[]);
        assert!(d.sampled && d.parent_span_id.is_none());
        assert!(!removed(&ops, "x-b3-parentspanid"));
        assert_eq!(set(&ops, "x-b3-traceid").unwrap(), d.trace_id.to_hex());
        let (d, _) = run(BOTH, 0.0, &[]);
        assert!(!d.sampled);
    }

    #[test]
    fn decision_without_ids_is_kept_for_the_new_trace() {
        let (d, _) = run(BOTH, 1.0, &[("b3", "0")]);
        assert!(!d.sampled);
        let (d, ops) = run(BOTH, 0.0, &[("x-b3-flags", "1")]);
        assert!(d.sampled);
        assert_eq!(set(&ops, "x-b3-sampled"), Some("1"));
    }

    #[test]
    fn stale_b3_parent_and_debug_flag_are_cleared() {
        let (_, ops) = run(BOTH, 0.0, &[("x-b3-parentspanid", SPAN), ("x-b3-flags", "0")]);
        assert!(removed(&ops, "x-b3-parentspanid"));
        assert!(removed(&ops, "x-b3-flags"));
    }

    #[test]
    fn only_configured_formats_are_read_and_written() {
        let (d, ops) = run(&[Propagation::W3c], 1.0, &[("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)]);
        assert_ne!(d.trace_id.to_hex(), TRACE);
        assert_eq!(set(&ops, "x-b3-traceid"), None);
        let (d, ops) = run(&[], 1.0, &[("traceparent", &format!("00-{TRACE}-{SPAN}-01"))]);
        assert_ne!(d.trace_id.to_hex(), TRACE);
        assert!(ops.is_empty());
    }

    #[test]
    fn non_utf8_header_values_are_ignored() {
        let headers = HeaderPairs::from_pairs(&[("traceparent", [0xff, 0xfe])]);
        let (d, _) = start_trace(BOTH, &RatioSampler::new(1.0), headers.view(), &mut IdGenerator::with_seed(1), false);
        assert_eq!(d.parent_span_id, None);
    }

    #[test]
    fn generated_ids_are_distinct_and_non_zero() {
        let mut ids = IdGenerator::with_seed(0);
        let a = ids.trace_id();
        let b = ids.trace_id();
        assert_ne!(a, b);
        assert_ne!(a.0, [0; 16]);
        assert_ne!(ids.span_id().0, [0; 8]);
    }
}
