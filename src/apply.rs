//! The apply path: committed Raft entries become changes in the shards.
//!
//! The applier (a task on the raft core) takes committed entries in log
//! order. An entry whose keys all live on one shard goes to that shard's
//! queue whole, and the shard runs the Txn engine locally; the applier does
//! not wait. An entry that spans shards (ranges, multi-key txns on several
//! shards, compaction) is run by the applier itself, step by step, with
//! every shard taking part; later entries wait behind it, so each shard
//! still sees operations in log order.
//!
//! Shards report results back in order; the applier completes entries in
//! log order, which gives the node its applied index and its current
//! revision (the index of the newest entry that changed something), answers
//! the waiting client, and releases linearizable reads.
//!
//! Every `checkpoint_every` entries the applier puts a checkpoint marker at
//! the same log position in every shard's queue, so all shards checkpoint
//! the same index and recovery replays the same suffix on every shard.
//!
//! *Architecture invariant:* shards are touched only by their own task;
//! the applier and shards talk only through mailboxes.

use crate::error::{self, Status};
use crate::kv::{self, Access, CmpPartial, OpPartial, RangePartial};
use crate::lease::{self, Lessor};
use crate::mailbox::Receiver;
use crate::proto::etcdserverpb::{
    Compare, LeaseCheckpoint, LeaseCheckpointRequest, LeaseRevokeRequest, RangeRequest, RequestOp,
    ResponseOp, TxnRequest, TxnResponse,
};
use crate::proto::keelson::{raft_command, RaftCommand};
use crate::server::Router;
use crate::store::shard::Shard;
use crate::store::shard_of;
use futures::channel::oneshot;
use std::collections::VecDeque;
use std::sync::Arc;

/// The outcome of a write, as the client will see it.
#[derive(Debug, Default)]
pub struct WriteResult {
    pub txn: TxnResponse,
    /// Header revision: the store's revision once this entry is applied.
    pub revision: i64,
    /// The ID of a lease this entry granted.
    pub lease_id: i64,
    /// The TTL a keep-alive entry renewed its lease to (0: no such lease).
    pub lease_ttl: i64,
}

/// Where the answer to a write goes.
pub enum Reply {
    /// A oneshot channel (the raft core's own proposals, lease expiry,
    /// the member's published attributes, tests).
    Chan(oneshot::Sender<Result<WriteResult, Status>>),
    /// A slot in core `core`'s table of client writes (`server::writes`):
    /// the applier answers it in the next `CoreMsg::Applied` it sends that
    /// core, with every other write of the batch.
    Core {
        core: usize,
        slot: crate::server::writes::WriteSlot,
    },
}

/// A write's answer bound for a core: (core, slot, result).
pub type CoreAnswer = (
    usize,
    crate::server::writes::WriteSlot,
    Result<WriteResult, Status>,
);

impl Reply {
    /// Answers a channel at once; an answer bound for a core is returned
    /// for the caller to deliver.
    pub fn answer(self, res: Result<WriteResult, Status>) -> Option<CoreAnswer> {
        match self {
            Reply::Chan(tx) => {
                let _ = tx.send(res);
                None
            }
            Reply::Core { core, slot } => Some((core, slot, res)),
        }
    }

    /// Answers now, a core by a message of its own (the raft core's
    /// refusals; the applier batches its answers instead).
    pub fn send(self, res: Result<WriteResult, Status>, router: &Router) {
        if let Some((core, slot, res)) = self.answer(res) {
            if let Some(c) = router.cores.get(core) {
                c.send(crate::server::CoreMsg::Written(vec![(slot, res)]));
            }
        }
    }

    /// Whether nobody waits for the answer any more (known for channels
    /// only: a core gives up its slots by itself).
    pub fn is_canceled(&self) -> bool {
        match self {
            Reply::Chan(tx) => tx.is_canceled(),
            Reply::Core { .. } => false,
        }
    }
}

impl From<oneshot::Sender<Result<WriteResult, Status>>> for Reply {
    fn from(tx: oneshot::Sender<Result<WriteResult, Status>>) -> Reply {
        Reply::Chan(tx)
    }
}
pub type ReadReply = oneshot::Sender<Result<i64, Status>>;

