//! Process startup and the per-core runtime.
//!
//! `run` reads the data dir (meta, shard checkpoints, WAL), then starts one
//! glommio executor per core. Every core accepts client connections on its
//! own SO_REUSEPORT socket and serves gRPC; shard s runs on core s mod N;
//! core 0 also runs the raft core and the applier. Cores share only the
//! `Router` (mailbox senders, immutable after start) and talk by messages.

pub mod api;
pub mod auth;
mod compactor;
pub mod coord;
pub mod gateway;
pub mod grpc;
pub mod http;
mod io;
pub mod tls;
pub mod watch;
pub mod writes;

use crate::apply::{self, ApplierMsg, ShardMsg};
use crate::config::Config;
use crate::mailbox::{mailbox, Receiver, Sender};
use crate::raftcore::{self, RaftBoot, RaftMsg};
use crate::store::shard::Shard;
use crate::wal;
use glommio::{LocalExecutorBuilder, Placement};
use std::cell::Cell;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

/// What every core may read: the mailboxes of every task, and the facts
/// about this member that never change while it runs.
pub struct Router {
    pub raft: Sender<RaftMsg>,
    pub applier: Sender<ApplierMsg>,
    pub shards: Vec<Sender<ShardMsg>>,
    pub cores: Vec<Sender<CoreMsg>>,
    pub member: Member,
}

#[derive(Debug, Clone)]
pub struct Member {
    pub id: u64,
    pub cluster_id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub max_request_bytes: usize,
    pub request_timeout: std::time::Duration,
    /// etcd's minimum lease TTL in seconds (1.5 election timeouts).
    pub min_lease_ttl: i64,
    /// How often watchers that asked for progress notifications get one.
    pub watch_progress_notify_interval: std::time::Duration,
    pub data_dir: std::path::PathBuf,
    pub election_timeout: std::time::Duration,
    /// How long an auth token is good for (`--auth-token-ttl`).
    pub auth_token_ttl: std::time::Duration,
    /// `--auth-token jwt,…`: the JWT keys, else keelson's simple tokens.
    pub jwt: Option<Arc<crate::jwt::Jwt>>,
    /// The most ops a txn may have (`--max-txn-ops`).
    pub max_txn_ops: usize,
    /// The JSON gateway is served (`--enable-grpc-gateway`).
    pub grpc_gateway: bool,
    /// HTTP/2 streams per client connection (`--max-concurrent-streams`).
    pub max_concurrent_streams: u32,
    /// The database size past which puts, txns and lease grants raise
    /// NOSPACE (`--quota-backend-bytes`); `None`: no quota.
    pub quota_bytes: Option<u64>,
    /// Server pings on gRPC connections: (interval, timeout), from
    /// `--grpc-keepalive-interval` and `--grpc-keepalive-timeout`.
    pub grpc_keepalive: Option<(std::time::Duration, std::time::Duration)>,
    /// `--cors` and `--host-whitelist` (the client port's HTTP/1).
    pub cors: Vec<String>,
    pub host_whitelist: Vec<String>,
    /// The lease checkpoint interval when checkpoints are on
    /// (`--experimental-enable-lease-checkpoint`).
    pub lease_checkpoint: Option<std::time::Duration>,
}

/// The WAL's directory, checked against where this data dir's WAL was
/// before, so a member never starts on an empty WAL while its log is
/// elsewhere (that would lose what the shards had not checkpointed):
/// `data-dir/wal-dir` records a `--wal-dir` once it is used, and a start
/// that names another place (or none) is refused, as is a `--wal-dir`
/// while the data dir's own `wal` holds segments.
fn check_wal_dir(cfg: &Config) -> Result<std::path::PathBuf, String> {
    let wal_path = std::path::absolute(cfg.wal_path()).map_err(|e| format!("--wal-dir: {e}"))?;
    let default_wal = std::path::absolute(wal::wal_dir(&cfg.data_dir))
        .map_err(|e| format!("{}: {e}", cfg.data_dir.display()))?;
    let marker = cfg.data_dir.join("wal-dir");
    let recorded = match fs::read_to_string(&marker) {
        Ok(t) => Some(std::path::PathBuf::from(t.trim_end_matches('\n'))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("{}: {e}", marker.display())),
    };
    match recorded {
        Some(r) if r != wal_path => Err(format!(
            "this data dir's WAL is in {} (--wal-dir), not {}: refusing to start",
            r.display(),
            wal_path.display()
        )),
        Some(_) => Ok(wal_path),
        None if wal_path == default_wal => Ok(wal_path),
        None if dir_has_files(&default_wal) => Err(format!(
            "{} holds a WAL but --wal-dir is {}: refusing to start (move the WAL there, or leave --wal-dir out)",
            default_wal.display(),
            wal_path.display()
        )),
        None => {
            let text = format!("{}\n", wal_path.display());
            write_atomically(&marker, &text)?;
            Ok(wal_path)
        }
    }
}

/// Whether `dir` exists and holds anything.
fn dir_has_files(dir: &std::path::Path) -> bool {
    fs::read_dir(dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// News for every core: the applied index and revisions, and raft state.
pub enum CoreMsg {
    Applied {
        applied: u64,
        revision: i64,
        compact_revision: i64,
        /// The highest log index the applier was handed (committed).
        commit: u64,
        /// What the shards' segment files take (the database size).
        db_bytes: u64,
        /// Answers to this core's clients' writes that completed with it.
        written: Vec<(
            writes::WriteSlot,
            Result<apply::WriteResult, crate::error::Status>,
        )>,
    },
    /// Answers to writes that did not get as far as the log (refused by
    /// the raft core).
    Written(
        Vec<(
            writes::WriteSlot,
            Result<apply::WriteResult, crate::error::Status>,
        )>,
    ),
    Raft {
        term: u64,
        leader: u64,
        commit: u64,
        /// This member is a learner.
        learner: bool,
        /// The alarms raised (`raftcore::alarm_mask`).
        alarms: u8,
    },
    /// The alarms changed: the core's copy, acknowledged once it is in
    /// the `View`, so the raft core answers `Alarm` only after every core
    /// checks requests against the new alarms.
    Alarms {
        alarms: u8,
        ack: futures::channel::oneshot::Sender<()>,
    },
    /// This core's counts, for /metrics.
    Rpcs {
        reply: futures::channel::oneshot::Sender<CoreCounts>,
    },
    /// The auth store changed: the core's copy, acknowledged once it is in
    /// the `View`.
    Auth(
        std::sync::Arc<crate::auth::AuthState>,
        futures::channel::oneshot::Sender<()>,
    ),
    /// Live changes from a shard for this core's watchers.
    WatchEvents {
        shard: usize,
        events: Vec<crate::watch::ShardEvent>,
    },
    /// The shards' data was replaced by a snapshot: every watcher reads
    /// history again from the last revision it delivered.
    WatchResync,
    /// A shard's answer to a watcher's history request.
    WatchHistory {
        shard: usize,
        watcher: u32,
        epoch: u64,
        history: crate::watch::History,
    },
    /// A shard registered one of this core's watch groups; every change
    /// it applies after `rev` comes as a live event.
    WatchRegistered {
        shard: usize,
        group: u32,
        tag: u64,
        rev: i64,
    },
}

/// Where `Core::rpcs` keeps the count of calls started (after the 17
/// gRPC codes).
pub const STARTED: u8 = 17;

/// A gRPC method, as counted for /metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    Unary(api::Method),
    Stream(api::StreamMethod),
}

impl Rpc {
    /// Every method: unary ones, then streaming ones (`index` order).
    pub const ALL: &'static [Rpc] = &{
        const U: usize = api::Method::ALL.len();
        const N: usize = U + api::StreamMethod::ALL.len();
        let mut all = [Rpc::Unary(api::Method::Range); N];
        let mut i = 0;
        while i < N {
            all[i] = if i < U {
                Rpc::Unary(api::Method::ALL[i])
            } else {
                Rpc::Stream(api::StreamMethod::ALL[i - U])
            };
            i += 1;
        }
        all
    };

    /// Where `Core::rpcs` counts it.
    pub fn index(self) -> usize {
        match self {
            Rpc::Unary(m) => m as usize,
            Rpc::Stream(m) => api::Method::ALL.len() + m as usize,
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Rpc::Unary(m) => m.path(),
            Rpc::Stream(m) => m.path(),
        }
    }
}

