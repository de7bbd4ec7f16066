//! Trace context wire formats: W3C Trace Context Level 1 and B3 (multi-header and single).
//!
//! Parsers are strict where the specs are strict and return `None` for anything invalid, so
//! the caller restarts the trace instead of propagating garbage.
//! W3C: <https://www.w3.org/TR/trace-context-1/>; B3: <https://github.com/openzipkin/b3-propagation>.

/// A 16-byte trace id; never all zeros once parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id; never all zeros once parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    /// Lower-case hex, 32 characters.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// Parse 32 lower-case hex characters; all zeros is invalid.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut id = [0u8; 16];
        decode_lower_hex(s, &mut id)?;
        (id != [0; 16]).then_some(Self(id))
    }

    /// Parse a B3 trace id: 32 or 16 lower-case hex characters (a 64-bit id is left-padded).
    pub fn from_b3_hex(s: &str) -> Option<Self> {
        if s.len() == 16 {
            let mut id = [0u8; 16];
            decode_lower_hex(s, &mut id[8..])?;
            return (id != [0; 16]).then_some(Self(id));
        }
        Self::from_hex(s)
    }
}

impl SpanId {
    /// Lower-case hex, 16 characters.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// Parse 16 lower-case hex characters; all zeros is invalid.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut id = [0u8; 8];
        decode_lower_hex(s, &mut id)?;
        (id != [0; 8]).then_some(Self(id))
    }
}

/// A remote parent read from request headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteParent {
    /// The trace the request belongs to.
    pub trace_id: TraceId,
    /// The caller's span.
    pub span_id: SpanId,
}

/// What one trace context format says about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extracted {
    /// The parent span, if the headers carried valid ids.
    pub parent: Option<RemoteParent>,
    /// The caller's sampling decision, if it made one.
    pub sampled: Option<bool>,
}

/// Parse a `traceparent` header (W3C Trace Context Level 1, section 3.2).
///
/// Version `00` must be exactly 55 characters. A higher version is parsed as `00` when the
/// first 55 characters fit and the rest, if any, starts with `-`; version `ff` is invalid.
pub fn parse_traceparent(value: &str) -> Option<(RemoteParent, bool)> {
    let v = value.trim_matches([' ', '\t']).as_bytes();
    if v.len() < 55 {
        return None;
    }
    let version = decode_lower_hex_byte(&v[0..2])?;
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let s = std::str::from_utf8(&v[..55]).ok()?;
    let trace_id = TraceId::from_hex(&s[3..35])?;
    let span_id = SpanId::from_hex(&s[36..52])?;
    let flags = decode_lower_hex_byte(&v[53..55])?;
    Some((RemoteParent { trace_id, span_id }, flags & 1 == 1))
}

/// Format a version `00` `traceparent`.
pub fn format_traceparent(trace_id: &TraceId, span_id: &SpanId, sampled: bool) -> String {
    let mut s = String::with_capacity(55);
    s.push_str("00-");
    push_hex(&mut s, &trace_id.0);
    s.push('-');
    push_hex(&mut s, &span_id.0);
    s.push_str(if sampled { "-01" } else { "-00" });
    s
}

/// Most list members a `tracestate` may carry.
pub const TRACESTATE_MAX_MEMBERS: usize = 32;
/// Length up to which a `tracestate` is propagated whole; longer ones are truncated.
pub const TRACESTATE_MAX_LEN: usize = 512;
/// Members longer than this are the first removed when a `tracestate` is truncated.
const TRACESTATE_LONG_MEMBER: usize = 128;

/// Validate a `tracestate` (all its header lines joined with `,`) and return what to propagate.
///
/// Returns `None` when the header is invalid (a bad member, more than 32 members): the spec
/// says to discard it then. Empty members are dropped. A key that comes again is the sender's
/// fault, and the spec allows dropping the duplicate: the first member of each key is kept
/// (W3C Trace Context Level 2, "tracestate Header Field Values"). A value longer than 512
/// characters is truncated as the spec recommends (long members first, then from the end).
pub fn sanitize_tracestate(value: &str) -> Option<String> {
    let mut members: Vec<(&str, &str)> = Vec::new();
    for member in value.split(',') {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() {
            continue;
        }
        let (key, val) = member.split_once('=')?;
        if !is_tracestate_key(key) || !is_tracestate_value(val) {
            return None;
        }
        if members.iter().any(|(k, _)| *k == key) {
            continue;
        }
        members.push((key, val));
        if members.len() > TRACESTATE_MAX_MEMBERS {
            return None;
        }
    }
    let joined_len = |m: &[(&str, &str)]| -> usize {
        m.iter().map(|(k, v)| k.len() + 1 + v.len()).sum::<usize>() + m.len().saturating_sub(1)
    };
    if joined_len(&members) > TRACESTATE_MAX_LEN {
        members.retain(|(k, v)| k.len() + 1 + v.len() <= TRACESTATE_LONG_MEMBER);
        while joined_len(&members) > TRACESTATE_MAX_LEN {
            members.pop();
        }
    }
    let mut out = String::with_capacity(joined_len(&members));
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    Some(out)
}

