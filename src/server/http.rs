//! HTTP/1.1 on the client port (and on `--listen-metrics-urls`), as etcd
//! serves it next to gRPC: `GET /health` (JSON, 503 without a leader or
//! with an alarm raised), `GET /version`, `GET /metrics` in the
//! Prometheus text format — gRPC calls started and completed per method
//! and code (`grpc_server_started_total`, `grpc_server_handled_total`),
//! etcd's server, mvcc and WAL figures (`metrics.rs`), all summed over
//! every core — and, on the client port, etcd's JSON gateway
//! under `/v3/` and `/v3beta/` (`gateway.rs`).
//!
//! Connections are kept alive (HTTP/1.1 unless `Connection: close`;
//! HTTP/1.0 closes). Request bodies come with `Content-Length` or chunked;
//! `Expect: 100-continue` is answered. Everything is bounded: the head
//! (`HEAD_BYTES_MAX`), the body (`gateway::body_bytes_max`), the wait for
//! a next request (`IDLE_TIMEOUT`) and the time to read one
//! (`REQUEST_TIMEOUT`). A request that breaks a limit or HTTP's grammar
//! gets an error answer and the connection is closed.

use super::api::{self, StreamMethod};
use super::gateway::{self, Route};
use super::grpc::{Metadata, MsgSink, MsgStream};
use super::{Core, CoreMsg};
use bytes::Bytes;
use futures::io::{AsyncReadExt, AsyncWriteExt};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Request line and headers.
const HEAD_BYTES_MAX: usize = 16 << 10;
const HEADERS_MAX: usize = 64;
/// How long a kept-alive connection may wait for its next request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one request may take to arrive once its first byte has.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const READ_CHUNK_BYTES: usize = 16 << 10;

/// etcd's access controller adds these to every client-port answer for an
/// allowed origin (`--cors`; by default every origin, as `*`).
fn cors_headers(cors: &[String], origin: Option<&str>) -> String {
    let allow = |o: &str| {
        format!(
            "Access-Control-Allow-Headers: accept, content-type, authorization\r\nAccess-Control-Allow-Methods: POST, GET, OPTIONS, PUT, DELETE\r\nAccess-Control-Allow-Origin: {o}\r\n"
        )
    };
    if cors.is_empty() || cors.iter().any(|c| c == "*") {
        return allow("*");
    }
    match origin {
        Some(o) if cors.iter().any(|c| c == o) => allow(o),
        _ => String::new(),
    }
}

/// A Host header's name without its port (etcd's `GetHostname`: Go's
/// `net.SplitHostPort`, or the whole value when that fails).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.split_once("]:") {
            Some((h, _)) => h,
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, _)) if !h.contains(':') => h,
        _ => host,
    }
}

/// etcd's `--host-whitelist` check of a plain-HTTP request's Host name;
/// empty or `*` allows every name.
fn host_allowed(whitelist: &[String], name: &str) -> bool {
    whitelist.is_empty() || whitelist.iter().any(|h| h == "*" || h == name)
}

/// etcd's answer to a Host it does not allow (CVE-2018-5702).
fn host_refused(host: &str) -> String {
    format!(
        "\netcd received your request, but the Host header was unrecognized.\n\nTo fix this, choose one of the following options:\n- Enable TLS, then any HTTPS request will be allowed.\n- Add the hostname you want to use to the whitelist in settings.\n  - e.g. etcd --host-whitelist {host:?}\n\nThis requirement has been added to help prevent \"DNS Rebinding\" attacks (CVE-2018-5702).\n\n"
    )
}

/// One parsed request.
struct Request {
    method: String,
    path: String,
    /// What followed `?` in the target, if anything.
    query: String,
    /// `Authorization`, or else `Grpc-Metadata-Token`.
    token: Option<String>,
    /// `Grpc-Metadata-Hasleader: true` (grpc-gateway passes it on as the
    /// `hasleader` metadata).
    require_leader: bool,
    keep_alive: bool,
    body: Vec<u8>,
    /// `Host` and `Origin`.
    host: Option<String>,
    origin: Option<String>,
    /// The CORS header lines this request's answers carry (client port).
    cors: String,
}

/// Why no request was read.
enum ReadError {
    /// The peer closed, went quiet or timed out: nothing to answer.
    Gone,
    /// Answer with this status line and plain-text body, then close.
    Bad(&'static str, &'static str),
    /// A body over the limit (gateway error JSON), then close.
    TooLarge(usize, usize),
}

/// Reads more bytes into `buf` before `deadline`; `Gone` on EOF, error or
/// timeout.
async fn fill<S>(stream: &mut S, buf: &mut Vec<u8>, deadline: Instant) -> Result<(), ReadError>
where
    S: futures::io::AsyncRead + Unpin,
{
    let mut chunk = [0u8; READ_CHUNK_BYTES];
    let read = async {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(n),
        }
    };
    let timeout = async {
        glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
        None
    };
    match futures_lite::future::or(read, timeout).await {
        Some(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        None => Err(ReadError::Gone),
    }
}

