//! The writes a core's clients wait for: one table per core.
//!
//! A client's write (Put, DeleteRange, Txn) registers a slot here and
//! proposes with a `Reply::Core` naming the slot. The applier answers every
//! such write of a batch in the one `CoreMsg::Applied` it sends the core
//! after the batch, so a batch of writes costs the core one message and
//! one wake-up, not a oneshot channel and a cross-core task wake per write.
//! Every write waits at most the member's request timeout: deadlines are
//! kept in arrival order (the timeout is the same for all), and one task
//! per core fails the expired ones with etcd's `request timed out`, so no
//! write arms a timer of its own.
//!
//! The proposals themselves go to the raft core through an outbox: the
//! writes a core's clients make in one turn of its executor (typically
//! every request one read of a connection brought) travel as one
//! `RaftMsg::ProposeMany`, sent by one task per core that runs after the
//! handlers of that turn, not as one cross-core message each.
//!
//! *Invariants:* a slot is answered at most once; an answer for a slot
//! that was given up (timed out, or its client went away) and reused is
//! dropped, never delivered to the new occupant (slots carry a
//! generation); the table and the deadline queue hold at most one entry
//! per write in progress plus expired-but-not-swept deadlines.

use crate::apply::{Reply, WriteResult};
use crate::error::{self, Status};
use crate::proto::keelson::RaftCommand;
use crate::raftcore::{Proposal, RaftMsg};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Names one write waiting on one core: index in its table and the
/// generation the slot had when it was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteSlot {
    index: u32,
    gen: u32,
}

enum State {
    Free,
    Waiting(Option<Waker>),
    Done(Result<WriteResult, Status>),
}

struct Slot {
    gen: u32,
    state: State,
}

/// One core's table of writes in progress.
pub struct Writes {
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    /// (deadline, slot) in the order the writes began.
    deadlines: RefCell<VecDeque<(Instant, WriteSlot)>>,
    timeout: Duration,
    /// The sweeper, parked while no write waits.
    sweeper: Cell<Option<Waker>>,
    /// Proposals not yet sent to the raft core, in the order they were
    /// made, with the slot each answer goes to.
    outbox: RefCell<Vec<(Vec<u8>, RaftCommand, WriteSlot)>>,
    /// The sender (`send_proposals`), parked while the outbox is empty.
    sender: Cell<Option<Waker>>,
}

impl Writes {
    pub fn new(timeout: Duration) -> Writes {
        Writes {
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            deadlines: RefCell::new(VecDeque::new()),
            timeout,
            sweeper: Cell::new(None),
            outbox: RefCell::new(Vec::new()),
            sender: Cell::new(None),
        }
    }

    /// Queues the proposal of the write that took `slot` (`data`, and the
    /// command it decodes to: `raftcore::Proposal`); it goes to the raft
    /// core with the others of this executor turn (`send_proposals`).
    pub fn propose(&self, data: Vec<u8>, cmd: RaftCommand, slot: WriteSlot) {
        let mut out = self.outbox.borrow_mut();
        out.push((data, cmd, slot));
        if out.len() == 1 {
            if let Some(w) = self.sender.take() {
                w.wake();
            }
        }
    }

    /// Sends what `propose` queued as one message per wake-up, the writes
    /// in the order they were proposed, each answered to this core
    /// (`core`). Runs for the life of the core; ends only if the raft core
    /// is gone (shutting down).
    pub async fn send_proposals(&self, core: usize, raft: &crate::mailbox::Sender<RaftMsg>) {
        loop {
            parked_while(&self.sender, || self.outbox.borrow().is_empty()).await;
            let batch: Vec<_> = self
                .outbox
                .borrow_mut()
                .drain(..)
                .map(|(data, cmd, slot)| Proposal {
                    data,
                    cmd,
                    reply: Reply::Core { core, slot },
                })
                .collect();
            if !raft.send(RaftMsg::ProposeMany(batch)) {
                return;
            }
        }
    }

    /// Takes a slot for a write about to be proposed; its deadline is the
    /// request timeout from now.
    pub fn begin(&self) -> WriteSlot {
        let mut slots = self.slots.borrow_mut();
        let slot = match self.free.borrow_mut().pop() {
            Some(index) => {
                let s = &mut slots[index as usize];
                s.gen = s.gen.wrapping_add(1);
                s.state = State::Waiting(None);
                WriteSlot { index, gen: s.gen }
            }
            None => {
                let index = slots.len() as u32;
                slots.push(Slot {
                    gen: 0,
                    state: State::Waiting(None),
                });
                WriteSlot { index, gen: 0 }
            }
        };
        let mut d = self.deadlines.borrow_mut();
        // Writes finish about in the order they began: deadlines at the
        // front whose write is settled go now, so the queue holds about
        // the writes in progress rather than a timeout's worth of them.
        while let Some(&(_, front)) = d.front() {
            let s = &slots[front.index as usize];
            if s.gen == front.gen && matches!(s.state, State::Waiting(_)) {
                break;
            }
            d.pop_front();
        }
        d.push_back((Instant::now() + self.timeout, slot));
        if d.len() == 1 {
            if let Some(w) = self.sweeper.take() {
                w.wake();
            }
        }
        slot
    }

