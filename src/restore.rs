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
//!
//! The file is a bbolt database in etcd 3.4's schema (`etcd_db`): keelson's
//! own (exact: it carries keelson's index and revisions) or one a real
//! etcd saved (its log index taken as the larger of its
//! `consistent_index` and its highest revision, so every revision stays at
//! or below the log index that made it). Files of keelson's older
//! `KLSNBAK1` form are read too.

use crate::config::Config;
use crate::server::api::SNAPSHOT_FILE_MAGIC;
use crate::snapshot::Meta;
use crate::store::index::Version;
use crate::store::shard::Shard;
use crate::store::shard_of;
use sha2::Digest;
use std::path::Path;

/// A snapshot file's contents, whichever form it has.
#[derive(Debug)]
pub struct Contents {
    pub meta: Meta,
    pub records: Vec<(Vec<u8>, Version)>,
    /// Which form: a bbolt file from keelson or from etcd, or keelson's
    /// older `KLSNBAK1` file.
    pub form: &'static str,
    pub bytes: usize,
}

/// Reads a snapshot file: a bbolt database in etcd 3.4's schema (what
/// `Maintenance.Snapshot` streams, keelson's or etcd's; with the sha256
/// of the database after it, as `etcdctl snapshot save` writes it, or
/// without, as etcd's `member/snap/db`), or keelson's older `KLSNBAK1`
/// form. `check_hash` verifies the sha256 when there is one;
/// `require_hash` refuses a file without one (as `etcdctl snapshot
/// restore` does unless told `--skip-hash-check`).
pub fn read_file(path: &Path, check_hash: bool, require_hash: bool) -> Result<Contents, String> {
    let f = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let at = |e: String| format!("{}: {e}", path.display());
    if f.starts_with(SNAPSHOT_FILE_MAGIC) {
        let body = read_old(&f, check_hash).map_err(at)?;
        let (meta, records) = crate::snapshot::parse(body).map_err(at)?;
        return Ok(Contents {
            meta,
            records,
            form: "keelson KLSNBAK1",
            bytes: f.len(),
        });
    }
    // etcd's rule: a file 32 bytes past a whole number of 512-byte
    // sectors ends with the sha256 of what comes before.
    let db = if f.len() % 512 == 32 {
        let (db, sum) = f.split_at(f.len() - 32);
        if check_hash && sha2::Sha256::digest(db).as_slice() != sum {
            return Err(at(
                "sha256 mismatch (use --skip-hash-check to restore anyway)".into(),
            ));
        }
        db
    } else if require_hash {
        return Err(at(
            "snapshot missing hash (use --skip-hash-check to restore anyway)".into(),
        ));
    } else {
        &f[..]
    };
    let p = crate::etcd_db::parse(db).map_err(at)?;
    Ok(Contents {
        meta: p.meta,
        records: p.records,
        form: if p.from_keelson {
            "bbolt, from keelson"
        } else {
            "bbolt, from etcd"
        },
        bytes: f.len(),
    })
}

/// The body of an old `KLSNBAK1` file: magic, body length, body, zero
/// padding to 512 bytes, sha256.
fn read_old(f: &[u8], check_hash: bool) -> Result<&[u8], String> {
    if f.len() < 16 + 32 || (f.len() - 32) % 512 != 0 {
        return Err(format!("truncated or padded wrongly ({} bytes)", f.len()));
    }
    let (data, sum) = f.split_at(f.len() - 32);
    if check_hash && sha2::Sha256::digest(data).as_slice() != sum {
        return Err("sha256 mismatch (use --skip-hash-check to restore anyway)".into());
    }
    let len = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    if len > (data.len() - 16) as u64 {
        return Err(format!("body length {len} beyond the file"));
    }
    Ok(&data[16..16 + len as usize])
}

/// One line about the snapshot: index, revisions, keys, versions, size.
pub fn status(path: &Path) -> Result<String, String> {
    let c = read_file(path, true, false)?;
    let keys: std::collections::BTreeSet<&[u8]> =
        c.records.iter().map(|(k, _)| k.as_slice()).collect();
    let revision = c.records.iter().map(|(_, v)| v.mod_rev).max().unwrap_or(0);
    Ok(format!(
        "index {}, revision {revision}, compact revision {}, {} keys, {} versions, {} leases, {} bytes ({})",
        c.meta.index,
        c.meta.compact_rev,
        keys.len(),
        c.records.len(),
        c.meta.leases.len(),
        c.bytes,
        c.form
    ))
}

pub fn restore(path: &Path, cfg: &Config, check_hash: bool) -> Result<String, String> {
    let Contents { meta, records, .. } = read_file(path, check_hash, check_hash)?;
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
    crate::wal::create_at_base(&cfg.wal_path(), (index, 1), &hs)?;
    Ok(format!(
        "restored {count} versions at index {index} into {} (member {:x} of cluster {:x}, {n} shards)",
        cfg.data_dir.display(),
        m.member_id,
        m.cluster_id
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Meta;

    fn version(rev: i64) -> Version {
        Version {
            mod_rev: rev,
            create_rev: rev,
            version: 1,
            lease: 0,
            value: Some(b"v".to_vec().into()),
        }
    }

    /// Each form a file can have, and what is refused.
    #[test]
    fn files_of_every_form() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta {
            index: 9,
            compact_rev: 0,
            current_rev: 8,
            ..Default::default()
        };
        // The old form: magic, length, body, padding, sha256.
        let mut body = crate::snapshot::build_head(&meta);
        crate::store::segment::encode_record(&mut body, b"k", &version(8));
        let mut old = SNAPSHOT_FILE_MAGIC.to_vec();
        old.extend_from_slice(&(body.len() as u64).to_le_bytes());
        old.extend_from_slice(&body);
        old.resize(old.len().div_ceil(512) * 512, 0);
        let sum = sha2::Sha256::digest(&old);
        old.extend_from_slice(&sum);
        let p = dir.path().join("old");
        std::fs::write(&p, &old).unwrap();
        let c = read_file(&p, true, true).unwrap();
        assert_eq!(
            (c.form, c.meta.index, c.records.len()),
            ("keelson KLSNBAK1", 9, 1)
        );

        // bbolt with its sha256 after it (etcdctl snapshot save).
        let records = vec![(b"k".to_vec(), version(8))];
        let db = crate::etcd_db::build(&meta, &records).unwrap();
        let mut saved = db.clone();
        saved.extend_from_slice(&sha2::Sha256::digest(&db));
        let p = dir.path().join("saved");
        std::fs::write(&p, &saved).unwrap();
        let c = read_file(&p, true, true).unwrap();
        assert_eq!(
            (c.form, c.meta, c.records),
            ("bbolt, from keelson", meta, records)
        );
        assert!(status(&p).unwrap().contains("revision 8"));
        let mut bad = saved.clone();
        bad[5000] ^= 1;
        std::fs::write(&p, &bad).unwrap();
        assert!(read_file(&p, true, true)
            .unwrap_err()
            .contains("sha256 mismatch"));

        // bbolt alone (a data dir's db): only with the hash check skipped.
        let p = dir.path().join("db");
        std::fs::write(&p, &db).unwrap();
        assert!(read_file(&p, true, true)
            .unwrap_err()
            .contains("missing hash"));
        assert!(read_file(&p, false, false).is_ok());

        // Neither.
        std::fs::write(&p, b"hello").unwrap();
        assert!(read_file(&p, false, false).is_err());
        assert!(read_file(&dir.path().join("none"), false, false).is_err());
    }
}