/// Reads one request; `buf` holds bytes already read (a pipelined next
/// request stays in it).
async fn read_request<S>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    body_max: usize,
) -> Result<Request, ReadError>
where
    S: futures::io::AsyncRead + futures::io::AsyncWrite + Unpin,
{
    if buf.is_empty() {
        fill(stream, buf, Instant::now() + IDLE_TIMEOUT).await?;
    }
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut scanned: usize = 0;
    let head_len = loop {
        if let Some(i) = buf[scanned.saturating_sub(3)..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
        {
            break scanned.saturating_sub(3) + i + 4;
        }
        if buf.len() > HEAD_BYTES_MAX {
            return Err(ReadError::Bad(
                "431 Request Header Fields Too Large",
                "431 Request Header Fields Too Large",
            ));
        }
        scanned = buf.len();
        fill(stream, buf, deadline).await?;
    };
    if head_len > HEAD_BYTES_MAX {
        return Err(ReadError::Bad(
            "431 Request Header Fields Too Large",
            "431 Request Header Fields Too Large",
        ));
    }
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ReadError::Bad(
                "431 Request Header Fields Too Large",
                "431 Request Header Fields Too Large",
            ))
        }
        _ => return Err(ReadError::Bad("400 Bad Request", "400 Bad Request")),
    }
    let method = parsed.method.unwrap_or("").to_string();
    let target = parsed.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (path, query) = (path.to_string(), query.to_string());
    let http10 = parsed.version == Some(0);
    let (mut token, mut md_token) = (None, None);
    let (mut host, mut origin) = (None, None);
    let mut require_leader = false;
    let (mut close, mut chunked, mut expect) = (http10, false, false);
    let mut length: Option<usize> = None;
    for h in parsed.headers.iter() {
        let value = std::str::from_utf8(h.value).ok().map(str::trim);
        let name = h.name;
        if name.eq_ignore_ascii_case("authorization") {
            token = value.map(str::to_string);
        } else if name.eq_ignore_ascii_case("host") {
            host = value.map(str::to_string);
        } else if name.eq_ignore_ascii_case("origin") {
            origin = value.map(str::to_string);
        } else if name.eq_ignore_ascii_case("grpc-metadata-token") {
            md_token = value.map(str::to_string);
        } else if name.eq_ignore_ascii_case("grpc-metadata-hasleader") {
            require_leader = value == Some("true");
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.unwrap_or("");
            if v.eq_ignore_ascii_case("close") {
                close = true;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            match value {
                Some(v) if v.eq_ignore_ascii_case("chunked") => chunked = true,
                Some(v) if v.eq_ignore_ascii_case("identity") => {}
                _ => {
                    return Err(ReadError::Bad(
                        "501 Not Implemented",
                        "Unsupported transfer encoding",
                    ))
                }
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = value.and_then(|v| v.parse::<usize>().ok());
            match (n, length) {
                (None, _) => {
                    return Err(ReadError::Bad(
                        "400 Bad Request",
                        "400 Bad Request: bad Content-Length",
                    ))
                }
                (Some(n), Some(l)) if n != l => {
                    return Err(ReadError::Bad(
                        "400 Bad Request",
                        "400 Bad Request: bad Content-Length",
                    ))
                }
                (Some(n), _) => length = Some(n),
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect = value
                .map(|v| v.eq_ignore_ascii_case("100-continue"))
                .unwrap_or(false);
        }
    }
    buf.drain(..head_len);
    if let Some(n) = length {
        if !chunked && n > body_max {
            return Err(ReadError::TooLarge(n, body_max));
        }
    }
    if expect && (chunked || length.unwrap_or(0) > buf.len()) {
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        let _ = stream.flush().await;
    }
    let body = if chunked {
        let mut chunks = Chunked::default();
        loop {
            match chunks.decode(buf, body_max) {
                Ok(Some(used)) => {
                    buf.drain(..used);
                    break chunks.body;
                }
                Ok(None) => fill(stream, buf, deadline).await?,
                Err(ChunkError::TooLarge) => {
                    return Err(ReadError::TooLarge(chunks.body.len(), body_max))
                }
                Err(ChunkError::Malformed) => {
                    return Err(ReadError::Bad(
                        "400 Bad Request",
                        "400 Bad Request: malformed chunked encoding",
                    ))
                }
            }
        }
    } else {
        let n = length.unwrap_or(0);
        while buf.len() < n {
            fill(stream, buf, deadline).await?;
        }
        buf.drain(..n).collect()
    };
    Ok(Request {
        method,
        path,
        query,
        token: token.or(md_token),
        require_leader,
        keep_alive: !close,
        body,
        host,
        origin,
        cors: String::new(),
    })
}

enum ChunkError {
    Malformed,
    TooLarge,
}

/// An incremental decoder of a chunked body: `decode` is called again with
/// the same buffer grown, and goes on where it stopped.
#[derive(Default)]
struct Chunked {
    /// Bytes of the buffer already decoded.
    pos: usize,
    body: Vec<u8>,
    /// The last chunk (size 0) was seen; only trailers remain.
    last: bool,
}

impl Chunked {
    /// `Some(bytes used)` once the body and its trailers are complete.
    fn decode(&mut self, buf: &[u8], body_max: usize) -> Result<Option<usize>, ChunkError> {
        loop {
            let rest = &buf[self.pos..];
            let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                // A size line or trailer longer than this is not HTTP.
                return if rest.len() > 1024 {
                    Err(ChunkError::Malformed)
                } else {
                    Ok(None)
                };
            };
            if self.last {
                // Trailers, up to an empty line.
                self.pos += eol + 2;
                if eol == 0 {
                    return Ok(Some(self.pos));
                }
                continue;
            }
            let line = std::str::from_utf8(&rest[..eol]).map_err(|_| ChunkError::Malformed)?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| ChunkError::Malformed)?;
            if size == 0 {
                self.last = true;
                self.pos += eol + 2;
                continue;
            }
            if size > body_max || self.body.len() + size > body_max {
                return Err(ChunkError::TooLarge);
            }
            let data = eol + 2;
            if rest.len() < data + size + 2 {
                return Ok(None);
            }
            if &rest[data + size..data + size + 2] != b"\r\n" {
                return Err(ChunkError::Malformed);
            }
            self.body.extend_from_slice(&rest[data..data + size]);
            self.pos += data + size + 2;
        }
    }
}

