//! The raft core: one raft-rs `RawNode`, the WAL, and the hand-off of
//! committed entries to the applier. It runs as one task on core 0.
//!
//! Each turn of the loop: take every message that arrived (proposals, read
//! requests, checkpoint reports) in one batch, tick if a heartbeat interval
//! passed, then drain `Ready` in raft-rs's order:
//! 1. messages to peers (through `peer::Peers`; a full queue or a dead
//!    connection is reported to raft as an unreachable peer),
//! 2. committed entries → applier (already durable),
//! 3. new entries and hard state → WAL, made durable by **one write**
//!    (`RWF_DSYNC`, a write and an fdatasync in one request) for the whole
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
//!
//! Membership: the raft core owns the cluster's `Membership` and changes
//! it only when a membership entry (a ConfChange, or a member's published
//! attributes) is handed off, in log order, so every member agrees. A
//! change a client asks a follower for is forwarded to the leader over the
//! peer transport; the leader makes etcd's strict reconfiguration checks
//! and proposes it with the follower's context, so the follower answers
//! its client when the entry applies. Every member checks the change again
//! at apply (etcd's `ValidateConfigurationChange`); a refused one changes
//! nothing, for raft either.

use crate::apply::{ApplierMsg, Committed, ReadReply, Reply};
use crate::config::Config;
use crate::error::{self, Status};
use crate::mailbox::Receiver;
use crate::membership::{quorum, Membership};
use crate::proto::keelson::{member_change::Kind, MemberChange, RaftCommand};
use crate::server::{CoreMsg, Router};
use crate::wal::{Recovered, Wal};
use prost::encoding::{encode_varint, encoded_len_varint as varint_len};
use prost::Message as _;
use raft::eraftpb::{Entry, EntryType, Snapshot};
use raft::storage::MemStorage;
use raft::{RawNode, StateRole, Storage};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A client's write on its way to the log: the encoded command and the
/// same command decoded, so that the member that proposed it need not
/// decode its own entry again (`hand_off`). *Invariant:* `cmd` is what
/// `data` decodes to.
pub struct Proposal {
    pub data: Vec<u8>,
    pub cmd: RaftCommand,
    pub reply: Reply,
}

pub enum RaftMsg {
    /// A heartbeat interval passed (from the ticker task).
    Tick,
    Propose {
        data: Vec<u8>,
        reply: Reply,
    },
    /// The writes of one core's clients from one turn of its executor, in
    /// the order they were made (`server::writes`): each as a `Propose`.
    ProposeMany(Vec<Proposal>),
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
    /// The membership as applied here (member list, join requests).
    Members {
        reply: futures::channel::oneshot::Sender<Membership>,
    },
    /// A membership change asked of this member: answered when it applies,
    /// with the changed member's ID and the new membership.
    ChangeMembers {
        change: MemberChange,
        reply: ChangeReply,
    },
    /// A follower's membership change, for this member to check and
    /// propose as leader.
    ForwardedChange {
        from: u64,
        nonce: u64,
        seq: u64,
        change: MemberChange,
    },
    /// Alarm ACTIVATE or DEACTIVATE: answered when applied, with the
    /// alarms it raised or cleared.
    Alarm {
        req: crate::proto::etcdserverpb::AlarmRequest,
        reply: AlarmReply,
    },
    /// A change of the auth store: answered when applied.
    Auth {
        change: crate::proto::keelson::AuthChange,
        reply: futures::channel::oneshot::Sender<Result<(), Status>>,
    },
    /// The leader refused a change this member forwarded.
    ChangeRefused {
        nonce: u64,
        seq: u64,
        status: Status,
    },
    /// A lease TimeToLive asked of a follower: the leader's lessor answers
    /// (it alone sees every keep-alive), as etcd forwards it to the leader.
    LeaseTtl {
        id: i64,
        reply: TtlReply,
    },
    /// A follower's TimeToLive, for this member to answer as leader.
    LeaseTtlAsked {
        from: u64,
        nonce: u64,
        seq: u64,
        id: i64,
    },
    /// The leader's answer to a TimeToLive this member forwarded.
    LeaseTtlAnswer {
        nonce: u64,
        seq: u64,
        answer: Result<Option<(i64, i64)>, Status>,
    },
    /// Ask peer `to` for its hash of the versions up to `rev` (etcd's
    /// initial corruption check asks every peer for its HashKV).
    PeerHash {
        to: u64,
        rev: i64,
        reply: HashReply,
    },
    /// A peer asks this member for its hash up to `rev`.
    PeerHashAsked {
        from: u64,
        nonce: u64,
        seq: u64,
        rev: i64,
    },
    /// A peer's answer to `PeerHash`.
    PeerHashAnswer {
        nonce: u64,
        seq: u64,
        answer: Result<(u32, i64), Status>,
    },
}

pub type AlarmReply = futures::channel::oneshot::Sender<Result<Vec<(u64, i32)>, Status>>;
pub type ChangeReply = futures::channel::oneshot::Sender<Result<(u64, Membership), Status>>;

