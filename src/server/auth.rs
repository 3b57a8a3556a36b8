//! The Auth service and the check every request passes while auth is
//! enabled (see `crate::auth` for the store and its tokens).
//!
//! Who may do what (etcd 3.4's rules, as far as keelson has them): with
//! no token at all, `Authenticate`, `AuthStatus`, gRPC health, Status,
//! MemberList, MoveLeader, lease TimeToLive, Leases and keep-alives; with
//! no token or a valid one, lease grant and revoke, compaction and
//! alarms; a valid token for any user: its own UserGet and the RoleGet
//! of a role it holds; key-range permissions (read, write) for Range,
//! Put, DeleteRange, every op and compare of a Txn, and watches (read too
//! for a put's or delete's prev_kv; write on every key of the lease for a
//! revoke or a put that attaches to it), and for locks and elections on
//! the keys their KV calls touch (`coord_allowed`; Observe's prefix,
//! `may_read`); the `root` role for everything else (auth and
//! membership management; hashes, snapshots and defragment, refused with
//! the auth store's own errors, gRPC code Unknown, as etcd's maintenance
//! server does). A watch asked for without a token or on a range the user
//! may not read is canceled at once with etcd's reason.

use super::api::{Method, StreamMethod};
use super::Core;
use crate::auth::{self, AuthState};
use crate::error::{Code, Status};
use crate::proto::etcdserverpb::*;
use crate::proto::keelson::AuthChange;
use crate::raftcore::RaftMsg;
use futures::channel::oneshot;
use prost::Message;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn header(core: &Core) -> Option<ResponseHeader> {
    super::api::header(core, core.view.revision.get())
}

fn decode<M: Message + Default>(body: &[u8]) -> Result<M, Status> {
    M::decode(body).map_err(|e| {
        Status::new(
            Code::Internal,
            format!("grpc: error unmarshalling request: {e}"),
        )
    })
}

/// Who sent a request: its auth token, and the common name of the client
/// certificate its TLS connection was verified with (only with
/// `--client-cert-auth`; never for the JSON gateway, as etcd's gateway
/// requests are not taken as the certificate's user either).
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller<'a> {
    pub token: Option<&'a str>,
    pub cert_cn: Option<&'a str>,
    /// The member's JWT keys when its tokens are JWTs (set by `authorize`).
    pub jwt: Option<&'a crate::jwt::Jwt>,
}

impl<'a> Caller<'a> {
    pub fn token(token: Option<&'a str>) -> Caller<'a> {
        Caller {
            token,
            ..Default::default()
        }
    }

    /// The same caller, checked against `core`'s token kind.
    fn on(self, core: &'a Core) -> Caller<'a> {
        Caller {
            jwt: core.router.member.jwt.as_deref(),
            ..self
        }
    }

    /// The user named, as etcd's `AuthInfoFromCtx`: a token's user (an
    /// invalid token is refused), else the certificate's common name, else
    /// None. A JWT also names the auth revision it was issued at: one
    /// issued before the auth store last changed is refused as old
    /// (etcd's `ErrAuthOldRevision`; the client authenticates again).
    fn user(&self, a: &AuthState) -> Result<Option<String>, Status> {
        match (self.token, self.cert_cn, self.jwt) {
            (Some(t), _, Some(jwt)) => {
                let c = jwt
                    .verify(t, now_ms() / 1000)
                    .ok_or_else(auth::invalid_auth_token)?;
                if c.revision < a.revision {
                    return Err(auth::auth_old_revision());
                }
                Ok(Some(c.username))
            }
            (Some(t), _, None) => a
                .verify(t, now_ms())
                .map(Some)
                .ok_or_else(auth::invalid_auth_token),
            (None, Some(cn), _) if !cn.is_empty() => Ok(Some(cn.to_string())),
            _ => Ok(None),
        }
    }
}

/// The user a request acts as: None while auth is disabled.
fn user_of(a: &AuthState, caller: Caller) -> Result<Option<String>, Status> {
    if !a.enabled {
        return Ok(None);
    }
    caller.user(a)?.map(Some).ok_or_else(auth::user_empty)
}

fn txn_allowed(a: &AuthState, user: &str, t: &TxnRequest) -> bool {
    t.compare
        .iter()
        .all(|c| a.allowed(user, &c.key, &c.range_end, false))
        && t.success
            .iter()
            .chain(&t.failure)
            .all(|op| match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    a.allowed(user, &r.key, &r.range_end, false)
                }
                Some(request_op::Request::RequestPut(p)) => a.allowed(user, &p.key, b"", true),
                // A delete with prev_kv also needs read permission.
                Some(request_op::Request::RequestDeleteRange(d)) => {
                    a.allowed(user, &d.key, &d.range_end, true)
                        && (!d.prev_kv || a.allowed(user, &d.key, &d.range_end, false))
                }
                Some(request_op::Request::RequestTxn(t)) => txn_allowed(a, user, t),
                None => true,
            })
}

