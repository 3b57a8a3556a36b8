//! Python clients, unchanged, against the real binary: python-etcd3 (gRPC)
//! and etcd3gw (OpenStack's client for etcd's JSON gateway) run the scripts
//! in `tests/clients/`, which check every answer and exit non-zero on the
//! first wrong one.
//! The client lives in the venv `target/pyclients` that
//! `scripts/install-deps.sh` makes. Passes against etcd 3.4 too
//! (`KEELSON_TEST_SERVER=etcd`).

mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::Member;

/// Runs a script with the venv's python and `args`; panics with its output
/// unless it exits 0 within `limit`.
fn run_python(script: &str, args: &[&str], limit: Duration) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let py = root.join("target/pyclients/bin/python");
    assert!(
        py.exists(),
        "{} is missing: scripts/install-deps.sh makes it",
        py.display()
    );
    let mut child = Command::new(&py)
        .arg(root.join(script))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        status.map(|s| s.success()).unwrap_or(false),
        "{script}: {status:?} after {:?}\nstdout:\n{out}\nstderr:\n{err}",
        start.elapsed()
    );
}

#[test]
fn etcd3gw_works_through_the_json_gateway() {
    let mut m = Member::new(&[]);
    assert!(m.start().is_none(), "{}", m.log_text());
    let ep = m.endpoint();
    let port = ep.rsplit(':').next().unwrap();
    run_python(
        "tests/clients/etcd3gw_smoke.py",
        &[port],
        Duration::from_secs(60),
    );
}

#[test]
fn python_etcd3_works_over_grpc() {
    let mut m = Member::new(&[]);
    assert!(m.start().is_none(), "{}", m.log_text());
    let ep = m.endpoint();
    let port = ep.rsplit(':').next().unwrap();
    run_python(
        "tests/clients/etcd3_smoke.py",
        &[port],
        Duration::from_secs(60),
    );
}
