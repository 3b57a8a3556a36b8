//! The etcd services: one function per unary method, taking the decoded
//! request and returning the response to encode.
//!
//! Writes become a `RaftCommand` proposed to the raft core; the answer comes
//! back once the entry is applied. Reads pick a revision (a ReadIndex from
//! raft for linearizable reads, the core's view for serializable ones) and
//! scatter to the shards that may hold the keys, then merge.

use super::coord;
use super::grpc::{Metadata, MsgSink, MsgStream};
use super::Core;
use crate::apply::{ShardMsg, WriteResult};
use crate::error::{self, Code, Status};
use crate::kv;
use crate::proto::etcdserverpb::*;
use crate::proto::keelson::{raft_command, RaftCommand};
use crate::raftcore::RaftMsg;
use crate::store::shard_of;
use futures::channel::oneshot;
use prost::Message;
use std::future::Future;
use std::sync::Arc;

/// Declares a method enum, its lookup by gRPC path and its path, from one
/// table (the paths are what clients send and what /metrics reports).
macro_rules! methods {
    ($(#[$meta:meta])* $name:ident, $lookup:ident { $($(#[$vmeta:meta])* $m:ident => $path:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $m,)*
        }

        impl $name {
            /// Every method, in declaration order (`as usize` indexes it).
            pub const ALL: &'static [$name] = &[$($name::$m,)*];

            /// The gRPC path: `/package.Service/Method`.
            pub fn path(self) -> &'static str {
                match self {
                    $($name::$m => $path,)*
                }
            }
        }

        pub fn $lookup(path: &str) -> Option<$name> {
            Some(match path {
                $($path => $name::$m,)*
                _ => return None,
            })
        }
    };
}

methods! {
    /// Unary methods.
    Method, lookup {
    Range => "/etcdserverpb.KV/Range",
    Put => "/etcdserverpb.KV/Put",
    DeleteRange => "/etcdserverpb.KV/DeleteRange",
    Txn => "/etcdserverpb.KV/Txn",
    Compact => "/etcdserverpb.KV/Compact",
    Status => "/etcdserverpb.Maintenance/Status",
    Alarm => "/etcdserverpb.Maintenance/Alarm",
    MemberList => "/etcdserverpb.Cluster/MemberList",
    Defragment => "/etcdserverpb.Maintenance/Defragment",
    Hash => "/etcdserverpb.Maintenance/Hash",
    HashKV => "/etcdserverpb.Maintenance/HashKV",
    AuthEnable => "/etcdserverpb.Auth/AuthEnable",
    AuthDisable => "/etcdserverpb.Auth/AuthDisable",
    AuthStatus => "/etcdserverpb.Auth/AuthStatus",
    Authenticate => "/etcdserverpb.Auth/Authenticate",
    UserAdd => "/etcdserverpb.Auth/UserAdd",
    UserGet => "/etcdserverpb.Auth/UserGet",
    UserList => "/etcdserverpb.Auth/UserList",
    UserDelete => "/etcdserverpb.Auth/UserDelete",
    UserChangePassword => "/etcdserverpb.Auth/UserChangePassword",
    UserGrantRole => "/etcdserverpb.Auth/UserGrantRole",
    UserRevokeRole => "/etcdserverpb.Auth/UserRevokeRole",
    RoleAdd => "/etcdserverpb.Auth/RoleAdd",
    RoleGet => "/etcdserverpb.Auth/RoleGet",
    RoleList => "/etcdserverpb.Auth/RoleList",
    RoleDelete => "/etcdserverpb.Auth/RoleDelete",
    RoleGrantPermission => "/etcdserverpb.Auth/RoleGrantPermission",
    RoleRevokePermission => "/etcdserverpb.Auth/RoleRevokePermission",
    MemberAdd => "/etcdserverpb.Cluster/MemberAdd",
    MemberRemove => "/etcdserverpb.Cluster/MemberRemove",
    MemberUpdate => "/etcdserverpb.Cluster/MemberUpdate",
    MemberPromote => "/etcdserverpb.Cluster/MemberPromote",
    HealthCheck => "/grpc.health.v1.Health/Check",
    LeaseGrant => "/etcdserverpb.Lease/LeaseGrant",
    LeaseRevoke => "/etcdserverpb.Lease/LeaseRevoke",
    LeaseTimeToLive => "/etcdserverpb.Lease/LeaseTimeToLive",
    LeaseLeases => "/etcdserverpb.Lease/LeaseLeases",
    MoveLeader => "/etcdserverpb.Maintenance/MoveLeader",
    Lock => "/v3lockpb.Lock/Lock",
    Unlock => "/v3lockpb.Lock/Unlock",
    Campaign => "/v3electionpb.Election/Campaign",
    Proclaim => "/v3electionpb.Election/Proclaim",
    Leader => "/v3electionpb.Election/Leader",
    Resign => "/v3electionpb.Election/Resign",
    }
}

impl Method {
    /// Methods that may wait indefinitely for other clients.
    pub fn may_wait(self) -> bool {
        matches!(self, Method::Lock | Method::Campaign)
    }
}

const SERVICES: &[&str] = &[
    "etcdserverpb.KV",
    "etcdserverpb.Watch",
    "etcdserverpb.Lease",
    "etcdserverpb.Cluster",
    "etcdserverpb.Maintenance",
    "etcdserverpb.Auth",
    "v3lockpb.Lock",
    "v3electionpb.Election",
    "grpc.health.v1.Health",
];

pub fn known_service(s: &str) -> bool {
    SERVICES.contains(&s)
}

methods! {
    /// Bidirectional streaming methods (Snapshot: server streaming, one
    /// request, then the snapshot in chunks).
    StreamMethod, lookup_stream {
    LeaseKeepAlive => "/etcdserverpb.Lease/LeaseKeepAlive",
    Watch => "/etcdserverpb.Watch/Watch",
    Observe => "/v3electionpb.Election/Observe",
    Snapshot => "/etcdserverpb.Maintenance/Snapshot",
    }
}