pub enum ShardMsg {
    /// A whole single-shard entry.
    Txn {
        index: u64,
        txn: Box<TxnRequest>,
    },
    Compares {
        cmps: Arc<Vec<Compare>>,
        reply: oneshot::Sender<Vec<CmpPartial>>,
    },
    Ops {
        index: u64,
        /// Position of `ops[0]` among the ops the entry has run so far.
        op_base: u32,
        ops: Arc<Vec<RequestOp>>,
        reply: oneshot::Sender<(Vec<OpPartial>, bool)>,
    },
    /// The end of a multi-shard entry.
    Applied {
        index: u64,
    },
    Compact {
        rev: i64,
        reply: oneshot::Sender<()>,
    },
    /// Rewrite the shard's live versions into new segments (Maintenance
    /// Defragment); replies when done.
    Defrag {
        reply: oneshot::Sender<()>,
    },
    Checkpoint {
        index: u64,
    },
    Read {
        rev: i64,
        req: Arc<RangeRequest>,
        reply: oneshot::Sender<Result<RangePartial, Status>>,
    },
    Stats {
        reply: oneshot::Sender<ShardStats>,
    },
    /// A lease was granted (every shard keeps the table).
    LeaseGrant {
        index: u64,
        id: i64,
        ttl: i64,
    },
    /// A lease was revoked: delete its keys at revision `index`. Replies
    /// with the number of keys deleted.
    LeaseRevoke {
        index: u64,
        id: i64,
        reply: oneshot::Sender<usize>,
    },
    /// This shard's keys attached to a lease.
    LeaseKeys {
        id: i64,
        reply: oneshot::Sender<Vec<Vec<u8>>>,
    },
    /// One of `core`'s watch groups starts hearing about a key range:
    /// from now on this shard sends that core every change in it as it
    /// applies it (counted: once per group; undone by `Unwatch`). Answered with
    /// `CoreMsg::WatchRegistered`, carrying the shard's last revision: every
    /// change after it reaches the core live.
    WatchRegister {
        core: usize,
        group: u32,
        tag: u64,
        range: Arc<crate::watch::WatchRange>,
        prev_kv: bool,
    },
    /// A watcher on `core` wants the changes in a range from `from` on
    /// (its group's registration was sent before). Answered with a
    /// `CoreMsg::WatchHistory` on the core's mailbox, after the live events
    /// sent before it.
    WatchHistory {
        core: usize,
        watcher: u32,
        epoch: u64,
        range: Arc<crate::watch::WatchRange>,
        from: i64,
        prev_kv: bool,
    },
    Unwatch {
        core: usize,
        range: Arc<crate::watch::WatchRange>,
        prev_kv: bool,
    },
    /// Every version this shard holds, as snapshot records.
    Dump {
        reply: oneshot::Sender<Vec<u8>>,
    },
    /// Replace this shard's data with a snapshot's (its keys only).
    Restore {
        records: Vec<(Vec<u8>, crate::store::index::Version)>,
        index: u64,
        compact_rev: i64,
        leases: std::collections::BTreeMap<i64, i64>,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ShardStats {
    pub keys: usize,
    /// Keys live now (not deleted).
    pub live_keys: usize,
    pub bytes: u64,
    /// What the versions still held take (dbSizeInUse).
    pub in_use: u64,
}

pub struct ShardDone {
    pub index: u64,
    pub result: Result<TxnResponse, Status>,
    pub changed: bool,
}

pub struct Committed {
    pub index: u64,
    pub cmd: Option<RaftCommand>,
    pub reply: Option<Reply>,
}

pub enum ApplierMsg {
    Committed(Vec<Committed>),
    /// Linearizable reads waiting for the applied index to reach `index`.
    Reads {
        index: u64,
        replies: Vec<ReadReply>,
    },
    /// A shard's finished entries, and the bytes its segment files take
    /// now (sent also when only that changed).
    Done {
        shard: usize,
        bytes: u64,
        done: Vec<ShardDone>,
    },
    /// The node lost leadership or is stopping: fail what waits.
    FailReads(Status),
    /// A lease keep-alive on the leader: replies with the TTL, 0 if there
    /// is no lease, or the error of the checkpoint clearing it first.
    KeepAlive {
        id: i64,
        reply: oneshot::Sender<Result<i64, Status>>,
    },
    /// (granted TTL, remaining seconds) of a lease, if it exists.
    LeaseTimeToLive {
        id: i64,
        reply: oneshot::Sender<Option<(i64, i64)>>,
    },
    LeaseList {
        reply: oneshot::Sender<Vec<i64>>,
    },
    /// Time to look for expired leases.
    LeaseTick,
    /// This member became the leader (or stopped being it).
    Role {
        leader: bool,
    },
    /// Build a snapshot body at the last dispatched entry: (index, body).
    SnapshotBuild {
        reply: oneshot::Sender<(u64, Vec<u8>)>,
    },
    /// Replace all data with a snapshot body (a follower behind the log).
    InstallSnapshot {
        body: Vec<u8>,
        reply: oneshot::Sender<Result<u64, String>>,
    },
}

// ------------------------------------------------------------------ shards

struct LocalAccess<'a> {
    shard: &'a mut Shard,
    rev: i64,
    changed: bool,
    ops_run: u32,
}

impl Access for LocalAccess<'_> {
    async fn compares(&mut self, cs: &[Compare]) -> Vec<bool> {
        cs.iter()
            .map(|c| kv::combine_compare(c, &[self.shard.compare(c)]))
            .collect()
    }
    async fn ops(&mut self, ops: &[RequestOp]) -> Vec<ResponseOp> {
        let (parts, changed) = self.shard.apply_ops(ops, self.rev, self.ops_run);
        self.ops_run += ops.len() as u32;
        self.changed |= changed;
        ops.iter()
            .zip(parts)
            .map(|(op, p)| kv::merge_op(op, std::iter::once(p), self.rev))
            .collect()
    }
    fn rev(&self) -> i64 {
        self.rev
    }
    fn compact_rev(&self) -> i64 {
        self.shard.compact_rev
    }
    fn lease_exists(&self, id: i64) -> bool {
        self.shard.lease_exists(id)
    }
}

