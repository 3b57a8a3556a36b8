//! KV semantics that do not depend on where keys live: request validation
//! (etcd's `checkPutRequest`, `checkTxnReqs`, `checkIntervals`), compare
//! evaluation, the merging of per-shard partial results, and the Txn engine.
//!
//! The Txn engine is written once against the `Access` trait: a shard runs it
//! with `LocalAccess` (all keys are its own); the applier runs it with an
//! access that scatters each step to every shard. Either way the results are
//! the same merges of the same partials.

use crate::error::{self, Status};
use crate::proto::etcdserverpb::{
    compare, range_request, request_op, response_op, Compare, DeleteRangeResponse, PutResponse,
    RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use crate::proto::mvccpb::KeyValue;
use crate::store::index::Version;
use std::future::Future;

/// One shard's view of a Compare over its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmpPartial {
    pub count: u32,
    pub all_ok: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RangePartial {
    pub kvs: Vec<KeyValue>,
    pub count: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OpPartial {
    /// `Some` only from the shard that owns the key.
    Put(Option<PutResponse>),
    Range(RangePartial),
    Delete(DeleteRangeResponse),
    None,
}

// ---------------------------------------------------------------- validation

pub fn check_put(p: &crate::proto::etcdserverpb::PutRequest) -> Result<(), Status> {
    if p.key.is_empty() {
        return Err(error::empty_key());
    }
    if p.ignore_value && !p.value.is_empty() {
        return Err(error::value_provided());
    }
    if p.ignore_lease && p.lease != 0 {
        return Err(error::lease_provided());
    }
    Ok(())
}

pub fn check_range(r: &RangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(error::empty_key());
    }
    Ok(())
}

pub fn check_delete(d: &crate::proto::etcdserverpb::DeleteRangeRequest) -> Result<(), Status> {
    if d.key.is_empty() {
        return Err(error::empty_key());
    }
    Ok(())
}

/// etcd's checkTxnReqs: limits, empty keys, and no key written twice.
pub fn check_txn(t: &TxnRequest, max_ops: usize) -> Result<(), Status> {
    check_txn_ops(t, max_ops)?;
    check_intervals(&t.success)?;
    check_intervals(&t.failure)?;
    Ok(())
}

fn check_txn_ops(t: &TxnRequest, max_ops: usize) -> Result<(), Status> {
    if t.compare.len() > max_ops || t.success.len() > max_ops || t.failure.len() > max_ops {
        return Err(error::too_many_ops());
    }
    for c in &t.compare {
        if c.key.is_empty() {
            return Err(error::empty_key());
        }
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => check_range(r)?,
            Some(request_op::Request::RequestPut(p)) => check_put(p)?,
            Some(request_op::Request::RequestDeleteRange(d)) => check_delete(d)?,
            Some(request_op::Request::RequestTxn(n)) => check_txn_ops(n, max_ops)?,
            None => {
                return Err(Status::new(
                    error::Code::InvalidArgument,
                    "etcdserver: key is not provided",
                ))
            }
        }
    }
    Ok(())
}

/// A half-open key interval; `end == None` means "to the end of the keyspace".
#[derive(Clone)]
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    fn of(key: &[u8], range_end: &[u8]) -> Interval {
        match range_end {
            [] => {
                let mut e = key.to_vec();
                e.push(0);
                Interval {
                    start: key.to_vec(),
                    end: Some(e),
                }
            }
            [0] => Interval {
                start: key.to_vec(),
                end: None,
            },
            e => Interval {
                start: key.to_vec(),
                end: Some(e.to_vec()),
            },
        }
    }
    fn contains(&self, k: &[u8]) -> bool {
        k >= self.start.as_slice() && self.end.as_ref().map(|e| k < e.as_slice()).unwrap_or(true)
    }
}