/// Serves one stream until the client half-closes or goes away; `Err` ends
/// it with that status.
pub async fn call_stream(
    m: StreamMethod,
    input: MsgStream,
    sink: &mut MsgSink,
    meta: Metadata,
    core: &Core,
) -> Result<(), Status> {
    if core.view.learner.get() {
        // etcd serves no stream on a learner.
        return Err(error::not_supported_for_learner());
    }
    match m {
        StreamMethod::LeaseKeepAlive => lease_keep_alive(core, input, sink).await,
        StreamMethod::Watch => super::watch::serve(core, input, sink, meta).await,
        StreamMethod::Observe => {
            super::coord::observe(core, input, sink, meta.user.as_deref()).await
        }
        StreamMethod::Snapshot => snapshot(core, input, sink).await,
    }
}

/// Decodes a request; its bytes fields that are `Bytes` (a put's key and
/// value) become slices of `body`, not copies.
fn decode<M: Message + Default>(body: &bytes::Bytes) -> Result<M, Status> {
    M::decode(body.clone()).map_err(|e| {
        Status::new(
            Code::Internal,
            format!("grpc: error unmarshalling request: {e}"),
        )
    })
}

pub async fn call(m: Method, body: &bytes::Bytes, core: &Core) -> Result<Framed, Status> {
    if core.view.learner.get() {
        // A learner serves what etcd's does: status, the member list and
        // serializable ranges.
        let supported = match m {
            Method::Status | Method::MemberList => true,
            Method::Range => RangeRequest::decode(&body[..])
                .map(|r| r.serializable)
                .unwrap_or(false),
            _ => false,
        };
        if !supported {
            return Err(error::not_supported_for_learner());
        }
    }
    Ok(match m {
        Method::Range => range(core, decode(body)?).await?.framed(),
        Method::Put => framed_put(&put(core, decode(body)?, body).await?),
        Method::DeleteRange => delete_range(core, decode(body)?).await?.framed(),
        Method::Txn => txn(core, decode(body)?).await?.framed(),
        Method::Compact => compact(core, decode(body)?).await?.framed(),
        Method::Status => status(core, decode(body)?).await?.framed(),
        Method::Alarm => alarm(core, decode(body)?).await?.framed(),
        Method::Defragment => {
            let _: DefragmentRequest = decode(body)?;
            defragment(core).await?;
            // etcd's answer carries no header either.
            DefragmentResponse { header: None }.framed()
        }
        Method::Hash => hash(core, decode(body)?).await?.framed(),
        Method::AuthEnable
        | Method::AuthDisable
        | Method::AuthStatus
        | Method::Authenticate
        | Method::UserAdd
        | Method::UserGet
        | Method::UserList
        | Method::UserDelete
        | Method::UserChangePassword
        | Method::UserGrantRole
        | Method::UserRevokeRole
        | Method::RoleAdd
        | Method::RoleGet
        | Method::RoleList
        | Method::RoleDelete
        | Method::RoleGrantPermission
        | Method::RoleRevokePermission => {
            Framed::of_encoded(&super::auth::call(core, m, body).await?)
        }
        Method::HashKV => hash_kv(core, decode(body)?).await?.framed(),
        Method::MemberList => member_list(core, decode(body)?).await?.framed(),
        Method::MemberAdd => member_add(core, decode(body)?).await?.framed(),
        Method::MemberRemove => member_remove(core, decode(body)?).await?.framed(),
        Method::MemberUpdate => member_update(core, decode(body)?).await?.framed(),
        Method::MemberPromote => member_promote(core, decode(body)?).await?.framed(),
        Method::LeaseGrant => lease_grant(core, decode(body)?).await?.framed(),
        Method::LeaseRevoke => lease_revoke(core, decode(body)?).await?.framed(),
        Method::LeaseTimeToLive => lease_time_to_live(core, decode(body)?).await?.framed(),
        Method::LeaseLeases => lease_leases(core, decode(body)?).await?.framed(),
        Method::MoveLeader => move_leader(core, decode(body)?).await?.framed(),
        // Lock and Election calls are boxed: their futures are the largest
        // (up to 1.2 KB), and every call's task, a Put's too, is as large
        // as this function's largest branch and is moved whole when spawned.
        Method::Lock => Box::pin(coord::lock(core, decode(body)?)).await?.framed(),
        Method::Unlock => Box::pin(coord::unlock(core, decode(body)?)).await?.framed(),
        Method::Campaign => Box::pin(coord::campaign(core, decode(body)?))
            .await?
            .framed(),
        Method::Proclaim => Box::pin(coord::proclaim(core, decode(body)?))
            .await?
            .framed(),
        Method::Leader => Box::pin(coord::leader(core, decode(body)?)).await?.framed(),
        Method::Resign => Box::pin(coord::resign(core, decode(body)?)).await?.framed(),
        Method::HealthCheck => {
            let _: crate::proto::health::HealthCheckRequest = decode(body)?;
            crate::proto::health::HealthCheckResponse {
                status: crate::proto::health::health_check_response::ServingStatus::Serving as i32,
            }
            .framed()
        }
    })
}

/// A unary call's answer as gRPC frames it: a 5-byte message prefix
/// (uncompressed, length) and the encoded message, in one buffer, so the
/// gRPC layer sends it as it is (the gateway reads `message`).
pub struct Framed(Vec<u8>);

impl Framed {
    fn of_encoded(msg: &[u8]) -> Framed {
        let mut v = Vec::with_capacity(GRPC_PREFIX_BYTES + msg.len());
        v.push(0);
        v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        v.extend_from_slice(msg);
        Framed(v)
    }

    /// The encoded message.
    pub fn message(&self) -> &[u8] {
        &self.0[GRPC_PREFIX_BYTES..]
    }

    /// The whole gRPC message frame.
    pub fn into_frame(self) -> bytes::Bytes {
        self.0.into()
    }
}

