//! The same KV behaviour through Debian's etcdctl 3.4, as an operator uses
//! it: each row is a command, its stdin, and the exact stdout (or the error
//! text) etcd gives. Checked against etcd with
//! `KEELSON_TEST_SERVER=etcd cargo test --test kv_etcdctl`.

mod support;

use support::{etcdctl, started};

/// (args, stdin, Ok(stdout) or Err(substring of stderr))
type Row = (
    &'static [&'static str],
    Option<&'static str>,
    Result<&'static str, &'static str>,
);

const TABLE: &[Row] = &[
    (&["put", "foo", "bar"], None, Ok("OK\n")),
    (&["get", "foo"], None, Ok("foo\nbar\n")),
    (
        &["put", "foo", "baz", "--prev-kv"],
        None,
        Ok("OK\nfoo\nbar\n"),
    ),
    (&["get", "foo", "--print-value-only"], None, Ok("baz\n")),
    (&["put", "a/1", "x"], None, Ok("OK\n")),
    (&["put", "a/2", "y"], None, Ok("OK\n")),
    (&["put", "a/3", "z"], None, Ok("OK\n")),
    (&["put", "b", "w"], None, Ok("OK\n")),
    (
        &["get", "a/", "--prefix", "--keys-only"],
        None,
        Ok("a/1\n\na/2\n\na/3\n\n"),
    ),
    (&["get", "a/1", "a/3"], None, Ok("a/1\nx\na/2\ny\n")),
    (
        &["get", "a/", "--prefix", "--limit", "2"],
        None,
        Ok("a/1\nx\na/2\ny\n"),
    ),
    (
        &[
            "get",
            "a/",
            "--prefix",
            "--sort-by",
            "VALUE",
            "--order",
            "DESCEND",
        ],
        None,
        Ok("a/3\nz\na/2\ny\na/1\nx\n"),
    ),
    (
        &["get", "a/2", "--from-key", "--keys-only"],
        None,
        Ok("a/2\n\na/3\n\nb\n\nfoo\n\n"),
    ),
    (
        &[
            "get",
            "a/",
            "--prefix",
            "--consistency",
            "s",
            "--print-value-only",
        ],
        None,
        Ok("x\ny\nz\n"),
    ),
    (&["del", "a/1", "--prev-kv"], None, Ok("1\na/1\nx\n")),
    (&["del", "a/", "--prefix"], None, Ok("2\n")),
    (&["del", "nothing"], None, Ok("0\n")),
    (
        &["txn", "--interactive=false"],
        Some("value(\"foo\") = \"baz\"\n\nput t1 yes\nget b\n\nput t1 no\n\n"),
        Ok("SUCCESS\n\nOK\n\nb\nw\n"),
    ),
    (
        &["txn", "--interactive=false"],
        Some("version(\"foo\") > \"5\"\n\nput t2 yes\n\nput t2 no\ndel b\n\n"),
        Ok("FAILURE\n\nOK\n\n1\n"),
    ),
    (&["get", "t1", "--print-value-only"], None, Ok("yes\n")),
    (&["get", "t2", "--print-value-only"], None, Ok("no\n")),
    (
        &["put", "", "v"],
        None,
        Err("etcdserver: key is not provided"),
    ),
    (
        &["get", "foo", "--rev", "100000"],
        None,
        Err("etcdserver: mvcc: required revision is a future revision"),
    ),
    (
        &["put", "l", "v", "--lease", "1234"],
        None,
        Err("etcdserver: requested lease not found"),
    ),
];

#[test]
fn etcdctl_table() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (m, _c) = rt.block_on(started(&[]));
    let ep = m.endpoint();
    for (args, stdin, want) in TABLE {
        let (ok, out, err) = etcdctl(&ep, args, *stdin);
        match want {
            Ok(stdout) => {
                assert!(ok, "{args:?} failed: {err}");
                assert_eq!(out, *stdout, "{args:?}");
            }
            Err(msg) => {
                assert!(!ok, "{args:?} should fail, printed {out}");
                assert!(err.contains(msg), "{args:?}: {err}");
            }
        }
    }
}

