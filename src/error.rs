//! Errors as etcd sends them: a gRPC status code and etcd's exact message.
//! Clients match on these strings (e.g. clientv3's `rpctypes`), so the text
//! must never drift from etcd's.

use std::fmt;

/// gRPC status codes (the subset keelson sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    Canceled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    /// A code from its number (an unknown number is `Unknown`).
    pub fn from_u8(n: u8) -> Code {
        use Code::*;
        [
            Ok,
            Canceled,
            Unknown,
            InvalidArgument,
            DeadlineExceeded,
            NotFound,
            AlreadyExists,
            PermissionDenied,
            ResourceExhausted,
            FailedPrecondition,
            Aborted,
            OutOfRange,
            Unimplemented,
            Internal,
            Unavailable,
            DataLoss,
            Unauthenticated,
        ]
        .get(n as usize)
        .copied()
        .unwrap_or(Unknown)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

macro_rules! etcd_errors {
    ($($fn_name:ident => ($code:ident, $msg:expr);)*) => {
        $(pub fn $fn_name() -> Status { Status::new(Code::$code, $msg) })*
    };
}

etcd_errors! {
    empty_key => (InvalidArgument, "etcdserver: key is not provided");
    key_not_found => (InvalidArgument, "etcdserver: key not found");
    value_provided => (InvalidArgument, "etcdserver: value is provided");
    lease_provided => (InvalidArgument, "etcdserver: lease is provided");
    too_many_ops => (InvalidArgument, "etcdserver: too many operations in txn request");
    duplicate_key => (InvalidArgument, "etcdserver: duplicate key given in txn request");
    compacted => (OutOfRange, "etcdserver: mvcc: required revision has been compacted");
    future_rev => (OutOfRange, "etcdserver: mvcc: required revision is a future revision");
    lease_not_found => (NotFound, "etcdserver: requested lease not found");
    lease_exist => (FailedPrecondition, "etcdserver: lease already exists");
    lease_ttl_too_large => (OutOfRange, "etcdserver: too large lease TTL");
    request_too_large => (InvalidArgument, "etcdserver: request is too large");
    no_leader => (Unavailable, "etcdserver: no leader");
    stopped => (Unavailable, "etcdserver: server stopped");
    timeout => (Unavailable, "etcdserver: request timed out");
    corrupt => (DataLoss, "etcdserver: corrupt cluster");
    not_leader => (FailedPrecondition, "etcdserver: not leader");
    bad_leader_transferee => (FailedPrecondition, "etcdserver: bad leader transferee");
    leader_transfer_timeout => (Unavailable, "etcdserver: request timed out, leader transfer took too long");
    member_exist => (FailedPrecondition, "etcdserver: member ID already exist");
    peer_url_exist => (FailedPrecondition, "etcdserver: Peer URLs already exists");
    // etcd 3.4 maps this one to the client-side error value, not a gRPC
    // status, so it reaches clients with code Unknown.
    member_not_enough_started => (Unknown, "etcdserver: re-configuration failed due to not enough started members");
    member_bad_urls => (InvalidArgument, "etcdserver: given member URLs are invalid");
    member_not_found => (NotFound, "etcdserver: member not found");
    member_not_learner => (FailedPrecondition, "etcdserver: can only promote a learner member");
    learner_not_ready => (FailedPrecondition, "etcdserver: can only promote a learner member which is in sync with leader");
    too_many_learners => (FailedPrecondition, "etcdserver: too many learner members in cluster");
    unhealthy => (Unavailable, "etcdserver: unhealthy cluster");
    no_space => (ResourceExhausted, "etcdserver: mvcc: database space exceeded");
    not_supported_for_learner => (Unavailable, "etcdserver: rpc not supported for learner");
}

/// What grpc-go answers for a message over the server's receive limit.
pub fn message_too_large(len: usize, limit: usize) -> Status {
    Status::new(
        Code::ResourceExhausted,
        format!("grpc: received message larger than max ({len} vs. {limit})"),
    )
}

/// What grpc-go answers for a method the server does not have; keelson uses
/// it for etcd methods it does not implement yet (listed in the README).
pub fn unimplemented(service: &str, method: &str) -> Status {
    Status::new(
        Code::Unimplemented,
        format!("unknown method {method} for service {service}"),
    )
}
