//! gRPC over HTTP/2 (h2) on a glommio socket: framing, status trailers and
//! the method table. Unary methods go to `api::call`; bidirectional streams
//! (`api::lookup_stream`) get a `MsgStream` of requests and a `MsgSink` for
//! responses that honours HTTP/2 flow control, so a slow reader holds back
//! its sender instead of growing a buffer.
//!
//! *Architecture invariant:* only `server` knows HTTP/2 and gRPC framing;
//! handlers take and return prost messages (as bytes here).

use super::api;
use super::Core;
use crate::config::GRPC_OVERHEAD_BYTES;
use crate::error::{Code, Status};
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response};
use std::rc::Rc;

pub async fn serve_conn(
    stream: glommio::net::TcpStream,
    core: Rc<Core>,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) {
    let _ = stream.set_nodelay(true);
    if let Some(tls) = tls {
        let peer = stream.peer_addr().ok();
        let accept = futures_rustls::TlsAcceptor::from(tls).accept(stream);
        let timeout = async {
            glommio::timer::sleep(std::time::Duration::from_secs(10)).await;
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake took too long",
            ))
        };
        let s = match futures_lite::future::or(accept, timeout).await {
            Ok(s) => s,
            Err(e) => {
                crate::debug!("TLS handshake with {peer:?} failed: {e}");
                return;
            }
        };
        if s.get_ref().1.alpn_protocol() == Some(b"http/1.1") {
            return super::http::serve(s, core, true, true).await;
        }
        // With --client-cert-auth the client's certificate was verified
        // (and required); its common name is the user of a request that
        // carries no token, as etcd's `AuthInfoFromTLS` takes it.
        let cert_cn = s
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| super::tls::subject_common_name(c))
            .map(Rc::from);
        return serve_h2(s, core, peer, Some(cert_cn)).await;
    }
    // etcd serves HTTP/1 (/metrics, /health, /version, the JSON gateway)
    // on the client port too; an HTTP/2 connection starts with "PRI".
    if is_http1(&stream).await {
        return super::http::serve(stream, core, true, false).await;
    }
    let peer = stream.peer_addr().ok();
    serve_h2(stream, core, peer, None).await
}

/// Whether a plain connection speaks HTTP/1: its first bytes are a method
/// name (GET, POST, ...) rather than HTTP/2's preface "PRI * HTTP/2.0".
/// "P" alone decides nothing, so up to two bytes are peeked; a client that
/// sends one byte and stalls is given `PEEK_WAIT_MAX`.
async fn is_http1(stream: &glommio::net::TcpStream) -> bool {
    const PEEK_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(5);
    let start = std::time::Instant::now();
    let mut first = [0u8; 2];
    loop {
        match stream.peek(&mut first).await {
            Ok(0) | Err(_) => return false,
            Ok(1) if first[0] == b'P' => {
                if start.elapsed() > PEEK_WAIT_MAX {
                    return false;
                }
                glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
            }
            Ok(_) if first[0] == b'P' => return first[1] != b'R',
            Ok(_) => return first[0].is_ascii_uppercase(),
        }
    }
}

