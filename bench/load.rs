//! keelson-bench: an etcd v3 load generator that speaks gRPC over HTTP/2
//! directly (h2 on glommio sockets, prost messages), so that on a small
//! machine the load generator, not the server, is the cheap side.
//!
//! Closed loop: `--clients` requests in flight in total, spread over
//! `--conns` HTTP/2 connections and `--threads` executors. Stops after
//! `--total` requests or `--duration-secs`, whichever comes first. Reports
//! throughput, latency percentiles (hdrhistogram), and CPU time per
//! operation of the server (`--server-pid`) and of the bench itself.
//!
//! `--workload watch`: `--watchers` watchers on one prefix, spread over
//! `--watch-streams` Watch streams (on their own executor thread and
//! `--conns` connections), then the put load above on keys under that
//! prefix. Each value starts with its send time, so every event received
//! gives one delivery latency. Reports events expected and received,
//! events/s, event latency percentiles, and the server's RSS growth per
//! watcher.

use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use keelson::proto::etcdserverpb::{
    request_op, watch_request, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest,
    WatchRequest, WatchResponse,
};
use prost::Message;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::compat::FuturesAsyncReadCompatExt;

#[derive(Clone, Debug)]
struct Opts {
    endpoints: Vec<String>,
    conns: usize,
    clients: usize,
    total: u64,
    duration: Duration,
    key_size: usize,
    val_size: usize,
    key_space: u64,
    workload: String,
    threads: usize,
    /// Server processes (a cluster's members): CPU and RSS are summed.
    server_pids: Vec<u32>,
    prefill: u64,
    sequential_keys: bool,
    json: bool,
    watchers: u64,
    watch_streams: usize,
    drain: Duration,
    /// How long after the watchers are created the server's RSS is read
    /// again (memory the server frees after the burst), 0 for not at all.
    watch_settle: Duration,
}

fn usage() -> ! {
    eprintln!(
        "usage: keelson-bench [--endpoints 127.0.0.1:2379] [--conns 8] [--clients 64] [--total 100000]\n\
         [--duration-secs 60] [--key-size 8] [--val-size 256] [--key-space 100000]\n\
         [--workload put|range|range-serializable|txn-put|mixed|lease-keepalive|watch] [--threads 1] [--server-pid PID[,PID...]]\n\
         [--prefill N] [--sequential-keys] [--json]\n\
         watch workload: --workload watch [--watchers 1000] [--watch-streams 8] [--drain-secs 10] [--watch-settle-secs 0]"
    );
    std::process::exit(2)
}

fn parse() -> Opts {
    let mut o = Opts {
        endpoints: vec!["127.0.0.1:2379".into()],
        conns: 8,
        clients: 64,
        total: 100_000,
        duration: Duration::from_secs(60),
        key_size: 8,
        val_size: 256,
        key_space: 100_000,
        workload: "put".into(),
        threads: 1,
        server_pids: Vec::new(),
        prefill: 0,
        sequential_keys: false,
        json: false,
        watchers: 1000,
        watch_streams: 8,
        drain: Duration::from_secs(10),
        watch_settle: Duration::ZERO,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let (name, inline) = match args[i].split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (args[i].clone(), None),
        };
        let name = name.trim_start_matches('-').to_string();
        if name == "json" || name == "sequential-keys" {
            if name == "json" {
                o.json = true
            } else {
                o.sequential_keys = true
            }
            i += 1;
            continue;
        }
        let v = match inline {
            Some(v) => v,
            None => {
                i += 1;
                args.get(i).cloned().unwrap_or_else(|| usage())
            }
        };
        let num = |v: &str| v.parse::<u64>().unwrap_or_else(|_| usage());
        match name.as_str() {
            "endpoints" => {
                o.endpoints = v
                    .split(',')
                    .map(|s| s.trim_start_matches("http://").to_string())
                    .collect()
            }
            "conns" => o.conns = num(&v).max(1) as usize,
            "clients" => o.clients = num(&v).max(1) as usize,
            "total" => o.total = num(&v),
            "duration-secs" => o.duration = Duration::from_secs(num(&v)),
            "key-size" => o.key_size = num(&v).max(1) as usize,
            "val-size" => o.val_size = num(&v) as usize,
            "key-space" => o.key_space = num(&v).max(1),
            "workload" => o.workload = v,
            "threads" => o.threads = num(&v).clamp(1, 64) as usize,
            "server-pid" => o.server_pids = v.split(',').map(|p| num(p) as u32).collect(),
            "prefill" => o.prefill = num(&v),
            "watchers" => o.watchers = num(&v).max(1),
            "watch-streams" => o.watch_streams = num(&v).max(1) as usize,
            "drain-secs" => o.drain = Duration::from_secs(num(&v)),
            "watch-settle-secs" => o.watch_settle = Duration::from_secs(num(&v)),
            _ => usage(),
        }
        i += 1;
    }
    if ![
        "put",
        "range",
        "range-serializable",
        "txn-put",
        "mixed",
        "lease-keepalive",
        "watch",
    ]
    .contains(&o.workload.as_str())
    {
        usage();
    }
    o.conns = o.conns.max(o.threads);
    o.clients = o.clients.max(o.conns);
    if o.workload == "watch" {
        // The value carries its send time.
        o.val_size = o.val_size.max(8);
        o.watch_streams = o.watch_streams.min(o.watchers as usize);
    }
    o
}