pub struct RaftBoot {
    pub id: u64,
    /// The membership as of its `conf_index` (from `data-dir/members`).
    pub membership: Membership,
    pub recovered: Recovered,
    /// Index every shard has durably applied (their common checkpoint).
    pub applied: u64,
    pub cfg: Config,
    /// A fixed election timeout in ticks (None: raft-rs's random one).
    pub election_tick: Option<usize>,
    /// Stop the process once this member applies its own removal (etcd's
    /// behaviour; the simulation stops the member itself).
    pub exit_on_removal: bool,
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
/// A follower's membership change for the leader: nonce u64, seq u64, then
/// the `MemberChange` message.
pub const PAYLOAD_MEMBER_CHANGE: u8 = 2;
/// The leader's refusal of one: nonce u64, seq u64, gRPC code u8, message.
pub const PAYLOAD_MEMBER_REFUSED: u8 = 3;
/// A follower's lease TimeToLive for the leader: nonce u64, seq u64, lease
/// ID i64.
pub const PAYLOAD_LEASE_TTL_ASK: u8 = 4;
/// The leader's answer: nonce u64, seq u64, then 0 (no such lease), 1 and
/// the granted TTL i64 and remaining seconds i64, or 2 (not the leader).
pub const PAYLOAD_LEASE_TTL_ANSWER: u8 = 5;

/// A member's hash at a revision for a peer: nonce u64, seq u64, revision
/// i64.
pub const PAYLOAD_HASH_ASK: u8 = 6;
/// Its answer: nonce u64, seq u64, then 0, the hash u32 and the compaction
/// revision i64; or 1 and a gRPC code u8 and message (the revision is a
/// future one, or compacted).
pub const PAYLOAD_HASH_ANSWER: u8 = 7;

/// Where a peer's hash goes: (hash, its compaction revision).
pub type HashReply = futures::channel::oneshot::Sender<Result<(u32, i64), Status>>;

/// Where a lease TimeToLive's answer goes: (granted TTL, remaining
/// seconds), `None` when there is no such lease.
pub type TtlReply = futures::channel::oneshot::Sender<Result<Option<(i64, i64)>, Status>>;

/// Decodes a membership payload from peer `from` into the raft core's
/// message (None: not one, or malformed).
pub fn decode_member_payload(from: u64, p: &[u8]) -> Option<RaftMsg> {
    if p.len() < 17 {
        return None;
    }
    let nonce = u64::from_le_bytes(p[1..9].try_into().ok()?);
    let seq = u64::from_le_bytes(p[9..17].try_into().ok()?);
    match p[0] {
        PAYLOAD_MEMBER_CHANGE => Some(RaftMsg::ForwardedChange {
            from,
            nonce,
            seq,
            change: MemberChange::decode(&p[17..]).ok()?,
        }),
        PAYLOAD_LEASE_TTL_ASK if p.len() == 25 => Some(RaftMsg::LeaseTtlAsked {
            from,
            nonce,
            seq,
            id: i64::from_le_bytes(p[17..25].try_into().ok()?),
        }),
        PAYLOAD_LEASE_TTL_ANSWER => {
            let answer = match p.get(17..)? {
                [0] => Ok(None),
                [1, rest @ ..] if rest.len() == 16 => Ok(Some((
                    i64::from_le_bytes(rest[..8].try_into().ok()?),
                    i64::from_le_bytes(rest[8..].try_into().ok()?),
                ))),
                [2] => Err(error::no_leader()),
                _ => return None,
            };
            Some(RaftMsg::LeaseTtlAnswer { nonce, seq, answer })
        }
        PAYLOAD_HASH_ASK if p.len() == 25 => Some(RaftMsg::PeerHashAsked {
            from,
            nonce,
            seq,
            rev: i64::from_le_bytes(p[17..25].try_into().ok()?),
        }),
        PAYLOAD_HASH_ANSWER => {
            let answer = match p.get(17..)? {
                [0, rest @ ..] if rest.len() == 12 => Ok((
                    u32::from_le_bytes(rest[..4].try_into().ok()?),
                    i64::from_le_bytes(rest[4..].try_into().ok()?),
                )),
                [1, st @ ..] => Err(status_from_bytes(st)?),
                _ => return None,
            };
            Some(RaftMsg::PeerHashAnswer { nonce, seq, answer })
        }
        PAYLOAD_MEMBER_REFUSED => Some(RaftMsg::ChangeRefused {
            nonce,
            seq,
            status: status_from_bytes(&p[17..])?,
        }),
        _ => None,
    }
}

/// A gRPC status on the peer wire (a refused change, a refused hash): its
/// code u8, then its message.
fn status_bytes(st: &Status) -> Vec<u8> {
    let mut b = Vec::with_capacity(1 + st.message.len());
    b.push(st.code as u8);
    b.extend_from_slice(st.message.as_bytes());
    b
}

fn status_from_bytes(b: &[u8]) -> Option<Status> {
    let (code, msg) = b.split_first()?;
    Some(Status::new(
        error::Code::from_u8(*code),
        String::from_utf8_lossy(msg).into_owned(),
    ))
}

/// A payload from peer `from` for this member (`me`) as the raft core's
/// message: a raft message (dropped unless it names `from` and `me`) or a
/// membership message. Snapshot chunks are the `SnapshotInbox`'s; anything
/// else is dropped with a log line.
pub fn decode_payload(from: u64, me: u64, payload: &bytes::Bytes) -> Option<RaftMsg> {
    match payload.first() {
        Some(&PAYLOAD_RAFT) => {
            // Entries' data and context are slices of the payload (no copy
            // and no allocation per entry).
            let body = payload.slice(1..);
            let parsed = match decode_raft_message(&body) {
                Some(m) => Ok(m),
                None => <raft::eraftpb::Message as protobuf::Message>::parse_from_carllerche_bytes(
                    &body,
                ),
            };
            match parsed {
                Ok(m) if m.from == from && m.to == me => Some(RaftMsg::Step(Box::new(m))),
                Ok(m) => {
                    crate::debug!(
                        "peer {from:x}: dropping a raft message from {:x} to {:x}",
                        m.from,
                        m.to
                    );
                    None
                }
                Err(e) => {
                    crate::warn!("peer {from:x}: undecodable raft message: {e}");
                    None
                }
            }
        }
        Some(&PAYLOAD_MEMBER_CHANGE)
        | Some(&PAYLOAD_MEMBER_REFUSED)
        | Some(&PAYLOAD_LEASE_TTL_ASK)
        | Some(&PAYLOAD_LEASE_TTL_ANSWER)
        | Some(&PAYLOAD_HASH_ASK)
        | Some(&PAYLOAD_HASH_ANSWER) => {
            let m = decode_member_payload(from, payload);
            if m.is_none() {
                crate::warn!("peer {from:x}: a malformed membership or lease message; dropped");
            }
            m
        }
        _ => {
            crate::warn!("peer {from:x}: a payload of unknown kind; dropped");
            None
        }
    }
}

/// Asks this member's lessor (in the applier) for a lease's
/// (granted TTL, remaining seconds).
fn ask_lessor_ttl(
    router: &Router,
    id: i64,
) -> futures::channel::oneshot::Receiver<Option<(i64, i64)>> {
    let (tx, rx) = futures::channel::oneshot::channel();
    router
        .applier
        .send(ApplierMsg::LeaseTimeToLive { id, reply: tx });
    rx
}

fn member_payload(kind: u8, nonce: u64, seq: u64, rest: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(17 + rest.len());
    b.push(kind);
    b.extend_from_slice(&nonce.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(rest);
    b
}

/// A member's peer addresses (URLs that do not parse are skipped).
pub fn peer_addrs(urls: &[String]) -> Vec<std::net::SocketAddr> {
    urls.iter()
        .filter_map(|u| crate::config::parse_url(u).ok())
        .flatten()
        .collect()
}

/// Each address a member's peer URLs name, with the URL's host (what a
/// TLS peer's certificate must name).
pub fn peer_hosts(urls: &[String]) -> Vec<(std::net::SocketAddr, String)> {
    urls.iter()
        .filter_map(|u| {
            let host = crate::config::url_host(u)?;
            Some(
                crate::config::parse_url(u)
                    .ok()?
                    .into_iter()
                    .map(move |a| (a, host.clone())),
            )
        })
        .flatten()
        .collect()
}

/// Points the transport at every member of `m` and forgets removed ones.
pub fn sync_peers(peers: &dyn Transport, m: &Membership, me: u64) {
    for (id, info) in &m.members {
        if *id != me {
            peers.set_peer(*id, peer_addrs(&info.peer_urls));
            peers.set_peer_hosts(*id, peer_hosts(&info.peer_urls));
        }
    }
    for id in &m.removed {
        peers.mark_removed(*id);
    }
}

/// The network seam: what the raft core needs of the peer transport
/// (`peer::Peers`; a simulated network in `sim`).
pub trait Transport {
    /// Queues a payload for `to`; false if it was dropped.
    fn send(&self, to: u64, payload: bytes::Bytes) -> bool;
    /// Since when the connection to `id` has been up.
    fn active_since(&self, id: u64) -> Option<std::time::Instant>;
    /// Connects to `id` ahead of any message (a transport that has no
    /// connections ignores it).
    fn connect(&self, _id: u64) {}
    /// Bytes waiting to go to `id` (None: unknown member).
    fn queued_bytes(&self, id: u64) -> Option<usize>;
    fn set_peer(&self, id: u64, addrs: Vec<std::net::SocketAddr>);
    /// The host names peer URLs give for addresses (TLS checks a peer's
    /// certificate against them); a transport without TLS ignores them.
    fn set_peer_hosts(&self, _id: u64, _hosts: Vec<(std::net::SocketAddr, String)>) {}
    /// `id` left the cluster: forget it, and tell it so if it calls.
    fn mark_removed(&self, id: u64);
}

impl Transport for crate::peer::Peers {
    fn send(&self, to: u64, payload: bytes::Bytes) -> bool {
        crate::peer::Peers::send(self, to, payload)
    }
    fn active_since(&self, id: u64) -> Option<std::time::Instant> {
        crate::peer::Peers::active_since(self, id)
    }
    fn connect(&self, id: u64) {
        crate::peer::Peers::connect(self, id)
    }
    fn queued_bytes(&self, id: u64) -> Option<usize> {
        crate::peer::Peers::queued_bytes(self, id)
    }
    fn set_peer(&self, id: u64, addrs: Vec<std::net::SocketAddr>) {
        crate::peer::Peers::set_peer(self, id, addrs)
    }
    fn set_peer_hosts(&self, id: u64, hosts: Vec<(std::net::SocketAddr, String)>) {
        crate::peer::Peers::set_peer_hosts(self, id, hosts)
    }
    fn mark_removed(&self, id: u64) {
        crate::peer::Peers::mark_removed(self, id)
    }
}

/// The disk seam: the raft log's durable part (`wal::Wal`; a simulated
/// disk that loses what was not synced at a crash in `sim`).
pub trait LogStore {
    fn push_entries(&mut self, entries: &[Entry]);
    fn push_hard_state(&mut self, hs: &raft::eraftpb::HardState);
    fn has_pending(&self) -> bool;
    /// Writes what was pushed and makes it durable (one durable write).
    fn sync<'a>(
        &'a mut self,
        last: (u64, u64),
        hs: &'a raft::eraftpb::HardState,
    ) -> futures::future::LocalBoxFuture<'a, Result<(), String>>;
    /// Restarts the log after a snapshot at `base` (index, term).
    fn install_snapshot(
        &mut self,
        base: (u64, u64),
    ) -> futures::future::LocalBoxFuture<'_, Result<(), String>>;
    /// Drops what every shard has checkpointed; returns segments freed.
    fn release_to(&mut self, index: u64) -> usize;
}

impl LogStore for Wal {
    fn push_entries(&mut self, entries: &[Entry]) {
        Wal::push_entries(self, entries)
    }
    fn push_hard_state(&mut self, hs: &raft::eraftpb::HardState) {
        Wal::push_hard_state(self, hs)
    }
    fn has_pending(&self) -> bool {
        Wal::has_pending(self)
    }
    fn sync<'a>(
        &'a mut self,
        last: (u64, u64),
        hs: &'a raft::eraftpb::HardState,
    ) -> futures::future::LocalBoxFuture<'a, Result<(), String>> {
        Box::pin(Wal::sync(self, last, hs))
    }
    fn install_snapshot(
        &mut self,
        base: (u64, u64),
    ) -> futures::future::LocalBoxFuture<'_, Result<(), String>> {
        Box::pin(Wal::install_snapshot(self, base))
    }
    fn release_to(&mut self, index: u64) -> usize {
        Wal::release_to(self, index)
    }
}

/// The WAL for `boot`: opened where its recovery left it.
pub async fn open_wal(boot: &RaftBoot) -> Result<Wal, String> {
    let rec = &boot.recovered;
    let last = rec
        .entries
        .last()
        .map(|e| (e.index, e.term))
        .unwrap_or(rec.base);
    let mut wal = Wal::open(&boot.cfg.wal_path(), rec, last).await?;
    if boot.cfg.unsafe_no_fsync {
        crate::warn!(
            "--unsafe-no-fsync: the WAL is not fsynced; a power loss may lose acknowledged writes"
        );
        wal.set_unsafe_no_fsync(true);
    }
    Ok(wal)
}

/// Sends the raft core a tick every `tick` (its clock).
pub fn spawn_ticker(tx: crate::mailbox::Sender<RaftMsg>, tick: Duration) {
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

/// The membership and the changes waiting to apply.
struct Members {
    m: Membership,
    path: std::path::PathBuf,
    waiters: HashMap<u64, ChangeReply>,
    alarm_waiters: HashMap<u64, AlarmReply>,
    auth_waiters: HashMap<u64, futures::channel::oneshot::Sender<Result<(), Status>>>,
    /// Lease TimeToLives forwarded to the leader, by sequence number.
    ttl_waiters: HashMap<u64, TtlReply>,
    /// Hashes asked of peers, by sequence number.
    hash_waiters: HashMap<u64, HashReply>,
    token: String,
    strict: bool,
    /// (enabled, revision) of the auth store the cores were last sent.
    auth_sent: Option<(bool, u64)>,
    /// This member applied its own removal.
    removed_self: bool,
}

impl Members {
    /// Sends every core a copy of the auth store if it changed since the
    /// last one they got.
    /// Sends every core its copy of the auth store if it changed; returns
    /// the cores' acknowledgements (none if nothing was sent).
    fn publish_auth(&mut self, router: &Router) -> Vec<futures::channel::oneshot::Receiver<()>> {
        let now = Some((self.m.auth.enabled, self.m.auth.revision));
        if self.auth_sent == now {
            return Vec::new();
        }
        self.auth_sent = now;
        let auth = std::sync::Arc::new(self.m.auth.clone());
        to_every_core_acked(router, |ack| CoreMsg::Auth(auth.clone(), ack))
    }

    fn save(&self) {
        if let Err(e) = self.m.store(&self.path) {
            fatal(&format!("cannot record the membership: {e}"));
        }
    }

    /// An ID for a member being added: etcd's recipe (its peer URLs, the
    /// cluster token, the time; here in nanoseconds, etcd's in seconds),
    /// never one in use or removed.
    fn new_id(&self, peer_urls: &[String]) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let mut salt = 0u128;
        loop {
            let time = (now + salt).to_string();
            let id = crate::server::member_id_of(peer_urls, &self.token, Some(&time));
            if !self.m.members.contains_key(&id) && !self.m.removed.contains(&id) {
                return id;
            }
            salt += 1;
        }
    }
}

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
/// Client writes taken in one turn of the loop, stepped into raft as one
/// MsgPropose. raft-rs's leader sends an append to every follower for each
/// MsgPropose it steps (and a follower forwards each one to the leader as a
/// message of its own), so proposing writes one at a time costs a message,
/// its encoding, its decoding and its answer per write and per follower;
/// one MsgPropose per turn costs that once per batch.
#[derive(Default)]
struct Proposals {
    entries: Vec<Entry>,
    replies: Vec<(u64, Reply, Option<RaftCommand>)>,
    bytes: usize,
    /// Where the entries' data and contexts are copied to, split off one
    /// after another: raft-rs clones every entry it appends, and a slice of
    /// a shared buffer clones by a reference count, where a `Bytes` made
    /// from its own `Vec` allocates a shared header at its first clone.
    buf: bytes::BytesMut,
}

