//! The Lock and Election services (v3lockpb, v3electionpb), built the way
//! etcd builds them: on top of the KV, Lease and Watch paths of this server,
//! following clientv3's `concurrency` recipes (Mutex, Election) step for
//! step, so keys, revisions and errors are the ones etcd clients see.
//!
//! A waiter holds a key `name/<lease hex>`; the holder (leader) is the key
//! with the lowest create revision under `name/`. Waiting means watching
//! the next older key until it is deleted (`wait_deletes`), so waiters form
//! a queue and wake one at a time.
//!
//! Like etcd, errors from the underlying calls come back with gRPC code
//! Unknown and etcd's message (etcd's lock server returns clientv3 errors,
//! which carry no gRPC status).

use super::api;
use super::grpc::{MsgSink, MsgStream};
use super::watch::LocalWatch;
use super::Core;
use crate::error::{Code, Status};
use crate::proto::etcdserverpb::{
    compare, range_request, request_op, response_op, Compare, DeleteRangeRequest,
    LeaseGrantRequest, PutRequest, RangeRequest, RangeResponse, RequestOp, ResponseHeader,
    TxnRequest, TxnResponse, WatchCreateRequest,
};
use crate::proto::mvccpb::{event::EventType, KeyValue};
use crate::proto::v3electionpb::*;
use crate::proto::v3lockpb::*;
use prost::Message;

/// clientv3's session TTL when no lease is given.
const SESSION_TTL: i64 = 60;

fn unknown(st: Status) -> Status {
    Status::new(Code::Unknown, st.message)
}

fn not_leader() -> Status {
    Status::new(Code::Unknown, "election: not leader")
}

fn missing_leader() -> Status {
    Status::new(Code::Unknown, "\"leader\" field must be provided")
}

/// The lease a request's session uses: the given one, or a new one with
/// clientv3's default TTL (never kept alive: etcd orphans the session).
async fn session_lease(core: &Core, lease: i64) -> Result<i64, Status> {
    if lease != 0 {
        return Ok(lease);
    }
    let g = api::lease_grant(
        core,
        LeaseGrantRequest {
            ttl: SESSION_TTL,
            id: 0,
        },
    )
    .await
    .map_err(unknown)?;
    Ok(g.id)
}

pub(super) fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// clientv3's `WithFirstCreate` (or `WithLastCreate`) on a prefix: the key
/// with the lowest (highest) create revision, optionally only among keys
/// created at or before `max_create`.
fn by_create(prefix: &[u8], first: bool, max_create: i64) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_target: range_request::SortTarget::Create as i32,
        sort_order: if first {
            range_request::SortOrder::Ascend
        } else {
            range_request::SortOrder::Descend
        } as i32,
        max_create_revision: max_create,
        ..Default::default()
    }
}

fn create_rev_is(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(compare::TargetUnion::CreateRevision(rev)),
        ..Default::default()
    }
}

fn op_put(key: &[u8], value: &[u8], lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.to_vec().into(),
            value: value.to_vec().into(),
            lease,
            ..Default::default()
        })),
    }
}

fn op_range(r: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(r)),
    }
}

fn op_delete(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: key.to_vec(),
                ..Default::default()
            },
        )),
    }
}

fn get(key: &[u8]) -> RangeRequest {
    RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    }
}

fn range_kvs(t: &TxnResponse, i: usize) -> &[KeyValue] {
    match t.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(response_op::Response::ResponseRange(r)) => &r.kvs,
        _ => &[],
    }
}

fn header_rev(h: &Option<ResponseHeader>) -> i64 {
    h.as_ref().map(|h| h.revision).unwrap_or(0)
}

async fn txn(core: &Core, t: TxnRequest) -> Result<TxnResponse, Status> {
    api::txn(core, t).await.map_err(unknown)
}

async fn range(core: &Core, r: RangeRequest) -> Result<RangeResponse, Status> {
    api::range(core, r).await.map_err(unknown)
}

