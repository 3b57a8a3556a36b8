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

/// Kept small: 100k watchers on one member are a design point.
struct Watcher {
    range: Arc<WatchRange>,
    stream: u64,
    /// The ID the client sees.
    id: i64,
    prev_kv: bool,
    noput: bool,
    nodelete: bool,
    fragment: bool,
    progress_notify: bool,
    shards: Box<[ShardSync]>,
    /// Bumped when the watcher drops its buffer; history answers of older
    /// epochs are ignored.
    epoch: u32,
    buf_bytes: u32,
    /// In its stream's `blocked` queue.
    queued: bool,
    buf: Vec<Rc<Ev>>,
    /// Every event at or below this revision has been delivered.
    sent: i64,
}

impl Watcher {
    fn wants(&self, ev: &Ev) -> bool {
        !(ev.delete && self.nodelete || !ev.delete && self.noput)
    }

    fn synced(&self) -> bool {
        self.buf.is_empty() && self.shards.iter().all(|s| s.live)
    }

    fn sync_mut(&mut self, shard: usize) -> Option<&mut ShardSync> {
        self.shards.iter_mut().find(|s| s.shard as usize == shard)
    }
}

/// One watch stream's side of the hub: the responses built for it, in
/// order, and its watch IDs.
pub struct Stream {
    id: u64,
    require_leader: bool,
    outbox: RefCell<VecDeque<Bytes>>,
    outbox_bytes: Cell<usize>,
    /// A flush left events behind for lack of room.
    /// Watchers waiting for room in the outbox, in the order they found it
    /// full: the stream's drain serves them round-robin.
    blocked: RefCell<VecDeque<u64>>,
    waker: Cell<Option<Waker>>,
    ended: RefCell<Option<Status>>,
    ids: RefCell<BTreeMap<i64, u64>>,
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

#[derive(Default)]
struct Inner {
    next_gid: u64,
    next_stream: u64,
    watchers: HashMap<u64, Watcher>,
    /// (key, range_end) → watchers on it: live events are matched per
    /// distinct range, not per watcher.
    groups: HashMap<Arc<WatchRange>, Vec<u64>>,
    streams: HashMap<u64, Rc<Stream>>,
    applied: u64,
    revision: i64,
    /// Watchers with buffered events, or with history to ask for; not
    /// those only waiting for a history answer (it wakes them).
    waiting: HashSet<u64>,
    /// Streams with a progress request not answered yet.
    progress_wanted: HashSet<u64>,
    /// Event pointers in all watchers' buffers.
    buffered: usize,
    /// Bytes of events alive (shared by the buffers that hold them).
    ev_bytes: Rc<Cell<usize>>,
    progress_timer: bool,
    leader_monitor: bool,
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
        g.next_stream += 1;
        let s = Rc::new(Stream {
            id: g.next_stream,
            require_leader,
            outbox: RefCell::new(VecDeque::new()),
            outbox_bytes: Cell::new(0),
            blocked: RefCell::new(VecDeque::new()),
            waker: Cell::new(None),
            ended: RefCell::new(None),
            ids: RefCell::new(BTreeMap::new()),
            next_id: Cell::new(0),
        });
        g.streams.insert(s.id, s.clone());
        if require_leader && !g.leader_monitor {
            g.leader_monitor = true;
            drop(g);
            self.start_leader_monitor(core);
        }
        Ok(s)
    }

    /// Drops a stream and all its watchers.
    pub fn close_stream(&self, core: &Core, s: &Stream) {
        let gids: Vec<u64> = s.ids.borrow_mut().values().copied().collect();
        s.ids.borrow_mut().clear();
        let mut g = self.inner.borrow_mut();
        for gid in gids {
            remove_watcher(&mut g, core, gid);
        }
        g.streams.remove(&s.id);
        g.progress_wanted.remove(&s.id);
    }

