//! The cluster's certificate authority and what it signs: the API server's certificate, users'
//! client certificates (`CN` = user, `O` = groups) and nodes' certificates
//! (`CN=system:node:<name>`, `O=system:nodes`, short-lived, renewed by their agents); the record
//! of each node's certificates in the store, where revoking them is seen by every server replica;
//! and [`serve_tls`], which serves any axum app over TLS, telling it each client's certificate.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo};
use orch_core::{
    Clock, DynamicObject, Error, ObjectKey, ObjectMeta, RawJson, Store, SystemClock, Timestamp, WriteOptions,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use super::admission::UserInfo;
use super::tls;

/// The group of every node's certificate.
pub const NODES: &str = "system:nodes";
/// How a node's user name begins: `system:node:<node name>`.
pub const NODE_USER_PREFIX: &str = "system:node:";
/// The kind of the record of a node's certificates (cluster-scoped, named after the node):
/// the serials issued to it and those revoked.
pub const NODE_CERTIFICATE_KIND: &str = "NodeCertificate";

/// The file names of the CA in a data directory.
const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";

fn failed(what: impl Into<String>, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Unavailable { message: what.into(), source: Some(Box::new(e)) }
}

fn rcgen_failed(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |e| failed(what.to_string(), e)
}

/// A certificate the CA signed, with its key when the CA made the key too.
#[derive(Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM), when the CA generated it (none for a signed CSR).
    pub key_pem: Option<String>,
    /// Its serial number, in hex.
    pub serial: String,
    /// When it expires.
    pub not_after: Timestamp,
}

impl std::fmt::Debug for Issued {
    // The key stays out of logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("serial", &self.serial).field("not_after", &self.not_after).finish()
    }
}

/// The cluster's certificate authority: a self-signed CA certificate and its key. `orch server`
/// keeps both in its data directory (`ca.crt`, and `ca.key` readable by its owner only); every
/// certificate the cluster trusts is signed by it.
pub struct ClusterCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterCa")
    }
}

fn serial() -> (SerialNumber, String) {
    let mut bytes = *uuid::Uuid::new_v4().as_bytes();
    // A positive DER integer without a leading zero: the bytes read back as they were written.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    (SerialNumber::from_slice(&bytes), hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn to_time(t: Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.as_millis().div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn now() -> Timestamp {
    SystemClock.now()
}

/// A certificate's validity: from a minute ago (clocks differ a little) for `validity`.
fn validity(params: &mut CertificateParams, validity: Duration) -> Timestamp {
    let start = now();
    let end = start.plus(validity);
    params.not_before = to_time(Timestamp(start.as_millis() - 60_000));
    params.not_after = to_time(end);
    Timestamp(end.as_millis().div_euclid(1000) * 1000)
}

