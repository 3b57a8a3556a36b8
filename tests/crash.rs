//! kill -9 under concurrent writes: every acknowledged write survives with
//! the same value and revision, over several crash/restart rounds.

mod support;

use etcd_client::{Client, GetOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::Member;

type Acked = Arc<Mutex<HashMap<String, (String, i64)>>>;

/// Writers put unique keys (and overwrite a few shared ones) until the
/// server dies or the time bound passes; acknowledged results are recorded.
async fn writers(ep: String, round: usize, acked: Acked, stop_after: Duration) {
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (ep, acked) = (ep.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(mut c) = Client::connect([ep], None).await else {
                return;
            };
            let start = Instant::now();
            for i in 0..5000 {
                if start.elapsed() > stop_after {
                    return;
                }
                let key = if i % 10 == 0 {
                    format!("shared-{}", i % 3)
                } else {
                    format!("r{round}-w{w}-{i:05}")
                };
                let val = format!("r{round}-w{w}-{i}");
                match c.put(key.clone(), val.clone(), None).await {
                    Ok(r) => {
                        let rev = r.header().unwrap().revision();
                        let mut a = acked.lock().unwrap();
                        // Keep the newest acknowledged write per key.
                        if a.get(&key).map(|(_, old)| *old < rev).unwrap_or(true) {
                            a.insert(key, (val, rev));
                        }
                    }
                    Err(_) => return, // the server is gone
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn verify(c: &mut Client, acked: &Acked) -> i64 {
    let want = acked.lock().unwrap().clone();
    let all = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    let got: HashMap<String, (String, i64)> = all
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                (kv.value_str().unwrap().to_string(), kv.mod_revision()),
            )
        })
        .collect();
    let mut max_rev = 0;
    for (k, (v, rev)) in &want {
        let (gv, grev) = got
            .get(k)
            .unwrap_or_else(|| panic!("acknowledged key {k} lost"));
        if k.starts_with("shared-") {
            // A later unacknowledged write to a shared key may have landed.
            assert!(
                *grev >= *rev,
                "{k}: revision went back from {rev} to {grev}"
            );
        } else {
            assert_eq!((gv, grev), (v, rev), "{k}");
        }
        max_rev = max_rev.max(*rev);
    }
    assert!(all.header().unwrap().revision() >= max_rev);
    want.len() as i64
}

async fn crash_rounds(extra: &[&str]) {
    let mut m = Member::new(extra);
    assert!(m.start().is_none());
    let acked: Acked = Arc::default();
    for round in 0..3 {
        let load = tokio::spawn(writers(
            m.endpoint(),
            round,
            acked.clone(),
            Duration::from_secs(3),
        ));
        tokio::time::sleep(Duration::from_millis(300 + 250 * round as u64)).await;
        m.kill9();
        load.await.unwrap();
        assert!(m.start().is_none(), "restart failed:\n{}", m.log_text());
        let n = verify(&mut m.client().await, &acked).await;
        assert!(n > 0, "round {round}: nothing was acknowledged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill9() {
    crash_rounds(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill9_across_checkpoints() {
    // Frequent checkpoints: crashes land between and during them, on
    // several shards (one is the default on 2 cores).
    crash_rounds(&["--snapshot-count", "50", "--shards", "3"]).await;
}
