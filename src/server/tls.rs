//! TLS (rustls). Client TLS: the server config built once at startup
//! from `--cert-file`, `--key-file` (both reread when they change) and, with `--client-cert-auth`,
//! `--trusted-ca-file`; ALPN offers h2 (gRPC) and http/1.1 (/health,
//! /metrics, /version), as etcd's listener serves both. Peer TLS: with
//! https peer URLs, a server config (`--peer-cert-file`, `--peer-key-file`,
//! and client certificates checked against `--peer-trusted-ca-file` with
//! `--peer-client-cert-auth`) and a client config that presents the same
//! certificate and verifies the peer's against that CA.
//!
//! Both take etcd's refinements: `--cipher-suites` (the TLS 1.2 suites
//! offered; TLS 1.3's stay on, as in Go), `--client-crl-file` and
//! `--peer-crl-file` (a presented client certificate, or any certificate
//! of its chain, whose serial a revocation list names is refused; reread
//! when the file changes, as etcd rereads it per connection), and
//! `--client-cert-allowed-hostname`, `--peer-cert-allowed-cn` and
//! `--peer-cert-allowed-hostname` (a verified certificate must also have
//! that subject common name, or be valid for that name; on peer
//! connections in both directions, as etcd sets one check for its server
//! and client configs).
//!
//! `--auto-tls` / `--peer-auto-tls` (`self_certs`): with no certificate
//! file given, the member uses a self-signed certificate it generates
//! once under `data-dir/fixtures/client` (`peer`), as etcd's
//! `transport.SelfCert` does: `cert.pem` and `key.pem`, valid for a year
//! for the listen URLs' hosts, organization "etcd", reused while the
//! files exist. As in etcd, that replaces the TLS settings: no client
//! certificate is asked for, and a member accepts any certificate a peer
//! presents (it still checks the handshake is signed by that
//! certificate's key). keelson's key is ECDSA P-256 (etcd 3.4: P-521,
//! which ring cannot sign with).

use crate::config::Config;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
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
    for c in load_certs(path)? {
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let bytes = read_pem(path)?;
    let crls: Vec<_> = rustls_pemfile::crls(&mut bytes.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // Not PEM: one DER-encoded list, as Go's x509.ParseCRL also reads.
    Ok(if crls.is_empty() {
        vec![CertificateRevocationListDer::from(bytes)]
    } else {
        crls
    })
}

/// rustls's suites, less the TLS 1.2 ones `--cipher-suites` does not name
/// (when it names any). A name Go knows that rustls has no suite for (CBC,
/// RC4, 3DES, RSA key exchange) is skipped with a warning; TLS 1.3's names
/// have no effect, as in Go.
fn provider(suites: &[String]) -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    if suites.is_empty() {
        return Arc::new(p);
    }
    // rustls spells Go's older ChaCha20 names with their hash.
    let wanted: Vec<String> = suites
        .iter()
        .map(|s| match s.as_str() {
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" | "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305" => {
                format!("{s}_SHA256")
            }
            _ => s.clone(),
        })
        .collect();
    p.cipher_suites
        .retain(|cs| cs.tls13().is_some() || wanted.contains(&format!("{:?}", cs.suite())));
    for (name, w) in suites.iter().zip(&wanted) {
        let tls13 = name.starts_with("TLS_AES_") || name.starts_with("TLS_CHACHA20_");
        if !tls13
            && !p
                .cipher_suites
                .iter()
                .any(|cs| format!("{:?}", cs.suite()) == *w)
        {
            crate::warn!(
                "--cipher-suites: {name} is not offered (keelson's TLS has no such suite)"
            );
        }
    }
    Arc::new(p)
}

/// What a verified certificate must also satisfy (etcd's `AllowedCN`,
/// `AllowedHostname`).
#[derive(Debug, Clone)]
enum Allowed {
    Cn(String),
    Hostname(String),
}

