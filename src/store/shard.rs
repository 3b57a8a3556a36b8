//! One shard: its index, its segments, its checkpoint, and the shard-side
//! halves of every KV operation (each returns a partial result that
//! `kv::merge_*` combines across shards).
//!
//! The index keeps, per version, where the value is in the segments
//! (`segment::Loc`), not the bytes: every answer that carries a value
//! (ranges, VALUE compares, prev_kv, watch events and history, snapshot
//! dumps) reads them through `Segments::value`.

use super::index::{End, Index, Version};
use super::segment::{self, Loc, Segments};
use crate::error::{self, Status};
use crate::kv::{CmpPartial, OpPartial, RangePartial};
use crate::proto::etcdserverpb::{
    request_op, Compare, DeleteRangeResponse, PutResponse, RangeRequest, RequestOp,
};
use crate::proto::mvccpb::KeyValue;
use crate::watch::{self, History, Interests, Outgoing, ShardEvent, WatchRange};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Version 1: the fixed fields. Version 2 adds the lease table. Version 3
/// adds `first_seg`, after `seg_offset`.
const CHECKPOINT_MAGIC_V1: &[u8; 8] = b"KLSNCKP1";
const CHECKPOINT_MAGIC_V2: &[u8; 8] = b"KLSNCKP2";
const CHECKPOINT_MAGIC: &[u8; 8] = b"KLSNCKP3";
const CHECKPOINT_LEASES_MAX: usize = 64 << 20;

/// What a checkpoint file says: everything up to `applied` is in the
/// segments, durable up to (`seg_id`, `seg_offset`), and the leases that
/// existed at `applied` (every shard keeps the whole table, so the applier
/// can rebuild its lessor from any shard's checkpoint).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub applied: u64,
    pub compact_rev: i64,
    /// The newest revision at which this shard changed anything.
    pub last_rev: i64,
    pub seg_id: u64,
    pub seg_offset: u64,
    /// The oldest segment this checkpoint's data is in: segments below it
    /// were rewritten by a defragmentation before the checkpoint and are
    /// not read (0 in files older than version 3: every segment is).
    pub first_seg: u64,
    /// Lease ID → granted TTL in seconds.
    pub leases: BTreeMap<i64, i64>,
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = CHECKPOINT_MAGIC.to_vec();
        b.extend_from_slice(&self.applied.to_le_bytes());
        b.extend_from_slice(&self.compact_rev.to_le_bytes());
        b.extend_from_slice(&self.last_rev.to_le_bytes());
        b.extend_from_slice(&self.seg_id.to_le_bytes());
        b.extend_from_slice(&self.seg_offset.to_le_bytes());
        b.extend_from_slice(&self.first_seg.to_le_bytes());
        b.extend_from_slice(&(self.leases.len() as u64).to_le_bytes());
        for (id, ttl) in &self.leases {
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&ttl.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Checkpoint, String> {
        if b.len() < 8 + 40 + 4 {
            return Err("checkpoint file is truncated".into());
        }
        let version = match &b[..8] {
            m if m == CHECKPOINT_MAGIC => 3,
            m if m == CHECKPOINT_MAGIC_V2 => 2,
            m if m == CHECKPOINT_MAGIC_V1 => 1,
            _ => return Err("bad checkpoint header".into()),
        };
        let body = &b[..b.len() - 4];
        let crc = u32::from_le_bytes(b[b.len() - 4..].try_into().expect("4 bytes"));
        if crc32c::crc32c(body) != crc {
            return Err("checkpoint checksum mismatch".into());
        }
        let u = |o: usize| u64::from_le_bytes(body[o..o + 8].try_into().expect("8 bytes"));
        let mut ck = Checkpoint {
            applied: u(8),
            compact_rev: u(16) as i64,
            last_rev: u(24) as i64,
            seg_id: u(32),
            seg_offset: u(40),
            first_seg: 0,
            leases: BTreeMap::new(),
        };
        if version == 1 {
            if body.len() != 48 {
                return Err("checkpoint has trailing bytes".into());
            }
            return Ok(ck);
        }
        // Where the lease count is.
        let at = if version == 3 { 56 } else { 48 };
        if body.len() < at + 8 {
            return Err("checkpoint file is truncated".into());
        }
        if version == 3 {
            ck.first_seg = u(48);
            if ck.first_seg > ck.seg_id {
                return Err(format!(
                    "checkpoint's first segment {} is after its last {}",
                    ck.first_seg, ck.seg_id
                ));
            }
        }
        let n = u(at) as usize;
        if n > CHECKPOINT_LEASES_MAX || body.len() != at + 8 + 16 * n {
            return Err(format!(
                "checkpoint lease table does not match its length ({n} leases)"
            ));
        }
        for i in 0..n {
            let o = at + 8 + 16 * i;
            ck.leases.insert(u(o) as i64, u(o + 8) as i64);
        }
        Ok(ck)
    }
}

