//! The Rust `etcd-client` crate's own test suite (`tests/` of the version
//! this project's Cargo.lock pins, taken from cargo's registry copy of its
//! source), unchanged, against the real binary: its CI starts one etcd on
//! localhost:2379 with a 2-second auth token TTL and a `root` user
//! (password `rootpwd`, role `root`), and so does this test, then runs
//! `cargo test` on a copy of the crate (its own target directory under
//! `target/`; the first run compiles it). Passes against etcd 3.4 too
//! (`KEELSON_TEST_SERVER=etcd`); the suite's tests that need etcd 3.7 or a
//! four-node cluster are ignored by the crate itself.
//!
//! Also the `etcd-rs` crate's own suite (its source release from crates.io,
//! which `scripts/install-deps.sh` unpacks into `target/etcd-rs-suite`):
//! its tests call `make` targets that run a 3-member cluster with
//! docker-compose; `tests/clients/etcd_rs/Makefile` runs the same three
//! members as processes of the binary under test instead.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::{etcdctl, Member};

/// The etcd-client version Cargo.lock pins.
fn pinned_version(root: &Path) -> String {
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap();
    let at = lock
        .find("name = \"etcd-client\"\nversion = \"")
        .expect("etcd-client in Cargo.lock");
    let rest = &lock[at..].split_once("version = \"").unwrap().1;
    rest.split('"').next().unwrap().to_string()
}

/// cargo's unpacked source of `crate_dir` (name-version) in its registry.
fn registry_source(crate_dir: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo"));
    std::fs::read_dir(home.join("registry/src"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(crate_dir))
        .find(|p| p.join("tests/client.rs").exists())
        .unwrap_or_else(|| panic!("{crate_dir}'s source is not in cargo's registry"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// Tests passed, summed over `cargo test`'s "test result: ok." lines.
fn passed(out: &str) -> usize {
    out.lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
        .sum()
}

#[test]
fn etcd_client_crates_own_test_suite_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let name = format!("etcd-client-{}", pinned_version(root));
    let work = root.join("target/etcd-client-suite");
    let suite = work.join(&name);
    if !suite.join("tests/client.rs").exists() {
        let _ = std::fs::remove_dir_all(&suite);
        copy_dir(&registry_source(&name), &suite);
    }

    let mut m = Member::new(&["--auth-token-ttl", "2"]).on_client_port(2379);
    assert!(m.start().is_none(), "{}", m.log_text());
    let ep = m.endpoint();
    for args in [
        &["user", "add", "root", "--new-user-password=rootpwd"][..],
        &["user", "grant-role", "root", "root"][..],
    ] {
        let (ok, out, err) = etcdctl(&ep, args, None);
        assert!(ok, "{args:?}: {out}{err}");
    }

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&suite)
        .args(["test", "--tests", "--target-dir"])
        .arg(work.join("target"))
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR");
    // Compiling the crate and its dependencies the first time takes most.
    let (status, out, err) = support::run_for(cmd, Duration::from_secs(900));
    let passed = passed(&out);
    assert!(
        status.map(|s| s.success()).unwrap_or(false) && passed >= 20,
        "etcd-client's suite: {status:?}, {passed} passed\nstdout:\n{out}\nstderr:\n{err}\nserver log:\n{}",
        m.log_text()
    );
    drop(m);
}

/// The etcd-rs crate's own tests (kv, watch, TLS with client
/// certificates, and failover: members stopped and started under the
/// client), against three members. One test is skipped against keelson:
/// `test_get_all` asserts etcd's revision numbers (2, 3, …) for the first
/// writes of a new cluster, where keelson's revision is the raft index
/// (README). Passes whole against etcd 3.4 (`KEELSON_TEST_SERVER=etcd`).
#[test]
fn etcd_rs_crates_own_test_suite_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = root.join("target/etcd-rs-suite");
    let suite = work.join("etcd-rs-1.0.1");
    assert!(
        suite.join("tests/failover.rs").exists(),
        "no etcd-rs source in {}: run scripts/install-deps.sh",
        suite.display()
    );
    std::fs::copy(
        root.join("tests/clients/etcd_rs/Makefile"),
        suite.join("Makefile"),
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(suite.join("run"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&suite)
        .args(["test", "--tests", "--no-fail-fast", "--target-dir"])
        .arg(work.join("target"))
        .args(["--", "--test-threads=1"])
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR");
    if support::is_etcd() {
        cmd.env("SERVER", "etcd").env("SERVER_FLAGS", "");
    } else {
        cmd.args(["--skip", "test_get_all"])
            .env("SERVER", env!("CARGO_BIN_EXE_keelson"))
            .env("SERVER_FLAGS", "--cores 1");
    }
    let (status, out, err) = support::run_for(cmd, Duration::from_secs(1200));
    let passed = passed(&out);
    let logs: String = ["etcd-1", "etcd-2", "etcd-3"]
        .iter()
        .map(|n| {
            let log = std::fs::read_to_string(suite.join("run").join(format!("{n}.log")));
            format!("--- {n}:\n{}\n", log.unwrap_or_default())
        })
        .collect();
    assert!(
        status.map(|s| s.success()).unwrap_or(false) && passed >= 12,
        "etcd-rs's suite: {status:?}, {passed} passed\nstdout:\n{out}\nstderr:\n{err}\nmember logs:\n{logs}"
    );
}
