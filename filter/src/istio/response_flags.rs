//! Envoy's response flags: the `response.flags` bitmask rendered as `%RESPONSE_FLAGS%` short names.

// Bit order of Envoy's `CoreResponseFlag` (envoy/stream_info/stream_info.h); the short names
// are those of `ResponseFlagUtils` (source/common/stream_info/utility.cc).
const SHORT_NAMES: [&str; 30] = [
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC", "URX", "SI", "IH",
    "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR", "UDO",
];

/// Render Envoy's response flag bitmask as its short form: `-` for none, else names joined by `,`.
/// Bits Envoy may add later are ignored.
pub fn short_string(flags: u64) -> String {
    let mut out = String::new();
    for (bit, name) in SHORT_NAMES.iter().enumerate() {
        if flags & (1 << bit) != 0 {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(name);
        }
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::short_string;

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
}
