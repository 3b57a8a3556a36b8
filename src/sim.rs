//! A deterministic, seeded simulation of a cluster (a test module).
//!
//! Three members, each running the real raft core (`raftcore::run_raft`:
//! raft-rs in keelson's Ready order, proposal contexts, forwarding,
//! ReadIndex, the hand-off to the applier) on one glommio executor, with
//! the core's three seams replaced:
//! - **clock**: the driver sends every running member a `Tick` per step;
//!   each member's election timeout is fixed (`RaftBoot::election_tick`,
//!   drawn from the seed), so raft-rs draws nothing at random;
//! - **network** (`SimNet`): every payload is delayed 0–3 steps, dropped
//!   with a seeded probability, and lost while a partition cuts its link;
//! - **disk** (`SimDisk`): a sync completes only when the driver flushes
//!   that member's disk (a seeded chance each step), so the core waits on
//!   it like on a real fdatasync; a crash (the member's task dropped) loses
//!   everything not flushed, the sync in flight included.
//!
//! The applier is the driver's model: it applies committed puts to a map
//! and answers the proposals' replies. Payloads go through the real
//! `raftcore::decode_payload`. The driver lets every member run until it
//! waits on its mailbox after each step, so a seed determines the run; a
//! failing seed is printed and `KEELSON_SIM_SEED=<seed>` replays it.
//!
//! Checked, for every seed: every index is applied with the same command on
//! every member that applies it (also across crashes); no acknowledged
//! write is lost (its index holds its command at the end); a linearizable
//! read answered at index r saw every write acknowledged before it began;
//! and once faults stop, every member converges to the same state and a
//! new write is acknowledged (liveness). Faults: one member down at a time
//! (crash, restart with what its disk kept), a member cut off from the
//! others, 0–10% of messages dropped, delays that reorder them.
//!
//! Even seeds also change the membership under those faults, through
//! `RaftMsg::ChangeMembers` as the Cluster API does: member 4 is added as a
//! learner and started with the membership the change returned, promoted
//! once in sync (retried like a client), then one of the first three is
//! removed; at the end every remaining member must list the same members.
//! This found that raft-rs panics if a leader that applied its own removal
//! handles one more message (it unwraps its own progress), so the raft
//! core now stops the moment it applies its own removal, as etcd's does.
//!
//! It finds real mistakes: sending raft's "persisted" messages (append
//! acknowledgements, votes) before the WAL sync, or a disk that does not
//! keep the term and vote, fail within a few hundred seeds (tried by hand
//! when this was written). 200 seeds of 1500 steps run in a few seconds;
//! `KEELSON_SIM_SEEDS=N` and `KEELSON_SIM_BASE=B` run others.

use crate::apply::{ApplierMsg, ReadReply, WriteResult};
use crate::mailbox::{mailbox, Receiver, Sender};
use crate::membership::{MemberInfo, Membership};
use crate::proto::etcdserverpb::{request_op, PutRequest, RequestOp, TxnRequest};
use crate::proto::keelson::{raft_command, RaftCommand};
use crate::raftcore::{LogStore, RaftBoot, RaftMsg, Transport};
use crate::server::{CoreMsg, Member, Router};
use futures::channel::oneshot;
use prost::Message as _;
use raft::eraftpb::{Entry, HardState};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// xorshift64*: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// The network all members share.
struct World {
    rng: RefCell<Rng>,
    step: Cell<u64>,
    seq: Cell<u64>,
    /// (deliver at step, sequence, from, to, payload)
    inflight: RefCell<BTreeMap<(u64, u64), (u64, u64, Vec<u8>)>>,
    /// Directed links that are cut.
    cut: RefCell<BTreeSet<(u64, u64)>>,
    drop_per_mille: Cell<u64>,
}

impl World {
    fn linked(&self, a: u64, b: u64) -> bool {
        !self.cut.borrow().contains(&(a, b))
    }
}

