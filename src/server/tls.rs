//! Client TLS (rustls): the server config built once at startup from
//! `--cert-file`, `--key-file` and, with `--client-cert-auth`,
//! `--trusted-ca-file`. ALPN offers h2 (gRPC) and http/1.1 (/health,
//! /metrics, /version), as etcd's listener serves both.

use crate::config::Config;
use std::sync::Arc;

fn read_pem(path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
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
    let certs: Vec<_> = rustls_pemfile::certs(&mut read_pem(cert)?.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key_der = rustls_pemfile::private_key(&mut read_pem(key)?.as_slice())
        .map_err(|e| format!("{}: {e}", key.display()))?
        .ok_or_else(|| format!("{}: no private key in it", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if cfg.client_cert_auth {
        let ca = cfg
            .trusted_ca_file
            .as_ref()
            .ok_or("--client-cert-auth needs --trusted-ca-file")?;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut read_pem(ca)?.as_slice()) {
            let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
            roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut sc = builder
        .with_single_cert(certs, key_der)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(sc)))
}
