//! Auth through etcdctl and the `etcd-client` crate against the real
//! binary: users, roles and key-range permissions, enable/disable, tokens
//! (and their expiry), etcd's errors. Also run against etcd 3.4 with
//! `KEELSON_TEST_SERVER=etcd cargo test --test auth`.

mod support;

use etcd_client::*;
use std::time::Duration;
use support::{etcdctl, started};

fn message(e: Error) -> String {
    match e {
        Error::GRpcStatus(s) => s.message().to_string(),
        e => e.to_string(),
    }
}

async fn as_user(ep: &str, user: &str, pw: &str) -> Result<Client, Error> {
    Client::connect(
        [ep],
        Some(ConnectOptions::new().with_user(user.to_string(), pw.to_string())),
    )
    .await
}

#[tokio::test]
async fn users_roles_permissions_and_tokens() {
    let (m, mut c) = started(&["--auth-token-ttl", "2"]).await;
    let ep = m.endpoint();
    c.put("a1", "v", None).await.unwrap();
    c.put("b1", "v", None).await.unwrap();

    // Enabling needs root with the root role (etcdctl adds the role).
    assert_eq!(
        message(c.auth_enable().await.unwrap_err()),
        "etcdserver: root user does not exist"
    );
    let (ok, out, err) = etcdctl(&ep, &["user", "add", "root:rootpwd"], None);
    assert!(ok, "{out}{err}");
    assert_eq!(
        message(c.auth_enable().await.unwrap_err()),
        "etcdserver: root user does not have root role"
    );
    c.user_add("alice", "alicepwd", None).await.unwrap();
    assert_eq!(
        message(c.user_add("alice", "x", None).await.unwrap_err()),
        "etcdserver: user name already exists"
    );
    c.role_add("reader").await.unwrap();
    c.role_grant_permission("reader", Permission::read("a").with_prefix())
        .await
        .unwrap();
    c.role_grant_permission("reader", Permission::read_write("w"))
        .await
        .unwrap();
    c.user_grant_role("alice", "reader").await.unwrap();
    assert_eq!(
        message(c.user_grant_role("alice", "nope").await.unwrap_err()),
        "etcdserver: role name not found"
    );
    let r = c.user_get("alice").await.unwrap();
    assert_eq!(r.roles(), ["reader".to_string()]);
    let r = c.role_get("reader").await.unwrap();
    assert_eq!(r.permissions().len(), 2);
    let (ok, out, err) = etcdctl(&ep, &["auth", "enable"], None);
    assert!(ok && out.contains("Authentication Enabled"), "{out}{err}");

    // No token, a wrong password: refused.
    assert_eq!(
        message(c.get("a1", None).await.unwrap_err()),
        "etcdserver: user name is empty"
    );
    assert_eq!(
        message(
            as_user(&ep, "alice", "wrong")
                .await
                .map(|_| ())
                .unwrap_err()
        ),
        "etcdserver: authentication failed, invalid user ID or password"
    );
    // alice reads under "a" and reads and writes "w", nothing else.
    let mut alice = as_user(&ep, "alice", "alicepwd").await.unwrap();
    assert_eq!(alice.get("a1", None).await.unwrap().kvs().len(), 1);
    alice
        .get("a", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let denied = "etcdserver: permission denied";
    assert_eq!(message(alice.get("b1", None).await.unwrap_err()), denied);
    assert_eq!(
        message(alice.put("a1", "x", None).await.unwrap_err()),
        denied
    );
    alice.put("w", "x", None).await.unwrap();
    let t = Txn::new()
        .when([Compare::value("a1", CompareOp::Equal, "v")])
        .and_then([TxnOp::put("w", "y", None)]);
    assert!(alice.txn(t).await.unwrap().succeeded());
    let t = Txn::new().and_then([TxnOp::put("b1", "y", None)]);
    assert_eq!(message(alice.txn(t).await.unwrap_err()), denied);
    assert_eq!(message(alice.user_list().await.unwrap_err()), denied);
    // Watches: only on what alice may read.
    let mut ws = alice.watch("b1", None).await.unwrap();
    let r = ws.message().await.unwrap().unwrap();
    assert!(r.created() && r.canceled(), "{r:?}");
    assert_eq!(
        r.cancel_reason(),
        "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
    );
    let mut ws = alice.watch("a1", None).await.unwrap();
    let r = ws.message().await.unwrap().unwrap();
    assert!(r.created() && !r.canceled(), "{r:?}");
    // etcd 3.4 serves these without a token: status, member list,
    // leases, compaction, alarms.
    c.status().await.unwrap();
    c.member_list().await.unwrap();
    let l = c.lease_grant(60, None).await.unwrap().id();
    c.lease_time_to_live(l, None).await.unwrap();
    assert!(c
        .leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .any(|x| x.id() == l));
    c.lease_revoke(l).await.unwrap();
    c.alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .unwrap();
    // ... not these, which answer with the auth store's own error.
    let (ok, out, err) = etcdctl(&ep, &["defrag"], None);
    assert!(
        !ok && err.contains("code = Unknown desc = auth: user name is empty"),
        "{out}{err}"
    );
    let (ok, out, err) = etcdctl(
        &ep,
        &["--user", "alice:alicepwd", "endpoint", "hashkv"],
        None,
    );
    assert!(
        !ok && err.contains("code = Unknown desc = auth: permission denied"),
        "{out}{err}"
    );
    // A watch without a token is canceled with etcd's reason.
    let mut ws = c.watch("a1", None).await.unwrap();
    let r = ws.message().await.unwrap().unwrap();
    assert!(r.created() && r.canceled(), "{r:?}");
    assert_eq!(
        r.cancel_reason(),
        "rpc error: code = InvalidArgument desc = etcdserver: user name is empty"
    );
    // A user reads its own record and the roles it holds, not others'.
    assert_eq!(
        alice.user_get("alice").await.unwrap().roles(),
        ["reader".to_string()]
    );
    assert_eq!(
        alice.role_get("reader").await.unwrap().permissions().len(),
        2
    );
    assert_eq!(message(alice.user_get("root").await.unwrap_err()), denied);
    assert_eq!(message(alice.role_get("root").await.unwrap_err()), denied);
    // etcdctl with --user.
    let (ok, out, err) = etcdctl(&ep, &["--user", "alice:alicepwd", "get", "a1"], None);
    assert!(ok && out.contains("a1"), "{out}{err}");
    let (ok, out, err) = etcdctl(&ep, &["--user", "alice:alicepwd", "get", "b1"], None);
    assert!(!ok && err.contains("permission denied"), "{out}{err}");

    // Root may do everything, including turning auth off again; a token
    // is good for --auth-token-ttl only.
    let mut root = as_user(&ep, "root", "rootpwd").await.unwrap();
    root.put("b1", "root", None).await.unwrap();
    assert!(root
        .user_list()
        .await
        .unwrap()
        .users()
        .contains(&"alice".to_string()));
    if !support::is_etcd() {
        // (etcd 3.4's simple tokens outlive their TTL here: its keeper
        // only sweeps them now and then.)
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(
            message(alice.get("a1", None).await.unwrap_err()),
            "etcdserver: invalid auth token"
        );
    }
    let mut root = as_user(&ep, "root", "rootpwd").await.unwrap();
    assert_eq!(
        message(root.user_delete("root").await.unwrap_err()),
        "etcdserver: invalid auth management"
    );
    root.auth_disable().await.unwrap();
    c.put("a1", "free again", None).await.unwrap();
    assert_eq!(
        message(
            as_user(&ep, "root", "rootpwd")
                .await
                .map(|_| ())
                .unwrap_err()
        ),
        "etcdserver: authentication is not enabled"
    );
    c.role_revoke_permission("reader", "w", None).await.unwrap();
    assert_eq!(
        message(
            c.role_revoke_permission("reader", "w", None)
                .await
                .unwrap_err()
        ),
        "etcdserver: permission is not granted to the role"
    );
    c.user_revoke_role("alice", "reader").await.unwrap();
    assert_eq!(
        message(c.user_revoke_role("alice", "reader").await.unwrap_err()),
        "etcdserver: role is not granted to the user"
    );
    c.user_delete("alice").await.unwrap();
    assert_eq!(
        message(c.user_get("alice").await.unwrap_err()),
        "etcdserver: user name not found"
    );
}

/// etcd's checks that need more than the request's own key range: a lease
/// is revoked, or a key attached to it, only by a user who may write every
/// key attached to it already (without a token: "user name is empty" once
/// it has keys); a put or delete with prev_kv also needs read permission.
#[tokio::test]
async fn lease_revokes_and_prev_kv_need_permission_on_the_keys() {
    let (m, mut c) = started(&[]).await;
    let ep = m.endpoint();
    let perms = vec![
        Permission::read_write("b").with_prefix(),
        Permission::write("w").with_prefix(),
    ];
    support::add_root_and_user(&mut c, &ep, "bob", "bobpwd", "bobs", perms).await;
    let mine = c.lease_grant(600, None).await.unwrap().id();
    let shared = c.lease_grant(600, None).await.unwrap().id();
    let empty = c.lease_grant(600, None).await.unwrap().id();
    let opt = |l: i64| Some(PutOptions::new().with_lease(l));
    c.put("b1", "v", opt(mine)).await.unwrap();
    c.put("b2", "v", opt(shared)).await.unwrap();
    c.put("secret", "v", opt(shared)).await.unwrap();
    c.put("w1", "v", None).await.unwrap();
    support::enable_auth(&ep);
    let mut bob = as_user(&ep, "bob", "bobpwd").await.unwrap();
    let mut root = as_user(&ep, "root", "rootpwd").await.unwrap();

    // Attaching a key to a lease that holds a key bob may not write.
    assert_eq!(
        message(bob.put("b3", "v", opt(shared)).await.unwrap_err()),
        "etcdserver: permission denied"
    );
    bob.put("b3", "v", opt(mine)).await.unwrap();
    // prev_kv needs read permission, on a put and on a delete, also in a
    // txn's delete.
    assert_eq!(
        message(
            bob.put("w1", "v2", Some(PutOptions::new().with_prev_key()))
                .await
                .unwrap_err()
        ),
        "etcdserver: permission denied"
    );
    bob.put("w1", "v2", None).await.unwrap();
    assert_eq!(
        message(
            bob.delete("w1", Some(DeleteOptions::new().with_prev_key()))
                .await
                .unwrap_err()
        ),
        "etcdserver: permission denied"
    );
    let del = Txn::new().and_then(vec![TxnOp::delete(
        "w1",
        Some(DeleteOptions::new().with_prev_key()),
    )]);
    assert_eq!(
        message(bob.txn(del).await.unwrap_err()),
        "etcdserver: permission denied"
    );
    let r = bob
        .put(
            "b1",
            "v2",
            Some(PutOptions::new().with_prev_key().with_lease(mine)),
        )
        .await
        .unwrap();
    assert_eq!(r.prev_key().unwrap().value(), b"v");

    // Revokes: refused on a lease with a key bob may not write, and
    // without a token on any lease that has keys.
    assert_eq!(
        message(bob.lease_revoke(shared).await.unwrap_err()),
        "etcdserver: permission denied"
    );
    assert_eq!(
        message(c.lease_revoke(mine).await.unwrap_err()),
        "etcdserver: user name is empty"
    );
    c.lease_revoke(empty).await.unwrap();
    bob.lease_revoke(mine).await.unwrap();
    assert!(root.get("b1", None).await.unwrap().kvs().is_empty());
    root.lease_revoke(shared).await.unwrap();
    assert!(root.get("secret", None).await.unwrap().kvs().is_empty());
}

/// `--auth-token jwt,…` as etcd's e2e tests start it (an RSA key and its
/// certificate, RS256): tokens are JWTs with etcd's claims, any call with
/// one works until it expires (then "invalid auth token") or until the
/// auth store changes (then "revision of auth store is old"), and a token
/// signed with another key is refused.
#[tokio::test]
async fn jwt_tokens_sign_expire_and_go_old_as_etcds_do() {
    use base64::Engine;
    let d = tempfile::tempdir().unwrap();
    let p = |f: &str| d.path().join(f).to_str().unwrap().to_string();
    support::openssl(
        d.path(),
        &["genrsa", "-traditional", "-out", &p("jwt.key"), "2048"],
    );
    support::openssl(
        d.path(),
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &p("jwt.key"),
            "-subj",
            "/CN=jwt",
            "-days",
            "2",
            "-out",
            &p("jwt.crt"),
        ],
    );
    support::openssl(
        d.path(),
        &["genrsa", "-traditional", "-out", &p("other.key"), "2048"],
    );
    let opts = format!(
        "jwt,pub-key={},priv-key={},sign-method=RS256,ttl=2s",
        p("jwt.crt"),
        p("jwt.key")
    );
    let (m, mut c) = started(&["--auth-token", &opts]).await;
    let ep = m.endpoint();
    support::add_root_and_user(
        &mut c,
        &ep,
        "alice",
        "pw",
        "reader",
        vec![Permission::read_write("k")],
    )
    .await;
    support::enable_auth(&ep);
    let (ok, out, err) = etcdctl(&ep, &["--user", "alice:pw", "put", "k", "v"], None);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = etcdctl(
        &ep,
        &["--user", "alice:pw", "get", "k", "--print-value-only"],
        None,
    );
    assert!(ok && out.trim() == "v", "{out}{err}");

    // The token etcd would give: a JWT with its claims.
    let plain = Client::connect([ep.as_str()], None).await.unwrap();
    let alice_token = || async {
        plain
            .auth_client()
            .authenticate("alice".into(), "pw".into())
            .await
            .unwrap()
            .token()
            .to_string()
    };
    let token = alice_token().await;
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header: serde_json::Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["alg"], "RS256");
    let claims: serde_json::Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(claims["username"], "alice");
    assert!(claims["revision"].as_u64().unwrap() > 0, "{claims}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = claims["exp"].as_u64().unwrap();
    assert!(exp >= now + 1 && exp <= now + 3, "{claims}");

    // A client holding a token reads; a change to the auth store makes
    // its token old.
    let mut alice = as_user(&ep, "alice", "pw").await.unwrap();
    assert_eq!(alice.get("k", None).await.unwrap().kvs()[0].value(), b"v");
    let (ok, out, err) = etcdctl(
        &ep,
        &["--user", "root:rootpwd", "role", "add", "other"],
        None,
    );
    assert!(ok, "{out}{err}");
    assert_eq!(
        message(alice.get("k", None).await.unwrap_err()),
        "etcdserver: revision of auth store is old"
    );
    // A fresh token works until it expires (2 s).
    let mut alice = as_user(&ep, "alice", "pw").await.unwrap();
    alice.get("k", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(
        message(alice.get("k", None).await.unwrap_err()),
        "etcdserver: invalid auth token"
    );
    // Through the JSON gateway, a fresh token reads; the same claims
    // signed with another key are refused.
    let gw = |token: &str| -> String {
        support::http_request(
            &ep,
            "POST",
            "/v3/kv/range",
            &format!("Authorization: {token}\r\n"),
            r#"{"key":"aw=="}"#,
        )
    };
    let fresh = alice_token().await;
    let ok = gw(&fresh);
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.contains("\"dg==\""),
        "{ok}"
    );
    let other = format!("jwt,priv-key={},sign-method=RS256,ttl=1m", p("other.key"));
    let forger = keelson::jwt::Jwt::from_options(other.trim_start_matches("jwt")).unwrap();
    let fresh_claims: serde_json::Value =
        serde_json::from_slice(&b64.decode(fresh.split('.').nth(1).unwrap()).unwrap()).unwrap();
    let forged = forger
        .sign("alice", fresh_claims["revision"].as_u64().unwrap(), now)
        .unwrap();
    let refused = gw(&forged);
    assert!(
        refused.contains("etcdserver: invalid auth token"),
        "{refused}"
    );
}