struct SimNet {
    me: u64,
    world: Rc<World>,
}

impl Transport for SimNet {
    fn send(&self, to: u64, payload: bytes::Bytes) -> bool {
        let w = &self.world;
        if !w.linked(self.me, to) || w.rng.borrow_mut().chance(w.drop_per_mille.get()) {
            // Queued, then lost with the connection: the sender can't tell.
            return true;
        }
        let delay = w.rng.borrow_mut().below(4);
        let seq = w.seq.get();
        w.seq.set(seq + 1);
        w.inflight
            .borrow_mut()
            .insert((w.step.get() + delay, seq), (self.me, to, payload.to_vec()));
        true
    }
    fn active_since(&self, id: u64) -> Option<Instant> {
        self.world
            .linked(self.me, id)
            .then(|| Instant::now().checked_sub(Duration::from_secs(3600)))
            .flatten()
    }
    fn queued_bytes(&self, _id: u64) -> Option<usize> {
        Some(0)
    }
    fn set_peer(&self, _id: u64, _addrs: Vec<std::net::SocketAddr>) {}
    fn mark_removed(&self, _id: u64) {}
}

/// A member's disk: the durable log and hard state survive a crash; a
/// sync in flight (written, not yet flushed by the driver) does not.
#[derive(Default)]
struct Durable {
    entries: Vec<Entry>,
    hs: HardState,
    in_flight: Option<(Vec<Entry>, Option<HardState>)>,
    waker: Option<std::task::Waker>,
}

impl Durable {
    /// The disk finishes the sync in flight.
    fn flush(&mut self) {
        if let Some((entries, hs)) = self.in_flight.take() {
            for e in entries {
                // A new entry at an index replaces it and everything after.
                let keep = self.entries.partition_point(|x| x.index < e.index);
                self.entries.truncate(keep);
                self.entries.push(e);
            }
            if let Some(hs) = hs {
                self.hs = hs;
            }
        }
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// A crash: what was in flight never reached the disk.
    fn crash(&mut self) {
        self.in_flight = None;
        self.waker = None;
    }
}

struct SimDisk {
    durable: Rc<RefCell<Durable>>,
    entries: Vec<Entry>,
    hs: Option<HardState>,
}

impl LogStore for SimDisk {
    fn push_entries(&mut self, entries: &[Entry]) {
        self.entries.extend_from_slice(entries);
    }
    fn push_hard_state(&mut self, hs: &HardState) {
        self.hs = Some(hs.clone());
    }
    fn has_pending(&self) -> bool {
        !self.entries.is_empty() || self.hs.is_some()
    }
    fn sync<'a>(
        &'a mut self,
        _last: (u64, u64),
        _hs: &'a HardState,
    ) -> futures::future::LocalBoxFuture<'a, Result<(), String>> {
        let durable = self.durable.clone();
        durable.borrow_mut().in_flight = Some((std::mem::take(&mut self.entries), self.hs.take()));
        // Done when the driver flushes the disk; a crash first loses it.
        Box::pin(std::future::poll_fn(move |cx| {
            let mut d = durable.borrow_mut();
            if d.in_flight.is_none() {
                std::task::Poll::Ready(Ok(()))
            } else {
                d.waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        }))
    }
    fn install_snapshot(
        &mut self,
        _base: (u64, u64),
    ) -> futures::future::LocalBoxFuture<'_, Result<(), String>> {
        Box::pin(async { Err("the simulation sends no snapshots".to_string()) })
    }
    fn release_to(&mut self, _index: u64) -> usize {
        0
    }
}

/// One member: its durable disk survives crashes; the rest is its run.
struct Node {
    id: u64,
    /// Part of the cluster (a member not added yet, or removed, is not).
    active: bool,
    /// The membership it starts with the first time (the bootstrap one, or
    /// what a joining member learns); later starts read its data dir.
    initial: Membership,
    dir: tempfile::TempDir,
    election_tick: usize,
    durable: Rc<RefCell<Durable>>,
    run: Option<Run>,
}