const GRPC_PREFIX_BYTES: usize = 5;

/// Encodes a message after room for its gRPC prefix (one buffer, no copy).
trait EncodeFramed {
    fn framed(&self) -> Framed;
}

impl<M: Message> EncodeFramed for M {
    fn framed(&self) -> Framed {
        let len = self.encoded_len();
        let mut v = Vec::with_capacity(GRPC_PREFIX_BYTES + len);
        v.push(0);
        v.extend_from_slice(&(len as u32).to_be_bytes());
        self.encode_raw(&mut v);
        Framed(v)
    }
}

/// A put's answer, framed. One without a previous value (nearly every
/// put) is written by hand: prost writes a varint a byte at a time through
/// `BufMut`, and the header's four (cluster and member IDs take ten bytes
/// each) were most of the encoding's cost. The bytes are prost's.
fn framed_put(r: &PutResponse) -> Framed {
    let (Some(h), None) = (&r.header, &r.prev_kv) else {
        return r.framed();
    };
    // Tag and ten varint bytes for each of the header's four fields.
    let mut head = [0u8; 44];
    let mut n = 0;
    for (tag, v) in [
        (0x08, h.cluster_id),
        (0x10, h.member_id),
        (0x18, h.revision as u64),
        (0x20, h.raft_term),
    ] {
        if v != 0 {
            head[n] = tag;
            n += 1;
            n += put_varint(&mut head[n..], v);
        }
    }
    let len = 2 + n;
    let mut v = Vec::with_capacity(GRPC_PREFIX_BYTES + len);
    v.push(0);
    v.extend_from_slice(&(len as u32).to_be_bytes());
    // PutResponse.header = 1, length-delimited; n < 128: a one-byte length.
    v.extend_from_slice(&[0x0a, n as u8]);
    v.extend_from_slice(&head[..n]);
    Framed(v)
}

/// Writes `v` as a protobuf varint at the start of `out` (room for ten
/// bytes); returns the bytes written.
fn put_varint(out: &mut [u8], mut v: u64) -> usize {
    let mut i = 0;
    while v >= 0x80 {
        out[i] = (v as u8) | 0x80;
        v >>= 7;
        i += 1;
    }
    out[i] = v as u8;
    i + 1
}

pub(crate) fn header(core: &Core, revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        cluster_id: core.router.member.cluster_id,
        member_id: core.router.member.id,
        revision,
        raft_term: core.view.term.get(),
    })
}

/// The Cluster service's header: etcd's carries no revision there.
fn cluster_header(core: &Core) -> Option<ResponseHeader> {
    header(core, 0)
}

async fn with_timeout<T>(
    core: &Core,
    f: impl Future<Output = Result<T, oneshot::Canceled>>,
) -> Result<T, Status> {
    let d = core.router.member.request_timeout;
    let timed = async {
        glommio::timer::sleep(d).await;
        Err(error::timeout())
    };
    let work = async { f.await.map_err(|_| error::stopped()) };
    futures_lite::future::or(work, timed).await
}

/// Rewrites every shard's segments of this member (etcd's defragment is
/// per member too), one shard after another as etcd rewrites one file.
async fn defragment(core: &Core) -> Result<(), Status> {
    for s in &core.router.shards {
        let (tx, rx) = oneshot::channel();
        s.send(ShardMsg::Defrag { reply: tx });
        rx.await.map_err(|_| error::stopped())?;
    }
    Ok(())
}

/// Proposes a command and waits until it is applied.
async fn propose(core: &Core, cmd: RaftCommand) -> Result<WriteResult, Status> {
    check_alarms(core, &cmd)?;
    propose_encoded(core, cmd.encode_to_vec(), cmd).await
}

/// Proposes an encoded `RaftCommand` (its alarms checked) and waits until
/// it is applied. `cmd` is what `data` decodes to (`raftcore::Proposal`).
async fn propose_encoded(
    core: &Core,
    data: Vec<u8>,
    cmd: RaftCommand,
) -> Result<WriteResult, Status> {
    if data.len() > core.router.member.max_request_bytes {
        return Err(error::request_too_large());
    }
    // Answered through this core's write table (`writes`), which also
    // times the write out; dropping this future gives the slot up.
    let slot = core.writes.begin();
    let wait = core.writes.wait(slot);
    core.writes.propose(data, cmd, slot);
    let res = wait.await?;
    core.view
        .revision
        .set(core.view.revision.get().max(res.revision));
    Ok(res)
}

/// What etcd refuses while an alarm is raised: with NOSPACE, puts (in any
/// txn) and lease grants; with CORRUPT, every write.
fn check_alarms(core: &Core, cmd: &RaftCommand) -> Result<(), Status> {
    let alarms = core.view.alarms.get();
    if alarms == 0 {
        return Ok(());
    }
    fn has_put(t: &TxnRequest) -> bool {
        t.success
            .iter()
            .chain(&t.failure)
            .any(|op| match &op.request {
                Some(request_op::Request::RequestPut(_)) => true,
                Some(request_op::Request::RequestTxn(t)) => has_put(t),
                _ => false,
            })
    }
    let (write, grows) = match &cmd.cmd {
        Some(raft_command::Cmd::Txn(t)) => (true, has_put(t)),
        Some(raft_command::Cmd::LeaseGrant(_)) => (true, true),
        Some(raft_command::Cmd::Compaction(_)) | Some(raft_command::Cmd::LeaseRevoke(_)) => {
            (true, false)
        }
        _ => (false, false),
    };
    if alarms & 2 != 0 && write {
        return Err(error::corrupt());
    }
    if alarms & 1 != 0 && grows {
        return Err(error::no_space());
    }
    Ok(())
}

pub(crate) fn single_op_txn(op: request_op::Request) -> RaftCommand {
    RaftCommand {
        cmd: Some(raft_command::Cmd::Txn(TxnRequest {
            compare: vec![],
            success: vec![RequestOp { request: Some(op) }],
            failure: vec![],
        })),
    }
}

