//! The Raft peer transport: moves opaque byte payloads between the members
//! of a cluster, each named by its u64 member id. It knows nothing of Raft;
//! the raft core hands it encoded messages and gets encoded messages back.
//!
//! Everything here runs on one glommio executor (the raft core's, core 0),
//! single-threaded: `Rc`, `RefCell` and `Cell`, no locks. Every wait is on a
//! socket, a timer or a waker, so several members on one box never spin.
//!
//! # Connections
//!
//! Each member dials one outgoing connection per peer and only writes on it;
//! the peer's accepting side (`serve_inbound`) only reads. Traffic from A to B
//! and from B to A therefore travels on two connections, each owned by its
//! sender.
//!
//! - `Peers::send` never blocks: it appends the payload to the peer's queue
//!   and wakes the peer's writer task. The queue holds at most
//!   `queue_bytes_max` bytes (payloads plus their frame headers; an empty
//!   queue takes one frame of any allowed size); beyond that `send` refuses
//!   and the payload is dropped. Raft tolerates lost messages, so the
//!   bounded queue is the whole back-pressure rule.
//! - The writer task is spawned on the first send. It dials only while its
//!   queue is non-empty, writes the handshake, then drains the queue into one
//!   buffer per batch (at most `BATCH_BYTES_MAX`, or one larger frame) and
//!   writes it with one `write_all`, pipelined, without acknowledgements.
//!   While idle it keeps a read pending on the connection, so a close by the
//!   peer is noticed at once rather than at the next write.
//! - On any connection or dial error the writer drops the connection and
//!   everything queued (Raft resends), then waits an exponential backoff
//!   (50 ms doubling to `backoff_max`, each wait drawn from [b/2, b]) before
//!   it may dial again. A connection that stayed up `BACKOFF_RESET_AFTER`
//!   starts the backoff over.
//! - The accepting side keeps one connection per remote member: a newer
//!   handshake from the same member closes the older connection before the
//!   newer one delivers anything, so `deliver` sees each member's frames in
//!   the order that member sent them (with gaps where a connection failed).
//!   `remove_peer` closes the member's inbound connection too; a member not
//!   (yet) known is still accepted.
//! - Bad input (wrong magic, version, cluster or member id, a checksum
//!   mismatch, a length over `frame_bytes_max`, a truncated frame) closes
//!   that connection with one log line; nothing is delivered from a frame
//!   that failed its checks. Frames before it were delivered.
//!
//! # Wire format
//!
//! This module is the one place that owns it. All integers little-endian
//! (as the WAL).
//!
//! ```text
//! handshake (38 bytes, once, from the dialing side):
//!   magic       8  b"KLSNPEER"
//!   version     2  u16 = 1
//!   cluster_id  8  u64
//!   from_id     8  u64  the dialing member
//!   to_id       8  u64  the member it meant to reach
//!   crc         4  u32  crc32c of the 34 bytes before it
//! frame (repeated until the connection closes):
//!   len         4  u32  payload length, at most frame_bytes_max
//!   crc         4  u32  crc32c of the payload
//!   payload   len
//! ```
//!
//! The accepting side never writes, except to a join request. A clean end
//! of a connection is EOF at a frame boundary.
//!
//! ```text
//! join request (38 bytes, instead of the handshake; from a member that is
//! starting with --initial-cluster-state=existing and knows nothing yet):
//!   magic       8  b"KLSNJOIN"
//!   zero       30
//! join answer (then the accepting side closes):
//!   len         4  u32  at most JOIN_ANSWER_MAX
//!   crc         4  u32  crc32c of the answer
//!   answer    len       the membership (`membership::Membership::encode`)
//! ``` The handshake guards against misrouting (another
//! cluster, another member, a stray client) and corruption; it is not
//! authentication. With peer TLS (`PeerConfig::tls`, https peer URLs) all
//! of the above runs inside a TLS session: the dialing member verifies
//! the accepting one's certificate against `--peer-trusted-ca-file` for
//! the host its peer URL names (`server_name`) and presents its own; the accepting member
//! checks that one against the CA with `--peer-client-cert-auth`.
//!
//! # Socket seam
//!
//! A glommio `TcpStream` enters in exactly two places: `dial` (outgoing) and
//! `serve_inbound` (accepted), each of which wraps it in TLS when asked.
//! Everything behind them is generic over `AsyncRead`/`AsyncWrite`, so a
//! fault-injecting or simulated network can replace those two functions.
//!
//! *Architecture invariant:* the transport never parses a payload and never
//! waits for one member on behalf of another: each peer has its own queue and
//! writer task, so a slow or dead peer only fills its own queue.

use bytes::Bytes;
use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use glommio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

pub const MAGIC: &[u8; 8] = b"KLSNPEER";
pub const JOIN_MAGIC: &[u8; 8] = b"KLSNJOIN";
/// The one byte the accepting side writes to a member removed from the
/// cluster before it closes the connection.
pub const GONE: u8 = b'G';
const GONE_MESSAGE: &str = "this member was removed from the cluster";
/// The largest join answer accepted.
pub const JOIN_ANSWER_MAX: usize = 16 << 20;

/// Answers a join request: the membership as text, or None if it is not
/// available (the connection is closed without an answer).
pub type JoinAnswer = Box<dyn Fn() -> futures::future::LocalBoxFuture<'static, Option<Vec<u8>>>>;
pub const VERSION: u16 = 1;
pub const HANDSHAKE_BYTES: usize = 38;
pub const FRAME_HEADER_BYTES: usize = 8;

/// The first backoff after a failure; it doubles up to `backoff_max`.
const BACKOFF_START: Duration = Duration::from_millis(50);
/// A connection that stayed up this long resets the backoff.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(1);
/// Bytes one socket write carries at most (one larger frame goes alone).
const BATCH_BYTES_MAX: usize = 1 << 20;
/// The read buffer of an inbound connection.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// Payloads up to this size are allocated whole before they are read; a
/// larger one grows as its bytes arrive, so a lying length prefix costs no
/// more memory than the bytes actually sent.
const PAYLOAD_EAGER_BYTES: usize = 1 << 20;

/// Peer TLS: how this member accepts (`server`) and dials (`client`).
#[derive(Clone)]
pub struct PeerTls {
    pub server: std::sync::Arc<rustls::ServerConfig>,
    pub client: std::sync::Arc<rustls::ClientConfig>,
    /// Match a dialing peer's certificate against the address it dials
    /// from (`server::tls::check_peer_san`), as etcd does unless
    /// `--experimental-peer-skip-client-san-verification`.
    pub check_san: bool,
}

pub struct PeerConfig {
    pub my_id: u64,
    pub cluster_id: u64,
    /// Bytes one peer's outgoing queue may hold (payloads plus 8-byte frame
    /// headers); `send` refuses beyond it (an empty queue takes one frame
    /// of any allowed size).
    pub queue_bytes_max: usize,
    /// The largest payload sent or accepted.
    pub frame_bytes_max: usize,
    /// How long one dial may take; also how long an accepted connection may
    /// take to send its handshake.
    pub dial_timeout: Duration,
    /// The longest wait between dials after failures.
    pub backoff_max: Duration,
    /// Called when a peer answers this member's handshake with `GONE`:
    /// this member was removed from the cluster.
    pub on_removed: Option<Rc<dyn Fn()>>,
    /// TLS on every connection, both ways (None: plain TCP).
    pub tls: Option<PeerTls>,
}

