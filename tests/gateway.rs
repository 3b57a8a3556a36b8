//! etcd's JSON gateway (`POST /v3/...` over HTTP/1.1 on the client port)
//! against the real binary, with a small HTTP/1.1 client over a std
//! `TcpStream`: the JSON shapes (field names as in the .proto, 64-bit
//! integers as strings, bytes as base64, defaults left out), the HTTP
//! status and error body of each kind of failure, auth tokens in the
//! `Authorization` header, and the HTTP handling itself (keep-alive,
//! pipelining, chunked bodies, `Expect: 100-continue`, size limit) and the
//! streams (watch, lease keep-alive) as chunked `{"result":...}` lines. Also
//! run against etcd 3.4 with `KEELSON_TEST_SERVER=etcd cargo test --test
//! gateway`: revisions differ between the two by design (keelson's are
//! Raft indexes), so they are compared by relation, never by value; error
//! messages of JSON parsing differ too (Go's and serde's), so only their
//! code and shape are compared.

mod support;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use support::{is_etcd, Member};

/// One HTTP/1.1 connection.
struct Conn {
    r: BufReader<TcpStream>,
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Conn {
    fn new(m: &Member) -> Conn {
        let s = TcpStream::connect(m.endpoint()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Conn {
            r: BufReader::new(s),
        }
    }
    fn send(&mut self, bytes: &[u8]) {
        self.r.get_mut().write_all(bytes).unwrap();
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        l.trim_end_matches(['\r', '\n']).to_string()
    }
    /// Reads header lines up to the blank line that ends them.
    fn headers(&mut self) -> Vec<(String, String)> {
        let mut headers = Vec::new();
        loop {
            let l = self.line();
            if l.is_empty() {
                return headers;
            }
            let (n, v) = l.split_once(':').unwrap();
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }

    /// Reads one response (a `100 Continue` is skipped).
    fn read(&mut self) -> Resp {
        loop {
            let status_line = self.line();
            let status: u16 = status_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
            let headers = self.headers();
            if status == 100 {
                continue;
            }
            let mut r = Resp {
                status,
                headers,
                body: Vec::new(),
            };
            if let Some(n) = r.header("content-length") {
                let mut body = vec![0; n.parse().unwrap()];
                self.r.read_exact(&mut body).unwrap();
                r.body = body;
            } else if r.header("transfer-encoding") == Some("chunked") {
                loop {
                    let size = usize::from_str_radix(&self.line(), 16).unwrap();
                    if size == 0 {
                        // Trailers up to an empty line.
                        while !self.line().is_empty() {}
                        break;
                    }
                    let mut chunk = vec![0; size + 2];
                    self.r.read_exact(&mut chunk).unwrap();
                    r.body.extend_from_slice(&chunk[..size]);
                }
            } else {
                self.r.read_to_end(&mut r.body).unwrap();
            }
            return r;
        }
    }
    fn post_with(&mut self, path: &str, body: &str, headers: &str) -> Resp {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.send(req.as_bytes());
        self.read()
    }
    fn post(&mut self, path: &str, body: &Value) -> Resp {
        self.post_with(path, &body.to_string(), "")
    }
}

fn started() -> Member {
    let mut m = Member::new(&[]);
    if let Some(st) = m.start() {
        panic!("server exited at start ({st}):\n{}", m.log_text());
    }
    m
}

/// A 64-bit integer field (int64 or uint64): present, a JSON string, and
/// its value.
fn int(v: &Value) -> i128 {
    v.as_str()
        .unwrap_or_else(|| panic!("not a string: {v}"))
        .parse()
        .unwrap()
}

fn rev(r: &Value) -> i64 {
    int(&r["header"]["revision"]) as i64
}

/// Asserts an error answer: status, code, and (if given) the message,
/// which etcd writes twice.
fn assert_error(r: &Resp, status: u16, code: i64, message: Option<&str>) {
    let j = r.json();
    assert_eq!(r.status, status, "{j}");
    assert_eq!(j["code"], json!(code), "{j}");
    assert_eq!(j["error"], j["message"], "{j}");
    assert!(j["message"].as_str().is_some_and(|m| !m.is_empty()), "{j}");
    if let Some(m) = message {
        assert_eq!(j["message"], json!(m), "{j}");
    }
    assert_eq!(j.as_object().unwrap().len(), 3, "{j}");
}

#[test]
fn put_range_delete_in_etcd_json() {
    let m = started();
    let mut c = Conn::new(&m);
    // "foo" = "Zm9v", "bar" = "YmFy".
    let r = c.post("/v3/kv/put", &json!({"key": "Zm9v", "value": "YmFy"}));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    let put = r.json();
    let h = &put["header"];
    assert!(int(&h["cluster_id"]) != 0 && int(&h["member_id"]) != 0);
    assert!(int(&h["raft_term"]) > 0);
    let rev1 = rev(&put);
    // No prev_kv asked for, none given; the object has nothing else.
    assert_eq!(put.as_object().unwrap().len(), 1, "{put}");

    // The camelCase name is accepted too.
    let put2 = c
        .post(
            "/v3/kv/put",
            &json!({"key": "Zm9v", "value": "YmF6", "prevKv": true}),
        )
        .json();
    let rev2 = rev(&put2);
    assert!(rev2 > rev1);
    assert_eq!(
        put2["prev_kv"],
        json!({"key": "Zm9v", "create_revision": rev1.to_string(),
               "mod_revision": rev1.to_string(), "version": "1", "value": "YmFy"})
    );

    let got = c.post("/v3/kv/range", &json!({"key": "Zm9v"})).json();
    assert_eq!(rev(&got), rev2);
    assert_eq!(got["count"], json!("1"));
    assert_eq!(
        got["kvs"],
        json!([{"key": "Zm9v", "create_revision": rev1.to_string(),
                "mod_revision": rev2.to_string(), "version": "2", "value": "YmF6"}])
    );
    assert!(got.get("more").is_none(), "false is left out: {got}");
    // /v3beta/ serves the same.
    let beta = c.post("/v3beta/kv/range", &json!({"key": "Zm9v"})).json();
    assert_eq!(beta["kvs"], got["kvs"]);

    // A prefix: foo/a, foo/b; [foo/, foo0). Limit given as a string.
    for k in ["Zm9vL2E=", "Zm9vL2I="] {
        assert_eq!(
            c.post("/v3/kv/put", &json!({"key": k, "value": "eA=="}))
                .status,
            200
        );
    }
    let pre = c
        .post(
            "/v3/kv/range",
            &json!({"key": "Zm9vLw==", "range_end": "Zm9vMA==", "limit": "1"}),
        )
        .json();
    assert_eq!(pre["count"], json!("2"));
    assert_eq!(pre["more"], json!(true));
    assert_eq!(pre["kvs"].as_array().unwrap().len(), 1);
    assert_eq!(pre["kvs"][0]["key"], json!("Zm9vL2E="));
    let keys = c
        .post(
            "/v3/kv/range",
            &json!({"key": "Zm9vLw==", "rangeEnd": "Zm9vMA==", "keys_only": true,
                    "sort_order": "DESCEND"}),
        )
        .json();
    let ks: Vec<&Value> = keys["kvs"].as_array().unwrap().iter().collect();
    assert_eq!(ks.len(), 2);
    assert_eq!(ks[0]["key"], json!("Zm9vL2I="));
    assert!(ks[0].get("value").is_none(), "keys only: {keys}");

    // Nothing there: no kvs, no count.
    let none = c.post("/v3/kv/range", &json!({"key": "bm9uZQ=="})).json();
    assert_eq!(none.as_object().unwrap().len(), 1, "{none}");

    let del = c
        .post(
            "/v3/kv/deleterange",
            &json!({"key": "Zm9v", "prev_kv": true}),
        )
        .json();
    assert_eq!(del["deleted"], json!("1"));
    assert_eq!(del["prev_kvs"][0]["value"], json!("YmF6"));
    let again = c
        .post(
            "/v3/kv/deleterange",
            &json!({"key": "Zm9v", "prev_kv": true}),
        )
        .json();
    assert!(again.get("deleted").is_none() && again.get("prev_kvs").is_none());
}

#[test]
fn txn_compact_and_compacted_reads() {
    let m = started();
    let mut c = Conn::new(&m);
    let p1 = rev(&c
        .post("/v3/kv/put", &json!({"key": "dA==", "value": "MQ=="}))
        .json());
    let ok = c
        .post(
            "/v3/kv/txn",
            &json!({
                "compare": [{"key": "dA==", "result": "EQUAL", "target": "VALUE", "value": "MQ=="}],
                "success": [{"request_put": {"key": "dA==", "value": "Mg=="}},
                            {"requestRange": {"key": "dA=="}}],
                "failure": [{"request_delete_range": {"key": "dA=="}}]
            }),
        )
        .json();
    assert_eq!(ok["succeeded"], json!(true), "{ok}");
    let p2 = rev(&ok);
    assert!(p2 > p1);
    assert_eq!(
        ok["responses"][0]["response_put"]["header"]["revision"],
        json!(p2.to_string())
    );
    assert_eq!(
        ok["responses"][1]["response_range"]["kvs"][0]["value"],
        json!("Mg==")
    );
    // Enums by number and a failing compare: "succeeded" (false) is left
    // out.
    let failed = c
        .post(
            "/v3/kv/txn",
            &json!({
                "compare": [{"key": "dA==", "result": 0, "target": 1, "create_revision": "1"}],
                "failure": [{"request_range": {"key": "dA=="}}]
            }),
        )
        .json();
    assert!(failed.get("succeeded").is_none(), "{failed}");
    assert_eq!(
        failed["responses"][0]["response_range"]["count"],
        json!("1")
    );
    let bad_enum = c.post(
        "/v3/kv/txn",
        &json!({"compare": [{"key": "dA==", "result": "BOGUS"}]}),
    );
    assert_error(&bad_enum, 400, 3, None);

    let comp = c.post("/v3/kv/compaction", &json!({"revision": p2.to_string()}));
    assert_eq!(comp.status, 200, "{}", comp.json());
    assert!(rev(&comp.json()) >= p2);
    let compacted = "etcdserver: mvcc: required revision has been compacted";
    let old = c.post("/v3/kv/range", &json!({"key": "dA==", "revision": p1}));
    assert_error(&old, 400, 11, Some(compacted));
    let twice = c.post("/v3/kv/compaction", &json!({"revision": p2}));
    assert_error(&twice, 400, 11, Some(compacted));
    let future = c.post(
        "/v3/kv/range",
        &json!({"key": "dA==", "revision": p2 + 1000}),
    );
    assert_error(
        &future,
        400,
        11,
        Some("etcdserver: mvcc: required revision is a future revision"),
    );
}

#[test]
fn leases_grant_ttl_revoke() {
    let m = started();
    let mut c = Conn::new(&m);
    let g = c.post("/v3/lease/grant", &json!({"TTL": 60})).json();
    let id = g["ID"].as_str().unwrap().to_string();
    assert!(id.parse::<i64>().unwrap() > 0);
    assert_eq!(g["TTL"], json!("60"));
    let put = c.post(
        "/v3/kv/put",
        &json!({"key": "bA==", "value": "eA==", "lease": id}),
    );
    assert_eq!(put.status, 200);
    // The /v3/kv/lease/ aliases etcd 3.4 keeps.
    for path in ["/v3/lease/timetolive", "/v3/kv/lease/timetolive"] {
        let t = c.post(path, &json!({"ID": id, "keys": true})).json();
        assert_eq!(t["ID"], json!(id));
        assert_eq!(t["grantedTTL"], json!("60"));
        let ttl = int(&t["TTL"]);
        assert!((55..=60).contains(&ttl), "{t}");
        assert_eq!(t["keys"], json!(["bA=="]));
    }
    for path in ["/v3/lease/leases", "/v3/kv/lease/leases"] {
        let l = c.post(path, &json!({})).json();
        assert_eq!(l["leases"], json!([{"ID": id}]));
    }
    let unknown = c.post(
        "/v3/kv/put",
        &json!({"key": "bA==", "value": "eA==", "lease": "12345"}),
    );
    assert_error(
        &unknown,
        404,
        5,
        Some("etcdserver: requested lease not found"),
    );
    let r = c.post("/v3/kv/lease/revoke", &json!({"ID": id}));
    assert_eq!(r.status, 200);
    assert!(c
        .post("/v3/kv/range", &json!({"key": "bA=="}))
        .json()
        .get("kvs")
        .is_none());
    let again = c.post("/v3/lease/revoke", &json!({"ID": id}));
    assert_error(
        &again,
        404,
        5,
        Some("etcdserver: requested lease not found"),
    );
    // An unknown lease's time to live is TTL -1, not an error.
    let t = c.post("/v3/lease/timetolive", &json!({"ID": 78})).json();
    assert_eq!((&t["ID"], &t["TTL"]), (&json!("78"), &json!("-1")));
}

#[test]
fn cluster_and_maintenance() {
    let m = started();
    let mut c = Conn::new(&m);
    let l = c.post("/v3/cluster/member/list", &json!({})).json();
    let me = l["header"]["member_id"].clone();
    let members = l["members"].as_array().unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0]["ID"], me);
    assert_eq!(
        members[0]["clientURLs"],
        json!([format!("http://{}", m.endpoint())])
    );
    assert_eq!(members[0]["peerURLs"], json!([m.peer_url()]));
    assert!(members[0].get("isLearner").is_none());

    let s = c.post("/v3/maintenance/status", &json!({})).json();
    assert!(s["version"].as_str().unwrap().starts_with("3."), "{s}");
    assert_eq!(s["leader"], me);
    assert!(int(&s["dbSize"]) > 0 && int(&s["raftIndex"]) > 0, "{s}");
    assert!(int(&s["raftTerm"]) > 0);

    let d = c.post("/v3/maintenance/defragment", &json!({}));
    assert_eq!(d.status, 200);
    let h = c.post("/v3/maintenance/hash", &json!({})).json();
    assert!(h["hash"].is_u64(), "a uint32 is a JSON number: {h}");
    let mv = c.post(
        "/v3/maintenance/transfer-leadership",
        &json!({"targetID": "12345"}),
    );
    assert_error(&mv, 412, 9, Some("etcdserver: bad leader transferee"));
    let rm = c.post("/v3/cluster/member/remove", &json!({"ID": "12345"}));
    assert_error(&rm, 404, 5, Some("etcdserver: member not found"));
    // 3.4 routes HashKV to /v3/maintenance/hash too (Hash wins) and has no
    // AuthStatus.
    for path in ["/v3/maintenance/hashkv", "/v3/auth/status"] {
        let r = c.post(path, &json!({}));
        assert_eq!((r.status, &r.body[..]), (404, &b"Not Found\n"[..]));
    }
}

#[test]
fn auth_token_in_the_authorization_header() {
    let m = started();
    let mut c = Conn::new(&m);
    let ok = |r: Resp| assert_eq!(r.status, 200, "{}", r.json());
    ok(c.post(
        "/v3/auth/user/add",
        &json!({"name": "root", "password": "pw"}),
    ));
    ok(c.post(
        "/v3/auth/user/grant",
        &json!({"user": "root", "role": "root"}),
    ));
    ok(c.post("/v3/auth/enable", &json!({})));
    let no_token = c.post("/v3/kv/range", &json!({"key": "Zm9v"}));
    assert_error(&no_token, 400, 3, Some("etcdserver: user name is empty"));
    let bad_pw = c.post(
        "/v3/auth/authenticate",
        &json!({"name": "root", "password": "nope"}),
    );
    assert_error(
        &bad_pw,
        400,
        3,
        Some("etcdserver: authentication failed, invalid user ID or password"),
    );
    let a = c
        .post(
            "/v3/auth/authenticate",
            &json!({"name": "root", "password": "pw"}),
        )
        .json();
    let token = a["token"].as_str().unwrap().to_string();
    let with = c.post_with(
        "/v3/kv/range",
        r#"{"key":"Zm9v"}"#,
        &format!("Authorization: {token}\r\n"),
    );
    assert_eq!(with.status, 200, "{}", with.json());
    let garbage = c.post_with(
        "/v3/kv/range",
        r#"{"key":"Zm9v"}"#,
        "Authorization: garbage\r\n",
    );
    assert_error(&garbage, 401, 16, Some("etcdserver: invalid auth token"));
    let u = c
        .post_with(
            "/v3/auth/user/get",
            r#"{"name":"root"}"#,
            &format!("Authorization: {token}\r\n"),
        )
        .json();
    assert_eq!(u["roles"], json!(["root"]));
    let off = c.post_with(
        "/v3/auth/disable",
        "{}",
        &format!("Authorization: {token}\r\n"),
    );
    assert_eq!(off.status, 200);
    let open = c.post("/v3/kv/range", &json!({"key": "Zm9v"}));
    assert_eq!(open.status, 200);
}

#[test]
fn errors_as_etcd_answers_them() {
    let m = started();
    let mut c = Conn::new(&m);
    let no_key = "etcdserver: key is not provided";
    // Empty key, a missing key, an empty body and a null are all no key.
    for body in [r#"{"key":""}"#, "{}", "", r#"{"key":null}"#] {
        let r = c.post_with("/v3/kv/range", body, "");
        assert_error(&r, 400, 3, Some(no_key));
    }
    // Bad JSON and wrong types are InvalidArgument before any call.
    for body in [
        r#"{"key":"Zm9v","#,
        r#"{"key":"Zm9"}"#,
        r#"{"key":"Zm9v","limit":"abc"}"#,
        r#"{"key":"Zm9v","limit":1.5}"#,
        r#"{"key":"Zm9v","serializable":"true"}"#,
        "[1]",
    ] {
        let r = c.post_with("/v3/kv/range", body, "");
        assert_error(&r, 400, 3, None);
    }
    // Unknown fields are ignored, and so is what follows the first value.
    let r = c.post_with("/v3/kv/put", r#"{"key":"Zm9v","bogus":[1]} trailing"#, "");
    assert_eq!(r.status, 200);

    let text = |r: &Resp| String::from_utf8_lossy(&r.body).to_string();
    let r = c.post_with("/v3/kv/nothing", "{}", "");
    assert_eq!((r.status, text(&r)), (404, "Not Found\n".into()));
    let r = c.post_with("/v3alpha/kv/range", "{}", "");
    assert_eq!((r.status, text(&r)), (404, "404 page not found\n".into()));
    c.send(b"GET /v3/kv/range HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = c.read();
    assert_eq!((r.status, text(&r)), (405, "Method Not Allowed\n".into()));
    c.send(b"OPTIONS /v3/kv/range HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = c.read();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("accept, content-type, authorization")
    );
    // The connection served all of the above and still works.
    assert_eq!(c.post("/v3/kv/range", &json!({"key": "Zm9v"})).status, 200);
}

#[test]
fn http_framing_keep_alive_chunked_and_limits() {
    let m = started();
    let mut c = Conn::new(&m);
    // Two requests in one write (pipelined), answered in order.
    let one = r#"{"key":"cA==","value":"MQ=="}"#;
    let two = r#"{"key":"cA=="}"#;
    c.send(
        format!(
            "POST /v3/kv/put HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{one}\
             POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{two}",
            one.len(),
            two.len()
        )
        .as_bytes(),
    );
    assert_eq!(c.read().status, 200);
    assert_eq!(c.read().json()["kvs"][0]["value"], json!("MQ=="));

    // A chunked body, split across writes, with Expect: 100-continue.
    c.send(
        b"POST /v3/kv/put HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    );
    let cont = c.line();
    assert!(cont.starts_with("HTTP/1.1 100"), "{cont}");
    assert_eq!(c.line(), "");
    c.send(b"8\r\n{\"key\":\"\r\n");
    std::thread::sleep(Duration::from_millis(50));
    c.send(b"15\r\ncA==\",\"value\":\"Mg==\"}\r\n0\r\n\r\n");
    assert_eq!(c.read().status, 200);
    let got = c.post("/v3/kv/range", &json!({"key": "cA=="})).json();
    assert_eq!(got["kvs"][0]["value"], json!("Mg=="));

    // Over the size limit (--max-request-bytes plus gRPC's overhead):
    // ResourceExhausted, 429.
    // Under it but over --max-request-bytes: etcd's own check, 400.
    let big = "eHh4".repeat(600 * 1024); // 1.8 MB of value
    let r = c.post_with(
        "/v3/kv/put",
        &format!(r#"{{"key":"Yg==","value":"{big}"}}"#),
        "",
    );
    assert_error(&r, 400, 3, Some("etcdserver: request is too large"));
    let big = "eHh4".repeat(750 * 1024); // 2.25 MB of value
    let r = c.post_with(
        "/v3/kv/put",
        &format!(r#"{{"key":"Yg==","value":"{big}"}}"#),
        "",
    );
    assert_error(&r, 429, 8, None);
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("larger than max"));

    // Connection: close is honoured.
    let mut d = Conn::new(&m);
    d.send(b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 14\r\n\r\n{\"key\":\"cA==\"}");
    let r = d.read();
    assert_eq!(r.status, 200);
    let mut rest = Vec::new();
    assert_eq!(d.r.read_to_end(&mut rest).unwrap(), 0);

    // Garbage instead of HTTP: an error and a closed connection, and the
    // server goes on.
    let mut e = Conn::new(&m);
    e.send(b"POST /v3/kv/range HTTP/1.1\r\nContent-Length: nope\r\n\r\n");
    assert_eq!(e.read().status, 400);
    let mut f = Conn::new(&m);
    assert_eq!(f.post("/v3/kv/range", &json!({"key": "cA=="})).status, 200);
    if !is_etcd() {
        // A body far over the limit is refused from its Content-Length,
        // before it is read.
        let mut g = Conn::new(&m);
        g.send(b"POST /v3/kv/put HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n");
        assert_error(&g.read(), 429, 8, None);
    }
}

impl Conn {
    /// Sends a streaming request and reads the head of its chunked answer.
    fn open_stream(&mut self, path: &str, body: &str) -> Resp {
        self.send(
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        let status_line = self.line();
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let headers = self.headers();
        Resp {
            status,
            headers,
            body: Vec::new(),
        }
    }
    /// The next chunk of a stream, as JSON (`None` at its end).
    fn next_line(&mut self) -> Option<Value> {
        let size = usize::from_str_radix(&self.line(), 16).unwrap();
        if size == 0 {
            assert_eq!(self.line(), "");
            return None;
        }
        let mut chunk = vec![0; size + 2];
        self.r.read_exact(&mut chunk).unwrap();
        assert_eq!(&chunk[size - 1..], b"\n\r\n", "one JSON line per chunk");
        Some(serde_json::from_slice(&chunk[..size]).unwrap())
    }
}

#[test]
fn watch_streams_result_lines() {
    let m = started();
    let mut w = Conn::new(&m);
    let head = w.open_stream(
        "/v3/watch",
        r#"{"create_request":{"key":"dw==","range_end":"eA==","prev_kv":true}}"#,
    );
    assert_eq!(head.status, 200);
    assert_eq!(head.header("transfer-encoding"), Some("chunked"));
    assert_eq!(head.header("content-type"), Some("application/json"));
    let created = w.next_line().unwrap();
    assert_eq!(created["result"]["created"], json!(true), "{created}");
    // watch_id 0 is left out, like every default.
    assert!(created["result"].get("watch_id").is_none(), "{created}");

    let mut c = Conn::new(&m);
    let p1 = rev(&c
        .post("/v3/kv/put", &json!({"key": "dzE=", "value": "YQ=="}))
        .json());
    let p2 = rev(&c
        .post("/v3/kv/put", &json!({"key": "dzE=", "value": "Yg=="}))
        .json());
    let p3 = rev(&c.post("/v3/kv/deleterange", &json!({"key": "dzE="})).json());
    let mut events = Vec::new();
    while events.len() < 3 {
        let line = w.next_line().unwrap();
        let r = &line["result"];
        for e in r["events"].as_array().unwrap() {
            events.push(e.clone());
        }
    }
    assert_eq!(
        events[0],
        json!({"kv": {"key": "dzE=", "create_revision": p1.to_string(),
                      "mod_revision": p1.to_string(), "version": "1", "value": "YQ=="}})
    );
    assert_eq!(events[1]["kv"]["value"], json!("Yg=="));
    assert_eq!(events[1]["prev_kv"]["value"], json!("YQ=="));
    assert_eq!(int(&events[1]["kv"]["mod_revision"]) as i64, p2);
    assert_eq!(events[2]["type"], json!("DELETE"));
    assert_eq!(int(&events[2]["kv"]["mod_revision"]) as i64, p3);
    assert_eq!(events[2]["prev_kv"]["value"], json!("Yg=="));

    // A body that is not JSON: refused before the stream starts.
    let bad = c.post_with("/v3/watch", "xx", "");
    assert_error(&bad, 500, 2, None);
    // The watcher's connection closed: the server goes on serving.
    drop(w);
    assert_eq!(c.post("/v3/kv/range", &json!({"key": "dzE="})).status, 200);
}

#[test]
fn lease_keep_alive_streams_one_line_per_request() {
    let m = started();
    let mut c = Conn::new(&m);
    let id = c.post("/v3/lease/grant", &json!({"TTL": 60})).json()["ID"]
        .as_str()
        .unwrap()
        .to_string();
    // Two requests in the body: two answers, then the stream ends (the
    // body's end is the client's half-close) and the connection is reused.
    let head = c.open_stream(
        "/v3/lease/keepalive",
        &format!(r#"{{"ID":"{id}"}} {{"ID":{id}}}"#),
    );
    assert_eq!(head.status, 200);
    for _ in 0..2 {
        let r = c.next_line().unwrap();
        assert_eq!(r["result"]["ID"], json!(id), "{r}");
        assert_eq!(r["result"]["TTL"], json!("60"), "{r}");
    }
    assert!(c.next_line().is_none());
    // An unknown lease: TTL 0, left out.
    c.open_stream("/v3/lease/keepalive", r#"{"ID":"5"}"#);
    let r = c.next_line().unwrap();
    assert_eq!(r["result"]["ID"], json!("5"));
    assert!(r["result"].get("TTL").is_none(), "{r}");
    assert!(c.next_line().is_none());
    assert_eq!(c.post("/v3/lease/leases", &json!({})).status, 200);
}

/// `--enable-grpc-gateway=false`: the JSON routes are gone (etcd's mux
/// answers 404 "404 page not found"), gRPC and /health stay.
#[test]
fn the_gateway_can_be_turned_off() {
    let mut m = Member::new(&["--enable-grpc-gateway=false"]);
    if let Some(st) = m.start() {
        panic!("server exited at start ({st}):\n{}", m.log_text());
    }
    let mut c = Conn::new(&m);
    let r = c.post("/v3/kv/range", &json!({"key": "YQ=="}));
    assert_eq!(r.status, 404);
    assert_eq!(
        String::from_utf8_lossy(&r.body).trim(),
        "404 page not found"
    );
    let (ok, out, err) = support::etcdctl(&m.endpoint(), &["put", "a", "b"], None);
    assert!(ok, "{out}{err}");
}

/// etcd's access control on the client port's HTTP: `--cors` names the
/// origins whose requests get CORS headers (by default every origin, as
/// `*`), any OPTIONS is answered 200 before routing, and `--host-whitelist`
/// refuses a plain-HTTP request whose Host it does not name with 421 and
/// etcd's DNS-rebinding text.
#[test]
fn cors_origins_and_the_host_whitelist_as_etcd() {
    let get = |c: &mut Conn, method: &str, path: &str, headers: &str| -> Resp {
        c.send(format!("{method} {path} HTTP/1.1\r\n{headers}\r\n").as_bytes());
        c.read()
    };
    // Defaults: every origin, every host.
    let m = started();
    let mut c = Conn::new(&m);
    let r = get(&mut c, "GET", "/health", "Host: anything.example\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("POST, GET, OPTIONS, PUT, DELETE")
    );
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("accept, content-type, authorization")
    );
    let r = get(&mut c, "OPTIONS", "/version", "Host: localhost\r\n");
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    drop(m);

    let mut m = Member::new(&[
        "--cors",
        "http://a.example:80,http://b.example:8080",
        "--host-whitelist",
        "localhost,127.0.0.1",
    ]);
    if let Some(st) = m.start() {
        panic!("server exited at start ({st}):\n{}", m.log_text());
    }
    let mut c = Conn::new(&m);
    // An allowed origin is named back; another gets no CORS headers.
    let r = get(
        &mut c,
        "GET",
        "/health",
        "Host: 127.0.0.1\r\nOrigin: http://b.example:8080\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("http://b.example:8080")
    );
    let r = get(
        &mut c,
        "OPTIONS",
        "/v3/kv/range",
        "Host: localhost:2379\r\nOrigin: http://c.example:80\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None);
    let r = c.post_with(
        "/v3/kv/put",
        r#"{"key":"YQ==","value":"Yg=="}"#,
        "Origin: http://a.example:80\r\n",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("http://a.example:80")
    );
    // A Host the whitelist does not name: 421, and the connection stays.
    let r = get(&mut c, "GET", "/health", "Host: rebind.example:2379\r\n");
    assert_eq!(r.status, 421);
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.contains("the Host header was unrecognized")
            && text.contains("--host-whitelist \"rebind.example\""),
        "{text}"
    );
    let r = c.post("/v3/kv/range", &json!({"key": "YQ=="}));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["kvs"][0]["value"], "Yg==");
    // gRPC is not HTTP/1: the whitelist does not apply to it.
    let (ok, out, err) = support::etcdctl(&m.endpoint(), &["get", "a"], None);
    assert!(ok && out.contains('b'), "{out}{err}");
}