    /// The answer for `slot`; dropped if the slot was given up meanwhile
    /// or already answered. True if it went to the slot's waiter.
    pub fn finish(&self, slot: WriteSlot, res: Result<WriteResult, Status>) -> bool {
        let mut slots = self.slots.borrow_mut();
        let Some(s) = slots.get_mut(slot.index as usize) else {
            return false;
        };
        if s.gen != slot.gen {
            return false;
        }
        if let State::Waiting(w) = &mut s.state {
            let w = w.take();
            s.state = State::Done(res);
            if let Some(w) = w {
                w.wake();
            }
            return true;
        }
        false
    }

    /// Waits for the answer of a slot taken by `begin`. Dropping the
    /// future gives the slot up.
    pub fn wait(&self, slot: WriteSlot) -> WriteWait<'_> {
        WriteWait {
            writes: self,
            slot,
            done: false,
        }
    }

    fn release(&self, slot: WriteSlot) {
        let mut slots = self.slots.borrow_mut();
        if let Some(s) = slots.get_mut(slot.index as usize) {
            if s.gen == slot.gen && !matches!(s.state, State::Free) {
                s.state = State::Free;
                self.free.borrow_mut().push(slot.index);
            }
        }
    }

    /// Writes waiting now (tests, and a bound to check).
    pub fn in_progress(&self) -> usize {
        self.slots.borrow().len() - self.free.borrow().len()
    }

    /// Deadlines queued (tests).
    #[cfg(test)]
    fn deadlines_queued(&self) -> usize {
        self.deadlines.borrow().len()
    }

    /// Fails every write whose deadline passed with etcd's timeout, then
    /// sleeps until the next deadline (or until a write begins). Runs for
    /// the life of the core.
    pub async fn sweep(&self) {
        loop {
            let next = {
                let now = Instant::now();
                let mut d = self.deadlines.borrow_mut();
                while let Some(&(at, slot)) = d.front() {
                    if at > now {
                        break;
                    }
                    d.pop_front();
                    if self.finish(slot, Err(error::timeout())) {
                        crate::metrics::count(|c| c.proposals_failed += 1);
                    }
                }
                d.front().map(|&(at, _)| at)
            };
            match next {
                Some(at) => {
                    glommio::timer::sleep(at.saturating_duration_since(Instant::now())).await
                }
                None => parked_while(&self.sweeper, || self.deadlines.borrow().is_empty()).await,
            }
        }
    }
}