/// The instant the process started; put values carry nanoseconds since it.
static START: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The watch workload's keys are this prefix + the usual key.
const WATCH_PREFIX: &[u8] = b"bench-watch/";

/// Resident set size of a process, in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Summed over the server processes; `None` if there are none or one is
/// gone.
fn servers_rss(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| rss_bytes(p)).sum()
}

fn servers_cpu_us(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| cpu_us(&p.to_string())).sum()
}

/// utime + stime of a process, in microseconds.
fn cpu_us(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks_us(ticks))
}

/// utime + stime of every kernel worker thread (`kworker/...`) by pid, in
/// microseconds. Whoever they work for: direct-I/O completions, the block
/// layer's flushes, writeback. Work the kernel does for a server there is
/// not in the server's own CPU.
fn kworkers_cpu_us() -> std::collections::HashMap<u32, u64> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if !comm.starts_with("kworker") {
            continue;
        }
        if let Some(c) = cpu_us(&pid.to_string()) {
            out.insert(pid, c);
        }
    }
    out
}

/// The kernel workers' CPU between two `kworkers_cpu_us` readings: those
/// present at both count their difference, new ones all of theirs.
fn kworkers_cpu_since(
    before: &std::collections::HashMap<u32, u64>,
    after: &std::collections::HashMap<u32, u64>,
) -> u64 {
    after
        .iter()
        .map(|(pid, a)| a.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum()
}

/// Clock ticks (`/proc`'s unit of CPU time) in microseconds.
fn ticks_us(ticks: u64) -> u64 {
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    ticks * 1_000_000 / hz.max(1)
}

/// Time the host took the machine's CPUs away from it (steal, summed over
/// CPUs), in microseconds, from `/proc/stat`. A run with much of it is
/// disturbed from outside: its CPU-per-op and latency figures mean little.
fn host_steal_us() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    Some(ticks_us(steal_ticks(&stat)?))
}

/// The steal column of `/proc/stat`'s first (all-CPU) line, in ticks.
fn steal_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().next()?;
    let mut f = line.split_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    // user nice system idle iowait irq softirq steal
    f.nth(7)?.parse().ok()
}

fn key(o: &Opts, n: u64) -> Vec<u8> {
    let idx = if o.sequential_keys {
        n
    } else {
        // xorshift of the op number: cheap and spread over the key space.
        let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % o.key_space
    };
    let s = format!("{idx:0width$}", width = o.key_size);
    s.as_bytes()[s.len() - o.key_size..].to_vec()
}

fn grpc_frame(msg: &impl Message) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.encoded_len());
    b.put_u8(0);
    b.put_u32(msg.encoded_len() as u32);
    msg.encode(&mut b).expect("buffer has room");
    b.freeze()
}

/// (gRPC path, framed request) for op number `n`.
fn request(o: &Opts, workload: &str, n: u64, value: &[u8]) -> (&'static str, Bytes) {
    let put = |k: Vec<u8>| PutRequest {
        key: k.into(),
        value: value.to_vec().into(),
        ..Default::default()
    };
    match workload {
        "put" => ("/etcdserverpb.KV/Put", grpc_frame(&put(key(o, n)))),
        "watch" => {
            let mut req = put([WATCH_PREFIX, &key(o, n)].concat());
            let mut v = req.value.to_vec();
            v[..8].copy_from_slice(&now_ns().to_le_bytes());
            req.value = v.into();
            ("/etcdserverpb.KV/Put", grpc_frame(&req))
        }
        "range" | "range-serializable" => (
            "/etcdserverpb.KV/Range",
            grpc_frame(&RangeRequest {
                key: key(o, n),
                serializable: workload == "range-serializable",
                ..Default::default()
            }),
        ),
        "txn-put" => (
            "/etcdserverpb.KV/Txn",
            grpc_frame(&TxnRequest {
                compare: vec![],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(put(key(o, n)))),
                }],
                failure: vec![],
            }),
        ),
        _ => {
            if n % 2 == 0 {
                request(o, "put", n, value)
            } else {
                request(o, "range-serializable", n, value)
            }
        }
    }
}