impl From<api::Method> for Rpc {
    fn from(m: api::Method) -> Rpc {
        Rpc::Unary(m)
    }
}

impl From<api::StreamMethod> for Rpc {
    fn from(m: api::StreamMethod) -> Rpc {
        Rpc::Stream(m)
    }
}

/// What one core counted, for /metrics.
pub struct CoreCounts {
    /// RPCs called here: method path, count completed per gRPC code, then
    /// the count started.
    pub rpcs: Vec<(&'static str, [u64; 18])>,
    /// Everything else its thread counted (`metrics`).
    pub counts: crate::metrics::Counts,
    /// Its clients' writes waiting for the log.
    pub writes_pending: usize,
}

/// A core's view of the node, refreshed by `CoreMsg`s. Serializable reads
/// and response headers use it without asking another core.
#[derive(Default)]
pub struct View {
    pub applied: Cell<u64>,
    pub revision: Cell<i64>,
    pub compact_revision: Cell<i64>,
    pub term: Cell<u64>,
    pub leader: Cell<u64>,
    pub commit: Cell<u64>,
    pub learner: Cell<bool>,
    pub alarms: Cell<u8>,
    /// The member's database size as the applier last told.
    pub db_bytes: Cell<u64>,
    /// Leaders seen since start (`etcd_server_leader_changes_seen_total`).
    pub leader_changes: Cell<u64>,
    pub auth: std::cell::RefCell<std::sync::Arc<crate::auth::AuthState>>,
    /// Told once, when this core first learns of a leader: the member
    /// says it is ready to serve only after every core has (as etcd does
    /// once it has a leader and has published itself).
    pub first_leader: std::cell::RefCell<Option<std::sync::mpsc::Sender<()>>>,
}

impl View {
    fn apply(&self, m: CoreMsg) {
        match m {
            CoreMsg::WatchEvents { .. }
            | CoreMsg::WatchHistory { .. }
            | CoreMsg::WatchRegistered { .. }
            | CoreMsg::WatchResync
            | CoreMsg::Written(_)
            | CoreMsg::Rpcs { .. } => {}
            CoreMsg::Auth(a, ack) => {
                *self.auth.borrow_mut() = a;
                let _ = ack.send(());
            }
            CoreMsg::Alarms { alarms, ack } => {
                self.alarms.set(alarms);
                let _ = ack.send(());
            }
            CoreMsg::Applied {
                applied,
                revision,
                compact_revision,
                commit,
                db_bytes,
                ..
            } => {
                self.db_bytes.set(db_bytes);
                self.commit.set(self.commit.get().max(commit));
                self.applied.set(self.applied.get().max(applied));
                self.revision.set(self.revision.get().max(revision));
                self.compact_revision
                    .set(self.compact_revision.get().max(compact_revision));
            }
            CoreMsg::Raft {
                term,
                leader,
                commit,
                learner,
                alarms,
            } => {
                self.alarms.set(alarms);
                self.term.set(term);
                // etcd counts a leader it had not just seen (none in
                // between counts again).
                if leader != 0 && leader != self.leader.get() {
                    self.leader_changes.set(self.leader_changes.get() + 1);
                }
                self.leader.set(leader);
                self.commit.set(self.commit.get().max(commit));
                self.learner.set(learner);
                if leader != 0 {
                    if let Some(tx) = self.first_leader.borrow_mut().take() {
                        let _ = tx.send(());
                    }
                }
            }
        }
    }
}

/// Per-core context handed to every connection on that core.
pub struct Core {
    pub id: usize,
    pub router: Arc<Router>,
    pub view: View,
    pub watch: watch::Hub,
    /// This core itself, for tasks it spawns.
    pub me: std::rc::Weak<Core>,
    /// RPCs here, by `Rpc::index`: the count completed per gRPC code, then
    /// the count started.
    pub rpcs: std::cell::RefCell<Vec<[u64; 18]>>,
    /// Writes this core's clients wait for.
    pub writes: writes::Writes,
}

impl Core {
    /// Counts a finished RPC under its gRPC code (0 for success).
    pub fn count_result<T>(&self, rpc: impl Into<Rpc>, r: &Result<T, crate::error::Status>) {
        self.count_rpc(
            rpc.into(),
            r.as_ref().err().map(|s| s.code as u8).unwrap_or(0),
        );
    }

    /// Counts an RPC handed to its handler (`grpc_server_started_total`).
    pub fn count_started(&self, rpc: impl Into<Rpc>) {
        self.count_rpc(rpc.into(), STARTED);
    }

    fn count_rpc(&self, rpc: Rpc, code: u8) {
        let code = (code as usize).min(STARTED as usize);
        if let Some(n) = self.rpcs.borrow_mut().get_mut(rpc.index()) {
            n[code] += 1;
        }
    }

    /// Handles a batch of messages from other cores.
    fn on_msgs(&self, msgs: &mut Vec<CoreMsg>) {
        for m in msgs.drain(..) {
            match m {
                CoreMsg::WatchEvents { shard, events } => self.watch.on_events(shard, events),
                CoreMsg::WatchResync => self.watch.resync_all(),
                CoreMsg::WatchHistory {
                    shard,
                    watcher,
                    epoch,
                    history,
                } => self.watch.on_history(self, shard, watcher, epoch, history),
                CoreMsg::WatchRegistered {
                    shard,
                    group,
                    tag,
                    rev,
                } => self.watch.on_registered(shard, group, tag, rev),
                CoreMsg::Applied {
                    applied,
                    revision,
                    compact_revision,
                    commit,
                    db_bytes,
                    written,
                } => {
                    self.watch.on_applied(applied, revision);
                    // The view first: a client answered here reads at
                    // least the revision of its own write.
                    self.view.apply(CoreMsg::Applied {
                        applied,
                        revision,
                        compact_revision,
                        commit,
                        db_bytes,
                        written: Vec::new(),
                    });
                    for (slot, res) in written {
                        self.writes.finish(slot, res);
                    }
                }
                CoreMsg::Written(written) => {
                    // Refused by the raft core: etcd counts such a
                    // proposal as failed.
                    for (slot, res) in written {
                        let failed = res.is_err();
                        if self.writes.finish(slot, res) && failed {
                            crate::metrics::count(|c| c.proposals_failed += 1);
                        }
                    }
                }
                CoreMsg::Raft { .. } | CoreMsg::Auth(..) | CoreMsg::Alarms { .. } => {
                    self.view.apply(m)
                }
                CoreMsg::Rpcs { reply } => {
                    let _ = reply.send(CoreCounts {
                        rpcs: self
                            .rpcs
                            .borrow()
                            .iter()
                            .zip(Rpc::ALL)
                            .filter(|(n, _)| n.iter().any(|&c| c != 0))
                            .map(|(n, rpc)| (rpc.path(), *n))
                            .collect(),
                        counts: crate::metrics::local(),
                        writes_pending: self.writes.in_progress(),
                    });
                }
            }
        }
        self.watch.flush(self);
    }
}

/// etcd's ID recipe: the first 8 bytes of the SHA-1 of `bytes`, big
/// endian.
pub fn sha1_id(bytes: &[u8]) -> u64 {
    use sha1::Digest;
    let h = sha1::Sha1::digest(bytes);
    u64::from_be_bytes(h[..8].try_into().expect("a SHA-1 has 20 bytes"))
}

/// A member's ID as etcd computes it (`NewMember`): its sorted peer URLs,
/// the cluster token and, for a member added later, a time, concatenated.
pub fn member_id_of(peer_urls: &[String], token: &str, time: Option<&str>) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut b = urls.concat().into_bytes();
    b.extend_from_slice(token.as_bytes());
    if let Some(t) = time {
        b.extend_from_slice(t.as_bytes());
    }
    sha1_id(&b)
}

