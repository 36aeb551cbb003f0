//! TLS on both sides of the API (rustls, on ring): reading PEM, the client's configuration
//! (trust one CA, present a certificate or not) and the words a refused handshake is told in.

use std::sync::Arc;

use orch_core::Error;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The one crypto provider orch uses (ring), whatever else the process links.
// rustls marks ring's provider deprecated for its lack of post-quantum key exchange; aws-lc-rs,
// which has it, needs cmake and a C toolchain to build. Classical X25519 and P-256 it is.
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM text, in order; none is an error naming `what`.
pub(crate) fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| Error::invalid("Certificate", what, format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(Error::invalid("Certificate", what, "holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)"));
    }
    Ok(certs)
}

/// The private key of a PEM text (PKCS#8, SEC1 or PKCS#1).
pub(crate) fn key_from_pem(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| Error::invalid("Certificate", what, format!("not a PEM private key: {e}")))
}

/// A trust store holding the certificates of `ca_pem`.
pub(crate) fn roots(ca_pem: &[u8]) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem, "ca")? {
        roots
            .add(cert)
            .map_err(|e| Error::invalid("Certificate", "ca", format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// A client's TLS: trusts only the CA of `ca_pem`; presents `identity` (certificate chain and
/// key, PEM) when given. (The connector sets ALPN: HTTP/2 only, all the client speaks.)
#[cfg(feature = "remote")]
pub(crate) fn client_config(ca_pem: &[u8], identity: Option<(&[u8], &[u8])>) -> Result<rustls::ClientConfig, Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Unavailable { message: "TLS versions".into(), source: Some(Box::new(e)) })?
        .with_root_certificates(roots(ca_pem)?);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(certs_from_pem(cert, "client certificate")?, key_from_pem(key, "client key")?)
            .map_err(|e| Error::invalid("Certificate", "client key", format!("does not fit the certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

#[cfg(feature = "remote")]
/// What went wrong in a TLS handshake, if that is what `err` (or one of its causes) is, in words
/// for the person who has to fix it.
pub(crate) fn explain(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            return Some(match t {
                rustls::Error::InvalidCertificate(c) => format!(
                    "the server's certificate is not trusted ({c:?}): it was not signed by the CA in use (check --ca), has expired, or does not name this host"
                ),
                rustls::Error::AlertReceived(a) => {
                    format!("the server refused the TLS handshake ({a:?}): it does not accept this client certificate")
                }
                other => format!("TLS: {other}"),
            });
        }
        // tokio-rustls reports an alert the server sent as text.
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(alert) = io.get_ref().map(|i| i.to_string()).filter(|t| t.starts_with("received fatal alert"))
        {
            return Some(format!(
                "the server refused the TLS handshake ({alert}): it does not accept this client certificate"
            ));
        }
        // An I/O error's `source` skips the error it wraps: look inside it.
        cur = match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}
