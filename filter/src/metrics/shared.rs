//! The proxy-wide side of metrics, over what Envoy shares between the VMs of a proxy: shared
//! data (values with compare-and-swap) and shared queues.
//!
//! Once per export interval each worker hands the deltas it recorded since its last hand-over
//! to one queue, as a batch of just the series it touched; one VM, elected through a `leader`
//! entry with a heartbeat, dequeues the batches when it exports. No VM reads or rewrites what
//! the others hold, so a hand-over costs what changed, whatever the number of live series.
//! Nothing shared is touched per request.

use super::aggregate::{Aggregator, Stamp};

/// What the proxy shares between its VMs.
pub trait SharedStore {
    /// The value and its version; `None` when the key is absent.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Store a value if the version is still `cas` (0 stores unconditionally).
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
    /// The id of queue `name`, created if it does not exist yet; `None` if the proxy refused.
    /// (Envoy delivers its "queue ready" callback to the VM that registered last; meshtel polls
    /// on its tick instead and does not need it.)
    fn queue(&self, name: &str) -> Option<u32>;
    /// Append `value` to queue `queue`.
    fn enqueue(&self, queue: u32, value: &[u8]) -> Result<(), StoreError>;
    /// Take the oldest value of queue `queue`; `None` when it is empty or unreadable.
    fn dequeue(&self, queue: u32) -> Option<Vec<u8>>;
}

/// Why a shared-data write failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Someone else wrote since the read: read again and retry.
    CasMismatch,
    /// The proxy refused the write.
    Failed,
}

/// Attempts of one compare-and-swap update before giving up until the next tick.
const MAX_CAS_ATTEMPTS: usize = 8;

/// Create `key` with `value` if it does not exist yet (done at configure time, before traffic,
/// so that every later update can be a compare-and-swap).
pub fn init(store: &dyn SharedStore, key: &str, value: &[u8]) {
    if store.get(key).is_none() {
        let _ = store.set(key, value, 0);
    }
}

/// Hand `local`'s deltas to `queue` as one batch, if it has any. On success they are cleared
/// ([`Aggregator::clear_deltas`]); on failure they are kept (bounded by the cap) for the next
/// attempt.
pub fn hand_over(store: &dyn SharedStore, queue: u32, local: &mut Aggregator) -> Result<(), StoreError> {
    if local.has_deltas() {
        store.enqueue(queue, &local.encode_batch())?;
    }
    local.clear_deltas();
    Ok(())
}

/// Add up to `max_batches` batches from `queue` into `into`, stamped with `stamp` if given.
/// Returns the batches taken and how many of them were unreadable (dropped: nothing meshtel
/// writes is).
pub fn take_over(
    store: &dyn SharedStore,
    queue: u32,
    into: &mut Aggregator,
    max_batches: usize,
    stamp: Option<Stamp>,
) -> (usize, usize) {
    let (mut taken, mut bad) = (0, 0);
    while taken < max_batches {
        let Some(batch) = store.dequeue(queue) else { break };
        taken += 1;
        if into.merge_batch(&batch, stamp).is_err() {
            bad += 1;
        }
    }
    (taken, bad)
}

/// Give up leadership if `token` holds it, so that another VM claims it at its next heartbeat
/// instead of waiting for this one's to go stale.
pub fn resign(store: &dyn SharedStore, key: &str, token: u64) {
    if let Some((bytes, cas)) = store.get(key) {
        if parse_leader(&bytes).0 == Some(token) {
            // A lost race means someone else leads already: nothing to give up.
            let _ = store.set(key, b"", cas);
        }
    }
}

/// Claim or keep leadership: the leader entry holds `token:heartbeat_ns`. A VM takes over
/// when the entry is empty or its heartbeat is older than `stale_after_ns`. Returns whether
/// `token` leads after the call.
pub fn lead(store: &dyn SharedStore, key: &str, token: u64, now_ns: u64, stale_after_ns: u64) -> bool {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (bytes, cas) = store.get(key).unwrap_or_default();
        let (holder, heartbeat) = parse_leader(&bytes);
        let mine = holder == Some(token);
        let stale = holder.is_none() || now_ns.saturating_sub(heartbeat) > stale_after_ns;
        if !mine && !stale {
            return false;
        }
        match store.set(key, format!("{token}:{now_ns}").as_bytes(), cas) {
            Ok(()) => return true,
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Failed) => return false,
        }
    }
    false
}

fn parse_leader(bytes: &[u8]) -> (Option<u64>, u64) {
    let text = std::str::from_utf8(bytes).unwrap_or_default();
    match text.split_once(':') {
        Some((t, hb)) => (t.parse().ok(), hb.parse().unwrap_or(0)),
        None => (None, 0),
    }
}

/// An in-memory [`SharedStore`] with Envoy's semantics (compare-and-swap versions, FIFO
/// queues shared by name), for tests.
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: std::cell::RefCell<std::collections::HashMap<String, (Vec<u8>, u32)>>,
    queues: std::cell::RefCell<Vec<(String, std::collections::VecDeque<Vec<u8>>)>>,
}

