//! etcd's JWT auth tokens (`--auth-token jwt,priv-key=…,pub-key=…,
//! sign-method=…,ttl=…`): a token is a JSON Web Token whose claims are
//! `{"exp":…,"revision":…,"username":…}` (etcd's, in the order Go writes
//! them), signed with the member's key. Any member holding the key (or,
//! for RSA and ECDSA, the public key) checks any member's token.
//!
//! Sign methods: RS256/384/512 and PS256/384/512 (an RSA key of 2048 to
//! 8192 bits), ES256 and ES384 (P-256, P-384), HS256/384/512 (the
//! private-key file's bytes are the secret), as etcd 3.4 takes them;
//! ES512 (P-521, which ring lacks) is refused at start. Keys: PEM PKCS#1
//! (`RSA PRIVATE KEY`), PKCS#8 (`PRIVATE KEY`) and SEC1 (`EC PRIVATE KEY`)
//! private keys; `PUBLIC KEY`, `RSA PUBLIC KEY` or a `CERTIFICATE` for the
//! public key. With only a public key the member checks tokens and
//! refuses to issue them, as etcd's verify-only mode does.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, KeyPair};
use std::time::Duration;

/// etcd's default token lifetime for JWT.
const DEFAULT_TTL: Duration = Duration::from_secs(300);

enum Signer {
    Rsa(signature::RsaKeyPair, &'static dyn signature::RsaEncoding),
    Ecdsa(signature::EcdsaKeyPair),
    Hmac(ring::hmac::Key),
}

enum Verifier {
    /// Public key bytes as ring takes them (PKCS#1 for RSA, the point for
    /// ECDSA) and the algorithm.
    Public(Vec<u8>, &'static dyn signature::VerificationAlgorithm),
    Hmac(ring::hmac::Key),
}

pub struct Jwt {
    /// The `alg` of every token this member issues and accepts.
    alg: String,
    signer: Option<Signer>,
    verifier: Verifier,
    pub ttl: Duration,
    rng: SystemRandom,
}

/// A token's claims, once checked.
#[derive(Debug, PartialEq)]
pub struct Claims {
    pub username: String,
    pub revision: u64,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Jwt({}, ttl {:?})", self.alg, self.ttl)
    }
}

/// A minimal DER reader: the next element's tag, contents and the rest.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | b as usize;
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The subjectPublicKeyInfo's key bits (BIT STRING contents less the
/// unused-bits byte): PKCS#1 RSAPublicKey for RSA, the point for EC.
fn spki_key(spki: &[u8]) -> Option<Vec<u8>> {
    let (0x30, body, _) = der(spki)? else {
        return None;
    };
    let (0x30, _alg, rest) = der(body)? else {
        return None;
    };
    let (0x03, bits, _) = der(rest)? else {
        return None;
    };
    let (&0, key) = bits.split_first()? else {
        return None;
    };
    Some(key.to_vec())
}

/// A certificate's subjectPublicKeyInfo (the whole element).
fn cert_spki(cert: &[u8]) -> Option<&[u8]> {
    let (0x30, c, _) = der(cert)? else {
        return None;
    };
    let (0x30, mut tbs, _) = der(c)? else {
        return None;
    };
    // [0] version (optional), serial, signature, issuer, validity,
    // subject, then the key.
    if tbs.first() == Some(&0xa0) {
        tbs = der(tbs)?.2;
    }
    for _ in 0..5 {
        tbs = der(tbs)?.2;
    }
    let (tag, _, rest) = der(tbs)?;
    (tag == 0x30).then(|| &tbs[..tbs.len() - rest.len()])
}

/// A SEC1 `EC PRIVATE KEY`: its scalar, curve OID and public point.
fn sec1(key: &[u8]) -> Option<(&[u8], Option<&[u8]>, Option<Vec<u8>>)> {
    let (0x30, body, _) = der(key)? else {
        return None;
    };
    let (0x02, _version, rest) = der(body)? else {
        return None;
    };
    let (0x04, scalar, mut rest) = der(rest)? else {
        return None;
    };
    let (mut curve, mut point) = (None, None);
    while let Some((tag, inner, next)) = der(rest) {
        match tag {
            0xa0 => curve = der(inner).filter(|e| e.0 == 0x06).map(|e| e.1),
            0xa1 => {
                point = der(inner)
                    .filter(|e| e.0 == 0x03)
                    .and_then(|e| e.1.split_first())
                    .map(|(_, p)| p.to_vec())
            }
            _ => {}
        }
        rest = next;
    }
    Some((scalar, curve, point))
}

const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

fn pem_items(what: &str, bytes: &[u8]) -> Result<Vec<rustls_pemfile::Item>, String> {
    let mut r = bytes;
    let items: Result<Vec<_>, _> = rustls_pemfile::read_all(&mut r).collect();
    let items = items.map_err(|e| format!("{what}: {e}"))?;
    if items.is_empty() {
        return Err(format!("{what}: no PEM key in it"));
    }
    Ok(items)
}

impl Jwt {
    /// Parses etcd's `--auth-token` value after `jwt,`: `key=value`
    /// options; reads the key files.
    pub fn from_options(opts: &str) -> Result<Jwt, String> {
        let (mut method, mut public, mut private, mut ttl) = (None, None, None, DEFAULT_TTL);
        for kv in opts.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--auth-token jwt option {kv:?} is not key=value"))?;
            match k {
                "sign-method" => method = Some(v.to_string()),
                "pub-key" if !v.is_empty() => {
                    public = Some(std::fs::read(v).map_err(|e| format!("pub-key {v}: {e}"))?)
                }
                "priv-key" if !v.is_empty() => {
                    private = Some(std::fs::read(v).map_err(|e| format!("priv-key {v}: {e}"))?)
                }
                "ttl" => {
                    ttl = crate::config::parse_duration(v)
                        .ok_or_else(|| format!("--auth-token jwt ttl {v:?}: not a duration"))?
                }
                "pub-key" | "priv-key" => {}
                other => warn!("unknown JWT options: [{other}]"),
            }
        }
        let method = method.ok_or("auth: invalid auth options (no sign-method)")?;
        Jwt::new(&method, public.as_deref(), private.as_deref(), ttl)
    }