impl Allowed {
    fn of(cn: Option<&String>, hostname: Option<&String>) -> Option<Allowed> {
        match (cn, hostname) {
            (Some(cn), _) => Some(Allowed::Cn(cn.clone())),
            (None, Some(h)) => Some(Allowed::Hostname(h.clone())),
            (None, None) => None,
        }
    }

    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let ok = match self {
            Allowed::Cn(cn) => subject_common_name(end_entity).as_deref() == Some(cn.as_str()),
            Allowed::Hostname(h) => {
                let name = ServerName::try_from(h.as_str()).ok();
                let cert = webpki::EndEntityCert::try_from(end_entity).ok();
                match (name, cert) {
                    (Some(name), Some(cert)) => {
                        cert.verify_is_valid_for_subject_name(&name).is_ok()
                    }
                    _ => false,
                }
            }
        };
        if ok {
            Ok(())
        } else {
            // Sent to the other side as a bad_certificate alert, as Go
            // (etcd) sends it when its VerifyPeerCertificate refuses.
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        }
    }
}

/// A verifier that, after the CA's verification, also checks `Allowed`;
/// and, for client certificates, takes one of the trusted CA file's own
/// certificates presented alone while it is valid: Go's crypto/x509, and
/// so etcd, accepts a self-signed CA certificate used as its own leaf,
/// which webpki refuses (`CaUsedAsEndEntity`).
#[derive(Debug)]
struct Restricted<V: ?Sized> {
    inner: Arc<V>,
    allowed: Option<Allowed>,
    /// The trusted CA file's certificates (client verification only).
    anchors: Vec<CertificateDer<'static>>,
}

impl ClientCertVerifier for Restricted<dyn ClientCertVerifier> {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Ok(ok) => ok,
            Err(_)
                if intermediates.is_empty()
                    && self
                        .anchors
                        .iter()
                        .any(|a| a.as_ref() == end_entity.as_ref())
                    && valid_at(end_entity, now) =>
            {
                ClientCertVerified::assertion()
            }
            Err(e) => return Err(e),
        };
        if let Some(a) = &self.allowed {
            a.check(end_entity)?;
        }
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl ServerCertVerifier for Restricted<dyn ServerCertVerifier> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if let Some(a) = &self.allowed {
            a.check(end_entity)?;
        }
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The peer verifier of `--peer-auto-tls`: any certificate, as etcd's
/// peer client then skips verification (Go still checks the handshake
/// signature, and so does this).
#[derive(Debug)]
struct AnyPeerCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyPeerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// etcd's `transport.SelfCert`: `dir/cert.pem` and `dir/key.pem`, made
/// (self-signed, for the URLs' hosts, a year; for TLS clients too with
/// `peer`) unless both exist.
pub fn self_cert(dir: &Path, urls: &[String], peer: bool) -> Result<(PathBuf, PathBuf), String> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(|e| at(&e))?;
    let mut hosts: Vec<String> = urls
        .iter()
        .filter_map(|u| crate::config::url_host(u))
        .collect();
    hosts.sort();
    hosts.dedup();
    let mut params = rcgen::CertificateParams::new(hosts).map_err(|e| at(&e))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "etcd");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now;
    params.not_after = now + time::Duration::days(365);
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyEncipherment,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    if peer {
        // A member presents it on both ends of a peer connection (etcd
        // 3.5 adds client auth to peer certificates too).
        params
            .extended_key_usages
            .push(rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    }
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| at(&e))?;
    let signed = params.self_signed(&pair).map_err(|e| at(&e))?;
    // The key first and private, then the certificate: a crash between
    // leaves no cert.pem, so the next start makes both again.
    write_private(&key, pair.serialize_pem().as_bytes())?;
    std::fs::write(&cert, signed.pem()).map_err(|e| format!("{}: {e}", cert.display()))?;
    crate::info!("created self-signed certificate {}", cert.display());
    Ok((cert, key))
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// `--auto-tls` and `--peer-auto-tls` applied (run with the data dir
/// locked): where no certificate file is given, the generated one, and
/// none of the CA checks, as etcd replaces its TLS settings. Afterwards
/// `auto_tls` (`peer_auto_tls`) is true only where a certificate was
/// generated.
pub fn self_certs(mut cfg: Config) -> Result<Config, String> {
    let fixtures = cfg.data_dir.join("fixtures");
    if cfg.auto_tls && (cfg.cert_file.is_some() || cfg.key_file.is_some()) {
        crate::warn!("ignoring client auto TLS since certs given");
        cfg.auto_tls = false;
    } else if cfg.auto_tls {
        let (cert, key) = self_cert(&fixtures.join("client"), &cfg.listen_client_urls, false)?;
        cfg.cert_file = Some(cert);
        cfg.key_file = Some(key);
        cfg.trusted_ca_file = None;
        cfg.client_cert_auth = false;
        cfg.client_crl_file = None;
        cfg.client_cert_allowed_hostname = None;
    }
    if cfg.peer_auto_tls && (cfg.peer_cert_file.is_some() || cfg.peer_key_file.is_some()) {
        crate::warn!("ignoring peer auto TLS since certs given");
        cfg.peer_auto_tls = false;
    } else if cfg.peer_auto_tls {
        let (cert, key) = self_cert(&fixtures.join("peer"), &cfg.listen_peer_urls, true)?;
        cfg.peer_cert_file = Some(cert);
        cfg.peer_key_file = Some(key);
        cfg.peer_trusted_ca_file = None;
        cfg.peer_client_cert_auth = false;
        cfg.peer_crl_file = None;
        cfg.peer_cert_allowed_cn = None;
        cfg.peer_cert_allowed_hostname = None;
    }
    Ok(cfg)
}