/// An answer to write.
struct Answer {
    status: &'static str,
    content_type: &'static str,
    /// Extra header lines, each ending in CRLF.
    extra: String,
    body: Vec<u8>,
}

async fn write_answer<S>(stream: &mut S, a: &Answer, head_only: bool, keep_alive: bool) -> bool
where
    S: futures::io::AsyncWrite + Unpin,
{
    let mut out = format!("HTTP/1.1 {}\r\n{}", a.status, a.extra);
    if !a.content_type.is_empty() {
        out.push_str(&format!("Content-Type: {}\r\n", a.content_type));
    }
    out.push_str(&format!("Content-Length: {}\r\n", a.body.len()));
    if !keep_alive {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if !head_only {
        bytes.extend_from_slice(&a.body);
    }
    stream.write_all(&bytes).await.is_ok() && stream.flush().await.is_ok()
}

/// Reads a connection while a call runs, keeping what the client
/// pipelines in `buf` (up to `max` bytes); returns when the client has
/// gone, or sent more than that.
async fn read_until_gone<R>(stream: &mut R, buf: &mut Vec<u8>, max: usize)
where
    R: futures::io::AsyncRead + Unpin,
{
    let mut chunk = [0u8; 1024];
    loop {
        match stream.read(&mut chunk).await {
            Ok(n) if n > 0 && buf.len() + n <= max => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
}

/// Serves requests on one connection until it closes; `client_port` adds
/// /version, the gateway and etcd's access control (CORS headers, OPTIONS
/// answered, and, on a plain connection (`tls` false), `--host-whitelist`);
/// etcd's metrics listener has only /metrics and /health.
pub async fn serve<S>(mut stream: S, core: Rc<Core>, client_port: bool, tls: bool)
where
    S: futures::io::AsyncRead + futures::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::with_capacity(1024);
    let body_max = gateway::body_bytes_max(&core);
    loop {
        let req = match read_request(&mut stream, &mut buf, body_max).await {
            Ok(r) => r,
            Err(ReadError::Gone) => return,
            Err(ReadError::Bad(status, text)) => {
                let a = Answer {
                    status,
                    content_type: "text/plain; charset=utf-8",
                    extra: String::new(),
                    body: format!("{text}\n").into_bytes(),
                };
                write_answer(&mut stream, &a, false, false).await;
                return;
            }
            Err(ReadError::TooLarge(n, max)) => {
                let st = crate::error::Status::new(
                    crate::error::Code::ResourceExhausted,
                    format!("request body larger than max ({n} vs. {max})"),
                );
                let r = gateway::error_reply(&st);
                let a = Answer {
                    status: r.status,
                    content_type: "application/json",
                    extra: cors_headers(&core.router.member.cors, None),
                    body: r.body,
                };
                write_answer(&mut stream, &a, false, false).await;
                return;
            }
        };
        let mut req = req;
        if client_port {
            let member = &core.router.member;
            let host = host_name(req.host.as_deref().unwrap_or("")).to_string();
            if !tls && !host_allowed(&member.host_whitelist, &host) {
                crate::warn!(
                    "rejecting HTTP request to prevent DNS rebinding attacks (host {host:?})"
                );
                let a = Answer {
                    status: "421 Misdirected Request",
                    content_type: "text/plain; charset=utf-8",
                    extra: "X-Content-Type-Options: nosniff\r\n".into(),
                    body: host_refused(&host).into_bytes(),
                };
                if !write_answer(&mut stream, &a, req.method == "HEAD", req.keep_alive).await
                    || !req.keep_alive
                {
                    return;
                }
                continue;
            }
            req.cors = cors_headers(&member.cors, req.origin.as_deref());
            if req.method == "OPTIONS" {
                // A CORS preflight: etcd answers any OPTIONS before routing.
                let a = Answer {
                    status: "200 OK",
                    content_type: "",
                    extra: req.cors.clone(),
                    body: Vec::new(),
                };
                if !write_answer(&mut stream, &a, false, req.keep_alive).await || !req.keep_alive {
                    return;
                }
                continue;
            }
        }
        let req = req;
        let a = if client_port
            && core.router.member.grpc_gateway
            && gateway::is_gateway_path(&req.path)
        {
            // While a call that may wait runs, the connection is read:
            // pipelined bytes are kept, and its end means the client left.
            let gone = read_until_gone(&mut stream, &mut buf, body_max);
            match serve_gateway(&req, &core, gone).await {
                Gw::Answer(a) => a,
                Gw::Stream(m) => {
                    let more = serve_stream(&mut stream, &mut buf, &req, &core, m, body_max).await;
                    if !more || !req.keep_alive {
                        return;
                    }
                    continue;
                }
                // The client went away during a call that waits.
                Gw::Gone => return,
            }
        } else {
            plain(&req, &core, client_port).await
        };
        if !write_answer(&mut stream, &a, req.method == "HEAD", req.keep_alive).await
            || !req.keep_alive
        {
            return;
        }
    }
}

/// /health, /version, /metrics.
async fn plain(req: &Request, core: &Core, client_port: bool) -> Answer {
    let (status, content_type, body) = match (req.method.as_str(), req.path.as_str()) {
        // Prometheus' handler takes any method.
        (_, "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics(core).await),
        ("GET", "/health") | ("GET", "/livez") | ("GET", "/readyz") => health(core, &req.query),
        ("GET", "/version") if client_port => (
            "200 OK",
            "application/json",
            format!(
                "{{\"etcdserver\":\"{v}\",\"etcdcluster\":\"{v}\"}}",
                v = crate::ETCD_VERSION
            ),
        ),
        (_, "/health" | "/livez" | "/readyz") => (
            "405 Method Not Allowed",
            "text/plain",
            "Method Not Allowed\n".into(),
        ),
        (_, "/version") if client_port => (
            "405 Method Not Allowed",
            "text/plain",
            "Method Not Allowed\n".into(),
        ),
        // Go's mux: an unknown path is 404 whatever the method.
        _ => ("404 Not Found", "text/plain", "404 page not found\n".into()),
    };
    Answer {
        status,
        content_type,
        // etcd wraps every client-port handler in its CORS handler.
        extra: req.cors.clone(),
        body: body.into_bytes(),
    }
}

/// What to do with a gateway request.
enum Gw {
    Answer(Answer),
    /// A streaming method: `serve_stream`.
    Stream(StreamMethod),
    /// The client went away while a call that may wait (Lock, Campaign)
    /// ran; the call was dropped, as on a reset gRPC stream.
    Gone,
}

/// A request under /v3/ or /v3beta/; `gone` resolves if the client
/// leaves while a call that may wait (Lock, Campaign) runs.
async fn serve_gateway(
    req: &Request,
    core: &Core,
    gone: impl std::future::Future<Output = ()>,
) -> Gw {
    let text = |status, body: &str| Answer {
        status,
        content_type: "text/plain; charset=utf-8",
        extra: req.cors.clone(),
        body: body.as_bytes().to_vec(),
    };
    let Some(route) = gateway::route(&req.path) else {
        return Gw::Answer(text("404 Not Found", "Not Found\n"));
    };
    if req.method != "POST" {
        return Gw::Answer(text("405 Method Not Allowed", "Method Not Allowed\n"));
    }
    if let Route::Unary(..) = route {
        if let Err(st) = super::grpc::check_leader(core, req.require_leader) {
            let r = gateway::error_reply(&st);
            return Gw::Answer(Answer {
                status: r.status,
                content_type: "application/json",
                extra: req.cors.clone(),
                body: r.body,
            });
        }
    }
    let reply = match route {
        Route::Stream(m) => return Gw::Stream(m),
        Route::Unary(m) if !m.may_wait() => {
            gateway::call(m, &req.body, req.token.as_deref(), core).await
        }
        Route::Unary(m) => {
            let call = gateway::call(m, &req.body, req.token.as_deref(), core);
            match futures_lite::future::or(async { Some(call.await) }, async {
                gone.await;
                None
            })
            .await
            {
                Some(r) => r,
                None => return Gw::Gone,
            }
        }
    };
    Gw::Answer(Answer {
        status: reply.status,
        content_type: "application/json",
        extra: if reply.ok {
            format!(
                "{}Grpc-Metadata-Content-Type: application/grpc\r\n",
                req.cors
            )
        } else {
            req.cors.clone()
        },
        body: reply.body,
    })
}

/// Responses a gateway stream may have built and not yet written.
const STREAM_QUEUE_DEPTH: usize = 16;

/// A streaming method over HTTP/1 as grpc-gateway serves it: the body's
/// JSON values are the requests (then a half-close), the answer is chunked,
/// one `{"result":{...}}` line per response, and an error ends it with an
/// `{"error":{...}}` line. The stream lasts until the handler ends it or
/// the client closes the connection (seen by reading it meanwhile).
/// Returns whether the connection may serve another request.
async fn serve_stream<S>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    req: &Request,
    core: &Core,
    m: StreamMethod,
    body_max: usize,
) -> bool
where
    S: futures::io::AsyncRead + futures::io::AsyncWrite + Unpin,
{
    use futures::StreamExt;
    let refuse = |st: &crate::error::Status| {
        let r = gateway::error_reply(st);
        Answer {
            status: r.status,
            content_type: "application/json",
            extra: req.cors.clone(),
            body: r.body,
        }
    };
    if let Err(st) = super::grpc::check_leader(core, req.require_leader) {
        return write_answer(stream, &refuse(&st), false, req.keep_alive).await;
    }
    let msgs = match gateway::stream_requests(m, &req.body) {
        Ok(msgs) => msgs,
        Err(st) => return write_answer(stream, &refuse(&st), false, req.keep_alive).await,
    };
    let user = match super::auth::authorize_stream(
        core,
        m,
        super::auth::Caller::token(req.token.as_deref()),
    ) {
        Ok(u) => u,
        Err(st) => return write_answer(stream, &refuse(&st), false, req.keep_alive).await,
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\n{}Content-Type: application/json\r\nGrpc-Metadata-Content-Type: application/grpc\r\nTransfer-Encoding: chunked\r\n{}\r\n",
        req.cors,
        if req.keep_alive { "" } else { "Connection: close\r\n" }
    );
    if stream.write_all(head.as_bytes()).await.is_err() || stream.flush().await.is_err() {
        return false;
    }
    let (closed_tx, closed_rx) = futures::channel::oneshot::channel::<()>();
    let (mut sink, mut rx) = MsgSink::queued(STREAM_QUEUE_DEPTH, closed_rx);
    let input = MsgStream::queued(msgs);
    let meta = Metadata {
        require_leader: req.require_leader,
        user,
    };
    let (mut rd, mut wr) = futures::io::AsyncReadExt::split(&mut *stream);
    let mut pipelined = Vec::new();
    let (end, written) = {
        let handler = async move {
            core.count_started(m);
            let end = api::call_stream(m, input, &mut sink, meta, core).await;
            core.count_result(m, &end);
            // Dropping the sink ends the writer below.
            drop(sink);
            end
        };
        let wr = &mut wr;
        let writer = async move {
            while let Some(pb) = rx.next().await {
                let line: Bytes = gateway::stream_result(m, &pb).into();
                if write_chunk(wr, &line).await.is_err() {
                    // Dropping `rx` makes the handler's next send fail.
                    return false;
                }
            }
            true
        };
        let both = futures::future::join(handler, writer);
        futures::pin_mut!(both);
        let pipelined = &mut pipelined;
        let reader = async move {
            read_until_gone(&mut rd, pipelined, body_max).await;
            // The client is gone (or sent too much): the handler's
            // `closed` resolves.
            drop(closed_tx);
        };
        let first = futures_lite::future::or(async { Some(both.as_mut().await) }, async {
            reader.await;
            None
        })
        .await;
        match first {
            Some(r) => r,
            None => both.await,
        }
    };
    buf.extend_from_slice(&pipelined);
    if !written {
        return false;
    }
    if let Err(st) = end {
        if write_chunk(&mut wr, &gateway::stream_error(&st))
            .await
            .is_err()
        {
            return false;
        }
    }
    wr.write_all(b"0\r\n\r\n").await.is_ok() && wr.flush().await.is_ok()
}

async fn write_chunk<W>(w: &mut W, data: &[u8]) -> std::io::Result<()>
where
    W: futures::io::AsyncWrite + Unpin,
{
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    w.write_all(&out).await?;
    w.flush().await
}

/// An HTTP/2 request on a TLS client connection that is not gRPC: etcd's
/// TLS handler gives it to the same HTTP handlers as HTTP/1 (CORS and
/// OPTIONS as there; no `--host-whitelist`, which is for plain HTTP). A
/// gateway stream's result lines go out as DATA frames.
pub async fn serve_h2_request(
    parts: http::request::Parts,
    mut body: h2::RecvStream,
    mut respond: h2::server::SendResponse<Bytes>,
    core: Rc<Core>,
) {
    let body_max = gateway::body_bytes_max(&core);
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string())
    };
    let member = &core.router.member;
    let origin = header("origin");
    let mut req = Request {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        token: header("authorization").or_else(|| header("grpc-metadata-token")),
        require_leader: header("grpc-metadata-hasleader").as_deref() == Some("true"),
        keep_alive: true,
        body: Vec::new(),
        host: parts.uri.authority().map(|a| a.to_string()),
        cors: cors_headers(&member.cors, origin.as_deref()),
        origin,
    };
    // The body, in REQUEST_TIMEOUT as on HTTP/1.
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        let next = futures_lite::future::or(async { Some(body.data().await) }, async {
            glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
            None
        })
        .await;
        let chunk = match next {
            Some(Some(Ok(chunk))) => chunk,
            Some(None) => break,
            Some(Some(Err(_))) => return,
            None => {
                respond.send_reset(h2::Reason::CANCEL);
                return;
            }
        };
        let _ = body.flow_control().release_capacity(chunk.len());
        if req.body.len() + chunk.len() > body_max {
            let st = crate::error::Status::new(
                crate::error::Code::ResourceExhausted,
                format!(
                    "request body larger than max ({} vs. {body_max})",
                    req.body.len() + chunk.len()
                ),
            );
            let r = gateway::error_reply(&st);
            let a = Answer {
                status: r.status,
                content_type: "application/json",
                extra: req.cors.clone(),
                body: r.body,
            };
            h2_answer(&mut respond, a, false).await;
            return;
        }
        req.body.extend_from_slice(&chunk);
    }
    if req.method == "OPTIONS" {
        let a = Answer {
            status: "200 OK",
            content_type: "",
            extra: req.cors.clone(),
            body: Vec::new(),
        };
        h2_answer(&mut respond, a, false).await;
        return;
    }
    let a = if member.grpc_gateway && gateway::is_gateway_path(&req.path) {
        let gone = async {
            let _ = futures::future::poll_fn(|cx| respond.poll_reset(cx)).await;
        };
        match serve_gateway(&req, &core, gone).await {
            Gw::Answer(a) => a,
            Gw::Stream(m) => return h2_stream(&req, &core, m, respond).await,
            Gw::Gone => return,
        }
    } else {
        plain(&req, &core, true).await
    };
    h2_answer(&mut respond, a, req.method == "HEAD").await;
}

