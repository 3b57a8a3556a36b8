//! Watch through the `etcd-client` crate and etcdctl, against the real
//! binary: create/cancel, prefixes, prev_kv, filters, history replay from a
//! start revision, compaction, chosen and duplicate watch IDs, progress
//! requests, fragments, lease revokes, txns across shards delivered whole
//! and in op order, and a slow reader catching up from history. Revisions
//! are taken from response headers (keelson's skip numbers), so every test
//! also runs against etcd 3.4: `KEELSON_TEST_SERVER=etcd cargo test --test
//! watch`.

mod support;

use etcd_client::*;
use std::time::Duration;
use support::{is_etcd, started};

/// The next response, or a panic after 10 s.
async fn next(s: &mut WatchStream) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("a watch response within 10 s")
        .expect("stream ok")
        .expect("stream open")
}

/// Reads until `n` events have arrived; returns (response index, event)
/// pairs as (type, key, value, mod_revision, prev value).
async fn events(s: &mut WatchStream, n: usize) -> Vec<(usize, Ev)> {
    let mut out = Vec::new();
    let mut i = 0;
    while out.len() < n {
        let r = next(s).await;
        for e in r.events() {
            out.push((i, ev(e)));
        }
        i += 1;
    }
    assert_eq!(out.len(), n, "more events than expected: {out:?}");
    out
}

#[derive(Debug, Clone, PartialEq)]
struct Ev {
    put: bool,
    key: String,
    value: String,
    rev: i64,
    prev: Option<String>,
}

fn ev(e: &Event) -> Ev {
    let kv = e.kv().unwrap();
    Ev {
        put: e.event_type() == EventType::Put,
        key: kv.key_str().unwrap().to_string(),
        value: kv.value_str().unwrap().to_string(),
        rev: kv.mod_revision(),
        prev: e.prev_kv().map(|p| p.value_str().unwrap().to_string()),
    }
}

fn put(key: &str, value: &str, rev: i64, prev: Option<&str>) -> Ev {
    Ev {
        put: true,
        key: key.into(),
        value: value.into(),
        rev,
        prev: prev.map(|s| s.to_string()),
    }
}

fn del(key: &str, rev: i64, prev: Option<&str>) -> Ev {
    Ev {
        put: false,
        key: key.into(),
        value: String::new(),
        rev,
        prev: prev.map(|s| s.to_string()),
    }
}

