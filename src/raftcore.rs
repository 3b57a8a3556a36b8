//! The raft core: one raft-rs `RawNode`, the WAL, and the hand-off of
//! committed entries to the applier. It runs as one task on core 0.
//!
//! Each turn of the loop: take every message that arrived (proposals, read
//! requests, checkpoint reports) in one batch, tick if a heartbeat interval
//! passed, then drain `Ready` in raft-rs's order:
//! 1. messages to peers (through `peer::Peers`; a full queue or a dead
//!    connection is reported to raft as an unreachable peer),
//! 2. committed entries → applier (already durable),
//! 3. new entries and hard state → WAL, then **one fdatasync** for the whole
//!    batch (group commit; proposals that arrive meanwhile form the next one),
//! 4. read states → applier (linearizable reads wait there for apply),
//! 5. advance; the light ready's commit index and committed entries.
//!
//! Proposals on a follower are forwarded to the leader by raft-rs; each
//! carries a context (this process's nonce, a sequence number) so the member
//! that proposed it answers its client when the entry commits, whoever led.
//! Linearizable reads on a follower go through raft's ReadIndex too.
//!
//! *Architecture invariant:* the raft core never touches shard data; it only
//! orders operations. It MUST NOT hand an entry to the applier before raft
//! reports it committed, and MUST NOT acknowledge anything itself.
//! Snapshots are not sent yet: a follower the leader's in-memory log no
//! longer covers cannot catch up (logged), rather than receive an empty one.

use crate::apply::{ApplierMsg, Committed, ReadReply, Reply};
use crate::config::Config;
use crate::error::{self, Status};
use crate::mailbox::Receiver;
use crate::proto::keelson::RaftCommand;
use crate::server::{CoreMsg, Router};
use crate::wal::{Recovered, Wal};
use prost::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, Snapshot};
use raft::storage::MemStorage;
use raft::{RawNode, StateRole, Storage};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub enum RaftMsg {
    /// A heartbeat interval passed (from the ticker task).
    Tick,
    Propose {
        data: Vec<u8>,
        reply: Reply,
    },
    ReadIndex {
        reply: ReadReply,
    },
    Checkpointed {
        shard: usize,
        index: u64,
    },
    /// A raft message from a peer.
    Step(Box<raft::eraftpb::Message>),
    /// `MoveLeader`: hand leadership to `target` (this member must lead);
    /// answered once `target` leads, or with etcd's timeout error.
    TransferLeader {
        target: u64,
        reply: futures::channel::oneshot::Sender<Result<(), Status>>,
    },
    /// A snapshot body went out to `to` (None: building or sending failed).
    SnapshotSent {
        to: u64,
        header: Option<crate::snapshot::Header>,
    },
}

pub struct RaftBoot {
    pub id: u64,
    /// Every voting member (this one included).
    pub voters: Vec<u64>,
    pub recovered: Recovered,
    /// Index every shard has durably applied (their common checkpoint).
    pub applied: u64,
    pub cfg: Config,
}

/// A follower that lags is served from the in-memory log up to this many
/// times `--experimental-snapshot-catchup-entries` behind; further behind,
/// it gets a snapshot.
const LOG_KEEP_LAGGING_FACTOR: u64 = 20;
/// Snapshot chunks on the peer transport, and how much of one may wait in
/// the peer's queue (the rest waits for room: heartbeats go on).
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
const SNAPSHOT_QUEUED_MAX: usize = 8 << 20;

/// What a peer payload is: its first byte.
pub const PAYLOAD_RAFT: u8 = 0;
pub const PAYLOAD_SNAPSHOT_CHUNK: u8 = 1;

/// `data-dir/snapshot.part`: the snapshot body being received.
pub fn snapshot_part_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("snapshot.part")
}

