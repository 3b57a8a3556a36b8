//! Snapshots as bbolt databases in etcd 3.4's schema: a file keelson's
//! `Maintenance.Snapshot` streams is read by `etcdctl snapshot status`,
//! restored by `etcdctl snapshot restore` into a data dir that Debian's
//! etcd serves, and restored by `keelson snapshot restore`; a file saved
//! from a real etcd 3.4 restores into keelson. Each compares every key's
//! value, revisions, version and lease with what the source served.

mod support;

use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp};
use std::collections::BTreeMap;
use support::{etcdctl, Member};

/// key → (value, create revision, mod revision, version, lease).
type Kvs = BTreeMap<Vec<u8>, (Vec<u8>, i64, i64, i64, i64)>;

/// What `fill` wrote and where.
struct Filled {
    kvs: Kvs,
    /// The revision of the last change.
    last: i64,
    /// The compaction revision (a09's put).
    compacted: i64,
    /// a02's first put, below the compaction.
    below: i64,
    lease: i64,
}

/// A workload with history, a txn of several changes in one revision, a
/// delete, a compaction, a lease and a value larger than a page.
async fn fill(c: &mut Client) -> Filled {
    let mut revs = Vec::new();
    for i in 0..30 {
        let r = c
            .put(format!("a{i:02}"), format!("v{i}"), None)
            .await
            .unwrap();
        revs.push(r.header().unwrap().revision());
    }
    c.put("a00", "again", None).await.unwrap();
    c.txn(Txn::new().and_then(vec![
        TxnOp::put("t1", "x", None),
        TxnOp::put("t2", "y", None),
        TxnOp::delete("a05", None),
    ]))
    .await
    .unwrap();
    c.delete("a03", None).await.unwrap();
    c.compact(revs[9], None).await.unwrap();
    let lease = c.lease_grant(600, None).await.unwrap().id();
    c.put("leased", "x", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    c.put("big", "b".repeat(20_000), None).await.unwrap();
    let last = c
        .put("last", "z", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    Filled {
        kvs: all(c).await,
        last,
        compacted: revs[9],
        below: revs[2],
        lease,
    }
}

async fn all(c: &mut Client) -> Kvs {
    let r = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    r.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key().to_vec(),
                (
                    kv.value().to_vec(),
                    kv.create_revision(),
                    kv.mod_revision(),
                    kv.version(),
                    kv.lease(),
                ),
            )
        })
        .collect()
}

fn message(e: etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
        e => e.to_string(),
    }
}