/// One DER element: (tag, contents, the bytes after it).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// A certificate's TBSCertificate fields after its version and the
/// `skip` fields that follow it.
fn tbs_after(cert: &[u8], skip: usize) -> Option<&[u8]> {
    const SEQ: u8 = 0x30;
    let (SEQ, cert, _) = der(cert)? else {
        return None;
    };
    let (SEQ, mut rest, _) = der(cert)? else {
        return None;
    };
    // [0] version, optional.
    if rest.first() == Some(&0xa0) {
        rest = der(rest)?.2;
    }
    for _ in 0..skip {
        rest = der(rest)?.2;
    }
    Some(rest)
}

/// An I/O error as Go words it where TLS is behind it, so logs read as
/// etcd's: an alert from the other side (`remote error: tls: bad
/// certificate`), and a certificate `Allowed` refused (etcd's `client
/// certificate authentication failed`; webpki's own name mismatches carry
/// their names and are told as rustls tells them); any other error as it
/// is.
pub fn describe(e: &std::io::Error) -> String {
    use rustls::AlertDescription as A;
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let alert = match tls {
        Some(rustls::Error::AlertReceived(a)) => *a,
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)) => {
            return "client certificate authentication failed".into()
        }
        _ => return e.to_string(),
    };
    let a = alert;
    let go = match a {
        A::CloseNotify => "close notify",
        A::UnexpectedMessage => "unexpected message",
        A::BadRecordMac => "bad record MAC",
        A::RecordOverflow => "record overflow",
        A::HandshakeFailure => "handshake failure",
        A::BadCertificate => "bad certificate",
        A::UnsupportedCertificate => "unsupported certificate",
        A::CertificateRevoked => "revoked certificate",
        A::CertificateExpired => "expired certificate",
        A::CertificateUnknown => "unknown certificate",
        A::IllegalParameter => "illegal parameter",
        A::UnknownCA => "unknown certificate authority",
        A::AccessDenied => "access denied",
        A::DecodeError => "error decoding message",
        A::DecryptError => "error decrypting message",
        A::ProtocolVersion => "protocol version not supported",
        A::InsufficientSecurity => "insufficient security level",
        A::InternalError => "internal error",
        A::UserCanceled => "user canceled",
        A::NoRenegotiation => "no renegotiation",
        A::CertificateRequired => "certificate required",
        A::NoApplicationProtocol => "no application protocol",
        other => return format!("remote error: tls: {other:?}"),
    };
    format!("remote error: tls: {go}")
}

/// Whether `now` is within the certificate's validity period (false when
/// it is not DER this can read).
fn valid_at(cert: &[u8], now: UnixTime) -> bool {
    const SEQ: u8 = 0x30;
    // Serial, signature algorithm, issuer, then the validity.
    let Some((SEQ, validity, _)) = tbs_after(cert, 3).and_then(der) else {
        return false;
    };
    let Some((t1, from, rest)) = der(validity) else {
        return false;
    };
    let Some((t2, until, _)) = der(rest) else {
        return false;
    };
    let now = now.as_secs() as i64;
    match (asn1_time(t1, from), asn1_time(t2, until)) {
        (Some(from), Some(until)) => from <= now && now <= until,
        _ => false,
    }
}

