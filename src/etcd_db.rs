//! etcd 3.4's backend schema over `bbolt`: what keelson's snapshot
//! becomes in the file `Maintenance.Snapshot` streams (so `etcdctl
//! snapshot status|restore` take it), and what keelson reads back from
//! such a file, its own or one a real etcd 3.4 saved.
//!
//! The buckets, as etcd 3.4 writes them (mvcc/kvstore.go, lease/lessor.go,
//! etcdserver/api/membership/store.go, auth/store.go, alarm):
//!
//! - `key`: revision bytes → `mvccpb.KeyValue`. The revision is 8 bytes
//!   big-endian main revision, `_`, 8 bytes big-endian sub revision; a
//!   tombstone has a trailing `t` and its value holds only the key.
//!   keelson's revisions are Raft indexes and carry no sub revision: the
//!   changes of one revision get sub revisions 0, 1, ... in key order.
//! - `meta`: `consistent_index` (u64 big-endian, the snapshot's log
//!   index), and after a compaction `scheduledCompactRev` and
//!   `finishedCompactRev` (revision bytes of the compaction revision, sub
//!   0).
//! - `lease`: lease ID (8 bytes big-endian) → `leasepb.Lease{ID, TTL}`.
//! - `alarm`, `auth`, `authRoles`, `authUsers`, `cluster`, `members`,
//!   `members_removed`: created empty. keelson's snapshot carries neither
//!   membership nor auth (nor does `etcdctl snapshot restore` keep the
//!   membership of a file: it makes a new cluster), and etcd 3.4 reads a
//!   missing `authEnabled` as auth off.
//! - `keelson`: keelson's own meta (`index`, `compact_rev`, `current_rev`,
//!   u64 big-endian; the current revision at least the highest version's),
//!   so a keelson → file → keelson round trip is exact
//!   (keelson's current revision may be past the last change's). etcd
//!   ignores buckets it does not know.
//!
//! Reading a file without the `keelson` bucket (a real etcd's): versions
//! from `key` (mod revision = main revision), compaction from
//! `finishedCompactRev` (or a later `scheduledCompactRev`), leases from
//! `lease`, and the log index the larger of `consistent_index` and the
//! highest revision, so keelson's revision = Raft index invariant holds for
//! the entries after it.

use crate::bbolt::{self, Bucket};
use crate::proto::mvccpb::KeyValue;
use crate::snapshot::Meta;
use crate::store::index::Version;
use prost::Message;
use std::collections::HashMap;

pub const KEY: &[u8] = b"key";
pub const META: &[u8] = b"meta";
pub const LEASE: &[u8] = b"lease";
pub const KEELSON: &[u8] = b"keelson";
/// Buckets etcd 3.4 has that keelson leaves empty.
const EMPTY: [&str; 7] = [
    "alarm",
    "auth",
    "authRoles",
    "authUsers",
    "cluster",
    "members",
    "members_removed",
];
const CONSISTENT_INDEX: &[u8] = b"consistent_index";
const SCHEDULED_COMPACT: &[u8] = b"scheduledCompactRev";
const FINISHED_COMPACT: &[u8] = b"finishedCompactRev";

/// leasepb.Lease.
#[derive(Clone, PartialEq, Message)]
struct LeasePb {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(int64, tag = "2")]
    ttl: i64,
    #[prost(int64, tag = "3")]
    remaining_ttl: i64,
}

/// etcd's revision bytes: main, `_`, sub (big-endian), `t` for a tombstone.
pub fn rev_bytes(main: i64, sub: i64, tombstone: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(18);
    b.extend_from_slice(&(main as u64).to_be_bytes());
    b.push(b'_');
    b.extend_from_slice(&(sub as u64).to_be_bytes());
    if tombstone {
        b.push(b't');
    }
    b
}

/// (main, sub, tombstone) of revision bytes.
pub fn parse_rev(b: &[u8]) -> Result<(i64, i64, bool), String> {
    let tombstone = match b.len() {
        17 => false,
        18 if b[17] == b't' => true,
        _ => return Err(format!("bad revision key {b:?}")),
    };
    if b[8] != b'_' {
        return Err(format!("bad revision key {b:?}"));
    }
    let main = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes")) as i64;
    let sub = u64::from_be_bytes(b[9..17].try_into().expect("8 bytes")) as i64;
    Ok((main, sub, tombstone))
}

fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

/// The bbolt file for a keelson snapshot: its state and every version.
pub fn build(meta: &Meta, records: &[(Vec<u8>, Version)]) -> Result<Vec<u8>, String> {
    let mut order: Vec<&(Vec<u8>, Version)> = records.iter().collect();
    order.sort_by(|a, b| (a.1.mod_rev, &a.0).cmp(&(b.1.mod_rev, &b.0)));
    let mut keys = Bucket::new();
    keys.items.reserve(order.len());
    let mut sub = 0i64;
    for (i, (k, v)) in order.iter().enumerate() {
        sub = if i > 0 && order[i - 1].1.mod_rev == v.mod_rev {
            sub + 1
        } else {
            0
        };
        let kv = match &v.value {
            Some(val) => KeyValue {
                key: k.clone(),
                create_revision: v.create_rev,
                mod_revision: v.mod_rev,
                version: v.version,
                value: val.to_vec(),
                lease: v.lease,
            },
            None => KeyValue {
                key: k.clone(),
                ..Default::default()
            },
        };
        keys.put(
            rev_bytes(v.mod_rev, sub, v.is_tombstone()),
            kv.encode_to_vec(),
        );
    }
    let mut m = Bucket::new();
    m.put(CONSISTENT_INDEX, be64(meta.index));
    if meta.compact_rev > 0 {
        m.put(SCHEDULED_COMPACT, rev_bytes(meta.compact_rev, 0, false));
        m.put(FINISHED_COMPACT, rev_bytes(meta.compact_rev, 0, false));
    }
    let mut leases = Bucket::new();
    for (&id, &ttl) in &meta.leases {
        let l = LeasePb {
            id,
            ttl,
            remaining_ttl: 0,
        };
        leases.put(be64(id as u64), l.encode_to_vec());
    }
    // A snapshot's `current_rev` is a lower bound (0 when the leader left
    // it to the versions): the file says the revision it stands at.
    let highest = order.last().map_or(0, |(_, v)| v.mod_rev);
    let mut own = Bucket::new();
    own.put("index", be64(meta.index));
    own.put("compact_rev", be64(meta.compact_rev as u64));
    own.put("current_rev", be64(meta.current_rev.max(highest) as u64));
    let mut root = Bucket::new();
    root.put_bucket(KEY, keys);
    root.put_bucket(META, m);
    root.put_bucket(LEASE, leases);
    root.put_bucket(KEELSON, own);
    for name in EMPTY {
        root.put_bucket(name, Bucket::new());
    }
    bbolt::write(&root)
}

/// What a file holds, as keelson restores it.
#[derive(Debug)]
pub struct Parsed {
    pub meta: Meta,
    /// Every version, in revision order (so each key's in order).
    pub records: Vec<(Vec<u8>, Version)>,
    /// The file came from keelson (it has the `keelson` bucket).
    pub from_keelson: bool,
    pub info: bbolt::Info,
}

fn u64_of(v: Option<&[u8]>, what: &str) -> Result<Option<u64>, String> {
    match v {
        None => Ok(None),
        Some(b) => b
            .try_into()
            .map(|a: [u8; 8]| Some(u64::from_be_bytes(a)))
            .map_err(|_| format!("{what}: {} bytes, not 8", b.len())),
    }
}

