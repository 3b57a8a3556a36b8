//! Watch, core side: the hub that serves every watch stream on one core,
//! and the `Watch` gRPC stream handler.
//!
//! Shards send a core one copy of each change its watched ranges cover
//! (`crate::watch`); the hub fans it out to its watchers. Each watcher
//! keeps, per shard it depends on, whether that shard's stream of events is
//! *live* or still being read back from history (`ShardSync`). A watcher's
//! events are released to its stream only up to the node's applied index
//! and, for shards still in history, up to what their history answers have
//! covered: every shard has then passed that revision, so the events of
//! one revision (one txn, possibly across shards) are never split and
//! never reordered.
//!
//! Storage: watchers are small records in a slab, in groups by key range
//! and `prev_kv`; the group, not each watcher, is registered with the
//! shards. A watcher created at the current revision on a group whose
//! registration covers every change after it joins live at once, without
//! a history request; only watchers reading history or holding events
//! own an allocation (`Catchup`, `Buf`).
//!
//! Bounds: a stream's built responses (`OUTBOX_BYTES_MAX`) and a watcher's
//! buffered events (`WATCHER_BUF_EVENTS_MAX`, pointers to events shared by
//! all watchers) are limited. A watcher that overflows drops its buffer and
//! goes back to reading history from the last revision it delivered, once
//! its stream has room: a slow reader never holds up writers or other
//! watchers, and if it falls behind compaction it is canceled with the
//! compact revision, as on etcd.