struct Run {
    raft: Sender<RaftMsg>,
    applier: Receiver<ApplierMsg>,
    cores: Receiver<CoreMsg>,
    /// Dropping it (with the run) cancels the member: a crash.
    _task: glommio::Task<()>,
    /// The model state machine, rebuilt from the log after a restart.
    applied: u64,
    kv: BTreeMap<Vec<u8>, Vec<u8>>,
    reads: Vec<(u64, ReadReply)>,
}

const IDS: [u64; 3] = [1, 2, 3];
/// The member some seeds add (as a learner), promote, and keep.
const JOINER: u64 = 4;

fn membership() -> Membership {
    let mut m = Membership {
        cluster_id: 0xc1,
        ..Default::default()
    };
    for id in IDS {
        m.members.insert(
            id,
            MemberInfo {
                name: format!("m{id}"),
                peer_urls: vec![format!("http://127.0.0.1:{}", 30000 + id)],
                client_urls: vec![],
                learner: false,
            },
        );
    }
    m
}

fn start(node: &mut Node, world: &Rc<World>) {
    let cfg = match crate::config::parse(
        [
            "--name",
            &format!("m{}", node.id),
            "--data-dir",
            node.dir.path().to_str().expect("utf-8 temp dir"),
            "--experimental-snapshot-catchup-entries",
            "1000000000",
            "--log-level",
            "error",
        ]
        .iter()
        .map(|s| s.to_string()),
        |_| None,
    ) {
        Ok(crate::config::Parsed::Serve(c)) => *c,
        _ => panic!("sim config"),
    };
    let d = node.durable.borrow();
    let recovered = crate::wal::Recovered {
        base: (0, 0),
        hard_state: d.hs.clone(),
        entries: d.entries.clone(),
        tail: None,
        segments: vec![],
    };
    drop(d);
    let (raft_tx, raft_rx) = mailbox();
    let (applier_tx, applier_rx) = mailbox();
    let (core_tx, core_rx) = mailbox();
    let router = Arc::new(Router {
        raft: raft_tx.clone(),
        applier: applier_tx,
        shards: vec![],
        cores: vec![core_tx],
        member: Member {
            id: node.id,
            cluster_id: 0xc1,
            name: format!("m{}", node.id),
            peer_urls: vec![],
            client_urls: vec![],
            max_request_bytes: 1 << 20,
            request_timeout: Duration::from_secs(7),
            min_lease_ttl: 2,
            watch_progress_notify_interval: Duration::from_secs(600),
            data_dir: node.dir.path().to_path_buf(),
            election_timeout: Duration::from_secs(1),
            auth_token_ttl: Duration::from_secs(300),
            jwt: None,
            quota_bytes: None,
            grpc_keepalive: None,
            max_txn_ops: crate::config::MAX_TXN_OPS,
            grpc_gateway: true,
            max_concurrent_streams: 4096,
            cors: vec!["*".into()],
            host_whitelist: vec!["*".into()],
            lease_checkpoint: None,
        },
    });
    let boot = RaftBoot {
        id: node.id,
        membership: Membership::load(&node.dir.path().join("members"))
            .expect("the membership file is readable")
            .unwrap_or_else(|| node.initial.clone()),
        recovered,
        // The model keeps no checkpoint: it replays the log from 1.
        applied: 0,
        cfg,
        election_tick: Some(node.election_tick),
        exit_on_removal: false,
    };
    let net = Rc::new(SimNet {
        me: node.id,
        world: world.clone(),
    });
    let disk = Box::new(SimDisk {
        durable: node.durable.clone(),
        entries: vec![],
        hs: None,
    });
    let task = glommio::spawn_local(crate::raftcore::run_raft(boot, net, disk, raft_rx, router));
    node.run = Some(Run {
        raft: raft_tx,
        applier: applier_rx,
        cores: core_rx,
        _task: task,
        applied: 0,
        kv: BTreeMap::new(),
        reads: vec![],
    });
}