/// etcd's checkIntervals: within one branch (and its nested txns) no key is
/// put twice and no put falls inside a deleted range. Puts in the two
/// branches of a nested txn may repeat, since only one branch runs.
fn check_intervals(ops: &[RequestOp]) -> Result<(Vec<Vec<u8>>, Vec<Interval>), Status> {
    let mut dels: Vec<Interval> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(request_op::Request::RequestDeleteRange(d)) => {
                Some(Interval::of(&d.key, &d.range_end))
            }
            _ => None,
        })
        .collect();
    let hit = |dels: &[Interval], k: &[u8]| dels.iter().any(|d| d.contains(k));
    let mut puts: Vec<Vec<u8>> = Vec::new();
    for op in ops {
        if let Some(request_op::Request::RequestTxn(t)) = &op.request {
            let (puts_then, dels_then) = check_intervals(&t.success)?;
            let (puts_else, dels_else) = check_intervals(&t.failure)?;
            for k in &puts_then {
                if puts.contains(k) || hit(&dels, k) {
                    return Err(error::duplicate_key());
                }
                puts.push(k.clone());
            }
            for k in &puts_else {
                if (puts.contains(k) && !puts_then.contains(k)) || hit(&dels, k) {
                    return Err(error::duplicate_key());
                }
                puts.push(k.clone());
            }
            dels.extend(dels_then);
            dels.extend(dels_else);
        }
    }
    for op in ops {
        if let Some(request_op::Request::RequestPut(p)) = &op.request {
            if puts.iter().any(|k| k[..] == p.key[..]) || hit(&dels, &p.key) {
                return Err(error::duplicate_key());
            }
            puts.push(p.key.to_vec());
        }
    }
    Ok((puts, dels))
}

/// Every key a txn may read or write is `Some(key)`; a range is `None`
/// (it may touch every shard).
pub fn txn_keys<'a>(t: &'a TxnRequest, out: &mut Vec<Option<&'a [u8]>>) {
    for c in &t.compare {
        out.push(if c.range_end.is_empty() {
            Some(&c.key)
        } else {
            None
        });
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => out.push(if r.range_end.is_empty() {
                Some(&r.key)
            } else {
                None
            }),
            Some(request_op::Request::RequestPut(p)) => out.push(Some(&p.key)),
            Some(request_op::Request::RequestDeleteRange(d)) => {
                out.push(if d.range_end.is_empty() {
                    Some(&d.key)
                } else {
                    None
                })
            }
            Some(request_op::Request::RequestTxn(n)) => txn_keys(n, out),
            None => {}
        }
    }
}

// ------------------------------------------------------------------- ranges

/// How many keys (in key order) a shard must return for a Range: etcd
/// fetches everything when it must sort or filter, else limit+1 (to learn
/// whether there is more).
pub fn fetch_limit(r: &RangeRequest) -> i64 {
    let filters = r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0;
    if r.sort_order != range_request::SortOrder::None as i32 || filters {
        0
    } else if r.limit > 0 {
        r.limit + 1
    } else {
        0
    }
}

pub fn passes_filters<V>(r: &RangeRequest, v: &Version<V>) -> bool {
    !(r.max_mod_revision != 0 && v.mod_rev > r.max_mod_revision
        || r.min_mod_revision != 0 && v.mod_rev < r.min_mod_revision
        || r.max_create_revision != 0 && v.create_rev > r.max_create_revision
        || r.min_create_revision != 0 && v.create_rev < r.min_create_revision)
}

/// Whether a Range needs the values: unless keys only, and also then when
/// it sorts by value (etcd sorts first and drops the values after).
pub fn reads_values(r: &RangeRequest) -> bool {
    !r.keys_only || r.sort_target == range_request::SortTarget::Value as i32
}

/// Merges per-shard range results as etcd's applyRange finishes a range:
/// key order, the fetch limit, sorting, then the client's limit.
pub fn merge_range(r: &RangeRequest, parts: Vec<RangePartial>) -> RangeResponse {
    let mut count = 0;
    let mut kvs: Vec<KeyValue> = Vec::new();
    let many = parts.len() > 1;
    for p in parts {
        count += p.count;
        kvs.extend(p.kvs);
    }
    if many {
        kvs.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    }
    let fetch = fetch_limit(r);
    if fetch > 0 && kvs.len() as i64 > fetch {
        kvs.truncate(fetch as usize);
    }
    use range_request::{SortOrder, SortTarget};
    let mut order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
    let target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
    if target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    }
    if order != SortOrder::None {
        // Stable, like Go's sort for the small inputs etcd's tests use: ties
        // keep key order in both directions.
        let desc = order == SortOrder::Descend;
        fn by<K: Ord>(kvs: &mut [KeyValue], desc: bool, f: impl Fn(&KeyValue) -> K) {
            if desc {
                kvs.sort_by(|a, b| f(b).cmp(&f(a)));
            } else {
                kvs.sort_by_key(|kv| f(kv));
            }
        }
        match target {
            SortTarget::Key => {
                if desc {
                    kvs.reverse();
                }
            }
            SortTarget::Version => by(&mut kvs, desc, |kv| kv.version),
            SortTarget::Create => by(&mut kvs, desc, |kv| kv.create_revision),
            SortTarget::Mod => by(&mut kvs, desc, |kv| kv.mod_revision),
            SortTarget::Value => by(&mut kvs, desc, |kv| kv.value.clone()),
        }
    }
    let mut more = false;
    if r.limit > 0 && kvs.len() as i64 > r.limit {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only && reads_values(r) {
        // Read only to sort by value.
        for kv in &mut kvs {
            kv.value = Default::default();
        }
    }
    RangeResponse {
        header: None,
        kvs,
        more,
        count,
    }
}