/// Waits for a DELETE event of `key` from revision `rev` on.
async fn wait_delete(core: &Core, key: &[u8], rev: i64) -> Result<(), Status> {
    let w = LocalWatch::open(core)?;
    w.watch(WatchCreateRequest {
        key: key.to_vec(),
        start_revision: rev,
        ..Default::default()
    });
    loop {
        let r = w.next().await?;
        if r.compact_revision != 0 {
            return Err(Status::new(
                Code::Unknown,
                "etcdserver: mvcc: required revision has been compacted",
            ));
        }
        if r.canceled {
            return Err(Status::new(
                Code::Unknown,
                "lost watcher waiting for delete",
            ));
        }
        if r.events
            .iter()
            .any(|e| e.r#type == EventType::Delete as i32)
        {
            return Ok(());
        }
    }
}

/// clientv3's `waitDeletes`: waits until every key under `prefix` created
/// at or before `max_create` is gone.
async fn wait_deletes(
    core: &Core,
    prefix: &[u8],
    max_create: i64,
) -> Result<ResponseHeader, Status> {
    loop {
        let r = range(core, by_create(prefix, false, max_create)).await?;
        let Some(kv) = r.kvs.first() else {
            return Ok(r.header.unwrap_or_default());
        };
        wait_delete(core, &kv.key, header_rev(&r.header)).await?;
    }
}

/// Deletes a key when dropped unless disarmed: a waiter whose client went
/// away (or whose wait failed) gives its place up, as clientv3 does.
struct GiveUp {
    core: std::rc::Weak<Core>,
    key: Vec<u8>,
    /// Only if the key still has this create revision (0: any).
    rev: i64,
    armed: bool,
}

impl Drop for GiveUp {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Some(core) = self.core.upgrade() else {
            return;
        };
        let (key, rev) = (std::mem::take(&mut self.key), self.rev);
        glommio::spawn_local(async move {
            let t = TxnRequest {
                compare: if rev > 0 {
                    vec![create_rev_is(&key, rev)]
                } else {
                    vec![]
                },
                success: vec![op_delete(&key)],
                failure: vec![],
            };
            let _ = api::txn(&core, t).await;
        })
        .detach();
    }
}

// -------------------------------------------------------------------- Lock

pub async fn lock(core: &Core, req: LockRequest) -> Result<LockResponse, Status> {
    let lease = session_lease(core, req.lease).await?;
    let mut prefix = req.name.clone();
    prefix.push(b'/');
    let key = [prefix.as_slice(), format!("{lease:x}").as_bytes()].concat();
    let owner = by_create(&prefix, true, 0);
    let t = txn(
        core,
        TxnRequest {
            compare: vec![create_rev_is(&key, 0)],
            success: vec![op_put(&key, b"", lease), op_range(owner.clone())],
            failure: vec![op_range(get(&key)), op_range(owner)],
        },
    )
    .await?;
    let my_rev = if t.succeeded {
        header_rev(&t.header)
    } else {
        range_kvs(&t, 0)
            .first()
            .map(|kv| kv.create_revision)
            .unwrap_or(0)
    };
    let held = range_kvs(&t, 1)
        .first()
        .map(|kv| kv.create_revision == my_rev)
        .unwrap_or(true);
    if held {
        return Ok(LockResponse {
            header: t.header,
            key,
        });
    }
    let mut give_up = GiveUp {
        core: core.me.clone(),
        key: key.clone(),
        rev: 0,
        armed: true,
    };
    let header = wait_deletes(core, &prefix, my_rev - 1).await?;
    give_up.armed = false;
    Ok(LockResponse {
        header: Some(header),
        key,
    })
}

pub async fn unlock(core: &Core, req: UnlockRequest) -> Result<UnlockResponse, Status> {
    let r = api::delete_range(
        core,
        DeleteRangeRequest {
            key: req.key,
            ..Default::default()
        },
    )
    .await
    .map_err(unknown)?;
    Ok(UnlockResponse { header: r.header })
}

// ---------------------------------------------------------------- Election

pub async fn campaign(core: &Core, req: CampaignRequest) -> Result<CampaignResponse, Status> {
    let lease = session_lease(core, req.lease).await?;
    let mut prefix = req.name.clone();
    prefix.push(b'/');
    let key = [prefix.as_slice(), format!("{lease:x}").as_bytes()].concat();
    let t = txn(
        core,
        TxnRequest {
            compare: vec![create_rev_is(&key, 0)],
            success: vec![op_put(&key, &req.value, lease)],
            failure: vec![op_range(get(&key))],
        },
    )
    .await?;
    let mut rev = header_rev(&t.header);
    let mut give_up = GiveUp {
        core: core.me.clone(),
        key: key.clone(),
        rev: 0,
        armed: true,
    };
    if !t.succeeded {
        let kv = range_kvs(&t, 0).first().cloned().unwrap_or_default();
        rev = kv.create_revision;
        give_up.rev = rev;
        if kv.value != req.value {
            proclaim_at(core, &key, rev, lease, &req.value).await?;
        }
    }
    give_up.rev = rev;
    wait_deletes(core, &prefix, rev - 1).await?;
    give_up.armed = false;
    Ok(CampaignResponse {
        header: t.header,
        leader: Some(LeaderKey {
            name: req.name,
            key,
            rev,
            lease,
        }),
    })
}