impl PeerConfig {
    /// The defaults: 64 MiB queues and frames, 1 s dial timeout, 1 s
    /// backoff cap.
    pub fn new(my_id: u64, cluster_id: u64) -> PeerConfig {
        PeerConfig {
            my_id,
            cluster_id,
            queue_bytes_max: 64 << 20,
            frame_bytes_max: 64 << 20,
            dial_timeout: Duration::from_secs(1),
            backoff_max: Duration::from_secs(1),
            on_removed: None,
            tls: None,
        }
    }
}

/// The transport of one member: its peers' queues and writer tasks, and the
/// registry of inbound connections. Held in an `Rc` on the raft core's
/// executor.
pub struct Peers {
    cfg: Rc<PeerConfig>,
    deliver: Box<dyn Fn(u64, Bytes)>,
    peers: RefCell<HashMap<u64, Rc<Peer>>>,
    /// The live inbound connection of each remote member.
    inbound: RefCell<HashMap<u64, Rc<Inbound>>>,
    join: RefCell<Option<Rc<JoinAnswer>>>,
    /// Members removed from the cluster: their handshakes get `GONE`.
    removed: RefCell<std::collections::HashSet<u64>>,
}

impl Peers {
    /// `deliver(from, payload)` is called for every frame received, in the
    /// order each member sent them. It runs inside the reading task and
    /// MUST NOT block; it may call back into `Peers`.
    pub fn new(cfg: PeerConfig, deliver: Box<dyn Fn(u64, Bytes)>) -> Rc<Peers> {
        Rc::new(Peers {
            cfg: Rc::new(cfg),
            deliver,
            peers: RefCell::new(HashMap::new()),
            inbound: RefCell::new(HashMap::new()),
            join: RefCell::new(None),
            removed: RefCell::new(std::collections::HashSet::new()),
        })
    }

    /// `id` was removed from the cluster: forgets it (`remove_peer`), and
    /// answers its handshakes from now on with `GONE`, so that it learns
    /// it and stops even if it never applied its own removal.
    pub fn mark_removed(&self, id: u64) {
        self.remove_peer(id);
        self.removed.borrow_mut().insert(id);
    }

    /// How join requests are answered (none: they are closed unanswered).
    pub fn set_join_answer(&self, f: JoinAnswer) {
        *self.join.borrow_mut() = Some(Rc::new(f));
    }

    pub fn config(&self) -> &PeerConfig {
        &self.cfg
    }

    /// Adds a peer, or changes its addresses. A change of addresses drops
    /// the current connection (the queue stays) and dials the new list.
    pub fn set_peer(&self, id: u64, addrs: Vec<SocketAddr>) {
        if id == self.cfg.my_id || id == 0 {
            crate::warn!("peer: ignoring set_peer for member id {id:x}");
            return;
        }
        let existing = self.peers.borrow().get(&id).cloned();
        match existing {
            None => {
                let p = Rc::new(Peer::new(id, addrs));
                self.peers.borrow_mut().insert(id, p);
            }
            Some(p) => {
                if *p.addrs.borrow() == addrs {
                    return;
                }
                *p.addrs.borrow_mut() = addrs;
                // Dropping the task cancels it and closes its connection.
                let old = p.writer.borrow_mut().take();
                drop(old);
                p.link.set(Link::Down);
                p.up_since.set(None);
                if !p.queue.borrow().is_empty() {
                    self.spawn_writer(&p);
                }
            }
        }
    }

    /// The host names a peer's URLs give for its addresses (see
    /// `server_name`).
    pub fn set_peer_hosts(&self, id: u64, hosts: Vec<(SocketAddr, String)>) {
        if let Some(p) = self.peers.borrow().get(&id) {
            *p.hosts.borrow_mut() = hosts.into_iter().collect();
        }
    }

    /// Forgets a peer: closes its connections both ways and drops its queue.
    pub fn remove_peer(&self, id: u64) {
        let removed = self.peers.borrow_mut().remove(&id);
        if let Some(p) = removed {
            let old = p.writer.borrow_mut().take();
            drop(old);
            p.link.set(Link::Down);
            p.clear_queue();
        }
        let inbound = self.inbound.borrow_mut().remove(&id);
        if let Some(slot) = inbound {
            slot.supersede();
        }
    }

    /// Queues `payload` for `to` and wakes its writer. Never blocks, never
    /// awaits. Returns false, dropping the payload, if `to` is unknown, the
    /// payload is over `frame_bytes_max`, or the queue is not empty and the
    /// payload would take it over `queue_bytes_max`. An empty queue takes
    /// any payload within `frame_bytes_max`, so a peer's queue holds at most
    /// `max(queue_bytes_max, frame_bytes_max + 8)` bytes.
    pub fn send(&self, to: u64, payload: Bytes) -> bool {
        let Some(p) = self.peers.borrow().get(&to).cloned() else {
            return false;
        };
        if payload.len() > self.cfg.frame_bytes_max.min(u32::MAX as usize) {
            crate::warn!(
                "peer {to:x}: dropping a {} byte message, over the {} byte frame limit",
                payload.len(),
                self.cfg.frame_bytes_max
            );
            return false;
        }
        let cost = payload.len() + FRAME_HEADER_BYTES;
        let queued = p.queued_bytes.get();
        if queued > 0 && queued + cost > self.cfg.queue_bytes_max {
            if p.refused.get() == 0 {
                crate::debug!("peer {to:x}: queue full ({queued} bytes), dropping messages");
            }
            p.refused.set(p.refused.get() + 1);
            return false;
        }
        p.refused.set(0);
        p.queued_bytes.set(queued + cost);
        p.queue.borrow_mut().push_back(payload);
        if p.writer.borrow().is_none() {
            self.spawn_writer(&p);
        }
        p.wake();
        true
    }

    /// Whether the connection to `id` is up and no write is waiting on a
    /// full socket buffer. False before the first connection, while dialing
    /// and while backing off.
    pub fn reachable(&self, id: u64) -> bool {
        self.peers
            .borrow()
            .get(&id)
            .map(|p| p.link.get() == Link::Up)
            .unwrap_or(false)
    }

    /// Dials `id` now, with nothing to send yet, unless a connection is up
    /// (a writer backing off dials when its backoff ends). At start, the
    /// raft core connects to its peers ahead of any message, as etcd's
    /// stream readers do, to learn when to advance its election clock.
    pub fn connect(&self, id: u64) {
        let Some(p) = self.peers.borrow().get(&id).cloned() else {
            return;
        };
        if p.link.get() == Link::Up {
            return;
        }
        p.eager.set(true);
        if p.writer.borrow().is_none() {
            self.spawn_writer(&p);
        }
        p.wake();
    }

    /// Since when the connection to `id` has been up (etcd's
    /// `ActiveSince`); None when there is none.
    pub fn active_since(&self, id: u64) -> Option<Instant> {
        self.peers.borrow().get(&id).and_then(|p| p.up_since.get())
    }

    /// Bytes queued for `id` (payloads plus frame headers); None if unknown.
    pub fn queued_bytes(&self, id: u64) -> Option<usize> {
        self.peers.borrow().get(&id).map(|p| p.queued_bytes.get())
    }

    fn spawn_writer(&self, p: &Rc<Peer>) {
        let task = glommio::spawn_local(run_writer(self.cfg.clone(), p.clone()));
        *p.writer.borrow_mut() = Some(task);
    }

    /// Registers a new inbound connection from `from`, closing any older one.
    fn claim_inbound(self: &Rc<Self>, from: u64) -> InboundGuard {
        let slot = Rc::new(Inbound::default());
        let older = self.inbound.borrow_mut().insert(from, slot.clone());
        if let Some(older) = older {
            crate::debug!("peer: a newer connection from {from:x} replaces the older one");
            older.supersede();
        }
        InboundGuard {
            peers: self.clone(),
            from,
            slot,
        }
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        // The writer tasks hold their peer, not `Peers`: cancel them.
        for (_, p) in self.peers.get_mut().drain() {
            let old = p.writer.borrow_mut().take();
            drop(old);
            p.clear_queue();
        }
    }
}