/// The task that owns one shard. Runs until its mailbox closes.
pub async fn run_shard(mut shard: Shard, rx: Receiver<ShardMsg>, router: Arc<Router>) {
    let mut msgs = Vec::with_capacity(256);
    let mut done = Vec::new();
    // The segment bytes the applier was last told (it sums the shards'
    // for the quota check every core makes).
    let mut told = shard.disk_bytes();
    router.applier.send(ApplierMsg::Done {
        shard: shard.id,
        bytes: told,
        done: Vec::new(),
    });
    while rx.recv_batch(&mut msgs, 256).await {
        for m in msgs.drain(..) {
            match m {
                ShardMsg::Txn { index, txn } => {
                    if index <= shard.applied {
                        // Replayed after a restart, already in the segments.
                        done.push(ShardDone {
                            index,
                            result: Ok(TxnResponse::default()),
                            changed: false,
                        });
                        continue;
                    }
                    let rev = index as i64;
                    let mut la = LocalAccess {
                        shard: &mut shard,
                        rev,
                        changed: false,
                        ops_run: 0,
                    };
                    let result = kv::run_txn(&mut la, &txn).await;
                    let changed = la.changed;
                    shard.applied = index;
                    done.push(ShardDone {
                        index,
                        result,
                        changed,
                    });
                }
                ShardMsg::Compares { cmps, reply } => {
                    let _ = reply.send(cmps.iter().map(|c| shard.compare(c)).collect());
                }
                ShardMsg::Ops {
                    index,
                    op_base,
                    ops,
                    reply,
                } => {
                    let res = shard.apply_ops(&ops, index as i64, op_base);
                    send_watch_events(&mut shard, &router);
                    let _ = reply.send(res);
                }
                ShardMsg::Applied { index } => shard.applied = shard.applied.max(index),
                ShardMsg::Compact { rev, reply } => {
                    let worth_defrag = shard.compact(rev);
                    let _ = reply.send(());
                    if worth_defrag {
                        defrag(&mut shard);
                    }
                }
                ShardMsg::Defrag { reply } => {
                    defrag(&mut shard);
                    let _ = reply.send(());
                }
                ShardMsg::Checkpoint { index } => {
                    if let Err(e) = shard.checkpoint(index) {
                        // The segment cannot be made durable: the WAL still
                        // holds everything, so stop rather than go on.
                        crate::error!("shard {}: {e}; stopping", shard.id);
                        std::process::exit(1);
                    }
                    router.raft.send(crate::raftcore::RaftMsg::Checkpointed {
                        shard: shard.id,
                        index,
                    });
                }
                ShardMsg::Read { rev, req, reply } => {
                    let _ = reply.send(shard.range(&req, rev));
                }
                ShardMsg::Stats { reply } => {
                    let _ = reply.send(ShardStats {
                        keys: shard.key_count(),
                        live_keys: shard.live_keys(),
                        bytes: shard.disk_bytes(),
                        in_use: shard.in_use_bytes(),
                    });
                }
                ShardMsg::LeaseGrant { index, id, ttl } => {
                    if index > shard.applied {
                        shard.lease_grant(id, ttl);
                        shard.applied = index;
                    }
                }
                ShardMsg::LeaseRevoke { index, id, reply } => {
                    let n = if index > shard.applied {
                        shard.applied = index;
                        shard.lease_revoke(id, index as i64)
                    } else {
                        0
                    };
                    send_watch_events(&mut shard, &router);
                    let _ = reply.send(n);
                }
                ShardMsg::LeaseKeys { id, reply } => {
                    let _ = reply.send(shard.lease_keys(id));
                }
                ShardMsg::WatchRegister {
                    core,
                    group,
                    tag,
                    range,
                    prev_kv,
                } => {
                    send_watch_events(&mut shard, &router);
                    shard.watch_register(core, &range, prev_kv);
                    if let Some(c) = router.cores.get(core) {
                        c.send(crate::server::CoreMsg::WatchRegistered {
                            shard: shard.id,
                            group,
                            tag,
                            rev: shard.last_rev.max(shard.applied as i64),
                        });
                    }
                }
                ShardMsg::WatchHistory {
                    core,
                    watcher,
                    epoch,
                    range,
                    from,
                    prev_kv,
                } => {
                    // Live events already produced go first (ordering
                    // contract), then the history that covers them.
                    send_watch_events(&mut shard, &router);
                    let history = shard.watch_history(&range, from, prev_kv);
                    if let Some(c) = router.cores.get(core) {
                        c.send(crate::server::CoreMsg::WatchHistory {
                            shard: shard.id,
                            watcher,
                            epoch,
                            history,
                        });
                    }
                }
                ShardMsg::Unwatch {
                    core,
                    range,
                    prev_kv,
                } => shard.watch_unregister(core, &range, prev_kv),
                ShardMsg::Dump { reply } => {
                    let mut out = Vec::new();
                    shard.dump(&mut out);
                    let _ = reply.send(out);
                }
                ShardMsg::Restore {
                    records,
                    index,
                    compact_rev,
                    leases,
                    reply,
                } => {
                    let _ = reply.send(shard.restore(records, index, compact_rev, leases));
                }
            }
            send_watch_events(&mut shard, &router);
        }
        if let Err(e) = shard.flush_if_full() {
            crate::error!("shard {}: {e}; stopping", shard.id);
            std::process::exit(1);
        }
        let bytes = shard.disk_bytes();
        if !done.is_empty() || bytes != told {
            told = bytes;
            router.applier.send(ApplierMsg::Done {
                shard: shard.id,
                bytes,
                done: std::mem::take(&mut done),
            });
        }
    }
}