/// `O=<groups> CN=<name>`. rcgen writes one attribute of each type, so several groups share one
/// `O`, comma-separated; [`CertificateIdentity`] reads both that and one `O` per group (as other
/// tools write them).
fn subject(common_name: &str, groups: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if !groups.is_empty() {
        dn.push(DnType::OrganizationName, groups.join(","));
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Writes `text` to `path` whole (a reader sees the old file or the new one, never a part),
/// readable by its owner only when `secret`.
fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let cannot = |e| failed(format!("cannot write {}", path.display()), e);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(cannot)?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(cannot)?;
    std::fs::rename(&tmp, path).map_err(cannot)
}

/// Writes a certificate and its key beside each other (`<dir>/<name>.crt`, `<dir>/<name>.key`,
/// the key readable by its owner only).
pub fn write_pair(dir: &Path, name: &str, cert_pem: &str, key_pem: &str) -> Result<(PathBuf, PathBuf), Error> {
    std::fs::create_dir_all(dir).map_err(|e| failed(format!("cannot create {}", dir.display()), e))?;
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    // The key first: a certificate is never found without it.
    write_file(&key, key_pem, true)?;
    write_file(&cert, cert_pem, false)?;
    Ok((cert, key))
}

impl ClusterCa {
    /// A new CA (ECDSA P-256, valid ten years) named `name`.
    pub fn generate(name: &str) -> Result<ClusterCa, Error> {
        let key = KeyPair::generate().map_err(rcgen_failed("cannot generate the CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(name, &["orch"]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(serial().0);
        validity(&mut params, Duration::from_secs(10 * 365 * 24 * 3600));
        let cert = params.self_signed(&key).map_err(rcgen_failed("cannot sign the CA certificate"))?;
        Ok(ClusterCa { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// A CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, Error> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| Error::invalid("ClusterCa", "key", format!("not a usable PEM private key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| Error::invalid("ClusterCa", "certificate", format!("not a usable CA certificate: {e}")))?;
        Ok(ClusterCa { cert_pem: cert_pem.to_string(), issuer })
    }

    /// The CA of a data directory (`ca.crt`, `ca.key`).
    pub fn load(dir: &Path) -> Result<ClusterCa, Error> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| failed(format!("cannot read {}", path.display()), e))
        };
        ClusterCa::from_pem(&read(CA_CERT)?, &read(CA_KEY)?)
    }

    /// The CA of a data directory, created there on first use (the key's file mode is 0600).
    /// Replicas of one cluster share one CA: copy both files to each before its first start.
    pub fn load_or_create(dir: &Path) -> Result<ClusterCa, Error> {
        if dir.join(CA_CERT).exists() || dir.join(CA_KEY).exists() {
            return ClusterCa::load(dir);
        }
        std::fs::create_dir_all(dir).map_err(|e| failed(format!("cannot create {}", dir.display()), e))?;
        let ca = ClusterCa::generate("orch cluster CA")?;
        write_pair(dir, "ca", &ca.cert_pem, &ca.issuer.key().serialize_pem())?;
        tracing::info!(path = %dir.join(CA_CERT).display(), "created the cluster CA");
        Ok(ca)
    }

    /// The CA's certificate (PEM): what clients trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        public: &impl rcgen::PublicKeyData,
        valid: Duration,
    ) -> Result<Issued, Error> {
        let (sn, serial) = serial();
        params.serial_number = Some(sn);
        params.use_authority_key_identifier_extension = true;
        let not_after = validity(&mut params, valid);
        let cert = params.signed_by(public, &self.issuer).map_err(rcgen_failed("cannot sign the certificate"))?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: None, serial, not_after })
    }

    fn issue_with_key(&self, params: CertificateParams, valid: Duration) -> Result<Issued, Error> {
        let key = KeyPair::generate().map_err(rcgen_failed("cannot generate a key"))?;
        let mut issued = self.sign(params, &key, valid)?;
        issued.key_pem = Some(key.serialize_pem());
        Ok(issued)
    }

    /// A server certificate for `names` (host names and IP addresses), valid a year.
    pub fn server_certificate(&self, names: &[String]) -> Result<Issued, Error> {
        if names.is_empty() {
            return Err(Error::invalid("Certificate", "names", "a server certificate names at least one host"));
        }
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| Error::invalid("Certificate", "names", format!("{names:?}: {e}")))?;
        params.distinguished_name = subject(&names[0], &[]);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue_with_key(params, Duration::from_secs(365 * 24 * 3600))
    }

    /// A client certificate for `user` in `groups` (`CN` and `O`), with a new key.
    pub fn client_certificate(&self, user: &str, groups: &[&str], valid: Duration) -> Result<Issued, Error> {
        check_user(user)?;
        if let Some(g) = groups.iter().find(|g| g.is_empty() || g.contains([',', ' '])) {
            return Err(Error::invalid("Certificate", "groups", format!("{g:?}: a group is one word without commas")));
        }
        let mut params = client_params(user, groups);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.issue_with_key(params, valid)
    }

    /// Signs a node's certificate signing request (PEM) as `system:node:<node>` in
    /// `system:nodes`, whatever subject the request asked for: only its key is taken. It
    /// authenticates the node to the API server and its agent's API to the server (for
    /// `ServerAuth`, the DNS name is the node's name: see [`agent_client_config`]).
    pub fn sign_node_csr(&self, csr_pem: &str, node: &str, valid: Duration) -> Result<Issued, Error> {
        check_node_name(node)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            Error::invalid("CertificateSigningRequest", "csr", format!("not a valid PEM signing request: {e}"))
        })?;
        let mut params = client_params(&format!("{NODE_USER_PREFIX}{node}"), &[NODES]);
        // The node's agent serves its API (logs, exec) with it too, named after the node.
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        let name = rcgen::string::Ia5String::try_from(node.to_string())
            .map_err(|e| Error::invalid("Node", "name", format!("{node:?}: {e}")))?;
        params.subject_alt_names = vec![rcgen::SanType::DnsName(name)];
        self.sign(params, &csr.public_key, valid)
    }

    /// The server side of TLS: this certificate (sent with the CA's), and client certificates
    /// signed by the CA accepted but not required (a client may authenticate with a bearer token instead).
    pub fn server_config(&self, server: &Issued) -> Result<Arc<rustls::ServerConfig>, Error> {
        let provider = tls::provider();
        let roots = Arc::new(tls::roots(self.cert_pem.as_bytes())?);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| failed("cannot build the client certificate verifier", e))?;
        let key = server.key_pem.as_deref().ok_or_else(|| {
            Error::invalid("Certificate", "key", "the server certificate's key is needed to serve TLS")
        })?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| failed("TLS versions", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                // The CA goes with the chain: a joining node checks it against its token's digest.
                [
                    tls::certs_from_pem(server.cert_pem.as_bytes(), "server certificate")?,
                    tls::certs_from_pem(self.cert_pem.as_bytes(), "ca")?,
                ]
                .concat(),
                tls::key_from_pem(key.as_bytes(), "server key")?,
            )
            .map_err(|e| failed("the server certificate and key do not fit", e))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn client_params(user: &str, groups: &[&str]) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(user, groups);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