/// One HTTP/2 connection (plain or TLS) until it ends. On TLS, as etcd's
/// handler there, a request whose content-type is not gRPC's goes to the
/// HTTP handlers (/health, /version, /metrics, the JSON gateway); on a
/// plain connection every HTTP/2 stream is gRPC (etcd's cmux). `tls`: the
/// connection is TLS, with the client certificate's common name if any.
async fn serve_h2<S>(
    stream: S,
    core: Rc<Core>,
    peer: Option<std::net::SocketAddr>,
    tls: Option<Option<Rc<str>>>,
) where
    S: super::io::ReadInto + futures::io::AsyncWrite + Unpin + 'static,
{
    let io = super::io::TokioIo::new(stream);
    let mut conn = match h2::server::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(16 << 20)
        .max_concurrent_streams(core.router.member.max_concurrent_streams)
        .max_frame_size(1 << 20)
        .max_header_list_size(64 << 10)
        .handshake::<_, Bytes>(io)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            crate::debug!("h2 handshake with {peer:?} failed: {e}");
            return;
        }
    };
    // `_open` is dropped when this function returns, which ends the
    // keepalive task; `dead` fires when a ping went unanswered.
    let (_open, closed) = futures::channel::oneshot::channel::<()>();
    let (dead_tx, dead) = futures::channel::oneshot::channel::<()>();
    if let Some((interval, timeout)) = core.router.member.grpc_keepalive {
        if let Some(pp) = conn.ping_pong() {
            glommio::spawn_local(keepalive(pp, interval, timeout, closed, dead_tx)).detach();
        }
    }
    let serve = async {
        while let Some(next) = conn.accept().await {
            match next {
                Ok((req, respond)) => {
                    // The call's future (~1.5 KB) is made in its own box when
                    // the task first runs: spawning moves the task's future
                    // several times over (glommio's spawn path), and this one
                    // holds only the arguments.
                    let (core, tls) = (core.clone(), tls.clone());
                    glommio::spawn_local(async move {
                        Box::pin(handle_stream(req, respond, core, tls)).await
                    })
                    .detach();
                }
                Err(e) => {
                    if !e.is_io() && !e.is_go_away() {
                        crate::debug!("h2 connection from {peer:?}: {e}");
                    }
                    break;
                }
            }
        }
    };
    let unanswered = async {
        match dead.await {
            Ok(()) => {
                crate::debug!("h2 connection from {peer:?}: keepalive ping not answered; closing")
            }
            // No keepalive task: never.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    // Dropping the connection (a ping went unanswered) closes its socket.
    futures_lite::future::or(serve, unanswered).await;
}

/// etcd's server keepalive (`--grpc-keepalive-interval`, `-timeout`): a
/// ping every `interval`; no answer within `timeout` tells the connection
/// to close (`dead`). Ends when the connection does (`closed`).
async fn keepalive(
    mut pp: h2::PingPong,
    interval: std::time::Duration,
    timeout: std::time::Duration,
    mut closed: futures::channel::oneshot::Receiver<()>,
    dead: futures::channel::oneshot::Sender<()>,
) {
    use futures_lite::future::or;
    loop {
        let due = async {
            glommio::timer::sleep(interval).await;
            true
        };
        let gone = async {
            let _ = (&mut closed).await;
            false
        };
        if !or(due, gone).await {
            return;
        }
        let pong = async { pp.ping(h2::Ping::opaque()).await.is_ok() };
        let late = async {
            glommio::timer::sleep(timeout).await;
            false
        };
        if !or(pong, late).await {
            let _ = dead.send(());
            return;
        }
    }
}

async fn handle_stream(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    core: Rc<Core>,
    tls: Option<Option<Rc<str>>>,
) {
    // The HTTP and streaming branches are boxed (as are Lock and Election
    // calls in `api::call`): this future is as large as its largest
    // branch, and every unary call's is moved into its box whole (4.4 KB
    // with nothing boxed, 1.5 KB now).
    let (parts, body) = req.into_parts();
    let h = CallHeaders::of(&parts.headers);
    let caller = super::auth::Caller {
        token: h.token,
        cert_cn: tls.as_ref().and_then(|cn| cn.as_deref()),
        jwt: None,
    };
    if tls.is_some() && !h.grpc {
        return Box::pin(super::http::serve_h2_request(parts, body, respond, core)).await;
    }
    let path = parts.uri.path();
    if let Some(sm) = api::lookup_stream(path) {
        if let Some(st) = h.bad_encoding() {
            send_status(&mut respond, &st);
            return;
        }
        let mut meta = Metadata {
            require_leader: h.require_leader,
            user: None,
        };
        if let Err(st) = check_leader(&core, meta.require_leader) {
            send_status(&mut respond, &st);
            return;
        }
        let user = match super::auth::authorize_stream(&core, sm, caller) {
            Ok(u) => u,
            Err(st) => {
                send_status(&mut respond, &st);
                return;
            }
        };
        meta.user = user;
        let limit = core.router.member.max_request_bytes + GRPC_OVERHEAD_BYTES;
        let resp = Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(())
            .expect("static response head");
        let Ok(send) = respond.send_response(resp, false) else {
            return;
        };
        let input = MsgStream {
            body: Some(body),
            buf: BytesMut::new(),
            limit,
            ended: false,
            queued: Default::default(),
        };
        let mut sink = MsgSink::H2(send);
        core.count_started(sm);
        let end = Box::pin(api::call_stream(sm, input, &mut sink, meta, &core)).await;
        core.count_result(sm, &end);
        sink.finish(end.err().as_ref());
        return;
    }
    let Some(method) = api::lookup(path) else {
        let st = match path.trim_start_matches('/').split_once('/') {
            Some((svc, m)) if api::known_service(svc) => crate::error::unimplemented(svc, m),
            Some((svc, _)) => Status::new(Code::Unimplemented, format!("unknown service {svc}")),
            None => Status::new(
                Code::Unimplemented,
                format!("malformed method name: {path:?}"),
            ),
        };
        send_status(&mut respond, &st);
        return;
    };
    if let Some(st) = h.bad_encoding() {
        send_status(&mut respond, &st);
        return;
    }
    if let Err(st) = check_leader(&core, h.require_leader) {
        send_status(&mut respond, &st);
        return;
    }
    let limit = core.router.member.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let body = match read_message(body, limit).await {
        // The message may be a slice of the connection's read buffer; a
        // call that may wait long (Lock, Campaign) gets its own copy, so it
        // does not keep that buffer alive.
        Ok(b) if method.may_wait() => Bytes::copy_from_slice(&b),
        Ok(b) => b,
        Err(st) => {
            send_status(&mut respond, &st);
            return;
        }
    };
    if let Err(st) = super::auth::authorize(&core, method, &body, caller).await {
        send_status(&mut respond, &st);
        return;
    }
    core.count_started(method);
    // A call that waits (Lock, Campaign) is dropped when the client resets
    // the stream or goes away; it cleans up after itself on drop.
    let result = if !method.may_wait() {
        Some(api::call(method, &body, &core).await)
    } else {
        let call = async { Some(api::call(method, &body, &core).await) };
        let reset = async {
            let _ = futures::future::poll_fn(|cx| respond.poll_reset(cx)).await;
            None
        };
        futures_lite::future::or(call, reset).await
    };
    if let Some(r) = &result {
        core.count_result(method, &r);
    }
    match result {
        Some(Ok(reply)) => send_ok(&mut respond, reply),
        Some(Err(st)) => send_status(&mut respond, &st),
        None => {}
    }
}

/// The request headers a call looks at, found in one pass over them (a
/// lookup by name hashes and parses the name each time).
struct CallHeaders<'a> {
    /// `grpc-encoding`, unless it is `identity`.
    encoding: Option<&'a HeaderValue>,
    /// etcd's `hasleader: true` (clientv3's `WithRequireLeader`).
    require_leader: bool,
    /// The auth token.
    token: Option<&'a str>,
    /// The content-type names gRPC (`application/grpc...`).
    grpc: bool,
}