/// Writes `data` on an HTTP/2 stream as its window allows; false if the
/// client went away.
async fn h2_send(send: &mut h2::SendStream<Bytes>, mut data: Bytes, end: bool) -> bool {
    if data.is_empty() {
        return !end || send.send_data(data, true).is_ok();
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = match futures::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) if n > 0 => n,
            Some(Ok(_)) => continue,
            _ => return false,
        };
        let chunk = data.split_to(cap.min(data.len()));
        if send.send_data(chunk, end && data.is_empty()).is_err() {
            return false;
        }
    }
    true
}

/// An `Answer` as an HTTP/2 response.
fn h2_head(a: &Answer, length: Option<usize>) -> Option<http::Response<()>> {
    let code: u16 = a.status.get(..3)?.parse().ok()?;
    let mut b = http::Response::builder().status(code);
    for line in a.extra.split("\r\n") {
        if let Some((name, value)) = line.split_once(": ") {
            b = b.header(name.to_ascii_lowercase(), value);
        }
    }
    if !a.content_type.is_empty() {
        b = b.header("content-type", a.content_type);
    }
    if let Some(n) = length {
        b = b.header("content-length", n);
    }
    b.body(()).ok()
}

async fn h2_answer(respond: &mut h2::server::SendResponse<Bytes>, a: Answer, head_only: bool) {
    let Some(head) = h2_head(&a, Some(a.body.len())) else {
        respond.send_reset(h2::Reason::INTERNAL_ERROR);
        return;
    };
    if head_only || a.body.is_empty() {
        let _ = respond.send_response(head, true);
        return;
    }
    if let Ok(mut send) = respond.send_response(head, false) {
        h2_send(&mut send, Bytes::from(a.body), true).await;
    }
}