/// The `RaftCommand` of a one-put txn, built around the put's encoding
/// `put` as it came from the client: what encoding the decoded request in
/// `single_op_txn` would give, less fields this build does not know
/// (which decoding drops anyway), without a decode-and-encode round.
fn put_command(put: &[u8]) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    // RaftCommand.txn = 1 { TxnRequest.success = 2 { RequestOp.request_put = 2 { put } } }
    let op_len = 1 + encoded_len_varint(put.len() as u64) + put.len();
    let txn_len = 1 + encoded_len_varint(op_len as u64) + op_len;
    let mut out = Vec::with_capacity(1 + encoded_len_varint(txn_len as u64) + txn_len);
    encode_key(1, WireType::LengthDelimited, &mut out);
    encode_varint(txn_len as u64, &mut out);
    encode_key(2, WireType::LengthDelimited, &mut out);
    encode_varint(op_len as u64, &mut out);
    encode_key(2, WireType::LengthDelimited, &mut out);
    encode_varint(put.len() as u64, &mut out);
    out.extend_from_slice(put);
    out
}

/// Decodes a log entry's command. A one-put txn as `put_command` builds it
/// (the commonest entry by far) is taken apart by hand down to the put,
/// which prost decodes (its key and value stay slices of `data`); any other
/// entry, or one whose put does not decode, goes to prost whole. Both ways
/// give the same command for the same bytes (tested against prost).
pub fn decode_command(data: bytes::Bytes) -> Result<RaftCommand, prost::DecodeError> {
    if let Some(at) = put_in_command(&data) {
        if let Ok(put) = PutRequest::decode(data.slice(at..)) {
            return Ok(single_op_txn(request_op::Request::RequestPut(put)));
        }
    }
    RaftCommand::decode(data)
}

/// Where the put starts in `data` if it is `put_command`'s shape: field 1
/// (txn), field 2 (success) and field 2 (request_put), each a length that
/// runs to the end of `data`, one inside the other.
fn put_in_command(data: &[u8]) -> Option<usize> {
    let mut at = 0;
    for tag in [0x0a, 0x12, 0x12] {
        if *data.get(at)? != tag {
            return None;
        }
        at += 1;
        let mut rest = &data[at..];
        let len = prost::encoding::decode_varint(&mut rest).ok()?;
        at = data.len() - rest.len();
        if len != rest.len() as u64 {
            return None;
        }
    }
    Some(at)
}

/// What etcd's backend quota counts for a key's metadata and a lease.
const QUOTA_KV_OVERHEAD: u64 = 256;
const QUOTA_LEASE_OVERHEAD: u64 = 64;

fn quota_cost_put(p: &PutRequest) -> u64 {
    QUOTA_KV_OVERHEAD + p.key.len() as u64 + p.value.len() as u64
}

/// etcd's cost of a txn: the puts of its larger branch (puts in nested
/// txns are not counted, as etcd does not count them).
fn quota_cost_txn(t: &TxnRequest) -> u64 {
    let branch = |ops: &[RequestOp]| -> u64 {
        ops.iter()
            .map(|op| match &op.request {
                Some(request_op::Request::RequestPut(p)) => quota_cost_put(p),
                _ => 0,
            })
            .sum()
    };
    branch(&t.success).max(branch(&t.failure))
}

/// etcd's backend quota: a write of `cost` bytes that would take the
/// database (what the shards' segment files take, as the applier last
/// told this core) to `--quota-backend-bytes` or past it raises NOSPACE
/// for this member, through the log as an `Alarm` call would, and is
/// refused with etcd's error. A write that adds nothing (cost 0) passes,
/// as on etcd 3.5.
async fn check_quota(core: &Core, cost: u64) -> Result<(), Status> {
    let Some(quota) = core.router.member.quota_bytes else {
        return Ok(());
    };
    if cost == 0 || core.view.db_bytes.get().saturating_add(cost) < quota {
        return Ok(());
    }
    if core.view.alarms.get() & 1 == 0 {
        use crate::proto::etcdserverpb::alarm_request::AlarmAction;
        let req = AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: core.router.member.id,
            alarm: AlarmType::Nospace as i32,
        };
        let (tx, rx) = oneshot::channel();
        core.router.raft.send(RaftMsg::Alarm { req, reply: tx });
        // etcd also refuses the write whether or not the alarm went in.
        let _ = with_timeout(core, rx).await;
    }
    Err(error::no_space())
}

pub(super) async fn put(core: &Core, req: PutRequest, raw: &[u8]) -> Result<PutResponse, Status> {
    // etcd's quota check comes before the request's own checks.
    check_quota(core, quota_cost_put(&req)).await?;
    kv::check_put(&req)?;
    // `raw` is what `req` was decoded from, so the command is what the
    // wrapped bytes decode to.
    let cmd = single_op_txn(request_op::Request::RequestPut(req));
    check_alarms(core, &cmd)?;
    let res = propose_encoded(core, put_command(raw), cmd).await?;
    let prev_kv = match res
        .txn
        .responses
        .into_iter()
        .next()
        .and_then(|r| r.response)
    {
        Some(response_op::Response::ResponsePut(p)) => p.prev_kv,
        _ => None,
    };
    Ok(PutResponse {
        header: header(core, res.revision),
        prev_kv,
    })
}

pub(super) async fn delete_range(
    core: &Core,
    req: DeleteRangeRequest,
) -> Result<DeleteRangeResponse, Status> {
    kv::check_delete(&req)?;
    let res = propose(
        core,
        single_op_txn(request_op::Request::RequestDeleteRange(req)),
    )
    .await?;
    let mut out = match res
        .txn
        .responses
        .into_iter()
        .next()
        .and_then(|r| r.response)
    {
        Some(response_op::Response::ResponseDeleteRange(d)) => d,
        _ => DeleteRangeResponse::default(),
    };
    out.header = header(core, res.revision);
    Ok(out)
}