impl<'a> CallHeaders<'a> {
    fn of(h: &'a HeaderMap) -> CallHeaders<'a> {
        let mut out = CallHeaders {
            encoding: None,
            require_leader: false,
            token: None,
            grpc: false,
        };
        // Several values under one name: the first counts, as `get` did.
        let (mut enc, mut leader, mut token, mut ctype) = (false, false, false, false);
        for (name, value) in h {
            match name.as_str() {
                "grpc-encoding" if !enc => {
                    enc = true;
                    if value != "identity" {
                        out.encoding = Some(value);
                    }
                }
                "hasleader" if !leader => {
                    leader = true;
                    out.require_leader = value.as_bytes() == b"true";
                }
                "token" if !token => {
                    token = true;
                    out.token = value.to_str().ok();
                }
                "content-type" if !ctype => {
                    ctype = true;
                    out.grpc = value
                        .as_bytes()
                        .windows(16)
                        .any(|w| w == b"application/grpc");
                }
                _ => {}
            }
        }
        out
    }

    fn bad_encoding(&self) -> Option<Status> {
        let enc = self.encoding?;
        Some(Status::new(
            Code::Unimplemented,
            format!(
                "grpc: Decompressor is not installed for grpc-encoding {:?}",
                enc.to_str().unwrap_or("?")
            ),
        ))
    }
}

/// etcd's interceptors refuse a call that requires a leader while the
/// member knows none, before running it (unary and streams alike).
pub(super) fn check_leader(core: &Core, required: bool) -> Result<(), Status> {
    if required && core.view.leader.get() == 0 {
        return Err(crate::error::no_leader());
    }
    Ok(())
}

/// Request metadata a streaming handler may need.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    /// `hasleader: true` (clientv3's `WithRequireLeader`).
    pub require_leader: bool,
    /// The user a valid token names, while auth is enabled.
    pub user: Option<String>,
}

/// The requests of a client stream, one gRPC message at a time.
pub struct MsgStream {
    /// `None` for a stream of the JSON gateway (HTTP/1), whose requests
    /// are all in `queued` and which is half-closed after them.
    body: Option<h2::RecvStream>,
    buf: BytesMut,
    limit: usize,
    ended: bool,
    queued: std::collections::VecDeque<Bytes>,
}