async fn proclaim_at(
    core: &Core,
    key: &[u8],
    rev: i64,
    lease: i64,
    value: &[u8],
) -> Result<Option<ResponseHeader>, Status> {
    let t = txn(
        core,
        TxnRequest {
            compare: vec![create_rev_is(key, rev)],
            success: vec![op_put(key, value, lease)],
            failure: vec![],
        },
    )
    .await?;
    if !t.succeeded {
        return Err(not_leader());
    }
    Ok(t.header)
}

pub async fn proclaim(core: &Core, req: ProclaimRequest) -> Result<ProclaimResponse, Status> {
    let l = req.leader.ok_or_else(missing_leader)?;
    let header = proclaim_at(core, &l.key, l.rev, l.lease, &req.value).await?;
    Ok(ProclaimResponse { header })
}

pub async fn resign(core: &Core, req: ResignRequest) -> Result<ResignResponse, Status> {
    let l = req.leader.ok_or_else(missing_leader)?;
    let t = txn(
        core,
        TxnRequest {
            compare: vec![create_rev_is(&l.key, l.rev)],
            success: vec![op_delete(&l.key)],
            failure: vec![],
        },
    )
    .await?;
    Ok(ResignResponse { header: t.header })
}

pub async fn leader(core: &Core, req: LeaderRequest) -> Result<LeaderResponse, Status> {
    let mut prefix = req.name;
    prefix.push(b'/');
    let r = range(core, by_create(&prefix, true, 0)).await?;
    match r.kvs.into_iter().next() {
        Some(kv) => Ok(LeaderResponse {
            header: r.header,
            kv: Some(kv),
        }),
        None => Err(Status::new(Code::Unknown, "election: no leader")),
    }
}

/// The Observe stream: the current leader, then every change of it, as
/// clientv3's `Election.Observe` reports them.
pub async fn observe(
    core: &Core,
    mut input: MsgStream,
    sink: &mut MsgSink,
    user: Option<&str>,
) -> Result<(), Status> {
    let Some(msg) = input.next().await else {
        return Ok(());
    };
    let req = LeaderRequest::decode(msg?).map_err(|e| {
        Status::new(
            Code::Internal,
            format!("grpc: error unmarshalling request: {e}"),
        )
    })?;
    let mut prefix = req.name;
    prefix.push(b'/');
    // As the user (auth on): etcd's observer reads the prefix with the
    // caller's token and, refused, just ends the stream (status OK, no
    // message).
    if let Some(user) = user {
        if !super::auth::may_read(core, user, &prefix, &prefix_end(&prefix)) {
            return Ok(());
        }
    }
    loop {
        let r = range(core, by_create(&prefix, true, 0)).await?;
        let (header, kv) = match r.kvs.into_iter().next() {
            Some(kv) => (r.header, kv),
            None => {
                // Wait for the first put under the prefix.
                let w = LocalWatch::open(core)?;
                w.watch(WatchCreateRequest {
                    key: prefix.clone(),
                    range_end: prefix_end(&prefix),
                    start_revision: header_rev(&r.header),
                    ..Default::default()
                });
                let put = EventType::Put as i32;
                loop {
                    let wr = next_or_gone(&w, sink).await?;
                    let Some(wr) = wr else { return Ok(()) };
                    if wr.canceled {
                        return Ok(());
                    }
                    if let Some(e) = wr.events.into_iter().find(|e| e.r#type == put) {
                        let kv = e.kv.unwrap_or_default();
                        let mut h = wr.header.unwrap_or_default();
                        h.revision = kv.mod_revision;
                        break (Some(h), kv);
                    }
                }
            }
        };
        let rev = header_rev(&header);
        let key = kv.key.clone();
        let b = LeaderResponse {
            header,
            kv: Some(kv),
        }
        .encode_to_vec();
        if sink.send(&b).await.is_err() {
            return Ok(());
        }
        // Follow the leader's key until it is deleted.
        let w = LocalWatch::open(core)?;
        w.watch(WatchCreateRequest {
            key,
            start_revision: rev + 1,
            ..Default::default()
        });
        'key: loop {
            let Some(wr) = next_or_gone(&w, sink).await? else {
                return Ok(());
            };
            if wr.canceled {
                return Ok(());
            }
            for e in wr.events {
                if e.r#type == EventType::Delete as i32 {
                    break 'key;
                }
                let b = LeaderResponse {
                    header: wr.header,
                    kv: e.kv,
                }
                .encode_to_vec();
                if sink.send(&b).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// The next watch response, or `None` once the client is gone.
async fn next_or_gone(
    w: &LocalWatch<'_>,
    sink: &mut MsgSink,
) -> Result<Option<crate::proto::etcdserverpb::WatchResponse>, Status> {
    futures_lite::future::or(async { w.next().await.map(Some) }, async {
        sink.closed().await;
        Ok(None)
    })
    .await
}