struct ThreadResult {
    hist: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl ThreadResult {
    fn fail(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }
}

/// The grpc-status in a header block (a trailers-only answer's head, or
/// the trailers).
fn header_status(h: &http::HeaderMap) -> Option<String> {
    h.get("grpc-status")
        .map(|v| v.to_str().unwrap_or("?").to_string())
}

/// The call's grpc-status once its body is read: from the head, else from
/// the trailers.
async fn final_status(head: Option<String>, body: &mut h2::RecvStream) -> Result<String, String> {
    match head {
        Some(s) => Ok(s),
        None => Ok(body
            .trailers()
            .await
            .map_err(|e| e.to_string())?
            .as_ref()
            .and_then(header_status)
            .unwrap_or_else(|| "missing".into())),
    }
}

/// Starts one gRPC call: (response future, request body sender).
async fn open_call(
    sr: &h2::client::SendRequest<Bytes>,
    authority: &str,
    path: &str,
) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), String> {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let mut ready = sr.clone().ready().await.map_err(|e| e.to_string())?;
    ready.send_request(req, false).map_err(|e| e.to_string())
}

/// One unary call whose response is read and dropped; Ok if grpc-status 0.
async fn one_call(
    sr: &h2::client::SendRequest<Bytes>,
    authority: &str,
    path: &str,
    body: Bytes,
) -> Result<(), String> {
    let (resp, mut send) = open_call(sr, authority, path).await?;
    send.send_data(body, true).map_err(|e| e.to_string())?;
    let resp = resp.await.map_err(|e| e.to_string())?;
    let head = header_status(resp.headers());
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let status = final_status(head, &mut body).await?;
    if status == "0" {
        Ok(())
    } else {
        Err(format!("grpc-status {status}"))
    }
}

/// One gRPC call read a message at a time (a bidirectional stream, or a
/// unary call): a message may be split over DATA frames and one frame may
/// hold several, so received bytes are buffered and cut at the 5-byte
/// prefixes; flow-control capacity is released as data arrives.
struct GrpcStream {
    send: h2::SendStream<Bytes>,
    resp: Option<h2::client::ResponseFuture>,
    recv: Option<h2::RecvStream>,
    head_status: Option<String>,
    buf: BytesMut,
}

impl GrpcStream {
    async fn open(
        sr: &h2::client::SendRequest<Bytes>,
        authority: &str,
        path: &str,
    ) -> Result<Self, String> {
        let (resp, send) = open_call(sr, authority, path).await?;
        Ok(GrpcStream {
            send,
            resp: Some(resp),
            recv: None,
            head_status: None,
            buf: BytesMut::new(),
        })
    }

    /// Queues framed message bytes (h2 buffers them until the window allows).
    fn send(&mut self, framed: Bytes, last: bool) -> Result<(), String> {
        self.send.send_data(framed, last).map_err(|e| e.to_string())
    }

    /// The next response message, without its prefix.
    async fn next(&mut self) -> Result<Bytes, String> {
        if self.recv.is_none() {
            // The response head comes with (or before) the first message.
            let resp = self.resp.take().ok_or("stream already ended")?;
            let resp = resp.await.map_err(|e| e.to_string())?;
            self.head_status = header_status(resp.headers());
            self.recv = Some(resp.into_body());
        }
        let body = self.recv.as_mut().expect("set above");
        loop {
            if self.buf.len() >= 5 {
                if self.buf[0] != 0 {
                    return Err(format!("response message flag {}", self.buf[0]));
                }
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > MAX_MESSAGE {
                    return Err(format!("response message of {len} bytes"));
                }
                if self.buf.len() >= 5 + len {
                    let _ = self.buf.split_to(5);
                    return Ok(self.buf.split_to(len).freeze());
                }
                self.buf.reserve(5 + len - self.buf.len());
            }
            match body.data().await {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    self.buf.extend_from_slice(&chunk);
                }
                Some(Err(e)) => return Err(e.to_string()),
                None => {
                    let status = final_status(self.head_status.take(), body).await?;
                    return Err(format!("stream ended, grpc-status {status}"));
                }
            }
        }
    }
}