    /// A `WatchCreateRequest`, answered as etcd's `recvLoop` does.
    pub fn create(&self, core: &Core, s: &Stream, req: WatchCreateRequest) {
        let rev_now = self.inner.borrow().revision.max(core.view.revision.get());
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
            if s.ids.borrow().contains_key(&req.watch_id) {
                return fail("mvcc: duplicate watch ID provided on the WatchStream");
            }
            req.watch_id
        } else {
            let ids = s.ids.borrow();
            let mut n = s.next_id.get();
            while ids.contains_key(&n) {
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
        let start = if req.start_revision != 0 {
            req.start_revision
        } else {
            rev_now + 1
        };
        let nshards = core.router.shards.len();
        let shards: Vec<usize> = if range_end.is_empty() {
            vec![shard_of(&key, nshards)]
        } else {
            (0..nshards).collect()
        };
        let mut g = self.inner.borrow_mut();
        g.next_gid += 1;
        let gid = g.next_gid;
        let range = WatchRange {
            key: key.into(),
            range_end: range_end.into(),
        };
        let range = match g.groups.get_key_value(&range) {
            Some((r, _)) => r.clone(),
            None => Arc::new(range),
        };
        for &sh in &shards {
            core.router.shards[sh].send(ShardMsg::WatchHistory {
                core: core.id,
                watcher: gid,
                epoch: 0,
                range: range.clone(),
                from: start,
                prev_kv: req.prev_kv,
                register: true,
            });
        }
        let w = Watcher {
            stream: s.id,
            id,
            prev_kv: req.prev_kv,
            noput: req.filters.contains(&FILTER_NOPUT),
            nodelete: req.filters.contains(&FILTER_NODELETE),
            fragment: req.fragment,
            progress_notify: req.progress_notify,
            shards: shards
                .iter()
                .map(|&shard| ShardSync {
                    shard: shard as u32,
                    live: false,
                    progress: start - 1,
                    inflight: true,
                })
                .collect(),
            epoch: 0,
            buf: Vec::new(),
            buf_bytes: 0,
            queued: false,
            sent: start - 1,
            range: range.clone(),
        };
        g.groups.entry(range).or_default().push(gid);
        if w.progress_notify && !g.progress_timer {
            g.progress_timer = true;
            start_progress_timer(core);
        }
        // Not waiting yet: its history answers wake it.
        g.watchers.insert(gid, w);
        s.ids.borrow_mut().insert(id, gid);
    }

    /// A `WatchCancelRequest`: answered only when the ID exists (etcd).
    pub fn cancel(&self, core: &Core, s: &Stream, id: i64) {
        let Some(gid) = s.ids.borrow_mut().remove(&id) else {
            return;
        };
        let mut g = self.inner.borrow_mut();
        remove_watcher(&mut g, core, gid);
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
                    for s in g.streams.values() {
                        if s.require_leader {
                            s.end(error::no_leader());
                        }
                    }
                }
            }
        })
        .detach();
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
            ..
        } = &mut *g;
        for e in events {
            let ev = Rc::new(Ev::new(e, ev_bytes));
            for (r, gids) in groups.iter() {
                if !r.contains(&ev.kv.key) {
                    continue;
                }
                for gid in gids {
                    let Some(w) = watchers.get_mut(gid) else {
                        continue;
                    };
                    if !w.sync_mut(shard).map(|s| s.live).unwrap_or(false) || !w.wants(&ev) {
                        continue;
                    }
                    w.buf.push(ev.clone());
                    *buffered += 1;
                    w.buf_bytes = w.buf_bytes.saturating_add(ev.size as u32);
                    waiting.insert(*gid);
                    let pressed =
                        *buffered > HUB_BUFFERED_MAX || ev_bytes.get() > HUB_EVENT_BYTES_MAX;
                    if w.buf.len() > WATCHER_BUF_EVENTS_MAX
                        || w.buf_bytes as usize > WATCHER_BUF_BYTES_MAX
                        || (pressed && w.buf.len() > WATCHER_BUF_PRESSURED)
                    {
                        crate::debug!(
                            "watcher {} of stream {} fell behind at revision {}; catching up from history",
                            w.id,
                            w.stream,
                            w.sent
                        );
                        *buffered = buffered.saturating_sub(w.buf.len());
                        fall_back_to_history(w);
                    }
                }
            }
        }
    }

    /// A shard's answer to a history request.
    pub fn on_history(&self, core: &Core, shard: usize, gid: u64, epoch: u32, h: History) {
        let mut g = self.inner.borrow_mut();
        let acct = g.ev_bytes.clone();
        let mut added = 0;
        let Some(w) = g.watchers.get_mut(&gid) else {
            return;
        };
        if w.epoch != epoch {
            return;
        }
        match h {
            History::Compacted(compact) => {
                let (sid, id) = (w.stream, w.id);
                remove_watcher(&mut g, core, gid);
                if let Some(s) = g.streams.get(&sid) {
                    s.ids.borrow_mut().remove(&id);
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
                let Some(ss) = w.sync_mut(shard) else {
                    return;
                };
                ss.inflight = false;
                let from = ss.progress;
                match more {
                    Some(r) => ss.progress = r,
                    None => ss.live = true,
                }
                for e in events {
                    let ev = Ev::new(e, &acct);
                    if ev.rev > from && w.wants(&ev) {
                        w.buf_bytes = w.buf_bytes.saturating_add(ev.size as u32);
                        w.buf.push(Rc::new(ev));
                        added += 1;
                    }
                }
                g.buffered += added;
                g.waiting.insert(gid);
            }
        }
    }

    /// Releases what can be released, asks for more history where there is
    /// room, and answers progress requests. Run after each batch of core
    /// messages and whenever a stream's outbox drains.
    pub fn flush(&self, core: &Core) {
        let mut g = self.inner.borrow_mut();
        let ids: Vec<u64> = g.waiting.drain().collect();
        for gid in ids {
            if flush_watcher(&mut g, core, gid) {
                g.waiting.insert(gid);
            }
        }
        if !g.progress_wanted.is_empty() {
            let ids: Vec<u64> = g.progress_wanted.drain().collect();
            for id in ids {
                let done = match g.streams.get(&id) {
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
            let Some(gid) = s.blocked.borrow_mut().pop_front() else {
                break;
            };
            if let Some(w) = g.watchers.get_mut(&gid) {
                w.queued = false;
            }
            if flush_watcher(&mut g, core, gid) {
                g.waiting.insert(gid);
            }
        }
    }

    /// Progress notifications for watchers that asked for them and have
    /// nothing pending (etcd's `--experimental-watch-progress-notify-interval`).
    fn progress_tick(&self, core: &Core) {
        let g = self.inner.borrow();
        for w in g.watchers.values() {
            if !w.progress_notify || !w.synced() {
                continue;
            }
            if let Some(s) = g.streams.get(&w.stream) {
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
            waiting,
            buffered,
            ..
        } = &mut *g;
        for (gid, w) in watchers.iter_mut() {
            *buffered = buffered.saturating_sub(w.buf.len());
            fall_back_to_history(w);
            waiting.insert(*gid);
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

fn remove_watcher(g: &mut Inner, core: &Core, gid: u64) {
    let Some(w) = g.watchers.remove(&gid) else {
        return;
    };
    g.buffered = g.buffered.saturating_sub(w.buf.len());
    g.waiting.remove(&gid);
    if let Some(v) = g.groups.get_mut(&w.range) {
        v.retain(|x| *x != gid);
        if v.is_empty() {
            g.groups.remove(&w.range);
        }
    }
    for ss in &w.shards {
        core.router.shards[ss.shard as usize].send(ShardMsg::Unwatch {
            core: core.id,
            range: w.range.clone(),
            prev_kv: w.prev_kv,
        });
    }
}

/// Drops a watcher's buffer: it reads history again from the last
/// revision it delivered, once its stream has room.
fn fall_back_to_history(w: &mut Watcher) {
    w.buf = Vec::new();
    w.buf_bytes = 0;
    w.epoch = w.epoch.wrapping_add(1);
    for s in w.shards.iter_mut() {
        *s = ShardSync {
            shard: s.shard,
            live: false,
            progress: w.sent,
            inflight: false,
        };
    }
}

/// Moves a watcher's releasable events into its stream's outbox and asks
/// for more history if it may. Returns whether it still has work pending.
fn flush_watcher(g: &mut Inner, core: &Core, gid: u64) -> bool {
    let applied = g.applied as i64;
    let revision = g.revision;
    let Some(w) = g.watchers.get_mut(&gid) else {
        return false;
    };
    let Some(s) = g.streams.get(&w.stream) else {
        return false;
    };
    let buffered = &mut g.buffered;
    if s.outbox_bytes.get() >= OUTBOX_BYTES_LOW {
        // The stream's drain wakes it (`on_sent`).
        if !w.queued {
            w.queued = true;
            s.blocked.borrow_mut().push_back(gid);
        }
        return false;
    }
    let limit = w
        .shards
        .iter()
        .filter(|ss| !ss.live)
        .map(|ss| ss.progress)
        .fold(applied, i64::min);
    if !w.buf.is_empty() {
        w.buf
            .sort_by(|a, b| (a.rev, a.sub, &a.kv.key).cmp(&(b.rev, b.sub, &b.kv.key)));
        let n = w.buf.partition_point(|e| e.rev <= limit);
        if n > 0 {
            let out: Vec<Rc<Ev>> = w.buf.drain(..n).collect();
            *buffered = buffered.saturating_sub(n);
            let freed: usize = out.iter().map(|e| e.size).sum();
            w.buf_bytes = w.buf_bytes.saturating_sub(freed as u32);
            send_events(core, s, w, &out, revision.max(out[n - 1].rev));
        }
    }
    w.sent = w.sent.max(limit);
    // More history for the shards still read back, once there is room for
    // it (the stream's drain wakes this watcher again).
    let wants_history = w.shards.iter().any(|ss| !ss.live && !ss.inflight);
    if wants_history && s.full() {
        if !w.queued {
            w.queued = true;
            s.blocked.borrow_mut().push_back(gid);
        }
        return false;
    } else if wants_history {
        for ss in w.shards.iter_mut() {
            if !ss.live && !ss.inflight {
                ss.inflight = true;
                core.router.shards[ss.shard as usize].send(ShardMsg::WatchHistory {
                    core: core.id,
                    watcher: gid,
                    epoch: w.epoch,
                    range: w.range.clone(),
                    from: ss.progress + 1,
                    prev_kv: w.prev_kv,
                    register: false,
                });
            }
        }
    }
    !w.buf.is_empty()
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
        if w.fragment && bytes >= max && chunk.len() > 1 {
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
        .values()
        .all(|gid| g.watchers.get(gid).map(|w| w.synced()).unwrap_or(true));
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
    loop {
        while let Some(b) = stream.pop() {
            if sink.send(&b).await.is_err() {
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
                let req = WatchRequest::decode(msg).map_err(|e| {
                    Status::new(
                        Code::Internal,
                        format!("grpc: error unmarshalling request: {e}"),
                    )
                })?;
                match req.request_union {
                    Some(watch_request::RequestUnion::CreateRequest(c)) => {
                        core.watch.create(core, &stream, c)
                    }
                    Some(watch_request::RequestUnion::CancelRequest(c)) => {
                        core.watch.cancel(core, &stream, c.watch_id)
                    }
                    Some(watch_request::RequestUnion::ProgressRequest(_)) => {
                        core.watch.request_progress(core, &stream)
                    }
                    None => {}
                }
            }
        }
    }
}
