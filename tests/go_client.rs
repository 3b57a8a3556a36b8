//! etcd's Go client (clientv3, the client kube-apiserver uses), through
//! etcd 3.4's own runnable examples: `clientv3`'s and
//! `clientv3/concurrency`'s `Example*` functions, unchanged, from Debian's
//! golang-etcd-server-dev (which `scripts/install-deps.sh` installs with
//! golang-go). Go checks each example's printed output against its
//! `// Output:` comment. The examples dial `localhost:2379`, `:22379` and
//! `:32379` (etcd's Procfile cluster), so this test runs three members on
//! those client ports; etcd's own test harness for them starts an
//! in-process cluster instead, which this test's `TestMain` leaves out.
//! Passes against etcd 3.4 too (`KEELSON_TEST_SERVER=etcd`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::{cluster, start_all, Member};

const GOCODE: &str = "/usr/share/gocode";

/// Copies the `example*_test.go` files of `from` (a package of etcd's Go
/// source) into `to` with a `TestMain` that runs them as they are, plus
/// `extra` (declarations the left-out harness made); returns the compiled
/// test binary.
fn build_examples(work: &Path, from: &str, to: &str, extra: &str) -> PathBuf {
    let src = Path::new(GOCODE).join("src/go.etcd.io/etcd").join(from);
    let dir = work.join("src/keelsonexamples").join(to);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut package = String::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.starts_with("example") && name.ends_with("_test.go") {
            let text = std::fs::read_to_string(src.join(&name)).unwrap();
            if package.is_empty() {
                package = text
                    .lines()
                    .find_map(|l| l.strip_prefix("package "))
                    .unwrap()
                    .to_string();
            }
            std::fs::write(dir.join(&name), text).unwrap();
        }
    }
    assert!(!package.is_empty(), "no examples in {}", src.display());
    std::fs::write(
        dir.join("main_test.go"),
        format!(
            "package {package}\n\nimport (\n\t\"os\"\n\t\"testing\"\n)\n\n\
             func TestMain(m *testing.M) {{ os.Exit(m.Run()) }}\n{extra}"
        ),
    )
    .unwrap();
    let bin = work.join(format!("{to}.test"));
    let mut cmd = Command::new("go");
    cmd.current_dir(&dir)
        .args(["test", "-c", "-o"])
        .arg(&bin)
        .arg(".")
        .env("GO111MODULE", "off")
        .env(
            "GOPATH",
            format!("{}:{GOCODE}", work.to_str().expect("utf-8 target dir")),
        )
        .env("GOCACHE", work.join("cache"))
        .env("GOFLAGS", "");
    let (status, out, err) = support::run_for(cmd, Duration::from_secs(600));
    assert!(
        status.map(|s| s.success()).unwrap_or(false),
        "go test -c {from}: {status:?}\n{out}{err}"
    );
    bin
}

/// Runs the examples of a compiled test binary; returns how many passed.
fn run_examples(bin: &Path, ms: &[Member]) -> usize {
    let mut cmd = Command::new(bin);
    cmd.args(["-test.run", "Example", "-test.v"]);
    let (status, out, err) = support::run_for(cmd, Duration::from_secs(300));
    let logs: String = ms.iter().map(|m| m.log_text()).collect();
    assert!(
        status.map(|s| s.success()).unwrap_or(false) && !out.contains("--- FAIL"),
        "{}: {status:?}\n{out}{err}\nserver logs:\n{logs}",
        bin.display()
    );
    out.matches("--- PASS: Example").count()
}

#[test]
fn etcd_go_client_examples_pass_against_three_members() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = root.join("target/go-examples");
    assert!(
        Path::new(GOCODE)
            .join("src/go.etcd.io/etcd/clientv3/example_kv_test.go")
            .exists(),
        "no etcd Go source: run scripts/install-deps.sh"
    );
    let cv3 = build_examples(&work, "clientv3", "clientv3", "");
    let conc = build_examples(
        &work,
        "clientv3/concurrency",
        "concurrency",
        "\nvar endpoints = []string{\"localhost:2379\", \"localhost:22379\", \"localhost:32379\"}\n",
    );

    let mut ms: Vec<Member> = cluster(3, &["--cores", "1"])
        .into_iter()
        .zip([2379, 22379, 32379])
        .map(|(m, port)| m.on_client_port(port))
        .collect();
    start_all(&mut ms);
    // The examples Go runs (those with an output to check): clientv3's
    // auth (users, roles, a denied put), member list, put error handling,
    // get (plain, at a revision, sorted by prefix), delete, txn, lease
    // revoke and keep-alives (stream and once), and the client's gRPC
    // metrics; concurrency's election, mutex and STM.
    let n = run_examples(&cv3, &ms);
    assert!(n >= 12, "{n} clientv3 examples passed");
    let n = run_examples(&conc, &ms);
    assert!(n >= 3, "{n} concurrency examples passed");
}