/// The cluster ID of a new cluster, as etcd computes it (`genID`): its
/// members' sorted IDs, big endian, hashed; so a keelson cluster started
/// with etcd's flags has etcd's member and cluster IDs.
pub fn cluster_id_of(peers: &[PeerInfo]) -> u64 {
    let mut ids: Vec<u64> = peers.iter().map(|p| p.id).collect();
    ids.sort_unstable();
    let b: Vec<u8> = ids.iter().flat_map(|id| id.to_be_bytes()).collect();
    sha1_id(&b)
}

/// A member of the cluster as bootstrapped: ID, name, peer URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
}

/// `data-dir/meta`: the facts fixed when the data dir was created.
pub(crate) struct Meta {
    pub(crate) shards: usize,
    pub(crate) member_id: u64,
    pub(crate) cluster_id: u64,
    /// Every member the cluster was bootstrapped with (this one included).
    members: Vec<PeerInfo>,
}

/// A member as one line of a data dir file: `id-hex TAB name TAB urls`
/// (URLs separated by spaces).
pub fn member_line(id: u64, name: &str, urls: &[String]) -> String {
    format!("{id:x}\t{name}\t{}", urls.join(" "))
}

pub fn parse_member_line(line: &str) -> Option<(u64, String, Vec<String>)> {
    let mut f = line.split('\t');
    let id = u64::from_str_radix(f.next()?, 16).ok()?;
    let name = f.next()?.to_string();
    let urls = f
        .next()
        .unwrap_or("")
        .split(' ')
        .filter(|u| !u.is_empty())
        .map(|u| u.to_string())
        .collect();
    Some((id, name, urls))
}

/// The members named by `--initial-cluster` (a name listed several times
/// has several peer URLs), each with its ID: etcd's hash of its sorted peer
/// URLs and the cluster token, so every member computes the same IDs, and
/// the same as etcd's.
pub fn initial_peers(cfg: &Config) -> Result<Vec<PeerInfo>, String> {
    let mut by_name: Vec<PeerInfo> = Vec::new();
    for (name, url) in cfg.initial_members()? {
        match by_name.iter_mut().find(|p| p.name == name) {
            Some(p) => p.peer_urls.push(url),
            None => by_name.push(PeerInfo {
                id: 0,
                name,
                peer_urls: vec![url],
            }),
        }
    }
    for p in &mut by_name {
        p.peer_urls.sort();
        p.id = member_id_of(&p.peer_urls, &cfg.initial_cluster_token, None);
    }
    let mut ids: Vec<u64> = by_name.iter().map(|p| p.id).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != by_name.len() {
        return Err("--initial-cluster: two members have the same peer URLs".into());
    }
    Ok(by_name)
}