/// A gateway stream over HTTP/2: as `serve_stream`, with the result lines
/// as DATA frames and the stream's reset as the client leaving.
async fn h2_stream(
    req: &Request,
    core: &Core,
    m: StreamMethod,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    use futures::StreamExt;
    let refuse = |st: &crate::error::Status| {
        let r = gateway::error_reply(st);
        Answer {
            status: r.status,
            content_type: "application/json",
            extra: req.cors.clone(),
            body: r.body,
        }
    };
    let start = super::grpc::check_leader(core, req.require_leader)
        .and_then(|()| gateway::stream_requests(m, &req.body))
        .and_then(|msgs| {
            super::auth::authorize_stream(core, m, super::auth::Caller::token(req.token.as_deref()))
                .map(|u| (msgs, u))
        });
    let (msgs, user) = match start {
        Ok(v) => v,
        Err(st) => return h2_answer(&mut respond, refuse(&st), false).await,
    };
    let a = Answer {
        status: "200 OK",
        content_type: "application/json",
        extra: format!(
            "{}Grpc-Metadata-Content-Type: application/grpc\r\n",
            req.cors
        ),
        body: Vec::new(),
    };
    let Some(head) = h2_head(&a, None) else {
        return;
    };
    let Ok(mut send) = respond.send_response(head, false) else {
        return;
    };
    let (closed_tx, closed_rx) = futures::channel::oneshot::channel::<()>();
    let (mut sink, mut rx) = MsgSink::queued(STREAM_QUEUE_DEPTH, closed_rx);
    let input = MsgStream::queued(msgs);
    let meta = Metadata {
        require_leader: req.require_leader,
        user,
    };
    let handler = async move {
        core.count_started(m);
        let end = api::call_stream(m, input, &mut sink, meta, core).await;
        core.count_result(m, &end);
        drop(sink);
        end
    };
    // The writer also watches for the client's reset (the stream's, as
    // the response is sent); then dropping `closed_tx` ends the handler.
    let writer = async move {
        loop {
            let next = futures::future::poll_fn(|cx| {
                if send.poll_reset(cx).is_ready() {
                    return std::task::Poll::Ready(None);
                }
                rx.poll_next_unpin(cx).map(Some)
            })
            .await;
            match next {
                Some(Some(pb)) => {
                    let line: Bytes = gateway::stream_result(m, &pb).into();
                    if !h2_send(&mut send, line, false).await {
                        break;
                    }
                }
                Some(None) => return (true, send),
                None => break,
            }
        }
        drop(closed_tx);
        (false, send)
    };
    let (end, (written, mut send)) = futures::future::join(handler, writer).await;
    if !written {
        return;
    }
    let tail = match end {
        Err(st) => Bytes::from(gateway::stream_error(&st)),
        Ok(()) => Bytes::new(),
    };
    h2_send(&mut send, tail, true).await;
}