/// How many bytes of appended records a shard keeps before it writes them
/// to its segment file (the WAL, not the segments, is what makes a write
/// durable; segments are synced at checkpoints).
const FLUSH_BYTES: usize = 256 * 1024;

pub struct Shard {
    pub id: usize,
    pub shards: usize,
    dir: PathBuf,
    index: Index<Loc>,
    segs: Segments,
    /// Highest Raft index this shard has applied (or was told is globally
    /// applied, which covers entries that did not touch it).
    pub applied: u64,
    pub compact_rev: i64,
    /// The newest revision at which this shard changed anything.
    pub last_rev: i64,
    pub checkpointed: Checkpoint,
    /// Bytes the records of the index's versions take (`live_bytes`),
    /// kept up to date as versions are added and recomputed at compaction.
    live: u64,
    /// Every lease that exists (the whole table, kept in log order like the
    /// keys): ID → granted TTL. Lets this shard check a put's lease itself.
    pub leases: BTreeMap<i64, i64>,
    /// This shard's keys attached to each lease (from the keys' latest
    /// versions).
    lease_keys: HashMap<i64, BTreeSet<Box<[u8]>>>,
    /// The key ranges cores watch here.
    interests: Interests,
    /// Events for watching cores, sent by the shard task before it answers
    /// anything else (see `watch`'s ordering contract).
    pub watch_out: Outgoing,
    match_buf: Vec<(usize, bool)>,
    /// Position of the op being applied within its entry, and of the key
    /// within the op: the order of events inside one revision.
    op_seq: u32,
    key_seq: u32,
}

impl Shard {
    pub fn dir_for(data_dir: &Path, id: usize) -> PathBuf {
        data_dir.join(format!("shard-{id:03}"))
    }

    /// Indexes of the checkpoints this shard has, ascending. Checkpoints
    /// are taken by every shard at the same log index (the applier puts a
    /// marker in every shard's queue), so recovery picks the newest index
    /// that all shards have.
    pub fn checkpoints(data_dir: &Path, id: usize) -> Result<Vec<u64>, String> {
        list_checkpoints(&Shard::dir_for(data_dir, id))
    }