/// The auth store's own error for Maintenance's admin-only calls, which
/// etcd 3.4 returns unconverted (gRPC code Unknown, "auth: ..." text).
fn raw(msg: &str) -> Status {
    Status::new(Code::Unknown, msg)
}

/// etcd 3.4's `IsAdminPermitted` as its maintenance server answers it:
/// Defragment, Hash, HashKV and Snapshot.
fn admin_raw(a: &AuthState, caller: Caller) -> Result<(), Status> {
    let user = match caller.user(a) {
        Ok(Some(user)) => user,
        Ok(None) => return Err(raw("auth: user name is empty")),
        Err(_) => return Err(raw("auth: invalid auth token")),
    };
    if a.is_root(&user) {
        Ok(())
    } else {
        Err(raw("auth: permission denied"))
    }
}

/// A check `authorize` leaves to be made with the shards' data: every
/// key attached to `lease` must be writable by `user` (None: no user).
struct LeaseKeysCheck {
    user: Option<String>,
    lease: i64,
}

/// Whether a unary call may go ahead, as etcd 3.4 decides it.
pub async fn authorize(
    core: &Core,
    m: Method,
    body: &[u8],
    caller: Caller<'_>,
) -> Result<(), Status> {
    let Some(check) = authorize_request(core, m, body, caller.on(core))? else {
        return Ok(());
    };
    // etcd's `checkLeasePuts`: a lease is revoked, or a key attached to
    // it, only by a user who may write every key already attached to it
    // (checked here when the request arrives; etcd checks when it
    // applies).
    let keys = super::api::lease_keys(core, check.lease).await?;
    let a = core.view.auth.borrow();
    if !a.enabled || keys.is_empty() {
        return Ok(());
    }
    let Some(user) = check.user else {
        return Err(auth::user_empty());
    };
    if a.is_root(&user) || keys.iter().all(|k| a.allowed(&user, k, b"", true)) {
        Ok(())
    } else {
        Err(auth::permission_denied())
    }
}

/// `authorize` up to what it can decide without the shards' data.
fn authorize_request(
    core: &Core,
    m: Method,
    body: &[u8],
    caller: Caller,
) -> Result<Option<LeaseKeysCheck>, Status> {
    // Borrowed, not cloned: nothing here waits, and most calls stop at
    // `enabled`.
    let a = core.view.auth.borrow();
    if !a.enabled {
        return Ok(None);
    }
    match m {
        // etcd checks nothing for these, not even a token sent with them.
        Method::Authenticate
        | Method::AuthStatus
        | Method::HealthCheck
        | Method::Status
        | Method::MemberList
        | Method::MoveLeader
        | Method::LeaseTimeToLive
        | Method::LeaseLeases => return Ok(None),
        // Through the log without a check of their own: the token is
        // optional, but must be valid when sent.
        Method::LeaseGrant | Method::Compact | Method::Alarm => {
            caller.user(&a)?;
            return Ok(None);
        }
        // The same, and the user must be able to write the lease's keys.
        Method::LeaseRevoke => {
            let user = caller.user(&a)?;
            let r: LeaseRevokeRequest = decode(body)?;
            return Ok(Some(LeaseKeysCheck { user, lease: r.id }));
        }
        Method::Defragment | Method::Hash | Method::HashKV => {
            return admin_raw(&a, caller).map(|_| None)
        }
        _ => {}
    }
    let coord = matches!(
        m,
        Method::Lock
            | Method::Unlock
            | Method::Campaign
            | Method::Proclaim
            | Method::Leader
            | Method::Resign
    );
    let user = match user_of(&a, caller) {
        Ok(u) => u,
        // Lock and Election pass their KV calls' errors on as code Unknown.
        Err(e) if coord => return Err(Status::new(Code::Unknown, e.message)),
        Err(e) => return Err(e),
    };
    let Some(user) = user else {
        return Ok(None);
    };
    if a.is_root(&user) {
        return Ok(None);
    }
    let ok = match m {
        Method::Range => {
            let r: RangeRequest = decode(body)?;
            a.allowed(&user, &r.key, &r.range_end, false)
        }
        // etcd: a put with prev_kv also needs read permission, and one
        // that attaches its key to a lease write permission on the keys
        // attached to it already.
        Method::Put => {
            let r: PutRequest = decode(body)?;
            if !a.allowed(&user, &r.key, b"", true)
                || (r.prev_kv && !a.allowed(&user, &r.key, b"", false))
            {
                return Err(auth::permission_denied());
            }
            if r.lease != 0 {
                return Ok(Some(LeaseKeysCheck {
                    user: Some(user),
                    lease: r.lease,
                }));
            }
            true
        }
        Method::DeleteRange => {
            let r: DeleteRangeRequest = decode(body)?;
            a.allowed(&user, &r.key, &r.range_end, true)
                && (!r.prev_kv || a.allowed(&user, &r.key, &r.range_end, false))
        }
        Method::Txn => txn_allowed(&a, &user, &decode(body)?),
        // A user may read its own record and the roles it holds.
        Method::UserGet => {
            let r: AuthUserGetRequest = decode(body)?;
            r.name == user
        }
        Method::RoleGet => {
            let r: AuthRoleGetRequest = decode(body)?;
            a.users
                .get(&user)
                .is_some_and(|u| u.roles.contains(&r.role))
        }
        Method::Lock
        | Method::Unlock
        | Method::Campaign
        | Method::Proclaim
        | Method::Leader
        | Method::Resign => {
            return coord_allowed(&a, &user, m, body).map(|_| None);
        }
        _ => false,
    };
    if ok {
        Ok(None)
    } else {
        Err(auth::permission_denied())
    }
}