/// Rewrites the shard's segments (`Shard::defrag`). A failure leaves the
/// index pointing partly into segments that were not fully written: stop,
/// and let recovery read the old segments and replay the WAL.
fn defrag(shard: &mut Shard) {
    let t = std::time::Instant::now();
    let before = shard.disk_bytes();
    if let Err(e) = shard.defrag() {
        crate::error!("shard {}: {e}; stopping", shard.id);
        std::process::exit(1);
    }
    crate::info!(
        "shard {}: defragmented {} -> {} bytes in {:?}",
        shard.id,
        before,
        shard.disk_bytes(),
        t.elapsed()
    );
}

/// Sends the shard's pending watch events to the cores that watch them.
fn send_watch_events(shard: &mut Shard, router: &Router) {
    if shard.watch_out.is_empty() {
        return;
    }
    for (core, events) in shard.watch_out.take() {
        if let Some(c) = router.cores.get(core) {
            c.send(crate::server::CoreMsg::WatchEvents {
                shard: shard.id,
                events,
            });
        }
    }
}

// ----------------------------------------------------------------- applier

struct RemoteAccess<'a> {
    router: &'a Router,
    lessor: &'a Lessor,
    index: u64,
    compact_rev: i64,
    changed: bool,
    ops_run: u32,
}

impl Access for RemoteAccess<'_> {
    async fn compares(&mut self, cs: &[Compare]) -> Vec<bool> {
        let cmps = Arc::new(cs.to_vec());
        let mut waits = Vec::new();
        for s in &self.router.shards {
            let (tx, rx) = oneshot::channel();
            s.send(ShardMsg::Compares {
                cmps: cmps.clone(),
                reply: tx,
            });
            waits.push(rx);
        }
        let mut per_shard = Vec::new();
        for w in waits {
            per_shard.push(w.await.unwrap_or_default());
        }
        cs.iter()
            .enumerate()
            .map(|(i, c)| {
                let parts: Vec<CmpPartial> =
                    per_shard.iter().filter_map(|p| p.get(i).copied()).collect();
                kv::combine_compare(c, &parts)
            })
            .collect()
    }
    async fn ops(&mut self, ops: &[RequestOp]) -> Vec<ResponseOp> {
        let shared = Arc::new(ops.to_vec());
        let mut waits = Vec::new();
        for s in &self.router.shards {
            let (tx, rx) = oneshot::channel();
            s.send(ShardMsg::Ops {
                index: self.index,
                op_base: self.ops_run,
                ops: shared.clone(),
                reply: tx,
            });
            waits.push(rx);
        }
        self.ops_run += ops.len() as u32;
        let mut per_op: Vec<Vec<OpPartial>> = (0..ops.len()).map(|_| Vec::new()).collect();
        for w in waits {
            if let Ok((parts, changed)) = w.await {
                self.changed |= changed;
                for (i, p) in parts.into_iter().enumerate() {
                    if let Some(v) = per_op.get_mut(i) {
                        v.push(p);
                    }
                }
            }
        }
        ops.iter()
            .zip(per_op)
            .map(|(op, parts)| kv::merge_op(op, parts, self.index as i64))
            .collect()
    }
    fn rev(&self) -> i64 {
        self.index as i64
    }
    fn compact_rev(&self) -> i64 {
        self.compact_rev
    }
    fn lease_exists(&self, id: i64) -> bool {
        self.lessor.exists(id)
    }
}

struct Pending {
    index: u64,
    done: bool,
    result: Option<Result<TxnResponse, Status>>,
    changed: bool,
    reply: Option<Reply>,
    lease_id: i64,
    lease_ttl: i64,
}

pub struct ApplierState {
    pub applied: u64,
    pub current_rev: i64,
    pub compact_rev: i64,
    pub checkpoint_every: u64,
    /// Leases at `applied` (ID → TTL), from the shards' checkpoint.
    pub leases: std::collections::BTreeMap<i64, i64>,
}

pub struct Applier {
    router: Arc<Router>,
    st: ApplierState,
    pending: VecDeque<Pending>,
    reads: Vec<(u64, ReadReply)>,
    last_checkpoint: u64,
    /// Committed entries not dispatched yet, in log order.
    backlog: VecDeque<Committed>,
    lessor: Lessor,
    /// Only the leader proposes lease revokes.
    is_leader: bool,
    /// The last entry handed to the shards.
    dispatched: u64,
    /// Per core, the answers to its clients' writes completed since the
    /// last `publish`.
    written: Vec<
        Vec<(
            crate::server::writes::WriteSlot,
            Result<WriteResult, Status>,
        )>,
    >,
    /// The highest index handed over by the raft core (its commit index
    /// as the cores see it).
    committed: u64,
    /// Each shard's segment bytes, as it last told; their sum is the
    /// member's database size, which every core checks the quota against.
    shard_bytes: Vec<u64>,
    /// The sum the cores were last told.
    db_bytes: u64,
}