/// Largest response message accepted (etcd's default send limit is 2 GiB,
/// but nothing this tool asks for comes near 64 MiB).
const MAX_MESSAGE: usize = 64 << 20;

/// One unary call returning the response message's bytes.
async fn unary(
    sr: &h2::client::SendRequest<Bytes>,
    authority: &str,
    path: &str,
    body: Bytes,
) -> Result<Bytes, String> {
    let mut call = GrpcStream::open(sr, authority, path).await?;
    call.send(body, true)?;
    call.next().await.map_err(|e| format!("{path}: {e}"))
}

/// The lease-keepalive workload for one client: grant a lease, then send
/// keep-alives on one stream, one in flight at a time (as clientv3 does
/// per lease), timing each request → response.
async fn keepalive_client(
    sr: &h2::client::SendRequest<Bytes>,
    authority: &str,
    next: &AtomicU64,
    limit: u64,
    deadline: Instant,
    result: &RefCell<ThreadResult>,
) -> Result<(), String> {
    let grant = grpc_frame(&LeaseGrantRequest { ttl: 600, id: 0 });
    let grant = unary(sr, authority, "/etcdserverpb.Lease/LeaseGrant", grant).await?;
    let id = LeaseGrantResponse::decode(&grant[..])
        .map_err(|e| format!("grant response: {e}"))?
        .id;
    let mut stream = GrpcStream::open(sr, authority, "/etcdserverpb.Lease/LeaseKeepAlive").await?;
    let frame = grpc_frame(&LeaseKeepAliveRequest { id });
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        if n >= limit || Instant::now() >= deadline {
            break;
        }
        let t0 = Instant::now();
        stream.send(frame.clone(), false)?;
        let msg = by(deadline, stream.next()).await?;
        let r = LeaseKeepAliveResponse::decode(&msg[..])
            .map_err(|e| format!("keep-alive response: {e}"))?;
        if r.ttl <= 0 {
            return Err(format!("keep-alive answered TTL {}", r.ttl));
        }
        let us = t0.elapsed().as_micros() as u64;
        let _ = result.borrow_mut().hist.record(us.max(1));
    }
    stream.send(Bytes::new(), true)
}

/// How long past the phase's deadline a request may still take before the
/// load gives up on it (so a server that stops answering cannot hold the
/// load, and the script running it, forever).
const ANSWER_GRACE: Duration = Duration::from_secs(10);

/// `fut`, or an error if it has not finished `ANSWER_GRACE` after `deadline`.
async fn by<T>(
    deadline: Instant,
    fut: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    let left = (deadline + ANSWER_GRACE).saturating_duration_since(Instant::now());
    futures_lite::future::or(fut, async move {
        glommio::timer::sleep(left).await;
        Err(format!(
            "no answer {} s after the phase's deadline",
            ANSWER_GRACE.as_secs()
        ))
    })
    .await
}

