//! The test harness: starts a real server on free loopback ports with a
//! temporary data dir. `KEELSON_TEST_SERVER=etcd` runs Debian's etcd with
//! the same flags instead, so every expectation can be checked against the
//! real thing.
#![allow(dead_code)]

pub mod faults;
pub mod linearizable;

use etcd_client::Client;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub fn is_etcd() -> bool {
    std::env::var("KEELSON_TEST_SERVER").as_deref() == Ok("etcd")
}

pub struct Member {
    dir: tempfile::TempDir,
    port: u16,
    /// The peer port other members dial (a proxy's, with faults).
    peer: u16,
    /// The port this member listens on for peers.
    peer_listen: u16,
    /// (name, --initial-cluster) when part of a cluster.
    cluster: Option<(String, String)>,
    extra: Vec<String>,
    pub child: Option<Child>,
    /// "ready" lines in the (appended) log from earlier runs.
    readies: usize,
    /// Runs Debian's etcd whatever `KEELSON_TEST_SERVER` says.
    etcd: bool,
    /// "http", or "https" for peer TLS (`cluster_with_peer_tls`).
    peer_scheme: &'static str,
    /// The host its peer URLs name ("localhost" with peer TLS).
    peer_host: &'static str,
}

impl Member {
    pub fn new(extra: &[&str]) -> Member {
        let peer = free_port();
        Member {
            peer,
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            peer_listen: peer,
            cluster: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            readies: 0,
            etcd: is_etcd(),
            peer_scheme: "http",
            peer_host: "127.0.0.1",
        }
    }
    /// The same member on client port `port` (a fixed port some client
    /// test suites assume, such as etcd's 2379).
    #[allow(dead_code)]
    pub fn on_client_port(mut self, port: u16) -> Member {
        self.port = port;
        self
    }
    /// The flags after keelson's own for the next start.
    #[allow(dead_code)]
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }
    /// The same member run by Debian's etcd (tests that move data between
    /// the two).
    pub fn with_etcd(mut self) -> Member {
        self.etcd = true;
        self
    }
    /// A new member for a running cluster (`--initial-cluster-state
    /// existing`), named `name`: its `--initial-cluster` lists `existing`
    /// and itself. Add it with `member add` before starting it.
    pub fn joining(existing: &[&Member], name: &str, extra: &[&str]) -> Member {
        let mut extra: Vec<&str> = extra.to_vec();
        extra.extend(["--initial-cluster-state", "existing"]);
        let mut m = Member::new(&extra);
        if let Some(e) = existing.first() {
            m.peer_scheme = e.peer_scheme;
            m.peer_host = e.peer_host;
        }
        let mut ic: Vec<String> = existing
            .iter()
            .map(|e| {
                let n = e.cluster.as_ref().map(|c| c.0.clone()).unwrap_or_default();
                format!("{n}={}", e.peer_url())
            })
            .collect();
        ic.push(format!("{name}={}", m.peer_url()));
        m.cluster = Some((name.to_string(), ic.join(",")));
        m
    }
    /// The peer URL other members reach this one at.
    pub fn peer_url(&self) -> String {
        format!("{}://{}:{}", self.peer_scheme, self.peer_host, self.peer)
    }
    pub fn name(&self) -> String {
        self.cluster
            .as_ref()
            .map(|c| c.0.clone())
            .unwrap_or_default()
    }
    /// Waits up to `limit` for the process to exit on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait().unwrap() {
                    self.child = None;
                    return Some(st);
                }
            } else {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    /// Starts the binary without waiting for it to serve (one that is not
    /// expected to).
    #[allow(dead_code)]
    pub fn launch(&mut self) {
        self.spawn();
    }
    /// Starts the binary and waits until it serves; returns the exit status
    /// instead if it stops first.
    pub fn start(&mut self) -> Option<ExitStatus> {
        self.spawn();
        self.wait_ready()
    }
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("log"))
            .unwrap();
        let c = format!("http://127.0.0.1:{}", self.port);
        let p = self.peer_url();
        let pl = format!(
            "{}://{}:{}",
            self.peer_scheme, self.peer_host, self.peer_listen
        );
        let bin = if self.etcd {
            "etcd"
        } else {
            env!("CARGO_BIN_EXE_keelson")
        };
        let child = Command::new(bin)
            .args([
                "--data-dir",
                self.data().to_str().unwrap(),
                "--listen-client-urls",
                &c,
                "--advertise-client-urls",
                &c,
            ])
            .args([
                "--listen-peer-urls",
                &pl,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args(match &self.cluster {
                None => vec!["--initial-cluster".to_string(), format!("default={p}")],
                Some((name, ic)) => vec![
                    "--name".to_string(),
                    name.clone(),
                    "--initial-cluster".to_string(),
                    ic.clone(),
                    "--initial-cluster-token".to_string(),
                    "keelson-test".to_string(),
                ],
            })
            .args(self.server_args())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
    }
    fn wait_ready(&mut self) -> Option<ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut child = self.child.take().expect("spawned");
        while Instant::now() < deadline {
            if let Some(st) = child.try_wait().unwrap() {
                return Some(st);
            }
            if self.log_text().matches("ready to serve").count() > self.readies {
                self.readies += 1;
                self.child = Some(child);
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        panic!("server did not become ready:\n{}", self.log_text());
    }
    /// The extra flags, less keelson's own when the server is etcd.
    fn server_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut it = self.extra.iter();
        while let Some(a) = it.next() {
            if self.etcd
                && (a == "--shards"
                    || a == "--cores"
                    || a == "--experimental-snapshot-catchup-entries")
            {
                it.next();
                continue;
            }
            out.push(a.clone());
        }
        out
    }
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
    pub async fn client(&self) -> Client {
        Client::connect([self.endpoint()], None).await.unwrap()
    }
}

