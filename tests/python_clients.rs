//! Python clients, unchanged, against the real binary: python-etcd3 (gRPC)
//! and etcd3gw (OpenStack's client for etcd's JSON gateway) run the scripts
//! in `tests/clients/`, which check every answer and exit non-zero on the
//! first wrong one; and three clients' own test suites run, unchanged,
//! against members pifpaf starts as those projects' CI starts etcd:
//! python-etcd3's, etcd3gw's and aetcd's. The clients live in the venvs
//! `target/pyclients` and `target/pyclients-aetcd` that
//! `scripts/install-deps.sh` makes, with python-etcd3's and aetcd's suites
//! taken from their source releases. Passes against etcd 3.4 too
//! (`KEELSON_TEST_SERVER=etcd`).

mod support;

use std::path::Path;
use std::process::Command;
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
    let mut cmd = Command::new(&py);
    cmd.arg(root.join(script)).args(args);
    run_until(cmd, script, limit);
}

/// Runs `cmd` (`support::run_for`); panics with its output unless it
/// exits 0 within `limit`.
fn run_until(cmd: Command, what: &str, limit: Duration) {
    let start = Instant::now();
    let (status, out, err) = support::run_for(cmd, limit);
    assert!(
        status.map(|s| s.success()).unwrap_or(false),
        "{what}: {status:?} after {:?}\nstdout:\n{out}\nstderr:\n{err}",
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

/// What pifpaf-started servers need to themselves: pifpaf's ports, 2379
/// to 2384, which the suites below use in turn.
static PIFPAF_PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `pifpaf -e PREFIX run etcd [--cluster] -- COMMAND...` in `dir`, with
/// the `etcd` pifpaf runs being keelson (a script that execs it with the
/// same arguments) unless the tests run against etcd; panics with the
/// output unless it passes within 10 minutes.
fn pifpaf(dir: &Path, prefix: &str, cluster: bool, command: &[&str], what: &str) {
    let _ports = PIFPAF_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target/pyclients");
    let tmp = tempfile::tempdir().unwrap();
    // pifpaf runs the first `etcd` on PATH: Debian's, or this script.
    let mut dirs = vec![venv.join("bin")];
    if !support::is_etcd() {
        use std::os::unix::fs::PermissionsExt;
        let shim = tmp.path().join("bin");
        std::fs::create_dir(&shim).unwrap();
        let etcd = shim.join("etcd");
        std::fs::write(
            &etcd,
            format!(
                "#!/bin/sh\nexec '{}' \"$@\"\n",
                env!("CARGO_BIN_EXE_keelson")
            ),
        )
        .unwrap();
        std::fs::set_permissions(&etcd, std::fs::Permissions::from_mode(0o755)).unwrap();
        dirs.insert(0, shim);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(dirs.into_iter().chain(std::env::split_paths(&path))).unwrap();
    let mut cmd = Command::new(venv.join("bin/pifpaf"));
    cmd.current_dir(dir)
        .env("PATH", path)
        .env("TMPDIR", tmp.path())
        .env_remove("ETCDCTL_ENDPOINTS")
        .args(["-e", prefix, "run", "etcd"]);
    if cluster {
        cmd.arg("--cluster");
    }
    cmd.arg("--").args(command);
    run_until(cmd, what, Duration::from_secs(600));
}

/// The venv's site-packages directory holding `package`.
fn site_packages(venv: &Path, package: &str) -> std::path::PathBuf {
    std::fs::read_dir(venv.join("lib"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.join(package).exists())
        .unwrap_or_else(|| panic!("{package} in {}'s site-packages", venv.display()))
}

/// python-etcd3 0.12.0's own `tests/test_etcd3.py`, as released, run the
/// way its project runs it (`pifpaf run etcd --cluster -- pytest`): pifpaf
/// starts three members with etcd's bootstrap flags and waits for "ready
/// to serve client requests"; the suite drives them with python-etcd3 and
/// etcdctl (KV, txn, watch, leases, locks, members, status, alarms,
/// defragment, hash, snapshot, auth) and reads serializably from one
/// member while it SIGSTOPs the other two. The members listen on pifpaf's
/// default ports, 2379 to 2384, as upstream's CI has them: some of the
/// suite's tests connect to `localhost:2379` whatever it is told.
#[test]
fn python_etcd3_own_test_suite_passes_against_three_members() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target/pyclients");
    let suite = venv.join("etcd3-0.12.0");
    assert!(
        suite.join("tests/test_etcd3.py").exists(),
        "{} is missing: scripts/install-deps.sh fetches it",
        suite.display()
    );
    // The suite mocks `etcdrpc` by that name, as its tox.ini's PYTHONPATH
    // (the package's own directory) lets it.
    let pythonpath = site_packages(&venv, "etcd3").join("etcd3");
    let pythonpath = format!("PYTHONPATH={}", pythonpath.display());
    pifpaf(
        &suite,
        "PYTHON",
        true,
        &[
            "env",
            &pythonpath,
            "python",
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_etcd3.py",
        ],
        "python-etcd3's test suite",
    );
}

/// etcd3gw 2.7.0's own tests (shipped in its wheel), run as its tox
/// environment runs them (`pifpaf -e TOOZ_TEST run etcd -- stestr run`;
/// pytest runs the same unittest cases): KV, leases, locks, watches,
/// status and members through etcd's JSON gateway on localhost:2379.
#[test]
fn etcd3gw_own_test_suite_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target/pyclients");
    let tests = site_packages(&venv, "etcd3gw").join("etcd3gw/tests");
    let tests = tests.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    pifpaf(
        tmp.path(),
        "TOOZ_TEST",
        false,
        &[
            "python",
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            tests,
        ],
        "etcd3gw's test suite",
    );
}

/// aetcd 1.0.0's own test suite (an asyncio client on grpcio), from its
/// source release, run as its Makefile's `testcluster` runs it (`pifpaf -e
/// TEST run etcd --cluster -- pytest --with-cluster`): KV, txn, watch,
/// leases, locks, members, maintenance and auth, against three members.
#[test]
fn aetcd_own_test_suite_passes_against_three_members() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let avenv = root.join("target/pyclients-aetcd");
    let suite = avenv.join("aetcd-1.0.0");
    assert!(
        suite.join("tests/integration/conftest.py").exists(),
        "{} is missing: scripts/install-deps.sh fetches it",
        suite.display()
    );
    let python = avenv.join("bin/python");
    pifpaf(
        &suite,
        "TEST",
        true,
        &[
            python.to_str().unwrap(),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            // Its coverage options need pytest-cov, which is left out.
            "-o",
            "addopts=",
            "--with-cluster",
            "tests",
        ],
        "aetcd's test suite",
    );
}