    pub fn new(
        method: &str,
        public: Option<&[u8]>,
        private: Option<&[u8]>,
        ttl: Duration,
    ) -> Result<Jwt, String> {
        use signature as s;
        let rng = SystemRandom::new();
        let missing = || MISSING_KEY.to_string();
        let (signer, verifier) = match method {
            "HS256" | "HS384" | "HS512" => {
                let alg = match method {
                    "HS256" => ring::hmac::HMAC_SHA256,
                    "HS384" => ring::hmac::HMAC_SHA384,
                    _ => ring::hmac::HMAC_SHA512,
                };
                let secret = private.filter(|p| !p.is_empty()).ok_or_else(missing)?;
                (
                    Some(Signer::Hmac(ring::hmac::Key::new(alg, secret))),
                    Verifier::Hmac(ring::hmac::Key::new(alg, secret)),
                )
            }
            "RS256" | "RS384" | "RS512" | "PS256" | "PS384" | "PS512" => {
                let (enc, ver): (
                    &'static dyn s::RsaEncoding,
                    &'static dyn s::VerificationAlgorithm,
                ) = match method {
                    "RS256" => (&s::RSA_PKCS1_SHA256, &s::RSA_PKCS1_2048_8192_SHA256),
                    "RS384" => (&s::RSA_PKCS1_SHA384, &s::RSA_PKCS1_2048_8192_SHA384),
                    "RS512" => (&s::RSA_PKCS1_SHA512, &s::RSA_PKCS1_2048_8192_SHA512),
                    "PS256" => (&s::RSA_PSS_SHA256, &s::RSA_PSS_2048_8192_SHA256),
                    "PS384" => (&s::RSA_PSS_SHA384, &s::RSA_PSS_2048_8192_SHA384),
                    _ => (&s::RSA_PSS_SHA512, &s::RSA_PSS_2048_8192_SHA512),
                };
                let pair = private.map(rsa_private).transpose()?;
                let key = verifying_key(pair.as_ref().map(|p| p.public_key().as_ref()), public)?;
                (
                    pair.map(|p| Signer::Rsa(p, enc)),
                    Verifier::Public(key, ver),
                )
            }
            "ES256" | "ES384" => {
                let (sign, ver, curve): (_, &'static dyn s::VerificationAlgorithm, _) =
                    if method == "ES256" {
                        (
                            &s::ECDSA_P256_SHA256_FIXED_SIGNING,
                            &s::ECDSA_P256_SHA256_FIXED,
                            P256,
                        )
                    } else {
                        (
                            &s::ECDSA_P384_SHA384_FIXED_SIGNING,
                            &s::ECDSA_P384_SHA384_FIXED,
                            P384,
                        )
                    };
                let pair = private
                    .map(|p| ec_private(p, sign, curve, &rng))
                    .transpose()?;
                let key = verifying_key(pair.as_ref().map(|p| p.public_key().as_ref()), public)?;
                (pair.map(Signer::Ecdsa), Verifier::Public(key, ver))
            }
            "ES512" => {
                return Err("auth: sign-method ES512 (P-521) is not supported by keelson".into())
            }
            _ => return Err("auth: invalid auth signature method".into()),
        };
        Ok(Jwt {
            alg: method.to_string(),
            signer,
            verifier,
            ttl,
            rng,
        })
    }

    /// A token for `username` at auth revision `revision`, expiring `ttl`
    /// after `now_secs`; None in verify-only mode.
    pub fn sign(&self, username: &str, revision: u64, now_secs: u64) -> Option<String> {
        let header = format!(r#"{{"alg":"{}","typ":"JWT"}}"#, self.alg);
        let claims = serde_json::json!({
            "exp": now_secs + self.ttl.as_secs(),
            "revision": revision,
            "username": username,
        });
        let mut token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = match self.signer.as_ref()? {
            Signer::Hmac(k) => ring::hmac::sign(k, token.as_bytes()).as_ref().to_vec(),
            Signer::Rsa(pair, enc) => {
                let mut sig = vec![0; pair.public().modulus_len()];
                pair.sign(*enc, &self.rng, token.as_bytes(), &mut sig)
                    .ok()?;
                sig
            }
            Signer::Ecdsa(pair) => pair
                .sign(&self.rng, token.as_bytes())
                .ok()?
                .as_ref()
                .to_vec(),
        };
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig));
        Some(token)
    }