impl Applier {
    pub fn new(router: Arc<Router>, st: ApplierState) -> Applier {
        let last = st.applied;
        let lessor = Lessor::new(&st.leases, router.member.lease_checkpoint);
        let shards = router.shards.len();
        Applier {
            router,
            st,
            pending: VecDeque::new(),
            reads: Vec::new(),
            last_checkpoint: last,
            backlog: VecDeque::new(),
            lessor,
            is_leader: false,
            dispatched: last,
            written: Vec::new(),
            committed: last,
            shard_bytes: vec![0; shards],
            db_bytes: 0,
        }
    }

    pub async fn run(mut self, rx: Receiver<ApplierMsg>) {
        self.publish();
        {
            let tx = self.router.applier.clone();
            glommio::spawn_local(async move {
                loop {
                    glommio::timer::sleep(lease::EXPIRY_CHECK).await;
                    if !tx.send(ApplierMsg::LeaseTick) {
                        return;
                    }
                }
            })
            .detach();
        }
        let mut msgs = Vec::with_capacity(64);
        while rx.recv_batch(&mut msgs, 64).await {
            for m in std::mem::take(&mut msgs) {
                match m {
                    ApplierMsg::Committed(entries) => {
                        if let Some(c) = entries.last() {
                            self.committed = self.committed.max(c.index);
                        }
                        self.backlog.extend(entries);
                        while let Some(c) = self.backlog.pop_front() {
                            self.dispatch(c, &rx).await;
                        }
                    }
                    ApplierMsg::Done { shard, bytes, done } => self.complete(shard, bytes, done),
                    ApplierMsg::Reads { index, replies } => {
                        self.reads.extend(replies.into_iter().map(|r| (index, r)));
                    }
                    ApplierMsg::FailReads(st) => {
                        for (_, r) in self.reads.drain(..) {
                            let _ = r.send(Err(st.clone()));
                        }
                    }
                    ApplierMsg::SnapshotBuild { reply } => self.build_snapshot(reply),
                    ApplierMsg::InstallSnapshot { body, reply } => {
                        let r = self.install_snapshot(body, &rx).await;
                        let _ = reply.send(r);
                    }
                    other => self.lease_msg(other),
                }
            }
            self.advance();
        }
    }

    /// Lease queries and expiry; answered from the lessor, no log write.
    fn lease_msg(&mut self, m: ApplierMsg) {
        match m {
            ApplierMsg::KeepAlive { id, reply } => {
                if self.is_leader && self.lessor.checkpointed(id) {
                    self.clear_checkpoint_then_renew(id, reply);
                } else {
                    let _ = reply.send(Ok(self.lessor.renew(id)));
                }
            }
            ApplierMsg::LeaseTimeToLive { id, reply } => {
                let _ = reply.send(self.lessor.time_to_live(id));
            }
            ApplierMsg::LeaseList { reply } => {
                let _ = reply.send(self.lessor.ids());
            }
            ApplierMsg::Role { leader } => {
                if leader && !self.is_leader {
                    self.lessor.promote();
                } else if !leader && self.is_leader {
                    self.lessor.demote();
                }
                self.is_leader = leader;
            }
            ApplierMsg::LeaseTick => {
                // Only the leader's lessor decides expiry and checkpoints.
                if !self.is_leader {
                    return;
                }
                self.propose_checkpoints();
                let per_tick =
                    lease::REVOKES_PER_SEC * lease::EXPIRY_CHECK.as_millis() as usize / 1000;
                let retry = self.router.member.request_timeout;
                for id in self.lessor.expired(per_tick.max(1), retry) {
                    crate::debug!("lease {id:x} expired; proposing its revoke");
                    // Nobody waits for the answer: if the revoke is lost it
                    // is proposed again after `retry`.
                    let (tx, _rx) = oneshot::channel();
                    self.propose(
                        raft_command::Cmd::LeaseRevoke(LeaseRevokeRequest { id }),
                        tx,
                    );
                }
            }
            _ => {}
        }
    }

    /// Proposes an entry of the lessor's own (a revoke, a checkpoint);
    /// `reply` hears when it has applied, or why not.
    fn propose(&self, cmd: raft_command::Cmd, reply: oneshot::Sender<Result<WriteResult, Status>>) {
        let cmd = RaftCommand { cmd: Some(cmd) };
        self.router.raft.send(crate::raftcore::RaftMsg::Propose {
            data: prost::Message::encode_to_vec(&cmd),
            reply: reply.into(),
        });
    }