impl MsgStream {
    /// The requests of a gateway stream: these, then a half-close (as
    /// grpc-gateway sends them from a request body).
    pub fn queued(msgs: Vec<Bytes>) -> MsgStream {
        MsgStream {
            body: None,
            buf: BytesMut::new(),
            limit: 0,
            ended: true,
            queued: msgs.into(),
        }
    }

    /// The next message's bytes; `None` when the client half-closed (or the
    /// stream is gone), `Some(Err)` for a frame that breaks the rules.
    pub async fn next(&mut self) -> Option<Result<Bytes, Status>> {
        let Some(body) = self.body.as_mut() else {
            return self.queued.pop_front().map(Ok);
        };
        loop {
            if self.buf.len() >= 5 {
                if self.buf[0] != 0 {
                    return Some(Err(Status::new(
                        Code::Internal,
                        "grpc: compressed message without grpc-encoding",
                    )));
                }
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > self.limit {
                    return Some(Err(crate::error::message_too_large(len, self.limit)));
                }
                if self.buf.len() >= 5 + len {
                    let mut m = self.buf.split_to(5 + len);
                    let _ = m.split_to(5);
                    if self.buf.is_empty() {
                        // An empty buffer still holds the allocation its
                        // messages came from (a burst of a thousand
                        // requests, say) until more arrives; let it go.
                        self.buf = BytesMut::new();
                    }
                    return Some(Ok(m.freeze()));
                }
            }
            if self.ended {
                if self.buf.is_empty() {
                    return None;
                }
                return Some(Err(Status::new(
                    Code::Internal,
                    "grpc: stream ended inside a message",
                )));
            }
            match body.data().await {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    self.buf.extend_from_slice(&chunk);
                }
                Some(Err(e)) => {
                    if e.is_reset() || e.is_io() || e.is_go_away() {
                        return None;
                    }
                    return Some(Err(Status::new(
                        Code::Internal,
                        format!("reading request: {e}"),
                    )));
                }
                None => self.ended = true,
            }
        }
    }
}

/// The responses of a stream. `send` waits for HTTP/2 send window, so what
/// a slow client has not read stays with the handler, bounded by the window.
pub enum MsgSink {
    /// A gRPC stream's HTTP/2 send half.
    H2(h2::SendStream<Bytes>),
    /// A stream of the JSON gateway.
    Queued(SinkQueue),
}

/// A gateway stream's responses go to its connection task through a
/// bounded channel (backpressure as HTTP/2's window gives); `closed`
/// resolves when that task drops its end (the client went away).
pub struct SinkQueue {
    tx: futures::channel::mpsc::Sender<Bytes>,
    closed: Option<futures::channel::oneshot::Receiver<()>>,
}

/// The client went away (reset or connection closed).
#[derive(Debug)]
pub struct Gone;

impl MsgSink {
    /// A sink for a gateway stream: messages arrive on the returned
    /// receiver; dropping `closed`'s sender tells the handler the client
    /// is gone.
    pub fn queued(
        depth: usize,
        closed: futures::channel::oneshot::Receiver<()>,
    ) -> (MsgSink, futures::channel::mpsc::Receiver<Bytes>) {
        let (tx, rx) = futures::channel::mpsc::channel(depth);
        let sink = MsgSink::Queued(SinkQueue {
            tx,
            closed: Some(closed),
        });
        (sink, rx)
    }

    pub async fn send(&mut self, msg: &[u8]) -> Result<(), Gone> {
        self.send_all(&[msg]).await
    }

