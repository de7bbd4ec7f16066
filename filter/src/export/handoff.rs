//! Export payloads handed from a root context that ends to the ones that go on.
//!
//! A root context ends when a new `pluginConfig` replaces it (its VM goes on with the new root
//! context) or when a new module replaces its VM (Envoy deletes the VM right after `on_done`
//! and cancels its calls: observed in Envoy 1.40, see `tests/tests/lifecycle.rs`). Either way,
//! what it has not sent yet goes, already encoded as OTLP, onto a proxy-wide shared queue, and
//! every live root context takes payloads from it on its tick and sends them as its own. OTLP
//! is the format: a module of any version reads what another left, so the queue's name carries
//! its own version, not [`crate::metrics::SHARED_FORMAT_VERSION`].

use crate::export::Payload;
use crate::otlp::Signal;

/// The format of one handed payload: this byte, the signal's byte, the item count (8 bytes,
/// little-endian), then the OTLP protobuf body.
const FORMAT: u8 = 1;
const HEADER_LEN: usize = 10;

/// The queue of handed payloads of the plugin `scope`.
pub fn queue_name(scope: &str) -> String {
    format!("meshtel/handoff/v{FORMAT}/{scope}")
}

fn signal_byte(signal: Signal) -> u8 {
    match signal {
        Signal::Traces => b't',
        Signal::Metrics => b'm',
        Signal::Logs => b'l',
    }
}

/// `payload` as it goes onto the queue.
pub fn encode(payload: &Payload) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.body.len());
    out.push(FORMAT);
    out.push(signal_byte(payload.signal));
    out.extend_from_slice(&payload.items.to_le_bytes());
    out.extend_from_slice(&payload.body);
    out
}

/// A payload taken from the queue, not yet sent by this root context; `None` for anything
/// not in this format (another format version, garbage).
pub fn decode(bytes: &[u8]) -> Option<Payload> {
    let (header, body) = bytes.split_at_checked(HEADER_LEN)?;
    let [format, signal, items @ ..] = header else { return None };
    if *format != FORMAT {
        return None;
    }
    let signal = Signal::ALL.into_iter().find(|s| signal_byte(*s) == *signal)?;
    let items = u64::from_le_bytes(items.try_into().ok()?);
    Some(Payload::new(signal, body.to_vec(), items))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_comes_back_as_it_went_unsent() {
        for signal in Signal::ALL {
            let mut sent = Payload::new(signal, vec![1, 2, 3], 7);
            sent.attempts = 2;
            let back = decode(&encode(&sent)).unwrap();
            assert_eq!((back.signal, back.body, back.items, back.attempts), (signal, vec![1, 2, 3], 7, 0));
        }
        let empty = Payload::new(Signal::Traces, Vec::new(), 0);
        assert_eq!(decode(&encode(&empty)), Some(empty));
    }

    #[test]
    fn anything_else_is_refused() {
        let good = encode(&Payload::new(Signal::Logs, vec![9], 1));
        for bad in [
            &[][..],
            &good[..HEADER_LEN - 1],
            &[2, b'l', 1, 0, 0, 0, 0, 0, 0, 0][..],
            &[1, b'x', 0, 0, 0, 0, 0, 0, 0, 0],
        ] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }
}