/// etcd 3.4's /health: unhealthy with an alarm raised that the query does
/// not exclude (`?exclude=NOSPACE`, repeatable), else without a leader
/// unless the query asks for `serializable=true` (3.5's); the body and
/// content type as etcd 3.4 writes them (no reason: 3.5 added one, and
/// etcd 3.4's own tests match the body exactly).
fn health(core: &Core, query: &str) -> (&'static str, &'static str, String) {
    let mut excluded = 0u8;
    let mut serializable = false;
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        match (k, v) {
            ("exclude", "NOSPACE") => excluded |= 1,
            ("exclude", "CORRUPT") => excluded |= 2,
            ("serializable", v) => serializable = v == "true",
            _ => {}
        }
    }
    let alarms = core.view.alarms.get() & !excluded;
    let healthy = alarms == 0 && (serializable || core.view.leader.get() != 0);
    crate::metrics::count(|c| {
        if healthy {
            c.health_ok += 1
        } else {
            c.health_failed += 1
        }
    });
    if healthy {
        // Go's content sniffing names this text/plain.
        (
            "200 OK",
            "text/plain; charset=utf-8",
            "{\"health\":\"true\"}".into(),
        )
    } else {
        // Go's http.Error: text/plain and a newline.
        (
            "503 Service Unavailable",
            "text/plain; charset=utf-8",
            "{\"health\":\"false\"}\n".into(),
        )
    }
}