    /// Opens (or creates) a shard at checkpoint `at` (0: none). Segments are
    /// trusted up to the checkpoint; bytes after it are cut, since the WAL
    /// replays them.
    pub fn open(data_dir: &Path, id: usize, shards: usize, at: u64) -> Result<Shard, String> {
        let dir = Shard::dir_for(data_dir, id);
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let ckpt = if at == 0 {
            Checkpoint::default()
        } else {
            let path = dir.join(format!("checkpoint-{at:020}"));
            let b = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            Checkpoint::decode(&b).map_err(|e| format!("{}: {e}", path.display()))?
        };
        // Checkpoints newer than the one chosen are not shared by every
        // shard: drop them with the segment bytes they cover.
        for i in Shard::checkpoints(data_dir, id)? {
            if i > at {
                let _ = fs::remove_file(dir.join(format!("checkpoint-{i:020}")));
            }
        }
        let ids = segment::list_segments(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut index: Index<Loc> = Index::new();
        let mut loaded = 0usize;
        for &sid in &ids {
            let path = segment::segment_path(&dir, sid);
            if ckpt.seg_id == 0 || sid > ckpt.seg_id {
                // Not covered by the checkpoint: the WAL holds these entries.
                fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                continue;
            }
            if sid < ckpt.first_seg {
                // Rewritten by a defragmentation into the segments from
                // `first_seg` on; kept while an older checkpoint needs it.
                continue;
            }
            let limit = if sid == ckpt.seg_id {
                Some(ckpt.seg_offset)
            } else {
                None
            };
            segment::read_segment(&dir, sid, limit, |k, v| {
                loaded += 1;
                index.restore(k, v)
            })?;
        }
        if ckpt.seg_id != 0 && !ids.contains(&ckpt.seg_id) {
            return Err(format!(
                "{}: checkpoint names segment {} which is missing",
                dir.display(),
                ckpt.seg_id
            ));
        }
        if ckpt.compact_rev > 0 {
            index.compact(ckpt.compact_rev);
        }
        let (seg_id, offset) = if ckpt.seg_id == 0 {
            (1, 0)
        } else {
            (ckpt.seg_id, ckpt.seg_offset)
        };
        let segs = Segments::open(
            &dir,
            ckpt.first_seg,
            seg_id,
            offset,
            segment::SEGMENT_BYTES_MAX,
        )?;
        drop_unneeded_segments(&dir);
        if loaded > 0 {
            crate::info!(
                "shard {id}: loaded {loaded} records, {} keys, checkpoint at index {}",
                index.key_count(),
                ckpt.applied
            );
        }
        let mut lease_keys: HashMap<i64, BTreeSet<Box<[u8]>>> = HashMap::new();
        index.range(&[], End::Unbounded, i64::MAX, |k, v| {
            if v.lease != 0 {
                lease_keys.entry(v.lease).or_default().insert(k.into());
            }
            true
        });
        let mut sh = Shard {
            id,
            shards,
            dir,
            index,
            segs,
            applied: ckpt.applied,
            compact_rev: ckpt.compact_rev,
            last_rev: ckpt.last_rev,
            leases: ckpt.leases.clone(),
            live: 0,
            checkpointed: ckpt,
            lease_keys,
            interests: Interests::default(),
            watch_out: Outgoing::default(),
            match_buf: Vec::new(),
            op_seq: 0,
            key_seq: 0,
        };
        sh.live = sh.live_bytes();
        Ok(sh)
    }

    pub fn lease_exists(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// Records a granted lease (an entry every shard sees).
    pub fn lease_grant(&mut self, id: i64, ttl: i64) {
        self.leases.insert(id, ttl);
    }

    /// Revokes a lease: deletes this shard's keys attached to it at `rev`.
    /// Returns how many keys were deleted.
    pub fn lease_revoke(&mut self, id: i64, rev: i64) -> usize {
        self.leases.remove(&id);
        // Deleted in key order, as etcd's lessor does.
        self.op_seq = 0;
        self.key_seq = 0;
        let keys = self.lease_keys.remove(&id).unwrap_or_default();
        for k in &keys {
            self.delete_key(k, rev);
        }
        if !keys.is_empty() {
            self.last_rev = rev;
        }
        keys.len()
    }

    /// This shard's keys attached to lease `id`, sorted.
    pub fn lease_keys(&self, id: i64) -> Vec<Vec<u8>> {
        self.lease_keys
            .get(&id)
            .map(|s| s.iter().map(|k| k.to_vec()).collect())
            .unwrap_or_default()
    }

    fn attach(&mut self, key: &[u8], old: i64, new: i64) {
        if old == new {
            return;
        }
        if old != 0 {
            if let Some(set) = self.lease_keys.get_mut(&old) {
                set.remove(key);
                if set.is_empty() {
                    self.lease_keys.remove(&old);
                }
            }
        }
        if new != 0 {
            self.lease_keys.entry(new).or_default().insert(key.into());
        }
    }

    fn delete_key(&mut self, key: &[u8], rev: i64) {
        let prev = self.index.latest(key).copied();
        let old = prev.as_ref().map(|v| v.lease).unwrap_or(0);
        self.attach(key, old, 0);
        if self.index.tombstone(key, rev) {
            self.live += segment::record_bytes(key.len(), 0) as u64;
        }
        self.emit(key, rev, None, prev.as_ref());
        let tomb: Version<&[u8]> = Version {
            mod_rev: rev,
            create_rev: 0,
            version: 0,
            lease: 0,
            value: None,
        };
        self.segs.append(key, &tomb);
    }

    /// Hands a change to the cores watching `key` (nothing to do when no
    /// core watches this shard). `new` is `None` for a delete.
    fn emit(
        &mut self,
        key: &[u8],
        rev: i64,
        new: Option<&Version<Loc>>,
        prev: Option<&Version<Loc>>,
    ) {
        if self.interests.is_empty() {
            return;
        }
        self.interests.matches(key, &mut self.match_buf);
        if self.match_buf.is_empty() {
            return;
        }
        let sub = ((self.op_seq as u64) << 32) | self.key_seq as u64;
        self.key_seq += 1;
        let ev = event(&self.segs, key, rev, sub, new, None);
        for &(core, want_prev) in &self.match_buf {
            let mut e = ev.clone();
            if want_prev {
                e.prev = prev.map(|p| to_kv(&self.segs, key, p, false));
            }
            self.watch_out.push(core, e);
        }
    }

    /// Starts sending `core` the changes in a key range (counted: one
    /// registration per watcher).
    pub fn watch_register(&mut self, core: usize, range: &Arc<WatchRange>, prev_kv: bool) {
        self.interests.add(core, range, prev_kv);
    }

    pub fn watch_unregister(&mut self, core: usize, range: &Arc<WatchRange>, prev_kv: bool) {
        self.interests.remove(core, range, prev_kv);
    }

    /// The changes in a key range from revision `from` on, oldest first,
    /// cut at a revision boundary by `watch`'s limits. Within a revision
    /// the events are in key order.
    pub fn watch_history(&self, range: &WatchRange, from: i64, prev_kv: bool) -> History {
        if from < self.compact_rev {
            return History::Compacted(self.compact_rev);
        }
        let mut events = Vec::new();
        if from <= self.last_rev {
            self.index.versions_since(
                &range.key,
                End::from_range_end(&range.range_end),
                from,
                |k, v, p| {
                    let new = (!v.is_tombstone()).then_some(v);
                    let prev = if prev_kv { p } else { None };
                    events.push(event(&self.segs, k, v.mod_rev, 0, new, prev));
                },
            );
            events.sort_by_key(|e| e.rev);
        }
        let more = watch::cut_history(&mut events);
        History::Events { events, more }
    }

    pub fn owns(&self, key: &[u8]) -> bool {
        super::shard_of(key, self.shards) == self.id
    }

    pub fn key_count(&self) -> usize {
        self.index.key_count()
    }

    /// Keys live now.
    pub fn live_keys(&self) -> usize {
        self.index.live_keys()
    }

    /// This shard's part of a Range at `rev` (etcd's mvcc Range plus the
    /// pruning of `applyRange`, which are per key and so shard-local).
    pub fn range(&self, r: &RangeRequest, rev: i64) -> Result<RangePartial, Status> {
        if rev < self.compact_rev {
            return Err(error::compacted());
        }
        let end = End::from_range_end(&r.range_end);
        let fetch = crate::kv::fetch_limit(r);
        let mut kvs = Vec::new();
        let mut count = 0i64;
        self.index.range(&r.key, end, rev, |k, v| {
            count += 1;
            if r.count_only || (fetch > 0 && kvs.len() as i64 >= fetch) {
                return true;
            }
            if !crate::kv::passes_filters(r, v) {
                return true;
            }
            kvs.push(to_kv(&self.segs, k, v, !crate::kv::reads_values(r)));
            true
        });
        Ok(RangePartial { kvs, count })
    }

    /// This shard's part of a Compare, against the latest state.
    pub fn compare(&self, c: &Compare) -> CmpPartial {
        let end = End::from_range_end(&c.range_end);
        // Only a VALUE compare reads the values.
        use crate::proto::etcdserverpb::compare::CompareTarget;
        let keys_only = CompareTarget::try_from(c.target) != Ok(CompareTarget::Value);
        let mut p = CmpPartial {
            count: 0,
            all_ok: true,
        };
        self.index.range(&c.key, end, i64::MAX, |k, v| {
            p.count += 1;
            if !crate::kv::compare_kv(c, &to_kv(&self.segs, k, v, keys_only)) {
                p.all_ok = false;
                return false;
            }
            true
        });
        p
    }

    /// Applies a run of non-txn ops at revision `rev` (this shard's keys
    /// only). Returns the partial results and whether anything changed.
    /// `op_base` is the position of `ops[0]` among all ops the entry has
    /// run so far (it orders watch events within the revision).
    pub fn apply_ops(
        &mut self,
        ops: &[RequestOp],
        rev: i64,
        op_base: u32,
    ) -> (Vec<OpPartial>, bool) {
        let mut out = Vec::with_capacity(ops.len());
        let mut changed = false;
        for (i, op) in ops.iter().enumerate() {
            self.op_seq = op_base + i as u32;
            self.key_seq = 0;
            let p = match &op.request {
                Some(request_op::Request::RequestPut(p)) => {
                    if !self.owns(&p.key) {
                        OpPartial::Put(None)
                    } else {
                        // One lookup of the key: the index hands over the
                        // previous live version while the record is written.
                        let segs = &mut self.segs;
                        let mut value_len = 0;
                        let (prev, v) =
                            self.index
                                .put_after(&p.key, rev, |prev, create_rev, version| {
                                    // An ignore_value put writes the previous
                                    // value again: copied out first, as
                                    // appending may move the buffer it is in.
                                    let kept: Vec<u8>;
                                    let value: &[u8] = if p.ignore_value {
                                        kept = prev
                                            .and_then(|v| v.value)
                                            .map(|l| segs.value(l).to_vec())
                                            .unwrap_or_default();
                                        &kept
                                    } else {
                                        &p.value
                                    };
                                    let lease = if p.ignore_lease {
                                        prev.map(|v| v.lease).unwrap_or(0)
                                    } else {
                                        p.lease
                                    };
                                    value_len = value.len();
                                    let record = Version {
                                        mod_rev: rev,
                                        create_rev,
                                        version,
                                        lease,
                                        value: Some(value),
                                    };
                                    (lease, segs.append(&p.key, &record))
                                });
                        let old = prev.as_ref().map(|v| v.lease).unwrap_or(0);
                        self.attach(&p.key, old, v.lease);
                        self.last_rev = rev;
                        self.live += segment::record_bytes(p.key.len(), value_len) as u64;
                        self.emit(&p.key, rev, Some(&v), prev.as_ref());
                        changed = true;
                        OpPartial::Put(Some(PutResponse {
                            header: None,
                            prev_kv: if p.prev_kv {
                                prev.map(|v| to_kv(&self.segs, &p.key, &v, false))
                            } else {
                                None
                            },
                        }))
                    }
                }
                Some(request_op::Request::RequestDeleteRange(d)) => {
                    let end = End::from_range_end(&d.range_end);
                    let mut victims: Vec<(Vec<u8>, Version<Loc>)> = Vec::new();
                    self.index.range(&d.key, end, i64::MAX, |k, v| {
                        victims.push((k.to_vec(), *v));
                        true
                    });
                    let mut prev_kvs = Vec::new();
                    for (k, v) in &victims {
                        self.delete_key(k, rev);
                        if d.prev_kv {
                            prev_kvs.push(to_kv(&self.segs, k, v, false));
                        }
                    }
                    if !victims.is_empty() {
                        changed = true;
                        self.last_rev = rev;
                    }
                    OpPartial::Delete(DeleteRangeResponse {
                        header: None,
                        deleted: victims.len() as i64,
                        prev_kvs,
                    })
                }
                Some(request_op::Request::RequestRange(r)) => {
                    // Reads inside a txn see the txn's own earlier writes
                    // (etcd's write view reads at rev+1 once it has changes).
                    let at = if r.revision > 0 { r.revision } else { rev };
                    match self.range(r, at) {
                        Ok(p) => OpPartial::Range(p),
                        // Checked before the txn started; cannot happen here.
                        Err(_) => OpPartial::Range(RangePartial::default()),
                    }
                }
                Some(request_op::Request::RequestTxn(_)) | None => OpPartial::None,
            };
            out.push(p);
        }
        (out, changed)
    }

    /// Appends every version this shard holds to a snapshot body (records
    /// as in the segments, values read back from them).
    pub fn dump(&self, out: &mut Vec<u8>) {
        self.index.for_each(|k, v| {
            segment::encode_record(out, k, &v.map_value(|l| self.segs.value(l)));
        });
    }

    /// Replaces everything this shard has with a snapshot's records for its
    /// keys (each key's versions oldest first), as of log `index`, and makes
    /// it durable with a checkpoint at `index` before returning. Watch
    /// registrations stay.
    pub fn restore(
        &mut self,
        records: Vec<(Vec<u8>, Version)>,
        index: u64,
        compact_rev: i64,
        leases: BTreeMap<i64, i64>,
    ) -> Result<(), String> {
        // The index's locations point into the segments about to go.
        self.index = Index::new();
        self.segs
            .remove_all()
            .map_err(|e| format!("restoring a snapshot: {e}"))?;
        for i in list_checkpoints(&self.dir)? {
            let _ = fs::remove_file(self.dir.join(format!("checkpoint-{i:020}")));
        }
        self.lease_keys.clear();
        self.last_rev = 0;
        for (i, (k, v)) in records.into_iter().enumerate() {
            self.last_rev = self.last_rev.max(v.mod_rev);
            let loc = self.segs.append(&k, &v.as_bytes());
            self.index.restore(&k, v.map_value(|_| loc));
            if i % 1024 == 1023 {
                self.flush()?;
            }
        }
        let mut lease_keys: HashMap<i64, BTreeSet<Box<[u8]>>> = HashMap::new();
        self.index.range(&[], End::Unbounded, i64::MAX, |k, v| {
            if v.lease != 0 {
                lease_keys.entry(v.lease).or_default().insert(k.into());
            }
            true
        });
        self.lease_keys = lease_keys;
        self.compact_rev = compact_rev;
        self.leases = leases;
        self.applied = index;
        self.live = self.live_bytes();
        self.checkpoint(index)?;
        Ok(())
    }

    /// Bytes of the segments in use (what Status reports as dbSize):
    /// written or still buffered, without the segments a defragmentation
    /// retired, whose files stay until no checkpoint needs them.
    pub fn disk_bytes(&self) -> u64 {
        self.segs.bytes()
    }

    /// Bytes the records of the versions in the index take (what a
    /// defragmentation would write; Status reports it as dbSizeInUse).
    pub fn in_use_bytes(&self) -> u64 {
        self.live
    }

    /// `in_use_bytes` counted from the index, version by version.
    fn live_bytes(&self) -> u64 {
        let mut n = segment::MAGIC.len() as u64;
        self.index.for_each(|k, v| {
            n += segment::record_bytes(k.len(), v.value.map_or(0, |l| l.len as usize)) as u64;
        });
        n
    }

    /// Drops history at or below `rev`. Returns true when the segments
    /// then hold more than twice what the index still needs, plus a
    /// segment's worth (`defrag` is worth its cost).
    pub fn compact(&mut self, rev: i64) -> bool {
        if rev <= self.compact_rev {
            return false;
        }
        self.index.compact(rev);
        self.compact_rev = rev;
        self.live = self.live_bytes();
        self.disk_bytes() > 2 * self.live + segment::SEGMENT_BYTES_MAX
    }

    /// Rewrites every version the index holds into new segments and stops
    /// reading the old ones, so what compaction dropped stops taking disk
    /// space. Each key's versions are written oldest first, keys in order,
    /// so recovery reads them back as ever. Blocking: it copies every live
    /// value.
    ///
    /// Crash safety: the old segments are not touched. The new ones count
    /// from the next checkpoint on, which records `first_seg`; a recovery
    /// from an earlier checkpoint removes the new segments (they are past
    /// it) and reads the old ones. An old segment's file is removed once no
    /// checkpoint kept on disk names a `first_seg` at or below it
    /// (`drop_unneeded_segments`, after every checkpoint).
    pub fn defrag(&mut self) -> Result<(), String> {
        let err =
            |e: std::io::Error| format!("{}: defragmentation failed: {e}", self.dir.display());
        let first = self.segs.roll().map_err(err)?;
        let segs = &mut self.segs;
        let mut value = Vec::new();
        let mut failed = None;
        self.index.for_each_mut(|k, v| {
            value.clear();
            if let Some(loc) = v.value {
                value.extend_from_slice(segs.value(loc));
            }
            let rec = Version {
                mod_rev: v.mod_rev,
                create_rev: v.create_rev,
                version: v.version,
                lease: v.lease,
                value: v.value.map(|_| &value[..]),
            };
            let loc = segs.append(k, &rec);
            if v.value.is_some() {
                v.value = Some(loc);
            }
            if failed.is_none() && segs.buffered() >= FLUSH_BYTES {
                failed = segs.flush().err();
            }
        });
        if let Some(e) = failed {
            return Err(err(e));
        }
        self.segs.flush().map_err(err)?;
        self.segs.forget_below(first);
        Ok(())
    }

    /// Flushes once `FLUSH_BYTES` are buffered: the apply path calls this
    /// after every batch, so one write carries many batches' records (a
    /// value is read from the buffer until then).
    pub fn flush_if_full(&mut self) -> Result<(), String> {
        if self.segs.buffered() >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes buffered segment records to the file (no fsync).
    pub fn flush(&mut self) -> Result<(), String> {
        self.segs
            .flush()
            .map_err(|e| format!("{}: segment write failed: {e}", self.dir.display()))
    }

    /// Makes everything applied up to `index` durable in the segments and
    /// records a checkpoint there: flush, fsync the segment, write the
    /// checkpoint file atomically, keep the previous one (recovery may need
    /// it if another shard did not finish this round). Blocking.
    pub fn checkpoint(&mut self, index: u64) -> Result<Checkpoint, String> {
        self.applied = self.applied.max(index);
        self.flush()?;
        let (seg_id, seg_offset) = self.segs.position();
        let ck = Checkpoint {
            applied: index,
            compact_rev: self.compact_rev,
            last_rev: self.last_rev,
            seg_id,
            seg_offset,
            // The oldest segment in use: `defrag` retired those below.
            first_seg: self.segs.first_id(),
            leases: self.leases.clone(),
        };
        let dir = self.dir.clone();
        let io = |e: std::io::Error| format!("{}: checkpoint failed: {e}", dir.display());
        self.segs.sync().map_err(io)?;
        let tmp = dir.join("checkpoint.tmp");
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&ck.encode()).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, dir.join(format!("checkpoint-{index:020}"))).map_err(io)?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io)?;
        let mine = list_checkpoints(&dir).unwrap_or_default();
        if mine.len() > 2 {
            for i in &mine[..mine.len() - 2] {
                let _ = fs::remove_file(dir.join(format!("checkpoint-{i:020}")));
            }
        }
        drop_unneeded_segments(&dir);
        self.checkpointed = ck.clone();
        Ok(ck)
    }
}