/// Accepts one inbound peer connection: reads the handshake, checks it, then
/// delivers every frame until EOF, an error or bad input. Call it (spawned)
/// for each connection accepted on the peer listener.
pub async fn serve_inbound(peers: Rc<Peers>, stream: TcpStream) {
    let remote = match stream.peer_addr() {
        Ok(a) => a.to_string(),
        Err(_) => "?".to_string(),
    };
    let Some(tls) = peers.cfg.tls.clone() else {
        serve_conn(peers, stream, &remote).await;
        return;
    };
    let from = stream.peer_addr().ok().map(|a| a.ip());
    let accept = futures_rustls::TlsAcceptor::from(tls.server).accept(stream);
    match tls_within(peers.cfg.dial_timeout, accept).await {
        Ok(s) => {
            let cert = s.get_ref().1.peer_certificates().and_then(|c| c.first());
            if let (true, Some(cert), Some(from)) = (tls.check_san, cert, from) {
                let cert = cert.as_ref().to_vec();
                // It may resolve the certificate's DNS names: off the core.
                let checked = glommio::executor()
                    .spawn_blocking(move || crate::server::tls::check_peer_san(&cert, from))
                    .await;
                if let Err(e) = checked {
                    crate::warn!("peer: rejected connection from {remote}: {e}; closing");
                    return;
                }
            }
            serve_conn(peers, s, &remote).await;
        }
        Err(e) => crate::warn!(
            "peer: inbound {remote}: TLS handshake failed: {}; closing",
            crate::server::tls::describe(&e)
        ),
    }
}

/// The name a peer's certificate must have: the host its peer URL names
/// (a DNS name or an IP address, as etcd checks it), or the address
/// dialed when there is none.
pub fn server_name(addr: SocketAddr, host: Option<&str>) -> rustls::pki_types::ServerName<'static> {
    use rustls::pki_types::ServerName;
    host.and_then(|h| ServerName::try_from(h.to_string()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
}

/// A TLS handshake, given `limit` to finish.
async fn tls_within<T>(
    limit: Duration,
    handshake: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    let late = async {
        glommio::timer::sleep(limit).await;
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no TLS handshake in time",
        ))
    };
    futures_lite::future::or(handshake, late).await
}

/// An outgoing connection: plain, or TLS over TCP.
enum Conn {
    Plain(TcpStream),
    Tls(Box<futures_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_close(cx),
            Conn::Tls(s) => Pin::new(&mut **s).poll_close(cx),
        }
    }
}

/// Opens an outgoing connection: the addresses in order, each with
/// `timeout` (for the TCP connect and, with TLS, again for the TLS
/// handshake); the first that answers wins.
async fn dial(
    addrs: &[SocketAddr],
    hosts: &HashMap<SocketAddr, String>,
    timeout: Duration,
    tls: Option<&PeerTls>,
) -> io::Result<Conn> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address to dial");
    for a in addrs {
        match TcpStream::connect_timeout(a, timeout).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                let Some(tls) = tls else {
                    return Ok(Conn::Plain(s));
                };
                let name = server_name(*a, hosts.get(a).map(|h| h.as_str()));
                let connect =
                    futures_rustls::TlsConnector::from(tls.client.clone()).connect(name, s);
                match tls_within(timeout, connect).await {
                    Ok(s) => return Ok(Conn::Tls(Box::new(s))),
                    Err(e) => {
                        last = io::Error::other(format!(
                            "{a}: TLS: {}",
                            crate::server::tls::describe(&e)
                        ))
                    }
                }
            }
            Err(e) => last = io::Error::other(format!("{a}: {e}")),
        }
    }
    Err(last)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Down,
    Up,
    /// Connected, but the socket buffer is full: a write is waiting.
    Stalled,
}

struct Peer {
    id: u64,
    addrs: RefCell<Vec<SocketAddr>>,
    /// The host its peer URL names for an address (TLS checks the peer's
    /// certificate against it; an address without one, against the IP).
    hosts: RefCell<HashMap<SocketAddr, String>>,
    queue: RefCell<VecDeque<Bytes>>,
    queued_bytes: Cell<usize>,
    /// The writer task, waiting for work.
    waker: RefCell<Option<Waker>>,
    link: Cell<Link>,
    /// When the current connection came up (None while there is none).
    up_since: Cell<Option<Instant>>,
    /// Sends refused since the last accepted one (logs once per run).
    refused: Cell<u64>,
    /// Dropping it cancels the task and closes its connection.
    writer: RefCell<Option<glommio::Task<()>>>,
    /// Dial without waiting for work (`Peers::connect`).
    eager: Cell<bool>,
}

impl Peer {
    fn new(id: u64, addrs: Vec<SocketAddr>) -> Peer {
        Peer {
            id,
            addrs: RefCell::new(addrs),
            hosts: RefCell::new(HashMap::new()),
            queue: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            waker: RefCell::new(None),
            link: Cell::new(Link::Down),
            up_since: Cell::new(None),
            refused: Cell::new(0),
            writer: RefCell::new(None),
            eager: Cell::new(false),
        }
    }

    fn wake(&self) {
        let w = self.waker.borrow_mut().take();
        if let Some(w) = w {
            w.wake();
        }
    }

    fn clear_queue(&self) -> usize {
        let n = {
            let mut q = self.queue.borrow_mut();
            let n = q.len();
            q.clear();
            n
        };
        self.queued_bytes.set(0);
        n
    }

    /// Moves frames from the queue into `buf` up to `BATCH_BYTES_MAX` (at
    /// least one frame). Returns how many moved.
    fn fill_batch(&self, buf: &mut Vec<u8>) -> usize {
        let mut q = self.queue.borrow_mut();
        let mut n = 0;
        while let Some(p) = q.front() {
            if n > 0 && buf.len() + FRAME_HEADER_BYTES + p.len() > BATCH_BYTES_MAX {
                break;
            }
            let p = q.pop_front().expect("front exists");
            self.queued_bytes
                .set(self.queued_bytes.get() - p.len() - FRAME_HEADER_BYTES);
            build_frame(buf, &p);
            n += 1;
        }
        n
    }
}

/// One peer's writer: waits for work, dials, pumps, backs off. It runs until
/// cancelled (`remove_peer`, a change of addresses, or `Peers` dropped).
///
/// Logging: one warning when a healthy link fails, debug lines while it
/// keeps failing, one info line once a connection has stayed up
/// `BACKOFF_RESET_AFTER` again (a remote that accepts and then rejects the
/// handshake must not log a line per retry).
async fn run_writer(cfg: Rc<PeerConfig>, peer: Rc<Peer>) {
    let mut jitter = Jitter::new(cfg.my_id, peer.id);
    let mut backoff = BACKOFF_START;
    let mut failing = false;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        wait_for_work(&peer).await;
        let addrs = peer.addrs.borrow().clone();
        let hosts = peer.hosts.borrow().clone();
        let why = match dial(&addrs, &hosts, cfg.dial_timeout, cfg.tls.as_ref()).await {
            Err(e) => format!("dial failed: {e}"),
            Ok(mut stream) => {
                crate::debug!("peer {:x}: connected", peer.id);
                peer.eager.set(false);
                let up_at = Instant::now();
                peer.link.set(Link::Up);
                peer.up_since.set(Some(up_at));
                let e = pump(&cfg, &peer, &mut stream, &mut buf, up_at, &mut failing).await;
                if e.to_string() == GONE_MESSAGE {
                    crate::error!(
                        "peer {:x}: says this member was removed from the cluster",
                        peer.id
                    );
                    if let Some(f) = &cfg.on_removed {
                        f();
                    }
                }
                peer.link.set(Link::Down);
                peer.up_since.set(None);
                drop(stream);
                buf.clear();
                if up_at.elapsed() >= BACKOFF_RESET_AFTER {
                    backoff = BACKOFF_START;
                }
                format!("connection lost: {}", crate::server::tls::describe(&e))
            }
        };
        let dropped = peer.clear_queue();
        if failing {
            crate::debug!("peer {:x}: {why}; {dropped} messages dropped", peer.id);
        } else {
            crate::warn!(
                "peer {:x}: {why}; {dropped} messages dropped, reconnecting with backoff",
                peer.id
            );
            failing = true;
        }
        glommio::timer::sleep(jitter.within(backoff)).await;
        backoff = (backoff * 2).min(cfg.backoff_max);
    }
}