    /// Whether this member only checks tokens (no private key).
    pub fn verify_only(&self) -> bool {
        self.signer.is_none()
    }

    /// The claims of a genuine, unexpired token signed with this member's
    /// method and key.
    pub fn verify(&self, token: &str, now_secs: u64) -> Option<Claims> {
        let mut parts = token.split('.');
        let (h, c, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).ok()?).ok()?;
        if header.get("alg")?.as_str()? != self.alg {
            return None;
        }
        let sig = URL_SAFE_NO_PAD.decode(s).ok()?;
        let signed = &token[..h.len() + 1 + c.len()];
        match &self.verifier {
            Verifier::Hmac(k) => ring::hmac::verify(k, signed.as_bytes(), &sig).ok()?,
            Verifier::Public(key, alg) => signature::UnparsedPublicKey::new(*alg, key)
                .verify(signed.as_bytes(), &sig)
                .ok()?,
        }
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).ok()?).ok()?;
        // jwt-go: a token past its "exp" (seconds) is invalid.
        if let Some(exp) = claims.get("exp") {
            if (now_secs as f64) > exp.as_f64()? {
                return None;
            }
        }
        Some(Claims {
            username: claims.get("username")?.as_str()?.to_string(),
            revision: claims.get("revision")?.as_f64()? as u64,
        })
    }
}

const MISSING_KEY: &str = "auth: missing key data";