async fn rev_of_put(c: &mut Client, k: &str, v: &str) -> i64 {
    c.put(k, v, None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

#[tokio::test]
async fn create_events_cancel() {
    let (_m, mut c) = started(&[]).await;
    let r0 = rev_of_put(&mut c, "other", "x").await;
    let mut s = c.watch("a", None).await.unwrap();
    let created = next(&mut s).await;
    assert!(created.created());
    assert_eq!(created.watch_id(), 0);
    assert_eq!(created.header().unwrap().revision(), r0);
    let r1 = rev_of_put(&mut c, "a", "1").await;
    let r2 = rev_of_put(&mut c, "a", "2").await;
    rev_of_put(&mut c, "b", "not watched").await;
    let r3 = c
        .delete("a", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let got: Vec<Ev> = events(&mut s, 3).await.into_iter().map(|e| e.1).collect();
    assert_eq!(
        got,
        vec![
            put("a", "1", r1, None),
            put("a", "2", r2, None),
            del("a", r3, None)
        ]
    );
    s.cancel(0).await.unwrap();
    let canceled = next(&mut s).await;
    assert!(canceled.canceled());
    assert_eq!(canceled.watch_id(), 0);
    // Nothing more comes for a canceled watcher; a cancel of an unknown ID
    // gets no answer (etcd); a second watcher gets the next ID.
    rev_of_put(&mut c, "a", "3").await;
    s.cancel(42).await.unwrap();
    s.watch("a", None).await.unwrap();
    let created = next(&mut s).await;
    assert!(created.created() && !created.canceled());
    assert_eq!(created.watch_id(), 1);
}

#[tokio::test]
async fn prefix_prev_kv_and_filters_on_one_stream() {
    let (_m, mut c) = started(&[]).await;
    rev_of_put(&mut c, "p/a", "old").await;
    let mut s = c
        .watch(
            "p/",
            Some(WatchOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .unwrap();
    assert!(next(&mut s).await.created());
    s.watch(
        "p/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_filters([WatchFilterType::NoPut]),
        ),
    )
    .await
    .unwrap();
    let created = next(&mut s).await;
    assert!(created.created());
    let nodel = created.watch_id();
    let r1 = rev_of_put(&mut c, "p/a", "new").await;
    let r2 = c
        .delete("p/a", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let r3 = rev_of_put(&mut c, "p/b", "b").await;
    rev_of_put(&mut c, "q", "outside").await;
    let mut by_watcher: Vec<(i64, Ev)> = Vec::new();
    while by_watcher.len() < 4 {
        let r = next(&mut s).await;
        for e in r.events() {
            by_watcher.push((r.watch_id(), ev(e)));
        }
    }
    let first: Vec<Ev> = by_watcher
        .iter()
        .filter(|(w, _)| *w != nodel)
        .map(|x| x.1.clone())
        .collect();
    let second: Vec<Ev> = by_watcher
        .iter()
        .filter(|(w, _)| *w == nodel)
        .map(|x| x.1.clone())
        .collect();
    assert_eq!(
        first,
        vec![
            put("p/a", "new", r1, Some("old")),
            del("p/a", r2, Some("new")),
            put("p/b", "b", r3, None),
        ]
    );
    assert_eq!(second, vec![del("p/a", r2, None)]);
}

#[tokio::test]
async fn start_revision_replays_history_then_goes_live() {
    let (_m, mut c) = started(&["--shards", "4"]).await;
    let mut want = Vec::new();
    for i in 0..50 {
        let k = format!("h/{}", i % 7);
        let v = format!("v{i}");
        let r = rev_of_put(&mut c, &k, &v).await;
        want.push(put(&k, &v, r, None));
    }
    let r = c
        .delete("h/3", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    want.push(del("h/3", r, None));
    let first = want[0].rev;
    let mut s = c
        .watch(
            "h/",
            Some(WatchOptions::new().with_prefix().with_start_revision(first)),
        )
        .await
        .unwrap();
    assert!(next(&mut s).await.created());
    // Live writes while history is read back.
    for i in 0..20 {
        let k = format!("h/{}", i % 5);
        let v = format!("live{i}");
        let r = rev_of_put(&mut c, &k, &v).await;
        want.push(put(&k, &v, r, None));
    }
    let got: Vec<Ev> = events(&mut s, want.len())
        .await
        .into_iter()
        .map(|e| e.1)
        .collect();
    assert_eq!(got, want);
    // From the middle: only what came after.
    let mid = want[30].rev;
    let mut s2 = c
        .watch(
            "h/",
            Some(WatchOptions::new().with_prefix().with_start_revision(mid)),
        )
        .await
        .unwrap();
    assert!(next(&mut s2).await.created());
    let got: Vec<Ev> = events(&mut s2, want.len() - 30)
        .await
        .into_iter()
        .map(|e| e.1)
        .collect();
    assert_eq!(got, want[30..].to_vec());
}

#[tokio::test]
async fn compacted_start_is_canceled_with_compact_revision() {
    let (_m, mut c) = started(&[]).await;
    let r1 = rev_of_put(&mut c, "c", "1").await;
    rev_of_put(&mut c, "c", "2").await;
    let r3 = rev_of_put(&mut c, "c", "3").await;
    c.compact(r3, None).await.unwrap();
    let mut s = c
        .watch("c", Some(WatchOptions::new().with_start_revision(r1)))
        .await
        .unwrap();
    let created = next(&mut s).await;
    assert!(created.created() && !created.canceled());
    let canceled = next(&mut s).await;
    assert!(canceled.canceled());
    assert_eq!(canceled.watch_id(), created.watch_id());
    assert_eq!(canceled.compact_revision(), r3);
    // At the compaction revision itself history is still there.
    s.watch("c", Some(WatchOptions::new().with_start_revision(r3)))
        .await
        .unwrap();
    assert!(next(&mut s).await.created());
    let got = events(&mut s, 1).await;
    assert_eq!(got[0].1, put("c", "3", r3, None));
}

#[tokio::test]
async fn chosen_duplicate_and_empty_range_watch_ids() {
    let (_m, mut c) = started(&[]).await;
    let mut s = c
        .watch("k", Some(WatchOptions::new().with_watch_id(7)))
        .await
        .unwrap();
    let r = next(&mut s).await;
    assert!(r.created() && !r.canceled());
    assert_eq!(r.watch_id(), 7);
    s.watch("j", Some(WatchOptions::new().with_watch_id(7)))
        .await
        .unwrap();
    let r = next(&mut s).await;
    assert!(r.created() && r.canceled());
    assert_eq!(r.watch_id(), -1);
    assert_eq!(
        r.cancel_reason(),
        "mvcc: duplicate watch ID provided on the WatchStream"
    );
    s.watch("z", Some(WatchOptions::new().with_range("a")))
        .await
        .unwrap();
    let r = next(&mut s).await;
    assert!(r.created() && r.canceled());
    assert_eq!(r.watch_id(), -1);
    assert_eq!(r.cancel_reason(), "mvcc: watcher range is empty");
    // The watcher with the chosen ID still works.
    let rev = rev_of_put(&mut c, "k", "v").await;
    let got = events(&mut s, 1).await;
    assert_eq!(got[0].1, put("k", "v", rev, None));
}

#[tokio::test]
async fn progress_request_names_a_delivered_revision() {
    let (_m, mut c) = started(&[]).await;
    let mut s = c
        .watch("pr/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(next(&mut s).await.created());
    let mut last = 0;
    for i in 0..10 {
        last = rev_of_put(&mut c, &format!("pr/{i}"), "v").await;
    }
    events(&mut s, 10).await;
    s.request_progress().await.unwrap();
    let r = next(&mut s).await;
    assert!(r.events().is_empty());
    assert_eq!(r.watch_id(), -1);
    assert!(r.header().unwrap().revision() >= last);
}

#[tokio::test]
async fn progress_notify_interval() {
    // etcd's flag, shortened so the test sees notifications.
    let (_m, mut c) = started(&["--experimental-watch-progress-notify-interval", "200ms"]).await;
    let rev = rev_of_put(&mut c, "pn", "v").await;
    let mut s = c
        .watch("pn", Some(WatchOptions::new().with_progress_notify()))
        .await
        .unwrap();
    assert!(next(&mut s).await.created());
    let r = next(&mut s).await;
    assert!(r.events().is_empty() && !r.canceled());
    assert_eq!(r.header().unwrap().revision(), rev);
}

#[tokio::test]
async fn big_revisions_come_in_fragments_when_asked() {
    // etcd fragments past --max-request-bytes plus gRPC's 512 KiB overhead
    // allowance: one delete of 200 keys with 4 KB values and prev_kv makes
    // a revision of ~800 KB.
    let (_m, mut c) = started(&["--max-request-bytes", "20000"]).await;
    let big = "x".repeat(4000);
    for i in 0..200 {
        c.put(format!("f/{i:03}"), big.as_str(), None)
            .await
            .unwrap();
    }
    let mut s = c
        .watch(
            "f/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_prev_key()
                    .with_fragment(),
            ),
        )
        .await
        .unwrap();
    assert!(next(&mut s).await.created());
    let rev = c
        .delete("f/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let mut frags = Vec::new();
    let mut n = 0;
    while n < 200 {
        let r = next(&mut s).await;
        n += r.events().len();
        assert!(r
            .events()
            .iter()
            .all(|e| e.kv().unwrap().mod_revision() == rev
                && e.prev_kv().unwrap().value().len() == 4000));
        frags.push(r.0.fragment);
    }
    assert_eq!(n, 200);
    assert!(frags.len() > 1, "split into fragments: {frags:?}");
    assert_eq!(frags.last(), Some(&false));
    assert!(frags[..frags.len() - 1].iter().all(|f| *f));
}

#[tokio::test]
async fn lease_revoke_deletes_at_one_revision() {
    let (_m, mut c) = started(&["--shards", "4"]).await;
    let id = c.lease_grant(60, None).await.unwrap().id();
    for k in ["l/a", "l/b", "l/c", "l/d", "l/e"] {
        c.put(k, "v", Some(PutOptions::new().with_lease(id)))
            .await
            .unwrap();
    }
    let mut s = c
        .watch("l/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(next(&mut s).await.created());
    let rev = c
        .lease_revoke(id)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let got = events(&mut s, 5).await;
    // One response, key order, one revision.
    assert!(got.iter().all(|(i, _)| *i == got[0].0));
    let keys: Vec<&str> = got.iter().map(|(_, e)| e.key.as_str()).collect();
    assert_eq!(keys, ["l/a", "l/b", "l/c", "l/d", "l/e"]);
    assert!(got.iter().all(|(_, e)| !e.put && e.rev == rev));
}

/// Txns whose keys live on different shards: every revision's events come
/// in one response, whole, in the order of the txn's ops, and revisions
/// only go up.
#[tokio::test]
async fn txns_across_shards_arrive_whole_and_in_op_order() {
    let (_m, c) = started(&["--shards", "8", "--cores", "2"]).await;
    let mut w = c.clone();
    let mut s = w
        .watch("t/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(next(&mut s).await.created());
    let writers = 4;
    let per = 40;
    let mut tasks = Vec::new();
    for t in 0..writers {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                // Keys in descending order: op order is not key order.
                let ops: Vec<TxnOp> = (0..5)
                    .rev()
                    .map(|k| TxnOp::put(format!("t/{k}"), format!("{t}-{i}"), None))
                    .collect();
                c.txn(Txn::new().and_then(ops)).await.unwrap();
            }
        }));
    }
    let mut got: Vec<(usize, Ev)> = Vec::new();
    let total = writers * per * 5;
    let mut i = 0;
    while got.len() < total {
        let r = next(&mut s).await;
        for e in r.events() {
            got.push((i, ev(e)));
        }
        i += 1;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(got.len(), total);
    for chunk in got.chunks(5) {
        let rev = chunk[0].1.rev;
        assert!(
            chunk
                .iter()
                .all(|(resp, e)| *resp == chunk[0].0 && e.rev == rev),
            "a revision split across responses or mixed: {chunk:?}"
        );
        let keys: Vec<&str> = chunk.iter().map(|(_, e)| e.key.as_str()).collect();
        assert_eq!(keys, ["t/4", "t/3", "t/2", "t/1", "t/0"]);
        let v = &chunk[0].1.value;
        assert!(chunk.iter().all(|(_, e)| &e.value == v));
    }
    let revs: Vec<i64> = got.chunks(5).map(|c| c[0].1.rev).collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]));
}

/// A watcher that does not read while 20,000 puts (20 MB) go by: writers are not
/// held up, and once it reads it gets every event, in order, no gaps, no
/// duplicates (keelson drops its buffer and catches up from history).
#[tokio::test]
async fn slow_reader_does_not_block_writers_and_catches_up() {
    let (m, c) = started(&["--log-level", "debug"]).await;
    let mut w = c.clone();
    let mut s = w
        .watch("s/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(next(&mut s).await.created());
    // More events than a watcher may buffer (16k), so keelson's watcher
    // must fall back to history.
    let n = if is_etcd() { 2000 } else { 20_000 };
    let val = "v".repeat(1024);
    let mut tasks = Vec::new();
    let writers = 8;
    for t in 0..writers {
        let (mut c, val) = (c.clone(), val.clone());
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..n / writers {
                let r = c
                    .put(format!("s/{t}/{i}"), val.as_str(), None)
                    .await
                    .unwrap();
                revs.push(r.header().unwrap().revision());
            }
            revs
        }));
    }
    let mut want = Vec::new();
    for t in tasks {
        want.extend(
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("writers finish while the watcher is not read")
                .unwrap(),
        );
    }
    want.sort();
    let got: Vec<i64> = events(&mut s, n)
        .await
        .into_iter()
        .map(|e| e.1.rev)
        .collect();
    assert_eq!(got, want);
    if !is_etcd() {
        assert!(m.log_text().contains("catching up from history"));
    }
}

#[tokio::test]
async fn etcdctl_watch_prints_events() {
    let (m, mut c) = started(&[]).await;
    c.put("e/1", "one", None).await.unwrap();
    c.put("e/2", "two", None).await.unwrap();
    c.delete("e/1", None).await.unwrap();
    // History from the first put's revision, printed as etcd prints it.
    let first = c.get("e/2", None).await.unwrap().kvs()[0].mod_revision() - 1;
    let r = c
        .get(
            "e/",
            Some(GetOptions::new().with_prefix().with_revision(first)),
        )
        .await
        .unwrap();
    let first_rev = r.kvs()[0].create_revision();
    let ep = m.endpoint();
    let out = std::thread::spawn(move || {
        let mut child = std::process::Command::new("timeout")
            .args(["3", "etcdctl", &format!("--endpoints={ep}")])
            .args(["watch", "--prefix", "e/", "--rev", &first_rev.to_string()])
            .env("ETCDCTL_API", "3")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut s = String::new();
        use std::io::Read;
        child.stdout.take().unwrap().read_to_string(&mut s).unwrap();
        let _ = child.wait();
        s
    })
    .join()
    .unwrap();
    assert_eq!(out, "PUT\ne/1\none\nPUT\ne/2\ntwo\nDELETE\ne/1\n\n");
}

/// A watcher that fell behind (it did not read) and whose next revision
/// was then compacted away is canceled with the compact revision, as on
/// etcd; writers were never held up.
#[tokio::test]
async fn slow_reader_behind_compaction_is_canceled() {
    let (_m, c) = started(&[]).await;
    let mut w = c.clone();
    let mut s = w
        .watch("z/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(next(&mut s).await.created());
    let n = 20_000;
    let val = "v".repeat(1024);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (mut c, val) = (c.clone(), val.clone());
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for i in 0..n / 8 {
                let r = c
                    .put(format!("z/{t}/{i}"), val.as_str(), None)
                    .await
                    .unwrap();
                last = last.max(r.header().unwrap().revision());
            }
            last
        }));
    }
    let mut last = 0;
    for t in tasks {
        last = last.max(t.await.unwrap());
    }
    let mut c = c.clone();
    c.compact(last, None).await.unwrap();
    let mut got = 0;
    loop {
        let r = next(&mut s).await;
        got += r.events().len();
        if r.canceled() {
            assert_eq!(r.compact_revision(), last);
            break;
        }
        assert!(got <= n, "more events than puts");
    }
    assert!(
        got < n,
        "it should have fallen behind: got all {got} events"
    );
}

