//! An ordered work queue: many workers take items and finish them in any
//! order; one consumer receives the results in item order.
//!
//! Why not windows of `par_iter`: a window ends in a barrier where the fast
//! workers wait for the slowest item, leaving cores idle. Here workers pull
//! the next item as soon as they are free. Invariant: at most `limit` items
//! are taken but not yet consumed, so memory stays bounded however far the
//! workers could run ahead of a slow writer.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

struct State<I: Iterator, R> {
    items: I,
    /// Items handed out so far.
    issued: u64,
    /// Results handed to the consumer so far.
    consumed: u64,
    /// Results of items `consumed..issued`, `None` while still being worked on.
    ready: VecDeque<Option<R>>,
    exhausted: bool,
    stopped: bool,
}

/// See the module docs.
pub struct Ordered<I: Iterator, R> {
    state: Mutex<State<I, R>>,
    space: Condvar,
    result: Condvar,
    limit: u64,
}

impl<I: Iterator, R> Ordered<I, R> {
    /// A queue over `items` with at most `limit` (at least 1) in flight.
    pub fn new(items: I, limit: usize) -> Self {
        Ordered {
            state: Mutex::new(State {
                items,
                issued: 0,
                consumed: 0,
                ready: VecDeque::new(),
                exhausted: false,
                stopped: false,
            }),
            space: Condvar::new(),
            result: Condvar::new(),
            limit: limit.max(1) as u64,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<I, R>> {
        // A panicking worker cannot leave the state half-updated: every
        // critical section below is panic-free, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next item and its sequence number, waiting while too many are in
    /// flight; `None` when there are no more or the queue was stopped.
    pub fn take(&self) -> Option<(u64, I::Item)> {
        let mut s = self.lock();
        loop {
            if s.stopped || s.exhausted {
                return None;
            }
            if s.issued - s.consumed < self.limit {
                match s.items.next() {
                    Some(item) => {
                        let seq = s.issued;
                        s.issued += 1;
                        s.ready.push_back(None);
                        return Some((seq, item));
                    }
                    None => {
                        s.exhausted = true;
                        self.result.notify_all();
                        return None;
                    }
                }
            }
            s = self.space.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Hands in the result of item `seq`.
    pub fn put(&self, seq: u64, result: R) {
        let mut s = self.lock();
        if s.stopped {
            return;
        }
        let at = (seq - s.consumed) as usize;
        s.ready[at] = Some(result);
        if at == 0 {
            self.result.notify_one();
        }
    }

    /// The next result in item order, waiting for it; `None` when all items
    /// are consumed or the queue was stopped.
    pub fn next(&self) -> Option<R> {
        let mut s = self.lock();
        loop {
            if s.stopped {
                return None;
            }
            if matches!(s.ready.front(), Some(Some(_))) {
                let r = s.ready.pop_front().flatten();
                s.consumed += 1;
                self.space.notify_one();
                return r;
            }
            if s.exhausted && s.ready.is_empty() {
                return None;
            }
            s = self.result.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops the queue: workers get no more items, the consumer no more results.
    pub fn stop(&self) {
        let mut s = self.lock();
        s.stopped = true;
        self.space.notify_all();
        self.result.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::Ordered;

    #[test]
    fn results_come_in_order_with_bounded_flight() {
        let q = Ordered::new(0..1000u32, 8);
        let out = std::thread::scope(|s| {
            for w in 0..4 {
                let q = &q;
                s.spawn(move || {
                    while let Some((seq, item)) = q.take() {
                        if (item + w) % 7 == 0 {
                            std::thread::yield_now();
                        }
                        q.put(seq, item * 2);
                    }
                });
            }
            let mut out = Vec::new();
            while let Some(r) = q.next() {
                out.push(r);
            }
            out
        });
        assert_eq!(out, (0..1000).map(|i| i * 2).collect::<Vec<_>>());
    }

    #[test]
    fn stop_releases_everyone() {
        let q = Ordered::new(0..1000u32, 2);
        std::thread::scope(|s| {
            let q = &q;
            s.spawn(move || {
                while let Some((seq, i)) = q.take() {
                    q.put(seq, i);
                }
            });
            assert_eq!(q.next(), Some(0));
            q.stop();
            assert_eq!(q.next(), None);
        });
    }
}