/// A child process killed when dropped, so a failing test leaves none
/// behind.
#[allow(dead_code)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.log_text());
        }
    }
}

/// A loopback port nobody listens on, picked below the kernel's ephemeral
/// port range when there is room there: a port the kernel handed out (port
/// 0) can be taken again, between the pick and the server's bind, as the
/// source port of some outgoing connection, such as a member dialing its
/// peers. Ports below the range are only ever taken by a bind, and this
/// process hands each out once (other test binaries run one at a time).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    if ephemeral_low > LOW + 1000 {
        let span = ephemeral_low - LOW;
        let start = std::process::id().wrapping_mul(7919) % span;
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            if n >= span {
                break;
            }
            let port = (LOW + (start + n) % span) as u16;
            // The fixed ports other clients' suites run members on.
            if [12379, 12380, 22379, 22380, 23790, 32379, 32380].contains(&port) {
                continue;
            }
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `n` members of one cluster (not started yet), on free loopback ports.
pub fn cluster(n: usize, extra: &[&str]) -> Vec<Member> {
    let mut ms: Vec<Member> = (0..n).map(|_| Member::new(extra)).collect();
    set_initial_cluster(&mut ms);
    ms
}

/// Like `cluster`, each member with flags of its own.
#[allow(dead_code)]
pub fn cluster_each(extras: &[&[&str]]) -> Vec<Member> {
    let mut ms: Vec<Member> = extras.iter().map(|e| Member::new(e)).collect();
    set_initial_cluster(&mut ms);
    ms
}

/// Gives every member of `ms` its name and the `--initial-cluster` that
/// lists them all at their advertised peer ports.
fn set_initial_cluster(ms: &mut [Member]) {
    let ic: Vec<String> = ms
        .iter()
        .enumerate()
        .map(|(i, m)| format!("m{i}={}", m.peer_url()))
        .collect();
    let ic = ic.join(",");
    for (i, m) in ms.iter_mut().enumerate() {
        m.cluster = Some((format!("m{i}"), ic.clone()));
    }
}

/// Like `cluster`, with https peer URLs (peer TLS); `extra` carries each
/// member's `--peer-*` flags.
#[allow(dead_code)]
pub fn cluster_with_peer_tls(extras: &[Vec<String>]) -> Vec<Member> {
    let mut ms: Vec<Member> = extras
        .iter()
        .map(|e| {
            let e: Vec<&str> = e.iter().map(|s| s.as_str()).collect();
            let mut m = Member::new(&e);
            m.peer_scheme = "https";
            m.peer_host = "localhost";
            m
        })
        .collect();
    set_initial_cluster(&mut ms);
    ms
}

/// Member `i` of `ms` listens on and advertises `host` in its peer URLs.
#[allow(dead_code)]
pub fn set_peer_host(ms: &mut [Member], i: usize, host: &'static str) {
    ms[i].peer_host = host;
    set_initial_cluster(ms);
}