/// Connects one HTTP/2 connection and drives it on this executor; exits
/// the process if the server cannot be reached.
async fn connect(ep: &str) -> h2::client::SendRequest<Bytes> {
    let stream = glommio::net::TcpStream::connect(ep)
        .await
        .unwrap_or_else(|e| {
            eprintln!("connect {ep}: {e}");
            std::process::exit(1)
        });
    let _ = stream.set_nodelay(true);
    let (sr, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(16 << 20)
        .handshake::<_, Bytes>(stream.compat())
        .await
        .unwrap_or_else(|e| {
            eprintln!("h2 handshake with {ep}: {e}");
            std::process::exit(1)
        });
    glommio::spawn_local(async move {
        let _ = conn.await;
    })
    .detach();
    sr
}

/// How long creating all watchers may take.
const WATCH_SETUP_TIMEOUT: Duration = Duration::from_secs(600);

/// What the watch executor measures.
struct WatchResult {
    /// Event delivery latency, µs.
    hist: Histogram<u64>,
    created: u64,
    /// Responses that carried events (a server may batch several events
    /// of one watcher into one response).
    responses: u64,
    events: u64,
    expected: u64,
    /// now_ns() of the last event received.
    last_event_ns: u64,
    errors: u64,
    first_error: Option<String>,
    /// Stream tasks still reading.
    live: usize,
}

/// Server RSS before the watchers and once all are created, and how long
/// creating them took.
struct WatchSetup {
    rss_before: Option<u64>,
    rss_after: Option<u64>,
    /// `--watch-settle-secs` after `rss_after`, before any put.
    rss_settled: Option<u64>,
    secs: f64,
}

/// The watchers of one stream: create them all, then time every event.
async fn watch_stream(
    sr: &h2::client::SendRequest<Bytes>,
    authority: &str,
    watchers: u64,
    result: &RefCell<WatchResult>,
) -> Result<(), String> {
    let mut stream = GrpcStream::open(sr, authority, "/etcdserverpb.Watch/Watch").await?;
    let mut range_end = WATCH_PREFIX.to_vec();
    *range_end.last_mut().expect("prefix not empty") += 1;
    let create = grpc_frame(&WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: WATCH_PREFIX.to_vec(),
                range_end,
                ..Default::default()
            },
        )),
    });
    // All create requests in one write; h2 cuts it into DATA frames.
    stream.send(create.repeat(watchers as usize).into(), false)?;
    loop {
        let msg = stream.next().await?;
        let now = now_ns();
        let r = WatchResponse::decode(&msg[..]).map_err(|e| format!("watch response: {e}"))?;
        let mut res = result.borrow_mut();
        if r.canceled || r.compact_revision != 0 {
            return Err(format!(
                "watch {} canceled (compact revision {}): {}",
                r.watch_id, r.compact_revision, r.cancel_reason
            ));
        }
        res.created += u64::from(r.created);
        res.responses += u64::from(!r.events.is_empty());
        for ev in &r.events {
            let sent = ev
                .kv
                .as_ref()
                .and_then(|kv| kv.value.get(..8))
                .map(|t| u64::from_le_bytes(t.try_into().expect("8 bytes")));
            match sent {
                Some(sent) => res
                    .hist
                    .saturating_record((now.saturating_sub(sent) / 1000).max(1)),
                None => return Err("event without a timestamped value".into()),
            }
            res.events += 1;
            res.last_event_ns = now;
        }
    }
}

/// Polls `done` every few milliseconds until it holds or `deadline` passes;
/// returns whether it held.
async fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// The watch executor: creates the watchers, reports setup on `setup`,
/// then counts events until `puts` (u64::MAX while the put phase runs)
/// times the watchers have arrived or the drain timeout passes.
fn run_watchers(
    o: Opts,
    puts: Arc<AtomicU64>,
    setup: mpsc::Sender<Result<WatchSetup, String>>,
) -> WatchResult {
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("bench-watch")
        .make()
        .expect("executor");
    ex.run(async move {
        let mut conns = Vec::new();
        for c in 0..o.conns {
            let ep = o.endpoints[c % o.endpoints.len()].clone();
            conns.push((connect(&ep).await, ep));
        }
        let result = Rc::new(RefCell::new(WatchResult {
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds"),
            created: 0,
            responses: 0,
            events: 0,
            expected: 0,
            last_event_ns: 0,
            errors: 0,
            first_error: None,
            live: 0,
        }));
        let rss_before = servers_rss(&o.server_pids);
        let t0 = Instant::now();
        let streams = o.watch_streams as u64;
        let mut tasks = Vec::new();
        for s in 0..streams {
            let n = o.watchers / streams + u64::from(s < o.watchers % streams);
            let (sr, ep) = conns[s as usize % conns.len()].clone();
            let result = result.clone();
            result.borrow_mut().live += 1;
            tasks.push(glommio::spawn_local(async move {
                let r = watch_stream(&sr, &ep, n, &result).await;
                let mut res = result.borrow_mut();
                res.live -= 1;
                if let Err(e) = r {
                    res.errors += 1;
                    res.first_error.get_or_insert(e);
                }
            }));
        }
        let created = wait_until(t0 + WATCH_SETUP_TIMEOUT, || {
            let r = result.borrow();
            r.created >= o.watchers || r.errors > 0
        })
        .await;
        let failed = {
            let r = result.borrow();
            (!created || r.errors > 0).then(|| {
                format!(
                    "{} of {} watchers created in {:.1}s; first error: {}",
                    r.created,
                    o.watchers,
                    t0.elapsed().as_secs_f64(),
                    r.first_error.as_deref().unwrap_or("none")
                )
            })
        };
        let report = match failed {
            Some(e) => Err(e),
            None => {
                let rss_after = servers_rss(&o.server_pids);
                let secs = t0.elapsed().as_secs_f64();
                let mut rss_settled = None;
                if !o.watch_settle.is_zero() {
                    glommio::timer::sleep(o.watch_settle).await;
                    rss_settled = servers_rss(&o.server_pids);
                }
                Ok(WatchSetup {
                    rss_before,
                    rss_after,
                    rss_settled,
                    secs,
                })
            }
        };
        let ok = report.is_ok();
        let _ = setup.send(report);
        if ok {
            // The put phase is bounded by --duration-secs; allow it slack.
            let put_deadline = Instant::now() + o.duration + Duration::from_secs(60);
            if wait_until(put_deadline, || puts.load(Ordering::Acquire) != u64::MAX).await {
                let expected = puts.load(Ordering::Acquire).saturating_mul(o.watchers);
                result.borrow_mut().expected = expected;
                wait_until(Instant::now() + o.drain, || {
                    let r = result.borrow();
                    r.events >= expected || r.live == 0
                })
                .await;
            }
        }
        // Dropping the tasks cancels the streams.
        drop(tasks);
        let mut r = result.borrow_mut();
        WatchResult {
            hist: r.hist.clone(),
            first_error: r.first_error.take(),
            ..*r
        }
    })
}