/// A watch from a revision not reached yet gets only the events from that
/// revision on (etcd keeps such a watcher's minimum revision).
#[tokio::test]
async fn a_future_start_revision_skips_the_events_before_it() {
    let (_m, mut c) = started(&[]).await;
    let r0 = rev_of_put(&mut c, "f", "0").await;
    // Find the revision of the third put from now: puts of other keys
    // advance it the same on both servers' schemes (one revision per
    // write), so learn the step from two writes first.
    let r1 = rev_of_put(&mut c, "g", "1").await;
    let step = r1 - r0;
    let start = r1 + 3 * step;
    let mut s = c
        .watch("f", Some(WatchOptions::new().with_start_revision(start)))
        .await
        .unwrap();
    assert!(next(&mut s).await.created());
    let mut revs = Vec::new();
    for i in 0..5 {
        revs.push(rev_of_put(&mut c, "f", &format!("v{i}")).await);
    }
    let want: Vec<Ev> = revs
        .iter()
        .enumerate()
        .filter(|(_, r)| **r >= start)
        .map(|(i, r)| put("f", &format!("v{i}"), *r, None))
        .collect();
    assert!(!want.is_empty() && want.len() < 5, "{revs:?} from {start}");
    let got: Vec<Ev> = events(&mut s, want.len())
        .await
        .into_iter()
        .map(|e| e.1)
        .collect();
    assert_eq!(got, want);
}