pub(super) async fn txn(core: &Core, req: TxnRequest) -> Result<TxnResponse, Status> {
    check_quota(core, quota_cost_txn(&req)).await?;
    kv::check_txn(&req, core.router.member.max_txn_ops)?;
    let res = propose(
        core,
        RaftCommand {
            cmd: Some(raft_command::Cmd::Txn(req)),
        },
    )
    .await?;
    let mut out = res.txn;
    out.header = header(core, res.revision);
    Ok(out)
}

pub(super) async fn compact(
    core: &Core,
    req: CompactionRequest,
) -> Result<CompactionResponse, Status> {
    let res = propose(
        core,
        RaftCommand {
            cmd: Some(raft_command::Cmd::Compaction(req)),
        },
    )
    .await?;
    Ok(CompactionResponse {
        header: header(core, res.revision),
    })
}

/// The revision a read runs at: linearizable reads ask raft for a read
/// index and wait until it is applied; serializable ones use this core's
/// view.
pub(super) async fn read_revision(core: &Core, serializable: bool) -> Result<i64, Status> {
    if serializable {
        return Ok(core.view.revision.get());
    }
    let (tx, rx) = oneshot::channel();
    core.router.raft.send(RaftMsg::ReadIndex { reply: tx });
    let rev = with_timeout(core, rx).await??;
    core.view.revision.set(core.view.revision.get().max(rev));
    Ok(rev)
}

pub(super) async fn range(core: &Core, req: RangeRequest) -> Result<RangeResponse, Status> {
    kv::check_range(&req)?;
    let current = read_revision(core, req.serializable).await?;
    if req.revision > current {
        return Err(error::future_rev());
    }
    let at = if req.revision > 0 {
        req.revision
    } else {
        current
    };
    crate::metrics::mvcc_txn(1, 0, 0);
    let shards = &core.router.shards;
    let targets: Vec<usize> = if req.range_end.is_empty() {
        vec![shard_of(&req.key, shards.len())]
    } else {
        (0..shards.len()).collect()
    };
    let req = Arc::new(req);
    let mut waits = Vec::with_capacity(targets.len());
    for s in targets {
        let (tx, rx) = oneshot::channel();
        shards[s].send(ShardMsg::Read {
            rev: at,
            req: req.clone(),
            reply: tx,
        });
        waits.push(rx);
    }
    let mut parts = Vec::with_capacity(waits.len());
    for w in waits {
        parts.push(w.await.map_err(|_| error::stopped())??);
    }
    let mut out = kv::merge_range(&req, parts);
    out.header = header(core, current);
    Ok(out)
}

/// The shards' stored bytes, bytes in use and live keys, summed (a shard
/// that does not answer, only while stopping, adds nothing).
pub(super) async fn shard_totals(core: &Core) -> (u64, u64, u64) {
    let mut waits = Vec::new();
    for s in &core.router.shards {
        let (tx, rx) = oneshot::channel();
        s.send(ShardMsg::Stats { reply: tx });
        waits.push(rx);
    }
    let (mut bytes, mut in_use, mut keys) = (0, 0, 0);
    for w in waits {
        if let Ok(st) = w.await {
            bytes += st.bytes;
            in_use += st.in_use;
            keys += st.live_keys as u64;
        }
    }
    (bytes, in_use, keys)
}

async fn status(core: &Core, _req: StatusRequest) -> Result<StatusResponse, Status> {
    let (db_size, in_use, _) = shard_totals(core).await;
    let (db_size, in_use) = (db_size as i64, in_use as i64);
    let v = &core.view;
    let leader = v.leader.get();
    let mut errors = Vec::new();
    if leader == 0 {
        errors.push("etcdserver: no leader".to_string());
    }
    Ok(StatusResponse {
        header: header(core, v.revision.get()),
        version: crate::ETCD_VERSION.to_string(),
        db_size,
        leader,
        raft_index: v.commit.get(),
        raft_term: v.term.get(),
        raft_applied_index: v.applied.get(),
        errors,
        // Never above dbSize, as etcd's (records still buffered count in
        // both).
        db_size_in_use: in_use.min(db_size),
        is_learner: core.view.learner.get(),
        ..Default::default()
    })
}

async fn alarm(core: &Core, req: AlarmRequest) -> Result<AlarmResponse, Status> {
    use crate::proto::etcdserverpb::alarm_request::AlarmAction;
    let list = |alarms: Vec<(u64, i32)>| -> Vec<AlarmMember> {
        alarms
            .into_iter()
            .map(|(member_id, alarm)| AlarmMember { member_id, alarm })
            .collect()
    };
    let alarms = if req.action == AlarmAction::Get as i32 {
        let m = membership(core).await?;
        list(
            m.alarms
                .into_iter()
                .filter(|(_, kind)| req.alarm == AlarmType::None as i32 || *kind == req.alarm)
                .collect(),
        )
    } else {
        let (tx, rx) = oneshot::channel();
        core.router.raft.send(RaftMsg::Alarm { req, reply: tx });
        list(with_timeout(core, rx).await??)
    };
    // etcd's maintenance server answers Alarm without a header.
    Ok(AlarmResponse {
        header: None,
        alarms,
    })
}

/// Every version the shards hold (`(key, version)`) and their compaction
/// revision, from a snapshot of the shards.
async fn all_versions(
    core: &Core,
) -> Result<(Vec<(Vec<u8>, crate::store::index::Version)>, i64), Status> {
    let work = async { Ok(crate::snapshot::versions(&core.router.applier).await) };
    let (meta, records) = with_timeout(core, work).await??;
    Ok((records, meta.compact_rev))
}

use crate::snapshot::hash_versions;

