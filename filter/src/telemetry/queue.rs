//! One signal's outbox (spans, access logs): its bounded queue, flush timer and export calls.

use crate::config::Config;
use crate::episode::CounterEpisode;
use crate::export::{BoundedQueue, FlushTimer, Payload, Sender};
use crate::otlp;

/// One signal's queue, flush timer and export calls (spans, access logs).
#[derive(Debug)]
pub(super) struct Signal<T> {
    pub(super) signal: otlp::Signal,
    pub(super) queue: BoundedQueue<T>,
    pub(super) flush: FlushTimer,
    pub(super) sender: Sender,
    pub(super) recorded: u64,
    /// The queue's drops, as an episode.
    pub(super) drops: CounterEpisode,
}

impl<T> Signal<T> {
    pub(super) fn new(signal: otlp::Signal, config: &Config, now_ns: u64, seed: u64) -> Self {
        let e = &config.export;
        Self {
            signal,
            queue: BoundedQueue::new(e.max_queue),
            flush: FlushTimer::new(e.flush_interval, now_ns),
            sender: Sender::new(e.max_in_flight, e.max_retries).with_seed(seed.rotate_left(signal as u32 * 8 + 1)),
            recorded: 0,
            drops: CounterEpisode::default(),
        }
    }

    pub(super) fn push(&mut self, item: T) {
        self.recorded += 1;
        self.queue.push(item);
    }

    /// The whole queue, in batches encoded by `encode`.
    pub(super) fn drain(&mut self, max_batch: usize, encode: impl Fn(&[T]) -> Vec<u8>) -> Vec<Payload> {
        let mut out = Vec::new();
        while !self.queue.is_empty() {
            let batch = self.queue.take(max_batch);
            out.push(Payload::new(self.signal, encode(&batch), batch.len() as u64));
        }
        out
    }

    /// A retry or a batch due now, encoded by `encode`.
    pub(super) fn next(
        &mut self,
        max_batch: usize,
        now_ns: u64,
        encode: impl FnOnce(&[T]) -> Vec<u8>,
    ) -> Option<Payload> {
        if let Some(retry) = self.sender.due_retry(now_ns) {
            return Some(retry);
        }
        if self.sender.has_capacity() && self.flush.due(self.queue.len(), max_batch, now_ns) {
            let batch = self.queue.take(max_batch);
            self.flush.flushed(now_ns);
            return Some(Payload::new(self.signal, encode(&batch), batch.len() as u64));
        }
        None
    }

    /// Lines for the episodes of this signal that started or settled: the queue dropping
    /// records (`what` names them), and its export calls.
    pub(super) fn notices(&mut self, what: &str, cap: usize, now_ns: u64, lines: &mut Vec<String>) {
        let dropped = self.queue.dropped();
        lines.extend(self.drops.line(
            dropped,
            now_ns,
            |_| {
                format!(
                    "{what} queue full (export.max_queue = {cap}): dropping the oldest records until exports catch up"
                )
            },
            |s| {
                format!(
                    "{what} queue has room again: dropped {} records over {} s, {dropped} since the VM started",
                    s.count, s.seconds
                )
            },
        ));
        let path = self.signal.path();
        lines.extend(self.sender.settle(now_ns).into_iter().map(|l| format!("{path}: {l}")));
    }
}