/// Writes the handshake and then every queued frame, until the connection
/// fails; returns why.
async fn pump<S: AsyncRead + AsyncWrite + Unpin>(
    cfg: &PeerConfig,
    peer: &Peer,
    stream: &mut S,
    buf: &mut Vec<u8>,
    up_at: Instant,
    failing: &mut bool,
) -> io::Error {
    buf.clear();
    build_handshake(
        buf,
        &Handshake {
            cluster_id: cfg.cluster_id,
            from: cfg.my_id,
            to: peer.id,
        },
    );
    loop {
        peer.fill_batch(buf);
        if !buf.is_empty() {
            if let Err(e) = write_all(peer, stream, buf).await {
                return e;
            }
            // TLS keeps what it has not yet written to the socket (plain
            // TCP: nothing to do).
            if let Err(e) = poll_fn(|cx| Pin::new(&mut *stream).poll_flush(cx)).await {
                return e;
            }
            buf.clear();
            if buf.capacity() > 2 * BATCH_BYTES_MAX {
                buf.shrink_to(BATCH_BYTES_MAX);
            }
            if *failing && up_at.elapsed() >= BACKOFF_RESET_AFTER {
                crate::info!("peer {:x}: connected again", peer.id);
                *failing = false;
            }
            continue;
        }
        if let Some(e) = idle(peer, stream).await {
            return e;
        }
    }
}

/// Waits until the queue has something or a dial is asked for (no
/// connection open).
async fn wait_for_work(peer: &Peer) {
    poll_fn(|cx| {
        if !peer.queue.borrow().is_empty() || peer.eager.replace(false) {
            return Poll::Ready(());
        }
        *peer.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    })
    .await
}

/// Waits until the queue has something (None) or the connection ends
/// (Some(why)): the peer never writes, so any read result is the end.
async fn idle<S: AsyncRead + Unpin>(peer: &Peer, stream: &mut S) -> Option<io::Error> {
    let mut scratch = [0u8; 1];
    poll_fn(|cx| {
        if !peer.queue.borrow().is_empty() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut *stream).poll_read(cx, &mut scratch) {
            Poll::Ready(Ok(0)) => Poll::Ready(Some(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed by the peer",
            ))),
            Poll::Ready(Ok(_)) if scratch[0] == GONE => Poll::Ready(Some(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                GONE_MESSAGE,
            ))),
            Poll::Ready(Ok(_)) => Poll::Ready(Some(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer wrote on a one-way connection",
            ))),
            Poll::Ready(Err(e)) => Poll::Ready(Some(e)),
            Poll::Pending => {
                *peer.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    })
    .await
}

/// `write_all` that records whether the socket made the writer wait.
async fn write_all<S: AsyncWrite + Unpin>(
    peer: &Peer,
    stream: &mut S,
    buf: &[u8],
) -> io::Result<()> {
    let mut rest = buf;
    poll_fn(|cx| {
        while !rest.is_empty() {
            match Pin::new(&mut *stream).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => rest = &rest[n..],
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    peer.link.set(Link::Stalled);
                    return Poll::Pending;
                }
            }
        }
        peer.link.set(Link::Up);
        Poll::Ready(Ok(()))
    })
    .await
}

/// Backoff jitter: splitmix64 seeded by the two member ids, so members that
/// lose each other at once do not redial in step, and a run replays the
/// same waits.
struct Jitter(u64);