const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The Prometheus Go client's process collector, which etcd's /metrics
/// carries (`etcdctl check datascale` reads `process_resident_memory_bytes`),
/// from /proc. A figure that cannot be read is left out.
fn process_metrics(out: &mut String) {
    let mut put = |name: &str, help: &str, kind: &str, value: String| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    // SAFETY: sysconf and getrlimit only read process settings.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
        )
    };
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name, which is in parentheses and may
        // hold spaces: state is field 3, so field n is at index n - 3.
        let f: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        if let (Some(u), Some(s)) = (num(14), num(15)) {
            put(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                "counter",
                format!("{}", (u + s) as f64 / ticks),
            );
        }
        if let Some(v) = num(23) {
            put(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                "gauge",
                v.to_string(),
            );
        }
        if let Some(r) = num(24) {
            put(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                "gauge",
                (r * page).to_string(),
            );
        }
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        if let (Some(b), Some(st)) = (boot, num(22)) {
            put(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                "gauge",
                format!("{}", b as f64 + st as f64 / ticks),
            );
        }
    }
    if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
        put(
            "process_open_fds",
            "Number of open file descriptors.",
            "gauge",
            d.count().to_string(),
        );
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        put(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            "gauge",
            lim.rlim_cur.to_string(),
        );
    }
}

