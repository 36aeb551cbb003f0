//! Leader election over any [`Store`]: a lock object bound to a lease, whose revision is the
//! fencing token every write of the leader carries.
//!
//! The candidate that creates the lock object leads. It keeps the lease alive; if it cannot (it
//! crashed, hung, or lost the store), the lease expires, the store deletes the lock, and a standby
//! creates a new one. The new lock has a new revision, so the old leader's guard no longer holds
//! and the store refuses its writes even if it does not yet know it was deposed: leadership
//! never rests on clocks alone.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::meta::ObjectMeta;
use crate::object::{DynamicObject, ObjectKey, RawJson};
use crate::runnable::Leadership;
use crate::store::{Guard, Store, WriteOptions};

/// The kind of lock objects.
pub const LOCK_KIND: &str = "LeaderLock";

/// Settings of an election.
#[derive(Debug, Clone)]
pub struct LeaderElectionConfig {
    /// Namespace of the lock object.
    pub namespace: String,
    /// Name of the lock object: every replica of one control plane uses the same.
    pub name: String,
    /// Who this replica is (recorded in the lock, for people).
    pub identity: String,
    /// Lease time to live: how long a dead leader goes unnoticed (default 15 s).
    pub lease_ttl: Duration,
    /// How often a standby checks the lock (default 2 s).
    pub retry_period: Duration,
}

impl LeaderElectionConfig {
    /// An election for lock `namespace/name`, as `identity`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaderElectionConfig {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_ttl: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        }
    }

    /// The lock object's key.
    pub fn lock_key(&self) -> ObjectKey {
        ObjectKey::new(LOCK_KIND, &self.namespace, &self.name)
    }
}

/// Campaigns until `shutdown` turns true, publishing this replica's [`Leadership`]. On shutdown
/// a leader revokes its lease, so a standby takes over at once instead of after the TTL.
pub async fn campaign(
    store: Arc<dyn Store>,
    config: LeaderElectionConfig,
    leadership: watch::Sender<Leadership>,
    mut shutdown: watch::Receiver<bool>,
) {
    let key = config.lock_key();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let attempt = async {
            let lease = store.grant_lease(config.lease_ttl).await?;
            let mut meta = ObjectMeta::namespaced(&config.namespace, &config.name);
            meta.lease = Some(lease.id);
            let lock = DynamicObject::new(LOCK_KIND, meta)
                .with_spec(RawJson::from_value(&serde_json::json!({ "holderIdentity": config.identity })));
            match store.create(lock, &WriteOptions::default()).await {
                Ok(lock) => Ok(Some((lease.id, lock.metadata.resource_version))),
                Err(e) => {
                    let _ = store.revoke_lease(lease.id).await;
                    if matches!(e, crate::Error::AlreadyExists(_)) { Ok(None) } else { Err(e) }
                }
            }
        };
        let won = match attempt.await {
            Ok(won) => won,
            Err(e) => {
                tracing::warn!(error = %e, lock = %key, "leader election attempt failed");
                None
            }
        };
        let Some((lease_id, revision)) = won else {
            tokio::select! {
                _ = tokio::time::sleep(config.retry_period) => continue,
                _ = crate::runnable::stopped(&mut shutdown) => return,
            }
        };
        tracing::info!(identity = %config.identity, lock = %key, fencing_token = revision, "became leader");
        leadership.send_replace(Leadership::Leading(Some(Guard { key: key.clone(), resource_version: revision })));
        let renew = (config.lease_ttl / 3).max(Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(renew) => {}
                _ = crate::runnable::stopped(&mut shutdown) => {
                    leadership.send_replace(Leadership::Standby);
                    let _ = store.revoke_lease(lease_id).await;
                    return;
                }
            }
            // A renewal that hangs must not keep us "leading" past the lease: give it until the
            // next renewal is due.
            match tokio::time::timeout(renew, store.keep_alive(lease_id)).await {
                Ok(Ok(_)) => {}
                outcome => {
                    let error = outcome.map_or_else(
                        |_| "renewal timed out".to_string(),
                        |r| r.err().map(|e| e.to_string()).unwrap_or_default(),
                    );
                    tracing::warn!(identity = %config.identity, %error, "lost leadership");
                    leadership.send_replace(Leadership::Standby);
                    let _ = tokio::time::timeout(renew, store.revoke_lease(lease_id)).await;
                    break;
                }
            }
            // Someone removed or replaced the lock: our token is void, so step down.
            let lock = tokio::time::timeout(renew, store.get(&key)).await.unwrap_or_else(|_| {
                Err(crate::Error::Unavailable { message: "reading the lock timed out".into(), source: None })
            });
            match lock {
                Ok(lock) if lock.metadata.resource_version == revision => {}
                other => {
                    tracing::warn!(identity = %config.identity, lock = ?other.map(|l| l.metadata.resource_version), "lock changed hands; stepping down");
                    leadership.send_replace(Leadership::Standby);
                    let _ = store.revoke_lease(lease_id).await;
                    break;
                }
            }
        }
    }
}
