//! Finding the cluster CA from a join token, as `kubeadm join --discovery-token-ca-cert-hash`
//! and swarmkit's tokens do: the token carries the SHA-256 digest of the CA certificate, the
//! server sends the CA in its certificate chain, and a joining node trusts the CA it is sent
//! only when the digest matches and the server's certificate chains to it. A node so needs
//! only its token, and a server impersonating the control plane is refused.
//!
//! A pinned join token reads `orchjoin-<secret>.sha256-<64 hex digits>`: the secret is what the
//! node presents to `/orch/v1/join`; the digest stays with the node.

use std::sync::{Arc, Mutex};

use orch_core::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use super::tls;

/// What separates a join token's secret from the CA digest it pins.
const PIN: &str = ".sha256-";

/// The SHA-256 digest of a certificate (its DER), as 64 lowercase hex digits.
fn digest_of(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest a join token carries for the cluster CA `ca_pem` (its first certificate).
pub fn ca_digest(ca_pem: &[u8]) -> Result<String> {
    let certs = tls::certs_from_pem(ca_pem, "ca")?;
    Ok(digest_of(certs[0].as_ref()))
}

/// A join token that pins the CA `ca_pem`: `<secret>.sha256-<digest>`.
pub fn pinned_join_token(secret: &str, ca_pem: &[u8]) -> Result<String> {
    Ok(format!("{secret}{PIN}{}", ca_digest(ca_pem)?))
}

/// Splits a join token into the secret the server checks and the CA digest it pins, if any.
/// A digest that is not 64 hex digits is an error naming the token's form.
pub fn split_join_token(token: &str) -> Result<(&str, Option<String>)> {
    let Some((secret, digest)) = token.split_once(PIN) else { return Ok((token, None)) };
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid(
            "JoinToken",
            "token",
            "the CA digest after `.sha256-` must be 64 hex digits (`orch token create --join` prints the token whole)",
        ));
    }
    Ok((secret, Some(digest.to_ascii_lowercase())))
}

/// Connects to the https server `server` (`https://host:port`), which the caller cannot verify
/// yet, and answers the CA certificate (PEM) of its chain whose digest is `digest`, once the
/// server's certificate is verified against that CA. Refused, naming why: no certificate of the
/// chain has the digest (another CA, or a server that does not send its CA), or the server's
/// certificate does not chain to it.
pub async fn discover_ca(server: &str, digest: &str) -> Result<String> {
    let bad_url = || {
        Error::invalid(
            "RemoteStore",
            "server",
            format!("must be an https://host:port URL to discover its CA, not {server:?}"),
        )
    };
    let authority = server.strip_prefix("https://").ok_or_else(bad_url)?.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse::<u16>().map_err(|_| bad_url())?),
        _ => (authority, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad_url());
    }
    let pinned = Arc::new(Pinned { digest: digest.to_ascii_lowercase(), found: Mutex::new(None) });
    let config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Unavailable { message: "TLS versions".into(), source: Some(Box::new(e)) })?
        .dangerous()
        .with_custom_certificate_verifier(pinned.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_string()).map_err(|_| bad_url())?;
    let unavailable = |what: String, e: std::io::Error| Error::Unavailable { message: what, source: Some(Box::new(e)) };
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| unavailable(format!("cannot connect to {server} to discover its CA"), e))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    if let Err(e) = connector.connect(name, tcp).await {
        let why = tls::explain(&e).unwrap_or_else(|| e.to_string());
        return Err(Error::invalid("JoinToken", "token", format!("{server}: {why}")));
    }
    let ca = pinned.found.lock().unwrap_or_else(|e| e.into_inner()).take();
    let ca = ca.ok_or_else(|| Error::invalid("JoinToken", "token", format!("{server} sent no CA certificate")))?;
    Ok(pem("CERTIFICATE", ca.as_ref()))
}

/// Trusts a server's chain only through the CA of the pinned digest, which it keeps.
#[derive(Debug)]
struct Pinned {
    digest: String,
    found: Mutex<Option<CertificateDer<'static>>>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| digest_of(c.as_ref()) == self.digest) else {
            return Err(rustls::Error::General(format!(
                "no certificate the server sent is the CA the join token pins (sha256 {}): another cluster, or \
                 not the control plane",
                self.digest
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|e| rustls::Error::General(format!("the pinned CA: {e}")))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), tls::provider())
            .build()
            .map_err(|e| rustls::Error::General(format!("the pinned CA: {e}")))?;
        let verified = verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        *self.found.lock().unwrap_or_else(|e| e.into_inner()) = Some(ca.clone().into_owned());
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &tls::provider().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &tls::provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        tls::provider().signature_verification_algorithms.supported_schemes()
    }
}

/// `der` as a PEM block with `label`, 64 base64 characters a line.
fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips_through_the_reader_for_every_length_remainder() {
        for len in [0usize, 1, 2, 3, 47, 48, 49, 100] {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let text = pem("CERTIFICATE", &der);
            let back: Vec<CertificateDer<'static>> = rustls::pki_types::pem::PemObject::pem_slice_iter(text.as_bytes())
                .collect::<std::result::Result<_, _>>()
                .unwrap();
            if len == 0 {
                assert!(back.is_empty() || back[0].as_ref().is_empty());
            } else {
                assert_eq!(back[0].as_ref(), der.as_slice(), "length {len}");
            }
        }
    }

    #[test]
    fn a_join_token_splits_into_its_secret_and_the_pinned_digest() {
        assert_eq!(split_join_token("orchjoin-abc").unwrap(), ("orchjoin-abc", None));
        let digest = "AB".repeat(32);
        let token = format!("orchjoin-abc.sha256-{digest}");
        assert_eq!(split_join_token(&token).unwrap(), ("orchjoin-abc", Some("ab".repeat(32))));
        let err = split_join_token("orchjoin-abc.sha256-12").unwrap_err().to_string();
        assert!(err.contains("64 hex digits"), "{err}");
    }
}
