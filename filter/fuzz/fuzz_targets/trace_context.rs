//! Any request headers: trace context is continued or restarted, and the request always leaves
//! with valid context in every configured format.
#![no_main]

use meshtel_filter::config::Propagation;
use meshtel_filter::headers::HeaderPairs;
use meshtel_filter::traces::propagation::{start_trace, HeaderOp, IdGenerator};
use meshtel_filter::traces::sampler::RatioSampler;
use meshtel_filter::traces::trace_context::{parse_b3_single, parse_traceparent, sanitize_tracestate, TRACESTATE_MAX_LEN};

const NAMES: [&str; 8] =
    ["traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags", "x-b3-parentspanid"];

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Each line is a header: its first byte picks the name, the rest is the raw value.
    let headers: Vec<(&str, &[u8])> = data
        .split(|b| *b == b'\n')
        .filter_map(|line| Some((NAMES[usize::from(*line.first()?) % NAMES.len()], &line[1..])))
        .collect();
    let headers = HeaderPairs::from_pairs(&headers);
    let sampler = RatioSampler::new(0.5);
    let (decision, ops) = start_trace(&[Propagation::W3c, Propagation::B3], &sampler, headers.view(), &mut IdGenerator::with_seed(7), data.first().is_some_and(|b| b & 1 == 1));
    for op in ops {
        if let HeaderOp::Set(name, value) = op {
            match name {
                "traceparent" => {
                    let (parent, sampled) = parse_traceparent(&value).expect("we write valid traceparent");
                    assert_eq!((parent.trace_id, parent.span_id, sampled), (decision.trace_id, decision.span_id, decision.sampled));
                }
                "tracestate" => assert!(value.len() <= TRACESTATE_MAX_LEN && sanitize_tracestate(&value).as_deref() == Some(value.as_str())),
                "b3" => assert!(parse_b3_single(&value).and_then(|e| e.parent).is_some()),
                _ => {}
            }
        }
    }
    // The same bytes as a header map in the ABI's encoding, as a misbehaving host might send it.
    let raw = HeaderPairs::from_bytes(data.to_vec());
    assert!(raw.view().iter().count() <= data.len() / 8);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_traceparent(s);
        let _ = sanitize_tracestate(s);
        let _ = parse_b3_single(s);
    }
});
