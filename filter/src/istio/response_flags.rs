//! Envoy's response flags: the `response.flags` bitmask rendered as `%RESPONSE_FLAGS%` does, and
//! what they say about the filters the request went through.

// Bit order of Envoy's `CoreResponseFlag` (envoy/stream_info/stream_info.h); the short names
// are those of `ResponseFlagUtils` (source/common/stream_info/utility.cc).
const SHORT_NAMES: [&str; 30] = [
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC", "URX", "SI", "IH",
    "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR", "UDO",
];

const DELAY_INJECTED: u64 = 1 << 9;
const FAULT_INJECTED: u64 = 1 << 10;
const UPSTREAM_RETRY_LIMIT_EXCEEDED: u64 = 1 << 15;

/// The flags set before the rest, in the order they are set. Envoy joins a request's flags in
/// the order they were set (`StreamInfoImpl::setResponseFlag` appends; `toShortString` walks that
/// list), and a Wasm module sees only the bitmask. Where a request carries several flags, they
/// come from the filters in the order they ran: the fault filter first (its delay, then its
/// abort; Istio places it before the router), then the router, which marks an exhausted retry
/// budget (`Filter::onUpstreamReset` / `onPerTryTimeoutCommon` in
/// source/common/router/router.cc) before the reset or timeout that ends the request (UF, UC,
/// UT, ...). The other flags are rendered in bit order, which is the set order wherever the
/// tests found them together (tests/tests/istio_parity.rs).
const SET_FIRST: [u64; 3] = [DELAY_INJECTED, FAULT_INJECTED, UPSTREAM_RETRY_LIMIT_EXCEEDED];

/// Render Envoy's response flag bitmask as `%RESPONSE_FLAGS%` does: `-` for none, else short
/// names joined by `,` in the order Envoy set them (see [`SET_FIRST`]). Bits Envoy may add later
/// are ignored.
pub fn short_string(flags: u64) -> String {
    let mut out = String::new();
    let mut push = |bit: u64| {
        if let Some(name) = SHORT_NAMES.get(bit.trailing_zeros() as usize) {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(name);
        }
    };
    for bit in SET_FIRST {
        if flags & bit != 0 {
            push(bit);
        }
    }
    for i in 0..SHORT_NAMES.len() {
        let bit = 1u64 << i;
        if flags & bit != 0 && !SET_FIRST.contains(&bit) {
            push(bit);
        }
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

/// Whether the request ended with a local reply from a filter Istio places between STATS-phase
/// plugins and its own stats filter, so that the stats filter's `decodeHeaders` never ran and it
/// counts the request as plain HTTP (`istio_stats.cc`: `is_grpc_` is set there only). The
/// fault filter's abort sets FI (envoyproxy/envoy `source/extensions/filters/http/fault/
/// fault_filter.cc`, `abortWithStatus`); Istio's order is asserted in istio/istio
/// `pilot/pkg/networking/core/listener_test.go` (wasm-stats, grpc_stats, fault, cors,
/// istio.stats, router).
pub fn ended_before_istio_stats(flags: u64) -> bool {
    flags & FAULT_INJECTED != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_envoy_short_flags() {
        assert_eq!(short_string(0), "-");
        assert_eq!(short_string(0x20), "UF");
        assert_eq!(short_string(0x2 | 0x100), "UH,NR");
        assert_eq!(short_string(0x4000), "DC");
        assert_eq!(short_string(0x1000_0000), "DR");
        assert_eq!(short_string(0x2000_0000), "UDO", "the last core flag of Envoy 1.40");
        assert_eq!(short_string(1 << 40), "-", "unknown bits are ignored");
    }

    /// The combinations tests/tests/istio_parity.rs checks against Envoy's own
    /// `%RESPONSE_FLAGS%` for the same request.
    #[test]
    fn several_flags_come_in_the_order_envoy_set_them() {
        let uf = 1 << 5;
        let ut = 1 << 2;
        assert_eq!(short_string(UPSTREAM_RETRY_LIMIT_EXCEEDED | uf), "URX,UF");
        assert_eq!(short_string(UPSTREAM_RETRY_LIMIT_EXCEEDED | ut), "URX,UT");
        assert_eq!(short_string(DELAY_INJECTED | FAULT_INJECTED), "DI,FI");
        assert_eq!(short_string(DELAY_INJECTED | uf), "DI,UF");
        assert_eq!(short_string(DELAY_INJECTED | UPSTREAM_RETRY_LIMIT_EXCEEDED | uf), "DI,URX,UF");
    }

    #[test]
    fn only_a_fault_abort_ends_the_request_before_istios_stats_filter() {
        assert!(ended_before_istio_stats(FAULT_INJECTED));
        assert!(ended_before_istio_stats(DELAY_INJECTED | FAULT_INJECTED));
        assert!(!ended_before_istio_stats(DELAY_INJECTED), "a delay lets the request go on");
        assert!(!ended_before_istio_stats(UPSTREAM_RETRY_LIMIT_EXCEEDED | 1 << 5));
    }
}