use super::grpc::{Metadata, MsgSink, MsgStream};
use super::Core;
use crate::apply::ShardMsg;
use crate::error::{self, Code, Status};
use crate::proto::etcdserverpb::{
    watch_request, ResponseHeader, WatchCreateRequest, WatchRequest, WatchResponse,
};
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};
use crate::store::shard_of;
use crate::watch::{History, ShardEvent, WatchRange};
use bytes::{Bytes, BytesMut};
use prost::Message;
use std::cell::{Cell, OnceCell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

/// Responses built for one stream and not yet written to its socket.
pub const OUTBOX_BYTES_MAX: usize = 512 << 10;
/// Watchers build responses only while their stream's outbox holds less
/// than this: under load, events gather in the watchers' buffers and go
/// out in fewer, larger responses once the socket has drained.
pub const OUTBOX_BYTES_LOW: usize = 64 << 10;
/// Events (and their bytes, counted as if not shared) one watcher may hold
/// unreleased before it falls back to history.
pub const WATCHER_BUF_EVENTS_MAX: usize = 16 * 1024;
pub const WATCHER_BUF_BYTES_MAX: usize = 64 << 20;
/// What all watchers of a core may hold together: buffered event pointers,
/// and bytes of the (shared) events they point to. Past either, a watcher
/// holding more than `WATCHER_BUF_PRESSURED` events falls back to history.
pub const HUB_BUFFERED_MAX: usize = 32 << 20;
pub const HUB_EVENT_BYTES_MAX: usize = 256 << 20;
pub const WATCHER_BUF_PRESSURED: usize = 256;
/// A stream's responses go to h2 in buffers of up to this many bytes.
const SEND_BATCH_BYTES: usize = 64 << 10;
/// Requests a stream handles in a row, while more have already arrived,
/// before it sends what they built: a client's burst of a thousand create
/// requests is answered in a few DATA frames, not a thousand (h2 queues
/// every frame until its connection task writes it, in a slab per
/// connection that never shrinks).
const REQUESTS_PER_BATCH: usize = 256;
/// Responses are cut at a revision boundary past this size.
const RESPONSE_BYTES_SOFT: usize = 1 << 20;
/// etcd's filter types (`WatchCreateRequest.FilterType`).
const FILTER_NOPUT: i32 = 0;
const FILTER_NODELETE: i32 = 1;

/// An event shared by every watcher it goes to, encoded once per shape.
struct Ev {
    rev: i64,
    sub: u64,
    delete: bool,
    /// Rough bytes, for buffer limits.
    size: usize,
    kv: KeyValue,
    prev: Option<KeyValue>,
    plain: OnceCell<Bytes>,
    with_prev: OnceCell<Bytes>,
    /// The hub's count of bytes in live events.
    acct: Rc<Cell<usize>>,
}

impl Drop for Ev {
    fn drop(&mut self) {
        self.acct.set(self.acct.get().saturating_sub(self.size));
    }
}

impl Ev {
    fn new(e: ShardEvent, acct: &Rc<Cell<usize>>) -> Ev {
        let size = crate::watch::event_bytes(&e);
        acct.set(acct.get() + size);
        Ev {
            acct: acct.clone(),
            size,
            rev: e.rev,
            sub: e.sub,
            delete: e.delete,
            kv: e.kv,
            prev: e.prev,
            plain: OnceCell::new(),
            with_prev: OnceCell::new(),
        }
    }

    /// The `mvccpb.Event` bytes, with or without `prev_kv`.
    fn encoded(&self, prev: bool) -> &Bytes {
        let cell = if prev { &self.with_prev } else { &self.plain };
        cell.get_or_init(|| {
            Event {
                r#type: if self.delete {
                    EventType::Delete
                } else {
                    EventType::Put
                } as i32,
                kv: Some(self.kv.clone()),
                prev_kv: if prev { self.prev.clone() } else { None },
            }
            .encode_to_vec()
            .into()
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct ShardSync {
    /// Everything up to here has been received from this shard (while it
    /// is not live).
    progress: i64,
    shard: u32,
    /// Live: every change of this shard after its last history answer
    /// arrives as a live event. Otherwise history is still being read.
    live: bool,
    /// A history request of the current epoch is on its way.
    inflight: bool,
}

/// A watcher reading history (created with a start revision, or catching
/// up after it fell behind): per shard it depends on, how far it has read.
/// A watcher live on every shard has none.
struct Catchup {
    /// Unique in the hub: answers to an older catch-up, or to an earlier
    /// watcher in the same slot, are ignored.
    epoch: u64,
    shards: Box<[ShardSync]>,
}

/// Events a watcher holds, not yet released (never empty: a watcher with
/// nothing buffered has no `Buf`).
#[derive(Default)]
struct Buf {
    evs: Vec<Rc<Ev>>,
    /// Their bytes, counted as if not shared.
    bytes: u32,
}

const F_NOPUT: u8 = 1;
const F_NODELETE: u8 = 2;
const F_FRAGMENT: u8 = 4;
const F_PROGRESS_NOTIFY: u8 = 8;
/// In its stream's `blocked` queue.
const F_QUEUED: u8 = 16;

/// One watcher, kept small: 100k watchers on one member are a design
/// point. 48 bytes in a slab chunk; a watcher that is live on every shard
/// and has nothing buffered owns no other allocation (its key range is its
/// group's, the shards it depends on follow from the range).
struct Watcher {
    /// The ID the client sees.
    id: i64,
    /// Every event at or below this revision has been delivered.
    sent: i64,
    /// `None`: live on every shard.
    sync: Option<Box<Catchup>>,
    buf: Option<Box<Buf>>,
    group: u32,
    /// Its position in the group's member list.
    gpos: u32,
    stream: u32,
    prev_kv: bool,
    flags: u8,
}

impl Watcher {
    fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }

    fn set(&mut self, f: u8, on: bool) {
        if on {
            self.flags |= f;
        } else {
            self.flags &= !f;
        }
    }

    fn wants(&self, ev: &Ev) -> bool {
        !(ev.delete && self.has(F_NODELETE) || !ev.delete && self.has(F_NOPUT))
    }

    fn synced(&self) -> bool {
        self.buf.is_none() && self.sync.is_none()
    }

    fn buffered(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.evs.len())
    }

    fn live_on(&self, shard: usize) -> bool {
        match &self.sync {
            None => true,
            Some(c) => c.shards.iter().any(|s| s.shard as usize == shard && s.live),
        }
    }
}

/// The watchers of one core on one key range with one `prev_kv` setting:
/// live events are matched per group, not per watcher, and the group (not
/// each watcher) is registered with the shards.
struct Group {
    range: Arc<WatchRange>,
    prev_kv: bool,
    members: Vec<u32>,
    /// Unique in the hub: a confirmation for an earlier group in the same
    /// slot is ignored.
    tag: u64,
    /// Shards that have confirmed the registration, and the highest
    /// revision they had applied then: every later change arrives live.
    confirmed: u32,
    reg_rev: i64,
    /// The highest revision of a live event matched to this group.
    last_rev: i64,
}

/// The shards a range's keys can be on.
fn shards_of(r: &WatchRange, nshards: usize) -> std::ops::Range<usize> {
    if r.range_end.is_empty() {
        let s = shard_of(&r.key, nshards);
        s..s + 1
    } else {
        0..nshards
    }
}

const SLAB_CHUNK: usize = 1024;

/// Entries addressed by a `u32` slot, in fixed-size chunks (growing never
/// copies the whole set, and a doubling leaves at most one chunk's slack),
/// with freed slots reused.
struct Slab<T> {
    chunks: Vec<Vec<Option<T>>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            chunks: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// The slot the next `insert` will use.
    fn next_slot(&self) -> u32 {
        match self.free.last() {
            Some(&i) => i,
            None => match self.chunks.last() {
                Some(c) if c.len() < SLAB_CHUNK => {
                    ((self.chunks.len() - 1) * SLAB_CHUNK + c.len()) as u32
                }
                _ => (self.chunks.len() * SLAB_CHUNK) as u32,
            },
        }
    }

    fn insert(&mut self, v: T) -> u32 {
        self.len += 1;
        if let Some(i) = self.free.pop() {
            self.chunks[i as usize / SLAB_CHUNK][i as usize % SLAB_CHUNK] = Some(v);
            return i;
        }
        if self.chunks.last().is_none_or(|c| c.len() == SLAB_CHUNK) {
            self.chunks.push(Vec::new());
        }
        let n = self.chunks.len() - 1;
        let c = &mut self.chunks[n];
        c.push(Some(v));
        (n * SLAB_CHUNK + c.len() - 1) as u32
    }

    fn get(&self, i: u32) -> Option<&T> {
        let i = i as usize;
        self.chunks
            .get(i / SLAB_CHUNK)?
            .get(i % SLAB_CHUNK)?
            .as_ref()
    }

    fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        let i = i as usize;
        self.chunks
            .get_mut(i / SLAB_CHUNK)?
            .get_mut(i % SLAB_CHUNK)?
            .as_mut()
    }

    fn remove(&mut self, i: u32) -> Option<T> {
        let u = i as usize;
        let v = self
            .chunks
            .get_mut(u / SLAB_CHUNK)?
            .get_mut(u % SLAB_CHUNK)?
            .take()?;
        self.len -= 1;
        if self.len == 0 {
            // Empty again: give everything back.
            *self = Slab::default();
        } else {
            self.free.push(i);
        }
        Some(v)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.chunks.iter().enumerate().flat_map(|(c, v)| {
            v.iter()
                .enumerate()
                .filter_map(move |(i, e)| e.as_ref().map(|e| ((c * SLAB_CHUNK + i) as u32, e)))
        })
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut T)> {
        self.chunks.iter_mut().enumerate().flat_map(|(c, v)| {
            v.iter_mut()
                .enumerate()
                .filter_map(move |(i, e)| e.as_mut().map(|e| ((c * SLAB_CHUNK + i) as u32, e)))
        })
    }
}

/// A stream's watch IDs → watcher slots. IDs the server picks count up
/// from 0, so they live in an array (4 bytes each); IDs a client chose
/// that do not extend it go to a map.
#[derive(Default)]
struct Ids {
    /// `dense[i]` is the slot + 1 of the watcher with ID `base + i`, 0 if
    /// none; no ID in `sparse` falls in `base..base + dense.len()`.
    base: i64,
    dense: Vec<u32>,
    dense_live: usize,
    sparse: BTreeMap<i64, u32>,
}

impl Ids {
    fn dense_ix(&self, id: i64) -> Option<usize> {
        let i = id.checked_sub(self.base)?;
        (i >= 0 && (i as u64) < self.dense.len() as u64).then_some(i as usize)
    }

    fn get(&self, id: i64) -> Option<u32> {
        match self.dense_ix(id) {
            Some(i) => self.dense[i].checked_sub(1),
            None => self.sparse.get(&id).copied(),
        }
    }

    fn contains(&self, id: i64) -> bool {
        self.get(id).is_some()
    }

    /// `id` must not be in use.
    fn insert(&mut self, id: i64, slot: u32) {
        if let Some(i) = self.dense_ix(id) {
            self.dense[i] = slot + 1;
            self.dense_live += 1;
            return;
        }
        if self.dense.is_empty() {
            self.base = id;
        } else if self.base.checked_add(self.dense.len() as i64) != Some(id) {
            self.sparse.insert(id, slot);
            return;
        }
        self.dense.push(slot + 1);
        self.dense_live += 1;
        // IDs chosen earlier that the array now reaches move into it.
        while let Some(next) = self.base.checked_add(self.dense.len() as i64) {
            let Some(s) = self.sparse.remove(&next) else {
                break;
            };
            self.dense.push(s + 1);
            self.dense_live += 1;
        }
    }

    fn remove(&mut self, id: i64) -> Option<u32> {
        let Some(i) = self.dense_ix(id) else {
            return self.sparse.remove(&id);
        };
        let slot = self.dense[i].checked_sub(1)?;
        self.dense[i] = 0;
        self.dense_live -= 1;
        while self.dense.last() == Some(&0) {
            self.dense.pop();
        }
        if self.dense.len() > 64 && self.dense_live * 4 < self.dense.len() {
            // Mostly holes (long-lived IDs among many canceled ones): the
            // rest go to the map, and the array starts again.
            for (i, &v) in self.dense.iter().enumerate() {
                if v != 0 {
                    self.sparse.insert(self.base + i as i64, v - 1);
                }
            }
            self.dense_live = 0;
            self.dense = Vec::new();
        } else if self.dense.is_empty() {
            self.dense = Vec::new();
        }
        Some(slot)
    }

    fn slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.dense
            .iter()
            .filter_map(|v| v.checked_sub(1))
            .chain(self.sparse.values().copied())
    }

    fn clear(&mut self) {
        *self = Ids::default();
    }
}