    /// Proposes the lease checkpoints due (etcd: at most 1000 per entry;
    /// nobody waits for them: a lost one is taken again at the next
    /// interval).
    fn propose_checkpoints(&mut self) {
        loop {
            let due = self.lessor.due_checkpoints(lease::CHECKPOINTS_PER_ENTRY);
            if due.is_empty() {
                return;
            }
            let more = due.len() == lease::CHECKPOINTS_PER_ENTRY;
            crate::debug!("checkpointing {} leases", due.len());
            let checkpoints = due
                .into_iter()
                .map(|(id, remaining_ttl)| LeaseCheckpoint { id, remaining_ttl })
                .collect();
            let (tx, _rx) = oneshot::channel();
            self.propose(
                raft_command::Cmd::LeaseCheckpoint(LeaseCheckpointRequest { checkpoints }),
                tx,
            );
            if !more {
                return;
            }
        }
    }

    /// A keep-alive on the leader for a lease with a checkpointed remaining
    /// TTL: first clears it on every member with a checkpoint of 0 through
    /// the log, then renews (etcd's `Renew`), so no member keeps a
    /// remaining TTL shorter than what the client was told.
    fn clear_checkpoint_then_renew(&self, id: i64, reply: oneshot::Sender<Result<i64, Status>>) {
        let (tx, rx) = oneshot::channel();
        let checkpoints = vec![LeaseCheckpoint {
            id,
            remaining_ttl: 0,
        }];
        self.propose(
            raft_command::Cmd::LeaseCheckpoint(LeaseCheckpointRequest { checkpoints }),
            tx,
        );
        let applier = self.router.applier.clone();
        glommio::spawn_local(async move {
            match rx.await {
                // Applied: the lessor has no remaining TTL for it now.
                Ok(Ok(_)) => {
                    applier.send(ApplierMsg::KeepAlive { id, reply });
                }
                Ok(Err(st)) => {
                    let _ = reply.send(Err(st));
                }
                Err(_) => {
                    let _ = reply.send(Err(error::stopped()));
                }
            }
        })
        .detach();
    }

    fn single_shard(&self, txn: &TxnRequest) -> Option<usize> {
        let n = self.router.shards.len();
        if n == 1 {
            return Some(0);
        }
        let mut keys = Vec::new();
        kv::txn_keys(txn, &mut keys);
        let mut shard = None;
        for k in keys {
            let s = shard_of(k?, n);
            match shard {
                None => shard = Some(s),
                Some(x) if x != s => return None,
                _ => {}
            }
        }
        Some(shard.unwrap_or(0))
    }

    async fn dispatch(&mut self, c: Committed, rx: &Receiver<ApplierMsg>) {
        let index = c.index;
        self.dispatched = self.dispatched.max(index);
        let mut p = Pending {
            index,
            done: false,
            result: None,
            changed: false,
            reply: c.reply,
            lease_id: 0,
            lease_ttl: 0,
        };
        match c.cmd.and_then(|cmd| cmd.cmd) {
            None => {
                p.done = true;
                p.result = Some(Ok(TxnResponse::default()));
                self.pending.push_back(p);
            }
            Some(raft_command::Cmd::Txn(txn)) => {
                if index <= self.st.applied {
                    // Replay of an entry every shard already has.
                    p.done = true;
                    p.result = Some(Ok(TxnResponse::default()));
                    self.pending.push_back(p);
                } else if let Some(s) = self.single_shard(&txn) {
                    self.pending.push_back(p);
                    self.router.shards[s].send(ShardMsg::Txn {
                        index,
                        txn: Box::new(txn),
                    });
                } else {
                    let mut ra = RemoteAccess {
                        router: &self.router,
                        lessor: &self.lessor,
                        index,
                        compact_rev: self.st.compact_rev,
                        changed: false,
                        ops_run: 0,
                    };
                    let result = kv::run_txn(&mut ra, &txn).await;
                    p.changed = ra.changed;
                    p.result = Some(result);
                    p.done = true;
                    self.applied_everywhere(index);
                    self.pending.push_back(p);
                }
            }
            Some(raft_command::Cmd::Compaction(req)) => {
                // Compaction checks the revision against everything before
                // it, so it waits for every earlier entry to finish.
                self.drain_before(index, rx).await;
                let result = if req.revision > self.st.current_rev {
                    Err(error::future_rev())
                } else if req.revision <= self.st.compact_rev {
                    Err(error::compacted())
                } else {
                    let mut waits = Vec::new();
                    for s in &self.router.shards {
                        let (tx, rx) = oneshot::channel();
                        s.send(ShardMsg::Compact {
                            rev: req.revision,
                            reply: tx,
                        });
                        waits.push(rx);
                    }
                    for w in waits {
                        let _ = w.await;
                    }
                    self.st.compact_rev = req.revision;
                    Ok(TxnResponse::default())
                };
                if index > self.st.applied {
                    self.applied_everywhere(index);
                }
                p.done = true;
                p.result = Some(result);
                self.pending.push_back(p);
            }
            Some(raft_command::Cmd::LeaseGrant(req)) => {
                p.done = true;
                if index <= self.st.applied {
                    // Replayed: the checkpointed lease table has it.
                    p.result = Some(Ok(TxnResponse::default()));
                } else {
                    let id = if req.id == 0 {
                        self.lessor.pick_id(index, self.router.member.cluster_id)
                    } else {
                        req.id
                    };
                    if self.lessor.grant(id, req.ttl) {
                        for s in &self.router.shards {
                            s.send(ShardMsg::LeaseGrant {
                                index,
                                id,
                                ttl: req.ttl,
                            });
                        }
                        p.lease_id = id;
                        p.result = Some(Ok(TxnResponse::default()));
                    } else {
                        self.applied_everywhere(index);
                        p.result = Some(Err(error::lease_exist()));
                    }
                }
                self.pending.push_back(p);
            }
            Some(raft_command::Cmd::MemberAttributes(_))
            | Some(raft_command::Cmd::Alarm(_))
            | Some(raft_command::Cmd::Auth(_)) => {
                // The raft core applied it to the membership.
                p.done = true;
                if index > self.st.applied {
                    self.applied_everywhere(index);
                }
                p.result = Some(Ok(TxnResponse::default()));
                self.pending.push_back(p);
            }
            Some(raft_command::Cmd::LeaseCheckpoint(req)) => {
                // Not kept on disk (as etcd 3.4): applied on replay too, in
                // log order, so a restarted member has what its log says.
                for cp in req.checkpoints {
                    self.lessor.apply_checkpoint(cp.id, cp.remaining_ttl);
                }
                p.done = true;
                if index > self.st.applied {
                    self.applied_everywhere(index);
                }
                p.result = Some(Ok(TxnResponse::default()));
                self.pending.push_back(p);
            }
            Some(raft_command::Cmd::LeaseKeepAlive(req)) => {
                p.done = true;
                p.lease_ttl = self.lessor.renew(req.id);
                if index > self.st.applied {
                    self.applied_everywhere(index);
                }
                p.result = Some(Ok(TxnResponse::default()));
                self.pending.push_back(p);
            }
            Some(raft_command::Cmd::LeaseRevoke(req)) => {
                p.done = true;
                if index <= self.st.applied {
                    p.result = Some(Ok(TxnResponse::default()));
                } else if self.lessor.revoke(req.id) {
                    let mut waits = Vec::new();
                    for s in &self.router.shards {
                        let (tx, rx) = oneshot::channel();
                        s.send(ShardMsg::LeaseRevoke {
                            index,
                            id: req.id,
                            reply: tx,
                        });
                        waits.push(rx);
                    }
                    let mut deleted = 0;
                    for w in waits {
                        deleted += w.await.unwrap_or(0);
                    }
                    p.changed = deleted > 0;
                    // etcd's lessor deletes each key in one mvcc transaction.
                    crate::metrics::mvcc_txn(0, 0, deleted as u64);
                    p.result = Some(Ok(TxnResponse::default()));
                } else {
                    self.applied_everywhere(index);
                    p.result = Some(Err(error::lease_not_found()));
                }
                self.pending.push_back(p);
            }
        }
        if index >= self.last_checkpoint + self.st.checkpoint_every {
            self.last_checkpoint = index;
            for s in &self.router.shards {
                s.send(ShardMsg::Checkpoint { index });
            }
        }
    }