fn check_user(user: &str) -> Result<(), Error> {
    if user.is_empty() || user.len() > 253 || user.contains(char::is_whitespace) {
        return Err(Error::invalid(
            "Certificate",
            "user",
            format!("{user:?} must be one word of at most 253 characters"),
        ));
    }
    Ok(())
}

/// A node's name as it goes in its certificate: a DNS name's characters.
pub fn check_node_name(node: &str) -> Result<(), Error> {
    let ok = !node.is_empty()
        && node.len() <= 253
        && node.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !ok {
        return Err(Error::invalid(
            "Node",
            "name",
            format!("{node:?} must be 1-253 characters of lower-case letters, digits, '-' and '.'"),
        ));
    }
    Ok(())
}

/// A new key for a node and a signing request for it (PEM both): what an agent sends to join
/// or to renew. The server decides the subject; the request only carries the key.
pub fn node_csr(node: &str) -> Result<(String, String), Error> {
    check_node_name(node)?;
    let key = KeyPair::generate().map_err(rcgen_failed("cannot generate the node key"))?;
    let params = client_params(&format!("{NODE_USER_PREFIX}{node}"), &[NODES]);
    let csr = params.serialize_request(&key).map_err(rcgen_failed("cannot make the signing request"))?;
    let pem = csr.pem().map_err(rcgen_failed("cannot encode the signing request"))?;
    Ok((pem, key.serialize_pem()))
}

/// The certificate an agent serves its API with: its node certificate, replaced when it is
/// renewed (connections made after see the new one).
#[derive(Debug)]
pub struct AgentServerCert {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl AgentServerCert {
    /// Serves `cert_pem` with `key_pem` (the node's certificate and key).
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Arc<AgentServerCert>, Error> {
        Ok(Arc::new(AgentServerCert { current: std::sync::RwLock::new(certified(cert_pem, key_pem)?) }))
    }

    /// Serves the renewed certificate from now on.
    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), Error> {
        let next = certified(cert_pem, key_pem)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// The server side of TLS for the agent's API (no client certificate asked: the API server
    /// vouches for each request with a single-use ticket).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| failed("TLS versions", e))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl rustls::server::ResolvesServerCert for AgentServerCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn certified(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::sign::CertifiedKey>, Error> {
    let certs = tls::certs_from_pem(cert_pem.as_bytes(), "node certificate")?;
    let key = tls::key_from_pem(key_pem.as_bytes(), "node key")?;
    let key = tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| Error::invalid("Certificate", "node key", format!("not a usable key: {e}")))?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(certs, key)))
}