// ----------------------------------------------------------------- compares

/// etcd's compareKV.
pub fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    use compare::{CompareResult, CompareTarget, TargetUnion};
    let ord = match CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version) {
        CompareTarget::Value => {
            let want: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(want)
        }
        CompareTarget::Create => kv.create_revision.cmp(&union_i64(c)),
        CompareTarget::Mod => kv.mod_revision.cmp(&union_i64(c)),
        CompareTarget::Version => kv.version.cmp(&union_i64(c)),
        CompareTarget::Lease => kv.lease.cmp(&union_i64(c)),
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord.is_eq(),
        Ok(CompareResult::NotEqual) => ord.is_ne(),
        Ok(CompareResult::Greater) => ord.is_gt(),
        Ok(CompareResult::Less) => ord.is_lt(),
        Err(_) => true,
    }
}

fn union_i64(c: &Compare) -> i64 {
    use compare::TargetUnion;
    match c.target_union {
        Some(TargetUnion::Version(v))
        | Some(TargetUnion::CreateRevision(v))
        | Some(TargetUnion::ModRevision(v))
        | Some(TargetUnion::Lease(v)) => v,
        _ => 0,
    }
}

/// etcd's applyCompare across shards: a compare over no keys fails on VALUE
/// and otherwise compares against an empty KeyValue; over keys, every key
/// must pass.
pub fn combine_compare(c: &Compare, parts: &[CmpPartial]) -> bool {
    let count: u32 = parts.iter().map(|p| p.count).sum();
    if count == 0 {
        if c.target == compare::CompareTarget::Value as i32 {
            return false;
        }
        return compare_kv(c, &KeyValue::default());
    }
    parts.iter().all(|p| p.all_ok)
}

/// Merges one op's partial results from every shard into its response.
pub fn merge_op(
    op: &RequestOp,
    parts: impl IntoIterator<Item = OpPartial>,
    rev: i64,
) -> ResponseOp {
    let header = Some(ResponseHeader {
        revision: rev,
        ..Default::default()
    });
    let resp = match &op.request {
        Some(request_op::Request::RequestPut(_)) => {
            let mut out = PutResponse {
                header,
                prev_kv: None,
            };
            for p in parts {
                if let OpPartial::Put(Some(r)) = p {
                    out.prev_kv = r.prev_kv;
                }
            }
            response_op::Response::ResponsePut(out)
        }
        Some(request_op::Request::RequestRange(r)) => {
            let ranges = parts
                .into_iter()
                .filter_map(|p| {
                    if let OpPartial::Range(r) = p {
                        Some(r)
                    } else {
                        None
                    }
                })
                .collect();
            let mut out = merge_range(r, ranges);
            out.header = header;
            response_op::Response::ResponseRange(out)
        }
        Some(request_op::Request::RequestDeleteRange(_)) => {
            let mut out = DeleteRangeResponse {
                header,
                deleted: 0,
                prev_kvs: Vec::new(),
            };
            for p in parts {
                if let OpPartial::Delete(d) = p {
                    out.deleted += d.deleted;
                    out.prev_kvs.extend(d.prev_kvs);
                }
            }
            out.prev_kvs.sort_unstable_by(|a, b| a.key.cmp(&b.key));
            response_op::Response::ResponseDeleteRange(out)
        }
        // Nested txns are run by the engine, never merged here.
        Some(request_op::Request::RequestTxn(_)) | None => {
            response_op::Response::ResponseTxn(TxnResponse {
                header,
                succeeded: false,
                responses: vec![],
            })
        }
    };
    ResponseOp {
        response: Some(resp),
    }
}

// --------------------------------------------------------------- txn engine