/// Lock and Election as the user: etcd runs them through its KV API with
/// the caller's token, so they need what those KV calls need: read on the
/// name's prefix (`name/`, where the queue is) and write on the caller's
/// key in it (`name/<lease in hex>`; with no lease given, the session's
/// new lease is not known yet: write on the whole prefix), read and write
/// on a leader key to proclaim or resign, write on a key to unlock. Refused
/// as etcd's servers pass the KV error on: code Unknown.
fn coord_allowed(a: &AuthState, user: &str, m: Method, body: &[u8]) -> Result<(), Status> {
    use super::coord::prefix_end;
    use crate::proto::v3electionpb::{
        CampaignRequest, LeaderRequest, ProclaimRequest, ResignRequest,
    };
    use crate::proto::v3lockpb::{LockRequest, UnlockRequest};
    let read_prefix = |name: &[u8]| {
        let mut p = name.to_vec();
        p.push(b'/');
        a.allowed(user, &p, &prefix_end(&p), false)
    };
    let own_key = |name: &[u8], lease: i64| {
        let mut p = name.to_vec();
        p.push(b'/');
        if lease == 0 {
            let end = prefix_end(&p);
            a.allowed(user, &p, &end, true)
        } else {
            p.extend_from_slice(format!("{lease:x}").as_bytes());
            a.allowed(user, &p, b"", true) && a.allowed(user, &p, b"", false)
        }
    };
    let key_rw = |key: &[u8]| a.allowed(user, key, b"", true) && a.allowed(user, key, b"", false);
    let ok = match m {
        Method::Lock => {
            let r: LockRequest = decode(body)?;
            read_prefix(&r.name) && own_key(&r.name, r.lease)
        }
        Method::Campaign => {
            let r: CampaignRequest = decode(body)?;
            read_prefix(&r.name) && own_key(&r.name, r.lease)
        }
        Method::Unlock => {
            let r: UnlockRequest = decode(body)?;
            a.allowed(user, &r.key, b"", true)
        }
        Method::Leader => {
            let r: LeaderRequest = decode(body)?;
            read_prefix(&r.name)
        }
        Method::Proclaim => {
            let r: ProclaimRequest = decode(body)?;
            r.leader.as_ref().is_none_or(|l| key_rw(&l.key))
        }
        Method::Resign => {
            let r: ResignRequest = decode(body)?;
            r.leader.as_ref().is_none_or(|l| key_rw(&l.key))
        }
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(Status::new(Code::Unknown, "etcdserver: permission denied"))
    }
}

/// Whether a stream may open; the user it acts as (None: auth is off, or
/// the stream needs none). A watch stream opens without a token, as on
/// etcd, as user "" (no name), and each watch it asks for is then
/// canceled (`watch_refusal`).
pub fn authorize_stream(
    core: &Core,
    m: StreamMethod,
    caller: Caller,
) -> Result<Option<String>, Status> {
    let caller = caller.on(core);
    let a = core.view.auth.borrow();
    if !a.enabled {
        return Ok(None);
    }
    match m {
        // etcd's lease keep-alive checks nothing.
        StreamMethod::LeaseKeepAlive => Ok(None),
        StreamMethod::Snapshot => admin_raw(&a, caller).map(|_| None),
        StreamMethod::Watch => Ok(Some(caller.user(&a)?.unwrap_or_default())),
        _ => user_of(&a, caller),
    }
}