/// Removes the segment files below the `first_seg` of every checkpoint in
/// `dir`: no recovery can read them any more (recovery only ever opens a
/// checkpoint that is on disk). Nothing goes while there is no checkpoint.
/// A file that cannot be removed only costs disk space: logged, and tried
/// again at the next checkpoint.
fn drop_unneeded_segments(dir: &Path) {
    if let Err(e) = try_drop_unneeded_segments(dir) {
        crate::warn!("{}: removing rewritten segments: {e}", dir.display());
    }
}

fn try_drop_unneeded_segments(dir: &Path) -> Result<(), String> {
    let mut needed_from = u64::MAX;
    for i in list_checkpoints(dir)? {
        let path = dir.join(format!("checkpoint-{i:020}"));
        // A checkpoint that cannot be read here needs everything.
        let first = fs::read(&path)
            .ok()
            .and_then(|b| Checkpoint::decode(&b).ok())
            .map_or(0, |ck| ck.first_seg);
        needed_from = needed_from.min(first);
    }
    if needed_from == u64::MAX {
        return Ok(());
    }
    let io = |e: std::io::Error| format!("{}: {e}", dir.display());
    for id in segment::list_segments(dir).map_err(io)? {
        if id < needed_from {
            fs::remove_file(segment::segment_path(dir, id)).map_err(io)?;
            crate::info!(
                "{}: removed segment {id}, rewritten by a defragmentation",
                dir.display()
            );
        }
    }
    Ok(())
}