/// One watch stream's side of the hub: the responses built for it, in
/// order, and its watch IDs.
pub struct Stream {
    /// Its slot in the hub.
    id: u32,
    require_leader: bool,
    outbox: RefCell<VecDeque<Bytes>>,
    outbox_bytes: Cell<usize>,
    /// Watchers waiting for room in the outbox, in the order they found it
    /// full: the stream's drain serves them round-robin.
    blocked: RefCell<VecDeque<u32>>,
    waker: Cell<Option<Waker>>,
    ended: RefCell<Option<Status>>,
    ids: RefCell<Ids>,
    next_id: Cell<i64>,
}
impl Stream {
    fn push(&self, b: Bytes) {
        self.outbox_bytes.set(self.outbox_bytes.get() + b.len());
        self.outbox.borrow_mut().push_back(b);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn full(&self) -> bool {
        self.outbox_bytes.get() >= OUTBOX_BYTES_MAX
    }

    /// The next built response, if any.
    pub fn pop(&self) -> Option<Bytes> {
        let mut q = self.outbox.borrow_mut();
        let Some(b) = q.pop_front() else {
            // A burst (say a thousand created responses) leaves capacity
            // behind; give it back.
            if q.capacity() > 64 {
                q.shrink_to(16);
            }
            return None;
        };
        drop(q);
        self.outbox_bytes
            .set(self.outbox_bytes.get().saturating_sub(b.len()));
        Some(b)
    }

    /// Moves the next responses into `out`: as many as fit in `max`
    /// bytes, at least one if there is any.
    pub fn pop_batch(&self, max: usize, out: &mut Vec<Bytes>) {
        let mut bytes = 0;
        loop {
            let next = self.outbox.borrow().front().map(Bytes::len);
            match next {
                Some(n) if out.is_empty() || bytes + n <= max => {
                    bytes += n;
                    out.extend(self.pop());
                }
                // `pop` gives back a burst's capacity once empty.
                None => {
                    self.pop();
                    return;
                }
                Some(_) => return,
            }
        }
    }

    fn end(&self, st: Status) {
        *self.ended.borrow_mut() = Some(st);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Waits until a response is ready or the stream was ended.
    pub async fn ready(&self) {
        poll_fn(|cx| {
            if !self.outbox.borrow().is_empty() || self.ended.borrow().is_some() {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }

    /// The next response, decoded (for watchers inside the server).
    pub async fn next_response(&self) -> Result<WatchResponse, Status> {
        loop {
            if let Some(b) = self.pop() {
                return WatchResponse::decode(b)
                    .map_err(|e| Status::new(Code::Internal, format!("watch response: {e}")));
            }
            if let Some(st) = self.ended.borrow().clone() {
                return Err(st);
            }
            self.ready().await;
        }
    }
}

const NO_GROUP: u32 = u32::MAX;

#[derive(Default)]
struct Inner {
    nshards: usize,
    /// Epochs and group tags (unique in the hub).
    next_seq: u64,
    watchers: Slab<Watcher>,
    groups: Slab<Group>,
    /// A range's groups, without and with `prev_kv`.
    group_of: HashMap<Arc<WatchRange>, [u32; 2]>,
    streams: Slab<Rc<Stream>>,
    applied: u64,
    revision: i64,
    /// Watchers with buffered events, or with history to ask for; not
    /// those only waiting for a history answer (it wakes them).
    waiting: HashSet<u32>,
    /// Streams with a progress request not answered yet.
    progress_wanted: HashSet<u32>,
    /// Event pointers in all watchers' buffers.
    buffered: usize,
    /// Bytes of events alive (shared by the buffers that hold them).
    ev_bytes: Rc<Cell<usize>>,
    progress_timer: bool,
    leader_monitor: bool,
}

impl Inner {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }
}

/// The watch hub of one core.
#[derive(Default)]
pub struct Hub {
    inner: RefCell<Inner>,
}

fn header(core: &Core, revision: i64) -> Option<ResponseHeader> {
    super::api::header(core, revision)
}

impl Hub {
    pub fn open_stream(&self, core: &Core, require_leader: bool) -> Result<Rc<Stream>, Status> {
        if require_leader && core.view.leader.get() == 0 {
            return Err(error::no_leader());
        }
        let mut g = self.inner.borrow_mut();
        let s = Rc::new(Stream {
            id: g.streams.next_slot(),
            require_leader,
            outbox: RefCell::new(VecDeque::new()),
            outbox_bytes: Cell::new(0),
            blocked: RefCell::new(VecDeque::new()),
            waker: Cell::new(None),
            ended: RefCell::new(None),
            ids: RefCell::new(Ids::default()),
            next_id: Cell::new(0),
        });
        let slot = g.streams.insert(s.clone());
        debug_assert_eq!(slot, s.id);
        if require_leader && !g.leader_monitor {
            g.leader_monitor = true;
            drop(g);
            self.start_leader_monitor(core);
        }
        Ok(s)
    }

    /// Drops a stream and all its watchers.
    pub fn close_stream(&self, core: &Core, s: &Stream) {
        let slots: Vec<u32> = s.ids.borrow().slots().collect();
        s.ids.borrow_mut().clear();
        s.blocked.borrow_mut().clear();
        let mut g = self.inner.borrow_mut();
        for slot in slots {
            remove_watcher(&mut g, core, slot);
        }
        g.streams.remove(s.id);
        g.progress_wanted.remove(&s.id);
    }

    /// A `WatchCreateRequest`, answered as etcd's `recvLoop` does.
    pub fn create(&self, core: &Core, s: &Stream, req: WatchCreateRequest) {
        let hub_rev = self.inner.borrow().revision;
        let rev_now = hub_rev.max(core.view.revision.get());
        let fail = |reason: &str| {
            s.push(encode(&WatchResponse {
                header: header(core, rev_now),
                watch_id: -1,
                created: true,
                canceled: true,
                cancel_reason: reason.to_string(),
                ..Default::default()
            }));
        };
        // etcd: an empty key is \0, the smallest key.
        let key = if req.key.is_empty() { vec![0] } else { req.key };
        let range_end = req.range_end;
        if !range_end.is_empty() && range_end != [0] && key >= range_end {
            return fail("mvcc: watcher range is empty");
        }
        let id = if req.watch_id != 0 {
            if s.ids.borrow().contains(req.watch_id) {
                return fail("mvcc: duplicate watch ID provided on the WatchStream");
            }
            req.watch_id
        } else {
            let ids = s.ids.borrow();
            let mut n = s.next_id.get();
            while ids.contains(n) {
                n += 1;
            }
            s.next_id.set(n + 1);
            n
        };
        s.push(encode(&WatchResponse {
            header: header(core, rev_now),
            watch_id: id,
            created: true,
            ..Default::default()
        }));
        let nshards = core.router.shards.len();
        let mut g = self.inner.borrow_mut();
        g.nshards = nshards;
        let gi = group_for(
            &mut g,
            core,
            WatchRange {
                key: key.into(),
                range_end: range_end.into(),
            },
            req.prev_kv,
        );
        let grp = g.groups.get(gi).expect("group just found");
        let range = grp.range.clone();
        // A watcher from now on joins its group live at once, without
        // asking the shards, when the group's registrations cover every
        // change after `rev_now` and the hub has fanned out no event after
        // it yet (so none it should get has gone by). `rev_now` must be the
        // hub's own revision: every event up to it has been through the hub.
        let live = (req.start_revision == 0 || req.start_revision == rev_now + 1)
            && hub_rev == rev_now
            && grp.confirmed as usize == shards_of(&range, nshards).len()
            && grp.reg_rev <= rev_now
            && grp.last_rev <= rev_now;
        let start = if req.start_revision != 0 {
            req.start_revision
        } else {
            rev_now + 1
        };
        let sync = if live {
            None
        } else {
            Some(Box::new(Catchup {
                epoch: g.seq(),
                shards: shards_of(&range, nshards)
                    .map(|shard| ShardSync {
                        shard: shard as u32,
                        live: false,
                        progress: start - 1,
                        inflight: true,
                    })
                    .collect(),
            }))
        };
        let epoch = sync.as_ref().map(|c| c.epoch);
        let mut flags = 0;
        if req.filters.contains(&FILTER_NOPUT) {
            flags |= F_NOPUT;
        }
        if req.filters.contains(&FILTER_NODELETE) {
            flags |= F_NODELETE;
        }
        if req.fragment {
            flags |= F_FRAGMENT;
        }
        if req.progress_notify {
            flags |= F_PROGRESS_NOTIFY;
        }
        let gpos = g.groups.get(gi).expect("group").members.len() as u32;
        let slot = g.watchers.insert(Watcher {
            id,
            sent: start - 1,
            sync,
            buf: None,
            group: gi,
            gpos,
            stream: s.id,
            prev_kv: req.prev_kv,
            flags,
        });
        g.groups.get_mut(gi).expect("group").members.push(slot);
        if let Some(epoch) = epoch {
            // Not waiting yet: its history answers wake it.
            for sh in shards_of(&range, nshards) {
                core.router.shards[sh].send(ShardMsg::WatchHistory {
                    core: core.id,
                    watcher: slot,
                    epoch,
                    range: range.clone(),
                    from: start,
                    prev_kv: req.prev_kv,
                });
            }
        }
        if req.progress_notify && !g.progress_timer {
            g.progress_timer = true;
            start_progress_timer(core);
        }
        s.ids.borrow_mut().insert(id, slot);
    }

    /// A `WatchCancelRequest`: answered only when the ID exists (etcd).
    pub fn cancel(&self, core: &Core, s: &Stream, id: i64) {
        let Some(slot) = s.ids.borrow_mut().remove(id) else {
            return;
        };
        let mut g = self.inner.borrow_mut();
        remove_watcher(&mut g, core, slot);
        s.push(encode(&WatchResponse {
            header: header(core, g.revision.max(core.view.revision.get())),
            watch_id: id,
            canceled: true,
            ..Default::default()
        }));
    }

    /// A `WatchProgressRequest`: answered (watch ID -1) once every watcher
    /// of the stream has delivered everything up to the revision it names.
    pub fn request_progress(&self, core: &Core, s: &Stream) {
        let mut g = self.inner.borrow_mut();
        if !check_progress(&g, core, s) {
            g.progress_wanted.insert(s.id);
        }
    }

    /// The node's applied index moved.
    pub fn on_applied(&self, applied: u64, revision: i64) {
        let mut g = self.inner.borrow_mut();
        g.applied = g.applied.max(applied);
        g.revision = g.revision.max(revision);
    }

    /// Streams that require a leader end once the member has had none
    /// for three election timeouts in a row (etcd's `monitorLeader`: an
    /// election does not cost every watcher its stream).
    fn start_leader_monitor(&self, core: &Core) {
        let Some(me) = core.me.upgrade() else {
            return;
        };
        let every = core.router.member.election_timeout;
        glommio::spawn_local(async move {
            let mut without = 0;
            loop {
                glommio::timer::sleep(every).await;
                without = if me.view.leader.get() == 0 {
                    without + 1
                } else {
                    0
                };
                if without >= 3 {
                    let g = me.watch.inner.borrow();
                    for (_, s) in g.streams.iter() {
                        if s.require_leader {
                            s.end(error::no_leader());
                        }
                    }
                }
            }
        })
        .detach();
    }

    /// A shard confirmed a group's registration.
    pub fn on_registered(&self, _shard: usize, group: u32, tag: u64, rev: i64) {
        let mut g = self.inner.borrow_mut();
        if let Some(grp) = g.groups.get_mut(group) {
            if grp.tag == tag {
                grp.confirmed += 1;
                grp.reg_rev = grp.reg_rev.max(rev);
            }
        }
    }

    /// Live events from a shard.
    pub fn on_events(&self, shard: usize, events: Vec<ShardEvent>) {
        let mut g = self.inner.borrow_mut();
        let Inner {
            groups,
            watchers,
            waiting,
            buffered,
            ev_bytes,
            next_seq,
            nshards,
            ..
        } = &mut *g;
        for e in events {
            let ev = Rc::new(Ev::new(e, ev_bytes));
            for (_, grp) in groups.iter_mut() {
                if !grp.range.contains(&ev.kv.key) {
                    continue;
                }
                grp.last_rev = grp.last_rev.max(ev.rev);
                for &slot in &grp.members {
                    let Some(w) = watchers.get_mut(slot) else {
                        continue;
                    };
                    // At or below `sent`: delivered already, or before a
                    // start revision still in the future (etcd skips those).
                    if !w.live_on(shard) || !w.wants(&ev) || ev.rev <= w.sent {
                        continue;
                    }
                    let b = w.buf.get_or_insert_with(Default::default);
                    b.evs.push(ev.clone());
                    b.bytes = b.bytes.saturating_add(ev.size as u32);
                    *buffered += 1;
                    waiting.insert(slot);
                    let pressed =
                        *buffered > HUB_BUFFERED_MAX || ev_bytes.get() > HUB_EVENT_BYTES_MAX;
                    if b.evs.len() > WATCHER_BUF_EVENTS_MAX
                        || b.bytes as usize > WATCHER_BUF_BYTES_MAX
                        || (pressed && b.evs.len() > WATCHER_BUF_PRESSURED)
                    {
                        crate::debug!(
                            "watcher {} of stream {} fell behind at revision {}; catching up from history",
                            w.id,
                            w.stream,
                            w.sent
                        );
                        *buffered = buffered.saturating_sub(w.buffered());
                        *next_seq += 1;
                        fall_back_to_history(w, *next_seq, &grp.range, *nshards);
                    }
                }
            }
        }
    }

    /// A shard's answer to a history request.
    pub fn on_history(&self, core: &Core, shard: usize, slot: u32, epoch: u64, h: History) {
        let mut g = self.inner.borrow_mut();
        let acct = g.ev_bytes.clone();
        let mut added = 0;
        let Some(w) = g.watchers.get_mut(slot) else {
            return;
        };
        let Some(c) = w.sync.as_mut() else {
            return;
        };
        if c.epoch != epoch {
            return;
        }
        match h {
            History::Compacted(compact) => {
                let (sid, id) = (w.stream, w.id);
                remove_watcher(&mut g, core, slot);
                if let Some(s) = g.streams.get(sid) {
                    s.ids.borrow_mut().remove(id);
                    // etcd sends this with a zero header revision.
                    s.push(encode(&WatchResponse {
                        header: header(core, 0),
                        watch_id: id,
                        canceled: true,
                        compact_revision: compact,
                        ..Default::default()
                    }));
                }
            }
            History::Events { events, more } => {
                let Some(ss) = c.shards.iter_mut().find(|s| s.shard as usize == shard) else {
                    return;
                };
                ss.inflight = false;
                let from = ss.progress;
                match more {
                    Some(r) => ss.progress = r,
                    None => ss.live = true,
                }
                if c.shards.iter().all(|s| s.live) {
                    w.sync = None;
                }
                for e in events {
                    let ev = Ev::new(e, &acct);
                    if ev.rev > from && w.wants(&ev) {
                        let b = w.buf.get_or_insert_with(Default::default);
                        b.bytes = b.bytes.saturating_add(ev.size as u32);
                        b.evs.push(Rc::new(ev));
                        added += 1;
                    }
                }
                g.buffered += added;
                g.waiting.insert(slot);
            }
        }
    }

    /// Releases what can be released, asks for more history where there is
    /// room, and answers progress requests. Run after each batch of core
    /// messages and whenever a stream's outbox drains.
    pub fn flush(&self, core: &Core) {
        let mut g = self.inner.borrow_mut();
        if !g.waiting.is_empty() {
            let ids: Vec<u32> = g.waiting.drain().collect();
            for slot in ids {
                if flush_watcher(&mut g, core, slot) {
                    g.waiting.insert(slot);
                }
            }
            // A burst (say every new watcher's history answer) leaves
            // capacity behind; give it back.
            if g.waiting.capacity() > 1024 && g.waiting.len() * 8 < g.waiting.capacity() {
                let n = g.waiting.len();
                g.waiting.shrink_to(n);
            }
        }
        if !g.progress_wanted.is_empty() {
            let ids: Vec<u32> = g.progress_wanted.drain().collect();
            for id in ids {
                let done = match g.streams.get(id) {
                    Some(s) => check_progress(&g, core, s),
                    None => true,
                };
                if !done {
                    g.progress_wanted.insert(id);
                }
            }
        }
    }

    /// A stream wrote responses out: while it has room, the watchers it
    /// held back go on, in turn (each costs O(1) when nothing is waiting).
    pub fn on_sent(&self, core: &Core, s: &Stream) {
        if s.outbox_bytes.get() >= OUTBOX_BYTES_LOW || s.blocked.borrow().is_empty() {
            return;
        }
        let mut g = self.inner.borrow_mut();
        while s.outbox_bytes.get() < OUTBOX_BYTES_LOW {
            let Some(slot) = s.blocked.borrow_mut().pop_front() else {
                break;
            };
            if let Some(w) = g.watchers.get_mut(slot) {
                w.set(F_QUEUED, false);
            }
            if flush_watcher(&mut g, core, slot) {
                g.waiting.insert(slot);
            }
        }
    }

    /// Progress notifications for watchers that asked for them and have
    /// nothing pending (etcd's `--experimental-watch-progress-notify-interval`).
    fn progress_tick(&self, core: &Core) {
        let g = self.inner.borrow();
        for (_, w) in g.watchers.iter() {
            if !w.has(F_PROGRESS_NOTIFY) || !w.synced() {
                continue;
            }
            if let Some(s) = g.streams.get(w.stream) {
                if !s.full() {
                    s.push(encode(&WatchResponse {
                        header: header(core, g.revision),
                        watch_id: w.id,
                        ..Default::default()
                    }));
                }
            }
        }
    }

    /// After a snapshot replaced the shards' data: every watcher reads
    /// history again from the last revision it delivered (a watcher whose
    /// revision was compacted away is canceled, as on etcd).
    pub fn resync_all(&self) {
        let mut g = self.inner.borrow_mut();
        let Inner {
            watchers,
            groups,
            waiting,
            buffered,
            next_seq,
            nshards,
            ..
        } = &mut *g;
        for (slot, w) in watchers.iter_mut() {
            *buffered = buffered.saturating_sub(w.buffered());
            let Some(grp) = groups.get(w.group) else {
                continue;
            };
            *next_seq += 1;
            fall_back_to_history(w, *next_seq, &grp.range, *nshards);
            waiting.insert(slot);
        }
    }

    /// Number of watchers on this core (tests, metrics).
    pub fn watcher_count(&self) -> usize {
        self.inner.borrow().watchers.len()
    }
}

fn start_progress_timer(core: &Core) {
    let interval = core.router.member.watch_progress_notify_interval;
    let Some(me) = core.me.upgrade() else {
        return;
    };
    glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(interval).await;
            me.watch.progress_tick(&me);
        }
    })
    .detach();
}

/// The group of `(range, prev_kv)`, created (and registered with the
/// shards its keys can be on) if there is none.
fn group_for(g: &mut Inner, core: &Core, range: WatchRange, prev_kv: bool) -> u32 {
    let found = g.group_of.get_key_value(&range);
    if let Some((_, ix)) = found {
        if ix[prev_kv as usize] != NO_GROUP {
            return ix[prev_kv as usize];
        }
    }
    let range = match found {
        Some((r, _)) => r.clone(),
        None => Arc::new(range),
    };
    let tag = g.seq();
    let gi = g.groups.insert(Group {
        range: range.clone(),
        prev_kv,
        members: Vec::new(),
        tag,
        confirmed: 0,
        reg_rev: 0,
        last_rev: 0,
    });
    for sh in shards_of(&range, g.nshards) {
        core.router.shards[sh].send(ShardMsg::WatchRegister {
            core: core.id,
            group: gi,
            tag,
            range: range.clone(),
            prev_kv,
        });
    }
    g.group_of.entry(range).or_insert([NO_GROUP; 2])[prev_kv as usize] = gi;
    gi
}

fn remove_watcher(g: &mut Inner, core: &Core, slot: u32) {
    let Some(w) = g.watchers.remove(slot) else {
        return;
    };
    g.buffered = g.buffered.saturating_sub(w.buffered());
    g.waiting.remove(&slot);
    if w.has(F_QUEUED) {
        if let Some(s) = g.streams.get(w.stream) {
            s.blocked.borrow_mut().retain(|x| *x != slot);
        }
    }
    let Some(grp) = g.groups.get_mut(w.group) else {
        return;
    };
    let pos = w.gpos as usize;
    grp.members.swap_remove(pos);
    if let Some(&moved) = grp.members.get(pos) {
        if let Some(m) = g.watchers.get_mut(moved) {
            m.gpos = pos as u32;
        }
    }
    let grp = g.groups.get_mut(w.group).expect("group");
    if !grp.members.is_empty() {
        let (n, cap) = (grp.members.len(), grp.members.capacity());
        if cap > 64 && n * 4 < cap {
            grp.members.shrink_to(n * 2);
        }
        return;
    }
    let grp = g.groups.remove(w.group).expect("group");
    if let Some(ix) = g.group_of.get_mut(&grp.range) {
        ix[grp.prev_kv as usize] = NO_GROUP;
        if ix == &[NO_GROUP; 2] {
            g.group_of.remove(&grp.range);
        }
    }
    for sh in shards_of(&grp.range, g.nshards) {
        core.router.shards[sh].send(ShardMsg::Unwatch {
            core: core.id,
            range: grp.range.clone(),
            prev_kv: grp.prev_kv,
        });
    }
}

/// Drops a watcher's buffer: it reads history again from the last
/// revision it delivered, once its stream has room.
fn fall_back_to_history(w: &mut Watcher, epoch: u64, range: &WatchRange, nshards: usize) {
    w.buf = None;
    w.sync = Some(Box::new(Catchup {
        epoch,
        shards: shards_of(range, nshards)
            .map(|shard| ShardSync {
                shard: shard as u32,
                live: false,
                progress: w.sent,
                inflight: false,
            })
            .collect(),
    }));
}

/// Moves a watcher's releasable events into its stream's outbox and asks
/// for more history if it may. Returns whether it still has work pending.
fn flush_watcher(g: &mut Inner, core: &Core, slot: u32) -> bool {
    let applied = g.applied as i64;
    let revision = g.revision;
    let Inner {
        watchers,
        streams,
        groups,
        buffered,
        ..
    } = g;
    let Some(w) = watchers.get_mut(slot) else {
        return false;
    };
    let Some(s) = streams.get(w.stream) else {
        return false;
    };
    if s.outbox_bytes.get() >= OUTBOX_BYTES_LOW {
        // The stream's drain wakes it (`on_sent`).
        if !w.has(F_QUEUED) {
            w.set(F_QUEUED, true);
            s.blocked.borrow_mut().push_back(slot);
        }
        return false;
    }
    let limit = match &w.sync {
        None => applied,
        Some(c) => c
            .shards
            .iter()
            .filter(|ss| !ss.live)
            .map(|ss| ss.progress)
            .fold(applied, i64::min),
    };
    if let Some(b) = w.buf.as_mut() {
        b.evs
            .sort_by(|a, b| (a.rev, a.sub, &a.kv.key).cmp(&(b.rev, b.sub, &b.kv.key)));
        let n = b.evs.partition_point(|e| e.rev <= limit);
        if n > 0 {
            let out: Vec<Rc<Ev>> = if n == b.evs.len() {
                std::mem::take(&mut b.evs)
            } else {
                b.evs.drain(..n).collect()
            };
            *buffered = buffered.saturating_sub(n);
            let freed: usize = out.iter().map(|e| e.size).sum();
            b.bytes = b.bytes.saturating_sub(freed as u32);
            if b.evs.is_empty() {
                w.buf = None;
            }
            send_events(core, s, w, &out, revision.max(out[n - 1].rev));
        }
    }
    w.sent = w.sent.max(limit);
    // More history for the shards still read back, once there is room for
    // it (the stream's drain wakes this watcher again).
    let Some(c) = w.sync.as_mut() else {
        return w.buf.is_some();
    };
    let wants_history = c.shards.iter().any(|ss| !ss.live && !ss.inflight);
    if wants_history && s.full() {
        if !w.has(F_QUEUED) {
            w.set(F_QUEUED, true);
            s.blocked.borrow_mut().push_back(slot);
        }
        return false;
    } else if wants_history {
        let Some(grp) = groups.get(w.group) else {
            return false;
        };
        for ss in c.shards.iter_mut() {
            if !ss.live && !ss.inflight {
                ss.inflight = true;
                core.router.shards[ss.shard as usize].send(ShardMsg::WatchHistory {
                    core: core.id,
                    watcher: slot,
                    epoch: c.epoch,
                    range: grp.range.clone(),
                    from: ss.progress + 1,
                    prev_kv: w.prev_kv,
                });
            }
        }
    }
    w.buf.is_some()
}

/// Builds the responses for released events: cut at revision boundaries
/// past `RESPONSE_BYTES_SOFT`, and split into fragments when the watcher
/// asked for them and a response would exceed `--max-request-bytes` plus
/// gRPC's overhead allowance (as etcd's `sendFragments`).
fn send_events(core: &Core, s: &Stream, w: &Watcher, evs: &[Rc<Ev>], rev: i64) {
    let base = WatchResponse {
        header: header(core, rev),
        watch_id: w.id,
        ..Default::default()
    };
    // etcd's watch server counts gRPC's overhead into the limit.
    let max = core.router.member.max_request_bytes + crate::config::GRPC_OVERHEAD_BYTES;
    let mut start = 0;
    while start < evs.len() {
        // Take whole revisions up to the soft size.
        let mut end = start;
        let mut bytes = 0;
        while end < evs.len() {
            let r = evs[end].rev;
            let mut e2 = end;
            let mut b2 = 0;
            while e2 < evs.len() && evs[e2].rev == r {
                b2 += evs[e2].encoded(w.prev_kv).len() + 6;
                e2 += 1;
            }
            if end > start && bytes + b2 > RESPONSE_BYTES_SOFT {
                break;
            }
            bytes += b2;
            end = e2;
        }
        let chunk = &evs[start..end];
        if w.has(F_FRAGMENT) && bytes >= max && chunk.len() > 1 {
            // etcd's sendFragments: as many events as fit, at least one.
            let mut i = 0;
            while i < chunk.len() {
                let mut j = i;
                let mut b = 0;
                while j < chunk.len() {
                    let n = chunk[j].encoded(w.prev_kv).len() + 6;
                    if j > i && b + n >= max {
                        break;
                    }
                    b += n;
                    j += 1;
                }
                let mut r = base.clone();
                r.fragment = j < chunk.len();
                s.push(with_events(&r, &chunk[i..j], w.prev_kv));
                i = j;
            }
        } else {
            s.push(with_events(&base, chunk, w.prev_kv));
        }
        start = end;
    }
}

/// A response's bytes: the fixed fields by prost, then each event's
/// pre-encoded bytes as field 11 (`events`).
fn with_events(r: &WatchResponse, evs: &[Rc<Ev>], prev: bool) -> Bytes {
    let mut b = BytesMut::with_capacity(
        r.encoded_len() + evs.iter().map(|e| e.encoded(prev).len() + 6).sum::<usize>(),
    );
    r.encode(&mut b).expect("BytesMut grows");
    for e in evs {
        let enc = e.encoded(prev);
        prost::encoding::encode_key(11, prost::encoding::WireType::LengthDelimited, &mut b);
        prost::encoding::encode_varint(enc.len() as u64, &mut b);
        b.extend_from_slice(enc);
    }
    b.freeze()
}

fn encode(r: &WatchResponse) -> Bytes {
    r.encode_to_vec().into()
}

/// Answers a progress request if every watcher of the stream is synced;
/// returns whether it did.
fn check_progress(g: &Inner, core: &Core, s: &Stream) -> bool {
    let all_synced = s
        .ids
        .borrow()
        .slots()
        .all(|slot| g.watchers.get(slot).map(|w| w.synced()).unwrap_or(true));
    if all_synced {
        s.push(encode(&WatchResponse {
            header: header(core, g.revision.max(core.view.revision.get())),
            watch_id: -1,
            ..Default::default()
        }));
    }
    all_synced
}

/// Removes a stream's watchers when its handler ends, however it ends.
struct CloseGuard<'a> {
    core: &'a Core,
    stream: Rc<Stream>,
}

