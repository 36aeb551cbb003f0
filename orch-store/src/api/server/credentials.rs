//! What the server checks about a client's credential on every request beyond the token file:
//! bearer tokens kept in the store ([`bearer`]) and revoked certificates ([`revocation`], node
//! records in [`pki`]). Each is read from a cache of its objects, kept current by a watch, so a
//! request costs a hash-map lookup, not a store read; a revocation reaches every server replica
//! as fast as its watch event does. Until a cache has listed its kind (just after the server
//! starts), the store is asked instead.

use orch_core::Timestamp;
use orch_core::cache::{Cache, CacheConfig, ObjectRef};
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
    /// A bearer token kept in the store (by its id and hash): good until deleted or expired.
    StoredToken { id: String, token_hash: [u8; 32], expires: Option<Timestamp> },
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
    pub(super) async fn stored_token(&self, token: &str) -> Result<Option<(UserInfo, Held)>, Error> {
        let id = bearer::token_id(token);
        let now = orch_core::SystemClock.now();
        let object = self.token_object(&id).await?;
        Ok(object.and_then(|t| {
            let user = bearer::user_of(&t, token, now)?;
            Some((user, Held::StoredToken { id, token_hash: super::super::auth::hash(token), expires: t.expires }))
        }))
    }

    async fn token_object(&self, id: &str) -> Result<Option<BearerToken>, Error> {
        let cache = &self.caches().tokens;
        if cache.is_ready() {
            return Ok(cache.get(&ObjectRef::new("", id)).map(|o| o.spec.clone()));
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
        if !(c.revocations.is_ready() && c.nodes.is_ready()) {
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

    /// Whether what a watch holds is still good now (false ends the watch).
    pub(super) async fn still_good(&self, held: &Held) -> bool {
        let now = orch_core::SystemClock.now();
        match held {
            // A store that cannot answer does not end the watch.
            Held::Certificate(cert) => cert.not_after > now && !matches!(self.revoked_because(cert).await, Ok(Some(_))),
            Held::StoredToken { id, token_hash, .. } => match self.token_object(id).await {
                Ok(Some(t)) => t.sha256 == super::super::auth::hex(token_hash) && t.expires.is_none_or(|at| at > now),
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