async fn hash_kv(core: &Core, req: HashKvRequest) -> Result<HashKvResponse, Status> {
    read_revision(core, false).await?;
    let current = core.view.revision.get();
    let (records, compact) = all_versions(core).await?;
    let rev = if req.revision > 0 {
        req.revision
    } else {
        current
    };
    if rev > current {
        return Err(error::future_rev());
    }
    if compact > 0 && rev < compact {
        return Err(error::compacted());
    }
    Ok(HashKvResponse {
        header: header(core, current),
        hash: hash_versions(&records, rev),
        // etcd reports -1 until the first compaction.
        compact_revision: if compact > 0 { compact } else { -1 },
        hash_revision: rev,
    })
}

async fn hash(core: &Core, _req: HashRequest) -> Result<HashResponse, Status> {
    let (records, compact) = all_versions(core).await?;
    let h = hash_versions(&records, i64::MAX);
    Ok(HashResponse {
        header: header(core, core.view.revision.get()),
        hash: crc32c::crc32c_append(h.max(1), &compact.to_le_bytes()),
    })
}

/// The magic of the snapshot files keelson streamed before they were bbolt
/// databases (still read by `keelson snapshot status|restore`).
pub const SNAPSHOT_FILE_MAGIC: &[u8; 8] = b"KLSNBAK1";

/// `Maintenance.Snapshot`: keelson's snapshot of the shards as a bbolt
/// database laid out with etcd 3.4's buckets (`etcd_db`), so `etcdctl
/// snapshot status|restore` take the file as they take etcd's. Its size is
/// a whole number of 4 KiB pages, so of 512-byte sectors, as etcd's. Sent
/// as etcd does: the file in 64 KiB chunks with the bytes remaining (0 on
/// the last), then one more message with its sha256.
async fn snapshot(core: &Core, mut input: MsgStream, sink: &mut MsgSink) -> Result<(), Status> {
    use sha2::Digest;
    match input.next().await {
        Some(m) => {
            let _: SnapshotRequest = decode(&m?)?;
        }
        None => return Ok(()),
    }
    let (tx, rx) = oneshot::channel();
    core.router
        .applier
        .send(crate::apply::ApplierMsg::SnapshotBuild { reply: tx });
    let (_, body) = with_timeout(core, rx).await?;
    // Turning the body into the file (a sort of every version, the pages,
    // the sha256) takes time in proportion to the data: it runs on the
    // executor's blocking thread, not on the core.
    let built = glommio::executor()
        .spawn_blocking(move || {
            let (meta, records) = crate::snapshot::parse(&body)?;
            drop(body);
            let file = crate::etcd_db::build(&meta, &records)?;
            let sum = sha2::Sha256::digest(&file);
            Ok::<_, String>((file, sum))
        })
        .await;
    let (file, sum) =
        built.map_err(|e| Status::new(Code::Internal, format!("etcdserver: snapshot: {e}")))?;
    let total = file.len();
    let mut off = 0;
    while off < total {
        let end = (off + (64 << 10)).min(total);
        // etcd sends snapshot chunks without a header.
        let resp = SnapshotResponse {
            header: None,
            remaining_bytes: (total - end) as u64,
            blob: file[off..end].to_vec(),
            version: crate::ETCD_VERSION.to_string(),
        };
        if sink.send(&resp.encode_to_vec()).await.is_err() {
            return Ok(());
        }
        off = end;
    }
    // Then the checksum, in a message of its own, as etcd sends it.
    let resp = SnapshotResponse {
        header: None,
        remaining_bytes: 0,
        blob: sum.to_vec(),
        version: crate::ETCD_VERSION.to_string(),
    };
    let _ = sink.send(&resp.encode_to_vec()).await;
    Ok(())
}

async fn member_list(core: &Core, req: MemberListRequest) -> Result<MemberListResponse, Status> {
    if req.linearizable {
        read_revision(core, false).await?;
    }
    let m = membership(core).await?;
    Ok(MemberListResponse {
        header: cluster_header(core),
        members: members_pb(core, &m),
    })
}

async fn membership(core: &Core) -> Result<crate::membership::Membership, Status> {
    let (tx, rx) = oneshot::channel();
    core.router.raft.send(RaftMsg::Members { reply: tx });
    with_timeout(core, rx).await
}

/// The membership as etcd lists it. A member that has not published yet
/// shows no name and no client URLs ("unstarted"), except this one, which
/// knows its own.
fn members_pb(core: &Core, m: &crate::membership::Membership) -> Vec<Member> {
    let me = &core.router.member;
    m.members
        .iter()
        .map(|(id, i)| {
            let (name, client_urls) = if *id == me.id && i.client_urls.is_empty() {
                (me.name.clone(), me.client_urls.clone())
            } else {
                (i.name.clone(), i.client_urls.clone())
            };
            Member {
                id: *id,
                name,
                peer_ur_ls: i.peer_urls.clone(),
                client_ur_ls: client_urls,
                is_learner: i.learner,
            }
        })
        .collect()
}

/// Asks the raft core for a membership change and waits until it applies.
async fn change_members(
    core: &Core,
    kind: crate::proto::keelson::member_change::Kind,
    id: u64,
    peer_urls: Vec<String>,
    is_learner: bool,
) -> Result<(u64, crate::membership::Membership), Status> {
    use crate::proto::keelson::member_change::Kind;
    if matches!(kind, Kind::Add | Kind::Update) && !crate::membership::valid_peer_urls(&peer_urls) {
        return Err(error::member_bad_urls());
    }
    let (tx, rx) = oneshot::channel();
    core.router.raft.send(RaftMsg::ChangeMembers {
        change: crate::proto::keelson::MemberChange {
            kind: kind as i32,
            id,
            peer_urls,
            is_learner,
        },
        reply: tx,
    });
    with_timeout(core, rx).await?
}

async fn member_add(core: &Core, req: MemberAddRequest) -> Result<MemberAddResponse, Status> {
    use crate::proto::keelson::member_change::Kind;
    let (id, m) =
        change_members(core, Kind::Add, 0, req.peer_ur_ls.clone(), req.is_learner).await?;
    Ok(MemberAddResponse {
        header: cluster_header(core),
        member: Some(Member {
            id,
            name: String::new(),
            peer_ur_ls: req.peer_ur_ls,
            client_ur_ls: Vec::new(),
            is_learner: req.is_learner,
        }),
        members: members_pb(core, &m),
    })
}