/// The client side of TLS to the agent of `node`: trusts only the cluster CA `ca_pem`, and
/// takes only that node's certificate (its DNS name is the node's name), whatever address the
/// agent is reached at.
pub fn agent_client_config(ca_pem: &[u8], node: &str) -> Result<rustls::ClientConfig, Error> {
    let roots = Arc::new(tls::roots(ca_pem)?);
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, tls::provider())
        .build()
        .map_err(|e| failed("cannot build the agent certificate verifier", e))?;
    let node = rustls::pki_types::ServerName::try_from(node.to_string())
        .map_err(|e| Error::invalid("Node", "name", format!("{node:?}: {e}")))?;
    // No ALPN here: the HTTP connector sets what it speaks (HTTP/1.1: the agent's exec upgrades).
    Ok(rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| failed("TLS versions", e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AsNode { inner, node }))
        .with_no_client_auth())
}

/// Verifies a certificate as the named node's, not as the address dialled.
#[derive(Debug)]
struct AsNode {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    node: rustls::pki_types::ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for AsNode {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _dialled: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, &self.node, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Who a client certificate says its holder is, and which certificate it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateIdentity {
    /// The user (`CN`) and groups (`O`).
    pub user: UserInfo,
    /// The serial number, in hex.
    pub serial: String,
    /// When it was issued (its `notBefore`).
    pub not_before: Timestamp,
    /// When it expires.
    pub not_after: Timestamp,
}

impl CertificateIdentity {
    /// Reads a certificate (DER).
    pub fn from_der(der: &[u8]) -> Result<CertificateIdentity, Error> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| Error::invalid("Certificate", "certificate", format!("cannot be read: {e}")))?;
        let subject = cert.subject();
        let text = |a: &x509_parser::x509::AttributeTypeAndValue<'_>| a.as_str().map(str::to_string).ok();
        let name = subject.iter_common_name().next().and_then(text).unwrap_or_default();
        let groups = subject
            .iter_organization()
            .filter_map(text)
            .flat_map(|o| o.split(',').map(str::to_string).collect::<Vec<_>>())
            .filter(|g| !g.is_empty())
            .collect();
        let validity = cert.validity();
        Ok(CertificateIdentity {
            user: UserInfo { name, groups },
            serial: hex(cert.raw_serial()),
            not_before: Timestamp(validity.not_before.timestamp() * 1000),
            not_after: Timestamp(validity.not_after.timestamp() * 1000),
        })
    }

    /// Reads the first certificate of a PEM text.
    pub fn from_pem(pem: &str) -> Result<CertificateIdentity, Error> {
        let certs = tls::certs_from_pem(pem.as_bytes(), "certificate")?;
        CertificateIdentity::from_der(&certs[0])
    }

    /// The node this certificate belongs to, if it is a node's.
    pub fn node(&self) -> Option<&str> {
        node_of(&self.user)
    }
}

/// The node a user is, if it is one: `system:node:<name>` in `system:nodes`.
pub fn node_of(user: &UserInfo) -> Option<&str> {
    user.name.strip_prefix(NODE_USER_PREFIX).filter(|_| user.groups.iter().any(|g| g == NODES))
}

// ---------------------------------------------------------------------------------------------
// Node certificate records: what was issued to each node, what was revoked.

/// One certificate in a node's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateEntry {
    /// Its serial number, in hex.
    pub serial: String,
    /// When it expires (milliseconds since the epoch); past that, the entry is dropped.
    pub not_after: i64,
}

/// The record of a node's certificates: the `spec` of its `NodeCertificate` object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeCertificates {
    /// Certificates issued and not revoked.
    pub issued: Vec<CertificateEntry>,
    /// Certificates revoked (refused until they expire).
    pub revoked: Vec<CertificateEntry>,
}

impl orch_core::Resource for NodeCertificates {
    const KIND: &'static str = NODE_CERTIFICATE_KIND;
    const SCOPE: orch_core::Scope = orch_core::Scope::Cluster;
    type Status = ();
}

fn record_key(node: &str) -> ObjectKey {
    ObjectKey::new(NODE_CERTIFICATE_KIND, "", node)
}