/// Seconds since the epoch of an ASN.1 UTCTime (tag 0x17, `YYMMDDHHMMSSZ`,
/// years 1950-2049) or GeneralizedTime (0x18, `YYYYMMDDHHMMSSZ`).
fn asn1_time(tag: u8, v: &[u8]) -> Option<i64> {
    let digits = |s: &[u8]| -> Option<i64> {
        s.iter().try_fold(0i64, |a, &c| {
            c.is_ascii_digit().then(|| a * 10 + i64::from(c - b'0'))
        })
    };
    let (year, rest) = match (tag, v.len()) {
        (0x17, 13) => {
            let y = digits(&v[..2])?;
            (if y < 50 { 2000 + y } else { 1900 + y }, &v[2..])
        }
        (0x18, 15) => (digits(&v[..4])?, &v[4..]),
        _ => return None,
    };
    if rest[10] != b'Z' {
        return None;
    }
    let (mo, d) = (digits(&rest[0..2])?, digits(&rest[2..4])?);
    let (h, mi, s) = (
        digits(&rest[4..6])?,
        digits(&rest[6..8])?,
        digits(&rest[8..10])?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + s)
}

/// The subject's common name (the last one, as Go's `Subject.CommonName`),
/// or None when the certificate has none or is not DER this can read.
pub(super) fn subject_common_name(cert: &[u8]) -> Option<String> {
    const SEQ: u8 = 0x30;
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    // Serial, signature algorithm, issuer, validity, then the subject.
    let (SEQ, mut rdns, _) = der(tbs_after(cert, 4)?)? else {
        return None;
    };
    let mut cn = None;
    while !rdns.is_empty() {
        let (_, set, next) = der(rdns)?;
        rdns = next;
        let mut atvs = set;
        while !atvs.is_empty() {
            let (_, atv, next) = der(atvs)?;
            atvs = next;
            let (0x06, oid, value) = der(atv)? else {
                continue;
            };
            if oid != CN_OID {
                continue;
            }
            let (tag, v, _) = der(value)?;
            cn = Some(match tag {
                // BMPString: UTF-16BE.
                0x1e => {
                    let units: Vec<u16> = v
                        .chunks(2)
                        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
                        .collect();
                    String::from_utf16_lossy(&units)
                }
                _ => String::from_utf8_lossy(v).into_owned(),
            });
        }
    }
    cn
}