/// Like `cluster`, with every member's peer traffic through `PeerProxy`.
pub async fn cluster_with_proxy(n: usize, extra: &[&str]) -> (Vec<Member>, faults::PeerProxy) {
    let mut ms = cluster(n, extra);
    let proxy = faults::PeerProxy::default();
    for m in ms.iter_mut() {
        m.peer_listen = free_port();
        m.peer = proxy.forward(m.peer, m.peer_listen).await;
    }
    set_initial_cluster(&mut ms);
    (ms, proxy)
}

/// The index in `ms` of the member that the members agree leads (each
/// asked by Status), waiting up to 20 s for them to agree.
pub async fn leader_of(ms: &[&Member]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let mut seen = Vec::new();
        for (i, m) in ms.iter().enumerate() {
            if let Ok(mut c) = Client::connect([m.endpoint()], None).await {
                if let Ok(st) = c.status().await {
                    seen.push((i, st.header().unwrap().member_id(), st.leader()));
                }
            }
        }
        if seen.len() == ms.len() {
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

/// Starts every member without waiting for each in turn (a member of a new
/// cluster serves only once a quorum runs).
pub fn start_all(ms: &mut [Member]) {
    for m in ms.iter_mut() {
        m.spawn();
    }
    for m in ms.iter_mut() {
        if let Some(st) = m.wait_ready() {
            panic!("member exited at start ({st}):\n{}", m.log_text());
        }
    }
}

/// `start_all` off the async runtime's thread, for members whose peer
/// traffic goes through a `PeerProxy` on that runtime: a member says it is
/// ready only once it knows a leader, which needs the proxy to run.
#[allow(dead_code)]
pub async fn start_all_behind_proxy(mut ms: Vec<Member>) -> Vec<Member> {
    tokio::task::spawn_blocking(move || {
        start_all(&mut ms);
        ms
    })
    .await
    .unwrap()
}

/// Starts a fresh member and connects a client to it.
pub async fn started(extra: &[&str]) -> (Member, Client) {
    let mut m = Member::new(extra);
    if let Some(st) = m.start() {
        panic!("server exited at start ({st}):\n{}", m.log_text());
    }
    let c = m.client().await;
    (m, c)
}

/// For auth tests: adds `root` (password `rootpwd`, with the root role, as
/// etcdctl adds it) and `user` (password `pw`) holding one role, `role`,
/// with `perms`. Auth stays off until `enable_auth`.
#[allow(dead_code)]
pub async fn add_root_and_user(
    c: &mut Client,
    ep: &str,
    user: &str,
    pw: &str,
    role: &str,
    perms: Vec<etcd_client::Permission>,
) {
    let (ok, out, err) = etcdctl(ep, &["user", "add", "root:rootpwd"], None);
    assert!(ok, "{out}{err}");
    c.user_add(user, pw, None).await.unwrap();
    c.role_add(role).await.unwrap();
    for p in perms {
        c.role_grant_permission(role, p).await.unwrap();
    }
    c.user_grant_role(user, role).await.unwrap();
}

/// Turns auth on through etcdctl.
#[allow(dead_code)]
pub fn enable_auth(ep: &str) {
    let (ok, out, err) = etcdctl(ep, &["auth", "enable"], None);
    assert!(ok, "{out}{err}");
}

/// Runs etcdctl (v3 API) against `ep`; returns (success, stdout, stderr).
pub fn etcdctl(ep: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={ep}"))
        .arg("--command-timeout=5s")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .expect("etcdctl is installed (scripts/install-deps.sh)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd` in a process group of its own, its output drained while it
/// runs (a full pipe cannot stall it); on `limit` the whole group is
/// killed, servers it started included. Returns (exit status, `None` when
/// killed; stdout; stderr).
#[allow(dead_code)]
pub fn run_for(mut cmd: Command, limit: Duration) -> (Option<ExitStatus>, String, String) {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > limit {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, out.join().unwrap(), err.join().unwrap())
}

/// A plain HTTP/1.1 request to `addr` (host:port, or a client URL), with
/// `headers` (each line ending in CRLF) besides Host, Connection and
/// Content-Length, and `body`: the whole response as text.
#[allow(dead_code)]
pub fn http_request(addr: &str, method: &str, path: &str, headers: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let addr = addr.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A plain HTTP/1.1 GET of `path` from `addr` (host:port, or a client
/// URL): the status code and the body.
#[allow(dead_code)]
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let out = http_request(addr, "GET", path, "", "");
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|b| b.1)
        .unwrap_or("")
        .to_string();
    (code, body)
}

/// Runs openssl in `dir`; panics with its error output unless it succeeds.
#[allow(dead_code)]
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
