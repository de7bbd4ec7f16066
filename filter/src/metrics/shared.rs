//! The proxy-wide side of metrics, over Envoy's shared data (one store for all VMs of a proxy).
//!
//! Workers merge their local deltas into one `pending` entry with compare-and-swap; one VM,
//! elected through a `leader` entry with a heartbeat, drains `pending` and exports. No shared
//! data is touched per request.

use super::aggregate::Aggregator;

/// Shared data as the proxy offers it: values with a compare-and-swap version.
pub trait SharedStore {
    /// The value and its version; `None` when the key is absent.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Store a value if the version is still `cas` (0 stores unconditionally).
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
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

/// Merge `local` into the aggregate at `key`. On success `local` is emptied; on failure it is
/// kept for the next attempt. Returns requests folded into overflow by the shared cap.
pub fn merge_into(
    store: &dyn SharedStore,
    key: &str,
    local: &mut Aggregator,
    max_series: usize,
) -> Result<u64, StoreError> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (bytes, cas) = store.get(key).unwrap_or_default();
        let (mut shared, since) =
            Aggregator::decode(&bytes, max_series).unwrap_or_else(|| (Aggregator::new(max_series), 0));
        shared.merge(local);
        match store.set(key, &shared.encode(since), cas) {
            Ok(()) => {
                *local = Aggregator::new(max_series);
                return Ok(shared.take_folded());
            }
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::CasMismatch)
}

/// Take everything at `key`, leaving an empty aggregate that starts at `now`.
/// Returns the aggregate and the start of the period it covers.
pub fn drain(
    store: &dyn SharedStore,
    key: &str,
    max_series: usize,
    now_ns: u64,
) -> Result<(Aggregator, u64), StoreError> {
    let empty = Aggregator::new(max_series).encode(now_ns);
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (bytes, cas) = store.get(key).unwrap_or_default();
        let (taken, since) =
            Aggregator::decode(&bytes, max_series).unwrap_or_else(|| (Aggregator::new(max_series), now_ns));
        match store.set(key, &empty, cas) {
            Ok(()) => return Ok((taken, since)),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::CasMismatch)
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

/// An in-memory [`SharedStore`] with Envoy's compare-and-swap semantics, for tests.
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: std::cell::RefCell<std::collections::HashMap<String, (Vec<u8>, u32)>>,
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
    fn workers_merge_and_the_leader_drains_exact_totals() {
        let store = MemoryStore::default();
        init(&store, "p", &Aggregator::new(100).encode(0));
        let (mut w1, mut w2) = (local(3, "a"), local(4, "b"));
        merge_into(&store, "p", &mut w1, 100).unwrap();
        merge_into(&store, "p", &mut w2, 100).unwrap();
        assert!(w1.is_empty() && w2.is_empty());
        let (taken, since) = drain(&store, "p", 100, 10).unwrap();
        assert_eq!((taken.requests(), since), (7, 0));
        let (again, since) = drain(&store, "p", 100, 20).unwrap();
        assert_eq!((again.requests(), since), (0, 10), "drained once, the next period starts at the drain");
    }

    #[test]
    fn a_lost_race_is_retried_not_lost() {
        struct Racy<'a>(&'a MemoryStore, std::cell::Cell<bool>);
        impl SharedStore for Racy<'_> {
            fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
                self.0.get(key)
            }
            fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
                if self.1.replace(false) {
                    // Another worker writes between our read and our write.
                    merge_into(self.0, key, &mut local(5, "other"), 100).unwrap();
                }
                self.0.set(key, value, cas)
            }
        }
        let store = MemoryStore::default();
        init(&store, "p", &Aggregator::new(100).encode(0));
        let racy = Racy(&store, std::cell::Cell::new(true));
        merge_into(&racy, "p", &mut local(2, "me"), 100).unwrap();
        assert_eq!(drain(&store, "p", 100, 1).unwrap().0.requests(), 7);
    }

    #[test]
    fn shared_cap_folds_new_label_sets() {
        let store = MemoryStore::default();
        init(&store, "p", &Aggregator::new(1).encode(0));
        assert_eq!(merge_into(&store, "p", &mut local(2, "a"), 1).unwrap(), 0);
        assert_eq!(merge_into(&store, "p", &mut local(3, "b"), 1).unwrap(), 3);
        let (taken, _) = drain(&store, "p", 1, 1).unwrap();
        assert_eq!((taken.len(), taken.requests()), (2, 5));
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
    fn garbage_in_shared_data_is_replaced() {
        let store = MemoryStore::default();
        store.set("p", b"\xff\xff\xff", 0).unwrap();
        merge_into(&store, "p", &mut local(1, "a"), 100).unwrap();
        assert_eq!(drain(&store, "p", 100, 1).unwrap().0.requests(), 1);
        store.set("l", b"garbage", 0).unwrap();
        assert!(lead(&store, "l", 9, 1, 50));
    }
}