/// Waits while `idle()` holds, parked with its waker in `parked`; whoever
/// ends the idleness takes that waker and wakes it.
async fn parked_while(parked: &Cell<Option<Waker>>, idle: impl Fn() -> bool) {
    std::future::poll_fn(|cx| {
        if idle() {
            parked.set(Some(cx.waker().clone()));
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await
}

/// The answer to one write (see `Writes::wait`).
pub struct WriteWait<'a> {
    writes: &'a Writes,
    slot: WriteSlot,
    done: bool,
}

impl Future for WriteWait<'_> {
    type Output = Result<WriteResult, Status>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut slots = this.writes.slots.borrow_mut();
        let Some(s) = slots.get_mut(this.slot.index as usize) else {
            return Poll::Ready(Err(error::stopped()));
        };
        if s.gen != this.slot.gen {
            return Poll::Ready(Err(error::stopped()));
        }
        match &mut s.state {
            State::Waiting(w) => {
                match w {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            State::Done(_) => {
                let State::Done(res) = std::mem::replace(&mut s.state, State::Free) else {
                    unreachable!("matched Done")
                };
                drop(slots);
                this.writes.free.borrow_mut().push(this.slot.index);
                this.done = true;
                Poll::Ready(res)
            }
            State::Free => Poll::Ready(Err(error::stopped())),
        }
    }
}

impl Drop for WriteWait<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.writes.release(self.slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn ok(rev: i64) -> Result<WriteResult, Status> {
        Ok(WriteResult {
            revision: rev,
            ..Default::default()
        })
    }

    #[test]
    fn an_answer_reaches_its_waiter_and_frees_the_slot() {
        let w = Writes::new(Duration::from_secs(5));
        let s = w.begin();
        let mut f = Box::pin(w.wait(s));
        assert!(f.as_mut().now_or_never().is_none());
        assert!(w.finish(s, ok(7)));
        assert_eq!(f.now_or_never().unwrap().unwrap().revision, 7);
        assert_eq!(w.in_progress(), 0);
    }

    #[test]
    fn an_answer_for_a_given_up_slot_never_reaches_its_next_occupant() {
        let w = Writes::new(Duration::from_secs(5));
        let old = w.begin();
        drop(w.wait(old)); // the client went away
        assert_eq!(w.in_progress(), 0);
        let new = w.begin();
        assert_eq!(new.index, old.index, "the slot is reused");
        assert!(!w.finish(old, ok(1)), "the late answer is dropped");
        let mut f = Box::pin(w.wait(new));
        assert!(
            f.as_mut().now_or_never().is_none(),
            "late answer was delivered"
        );
        assert!(w.finish(new, ok(2)));
        assert_eq!(f.now_or_never().unwrap().unwrap().revision, 2);
        // A second answer for the same write is dropped too.
        assert!(!w.finish(new, ok(3)));
        assert_eq!(w.in_progress(), 0);
    }

    #[test]
    fn settled_writes_leave_the_deadline_queue_as_new_ones_begin() {
        let w = Writes::new(Duration::from_secs(5));
        for i in 0..1000 {
            let s = w.begin();
            w.finish(s, ok(i));
            let _ = w.wait(s).now_or_never();
        }
        assert!(w.deadlines_queued() <= 1, "{}", w.deadlines_queued());
        let held = w.begin();
        for i in 0..100 {
            let s = w.begin();
            w.finish(s, ok(i));
            let _ = w.wait(s).now_or_never();
        }
        // One waiting write at the front keeps those behind it queued
        // until it settles (or its deadline passes).
        assert!(w.deadlines_queued() > 100);
        drop(w.wait(held));
        w.begin();
        assert!(w.deadlines_queued() <= 1);
    }

    #[test]
    fn a_write_past_its_deadline_times_out_with_etcds_error() {
        let ex = glommio::LocalExecutorBuilder::default()
            .preempt_timers(false)
            .make()
            .expect("executor");
        ex.run(async {
            let w = std::rc::Rc::new(Writes::new(Duration::from_millis(30)));
            let sweeper = {
                let w = w.clone();
                glommio::spawn_local(async move { w.sweep().await })
            };
            let start = Instant::now();
            let a = w.begin();
            let b = w.begin();
            w.finish(b, ok(9));
            let ra = w.wait(a).await;
            assert!(start.elapsed() >= Duration::from_millis(30));
            assert_eq!(ra.unwrap_err().message, error::timeout().message);
            // b was answered before its deadline: the sweep leaves it be.
            assert_eq!(w.wait(b).await.unwrap().revision, 9);
            assert_eq!(w.in_progress(), 0);
            // The sweeper parks with nothing to wait for, and wakes for
            // the next write.
            let c = w.begin();
            assert!(w.wait(c).await.is_err());
            drop(sweeper);
        });
    }

    /// The proposals of one executor turn go to the raft core as one
    /// message, in the order they were made, each naming its slot on this
    /// core; a proposal made later goes in a message of its own.
    #[test]
    fn proposals_of_one_turn_travel_together_in_order() {
        let ex = glommio::LocalExecutorBuilder::default()
            .preempt_timers(false)
            .make()
            .expect("executor");
        ex.run(async {
            let (tx, rx) = crate::mailbox::mailbox::<RaftMsg>();
            let w = std::rc::Rc::new(Writes::new(Duration::from_secs(5)));
            let sender = {
                let w = w.clone();
                glommio::spawn_local(async move { w.send_proposals(3, &tx).await })
            };
            let slots: Vec<_> = (0..3).map(|_| w.begin()).collect();
            for (i, &s) in slots.iter().enumerate() {
                w.propose(vec![i as u8], RaftCommand::default(), s);
            }
            assert!(rx.try_recv().is_none(), "sent before the turn ended");
            let mut got = Vec::new();
            assert!(rx.recv_batch(&mut got, 16).await);
            let [RaftMsg::ProposeMany(batch)] = &got[..] else {
                panic!("one message of proposals expected");
            };
            let seen: Vec<_> = batch
                .iter()
                .map(|p| match &p.reply {
                    Reply::Core { core: 3, slot } => (p.data.clone(), *slot),
                    _ => panic!("a reply to this core's slot expected"),
                })
                .collect();
            assert_eq!(
                seen,
                vec![
                    (vec![0], slots[0]),
                    (vec![1], slots[1]),
                    (vec![2], slots[2])
                ]
            );
            let late = w.begin();
            w.propose(vec![9], RaftCommand::default(), late);
            got.clear();
            assert!(rx.recv_batch(&mut got, 16).await);
            assert!(
                matches!(&got[..], [RaftMsg::ProposeMany(b)] if b.len() == 1 && b[0].data == vec![9])
            );
            drop(sender);
        });
    }
}