// W3C Trace Context Level 2 (the current draft): `key = ( lcalpha / DIGIT ) 0*255 ( keychar )`,
// `keychar = lcalpha / DIGIT / "_" / "-" / "*" / "/" / "@"`. Every Level 1 key (simple, and
// multi-tenant `tenant@system`) fits, and so do longer multi-tenant ones.
fn is_key_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'*' | b'/' | b'@')
}

fn is_tracestate_key(key: &str) -> bool {
    let k = key.as_bytes();
    (1..=256).contains(&k.len())
        && (k[0].is_ascii_lowercase() || k[0].is_ascii_digit())
        && k.iter().all(|&b| is_key_char(b))
}

fn is_tracestate_value(val: &str) -> bool {
    let v = val.as_bytes();
    let printable = |b: u8| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=';
    !v.is_empty() && v.len() <= 256 && v.iter().all(|&b| printable(b)) && v.last().is_some_and(|&b| b != b' ')
}

/// Parse a B3 sampling state: `1`/`true`, `0`/`false`, or `d` (debug, which implies sampled).
fn parse_b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// Parse the single `b3` header: `{trace}-{span}[-{sampled}[-{parent}]]` or a lone sampling state.
pub fn parse_b3_single(value: &str) -> Option<Extracted> {
    let value = value.trim_matches([' ', '\t']);
    let mut parts = value.split('-');
    let first = parts.next()?;
    let Some(span) = parts.next() else {
        return Some(Extracted {
            parent: None,
            sampled: Some(parse_b3_sampled(first).filter(|_| first != "true" && first != "false")?),
        });
    };
    let trace_id = TraceId::from_b3_hex(first)?;
    let span_id = SpanId::from_hex(span)?;
    let sampled = match parts.next() {
        None => None,
        Some(s) if s == "0" || s == "1" || s == "d" => parse_b3_sampled(s),
        Some(_) => return None,
    };
    if let Some(parent) = parts.next() {
        SpanId::from_hex(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Extracted { parent: Some(RemoteParent { trace_id, span_id }), sampled })
}

/// Parse the `x-b3-*` headers. `trace` and `span` must both be valid for a parent; a sampling
/// state alone (`x-b3-sampled` or `x-b3-flags: 1`) is a decision without a parent.
pub fn parse_b3_multi(
    trace: Option<&str>,
    span: Option<&str>,
    sampled: Option<&str>,
    flags: Option<&str>,
) -> Option<Extracted> {
    let debug = flags.map(str::trim) == Some("1");
    let sampled = match sampled.map(str::trim) {
        Some(s) => Some(parse_b3_sampled(s).filter(|_| s != "d")?),
        None => None,
    };
    let sampled = if debug { Some(true) } else { sampled };
    let parent = match (trace, span) {
        (None, None) => None,
        (Some(t), Some(s)) => {
            Some(RemoteParent { trace_id: TraceId::from_b3_hex(t.trim())?, span_id: SpanId::from_hex(s.trim())? })
        }
        _ => return None,
    };
    if parent.is_none() && sampled.is_none() {
        return None;
    }
    Some(Extracted { parent, sampled })
}

/// Format the single `b3` header.
pub fn format_b3_single(trace_id: &TraceId, span_id: &SpanId, sampled: bool, parent: Option<&SpanId>) -> String {
    let mut s = String::with_capacity(68);
    push_hex(&mut s, &trace_id.0);
    s.push('-');
    push_hex(&mut s, &span_id.0);
    s.push_str(if sampled { "-1" } else { "-0" });
    if let Some(p) = parent {
        s.push('-');
        push_hex(&mut s, &p.0);
    }
    s
}

fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    // A table lookup per nibble: `write!` formatting cost ~10x more on the request path.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

fn lower_hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn decode_lower_hex_byte(pair: &[u8]) -> Option<u8> {
    match pair {
        [hi, lo] => Some(lower_hex_digit(*hi)? << 4 | lower_hex_digit(*lo)?),
        _ => None,
    }
}

fn decode_lower_hex(s: &str, out: &mut [u8]) -> Option<()> {
    let s = s.as_bytes();
    if s.len() != out.len() * 2 {
        return None;
    }
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = decode_lower_hex_byte(pair)?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn tp(s: &str) -> Option<(String, String, bool)> {
        parse_traceparent(s).map(|(p, sampled)| (p.trace_id.to_hex(), p.span_id.to_hex(), sampled))
    }

    #[test]
    fn parses_valid_traceparent() {
        let v = format!("00-{TRACE}-{SPAN}-01");
        assert_eq!(tp(&v), Some((TRACE.into(), SPAN.into(), true)));
        assert!(!tp(&format!("00-{TRACE}-{SPAN}-00")).unwrap().2);
        // Unknown flag bits are ignored; only the sampled bit counts.
        assert!(tp(&format!("00-{TRACE}-{SPAN}-09")).unwrap().2);
        assert_eq!(tp(&format!(" 00-{TRACE}-{SPAN}-01\t")).unwrap().0, TRACE);
    }

    #[test]
    fn rejects_invalid_traceparent() {
        for bad in [
            String::new(),
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("00-{TRACE}-{SPAN}-1"),
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{}-01", SPAN.to_uppercase()),
            format!("00-{TRACE}-{SPAN}-0g"),
            format!("0-0{TRACE}-{SPAN}-01"),
            format!("00_{TRACE}-{SPAN}-01"),
            format!("00-{TRACE}_{SPAN}-01"),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("00-{}-{SPAN}-01", &TRACE[..30]),
            format!("00-{TRACE}-{SPAN}-01,00-{TRACE}-{SPAN}-01"),
        ] {
            assert_eq!(tp(&bad), None, "{bad:?} must be rejected");
        }
    }

    #[test]
    fn parses_future_versions_by_their_first_fields() {
        assert_eq!(tp(&format!("cc-{TRACE}-{SPAN}-01")).unwrap().0, TRACE);
        assert!(tp(&format!("cc-{TRACE}-{SPAN}-01-what-the-future")).unwrap().2);
        assert_eq!(tp(&format!("cc-{TRACE}-{SPAN}-01what")), None);
    }

    #[test]
    fn formats_traceparent_round_trip() {
        let (p, _) = parse_traceparent(&format!("00-{TRACE}-{SPAN}-01")).unwrap();
        assert_eq!(format_traceparent(&p.trace_id, &p.span_id, true), format!("00-{TRACE}-{SPAN}-01"));
        assert_eq!(format_traceparent(&p.trace_id, &p.span_id, false), format!("00-{TRACE}-{SPAN}-00"));
    }

    #[test]
    fn keeps_valid_tracestate_and_drops_empty_members() {
        assert_eq!(
            sanitize_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE").as_deref(),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
        );
        assert_eq!(sanitize_tracestate(" a=1 ,, b@sys=2 ,").as_deref(), Some("a=1,b@sys=2"));
        assert_eq!(sanitize_tracestate("").as_deref(), Some(""));
        assert_eq!(sanitize_tracestate("k=with space inside").as_deref(), Some("k=with space inside"));
    }

    #[test]
    fn takes_keys_by_the_current_grammar_and_keeps_the_first_of_a_duplicate() {
        // Level 2 keys: a digit first, `@` anywhere after the first character, 256 characters.
        let long = format!("{}@{}", "t".repeat(200), "longsystemid2024");
        for key in ["1abc", "t@", "tenant@toolongsystemid", "a@b@c", long.as_str(), &"k".repeat(256)] {
            let state = format!("{key}=v,rojo=1");
            assert_eq!(sanitize_tracestate(&state).as_deref(), Some(state.as_str()), "{key}");
        }
        assert_eq!(sanitize_tracestate(&format!("{}=v", "k".repeat(257))), None, "too long a key");
        assert_eq!(sanitize_tracestate("a=1,b=2,a=3").as_deref(), Some("a=1,b=2"), "the sender's duplicate dropped");
    }

    #[test]
    fn discards_invalid_tracestate() {
        for bad in ["Upper=1", "novalue", "a=", "a=x,y", "a=b=c", "@sys=1", "t@Sys=1", "a=tab\tinside", "k!=1"] {
            assert_eq!(sanitize_tracestate(bad), None, "{bad:?} must be discarded");
        }
        let too_many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(sanitize_tracestate(&too_many.join(",")), None);
        let max: Vec<String> = (0..32).map(|i| format!("k{i}=v")).collect();
        assert!(sanitize_tracestate(&max.join(",")).is_some());
    }

    #[test]
    fn truncates_long_tracestate_long_members_first() {
        let long = format!("big={}", "x".repeat(200));
        let small: Vec<String> = (0..20).map(|i| format!("k{i:02}={}", "v".repeat(30))).collect();
        let input = format!("{},{long}", small.join(","));
        let out = sanitize_tracestate(&input).unwrap();
        assert!(out.len() <= TRACESTATE_MAX_LEN);
        assert!(!out.contains("big="), "the long member goes first");
        assert!(out.starts_with("k00="), "members are removed from the end");
        let kept = out.split(',').count();
        assert_eq!(kept, 14, "{out}");
    }

    #[test]
    fn parses_b3_single() {
        let e = parse_b3_single(&format!("{TRACE}-{SPAN}-1")).unwrap();
        assert_eq!(e.parent.unwrap().trace_id.to_hex(), TRACE);
        assert_eq!(e.sampled, Some(true));
        let e = parse_b3_single(&format!("{TRACE}-{SPAN}")).unwrap();
        assert_eq!(e.sampled, None);
        let e = parse_b3_single(&format!("{TRACE}-{SPAN}-d-{SPAN}")).unwrap();
        assert_eq!(e.sampled, Some(true));
        let e = parse_b3_single(&format!("a3ce929d0e0e4736-{SPAN}-0")).unwrap();
        assert_eq!(e.parent.unwrap().trace_id.to_hex(), "0000000000000000a3ce929d0e0e4736");
        assert_eq!(e.sampled, Some(false));
        assert_eq!(parse_b3_single("0"), Some(Extracted { parent: None, sampled: Some(false) }));
        assert_eq!(parse_b3_single("d"), Some(Extracted { parent: None, sampled: Some(true) }));
    }

    #[test]
    fn rejects_invalid_b3_single() {
        for bad in [
            "".to_string(),
            "true".into(),
            "2".into(),
            TRACE.to_string(),
            format!("{TRACE}-{SPAN}-2"),
            format!("{TRACE}-{SPAN}-true"),
            format!("{TRACE}-{SPAN}-1-{SPAN}-extra"),
            format!("{TRACE}-{SPAN}-1-nothex0000000000"),
            format!("{}-{SPAN}-1", TRACE.to_uppercase()),
            format!("{}-{SPAN}-1", "0".repeat(32)),
            format!("{TRACE}-{}-1", "0".repeat(16)),
            format!("{}-{SPAN}-1", &TRACE[..20]),
        ] {
            assert_eq!(parse_b3_single(&bad), None, "{bad:?} must be rejected");
        }
    }

    #[test]
    fn parses_b3_multi() {
        let e = parse_b3_multi(Some(TRACE), Some(SPAN), Some("1"), None).unwrap();
        assert_eq!(e.parent.unwrap().span_id.to_hex(), SPAN);
        assert_eq!(e.sampled, Some(true));
        let e = parse_b3_multi(Some(TRACE), Some(SPAN), Some("true"), None).unwrap();
        assert_eq!(e.sampled, Some(true));
        let e = parse_b3_multi(Some(TRACE), Some(SPAN), None, None).unwrap();
        assert_eq!(e.sampled, None);
        let e = parse_b3_multi(Some(TRACE), Some(SPAN), Some("0"), Some("1")).unwrap();
        assert_eq!(e.sampled, Some(true), "debug implies sampled");
        let e = parse_b3_multi(None, None, Some("0"), None).unwrap();
        assert_eq!(e, Extracted { parent: None, sampled: Some(false) });
        assert_eq!(parse_b3_multi(None, None, None, None), None);
    }

    #[test]
    fn rejects_invalid_b3_multi() {
        assert_eq!(parse_b3_multi(Some(TRACE), None, Some("1"), None), None);
        assert_eq!(parse_b3_multi(None, Some(SPAN), Some("1"), None), None);
        assert_eq!(parse_b3_multi(Some("xyz"), Some(SPAN), Some("1"), None), None);
        assert_eq!(parse_b3_multi(Some(TRACE), Some(SPAN), Some("yes"), None), None);
        assert_eq!(parse_b3_multi(Some(TRACE), Some(&SPAN[..8]), None, None), None);
    }

    #[test]
    fn formats_b3_single() {
        let t = TraceId::from_hex(TRACE).unwrap();
        let s = SpanId::from_hex(SPAN).unwrap();
        assert_eq!(format_b3_single(&t, &s, true, None), format!("{TRACE}-{SPAN}-1"));
        assert_eq!(format_b3_single(&t, &s, false, Some(&s)), format!("{TRACE}-{SPAN}-0-{SPAN}"));
    }
}