/// Receives a snapshot body's chunks into `snapshot.part`, in order (a
/// chunk out of order drops what came so far: the leader sends again).
pub struct SnapshotInbox {
    path: std::path::PathBuf,
    /// (from, index, bytes so far) of the body being received.
    cur: std::cell::Cell<Option<(u64, u64, u64)>>,
}

impl SnapshotInbox {
    pub fn new(data_dir: &std::path::Path) -> SnapshotInbox {
        SnapshotInbox {
            path: snapshot_part_path(data_dir),
            cur: std::cell::Cell::new(None),
        }
    }

    pub fn chunk(&self, from: u64, payload: &[u8]) {
        use std::io::Write;
        let Some((index, offset, data)) = crate::snapshot::decode_chunk(payload) else {
            crate::warn!("peer {from:x}: a snapshot chunk too short; dropped");
            return;
        };
        let open = if offset == 0 {
            std::fs::File::create(&self.path)
        } else {
            match self.cur.get() {
                Some((f, i, len)) if f == from && i == index && len == offset => {
                    std::fs::OpenOptions::new().append(true).open(&self.path)
                }
                _ => {
                    self.cur.set(None);
                    return;
                }
            }
        };
        match open.and_then(|mut f| f.write_all(data)) {
            Ok(()) => self
                .cur
                .set(Some((from, index, offset + data.len() as u64))),
            Err(e) => {
                crate::warn!("{}: {e}", self.path.display());
                self.cur.set(None);
            }
        }
    }
}
/// Proposals and reads taken per turn of the loop: bounds one batch.
const BATCH_MAX: usize = 4096;

fn fatal(what: &str) -> ! {
    crate::error!("raft: {what}; stopping");
    std::process::exit(1)
}

fn build_node(boot: &RaftBoot) -> Result<RawNode<MemStorage>, String> {
    let rec = &boot.recovered;
    let storage = MemStorage::new();
    {
        let mut w = storage.wl();
        let cs = ConfState::from((boot.voters.clone(), vec![]));
        if rec.base.0 > 0 {
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = rec.base.0;
            snap.mut_metadata().term = rec.base.1;
            snap.mut_metadata().set_conf_state(cs);
            w.apply_snapshot(snap).map_err(|e| e.to_string())?;
        } else {
            w.set_conf_state(cs);
        }
        w.append(&rec.entries).map_err(|e| e.to_string())?;
        let last = rec.entries.last().map(|e| e.index).unwrap_or(rec.base.0);
        let mut hs = rec.hard_state.clone();
        // Shards only ever apply committed entries, so their checkpoint
        // proves commitment even if the hard state record lagged.
        hs.commit = hs.commit.max(boot.applied).max(rec.base.0).min(last);
        w.set_hardstate(hs);
    }
    let applied = boot.applied.min(
        storage
            .initial_state()
            .map_err(|e| e.to_string())?
            .hard_state
            .commit,
    );
    let heartbeat = boot.cfg.heartbeat_interval.as_millis().max(1) as u64;
    let cfg = raft::Config {
        id: boot.id,
        election_tick: (boot.cfg.election_timeout.as_millis() as u64 / heartbeat).max(2) as usize,
        heartbeat_tick: 1,
        applied,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        ..Default::default()
    };
    cfg.validate().map_err(|e| e.to_string())?;
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    RawNode::new(&cfg, storage, &logger).map_err(|e| e.to_string())
}