/// The public key tokens are checked with: the private key's own public
/// half, which the `pub-key` file, when also given, must match (etcd's
/// `ErrKeyMismatch`), or the `pub-key` file alone.
fn verifying_key(own: Option<&[u8]>, public_pem: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let public = public_pem.map(public_key).transpose()?;
    match (own, public) {
        (Some(own), Some(public)) if own != public.as_slice() => {
            Err("auth: public and private keys don't match".into())
        }
        (_, Some(public)) => Ok(public),
        (Some(own), None) => Ok(own.to_vec()),
        (None, None) => Err(MISSING_KEY.into()),
    }
}

fn rsa_private(pem: &[u8]) -> Result<signature::RsaKeyPair, String> {
    use rustls_pemfile::Item;
    for item in pem_items("priv-key", pem)? {
        let pair = match item {
            Item::Pkcs1Key(k) => signature::RsaKeyPair::from_der(k.secret_pkcs1_der()),
            Item::Pkcs8Key(k) => signature::RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            _ => continue,
        };
        return pair.map_err(|e| format!("priv-key: not an RSA key ring takes: {e}"));
    }
    Err("priv-key: no RSA private key in it".into())
}

fn ec_private(
    pem: &[u8],
    alg: &'static signature::EcdsaSigningAlgorithm,
    curve: &[u8],
    rng: &SystemRandom,
) -> Result<signature::EcdsaKeyPair, String> {
    use rustls_pemfile::Item;
    for item in pem_items("priv-key", pem)? {
        match item {
            Item::Pkcs8Key(k) => {
                return signature::EcdsaKeyPair::from_pkcs8(alg, k.secret_pkcs8_der(), rng).map_err(
                    |e| format!("priv-key: not an EC key of the sign method's curve: {e}"),
                )
            }
            Item::Sec1Key(k) => {
                let (scalar, c, point) =
                    sec1(k.secret_sec1_der()).ok_or("priv-key: malformed EC PRIVATE KEY")?;
                if c.is_some_and(|c| c != curve) {
                    return Err("priv-key: the key's curve is not the sign method's".into());
                }
                let point = point.ok_or("priv-key: the EC key does not carry its public key")?;
                return signature::EcdsaKeyPair::from_private_key_and_public_key(
                    alg, scalar, &point, rng,
                )
                .map_err(|e| format!("priv-key: {e}"));
            }
            _ => continue,
        }
    }
    Err("priv-key: no EC private key in it".into())
}