impl MemoryStore {
    /// Values waiting in queue `name`.
    pub fn queued(&self, name: &str) -> usize {
        self.queues.borrow().iter().find(|(n, _)| n == name).map_or(0, |(_, q)| q.len())
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.entries.borrow().get(key).cloned()
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let mut entries = self.entries.borrow_mut();
        let current = entries.get(key).map_or(0, |(_, c)| *c);
        if cas != 0 && cas != current {
            return Err(StoreError::CasMismatch);
        }
        entries.insert(key.to_string(), (value.to_vec(), current + 1));
        Ok(())
    }

    fn queue(&self, name: &str) -> Option<u32> {
        let mut queues = self.queues.borrow_mut();
        let at = match queues.iter().position(|(n, _)| n == name) {
            Some(at) => at,
            None => {
                queues.push((name.to_string(), Default::default()));
                queues.len() - 1
            }
        };
        // Envoy's queue ids start at 1; 0 is never one.
        u32::try_from(at + 1).ok()
    }

    fn enqueue(&self, queue: u32, value: &[u8]) -> Result<(), StoreError> {
        let mut queues = self.queues.borrow_mut();
        let (_, q) = queues.get_mut((queue as usize).wrapping_sub(1)).ok_or(StoreError::Failed)?;
        q.push_back(value.to_vec());
        Ok(())
    }

    fn dequeue(&self, queue: u32) -> Option<Vec<u8>> {
        self.queues.borrow_mut().get_mut((queue as usize).wrapping_sub(1))?.1.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::aggregate::Measurement;

    fn local(n: usize, label: &str) -> Aggregator {
        let mut a = Aggregator::new(100);
        for _ in 0..n {
            a.record(&[label; 25], &Measurement::default());
        }
        a
    }

    #[test]
    fn workers_hand_over_and_the_leader_takes_exact_totals() {
        let store = MemoryStore::default();
        let q = store.queue("q").unwrap();
        assert_eq!(store.queue("q"), Some(q), "one queue per name");
        let (mut w1, mut w2) = (local(3, "a"), local(4, "b"));
        hand_over(&store, q, &mut w1).unwrap();
        hand_over(&store, q, &mut w2).unwrap();
        hand_over(&store, q, &mut local(2, "a")).unwrap();
        assert!(!w1.has_deltas() && !w2.has_deltas());
        let mut total = Aggregator::new(100);
        assert_eq!(take_over(&store, q, &mut total, 2, None), (2, 0), "at most what was asked");
        assert_eq!(take_over(&store, q, &mut total, 8, None), (1, 0));
        assert_eq!((total.len(), total.requests()), (2, 9));
        assert_eq!(take_over(&store, q, &mut total, 8, None), (0, 0), "taken once");
    }

    #[test]
    fn a_refused_hand_over_keeps_the_deltas() {
        let store = MemoryStore::default();
        let mut w = local(3, "a");
        assert_eq!(hand_over(&store, 9, &mut w), Err(StoreError::Failed), "no such queue");
        assert_eq!(w.requests(), 3);
    }

    #[test]
    fn shared_cap_folds_new_label_sets() {
        let store = MemoryStore::default();
        let q = store.queue("q").unwrap();
        hand_over(&store, q, &mut local(2, "a")).unwrap();
        hand_over(&store, q, &mut local(3, "b")).unwrap();
        let mut total = Aggregator::new(1);
        take_over(&store, q, &mut total, 8, None);
        assert_eq!((total.len(), total.requests(), total.take_folded()), (2, 5, 3));
    }

    #[test]
    fn a_resigned_leader_is_replaced_at_once() {
        let store = MemoryStore::default();
        init(&store, "l", b"");
        assert!(lead(&store, "l", 1, 100, 50));
        resign(&store, "l", 2);
        assert!(!lead(&store, "l", 2, 110, 50), "only the holder can resign");
        resign(&store, "l", 1);
        assert!(lead(&store, "l", 2, 120, 50), "the next heartbeat takes over");
    }

    #[test]
    fn one_leader_until_its_heartbeat_goes_stale() {
        let store = MemoryStore::default();
        init(&store, "l", b"");
        assert!(lead(&store, "l", 1, 100, 50));
        assert!(!lead(&store, "l", 2, 120, 50), "fresh heartbeat: 1 keeps leading");
        assert!(lead(&store, "l", 1, 140, 50), "the leader renews");
        assert!(!lead(&store, "l", 2, 180, 50));
        assert!(lead(&store, "l", 2, 200, 50), "stale after 60 ns: 2 takes over");
        assert!(!lead(&store, "l", 1, 210, 50), "1 steps down");
    }

    #[test]
    fn garbage_is_dropped_and_counted() {
        let store = MemoryStore::default();
        let q = store.queue("q").unwrap();
        store.enqueue(q, b"\xff\xff\xff").unwrap();
        hand_over(&store, q, &mut local(1, "a")).unwrap();
        let mut total = Aggregator::new(100);
        assert_eq!(take_over(&store, q, &mut total, 8, None), (2, 1));
        assert_eq!(total.requests(), 1);
        store.set("l", b"garbage", 0).unwrap();
        assert!(lead(&store, "l", 9, 1, 50));
    }
}
