//! Cross-core message queues.
//!
//! Cores share nothing but messages. A `Mailbox` is a multi-producer,
//! single-consumer queue (crossbeam) plus an `AtomicWaker`, so the consuming
//! glommio task sleeps until a message arrives; glommio delivers a wake from a
//! foreign thread through its eventfd, so no core ever spins.
//!
//! The consumer drains in batches (`recv_batch`): one wake-up serves every
//! message that arrived meanwhile, which is what makes group commit and
//! batched apply fall out naturally.

use futures::task::AtomicWaker;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

pub struct Sender<T> {
    tx: crossbeam_channel::Sender<T>,
    waker: Arc<AtomicWaker>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            tx: self.tx.clone(),
            waker: self.waker.clone(),
        }
    }
}

pub struct Receiver<T> {
    rx: crossbeam_channel::Receiver<T>,
    waker: Arc<AtomicWaker>,
}

pub fn mailbox<T>() -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let waker = Arc::new(AtomicWaker::new());
    (
        Sender {
            tx,
            waker: waker.clone(),
        },
        Receiver { rx, waker },
    )
}

impl<T> Sender<T> {
    /// Sends a message; returns false when the receiving core is gone
    /// (only during shutdown).
    pub fn send(&self, msg: T) -> bool {
        let ok = self.tx.send(msg).is_ok();
        self.waker.wake();
        ok
    }
}

impl<T> Receiver<T> {
    /// Waits for at least one message, then moves up to `max` of them into
    /// `out`. Returns false when every sender is gone and the queue is empty.
    pub async fn recv_batch(&self, out: &mut Vec<T>, max: usize) -> bool {
        poll_fn(|cx| {
            let (mut got, mut gone) = self.drain(out, max);
            if got == 0 && !gone {
                self.waker.register(cx.waker());
                // A message may have arrived between the drain and the
                // registration: look again before sleeping.
                (got, gone) = self.drain(out, max);
            }
            if got > 0 {
                Poll::Ready(true)
            } else if gone {
                Poll::Ready(false)
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Returns how many messages moved, and whether every sender is gone.
    fn drain(&self, out: &mut Vec<T>, max: usize) -> (usize, bool) {
        let mut n = 0;
        while n < max {
            match self.rx.try_recv() {
                Ok(m) => {
                    out.push(m);
                    n += 1;
                }
                Err(crossbeam_channel::TryRecvError::Empty) => return (n, false),
                Err(crossbeam_channel::TryRecvError::Disconnected) => return (n, true),
            }
        }
        (n, false)
    }

    pub fn try_recv(&self) -> Option<T> {
        self.rx.try_recv().ok()
    }
}