/// Changes a node's record (created when missing), retrying on a conflict; expired entries go.
async fn change_record(
    store: &dyn Store,
    node: &str,
    mut change: impl FnMut(&mut NodeCertificates),
) -> Result<NodeCertificates, Error> {
    let key = record_key(node);
    for _ in 0..16 {
        let (current, mut record) = match store.get(&key).await {
            Ok(obj) => {
                let rec: NodeCertificates = obj.spec.decode().map_err(|e| e.within(key.clone(), "spec"))?;
                (Some(obj), rec)
            }
            Err(e) if e.is_not_found() => (None, NodeCertificates::default()),
            Err(e) => return Err(e),
        };
        change(&mut record);
        let at = now().as_millis();
        record.issued.retain(|c| c.not_after > at);
        record.revoked.retain(|c| c.not_after > at);
        let spec = RawJson::encode(&record).map_err(|e| e.within(key.clone(), "spec"))?;
        let result = match current {
            Some(cur) => {
                let mut obj = (*cur).clone();
                obj.spec = spec;
                store.update(obj, &WriteOptions::default()).await
            }
            None => {
                let obj = DynamicObject::new(NODE_CERTIFICATE_KIND, ObjectMeta::named(node)).with_spec(spec);
                store.create(obj, &WriteOptions::default()).await
            }
        };
        match result {
            Ok(_) => return Ok(record),
            Err(e) if e.is_conflict() || matches!(e, Error::AlreadyExists(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::Unavailable {
        message: format!("{key}: the record kept changing; gave up after 16 tries"),
        source: None,
    })
}

/// Notes a certificate issued to `node`, so that revoking the node revokes it.
pub async fn record_issued(store: &dyn Store, node: &str, issued: &Issued) -> Result<(), Error> {
    let entry = CertificateEntry { serial: issued.serial.clone(), not_after: issued.not_after.as_millis() };
    change_record(store, node, |r| r.issued.push(entry.clone())).await.map(|_| ())
}

/// Revokes every certificate issued to `node`: through the API, the server that records it
/// refuses them from its next request on, every other replica as soon as its watch sees it. Answers the serials revoked (none when the node has no live certificate). The node may
/// join again with a new join token.
pub async fn revoke_node(store: &dyn Store, node: &str) -> Result<Vec<String>, Error> {
    let mut revoked = Vec::new();
    change_record(store, node, |r| {
        revoked = r.issued.iter().map(|c| c.serial.clone()).collect();
        let moved: Vec<_> = std::mem::take(&mut r.issued);
        r.revoked.extend(moved);
    })
    .await?;
    Ok(revoked)
}

/// Whether this node certificate is revoked.
pub async fn is_revoked(store: &dyn Store, node: &str, serial: &str) -> Result<bool, Error> {
    match store.get(&record_key(node)).await {
        Ok(obj) => {
            let rec: NodeCertificates = obj.spec.decode().map_err(|e| e.within(record_key(node), "spec"))?;
            Ok(rec.revoked.iter().any(|c| c.serial == serial))
        }
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------------------------
// Serving over TLS

/// Serves `app` over TLS on `listener` (HTTP/2 and HTTP/1.1 by ALPN) until `shutdown` resolves,
/// then lets requests in flight finish. Each request carries the client's address
/// (`ConnectInfo<SocketAddr>`) and, when the client presented a certificate the CA signed, its
/// [`CertificateIdentity`]. A handshake that fails (a certificate from another CA) ends that
/// connection only.
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait, as axum::serve does.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small answers go out at once (Nagle's delay would add tens of milliseconds).
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|der| CertificateIdentity::from_der(der).ok());
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                if let Some(id) = &identity {
                    req.extensions_mut().insert(id.clone());
                }
                let app = app.clone();
                async move { tower::ServiceExt::oneshot(app, req.map(axum::body::Body::new)).await }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_node_request_names_the_node_whatever_it_asked() {
        let ca = ClusterCa::generate("test CA").unwrap();
        let (csr, key) = node_csr("n1").unwrap();
        assert!(key.contains("PRIVATE KEY"));
        let issued = ca.sign_node_csr(&csr, "n2", Duration::from_secs(3600)).unwrap();
        let id = CertificateIdentity::from_pem(&issued.cert_pem).unwrap();
        assert_eq!(id.user.name, "system:node:n2");
        assert_eq!(id.user.groups, vec![NODES.to_string()]);
        assert_eq!(id.node(), Some("n2"));
        assert_eq!(id.serial, issued.serial);
        assert_eq!(id.not_after, issued.not_after);
        assert!(format!("{issued:?}").find("PRIVATE").is_none());
    }

    /// A TLS handshake from a client trusting `ca` as the agent of `node`, to a server with `cert`.
    async fn handshake(cert: &Arc<AgentServerCert>, ca: &str, node: &str) -> Result<(), String> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config().unwrap());
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(tcp).await;
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(agent_client_config(ca.as_bytes(), node).unwrap()));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Dialled by address: the certificate must still be the node's.
        let dialled = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let result = connector.connect(dialled, tcp).await.map(|_| ()).map_err(|e| e.to_string());
        server.abort();
        result
    }

    #[tokio::test]
    async fn an_agent_serves_its_node_certificate_and_is_verified_as_its_node() {
        let ca = ClusterCa::generate("test CA").unwrap();
        let issue = |node: &str| {
            let (csr, key) = node_csr(node).unwrap();
            (ca.sign_node_csr(&csr, node, Duration::from_secs(3600)).unwrap().cert_pem, key)
        };
        let (cert, key) = issue("node-1");
        let served = AgentServerCert::new(&cert, &key).unwrap();
        handshake(&served, ca.cert_pem(), "node-1").await.unwrap();
        let e = handshake(&served, ca.cert_pem(), "node-2").await.unwrap_err();
        assert!(e.to_lowercase().contains("not valid for name"), "another node's agent is refused: {e}");
        let other = ClusterCa::generate("another CA").unwrap();
        let e = handshake(&served, other.cert_pem(), "node-1").await.unwrap_err();
        assert!(e.to_lowercase().contains("unknown"), "another cluster's CA is refused: {e}");
        // A renewed certificate is served from then on.
        let (renewed, renewed_key) = issue("node-2");
        served.replace(&renewed, &renewed_key).unwrap();
        handshake(&served, ca.cert_pem(), "node-2").await.unwrap();
    }

    #[test]
    fn a_user_certificate_carries_user_and_groups() {
        let ca = ClusterCa::generate("test CA").unwrap();
        let issued = ca.client_certificate("alice", &["team-a", "system:readers"], Duration::from_secs(60)).unwrap();
        let id = CertificateIdentity::from_pem(&issued.cert_pem).unwrap();
        assert_eq!(id.user, UserInfo { name: "alice".into(), groups: vec!["team-a".into(), "system:readers".into()] });
        assert_eq!(id.node(), None);
        let e = ca.client_certificate("two words", &[], Duration::from_secs(60)).unwrap_err();
        assert!(e.to_string().contains("user"), "{e}");
        let e = ca.client_certificate("bob", &["a,b"], Duration::from_secs(60)).unwrap_err();
        assert!(e.to_string().contains("groups"), "{e}");
    }

    #[test]
    fn bad_input_is_named() {
        let ca = ClusterCa::generate("test CA").unwrap();
        let e = ca.sign_node_csr("not a csr", "n1", Duration::from_secs(60)).unwrap_err();
        assert!(e.to_string().contains("csr"), "{e}");
        let e = node_csr("Bad Name").unwrap_err();
        assert!(e.to_string().contains("name"), "{e}");
        let e = ClusterCa::from_pem("x", "y").unwrap_err();
        assert!(e.to_string().contains("key"), "{e}");
    }

    #[test]
    fn the_ca_is_created_once_with_a_private_key_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("orch-ca-{}", uuid::Uuid::new_v4()));
        let first = ClusterCa::load_or_create(&dir).unwrap();
        let mode = std::fs::metadata(dir.join("ca.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = ClusterCa::load_or_create(&dir).unwrap();
        assert_eq!(first.cert_pem(), again.cert_pem());
        // What the reloaded CA signs, the first one's certificate verifies.
        let issued = again.client_certificate("bob", &[], Duration::from_secs(60)).unwrap();
        let roots = Arc::new(tls::roots(first.cert_pem().as_bytes()).unwrap());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, tls::provider()).build().unwrap();
        let cert = tls::certs_from_pem(issued.cert_pem.as_bytes(), "c").unwrap();
        rustls::server::danger::ClientCertVerifier::verify_client_cert(
            &*verifier,
            &cert[0],
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
