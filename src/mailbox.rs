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
    /// True if no message waits.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// keelson's cores run glommio without preemption timers (see
    /// third_party/glommio/PATCHES.md). Such an executor must still sleep and
    /// be woken by a message from another thread, and still fire its timers;
    /// and the knob must really turn the timers off: after a task has run
    /// well past the preemption period, `need_preempt` is false without
    /// them and true with them.
    #[test]
    fn executor_without_preempt_timers_sleeps_wakes_and_never_preempts() {
        for timers in [false, true] {
            let (tx, rx) = mailbox::<u32>();
            let sender = std::thread::spawn(move || {
                for i in 0..50u32 {
                    // Long enough for the executor to go to sleep.
                    std::thread::sleep(Duration::from_millis(2));
                    tx.send(i);
                }
            });
            let preempted = glommio::LocalExecutorBuilder::default()
                .preempt_timer(Duration::from_millis(1))
                .preempt_timers(timers)
                .spawn(move || async move {
                    let mut got = Vec::new();
                    let mut batch = Vec::new();
                    while got.len() < 50 {
                        batch.clear();
                        assert!(rx.recv_batch(&mut batch, 64).await);
                        got.extend_from_slice(&batch);
                    }
                    assert_eq!(got, (0..50).collect::<Vec<_>>());
                    let t = Instant::now();
                    glommio::timer::sleep(Duration::from_millis(5)).await;
                    assert!(t.elapsed() >= Duration::from_millis(5));
                    // Busy for 20 preemption periods.
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_millis(20) {
                        std::hint::spin_loop();
                    }
                    glommio::executor().need_preempt()
                })
                .unwrap()
                .join()
                .unwrap();
            sender.join().unwrap();
            assert_eq!(preempted, timers, "preempt_timers({timers})");
        }
    }

    /// Without preemption timers the patched reactor keeps the io_uring
    /// timeout for the earliest user timer armed across sleeps; a timer that
    /// comes due earlier than the armed one must still wake the executor on
    /// time, and the later one must still fire.
    #[test]
    fn an_earlier_timer_replaces_the_armed_one() {
        let (tx, rx) = mailbox::<()>();
        let (early, late) = glommio::LocalExecutorBuilder::default()
            .preempt_timers(false)
            .spawn(move || async move {
                let start = Instant::now();
                let late = glommio::spawn_local(async move {
                    glommio::timer::sleep(Duration::from_millis(400)).await;
                    start.elapsed()
                });
                // Sleep with only the 400 ms timer armed until another
                // thread sends a message.
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(30));
                    tx.send(());
                });
                let mut got = Vec::new();
                assert!(rx.recv_batch(&mut got, 1).await);
                let t = Instant::now();
                glommio::timer::sleep(Duration::from_millis(10)).await;
                (t.elapsed(), late.await)
            })
            .unwrap()
            .join()
            .unwrap();
        assert!(early >= Duration::from_millis(10), "{early:?}");
        assert!(early < Duration::from_millis(200), "{early:?}");
        assert!(late >= Duration::from_millis(400), "{late:?}");
        assert!(late < Duration::from_millis(1000), "{late:?}");
    }

    /// The rule the patched reactor keeps an armed user-timer timeout by: a
    /// timeout that has fired (its completion consumed while the reactor was
    /// deciding to sleep) is never kept, whatever its deadline, or the
    /// executor would sleep with no timeout armed at all (seen as a put
    /// load stalling for minutes behind a 300 µs timer in the raft loop).
    #[test]
    fn a_fired_timeout_is_never_kept_armed() {
        use glommio::keep_armed_timeout as keep;
        let now = Instant::now();
        let later = now + Duration::from_millis(5);
        assert!(keep(false, Some(true), Some(now), later));
        assert!(keep(false, Some(true), Some(later), later));
        assert!(!keep(false, Some(false), Some(now), later), "fired");
        assert!(!keep(false, None, None, later), "none armed");
        assert!(
            !keep(false, Some(true), Some(later), now),
            "due after the new deadline"
        );
        assert!(
            !keep(true, Some(true), Some(now), later),
            "preemption timers on"
        );
    }

    /// The patched reactor keeps its link to the latency ring (where timers
    /// complete) armed across sleeps and arms a new one only once it has
    /// fired. Timers must wake an executor that sleeps on nothing else, one
    /// after another (the link re-armed each time it fired), and a timer
    /// must still fire on time while foreign wake-ups keep waking the
    /// executor before it (the link armed once, slept on many times).
    #[test]
    fn timers_wake_a_sleeping_executor_across_many_sleeps() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (tx, rx) = mailbox::<u32>();
        std::thread::spawn(move || {
            let r = glommio::LocalExecutorBuilder::default()
                .preempt_timers(false)
                .spawn(move || async move {
                    // Timers alone, one after another.
                    let t = Instant::now();
                    for _ in 0..20 {
                        glommio::timer::sleep(Duration::from_millis(2)).await;
                    }
                    let alone = t.elapsed();
                    // A timer pending while another thread wakes us 40 times.
                    let t = Instant::now();
                    let timer = glommio::spawn_local(async move {
                        glommio::timer::sleep(Duration::from_millis(150)).await;
                        t.elapsed()
                    });
                    std::thread::spawn(move || {
                        for i in 0..40u32 {
                            std::thread::sleep(Duration::from_millis(1));
                            tx.send(i);
                        }
                    });
                    let mut got = Vec::new();
                    let mut batch = Vec::new();
                    while got.len() < 40 {
                        batch.clear();
                        assert!(rx.recv_batch(&mut batch, 64).await);
                        got.extend_from_slice(&batch);
                    }
                    (alone, timer.await)
                })
                .unwrap()
                .join()
                .unwrap();
            let _ = done_tx.send(r);
        });
        let (alone, pending) = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a timer never woke the executor");
        assert!(alone >= Duration::from_millis(40), "{alone:?}");
        assert!(alone < Duration::from_secs(2), "{alone:?}");
        assert!(pending >= Duration::from_millis(150), "{pending:?}");
        assert!(pending < Duration::from_millis(1000), "{pending:?}");
    }
}