    /// Tells every shard that entry `index`, which changed none of their
    /// keys, is applied (they checkpoint past it).
    fn applied_everywhere(&self, index: u64) {
        for s in &self.router.shards {
            s.send(ShardMsg::Applied { index });
        }
    }

    /// Asks every shard for its versions at the current position of their
    /// queues (the same log index on all: entries are dispatched to all
    /// queues in order and no multi-shard entry is in progress here) and
    /// assembles the snapshot in a task of its own.
    fn build_snapshot(&mut self, reply: oneshot::Sender<(u64, Vec<u8>)>) {
        let meta = crate::snapshot::Meta {
            index: self.dispatched,
            compact_rev: self.st.compact_rev,
            current_rev: 0,
            leases: self.lessor.table(),
        };
        let mut waits = Vec::new();
        for s in &self.router.shards {
            let (tx, rx) = oneshot::channel();
            s.send(ShardMsg::Dump { reply: tx });
            waits.push(rx);
        }
        glommio::spawn_local(async move {
            let mut parts = Vec::new();
            for w in waits {
                match w.await {
                    Ok(p) => parts.push(p),
                    Err(_) => return,
                }
            }
            let mut body = crate::snapshot::build_head(&meta);
            for p in parts {
                body.extend_from_slice(&p);
            }
            let _ = reply.send((meta.index, body));
        })
        .detach();
    }

    /// Replaces every shard's data, the lessor and the applied position
    /// with a snapshot's, once every entry dispatched before it is done.
    async fn install_snapshot(
        &mut self,
        body: Vec<u8>,
        rx: &Receiver<ApplierMsg>,
    ) -> Result<u64, String> {
        let (meta, records) = crate::snapshot::parse(&body)?;
        drop(body);
        self.drain_before(u64::MAX, rx).await;
        let n = self.router.shards.len();
        let mut per_shard: Vec<Vec<(Vec<u8>, crate::store::index::Version)>> =
            (0..n).map(|_| Vec::new()).collect();
        let mut current = meta.current_rev;
        for (k, v) in records {
            current = current.max(v.mod_rev);
            per_shard[shard_of(&k, n)].push((k, v));
        }
        let mut waits = Vec::new();
        for (s, recs) in self.router.shards.iter().zip(per_shard) {
            let (tx, rx) = oneshot::channel();
            s.send(ShardMsg::Restore {
                records: recs,
                index: meta.index,
                compact_rev: meta.compact_rev,
                leases: meta.leases.clone(),
                reply: tx,
            });
            waits.push(rx);
        }
        for w in waits {
            w.await.map_err(|_| "a shard stopped".to_string())??;
        }
        self.lessor = Lessor::new(&meta.leases, self.router.member.lease_checkpoint);
        self.st.applied = meta.index;
        self.st.current_rev = current.max(1);
        self.st.compact_rev = meta.compact_rev;
        self.dispatched = meta.index;
        self.last_checkpoint = meta.index;
        self.publish();
        // Watchers read history again from what they delivered last.
        for c in &self.router.cores {
            c.send(crate::server::CoreMsg::WatchResync);
        }
        Ok(meta.index)
    }

