//! Lock and Election (v3lockpb, v3electionpb) through the `etcd-client`
//! crate and etcdctl, against the real binary: lock queues in create-revision
//! order, a waiter that goes away gives its place up, campaign / proclaim /
//! leader / observe / resign, and etcd's error strings. Checked against etcd
//! 3.4 with `KEELSON_TEST_SERVER=etcd cargo test --test coord`.

mod support;

use etcd_client::*;
use std::time::Duration;
use support::{etcdctl, started};

const UNKNOWN: i32 = 2;

fn code_msg(e: Error) -> (i32, String) {
    match e {
        Error::GRpcStatus(s) => (s.code() as i32, s.message().to_string()),
        other => panic!("not a gRPC status: {other:?}"),
    }
}

async fn keys(c: &mut Client, prefix: &str) -> Vec<String> {
    c.get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn lock_queue_in_create_order() {
    let (_m, mut c) = started(&[]).await;
    let mut leases = Vec::new();
    for _ in 0..3 {
        leases.push(c.lease_grant(60, None).await.unwrap().id());
    }
    let first = c
        .lock("q", Some(LockOptions::new().with_lease(leases[0])))
        .await
        .unwrap();
    assert_eq!(first.key(), format!("q/{:x}", leases[0]).as_bytes());
    let mut waiters = Vec::new();
    for &l in &leases[1..] {
        let mut c = c.clone();
        waiters.push(tokio::spawn(async move {
            c.lock("q", Some(LockOptions::new().with_lease(l)))
                .await
                .unwrap()
                .key()
                .to_vec()
        }));
        // Queue order is create order.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!waiters[0].is_finished() && !waiters[1].is_finished());
    assert_eq!(keys(&mut c, "q/").await.len(), 3);
    // Unlock the holder: the second takes it, the third still waits.
    c.unlock(first.key()).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), &mut waiters[0])
        .await
        .expect("second waiter gets the lock")
        .unwrap();
    assert_eq!(second, format!("q/{:x}", leases[1]).into_bytes());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiters[1].is_finished());
    // Revoking the holder's lease releases it too.
    c.lease_revoke(leases[1]).await.unwrap();
    let third = tokio::time::timeout(Duration::from_secs(5), &mut waiters[1])
        .await
        .expect("third waiter gets the lock")
        .unwrap();
    assert_eq!(third, format!("q/{:x}", leases[2]).into_bytes());
    // Locking again with the same lease while holding: immediate.
    let again = c
        .lock("q", Some(LockOptions::new().with_lease(leases[2])))
        .await
        .unwrap();
    assert_eq!(again.key(), third.as_slice());
}

