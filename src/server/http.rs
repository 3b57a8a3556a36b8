//! HTTP/1 on the client port (and on `--listen-metrics-urls`), as etcd
//! serves it next to gRPC: `GET /health` (JSON, 503 without a leader or
//! with an alarm raised), `GET /version`, and `GET /metrics` in the
//! Prometheus text format — gRPC calls completed per method and code
//! (`grpc_server_handled_total`, summed over every core) and a few of
//! etcd's server gauges. One request per connection.

use super::{Core, CoreMsg};
use futures::io::{AsyncReadExt, AsyncWriteExt};
use std::rc::Rc;
use std::time::Duration;

const HEAD_MAX: usize = 8 << 10;

/// Serves one request; `client_port` adds /version (etcd's metrics
/// listener has only /metrics and /health).
pub async fn serve<S>(mut stream: S, core: Rc<Core>, client_port: bool)
where
    S: futures::io::AsyncRead + futures::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::with_capacity(512);
    let read = async {
        let mut chunk = [0u8; 1024];
        loop {
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > HEAD_MAX {
                return true;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let timeout = async {
        glommio::timer::sleep(Duration::from_secs(5)).await;
        false
    };
    if !futures_lite::future::or(read, timeout).await || buf.len() > HEAD_MAX {
        return;
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("/");
    let path = target.split('?').next().unwrap_or("/");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics(&core).await),
        ("GET", "/health") | ("GET", "/livez") | ("GET", "/readyz") => health(&core),
        ("GET", "/version") if client_port => (
            "200 OK",
            "application/json",
            format!(
                "{{\"etcdserver\":\"{v}\",\"etcdcluster\":\"{v}\"}}",
                v = crate::ETCD_VERSION
            ),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "404 page not found\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "Method Not Allowed\n".into(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    if method != "HEAD" {
        let _ = stream.write_all(body.as_bytes()).await;
    }
    let _ = stream.flush().await;
}

/// etcd's /health: healthy with a leader and no alarm raised.
fn health(core: &Core) -> (&'static str, &'static str, String) {
    let reason = if core.view.leader.get() == 0 {
        Some("RAFT NO LEADER")
    } else if core.view.alarms.get() != 0 {
        Some("ALARM")
    } else {
        None
    };
    match reason {
        None => (
            "200 OK",
            "application/json",
            "{\"health\":\"true\",\"reason\":\"\"}".into(),
        ),
        Some(r) => (
            "503 Service Unavailable",
            "application/json",
            format!("{{\"health\":\"false\",\"reason\":\"{r}\"}}"),
        ),
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

async fn metrics(core: &Core) -> String {
    let mut waits = Vec::new();
    for c in &core.router.cores {
        let (tx, rx) = futures::channel::oneshot::channel();
        c.send(CoreMsg::Rpcs { reply: tx });
        waits.push(rx);
    }
    let mut total: std::collections::BTreeMap<String, [u64; 17]> = Default::default();
    for w in waits {
        if let Ok(v) = w.await {
            for (path, counts) in v {
                let t = total.entry(path).or_insert([0; 17]);
                for (t, n) in t.iter_mut().zip(counts) {
                    *t += n;
                }
            }
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
    out.push_str("# HELP grpc_server_handled_total Total number of RPCs completed on the server, regardless of success or failure.\n# TYPE grpc_server_handled_total counter\n");
    for (path, counts) in total {
        let (svc, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", path.as_str()));
        let kind = if super::api::lookup_stream(&path).is_some() {
            "bidi_stream"
        } else {
            "unary"
        };
        for (code, n) in CODES.iter().zip(counts).filter(|(_, n)| *n > 0) {
            out.push_str(&format!(
                "grpc_server_handled_total{{grpc_code=\"{code}\",grpc_method=\"{method}\",grpc_service=\"{svc}\",grpc_type=\"{kind}\"}} {n}\n"
            ));
        }
    }
    out
}
