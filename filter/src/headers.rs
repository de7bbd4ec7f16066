//! Header maps in the proxy-wasm ABI's own encoding, read in place.
//!
//! `proxy_get_header_map_pairs` returns one buffer: the number of headers (u32), then each
//! header's name and value sizes (u32 each), then each name and value followed by a NUL, all
//! little-endian (proxy-wasm spec, ABI 0.2.1 "Header maps"; proxy-wasm-cpp-host
//! `src/pairs_util.cc`). Reading it where it lies costs one allocation per request (the buffer
//! itself) instead of two per header.

/// Which header map of the current stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderMap {
    /// The request headers (readable in the request phase and in the log phase).
    Request,
    /// The response headers (readable from the response phase on).
    Response,
}

/// A header map as the proxy hands it over: lower-case names, raw values, repeats kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderPairs(Vec<u8>);

impl HeaderPairs {
    /// The proxy's encoding, as returned. A malformed buffer reads as the headers before the
    /// first entry that does not fit.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// Encode `pairs` (tests, benchmarks and mock hosts).
    pub fn from_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Self {
        let data: usize = pairs.iter().map(|(k, v)| k.as_ref().len() + v.as_ref().len() + 2).sum();
        let mut out = Vec::with_capacity(4 + 8 * pairs.len() + data);
        out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
        for (k, v) in pairs {
            out.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend_from_slice(k.as_ref());
            out.push(0);
            out.extend_from_slice(v.as_ref());
            out.push(0);
        }
        Self(out)
    }

    /// The headers, read in place.
    pub fn view(&self) -> Headers<'_> {
        Headers(&self.0)
    }

    /// The encoded bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// A view of a [`HeaderPairs`] buffer.
#[derive(Debug, Clone, Copy)]
pub struct Headers<'a>(&'a [u8]);

impl<'a> Headers<'a> {
    /// A view of bytes in this encoding held elsewhere (a property's pairs map).
    pub fn over(bytes: &'a [u8]) -> Self {
        Headers(bytes)
    }

    /// How many pairs the buffer says it holds; `None` without a count.
    pub fn declared(&self) -> Option<usize> {
        word(self.0, 0)
    }

    /// Every header in order, as `(name, value)`.
    pub fn iter(&self) -> Pairs<'a> {
        let count = word(self.0, 0).unwrap_or(0);
        // The data starts after the count and two sizes per header; a count that cannot fit in
        // the buffer yields nothing.
        let data = count.checked_mul(8).and_then(|n| n.checked_add(4)).filter(|&d| d <= self.0.len());
        Pairs { bytes: self.0, next: 0, count: if data.is_some() { count } else { 0 }, at: data.unwrap_or(0) }
    }

    /// The values of `name`, in order.
    pub fn values(&self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter().filter(move |(n, _)| *n == name.as_bytes()).map(|(_, v)| v)
    }

    /// The value of a header sent exactly once, if it is UTF-8. Repeated headers count as absent
    /// here, since a repeated `traceparent` or `b3` is invalid.
    pub fn single(&self, name: &'a str) -> Option<&'a str> {
        let mut found = self.values(name);
        let first = found.next()?;
        if found.next().is_some() {
            return None;
        }
        std::str::from_utf8(first).ok()
    }

    /// The first value of a header, raw.
    pub fn first(&self, name: &'a str) -> Option<&'a [u8]> {
        self.values(name).next()
    }

    /// Whether the header is present at all.
    pub fn contains(&self, name: &'a str) -> bool {
        self.values(name).next().is_some()
    }

    /// All values of a header joined with `,` (how list headers such as `tracestate` combine);
    /// `None` when absent or when any value is not UTF-8.
    pub fn joined(&self, name: &'a str) -> Option<String> {
        let mut out: Option<String> = None;
        for v in self.values(name) {
            let v = std::str::from_utf8(v).ok()?;
            match out.as_mut() {
                None => out = Some(v.to_string()),
                Some(o) => {
                    o.push(',');
                    o.push_str(v);
                }
            }
        }
        out
    }
}

/// The iterator of [`Headers::iter`].
#[derive(Debug, Clone)]
pub struct Pairs<'a> {
    bytes: &'a [u8],
    next: usize,
    count: usize,
    at: usize,
}

impl<'a> Iterator for Pairs<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.count {
            return None;
        }
        let name_len = word(self.bytes, 1 + 2 * self.next)?;
        let value_len = word(self.bytes, 2 + 2 * self.next)?;
        let name_end = self.at.checked_add(name_len)?;
        let value_start = name_end.checked_add(1)?;
        let value_end = value_start.checked_add(value_len)?;
        let (name, value) = (self.bytes.get(self.at..name_end), self.bytes.get(value_start..value_end));
        // Each name and value is followed by a NUL: a buffer cut before it is cut short.
        let (Some(name), Some(value), true) = (name, value, value_end < self.bytes.len()) else {
            self.count = 0;
            return None;
        };
        self.next += 1;
        self.at = value_end + 1;
        Some((name, value))
    }
}

/// The `i`-th little-endian u32 of `bytes`.
fn word(bytes: &[u8], i: usize) -> Option<usize> {
    let w = bytes.get(i.checked_mul(4)?..i.checked_mul(4)?.checked_add(4)?)?;
    Some(u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_it_encodes_in_order_with_repeats() {
        let h =
            HeaderPairs::from_pairs(&[(":path", "/a"), ("tracestate", "a=1"), ("empty", ""), ("tracestate", "b=2")]);
        let pairs: Vec<_> = h.view().iter().collect();
        assert_eq!(pairs.len(), 4);
        assert_eq!(pairs[0], (&b":path"[..], &b"/a"[..]));
        assert_eq!(h.view().single(":path"), Some("/a"));
        assert_eq!(h.view().single("tracestate"), None, "repeated");
        assert_eq!(h.view().joined("tracestate").as_deref(), Some("a=1,b=2"));
        assert_eq!(h.view().single("empty"), Some(""));
        assert!(!h.view().contains("absent"));
    }

    #[test]
    fn the_proxys_own_encoding_reads_the_same() {
        // pairs_util.cc's layout written out by hand: 2 headers, sizes, NUL-terminated bytes.
        let mut raw = vec![2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
        raw.extend_from_slice(b"a\0bc\0de\0\0");
        let h = HeaderPairs::from_bytes(raw);
        assert_eq!(h.view().iter().collect::<Vec<_>>(), vec![(&b"a"[..], &b"bc"[..]), (&b"de"[..], &b""[..])]);
    }

    #[test]
    fn malformed_buffers_read_as_far_as_they_fit_and_never_panic() {
        let good = HeaderPairs::from_pairs(&[("a", "1"), ("b", "2")]).0;
        for cut in 0..good.len() {
            let h = HeaderPairs::from_bytes(good[..cut].to_vec());
            assert!(h.view().iter().count() <= 2);
        }
        let huge = HeaderPairs::from_bytes(vec![0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0]);
        assert_eq!(huge.view().iter().count(), 0);
        let mut lying = good.clone();
        lying[4] = 200; // the first name's size runs past the end
        assert_eq!(HeaderPairs::from_bytes(lying).view().iter().count(), 0);
        assert_eq!(HeaderPairs::default().view().iter().count(), 0);
    }
}