/// The public key of a `PUBLIC KEY`, `RSA PUBLIC KEY` or `CERTIFICATE`
/// PEM, as ring takes it.
fn public_key(pem: &[u8]) -> Result<Vec<u8>, String> {
    use rustls_pemfile::Item;
    for item in pem_items("pub-key", pem)? {
        let key = match item {
            Item::SubjectPublicKeyInfo(k) => spki_key(k.as_ref()),
            Item::X509Certificate(c) => cert_spki(c.as_ref()).and_then(spki_key),
            _ => continue,
        };
        return key.ok_or_else(|| "pub-key: malformed public key".to_string());
    }
    // PKCS#1 "RSA PUBLIC KEY", which rustls-pemfile does not name.
    let text = std::str::from_utf8(pem).map_err(|_| "pub-key: not PEM")?;
    if let Some(b64) = text
        .split("-----BEGIN RSA PUBLIC KEY-----")
        .nth(1)
        .and_then(|r| r.split("-----END RSA PUBLIC KEY-----").next())
    {
        let b64: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
        return base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("pub-key: {e}"));
    }
    Err("pub-key: no public key in it".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openssl(args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn rsa_ecdsa_and_hmac_tokens_round_trip_and_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let p = |f: &str| d.path().join(f).to_str().unwrap().to_string();
        openssl(&["genrsa", "-traditional", "-out", &p("rsa.key"), "2048"]);
        openssl(&[
            "rsa",
            "-in",
            &p("rsa.key"),
            "-pubout",
            "-out",
            &p("rsa.pub"),
        ]);
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &p("rsa.key"),
            "-subj",
            "/CN=x",
            "-days",
            "1",
            "-out",
            &p("rsa.crt"),
        ]);
        openssl(&["genrsa", "-out", &p("other.key"), "2048"]);
        openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &p("ec.key"),
        ]);
        openssl(&["ec", "-in", &p("ec.key"), "-pubout", "-out", &p("ec.pub")]);
        openssl(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            &p("ec.key"),
            "-out",
            &p("ec8.key"),
        ]);
        let opts = |s: &str| Jwt::from_options(&s.replace("DIR", d.path().to_str().unwrap()));
        let now = 1_700_000_000;
        for o in [
            "sign-method=RS256,priv-key=DIR/rsa.key,pub-key=DIR/rsa.crt",
            "sign-method=PS384,priv-key=DIR/rsa.key,pub-key=DIR/rsa.pub,ttl=1m",
            "sign-method=RS512,priv-key=DIR/other.key",
            "sign-method=ES256,priv-key=DIR/ec.key,pub-key=DIR/ec.pub",
            "sign-method=ES256,priv-key=DIR/ec8.key",
            "sign-method=HS256,priv-key=DIR/rsa.pub",
        ] {
            let j = opts(o).unwrap_or_else(|e| panic!("{o}: {e}"));
            let t = j.sign("root", 7, now).unwrap();
            let want = Claims {
                username: "root".into(),
                revision: 7,
            };
            assert_eq!(j.verify(&t, now + 10), Some(want), "{o}");
            assert_eq!(
                j.verify(&t, now + j.ttl.as_secs() + 1),
                None,
                "{o}: expired"
            );
            // Another user's claims under this signature.
            let (head, rest) = t.split_once('.').unwrap();
            let sig = rest.split_once('.').unwrap().1;
            let forged = format!(
                "{head}.{}.{sig}",
                URL_SAFE_NO_PAD.encode(r#"{"exp":9999999999,"revision":7,"username":"admin"}"#)
            );
            assert_eq!(j.verify(&forged, now), None, "{o}: forged");
            assert_eq!(j.verify("a.b.c", now), None);
            assert_eq!(j.verify("", now), None);
        }
        // The claims as etcd writes them.
        let j = opts("sign-method=HS256,priv-key=DIR/rsa.pub").unwrap();
        let t = j.sign("u", 3, now).unwrap();
        let claims = URL_SAFE_NO_PAD
            .decode(t.split('.').nth(1).unwrap())
            .unwrap();
        assert_eq!(
            String::from_utf8(claims).unwrap(),
            format!(r#"{{"exp":{},"revision":3,"username":"u"}}"#, now + 300)
        );
        // A token of one method or key is not good under another.
        let rs = opts("sign-method=RS256,priv-key=DIR/rsa.key").unwrap();
        let other = opts("sign-method=RS256,priv-key=DIR/other.key").unwrap();
        let t = rs.sign("root", 1, now).unwrap();
        assert!(other.verify(&t, now).is_none());
        assert!(j.verify(&t, now).is_none());
        // Verify-only with the certificate: checks, does not issue.
        let vo = opts("sign-method=RS256,pub-key=DIR/rsa.crt").unwrap();
        assert!(vo.verify_only());
        assert_eq!(vo.sign("root", 1, now), None);
        assert_eq!(vo.verify(&t, now).unwrap().username, "root");
        for (o, err) in [
            (
                "sign-method=RS256,priv-key=DIR/rsa.key,pub-key=DIR/ec.pub",
                "don't match",
            ),
            ("sign-method=RS256", "missing key"),
            (
                "sign-method=XX1,priv-key=DIR/rsa.key",
                "invalid auth signature method",
            ),
            ("priv-key=DIR/rsa.key", "no sign-method"),
            (
                "sign-method=ES256,priv-key=DIR/rsa.key",
                "no EC private key",
            ),
            ("sign-method=RS256,priv-key=DIR/nope", "priv-key"),
        ] {
            let e = opts(o).unwrap_err();
            assert!(e.contains(err), "{o}: {e}");
        }
    }

    #[test]
    fn malformed_der_is_refused_without_panicking() {
        for bad in [
            &[][..],
            &[0x30],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
            &[0x30, 0x05, 1],
            &[0x30, 0x82, 0xff],
        ] {
            assert!(der(bad).is_none() || spki_key(bad).is_none());
            assert!(cert_spki(bad).is_none());
            assert!(sec1(bad).is_none());
        }
    }
}
