//! Client TLS against the real binary with etcdctl: https client URLs
//! with --cert-file/--key-file, and --client-cert-auth with
//! --trusted-ca-file (a client without a certificate is refused).
//! Certificates are made with openssl for each run. Also run against
//! etcd 3.4 with `KEELSON_TEST_SERVER=etcd cargo test --test tls`.

mod support;

use std::path::Path;
use std::process::Command;
use support::etcdctl;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
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

/// A CA, a server certificate for 127.0.0.1 and a client certificate.
fn certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=keelson-test-ca",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    for who in ["server", "client"] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
                "-subj",
                &format!("/CN={who}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &format!("{who}.crt"),
                "-extfile",
                "san.ext",
            ],
        );
    }
}

#[test]
fn https_clients_and_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(d);
    let p = |f: &str| d.join(f).to_str().unwrap().to_string();
    let port = support::free_port();
    let url = format!("https://127.0.0.1:{port}");
    let mut m = support::Member::new(&[
        "--listen-client-urls",
        &url,
        "--advertise-client-urls",
        &url,
        "--cert-file",
        &p("server.crt"),
        "--key-file",
        &p("server.key"),
        "--trusted-ca-file",
        &p("ca.crt"),
        "--client-cert-auth",
    ]);
    assert!(m.start().is_none(), "{}", m.log_text());
    let tls = [
        format!("--cacert={}", p("ca.crt")),
        format!("--cert={}", p("client.crt")),
        format!("--key={}", p("client.key")),
    ];
    let with = |args: &[&str]| {
        let mut a: Vec<&str> = tls.iter().map(|s| s.as_str()).collect();
        a.extend_from_slice(args);
        etcdctl(&url, &a, None)
    };
    let (ok, out, err) = with(&["put", "k", "v"]);
    assert!(ok && out.contains("OK"), "{out}{err}");
    let (ok, out, err) = with(&["get", "k"]);
    assert!(ok && out.contains('v'), "{out}{err}");
    let (ok, out, err) = with(&["endpoint", "health"]);
    assert!(ok || err.contains("is healthy"), "{out}{err}");
    // No client certificate: the handshake is refused.
    let ca = format!("--cacert={}", p("ca.crt"));
    let (ok, out, err) = etcdctl(&url, &[&ca, "--dial-timeout=2s", "get", "k"], None);
    assert!(!ok, "{out}{err}");
    // Plain text on a TLS port gets nowhere either.
    let (ok, out, err) = etcdctl(
        &format!("http://127.0.0.1:{port}"),
        &["--dial-timeout=2s", "get", "k"],
        None,
    );
    assert!(!ok, "{out}{err}");
    drop(m);
    let _ = dir;
}

#[test]
fn https_without_a_certificate_is_a_clear_error() {
    if support::is_etcd() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_keelson"))
        .args(["--listen-client-urls", "https://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cert-file and --key-file"));
}
