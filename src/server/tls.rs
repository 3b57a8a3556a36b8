//! TLS (rustls). Client TLS: the server config built once at startup
//! from `--cert-file`, `--key-file` and, with `--client-cert-auth`,
//! `--trusted-ca-file`; ALPN offers h2 (gRPC) and http/1.1 (/health,
//! /metrics, /version), as etcd's listener serves both. Peer TLS: with
//! https peer URLs, a server config (`--peer-cert-file`, `--peer-key-file`,
//! and client certificates checked against `--peer-trusted-ca-file` with
//! `--peer-client-cert-auth`) and a client config that presents the same
//! certificate and verifies the peer's against that CA.

use crate::config::Config;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut read_pem(path)?.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    rustls_pemfile::private_key(&mut read_pem(path)?.as_slice())
        .map_err(|e| format!("{}: {e}", path.display()))?
        .ok_or_else(|| format!("{}: no private key in it", path.display()))
}

fn load_roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut read_pem(path)?.as_slice()) {
        let c = c.map_err(|e| format!("{}: {e}", path.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config: `cert` and `key`, and client certificates required
/// and checked against `ca` when given.
fn server(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<rustls::ServerConfig, String> {
    let certs = load_certs(cert)?;
    let key_der = load_key(key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                load_roots(ca)?,
                provider(),
            )
            .build()
            .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(certs, key_der)
        .map_err(|e| format!("{}: {e}", cert.display()))
}

/// None when no client URL is https.
pub fn server_config(cfg: &Config) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
    if !cfg
        .listen_client_urls
        .iter()
        .any(|u| crate::config::is_tls_url(u))
    {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) else {
        return Err("https client URLs need --cert-file and --key-file".into());
    };
    let ca = if cfg.client_cert_auth {
        Some(
            cfg.trusted_ca_file
                .as_deref()
                .ok_or("--client-cert-auth needs --trusted-ca-file")?,
        )
    } else {
        None
    };
    let mut sc = server(cert, key, ca)?;
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(sc)))
}

/// None when the peer URLs are http.
pub fn peer_config(cfg: &Config) -> Result<Option<crate::peer::PeerTls>, String> {
    if !cfg.peer_tls() {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&cfg.peer_cert_file, &cfg.peer_key_file) else {
        return Err("https peer URLs need --peer-cert-file and --peer-key-file".into());
    };
    let ca = cfg.peer_trusted_ca_file.as_deref().ok_or(
        "https peer URLs need --peer-trusted-ca-file (keelson verifies every peer's certificate against it)",
    )?;
    let server = server(cert, key, cfg.peer_client_cert_auth.then_some(ca))?;
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(load_roots(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    Ok(Some(crate::peer::PeerTls {
        server: Arc::new(server),
        client: Arc::new(client),
    }))
}