impl Drop for CloseGuard<'_> {
    fn drop(&mut self) {
        self.core.watch.close_stream(self.core, &self.stream);
    }
}

/// A watch stream opened inside the server (Lock, Election); its watchers
/// go when it is dropped.
pub struct LocalWatch<'a> {
    guard: CloseGuard<'a>,
}

impl<'a> LocalWatch<'a> {
    pub fn open(core: &'a Core) -> Result<LocalWatch<'a>, Status> {
        let stream = core.watch.open_stream(core, false)?;
        Ok(LocalWatch {
            guard: CloseGuard { core, stream },
        })
    }

    pub fn watch(&self, req: WatchCreateRequest) {
        let g = &self.guard;
        g.core.watch.create(g.core, &g.stream, req);
    }

    pub async fn next(&self) -> Result<WatchResponse, Status> {
        let g = &self.guard;
        let r = g.stream.next_response().await;
        g.core.watch.on_sent(g.core, &g.stream);
        r
    }
}

/// The `Watch` stream: requests from the client, responses from the hub.
pub async fn serve(
    core: &Core,
    mut input: MsgStream,
    sink: &mut MsgSink,
    meta: Metadata,
) -> Result<(), Status> {
    let stream = core.watch.open_stream(core, meta.require_leader)?;
    let _guard = CloseGuard {
        core,
        stream: stream.clone(),
    };
    // etcd keeps sending after the client half-closes, until it goes away.
    let mut input_open = true;
    let mut batch = Vec::new();
    loop {
        loop {
            stream.pop_batch(SEND_BATCH_BYTES, &mut batch);
            if batch.is_empty() {
                break;
            }
            let sent = sink.send_all(&batch).await;
            batch.clear();
            if batch.capacity() > 64 {
                // A burst's worth of pointers: not kept for the stream's life.
                batch = Vec::new();
            }
            if sent.is_err() {
                return Ok(());
            }
            core.watch.on_sent(core, &stream);
        }
        if let Some(st) = stream.ended.borrow().clone() {
            return Err(st);
        }
        enum Next {
            Req(Option<Result<Bytes, Status>>),
            Out,
            Gone,
        }
        let next = if input_open {
            futures_lite::future::or(async { Next::Req(input.next().await) }, async {
                stream.ready().await;
                Next::Out
            })
            .await
        } else {
            futures_lite::future::or(
                async {
                    stream.ready().await;
                    Next::Out
                },
                async {
                    sink.closed().await;
                    Next::Gone
                },
            )
            .await
        };
        match next {
            Next::Out => {}
            Next::Gone => return Ok(()),
            Next::Req(None) => input_open = false,
            Next::Req(Some(Err(st))) => return Err(st),
            Next::Req(Some(Ok(msg))) => {
                handle_request(core, &stream, meta.user.as_deref(), msg)?;
                // Requests already here go before the responses are sent.
                let mut n = 1;
                while n < REQUESTS_PER_BATCH && stream.outbox_bytes.get() < OUTBOX_BYTES_LOW {
                    // `MsgStream::next` keeps its state in the stream, so
                    // dropping it when nothing is ready loses nothing.
                    match futures_lite::future::poll_once(input.next()).await {
                        None => break,
                        Some(None) => {
                            input_open = false;
                            break;
                        }
                        Some(Some(Err(st))) => return Err(st),
                        Some(Some(Ok(msg))) => {
                            handle_request(core, &stream, meta.user.as_deref(), msg)?
                        }
                    }
                    n += 1;
                }
            }
        }
    }
}

fn handle_request(
    core: &Core,
    stream: &Stream,
    user: Option<&str>,
    msg: Bytes,
) -> Result<(), Status> {
    let req = WatchRequest::decode(msg).map_err(|e| {
        Status::new(
            Code::Internal,
            format!("grpc: error unmarshalling request: {e}"),
        )
    })?;
    match req.request_union {
        Some(watch_request::RequestUnion::CreateRequest(c)) => {
            let key: &[u8] = if c.key.is_empty() { &[0] } else { &c.key };
            if let Some(reason) = super::auth::watch_refusal(core, user, key, &c.range_end) {
                // etcd: created and canceled at once, with its reason.
                stream.push(encode(&WatchResponse {
                    header: header(core, core.view.revision.get()),
                    watch_id: -1,
                    created: true,
                    canceled: true,
                    cancel_reason: reason.into(),
                    ..Default::default()
                }));
            } else {
                core.watch.create(core, stream, c)
            }
        }
        Some(watch_request::RequestUnion::CancelRequest(c)) => {
            core.watch.cancel(core, stream, c.watch_id)
        }
        Some(watch_request::RequestUnion::ProgressRequest(_)) => {
            core.watch.request_progress(core, stream)
        }
        None => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watcher_record_stays_small() {
        // The per-watcher cost at 100k watchers; grow it only on purpose.
        assert!(std::mem::size_of::<Option<Watcher>>() <= 48);
    }

    #[test]
    fn slab_reuses_slots_and_spans_chunks() {
        let mut s: Slab<u64> = Slab::default();
        let n = SLAB_CHUNK as u64 * 2 + 3;
        for i in 0..n {
            assert_eq!(s.next_slot(), i as u32);
            assert_eq!(s.insert(i * 10), i as u32);
        }
        assert_eq!(s.len(), n as usize);
        assert_eq!(
            s.get(SLAB_CHUNK as u32 + 1),
            Some(&((SLAB_CHUNK as u64 + 1) * 10))
        );
        assert_eq!(s.remove(5), Some(50));
        assert_eq!(s.remove(5), None);
        assert_eq!(s.get(5), None);
        assert_eq!(s.next_slot(), 5);
        assert_eq!(s.insert(7), 5);
        *s.get_mut(5).unwrap() += 1;
        assert_eq!(s.get(5), Some(&8));
        assert_eq!(s.iter().count(), n as usize);
        assert_eq!(s.iter_mut().map(|(i, _)| i).max(), Some(n as u32 - 1));
        for i in 0..n as u32 {
            assert!(s.remove(i).is_some());
        }
        assert_eq!(s.len(), 0);
        assert!(s.chunks.is_empty() && s.free.is_empty());
        assert_eq!(s.insert(1), 0);
    }

    #[test]
    fn ids_dense_sparse_and_holes() {
        let mut ids = Ids::default();
        // Server-picked IDs 0.. go to the array.
        for i in 0..100 {
            ids.insert(i, i as u32 + 1000);
        }
        assert!(ids.sparse.is_empty());
        assert_eq!(ids.get(42), Some(1042));
        // Chosen IDs elsewhere go to the map; one just past the array
        // extends it, and pulls in the map's next ones.
        ids.insert(-5, 1);
        ids.insert(101, 2);
        ids.insert(i64::MAX, 3);
        assert_eq!(ids.sparse.len(), 3);
        ids.insert(100, 4);
        assert_eq!(ids.dense.len(), 102);
        assert_eq!(ids.get(101), Some(2));
        assert_eq!(ids.get(-5), Some(1));
        assert_eq!(ids.get(i64::MAX), Some(3));
        assert_eq!(ids.get(102), None);
        assert_eq!(ids.slots().count(), 104);
        // Removing leaves holes, reusable; trailing holes are trimmed.
        assert_eq!(ids.remove(50), Some(1050));
        assert_eq!(ids.remove(50), None);
        assert!(!ids.contains(50));
        ids.insert(50, 9);
        assert_eq!(ids.get(50), Some(9));
        assert_eq!(ids.remove(101), Some(2));
        assert_eq!(ids.remove(100), Some(4));
        assert_eq!(ids.dense.len(), 100);
        // Mostly holes: what is left moves to the map, nothing is lost.
        for i in 1..99 {
            ids.remove(i);
        }
        assert!(ids.dense.is_empty());
        let mut left: Vec<u32> = ids.slots().collect();
        left.sort();
        assert_eq!(left, vec![1, 3, 1000, 1099]);
        assert_eq!(ids.get(0), Some(1000));
        assert_eq!(ids.get(99), Some(1099));
        // The next server-picked ID starts a new array.
        ids.insert(200, 5);
        assert_eq!((ids.base, ids.dense.len()), (200, 1));
        for id in [0, 99, 200, -5, i64::MAX] {
            assert!(ids.remove(id).is_some());
        }
        assert_eq!(ids.slots().count(), 0);
    }
}