pub async fn run_raft(
    boot: RaftBoot,
    peers: std::rc::Rc<crate::peer::Peers>,
    rx: Receiver<RaftMsg>,
    router: Arc<Router>,
) {
    let mut node = match build_node(&boot) {
        Ok(n) => n,
        Err(e) => fatal(&format!("cannot start raft: {e}")),
    };
    let last = {
        let s = node.store();
        let li = s.last_index().unwrap_or(0);
        (li, s.term(li).unwrap_or(0))
    };
    let data_dir = boot.cfg.data_dir.clone();
    let mut wal = match Wal::open(&data_dir, &boot.recovered, last).await {
        Ok(w) => w,
        Err(e) => fatal(&e),
    };
    drop(boot.recovered);
    // One voter: no need to wait an election timeout to lead.
    if node.raft.prs().conf().voters().ids().len() == 1 {
        let _ = node.campaign();
    }

    let tick = boot.cfg.heartbeat_interval;
    let me = boot.id;
    // Proposal contexts: (this process's nonce, sequence). The nonce keeps an
    // entry proposed before a restart from answering a new request.
    let nonce = process_nonce(me);
    let mut next_id: u64 = 1;
    let mut ticks: u64 = 0;
    let mut was_leader = false;
    let mut snaps = SnapshotSender {
        inflight: HashMap::new(),
        router: router.clone(),
        peers: peers.clone(),
        data_dir: boot.cfg.data_dir.clone(),
    };
    // A snapshot body received and checked, waiting for raft to install it.
    let mut snapshot_body: Option<(crate::snapshot::Header, Vec<u8>)> = None;
    let catchup = boot.cfg.snapshot_catchup_entries;
    // A MoveLeader in progress: (target, reply, ticks left).
    let mut transfer: Option<(
        u64,
        futures::channel::oneshot::Sender<Result<(), Status>>,
        u64,
    )> = None;
    let transfer_ticks = (request_timeout(&boot.cfg).as_millis() / tick.as_millis().max(1)) as u64;
    let mut waiters: HashMap<u64, Reply> = HashMap::new();
    let mut reads: Vec<ReadReply> = Vec::new();
    let mut read_batches: HashMap<u64, Vec<ReadReply>> = HashMap::new();
    let mut checkpoints = vec![0u64; router.shards.len()];
    let mut published = (0u64, 0u64, 0u64);
    let mut msgs = Vec::with_capacity(256);

    // Ticks arrive as messages, so the loop sleeps only on its mailbox and
    // never re-arms a timer per turn.
    {
        let tx = router.raft.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(tick).await;
                if !tx.send(RaftMsg::Tick) {
                    return;
                }
            }
        })
        .detach();
    }
    loop {
        // Reads held back for the leader's first commit go as soon as it
        // lands: don't sleep while there are some and they are due.
        let reads_due = !reads.is_empty()
            && node.raft.state == StateRole::Leader
            && node.raft.commit_to_current_term();
        if !reads_due && !rx.recv_batch(&mut msgs, BATCH_MAX).await {
            return; // every sender is gone: shutting down
        }
        if reads_due {
            while let Some(m) = rx.try_recv() {
                msgs.push(m);
            }
        }
        for m in msgs.drain(..) {
            match m {
                RaftMsg::Tick => {
                    node.tick();
                    ticks += 1;
                    if let Some((_, _, left)) = transfer.as_mut() {
                        *left = left.saturating_sub(1);
                        if *left == 0 {
                            if let Some((_, r, _)) = transfer.take() {
                                let _ = r.send(Err(error::leader_transfer_timeout()));
                            }
                        }
                    }
                    if ticks % 16 == 0 {
                        // Requests whose client gave up (timed out) while
                        // their entry or read was lost in a leader change.
                        waiters.retain(|_, r| !r.is_canceled());
                        read_batches.retain(|_, rs| {
                            rs.retain(|r| !r.is_canceled());
                            !rs.is_empty()
                        });
                    }
                }
                RaftMsg::TransferLeader { target, reply } => {
                    if node.raft.state != StateRole::Leader {
                        let _ = reply.send(Err(error::not_leader()));
                    } else if !node.raft.prs().conf().voters().contains(target) {
                        let _ = reply.send(Err(error::bad_leader_transferee()));
                    } else if target == me {
                        let _ = reply.send(Ok(()));
                    } else {
                        if let Some((_, r, _)) = transfer.take() {
                            let _ = r.send(Err(error::leader_transfer_timeout()));
                        }
                        node.transfer_leader(target);
                        transfer = Some((target, reply, transfer_ticks.max(1)));
                    }
                }
                RaftMsg::SnapshotSent { to, header } => {
                    snaps.sent(&mut node, to, header);
                }
                RaftMsg::Step(m) => {
                    if m.to != me {
                        continue;
                    }
                    if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                        // Only a snapshot whose body arrived whole goes to
                        // raft: once raft takes it, it must be installed.
                        match snaps.received_body(m.get_snapshot()) {
                            Ok(b) => snapshot_body = Some(b),
                            Err(e) => {
                                crate::warn!("raft: snapshot from {:x} refused: {e}", m.from);
                                continue;
                            }
                        }
                    }
                    if let Err(e) = node.step(*m) {
                        crate::debug!("raft: step: {e}");
                    }
                }
                RaftMsg::Propose { data, reply } => {
                    if node.raft.leader_id == raft::INVALID_ID {
                        let _ = reply.send(Err(error::no_leader()));
                        continue;
                    }
                    let id = next_id;
                    next_id += 1;
                    let mut ctx = Vec::with_capacity(16);
                    ctx.extend_from_slice(&nonce.to_le_bytes());
                    ctx.extend_from_slice(&id.to_le_bytes());
                    match node.propose(ctx, data) {
                        Ok(()) => {
                            waiters.insert(id, reply);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(Status::new(
                                error::Code::Unavailable,
                                format!("etcdserver: {e}"),
                            )));
                        }
                    }
                }
                RaftMsg::ReadIndex { reply } => reads.push(reply),
                RaftMsg::Checkpointed { shard, index } => {
                    if let Some(c) = checkpoints.get_mut(shard) {
                        *c = (*c).max(index);
                    }
                    let common = checkpoints.iter().copied().min().unwrap_or(0);
                    if wal.release_to(common) > 0 {
                        crate::debug!("wal: released segments up to index {common}");
                    }
                }
            }
        }
        if !reads.is_empty() {
            if node.raft.state == StateRole::Leader {
                // raft-rs drops a ReadIndex until the leader has committed an
                // entry of its own term: hold reads until then.
                if !node.raft.commit_to_current_term() {
                    // fall through to Ready handling; retried next turn
                } else {
                    let id = next_id;
                    next_id += 1;
                    read_batches.insert(id, std::mem::take(&mut reads));
                    node.read_index(id.to_le_bytes().to_vec());
                }
            } else if node.raft.leader_id != raft::INVALID_ID {
                // A follower asks the leader (raft-rs forwards it).
                let id = next_id;
                next_id += 1;
                read_batches.insert(id, std::mem::take(&mut reads));
                node.read_index(id.to_le_bytes().to_vec());
            } else {
                for r in reads.drain(..) {
                    let _ = r.send(Err(error::no_leader()));
                }
            }
        }
        if !node.has_ready() {
            continue;
        }
        let mut ready = node.ready();
        // 1. Messages to peers.
        send_messages(&mut node, &peers, ready.take_messages(), &mut snaps);
        // 1b. A snapshot from the leader: replaces the shards' data, the
        // in-memory log and the WAL before anything after it.
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            let index = snap.get_metadata().index;
            let term = snap.get_metadata().term;
            let body = match snapshot_body.take() {
                Some((h, b)) if h.index == index => b,
                _ => fatal("raft took a snapshot whose body is not here"),
            };
            crate::info!(
                "raft: installing a snapshot at index {index} ({} bytes)",
                body.len()
            );
            let (tx, rx) = futures::channel::oneshot::channel();
            router
                .applier
                .send(ApplierMsg::InstallSnapshot { body, reply: tx });
            match rx.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => fatal(&format!("installing the snapshot: {e}")),
                Err(_) => fatal("the applier stopped while installing a snapshot"),
            }
            if let Err(e) = node.mut_store().wl().apply_snapshot(snap) {
                fatal(&format!("installing the snapshot in the raft log: {e}"));
            }
            if let Err(e) = wal.install_snapshot((index, term)).await {
                fatal(&e);
            }
            let _ = std::fs::remove_file(snapshot_part_path(&boot.cfg.data_dir));
            crate::info!("raft: snapshot at index {index} installed");
        }
        // 2. Committed entries (durable since an earlier turn).
        hand_off(
            &mut node,
            nonce,
            ready.take_committed_entries(),
            &mut waiters,
            &router,
        );
        // 3. Append and hard state, then one fdatasync.
        if !ready.entries().is_empty() {
            wal.push_entries(ready.entries());
            if let Err(e) = node.mut_store().wl().append(ready.entries()) {
                fatal(&format!("append to log: {e}"));
            }
        }
        if let Some(hs) = ready.hs() {
            wal.push_hard_state(hs);
            node.mut_store().wl().set_hardstate(hs.clone());
        }
        // 4. Read states: released by the applier once applied reaches them.
        for rs in ready.take_read_states() {
            let id = u64::from_le_bytes(<[u8; 8]>::try_from(&rs.request_ctx[..]).unwrap_or([0; 8]));
            if let Some(replies) = read_batches.remove(&id) {
                router.applier.send(ApplierMsg::Reads {
                    index: rs.index,
                    replies,
                });
            }
        }
        if wal.has_pending() {
            let li = node.store().last_index().unwrap_or(0);
            let last = (li, node.store().term(li).unwrap_or(0));
            let hs = node.raft.hard_state();
            if let Err(e) = wal.sync(last, &hs).await {
                fatal(&e);
            }
        }
        send_messages(
            &mut node,
            &peers,
            ready.take_persisted_messages(),
            &mut snaps,
        );
        // 5. Advance.
        let mut light = node.advance(ready);
        if let Some(commit) = light.commit_index() {
            node.mut_store().wl().mut_hard_state().set_commit(commit);
            // Recorded with the next batch; recovery does not depend on it
            // (see build_node), it only shortens replay.
            let hs = node.raft.hard_state();
            wal.push_hard_state(&hs);
        }
        send_messages(&mut node, &peers, light.take_messages(), &mut snaps);
        hand_off(
            &mut node,
            nonce,
            light.take_committed_entries(),
            &mut waiters,
            &router,
        );
        node.advance_apply();

        // Keep the in-memory log bounded: `catchup` entries behind the
        // applied index, more for a follower that lags (up to
        // LOG_KEEP_LAGGING_FACTOR times); one further behind gets a snapshot.
        let applied = node.raft.raft_log.applied;
        if applied > 2 * catchup {
            let first = node.store().first_index().unwrap_or(1);
            let mut to = applied - catchup;
            if node.raft.state == StateRole::Leader {
                let slowest = node
                    .raft
                    .prs()
                    .iter()
                    .map(|(_, p)| p.matched)
                    .min()
                    .unwrap_or(applied);
                to = to.min(slowest.max(applied.saturating_sub(LOG_KEEP_LAGGING_FACTOR * catchup)));
            }
            if to > first && to - first > catchup {
                let _ = node.mut_store().wl().compact(to);
            }
        }
        let state = (
            node.raft.term,
            node.raft.leader_id,
            node.raft.raft_log.committed,
        );
        if state != published {
            published = state;
            for c in &router.cores {
                c.send(CoreMsg::Raft {
                    term: state.0,
                    leader: state.1,
                    commit: state.2,
                });
            }
        }
        if transfer.as_ref().map(|t| t.0) == Some(node.raft.leader_id) {
            if let Some((_, r, _)) = transfer.take() {
                let _ = r.send(Ok(()));
            }
        }
        let is_leader = node.raft.state == StateRole::Leader;
        if is_leader != was_leader {
            was_leader = is_leader;
            router.applier.send(ApplierMsg::Role { leader: is_leader });
        }
        // What was proposed before a leader change may or may not commit:
        // its client waits until it applies or its request times out.
    }
}