fn put_cmd(key: &str, value: &str) -> Vec<u8> {
    RaftCommand {
        cmd: Some(raft_command::Cmd::Txn(TxnRequest {
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: key.as_bytes().to_vec().into(),
                    value: value.as_bytes().to_vec().into(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        })),
    }
    .encode_to_vec()
}

struct Checker {
    /// index → the command applied there (by whoever applied it first).
    log: BTreeMap<u64, Vec<u8>>,
    /// Acknowledged writes: (index, command).
    acked: Vec<(u64, Vec<u8>)>,
    /// The highest acknowledged index so far.
    acked_max: u64,
}

/// Runs the applier's part for `node`: applies committed entries to the
/// model, answers writes and reads, checks every index against the others.
fn drain_applier(node: &mut Node, ck: &mut Checker, seed: u64) {
    let Some(run) = node.run.as_mut() else {
        return;
    };
    while let Some(m) = run.applier.try_recv() {
        match m {
            ApplierMsg::Committed(entries) => {
                for c in entries {
                    assert!(
                        c.index > run.applied,
                        "seed {seed}: member {} applied index {} after {}",
                        node.id,
                        c.index,
                        run.applied
                    );
                    let bytes = c
                        .cmd
                        .as_ref()
                        .map(|c| c.encode_to_vec())
                        .unwrap_or_default();
                    match ck.log.get(&c.index) {
                        Some(b) => assert_eq!(
                            b, &bytes,
                            "seed {seed}: member {} applied another command at index {}",
                            node.id, c.index
                        ),
                        None => {
                            ck.log.insert(c.index, bytes);
                        }
                    }
                    if let Some(raft_command::Cmd::Txn(t)) = c.cmd.and_then(|c| c.cmd) {
                        for op in t.success {
                            if let Some(request_op::Request::RequestPut(p)) = op.request {
                                run.kv.insert(p.key.to_vec(), p.value.to_vec());
                            }
                        }
                    }
                    run.applied = c.index;
                    if let Some(r) = c.reply {
                        // The simulation proposes with channels only.
                        let _ = r.answer(Ok(WriteResult {
                            revision: c.index as i64,
                            ..Default::default()
                        }));
                    }
                }
            }
            ApplierMsg::Reads { index, replies } => {
                run.reads.extend(replies.into_iter().map(|r| (index, r)));
            }
            ApplierMsg::FailReads(st) => {
                for (_, r) in run.reads.drain(..) {
                    let _ = r.send(Err(st.clone()));
                }
            }
            _ => {}
        }
    }
    let applied = run.applied;
    let (due, wait): (Vec<_>, Vec<_>) = run.reads.drain(..).partition(|(i, _)| *i <= applied);
    run.reads = wait;
    for (_, r) in due {
        let _ = r.send(Ok(applied as i64));
    }
}

/// Lets every member run until it waits again.
async fn settle() {
    for _ in 0..64 {
        futures_lite::future::yield_now().await;
    }
}

type WriteRx = oneshot::Receiver<Result<WriteResult, crate::error::Status>>;

struct Sim {
    seed: u64,
    world: Rc<World>,
    nodes: Vec<Node>,
    ck: Checker,
}

impl Sim {
    fn rng(&self, n: u64) -> u64 {
        self.world.rng.borrow_mut().below(n)
    }

    /// One step of time: what is due is delivered, every running member
    /// ticks.
    fn advance(&mut self, step: u64) {
        self.world.step.set(step);
        let due: Vec<_> = {
            let mut inflight = self.world.inflight.borrow_mut();
            let later = inflight.split_off(&(step + 1, 0));
            std::mem::replace(&mut *inflight, later)
                .into_values()
                .collect()
        };
        for (from, to, payload) in due {
            if !self.world.linked(from, to) {
                continue;
            }
            let run = self
                .nodes
                .iter()
                .find(|n| n.id == to)
                .and_then(|n| n.run.as_ref());
            if let (Some(run), Some(m)) = (
                run,
                crate::raftcore::decode_payload(from, to, &bytes::Bytes::from(payload)),
            ) {
                run.raft.send(m);
            }
        }
        for n in &self.nodes {
            if let Some(run) = &n.run {
                run.raft.send(RaftMsg::Tick);
            }
        }
    }

    /// Lets the members run, then applies what they committed. Each disk
    /// finishes its sync in flight with probability `flush_per_mille`.
    async fn settle(&mut self, flush_per_mille: u64) {
        settle().await;
        for i in 0..self.nodes.len() {
            if self.world.rng.borrow_mut().chance(flush_per_mille) {
                self.nodes[i].durable.borrow_mut().flush();
            }
        }
        settle().await;
        for n in self.nodes.iter_mut() {
            drain_applier(n, &mut self.ck, self.seed);
        }
        settle().await;
    }

    fn propose(&self, i: usize, cmd: &[u8]) -> Option<WriteRx> {
        let run = self.nodes[i].run.as_ref()?;
        let (tx, rx) = oneshot::channel();
        run.raft.send(RaftMsg::Propose {
            data: cmd.to_vec(),
            reply: tx.into(),
        });
        Some(rx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Add,
    Promote,
    Remove,
    Done,
}

type ChangeRx = oneshot::Receiver<Result<(u64, Membership), crate::error::Status>>;

struct Changes {
    phase: Phase,
    victim: u64,
    /// The request in flight: (step asked, its reply).
    asked: Option<(u64, ChangeRx)>,
}

impl Sim {
    fn any_active(&self) -> usize {
        let active: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].active)
            .collect();
        active[self.rng(active.len() as u64) as usize]
    }

    /// The membership as member `i` has applied it.
    async fn members_of(&mut self, i: usize) -> Option<Membership> {
        let run = self.nodes[i].run.as_ref()?;
        let (tx, mut rx) = oneshot::channel();
        run.raft.send(RaftMsg::Members { reply: tx });
        settle().await;
        rx.try_recv().ok().flatten()
    }

    /// Moves the membership changes on: asks a running member for the
    /// next one, as a client would (again after a timeout), and acts on
    /// the answer.
    async fn change_members(&mut self, c: &mut Changes, step: u64) {
        use crate::proto::keelson::{member_change::Kind, MemberChange};
        if let Some((at, rx)) = c.asked.as_mut() {
            let done = match rx.try_recv() {
                Ok(Some(Ok((_, m)))) => Some(Some(m)),
                // An earlier attempt did it already.
                Ok(Some(Err(st)))
                    if st == crate::error::member_exist()
                        || (c.phase == Phase::Promote
                            && st == crate::error::member_not_learner())
                        || (c.phase == Phase::Remove && st == crate::error::member_not_found()) =>
                {
                    Some(None)
                }
                Ok(Some(Err(_))) | Err(_) => {
                    c.asked = None;
                    None
                }
                Ok(None) if step - *at > 100 => {
                    c.asked = None;
                    None
                }
                Ok(None) => None,
            };
            let Some(m) = done else {
                return;
            };
            c.asked = None;
            match c.phase {
                Phase::Add => {
                    let j = self
                        .nodes
                        .iter()
                        .position(|n| n.id == JOINER)
                        .expect("joiner");
                    let m = match m {
                        Some(m) => m,
                        None => {
                            let i = self.any_active();
                            match self.members_of(i).await {
                                Some(m) => m,
                                None => return, // ask again later
                            }
                        }
                    };
                    self.nodes[j].initial = m;
                    self.nodes[j].active = true;
                    let world = self.world.clone();
                    start(&mut self.nodes[j], &world);
                    c.phase = Phase::Promote;
                }
                Phase::Promote => c.phase = Phase::Remove,
                Phase::Remove => {
                    // The removed member is stopped for good.
                    let v = self
                        .nodes
                        .iter()
                        .position(|n| n.id == c.victim)
                        .expect("victim");
                    self.nodes[v].active = false;
                    self.nodes[v].run = None;
                    c.phase = Phase::Done;
                }
                Phase::Done => {}
            }
            return;
        }
        let (kind, id, learner) = match c.phase {
            Phase::Add => (Kind::Add, JOINER, true),
            Phase::Promote => (Kind::Promote, JOINER, false),
            Phase::Remove => (Kind::Remove, c.victim, false),
            Phase::Done => return,
        };
        let i = self.any_active();
        let Some(run) = self.nodes[i].run.as_ref() else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        run.raft.send(RaftMsg::ChangeMembers {
            change: MemberChange {
                kind: kind as i32,
                id,
                peer_urls: if kind == Kind::Add {
                    vec![format!("http://127.0.0.1:{}", 30000 + id)]
                } else {
                    vec![]
                },
                is_learner: learner,
            },
            reply: tx,
        });
        c.asked = Some((step, rx));
    }
}

/// One seeded run; panics (naming the seed) if a check fails.
async fn run_seed(seed: u64, steps: u64) {
    let world = Rc::new(World {
        rng: RefCell::new(Rng::new(seed)),
        step: Cell::new(0),
        seq: Cell::new(0),
        inflight: RefCell::new(BTreeMap::new()),
        cut: RefCell::new(BTreeSet::new()),
        drop_per_mille: Cell::new(0),
    });
    let nodes: Vec<Node> = IDS
        .iter()
        .chain(&[JOINER])
        .map(|&id| Node {
            id,
            active: id != JOINER,
            initial: membership(),
            dir: tempfile::tempdir().expect("temp dir"),
            election_tick: 0,
            durable: Rc::new(RefCell::new(Durable::default())),
            run: None,
        })
        .collect();
    let mut sim = Sim {
        seed,
        world: world.clone(),
        nodes,
        ck: Checker {
            log: BTreeMap::new(),
            acked: vec![],
            acked_max: 0,
        },
    };
    for i in 0..sim.nodes.len() {
        sim.nodes[i].election_tick = 10 + sim.rng(10) as usize;
        if sim.nodes[i].active {
            start(&mut sim.nodes[i], &world);
        }
    }
    // Even seeds also change the membership under the faults: add member
    // 4 as a learner, start it, promote it, remove one of the first three.
    let mut changes = Changes {
        phase: if seed % 2 == 0 {
            Phase::Add
        } else {
            Phase::Done
        },
        victim: IDS[(seed / 2 % 3) as usize],
        asked: None,
    };
    world.drop_per_mille.set(sim.rng(100));
    let mut writes: Vec<(Vec<u8>, WriteRx)> = vec![];
    // (the highest index acknowledged when the read began, its reply)
    let mut reads: Vec<(u64, oneshot::Receiver<Result<i64, crate::error::Status>>)> = vec![];
    let mut next_key = 0u64;
    let mut crashes = 0;
    for step in 0..steps {
        // Faults: crash or restart a member (one down at a time), cut a
        // member off, heal.
        if sim.rng(1000) < 15 {
            let i = sim.rng(sim.nodes.len() as u64) as usize;
            if !sim.nodes[i].active {
            } else if sim.nodes[i].run.is_some() {
                if sim.nodes.iter().all(|n| n.run.is_some() || !n.active) {
                    sim.nodes[i].run = None; // the task is dropped: a crash
                    sim.nodes[i].durable.borrow_mut().crash();
                    crashes += 1;
                }
            } else {
                start(&mut sim.nodes[i], &world);
            }
        }
        if sim.rng(1000) < 10 {
            let a = sim.nodes[sim.rng(sim.nodes.len() as u64) as usize].id;
            let mut cut = world.cut.borrow_mut();
            for b in IDS.iter().copied().chain([JOINER]) {
                if b != a {
                    cut.insert((a, b));
                    cut.insert((b, a));
                }
            }
        }
        if sim.rng(1000) < 8 {
            world.cut.borrow_mut().clear();
        }
        sim.advance(step);
        // Clients: writes and linearizable reads to any running member.
        if sim.rng(1000) < 300 {
            let i = sim.any_active();
            let cmd = put_cmd(&format!("k{}", next_key % 17), &format!("v{next_key}"));
            next_key += 1;
            if let Some(rx) = sim.propose(i, &cmd) {
                writes.push((cmd, rx));
            }
        }
        if sim.rng(1000) < 100 {
            let i = sim.any_active();
            if let Some(run) = &sim.nodes[i].run {
                let (tx, rx) = oneshot::channel();
                run.raft.send(RaftMsg::ReadIndex { reply: tx });
                reads.push((sim.ck.acked_max, rx));
            }
        }
        if step >= 200 && step % 10 == 0 {
            sim.change_members(&mut changes, step).await;
        }
        sim.settle(700).await;
        let ck = &mut sim.ck;
        writes.retain_mut(|(cmd, rx)| match rx.try_recv() {
            Ok(Some(Ok(w))) => {
                ck.acked.push((w.revision as u64, cmd.clone()));
                ck.acked_max = ck.acked_max.max(w.revision as u64);
                false
            }
            Ok(Some(Err(_))) | Err(_) => false,
            Ok(None) => true,
        });
        reads.retain_mut(|(before, rx)| match rx.try_recv() {
            Ok(Some(Ok(at))) => {
                assert!(
                    at as u64 >= *before,
                    "seed {seed}: a linearizable read answered at index {at} missed a write acknowledged at {before} before it began"
                );
                false
            }
            Ok(Some(Err(_))) | Err(_) => false,
            Ok(None) => true,
        });
    }
    // Calm: every member up, no cuts, no drops. A new write must be
    // acknowledged and applied everywhere within a bound (liveness).
    world.cut.borrow_mut().clear();
    world.drop_per_mille.set(0);
    for i in 0..sim.nodes.len() {
        if sim.nodes[i].run.is_none() && sim.nodes[i].active {
            start(&mut sim.nodes[i], &world);
        }
    }
    let cmd = put_cmd("final", "x");
    let mut rx = None;
    let mut acked = None;
    let mut asked_at = steps;
    for step in steps..steps + 1500 {
        sim.advance(step);
        if step % 10 == 0 {
            let was_done = changes.phase == Phase::Done;
            sim.change_members(&mut changes, step).await;
            if !was_done && changes.phase == Phase::Done {
                // The last change just went through: the final write must
                // come after it, so that "every member applied it" also
                // means every member applied the change.
                acked = None;
                rx = None;
            }
        }
        sim.settle(1000).await;
        // A client gives up after a while and asks again (a request
        // forwarded to a leader that just lost office is dropped).
        if rx.is_some() && step - asked_at > 50 && acked.is_none() {
            rx = None;
        }
        if rx.is_none() && acked.is_none() {
            rx = sim.propose(sim.any_active(), &cmd);
            asked_at = step;
        }
        match rx.as_mut().map(|r| r.try_recv()) {
            Some(Ok(Some(Ok(w)))) => {
                acked = Some(w.revision as u64);
                rx = None;
                sim.ck.acked.push((w.revision as u64, cmd.clone()));
            }
            // Lost in a leader change: ask again.
            Some(Ok(Some(Err(_)))) | Some(Err(_)) => rx = None,
            _ => {}
        }
        if let (Some(i), Phase::Done) = (acked, changes.phase) {
            if sim
                .nodes
                .iter()
                .filter(|n| n.active)
                .all(|n| n.run.as_ref().map(|r| r.applied >= i).unwrap_or(false))
            {
                break;
            }
        }
    }
    let Some(last) = acked else {
        let mut views = String::new();
        for n in sim.nodes.iter_mut() {
            if let Some(run) = n.run.as_mut() {
                let mut last_view = None;
                while let Some(m) = run.cores.try_recv() {
                    if let CoreMsg::Raft {
                        term,
                        leader,
                        commit,
                        ..
                    } = m
                    {
                        last_view = Some((term, leader, commit));
                    }
                }
                views.push_str(&format!(
                    " member {}: (term, leader, commit) {last_view:?}, applied {};",
                    n.id, run.applied
                ));
            }
        }
        panic!("seed {seed}: no write acknowledged within 1500 steps once faults stopped;{views}");
    };
    for n in sim.nodes.iter().filter(|n| n.active) {
        let applied = n.run.as_ref().map(|r| r.applied).unwrap_or(0);
        assert!(
            applied >= last,
            "seed {seed}: member {} applied only {applied} of {last} once faults stopped",
            n.id
        );
    }
    for (i, cmd) in &sim.ck.acked {
        assert_eq!(
            sim.ck.log.get(i),
            Some(cmd),
            "seed {seed}: the write acknowledged at index {i} is not what the log holds there"
        );
    }
    // Same index applied → same state.
    let min_applied = sim
        .nodes
        .iter()
        .filter_map(|n| n.run.as_ref().map(|r| r.applied))
        .min()
        .unwrap_or(0);
    let states: Vec<_> = sim
        .nodes
        .iter()
        .filter_map(|n| n.run.as_ref())
        .filter(|r| r.applied == min_applied)
        .map(|r| &r.kv)
        .collect();
    for w in states.windows(2) {
        assert_eq!(
            w[0], w[1],
            "seed {seed}: members at one index hold different data"
        );
    }
    if seed % 2 == 0 {
        assert_eq!(
            changes.phase,
            Phase::Done,
            "seed {seed}: the membership changes did not all go through"
        );
        // Every member left agrees on who is in the cluster.
        let mut seen = Vec::new();
        for i in 0..sim.nodes.len() {
            if sim.nodes[i].active {
                seen.push(sim.members_of(i).await.expect("a running member answers"));
            }
        }
        for m in &seen {
            let ids: Vec<u64> = m.members.keys().copied().collect();
            let want: Vec<u64> = [1, 2, 3, JOINER]
                .into_iter()
                .filter(|&id| id != changes.victim)
                .collect();
            assert_eq!(ids, want, "seed {seed}: membership {m:?}");
            assert!(!m.is_learner(JOINER) && m.removed.contains(&changes.victim));
        }
    }
    eprintln!(
        "sim seed {seed}: {steps} steps, {} writes acknowledged, {} indexes applied, {} crashes, membership changes: {}",
        sim.ck.acked.len(),
        sim.ck.log.len(),
        crashes,
        if seed % 2 == 0 { "add, promote, remove" } else { "none" }
    );
    for n in sim.nodes.iter_mut() {
        n.run = None;
    }
}

#[test]
fn seeded_clusters_stay_safe_and_live_through_faults() {
    let (seeds, steps): (Vec<u64>, u64) = match std::env::var("KEELSON_SIM_SEED") {
        Ok(s) => (vec![s.parse().expect("KEELSON_SIM_SEED is a number")], 1500),
        Err(_) => {
            let n = std::env::var("KEELSON_SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(200u64);
            let base = std::env::var("KEELSON_SIM_BASE")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1u64);
            ((base..base + n).collect(), 1500)
        }
    };
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            for seed in seeds {
                let r = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run_seed(
                    seed, steps,
                )))
                .await;
                if let Err(e) = r {
                    eprintln!("simulation failed with seed {seed}; replay: KEELSON_SIM_SEED={seed} cargo test --release --lib sim::");
                    std::panic::resume_unwind(e);
                }
            }
        })
        .expect("executor")
        .join()
        .expect("simulation");
}