    /// Sends messages in one buffer (one copy, and one DATA frame when the
    /// window allows: HTTP/2 frame boundaries mean nothing to gRPC).
    pub async fn send_all(&mut self, msgs: &[impl AsRef<[u8]>]) -> Result<(), Gone> {
        use futures::SinkExt;
        let send = match self {
            MsgSink::H2(send) => send,
            MsgSink::Queued(q) => {
                for m in msgs {
                    q.tx.send(Bytes::copy_from_slice(m.as_ref()))
                        .await
                        .map_err(|_| Gone)?;
                }
                return Ok(());
            }
        };
        let len = msgs.iter().map(|m| 5 + m.as_ref().len()).sum();
        let mut framed = BytesMut::with_capacity(len);
        for m in msgs {
            let m = m.as_ref();
            framed.put_u8(0);
            framed.put_u32(m.len() as u32);
            framed.extend_from_slice(m);
        }
        let mut data = framed.freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let cap = match futures::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) if n > 0 => n,
                Some(Ok(_)) => continue,
                _ => return Err(Gone),
            };
            let chunk = data.split_to(cap.min(data.len()));
            send.send_data(chunk, false).map_err(|_| Gone)?;
        }
        Ok(())
    }

    /// Resolves when the client resets the stream or the connection closes.
    pub async fn closed(&mut self) {
        match self {
            MsgSink::H2(send) => {
                let _ = futures::future::poll_fn(|cx| send.poll_reset(cx)).await;
            }
            MsgSink::Queued(q) => {
                // Resolves once; after that the client stays gone.
                if let Some(c) = q.closed.as_mut() {
                    let _ = c.await;
                    q.closed = None;
                }
            }
        }
    }

    fn finish(&mut self, st: Option<&Status>) {
        let MsgSink::H2(send) = self else {
            return;
        };
        let mut trailers = HeaderMap::new();
        match st {
            None => {
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
            }
            Some(st) => {
                if let Ok(v) = HeaderValue::from_str(&(st.code as u8).to_string()) {
                    trailers.insert("grpc-status", v);
                }
                if let Ok(v) = HeaderValue::from_str(&percent_encode(&st.message)) {
                    trailers.insert("grpc-message", v);
                }
            }
        }
        let _ = send.send_trailers(trailers);
    }
}

/// Reads one length-prefixed gRPC message and the end of the stream.
async fn read_message(mut body: h2::RecvStream, limit: usize) -> Result<Bytes, Status> {
    // A message that arrives in one DATA frame (the usual case) is kept as
    // that frame's bytes; only one split over frames is copied together.
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk =
            chunk.map_err(|e| Status::new(Code::Internal, format!("reading request: {e}")))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if first.is_none() && buf.is_empty() {
            first = Some(chunk);
        } else {
            if let Some(f) = first.take() {
                buf.extend_from_slice(&f);
            }
            buf.extend_from_slice(&chunk);
        }
        let got: &[u8] = first.as_deref().unwrap_or(&buf);
        if got.len() >= 5 {
            let len = u32::from_be_bytes([got[1], got[2], got[3], got[4]]) as usize;
            if len > limit {
                return Err(crate::error::message_too_large(len, limit));
            }
        }
    }
    let buf = first.unwrap_or_else(|| buf.freeze());
    if buf.len() < 5 {
        return Err(Status::new(
            Code::Internal,
            "grpc: request has no complete message",
        ));
    }
    if buf[0] != 0 {
        return Err(Status::new(
            Code::Internal,
            "grpc: compressed message without grpc-encoding",
        ));
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() != 5 + len {
        return Err(Status::new(
            Code::Internal,
            format!(
                "grpc: request frame says {len} bytes but carries {}",
                buf.len() - 5
            ),
        ));
    }
    Ok(buf.slice(5..))
}

/// The HPACK block of a gRPC response head: `:status: 200` (static table
/// index 8) and `content-type: application/grpc` as a literal without
/// indexing under the static name `content-type` (index 31).
const HEAD_OK_HPACK: &[u8] = b"\x88\x0f\x10\x10application/grpc";

/// The HPACK block of OK trailers: `grpc-status: 0` as a literal without
/// indexing with a literal name.
const TRAILERS_OK_HPACK: &[u8] = b"\x00\x0bgrpc-status\x010";

/// A unary call's answer: head, the message, OK trailers, queued at once
/// with blocks encoded here once (no header maps, no HPACK table lookups).
fn send_ok(respond: &mut h2::server::SendResponse<Bytes>, msg: api::Framed) {
    let _ = respond.send_encoded_response(
        http::StatusCode::OK,
        Bytes::from_static(HEAD_OK_HPACK),
        msg.into_frame(),
        Bytes::from_static(TRAILERS_OK_HPACK),
    );
}

/// A trailers-only response carrying a non-OK status.
pub fn send_status(respond: &mut h2::server::SendResponse<Bytes>, st: &Status) {
    let mut b = Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("grpc-status", (st.code as u8).to_string());
    if let Ok(v) = HeaderValue::from_str(&percent_encode(&st.message)) {
        b = b.header("grpc-message", v);
    }
    let resp = b.body(()).expect("valid status head");
    let _ = respond.send_response(resp, true);
}

/// gRPC's grpc-message encoding: printable ASCII except '%' as is.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