/// The watch executor thread, once all its watchers exist.
struct Watchers {
    puts: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<WatchResult>,
    setup: WatchSetup,
}

impl Watchers {
    /// Starts the watch thread and waits until every watcher is created;
    /// exits the process if that fails.
    fn start(o: &Opts) -> Watchers {
        let puts = Arc::new(AtomicU64::new(u64::MAX));
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn({
            let (o, puts) = (o.clone(), puts.clone());
            move || run_watchers(o, puts, tx)
        });
        match rx.recv() {
            Ok(Ok(setup)) => Watchers {
                puts,
                thread,
                setup,
            },
            Ok(Err(e)) => {
                eprintln!("watch setup failed: {e}");
                std::process::exit(1)
            }
            Err(_) => {
                eprintln!("watch thread ended during setup");
                std::process::exit(1)
            }
        }
    }

    /// Tells the watch thread how many puts were acknowledged and waits
    /// for its drain.
    fn finish(self, puts: u64) -> (WatchSetup, WatchResult) {
        self.puts.store(puts, Ordering::Release);
        (self.setup, self.thread.join().expect("watch thread"))
    }
}

/// Runs `count` ops (claimed from `next`) on one executor.
fn run_thread(
    o: Opts,
    t: usize,
    workload: String,
    next: Arc<AtomicU64>,
    limit: u64,
    deadline: Instant,
) -> ThreadResult {
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name(&format!("bench-{t}"))
        .make()
        .expect("executor");
    ex.run(async move {
        let conns = (o.conns / o.threads).max(1);
        let clients = (o.clients / o.threads).max(conns);
        let result = Rc::new(RefCell::new(ThreadResult {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            errors: 0,
            first_error: None,
        }));
        let value: Rc<Vec<u8>> = Rc::new(vec![b'v'; o.val_size]);
        let mut tasks = Vec::new();
        for c in 0..conns {
            let ep = o.endpoints[(t * conns + c) % o.endpoints.len()].clone();
            let sr = connect(&ep).await;
            let per_conn = clients / conns + usize::from(c < clients % conns);
            for _ in 0..per_conn {
                let sr = sr.clone();
                let (o, ep, workload, next, result, value) = (
                    o.clone(),
                    ep.clone(),
                    workload.clone(),
                    next.clone(),
                    result.clone(),
                    value.clone(),
                );
                tasks.push(glommio::spawn_local(async move {
                    if workload == "lease-keepalive" {
                        let r = keepalive_client(&sr, &ep, &next, limit, deadline, &result).await;
                        if let Err(e) = r {
                            result.borrow_mut().fail(e);
                        }
                        return;
                    }
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= limit || Instant::now() >= deadline {
                            break;
                        }
                        let (path, body) = request(&o, &workload, n, &value);
                        let t0 = Instant::now();
                        let r = by(deadline, one_call(&sr, &ep, path, body)).await;
                        let us = t0.elapsed().as_micros() as u64;
                        let mut res = result.borrow_mut();
                        match r {
                            Ok(()) => {
                                let _ = res.hist.record(us.max(1));
                            }
                            Err(e) => res.fail(e),
                        }
                    }
                }));
            }
        }
        for t in tasks {
            t.await;
        }
        Rc::try_unwrap(result)
            .ok()
            .expect("all tasks done")
            .into_inner()
    })
}