#[tokio::test]
async fn a_waiter_that_goes_away_gives_up_its_place() {
    let (_m, mut c) = started(&[]).await;
    let l1 = c.lease_grant(60, None).await.unwrap().id();
    let l2 = c.lease_grant(60, None).await.unwrap().id();
    c.lock("g", Some(LockOptions::new().with_lease(l1)))
        .await
        .unwrap();
    let mut c2 = c.clone();
    let waiter =
        tokio::spawn(async move { c2.lock("g", Some(LockOptions::new().with_lease(l2))).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(keys(&mut c, "g/").await.len(), 2);
    waiter.abort();
    let mut left = Vec::new();
    for _ in 0..50 {
        left = keys(&mut c, "g/").await;
        if left.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, vec![format!("g/{l1:x}")]);
}

#[tokio::test]
async fn lock_errors_as_etcd() {
    let (_m, mut c) = started(&[]).await;
    let e = c
        .lock("x", Some(LockOptions::new().with_lease(12345)))
        .await
        .unwrap_err();
    assert_eq!(
        code_msg(e),
        (UNKNOWN, "etcdserver: requested lease not found".into())
    );
    // Without a lease the server makes a session lease of its own.
    let r = c.lock("x", None).await.unwrap();
    let key = String::from_utf8(r.key().to_vec()).unwrap();
    let id = i64::from_str_radix(key.strip_prefix("x/").unwrap(), 16).unwrap();
    let ttl = c.lease_time_to_live(id, None).await.unwrap();
    assert!(ttl.granted_ttl() == 60 && ttl.ttl() > 50, "{ttl:?}");
    c.unlock(key.as_str()).await.unwrap();
    assert!(keys(&mut c, "x/").await.is_empty());
}

#[tokio::test]
async fn election_campaign_proclaim_observe_resign() {
    let (_m, mut c) = started(&[]).await;
    let e = c.leader("el").await.unwrap_err();
    assert_eq!(code_msg(e), (UNKNOWN, "election: no leader".into()));
    let l1 = c.lease_grant(60, None).await.unwrap().id();
    let l2 = c.lease_grant(60, None).await.unwrap().id();
    let won = tokio::time::timeout(Duration::from_secs(5), c.campaign("el", "a", l1))
        .await
        .expect("first campaign wins at once")
        .unwrap();
    let leader = won.leader().unwrap().clone();
    // (etcd sends the Observe stream's headers with its first message, so
    // the call returns once there is a leader.)
    let mut obs = tokio::time::timeout(Duration::from_secs(5), c.observe("el"))
        .await
        .expect("observe starts")
        .unwrap();
    assert_eq!(leader.key(), format!("el/{l1:x}").as_bytes());
    assert_eq!(leader.lease(), l1);
    assert_eq!(leader.rev(), won.header().unwrap().revision());
    let mut c2 = c.clone();
    let second = tokio::spawn(async move { c2.campaign("el", "b", l2).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished());
    assert_eq!(c.leader("el").await.unwrap().kv().unwrap().value(), b"a");
    tokio::time::timeout(
        Duration::from_secs(5),
        c.proclaim(
            "a2",
            Some(ProclaimOptions::new().with_leader(leader.clone())),
        ),
    )
    .await
    .expect("proclaim answers")
    .unwrap();
    assert_eq!(c.leader("el").await.unwrap().kv().unwrap().value(), b"a2");
    // A stale leader key cannot proclaim.
    let stale = LeaderKey::new()
        .with_name("el")
        .with_key(leader.key())
        .with_rev(leader.rev() - 1)
        .with_lease(l1);
    let e = c
        .proclaim("zzz", Some(ProclaimOptions::new().with_leader(stale)))
        .await
        .unwrap_err();
    assert_eq!(code_msg(e), (UNKNOWN, "election: not leader".into()));
    c.resign(Some(ResignOptions::new().with_leader(leader)))
        .await
        .unwrap();
    let won2 = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("second candidate wins after the resign")
        .unwrap();
    assert_eq!(
        won2.leader().unwrap().key(),
        format!("el/{l2:x}").as_bytes()
    );
    // The observer saw every leader value in order.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let r = tokio::time::timeout(Duration::from_secs(5), obs.message())
            .await
            .expect("observe reports within 5 s")
            .unwrap()
            .unwrap();
        seen.push(r.kv().unwrap().value_str().unwrap().to_string());
    }
    assert_eq!(seen, ["a", "a2", "b"]);
}

/// etcdctl's lock and elect commands: a lock held while a command runs,
/// and a campaign that prints the leader key and value.
#[tokio::test]
async fn etcdctl_lock_and_elect() {
    let (m, mut c) = started(&[]).await;
    let (ok, out, err) = etcdctl(
        &m.endpoint(),
        &[
            "lock",
            "cmdlock",
            "--",
            "sh",
            "-c",
            "echo held $ETCD_LOCK_KEY",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("held cmdlock/"), "{out}");
    // The lock key is gone once the command ran.
    assert!(keys(&mut c, "cmdlock/").await.is_empty());

    let ep = m.endpoint();
    let mut child = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([&format!("--endpoints={ep}"), "elect", "ctl", "proposal"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut buf = vec![0u8; 256];
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("proposal") {
            let n = out.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    });
    let line = tokio::time::timeout(Duration::from_secs(10), line)
        .await
        .expect("etcdctl elect prints the leader")
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("ctl/"), "{line}");
    assert!(line.ends_with("\nproposal\n"), "{line}");
    let leader = c.leader("ctl").await.unwrap();
    assert_eq!(leader.kv().unwrap().value(), b"proposal");
}

/// With auth on, Lock and Election act with the caller's permissions on
/// their keys, as etcd's servers (which run them through its KV API with
/// the caller's token) do.
#[tokio::test]
async fn lock_and_election_need_permission_on_their_keys() {
    let (m, mut c) = started(&[]).await;
    let ep = m.endpoint();
    let perms = vec![
        Permission::read_write("a").with_prefix(),
        Permission::read("ro").with_prefix(),
    ];
    support::add_root_and_user(&mut c, &ep, "u", "upwd", "r", perms).await;
    support::enable_auth(&ep);
    let mut u = Client::connect(
        [ep.as_str()],
        Some(ConnectOptions::new().with_user("u", "upwd")),
    )
    .await
    .unwrap();
    let lease = u.lease_grant(60, None).await.unwrap().id();
    let opts = || Some(LockOptions::new().with_lease(lease));
    // Allowed on its own prefix.
    let key = u.lock("a-lock", opts()).await.unwrap().key().to_vec();
    u.unlock(key).await.unwrap();
    let denied = (UNKNOWN, "etcdserver: permission denied".to_string());
    // Not on another name, nor on one it may only read.
    assert_eq!(
        code_msg(u.lock("b-lock", opts()).await.unwrap_err()),
        denied
    );
    assert_eq!(
        code_msg(u.lock("ro-lock", opts()).await.unwrap_err()),
        denied
    );
    assert_eq!(code_msg(u.unlock("b-lock/123").await.unwrap_err()), denied);
    assert_eq!(
        code_msg(u.campaign("b-elect", "v", lease).await.unwrap_err()),
        denied
    );
    assert_eq!(code_msg(u.leader("b-elect").await.unwrap_err()), denied);
    // An election on its own prefix works end to end.
    let r = u.campaign("a-elect", "v1", lease).await.unwrap();
    let leader = r.leader().unwrap().clone();
    assert_eq!(
        u.leader("a-elect").await.unwrap().kv().unwrap().value(),
        b"v1"
    );
    u.proclaim(
        "v2",
        Some(ProclaimOptions::new().with_leader(leader.clone())),
    )
    .await
    .unwrap();
    u.resign(Some(ResignOptions::new().with_leader(leader)))
        .await
        .unwrap();
    // Without a token.
    // Observing a name it may not read: the stream just ends (etcd's
    // observer stops on the refused read), with no leader sent.
    let mut obs = u.observe("b-elect").await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), obs.message())
        .await
        .expect("the stream ends");
    assert!(matches!(ended, Ok(None)), "{ended:?}");
    // Without a token: etcd's KV error, passed on as code Unknown.
    assert_eq!(
        code_msg(c.lock("a-lock", opts()).await.unwrap_err()),
        (UNKNOWN, "etcdserver: user name is empty".to_string())
    );
}