/// A number that differs between runs of this member.
fn process_nonce(id: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ id.rotate_left(17) ^ (std::process::id() as u64).rotate_left(40)).max(1)
}

/// Snapshots to followers the in-memory log no longer covers: built by the
/// applier, sent in chunks by a task of their own, then announced with a
/// raft snapshot message carrying the body's header.
struct SnapshotSender {
    /// Member → when its snapshot started: one at a time per member, and
    /// none again for a while after one went out (it is being installed).
    inflight: HashMap<u64, std::time::Instant>,
    router: Arc<Router>,
    peers: std::rc::Rc<crate::peer::Peers>,
    data_dir: std::path::PathBuf,
}

/// How long a member that was sent a snapshot is given to install it
/// before another may go.
const SNAPSHOT_GRACE: Duration = Duration::from_secs(30);

impl SnapshotSender {
    /// Raft wants to send `to` a snapshot.
    fn wanted(&mut self, node: &mut RawNode<MemStorage>, to: u64) {
        if let Some(t) = self.inflight.get(&to) {
            if t.elapsed() < SNAPSHOT_GRACE {
                // Raft retries; the one on its way will do.
                node.report_snapshot(to, raft::SnapshotStatus::Failure);
                return;
            }
        }
        self.inflight.insert(to, std::time::Instant::now());
        node.report_snapshot(to, raft::SnapshotStatus::Failure);
        glommio::spawn_local(send_snapshot(to, self.router.clone(), self.peers.clone())).detach();
    }

