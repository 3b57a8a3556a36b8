//! Recovery from damaged data files, and hostile input on the client port,
//! against the real binary.

mod support;

use etcd_client::{Client, GetOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::Member;

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().map(|e| e == ext).unwrap_or(false))
        .collect();
    v.sort();
    v
}

/// Puts `n` keys and returns (key, value, mod_revision) for each.
async fn put_keys(c: &mut Client, prefix: &str, n: usize) -> Vec<(String, String, i64)> {
    let mut out = Vec::new();
    for i in 0..n {
        let (k, v) = (format!("{prefix}{i:05}"), format!("value-{i}"));
        let r = c.put(k.clone(), v.clone(), None).await.unwrap();
        out.push((k, v, r.header().unwrap().revision()));
    }
    out
}

async fn check_keys(c: &mut Client, want: &[(String, String, i64)]) {
    for (k, v, rev) in want {
        let r = c.get(k.clone(), None).await.unwrap();
        let kv = r.kvs().first().unwrap_or_else(|| panic!("{k} missing"));
        assert_eq!(
            (kv.value_str().unwrap(), kv.mod_revision()),
            (v.as_str(), *rev),
            "{k}"
        );
    }
}

#[tokio::test]
async fn replays_wal_after_checkpoints() {
    // A checkpoint every 10 entries: recovery loads segments and replays
    // only the WAL tail, across several checkpoints and a WAL release.
    let mut m = Member::new(&["--snapshot-count", "10"]);
    assert!(m.start().is_none());
    let want = put_keys(&mut m.client().await, "k", 300).await;
    m.kill9();
    assert!(m.start().is_none());
    let mut c = m.client().await;
    check_keys(&mut c, &want).await;
    let r = c
        .get("k", Some(GetOptions::new().with_prefix().with_count_only()))
        .await
        .unwrap();
    assert_eq!(r.count(), 300);
    // And it keeps going after the restart.
    let more = put_keys(&mut c, "after", 5).await;
    assert!(more[0].2 > want.last().unwrap().2);
}

/// Where a WAL segment's records end (segments are zero-filled ahead):
/// walks the 8-byte magic, then records of `len:u32le | crc:u32le | body`.
fn records_end(data: &[u8]) -> usize {
    let mut off = 8;
    while off + 8 <= data.len() {
        let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        off += 8 + len;
    }
    off
}

#[tokio::test]
async fn torn_wal_tail_is_cut_with_a_log_line() {
    let mut m = Member::new(&[]);
    assert!(m.start().is_none());
    let want = put_keys(&mut m.client().await, "t", 20).await;
    m.kill9();
    // A crash in the middle of writing the next (unacknowledged) batch
    // leaves part of a record after the last synced one (over the
    // zero-filled space ahead of it).
    let wal = files(&m.data().join("wal"), "wal").pop().unwrap();
    let mut data = std::fs::read(&wal).unwrap();
    let end = records_end(&data);
    let partial = [0x40, 0, 0, 0, 0x12, 0x34, 0x56, 0x78, 1, 8, 1];
    if data.len() < end + partial.len() {
        data.resize(end + partial.len(), 0);
    }
    data[end..end + partial.len()].copy_from_slice(&partial);
    std::fs::write(&wal, &data).unwrap();
    assert!(m.start().is_none());
    assert!(
        m.log_text().contains("cutting a torn tail"),
        "{}",
        m.log_text()
    );
    check_keys(&mut m.client().await, &want).await;
}

