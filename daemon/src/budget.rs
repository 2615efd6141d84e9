//! The daemon-wide budget for tensor bytes held for clients: streamed
//! ahead of their requests (`daemon.max_upload` bounds one connection's
//! share) and the inputs of requests not yet finished, noise included.
//! Without it, every connection could hold its own `max_upload` at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Shared by every connection; cheap to clone.
#[derive(Clone, Debug)]
pub struct Budget {
    held: Arc<AtomicUsize>,
    limit: usize,
}

/// Bytes taken from a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Permit {
    held: Arc<AtomicUsize>,
    bytes: usize,
}

impl Budget {
    /// A budget of `limit` bytes (`daemon.max_upload_total`).
    pub fn new(limit: usize) -> Budget {
        Budget {
            held: Arc::new(AtomicUsize::new(0)),
            limit,
        }
    }

    /// Takes `bytes` if they fit in what is left; `None` leaves it as it was.
    pub fn take(&self, bytes: usize) -> Option<Permit> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .ok()
            .map(|_| Permit {
                held: self.held.clone(),
                bytes,
            })
    }

    /// An empty permit, to merge others into.
    pub fn nothing(&self) -> Permit {
        Permit {
            held: self.held.clone(),
            bytes: 0,
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl Permit {
    /// Takes over `other`'s bytes (both from the same budget).
    pub fn merge(&mut self, mut other: Permit) {
        self.bytes += std::mem::take(&mut other.bytes);
    }

    /// Gives its bytes back now.
    pub fn release(&mut self) {
        let bytes = std::mem::take(&mut self.bytes);
        if bytes > 0 {
            self.held.fetch_sub(bytes, Ordering::AcqRel);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_take_what_fits_and_give_it_back_when_dropped() {
        let budget = Budget::new(100);
        let a = budget.take(60).unwrap();
        assert!(budget.take(41).is_none(), "over the limit");
        assert_eq!(budget.held(), 60);
        let mut b = budget.take(40).unwrap();
        assert!(budget.take(1).is_none());
        b.merge(a);
        assert_eq!((b.bytes, budget.held()), (100, 100));
        drop(b);
        assert_eq!(budget.held(), 0);
        assert!(budget.take(usize::MAX).is_none(), "no overflow");
        let empty = budget.nothing();
        drop(empty);
        assert_eq!(budget.held(), 0);
    }
}
