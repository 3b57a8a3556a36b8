//! etcd KV semantics through the `etcd-client` crate, against the real
//! binary. Every expectation here was checked against etcd 3.4 with
//! `KEELSON_TEST_SERVER=etcd cargo test --test kv_semantics`.
//!
//! keelson's revisions are Raft indexes (strictly increasing, but they may
//! skip numbers), so no test asserts an absolute revision: only relations.

mod support;

use etcd_client::*;
use support::started;

/// Ranges, deletes, txns and compaction run across shards (a member on
/// this 2-core machine has one shard by default).
const MULTI_SHARD: &[&str] = &["--shards", "3"];

// gRPC status codes.
const INVALID_ARGUMENT: i32 = 3;
const NOT_FOUND: i32 = 5;
const OUT_OF_RANGE: i32 = 11;

fn code_msg(e: Error) -> (i32, String) {
    match e {
        Error::GRpcStatus(s) => (s.code() as i32, s.message().to_string()),
        other => panic!("not a gRPC status: {other:?}"),
    }
}

fn keys(r: &GetResponse) -> Vec<String> {
    r.kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn put_and_get_revisions_and_versions() {
    let (_m, mut c) = started(&[]).await;
    let r1 = c.put("k", "v1", None).await.unwrap();
    let rev1 = r1.header().unwrap().revision();
    assert!(r1.prev_key().is_none());
    let g = c.get("k", None).await.unwrap();
    let kv = &g.kvs()[0];
    assert_eq!((kv.value_str().unwrap(), kv.version()), ("v1", 1));
    assert_eq!((kv.create_revision(), kv.mod_revision()), (rev1, rev1));
    assert_eq!(g.header().unwrap().revision(), rev1);

    let r2 = c
        .put("k", "v2", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    let rev2 = r2.header().unwrap().revision();
    assert!(rev2 > rev1);
    let prev = r2.prev_key().unwrap();
    assert_eq!(
        (
            prev.value_str().unwrap(),
            prev.version(),
            prev.mod_revision()
        ),
        ("v1", 1, rev1)
    );
    let kv = c.get("k", None).await.unwrap().kvs()[0].clone();
    assert_eq!(
        (kv.version(), kv.create_revision(), kv.mod_revision()),
        (2, rev1, rev2)
    );

    // ignore_value keeps the value and bumps the version.
    let r3 = c
        .put("k", "", Some(PutOptions::new().with_ignore_value()))
        .await
        .unwrap();
    let kv = c.get("k", None).await.unwrap().kvs()[0].clone();
    assert_eq!((kv.value_str().unwrap(), kv.version()), ("v2", 3));
    assert_eq!(kv.mod_revision(), r3.header().unwrap().revision());
    // ... and needs the key to exist.
    let e = c
        .put("missing", "", Some(PutOptions::new().with_ignore_value()))
        .await
        .unwrap_err();
    assert_eq!(
        code_msg(e),
        (INVALID_ARGUMENT, "etcdserver: key not found".into())
    );
    // A value with ignore_value is refused.
    let e = c
        .put("k", "x", Some(PutOptions::new().with_ignore_value()))
        .await
        .unwrap_err();
    assert_eq!(
        code_msg(e),
        (INVALID_ARGUMENT, "etcdserver: value is provided".into())
    );

    // Historical read.
    let old = c
        .get("k", Some(GetOptions::new().with_revision(rev1)))
        .await
        .unwrap();
    assert_eq!(old.kvs()[0].value_str().unwrap(), "v1");
    assert!(old.header().unwrap().revision() >= r3.header().unwrap().revision());

    // Delete, then re-create: a new generation.
    let d = c.delete("k", None).await.unwrap();
    assert_eq!(d.deleted(), 1);
    assert!(c.get("k", None).await.unwrap().kvs().is_empty());
    let r4 = c.put("k", "again", None).await.unwrap();
    let kv = c.get("k", None).await.unwrap().kvs()[0].clone();
    assert_eq!(
        (kv.version(), kv.create_revision()),
        (1, r4.header().unwrap().revision())
    );
    // Reading at a revision before the delete still sees the old generation.
    let kv = c
        .get("k", Some(GetOptions::new().with_revision(rev2)))
        .await
        .unwrap()
        .kvs()[0]
        .clone();
    assert_eq!((kv.value_str().unwrap(), kv.version()), ("v2", 2));
}

#[tokio::test]
async fn ranges_limits_sorts_and_filters() {
    let (_m, mut c) = started(MULTI_SHARD).await;
    // Values chosen so every sort target orders differently.
    let data = [("a", "3"), ("b", "1"), ("c", "4"), ("d", "2"), ("e", "0")];
    let mut revs = Vec::new();
    for (k, v) in data {
        revs.push(
            c.put(k, v, None)
                .await
                .unwrap()
                .header()
                .unwrap()
                .revision(),
        );
    }
    // Versions: b twice more, d once more.
    c.put("b", "1", None).await.unwrap();
    c.put("b", "1", None).await.unwrap();
    c.put("d", "2", None).await.unwrap();
    c.put("x/1", "p", None).await.unwrap();
    c.put("x/2", "p", None).await.unwrap();
    c.put("y", "p", None).await.unwrap();

    let all = || GetOptions::new().with_range("f");
    type T = (&'static str, GetOptions, &'static [&'static str], i64, bool);
    let table: Vec<T> = vec![
        (
            "range",
            GetOptions::new().with_range("c"),
            &["a", "b"],
            2,
            false,
        ),
        ("prefix", GetOptions::new().with_prefix(), &[], 0, false),
        ("limit", all().with_limit(2), &["a", "b"], 5, true),
        (
            "limit exact",
            all().with_limit(5),
            &["a", "b", "c", "d", "e"],
            5,
            false,
        ),
        (
            "sort key desc",
            all().with_sort(SortTarget::Key, SortOrder::Descend),
            &["e", "d", "c", "b", "a"],
            5,
            false,
        ),
        (
            "sort value asc",
            all().with_sort(SortTarget::Value, SortOrder::Ascend),
            &["e", "b", "d", "a", "c"],
            5,
            false,
        ),
        (
            "sort value desc",
            all().with_sort(SortTarget::Value, SortOrder::Descend),
            &["c", "a", "d", "b", "e"],
            5,
            false,
        ),
        (
            "sort value asc keys only limit",
            all()
                .with_sort(SortTarget::Value, SortOrder::Ascend)
                .with_keys_only()
                .with_limit(3),
            &["e", "b", "d"],
            5,
            true,
        ),
        (
            "sort value none keys only",
            all()
                .with_sort(SortTarget::Value, SortOrder::None)
                .with_keys_only(),
            &["e", "b", "d", "a", "c"],
            5,
            false,
        ),
        (
            "sort version asc",
            all().with_sort(SortTarget::Version, SortOrder::Ascend),
            &["a", "c", "e", "d", "b"],
            5,
            false,
        ),
        (
            "sort version desc",
            all().with_sort(SortTarget::Version, SortOrder::Descend),
            &["b", "d", "a", "c", "e"],
            5,
            false,
        ),
        (
            "sort create desc",
            all().with_sort(SortTarget::Create, SortOrder::Descend),
            &["e", "d", "c", "b", "a"],
            5,
            false,
        ),
        (
            "sort mod asc",
            all().with_sort(SortTarget::Mod, SortOrder::Ascend),
            &["a", "c", "e", "b", "d"],
            5,
            false,
        ),
        (
            "sort mod desc limit",
            all()
                .with_sort(SortTarget::Mod, SortOrder::Descend)
                .with_limit(2),
            &["d", "b"],
            5,
            true,
        ),
        (
            "sort none target version",
            all().with_sort(SortTarget::Version, SortOrder::None),
            &["a", "c", "e", "d", "b"],
            5,
            false,
        ),
        (
            "from key",
            GetOptions::new().with_from_key(),
            &["x/1", "x/2", "y"],
            3,
            false,
        ),
        (
            "empty range",
            GetOptions::new().with_range("a"),
            &[],
            0,
            false,
        ),
    ];
    for (name, opts, want, count, more) in table {
        let key = match name {
            "prefix" => "zz",
            "from key" => "x",
            "empty range" => "c",
            _ => "a",
        };
        let r = c.get(key, Some(opts)).await.unwrap();
        assert_eq!(keys(&r), want.to_vec(), "{name}");
        if name.contains("keys only") {
            assert!(r.kvs().iter().all(|kv| kv.value().is_empty()), "{name}");
        }
        assert_eq!((r.count(), r.more()), (count, more), "{name}: count, more");
    }
    let r = c
        .get("x/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(&r), vec!["x/1", "x/2"]);

    // keys_only, count_only, serializable.
    let r = c.get("a", Some(all().with_keys_only())).await.unwrap();
    assert!(r.kvs().iter().all(|kv| kv.value().is_empty()));
    assert_eq!(r.kvs().len(), 5);
    let r = c.get("a", Some(all().with_count_only())).await.unwrap();
    assert_eq!((r.kvs().len(), r.count()), (0, 5));
    let r = c.get("a", Some(all().with_serializable())).await.unwrap();
    assert_eq!(r.kvs().len(), 5);

    // min/max mod/create revision filters (count stays the store's count).
    let mid = revs[2];
    let r = c
        .get("a", Some(all().with_min_create_revision(mid)))
        .await
        .unwrap();
    assert_eq!(
        (keys(&r), r.count()),
        (vec!["c".to_string(), "d".into(), "e".into()], 5)
    );
    let r = c
        .get("a", Some(all().with_max_create_revision(mid)))
        .await
        .unwrap();
    assert_eq!(keys(&r), vec!["a", "b", "c"]);
    let r = c
        .get("a", Some(all().with_min_mod_revision(revs[4] + 1)))
        .await
        .unwrap();
    assert_eq!(keys(&r), vec!["b", "d"]);
    let r = c
        .get("a", Some(all().with_max_mod_revision(revs[4])))
        .await
        .unwrap();
    assert_eq!(keys(&r), vec!["a", "c", "e"]);
    // Range over everything.
    let r = c
        .get(
            "",
            Some(GetOptions::new().with_all_keys().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!(r.count(), 8);
}

#[tokio::test]
async fn deletes() {
    let (_m, mut c) = started(MULTI_SHARD).await;
    for k in ["a", "b", "c", "p/1", "p/2", "q"] {
        c.put(k, format!("v-{k}"), None).await.unwrap();
    }
    let d = c.delete("nothing", None).await.unwrap();
    assert_eq!(d.deleted(), 0);
    let d = c
        .delete(
            "a",
            Some(DeleteOptions::new().with_range("c").with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!(d.deleted(), 2);
    let prev: Vec<_> = d
        .prev_kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap(), kv.value_str().unwrap()))
        .collect();
    assert_eq!(prev, vec![("a", "v-a"), ("b", "v-b")]);
    let d = c
        .delete("p/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!((d.deleted(), d.prev_kvs().len()), (2, 0));
    let d = c
        .delete("c", Some(DeleteOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(d.deleted(), 2);
    assert_eq!(
        c.get(
            "",
            Some(GetOptions::new().with_all_keys().with_count_only())
        )
        .await
        .unwrap()
        .count(),
        0
    );
}

#[tokio::test]
async fn txns() {
    let (_m, mut c) = started(MULTI_SHARD).await;
    let r = c.put("k", "m", None).await.unwrap();
    let rev = r.header().unwrap().revision();
    c.put("r/1", "1", None).await.unwrap();
    c.put("r/2", "2", None).await.unwrap();
    use CompareOp::*;
    // (compare, expected outcome)
    let table: Vec<(Compare, bool)> = vec![
        (Compare::version("k", Equal, 1), true),
        (Compare::version("k", NotEqual, 1), false),
        (Compare::version("k", Greater, 0), true),
        (Compare::version("k", Less, 1), false),
        (Compare::create_revision("k", Equal, rev), true),
        (Compare::create_revision("k", Less, rev), false),
        (Compare::mod_revision("k", Greater, rev - 1), true),
        (Compare::mod_revision("k", NotEqual, rev), false),
        (Compare::value("k", Equal, "m"), true),
        (Compare::value("k", Greater, "a"), true),
        (Compare::value("k", Less, "a"), false),
        (Compare::value("k", NotEqual, "m"), false),
        (Compare::lease("k", Equal, 0), true),
        // A missing key: version/create/mod compare as 0, value always fails.
        (Compare::version("nope", Equal, 0), true),
        (Compare::create_revision("nope", Equal, 0), true),
        (Compare::value("nope", NotEqual, "x"), false),
        (Compare::value("nope", Equal, ""), false),
        // Over a range: every key must pass.
        (Compare::version("r/", Equal, 1).with_prefix(), true),
        (Compare::value("r/1", Equal, "1").with_range("r/3"), false),
        (Compare::value("r/", Greater, "0").with_prefix(), true),
        (Compare::version("s/", Equal, 0).with_prefix(), true),
    ];
    for (cmp, want) in table {
        let desc = format!("{cmp:?}");
        let t = Txn::new()
            .when(vec![cmp])
            .and_then(vec![TxnOp::get("k", None)])
            .or_else(vec![TxnOp::get("r/1", None)]);
        let r = c.txn(t).await.unwrap();
        assert_eq!(r.succeeded(), want, "{desc}");
        match &r.op_responses()[0] {
            TxnOpResponse::Get(g) => assert_eq!(
                g.kvs()[0].key_str().unwrap(),
                if want { "k" } else { "r/1" }
            ),
            other => panic!("{other:?}"),
        }
    }

    // Branches with every op kind, reads seeing the txn's own writes, and
    // a nested txn whose compare sees the state before the outer txn.
    let t = Txn::new()
        .when(vec![Compare::value("k", Equal, "m")])
        .and_then(vec![
            TxnOp::put("n", "new", Some(PutOptions::new().with_prev_key())),
            TxnOp::get("n", None),
            TxnOp::delete("r/", Some(DeleteOptions::new().with_prefix())),
            TxnOp::txn(
                Txn::new()
                    .when(vec![Compare::version("n", Equal, 0)])
                    .and_then(vec![TxnOp::put("nested", "then", None)])
                    .or_else(vec![TxnOp::put("nested", "else", None)]),
            ),
        ])
        .or_else(vec![TxnOp::put("fail", "x", None)]);
    let r = c.txn(t).await.unwrap();
    assert!(r.succeeded());
    let txn_rev = r.header().unwrap().revision();
    let ops = r.op_responses();
    assert_eq!(ops.len(), 4);
    match &ops[1] {
        TxnOpResponse::Get(g) => assert_eq!(g.kvs()[0].value_str().unwrap(), "new"),
        other => panic!("{other:?}"),
    }
    match &ops[2] {
        TxnOpResponse::Delete(d) => assert_eq!(d.deleted(), 2),
        other => panic!("{other:?}"),
    }
    match &ops[3] {
        TxnOpResponse::Txn(t) => {
            assert!(t.succeeded(), "nested compare sees the pre-txn state");
            // etcd gives a nested txn's response an empty header.
            assert_eq!(t.header().map(|h| h.revision()), Some(0));
        }
        other => panic!("{other:?}"),
    }
    let nested = c.get("nested", None).await.unwrap();
    assert_eq!(nested.kvs()[0].value_str().unwrap(), "then");
    // Everything a txn writes carries the same revision.
    assert_eq!(nested.kvs()[0].mod_revision(), txn_rev);
    assert_eq!(
        c.get("n", None).await.unwrap().kvs()[0].mod_revision(),
        txn_rev
    );
    assert!(c.get("fail", None).await.unwrap().kvs().is_empty());

    // The failure branch.
    let r = c
        .txn(
            Txn::new()
                .when(vec![Compare::value("k", Equal, "zzz")])
                .or_else(vec![TxnOp::put("fail", "x", None)]),
        )
        .await
        .unwrap();
    assert!(!r.succeeded());
    assert_eq!(c.get("fail", None).await.unwrap().kvs().len(), 1);

    // A txn that changes nothing does not move the revision.
    let before = c.get("k", None).await.unwrap().header().unwrap().revision();
    let r = c
        .txn(Txn::new().and_then(vec![TxnOp::get("k", None)]))
        .await
        .unwrap();
    assert_eq!(r.header().unwrap().revision(), before);
    match &r.op_responses()[0] {
        TxnOpResponse::Get(g) => assert_eq!(g.header().unwrap().revision(), before),
        other => panic!("{other:?}"),
    }

    // Each op's header: reads (and a delete of nothing) before the txn's
    // first change report the revision before the txn; the put and
    // everything after it, the txn's revision.
    let r = c
        .txn(Txn::new().and_then(vec![
            TxnOp::get("k", None),
            TxnOp::delete("no-such-key", None),
            TxnOp::put("h", "1", None),
            TxnOp::get("k", None),
            TxnOp::delete("n", None),
        ]))
        .await
        .unwrap();
    let txn_rev = r.header().unwrap().revision();
    assert!(txn_rev > before);
    let revs: Vec<i64> = r
        .op_responses()
        .iter()
        .map(|op| match op {
            TxnOpResponse::Get(g) => g.header().unwrap().revision(),
            TxnOpResponse::Delete(d) => d.header().unwrap().revision(),
            TxnOpResponse::Put(p) => p.header().unwrap().revision(),
            TxnOpResponse::Txn(t) => t.header().unwrap().revision(),
        })
        .collect();
    assert_eq!(revs, vec![before, before, txn_rev, txn_rev, txn_rev]);
}

#[tokio::test]
async fn compaction() {
    let (_m, mut c) = started(MULTI_SHARD).await;
    let r1 = c
        .put("c", "1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let r2 = c
        .put("c", "2", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let r3 = c
        .put("c", "3", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.compact(r2, None).await.unwrap();
    let e = c
        .get("c", Some(GetOptions::new().with_revision(r1)))
        .await
        .unwrap_err();
    assert_eq!(
        code_msg(e),
        (
            OUT_OF_RANGE,
            "etcdserver: mvcc: required revision has been compacted".into()
        )
    );
    // The compaction revision itself stays readable.
    let kv = c
        .get("c", Some(GetOptions::new().with_revision(r2)))
        .await
        .unwrap()
        .kvs()[0]
        .clone();
    assert_eq!(kv.value_str().unwrap(), "2");
    let e = c
        .get("c", Some(GetOptions::new().with_revision(r3 + 1000)))
        .await
        .unwrap_err();
    assert_eq!(
        code_msg(e),
        (
            OUT_OF_RANGE,
            "etcdserver: mvcc: required revision is a future revision".into()
        )
    );
    // Compacting again at or below, or into the future, fails as in etcd.
    let e = c.compact(r2, None).await.unwrap_err();
    assert_eq!(
        code_msg(e),
        (
            OUT_OF_RANGE,
            "etcdserver: mvcc: required revision has been compacted".into()
        )
    );
    let e = c.compact(r3 + 1000, None).await.unwrap_err();
    assert_eq!(
        code_msg(e),
        (
            OUT_OF_RANGE,
            "etcdserver: mvcc: required revision is a future revision".into()
        )
    );
    // A txn reading at a compacted revision fails whole.
    let e = c
        .txn(Txn::new().and_then(vec![
            TxnOp::put("t", "x", None),
            TxnOp::get("c", Some(GetOptions::new().with_revision(r1))),
        ]))
        .await
        .unwrap_err();
    assert_eq!(
        code_msg(e).1,
        "etcdserver: mvcc: required revision has been compacted"
    );
    assert!(c.get("t", None).await.unwrap().kvs().is_empty());
}

#[tokio::test]
async fn errors_as_etcd_sends_them() {
    let (_m, mut c) = started(&[]).await;
    let inv = INVALID_ARGUMENT;
    let e = c.put("", "v", None).await.unwrap_err();
    assert_eq!(code_msg(e), (inv, "etcdserver: key is not provided".into()));
    let e = c.get("", None).await.unwrap_err();
    assert_eq!(code_msg(e), (inv, "etcdserver: key is not provided".into()));
    let e = c.delete("", None).await.unwrap_err();
    assert_eq!(code_msg(e), (inv, "etcdserver: key is not provided".into()));
    let e = c
        .put("k", "v", Some(PutOptions::new().with_lease(12345)))
        .await
        .unwrap_err();
    assert_eq!(
        code_msg(e),
        (NOT_FOUND, "etcdserver: requested lease not found".into())
    );
    // 1.5 MiB is the default --max-request-bytes.
    let e = c.put("big", vec![b'x'; 1_600_000], None).await.unwrap_err();
    assert_eq!(
        code_msg(e),
        (inv, "etcdserver: request is too large".into())
    );
    c.put("fits", vec![b'x'; 1_000_000], None).await.unwrap();
    let ops: Vec<TxnOp> = (0..129)
        .map(|i| TxnOp::put(format!("k{i}"), "v", None))
        .collect();
    let e = c.txn(Txn::new().and_then(ops)).await.unwrap_err();
    assert_eq!(
        code_msg(e),
        (inv, "etcdserver: too many operations in txn request".into())
    );
    let ops: Vec<TxnOp> = (0..128)
        .map(|i| TxnOp::put(format!("k{i}"), "v", None))
        .collect();
    c.txn(Txn::new().and_then(ops)).await.unwrap();
    let e = c
        .txn(Txn::new().and_then(vec![TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)]))
        .await
        .unwrap_err();
    assert_eq!(
        code_msg(e),
        (inv, "etcdserver: duplicate key given in txn request".into())
    );
    let e = c
        .txn(Txn::new().and_then(vec![
            TxnOp::delete("a", Some(DeleteOptions::new().with_range("z"))),
            TxnOp::put("m", "1", None),
        ]))
        .await
        .unwrap_err();
    assert_eq!(
        code_msg(e),
        (inv, "etcdserver: duplicate key given in txn request".into())
    );
}

#[tokio::test]
async fn maintenance_and_cluster_headers() {
    let (m, mut c) = started(&[]).await;
    let put = c.put("h", "v", None).await.unwrap();
    let h = put.header().unwrap().clone();
    assert!(h.cluster_id() != 0 && h.member_id() != 0);
    // A new member starts at term 1 and its first election makes term 2,
    // as etcd's bootstrap does.
    assert_eq!(h.raft_term(), 2);
    // etcd derives the cluster ID from the member IDs: never equal to the
    // lone member's.
    assert_ne!(h.cluster_id(), h.member_id());
    let st = c.status().await.unwrap();
    assert_eq!(st.leader(), h.member_id());
    assert_eq!(st.header().unwrap().member_id(), h.member_id());
    assert!(st.raft_index() >= st.raft_applied_index() || st.raft_applied_index() > 0);
    assert!(st.header().unwrap().revision() >= h.revision());
    let ml = c.member_list().await.unwrap();
    assert_eq!(ml.members().len(), 1);
    assert_eq!(ml.members()[0].id(), h.member_id());
    assert_eq!(
        ml.members()[0].client_urls(),
        [format!("http://{}", m.endpoint())]
    );
    assert_eq!(ml.header().unwrap().cluster_id(), h.cluster_id());
    // etcd's Cluster service leaves the header's revision out.
    assert_eq!(ml.header().unwrap().revision(), 0);
    // Removing the only member: etcd 3.4 answers with code Unknown (2).
    match c.member_remove(h.member_id()).await.unwrap_err() {
        etcd_client::Error::GRpcStatus(s) => assert_eq!(
            (s.code() as i32, s.message()),
            (
                2,
                "etcdserver: re-configuration failed due to not enough started members"
            )
        ),
        e => panic!("{e}"),
    }
}

#[tokio::test]
async fn oracle_is_the_server_we_think() {
    let (m, mut c) = started(&[]).await;
    let st = c.status().await.unwrap();
    if support::is_etcd() {
        assert!(st.version().starts_with("3.4"), "{}", st.version());
        assert!(m.log_text().contains("etcd"), "{}", m.log_text());
    } else {
        assert_eq!(st.version(), keelson::ETCD_VERSION);
    }
}

/// `--max-txn-ops` sets the txn limit (etcd's error past it);
/// `--log-outputs stdout` is taken.
#[tokio::test]
async fn max_txn_ops_flag() {
    let (_m, mut c) = started(&["--max-txn-ops", "3", "--log-outputs", "stdout"]).await;
    let puts = |n: usize| {
        Txn::new().and_then(
            (0..n)
                .map(|i| TxnOp::put(format!("t{i}"), "v", None))
                .collect::<Vec<_>>(),
        )
    };
    c.txn(puts(3)).await.unwrap();
    match c.txn(puts(4)).await.unwrap_err() {
        Error::GRpcStatus(s) => {
            assert_eq!(s.code() as i32, 3, "InvalidArgument");
            assert_eq!(
                s.message(),
                "etcdserver: too many operations in txn request"
            );
        }
        e => panic!("{e}"),
    }
}

/// `--log-outputs FILE` sends the log lines to that file (appended).
#[test]
fn log_outputs_flag_writes_the_log_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("member.log");
    let (port, peer) = (support::free_port(), support::free_port());
    let c = format!("http://127.0.0.1:{port}");
    let p = format!("http://127.0.0.1:{peer}");
    let bin = if support::is_etcd() {
        "etcd"
    } else {
        env!("CARGO_BIN_EXE_keelson")
    };
    let mut child = std::process::Command::new(bin)
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args([
            "--listen-peer-urls",
            &p,
            "--initial-advertise-peer-urls",
            &p,
        ])
        .args(["--initial-cluster", &format!("default={p}")])
        .args(["--logger", "zap", "--log-outputs", log.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Up once its client port takes connections; its log is in the file
    // by then (keelson: the "ready to serve" line; etcd: its start lines).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let up = loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break true;
        }
        if std::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(up, "server did not start:\n{text}");
    let expect = if support::is_etcd() {
        "starting an etcd server"
    } else {
        "ready to serve"
    };
    assert!(
        text.contains(expect),
        "no {expect:?} in {}:\n{text}",
        log.display()
    );
}

/// `--grpc-keepalive-interval` and `--grpc-keepalive-timeout`: the server
/// pings a gRPC connection every interval, keeps one that answers, and
/// closes one that does not answer within the timeout (grpc-go's server
/// keepalive, which etcd turns on with these flags).
#[tokio::test]
async fn grpc_keepalive_pings_and_closes_a_connection_that_does_not_answer() {
    use std::io::{ErrorKind, Read, Write};
    use std::time::{Duration, Instant};
    let (m, _c) = started(&[
        "--grpc-keepalive-interval=1s",
        "--grpc-keepalive-timeout=1s",
    ])
    .await;
    let addr = m.endpoint().trim_start_matches("http://").to_string();
    // A bare HTTP/2 client: preface and SETTINGS, then it only reads,
    // acknowledges the server's SETTINGS and, if `answer`, its PINGs.
    // Returns (pings seen, whether the server closed) within `window`.
    let run = move |answer: bool, window: Duration| -> (usize, bool) {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .unwrap();
        let start = Instant::now();
        let (mut pings, mut buf) = (0, Vec::new());
        loop {
            let Some(left) = window.checked_sub(start.elapsed()) else {
                return (pings, false);
            };
            s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk) {
                Ok(0) => return (pings, true),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return (pings, false)
                }
                Err(_) => return (pings, true),
            }
            while buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() < 9 + len {
                    break;
                }
                let (ty, flags) = (buf[3], buf[4]);
                let payload = buf[9..9 + len].to_vec();
                buf.drain(..9 + len);
                if ty == 4 && flags & 1 == 0 {
                    s.write_all(b"\0\0\0\x04\x01\0\0\0\0").unwrap();
                }
                if ty == 6 && flags & 1 == 0 {
                    pings += 1;
                    if answer {
                        let mut ack = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                        ack.extend_from_slice(&payload);
                        s.write_all(&ack).unwrap();
                    }
                }
            }
        }
    };
    let (kept, gone) = tokio::task::spawn_blocking(move || {
        (
            run(true, Duration::from_millis(4500)),
            run(false, Duration::from_secs(8)),
        )
    })
    .await
    .unwrap();
    assert!(kept.0 >= 2 && !kept.1, "answering client: {kept:?}");
    assert!(gone.0 >= 1 && gone.1, "silent client: {gone:?}");
}

/// Header blocks a connection sends again byte for byte are answered from
/// the HPACK decoder's last block (a keelson patch to h2), but only while
/// the dynamic table they refer to is unchanged: the same bytes after an
/// insert, or after a table size update, mean what they mean then. A bare
/// HTTP/2 client sends one block, `again`, whose `:path` is dynamic index
/// 62 (the newest entry): first Put's path, then Range's, then an emptied
/// table. Each request's body is a PutRequest for `hk`, which a Range reads
/// as a range `[hk, vN)`; only real Puts may change `hk`.
#[tokio::test]
async fn a_repeated_header_block_means_what_the_current_table_says() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let (_m, mut c) = started(&[]).await;
    let addr = _m.endpoint().trim_start_matches("http://").to_string();

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    fn put_body(value: &str) -> Vec<u8> {
        let mut msg = vec![0x0a, 2, b'h', b'k', 0x12, value.len() as u8];
        msg.extend_from_slice(value.as_bytes());
        let mut body = vec![0];
        body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        body.extend_from_slice(&msg);
        body
    }
    // content-type: application/grpc, a literal without indexing (static
    // name 31), so it changes no table.
    let content_type: Vec<u8> = [&[0x0f, 0x10, 0x10][..], b"application/grpc"].concat();
    // :method POST, :scheme http, then :path.
    let head = |path: &[u8]| -> Vec<u8> { [&[0x83, 0x86][..], path, &content_type].concat() };
    // The blocks that change the table are made too long to be kept, so
    // that the block kept when they arrive is `again`: a literal without
    // indexing, `x-pad`, of 64 bytes.
    let padded = |block: Vec<u8>| -> Vec<u8> {
        [&block[..], &[0x00, 5], b"x-pad", &[64], &[b'a'; 64]].concat()
    };
    // :path as a literal with incremental indexing (static name 4).
    let indexed_path = |p: &str| -> Vec<u8> { [&[0x44, p.len() as u8][..], p.as_bytes()].concat() };
    let again = head(&[0x80 | 62]);

    let (mut answered, mut reset, mut goaway) = (Vec::new(), Vec::new(), false);
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    let mut buf = Vec::new();
    // Sends one request and reads until its stream ends, is reset, or the
    // connection goes away.
    let mut call = |stream: u32, block: &[u8], body: Vec<u8>| {
        s.write_all(&frame(1, 0x4, stream, block)).unwrap();
        s.write_all(&frame(0, 0x1, stream, &body)).unwrap();
        let start = Instant::now();
        loop {
            while buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() < 9 + len {
                    break;
                }
                let (ty, flags) = (buf[3], buf[4]);
                let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
                buf.drain(..9 + len);
                match ty {
                    4 if flags & 1 == 0 => s.write_all(&frame(4, 1, 0, &[])).unwrap(),
                    1 if flags & 1 == 1 && id == stream => {
                        answered.push(stream);
                        return;
                    }
                    3 if id == stream => {
                        reset.push(stream);
                        return;
                    }
                    7 => {
                        goaway = true;
                        return;
                    }
                    _ => {}
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no answer on stream {stream}"
            );
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => {
                    goaway = true;
                    return;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    call(
        1,
        &padded(head(&indexed_path("/etcdserverpb.KV/Put"))),
        put_body("v1"),
    );
    call(3, &again, put_body("v2")); // decoded, then kept
    call(5, &again, put_body("v3")); // answered from the kept block: a Put
    call(
        7,
        &padded(head(&indexed_path("/etcdserverpb.KV/Range"))),
        put_body("r"),
    );
    call(9, &again, put_body("v4")); // index 62 is Range's path now
    call(11, &again, put_body("v5")); // and still is
                                      // A size update to 0 empties the table: index 62 is gone.
    call(
        13,
        &padded([&[0x20][..], &head(&[0x84])].concat()),
        put_body("x"),
    );
    call(15, &again, put_body("v6"));
    assert_eq!(answered, vec![1, 3, 5, 7, 9, 11, 13], "reset: {reset:?}");
    assert!(
        goaway,
        "a block naming an index past the emptied table must end the connection"
    );
    let g = c.get("hk", None).await.unwrap();
    let kv = &g.kvs()[0];
    assert_eq!((kv.value_str().unwrap(), kv.version()), ("v3", 3));
}