impl Jitter {
    fn new(me: u64, peer: u64) -> Jitter {
        Jitter(me.rotate_left(32) ^ peer ^ 0x9e37_79b9_7f4a_7c15)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A duration drawn uniformly from [d/2, d].
    fn within(&mut self, d: Duration) -> Duration {
        let half = (d.as_micros() / 2) as u64;
        Duration::from_micros(half + self.next() % (half + 1))
    }
}

// ---- inbound ----

/// The registry entry of one live inbound connection.
#[derive(Default)]
struct Inbound {
    superseded: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Inbound {
    fn supersede(&self) {
        self.superseded.set(true);
        let w = self.waker.borrow_mut().take();
        if let Some(w) = w {
            w.wake();
        }
    }

    async fn wait_superseded(&self) {
        poll_fn(|cx| {
            if self.superseded.get() {
                return Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

/// Removes its registry entry when the connection ends, however it ends
/// (including the reading task being cancelled).
struct InboundGuard {
    peers: Rc<Peers>,
    from: u64,
    slot: Rc<Inbound>,
}

impl Drop for InboundGuard {
    fn drop(&mut self) {
        let mut map = self.peers.inbound.borrow_mut();
        if map
            .get(&self.from)
            .is_some_and(|s| Rc::ptr_eq(s, &self.slot))
        {
            map.remove(&self.from);
        }
    }
}

/// How an inbound connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Closed {
    /// EOF at a frame boundary.
    Eof,
    /// A newer connection from the same member, or the member was removed.
    Superseded,
    /// The socket failed (reset and the like).
    Io(io::ErrorKind),
    /// The remote broke the protocol.
    Bad(String),
}

/// The accept side, generic over the stream; logs one line and returns how
/// the connection ended.
async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin>(
    peers: Rc<Peers>,
    stream: S,
    remote: &str,
) -> Closed {
    let cfg = peers.cfg.clone();
    let mut r = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
    let mut hs = [0u8; HANDSHAKE_BYTES];
    let got = futures_lite::future::or(
        async {
            match r.read_exact(&mut hs).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    Err(Closed::Bad("connection closed inside the handshake".into()))
                }
                Err(e) => Err(Closed::Io(e.kind())),
            }
        },
        async {
            glommio::timer::sleep(cfg.dial_timeout).await;
            Err(Closed::Bad(format!(
                "no handshake within {:?}",
                cfg.dial_timeout
            )))
        },
    )
    .await;
    if got.is_ok() && &hs[..8] == JOIN_MAGIC {
        return answer_join(&peers, r.get_mut(), remote).await;
    }
    let checked = got.and_then(|()| check_handshake(&cfg, &hs).map_err(Closed::Bad));
    let from = match checked {
        Ok(h) => h.from,
        Err(why) => {
            log_closed(remote, None, &why);
            return why;
        }
    };
    if peers.removed.borrow().contains(&from) {
        use futures::io::AsyncWriteExt;
        let w = r.get_mut();
        let _ = w.write_all(&[GONE]).await;
        let _ = w.flush().await;
        crate::info!("peer: inbound {remote} from {from:x}, a removed member: told it so");
        return Closed::Bad("a removed member".into());
    }
    if !peers.peers.borrow().contains_key(&from) {
        crate::debug!("peer: inbound {remote} from member {from:x}, not a known peer yet");
    }
    let guard = peers.claim_inbound(from);
    let why = futures_lite::future::or(read_frames(&peers, &mut r, from, &guard.slot), async {
        guard.slot.wait_superseded().await;
        Closed::Superseded
    })
    .await;
    drop(guard);
    log_closed(remote, Some(from), &why);
    why
}

async fn answer_join<S: AsyncWrite + Unpin>(peers: &Peers, w: &mut S, remote: &str) -> Closed {
    let f = peers.join.borrow().clone();
    let Some(f) = f else {
        return Closed::Bad("a join request, and no answer here".into());
    };
    let Some(answer) = f().await else {
        crate::warn!("peer: join request from {remote}: no membership to answer with");
        return Closed::Eof;
    };
    let mut out = Vec::with_capacity(8 + answer.len());
    out.extend_from_slice(&(answer.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&answer).to_le_bytes());
    out.extend_from_slice(&answer);
    crate::info!("peer: answered a join request from {remote}");
    use futures::io::AsyncWriteExt;
    match w.write_all(&out).await.and(w.flush().await) {
        Ok(()) => Closed::Eof,
        Err(e) => Closed::Io(e.kind()),
    }
}

/// Asks the member at `addr` for its cluster's membership (a join
/// request). Blocking: for startup, before the executors run.
pub fn request_join(
    addr: SocketAddr,
    host: Option<&str>,
    timeout: Duration,
    tls: Option<&PeerTls>,
) -> Result<Vec<u8>, String> {
    let tcp = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    match tls {
        None => join_over(tcp),
        Some(tls) => {
            let conn = rustls::ClientConnection::new(tls.client.clone(), server_name(addr, host))
                .map_err(|e| format!("TLS: {e}"))?;
            join_over(rustls::StreamOwned::new(conn, tcp))
        }
    }
}

fn join_over<S: std::io::Read + std::io::Write>(mut s: S) -> Result<Vec<u8>, String> {
    let mut req = JOIN_MAGIC.to_vec();
    req.resize(HANDSHAKE_BYTES, 0);
    s.write_all(&req).map_err(|e| e.to_string())?;
    s.flush().map_err(|e| e.to_string())?;
    let mut head = [0u8; 8];
    s.read_exact(&mut head).map_err(|e| e.to_string())?;
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
    if len > JOIN_ANSWER_MAX {
        return Err(format!("a join answer of {len} bytes"));
    }
    let mut answer = vec![0u8; len];
    s.read_exact(&mut answer).map_err(|e| e.to_string())?;
    if crc32c::crc32c(&answer) != crc {
        return Err("the join answer failed its checksum".into());
    }
    Ok(answer)
}

fn log_closed(remote: &str, from: Option<u64>, why: &Closed) {
    let who = match from {
        Some(f) => format!("inbound {remote} from {f:x}"),
        None => format!("inbound {remote}"),
    };
    match why {
        Closed::Bad(reason) => crate::warn!("peer: {who}: {reason}; closing"),
        Closed::Eof => crate::debug!("peer: {who}: closed by the remote"),
        Closed::Superseded => crate::debug!("peer: {who}: superseded, closing"),
        Closed::Io(kind) => crate::debug!("peer: {who}: {kind}; closing"),
    }
}

/// Reads and delivers frames until the connection ends.
async fn read_frames<R: AsyncRead + Unpin>(
    peers: &Peers,
    r: &mut R,
    from: u64,
    slot: &Inbound,
) -> Closed {
    let max = peers.cfg.frame_bytes_max;
    let mut hdr = [0u8; FRAME_HEADER_BYTES];
    loop {
        let mut got = 0;
        while got < FRAME_HEADER_BYTES {
            match r.read(&mut hdr[got..]).await {
                Ok(0) if got == 0 => return Closed::Eof,
                Ok(0) => return Closed::Bad("truncated frame header".into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Closed::Io(e.kind()),
            }
        }
        let (len, crc) = parse_frame_header(&hdr);
        if len > max {
            return Closed::Bad(format!("frame of {len} bytes, over the {max} byte limit"));
        }
        let payload = match read_payload(r, len).await {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Closed::Bad(format!("truncated frame (length {len})"))
            }
            Err(e) => return Closed::Io(e.kind()),
        };
        if crc32c::crc32c(&payload) != crc {
            return Closed::Bad(format!("frame checksum mismatch (length {len})"));
        }
        if slot.superseded.get() {
            return Closed::Superseded;
        }
        (peers.deliver)(from, Bytes::from(payload));
    }
}

async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> io::Result<Vec<u8>> {
    if len <= PAYLOAD_EAGER_BYTES {
        let mut p = vec![0u8; len];
        r.read_exact(&mut p).await?;
        return Ok(p);
    }
    let mut p = Vec::with_capacity(PAYLOAD_EAGER_BYTES);
    while p.len() < len {
        let at = p.len();
        let want = (len - at).min(PAYLOAD_EAGER_BYTES);
        p.resize(at + want, 0);
        r.read_exact(&mut p[at..]).await?;
    }
    Ok(p)
}

// ---- wire format: build / parse pairs ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Handshake {
    cluster_id: u64,
    from: u64,
    to: u64,
}

fn build_handshake(out: &mut Vec<u8>, h: &Handshake) {
    let at = out.len();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&h.cluster_id.to_le_bytes());
    out.extend_from_slice(&h.from.to_le_bytes());
    out.extend_from_slice(&h.to.to_le_bytes());
    let crc = crc32c::crc32c(&out[at..]);
    out.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len() - at, HANDSHAKE_BYTES);
}

fn parse_handshake(b: &[u8; HANDSHAKE_BYTES]) -> Result<Handshake, String> {
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    if &b[..8] != MAGIC {
        return Err("not a keelson peer (bad magic)".into());
    }
    let crc = u32::from_le_bytes(b[34..38].try_into().expect("4 bytes"));
    if crc32c::crc32c(&b[..34]) != crc {
        return Err("handshake checksum mismatch".into());
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != VERSION {
        return Err(format!(
            "peer protocol version {version}, this member speaks {VERSION}"
        ));
    }
    Ok(Handshake {
        cluster_id: u64_at(10),
        from: u64_at(18),
        to: u64_at(26),
    })
}

/// Parses the handshake and checks it is meant for this member.
fn check_handshake(cfg: &PeerConfig, b: &[u8; HANDSHAKE_BYTES]) -> Result<Handshake, String> {
    let h = parse_handshake(b)?;
    if h.cluster_id != cfg.cluster_id {
        return Err(format!(
            "cluster id {:x}, this member is in cluster {:x}",
            h.cluster_id, cfg.cluster_id
        ));
    }
    if h.to != cfg.my_id {
        return Err(format!(
            "addressed to member {:x}, this is member {:x}",
            h.to, cfg.my_id
        ));
    }
    if h.from == 0 || h.from == cfg.my_id {
        return Err(format!("from member id {:x}", h.from));
    }
    Ok(h)
}

fn build_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("payload under 4 GiB (frame_bytes_max)");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// (payload length, payload crc32c)
fn parse_frame_header(b: &[u8; FRAME_HEADER_BYTES]) -> (usize, u32) {
    let len = u32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(b[4..].try_into().expect("4 bytes"));
    (len, crc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::AsyncWriteExt;
    use glommio::net::TcpListener;
    use std::future::Future;

    const CLUSTER: u64 = 0xc1;

    /// Runs `f` on a fresh executor; fails the test if it takes over `limit`.
    fn run<F, Fut>(limit: Duration, f: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let done = within(limit, f()).await;
                assert!(done.is_some(), "test did not finish within {limit:?}");
            })
            .expect("start executor (is `ulimit -l` high enough?)")
            .join()
            .expect("test executor panicked");
    }

    async fn within<T>(limit: Duration, f: impl Future<Output = T>) -> Option<T> {
        futures_lite::future::or(async { Some(f.await) }, async {
            glommio::timer::sleep(limit).await;
            None
        })
        .await
    }

    async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + limit;
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }

    /// TLS checks a peer's certificate for the host its URL names (a DNS
    /// name or an IP), else for the address dialed.
    #[test]
    fn server_name_is_the_url_host_else_the_address() {
        use rustls::pki_types::ServerName;
        let a: SocketAddr = "10.1.2.3:2380".parse().unwrap();
        assert_eq!(
            server_name(a, Some("infra0.example.com")),
            ServerName::try_from("infra0.example.com").unwrap()
        );
        assert_eq!(
            server_name(a, Some("10.9.9.9")),
            ServerName::IpAddress("10.9.9.9".parse::<std::net::IpAddr>().unwrap().into())
        );
        assert_eq!(server_name(a, None), ServerName::IpAddress(a.ip().into()));
    }

    fn cfg(my_id: u64) -> PeerConfig {
        PeerConfig {
            my_id,
            cluster_id: CLUSTER,
            queue_bytes_max: 4 << 20,
            frame_bytes_max: 1 << 20,
            dial_timeout: Duration::from_millis(500),
            backoff_max: Duration::from_millis(200),
            on_removed: None,
            tls: None,
        }
    }

    /// A test payload: `seq` in the first 8 bytes, then bytes that depend on
    /// the sender, `seq` and position, so a mixed-up frame is caught.
    fn payload(from: u64, seq: u64, len: usize) -> Bytes {
        assert!(len >= 8);
        let mut p = seq.to_le_bytes().to_vec();
        p.extend((8..len).map(|j| (from * 131 + seq * 7 + j as u64) as u8));
        Bytes::from(p)
    }

    /// Mixed sizes: mostly small, some medium, every 100th over a batch's
    /// worth of small frames.
    fn size_of(seq: u64) -> usize {
        match seq % 100 {
            0 => 300_000,
            1..=9 => 8 + (seq as usize * 13) % 20_000,
            _ => 8 + (seq as usize * 7919) % 2000,
        }
    }

    /// (from, seq, intact) per delivered frame.
    type Got = Rc<RefCell<Vec<(u64, u64, bool)>>>;

    fn recorder(got: &Got) -> Box<dyn Fn(u64, Bytes)> {
        let got = got.clone();
        Box::new(move |from, p: Bytes| {
            let seq = if p.len() >= 8 {
                u64::from_le_bytes(p[..8].try_into().unwrap())
            } else {
                u64::MAX
            };
            let intact = p.len() >= 8 && p == payload(from, seq, p.len());
            got.borrow_mut().push((from, seq, intact));
        })
    }

    /// A listener whose accepted connections go to `serve_inbound`.
    /// Dropping it closes the listener and every connection it accepted.
    struct Server {
        _accept: glommio::Task<()>,
        _conns: Rc<RefCell<Vec<glommio::Task<()>>>>,
        accepted: Rc<Cell<usize>>,
    }

    fn listen(peers: &Rc<Peers>, at: SocketAddr) -> (SocketAddr, Server) {
        let l = TcpListener::bind(at).expect("bind");
        let addr = l.local_addr().unwrap();
        let conns = Rc::new(RefCell::new(Vec::new()));
        let accepted = Rc::new(Cell::new(0));
        let accept = glommio::spawn_local({
            let (peers, conns, accepted) = (peers.clone(), conns.clone(), accepted.clone());
            async move {
                while let Ok(s) = l.accept().await {
                    accepted.set(accepted.get() + 1);
                    let t = glommio::spawn_local(serve_inbound(peers.clone(), s));
                    conns.borrow_mut().push(t);
                }
            }
        });
        let server = Server {
            _accept: accept,
            _conns: conns,
            accepted,
        };
        (addr, server)
    }

    struct Node {
        peers: Rc<Peers>,
        addr: SocketAddr,
        got: Got,
        server: Option<Server>,
    }

    fn node(c: PeerConfig) -> Node {
        let got = Got::default();
        let peers = Peers::new(c, recorder(&got));
        let (addr, server) = listen(&peers, "127.0.0.1:0".parse().unwrap());
        Node {
            peers,
            addr,
            got,
            server: Some(server),
        }
    }

    fn handshake(cluster_id: u64, from: u64, to: u64) -> Vec<u8> {
        let mut v = Vec::new();
        build_handshake(
            &mut v,
            &Handshake {
                cluster_id,
                from,
                to,
            },
        );
        v
    }