/// Where the txn engine reads and writes. Results are already merged.
pub trait Access {
    /// Evaluates compares against the current state.
    fn compares(&mut self, cs: &[Compare]) -> impl Future<Output = Vec<bool>>;
    /// Applies a run of ops that contains no nested txn, in order.
    fn ops(&mut self, ops: &[RequestOp]) -> impl Future<Output = Vec<ResponseOp>>;
    /// The revision this txn writes at.
    fn rev(&self) -> i64;
    /// The compaction revision in force.
    fn compact_rev(&self) -> i64;
    /// Whether lease `id` exists at this point of the log.
    fn lease_exists(&self, id: i64) -> bool;
}

/// A precondition of the taken path, checked in op order as etcd's
/// `checkRequestPut` does: the key of a put that ignores its value or lease
/// must exist, and a put's lease must exist.
enum Check {
    KeyExists(Compare),
    Lease(i64),
}

/// Which branch every txn of the tree takes. etcd decides the whole path
/// (`compareToPath`) against the state before the txn, then applies it.
struct Path {
    succeeded: bool,
    /// One per nested txn of the taken branch, in op order.
    nested: Vec<Path>,
}

fn collect_compares(t: &TxnRequest, out: &mut Vec<Compare>) {
    out.extend(t.compare.iter().cloned());
    for op in t.success.iter().chain(&t.failure) {
        if let Some(request_op::Request::RequestTxn(n)) = &op.request {
            collect_compares(n, out);
        }
    }
}

fn decide(t: &TxnRequest, results: &mut std::slice::Iter<'_, bool>) -> Path {
    // Consume exactly this txn's results, even after a false one.
    let mine: Vec<bool> = results.by_ref().take(t.compare.len()).copied().collect();
    let succeeded = mine.iter().all(|b| *b);
    let mut nested_then = Vec::new();
    let mut nested_else = Vec::new();
    for (branch, out) in [
        (&t.success, &mut nested_then),
        (&t.failure, &mut nested_else),
    ] {
        for op in branch {
            if let Some(request_op::Request::RequestTxn(n)) = &op.request {
                out.push(decide(n, results));
            }
        }
    }
    Path {
        succeeded,
        nested: if succeeded { nested_then } else { nested_else },
    }
}