/// The least a proposal buffer grows by.
const PROPOSE_BUF_CHUNK: usize = 64 << 10;

/// Bounds one MsgPropose (a follower forwards it whole to the leader).
const PROPOSE_BATCH_ENTRIES: usize = 1024;
const PROPOSE_BATCH_BYTES: usize = 1 << 20;

impl Proposals {
    fn add(&mut self, nonce: u64, data: &[u8], id: u64, reply: Reply, cmd: Option<RaftCommand>) {
        let need = data.len() + PROPOSAL_CTX_BYTES;
        self.bytes += need;
        if self.buf.capacity() < need {
            self.buf.reserve(need.max(PROPOSE_BUF_CHUNK));
        }
        let mut e = Entry::default();
        self.buf.extend_from_slice(data);
        e.data = self.buf.split().freeze();
        self.buf.extend_from_slice(&proposal_ctx_bytes(nonce, id));
        e.context = self.buf.split().freeze();
        self.entries.push(e);
        self.replies.push((id, reply, cmd));
    }

    fn full(&self) -> bool {
        self.entries.len() >= PROPOSE_BATCH_ENTRIES || self.bytes >= PROPOSE_BATCH_BYTES
    }

    /// Steps the batch (what `RawNode::propose` does for one entry): each
    /// write waits for its entry, or all get raft's refusal. True if raft
    /// took a batch (and, as leader, sent its followers appends).
    fn step(
        &mut self,
        node: &mut RawNode<MemStorage>,
        waiters: &mut Waiters,
        ticks: u64,
        router: &Router,
    ) -> bool {
        if self.entries.is_empty() {
            return false;
        }
        self.bytes = 0;
        let mut m = raft::eraftpb::Message::default();
        m.set_msg_type(raft::eraftpb::MessageType::MsgPropose);
        m.from = node.raft.id;
        m.set_entries(std::mem::take(&mut self.entries).into());
        match node.raft.step(m) {
            Ok(()) => {
                for (id, reply, cmd) in self.replies.drain(..) {
                    waiters.insert(id, (ticks, reply, cmd));
                }
                true
            }
            Err(e) => {
                let st = raft_refused(e);
                for (_, reply, _) in self.replies.drain(..) {
                    reply.send(Err(st.clone()), router);
                }
                false
            }
        }
    }
}

const PROPOSAL_CTX_BYTES: usize = 16;

/// A proposal's context: the proposing process's nonce and its sequence
/// number, so the member that proposed an entry answers its client
/// (`hand_off` reads it back).
fn proposal_ctx_bytes(nonce: u64, seq: u64) -> [u8; PROPOSAL_CTX_BYTES] {
    let mut ctx = [0; PROPOSAL_CTX_BYTES];
    ctx[..8].copy_from_slice(&nonce.to_le_bytes());
    ctx[8..].copy_from_slice(&seq.to_le_bytes());
    ctx
}

fn proposal_ctx(nonce: u64, seq: u64) -> Vec<u8> {
    proposal_ctx_bytes(nonce, seq).to_vec()
}

/// raft-rs refusing a proposal (no leader, a transfer in progress, ...).
fn raft_refused(e: raft::Error) -> Status {
    Status::new(error::Code::Unavailable, format!("etcdserver: {e}"))
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
        let cs = boot.membership.conf_state();
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
        if hs.term == 0 && last == 0 {
            // A member with nothing on disk starts at term 1, as etcd's
            // bootstrap entries are written at term 1, so its first
            // election is term 2 as on etcd. Raising a term without a
            // vote is always safe.
            hs.term = 1;
        }
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
    let mut cfg = raft::Config {
        id: boot.id,
        election_tick: (boot.cfg.election_timeout.as_millis() as u64 / heartbeat).max(2) as usize,
        heartbeat_tick: 1,
        applied,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: boot.cfg.pre_vote,
        // raft-rs sends every follower an append as soon as the commit
        // advances, and the batch of writes that follows sends another:
        // two appends (and two answers) per follower per batch. The raft
        // loop sends the commit itself, with that next batch's appends when
        // there is one in the same turn, or else on its own (run_raft).
        skip_bcast_commit: true,
        ..Default::default()
    };
    if let Some(t) = boot.election_tick {
        // A fixed election timeout (raft-rs draws one at random from
        // [min, max)): the simulation's runs must not depend on chance.
        cfg.min_election_tick = t;
        cfg.max_election_tick = t + 1;
    }
    cfg.validate().map_err(|e| e.to_string())?;
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    RawNode::new(&cfg, storage, &logger).map_err(|e| e.to_string())
}

/// One tick of the start-up election clock advance (see `tick_advance` in
/// `run_raft`): once more than one peer is connected, a follower that knows
/// no leader yet ticks to two short of its election timeout. Returns the
/// ticks left to look, None when done.
fn advance_ticks(
    node: &mut RawNode<MemStorage>,
    peers: &dyn Transport,
    me: u64,
    left: u64,
) -> Option<u64> {
    let mut active = 0;
    for (id, _) in node.raft.prs().iter() {
        if *id != me {
            if peers.active_since(*id).is_some() {
                active += 1;
            } else {
                peers.connect(*id);
            }
        }
    }
    if active > 1 {
        if node.raft.state == StateRole::Follower && node.raft.leader_id == raft::INVALID_ID {
            let n = node.raft.election_timeout().saturating_sub(2);
            crate::info!(
                "initialized peer connections; fast-forwarding election ticks: {n} of {} ({active} active remote members)",
                node.raft.election_timeout()
            );
            for _ in 0..n {
                node.tick();
            }
        }
        return None;
    }
    left.checked_sub(1).filter(|l| *l > 0)
}

