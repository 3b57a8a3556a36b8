//! Raft snapshots of the shards' data: what a leader sends a member that is
//! behind its in-memory log. This module owns the byte format (build /
//! parse pair); the leader builds one from every shard's versions at one
//! log index, the member installs it in place of its own data.
//!
//! Format (little-endian): magic `KLSNSNP1`, index u64, compact revision
//! i64, current revision i64, lease count u64 and (id i64, ttl i64) pairs,
//! then shard records in the segment format
//! (`store::segment::encode_record`, each with its own crc) to the end.
//! The whole file's crc32c travels in the raft snapshot message (`Header`),
//! followed there by the membership (`membership::Membership::encode`),
//! which is the raft core's, not the shards'.
//!
//! Every key's versions are included (the MVCC history since compaction),
//! so reads at old revisions and watches from old revisions work on the
//! member that installs it. A snapshot is routed by key, so members with
//! different shard counts exchange snapshots freely.

use crate::store::index::Version;
use crate::store::segment::{self, Decode};
use std::collections::BTreeMap;

const MAGIC: &[u8; 8] = b"KLSNSNP2";

/// The state besides the records.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Meta {
    pub index: u64,
    pub compact_rev: i64,
    pub current_rev: i64,
    pub leases: BTreeMap<i64, i64>,
}

/// Starts a snapshot body with its fixed part; records are appended with
/// `segment::encode_record`.
pub fn build_head(m: &Meta) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&m.index.to_le_bytes());
    b.extend_from_slice(&m.compact_rev.to_le_bytes());
    b.extend_from_slice(&m.current_rev.to_le_bytes());
    b.extend_from_slice(&(m.leases.len() as u64).to_le_bytes());
    for (id, ttl) in &m.leases {
        b.extend_from_slice(&id.to_le_bytes());
        b.extend_from_slice(&ttl.to_le_bytes());
    }
    b
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or("snapshot is truncated")?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

/// Parses a snapshot body: its state and every record, in order.
pub fn parse(b: &[u8]) -> Result<(Meta, Vec<(Vec<u8>, Version)>), String> {
    let mut r = Reader { b, at: 0 };
    if r.take(8)? != MAGIC {
        return Err("not a keelson snapshot".into());
    }
    let mut m = Meta {
        index: r.u64()?,
        compact_rev: r.u64()? as i64,
        current_rev: r.u64()? as i64,
        ..Default::default()
    };
    let n = r.u64()?;
    if n > (b.len() / 16) as u64 {
        return Err("snapshot: lease count exceeds its size".into());
    }
    for _ in 0..n {
        let id = r.u64()? as i64;
        let ttl = r.u64()? as i64;
        m.leases.insert(id, ttl);
    }
    let mut records = Vec::new();
    let mut rest = &b[r.at..];
    while !rest.is_empty() {
        match segment::decode_record(rest) {
            Decode::Record(k, v, n) => {
                records.push((k.to_vec(), v.map_value(Box::from)));
                rest = &rest[n..];
            }
            Decode::Short => return Err("snapshot: a record is cut short".into()),
            Decode::Corrupt(e) => return Err(format!("snapshot: {e}")),
        }
    }
    Ok((m, records))
}

/// What the raft snapshot message carries: which body, how long, its crc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub index: u64,
    pub len: u64,
    pub crc: u32,
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.index.to_le_bytes().to_vec();
        b.extend_from_slice(&self.len.to_le_bytes());
        b.extend_from_slice(&self.crc.to_le_bytes());
        b
    }
    pub const BYTES: usize = 20;
    pub fn decode(b: &[u8]) -> Option<Header> {
        (b.len() == Self::BYTES).then(|| Header {
            index: u64::from_le_bytes(b[0..8].try_into().expect("8")),
            len: u64::from_le_bytes(b[8..16].try_into().expect("8")),
            crc: u32::from_le_bytes(b[16..20].try_into().expect("4")),
        })
    }
}

