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

/// Entries kept in memory behind the applied index, for followers.
const LOG_KEEP_ENTRIES: u64 = 10_000;
/// Entries kept at most for a follower that lags (then it needs a
/// snapshot, which is not implemented yet).
const LOG_KEEP_MAX: u64 = 200_000;
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
    let mut snapshot_warned = 0u64;
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
                RaftMsg::Step(m) => {
                    if m.to != me {
                        continue;
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
        send_messages(
            &mut node,
            &peers,
            ready.take_messages(),
            &mut snapshot_warned,
        );
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
            &mut snapshot_warned,
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
        send_messages(
            &mut node,
            &peers,
            light.take_messages(),
            &mut snapshot_warned,
        );
        hand_off(
            &mut node,
            nonce,
            light.take_committed_entries(),
            &mut waiters,
            &router,
        );
        node.advance_apply();

        // Keep the in-memory log bounded, but long enough for a follower
        // that lags (up to LOG_KEEP_MAX): without snapshots it is how it
        // catches up.
        let applied = node.raft.raft_log.applied;
        if applied > 2 * LOG_KEEP_ENTRIES {
            let first = node.store().first_index().unwrap_or(1);
            let mut to = applied - LOG_KEEP_ENTRIES;
            if node.raft.state == StateRole::Leader {
                let slowest = node
                    .raft
                    .prs()
                    .iter()
                    .map(|(_, p)| p.matched)
                    .min()
                    .unwrap_or(applied);
                to = to.min(slowest.max(applied.saturating_sub(LOG_KEEP_MAX)));
            }
            if to > first && to - first > LOG_KEEP_ENTRIES {
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

/// Sends raft messages to their peers. Snapshots are not implemented: one
/// is reported as failed (the follower keeps asking) instead of sending an
/// empty one, which would lose data on the follower.
fn send_messages(
    node: &mut RawNode<MemStorage>,
    peers: &crate::peer::Peers,
    msgs: Vec<raft::eraftpb::Message>,
    snapshot_warned: &mut u64,
) {
    for m in msgs {
        let to = m.to;
        if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
            if *snapshot_warned != to {
                *snapshot_warned = to;
                crate::warn!(
                    "raft: member {to:x} is behind this leader's log and needs a snapshot, which keelson cannot send yet"
                );
            }
            node.report_snapshot(to, raft::SnapshotStatus::Failure);
            continue;
        }
        let bytes = match protobuf::Message::write_to_bytes(&m) {
            Ok(b) => b,
            Err(e) => {
                crate::error!("raft: cannot encode a message for {to:x}: {e}");
                continue;
            }
        };
        if !peers.send(to, bytes.into()) {
            node.report_unreachable(to);
        }
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