/// Runs the raft core until every sender of `rx` is gone. Its clock is
/// `RaftMsg::Tick` (see `spawn_ticker`), its network `peers`, its disk
/// `wal`: the seams the simulation (`sim`) replaces.
pub async fn run_raft(
    boot: RaftBoot,
    peers_rc: std::rc::Rc<dyn Transport>,
    mut wal: Box<dyn LogStore>,
    rx: Receiver<RaftMsg>,
    router: Arc<Router>,
) {
    let peers: &dyn Transport = &*peers_rc;
    let mut node = match build_node(&boot) {
        Ok(n) => n,
        Err(e) => fatal(&format!("cannot start raft: {e}")),
    };
    drop(boot.recovered);
    // One voter: no need to wait an election timeout to lead.
    if node.raft.prs().conf().voters().ids().len() == 1 {
        let _ = node.campaign();
    }

    let tick = boot.cfg.heartbeat_interval;
    let me = boot.id;
    // etcd's adjustTicks (`--initial-election-tick-advance`): a member of
    // several, once its connections to more than one peer are up (looked
    // at each tick for etcd's 5 s), puts its election clock two ticks short
    // of the timeout, so a new cluster elects its first leader a few ticks
    // after its members meet instead of 10 to 20 ticks later. Ticks left
    // to look; None once done or not asked for.
    let mut tick_advance = (boot.cfg.initial_election_tick_advance
        && node.raft.prs().conf().voters().ids().len() > 1)
        .then(|| (5000 / tick.as_millis().max(1)) as u64);
    if tick_advance.is_some() {
        for id in node.raft.prs().iter().map(|(id, _)| *id) {
            if id != me {
                peers.connect(id);
            }
        }
    }
    // Proposal contexts: (this process's nonce, sequence). The nonce keeps an
    // entry proposed before a restart from answering a new request.
    let nonce = process_nonce(me);
    let mut next_id: u64 = 1;
    let mut ticks: u64 = 0;
    let mut was_leader = false;
    let mut snaps = SnapshotSender {
        inflight: HashMap::new(),
        router: router.clone(),
        peers: peers_rc.clone(),
        data_dir: boot.cfg.data_dir.clone(),
    };
    // A snapshot received and checked, waiting for raft to install it.
    let mut snapshot_body: Option<(crate::snapshot::Header, Vec<u8>, Membership)> = None;
    let mut ms = Members {
        m: boot.membership.clone(),
        path: boot.cfg.data_dir.join("members"),
        waiters: HashMap::new(),
        alarm_waiters: HashMap::new(),
        auth_waiters: HashMap::new(),
        ttl_waiters: HashMap::new(),
        hash_waiters: HashMap::new(),
        token: boot.cfg.initial_cluster_token.clone(),
        strict: boot.cfg.strict_reconfig_check,
        auth_sent: None,
        removed_self: false,
    };
    let exit_on_removal = boot.exit_on_removal;
    let catchup = boot.cfg.snapshot_catchup_entries;
    // A MoveLeader in progress: (target, reply, ticks left).
    let mut transfer: Option<(
        u64,
        futures::channel::oneshot::Sender<Result<(), Status>>,
        u64,
    )> = None;
    let transfer_ticks = (request_timeout(&boot.cfg).as_millis() / tick.as_millis().max(1)) as u64;
    // etcd's readIndexRetryTime: 500 ms.
    let read_retry_ticks = (500 / tick.as_millis().max(1)).max(1) as u64;
    // Writes waiting for their entry: sequence → (tick proposed, reply).
    // A reply to a core cannot tell when its client gave up, so a waiter
    // older than twice the request timeout goes too (its client timed out
    // long ago; its entry was lost in a leader change).
    let mut waiters: Waiters = HashMap::default();
    let waiter_ticks_max = 2 * transfer_ticks.max(1);
    let mut reads: Vec<ReadReply> = Vec::new();
    // Writes that arrived while this member knew no leader: (tick, data,
    // reply, decoded command), oldest first.
    let mut leaderless: std::collections::VecDeque<(u64, Vec<u8>, Reply, Option<RaftCommand>)> =
        std::collections::VecDeque::new();
    // Read batches waiting for their ReadIndex: id → (tick it was last
    // asked at, replies).
    let mut read_batches: HashMap<u64, (u64, Vec<ReadReply>)> = HashMap::new();
    let mut checkpoints = vec![0u64; router.shards.len()];
    let mut published = (0u64, 0u64, 0u64, false, 0u8);
    let mut msgs = Vec::with_capacity(256);
    let mut proposals = Proposals::default();
    // A commit the leader learned that its followers have not been sent.
    let mut commit_unsent = false;
    // Term and vote as last synced to the WAL (recovered ones are durable).
    let mut durable_vote = {
        let hs = node.raft.hard_state();
        (hs.term, hs.vote)
    };

    // A client write joins this turn's proposal batch (stepped at once when
    // the batch is full): from the mailbox, or from `leaderless`.
    macro_rules! add_proposal {
        ($data:expr, $reply:expr, $cmd:expr) => {{
            let id = next_id;
            next_id += 1;
            proposals.add(nonce, &$data, id, $reply, $cmd);
            if proposals.full() {
                proposals.step(&mut node, &mut waiters, ticks, &router);
            }
        }};
    }

    // A client's write: proposed, or held while no leader is known.
    macro_rules! propose {
        ($data:expr, $reply:expr, $cmd:expr) => {{
            let (data, reply, cmd) = ($data, $reply, $cmd);
            if node.raft.leader_id == raft::INVALID_ID {
                // As etcd's raft node, which takes no proposal while it
                // knows no leader: the write waits for one (an election),
                // or its request times out.
                if leaderless.len() < LEADERLESS_MAX {
                    leaderless.push_back((ticks, data, reply, cmd));
                } else {
                    reply.send(Err(error::no_leader()), &router);
                }
            } else {
                add_proposal!(data, reply, cmd);
            }
        }};
    }

    // Ticks arrive as messages (`spawn_ticker`), so the loop sleeps only on
    // its mailbox and never re-arms a timer per turn.
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
        let commit_before = node.raft.raft_log.committed;
        for m in msgs.drain(..) {
            match m {
                RaftMsg::Tick => {
                    node.tick();
                    ticks += 1;
                    if let Some(left) = tick_advance {
                        tick_advance = advance_ticks(&mut node, peers, me, left);
                    }
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
                        waiters.retain(|_, (t, r, _)| {
                            !r.is_canceled() && ticks.saturating_sub(*t) < waiter_ticks_max
                        });
                        ms.waiters.retain(|_, r| !r.is_canceled());
                        ms.alarm_waiters.retain(|_, r| !r.is_canceled());
                        ms.auth_waiters.retain(|_, r| !r.is_canceled());
                        reads.retain(|r| !r.is_canceled());
                        read_batches.retain(|_, (_, rs)| {
                            rs.retain(|r| !r.is_canceled());
                            !rs.is_empty()
                        });
                    }
                    // A ReadIndex that got no answer (the request or the
                    // heartbeats answering it were lost, say to a peer
                    // connection that was down) is asked again, as etcd
                    // retries its read index every 500 ms; answers to the
                    // same batch twice are harmless (the first takes it).
                    let can_read = if node.raft.state == StateRole::Leader {
                        node.raft.commit_to_current_term()
                    } else {
                        node.raft.leader_id != raft::INVALID_ID
                    };
                    if can_read {
                        for (id, (at, _)) in read_batches.iter_mut() {
                            if ticks.saturating_sub(*at) >= read_retry_ticks {
                                *at = ticks;
                                node.read_index(id.to_le_bytes().to_vec());
                            }
                        }
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
                    snaps.sent(&mut node, to, header, &ms.m);
                }
                RaftMsg::Members { reply } => {
                    let _ = reply.send(ms.m.clone());
                }
                RaftMsg::Auth { change, reply } => {
                    use crate::proto::keelson::raft_command::Cmd;
                    next_id += 1;
                    let cmd = Cmd::Auth(change);
                    propose_own(
                        &mut node,
                        nonce,
                        next_id - 1,
                        cmd,
                        reply,
                        &mut ms.auth_waiters,
                    );
                }
                RaftMsg::Alarm { req, reply } => {
                    use crate::proto::keelson::raft_command::Cmd;
                    next_id += 1;
                    let cmd = Cmd::Alarm(req);
                    propose_own(
                        &mut node,
                        nonce,
                        next_id - 1,
                        cmd,
                        reply,
                        &mut ms.alarm_waiters,
                    );
                }
                RaftMsg::ChangeMembers { change, reply } => {
                    let seq = next_id;
                    next_id += 1;
                    ms.waiters.insert(seq, reply);
                    if let Err(st) = route_change(&mut node, peers, &ms, me, nonce, seq, change) {
                        if let Some(r) = ms.waiters.remove(&seq) {
                            let _ = r.send(Err(st));
                        }
                    }
                }
                RaftMsg::ForwardedChange {
                    from,
                    nonce: n,
                    seq,
                    change,
                } => {
                    if ms.m.removed.contains(&from) {
                        continue;
                    }
                    let res = if node.raft.state == StateRole::Leader {
                        propose_change(&mut node, peers, &ms, me, n, seq, change)
                    } else {
                        Err(error::no_leader())
                    };
                    if let Err(st) = res {
                        let rest = status_bytes(&st);
                        let _ = peers.send(
                            from,
                            member_payload(PAYLOAD_MEMBER_REFUSED, n, seq, &rest).into(),
                        );
                    }
                }
                RaftMsg::ChangeRefused {
                    nonce: n,
                    seq,
                    status,
                } => {
                    if n == nonce {
                        if let Some(r) = ms.waiters.remove(&seq) {
                            let _ = r.send(Err(status));
                        }
                    }
                }
                RaftMsg::LeaseTtl { id, reply } => {
                    let leader = node.raft.leader_id;
                    if leader == me {
                        let rx = ask_lessor_ttl(&router, id);
                        glommio::spawn_local(async move {
                            let _ = reply.send(rx.await.map_err(|_| error::stopped()));
                        })
                        .detach();
                    } else if leader == raft::INVALID_ID {
                        let _ = reply.send(Err(error::no_leader()));
                    } else {
                        let seq = next_id;
                        next_id += 1;
                        let payload =
                            member_payload(PAYLOAD_LEASE_TTL_ASK, nonce, seq, &id.to_le_bytes());
                        if peers.send(leader, payload.into()) {
                            // Asks whose client gave up (timed out) and
                            // whose answer never came go here.
                            if ms.ttl_waiters.len() >= 1024 {
                                ms.ttl_waiters.retain(|_, r| !r.is_canceled());
                            }
                            ms.ttl_waiters.insert(seq, reply);
                        } else {
                            let _ = reply.send(Err(error::no_leader()));
                        }
                    }
                }
                RaftMsg::LeaseTtlAsked {
                    from,
                    nonce: n,
                    seq,
                    id,
                } => {
                    if ms.m.removed.contains(&from) {
                        continue;
                    }
                    let leads = node.raft.state == StateRole::Leader;
                    let rx = leads.then(|| ask_lessor_ttl(&router, id));
                    let peers = peers_rc.clone();
                    glommio::spawn_local(async move {
                        let rest: Vec<u8> = match rx {
                            None => vec![2],
                            Some(rx) => match rx.await {
                                Ok(None) => vec![0],
                                Ok(Some((granted, remaining))) => {
                                    let mut b = vec![1];
                                    b.extend_from_slice(&granted.to_le_bytes());
                                    b.extend_from_slice(&remaining.to_le_bytes());
                                    b
                                }
                                Err(_) => vec![2],
                            },
                        };
                        let _ = peers.send(
                            from,
                            member_payload(PAYLOAD_LEASE_TTL_ANSWER, n, seq, &rest).into(),
                        );
                    })
                    .detach();
                }
                RaftMsg::LeaseTtlAnswer {
                    nonce: n,
                    seq,
                    answer,
                } => {
                    if n == nonce {
                        if let Some(r) = ms.ttl_waiters.remove(&seq) {
                            let _ = r.send(answer);
                        }
                    }
                }
                RaftMsg::PeerHash { to, rev, reply } => {
                    let seq = next_id;
                    next_id += 1;
                    let payload = member_payload(PAYLOAD_HASH_ASK, nonce, seq, &rev.to_le_bytes());
                    if peers.send(to, payload.into()) {
                        ms.hash_waiters.retain(|_, r| !r.is_canceled());
                        ms.hash_waiters.insert(seq, reply);
                    } else {
                        let _ = reply.send(Err(error::stopped()));
                    }
                }
                RaftMsg::PeerHashAsked {
                    from,
                    nonce: n,
                    seq,
                    rev,
                } => {
                    if ms.m.removed.contains(&from) || !ms.m.members.contains_key(&from) {
                        continue;
                    }
                    let peers = peers_rc.clone();
                    let router = router.clone();
                    glommio::spawn_local(async move {
                        let rest = match crate::snapshot::hash_at(&router.applier, rev).await {
                            Ok((hash, compact, _)) => {
                                let mut b = vec![0];
                                b.extend_from_slice(&hash.to_le_bytes());
                                b.extend_from_slice(&compact.to_le_bytes());
                                b
                            }
                            Err(st) => [&[1u8][..], &status_bytes(&st)].concat(),
                        };
                        let _ = peers.send(
                            from,
                            member_payload(PAYLOAD_HASH_ANSWER, n, seq, &rest).into(),
                        );
                    })
                    .detach();
                }
                RaftMsg::PeerHashAnswer {
                    nonce: n,
                    seq,
                    answer,
                } => {
                    if n == nonce {
                        if let Some(r) = ms.hash_waiters.remove(&seq) {
                            let _ = r.send(answer);
                        }
                    }
                }
                RaftMsg::Step(m) => {
                    if m.to != me || ms.m.removed.contains(&m.from) {
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
                RaftMsg::Propose { data, reply } => propose!(data, reply, None),
                RaftMsg::ProposeMany(writes) => {
                    for p in writes {
                        propose!(p.data, p.reply, Some(p.cmd));
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
        // Writes that waited for a leader go now, unless their request
        // timed out meanwhile (their clients were answered so).
        if node.raft.leader_id != raft::INVALID_ID {
            while let Some((at, data, reply, cmd)) = leaderless.pop_front() {
                if ticks.saturating_sub(at) >= transfer_ticks {
                    continue;
                }
                add_proposal!(data, reply, cmd);
            }
        } else if ticks % 16 == 0 {
            while leaderless
                .front()
                .is_some_and(|(at, _, _, _)| ticks.saturating_sub(*at) >= transfer_ticks)
            {
                leaderless.pop_front();
            }
        }
        // Client writes of this turn: one MsgPropose for them all.
        // (A batch stepped before the end of the turn, when full, may have
        // gone before the commit advanced: only this last one counts.)
        let stepped = proposals.step(&mut node, &mut waiters, ticks, &router);
        // A commit this turn's messages advanced reaches the followers with
        // this turn's appends, or else with appends of its own (see
        // `skip_bcast_commit` in build_node).
        if node.raft.state == StateRole::Leader {
            let advanced = node.raft.raft_log.committed > commit_before;
            if (advanced || commit_unsent) && !stepped {
                node.raft.bcast_append();
            }
            commit_unsent = false;
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
                    read_batches.insert(id, (ticks, std::mem::take(&mut reads)));
                    node.read_index(id.to_le_bytes().to_vec());
                }
            } else if node.raft.leader_id != raft::INVALID_ID {
                // A follower asks the leader (raft-rs forwards it).
                let id = next_id;
                next_id += 1;
                read_batches.insert(id, (ticks, std::mem::take(&mut reads)));
                node.read_index(id.to_le_bytes().to_vec());
            } else if reads.len() > LEADERLESS_MAX {
                // No leader known: reads wait for one (an election), as
                // etcd retries its read index until the request times out;
                // past the bound, the newest are refused.
                for r in reads.drain(LEADERLESS_MAX..) {
                    let _ = r.send(Err(error::no_leader()));
                }
            }
        }
        if !node.has_ready() {
            continue;
        }
        let mut ready = node.ready();
        // 1. Messages to peers.
        send_messages(&mut node, peers, ready.take_messages(), &mut snaps);
        // 1b. A snapshot from the leader: replaces the shards' data, the
        // in-memory log and the WAL before anything after it.
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            let index = snap.get_metadata().index;
            let term = snap.get_metadata().term;
            let (body, membership) = match snapshot_body.take() {
                Some((h, b, m)) if h.index == index => (b, m),
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
            // Its membership is current as of the leader's hand-off point:
            // changes up to its conf_index are in it already.
            ms.m = membership;
            ms.m.conf_index = ms.m.conf_index.max(index);
            ms.save();
            sync_peers(peers, &ms.m, me);
            crate::info!("raft: snapshot at index {index} installed");
        }
        // 2. Committed entries (durable since an earlier turn).
        hand_off(
            &mut node,
            nonce,
            ready.take_committed_entries(),
            &mut waiters,
            &mut ms,
            peers,
            &router,
        );
        if ms.removed_self {
            // Not one more raft call: raft-rs expects a leader to be in its
            // own configuration (etcd's server stops here too).
            return stop_removed(exit_on_removal);
        }
        // 3. Append and hard state, then one sync — when durability
        // needs one (etcd's raft.MustSync): new entries, or a new term or
        // vote. A hard state that only moves the commit index is written
        // with the next synced batch; recovery does not depend on it (see
        // build_node), and a sync for it alone (each commit a leader
        // learns, each commit a follower hears) would double the syncs.
        let must_sync = !ready.entries().is_empty()
            || ready
                .hs()
                .is_some_and(|hs| (hs.term, hs.vote) != durable_vote);
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
            if let Some((_, replies)) = read_batches.remove(&id) {
                router.applier.send(ApplierMsg::Reads {
                    index: rs.index,
                    replies,
                });
            }
        }
        if must_sync && wal.has_pending() {
            let li = node.store().last_index().unwrap_or(0);
            let last = (li, node.store().term(li).unwrap_or(0));
            let hs = node.raft.hard_state();
            if let Err(e) = wal.sync(last, &hs).await {
                fatal(&e);
            }
            durable_vote = (hs.term, hs.vote);
        }
        send_messages(
            &mut node,
            peers,
            ready.take_persisted_messages(),
            &mut snaps,
        );
        // 5. Advance.
        let commit_before = node.raft.raft_log.committed;
        let mut light = node.advance(ready);
        if let Some(commit) = light.commit_index() {
            node.mut_store().wl().mut_hard_state().set_commit(commit);
            // Recorded with the next batch; recovery does not depend on it
            // (see build_node), it only shortens replay.
            let hs = node.raft.hard_state();
            wal.push_hard_state(&hs);
        }
        send_messages(&mut node, peers, light.take_messages(), &mut snaps);
        // The leader's own sync may have advanced the commit (rarely: its
        // followers' answers are stepped in the turns around its sync, and
        // the commit then moves there): its followers hear of it with the
        // next turn's appends if writes wait in the mailbox (that turn
        // comes at once), or else now.
        if node.raft.state == StateRole::Leader && node.raft.raft_log.committed > commit_before {
            if rx.is_empty() {
                node.raft.bcast_append();
                let msgs = std::mem::take(&mut node.raft.msgs);
                send_messages(&mut node, peers, msgs, &mut snaps);
            } else {
                commit_unsent = true;
            }
        }
        hand_off(
            &mut node,
            nonce,
            light.take_committed_entries(),
            &mut waiters,
            &mut ms,
            peers,
            &router,
        );
        if ms.removed_self {
            return stop_removed(exit_on_removal);
        }
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
        // The commit index is not part of it: every core learns it with
        // each applied batch (`CoreMsg::Applied`), so a write batch costs no
        // message of its own to every core.
        let state = (
            node.raft.term,
            node.raft.leader_id,
            0u64,
            ms.m.is_learner(me),
            alarm_mask(&ms.m),
        );
        // At start and after a snapshot (a change applied here was sent
        // already, before its answer).
        ms.publish_auth(&router);
        if state != published {
            published = state;
            for c in &router.cores {
                c.send(CoreMsg::Raft {
                    term: state.0,
                    leader: state.1,
                    commit: node.raft.raft_log.committed,
                    learner: state.3,
                    alarms: state.4,
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

/// Sends every core the message `msg` makes around an acknowledgement
/// channel; returns the acknowledgements.
fn to_every_core_acked(
    router: &Router,
    msg: impl Fn(futures::channel::oneshot::Sender<()>) -> CoreMsg,
) -> Vec<futures::channel::oneshot::Receiver<()>> {
    router
        .cores
        .iter()
        .map(|c| {
            let (ack, done) = futures::channel::oneshot::channel();
            c.send(msg(ack));
            done
        })
        .collect()
}

/// Answers `reply` with `v` once every acknowledgement in `acks` came (or
/// its core went away), without holding up the raft loop.
fn answer_after<T: 'static>(
    acks: Vec<futures::channel::oneshot::Receiver<()>>,
    reply: futures::channel::oneshot::Sender<T>,
    v: T,
) {
    glommio::spawn_local(async move {
        for done in acks {
            let _ = done.await;
        }
        let _ = reply.send(v);
    })
    .detach();
}

/// At most this many writes wait for a leader; more are refused with
/// etcd's "no leader".
const LEADERLESS_MAX: usize = 10_000;

/// Client writes waiting for their entries, by proposal sequence number:
/// the tick they were proposed at, where the answer goes, and the command
/// decoded if the proposer gave it (`Proposal`).
type Waiters =
    HashMap<u64, (u64, Reply, Option<RaftCommand>), std::hash::BuildHasherDefault<SeqHasher>>;

/// Hashes the sequence numbers of `Waiters` (unique, from one counter):
/// a multiply spreads them over the table, with none of SipHash's cost.
#[derive(Default)]
struct SeqHasher(u64);

impl std::hash::Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// This member applied its own removal: the raft core stops at once, and
/// the process a second later (time for the answers to go out), as
/// etcd's server does.
fn stop_removed(exit_process: bool) {
    crate::error!("the member has been permanently removed from the cluster; stopping");
    if exit_process {
        glommio::spawn_local(async {
            glommio::timer::sleep(Duration::from_secs(1)).await;
            std::process::exit(0);
        })
        .detach();
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
    peers: std::rc::Rc<dyn Transport>,
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
        membership: &Membership,
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
        let mut data = h.encode();
        data.extend_from_slice(membership.encode().as_bytes());
        snap.set_data(data.into());
        snap.mut_metadata().index = h.index;
        snap.mut_metadata().term = term;
        snap.mut_metadata().set_conf_state(membership.conf_state());
        let mut m = raft::eraftpb::Message::default();
        m.set_msg_type(raft::eraftpb::MessageType::MsgSnapshot);
        m.to = to;
        m.from = node.raft.id;
        m.term = node.raft.term;
        m.set_snapshot(snap);
        send_one(node, &*self.peers, &m);
        self.inflight.insert(to, std::time::Instant::now());
    }

    /// Checks a received snapshot's body (`snapshot.part`) against the
    /// header in raft's message.
    fn received_body(
        &self,
        snap: &Snapshot,
    ) -> Result<(crate::snapshot::Header, Vec<u8>, Membership), String> {
        let data = snap.get_data();
        let at = crate::snapshot::Header::BYTES.min(data.len());
        let h = crate::snapshot::Header::decode(&data[..at]).ok_or("bad snapshot header")?;
        let text =
            std::str::from_utf8(&data[at..]).map_err(|_| "bad membership in the snapshot")?;
        let membership =
            Membership::decode(text).map_err(|e| format!("bad membership in the snapshot: {e}"))?;
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
        Ok((h, body, membership))
    }
}

/// Builds a snapshot (the applier), sends its body to `to` in chunks as the
/// peer's queue has room, and reports back to the raft loop.
async fn send_snapshot(to: u64, router: Arc<Router>, peers: std::rc::Rc<dyn Transport>) {
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

fn send_one(node: &mut RawNode<MemStorage>, peers: &dyn Transport, m: &raft::eraftpb::Message) {
    let to = m.to;
    let mut bytes = Vec::new();
    if !encode_raft_message(m, &mut bytes) {
        bytes = vec![PAYLOAD_RAFT];
        if let Err(e) = protobuf::Message::write_to_vec(m, &mut bytes) {
            crate::error!("raft: cannot encode a message for {to:x}: {e}");
            return;
        }
    }
    if !peers.send(to, bytes.into()) {
        node.report_unreachable(to);
    }
}

/// Reads a varint at `*at`, as rust-protobuf does for the values it
/// accepts; None for one longer than 10 bytes or past 64 bits (left to
/// rust-protobuf, which refuses it).
fn get_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let byte = *b.get(*at)?;
        *at += 1;
        if i == 9 && byte > 1 {
            return None;
        }
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The length-delimited field at `*at`: its range in `b`.
fn get_len(b: &[u8], at: &mut usize) -> Option<std::ops::Range<usize>> {
    let n = usize::try_from(get_varint(b, at)?).ok()?;
    let start = *at;
    let end = start.checked_add(n).filter(|&e| e <= b.len())?;
    *at = end;
    Some(start..end)
}

/// A proto3 enum value as rust-protobuf reads one it knows; None for any
/// other (rust-protobuf keeps those as unknown fields).
fn get_enum<E: protobuf::ProtobufEnum>(b: &[u8], at: &mut usize) -> Option<E> {
    E::from_i32(i32::try_from(get_varint(b, at)?).ok()?)
}

/// A bool as rust-protobuf writes one (0 or 1); None for any other varint.
fn get_bool(b: &[u8], at: &mut usize) -> Option<bool> {
    match get_varint(b, at)? {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    }
}

/// A raft message decoded by hand, as rust-protobuf's
/// `parse_from_carllerche_bytes` decodes it (bytes fields are slices of
/// `b`), in one pass without its reader's per-field calls: about 1,000
/// instructions per entry on a follower of three. None for anything but
/// the plain case, which goes to rust-protobuf: a snapshot, a field this
/// does not know, a wire type that does not match, an enum value or a bool
/// not written as rust-protobuf writes them, a length past the end.
fn decode_raft_message(b: &bytes::Bytes) -> Option<raft::eraftpb::Message> {
    let mut m = raft::eraftpb::Message::default();
    let mut at = 0;
    while at < b.len() {
        match get_varint(b, &mut at)? {
            0x08 => m.set_msg_type(get_enum(b, &mut at)?),
            0x10 => m.to = get_varint(b, &mut at)?,
            0x18 => m.from = get_varint(b, &mut at)?,
            0x20 => m.term = get_varint(b, &mut at)?,
            0x28 => m.log_term = get_varint(b, &mut at)?,
            0x30 => m.index = get_varint(b, &mut at)?,
            0x3a => {
                let r = get_len(b, &mut at)?;
                m.entries.push(decode_raft_entry(b, r)?);
            }
            0x40 => m.commit = get_varint(b, &mut at)?,
            0x78 => m.commit_term = get_varint(b, &mut at)?,
            0x68 => m.request_snapshot = get_varint(b, &mut at)?,
            0x50 => m.reject = get_bool(b, &mut at)?,
            0x58 => m.reject_hint = get_varint(b, &mut at)?,
            0x62 => m.context = b.slice(get_len(b, &mut at)?),
            0x70 => m.deprecated_priority = get_varint(b, &mut at)?,
            0x80 => m.priority = get_varint(b, &mut at)? as i64,
            _ => return None,
        }
    }
    Some(m)
}

/// The entry in `b[r]`, for `decode_raft_message`.
fn decode_raft_entry(b: &bytes::Bytes, r: std::ops::Range<usize>) -> Option<Entry> {
    let body = &b[..r.end];
    let mut e = Entry::default();
    let mut i = r.start;
    while i < r.end {
        match get_varint(body, &mut i)? {
            0x08 => e.set_entry_type(get_enum(body, &mut i)?),
            0x10 => e.term = get_varint(body, &mut i)?,
            0x18 => e.index = get_varint(body, &mut i)?,
            0x22 => e.data = b.slice(get_len(body, &mut i)?),
            0x32 => e.context = b.slice(get_len(body, &mut i)?),
            0x28 => e.sync_log = get_bool(body, &mut i)?,
            _ => return None,
        }
    }
    Some(e)
}

/// The bytes a varint field takes (tag of one byte), none when 0.
fn varint_field_len(v: u64) -> usize {
    if v != 0 {
        1 + varint_len(v)
    } else {
        0
    }
}

/// The bytes a bytes field takes (tag of one byte), none when empty.
fn bytes_field_len(b: &[u8]) -> usize {
    if b.is_empty() {
        0
    } else {
        1 + varint_len(b.len() as u64) + b.len()
    }
}

/// The bytes of an entry's fields, as rust-protobuf writes them.
fn raft_entry_len(e: &Entry) -> usize {
    varint_field_len(e.get_entry_type() as u64)
        + varint_field_len(e.term)
        + varint_field_len(e.index)
        + bytes_field_len(&e.data)
        + bytes_field_len(&e.context)
        + varint_field_len(e.sync_log as u64)
}

/// Writes `PAYLOAD_RAFT` and `m` into `out` (empty) byte for byte as
/// rust-protobuf's `write_to_vec` would (fields in its order, defaults
/// left out), in one pass with the buffer sized first: rust-protobuf's
/// size pass, buffered writer and per-field calls cost a leader of three
/// about 1,400 instructions per entry and follower. Returns false, with
/// nothing written, for a message with a snapshot or unknown fields,
/// which go to rust-protobuf instead.
fn encode_raft_message(m: &raft::eraftpb::Message, out: &mut Vec<u8>) -> bool {
    use protobuf::Message as _;
    if m.snapshot.is_some()
        || m.get_unknown_fields().iter().next().is_some()
        || m.entries
            .iter()
            .any(|e| e.get_unknown_fields().iter().next().is_some())
    {
        return false;
    }
    let field = varint_field_len;
    // PAYLOAD_RAFT, then the fields; the last one's tag takes two bytes.
    let mut len = 1
        + field(m.get_msg_type() as u64)
        + field(m.to)
        + field(m.from)
        + field(m.term)
        + field(m.log_term)
        + field(m.index)
        + field(m.commit)
        + field(m.commit_term)
        + field(m.request_snapshot)
        + field(m.reject as u64)
        + field(m.reject_hint)
        + bytes_field_len(&m.context)
        + field(m.deprecated_priority)
        + if m.priority != 0 {
            2 + varint_len(m.priority as u64)
        } else {
            0
        };
    for e in m.entries.iter() {
        let n = raft_entry_len(e);
        len += 1 + varint_len(n as u64) + n;
    }
    out.reserve_exact(len);
    out.push(PAYLOAD_RAFT);
    let put = |out: &mut Vec<u8>, tag: u8, v: u64| {
        if v != 0 {
            out.push(tag);
            encode_varint(v, out);
        }
    };
    let put_bytes = |out: &mut Vec<u8>, tag: u8, b: &[u8]| {
        if !b.is_empty() {
            out.push(tag);
            encode_varint(b.len() as u64, out);
            out.extend_from_slice(b);
        }
    };
    // (field number << 3) | wire type: 0 for varints, 2 for lengths.
    put(out, 1 << 3, m.get_msg_type() as u64);
    put(out, 2 << 3, m.to);
    put(out, 3 << 3, m.from);
    put(out, 4 << 3, m.term);
    put(out, 5 << 3, m.log_term);
    put(out, 6 << 3, m.index);
    for e in m.entries.iter() {
        out.push(7 << 3 | 2);
        encode_varint(raft_entry_len(e) as u64, out);
        put(out, 1 << 3, e.get_entry_type() as u64);
        put(out, 2 << 3, e.term);
        put(out, 3 << 3, e.index);
        put_bytes(out, 4 << 3 | 2, &e.data);
        put_bytes(out, 6 << 3 | 2, &e.context);
        put(out, 5 << 3, e.sync_log as u64);
    }
    put(out, 8 << 3, m.commit);
    // Field 15 takes one byte of tag too (15 << 3 < 128).
    put(out, 15 << 3, m.commit_term);
    put(out, 13 << 3, m.request_snapshot);
    put(out, 10 << 3, m.reject as u64);
    put(out, 11 << 3, m.reject_hint);
    put_bytes(out, 12 << 3 | 2, &m.context);
    put(out, 14 << 3, m.deprecated_priority);
    if m.priority != 0 {
        // Field 16 takes two bytes of tag.
        out.extend_from_slice(&[0x80, 0x01]);
        encode_varint(m.priority as u64, out);
    }
    true
}

/// Sends raft messages to their peers; a snapshot raft wants to send is
/// built and sent by `SnapshotSender` instead.
fn send_messages(
    node: &mut RawNode<MemStorage>,
    peers: &dyn Transport,
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
    waiters: &mut Waiters,
    ms: &mut Members,
    peers: &dyn Transport,
    router: &Router,
) {
    if entries.is_empty() {
        return;
    }
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        // Only the member (and process) that proposed an entry answers it.
        let seq = match e.context.len() {
            PROPOSAL_CTX_BYTES if e.context[..8] == nonce.to_le_bytes() => Some(
                u64::from_le_bytes(e.context[8..].try_into().expect("8 bytes")),
            ),
            _ => None,
        };
        let (reply, given) = match seq.and_then(|s| waiters.remove(&s)) {
            Some((_, r, cmd)) => (Some(r), cmd),
            None => (None, None),
        };
        let cmd = match e.get_entry_type() {
            EntryType::EntryNormal if e.data.is_empty() => None,
            // A client write proposed here comes with its command decoded
            // (the kinds the raft core handles itself, below, never do).
            EntryType::EntryNormal if given.as_ref().is_some_and(is_client_write) => given,
            // From the entry's `Bytes`: a put's key and value stay slices
            // of the entry's data.
            EntryType::EntryNormal => match crate::server::api::decode_command(e.data.clone()) {
                Ok(c) => {
                    use crate::proto::keelson::raft_command::Cmd;
                    if let Some(Cmd::MemberAttributes(a)) = &c.cmd {
                        if e.index > ms.m.conf_index
                            && ms.m.set_attributes(e.index, a.id, &a.name, &a.client_urls)
                        {
                            ms.save();
                        }
                    }
                    if let Some(Cmd::Auth(a)) = &c.cmd {
                        let mut acks = Vec::new();
                        let res = if e.index > ms.m.conf_index {
                            let r = ms.m.auth.apply(a);
                            if r.is_ok() {
                                ms.m.conf_index = e.index;
                                ms.save();
                                // Every core's copy, acknowledged, before
                                // the answer (as for alarms).
                                acks = ms.publish_auth(router);
                            }
                            r
                        } else {
                            Ok(())
                        };
                        if let Some(r) = seq.and_then(|s| ms.auth_waiters.remove(&s)) {
                            answer_after(acks, r, res);
                        }
                    }
                    if let Some(Cmd::Alarm(a)) = &c.cmd {
                        let changed = if e.index > ms.m.conf_index {
                            apply_alarm(&mut ms.m, e.index, a)
                        } else {
                            Vec::new()
                        };
                        let mut acks = Vec::new();
                        if !changed.is_empty() {
                            ms.save();
                            // Every core's copy before the answer, as
                            // for auth; and acknowledged, so a request
                            // the client sends after the answer, on any
                            // connection to this member, sees the alarm.
                            let alarms = alarm_mask(&ms.m);
                            acks =
                                to_every_core_acked(router, |ack| CoreMsg::Alarms { alarms, ack });
                        }
                        if let Some(r) = seq.and_then(|s| ms.alarm_waiters.remove(&s)) {
                            answer_after(acks, r, Ok(changed));
                        }
                    }
                    Some(c)
                }
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
            EntryType::EntryConfChange => {
                apply_member_change(node, ms, peers, &e, seq);
                None
            }
            EntryType::EntryConfChangeV2 => {
                crate::error!(
                    "raft: entry {} is a joint conf change, which keelson never proposes; ignored",
                    e.index
                );
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

/// A command clients' writes make (what `Proposal::cmd` may hold), as
/// opposed to those the raft core handles itself in `hand_off`.
fn is_client_write(c: &RaftCommand) -> bool {
    use crate::proto::keelson::raft_command::Cmd;
    !matches!(
        c.cmd,
        None | Some(Cmd::MemberAttributes(_)) | Some(Cmd::Auth(_)) | Some(Cmd::Alarm(_))
    )
}

/// Proposes one of the raft core's own commands (alarms, auth) with this
/// process's context (nonce, `seq`); `reply` waits in `waiters` to be
/// answered when it applies, or is answered now with why it could not go.
fn propose_own<T>(
    node: &mut RawNode<MemStorage>,
    nonce: u64,
    seq: u64,
    cmd: crate::proto::keelson::raft_command::Cmd,
    reply: futures::channel::oneshot::Sender<Result<T, Status>>,
    waiters: &mut HashMap<u64, futures::channel::oneshot::Sender<Result<T, Status>>>,
) {
    if node.raft.leader_id == raft::INVALID_ID {
        let _ = reply.send(Err(error::no_leader()));
        return;
    }
    let data = RaftCommand { cmd: Some(cmd) }.encode_to_vec();
    match node.propose(proposal_ctx(nonce, seq), data) {
        Ok(()) => {
            waiters.insert(seq, reply);
        }
        Err(e) => {
            let _ = reply.send(Err(raft_refused(e)));
        }
    }
}

/// etcd's alarm types as bits (NOSPACE 1, CORRUPT 2) of the alarms raised.
pub fn alarm_mask(m: &Membership) -> u8 {
    use crate::proto::etcdserverpb::AlarmType;
    m.alarms
        .iter()
        .fold(0u8, |acc, (_, kind)| match AlarmType::try_from(*kind) {
            Ok(AlarmType::Nospace) => acc | 1,
            Ok(AlarmType::Corrupt) => acc | 2,
            _ => acc,
        })
}

/// Raises or clears an alarm (etcd's applyAlarm): returns what changed.
fn apply_alarm(
    m: &mut Membership,
    index: u64,
    a: &crate::proto::etcdserverpb::AlarmRequest,
) -> Vec<(u64, i32)> {
    use crate::proto::etcdserverpb::{alarm_request::AlarmAction, AlarmType};
    let key = (a.member_id, a.alarm);
    let changed = match AlarmAction::try_from(a.action) {
        Ok(AlarmAction::Activate) if a.alarm != AlarmType::None as i32 => m.alarms.insert(key),
        Ok(AlarmAction::Deactivate) => m.alarms.remove(&key),
        _ => false,
    };
    if changed {
        m.conf_index = m.conf_index.max(index);
        crate::warn!(
            "alarm {} {} for member {:x} at index {index}",
            AlarmType::try_from(a.alarm)
                .map(|t| t.as_str_name())
                .unwrap_or("?"),
            if m.alarms.contains(&key) {
                "raised"
            } else {
                "cleared"
            },
            a.member_id
        );
        vec![key]
    } else {
        Vec::new()
    }
}

/// Applies the membership change in a committed ConfChange entry, if it
/// still checks out (every member decides the same: same membership, same
/// order), and answers its requester when that is this member.
fn apply_member_change(
    node: &mut RawNode<MemStorage>,
    ms: &mut Members,
    peers: &dyn Transport,
    e: &Entry,
    seq: Option<u64>,
) {
    let reply = seq.and_then(|s| ms.waiters.remove(&s));
    let answer = |r: Option<ChangeReply>, res| {
        if let Some(r) = r {
            let _ = r.send(res);
        }
    };
    if e.index <= ms.m.conf_index {
        // Already in the membership (and raft's configuration): replayed
        // after a restart or behind a snapshot.
        return;
    }
    let Some((cc, change)) = conf_change_of(e) else {
        crate::error!(
            "raft: entry {} carries a conf change keelson did not write; ignored",
            e.index
        );
        return;
    };
    let kind = Kind::try_from(change.kind).unwrap_or(Kind::Update);
    if let Err(st) = ms.m.check(&change) {
        crate::info!(
            "membership: {kind:?} of member {:x} at index {} refused: {}",
            change.id,
            e.index,
            st.message
        );
        answer(reply, Err(st));
        return;
    }
    match node.apply_conf_change(&cc) {
        Ok(cs) => node.mut_store().wl().set_conf_state(cs),
        Err(err) => {
            crate::warn!(
                "membership: {kind:?} of member {:x} at index {} refused by raft: {err}",
                change.id,
                e.index
            );
            answer(
                reply,
                Err(Status::new(
                    error::Code::FailedPrecondition,
                    format!("etcdserver: {err}"),
                )),
            );
            return;
        }
    }
    ms.m.apply(e.index, &change);
    ms.save();
    let me = node.raft.id;
    sync_peers(peers, &ms.m, me);
    crate::info!(
        "membership: {kind:?} member {:x} {:?} at index {}; voters {:x?}, learners {:x?}",
        change.id,
        change.peer_urls,
        e.index,
        ms.m.voters().collect::<Vec<_>>(),
        ms.m.learners().collect::<Vec<_>>()
    );
    if kind == Kind::Remove && change.id == me {
        ms.removed_self = true;
    }
    answer(reply, Ok((change.id, ms.m.clone())));
}

/// How long a member must have been connected to count as healthy for a
/// membership change (etcd's `HealthInterval`).
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// Sends a membership change to the leader (or checks and proposes it
/// here, when this member leads).
fn route_change(
    node: &mut RawNode<MemStorage>,
    peers: &dyn Transport,
    ms: &Members,
    me: u64,
    nonce: u64,
    seq: u64,
    change: MemberChange,
) -> Result<(), Status> {
    if node.raft.state == StateRole::Leader {
        return propose_change(node, peers, ms, me, nonce, seq, change);
    }
    let leader = node.raft.leader_id;
    if leader == raft::INVALID_ID {
        return Err(error::no_leader());
    }
    let payload = member_payload(PAYLOAD_MEMBER_CHANGE, nonce, seq, &change.encode_to_vec());
    if peers.send(leader, payload.into()) {
        Ok(())
    } else {
        Err(error::no_leader())
    }
}

/// The leader's part of a membership change: etcd's strict
/// reconfiguration checks (quorum of started voters, every voter
/// connected, a learner in sync before promotion), then the proposal, with
/// the requester's context.
fn propose_change(
    node: &mut RawNode<MemStorage>,
    peers: &dyn Transport,
    ms: &Members,
    me: u64,
    nonce: u64,
    seq: u64,
    mut change: MemberChange,
) -> Result<(), Status> {
    let kind = Kind::try_from(change.kind).map_err(|_| {
        Status::new(
            error::Code::InvalidArgument,
            "etcdserver: unknown membership change",
        )
    })?;
    if kind == Kind::Add && change.id == 0 {
        change.id = ms.new_id(&change.peer_urls);
    }
    let voters: Vec<u64> = ms.m.voters().collect();
    let started = ms.m.started_voters();
    if kind == Kind::Promote {
        // etcd's order (mayPromoteMember, then the change's validation):
        // a member raft tracks must be in sync with the leader — a voter
        // too, so promoting a voter that lags says so — then enough
        // started voters, and only then "not found" or "not a learner".
        let leader_match = node.raft.raft_log.last_index();
        if let Some(p) = node.raft.prs().get(change.id) {
            if (p.matched as f64) < (leader_match as f64) * 0.9 {
                return Err(error::learner_not_ready());
            }
        }
        if ms.strict && started + 1 < quorum(voters.len() + 1) {
            return Err(error::member_not_enough_started());
        }
    }
    ms.m.check(&change)?;
    // etcd's isConnectedFullySince: connected for the last health interval.
    let connected = |id: u64| {
        id == me
            || peers
                .active_since(id)
                .map(|t| t.elapsed() >= HEALTH_INTERVAL)
                .unwrap_or(false)
    };
    match kind {
        Kind::Add | Kind::Remove if !ms.strict => {}
        Kind::Add => {
            let n = voters.len() + 1;
            if !change.is_learner && !(started == 1 && n == 2) && started < quorum(n) {
                return Err(error::member_not_enough_started());
            }
            if !voters.iter().all(|&v| connected(v)) {
                return Err(error::unhealthy());
            }
        }
        Kind::Remove if !ms.m.is_learner(change.id) => {
            let rest =
                ms.m.members
                    .iter()
                    .filter(|(id, m)| **id != change.id && !m.learner && !m.name.is_empty())
                    .count();
            let remaining = voters.len().saturating_sub(1);
            if rest < quorum(remaining) {
                return Err(error::member_not_enough_started());
            }
            // A member that is down is safe to remove: it is not part of
            // the active quorum.
            if change.id == me || peers.active_since(change.id).is_some() {
                let active = voters.iter().filter(|&&v| connected(v)).count();
                if active.saturating_sub(1) < quorum(remaining) {
                    return Err(error::unhealthy());
                }
            }
        }
        Kind::Remove | Kind::Update | Kind::Promote => {}
    }
    if node.raft.has_pending_conf() {
        // raft takes one change at a time; etcd's request would time out.
        return Err(error::timeout());
    }
    let mut cc = raft::eraftpb::ConfChange::default();
    cc.set_change_type(ms.m.raft_change(&change));
    cc.node_id = change.id;
    cc.context = change.encode_to_vec().into();
    node.propose_conf_change(proposal_ctx(nonce, seq), cc)
        .map_err(raft_refused)
}

/// A conf change entry as keelson writes it: raft's `ConfChange` with the
/// `MemberChange` it carries as context (naming the same, non-zero ID);
/// `None` for anything else.
pub fn conf_change_of(e: &Entry) -> Option<(raft::eraftpb::ConfChange, MemberChange)> {
    let mut cc = raft::eraftpb::ConfChange::default();
    protobuf::Message::merge_from_bytes(&mut cc, e.data.as_ref()).ok()?;
    let change = MemberChange::decode(cc.context.as_ref())
        .ok()
        .filter(|c| c.id == cc.node_id && c.id != 0)?;
    Some((cc, change))
}

/// etcd's default request timeout: 5s plus two election timeouts.
pub fn request_timeout(cfg: &Config) -> Duration {
    Duration::from_secs(5) + 2 * cfg.election_timeout
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages of every type, with every field at zero and not, values
    /// that take one to ten varint bytes, entries of every type and data
    /// past one and two varint bytes of length.
    fn sample_raft_messages() -> Vec<raft::eraftpb::Message> {
        use raft::eraftpb::{EntryType, Message, MessageType};
        let values = [0u64, 1, 127, 128, 300, 1 << 35, u64::MAX];
        let entry = |i: usize| {
            let mut e = Entry::default();
            e.set_entry_type(match i % 3 {
                0 => EntryType::EntryNormal,
                1 => EntryType::EntryConfChange,
                _ => EntryType::EntryConfChangeV2,
            });
            e.term = values[i % values.len()];
            e.index = values[(i + 3) % values.len()];
            e.data = vec![i as u8; [0, 1, 127, 128, 20000][i % 5]].into();
            e.context = vec![7u8; [0, 16, 200][i % 3]].into();
            e.sync_log = i % 2 == 1;
            e
        };
        let mut out = Vec::new();
        for t in 0..19 {
            for (i, &v) in values.iter().enumerate() {
                let mut m = Message::default();
                m.set_msg_type(<MessageType as protobuf::ProtobufEnum>::from_i32(t).unwrap());
                m.to = v;
                m.from = values[(i + 1) % values.len()];
                m.term = values[(i + 2) % values.len()];
                m.log_term = values[(i + 3) % values.len()];
                m.index = values[(i + 4) % values.len()];
                m.commit = values[(i + 5) % values.len()];
                m.commit_term = values[(i + 6) % values.len()];
                m.request_snapshot = v;
                m.reject = i % 2 == 0;
                m.reject_hint = values[(i + 2) % values.len()];
                m.context = vec![1u8; [0, 8, 130][i % 3]].into();
                m.deprecated_priority = values[(i + 1) % values.len()];
                m.priority = [0i64, 1, -1, i64::MAX, i64::MIN][i % 5];
                m.set_entries((0..(i + t as usize) % 6).map(entry).collect());
                out.push(m);
            }
        }
        out
    }

    /// Raft messages encoded by hand are what rust-protobuf writes, byte
    /// for byte (`sample_raft_messages`); a message with a snapshot is
    /// left to rust-protobuf.
    #[test]
    fn raft_messages_encoded_by_hand_are_what_rust_protobuf_writes() {
        use raft::eraftpb::{Message, Snapshot};
        let samples = sample_raft_messages();
        assert_eq!(samples.len(), 19 * 7);
        for m in &samples {
            let want = [
                &[PAYLOAD_RAFT][..],
                &protobuf::Message::write_to_bytes(m).unwrap(),
            ]
            .concat();
            let mut got = Vec::new();
            assert!(encode_raft_message(m, &mut got));
            assert_eq!(got, want, "{m:?}");
            assert_eq!(got.capacity(), got.len(), "sized exactly");
        }
        let mut m = Message::default();
        m.set_snapshot(Snapshot::default());
        let mut got = Vec::new();
        assert!(!encode_raft_message(&m, &mut got));
        assert!(got.is_empty());
        // A default message (all fields left out).
        assert!(encode_raft_message(&Message::default(), &mut got));
        assert_eq!(got, vec![PAYLOAD_RAFT]);
    }

    /// Raft messages decoded by hand are what rust-protobuf decodes: for
    /// `sample_raft_messages`, and for every truncation and many one-byte
    /// changes of some, the hand decoder gives rust-protobuf's message or
    /// leaves the bytes to it (never a different message, never one where
    /// rust-protobuf refuses).
    #[test]
    fn raft_messages_decoded_by_hand_are_what_rust_protobuf_decodes() {
        use raft::eraftpb::Message;
        let mut cases: Vec<Vec<u8>> = sample_raft_messages()
            .iter()
            .map(|m| protobuf::Message::write_to_bytes(m).unwrap())
            .collect();
        let samples = cases.len();
        for k in [7, 50, 100] {
            let base = cases[k].clone();
            for n in 0..base.len() {
                cases.push(base[..n].to_vec());
                for x in [0u8, 1, 0x08, 0x3a, 0x7f, 0x80, 0xff] {
                    let mut b = base.clone();
                    b[n] = x;
                    cases.push(b);
                }
            }
        }
        // Fields out of order, repeated, and unknown; a snapshot.
        cases.push(vec![0x10, 5, 0x08, 3, 0x10, 6]);
        cases.push(vec![0x90, 0x01, 1]);
        cases.push(vec![0x4a, 0]);
        let mut by_hand = 0;
        for c in &cases {
            let b = bytes::Bytes::from(c.clone());
            let want = <Message as protobuf::Message>::parse_from_carllerche_bytes(&b);
            match decode_raft_message(&b) {
                Some(got) => {
                    by_hand += 1;
                    assert_eq!(Ok(&got), want.as_ref().map_err(|_| ()), "{c:?}");
                }
                None => {}
            }
        }
        assert!(by_hand > samples, "{by_hand}");
    }

    #[test]
    fn peer_payloads_from_a_hostile_peer_never_panic() {
        let change = MemberChange {
            kind: Kind::Promote as i32,
            id: 7,
            peer_urls: vec![],
            is_learner: false,
        };
        let good = member_payload(PAYLOAD_MEMBER_CHANGE, 11, 22, &change.encode_to_vec());
        match decode_member_payload(3, &good) {
            Some(RaftMsg::ForwardedChange {
                from,
                nonce,
                seq,
                change: c,
            }) => assert_eq!((from, nonce, seq, c), (3, 11, 22, change)),
            _ => panic!("a forwarded change"),
        }
        let refused = member_payload(
            PAYLOAD_MEMBER_REFUSED,
            11,
            22,
            b"\x05etcdserver: member not found",
        );
        match decode_member_payload(3, &refused) {
            Some(RaftMsg::ChangeRefused { status, .. }) => {
                assert_eq!(status, error::member_not_found())
            }
            _ => panic!("a refusal"),
        }
        let ask = member_payload(PAYLOAD_LEASE_TTL_ASK, 11, 22, &(-5i64).to_le_bytes());
        match decode_member_payload(3, &ask) {
            Some(RaftMsg::LeaseTtlAsked {
                from,
                nonce,
                seq,
                id,
            }) => {
                assert_eq!((from, nonce, seq, id), (3, 11, 22, -5))
            }
            _ => panic!("a TimeToLive ask"),
        }
        let mut found = vec![1u8];
        found.extend_from_slice(&60i64.to_le_bytes());
        found.extend_from_slice(&42i64.to_le_bytes());
        let answers = [
            (vec![0u8], Some(Ok(None))),
            (found, Some(Ok(Some((60, 42))))),
            (vec![2u8], Some(Err(error::no_leader()))),
            (vec![1u8, 0], None),
            (vec![3u8], None),
            (vec![], None),
        ];
        for (rest, want) in answers {
            let p = member_payload(PAYLOAD_LEASE_TTL_ANSWER, 11, 22, &rest);
            let got = match decode_member_payload(3, &p) {
                Some(RaftMsg::LeaseTtlAnswer {
                    nonce: 11,
                    seq: 22,
                    answer,
                }) => Some(answer),
                None => None,
                _ => panic!("a TimeToLive answer"),
            };
            assert_eq!(got, want, "{rest:?}");
        }
        // A hash asked of a peer, and its answers.
        let hash_ask = member_payload(PAYLOAD_HASH_ASK, 11, 22, &40i64.to_le_bytes());
        match decode_payload(3, 1, &bytes::Bytes::from(hash_ask.clone())) {
            Some(RaftMsg::PeerHashAsked {
                from: 3,
                nonce: 11,
                seq: 22,
                rev: 40,
            }) => {}
            _ => panic!("a hash ask"),
        }
        let mut hashed = vec![0u8];
        hashed.extend_from_slice(&7u32.to_le_bytes());
        hashed.extend_from_slice(&(-1i64).to_le_bytes());
        let future = [&[1u8][..], &status_bytes(&error::future_rev())].concat();
        let answers = [
            (hashed.clone(), Some(Ok((7u32, -1i64)))),
            (future, Some(Err(error::future_rev()))),
            (hashed[..12].to_vec(), None),
            (vec![1u8], None),
            (vec![2u8], None),
        ];
        for (rest, want) in answers {
            let p = member_payload(PAYLOAD_HASH_ANSWER, 11, 22, &rest);
            let got = match decode_payload(3, 1, &bytes::Bytes::from(p)) {
                Some(RaftMsg::PeerHashAnswer {
                    nonce: 11,
                    seq: 22,
                    answer,
                }) => Some(answer),
                None => None,
                _ => panic!("a hash answer"),
            };
            assert_eq!(got, want, "{rest:?}");
        }
        let hash_answer = member_payload(PAYLOAD_HASH_ANSWER, 11, 22, &hashed);
        // Every cut of each, every byte flipped, and junk: an answer or
        // None, never a panic.
        for p in [&good, &refused, &ask, &hash_ask, &hash_answer] {
            for n in 0..p.len() {
                let _ = decode_payload(3, 1, &bytes::Bytes::copy_from_slice(&p[..n]));
                let mut q = p.clone();
                q[n] ^= 0xff;
                let _ = decode_payload(3, 1, &bytes::Bytes::from(q));
            }
        }
        for junk in [
            &b""[..],
            b"\x00",
            b"\x00\xff\xff",
            b"\x02",
            b"\x03\x01",
            b"\x09abc",
        ] {
            let _ = decode_payload(3, 1, &bytes::Bytes::copy_from_slice(junk));
        }
        // A raft message that names another sender or receiver is dropped.
        let mut m = raft::eraftpb::Message::default();
        m.from = 4;
        m.to = 1;
        let mut b = vec![PAYLOAD_RAFT];
        protobuf::Message::write_to_vec(&m, &mut b).unwrap();
        let b = bytes::Bytes::from(b);
        assert!(decode_payload(3, 1, &b).is_none());
        assert!(matches!(decode_payload(4, 1, &b), Some(RaftMsg::Step(_))));
        assert!(decode_payload(4, 2, &b).is_none());
    }

    #[test]
    fn codes_round_trip_and_unknown_codes_are_unknown() {
        for n in 0..=16u8 {
            assert_eq!(error::Code::from_u8(n) as u8, n);
        }
        assert_eq!(error::Code::from_u8(200), error::Code::Unknown);
    }
}