async fn metrics(core: &Core) -> String {
    let mut waits = Vec::new();
    for c in &core.router.cores {
        let (tx, rx) = futures::channel::oneshot::channel();
        c.send(CoreMsg::Rpcs { reply: tx });
        waits.push(rx);
    }
    let mut total: std::collections::BTreeMap<&str, [u64; 18]> = Default::default();
    let mut counts = crate::metrics::Counts::default();
    let mut pending = 0;
    for w in waits {
        if let Ok(v) = w.await {
            for (path, n) in v.rpcs {
                let t = total.entry(path).or_insert([0; 18]);
                for (t, n) in t.iter_mut().zip(n) {
                    *t += n;
                }
            }
            counts.add(&v.counts);
            pending += v.writes_pending;
        }
    }
    let v = &core.view;
    let me = core.router.member.id;
    let mut out = String::new();
    let gauge = |out: &mut String, name: &str, help: &str, kind: &str, value: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    gauge(
        &mut out,
        "etcd_server_has_leader",
        "Whether or not a leader exists. 1 is existence, 0 is not.",
        "gauge",
        (v.leader.get() != 0) as u64,
    );
    gauge(
        &mut out,
        "etcd_server_is_leader",
        "Whether or not this member is a leader. 1 if is, 0 otherwise.",
        "gauge",
        (v.leader.get() == me) as u64,
    );
    gauge(
        &mut out,
        "etcd_server_is_learner",
        "Whether or not this member is a learner. 1 if is, 0 otherwise.",
        "gauge",
        v.learner.get() as u64,
    );
    gauge(
        &mut out,
        "etcd_server_proposals_committed_total",
        "The total number of consensus proposals committed.",
        "gauge",
        v.commit.get(),
    );
    gauge(
        &mut out,
        "etcd_server_proposals_applied_total",
        "The total number of consensus proposals applied.",
        "gauge",
        v.applied.get(),
    );
    let (db, in_use, keys) = super::api::shard_totals(core).await;
    gauge(
        &mut out,
        "etcd_mvcc_db_total_size_in_bytes",
        "Total size of the underlying database physically allocated in bytes.",
        "gauge",
        db,
    );
    gauge(
        &mut out,
        "etcd_mvcc_db_total_size_in_use_in_bytes",
        "Total size of the underlying database logically in use in bytes.",
        "gauge",
        in_use.min(db),
    );
    // etcd reports its default when no quota is set; keelson's negative
    // --quota-backend-bytes (no quota) reports 0.
    gauge(
        &mut out,
        "etcd_server_quota_backend_bytes",
        "Current backend storage quota size in bytes.",
        "gauge",
        core.router.member.quota_bytes.unwrap_or(0),
    );
    let info = |out: &mut String, name: &str, help: &str, label: &str, value: &str| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{label}=\"{value}\"}} 1\n"
        ));
    };
    let version = crate::ETCD_VERSION;
    info(
        &mut out,
        "etcd_server_version",
        "Which version is running. 1 for 'server_version' label with current version.",
        "server_version",
        version,
    );
    info(
        &mut out,
        "etcd_cluster_version",
        "Which version is running. 1 for 'cluster_version' label with current cluster version",
        "cluster_version",
        version
            .rsplit_once('.')
            .map(|(mm, _)| mm)
            .unwrap_or(version),
    );
    info(
        &mut out,
        "etcd_server_id",
        "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.",
        "server_id",
        &format!("{me:x}"),
    );
    gauge(
        &mut out,
        "etcd_server_leader_changes_seen_total",
        "The number of leader changes seen.",
        "counter",
        v.leader_changes.get(),
    );
    gauge(
        &mut out,
        "etcd_server_proposals_pending",
        "The current number of pending proposals to commit.",
        "gauge",
        pending as u64,
    );
    gauge(
        &mut out,
        "etcd_server_proposals_failed_total",
        "The total number of failed proposals seen.",
        "counter",
        counts.proposals_failed,
    );
    gauge(
        &mut out,
        "etcd_server_health_success",
        "The total number of successful health checks",
        "counter",
        counts.health_ok,
    );
    gauge(
        &mut out,
        "etcd_server_health_failures",
        "The total number of failed health checks",
        "counter",
        counts.health_failed,
    );
    for (name, help, n) in [
        (
            "etcd_mvcc_range_total",
            "Total number of ranges seen by this member.",
            counts.ranges,
        ),
        (
            "etcd_mvcc_put_total",
            "Total number of puts seen by this member.",
            counts.puts,
        ),
        (
            "etcd_mvcc_delete_total",
            "Total number of deletes seen by this member.",
            counts.deletes,
        ),
        (
            "etcd_mvcc_txn_total",
            "Total number of txns seen by this member.",
            counts.txns,
        ),
    ] {
        gauge(&mut out, name, help, "counter", n);
    }
    gauge(
        &mut out,
        "etcd_debugging_mvcc_keys_total",
        "Total number of keys.",
        "gauge",
        keys,
    );
    gauge(
        &mut out,
        "etcd_debugging_mvcc_current_revision",
        "The current revision of store.",
        "gauge",
        v.revision.get().max(0) as u64,
    );
    // etcd's is -1 until the first compaction.
    let compacted = match v.compact_revision.get() {
        0 => -1,
        r => r,
    };
    out.push_str(&format!(
        "# HELP etcd_debugging_mvcc_compact_revision The revision of the last compaction in store.\n# TYPE etcd_debugging_mvcc_compact_revision gauge\netcd_debugging_mvcc_compact_revision {compacted}\n"
    ));
    counts.wal_fsync.render(
        &mut out,
        "etcd_disk_wal_fsync_duration_seconds",
        "The latency distributions of fsync called by WAL.",
    );
    process_metrics(&mut out);
    // go-grpc-prometheus' labels: service, method and the call's kind.
    let labels = |path: &str| -> String {
        use super::api::StreamMethod;
        let (svc, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", path));
        let kind = match super::api::lookup_stream(path) {
            Some(StreamMethod::Watch | StreamMethod::LeaseKeepAlive) => "bidi_stream",
            Some(StreamMethod::Snapshot | StreamMethod::Observe) => "server_stream",
            None => "unary",
        };
        format!("grpc_method=\"{method}\",grpc_service=\"{svc}\",grpc_type=\"{kind}\"")
    };
    out.push_str("# HELP grpc_server_handled_total Total number of RPCs completed on the server, regardless of success or failure.\n# TYPE grpc_server_handled_total counter\n");
    for (path, counts) in &total {
        let l = labels(path);
        for (code, n) in CODES.iter().zip(counts).filter(|(_, n)| **n > 0) {
            out.push_str(&format!(
                "grpc_server_handled_total{{grpc_code=\"{code}\",{l}}} {n}\n"
            ));
        }
    }
    out.push_str("# HELP grpc_server_started_total Total number of RPCs started on the server.\n# TYPE grpc_server_started_total counter\n");
    for (path, counts) in &total {
        let n = counts[super::STARTED as usize];
        if n > 0 {
            out.push_str(&format!(
                "grpc_server_started_total{{{}}} {n}\n",
                labels(path)
            ));
        }
    }
    out
}