    /// The body went out: announce it to raft's follower.
    fn sent(
        &mut self,
        node: &mut RawNode<MemStorage>,
        to: u64,
        header: Option<crate::snapshot::Header>,
    ) {
        let Some(h) = header else {
            self.inflight.remove(&to);
            return;
        };
        let term = match node.store().term(h.index) {
            Ok(t) => t,
            Err(e) => {
                crate::warn!(
                    "raft: snapshot for {to:x} at index {}: {e}; will retry",
                    h.index
                );
                self.inflight.remove(&to);
                return;
            }
        };
        let mut snap = Snapshot::default();
        snap.set_data(h.encode().into());
        snap.mut_metadata().index = h.index;
        snap.mut_metadata().term = term;
        snap.mut_metadata()
            .set_conf_state(node.raft.prs().conf().to_conf_state());
        let mut m = raft::eraftpb::Message::default();
        m.set_msg_type(raft::eraftpb::MessageType::MsgSnapshot);
        m.to = to;
        m.from = node.raft.id;
        m.term = node.raft.term;
        m.set_snapshot(snap);
        send_one(node, &self.peers, &m);
        self.inflight.insert(to, std::time::Instant::now());
    }

    /// Checks a received snapshot's body (`snapshot.part`) against the
    /// header in raft's message.
    fn received_body(&self, snap: &Snapshot) -> Result<(crate::snapshot::Header, Vec<u8>), String> {
        let h = crate::snapshot::Header::decode(snap.get_data()).ok_or("bad snapshot header")?;
        if h.index != snap.get_metadata().index {
            return Err("snapshot header names another index".into());
        }
        let path = snapshot_part_path(&self.data_dir);
        let body = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if body.len() as u64 != h.len || crc32c::crc32c(&body) != h.crc {
            return Err(format!(
                "the body received ({} bytes) does not match the header ({} bytes)",
                body.len(),
                h.len
            ));
        }
        Ok((h, body))
    }
}

