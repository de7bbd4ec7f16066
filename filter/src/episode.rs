//! Repeated conditions (a full queue, failing exports, refused items, unreadable batches) logged
//! when they start and when they settle, never while they last: a collector that is down for an
//! hour costs two log lines per condition and VM, not one per tick.

/// How long a condition must stay away before its episode is over. Long enough that a condition
/// that comes and goes (a collector failing one call in two, traffic in bursts against a full
/// queue) stays one episode; short enough that the operator hears of the recovery soon.
pub const SETTLE_NS: u64 = 5_000_000_000;

/// What happened over an episode, for the line that ends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Occurrences over the episode (calls failed, items dropped or refused, batches lost).
    pub count: u64,
    /// Whole seconds from its first occurrence to its last.
    pub seconds: u64,
}

/// One repeated condition: quiet, or in an episode since its first occurrence.
#[derive(Debug, Clone, Default)]
pub struct Episode {
    open: Option<Open>,
}

#[derive(Debug, Clone)]
struct Open {
    first_ns: u64,
    last_bad_ns: u64,
    /// A good outcome came after the last occurrence.
    good_since: bool,
    count: u64,
}

impl Episode {
    /// Record `n` occurrences at `now_ns`. Returns whether this starts an episode (log it).
    pub fn occurred(&mut self, n: u64, now_ns: u64) -> bool {
        match &mut self.open {
            Some(open) => {
                open.count = open.count.saturating_add(n);
                open.last_bad_ns = now_ns;
                open.good_since = false;
                false
            }
            None => {
                self.open = Some(Open { first_ns: now_ns, last_bad_ns: now_ns, good_since: false, count: n });
                true
            }
        }
    }

    /// Record a good outcome (a call that succeeded, a check that found nothing wrong).
    pub fn went_well(&mut self) {
        if let Some(open) = &mut self.open {
            open.good_since = true;
        }
    }

    /// End the episode if it has settled: a good outcome came after the last occurrence, and
    /// that was at least [`SETTLE_NS`] ago. Returns its summary (log it).
    pub fn settle(&mut self, now_ns: u64) -> Option<Summary> {
        let open = self.open.as_ref()?;
        if !open.good_since || now_ns.saturating_sub(open.last_bad_ns) < SETTLE_NS {
            return None;
        }
        let seconds = open.last_bad_ns.saturating_sub(open.first_ns) / 1_000_000_000;
        let summary = Summary { count: open.count, seconds };
        self.open = None;
        Some(summary)
    }

    /// Whether an episode is under way.
    #[cfg(test)]
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }
}

/// What a check of a counter found: an episode started (with the occurrences since the last
/// check) or settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The first occurrences after a quiet spell.
    Started(u64),
    /// The episode is over.
    Settled(Summary),
}

/// An [`Episode`] of a cumulative counter (items dropped, batches unreadable) checked on every
/// tick: a tick that finds it grown is an occurrence, one that finds it still is a good outcome.
#[derive(Debug, Clone, Default)]
pub struct CounterEpisode {
    seen: u64,
    episode: Episode,
}

impl CounterEpisode {
    /// Check the counter's `total` at `now_ns`; returns the change to log, if any.
    pub fn check(&mut self, total: u64, now_ns: u64) -> Option<Change> {
        let new = total.saturating_sub(self.seen);
        self.seen = total;
        if new > 0 {
            return self.episode.occurred(new, now_ns).then_some(Change::Started(new));
        }
        self.episode.went_well();
        self.episode.settle(now_ns).map(Change::Settled)
    }

    /// [`Self::check`] as the line to log: `started` with the new occurrences, or `settled`
    /// with the episode's summary.
    pub fn line(
        &mut self,
        total: u64,
        now_ns: u64,
        started: impl FnOnce(u64) -> String,
        settled: impl FnOnce(Summary) -> String,
    ) -> Option<String> {
        match self.check(total, now_ns)? {
            Change::Started(new) => Some(started(new)),
            Change::Settled(summary) => Some(settled(summary)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn one_start_and_one_end_however_long_it_lasts() {
        let mut e = Episode::default();
        assert!(e.occurred(3, 0), "the first occurrence starts it");
        let mut starts = 0;
        // An hour of a tick every 100 ms, each with drops: no further line.
        for tick in 1..36_000u64 {
            starts += u32::from(e.occurred(1, tick * S / 10));
            assert_eq!(e.settle(tick * S / 10), None);
        }
        assert_eq!(starts, 0);
        let last = 35_999 * S / 10;
        e.went_well();
        assert_eq!(e.settle(last + SETTLE_NS - 1), None, "not settled yet");
        assert_eq!(e.settle(last + SETTLE_NS), Some(Summary { count: 3 + 35_999, seconds: 3599 }));
        assert!(!e.is_open());
        assert_eq!(e.settle(last + 2 * SETTLE_NS), None, "ends once");
        assert!(e.occurred(1, last + 3 * SETTLE_NS), "a new episode starts");
    }

    #[test]
    fn needs_a_good_outcome_after_the_last_occurrence() {
        let mut e = Episode::default();
        e.occurred(1, 0);
        // Nothing happened since (no calls made while the collector is down): not recovered.
        assert_eq!(e.settle(60 * S), None);
        e.went_well();
        e.occurred(1, 61 * S);
        assert_eq!(e.settle(70 * S), None, "the occurrence after the good outcome cancels it");
        e.went_well();
        assert_eq!(e.settle(70 * S).map(|s| s.count), Some(2));
    }

    #[test]
    fn alternating_outcomes_stay_one_episode() {
        let mut e = Episode::default();
        let mut lines = 0;
        for i in 0..1_000u64 {
            lines += u32::from(e.occurred(1, i * S));
            e.went_well();
            lines += u32::from(e.settle(i * S + S / 2).is_some());
        }
        assert_eq!(lines, 1);
    }

    #[test]
    fn a_counter_checked_every_tick_starts_and_settles_once() {
        let mut c = CounterEpisode::default();
        assert_eq!(c.check(0, 0), None);
        assert_eq!(c.check(3, S), Some(Change::Started(3)));
        assert_eq!(c.check(10, 2 * S), None, "still growing");
        assert_eq!(c.check(10, 3 * S), None, "still for less than SETTLE_NS");
        assert_eq!(c.check(10, 7 * S), Some(Change::Settled(Summary { count: 10, seconds: 1 })));
        assert_eq!(c.check(10, 8 * S), None);
    }

    #[test]
    fn good_outcomes_without_an_episode_are_nothing() {
        let mut e = Episode::default();
        e.went_well();
        assert_eq!(e.settle(100 * S), None);
        assert!(!e.is_open());
    }
}