async fn member_remove(
    core: &Core,
    req: MemberRemoveRequest,
) -> Result<MemberRemoveResponse, Status> {
    use crate::proto::keelson::member_change::Kind;
    let (_, m) = change_members(core, Kind::Remove, req.id, Vec::new(), false).await?;
    Ok(MemberRemoveResponse {
        header: cluster_header(core),
        members: members_pb(core, &m),
    })
}

async fn member_update(
    core: &Core,
    req: MemberUpdateRequest,
) -> Result<MemberUpdateResponse, Status> {
    use crate::proto::keelson::member_change::Kind;
    let (_, m) = change_members(core, Kind::Update, req.id, req.peer_ur_ls, false).await?;
    Ok(MemberUpdateResponse {
        header: cluster_header(core),
        members: members_pb(core, &m),
    })
}

async fn member_promote(
    core: &Core,
    req: MemberPromoteRequest,
) -> Result<MemberPromoteResponse, Status> {
    use crate::proto::keelson::member_change::Kind;
    let (_, m) = change_members(core, Kind::Promote, req.id, Vec::new(), false).await?;
    Ok(MemberPromoteResponse {
        header: cluster_header(core),
        members: members_pb(core, &m),
    })
}

/// etcd's MoveLeader: only the leader transfers; the answer comes once the
/// target leads (or etcd's leader-transfer timeout).
async fn move_leader(core: &Core, req: MoveLeaderRequest) -> Result<MoveLeaderResponse, Status> {
    let (tx, rx) = oneshot::channel();
    let already = req.target_id == core.router.member.id;
    core.router.raft.send(RaftMsg::TransferLeader {
        target: req.target_id,
        reply: tx,
    });
    rx.await.map_err(|_| error::stopped())??;
    // Nothing moved when the target leads already: etcd answers that with
    // an empty response (no header), as the etcd-client crate's tests
    // expect.
    Ok(MoveLeaderResponse {
        header: if already {
            None
        } else {
            header(core, core.view.revision.get())
        },
    })
}

// ------------------------------------------------------------------ leases

pub(super) async fn lease_grant(
    core: &Core,
    req: LeaseGrantRequest,
) -> Result<LeaseGrantResponse, Status> {
    check_quota(core, QUOTA_LEASE_OVERHEAD).await?;
    if req.ttl > crate::lease::MAX_LEASE_TTL {
        return Err(error::lease_ttl_too_large());
    }
    let ttl = req.ttl.max(core.router.member.min_lease_ttl);
    let res = propose(
        core,
        RaftCommand {
            cmd: Some(raft_command::Cmd::LeaseGrant(LeaseGrantRequest {
                ttl,
                id: req.id,
            })),
        },
    )
    .await?;
    Ok(LeaseGrantResponse {
        header: header(core, res.revision),
        id: res.lease_id,
        ttl,
        error: String::new(),
    })
}

async fn lease_revoke(core: &Core, req: LeaseRevokeRequest) -> Result<LeaseRevokeResponse, Status> {
    let res = propose(
        core,
        RaftCommand {
            cmd: Some(raft_command::Cmd::LeaseRevoke(req)),
        },
    )
    .await?;
    Ok(LeaseRevokeResponse {
        header: header(core, res.revision),
    })
}

async fn ask_applier<T>(
    core: &Core,
    msg: impl FnOnce(oneshot::Sender<T>) -> crate::apply::ApplierMsg,
) -> Result<T, Status> {
    let (tx, rx) = oneshot::channel();
    core.router.applier.send(msg(tx));
    with_timeout(core, rx).await
}

/// The keys attached to lease `id`, from every shard (unsorted).
pub(super) async fn lease_keys(core: &Core, id: i64) -> Result<Vec<Vec<u8>>, Status> {
    let mut waits = Vec::new();
    for s in &core.router.shards {
        let (tx, rx) = oneshot::channel();
        s.send(ShardMsg::LeaseKeys { id, reply: tx });
        waits.push(rx);
    }
    let mut keys = Vec::new();
    for w in waits {
        keys.extend(w.await.map_err(|_| error::stopped())?);
    }
    Ok(keys)
}

async fn lease_time_to_live(
    core: &Core,
    req: LeaseTimeToLiveRequest,
) -> Result<LeaseTimeToLiveResponse, Status> {
    let id = req.id;
    // Like a linearizable read: answer only once everything committed
    // before the request is applied (a revoke just acknowledged, or
    // replayed after a restart, must be visible).
    read_revision(core, false).await?;
    let info = if core.view.leader.get() == core.router.member.id {
        ask_applier(core, |reply| crate::apply::ApplierMsg::LeaseTimeToLive {
            id,
            reply,
        })
        .await?
    } else {
        // The leader's lessor alone sees every keep-alive (those sent to
        // it are not logged): ask it, as etcd forwards TimeToLive.
        let (tx, rx) = oneshot::channel();
        core.router.raft.send(RaftMsg::LeaseTtl { id, reply: tx });
        with_timeout(core, rx).await??
    };
    let Some((granted, remaining)) = info else {
        // etcd answers an unknown lease with TTL -1, not an error.
        return Ok(LeaseTimeToLiveResponse {
            header: header(core, core.view.revision.get()),
            id,
            ttl: -1,
            granted_ttl: 0,
            keys: vec![],
        });
    };
    let mut keys = Vec::new();
    if req.keys {
        keys = lease_keys(core, id).await?;
        keys.sort_unstable();
    }
    Ok(LeaseTimeToLiveResponse {
        header: header(core, core.view.revision.get()),
        id,
        ttl: remaining,
        granted_ttl: granted,
        keys,
    })
}