/// Builds a snapshot (the applier), sends its body to `to` in chunks as the
/// peer's queue has room, and reports back to the raft loop.
async fn send_snapshot(to: u64, router: Arc<Router>, peers: std::rc::Rc<crate::peer::Peers>) {
    let (tx, rx) = futures::channel::oneshot::channel();
    router.applier.send(ApplierMsg::SnapshotBuild { reply: tx });
    let Ok((index, body)) = rx.await else {
        router.raft.send(RaftMsg::SnapshotSent { to, header: None });
        return;
    };
    crate::info!(
        "raft: sending member {to:x} a snapshot at index {index} ({} bytes)",
        body.len()
    );
    let header = crate::snapshot::Header {
        index,
        len: body.len() as u64,
        crc: crc32c::crc32c(&body),
    };
    let mut off = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    while off < body.len() {
        while peers.queued_bytes(to).unwrap_or(0) > SNAPSHOT_QUEUED_MAX {
            if std::time::Instant::now() > deadline {
                router.raft.send(RaftMsg::SnapshotSent { to, header: None });
                return;
            }
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
        let end = (off + SNAPSHOT_CHUNK_BYTES).min(body.len());
        let chunk = crate::snapshot::encode_chunk(index, off as u64, &body[off..end]);
        if !peers.send(to, chunk.into()) {
            crate::warn!("raft: sending a snapshot to {to:x} failed; will retry");
            router.raft.send(RaftMsg::SnapshotSent { to, header: None });
            return;
        }
        off = end;
    }
    router.raft.send(RaftMsg::SnapshotSent {
        to,
        header: Some(header),
    });
}

fn send_one(
    node: &mut RawNode<MemStorage>,
    peers: &crate::peer::Peers,
    m: &raft::eraftpb::Message,
) {
    let to = m.to;
    let mut bytes = vec![PAYLOAD_RAFT];
    if let Err(e) = protobuf::Message::write_to_vec(m, &mut bytes) {
        crate::error!("raft: cannot encode a message for {to:x}: {e}");
        return;
    }
    if !peers.send(to, bytes.into()) {
        node.report_unreachable(to);
    }
}

/// Sends raft messages to their peers; a snapshot raft wants to send is
/// built and sent by `SnapshotSender` instead.
fn send_messages(
    node: &mut RawNode<MemStorage>,
    peers: &crate::peer::Peers,
    msgs: Vec<raft::eraftpb::Message>,
    snaps: &mut SnapshotSender,
) {
    for m in msgs {
        if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
            snaps.wanted(node, m.to);
            continue;
        }
        send_one(node, peers, &m);
    }
}