/// Runs one phase over all threads; returns merged results and wall time.
fn phase(o: &Opts, workload: &str, count: u64) -> (ThreadResult, Duration) {
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + o.duration;
    let start = Instant::now();
    let handles: Vec<_> = (0..o.threads)
        .map(|t| {
            let (o, w, next) = (o.clone(), workload.to_string(), next.clone());
            std::thread::spawn(move || run_thread(o, t, w, next, count, deadline))
        })
        .collect();
    let mut total = ThreadResult {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
        errors: 0,
        first_error: None,
    };
    for h in handles {
        let r = h.join().expect("bench thread");
        total.hist.add(&r.hist).expect("same bounds");
        total.errors += r.errors;
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    (total, start.elapsed())
}

fn main() {
    START.get_or_init(Instant::now);
    let o = parse();
    if o.prefill > 0 {
        let mut p = o.clone();
        p.sequential_keys = true;
        p.duration = p.duration.max(Duration::from_secs(120));
        let (r, el) = phase(&p, "put", o.prefill.min(o.key_space));
        eprintln!(
            "prefill: {} keys in {:.1}s ({} errors)",
            r.hist.len(),
            el.as_secs_f64(),
            r.errors
        );
    }
    let watchers = (o.workload == "watch").then(|| Watchers::start(&o));
    let server_before = servers_cpu_us(&o.server_pids);
    let self_before = cpu_us("self");
    let steal_before = host_steal_us();
    let kworkers_before = kworkers_cpu_us();
    let put_start_ns = now_ns();
    let (r, elapsed) = phase(&o, &o.workload, o.total);
    // For watch, CPU counts until the events are drained.
    let watch = watchers.map(|w| w.finish(r.hist.len()));
    let server_cpu = match (servers_cpu_us(&o.server_pids), server_before) {
        (Some(a), Some(b)) => Some(a - b),
        _ => None,
    };
    let self_cpu = cpu_us("self").zip(self_before).map(|(a, b)| a - b);
    let kworkers_cpu = kworkers_cpu_since(&kworkers_before, &kworkers_cpu_us());
    let steal_ms = host_steal_us()
        .zip(steal_before)
        .map(|(a, b)| a.saturating_sub(b) / 1000);
    let ops = r.hist.len();
    let secs = elapsed.as_secs_f64();
    let per_op = |c: Option<u64>| c.map(|c| c as f64 / ops.max(1) as f64);
    let (p50, p99, p999, max) = (
        r.hist.value_at_quantile(0.50),
        r.hist.value_at_quantile(0.99),
        r.hist.value_at_quantile(0.999),
        r.hist.max(),
    );
    println!(
        "workload={} ops={} errors={} elapsed={:.2}s throughput={:.0} ops/s",
        o.workload,
        ops,
        r.errors,
        secs,
        ops as f64 / secs
    );
    println!("latency_us p50={p50} p99={p99} p999={p999} max={max}");
    if let Some(c) = per_op(server_cpu) {
        println!("server_cpu_us_per_op={c:.1}");
    }
    if let Some(c) = per_op(self_cpu) {
        println!("bench_cpu_us_per_op={c:.1}");
    }
    if let Some(c) = per_op(Some(kworkers_cpu)) {
        println!("kworker_cpu_us_per_op={c:.1}");
    }
    if let Some(st) = steal_ms {
        println!("host_steal_ms={st}");
    }
    if let Some(e) = &r.first_error {
        println!("first_error={e}");
    }
    let mut json_watch = String::new();
    if let Some((setup, w)) = &watch {
        let window = w.last_event_ns.saturating_sub(put_start_ns) as f64 / 1e9;
        let events_per_s = if window > 0.0 {
            w.events as f64 / window
        } else {
            0.0
        };
        let (e50, e99, e999, emax) = (
            w.hist.value_at_quantile(0.50),
            w.hist.value_at_quantile(0.99),
            w.hist.value_at_quantile(0.999),
            w.hist.max(),
        );
        let per_watcher = setup
            .rss_after
            .zip(setup.rss_before)
            .map(|(a, b)| (a as f64 - b as f64) / o.watchers as f64);
        let settled_per_watcher = setup
            .rss_settled
            .zip(setup.rss_before)
            .map(|(a, b)| (a as f64 - b as f64) / o.watchers as f64);
        let per_event = server_cpu.map(|c| c as f64 / w.events.max(1) as f64);
        let kib = |b: Option<u64>| {
            b.map(|b| (b / 1024).to_string())
                .unwrap_or_else(|| "null".into())
        };
        let num = |x: Option<f64>, prec: usize| {
            x.map(|x| format!("{x:.prec$}"))
                .unwrap_or_else(|| "null".into())
        };
        println!(
            "watchers={} streams={} created_in={:.2}s events_expected={} events_received={} in {} responses events_per_s={:.0} watch_errors={}",
            o.watchers, o.watch_streams, setup.secs, w.expected, w.events, w.responses, events_per_s, w.errors
        );
        println!("event_latency_us p50={e50} p99={e99} p999={e999} max={emax}");
        println!(
            "server_rss_kib before_watchers={} after_watchers={} bytes_per_watcher={} settled={} bytes_per_watcher_settled={}",
            kib(setup.rss_before),
            kib(setup.rss_after),
            num(per_watcher, 0),
            kib(setup.rss_settled),
            num(settled_per_watcher, 0)
        );
        if let Some(c) = per_event {
            println!("server_cpu_us_per_event={c:.2}");
        }
        if let Some(e) = &w.first_error {
            println!("first_watch_error={e}");
        }
        json_watch = format!(
            ",\"watchers\":{},\"watch_streams\":{},\"watch_setup_s\":{:.3},\"events_expected\":{},\"events_received\":{},\"event_responses\":{},\"events_per_s\":{:.1},\"event_p50_us\":{e50},\"event_p99_us\":{e99},\"event_p999_us\":{e999},\"event_max_us\":{emax},\"rss_before_kib\":{},\"rss_watchers_kib\":{},\"bytes_per_watcher\":{},\"bytes_per_watcher_settled\":{},\"server_cpu_us_per_event\":{},\"watch_errors\":{}",
            o.watchers,
            o.watch_streams,
            setup.secs,
            w.expected,
            w.events,
            w.responses,
            events_per_s,
            kib(setup.rss_before),
            kib(setup.rss_after),
            num(per_watcher, 0),
            num(settled_per_watcher, 0),
            num(per_event, 3),
            w.errors,
        );
    }
    if o.json {
        println!(
            "{{\"workload\":\"{}\",\"ops\":{},\"errors\":{},\"elapsed_s\":{:.3},\"ops_per_s\":{:.1},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\"server_cpu_us_per_op\":{},\"bench_cpu_us_per_op\":{},\"kworker_cpu_us_per_op\":{},\"host_steal_ms\":{}{json_watch}}}",
            o.workload,
            ops,
            r.errors,
            secs,
            ops as f64 / secs,
            p50,
            p99,
            p999,
            max,
            per_op(server_cpu).map(|c| format!("{c:.2}")).unwrap_or_else(|| "null".into()),
            per_op(self_cpu).map(|c| format!("{c:.2}")).unwrap_or_else(|| "null".into()),
            per_op(Some(kworkers_cpu)).map(|c| format!("{c:.2}")).unwrap_or_else(|| "null".into()),
            steal_ms.map(|s| s.to_string()).unwrap_or_else(|| "null".into()),
        );
    }
    if ops == 0 || watch.is_some_and(|(_, w)| w.events == 0) {
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::{kworkers_cpu_since, steal_ticks};

    #[test]
    fn steal_is_the_eighth_number_of_the_all_cpu_line() {
        let cases: &[(&str, Option<u64>)] = &[
            (
                "cpu  304229 0 69911 209252 317217 0 14288 53824 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n",
                Some(53824),
            ),
            // An old kernel's line without the steal column.
            ("cpu  1 2 3 4 5 6 7\n", None),
            // Only a per-CPU line: not the sum.
            ("cpu0 1 2 3 4 5 6 7 8 0 0\n", None),
            ("", None),
        ];
        for (stat, want) in cases {
            assert_eq!(steal_ticks(stat), *want, "{stat:?}");
        }
    }

    #[test]
    fn kernel_workers_count_what_they_ran_between_readings() {
        let before = std::collections::HashMap::from([(10, 500), (11, 70), (12, 9)]);
        // 10 ran 40 µs, 11 did not run, 12 is gone, 13 is new.
        let after = std::collections::HashMap::from([(10, 540), (11, 70), (13, 25)]);
        assert_eq!(kworkers_cpu_since(&before, &after), 65);
        // A pid reused by a new worker with less CPU than the old one had
        // counts nothing rather than wrapping around.
        let after = std::collections::HashMap::from([(10, 3)]);
        assert_eq!(kworkers_cpu_since(&before, &after), 0);
    }
}
