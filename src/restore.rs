//! `keelson snapshot restore` and `keelson snapshot status`: the operator
//! side of `Maintenance.Snapshot` (`etcdctl snapshot save`), as
//! `etcdutl snapshot restore` is etcd's.
//!
//! Restore makes a new data dir for a new cluster (the bootstrap flags —
//! `--name`, `--initial-cluster`, `--initial-cluster-token`,
//! `--initial-advertise-peer-urls`, `--data-dir`, `--shards` — say which,
//! exactly as for a first start) holding the snapshot's keys, versions,
//! compaction and leases. Every shard is checkpointed at the snapshot's
//! index and the WAL starts after it, so revisions go on from where the
//! snapshot left them. Run it with the same file for every member.

use crate::config::Config;
use crate::server::api::SNAPSHOT_FILE_MAGIC;
use crate::store::shard::Shard;
use crate::store::shard_of;
use sha2::Digest;
use std::path::Path;

/// The snapshot body inside a file `Maintenance.Snapshot` produced, after
/// checking its framing and (unless told not to) its sha256.
pub fn read_file(path: &Path, check_hash: bool) -> Result<Vec<u8>, String> {
    let f = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if f.len() < 16 + 32 || &f[..8] != SNAPSHOT_FILE_MAGIC {
        return Err(format!("{}: not a keelson snapshot file", path.display()));
    }
    if (f.len() - 32) % 512 != 0 {
        return Err(format!(
            "{}: truncated or padded wrongly ({} bytes)",
            path.display(),
            f.len()
        ));
    }
    let (data, sum) = f.split_at(f.len() - 32);
    if check_hash && sha2::Sha256::digest(data).as_slice() != sum {
        return Err(format!(
            "{}: sha256 mismatch (use --skip-hash-check to restore anyway)",
            path.display()
        ));
    }
    let len = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes")) as usize;
    if 16 + len > data.len() {
        return Err(format!(
            "{}: body length {len} beyond the file",
            path.display()
        ));
    }
    Ok(data[16..16 + len].to_vec())
}

/// One line about the snapshot: index, revisions, keys, versions, size.
pub fn status(path: &Path) -> Result<String, String> {
    let body = read_file(path, true)?;
    let (meta, records) = crate::snapshot::parse(&body)?;
    let keys: std::collections::BTreeSet<&[u8]> =
        records.iter().map(|(k, _)| k.as_slice()).collect();
    let revision = records.iter().map(|(_, v)| v.mod_rev).max().unwrap_or(0);
    Ok(format!(
        "index {}, revision {revision}, compact revision {}, {} keys, {} versions, {} leases, {} bytes",
        meta.index,
        meta.compact_rev,
        keys.len(),
        records.len(),
        meta.leases.len(),
        body.len()
    ))
}

pub fn restore(path: &Path, cfg: &Config, check_hash: bool) -> Result<String, String> {
    let body = read_file(path, check_hash)?;
    let (meta, records) = crate::snapshot::parse(&body)?;
    drop(body);
    if cfg.data_dir.exists()
        && std::fs::read_dir(&cfg.data_dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(format!(
            "data-dir {:?} exists",
            cfg.data_dir.display().to_string()
        ));
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| format!("{}: {e}", cfg.data_dir.display()))?;
    let m = crate::server::load_or_create_meta(cfg)?;
    crate::server::load_membership(cfg, &m)?;
    let n = m.shards;
    let mut per_shard: Vec<Vec<_>> = (0..n).map(|_| Vec::new()).collect();
    let count = records.len();
    for (k, v) in records {
        per_shard[shard_of(&k, n)].push((k, v));
    }
    let index = meta.index.max(1);
    for (s, recs) in per_shard.into_iter().enumerate() {
        let mut shard = Shard::open(&cfg.data_dir, s, n, 0)?;
        shard.restore(recs, index, meta.compact_rev, meta.leases.clone())?;
    }
    let mut hs = raft::eraftpb::HardState::default();
    hs.term = 1;
    hs.commit = index;
    crate::wal::create_at_base(&cfg.data_dir, (index, 1), &hs)?;
    Ok(format!(
        "restored {count} versions at index {index} into {} (member {:x} of cluster {:x}, {n} shards)",
        cfg.data_dir.display(),
        m.member_id,
        m.cluster_id
    ))
}