    fn frame(p: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        build_frame(&mut v, p);
        v
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// Reads until the remote closes (EOF or reset); false if it sent bytes
    /// or stayed open past `limit`.
    async fn closed_by_remote(s: &mut TcpStream, limit: Duration) -> bool {
        let mut buf = vec![0u8; 64 << 10];
        within(limit, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => {}
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    #[test]
    fn exchange_10000_frames_both_ways() {
        run(Duration::from_secs(120), || async {
            const N: u64 = 10_000;
            let a = node(cfg(1));
            let b = node(cfg(2));
            a.peers.set_peer(2, vec![b.addr]);
            b.peers.set_peer(1, vec![a.addr]);
            let mut refused = 0u64;
            for seq in 0..N {
                for (src, from, to) in [(&a, 1u64, 2u64), (&b, 2, 1)] {
                    let p = payload(from, seq, size_of(seq));
                    // A full queue refuses; wait for the writer and retry
                    // the same frame so nothing is skipped.
                    while !src.peers.send(to, p.clone()) {
                        refused += 1;
                        glommio::timer::sleep(Duration::from_millis(1)).await;
                    }
                }
                glommio::yield_if_needed().await;
            }
            wait_until("all frames", Duration::from_secs(60), || {
                a.got.borrow().len() == N as usize && b.got.borrow().len() == N as usize
            })
            .await;
            for (at, from) in [(&b, 1u64), (&a, 2u64)] {
                let got = at.got.borrow();
                for (i, &(f, seq, intact)) in got.iter().enumerate() {
                    assert_eq!((f, seq, intact), (from, i as u64, true), "frame {i}");
                }
            }
            assert!(a.peers.reachable(2) && b.peers.reachable(1));
            assert_eq!(a.peers.queued_bytes(2), Some(0));
            // The 4 MiB queue was smaller than what was sent: back-pressure
            // was exercised.
            assert!(refused > 0, "the queue never filled");
        });
    }

    #[test]
    fn reconnects_after_listener_restart() {
        run(Duration::from_secs(60), || async {
            let a = node(cfg(1));
            let mut b = node(cfg(2));
            let b_addr = b.addr;
            a.peers.set_peer(2, vec![b_addr]);
            for seq in 0..100 {
                assert!(a.peers.send(2, payload(1, seq, 100)));
            }
            wait_until("first frames", Duration::from_secs(5), || {
                b.got.borrow().len() == 100
            })
            .await;
            assert!(a.peers.reachable(2));

            // The receiver's listener and connections go away.
            b.server = None;
            glommio::timer::sleep(Duration::from_millis(50)).await;
            wait_until("the sender to notice", Duration::from_secs(5), || {
                !a.peers.reachable(2)
            })
            .await;
            // Sends while it is down are queued, then dropped when the dial
            // fails.
            for seq in 100..110 {
                assert!(a.peers.send(2, payload(1, seq, 100)));
            }
            wait_until("the queue dropped", Duration::from_secs(5), || {
                a.peers.queued_bytes(2) == Some(0)
            })
            .await;

            // Back on the same port. Nothing is queued, so nothing dials.
            let (again, server) = listen(&b.peers, b_addr);
            assert_eq!(again, b_addr);
            let accepted = server.accepted.clone();
            b.server = Some(server);
            glommio::timer::sleep(Duration::from_millis(600)).await;
            assert_eq!(accepted.get(), 0, "dialed with an empty queue");

            // New frames get through once the sender has reconnected.
            let mut seq = 200;
            wait_until("reconnect", Duration::from_secs(10), || {
                let through = b.got.borrow().iter().any(|g| g.1 >= 200);
                if !through {
                    a.peers.send(2, payload(1, seq, 100));
                    seq += 1;
                }
                through
            })
            .await;
            let first = seq;
            for s in first..first + 50 {
                assert!(a.peers.send(2, payload(1, s, 100 + s as usize)));
            }
            wait_until("later frames", Duration::from_secs(5), || {
                b.got.borrow().last().map(|g| g.1) == Some(first + 49)
            })
            .await;
            let got = b.got.borrow();
            assert!(got.iter().all(|g| g.0 == 1 && g.2), "intact");
            let seqs: Vec<u64> = got.iter().map(|g| g.1).collect();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
            assert_eq!(&seqs[..100], &(0..100).collect::<Vec<_>>()[..]);
            assert_eq!(
                &seqs[seqs.len() - 50..],
                &(first..first + 50).collect::<Vec<_>>()[..]
            );
            assert!(!seqs.iter().any(|s| (100..110).contains(s)));
            assert_eq!(accepted.get(), 1);
            assert!(a.peers.reachable(2));
        });
    }

    #[test]
    fn hostile_input_closes_the_connection() {
        run(Duration::from_secs(60), || async {
            let b = node(cfg(2));
            let max = b.peers.config().frame_bytes_max as u32;
            let hs = handshake(CLUSTER, 1, 2);
            let good = frame(&payload(1, 0, 64));
            let mut bad_crc = good.clone();
            bad_crc[4] ^= 1;
            let mut v2 = hs.clone();
            v2[8] = 2;
            let crc = crc32c::crc32c(&v2[..34]);
            v2[34..].copy_from_slice(&crc.to_le_bytes());
            // (case, bytes, then shut our write side)
            let cases: Vec<(&str, Vec<u8>, bool)> = vec![
                (
                    "garbage",
                    b"GET / HTTP/1.1\r\nHost: keelson\r\n\r\n".repeat(3),
                    false,
                ),
                ("bad magic", cat(&[b"KLSNPEEX", &hs[8..]]), false),
                ("bad handshake crc", cat(&[&hs[..37], &[hs[37] ^ 1]]), false),
                ("bad version", v2, false),
                ("wrong cluster id", handshake(CLUSTER + 1, 1, 2), false),
                ("wrong to id", handshake(CLUSTER, 1, 3), false),
                ("from its own id", handshake(CLUSTER, 2, 2), false),
                ("frame with wrong crc", cat(&[&hs, &bad_crc]), false),
                ("huge length", cat(&[&hs, &[0xff; 4], &[0; 4]]), false),
                (
                    "length one over the limit",
                    cat(&[&hs, &(max + 1).to_le_bytes(), &[0; 4]]),
                    false,
                ),
                ("truncated frame", cat(&[&hs, &good[..30]]), true),
                ("truncated header", cat(&[&hs, &good[..5]]), true),
                ("truncated handshake", hs[..20].to_vec(), true),
                // Closed by the handshake timeout (dial_timeout, 500 ms).
                ("silent inside the handshake", hs[..20].to_vec(), false),
            ];
            for (name, bytes, shut) in cases {
                let mut s = TcpStream::connect(b.addr).await.unwrap();
                s.write_all(&bytes).await.unwrap();
                if shut {
                    s.shutdown(std::net::Shutdown::Write).await.unwrap();
                }
                assert!(
                    closed_by_remote(&mut s, Duration::from_secs(3)).await,
                    "{name}: connection not closed"
                );
                assert!(b.got.borrow().is_empty(), "{name}: delivered something");
            }
            // A good connection afterwards still works.
            let a = node(cfg(1));
            a.peers.set_peer(2, vec![b.addr]);
            for seq in 0..10 {
                assert!(a.peers.send(2, payload(1, seq, 1000)));
            }
            wait_until("good frames", Duration::from_secs(5), || {
                b.got.borrow().len() == 10
            })
            .await;
            let got = b.got.borrow();
            assert!(got
                .iter()
                .enumerate()
                .all(|(i, g)| *g == (1, i as u64, true)));
        });
    }

    #[test]
    fn newer_connection_supersedes_older() {
        run(Duration::from_secs(30), || async {
            let b = node(cfg(2));
            let hs = handshake(CLUSTER, 1, 2);
            let mut old = TcpStream::connect(b.addr).await.unwrap();
            old.write_all(&cat(&[&hs, &frame(&payload(1, 0, 50))]))
                .await
                .unwrap();
            wait_until("first frame", Duration::from_secs(5), || {
                b.got.borrow().len() == 1
            })
            .await;
            let mut new = TcpStream::connect(b.addr).await.unwrap();
            new.write_all(&cat(&[&hs, &frame(&payload(1, 1, 50))]))
                .await
                .unwrap();
            assert!(closed_by_remote(&mut old, Duration::from_secs(3)).await);
            wait_until("second frame", Duration::from_secs(5), || {
                b.got.borrow().len() == 2
            })
            .await;
            // Too late: the older connection is closed.
            let _ = old.write_all(&frame(&payload(1, 2, 50))).await;
            glommio::timer::sleep(Duration::from_millis(50)).await;
            assert_eq!(*b.got.borrow(), vec![(1, 0, true), (1, 1, true)]);
            // remove_peer closes the inbound side too.
            b.peers.set_peer(1, vec!["127.0.0.1:1".parse().unwrap()]);
            b.peers.remove_peer(1);
            assert!(closed_by_remote(&mut new, Duration::from_secs(3)).await);
        });
    }

    #[test]
    fn send_refusals_and_bounded_queue() {
        run(Duration::from_secs(60), || async {
            let mut c = cfg(1);
            c.queue_bytes_max = 1 << 20;
            c.frame_bytes_max = 256 << 10;
            let got = Got::default();
            let a = Peers::new(c, recorder(&got));
            let p = Bytes::from(vec![7u8; 4096]);
            assert!(!a.send(9, p.clone()), "unknown peer");
            assert!(!a.reachable(9));

            // A port nothing listens on.
            let dead = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            a.set_peer(2, vec![dead]);
            assert!(
                !a.send(2, Bytes::from(vec![0u8; (256 << 10) + 1])),
                "over frame limit"
            );
            // No await: the writer cannot run, so the queue fills to its bound.
            let mut accepted = 0;
            while a.send(2, p.clone()) {
                accepted += 1;
                assert!(accepted <= 1000, "queue unbounded");
            }
            assert_eq!(accepted, (1 << 20) / (4096 + FRAME_HEADER_BYTES));
            assert!(a.queued_bytes(2).unwrap() <= 1 << 20);
            assert!(!a.send(2, p.clone()));
            assert!(!a.reachable(2));
            // The dial fails; the queue is dropped and sends are taken again.
            wait_until("queue dropped", Duration::from_secs(5), || {
                a.queued_bytes(2) == Some(0)
            })
            .await;
            assert!(a.send(2, p.clone()));

            // An empty queue takes one frame of any allowed size, even one
            // over queue_bytes_max; nothing more until it drains.
            let mut c = cfg(1);
            c.queue_bytes_max = 1000;
            c.frame_bytes_max = 4096;
            let tiny = Peers::new(c, recorder(&got));
            tiny.set_peer(2, vec![dead]);
            assert!(tiny.send(2, Bytes::from(vec![0u8; 4096])));
            assert!(!tiny.send(2, Bytes::from_static(b"x")));
            assert_eq!(tiny.queued_bytes(2), Some(4096 + FRAME_HEADER_BYTES));
            drop(tiny);

            // A receiver that accepts and never reads: the socket fills, the
            // writer waits, the queue fills, sends are refused.
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let held: Rc<RefCell<Option<TcpStream>>> = Rc::default();
            let _accept = glommio::spawn_local({
                let held = held.clone();
                async move {
                    if let Ok(s) = l.accept().await {
                        *held.borrow_mut() = Some(s);
                    }
                    glommio::timer::sleep(Duration::from_secs(3600)).await;
                }
            });
            a.set_peer(3, vec![addr]);
            let big = Bytes::from(vec![1u8; 64 << 10]);
            let mut sent = 0usize;
            wait_until("a refused send", Duration::from_secs(20), || {
                let ok = a.send(3, big.clone());
                sent += ok as usize;
                !ok
            })
            .await;
            assert!(a.queued_bytes(3).unwrap() <= 1 << 20);
            assert!(!a.reachable(3), "stalled but reported reachable");
            assert!(sent > 16, "refused before the socket filled ({sent} sent)");

            // remove_peer drops the queue and closes the connection.
            a.remove_peer(3);
            assert!(!a.send(3, big.clone()));
            assert_eq!(a.queued_bytes(3), None);
            let mut s = held.borrow_mut().take().expect("accepted");
            assert!(closed_by_remote(&mut s, Duration::from_secs(10)).await);
            assert!(got.borrow().is_empty());
        });
    }

    /// CPU time this thread has used.
    fn thread_cpu() -> Duration {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage only writes the struct it is given.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
        assert_eq!(rc, 0);
        let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        Duration::from_micros(us(ru.ru_utime) + us(ru.ru_stime))
    }

    #[test]
    fn idle_members_do_not_spin() {
        run(Duration::from_secs(30), || async {
            let a = node(cfg(1));
            let b = node(cfg(2));
            // A dead peer: one failed dial, then nothing queued, no dialing.
            let dead = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            a.peers.set_peer(2, vec![b.addr]);
            a.peers.set_peer(3, vec![dead]);
            b.peers.set_peer(1, vec![a.addr]);
            assert!(a.peers.send(2, payload(1, 0, 100)));
            assert!(b.peers.send(1, payload(2, 0, 100)));
            assert!(a.peers.send(3, payload(1, 0, 100)));
            wait_until("frames", Duration::from_secs(5), || {
                a.got.borrow().len() == 1 && b.got.borrow().len() == 1
            })
            .await;
            glommio::timer::sleep(Duration::from_millis(500)).await;
            let before = thread_cpu();
            glommio::timer::sleep(Duration::from_secs(1)).await;
            let used = thread_cpu() - before;
            assert!(
                used < Duration::from_millis(50),
                "idle for 1 s used {used:?} of CPU"
            );
            assert!(a.peers.reachable(2) && b.peers.reachable(1));
        });
    }

    /// The accept side over an in-memory stream: input bytes → delivered
    /// payload lengths and how the connection ended.
    #[test]
    fn inbound_table() {
        run(Duration::from_secs(30), || async {
            let hs = handshake(CLUSTER, 1, 2);
            let f = |n: usize| frame(&vec![5u8; n]);
            let mut bad = f(10);
            bad[9] ^= 1;
            let three_mib = (3u32 << 20).to_le_bytes();
            let cases: Vec<(&str, Vec<u8>, Vec<usize>, &str)> = vec![
                ("empty", vec![], vec![], "bad"),
                ("handshake only", hs.clone(), vec![], "eof"),
                (
                    "empty, small, and incrementally read frames",
                    cat(&[&hs, &f(0), &f(5), &f(3 << 20)]),
                    vec![0, 5, 3 << 20],
                    "eof",
                ),
                (
                    "good then bad crc",
                    cat(&[&hs, &f(3), &bad, &f(4)]),
                    vec![3],
                    "bad",
                ),
                ("cut header", cat(&[&hs, &f(3), &f(3)[..4]]), vec![3], "bad"),
                (
                    "cut payload",
                    cat(&[&hs, &f(3), &f(9)[..12]]),
                    vec![3],
                    "bad",
                ),
                (
                    "big length, little data",
                    cat(&[&hs, &three_mib, &[0; 4], &[1; 100]]),
                    vec![],
                    "bad",
                ),
                ("over the limit", cat(&[&hs, &[0xff; 8]]), vec![], "bad"),
            ];
            for (name, input, want, end) in cases {
                let mut c = cfg(2);
                c.frame_bytes_max = 4 << 20;
                let got: Rc<RefCell<Vec<usize>>> = Rc::default();
                let peers = Peers::new(c, {
                    let got = got.clone();
                    Box::new(move |from, p| {
                        assert_eq!(from, 1);
                        assert!(p.iter().all(|&b| b == 5));
                        got.borrow_mut().push(p.len());
                    })
                });
                let why = serve_conn(peers.clone(), futures::io::Cursor::new(input), name).await;
                let kind = match why {
                    Closed::Eof => "eof",
                    Closed::Bad(_) => "bad",
                    Closed::Io(_) => "io",
                    Closed::Superseded => "superseded",
                };
                assert_eq!((&*got.borrow(), kind), (&want, end), "{name}: {why:?}");
                assert!(
                    peers.inbound.borrow().is_empty(),
                    "{name}: registry entry left"
                );
            }
        });
    }

    #[test]
    fn handshake_round_trip_and_jitter_bounds() {
        let h = Handshake {
            cluster_id: 7,
            from: 1,
            to: 2,
        };
        let mut v = Vec::new();
        build_handshake(&mut v, &h);
        assert_eq!(v.len(), HANDSHAKE_BYTES);
        assert_eq!(parse_handshake(&v.try_into().unwrap()), Ok(h));
        let mut j = Jitter::new(1, 2);
        for ms in [1u64, 50, 200, 5000] {
            let d = Duration::from_millis(ms);
            for _ in 0..100 {
                let w = j.within(d);
                assert!(w >= d / 2 && w <= d, "{w:?} for {d:?}");
            }
        }
    }

    #[test]
    fn join_answers_that_lie_are_refused() {
        use std::io::{Read, Write};
        // (length, crc, body) a server answers with, and whether the
        // client must accept it.
        let body = b"cluster_id=1\n".to_vec();
        let good_crc = crc32c::crc32c(&body);
        let cases: Vec<(u32, u32, Vec<u8>, bool)> = vec![
            (body.len() as u32, good_crc, body.clone(), true),
            (body.len() as u32, good_crc ^ 1, body.clone(), false),
            ((JOIN_ANSWER_MAX + 1) as u32, good_crc, body.clone(), false),
            (body.len() as u32 + 10, good_crc, body.clone(), false),
        ];
        for (len, crc, b, ok) in cases {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let t = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                let mut req = [0u8; HANDSHAKE_BYTES];
                s.read_exact(&mut req).unwrap();
                assert_eq!(&req[..8], JOIN_MAGIC);
                let mut out = len.to_le_bytes().to_vec();
                out.extend_from_slice(&crc.to_le_bytes());
                out.extend_from_slice(&b);
                let _ = s.write_all(&out);
            });
            let got = request_join(addr, None, Duration::from_secs(2), None);
            assert_eq!(got.is_ok(), ok, "{len} {crc}: {got:?}");
            if ok {
                assert_eq!(got.unwrap(), body);
            }
            t.join().unwrap();
        }
    }
}
