//! What the server checks about a client's credential on every request beyond the token file:
//! bearer tokens kept in the store ([`bearer`]) and revoked certificates ([`revocation`], node
//! records in [`pki`]). Each is read from a cache of its objects, kept current by a watch, so a
//! request costs a hash-map lookup, not a store read; a revocation reaches every other server
//! replica as fast as its watch event does, and the replica that wrote it answers the write only
//! once its own cache has it ([`Credentials::settle`]), so the writer's next request is refused
//! there. The store is asked instead until a cache has listed its kind (just after the server
//! starts), while a cache holds an object it could not decode (a revocation written by hand),
//! and for a token the cache does not have (one made a moment ago on another replica).

use orch_core::cache::{Cache, CacheConfig, ObjectRef};
use orch_core::{ObjectMeta, Timestamp};
use std::sync::OnceLock;

use super::super::bearer::{self, BearerToken};
use super::super::pki::NodeCertificates;
use super::super::revocation::Revocation;
use super::*;

/// The caches, started by the first request that needs them (inside the server's runtime).
pub(super) struct Credentials {
    store: Arc<dyn Store>,
    caches: OnceLock<Caches>,
}

struct Caches {
    tokens: Cache<BearerToken>,
    revocations: Cache<Revocation>,
    nodes: Cache<NodeCertificates>,
}

/// What a watch was opened with that may stop being good while it is open.
#[derive(Debug, Clone)]
pub(super) enum Held {
    /// A client certificate: good until it expires or is revoked.
    Certificate(CertificateIdentity),
    /// A bearer token kept in the store (by its SHA-256 in hex, whose first 32 digits are its
    /// id): good until deleted or expired.
    StoredToken { sha256: String, expires: Option<Timestamp> },
}

/// The credential kind and name a write to `target` with `body` changes, if it changes one.
pub(super) fn written(target: &Target, body: &[u8]) -> Option<(&'static str, String)> {
    let kind = |k: &str| {
        [bearer::BEARER_TOKEN_KIND, revocation::CERTIFICATE_REVOCATION_KIND, pki::NODE_CERTIFICATE_KIND]
            .into_iter()
            .find(|c| *c == k)
    };
    match target {
        Target::Object { key, .. } => Some((kind(&key.kind)?, key.name.clone())),
        Target::Collection { kind: k, .. } => {
            let kind = kind(k)?;
            let body: serde_json::Value = serde_json::from_slice(body).ok()?;
            Some((kind, body.pointer("/metadata/name")?.as_str()?.to_string()))
        }
        _ => None,
    }
}

impl Credentials {
    pub(super) fn new(store: Arc<dyn Store>) -> Self {
        Credentials { store, caches: OnceLock::new() }
    }

    fn caches(&self) -> &Caches {
        self.caches.get_or_init(|| Caches {
            tokens: Cache::spawn(self.store.clone(), CacheConfig::default()),
            revocations: Cache::spawn(self.store.clone(), CacheConfig::default()),
            nodes: Cache::spawn(self.store.clone(), CacheConfig::default()),
        })
    }

    /// The user of a bearer token kept in the store, with what a watch opened with it holds;
    /// `None` for a token that is not there or expired.
    pub(super) async fn stored_token(&self, digest: &[u8; 32]) -> Result<Option<(UserInfo, Held)>, Error> {
        let sha256 = super::super::auth::hex(digest);
        let now = orch_core::SystemClock.now();
        let object = self.token_object(&sha256[..32]).await?;
        Ok(object.and_then(|t| {
            let user = t.user_at(&sha256, now)?;
            Some((user, Held::StoredToken { sha256, expires: t.expires }))
        }))
    }

    async fn token_object(&self, id: &str) -> Result<Option<BearerToken>, Error> {
        let cache = &self.caches().tokens;
        if let Some(o) = cache.get(&ObjectRef::new("", id)) {
            return Ok(Some(o.spec.clone()));
        }
        match self.store.get(&ObjectKey::new(bearer::BEARER_TOKEN_KIND, "", id)).await {
            Ok(o) => Ok(o.spec.decode().ok()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Why this client certificate is revoked, if it is: a node's by its node's record, any
    /// other's by its serial.
    pub(super) async fn revoked_because(&self, id: &CertificateIdentity) -> Result<Option<String>, Error> {
        let c = self.caches();
        let trusted = |ready: bool, undecodable: u64| ready && undecodable == 0;
        if !(trusted(c.revocations.is_ready(), c.revocations.decode_errors())
            && trusted(c.nodes.is_ready(), c.nodes.decode_errors()))
        {
            return revocation::revoked_because(&*self.store, id).await;
        }
        Ok(match id.node() {
            Some(node) => c
                .nodes
                .get(&ObjectRef::new("", node))
                .is_some_and(|r| r.spec.revoked.iter().any(|e| e.serial == id.serial))
                .then(|| format!("the certificate of node {node:?} (serial {}) is revoked", id.serial)),
            None => c
                .revocations
                .get(&ObjectRef::new("", &id.serial))
                .map(|_| format!("the client certificate of {:?} (serial {}) is revoked", id.user.name, id.serial)),
        })
    }

    /// After a write of `kind` named `name` on this server: waits (up to 2 s) until the cache of
    /// that kind shows the object as the store now has it, so that what the write changed (a
    /// token made or revoked, a certificate revoked) holds for the very next request here.
    pub(super) async fn settle(&self, kind: &str, name: &str) {
        let Some(c) = self.caches.get() else { return };
        let r = ObjectRef::new("", name);
        let seen = || -> Option<Option<u64>> {
            let version = |m: &ObjectMeta| m.resource_version;
            Some(match kind {
                bearer::BEARER_TOKEN_KIND => c.tokens.get(&r).map(|o| version(&o.metadata)),
                revocation::CERTIFICATE_REVOCATION_KIND => c.revocations.get(&r).map(|o| version(&o.metadata)),
                pki::NODE_CERTIFICATE_KIND => c.nodes.get(&r).map(|o| version(&o.metadata)),
                _ => return None,
            })
        };
        if seen().is_none() {
            return;
        }
        let want = match self.store.get(&ObjectKey::new(kind, "", name)).await {
            Ok(o) => Some(o.metadata.resource_version),
            Err(e) if e.is_not_found() => None,
            Err(_) => return,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline {
            let now = seen().flatten();
            if now == want || now.zip(want).is_some_and(|(n, w)| n > w) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Whether what a watch holds is still good now (false ends the watch).
    pub(super) async fn still_good(&self, held: &Held) -> bool {
        let now = orch_core::SystemClock.now();
        match held {
            // A store that cannot answer does not end the watch.
            Held::Certificate(cert) => cert.not_after > now && !matches!(self.revoked_because(cert).await, Ok(Some(_))),
            Held::StoredToken { sha256, .. } => match self.token_object(&sha256[..32]).await {
                Ok(Some(t)) => t.user_at(sha256, now).is_some(),
                // Gone: revoked.
                Ok(None) => false,
                Err(_) => true,
            },
        }
    }

    /// When a watch holding `held` looks next: at `every`, or the expiry when sooner.
    pub(super) fn next_look(held: &Held, every: Duration) -> Duration {
        let expires = match held {
            Held::Certificate(cert) => Some(cert.not_after),
            Held::StoredToken { expires, .. } => *expires,
        };
        expires.map_or(every, |at| at.since(orch_core::SystemClock.now()).min(every))
    }
}