/// After a restore: the same keys at the same revisions, history after the
/// compaction, the compaction itself, the lease, and writes going on past
/// the last revision.
async fn check_restored(c: &mut Client, f: &Filled) {
    assert_eq!(all(c).await, f.kvs);
    let r = c
        .get("a00", Some(GetOptions::new().with_revision(f.compacted)))
        .await
        .unwrap();
    assert_eq!(r.kvs()[0].value(), b"v0", "history after the compaction");
    let r = c
        .get(
            "a05",
            Some(GetOptions::new().with_revision(f.compacted + 1)),
        )
        .await
        .unwrap();
    assert_eq!(r.kvs()[0].value(), b"v5", "a05 before its delete");
    assert_eq!(
        message(
            c.get("a02", Some(GetOptions::new().with_revision(f.below)))
                .await
                .unwrap_err()
        ),
        "etcdserver: mvcc: required revision has been compacted"
    );
    assert_eq!(
        c.lease_time_to_live(f.lease, None)
            .await
            .unwrap()
            .granted_ttl(),
        600
    );
    let next = c
        .put("new", "1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert!(next > f.last, "{next} after {}", f.last);
}

fn save(ep: &str, dir: &tempfile::TempDir) -> std::path::PathBuf {
    let file = dir.path().join("snap.db");
    let (ok, out, err) = etcdctl(ep, &["snapshot", "save", file.to_str().unwrap()], None);
    assert!(ok, "{out}{err}");
    file
}

/// `etcdctl snapshot restore` of `file` into `into`'s data dir.
fn etcdctl_restore(file: &std::path::Path, into: &Member) {
    let peer = into.peer_url();
    let (ok, out, err) = etcdctl(
        "127.0.0.1:1",
        &[
            "snapshot",
            "restore",
            file.to_str().unwrap(),
            "--data-dir",
            into.data().to_str().unwrap(),
            "--name",
            "default",
            "--initial-cluster",
            &format!("default={peer}"),
            "--initial-advertise-peer-urls",
            &peer,
        ],
        None,
    );
    assert!(ok, "{out}{err}");
}

fn keelson_restore(file: &std::path::Path, into: &Member) -> String {
    let peer = into.peer_url();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keelson"))
        .args([
            "snapshot",
            "restore",
            file.to_str().unwrap(),
            "--data-dir",
            into.data().to_str().unwrap(),
            "--initial-cluster",
            &format!("default={peer}"),
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

#[tokio::test]
async fn etcdctl_snapshot_status_reads_the_file() {
    let (m, mut c) = support::started(&[]).await;
    let f = fill(&mut c).await;
    let dir = tempfile::tempdir().unwrap();
    let file = save(&m.endpoint(), &dir);
    let len = std::fs::metadata(&file).unwrap().len();
    assert_eq!(len % 4096, 32, "whole pages, then the sha256");
    let (ok, out, err) = etcdctl(
        &m.endpoint(),
        &["-w", "json", "snapshot", "status", file.to_str().unwrap()],
        None,
    );
    assert!(ok, "{out}{err}");
    let st: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(st["revision"].as_i64(), Some(f.last), "{out}");
    // Every entry of every bucket: at least one per key and version kept.
    let total = st["totalKey"].as_u64().unwrap();
    assert!(total as usize > f.kvs.len() + 5, "{out}");
    assert!(total < 200, "{out}");
    assert_eq!(st["totalSize"].as_u64(), Some(len - 32), "{out}");
    // keelson's own tool reads the same file.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keelson"))
        .args(["snapshot", "status", file.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    if !support::is_etcd() {
        assert!(
            out.status.success() && text.contains(&format!("revision {}", f.last)),
            "{text}"
        );
    }
}

/// keelson's file through `etcdctl snapshot restore`, served by etcd.
#[tokio::test]
async fn etcd_serves_a_restored_keelson_snapshot() {
    let (m, mut c) = support::started(&[]).await;
    let f = fill(&mut c).await;
    let dir = tempfile::tempdir().unwrap();
    let file = save(&m.endpoint(), &dir);
    drop(c);
    drop(m);
    let mut e = Member::new(&[]).with_etcd();
    etcdctl_restore(&file, &e);
    assert!(e.start().is_none(), "{}", e.log_text());
    let mut c = e.client().await;
    check_restored(&mut c, &f).await;
}

/// keelson's file through `keelson snapshot restore`, served by keelson.
#[tokio::test]
async fn keelson_serves_a_restored_keelson_snapshot() {
    if support::is_etcd() {
        return; // keelson's tool
    }
    let (m, mut c) = support::started(&[]).await;
    let f = fill(&mut c).await;
    let dir = tempfile::tempdir().unwrap();
    let file = save(&m.endpoint(), &dir);
    drop(c);
    drop(m);
    let mut n = Member::new(&[]);
    let text = keelson_restore(&file, &n);
    assert!(text.contains("restored"), "{text}");
    assert!(n.start().is_none(), "{}", n.log_text());
    let mut c = n.client().await;
    check_restored(&mut c, &f).await;
}

/// A file a real etcd 3.4 saved, through `keelson snapshot restore`.
#[tokio::test]
async fn keelson_serves_a_restored_etcd_snapshot() {
    if support::is_etcd() {
        return; // keelson's tool
    }
    let mut e = Member::new(&[]).with_etcd();
    assert!(e.start().is_none(), "{}", e.log_text());
    let mut c = e.client().await;
    let f = fill(&mut c).await;
    let dir = tempfile::tempdir().unwrap();
    let file = save(&e.endpoint(), &dir);
    drop(c);
    drop(e);
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_keelson"))
        .args(["snapshot", "status", file.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.status.success() && text.contains("from etcd"),
        "{text}{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let mut n = Member::new(&[]);
    keelson_restore(&file, &n);
    assert!(n.start().is_none(), "{}", n.log_text());
    let mut c = n.client().await;
    check_restored(&mut c, &f).await;
}

/// Enough versions for branch pages over branch pages in the `key`
/// bucket, and values spanning several pages: etcd's integrity check
/// (bbolt's `tx.Check()`) passes, and etcd serves every key after
/// `etcdctl snapshot restore`.
#[tokio::test]
async fn a_large_snapshot_passes_etcds_integrity_check() {
    let (m, c) = support::started(&[]).await;
    let mut tasks = Vec::new();
    for t in 0..16 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..300 {
                c.put(format!("many/{t:02}/{i:04}"), "v".repeat(100), None)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = c;
    for i in 0..3 {
        c.put(format!("huge{i}"), vec![i as u8; 100_000 + i * 4096], None)
            .await
            .unwrap();
    }
    let want = all(&mut c).await;
    assert_eq!(want.len(), 16 * 300 + 3);
    let dir = tempfile::tempdir().unwrap();
    let file = save(&m.endpoint(), &dir);
    let (ok, out, err) = etcdctl(
        &m.endpoint(),
        &["-w", "json", "snapshot", "status", file.to_str().unwrap()],
        None,
    );
    assert!(ok, "{out}{err}");
    let st: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        st["totalKey"].as_u64().unwrap() as usize >= want.len(),
        "{out}"
    );
    drop(c);
    drop(m);
    let mut e = Member::new(&[]).with_etcd();
    etcdctl_restore(&file, &e);
    assert!(e.start().is_none(), "{}", e.log_text());
    let mut c = e.client().await;
    assert_eq!(all(&mut c).await, want);
}