pub(crate) fn load_or_create_meta(cfg: &Config) -> Result<Meta, String> {
    let path = cfg.data_dir.join("meta");
    match fs::read_to_string(&path) {
        Ok(text) => {
            let mut shards = None;
            let mut member_id = None;
            let mut cluster_id = None;
            let mut format_ok = false;
            let mut members = Vec::new();
            for line in text.lines() {
                match line.split_once('=') {
                    Some(("format", "keelson-1")) => format_ok = true,
                    Some(("shards", v)) => shards = v.parse::<usize>().ok(),
                    Some(("member_id", v)) => member_id = u64::from_str_radix(v, 16).ok(),
                    Some(("cluster_id", v)) => cluster_id = u64::from_str_radix(v, 16).ok(),
                    Some(("member", v)) => match parse_member_line(v) {
                        Some((id, name, urls)) if !urls.is_empty() => members.push(PeerInfo {
                            id,
                            name,
                            peer_urls: urls,
                        }),
                        _ => return Err(format!("{}: bad member line {line:?}", path.display())),
                    },
                    _ => {}
                }
            }
            match (format_ok, shards, member_id, cluster_id) {
                (true, Some(s), Some(m), Some(c)) if s >= 1 => {
                    if let Some(want) = cfg.shards {
                        if want != s {
                            crate::warn!(
                                "--shards={want} ignored: the data dir was created with {s} shards"
                            );
                        }
                    }
                    if members.is_empty() {
                        // Written before clusters: this member alone.
                        members.push(PeerInfo {
                            id: m,
                            name: cfg.name.clone(),
                            peer_urls: cfg.initial_advertise_peer_urls.clone(),
                        });
                    }
                    if !members.iter().any(|p| p.id == m) {
                        return Err(format!(
                            "{}: this member is not among its members",
                            path.display()
                        ));
                    }
                    Ok(Meta {
                        shards: s,
                        member_id: m,
                        cluster_id: c,
                        members,
                    })
                }
                _ => Err(format!("{}: not a valid keelson meta file", path.display())),
            }
        }
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && cfg.initial_cluster_state == "existing" =>
        {
            let shards = cfg.new_data_dir_shards();
            let (me, m) = join_existing(cfg)?;
            let mut text = format!(
                "format=keelson-1\nshards={shards}\nmember_id={me:x}\ncluster_id={:x}\n",
                m.cluster_id
            );
            let members: Vec<PeerInfo> = m
                .members
                .iter()
                .map(|(id, i)| PeerInfo {
                    id: *id,
                    name: if *id == me {
                        cfg.name.clone()
                    } else {
                        i.name.clone()
                    },
                    peer_urls: i.peer_urls.clone(),
                })
                .collect();
            for p in &members {
                text.push_str(&format!(
                    "member={}\n",
                    member_line(p.id, &p.name, &p.peer_urls)
                ));
            }
            // The membership first: a meta without it would bootstrap one.
            m.store(&cfg.data_dir.join("members"))?;
            write_atomically(&path, &text)?;
            Ok(Meta {
                shards,
                member_id: me,
                cluster_id: m.cluster_id,
                members,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let shards = cfg.new_data_dir_shards();
            let peers = initial_peers(cfg)?;
            let mut mine = cfg.initial_advertise_peer_urls.clone();
            mine.sort();
            let Some(me) = peers.iter().find(|p| p.name == cfg.name) else {
                return Err(format!(
                    "couldn't find local name {:?} in the initial cluster configuration",
                    cfg.name
                ));
            };
            if me.peer_urls != mine {
                return Err(format!(
                    "--initial-cluster has {}={} but missing from --initial-advertise-peer-urls={}",
                    me.name,
                    me.peer_urls.join(","),
                    cfg.initial_advertise_peer_urls.join(",")
                ));
            }
            let member_id = me.id;
            let cluster_id = cluster_id_of(&peers);
            let mut text = format!("format=keelson-1\nshards={shards}\nmember_id={member_id:x}\ncluster_id={cluster_id:x}\n");
            for p in &peers {
                text.push_str(&format!(
                    "member={}\n",
                    member_line(p.id, &p.name, &p.peer_urls)
                ));
            }
            write_atomically(&path, &text)?;
            Ok(Meta {
                shards,
                member_id,
                cluster_id,
                members: peers,
            })
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text)
        .and_then(|_| fs::File::open(&tmp)?.sync_all())
        .and_then(|_| fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A new member joining a running cluster (`--initial-cluster-state
/// existing`, empty data dir): asks the other members named in
/// `--initial-cluster` for the membership, and finds itself in it by its
/// peer URLs (it was added with `member add`). Returns its ID and the
/// membership. The checks are etcd's: the same number of members as
/// `--initial-cluster` names, and not a member that started before.
fn join_existing(cfg: &Config) -> Result<(u64, crate::membership::Membership), String> {
    let peer_tls = tls::peer_config(cfg)?;
    let mut mine = cfg.initial_advertise_peer_urls.clone();
    mine.sort();
    let mut names = std::collections::BTreeSet::new();
    let mut others = Vec::new();
    for (name, url) in cfg.initial_members()? {
        names.insert(name.clone());
        if !mine.contains(&url) {
            others.push(url);
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut last_err = String::from("no other member in --initial-cluster");
    let answer = 'found: loop {
        for url in &others {
            for addr in crate::config::parse_url(url).unwrap_or_default() {
                match crate::peer::request_join(
                    addr,
                    crate::config::url_host(url).as_deref(),
                    std::time::Duration::from_secs(2),
                    peer_tls.as_ref(),
                ) {
                    Ok(a) => break 'found a,
                    Err(e) => last_err = format!("{url}: {e}"),
                }
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "cannot fetch cluster info from peer urls: could not retrieve cluster information from the given URLs ({last_err})"
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let text =
        String::from_utf8(answer).map_err(|_| "the membership answer is not text".to_string())?;
    let m = crate::membership::Membership::decode(&text)
        .map_err(|e| format!("the membership answer: {e}"))?;
    let Some((&me, info)) = m.members.iter().find(|(_, i)| {
        let mut u = i.peer_urls.clone();
        u.sort();
        u == mine
    }) else {
        return Err(format!(
            "error validating peerURLs: no member of the cluster has the peer URLs {} (add it first with `etcdctl member add`)",
            mine.join(",")
        ));
    };
    if names.len() != m.members.len() {
        return Err(format!(
            "error validating peerURLs: member count is unequal (--initial-cluster names {}, the cluster has {})",
            names.len(),
            m.members.len()
        ));
    }
    if !info.name.is_empty() {
        return Err(format!("member {me:x} has already been bootstrapped"));
    }
    crate::info!(
        "joining cluster {:x} as member {me:x}{}",
        m.cluster_id,
        if info.learner { " (learner)" } else { "" }
    );
    Ok((me, m))
}

/// The membership: `data-dir/members`, or the bootstrap members of the
/// meta file when there is none yet (a new data dir, or one written before
/// membership changes existed).
pub(crate) fn load_membership(
    cfg: &Config,
    meta: &Meta,
) -> Result<crate::membership::Membership, String> {
    use crate::membership::{MemberInfo, Membership};
    let path = cfg.data_dir.join("members");
    let old_format = fs::read_to_string(&path)
        .map(|t| !t.is_empty() && !t.lines().any(|l| l.contains('=')))
        .unwrap_or(false);
    if !old_format {
        if let Some(m) = Membership::load(&path)? {
            if m.cluster_id != meta.cluster_id {
                return Err(format!(
                    "{}: cluster {:x}, but the data dir belongs to cluster {:x}",
                    path.display(),
                    m.cluster_id,
                    meta.cluster_id
                ));
            }
            return Ok(m);
        }
    }
    let mut m = Membership {
        cluster_id: meta.cluster_id,
        ..Default::default()
    };
    for p in &meta.members {
        m.members.insert(
            p.id,
            MemberInfo {
                name: p.name.clone(),
                peer_urls: p.peer_urls.clone(),
                client_urls: Vec::new(),
                learner: false,
            },
        );
    }
    m.store(&path)?;
    Ok(m)
}

/// etcd's `--force-new-cluster`: this member's data becomes a one-member
/// cluster. Every other member, and every member a conf change in the WAL
/// not yet applied would add, is marked removed (so those changes are
/// refused when they apply, as etcd appends removals after its log), this
/// member becomes the one voter, and the membership is stored before raft
/// starts, so a later start without the flag stays a one-member cluster.
/// Raft then elects it alone, which commits whatever its log holds, as
/// etcd commits its whole log. A data dir with no log yet is left as is
/// (etcd ignores the flag without a WAL).
fn force_new_cluster(
    cfg: &Config,
    me: u64,
    mut m: crate::membership::Membership,
    rec: &wal::Recovered,
) -> Result<crate::membership::Membership, String> {
    if rec.entries.is_empty() && rec.base.0 == 0 {
        crate::info!("--force-new-cluster: no log yet, so nothing to force");
        return Ok(m);
    }
    let mut others: std::collections::BTreeSet<u64> =
        m.members.keys().copied().filter(|&id| id != me).collect();
    for e in rec.entries.iter().filter(|e| e.index > m.conf_index) {
        if e.get_entry_type() != raft::eraftpb::EntryType::EntryConfChange {
            continue;
        }
        if let Some((_, ch)) = raftcore::conf_change_of(e) {
            if ch.id != me {
                others.insert(ch.id);
            }
        }
    }
    let Some(mine) = m.members.get_mut(&me) else {
        return Err(format!(
            "--force-new-cluster: member {me:x} is not in its own membership"
        ));
    };
    mine.learner = false;
    m.members.retain(|&id, _| id == me);
    m.removed.extend(others.iter().copied());
    m.store(&cfg.data_dir.join("members"))?;
    crate::warn!(
        "--force-new-cluster: member {me:x} is now the only member of cluster {:x}; removed {}",
        m.cluster_id,
        others
            .iter()
            .map(|id| format!("{id:x}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(m)
}

/// etcd's `--experimental-initial-corrupt-check`: this member's hash of
/// its versions at its current revision against every other member's at
/// the same revision, asked over the peer connection (etcd asks each
/// peer's HashKV). A peer with the same compaction revision and another
/// hash is a mismatch, and the member stops (exit status 1) with etcd's
/// "found data inconsistency with peers". A peer that does not answer
/// within the request timeout, is behind that revision, or compacted
/// differently is skipped with a warning, as etcd skips it. It runs as
/// the member starts; unlike etcd, clients are served meanwhile.
async fn check_initial_hash(router: Arc<Router>, membership: crate::membership::Membership) {
    let me = router.member.id;
    let (hash, compact, rev) = match crate::snapshot::hash_at(&router.applier, 0).await {
        Ok(h) => h,
        Err(e) => {
            crate::error!("initial corruption check: cannot hash this member's data: {e}");
            std::process::exit(1);
        }
    };
    crate::info!("initial corruption check: {me:x} has hash {hash} at revision {rev}, compacted at {compact}");
    let mut mismatch = 0;
    for (peer, answer) in peer_hashes(&router, &membership, rev).await {
        match answer {
            Ok(Ok((h, _))) if h == hash => {}
            Ok(Ok((h, c))) if c == compact => {
                crate::error!(
                    "initial corruption check: {me:x}'s hash {hash} != {peer:x}'s hash {h} (revision {rev}, compact revision {compact})"
                );
                mismatch += 1;
            }
            Ok(Ok((_, c))) => crate::warn!(
                "initial corruption check: cannot check the hash of peer {peer:x}: it has another compact revision {c} (this member's {compact})"
            ),
            Ok(Err(e)) => crate::warn!(
                "initial corruption check: cannot check the hash of peer {peer:x}: {}",
                e.message
            ),
            Err(_) => crate::warn!(
                "initial corruption check: cannot check the hash of peer {peer:x}: no answer"
            ),
        }
    }
    if mismatch > 0 {
        crate::error!("{me:x} found data inconsistency with peers");
        std::process::exit(1);
    }
    crate::info!("initial corruption check: {me:x} passed; no corruption");
}

/// What a peer answered for its hash at a revision: (hash, its compaction
/// revision), its refusal, or nothing within the request timeout.
type PeerHashAnswer =
    Result<Result<(u32, i64), crate::error::Status>, futures::channel::oneshot::Canceled>;

/// Every other member's hash of its versions at `rev`, asked over the peer
/// connections all at once, each given the request timeout.
async fn peer_hashes(
    router: &Router,
    membership: &crate::membership::Membership,
    rev: i64,
) -> Vec<(u64, PeerHashAnswer)> {
    let me = router.member.id;
    let asks = membership
        .members
        .keys()
        .filter(|&&id| id != me)
        .map(|&peer| {
            let (tx, rx) = futures::channel::oneshot::channel();
            router.raft.send(RaftMsg::PeerHash {
                to: peer,
                rev,
                reply: tx,
            });
            let late = async {
                glommio::timer::sleep(router.member.request_timeout).await;
                Err(futures::channel::oneshot::Canceled)
            };
            async move { (peer, futures_lite::future::or(rx, late).await) }
        });
    futures::future::join_all(asks).await
}

/// etcd's `--experimental-corrupt-check-time`: every `every`, the leader
/// runs `check_hashes` (etcd's monitorKVHash); followers do nothing.
async fn monitor_hashes(ctx: Rc<Core>, every: std::time::Duration) {
    crate::info!("enabled corruption checking every {every:?}");
    loop {
        glommio::timer::sleep(every).await;
        if ctx.view.leader.get() == ctx.router.member.id {
            check_hashes(&ctx).await;
        }
    }
}

/// One pass of etcd's periodic corruption check (checkHashKV): the leader
/// hashes its versions at its current revision, asks every member for its
/// hash at that revision, and hashes its own again. It raises a CORRUPT
/// alarm, through the log, for the first member found inconsistent:
/// itself, when its two hashes at one revision and compaction differ; a
/// member compacted past the leader; a member with the leader's (first)
/// compaction revision and another hash. A member that does not answer,
/// or is behind that revision, is skipped, as etcd skips it. With the
/// alarm raised, every member refuses writes with "etcdserver: corrupt
/// cluster" until it is deactivated.
async fn check_hashes(ctx: &Core) {
    let router = &ctx.router;
    let me = router.member.id;
    let Ok((hash, compact, rev)) = crate::snapshot::hash_at(&router.applier, 0).await else {
        return;
    };
    let membership = {
        let (tx, rx) = futures::channel::oneshot::channel();
        router.raft.send(RaftMsg::Members { reply: tx });
        match rx.await {
            Ok(m) => m,
            Err(_) => return,
        }
    };
    let answers = peer_hashes(router, &membership, rev).await;
    let Ok((hash2, compact2, rev2)) = crate::snapshot::hash_at(&router.applier, 0).await else {
        return;
    };
    let mut corrupt = None;
    if hash2 != hash && rev2 == rev && compact2 == compact {
        crate::warn!(
            "found hash mismatch: member {me:x} hashed revision {rev} as {hash}, then {hash2} (compact revision {compact})"
        );
        corrupt = Some(me);
    }
    for (peer, answer) in answers {
        let Ok(Ok((h, c))) = answer else { continue };
        if c > compact2 {
            crate::warn!(
                "compact revision from follower must be less than or equal to leader's: {peer:x} has {c}, leader {me:x} {compact2}"
            );
            corrupt = corrupt.or(Some(peer));
        } else if c == compact && h != hash {
            crate::warn!(
                "same compact revision then hashes must match: leader {me:x} has {hash}, follower {peer:x} {h} (revision {rev}, compact revision {compact})"
            );
            corrupt = corrupt.or(Some(peer));
        }
    }
    let Some(member_id) = corrupt else {
        return;
    };
    use crate::proto::etcdserverpb::{alarm_request::AlarmAction, AlarmRequest, AlarmType};
    let (tx, rx) = futures::channel::oneshot::channel();
    router.raft.send(RaftMsg::Alarm {
        req: AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id,
            alarm: AlarmType::Corrupt as i32,
        },
        reply: tx,
    });
    match rx.await {
        Ok(Ok(_)) => crate::warn!("raised a CORRUPT alarm for member {member_id:x}"),
        Ok(Err(e)) => crate::warn!(
            "cannot raise a CORRUPT alarm for member {member_id:x}: {}",
            e.message
        ),
        Err(_) => {}
    }
}

/// The newest checkpoint index every shard has (0: none).
fn common_checkpoint(data_dir: &Path, shards: usize) -> Result<u64, String> {
    let mut common: Option<Vec<u64>> = None;
    for s in 0..shards {
        let mine = Shard::checkpoints(data_dir, s)?;
        common = Some(match common {
            None => mine,
            Some(c) => c.into_iter().filter(|i| mine.contains(i)).collect(),
        });
    }
    Ok(common.and_then(|c| c.into_iter().max()).unwrap_or(0))
}

/// The raft peer transport (on the raft core): raft messages from peers go
/// to the raft mailbox; a message whose sender does not match the
/// connection's is dropped.
fn start_peers(
    router: &Arc<Router>,
    membership: &crate::membership::Membership,
    tls: Option<crate::peer::PeerTls>,
) -> Rc<crate::peer::Peers> {
    let me = router.member.id;
    let raft = router.raft.clone();
    let snap = crate::raftcore::SnapshotInbox::new(&router.member.data_dir);
    let deliver = Box::new(move |from: u64, payload: bytes::Bytes| {
        if payload.first() == Some(&crate::raftcore::PAYLOAD_SNAPSHOT_CHUNK) {
            snap.chunk(from, &payload);
        } else if let Some(m) = crate::raftcore::decode_payload(from, me, &payload) {
            raft.send(m);
        }
    });
    let mut cfg = crate::peer::PeerConfig::new(me, router.member.cluster_id);
    cfg.tls = tls;
    cfg.on_removed = Some(Rc::new(|| {
        crate::error!("the member has been permanently removed from the cluster; stopping");
        std::process::exit(0);
    }));
    let peers = crate::peer::Peers::new(cfg, deliver);
    for (id, m) in &membership.members {
        if *id != me && crate::raftcore::peer_addrs(&m.peer_urls).is_empty() {
            crate::warn!("member {id:x} ({}): no usable peer URL", m.name);
        }
    }
    crate::raftcore::sync_peers(&*peers, membership, me);
    let raft = router.raft.clone();
    peers.set_join_answer(Box::new(move || {
        let raft = raft.clone();
        Box::pin(async move {
            let (tx, rx) = futures::channel::oneshot::channel();
            raft.send(RaftMsg::Members { reply: tx });
            rx.await.ok().map(|m| m.encode().into_bytes())
        })
    }));
    peers
}

/// Publishes this member's name and client URLs through the log (etcd's
/// `publish`), retrying until it is applied, and then logs it as etcd does.
async fn publish_attributes(router: Arc<Router>) {
    use crate::proto::keelson::{raft_command, MemberAttributes, RaftCommand};
    let m = &router.member;
    let data = prost::Message::encode_to_vec(&RaftCommand {
        cmd: Some(raft_command::Cmd::MemberAttributes(MemberAttributes {
            id: m.id,
            name: m.name.clone(),
            client_urls: m.client_urls.clone(),
        })),
    });
    loop {
        let (tx, rx) = futures::channel::oneshot::channel();
        router.raft.send(RaftMsg::Propose {
            data: data.clone(),
            reply: tx.into(),
        });
        let timed = async {
            glommio::timer::sleep(m.request_timeout).await;
            None
        };
        match futures_lite::future::or(async { rx.await.ok() }, timed).await {
            Some(Ok(_)) => {
                // etcd's lines, which scripts and test harnesses wait for
                // (etcd's e2e suite waits for both).
                crate::info!(
                    "published {{Name:{} ClientURLs:[{}]}} to cluster {:x}",
                    m.name,
                    m.client_urls.join(" "),
                    m.cluster_id
                );
                crate::info!("enabled capabilities for version 3.5");
                return;
            }
            _ => glommio::timer::sleep(std::time::Duration::from_millis(500)).await,
        }
    }
}

/// Takes an exclusive lock on `data-dir/lock` (etcd locks its WAL files):
/// a second member started on the same data dir is refused instead of
/// writing the same files. The lock goes with the returned file, or with
/// the process.
fn lock_data_dir(dir: &std::path::Path) -> Result<fs::File, String> {
    use std::os::fd::AsRawFd;
    let path = dir.join("lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: flock on a file descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!(
            "{}: the data dir is in use by another process ({e})",
            dir.display()
        ));
    }
    Ok(f)
}

/// Refuses an address something already listens on. The cores bind with
/// SO_REUSEPORT, which would let a second keelson process (same user) share
/// the port silently and take part of its connections; a probe bound
/// without it fails with "address in use" while anyone listens there (and
/// with SO_REUSEADDR, connections in TIME_WAIT do not count).
///
/// A member killed a moment ago can still hold its listening sockets: the
/// kernel tears down a dead process's io_uring instances, and the files
/// their requests hold, after the process is gone. So "in use" is retried
/// for up to `PORT_WAIT` before it is an error.
fn check_port_free(addr: SocketAddr) -> Result<(), String> {
    use socket2::{Domain, Protocol, Socket, Type};
    const PORT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
    let probe = || -> std::io::Result<()> {
        let sk = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        sk.set_reuse_address(true)?;
        sk.bind(&addr.into())
    };
    let start = std::time::Instant::now();
    loop {
        match probe() {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && start.elapsed() < PORT_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(format!("listen on {addr}: {e}")),
        }
    }
}

/// A listening socket on this executor: SO_REUSEPORT (every core listens
/// on the same address) and SO_REUSEADDR, so the port can be taken again
/// at once while connections of a previous server on it (etcd's, say) are
/// still in TIME_WAIT.
fn bind_listener(addr: SocketAddr) -> std::io::Result<glommio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let sk = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sk.set_reuse_address(true)?;
    sk.set_reuse_port(true)?;
    sk.bind(&addr.into())?;
    sk.listen(1024)?;
    // SAFETY: the fd is a bound, listening TCP socket we own and hand over.
    Ok(unsafe { glommio::net::TcpListener::from_raw_fd(sk.into_raw_fd()) })
}

// libmimalloc-sys declares `mi_collect` only with its `extended` feature.
extern crate libmimalloc_sys;
extern "C" {
    fn mi_collect(force: bool);
}

/// How often each core gives memory it freed back to the OS.
const MEMORY_COLLECT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Returns this core's freed memory to the OS, as Go's scavenger does for
/// etcd. mimalloc (the binary's allocator) keeps each thread's empty pages
/// and purges freed memory only after `purge_delay` (1 s), and only when
/// that thread calls into it again: a core that goes quiet after a burst
/// (say 100000 watchers created) would otherwise keep the burst's memory
/// resident. `mi_collect(false)` frees the thread's empty pages and purges
/// what has been free for longer than the delay; it runs once a second, on
/// the core's own thread (mimalloc's heaps are per thread), and costs tens
/// of microseconds. Without mimalloc as the global allocator (tests) it
/// finds no heap and returns.
fn spawn_memory_collector() {
    glommio::spawn_local(async {
        loop {
            glommio::timer::sleep(MEMORY_COLLECT_EVERY).await;
            // SAFETY: no arguments beyond a flag; safe from any thread.
            unsafe { mi_collect(false) };
        }
    })
    .detach();
}

/// Every address the listen URLs name.
fn listen_addrs(urls: &[String]) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    for u in urls {
        out.extend(crate::config::parse_url(u)?);
    }
    Ok(out)
}

/// Starts the member and blocks until it stops.
pub fn run(cfg: Config) -> Result<(), String> {
    let client_addrs = listen_addrs(&cfg.listen_client_urls)?;
    let peer_addrs = listen_addrs(&cfg.listen_peer_urls)?;
    let metrics_addrs = listen_addrs(&cfg.listen_metrics_urls)?;
    // Client addresses served over TLS (their URL is https).
    let tls_addrs: Vec<SocketAddr> = cfg
        .listen_client_urls
        .iter()
        .filter(|u| crate::config::is_tls_url(u))
        .filter_map(|u| crate::config::parse_url(u).ok())
        .flatten()
        .collect();
    if cfg.enable_v2 {
        crate::warn!("--enable-v2: keelson has no v2 API; v2 requests are answered 404");
    }
    if cfg.enable_pprof {
        crate::warn!(
            "--enable-pprof: keelson has no Go runtime profiler; /debug/pprof is not served"
        );
    }

    fs::create_dir_all(&cfg.data_dir).map_err(|e| format!("{}: {e}", cfg.data_dir.display()))?;
    // Held until `run` returns, i.e. for the life of the member.
    let _lock = lock_data_dir(&cfg.data_dir)?;
    for a in client_addrs.iter().chain(&peer_addrs).chain(&metrics_addrs) {
        check_port_free(*a)?;
    }
    let cfg = tls::self_certs(cfg)?;
    let tls_cfg = tls::server_config(&cfg)?;
    let peer_tls = tls::peer_config(&cfg)?;
    let meta = load_or_create_meta(&cfg)?;
    let membership = load_membership(&cfg, &meta)?;
    if membership.removed.contains(&meta.member_id) {
        return Err(format!(
            "member {:x} has been permanently removed from the cluster; start it with a new data dir after `member add`",
            meta.member_id
        ));
    }
    let common = common_checkpoint(&cfg.data_dir, meta.shards)?;
    let wal_path = check_wal_dir(&cfg)?;
    let recovered = wal::read_all(&wal_path)?;
    let membership = if cfg.force_new_cluster {
        force_new_cluster(&cfg, meta.member_id, membership, &recovered)?
    } else {
        membership
    };
    if recovered.base.0 > common {
        return Err(format!(
            "the WAL starts after index {} but the shards are only durable to {common}: refusing to start (data would be missing)",
            recovered.base.0
        ));
    }
    let mut shards = Vec::with_capacity(meta.shards);
    for s in 0..meta.shards {
        shards.push(Shard::open(&cfg.data_dir, s, meta.shards, common)?);
    }
    let current_rev = shards.iter().map(|s| s.last_rev).max().unwrap_or(0).max(1);
    let compact_rev = shards.iter().map(|s| s.compact_rev).max().unwrap_or(0);
    crate::info!(
        "starting member {:x} in cluster {:x}: {} shards on {} cores, data dir {}, revision {current_rev}, {} WAL entries to replay",
        meta.member_id,
        meta.cluster_id,
        meta.shards,
        cfg.cores,
        cfg.data_dir.display(),
        recovered.entries.iter().filter(|e| e.index > common).count()
    );

    let (raft_tx, raft_rx) = mailbox();
    let (applier_tx, applier_rx) = mailbox();
    let mut shard_txs = Vec::new();
    let mut shard_rxs = Vec::new();
    for _ in 0..meta.shards {
        let (t, r) = mailbox();
        shard_txs.push(t);
        shard_rxs.push(Some(r));
    }
    let mut core_txs = Vec::new();
    let mut core_rxs = Vec::new();
    for _ in 0..cfg.cores {
        let (t, r) = mailbox();
        core_txs.push(t);
        core_rxs.push(Some(r));
    }
    let router = Arc::new(Router {
        raft: raft_tx,
        applier: applier_tx,
        shards: shard_txs,
        cores: core_txs,
        member: Member {
            id: meta.member_id,
            cluster_id: meta.cluster_id,
            name: cfg.name.clone(),
            peer_urls: cfg.initial_advertise_peer_urls.clone(),
            client_urls: cfg.advertise_client_urls.clone(),
            max_request_bytes: cfg.max_request_bytes,
            request_timeout: raftcore::request_timeout(&cfg),
            min_lease_ttl: crate::lease::min_ttl(cfg.election_timeout),
            watch_progress_notify_interval: cfg.watch_progress_notify_interval,
            data_dir: cfg.data_dir.clone(),
            election_timeout: cfg.election_timeout,
            auth_token_ttl: cfg.auth_token_ttl,
            jwt: cfg.jwt.clone(),
            quota_bytes: cfg.quota_bytes(),
            grpc_keepalive: cfg.grpc_keepalive,
            max_txn_ops: cfg.max_txn_ops,
            grpc_gateway: cfg.grpc_gateway,
            max_concurrent_streams: cfg.max_concurrent_streams,
            cors: cfg.cors.clone(),
            host_whitelist: cfg.host_whitelist.clone(),
            lease_checkpoint: cfg.lease_checkpoint,
        },
    });
    match cfg.quota_bytes() {
        None => crate::warn!(
            "disabled backend quota (--quota-backend-bytes {})",
            cfg.quota_backend_bytes
        ),
        Some(q) if q > crate::config::MAX_QUOTA_BYTES => crate::warn!(
            "backend quota {q} exceeds maximum recommended quota {}",
            crate::config::MAX_QUOTA_BYTES
        ),
        Some(_) => {}
    }

    // Every shard checkpoints the whole lease table at the same index.
    let leases_at_start = shards.first().map(|s| s.leases.clone()).unwrap_or_default();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let (leader_tx, leader_rx) = std::sync::mpsc::channel::<()>();
    let mut shard_slots: Vec<Option<Shard>> = shards.into_iter().map(Some).collect();
    let mut core0 = Some((
        RaftBoot {
            id: meta.member_id,
            membership: membership.clone(),
            recovered,
            applied: common,
            cfg: cfg.clone(),
            election_tick: None,
            exit_on_removal: true,
        },
        raft_rx,
        applier_rx,
        apply::ApplierState {
            applied: common,
            current_rev,
            compact_rev,
            checkpoint_every: cfg.snapshot_count.clamp(1, 10_000),
            leases: leases_at_start,
        },
    ));
    let mut handles = Vec::new();
    for core in 0..cfg.cores {
        let mine: Vec<(Shard, Receiver<ShardMsg>)> = (0..meta.shards)
            .filter(|s| s % cfg.cores == core)
            .map(|s| {
                (
                    shard_slots[s].take().expect("each shard once"),
                    shard_rxs[s].take().expect("each once"),
                )
            })
            .collect();
        let core_rx = core_rxs[core].take().expect("each core once");
        let raft_part = if core == 0 { core0.take() } else { None };
        let membership = membership.clone();
        let router = router.clone();
        let ready = ready_tx.clone();
        let leader_seen = leader_tx.clone();
        let client_addrs = client_addrs.clone();
        let tls_addrs = tls_addrs.clone();
        let tls_cfg = tls_cfg.clone();
        let auto_compaction = cfg.auto_compaction;
        let peer_tls = peer_tls.clone();
        let corrupt_check_every = cfg.corrupt_check_every;
        let initial_corrupt_check = cfg.initial_corrupt_check;
        let (peer_addrs, metrics_addrs) = if core == 0 {
            (peer_addrs.clone(), metrics_addrs.clone())
        } else {
            (Vec::new(), Vec::new())
        };
        let h = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&format!("keelson-core-{core}"))
            // One task queue of cooperative tasks per core: the preemption
            // timers would only add io_uring work to every reactor poll
            // (third_party/glommio/PATCHES.md).
            .preempt_timers(false)
            .spawn(move || async move {
                let ctx = Rc::new_cyclic(|me| Core {
                    id: core,
                    router: router.clone(),
                    view: View {
                        first_leader: std::cell::RefCell::new(Some(leader_seen)),
                        ..View::default()
                    },
                    watch: watch::Hub::default(),
                    me: me.clone(),
                    rpcs: std::cell::RefCell::new(vec![[0; 18]; Rpc::ALL.len()]),
                    writes: writes::Writes::new(router.member.request_timeout),
                });
                // Listeners first, so a port in use is reported before
                // anything else starts.
                let mut listeners = Vec::new();
                for a in client_addrs.iter().chain(&peer_addrs).chain(&metrics_addrs) {
                    // 0: client (gRPC and HTTP/1), 1: peer, 2: metrics.
                    let kind = if client_addrs.contains(a) {
                        0u8
                    } else if peer_addrs.contains(a) {
                        1
                    } else {
                        2
                    };
                    let tls = if kind == 0 && tls_addrs.contains(a) {
                        tls_cfg.clone()
                    } else {
                        None
                    };
                    match bind_listener(*a) {
                        Ok(l) => listeners.push((l, kind, tls)),
                        Err(e) => {
                            let _ = ready.send(Err(format!("listen on {a}: {e}")));
                            return;
                        }
                    }
                }
                for (shard, rx) in mine {
                    glommio::spawn_local(apply::run_shard(shard, rx, router.clone())).detach();
                }
                let mut peer_transport = None;
                if let Some((boot, raft_rx, applier_rx, st)) = raft_part {
                    let peers = start_peers(&router, &membership, peer_tls.clone());
                    peer_transport = Some(peers.clone());
                    glommio::spawn_local(apply::Applier::new(router.clone(), st).run(applier_rx))
                        .detach();
                    let wal = match raftcore::open_wal(&boot).await {
                        Ok(w) => w,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    raftcore::spawn_ticker(router.raft.clone(), boot.cfg.heartbeat_interval);
                    glommio::spawn_local(raftcore::run_raft(
                        boot,
                        peers,
                        Box::new(wal),
                        raft_rx,
                        router.clone(),
                    ))
                    .detach();
                    glommio::spawn_local(publish_attributes(router.clone())).detach();
                    if initial_corrupt_check {
                        glommio::spawn_local(check_initial_hash(
                            router.clone(),
                            membership.clone(),
                        ))
                        .detach();
                    }
                    glommio::spawn_local(compactor::run(ctx.clone(), auto_compaction)).detach();
                    if let Some(every) = corrupt_check_every {
                        glommio::spawn_local(monitor_hashes(ctx.clone(), every)).detach();
                    }
                }
                spawn_memory_collector();
                {
                    let ctx = ctx.clone();
                    glommio::spawn_local(async move { ctx.writes.sweep().await }).detach();
                }
                {
                    let ctx = ctx.clone();
                    glommio::spawn_local(async move {
                        ctx.writes.send_proposals(ctx.id, &ctx.router.raft).await
                    })
                    .detach();
                }
                {
                    let ctx = ctx.clone();
                    glommio::spawn_local(async move {
                        let mut msgs = Vec::new();
                        while core_rx.recv_batch(&mut msgs, 256).await {
                            ctx.on_msgs(&mut msgs);
                        }
                    })
                    .detach();
                }
                let _ = ready.send(Ok(()));
                let mut accepts = Vec::new();
                for (l, kind, tls) in listeners {
                    let ctx = ctx.clone();
                    let peers = peer_transport.clone();
                    accepts.push(glommio::spawn_local(async move {
                        loop {
                            match l.accept().await {
                                Ok(stream) => {
                                    if kind == 0 {
                                        glommio::spawn_local(grpc::serve_conn(
                                            stream,
                                            ctx.clone(),
                                            tls.clone(),
                                        ))
                                        .detach();
                                    } else if kind == 2 {
                                        glommio::spawn_local(http::serve(
                                            stream,
                                            ctx.clone(),
                                            false,
                                            false,
                                        ))
                                        .detach();
                                    } else if let Some(p) = &peers {
                                        glommio::spawn_local(crate::peer::serve_inbound(
                                            p.clone(),
                                            stream,
                                        ))
                                        .detach();
                                    }
                                }
                                Err(e) => {
                                    crate::warn!("accept: {e}");
                                    glommio::timer::sleep(std::time::Duration::from_millis(50))
                                        .await;
                                }
                            }
                        }
                    }));
                }
                for a in accepts {
                    a.await;
                }
            })
            .map_err(|e| format!("cannot start executor {core}: {e}"))?;
        handles.push(h);
    }
    drop(ready_tx);
    drop(leader_tx);
    for _ in 0..cfg.cores {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("an executor stopped during startup".into()),
        }
    }
    // Clients are served from here on (a request that needs a leader waits
    // for one), but, as etcd, the member announces it is ready only once
    // every core knows the leader, so /health answers 200 from then on.
    if (0..cfg.cores).all(|_| leader_rx.recv().is_ok()) {
        crate::info!(
            "ready to serve client requests on {}",
            cfg.listen_client_urls.join(",")
        );
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_has_its_own_counter_and_its_path_leads_back_to_it() {
        let mut paths = std::collections::HashSet::new();
        for (i, &rpc) in Rpc::ALL.iter().enumerate() {
            assert_eq!(rpc.index(), i, "{rpc:?}");
            assert!(paths.insert(rpc.path()), "{} twice", rpc.path());
            let back = match rpc {
                Rpc::Unary(_) => api::lookup(rpc.path()).map(Rpc::Unary),
                Rpc::Stream(_) => api::lookup_stream(rpc.path()).map(Rpc::Stream),
            };
            assert_eq!(back, Some(rpc));
        }
        assert_eq!(api::lookup("/etcdserverpb.KV/Put"), Some(api::Method::Put));
        assert_eq!(
            Rpc::from(api::StreamMethod::Watch).path(),
            "/etcdserverpb.Watch/Watch"
        );
        assert_eq!(api::lookup("/etcdserverpb.KV/Nope"), None);
    }

    #[test]
    fn member_and_cluster_ids_are_etcds() {
        // What etcd 3.4.23 answered for `--initial-cluster-token new
        // --initial-cluster testname0=http://localhost:23991`.
        let id = member_id_of(&["http://localhost:23991".to_string()], "new", None);
        assert_eq!(id, 10_096_977_618_009_402_566);
        let peers = [PeerInfo {
            id,
            name: "testname0".into(),
            peer_urls: vec![],
        }];
        assert_eq!(cluster_id_of(&peers), 4_939_526_417_839_766_432);
        // Peer URLs in any order; the token and the time count.
        let urls = |a: &str, b: &str| vec![a.to_string(), b.to_string()];
        assert_eq!(
            member_id_of(&urls("http://b:1", "http://a:1"), "t", None),
            member_id_of(&urls("http://a:1", "http://b:1"), "t", None)
        );
        assert_ne!(
            member_id_of(&urls("http://a:1", "http://b:1"), "u", None),
            id
        );
        assert_ne!(
            member_id_of(&urls("http://a:1", "http://b:1"), "t", Some("1")),
            member_id_of(&urls("http://a:1", "http://b:1"), "t", None)
        );
    }

    fn peer(id: u64) -> PeerInfo {
        PeerInfo {
            id,
            name: format!("m{id}"),
            peer_urls: vec![format!("http://127.0.0.1:{id}")],
        }
    }

    #[test]
    fn cluster_id_differs_from_a_lone_members_id_and_ignores_order() {
        let one = [peer(7)];
        assert_ne!(cluster_id_of(&one), 7);
        assert_ne!(cluster_id_of(&one), 0);
        let (a, b, c) = (peer(1), peer(2), peer(3));
        let abc = cluster_id_of(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(abc, cluster_id_of(&[c, a.clone(), b]));
        assert_ne!(abc, cluster_id_of(&[a]));
    }

    /// `--force-new-cluster` keeps only this member, as a voter, and marks
    /// removed every other one, including a member that a conf change in
    /// the WAL's unapplied tail would add (so that change is refused when
    /// it applies); the stored membership says the same.
    #[test]
    fn force_new_cluster_removes_every_other_member_and_the_tails_adds() {
        use crate::membership::{MemberInfo, Membership};
        use crate::proto::keelson::{member_change::Kind, MemberChange};
        use prost::Message as _;
        let dir = tempfile::tempdir().unwrap();
        let cfg = match crate::config::parse(
            ["--data-dir".to_string(), dir.path().display().to_string()],
            |_| None,
        )
        .unwrap()
        {
            crate::config::Parsed::Serve(c) => *c,
            _ => unreachable!(),
        };
        let mut m = Membership {
            cluster_id: 9,
            conf_index: 5,
            ..Default::default()
        };
        for id in [1, 2, 3] {
            m.members.insert(
                id,
                MemberInfo {
                    learner: id == 1,
                    ..Default::default()
                },
            );
        }
        let change = |index: u64, id: u64| {
            let mut cc = raft::eraftpb::ConfChange::default();
            cc.node_id = id;
            cc.context = MemberChange {
                kind: Kind::Add as i32,
                id,
                peer_urls: vec![format!("http://127.0.0.1:{id}")],
                is_learner: false,
            }
            .encode_to_vec()
            .into();
            let mut e = raft::eraftpb::Entry::default();
            e.index = index;
            e.set_entry_type(raft::eraftpb::EntryType::EntryConfChange);
            e.data = protobuf::Message::write_to_bytes(&cc).unwrap().into();
            e
        };
        let normal = |index: u64| raft::eraftpb::Entry {
            index,
            ..Default::default()
        };
        // Index 4 (applied already, at or below conf_index) added member 8,
        // which a later change removed: not in the membership, not marked.
        let rec = wal::Recovered {
            entries: vec![change(4, 8), normal(5), change(6, 4), normal(7)],
            ..Default::default()
        };
        let f = force_new_cluster(&cfg, 1, m.clone(), &rec).unwrap();
        assert_eq!(f.members.keys().copied().collect::<Vec<_>>(), [1]);
        assert!(!f.members[&1].learner);
        assert_eq!(f.removed.iter().copied().collect::<Vec<_>>(), [2, 3, 4]);
        let stored = Membership::load(&dir.path().join("members")).unwrap();
        assert_eq!(stored, Some(f));
        // No log yet: nothing is forced.
        let empty = wal::Recovered::default();
        assert_eq!(force_new_cluster(&cfg, 1, m.clone(), &empty).unwrap(), m);
    }
}