/// Whether `user` may read [key, range_end) (true while auth is off).
pub fn may_read(core: &Core, user: &str, key: &[u8], range_end: &[u8]) -> bool {
    let a = core.view.auth.borrow();
    !a.enabled || a.is_root(user) || a.allowed(user, key, range_end, false)
}

/// Why `user` may not watch [key, range_end), as etcd words the cancel
/// reason; None if it may (read permission).
pub fn watch_refusal(
    core: &Core,
    user: Option<&str>,
    key: &[u8],
    range_end: &[u8],
) -> Option<&'static str> {
    let a = core.view.auth.borrow();
    match user {
        Some("") if a.enabled => {
            Some("rpc error: code = InvalidArgument desc = etcdserver: user name is empty")
        }
        Some(u) if a.enabled && !a.allowed(u, key, range_end, false) => {
            Some("rpc error: code = PermissionDenied desc = etcdserver: permission denied")
        }
        _ => None,
    }
}

/// Proposes a change of the auth store and waits until it applies.
async fn change(core: &Core, c: AuthChange) -> Result<(), Status> {
    let (tx, rx) = oneshot::channel();
    core.router.raft.send(RaftMsg::Auth {
        change: c,
        reply: tx,
    });
    let d = core.router.member.request_timeout;
    let timed = async {
        glommio::timer::sleep(d).await;
        Err(crate::error::timeout())
    };
    let work = async { rx.await.map_err(|_| crate::error::stopped())? };
    futures_lite::future::or(work, timed).await
}

fn plain(method: &str, request: Vec<u8>) -> AuthChange {
    AuthChange {
        method: method.into(),
        request,
        ..Default::default()
    }
}

/// A password change: the request goes without it, its salted hash with.
fn with_password(method: &str, request: Vec<u8>, password: &str) -> AuthChange {
    let salt = auth::random_bytes(16);
    AuthChange {
        method: method.into(),
        request,
        hash: auth::hash_password(&salt, password),
        salt,
        secret: Vec::new(),
    }
}