async fn lease_leases(
    core: &Core,
    _req: LeaseLeasesRequest,
) -> Result<LeaseLeasesResponse, Status> {
    read_revision(core, false).await?;
    let ids = ask_applier(core, |reply| crate::apply::ApplierMsg::LeaseList { reply }).await?;
    Ok(LeaseLeasesResponse {
        header: header(core, core.view.revision.get()),
        leases: ids.into_iter().map(|id| LeaseStatus { id }).collect(),
    })
}

/// The keep-alive stream: one response per request, in order, answered by
/// the lessor without a log write.
async fn lease_keep_alive(
    core: &Core,
    mut input: MsgStream,
    sink: &mut MsgSink,
) -> Result<(), Status> {
    while let Some(msg) = input.next().await {
        let req: LeaseKeepAliveRequest = decode(&msg?)?;
        let id = req.id;
        let ttl = if core.view.leader.get() == core.router.member.id {
            ask_applier(core, |reply| crate::apply::ApplierMsg::KeepAlive {
                id,
                reply,
            })
            .await??
        } else {
            // A follower's lessor does not decide expiry: the keep-alive
            // goes through the log so the leader's lessor renews it too.
            propose(
                core,
                RaftCommand {
                    cmd: Some(raft_command::Cmd::LeaseKeepAlive(req)),
                },
            )
            .await?
            .lease_ttl
        };
        let resp = LeaseKeepAliveResponse {
            header: header(core, core.view.revision.get()),
            id,
            ttl,
        };
        if sink.send(&resp.encode_to_vec()).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A put's answer written by hand is byte for byte prost's, for
    /// zero, small, large and negative header values, with and without a
    /// previous value.
    #[test]
    fn a_put_answer_written_by_hand_is_what_prost_writes() {
        let values: [u64; 7] = [0, 1, 127, 128, 300, 1 << 35, u64::MAX];
        let mut n = 0;
        for &a in &values {
            for &b in &values {
                for &c in &values {
                    for &d in &[0u64, 1, 1 << 40] {
                        let mut r = PutResponse {
                            header: Some(ResponseHeader {
                                cluster_id: a,
                                member_id: b,
                                revision: c as i64,
                                raft_term: d,
                            }),
                            prev_kv: None,
                        };
                        assert_eq!(framed_put(&r).0, r.framed().0, "{r:?}");
                        if n % 7 == 0 {
                            r.prev_kv = Some(crate::proto::mvccpb::KeyValue {
                                key: b"k".to_vec().into(),
                                ..Default::default()
                            });
                            assert_eq!(framed_put(&r).0, r.framed().0, "{r:?}");
                        }
                        n += 1;
                    }
                }
            }
        }
        let none = PutResponse::default();
        assert_eq!(framed_put(&none).0, none.framed().0);
    }

    /// A put proposed around its own encoding decodes to the command a
    /// decode-and-encode round would propose, and to the command `put`
    /// hands the raft core decoded, for puts with and without
    /// options, empty and long values (lengths of one and two varint bytes).
    #[test]
    fn a_put_command_built_around_the_request_is_the_encoded_txn() {
        let long = vec![7u8; 300];
        let puts = [
            PutRequest {
                key: b"k".to_vec().into(),
                ..Default::default()
            },
            PutRequest {
                key: b"key".to_vec().into(),
                value: long.clone().into(),
                lease: 5,
                prev_kv: true,
                ..Default::default()
            },
            PutRequest {
                key: vec![1u8; 200].into(),
                value: vec![2u8; 70000].into(),
                ignore_value: true,
                ignore_lease: true,
                ..Default::default()
            },
        ];
        for p in puts {
            let raw = p.encode_to_vec();
            let built = put_command(&raw);
            let want = single_op_txn(request_op::Request::RequestPut(p)).encode_to_vec();
            assert_eq!(built, want);
            // What `put` gives the raft core decoded (`Proposal::cmd`) is
            // what the entry's data decodes to.
            let given = single_op_txn(request_op::Request::RequestPut(
                PutRequest::decode(&raw[..]).unwrap(),
            ));
            assert_eq!(RaftCommand::decode(&built[..]).unwrap(), given);
            assert_eq!(decode_command(built.into()).unwrap(), given);
        }
    }

    /// `decode_command` gives what prost gives, for one-put commands and
    /// for every truncation and every one-byte change of them (other
    /// shapes, lengths that do not run to the end, broken puts), and for
    /// commands of other kinds.
    #[test]
    fn commands_decode_by_hand_as_prost_decodes_them() {
        let put = PutRequest {
            key: b"key".to_vec().into(),
            value: vec![7u8; 130].into(),
            lease: 9,
            prev_kv: true,
            ..Default::default()
        };
        let mut cases = vec![
            put_command(&put.encode_to_vec()),
            put_command(&PutRequest::default().encode_to_vec()),
            single_op_txn(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: b"k".to_vec(),
                    ..Default::default()
                },
            ))
            .encode_to_vec(),
            RaftCommand {
                cmd: Some(raft_command::Cmd::Txn(TxnRequest {
                    success: vec![
                        RequestOp {
                            request: Some(request_op::Request::RequestPut(put.clone())),
                        },
                        RequestOp {
                            request: Some(request_op::Request::RequestPut(put.clone())),
                        },
                    ],
                    ..Default::default()
                })),
            }
            .encode_to_vec(),
        ];
        let base = cases[0].clone();
        for n in 0..base.len() {
            cases.push(base[..n].to_vec());
            for x in [0u8, 0x0a, 0x12, 0x80, 0xff] {
                let mut b = base.clone();
                b[n] = x;
                cases.push(b);
            }
        }
        let mut longer = base.clone();
        longer.push(0);
        cases.push(longer);
        for c in cases {
            let want = RaftCommand::decode(&c[..]);
            let got = decode_command(c.clone().into());
            assert_eq!(got.is_ok(), want.is_ok(), "{c:?}");
            if let (Ok(g), Ok(w)) = (got, want) {
                assert_eq!(g, w, "{c:?}");
            }
        }
    }
}
