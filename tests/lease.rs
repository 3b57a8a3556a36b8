//! Leases through the `etcd-client` crate and etcdctl, against the real
//! binary: grant (chosen and server-picked IDs, minimum TTL, too large),
//! attach, time-to-live with keys, keep-alive stream, list, revoke (all
//! attached keys go at one revision), expiry, LEASE compares, ignore_lease,
//! and leases surviving a restart. Checked against etcd 3.4 with
//! `KEELSON_TEST_SERVER=etcd cargo test --test lease`.

mod support;

use etcd_client::*;
use std::time::{Duration, Instant};
use support::{etcdctl, started, Member};

const NOT_FOUND: i32 = 5;
const FAILED_PRECONDITION: i32 = 9;
const OUT_OF_RANGE: i32 = 11;

fn code_msg(e: Error) -> (i32, String) {
    match e {
        Error::GRpcStatus(s) => (s.code() as i32, s.message().to_string()),
        other => panic!("not a gRPC status: {other:?}"),
    }
}

#[tokio::test]
async fn grant_ttl_list_revoke() {
    let (_m, mut c) = started(&[]).await;
    let g = c.lease_grant(60, None).await.unwrap();
    assert!(g.id() > 0);
    assert_eq!(g.ttl(), 60);

    // A chosen ID, then the same one again.
    let g2 = c
        .lease_grant(30, Some(LeaseGrantOptions::new().with_id(7777)))
        .await
        .unwrap();
    assert_eq!((g2.id(), g2.ttl()), (7777, 30));
    let e = c
        .lease_grant(30, Some(LeaseGrantOptions::new().with_id(7777)))
        .await
        .unwrap_err();
    assert_eq!(
        code_msg(e),
        (
            FAILED_PRECONDITION,
            "etcdserver: lease already exists".into()
        )
    );

    // Below the minimum TTL (1.5 election timeouts, 2s by default).
    let g3 = c.lease_grant(1, None).await.unwrap();
    assert_eq!(g3.ttl(), 2);
    let e = c.lease_grant(9_000_000_001, None).await.unwrap_err();
    assert_eq!(
        code_msg(e),
        (OUT_OF_RANGE, "etcdserver: too large lease TTL".into())
    );

    let mut ids: Vec<i64> = c
        .leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|l| l.id())
        .collect();
    ids.sort();
    let mut want = vec![g.id(), 7777, g3.id()];
    want.sort();
    assert_eq!(ids, want);

    c.put("a", "1", Some(PutOptions::new().with_lease(7777)))
        .await
        .unwrap();
    c.put("b", "2", Some(PutOptions::new().with_lease(7777)))
        .await
        .unwrap();
    c.put("c", "3", Some(PutOptions::new().with_lease(g.id())))
        .await
        .unwrap();
    let kv = c.get("a", None).await.unwrap().kvs()[0].clone();
    assert_eq!(kv.lease(), 7777);

    let t = c
        .lease_time_to_live(7777, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(t.granted_ttl(), 30);
    assert!((28..=30).contains(&t.ttl()), "remaining {}", t.ttl());
    let mut keys: Vec<Vec<u8>> = t.keys().to_vec();
    keys.sort();
    assert_eq!(keys, vec![b"a".to_vec(), b"b".to_vec()]);

    // Moving a key to another lease detaches it from the first.
    c.put("b", "2", Some(PutOptions::new().with_lease(g.id())))
        .await
        .unwrap();
    let t = c
        .lease_time_to_live(7777, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(t.keys().to_vec(), vec![b"a".to_vec()]);

    // Revoke deletes every attached key at one revision.
    let before = c.get("c", None).await.unwrap().header().unwrap().revision();
    let r = c.lease_revoke(g.id()).await.unwrap();
    let rev = r.header().unwrap().revision();
    assert!(rev > before);
    assert_eq!(c.get("b", None).await.unwrap().count(), 0);
    assert_eq!(c.get("c", None).await.unwrap().count(), 0);
    assert_eq!(c.get("a", None).await.unwrap().count(), 1);
    // Both deletes happened at `rev`: reading just before it sees both keys.
    let old = c
        .get("b", Some(GetOptions::new().with_revision(rev - 1)))
        .await
        .unwrap();
    assert_eq!(old.count(), 1);
    let old = c
        .get("c", Some(GetOptions::new().with_revision(rev - 1)))
        .await
        .unwrap();
    assert_eq!(old.count(), 1);

    let e = c.lease_revoke(g.id()).await.unwrap_err();
    assert_eq!(
        code_msg(e),
        (NOT_FOUND, "etcdserver: requested lease not found".into())
    );
    // An unknown lease has TTL -1 (no error).
    let t = c.lease_time_to_live(g.id(), None).await.unwrap();
    assert_eq!((t.id(), t.ttl()), (g.id(), -1));
    // Put with a revoked lease fails.
    let e = c
        .put("d", "4", Some(PutOptions::new().with_lease(g.id())))
        .await
        .unwrap_err();
    assert_eq!(
        code_msg(e),
        (NOT_FOUND, "etcdserver: requested lease not found".into())
    );
}

#[tokio::test]
async fn keep_alive_stream_and_expiry() {
    let (_m, mut c) = started(&[]).await;
    let kept = c.lease_grant(2, None).await.unwrap().id();
    let dropped = c.lease_grant(2, None).await.unwrap().id();
    c.put("kept", "v", Some(PutOptions::new().with_lease(kept)))
        .await
        .unwrap();
    c.put("dropped", "v", Some(PutOptions::new().with_lease(dropped)))
        .await
        .unwrap();

    let (mut keeper, mut responses) = c.lease_keep_alive(kept).await.unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        keeper.keep_alive().await.unwrap();
        let r = responses.message().await.unwrap().unwrap();
        assert_eq!((r.id(), r.ttl()), (kept, 2));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // `dropped` expired (and its key went with it); `kept` did not.
    assert_eq!(c.get("dropped", None).await.unwrap().count(), 0);
    assert_eq!(c.get("kept", None).await.unwrap().count(), 1);
    let t = c.lease_time_to_live(dropped, None).await.unwrap();
    assert_eq!(t.ttl(), -1);

    // A keep-alive for a lease that does not exist answers TTL 0, which
    // the client reports as "lease not found".
    match c.lease_keep_alive(dropped).await {
        Err(Error::LeaseKeepAliveError(m)) => assert_eq!(m, "lease not found"),
        other => panic!("keep-alive of an expired lease: {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn lease_in_txn_compares_and_ignore_lease() {
    let (_m, mut c) = started(&[]).await;
    let l = c.lease_grant(100, None).await.unwrap().id();
    c.put("k", "v", Some(PutOptions::new().with_lease(l)))
        .await
        .unwrap();

    let t = c
        .txn(
            Txn::new()
                .when([Compare::lease("k", CompareOp::Equal, l)])
                .and_then([TxnOp::put(
                    "k",
                    "v2",
                    Some(PutOptions::new().with_ignore_lease()),
                )]),
        )
        .await
        .unwrap();
    assert!(t.succeeded());
    // ignore_lease keeps the key's lease.
    assert_eq!(c.get("k", None).await.unwrap().kvs()[0].lease(), l);

    // A txn whose taken branch puts with an unknown lease fails whole...
    let e = c
        .txn(Txn::new().and_then([
            TxnOp::put("x", "1", None),
            TxnOp::put("y", "1", Some(PutOptions::new().with_lease(424242))),
        ]))
        .await
        .unwrap_err();
    assert_eq!(
        code_msg(e),
        (NOT_FOUND, "etcdserver: requested lease not found".into())
    );
    assert_eq!(c.get("x", None).await.unwrap().count(), 0);
    // ...but not when the bad put is on the branch not taken.
    let t = c
        .txn(
            Txn::new()
                .when([Compare::lease("k", CompareOp::NotEqual, l)])
                .and_then([TxnOp::put(
                    "y",
                    "1",
                    Some(PutOptions::new().with_lease(424242)),
                )])
                .or_else([TxnOp::put("x", "1", None)]),
        )
        .await
        .unwrap();
    assert!(!t.succeeded());
    assert_eq!(c.get("x", None).await.unwrap().count(), 1);

    // Deleting a key detaches it.
    c.delete("k", None).await.unwrap();
    let t = c
        .lease_time_to_live(l, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert!(t.keys().is_empty());
}

#[tokio::test]
async fn leases_and_attachments_survive_restart() {
    // Frequent checkpoints so the lease table is recovered from a shard
    // checkpoint as well as from the WAL.
    let args: &[&str] = if support::is_etcd() {
        &["--snapshot-count", "5"]
    } else {
        &["--snapshot-count", "5", "--shards", "4"]
    };
    let mut m = Member::new(args);
    assert!(m.start().is_none(), "{}", m.log_text());
    let mut c = m.client().await;
    let mut leases = Vec::new();
    for i in 0..4 {
        let id = c.lease_grant(300, None).await.unwrap().id();
        for j in 0..5 {
            c.put(
                format!("l{i}-{j}"),
                "v",
                Some(PutOptions::new().with_lease(id)),
            )
            .await
            .unwrap();
        }
        leases.push(id);
    }
    c.lease_revoke(leases[0]).await.unwrap();
    m.kill9();
    assert!(m.start().is_none(), "{}", m.log_text());
    let mut c = m.client().await;
    let mut ids: Vec<i64> = c
        .leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|l| l.id())
        .collect();
    ids.sort();
    let mut want = leases[1..].to_vec();
    want.sort();
    assert_eq!(ids, want, "{}", m.log_text());
    for (i, &id) in leases.iter().enumerate().skip(1) {
        let t = c
            .lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await
            .unwrap();
        assert_eq!(t.granted_ttl(), 300);
        assert_eq!(t.keys().len(), 5, "lease {i}");
    }
    assert_eq!(
        c.get("l0-", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap()
            .count(),
        0
    );
    // Revoking after the restart still finds the keys on every shard.
    c.lease_revoke(leases[1]).await.unwrap();
    assert_eq!(
        c.get("l1-", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        c.get("l2-", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap()
            .count(),
        5
    );
}

#[test]
fn etcdctl_lease_commands() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (m, _c) = rt.block_on(started(&[]));
    let ep = m.endpoint();
    let run = |args: &[&str]| {
        let (ok, out, err) = etcdctl(&ep, args, None);
        assert!(ok, "{args:?}: {err}");
        out
    };
    assert_eq!(
        run(&["lease", "grant", "100"]).split_whitespace().nth(4),
        Some("TTL(100s)")
    );
    let out = run(&["lease", "grant", "50"]);
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(out, format!("lease {id} granted with TTL(50s)\n"));
    assert_eq!(run(&["put", "k1", "v", "--lease", &id]), "OK\n");
    let ttl = run(&["lease", "timetolive", &id, "--keys"]);
    assert!(
        ttl.starts_with(&format!("lease {id} granted with TTL(50s), remaining(")),
        "{ttl}"
    );
    assert!(ttl.ends_with("attached keys([k1])\n"), "{ttl}");
    assert_eq!(
        run(&["lease", "keep-alive", "--once", &id]),
        format!("lease {id} keepalived with TTL(50)\n")
    );
    let list = run(&["lease", "list"]);
    assert!(
        list.starts_with("found 2 leases\n") && list.contains(&id),
        "{list}"
    );
    assert_eq!(
        run(&["lease", "revoke", &id]),
        format!("lease {id} revoked\n")
    );
    assert_eq!(run(&["get", "k1"]), "");
    assert_eq!(
        run(&["lease", "timetolive", &id]),
        format!("lease {id} already expired\n")
    );
    let (ok, _, err) = etcdctl(&ep, &["lease", "revoke", &id], None);
    assert!(
        !ok && err.contains("etcdserver: requested lease not found"),
        "{err}"
    );
}