pub async fn call(core: &Core, m: Method, body: &[u8]) -> Result<Vec<u8>, Status> {
    if matches!(
        m,
        Method::AuthStatus
            | Method::Authenticate
            | Method::UserGet
            | Method::UserList
            | Method::RoleGet
            | Method::RoleList
    ) {
        // Linearizable, like etcd's (whose go through the log): everything
        // committed before is applied here, the auth store included.
        super::api::read_revision(core, false).await?;
    }
    let a = core.view.auth.borrow().clone();
    Ok(match m {
        Method::AuthStatus => {
            let _: AuthStatusRequest = decode(body)?;
            AuthStatusResponse {
                header: header(core),
                enabled: a.enabled,
                auth_revision: a.revision,
            }
            .encode_to_vec()
        }
        Method::Authenticate => {
            let r: AuthenticateRequest = decode(body)?;
            if !a.enabled {
                return Err(auth::auth_not_enabled());
            }
            if a.users.get(&r.name).is_some_and(|u| u.password.is_none()) {
                // etcd 3.4's ErrNoPasswordUser, which it does not convert.
                return Err(raw(
                    "auth: authentication failed, password was given for no password user",
                ));
            }
            if !a.check_password(&r.name, &r.password) {
                return Err(auth::auth_failed());
            }
            let token = match &core.router.member.jwt {
                // etcd's verify-only JWT member: "auth: token signing
                // attempted with verify-only key", code Unknown.
                Some(jwt) => jwt
                    .sign(&r.name, a.revision, now_ms() / 1000)
                    .ok_or_else(|| raw("auth: token signing attempted with verify-only key"))?,
                None => {
                    let ttl = core.router.member.auth_token_ttl.as_millis() as u64;
                    a.token(&r.name, now_ms(), ttl)
                }
            };
            AuthenticateResponse {
                header: header(core),
                token,
            }
            .encode_to_vec()
        }
        Method::UserGet => {
            let r: AuthUserGetRequest = decode(body)?;
            let u = a.users.get(&r.name).ok_or_else(auth::user_not_found)?;
            AuthUserGetResponse {
                header: header(core),
                roles: u.roles.iter().cloned().collect(),
            }
            .encode_to_vec()
        }
        Method::UserList => {
            let _: AuthUserListRequest = decode(body)?;
            AuthUserListResponse {
                header: header(core),
                users: a.users.keys().cloned().collect(),
            }
            .encode_to_vec()
        }
        Method::RoleGet => {
            let r: AuthRoleGetRequest = decode(body)?;
            let perm = if r.role == auth::ROOT && !a.roles.contains_key(auth::ROOT) {
                Vec::new()
            } else {
                a.permissions(&r.role).ok_or_else(auth::role_not_found)?
            };
            AuthRoleGetResponse {
                header: header(core),
                perm,
            }
            .encode_to_vec()
        }
        Method::RoleList => {
            let _: AuthRoleListRequest = decode(body)?;
            AuthRoleListResponse {
                header: header(core),
                roles: a.roles.keys().cloned().collect(),
            }
            .encode_to_vec()
        }
        Method::AuthEnable => {
            let _: AuthEnableRequest = decode(body)?;
            change(
                core,
                AuthChange {
                    method: "AuthEnable".into(),
                    secret: auth::random_bytes(32),
                    ..Default::default()
                },
            )
            .await?;
            AuthEnableResponse {
                header: header(core),
            }
            .encode_to_vec()
        }
        Method::AuthDisable => {
            let _: AuthDisableRequest = decode(body)?;
            change(core, plain("AuthDisable", vec![])).await?;
            AuthDisableResponse {
                header: header(core),
            }
            .encode_to_vec()
        }
        Method::UserAdd => {
            let mut r: AuthUserAddRequest = decode(body)?;
            if r.name.is_empty() {
                return Err(auth::user_empty());
            }
            let pw = std::mem::take(&mut r.password);
            r.hashed_password.clear();
            change(core, with_password("UserAdd", r.encode_to_vec(), &pw)).await?;
            AuthUserAddResponse {
                header: header(core),
            }
            .encode_to_vec()
        }
        Method::UserChangePassword => {
            let mut r: AuthUserChangePasswordRequest = decode(body)?;
            let pw = std::mem::take(&mut r.password);
            r.hashed_password.clear();
            change(
                core,
                with_password("UserChangePassword", r.encode_to_vec(), &pw),
            )
            .await?;
            AuthUserChangePasswordResponse {
                header: header(core),
            }
            .encode_to_vec()
        }
        Method::UserDelete => {
            let r: AuthUserDeleteRequest = decode(body)?;
            change(core, plain("UserDelete", r.encode_to_vec())).await?;
            AuthUserDeleteResponse {
                header: header(core),
            }
            .encode_to_vec()
        }
        Method::UserGrantRole => {
            let r: AuthUserGrantRoleRequest = decode(body)?;
            change(core, plain("UserGrantRole", r.encode_to_vec())).await?;
            AuthUserGrantRoleResponse {
                header: header(core),
            }
            .encode_to_vec()
        }
        Method::UserRevokeRole => {
            let r: AuthUserRevokeRoleRequest = decode(body)?;
            change(core, plain("UserRevokeRole", r.encode_to_vec())).await?;
            AuthUserRevokeRoleResponse {
                header: header(core),
            }
            .encode_to_vec()
        }
        Method::RoleAdd => {
            let r: AuthRoleAddRequest = decode(body)?;
            if r.name.is_empty() {
                return Err(auth::role_empty());
            }
            change(core, plain("RoleAdd", r.encode_to_vec())).await?;
            AuthRoleAddResponse {
                header: header(core),
            }
            .encode_to_vec()
        }
        Method::RoleDelete => {
            let r: AuthRoleDeleteRequest = decode(body)?;
            change(core, plain("RoleDelete", r.encode_to_vec())).await?;
            AuthRoleDeleteResponse {
                header: header(core),
            }
            .encode_to_vec()
        }
        Method::RoleGrantPermission => {
            let r: AuthRoleGrantPermissionRequest = decode(body)?;
            change(core, plain("RoleGrantPermission", r.encode_to_vec())).await?;
            AuthRoleGrantPermissionResponse {
                header: header(core),
            }
            .encode_to_vec()
        }
        Method::RoleRevokePermission => {
            let r: AuthRoleRevokePermissionRequest = decode(body)?;
            change(core, plain("RoleRevokePermission", r.encode_to_vec())).await?;
            AuthRoleRevokePermissionResponse {
                header: header(core),
            }
            .encode_to_vec()
        }
        _ => {
            return Err(Status::new(
                Code::Internal,
                "etcdserver: not an auth method",
            ))
        }
    })
}
