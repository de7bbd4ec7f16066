//! Input quoted in log lines and error messages: at most a short prefix of it, escaped, and its
//! length when cut. A configuration value, header or collector answer can be megabytes long, and
//! container runtimes split log lines past 16 KiB; a message names the field and the reason, and
//! shows only enough of the value to recognise it.

use std::fmt::Write;

/// Most bytes of escaped input one quote holds (without the quotes and the cut marker).
pub const MAX_QUOTED: usize = 128;

/// `s` in double quotes, escaped as Rust's `{:?}` does; past [`MAX_QUOTED`] escaped bytes, cut on
/// a character boundary and marked: `"abc..." (cut, 2097152 bytes)`.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_QUOTED) + 32);
    out.push('"');
    let taken = push_escaped(&mut out, s);
    out.push('"');
    if taken < s.len() {
        let _ = write!(out, "... (cut, {} bytes)", s.len());
    }
    out
}

/// `s` as it is when short and plain (a field name in a path); otherwise [`quote`]d.
pub fn name(s: &str) -> String {
    let plain = s.len() <= MAX_QUOTED && s.chars().all(|c| c.is_ascii_graphic() && c != '"' && c != '\\');
    if plain && !s.is_empty() {
        s.to_string()
    } else {
        quote(s)
    }
}

/// Append the escaped characters of `s` that fit in [`MAX_QUOTED`] bytes; returns the bytes of
/// `s` taken.
fn push_escaped(out: &mut String, s: &str) -> usize {
    let mut used = 0;
    for (i, c) in s.char_indices() {
        let escaped = c.escape_debug();
        let len: usize = escaped.clone().map(char::len_utf8).sum();
        if used + len > MAX_QUOTED {
            return i;
        }
        used += len;
        out.extend(escaped);
    }
    s.len()
}

/// Longest output of [`quote`]: the prefix, the quotes and the marker with a 20-digit length.
pub const MAX_QUOTE_LEN: usize = MAX_QUOTED + 2 + "... (cut, 18446744073709551615 bytes)".len();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_quoted_whole() {
        assert_eq!(quote("abc"), "\"abc\"");
        assert_eq!(quote(""), "\"\"");
        assert_eq!(quote("a\"b\n"), "\"a\\\"b\\n\"");
        let exactly = "x".repeat(MAX_QUOTED);
        assert_eq!(quote(&exactly), format!("\"{exactly}\""));
    }

    #[test]
    fn long_input_is_cut_and_marked_with_its_length() {
        let long = "y".repeat(2 * 1024 * 1024);
        let q = quote(&long);
        assert_eq!(q, format!("\"{}\"... (cut, 2097152 bytes)", "y".repeat(MAX_QUOTED)));
        assert!(q.len() <= MAX_QUOTE_LEN);
    }

    #[test]
    fn cuts_on_a_character_boundary_and_counts_escapes() {
        // 'é' is two bytes: 64 fill 128 bytes exactly; the 65th is cut whole.
        let q = quote(&"é".repeat(65));
        assert_eq!(q, format!("\"{}\"... (cut, 130 bytes)", "é".repeat(64)));
        // A control character escapes to six bytes (\u{1}): the bound holds for the escaped text.
        let q = quote(&"\u{1}".repeat(1000));
        assert!(q.len() <= MAX_QUOTE_LEN, "{}", q.len());
        assert!(q.starts_with("\"\\u{1}") && q.ends_with("(cut, 1000 bytes)"), "{q}");
    }

    #[test]
    fn names_stay_plain_when_they_can() {
        assert_eq!(name("x-tenant"), "x-tenant");
        assert_eq!(name(""), "\"\"");
        assert_eq!(name("has space"), "\"has space\"");
        assert_eq!(name(&"k".repeat(500)), format!("\"{}\"... (cut, 500 bytes)", "k".repeat(MAX_QUOTED)));
    }
}