fn hand_off(
    node: &mut RawNode<MemStorage>,
    nonce: u64,
    entries: Vec<Entry>,
    waiters: &mut HashMap<u64, Reply>,
    router: &Router,
) {
    if entries.is_empty() {
        return;
    }
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        // Only the member (and process) that proposed an entry answers it.
        let reply = match e.context.len() {
            16 if e.context[..8] == nonce.to_le_bytes() => waiters.remove(&u64::from_le_bytes(
                e.context[8..].try_into().expect("8 bytes"),
            )),
            _ => None,
        };
        let cmd = match e.get_entry_type() {
            EntryType::EntryNormal if e.data.is_empty() => None,
            EntryType::EntryNormal => match RaftCommand::decode(e.data.as_ref()) {
                Ok(c) => Some(c),
                Err(err) => {
                    // Only keelson writes entries; an undecodable one means a
                    // bug or a damaged log that passed its checksum.
                    crate::error!(
                        "raft: entry {} does not decode ({err}); skipping it",
                        e.index
                    );
                    None
                }
            },
            EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                let mut cc = raft::eraftpb::ConfChange::default();
                if protobuf::Message::merge_from_bytes(&mut cc, e.data.as_ref()).is_ok() {
                    if let Ok(cs) = node.apply_conf_change(&cc) {
                        node.mut_store().wl().set_conf_state(cs);
                    }
                }
                None
            }
        };
        out.push(Committed {
            index: e.index,
            cmd,
            reply,
        });
    }
    router.applier.send(ApplierMsg::Committed(out));
}

/// etcd's default request timeout: 5s plus two election timeouts.
pub fn request_timeout(cfg: &Config) -> Duration {
    Duration::from_secs(5) + 2 * cfg.election_timeout
}