/// The IP addresses and DNS names among a certificate's subject
/// alternative names, or None when it is not DER this can read.
fn subject_alt_names(cert: &[u8]) -> Option<(Vec<IpAddr>, Vec<String>)> {
    const SEQ: u8 = 0x30;
    const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];
    // Serial, signature algorithm, issuer, validity, subject, public key;
    // then optional unique IDs and [3] the extensions.
    let mut rest = tbs_after(cert, 6)?;
    let (mut ips, mut names) = (Vec::new(), Vec::new());
    while !rest.is_empty() {
        let (tag, body, next) = der(rest)?;
        rest = next;
        if tag != 0xa3 {
            continue;
        }
        let (SEQ, mut exts, _) = der(body)? else {
            return None;
        };
        while !exts.is_empty() {
            let (_, ext, next) = der(exts)?;
            exts = next;
            let (0x06, oid, mut value) = der(ext)? else {
                return None;
            };
            if oid != SAN_OID {
                continue;
            }
            if value.first() == Some(&0x01) {
                value = der(value)?.2; // critical
            }
            let (0x04, octets, _) = der(value)? else {
                return None;
            };
            let (SEQ, mut general, _) = der(octets)? else {
                return None;
            };
            while !general.is_empty() {
                let (tag, v, next) = der(general)?;
                general = next;
                match tag {
                    0x82 => names.push(String::from_utf8_lossy(v).into_owned()),
                    0x87 => {
                        if let Ok(v4) = <[u8; 4]>::try_from(v) {
                            ips.push(IpAddr::from(v4));
                        } else if let Ok(v6) = <[u8; 16]>::try_from(v) {
                            ips.push(IpAddr::from(v6));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    Some((ips, names))
}

/// etcd's check of a dialing peer's certificate (its peer listener's
/// `checkSAN`, off with `--experimental-peer-skip-client-san-verification`):
/// a certificate with IP addresses among its names must have `from`, the
/// address the peer dials from, unless it also has DNS names; then one of
/// those must resolve to `from`. A certificate with neither passes. It
/// resolves names, so it blocks: call it off the core. Difference: etcd
/// also accepts a DNS name that a reverse lookup of `from` gives; keelson
/// only looks names up forward.
pub fn check_peer_san(cert: &[u8], from: IpAddr) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    let from = from.to_canonical();
    let Some((ips, names)) = subject_alt_names(cert) else {
        return Err("x509: the certificate's names cannot be read".to_string());
    };
    if ips.iter().any(|ip| ip.to_canonical() == from) {
        return Ok(());
    }
    if names.is_empty() {
        if ips.is_empty() {
            return Ok(());
        }
        let valid: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
        return Err(format!(
            "x509: certificate is valid for {}, not {from}",
            valid.join(", ")
        ));
    }
    let mut why = String::new();
    for name in names.iter().filter(|n| !n.starts_with("*.")) {
        match (name.as_str(), 0).to_socket_addrs() {
            Ok(mut addrs) => {
                if addrs.any(|a| a.ip().to_canonical() == from) {
                    return Ok(());
                }
            }
            Err(e) => why = format!(" ({e})"),
        }
    }
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    Err(format!(
        "tls: \"{from}\" does not match any of DNSNames [{}]{why}",
        quoted.join(" ")
    ))
}

/// How a TLS config checks certificates beyond its CA.
struct Checks<'a> {
    suites: &'a [String],
    crl: Option<&'a Path>,
    allowed: Option<Allowed>,
}

/// The modification times and sizes of a certificate and key file.
/// The modification times and sizes of some files; None when one cannot
/// be read.
type Stamp = Option<Vec<(std::time::SystemTime, u64)>>;

fn stamp(files: &[PathBuf]) -> Stamp {
    files
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

/// Something loaded from `files`, loaded again when their modification
/// times or sizes change (looked at on each `get`). What does not load
/// leaves the last good one in use, with a warning naming `what`, until
/// the files change again.
struct Reloaded<T: ?Sized> {
    files: Vec<PathBuf>,
    what: &'static str,
    current: std::sync::Mutex<(Stamp, Arc<T>)>,
}

impl<T: ?Sized> Reloaded<T> {
    fn new(files: Vec<PathBuf>, what: &'static str, loaded: Arc<T>) -> Reloaded<T> {
        Reloaded {
            current: std::sync::Mutex::new((stamp(&files), loaded)),
            files,
            what,
        }
    }

    fn get(&self, load: impl FnOnce() -> Result<Arc<T>, String>) -> Arc<T> {
        let now = stamp(&self.files);
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if now.is_some() && now != current.0 {
            current.0 = now;
            match load() {
                Ok(loaded) => {
                    crate::info!("reloaded the {} {}", self.what, self.files[0].display());
                    current.1 = loaded;
                }
                Err(e) => crate::warn!("{e}; still using the {} loaded before", self.what),
            }
        }
        current.1.clone()
    }
}

impl<T: ?Sized> std::fmt::Debug for Reloaded<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloaded")
            .field("files", &self.files)
            .finish()
    }
}

/// A certificate and key as the files hold them now. etcd rereads the
/// files at every handshake, so a renewed certificate is used without a
/// restart; keelson reloads them when they changed (`Reloaded`). A pair
/// that does not load (half written, a key that does not match) leaves
/// the last good one in use.
#[derive(Debug)]
struct CertFiles {
    provider: Arc<rustls::crypto::CryptoProvider>,
    pair: Reloaded<rustls::sign::CertifiedKey>,
}

impl CertFiles {
    fn load(
        cert: &Path,
        key: &Path,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
        rustls::sign::CertifiedKey::from_der(load_certs(cert)?, load_key(key)?, provider)
            .map(Arc::new)
            .map_err(|e| format!("{}: {e}", cert.display()))
    }

    fn new(
        cert: &Path,
        key: &Path,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<CertFiles, String> {
        let loaded = CertFiles::load(cert, key, &provider)?;
        let files = vec![cert.to_path_buf(), key.to_path_buf()];
        Ok(CertFiles {
            provider,
            pair: Reloaded::new(files, "certificate", loaded),
        })
    }

    fn get(&self) -> Arc<rustls::sign::CertifiedKey> {
        let files = &self.pair.files;
        self.pair
            .get(|| CertFiles::load(&files[0], &files[1], &self.provider))
    }
}

impl rustls::server::ResolvesServerCert for CertFiles {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.get())
    }
}

impl rustls::client::ResolvesClientCert for CertFiles {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.get())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A client certificate verifier with a revocation list file that is
/// reread when it changes (its modification time or size, looked at on
/// each handshake), as etcd rereads the list for every connection. A list
/// that does not load leaves the last good one in use, with a warning.
/// The rest of the verifier (roots, schemes) never changes: `first`
/// answers for it.
#[derive(Debug)]
struct CrlFile {
    first: Arc<dyn ClientCertVerifier>,
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Reloaded<dyn ClientCertVerifier>,
}

impl CrlFile {
    fn new(
        first: Arc<dyn ClientCertVerifier>,
        crl: &Path,
        roots: Arc<rustls::RootCertStore>,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> CrlFile {
        CrlFile {
            verifier: Reloaded::new(vec![crl.to_path_buf()], "revocation list", first.clone()),
            first,
            roots,
            provider,
        }
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        let crl = &self.verifier.files[0];
        self.verifier.get(|| {
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                self.roots.clone(),
                self.provider.clone(),
            )
            .with_crls(load_crls(crl)?)
            .allow_unknown_revocation_status()
            .build()
            .map(|v| v as Arc<dyn ClientCertVerifier>)
            .map_err(|e| format!("{}: {e}", crl.display()))
        })
    }
}

impl ClientCertVerifier for CrlFile {
    fn offer_client_auth(&self) -> bool {
        self.first.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.first.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.first.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.first.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.first.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.first.supported_verify_schemes()
    }
}

/// A server config: `cert` and `key` (reread when they change), and
/// client certificates required and checked against `ca` when given.
fn server(
    cert: &Path,
    key: &Path,
    ca: Option<&Path>,
    checks: &Checks<'_>,
) -> Result<rustls::ServerConfig, String> {
    let files = CertFiles::new(cert, key, provider(checks.suites))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider(checks.suites))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match ca {
        Some(ca) => {
            let mut b = rustls::server::WebPkiClientVerifier::builder_with_provider(
                load_roots(ca)?,
                provider(checks.suites),
            );
            if let Some(crl) = checks.crl {
                // etcd checks only the serials a list names: a
                // certificate no list covers is not refused.
                b = b
                    .with_crls(load_crls(crl)?)
                    .allow_unknown_revocation_status();
            }
            let verifier = b.build().map_err(|e| {
                let file = checks.crl.unwrap_or(ca);
                format!("{}: {e}", file.display())
            })?;
            let verifier: Arc<dyn ClientCertVerifier> = match checks.crl {
                Some(crl) => Arc::new(CrlFile::new(
                    verifier,
                    crl,
                    load_roots(ca)?,
                    provider(checks.suites),
                )),
                None => verifier,
            };
            builder.with_client_cert_verifier(Arc::new(Restricted {
                inner: verifier,
                allowed: checks.allowed.clone(),
                anchors: load_certs(ca)?,
            }))
        }
        None => builder.with_no_client_auth(),
    };
    Ok(builder.with_cert_resolver(Arc::new(files)))
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
    let checks = Checks {
        suites: &cfg.cipher_suites,
        crl: cfg.client_crl_file.as_deref(),
        allowed: Allowed::of(None, cfg.client_cert_allowed_hostname.as_ref()),
    };
    let mut sc = server(cert, key, ca, &checks)?;
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
    if cfg.peer_auto_tls {
        let suites = &cfg.cipher_suites;
        let checks = Checks {
            suites,
            crl: None,
            allowed: None,
        };
        let server = server(cert, key, None, &checks)?;
        let client = rustls::ClientConfig::builder_with_provider(provider(suites))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyPeerCertificate(provider(suites))))
            .with_client_cert_resolver(Arc::new(CertFiles::new(cert, key, provider(suites))?));
        return Ok(Some(crate::peer::PeerTls {
            server: Arc::new(server),
            client: Arc::new(client),
            check_san: !cfg.peer_skip_client_san_verification,
        }));
    }
    let ca = cfg.peer_trusted_ca_file.as_deref().ok_or(
        "https peer URLs need --peer-trusted-ca-file (keelson verifies every peer's certificate against it)",
    )?;
    let checks = Checks {
        suites: &cfg.cipher_suites,
        crl: cfg.peer_crl_file.as_deref(),
        allowed: Allowed::of(
            cfg.peer_cert_allowed_cn.as_ref(),
            cfg.peer_cert_allowed_hostname.as_ref(),
        ),
    };
    let server = server(cert, key, cfg.peer_client_cert_auth.then_some(ca), &checks)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider(checks.suites))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &checks.allowed {
        None => builder.with_root_certificates(load_roots(ca)?),
        Some(a) => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                load_roots(ca)?,
                provider(checks.suites),
            )
            .build()
            .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Restricted {
                    inner: inner as Arc<dyn ServerCertVerifier>,
                    allowed: Some(a.clone()),
                    anchors: Vec::new(),
                }))
        }
    };
    let client = builder.with_client_cert_resolver(Arc::new(CertFiles::new(
        cert,
        key,
        provider(checks.suites),
    )?));
    Ok(Some(crate::peer::PeerTls {
        server: Arc::new(server),
        client: Arc::new(client),
        check_san: !cfg.peer_skip_client_san_verification,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed P-256 certificate whose subject is
    /// "O=keelson, CN=first, CN=member" (openssl, 100 years).
    const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBvjCCAWOgAwIBAgIUN5qQhGorgGG+GMK1wgCeZQHxKVIwCgYIKoZIzj0EAwIwMzEQMA4GA1UECgwHa2VlbHNvbjEOMAwGA1UEAwwFZmlyc3QxDzANBgNVBAMMBm1lbWJlcjAgFw0yNjEyMDQwNTU5MzJaGA8yMTI2MTExMDA1NTkzMlowMzEQMA4GA1UECgwHa2VlbHNvbjEOMAwGA1UEAwwFZmlyc3QxDzANBgNVBAMMBm1lbWJlcjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABBHLK1UIP8RTzgKFgZvOBt736D0qp9/MjBfkqMkmrEj4BAVfat2/TmpkI6in7l6wYLIPWjEPfd/x3xz5OcbT3N2jUzBRMB0GA1UdDgQWBBT9RALpgkslUpqlD9Qxg/+wQSjg1DAfBgNVHSMEGDAWgBT9RALpgkslUpqlD9Qxg/+wQSjg1DAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQDlyIrqlXl/Urb4PrTyRqst5aqZdC5oIJdbfw0zf543FAIhAN30biStm9TWVUB4Dqkxx/IocCzQh8dijRV3MqJ5mcYA\n-----END CERTIFICATE-----\n";

    fn cert() -> Vec<u8> {
        rustls_pemfile::certs(&mut CERT_PEM.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn validity_is_read_from_utc_and_generalized_times() {
        assert_eq!(asn1_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(asn1_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(asn1_time(0x18, b"20000301000000Z"), Some(951_868_800));
        assert_eq!(asn1_time(0x17, b"700101000000"), None);
        assert_eq!(asn1_time(0x17, b"701301000000Z"), None);
        assert_eq!(asn1_time(0x18, b"2000030100000+Z"), None);
        // CERT_PEM: from 2026-12-04 05:59:32 (UTCTime) to 2126-11-10
        // 05:59:32 (GeneralizedTime).
        let at = |s| {
            valid_at(
                &cert(),
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(s)),
            )
        };
        assert!(!at(1_796_363_971));
        assert!(at(1_796_363_972));
        assert!(at(4_949_963_972));
        assert!(!at(4_949_963_973));
        assert!(!valid_at(&cert()[..60], UnixTime::now()));
    }

    #[test]
    fn the_subjects_last_common_name_counts_as_in_go() {
        assert_eq!(subject_common_name(&cert()).as_deref(), Some("member"));
        let c = CertificateDer::from(cert());
        assert!(Allowed::Cn("member".into()).check(&c).is_ok());
        assert!(Allowed::Cn("first".into()).check(&c).is_err());
        // No SANs: valid for no host name.
        assert!(Allowed::Hostname("member".into()).check(&c).is_err());
    }

    #[test]
    fn a_self_signed_certificate_is_made_once_for_the_url_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("fixtures/peer");
        let urls = [
            "https://127.0.0.1:2380".to_string(),
            "https://localhost:2381".to_string(),
            "https://[::1]:2380".to_string(),
        ];
        let (cert, key) = self_cert(&at, &urls, true).unwrap();
        let pem = std::fs::read(&cert).unwrap();
        let der = load_certs(&cert).unwrap().remove(0);
        load_key(&key).unwrap();
        for host in ["127.0.0.1", "localhost", "::1"] {
            assert!(Allowed::Hostname(host.into()).check(&der).is_ok(), "{host}");
        }
        assert!(Allowed::Hostname("example.com".into()).check(&der).is_err());
        // No common name: organization "etcd" only.
        assert_eq!(subject_common_name(&der), None);
        // Both files there: kept as they are.
        let again = self_cert(&at, &urls[..1], true).unwrap();
        assert_eq!(again, (cert.clone(), key.clone()));
        assert_eq!(std::fs::read(&cert).unwrap(), pem);
        // Only one of them: both made again.
        std::fs::remove_file(&key).unwrap();
        self_cert(&at, &urls[..1], true).unwrap();
        assert_ne!(std::fs::read(&cert).unwrap(), pem);
    }

    #[test]
    fn damaged_certificates_give_no_name_and_never_panic() {
        let der = cert();
        for n in 0..der.len() {
            let _ = subject_common_name(&der[..n]);
            let _ = subject_alt_names(&der[..n]);
            let mut bad = der.clone();
            bad[n] ^= 0xff;
            let _ = subject_common_name(&bad);
            let _ = subject_alt_names(&bad);
        }
        assert_eq!(subject_common_name(&[]), None);
        assert_eq!(
            subject_common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
        assert_eq!(subject_common_name(&[0x30, 0x80]), None);
    }

    #[test]
    fn a_dialing_peers_certificate_must_name_the_address_it_dials_from() {
        let dir = tempfile::tempdir().unwrap();
        let made = |sub: &str, urls: &[&str]| {
            let urls: Vec<String> = urls.iter().map(|u| u.to_string()).collect();
            let (cert, _) = self_cert(&dir.path().join(sub), &urls, true).unwrap();
            load_certs(&cert).unwrap().remove(0).to_vec()
        };
        let ip: fn(&str) -> IpAddr = |s| s.parse().unwrap();
        // IP addresses only: the dialing address must be one of them.
        let two = made("two", &["https://127.0.0.2:2380", "https://[::2]:2380"]);
        let (ips, names) = subject_alt_names(&two).unwrap();
        assert_eq!(ips, vec![ip("127.0.0.2"), ip("::2")]);
        assert!(names.is_empty());
        assert!(check_peer_san(&two, ip("127.0.0.2")).is_ok());
        assert!(check_peer_san(&two, ip("::ffff:127.0.0.2")).is_ok());
        assert_eq!(
            check_peer_san(&two, ip("127.0.0.1")).unwrap_err(),
            "x509: certificate is valid for 127.0.0.2, ::2, not 127.0.0.1"
        );
        // A DNS name: it must resolve to the dialing address.
        let local = made("local", &["https://localhost:2380"]);
        assert_eq!(
            subject_alt_names(&local).unwrap(),
            (vec![], vec!["localhost".to_string()])
        );
        assert!(check_peer_san(&local, ip("127.0.0.1")).is_ok());
        let e = check_peer_san(&local, ip("10.9.9.9")).unwrap_err();
        assert!(
            e.starts_with(r#"tls: "10.9.9.9" does not match any of DNSNames ["localhost"]"#),
            "{e}"
        );
        // Both: either may match.
        let both = made(
            "both",
            &["https://127.0.0.2:2380", "https://localhost:2380"],
        );
        assert!(check_peer_san(&both, ip("127.0.0.1")).is_ok());
        assert!(check_peer_san(&both, ip("127.0.0.2")).is_ok());
        assert!(check_peer_san(&both, ip("10.9.9.9")).is_err());
        // No alternative names at all: nothing to match, as in etcd.
        assert_eq!(subject_alt_names(&cert()).unwrap(), (vec![], vec![]));
        assert!(check_peer_san(&cert(), ip("10.9.9.9")).is_ok());
        assert!(check_peer_san(&[0x30, 0x00], ip("127.0.0.1")).is_err());
    }
}