#[test]
fn etcdctl_compaction_and_endpoint_commands() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (m, mut c) = rt.block_on(started(&[]));
    let ep = m.endpoint();
    let r1 = rt
        .block_on(c.put("k", "1", None))
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let r2 = rt
        .block_on(c.put("k", "2", None))
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let (ok, out, err) = etcdctl(&ep, &["compact", &r2.to_string()], None);
    assert!(ok, "{err}");
    assert_eq!(out, format!("compacted revision {r2}\n"));
    let (ok, _, err) = etcdctl(&ep, &["get", "k", "--rev", &r1.to_string()], None);
    assert!(
        !ok && err.contains("etcdserver: mvcc: required revision has been compacted"),
        "{err}"
    );

    let (ok, out, err) = etcdctl(&ep, &["endpoint", "health"], None);
    assert!(ok, "{err}");
    assert!(
        out.contains("is healthy") || err.contains("is healthy"),
        "{out}{err}"
    );
    let (ok, out, err) = etcdctl(&ep, &["endpoint", "status", "-w", "fields"], None);
    assert!(ok, "{err}");
    for field in [
        "\"ClusterID\"",
        "\"MemberID\"",
        "\"Revision\"",
        "\"RaftTerm\"",
        "\"Leader\"",
        "\"RaftIndex\"",
    ] {
        assert!(out.contains(field), "{field} missing in {out}");
    }
    let member = out
        .lines()
        .find(|l| l.starts_with("\"MemberID\""))
        .unwrap()
        .split(':')
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    let leader = out
        .lines()
        .find(|l| l.starts_with("\"Leader\""))
        .unwrap()
        .split(':')
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(member, leader, "one member leads itself");
    let (ok, out, err) = etcdctl(&ep, &["member", "list"], None);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("started, default, http://127.0.0.1:")) && out.contains(&ep),
        "{out}"
    );
}

/// `--config-file`: a member runs from etcd's YAML configuration file
/// alone; the command-line flags that come with it (the test harness's own
/// ports and data dir, and a bogus name) are ignored, as etcd ignores them.
#[test]
fn a_member_runs_from_an_etcd_yaml_config_file() {
    let mut m = support::Member::new(&[]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("from-file");
    let client = format!("http://{}", m.endpoint());
    let peer = m.peer_url();
    let yaml = format!(
        "# etcd.conf.yml\n\
         name: 'from-file'\n\
         data-dir: {}\n\
         wal-dir:\n\
         snapshot-count: 10000\n\
         heartbeat-interval: 100\n\
         election-timeout: 1000\n\
         listen-peer-urls: {peer}\n\
         listen-client-urls: {client}\n\
         initial-advertise-peer-urls: {peer}\n\
         advertise-client-urls: {client}\n\
         discovery:\n\
         discovery-fallback: 'proxy'\n\
         initial-cluster: from-file={peer}\n\
         initial-cluster-token: 'etcd-cluster'\n\
         initial-cluster-state: 'new'\n\
         client-transport-security:\n  cert-file:\n  client-cert-auth: false\n\
         peer-transport-security:\n  auto-tls: false\n\
         log-outputs: [stderr]\n\
         auto-compaction-mode: periodic\n\
         auto-compaction-retention: \"1\"\n",
        data.display()
    );
    let path = dir.path().join("etcd.conf.yml");
    std::fs::write(&path, yaml).unwrap();
    m.set_extra(&[
        "--config-file",
        path.to_str().unwrap(),
        "--name",
        "from-flag",
    ]);
    assert!(m.start().is_none(), "{}", m.log_text());
    let ep = m.endpoint();
    let (ok, out, err) = etcdctl(&ep, &["put", "k", "v"], None);
    assert!(ok && out == "OK\n", "{out}{err}");
    let (ok, out, err) = etcdctl(&ep, &["member", "list"], None);
    assert!(ok && out.contains(", from-file, "), "{out}{err}");
    assert!(data.is_dir(), "the file's data dir is used");
    assert!(!m.data().exists(), "the command line's data dir is not");
}