fn list_checkpoints(dir: &Path) -> Result<Vec<u64>, String> {
    let mut v = Vec::new();
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    for e in rd {
        let name = e.map_err(|e| e.to_string())?.file_name();
        if let Some(i) = name
            .to_string_lossy()
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            v.push(i);
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// A watch event for a change of `key` at `rev` (`new` is `None` for a
/// delete, which carries only the key and revision, as on etcd).
fn event(
    segs: &Segments,
    key: &[u8],
    rev: i64,
    sub: u64,
    new: Option<&Version<Loc>>,
    prev: Option<&Version<Loc>>,
) -> ShardEvent {
    ShardEvent {
        rev,
        sub,
        delete: new.is_none(),
        kv: match new {
            Some(v) => to_kv(segs, key, v, false),
            None => KeyValue {
                key: key.to_vec(),
                mod_revision: rev,
                ..Default::default()
            },
        },
        prev: prev.map(|p| to_kv(segs, key, p, false)),
    }
}

/// `key` at version `v` as etcd's KeyValue, its value read from `segs`
/// unless `keys_only`.
pub fn to_kv(segs: &Segments, key: &[u8], v: &Version<Loc>, keys_only: bool) -> KeyValue {
    KeyValue {
        key: key.to_vec(),
        create_revision: v.create_rev,
        mod_revision: v.mod_rev,
        version: v.version,
        value: match v.value {
            Some(loc) if !keys_only => segs.value(loc).to_vec(),
            _ => Vec::new(),
        },
        lease: v.lease,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trips_with_leases() {
        let mut ck = Checkpoint {
            applied: 42,
            compact_rev: 7,
            last_rev: 40,
            seg_id: 3,
            seg_offset: 4096,
            first_seg: 2,
            leases: BTreeMap::new(),
        };
        assert_eq!(Checkpoint::decode(&ck.encode()).unwrap(), ck);
        ck.leases.insert(5, 60);
        ck.leases.insert(i64::MAX, 9_000_000_000);
        let b = ck.encode();
        assert_eq!(Checkpoint::decode(&b).unwrap(), ck);
        // Any flipped byte or a cut is refused, never misread.
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x40;
            assert!(Checkpoint::decode(&bad).is_err(), "flip at {i}");
        }
        for n in 0..b.len() {
            assert!(Checkpoint::decode(&b[..n]).is_err(), "cut at {n}");
        }
    }

    #[test]
    fn version_1_checkpoints_still_read() {
        let mut b = CHECKPOINT_MAGIC_V1.to_vec();
        for v in [9u64, 2, 8, 1, 100] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let ck = Checkpoint::decode(&b).unwrap();
        assert_eq!((ck.applied, ck.seg_offset, ck.leases.len()), (9, 100, 0));
    }

    #[test]
    fn version_2_checkpoints_still_read() {
        let mut b = CHECKPOINT_MAGIC_V2.to_vec();
        for v in [9u64, 2, 8, 3, 100, 1, 5, 60] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let ck = Checkpoint::decode(&b).unwrap();
        assert_eq!((ck.seg_id, ck.seg_offset, ck.first_seg), (3, 100, 0));
        assert_eq!(ck.leases, BTreeMap::from([(5, 60)]));
    }

    fn put_op(key: &[u8], value: &[u8]) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(
                crate::proto::etcdserverpb::PutRequest {
                    key: key.to_vec().into(),
                    value: value.to_vec().into(),
                    ..Default::default()
                },
            )),
        }
    }

    fn delete_op(key: &[u8]) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                crate::proto::etcdserverpb::DeleteRangeRequest {
                    key: key.to_vec(),
                    ..Default::default()
                },
            )),
        }
    }

    /// Every version the shard holds, values included, as snapshot bytes.
    fn contents(sh: &Shard) -> Vec<u8> {
        let mut out = Vec::new();
        sh.dump(&mut out);
        out
    }

    /// Every key's versions are strictly ascending by revision (recovery
    /// read no record twice).
    fn assert_histories_ascend(sh: &Shard) {
        let mut last: Option<(Vec<u8>, i64)> = None;
        sh.index.for_each(|k, v| {
            if let Some((lk, lr)) = &last {
                if lk.as_slice() == k {
                    assert!(v.mod_rev > *lr, "{k:?}: {} after {lr}", v.mod_rev);
                }
            }
            last = Some((k.to_vec(), v.mod_rev));
        });
    }

    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &to.join(e.file_name()));
            } else {
                fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }

    /// Defragmentation rewrites exactly the versions the index holds
    /// (deleted and compacted ones do not come back), recovery from the
    /// checkpoint before it still reads the old segments, and the old
    /// segment files go only once no checkpoint on disk needs them.
    #[test]
    fn defrag_keeps_every_version_and_old_segments_go_after_two_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut sh = Shard::open(&data, 0, 1, 0).unwrap();
        let rev = std::cell::Cell::new(0i64);
        let apply = |sh: &mut Shard, op: RequestOp| {
            rev.set(rev.get() + 1);
            sh.apply_ops(&[op], rev.get(), 0);
            rev.get()
        };
        let value = |k: usize, round: usize| vec![(k * 7 + round) as u8; 1024];
        for round in 0..4 {
            for k in 0..50 {
                apply(
                    &mut sh,
                    put_op(format!("k{k:02}").as_bytes(), &value(k, round)),
                );
            }
        }
        for k in 0..10 {
            apply(&mut sh, delete_op(format!("k{k:02}").as_bytes()));
        }
        let compacted = apply(&mut sh, put_op(b"k00", &value(0, 9)));
        // Versions above the compaction stay.
        apply(&mut sh, put_op(b"k20", &value(20, 9)));
        apply(&mut sh, delete_op(b"k21"));
        for round in 10..13 {
            apply(&mut sh, put_op(b"k40", &value(40, round)));
        }
        assert_eq!(sh.in_use_bytes(), sh.live_bytes());
        assert!(!sh.compact(compacted), "too small to be worth it by itself");
        assert_eq!(sh.in_use_bytes(), sh.live_bytes());
        let a = sh.checkpoint(rev.get() as u64).unwrap();
        let before = contents(&sh);
        let bytes_before = sh.disk_bytes();
        sh.defrag().unwrap();
        assert_eq!(contents(&sh), before);
        // One new segment holding exactly the versions' records.
        assert_eq!(sh.disk_bytes(), sh.in_use_bytes());
        assert!(
            sh.disk_bytes() < bytes_before / 3,
            "{} of {bytes_before}",
            sh.disk_bytes()
        );
        let sdir = Shard::dir_for(&data, 0);
        let old = segment::list_segments(&sdir).unwrap()[0];
        assert!(old < sh.segs.first_id());

        // New writes after the defragmentation, then a checkpoint.
        apply(&mut sh, put_op(b"k30", &value(30, 10)));
        let b = sh.checkpoint(rev.get() as u64).unwrap();
        assert_eq!(b.first_seg, sh.segs.first_id());
        // Checkpoint `a` still needs the old segment.
        assert!(segment::segment_path(&sdir, old).exists());

        // A crash that leaves only checkpoint `a` usable (another shard did
        // not reach `b`): recovery reads the old segments.
        let crashed = dir.path().join("crashed");
        copy_dir(&data, &crashed);
        let back = Shard::open(&crashed, 0, 1, a.applied).unwrap();
        assert_eq!(contents(&back), before);
        drop(back);
        // Recovery from `b` reads only the new segments, though the old
        // ones are still there.
        let at_b = contents(&sh);
        let crashed = dir.path().join("crashed-at-b");
        copy_dir(&data, &crashed);
        let back = Shard::open(&crashed, 0, 1, b.applied).unwrap();
        assert_histories_ascend(&back);
        assert_eq!(contents(&back), at_b);
        assert!(segment::segment_path(&Shard::dir_for(&crashed, 0), old).exists());
        drop(back);

        // One more checkpoint: neither kept one needs the old segments.
        apply(&mut sh, put_op(b"k31", &value(31, 10)));
        let c = sh.checkpoint(rev.get() as u64).unwrap();
        assert!(!segment::segment_path(&sdir, old).exists());
        assert!(segment::list_segments(&sdir)
            .unwrap()
            .iter()
            .all(|&id| id >= sh.segs.first_id()));
        let now = contents(&sh);
        let in_use = sh.in_use_bytes();
        assert_eq!(in_use, sh.live_bytes());
        drop(sh);
        let back = Shard::open(&data, 0, 1, c.applied).unwrap();
        assert_eq!(back.in_use_bytes(), in_use);
        assert_histories_ascend(&back);
        assert_eq!(contents(&back), now);
        assert!(
            back.index.latest(b"k05").is_none(),
            "a deleted key stays deleted"
        );
        assert!(back.index.latest(b"k21").is_none());
        assert_eq!(
            back.index.history(b"k21").len(),
            2,
            "put and delete above the compaction"
        );
    }

    /// Compaction reports when the segments hold more than twice what the
    /// index needs plus a segment's worth.
    #[test]
    fn compaction_says_when_defrag_is_worth_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut sh = Shard::open(dir.path(), 0, 1, 0).unwrap();
        let big = vec![1u8; 1 << 20];
        let mut rev = 0;
        for _ in 0..(3 * segment::SEGMENT_BYTES_MAX >> 20) {
            rev += 1;
            sh.apply_ops(&[put_op(b"k", &big)], rev, 0);
        }
        sh.flush().unwrap();
        assert!(sh.compact(rev));
        sh.defrag().unwrap();
        assert!(sh.disk_bytes() < 2 << 20, "{}", sh.disk_bytes());
        assert_eq!(sh.index.history(b"k").len(), 1);
    }

    #[test]
    fn a_first_segment_after_the_last_is_refused() {
        let ck = Checkpoint {
            seg_id: 3,
            first_seg: 4,
            ..Checkpoint::default()
        };
        let e = Checkpoint::decode(&ck.encode()).unwrap_err();
        assert!(e.contains("first segment 4"), "{e}");
    }
}
