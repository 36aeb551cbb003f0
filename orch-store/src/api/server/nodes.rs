//! Node certificates: how nodes join with a join token and renew their certificates, and the
//! check that refuses an expired or revoked client certificate on every request.

use super::*;

/// How nodes join: the CA that signs their certificates, the join tokens it accepts, and how long
/// a node certificate lasts (its agent renews it at two thirds of that).
///
/// An agent presents a join token once, with a certificate signing request, to
/// `POST /orch/v1/join`, and gets its certificate (`CN=system:node:<name>`, `O=system:nodes`);
/// from then on it authenticates with it, and renews it at `POST /orch/v1/certificates/renew`.
#[derive(Clone)]
pub struct NodeJoin {
    ca: Arc<ClusterCa>,
    tokens: JoinSource,
    validity: Duration,
}

#[derive(Clone)]
enum JoinSource {
    /// Read at each join, so tokens created while the server runs are seen.
    File(std::path::PathBuf),
    Fixed(JoinTokens),
}

impl std::fmt::Debug for NodeJoin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeJoin").field("validity", &self.validity).finish()
    }
}

impl NodeJoin {
    /// Nodes join with certificates of `ca`, valid 24 hours; no join token yet.
    pub fn new(ca: Arc<ClusterCa>) -> Self {
        NodeJoin { ca, tokens: JoinSource::Fixed(JoinTokens::new()), validity: Duration::from_secs(24 * 3600) }
    }

    /// The join tokens of a file (see [`JoinTokens`]), read again at each join.
    pub fn tokens_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.tokens = JoinSource::File(path.into());
        self
    }

    /// These join tokens.
    pub fn tokens(mut self, tokens: JoinTokens) -> Self {
        self.tokens = JoinSource::Fixed(tokens);
        self
    }

    /// How long a node certificate is valid (default 24 hours).
    pub fn validity(mut self, validity: Duration) -> Self {
        self.validity = validity;
        self
    }

    fn token_ok(&self, token: &str) -> Result<bool, Error> {
        let now = orch_core::SystemClock.now();
        Ok(match &self.tokens {
            JoinSource::File(path) => JoinTokens::load(path)?.check(token, now),
            JoinSource::Fixed(t) => t.check(token, now),
        })
    }
}

/// Refuses an expired or revoked client certificate.
pub(super) async fn check_certificate(s: &Shared, id: &CertificateIdentity) -> Result<(), Status> {
    // The handshake checked the expiry; a connection may outlive it.
    if id.not_after <= orch_core::SystemClock.now() {
        return Err(Status::failure(
            401,
            "Unauthorized",
            format!("the client certificate of {:?} expired at {}", id.user.name, id.not_after.to_jiff()),
        ));
    }
    match s.credentials.revoked_because(id).await.map_err(|e| Status::from_error(&e))? {
        Some(why) => Err(Status::failure(401, "Unauthorized", why)),
        None => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JoinBody {
    token: String,
    node: String,
    csr: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RenewBody {
    csr: String,
}

/// `POST /orch/v1/join` and `POST /orch/v1/certificates/renew`: signs a node's certificate.
pub(super) async fn node_certificate(
    s: &Shared,
    target: &Target,
    cert: Option<&CertificateIdentity>,
    body: &[u8],
) -> Answer {
    let Some(join) = &s.join else {
        return Err(Status::failure(404, "NotFound", "this server does not sign node certificates (it serves no TLS)"));
    };
    let (node, csr) = if *target == Target::Join {
        let b: JoinBody = read_json(body, "join request")?;
        pki::check_node_name(&b.node).map_err(|e| Status::from_error(&e))?;
        // The token is never echoed or logged; an unknown and an expired one read alike.
        if !join.token_ok(&b.token).map_err(|e| Status::from_error(&e))? {
            return Err(Status::failure(401, "Unauthorized", "the join token is not valid or has expired"));
        }
        (b.node, b.csr)
    } else {
        let b: RenewBody = read_json(body, "renewal request")?;
        let Some(node) = cert.and_then(|c| c.node()) else {
            return Err(Status::failure(
                403,
                "Forbidden",
                "only a node, authenticated by its certificate, renews its certificate",
            ));
        };
        (node.to_string(), b.csr)
    };
    let issued = join.ca.sign_node_csr(&csr, &node, join.validity).map_err(|e| Status::from_error(&e))?;
    pki::record_issued(&*s.store, &node, &issued).await.map_err(|e| Status::from_error(&e))?;
    tracing::info!(node = %node, serial = %issued.serial, renewal = (*target == Target::Renew), "signed a node certificate");
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "certificate": issued.cert_pem,
            "ca": join.ca.cert_pem(),
            "serial": issued.serial,
            "notAfter": issued.not_after.to_jiff().to_string(),
        }),
    ))
}
