//! Three members on loopback, as separate processes: bootstrap from
//! `--initial-cluster`, writes through any member (followers forward to the
//! leader), linearizable reads on followers, failover when the leader is
//! killed -9 under write load (no acknowledged write lost), the old leader
//! catching up when it comes back, and a minority refusing writes. Checked
//! against etcd 3.4 with `KEELSON_TEST_SERVER=etcd cargo test --test cluster`.

mod support;

use etcd_client::*;
use std::time::{Duration, Instant};
use support::{cluster, start_all, Member};

async fn connect(m: &Member) -> Client {
    Client::connect(
        [m.endpoint()],
        Some(ConnectOptions::new().with_timeout(Duration::from_secs(3))),
    )
    .await
    .unwrap()
}

/// Waits until the members that are up agree on a leader; returns its
/// index in `ms`.
async fn leader(ms: &[Member], up: &[usize]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let mut seen = Vec::new();
        for &i in up {
            if let Ok(mut c) = Client::connect([ms[i].endpoint()], None).await {
                if let Ok(st) = c.status().await {
                    seen.push((i, st.header().unwrap().member_id(), st.leader()));
                }
            }
        }
        if seen.len() == up.len() {
            let l = seen[0].2;
            if l != 0 && seen.iter().all(|s| s.2 == l) {
                if let Some(s) = seen.iter().find(|s| s.1 == l) {
                    return s.0;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no leader agreed on within 20 s");
}

#[tokio::test]
async fn three_members_replicate_and_forward() {
    let mut ms = cluster(3, &[]);
    start_all(&mut ms);
    let l = leader(&ms, &[0, 1, 2]).await;
    let f = (l + 1) % 3;
    let mut cf = connect(&ms[f]).await;
    // A write through a follower, read back linearizably on every member.
    let rev = cf
        .put("k", "v", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    for m in &ms {
        let mut c = connect(m).await;
        let r = c.get("k", None).await.unwrap();
        assert_eq!(r.kvs()[0].value(), b"v");
        assert_eq!(r.kvs()[0].mod_revision(), rev);
    }
    // Txn and lease through a follower.
    let lease = cf.lease_grant(30, None).await.unwrap().id();
    cf.put("lk", "x", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    let t = cf
        .txn(
            Txn::new()
                .when([Compare::value("k", CompareOp::Equal, "v")])
                .and_then([TxnOp::put("k", "w", None)]),
        )
        .await
        .unwrap();
    assert!(t.succeeded());
    let mut cl = connect(&ms[l]).await;
    assert_eq!(cl.get("k", None).await.unwrap().kvs()[0].value(), b"w");
    let ttl = cl.lease_time_to_live(lease, None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 30);
    // Keep-alive through a follower.
    let (mut keeper, mut stream) = cf.lease_keep_alive(lease).await.unwrap();
    keeper.keep_alive().await.unwrap();
    let ka = stream.message().await.unwrap().unwrap();
    assert_eq!(ka.ttl(), 30);
    // Three members listed everywhere, with the client URLs they publish.
    let ml = cf.member_list().await.unwrap();
    assert_eq!(ml.members().len(), 3);
    for m in &ms {
        let url = format!("http://{}", m.endpoint());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ml = cf.member_list().await.unwrap();
            if ml
                .members()
                .iter()
                .any(|x| x.client_urls() == [url.clone()])
            {
                break;
            }
            assert!(Instant::now() < deadline, "{url} never published");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // etcdctl's cluster-wide status dials every member's client URL (and
    // sends "http://..." as the HTTP/2 authority, which must be accepted).
    let (ok, out, err) = support::etcdctl(
        &ms[f].endpoint(),
        &["endpoint", "status", "--cluster", "-w", "fields"],
        None,
    );
    assert!(ok, "{err}");
    let field = |name: &str| -> Vec<String> {
        out.lines()
            .filter_map(|l| l.strip_prefix(&format!("\"{name}\" : ")))
            .map(|v| v.to_string())
            .collect()
    };
    assert_eq!(field("Endpoint").len(), 3, "{out}");
    let leaders = field("Leader");
    assert!(leaders.iter().all(|l| *l == leaders[0]), "{out}");
    assert_eq!(
        field("MemberID")
            .iter()
            .filter(|m| **m == leaders[0])
            .count(),
        1,
        "{out}"
    );
    let (ok, out, err) = support::etcdctl(
        &ms[f].endpoint(),
        &["endpoint", "health", "--cluster"],
        None,
    );
    assert!(ok, "{err}");
    // (etcdctl 3.4 prints health to stderr.)
    let all = out + &err;
    assert_eq!(all.matches("is healthy").count(), 3, "{all}");
    // A watch on a follower sees a write made through the leader.
    let mut ws = cf.watch("wk", None).await.unwrap();
    assert!(ws.message().await.unwrap().unwrap().created());
    let wrev = cl
        .put("wk", "1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let r = tokio::time::timeout(Duration::from_secs(5), ws.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.events()[0].kv().unwrap().mod_revision(), wrev);
}

/// Writers on every member while the leader is killed -9: a new leader
/// takes over, writes resume, every acknowledged write is on the
/// survivors, and the old leader catches up when it restarts.
#[tokio::test]
async fn leader_killed_under_load_loses_nothing_acknowledged() {
    let mut ms = cluster(3, &[]);
    start_all(&mut ms);
    let l = leader(&ms, &[0, 1, 2]).await;
    let eps: Vec<String> = ms.iter().map(|m| m.endpoint()).collect();
    let stop = Instant::now() + Duration::from_secs(8);
    let mut writers = Vec::new();
    for w in 0..6 {
        let ep = eps[w % 3].clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut c = None;
            let mut i = 0;
            while Instant::now() < stop {
                if c.is_none() {
                    c = Client::connect(
                        [ep.clone()],
                        Some(
                            ConnectOptions::new()
                                .with_timeout(Duration::from_secs(2))
                                .with_connect_timeout(Duration::from_secs(1)),
                        ),
                    )
                    .await
                    .ok();
                    if c.is_none() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
                let k = format!("w{w}/{i}");
                match c.as_mut().unwrap().put(k.as_str(), "v", None).await {
                    Ok(r) => acked.push((k, r.header().unwrap().revision())),
                    Err(_) => {
                        c = None;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                i += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    ms[l].kill9();
    let up: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let nl = leader(&ms, &up).await;
    assert_ne!(nl, l);
    // Writes resume through the new leader within a few election timeouts.
    let mut c = connect(&ms[nl]).await;
    loop {
        if c.put("after", "failover", None).await.is_ok() {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "no write within 10 s of the kill"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(acked.len() > 100, "writers made progress: {}", acked.len());
    for &i in &up {
        let mut c = connect(&ms[i]).await;
        for (k, rev) in &acked {
            let r = c.get(k.as_str(), None).await.unwrap();
            assert_eq!(r.kvs().len(), 1, "acknowledged {k} missing on member {i}");
            assert_eq!(r.kvs()[0].mod_revision(), *rev, "{k} on member {i}");
        }
    }
    // The old leader comes back and catches up.
    assert!(ms[l].start().is_none());
    let mut c = connect(&ms[l]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = c
            .get("after", Some(GetOptions::new().with_serializable()))
            .await;
        if matches!(&r, Ok(r) if r.kvs().len() == 1) {
            break;
        }
        assert!(Instant::now() < deadline, "old leader did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (k, rev) in acked.iter().step_by(7) {
        let r = c
            .get(k.as_str(), Some(GetOptions::new().with_serializable()))
            .await
            .unwrap();
        assert_eq!(r.kvs()[0].mod_revision(), *rev);
    }
}

#[tokio::test]
async fn a_minority_cannot_write() {
    let mut ms = cluster(3, &[]);
    start_all(&mut ms);
    let l = leader(&ms, &[0, 1, 2]).await;
    let mut c = connect(&ms[l]).await;
    c.put("before", "1", None).await.unwrap();
    let others: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    for &i in &others {
        ms[i].kill9();
    }
    let mut c = Client::connect(
        [ms[l].endpoint()],
        Some(ConnectOptions::new().with_timeout(Duration::from_secs(15))),
    )
    .await
    .unwrap();
    let e = c.put("lost", "1", None).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("etcdserver: request timed out") || msg.contains("etcdserver: no leader"),
        "{msg}"
    );
    // Serializable reads still answer from the survivor.
    let r = c
        .get("before", Some(GetOptions::new().with_serializable()))
        .await
        .unwrap();
    assert_eq!(r.kvs()[0].value(), b"1");
}