/// Reads a bbolt file in etcd 3.4's schema (keelson's or etcd's own).
pub fn parse(file: &[u8]) -> Result<Parsed, String> {
    let (root, info) = bbolt::read(file)?;
    let keys = root
        .bucket(KEY)
        .ok_or("not an etcd database (no `key` bucket)")?;
    let mut records: Vec<(Vec<u8>, Version)> = Vec::with_capacity(keys.items.len());
    // key → (main revision, position in `records`) of its newest version.
    let mut newest: HashMap<Vec<u8>, (i64, usize)> = HashMap::new();
    let mut max_rev = 0i64;
    for (rk, val) in keys.values() {
        let (main, _, tombstone) = parse_rev(rk)?;
        if main <= 0 {
            return Err(format!("key bucket: revision {main}"));
        }
        let kv = KeyValue::decode(val).map_err(|e| format!("key bucket, revision {main}: {e}"))?;
        if kv.key.is_empty() {
            return Err(format!("key bucket, revision {main}: empty key"));
        }
        let v = if tombstone {
            Version {
                mod_rev: main,
                create_rev: 0,
                version: 0,
                lease: 0,
                value: None,
            }
        } else {
            Version {
                mod_rev: main,
                create_rev: kv.create_revision,
                version: kv.version,
                lease: kv.lease,
                value: Some(kv.value.into_boxed_slice()),
            }
        };
        max_rev = max_rev.max(main);
        match newest.get_mut(&kv.key) {
            // Two changes of one key in one revision: the later stands.
            Some((rev, at)) if *rev == main => records[*at].1 = v,
            Some((rev, _)) if *rev > main => {
                return Err(format!("key bucket: revisions out of order at {main}"))
            }
            Some(slot) => {
                *slot = (main, records.len());
                records.push((kv.key, v));
            }
            None => {
                newest.insert(kv.key.clone(), (main, records.len()));
                records.push((kv.key, v));
            }
        }
    }
    drop(newest);
    let meta_b = root.bucket(META);
    let get_meta = |k: &[u8]| meta_b.and_then(|b| b.get(k));
    let consistent = u64_of(get_meta(CONSISTENT_INDEX), "consistent_index")?.unwrap_or(0);
    let mut compact_rev = 0i64;
    for k in [FINISHED_COMPACT, SCHEDULED_COMPACT] {
        if let Some(b) = get_meta(k) {
            let b = b.get(..17).ok_or("meta bucket: bad compaction revision")?;
            compact_rev = compact_rev.max(parse_rev(b)?.0);
        }
    }
    let mut leases = std::collections::BTreeMap::new();
    if let Some(lb) = root.bucket(LEASE) {
        for (_, v) in lb.values() {
            let l = LeasePb::decode(v).map_err(|e| format!("lease bucket: {e}"))?;
            leases.insert(l.id, l.ttl);
        }
    }
    let own = root.bucket(KEELSON);
    let meta = match own {
        Some(b) => {
            let get = |k: &str| u64_of(b.get(k.as_bytes()), k);
            let (Some(index), Some(compact), Some(current)) =
                (get("index")?, get("compact_rev")?, get("current_rev")?)
            else {
                return Err("keelson bucket: incomplete".into());
            };
            Meta {
                index,
                compact_rev: compact as i64,
                current_rev: current as i64,
                leases,
            }
        }
        None => {
            let current = max_rev.max(compact_rev);
            Meta {
                index: consistent.max(current as u64).max(1),
                compact_rev,
                current_rev: current,
                leases,
            }
        }
    };
    if (meta.index as i64) < max_rev || meta.current_rev < max_rev {
        return Err(format!(
            "index {} or current revision {} below the highest revision {max_rev}",
            meta.index, meta.current_rev
        ));
    }
    Ok(Parsed {
        meta,
        records,
        from_keelson: own.is_some(),
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn put(k: &str, rev: i64, create: i64, ver: i64, lease: i64, val: &str) -> (Vec<u8>, Version) {
        (
            k.as_bytes().to_vec(),
            Version {
                mod_rev: rev,
                create_rev: create,
                version: ver,
                lease,
                value: Some(val.as_bytes().into()),
            },
        )
    }

    fn del(k: &str, rev: i64) -> (Vec<u8>, Version) {
        (
            k.as_bytes().to_vec(),
            Version {
                mod_rev: rev,
                create_rev: 0,
                version: 0,
                lease: 0,
                value: None,
            },
        )
    }

    fn by_key(mut r: Vec<(Vec<u8>, Version)>) -> Vec<(Vec<u8>, Version)> {
        r.sort_by(|a, b| (&a.0, a.1.mod_rev).cmp(&(&b.0, b.1.mod_rev)));
        r
    }

    #[test]
    fn revision_bytes_are_etcds() {
        let b = rev_bytes(0x0102, 3, false);
        assert_eq!(b, b"\0\0\0\0\0\0\x01\x02_\0\0\0\0\0\0\0\x03");
        assert_eq!(parse_rev(&b).unwrap(), (0x0102, 3, false));
        let t = rev_bytes(7, 0, true);
        assert_eq!(t.len(), 18);
        assert_eq!(parse_rev(&t).unwrap(), (7, 0, true));
        assert!(parse_rev(b"short").is_err());
        let mut x = b.clone();
        x[8] = b'-';
        assert!(parse_rev(&x).is_err());
    }

    #[test]
    fn keelson_state_round_trips_through_the_file() {
        let mut leases = BTreeMap::new();
        leases.insert(0x1234, 60);
        leases.insert(7, 5);
        let meta = Meta {
            index: 40,
            compact_rev: 9,
            current_rev: 38,
            leases,
        };
        // Revision 20 changes three keys at once (a txn): subs 0, 1, 2.
        let records = vec![
            put("a", 5, 5, 1, 0, "a1"),
            put("a", 12, 5, 2, 0x1234, "a2"),
            del("a", 20),
            put("b", 20, 20, 1, 0, "b1"),
            put("c", 20, 20, 1, 7, ""),
            put("d", 30, 30, 1, 0, &"x".repeat(10_000)),
        ];
        let file = build(&meta, &records).unwrap();
        let p = parse(&file).unwrap();
        assert!(p.from_keelson);
        assert_eq!(p.meta, meta);
        // A leader's snapshot leaves the current revision to the versions.
        let zero = Meta {
            current_rev: 0,
            ..meta.clone()
        };
        let p0 = parse(&build(&zero, &records).unwrap()).unwrap();
        assert_eq!(p0.meta.current_rev, 30);
        assert_eq!(by_key(p.records.clone()), by_key(records));
        // The key bucket as etcd reads it.
        let (root, _) = bbolt::read(&file).unwrap();
        let kb = root.bucket(KEY).unwrap();
        let revs: Vec<_> = kb.values().map(|(k, _)| parse_rev(k).unwrap()).collect();
        assert_eq!(
            revs,
            vec![
                (5, 0, false),
                (12, 0, false),
                (20, 0, true),
                (20, 1, false),
                (20, 2, false),
                (30, 0, false)
            ]
        );
        let tomb = KeyValue::decode(kb.values().nth(2).unwrap().1).unwrap();
        assert_eq!(
            tomb,
            KeyValue {
                key: b"a".to_vec(),
                ..Default::default()
            }
        );
        let m = root.bucket(META).unwrap();
        assert_eq!(m.get(CONSISTENT_INDEX).unwrap(), 40u64.to_be_bytes());
        assert_eq!(m.get(FINISHED_COMPACT).unwrap(), rev_bytes(9, 0, false));
        for name in EMPTY {
            assert_eq!(root.bucket(name.as_bytes()), Some(&Bucket::new()));
        }
    }

    #[test]
    fn a_file_without_keelsons_bucket_derives_its_meta() {
        let mut root = Bucket::new();
        let mut kb = Bucket::new();
        for (rev, k) in [(2i64, "x"), (3, "y")] {
            let kv = KeyValue {
                key: k.into(),
                create_revision: rev,
                mod_revision: rev,
                version: 1,
                value: b"v".to_vec(),
                lease: 0,
            };
            kb.put(rev_bytes(rev, 0, false), kv.encode_to_vec());
        }
        root.put_bucket(KEY, kb);
        let mut m = Bucket::new();
        m.put(CONSISTENT_INDEX, be64(2));
        root.put_bucket(META, m);
        let p = parse(&bbolt::write(&root).unwrap()).unwrap();
        assert!(!p.from_keelson);
        // The log index is at least the highest revision.
        assert_eq!(
            (p.meta.index, p.meta.current_rev, p.meta.compact_rev),
            (3, 3, 0)
        );
        assert_eq!(p.records.len(), 2);
    }

    #[test]
    fn bad_contents_are_errors() {
        let mut root = Bucket::new();
        root.put_bucket("other", Bucket::new());
        assert!(parse(&bbolt::write(&root).unwrap()).is_err());
        let mut kb = Bucket::new();
        kb.put("not-a-revision", "x");
        let mut root = Bucket::new();
        root.put_bucket(KEY, kb);
        assert!(parse(&bbolt::write(&root).unwrap()).is_err());
        let mut kb = Bucket::new();
        kb.put(rev_bytes(3, 0, false), vec![0xff, 0xff, 0xff]);
        let mut root = Bucket::new();
        root.put_bucket(KEY, kb);
        assert!(parse(&bbolt::write(&root).unwrap()).is_err());
        assert!(parse(b"KLSNBAK1 not bbolt").is_err());
    }
}