#[tokio::test]
async fn corrupt_wal_record_refuses_to_start() {
    let mut m = Member::new(&[]);
    assert!(m.start().is_none());
    put_keys(&mut m.client().await, "c", 20).await;
    m.kill9();
    let wal = files(&m.data().join("wal"), "wal").pop().unwrap();
    let mut data = std::fs::read(&wal).unwrap();
    let mid = records_end(&data) / 3;
    data[mid] ^= 0x5a;
    std::fs::write(&wal, &data).unwrap();
    let st = m.start().expect("must refuse to start");
    assert!(!st.success());
    let log = m.log_text();
    assert!(
        log.contains("refusing to start") && log.contains(".wal"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test]
async fn corrupt_segment_refuses_to_start_and_truncated_tail_recovers() {
    let mut m = Member::new(&["--snapshot-count", "10", "--shards", "1", "--cores", "1"]);
    assert!(m.start().is_none());
    let want = put_keys(&mut m.client().await, "s", 50).await;
    m.kill9();
    let seg = files(&m.data().join("shard-000"), "seg").pop().unwrap();
    let orig = std::fs::read(&seg).unwrap();

    // Bytes past the last checkpoint (here a torn record: shards write
    // their segments lazily, so after a kill the file may end exactly at
    // the checkpoint) are cut and replayed from the WAL.
    let mut torn = orig.clone();
    torn.extend_from_slice(&orig[8..8 + 7]);
    std::fs::write(&seg, &torn).unwrap();
    assert!(m.start().is_none(), "{}", m.log_text());
    check_keys(&mut m.client().await, &want).await;
    m.kill9();

    // A flipped byte inside checkpointed data is corruption: refuse.
    let mut bad = std::fs::read(&seg).unwrap();
    bad[20] ^= 0xff;
    std::fs::write(&seg, &bad).unwrap();
    let st = m.start().expect("must refuse to start");
    assert!(!st.success());
    let log = m.log_text();
    assert!(log.contains(".seg") && log.contains("offset"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// Sends raw bytes and reads until the server closes or 2 s pass.
fn poke(ep: &str, bytes: &[u8]) {
    let mut s = TcpStream::connect(ep).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 4096];
    let _ = s.read(&mut buf);
}

/// The head of a gRPC call to `path`, as grpc clients send it.
fn grpc_request(ep: &str, path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://{ep}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// An HTTP/2 client sending one gRPC request with an arbitrary body;
/// returns (grpc-status, grpc-message).
async fn raw_grpc(ep: &str, path: &str, body: Vec<u8>) -> (String, String) {
    raw_grpc_chunks(ep, path, vec![body]).await
}

/// A call whose body goes as one DATA frame per chunk, the last one ending
/// the stream.
async fn raw_grpc_chunks(ep: &str, path: &str, chunks: Vec<Vec<u8>>) -> (String, String) {
    let tcp = tokio::net::TcpStream::connect(ep).await.unwrap();
    let (mut h2c, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let (resp, mut send) = h2c.send_request(grpc_request(ep, path), false).unwrap();
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        send.send_data(c.into(), i + 1 == n).unwrap();
        // Let each go out as a frame of its own.
        tokio::task::yield_now().await;
    }
    let resp = resp.await.unwrap();
    let head = resp.headers().clone();
    let mut recv = resp.into_body();
    while let Some(d) = recv.data().await {
        let _ = d;
    }
    let trailers = recv.trailers().await.unwrap().unwrap_or(head);
    let get = |k: &str| {
        trailers
            .get(k)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    (get("grpc-status"), get("grpc-message"))
}

fn frame(msg: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8];
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// A unary request's message may come in several DATA frames, split
/// anywhere, even inside its 5-byte prefix; it is read whole, and a length
/// over the limit is refused however it is split.
#[tokio::test]
async fn a_unary_message_split_over_data_frames_is_read_whole() {
    let mut m = Member::new(&[]);
    assert!(m.start().is_none());
    let ep = m.endpoint();
    // PutRequest { key: "split", value: "whole" }
    let put = frame(b"\x0a\x05split\x12\x05whole");
    for cuts in [vec![2], vec![5], vec![1, 3, 9], vec![6, 7, 8]] {
        let mut chunks = Vec::new();
        let mut at = 0;
        for c in cuts.iter().copied().chain([put.len()]) {
            chunks.push(put[at..c].to_vec());
            at = c;
        }
        let (code, msg) = raw_grpc_chunks(&ep, "/etcdserverpb.KV/Put", chunks).await;
        assert_eq!(code, "0", "cuts {cuts:?}: {msg}");
    }
    let too_big = [&[0u8][..], &u32::MAX.to_be_bytes()[..], b"x"].concat();
    let (code, _) = raw_grpc_chunks(
        &ep,
        "/etcdserverpb.KV/Put",
        vec![too_big[..3].to_vec(), too_big[3..].to_vec()],
    )
    .await;
    assert_eq!(code, "8");
    let mut c = m.client().await;
    let got = c.get("split", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"whole");
}

#[tokio::test]
async fn hostile_input_never_crashes_the_server() {
    let mut m = Member::new(&[]);
    assert!(m.start().is_none());
    let ep = m.endpoint();
    // Not HTTP/2 at all, a bad preface, HTTP/1.
    poke(&ep, b"\x00\x01\x02garbage\xff\xfe");
    poke(
        &ep,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    );
    poke(&ep, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    // (path, body, expected grpc-status)
    let too_big = u32::MAX.to_be_bytes();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("/etcdserverpb.KV/Put", frame(&[0xff, 0xff, 0xff]), "13"),
        ("/etcdserverpb.KV/Range", frame(&[0x0a, 0x50, 0x01]), "13"),
        ("/etcdserverpb.KV/Txn", vec![0, 0, 0], "13"),
        (
            "/etcdserverpb.KV/Put",
            [&[0u8][..], &too_big[..], b"x"].concat(),
            "8",
        ),
        (
            "/etcdserverpb.KV/Put",
            [&[1u8][..], &[0, 0, 0, 1][..], b"x"].concat(),
            "13",
        ),
        ("/etcdserverpb.KV/Nope", frame(&[]), "12"),
        ("/no.Such/Service", frame(&[]), "12"),
        ("/v3electionpb.Election/Nope", frame(&[]), "12"),
        // The watch stream: bad protobuf, a huge length prefix, a
        // compressed flag, a stream that ends inside a message.
        (
            "/etcdserverpb.Watch/Watch",
            frame(&[0xff, 0xff, 0xff]),
            "13",
        ),
        (
            "/etcdserverpb.Watch/Watch",
            [&[0u8][..], &too_big[..], b"x"].concat(),
            "8",
        ),
        (
            "/etcdserverpb.Watch/Watch",
            [&[1u8][..], &[0, 0, 0, 1][..], b"x"].concat(),
            "13",
        ),
        ("/etcdserverpb.Watch/Watch", vec![0, 0, 0, 0, 9, 8], "13"),
        // An empty key is etcd's InvalidArgument.
        ("/etcdserverpb.KV/Put", frame(&[0x12, 0x01, b'v']), "3"),
        // The keep-alive stream: bad protobuf, a huge length prefix, a
        // compressed flag, a stream that ends inside a message, and two
        // valid requests (for a lease that does not exist) closed cleanly.
        (
            "/etcdserverpb.Lease/LeaseKeepAlive",
            frame(&[0xff, 0xff, 0xff]),
            "13",
        ),
        (
            "/etcdserverpb.Lease/LeaseKeepAlive",
            [&[0u8][..], &too_big[..], b"x"].concat(),
            "8",
        ),
        (
            "/etcdserverpb.Lease/LeaseKeepAlive",
            [&[1u8][..], &[0, 0, 0, 1][..], b"x"].concat(),
            "13",
        ),
        (
            "/etcdserverpb.Lease/LeaseKeepAlive",
            vec![0, 0, 0, 0, 9, 8],
            "13",
        ),
        (
            "/etcdserverpb.Lease/LeaseKeepAlive",
            [frame(&[0x08, 0x05]), frame(&[0x08, 0x06])].concat(),
            "0",
        ),
    ];
    for (path, body, want) in cases {
        let (code, msg) = raw_grpc(&ep, path, body).await;
        assert_eq!(code, want, "{path}: {msg}");
    }
    // Still alive and serving.
    let mut c = m.client().await;
    c.put("alive", "yes", None).await.unwrap();
    assert_eq!(
        c.get("alive", None).await.unwrap().kvs()[0]
            .value_str()
            .unwrap(),
        "yes"
    );
    assert!(m.child.as_mut().unwrap().try_wait().unwrap().is_none());
}

/// Runs the binary with `args` and waits (at most 20 s) for it to exit;
/// returns whether it succeeded and what it printed.
fn run_to_exit(args: &[String]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("out");
    let f = std::fs::File::create(&log).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keelson"))
        .args(args)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "still running after 20 s:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (st.success(), std::fs::read_to_string(&log).unwrap())
}

/// A second member on a port a running one listens on, or on its data dir,
/// is refused at start with a clear error (the cores' SO_REUSEPORT sockets
/// would otherwise let it share the port and take part of the connections).
#[tokio::test]
async fn a_port_or_data_dir_in_use_is_refused() {
    if support::is_etcd() {
        return;
    }
    let mut a = Member::new(&[]);
    assert!(a.start().is_none(), "{}", a.log_text());
    let mut c = a.client().await;
    c.put("k", "a", None).await.unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let url = |p: u16| format!("http://127.0.0.1:{p}");
    let args = |data: &Path, client: String, peer: String| -> Vec<String> {
        vec![
            "--data-dir".into(),
            data.to_str().unwrap().into(),
            "--listen-client-urls".into(),
            client.clone(),
            "--advertise-client-urls".into(),
            client,
            "--listen-peer-urls".into(),
            peer.clone(),
            "--initial-advertise-peer-urls".into(),
            peer.clone(),
            "--initial-cluster".into(),
            format!("default={peer}"),
        ]
    };
    let (ok, out) = run_to_exit(&args(
        &fresh.path().join("d"),
        format!("http://{}", a.endpoint().trim_start_matches("http://")),
        url(support::free_port()),
    ));
    assert!(!ok && out.contains("Address already in use"), "{out}");
    let (ok, out) = run_to_exit(&args(
        &a.data(),
        url(support::free_port()),
        url(support::free_port()),
    ));
    assert!(!ok && out.contains("in use by another process"), "{out}");
    // The running member is untouched and serves alone.
    for _ in 0..20 {
        let r = c.get("k", None).await.unwrap();
        assert_eq!(r.kvs()[0].value(), b"a");
    }
}

/// One unary call over `h2c`; the answer's body is read with its flow
/// control released as it comes, as grpc clients do. Returns the message
/// (without the gRPC prefix) and grpc-status.
async fn unary(
    h2c: &mut h2::client::SendRequest<bytes::Bytes>,
    ep: &str,
    path: &str,
    msg: Vec<u8>,
) -> (Vec<u8>, String) {
    let (resp, mut send) = h2c.send_request(grpc_request(ep, path), false).unwrap();
    send.send_data(frame(&msg).into(), true).unwrap();
    let resp = resp.await.unwrap();
    let mut recv = resp.into_body();
    let mut body = Vec::new();
    while let Some(d) = recv.data().await {
        let d = d.unwrap();
        let _ = recv.flow_control().release_capacity(d.len());
        body.extend_from_slice(&d);
    }
    let trailers = recv.trailers().await.unwrap().unwrap_or_default();
    let status = trailers
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let msg = if body.len() >= 5 {
        body[5..].to_vec()
    } else {
        body
    };
    (msg, status)
}

/// Unary answers are written whole at once when their stream and the
/// connection have the window for them (keelson's h2 patch `send_direct`),
/// and scheduled frame by frame otherwise. Under a client's 64-byte stream
/// windows and its default 64 KiB connection window, many concurrent calls
/// on one connection, with answers from tens of bytes (fit) to 1 KiB (over
/// the stream window) and 20 KiB (over the smallest frame size), must all
/// arrive whole and in their own streams.
#[tokio::test]
async fn unary_answers_arrive_whole_under_tight_flow_control() {
    use keelson::proto::etcdserverpb::{PutRequest, PutResponse, RangeRequest, RangeResponse};
    use prost::Message;
    let mut m = Member::new(&[]);
    assert!(m.start().is_none());
    let ep = m.endpoint();
    let value = |i: usize| -> Vec<u8> {
        let len = match i % 3 {
            0 => 10,
            1 => 1024,
            _ => 20 * 1024,
        };
        (0..len).map(|j| (i * 31 + j) as u8).collect()
    };
    // A broken flow-control path shows as a call that never ends.
    tokio::time::timeout(Duration::from_secs(60), async move {
        let tcp = tokio::net::TcpStream::connect(&ep).await.unwrap();
        let (h2c, conn) = h2::client::Builder::new()
            .initial_window_size(64)
            .handshake::<_, bytes::Bytes>(tcp)
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let keys = 30;
        for i in 0..keys {
            let put = PutRequest {
                key: format!("fc{i:03}").into_bytes().into(),
                value: value(i).into(),
                ..Default::default()
            };
            let (msg, status) = unary(
                &mut h2c.clone(),
                &ep,
                "/etcdserverpb.KV/Put",
                put.encode_to_vec(),
            )
            .await;
            assert_eq!(status, "0");
            PutResponse::decode(&msg[..]).unwrap();
        }
        // Reads of every size and puts, 150 calls in flight on the connection.
        let mut calls = Vec::new();
        for n in 0..150usize {
            let mut h2c = h2c.clone();
            let ep = ep.clone();
            calls.push(tokio::spawn(async move {
                let i = n % keys;
                if n % 5 == 4 {
                    let put = PutRequest {
                        key: format!("fcw{n:03}").into_bytes().into(),
                        value: b"w".to_vec().into(),
                        ..Default::default()
                    };
                    let (msg, status) =
                        unary(&mut h2c, &ep, "/etcdserverpb.KV/Put", put.encode_to_vec()).await;
                    assert_eq!(status, "0", "put {n}");
                    assert!(PutResponse::decode(&msg[..]).unwrap().header.is_some());
                } else {
                    let get = RangeRequest {
                        key: format!("fc{i:03}").into_bytes().into(),
                        serializable: n % 2 == 0,
                        ..Default::default()
                    };
                    let (msg, status) =
                        unary(&mut h2c, &ep, "/etcdserverpb.KV/Range", get.encode_to_vec()).await;
                    assert_eq!(status, "0", "range {n}");
                    let r = RangeResponse::decode(&msg[..]).unwrap();
                    assert_eq!(r.kvs.len(), 1, "range {n}");
                    assert_eq!(&r.kvs[0].value[..], &value(i)[..], "range {n}");
                }
            }));
        }
        for c in calls {
            c.await.unwrap();
        }
    })
    .await
    .expect("a call never finished");
}

/// `--wal-dir`: the log goes to its own directory, a kill -9 loses
/// nothing, and a start that names another WAL place (or none) is refused
/// rather than run on an empty log.
#[tokio::test]
async fn wal_dir_holds_the_log_and_is_checked_at_start() {
    let wal = tempfile::tempdir().unwrap();
    let wal_dir = wal.path().join("w");
    let wal_arg = wal_dir.to_str().unwrap().to_string();
    let mut m = Member::new(&["--wal-dir", &wal_arg]);
    assert!(m.start().is_none(), "{}", m.log_text());
    let want = put_keys(&mut m.client().await, "k", 50).await;
    m.kill9();
    assert!(
        std::fs::read_dir(&wal_dir).unwrap().count() > 0,
        "nothing in --wal-dir"
    );
    let own = m.data().join("wal");
    assert!(
        !own.exists() || std::fs::read_dir(&own).unwrap().count() == 0,
        "the data dir's own wal/ was written"
    );
    assert!(m.start().is_none(), "{}", m.log_text());
    check_keys(&mut m.client().await, &want).await;
    m.kill9();

    // Without --wal-dir, or with another one: refused, nothing lost.
    for other in [
        vec![],
        vec!["--wal-dir".to_string(), format!("{wal_arg}-elsewhere")],
    ] {
        let args: Vec<&str> = other.iter().map(|s| s.as_str()).collect();
        m.set_extra(&args);
        let st = m.start().expect("refused");
        assert!(!st.success());
        assert!(m.log_text().contains("WAL is in"), "{}", m.log_text());
    }
    m.set_extra(&["--wal-dir", &wal_arg]);
    assert!(m.start().is_none(), "{}", m.log_text());
    check_keys(&mut m.client().await, &want).await;
}

/// `--unsafe-no-fsync`: the WAL is written but not flushed; a kill -9 (the
/// process, not the machine) still loses nothing acknowledged, and the
/// member says what it gave up when it starts.
#[tokio::test]
async fn unsafe_no_fsync_survives_a_process_kill() {
    let mut m = Member::new(&["--unsafe-no-fsync"]);
    assert!(m.start().is_none(), "{}", m.log_text());
    let want = put_keys(&mut m.client().await, "k", 100).await;
    m.kill9();
    assert!(m.start().is_none(), "{}", m.log_text());
    check_keys(&mut m.client().await, &want).await;
    if !support::is_etcd() {
        assert!(
            m.log_text().contains("--unsafe-no-fsync"),
            "{}",
            m.log_text()
        );
    }
}