/// etcd's checkRequests along the taken path: puts that ignore value or lease
/// need their key, and reads must be at a live revision.
fn path_checks(
    t: &TxnRequest,
    p: &Path,
    compact_rev: i64,
    current_rev: i64,
    checks: &mut Vec<Check>,
) -> Result<(), Status> {
    let branch = if p.succeeded { &t.success } else { &t.failure };
    let mut nested = p.nested.iter();
    for op in branch {
        match &op.request {
            Some(request_op::Request::RequestPut(put)) => {
                if put.ignore_value || put.ignore_lease {
                    checks.push(Check::KeyExists(Compare {
                        result: compare::CompareResult::Greater as i32,
                        target: compare::CompareTarget::Create as i32,
                        key: put.key.to_vec(),
                        range_end: vec![],
                        target_union: Some(compare::TargetUnion::CreateRevision(0)),
                    }));
                }
                if put.lease != 0 {
                    checks.push(Check::Lease(put.lease));
                }
            }
            Some(request_op::Request::RequestRange(r)) if r.revision > 0 => {
                if r.revision > current_rev {
                    return Err(error::future_rev());
                }
                if r.revision < compact_rev {
                    return Err(error::compacted());
                }
            }
            Some(request_op::Request::RequestTxn(n)) => {
                if let Some(np) = nested.next() {
                    path_checks(n, np, compact_rev, current_rev, checks)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Runs one txn entry: decide the path, check it, apply it. An error leaves
/// the state untouched (all checks happen before the first write).
pub async fn run_txn<A: Access>(a: &mut A, t: &TxnRequest) -> Result<TxnResponse, Status> {
    let mut cmps = Vec::new();
    collect_compares(t, &mut cmps);
    let results = if cmps.is_empty() {
        Vec::new()
    } else {
        a.compares(&cmps).await
    };
    let path = decide(t, &mut results.iter());
    let mut checks = Vec::new();
    // Reads inside the txn may name any revision up to the one it writes.
    if let Err(e) = path_checks(t, &path, a.compact_rev(), a.rev(), &mut checks) {
        crate::metrics::mvcc_txn(cmps.len() as u64, 0, 0);
        return Err(e);
    }
    let checked = check_path(a, &checks).await;
    count_mvcc(t, &path, cmps.len(), &checks, checked.is_ok());
    checked?;
    let mut resp = apply_path(a, t, &path).await;
    mark_reads_before_changes(&mut resp.responses, &mut false);
    Ok(resp)
}

/// The checks of the taken path: keys that must exist, leases that must.
async fn check_path<A: Access>(a: &mut A, checks: &[Check]) -> Result<(), Status> {
    if !checks.is_empty() {
        let exists: Vec<Compare> = checks
            .iter()
            .filter_map(|c| match c {
                Check::KeyExists(c) => Some(c.clone()),
                Check::Lease(_) => None,
            })
            .collect();
        let mut found = if exists.is_empty() {
            Vec::new()
        } else {
            a.compares(&exists).await
        }
        .into_iter();
        for c in checks {
            match c {
                Check::KeyExists(_) => {
                    if !found.next().unwrap_or(false) {
                        return Err(error::key_not_found());
                    }
                }
                Check::Lease(id) => {
                    if !a.lease_exists(*id) {
                        return Err(error::lease_not_found());
                    }
                }
            }
        }
    }
    Ok(())
}

/// Counts the entry's operations as etcd's mvcc metrics count them
/// (`metrics::mvcc_txn`). A Put or DeleteRange call (a txn of one op and
/// no compares here) is one mvcc transaction, as etcd's `applyPut` is: the
/// op, plus a range when it reads the previous version (`prev_kv`,
/// `ignore_value`, `ignore_lease`). A Txn call reads first (each compare
/// and each key check of a put that ignores its value or lease is a
/// range), then, unless it only reads, runs its taken branches as a second
/// mvcc transaction; a read-only txn's ops count with its reads. When the
/// checks fail (`ran` false) only the reads made count, as on etcd.
fn count_mvcc(t: &TxnRequest, path: &Path, compares: usize, checks: &[Check], ran: bool) {
    fn ops(t: &TxnRequest, p: &Path, n: &mut [u64; 3]) {
        let branch = if p.succeeded { &t.success } else { &t.failure };
        let mut nested = p.nested.iter();
        for op in branch {
            match &op.request {
                Some(request_op::Request::RequestPut(put)) => {
                    n[1] += 1;
                    if put.prev_kv || put.ignore_value || put.ignore_lease {
                        n[0] += 1;
                    }
                }
                Some(request_op::Request::RequestDeleteRange(d)) => {
                    n[2] += 1;
                    if d.prev_kv {
                        n[0] += 1;
                    }
                }
                Some(request_op::Request::RequestRange(_)) => n[0] += 1,
                Some(request_op::Request::RequestTxn(t)) => {
                    if let Some(np) = nested.next() {
                        ops(t, np, n);
                    }
                }
                None => {}
            }
        }
    }
    fn writes(t: &TxnRequest) -> bool {
        t.success
            .iter()
            .chain(&t.failure)
            .any(|op| match &op.request {
                Some(request_op::Request::RequestPut(_))
                | Some(request_op::Request::RequestDeleteRange(_)) => true,
                Some(request_op::Request::RequestTxn(n)) => writes(n),
                _ => false,
            })
    }
    let mut n = [0u64; 3];
    ops(t, path, &mut n);
    let single_call = compares == 0 && t.success.len() == 1 && t.failure.is_empty();
    if single_call
        && matches!(
            t.success[0].request,
            Some(request_op::Request::RequestPut(_))
                | Some(request_op::Request::RequestDeleteRange(_))
        )
    {
        // etcd's applyPut reads the previous version before it fails.
        if ran {
            crate::metrics::mvcc_txn(n[0], n[1], n[2]);
        } else {
            crate::metrics::mvcc_txn(n[0], 0, 0);
        }
        return;
    }
    let reads = (compares
        + checks
            .iter()
            .filter(|c| matches!(c, Check::KeyExists(_)))
            .count()) as u64;
    if !ran {
        crate::metrics::mvcc_txn(reads, 0, 0);
    } else if writes(t) {
        crate::metrics::mvcc_txn(reads, 0, 0);
        crate::metrics::mvcc_txn(n[0], n[1], n[2]);
    } else {
        crate::metrics::mvcc_txn(reads + n[0], n[1], n[2]);
    }
}

/// Stands, in an op's header, for "the store's revision before this
/// entry": a range, or a delete that deleted nothing, ahead of the txn's
/// first change reports it, as etcd's does (its read view is still at the
/// old revision). The applier knows that revision only when it completes
/// the entry in log order, and puts it in with `fill_revision_before`.
pub const REVISION_BEFORE: i64 = -1;

/// Marks the headers of the reads that ran before the txn changed
/// anything (walking nested txns in execution order).
fn mark_reads_before_changes(responses: &mut [ResponseOp], changed: &mut bool) {
    for r in responses {
        match &mut r.response {
            Some(response_op::Response::ResponsePut(_)) => *changed = true,
            Some(response_op::Response::ResponseDeleteRange(d)) => {
                if d.deleted > 0 {
                    *changed = true;
                } else if !*changed {
                    d.header = Some(ResponseHeader {
                        revision: REVISION_BEFORE,
                        ..Default::default()
                    });
                }
            }
            Some(response_op::Response::ResponseRange(g)) if !*changed => {
                g.header = Some(ResponseHeader {
                    revision: REVISION_BEFORE,
                    ..Default::default()
                });
            }
            Some(response_op::Response::ResponseTxn(t)) => {
                mark_reads_before_changes(&mut t.responses, changed)
            }
            Some(response_op::Response::ResponseRange(_)) | None => {}
        }
    }
}

/// Replaces every `REVISION_BEFORE` in a txn's op headers with `rev`.
pub fn fill_revision_before(responses: &mut [ResponseOp], rev: i64) {
    for r in responses {
        let header = match &mut r.response {
            Some(response_op::Response::ResponsePut(p)) => &mut p.header,
            Some(response_op::Response::ResponseDeleteRange(d)) => &mut d.header,
            Some(response_op::Response::ResponseRange(g)) => &mut g.header,
            Some(response_op::Response::ResponseTxn(t)) => {
                fill_revision_before(&mut t.responses, rev);
                &mut t.header
            }
            None => continue,
        };
        if let Some(h) = header {
            if h.revision == REVISION_BEFORE {
                h.revision = rev;
            }
        }
    }
}

/// Applies the taken branches. Only a nested txn's recursion is boxed; a
/// branch without one (every Put and DeleteRange call) is one run of ops.
async fn apply_path<A: Access>(a: &mut A, t: &TxnRequest, p: &Path) -> TxnResponse {
    let branch = if p.succeeded { &t.success } else { &t.failure };
    let responses = if branch.is_empty() {
        Vec::new()
    } else if p.nested.is_empty() {
        a.ops(branch).await
    } else {
        let mut nested = p.nested.iter();
        let mut responses = Vec::with_capacity(branch.len());
        let mut start = 0;
        for (i, op) in branch.iter().enumerate() {
            if let Some(request_op::Request::RequestTxn(n)) = &op.request {
                if start < i {
                    responses.extend(a.ops(&branch[start..i]).await);
                }
                let np = nested.next().expect("one path per nested txn");
                let mut r = Box::pin(apply_path(a, n, np)).await;
                // etcd gives a nested txn's response an empty header.
                r.header = Some(ResponseHeader::default());
                responses.push(ResponseOp {
                    response: Some(response_op::Response::ResponseTxn(r)),
                });
                start = i + 1;
            }
        }
        if start < branch.len() {
            responses.extend(a.ops(&branch[start..]).await);
        }
        responses
    };
    TxnResponse {
        header: None,
        succeeded: p.succeeded,
        responses,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::{DeleteRangeRequest, PutRequest};

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: k.as_bytes().to_vec().into(),
                value: b"v".to_vec().into(),
                ..Default::default()
            })),
        }
    }
    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: k.into(),
                    range_end: end.into(),
                    ..Default::default()
                },
            )),
        }
    }
    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestTxn(TxnRequest {
                compare: vec![],
                success,
                failure,
            })),
        }
    }

    #[test]
    fn intervals_like_etcd() {
        let table: Vec<(&str, Vec<RequestOp>, bool)> = vec![
            ("two different puts", vec![put("a"), put("b")], true),
            ("same key twice", vec![put("a"), put("a")], false),
            (
                "put inside deleted range",
                vec![del("a", "c"), put("b")],
                false,
            ),
            (
                "put outside deleted range",
                vec![del("a", "c"), put("c")],
                true,
            ),
            (
                "put equal to single delete",
                vec![del("a", ""), put("a")],
                false,
            ),
            (
                "overlapping deletes",
                vec![del("a", "c"), del("b", "d")],
                true,
            ),
            (
                "nested then/else may repeat",
                vec![txn(vec![put("a")], vec![put("a")])],
                true,
            ),
            (
                "nested and outer",
                vec![txn(vec![put("a")], vec![]), put("a")],
                false,
            ),
            (
                "nested put in outer delete",
                vec![del("a", "\0"), txn(vec![put("z")], vec![])],
                false,
            ),
        ];
        for (name, ops, ok) in table {
            let t = TxnRequest {
                compare: vec![],
                success: ops,
                failure: vec![],
            };
            assert_eq!(
                check_txn(&t, crate::config::MAX_TXN_OPS).is_ok(),
                ok,
                "{name}"
            );
            if !ok {
                assert_eq!(
                    check_txn(&t, crate::config::MAX_TXN_OPS).unwrap_err(),
                    error::duplicate_key(),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn too_many_ops() {
        let t = TxnRequest {
            compare: vec![],
            success: (0..129).map(|i| put(&format!("k{i}"))).collect(),
            failure: vec![],
        };
        assert_eq!(
            check_txn(&t, crate::config::MAX_TXN_OPS).unwrap_err(),
            error::too_many_ops()
        );
        let t = TxnRequest {
            compare: vec![],
            success: (0..128).map(|i| put(&format!("k{i}"))).collect(),
            failure: vec![],
        };
        assert!(check_txn(&t, crate::config::MAX_TXN_OPS).is_ok());
    }

    #[test]
    fn compares() {
        use compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
        let kv = KeyValue {
            key: b"k".to_vec(),
            version: 2,
            create_revision: 5,
            mod_revision: 7,
            value: b"m".to_vec(),
            lease: 0,
        };
        let c = |t: T, r: R, u: U| Compare {
            result: r as i32,
            target: t as i32,
            key: b"k".to_vec(),
            range_end: vec![],
            target_union: Some(u),
        };
        let table = [
            (c(T::Version, R::Equal, U::Version(2)), true),
            (c(T::Version, R::Greater, U::Version(2)), false),
            (c(T::Create, R::Less, U::CreateRevision(6)), true),
            (c(T::Mod, R::NotEqual, U::ModRevision(7)), false),
            (c(T::Value, R::Greater, U::Value(b"a".to_vec())), true),
            (c(T::Value, R::Less, U::Value(b"a".to_vec())), false),
            (c(T::Lease, R::Equal, U::Lease(0)), true),
        ];
        for (cmp, want) in table {
            assert_eq!(compare_kv(&cmp, &kv), want, "{cmp:?}");
        }
        // Missing key: version = 0 passes, value compare always fails.
        let none = [CmpPartial {
            count: 0,
            all_ok: true,
        }];
        assert!(combine_compare(
            &c(T::Version, R::Equal, U::Version(0)),
            &none
        ));
        assert!(!combine_compare(
            &c(T::Value, R::Equal, U::Value(vec![])),
            &none
        ));
    }

    #[test]
    fn range_merge_sort_limit() {
        use range_request::{SortOrder, SortTarget};
        let kv = |k: &str, ver: i64| KeyValue {
            key: k.into(),
            version: ver,
            ..Default::default()
        };
        let parts = || {
            vec![
                RangePartial {
                    kvs: vec![kv("a", 3), kv("d", 1)],
                    count: 2,
                },
                RangePartial {
                    kvs: vec![kv("b", 2), kv("c", 2)],
                    count: 2,
                },
            ]
        };
        let keys = |r: &RangeResponse| {
            r.kvs
                .iter()
                .map(|k| String::from_utf8(k.key.clone()).unwrap())
                .collect::<Vec<_>>()
                .join("")
        };
        let mut r = RangeRequest {
            key: b"a".to_vec(),
            range_end: b"z".to_vec(),
            ..Default::default()
        };
        assert_eq!(keys(&merge_range(&r, parts())), "abcd");
        r.limit = 2;
        let out = merge_range(&r, parts());
        assert_eq!((keys(&out), out.more, out.count), ("ab".into(), true, 4));
        r.limit = 0;
        r.sort_target = SortTarget::Version as i32;
        assert_eq!(keys(&merge_range(&r, parts())), "dbca");
        r.sort_order = SortOrder::Descend as i32;
        assert_eq!(keys(&merge_range(&r, parts())), "abcd");
        r.sort_target = SortTarget::Key as i32;
        assert_eq!(keys(&merge_range(&r, parts())), "dcba");
    }
}