    /// Waits until every entry before `index` has completed, processing
    /// shard results meanwhile (other messages are kept for later).
    async fn drain_before(&mut self, index: u64, rx: &Receiver<ApplierMsg>) {
        let mut held = Vec::new();
        loop {
            self.advance();
            if self.pending.iter().all(|p| p.index >= index) {
                break;
            }
            let mut msgs = Vec::new();
            if !rx.recv_batch(&mut msgs, 64).await {
                return;
            }
            for m in msgs {
                match m {
                    ApplierMsg::Done { shard, bytes, done } => self.complete(shard, bytes, done),
                    other => held.push(other),
                }
            }
        }
        // Put back what arrived meanwhile, in order.
        for m in held {
            match m {
                ApplierMsg::Reads { index, replies } => {
                    self.reads.extend(replies.into_iter().map(|r| (index, r)))
                }
                ApplierMsg::FailReads(st) => {
                    for (_, r) in self.reads.drain(..) {
                        let _ = r.send(Err(st.clone()));
                    }
                }
                // Entries after the compaction: dispatched after it, in order.
                ApplierMsg::Committed(entries) => {
                    if let Some(c) = entries.last() {
                        self.committed = self.committed.max(c.index);
                    }
                    self.backlog.extend(entries)
                }
                ApplierMsg::Done { shard, bytes, done } => self.complete(shard, bytes, done),
                other => self.lease_msg(other),
            }
        }
    }

    fn complete(&mut self, shard: usize, bytes: u64, results: Vec<ShardDone>) {
        if let Some(b) = self.shard_bytes.get_mut(shard) {
            *b = bytes;
        }
        for r in results {
            // Pending is sorted by index; results come in order per shard.
            if let Ok(i) = self.pending.binary_search_by_key(&r.index, |p| p.index) {
                let p = &mut self.pending[i];
                p.done = true;
                p.changed = r.changed;
                p.result = Some(r.result);
            }
        }
    }

    /// Completes finished entries in log order, answers clients and reads.
    fn advance(&mut self) {
        let before = (self.st.applied, self.st.current_rev, self.st.compact_rev);
        while self.pending.front().map(|p| p.done).unwrap_or(false) {
            let mut p = self.pending.pop_front().expect("front exists");
            if let Some(Ok(txn)) = &mut p.result {
                kv::fill_revision_before(&mut txn.responses, self.st.current_rev);
            }
            if p.changed {
                self.st.current_rev = self.st.current_rev.max(p.index as i64);
            }
            self.st.applied = self.st.applied.max(p.index);
            if let Some(reply) = p.reply {
                let res = p
                    .result
                    .unwrap_or_else(|| Ok(TxnResponse::default()))
                    .map(|txn| WriteResult {
                        txn,
                        revision: self.st.current_rev,
                        lease_id: p.lease_id,
                        lease_ttl: p.lease_ttl,
                    });
                if let Some((core, slot, res)) = reply.answer(res) {
                    if self.written.len() <= core {
                        self.written.resize_with(core + 1, Vec::new);
                    }
                    self.written[core].push((slot, res));
                }
            }
        }
        if !self.reads.is_empty() {
            let applied = self.st.applied;
            let rev = self.st.current_rev;
            let mut i = 0;
            while i < self.reads.len() {
                if self.reads[i].0 <= applied {
                    let (_, r) = self.reads.swap_remove(i);
                    let _ = r.send(Ok(rev));
                } else {
                    i += 1;
                }
            }
        }
        let db_bytes = self.shard_bytes.iter().sum::<u64>();
        if before != (self.st.applied, self.st.current_rev, self.st.compact_rev)
            || self.written.iter().any(|w| !w.is_empty())
            || db_bytes != self.db_bytes
        {
            self.db_bytes = db_bytes;
            self.publish();
        }
    }

    /// Tells every core the new applied index and revisions, with the
    /// answers to its clients' writes completed since the last time.
    fn publish(&mut self) {
        for (i, c) in self.router.cores.iter().enumerate() {
            let written = self
                .written
                .get_mut(i)
                .map(std::mem::take)
                .unwrap_or_default();
            c.send(crate::server::CoreMsg::Applied {
                applied: self.st.applied,
                revision: self.st.current_rev,
                compact_revision: self.st.compact_rev,
                commit: self.committed.max(self.st.applied),
                db_bytes: self.db_bytes,
                written,
            });
        }
    }
}