/// A chunk of a snapshot body on the peer transport: (index, offset, bytes).
pub fn encode_chunk(index: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(17 + data.len());
    b.push(crate::raftcore::PAYLOAD_SNAPSHOT_CHUNK);
    b.extend_from_slice(&index.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(data);
    b
}

pub fn decode_chunk(b: &[u8]) -> Option<(u64, u64, &[u8])> {
    if b.len() < 17 {
        return None;
    }
    Some((
        u64::from_le_bytes(b[1..9].try_into().expect("8")),
        u64::from_le_bytes(b[9..17].try_into().expect("8")),
        &b[17..],
    ))
}

/// Every version the shards hold (`(key, version)`) and the snapshot's
/// meta, from a snapshot of the shards the applier builds (HashKV, Hash,
/// the initial corruption check).
pub async fn versions(
    applier: &crate::mailbox::Sender<crate::apply::ApplierMsg>,
) -> Result<(Meta, Vec<(Vec<u8>, Version)>), crate::error::Status> {
    let (tx, rx) = futures::channel::oneshot::channel();
    applier.send(crate::apply::ApplierMsg::SnapshotBuild { reply: tx });
    let (_, body) = rx.await.map_err(|_| crate::error::stopped())?;
    parse(&body).map_err(|e| {
        crate::error::Status::new(crate::error::Code::Internal, format!("etcdserver: {e}"))
    })
}

/// keelson's hash of the versions with a revision in (compacted, `rev`]:
/// each version's crc32c (key, revisions, version, lease, value or
/// tombstone), summed, so members with any shard count agree. Not etcd's
/// number (that hashes bbolt's encoding); comparable between keelson
/// members (`etcdctl endpoint hashkv`, `--experimental-initial-corrupt-check`).
pub fn hash_versions(records: &[(Vec<u8>, Version)], rev: i64) -> u32 {
    let mut h = crc32c::crc32c(b"keelson-hashkv-1");
    for (k, v) in records.iter().filter(|(_, v)| v.mod_rev <= rev) {
        let mut c = crc32c::crc32c(k);
        for n in [v.mod_rev, v.create_rev, v.version, v.lease] {
            c = crc32c::crc32c_append(c, &n.to_le_bytes());
        }
        c = match &v.value {
            Some(val) => crc32c::crc32c_append(crc32c::crc32c_append(c, b"p"), val),
            None => crc32c::crc32c_append(c, b"d"),
        };
        h = h.wrapping_add(c);
    }
    h
}

/// A member's hash at a revision: (hash, compaction revision, the
/// member's current revision), from a snapshot of its shards the applier
/// builds; `rev` 0 means the current one. etcd's errors for a revision
/// past the current one or below the compaction.
pub async fn hash_at(
    applier: &crate::mailbox::Sender<crate::apply::ApplierMsg>,
    rev: i64,
) -> Result<(u32, i64, i64), crate::error::Status> {
    let (meta, records) = versions(applier).await?;
    // The body is the data at log index `meta.index` (its current_rev is
    // not filled in); at start, before anything is dispatched, the shards'
    // newest version says where their data is.
    let current = records
        .iter()
        .map(|(_, v)| v.mod_rev)
        .chain([meta.index as i64, meta.current_rev])
        .max()
        .unwrap_or(0);
    let rev = if rev > 0 { rev } else { current };
    if rev > current {
        return Err(crate::error::future_rev());
    }
    if meta.compact_rev > 0 && rev < meta.compact_rev {
        return Err(crate::error::compacted());
    }
    Ok((hash_versions(&records, rev), meta.compact_rev, rev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let mut m = Meta {
            index: 77,
            compact_rev: 5,
            current_rev: 70,
            ..Default::default()
        };
        m.leases.insert(9, 60);
        let mut b = build_head(&m);
        let head_len = b.len();
        let v = Version {
            mod_rev: 10,
            create_rev: 8,
            version: 2,
            lease: 9,
            value: Some(b"val".to_vec().into()),
        };
        segment::encode_record(&mut b, b"key", &v);
        let (m2, recs) = parse(&b).unwrap();
        assert_eq!(m2, m);
        assert_eq!(recs, vec![(b"key".to_vec(), v)]);
        // Any cut is an error, never a panic, except exactly between
        // records, which only the whole body's crc (in `Header`) catches.
        for n in 0..b.len() {
            match parse(&b[..n]) {
                Err(_) => {}
                Ok((_, recs)) => assert!(n == head_len && recs.is_empty(), "cut at {n}"),
            }
        }
        let h = Header {
            index: 77,
            len: b.len() as u64,
            crc: crc32c::crc32c(&b),
        };
        assert_eq!(Header::decode(&h.encode()), Some(h));
        let c = encode_chunk(77, 1 << 20, b"xyz");
        assert_eq!(decode_chunk(&c), Some((77, 1 << 20, &b"xyz"[..])));
    }
}
