//! Revoked client certificates of users and controllers. Each revoked serial is a
//! `CertificateRevocation` object in the store (cluster-scoped, named by the serial): the server
//! replica that records it refuses the certificate from its next request on, every other one as
//! soon as its watch sees the record (milliseconds), and each ends the watches opened with it. A node's certificates are revoked by node instead ([`pki::revoke_node`]), since a
//! node renews its own.
//!
//! A revocation is kept until the certificate expires (a certificate past its expiry is refused
//! anyway), then dropped by the next revocation; one made by serial alone, without the
//! expiry, is kept until deleted.

use orch_core::{
    DynamicObject, Error, ListRequest, ObjectKey, ObjectMeta, RawJson, Selection, Store, Timestamp, WriteOptions,
};
use serde::{Deserialize, Serialize};

use super::CertificateIdentity;
use super::pki;

/// The kind of the store objects that record revoked client certificates.
pub const CERTIFICATE_REVOCATION_KIND: &str = "CertificateRevocation";

/// The `spec` of a `CertificateRevocation`, named by the serial it revokes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    /// The user the certificate named (its `CN`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// When the certificate expires (milliseconds since the epoch), when known: past it, the
    /// revocation is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<i64>,
}

impl orch_core::Resource for Revocation {
    const KIND: &'static str = CERTIFICATE_REVOCATION_KIND;
    const SCOPE: orch_core::Scope = orch_core::Scope::Cluster;
    type Status = ();
}

/// A serial as the store names it: lowercase hex without separators. Takes the forms tools
/// print (`0A:1B:...`, `0x0a1b...`, any case); fails naming the field and the reason.
pub fn normalize_serial(serial: &str) -> Result<String, Error> {
    let bad = |reason: String| Error::invalid(CERTIFICATE_REVOCATION_KIND, "serial", reason);
    let trimmed = serial.trim();
    let digits = trimmed.strip_prefix("0x").or_else(|| trimmed.strip_prefix("0X")).unwrap_or(trimmed);
    let hex: String = digits.chars().filter(|c| *c != ':').map(|c| c.to_ascii_lowercase()).collect();
    if hex.is_empty() {
        return Err(bad("is empty".into()));
    }
    if let Some(c) = hex.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(bad(format!("{serial:?}: {c:?} is not a hexadecimal digit")));
    }
    // X.509 serials are at most 20 octets.
    if hex.len() > 40 {
        return Err(bad(format!("{serial:?}: longer than 20 octets (40 hexadecimal digits)")));
    }
    // `hex` of the issuer has two digits per octet: a leading zero the tool dropped is put back.
    Ok(if hex.len() % 2 == 1 { format!("0{hex}") } else { hex })
}

fn key(serial: &str) -> ObjectKey {
    ObjectKey::new(CERTIFICATE_REVOCATION_KIND, "", serial)
}

/// Revokes the client certificate with this serial (any form [`normalize_serial`] takes), and
/// drops the revocations of certificates now expired. Answers `false` when it was revoked
/// already. A node's certificate is refused: it is revoked with its node.
pub async fn revoke_certificate(store: &dyn Store, serial: &str, revocation: Revocation) -> Result<bool, Error> {
    let serial = normalize_serial(serial)?;
    if let Some(node) = revocation.user.as_deref().and_then(|u| u.strip_prefix(pki::NODE_USER_PREFIX)) {
        return Err(Error::invalid(
            CERTIFICATE_REVOCATION_KIND,
            "user",
            format!(
                "the certificate of node {node:?}: a node's certificates are revoked with the node (`orch node revoke {node}`)"
            ),
        ));
    }
    let spec = RawJson::encode(&revocation).map_err(|e| e.within(key(&serial), "spec"))?;
    let object = DynamicObject::new(CERTIFICATE_REVOCATION_KIND, ObjectMeta::named(&serial)).with_spec(spec);
    let created = match store.create(object, &WriteOptions::default()).await {
        Ok(_) => true,
        Err(Error::AlreadyExists(_)) => false,
        Err(e) => return Err(e),
    };
    drop_expired(store, orch_core::Clock::now(&orch_core::SystemClock)).await?;
    Ok(created)
}

/// Deletes the revocations of certificates expired at `now`; answers how many.
pub async fn drop_expired(store: &dyn Store, now: Timestamp) -> Result<usize, Error> {
    let listed = store.list(&ListRequest::new(Selection::kind(CERTIFICATE_REVOCATION_KIND))).await?;
    let mut dropped = 0;
    for object in listed.items {
        let expired =
            object.spec.decode::<Revocation>().ok().and_then(|r| r.not_after).is_some_and(|at| at <= now.as_millis());
        if expired {
            match store.delete(&object.key(), &Default::default()).await {
                Ok(_) => dropped += 1,
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(dropped)
}

/// The certificates revoked, by serial.
pub async fn revoked_certificates(store: &dyn Store) -> Result<Vec<(String, Revocation)>, Error> {
    let listed = store.list(&ListRequest::new(Selection::kind(CERTIFICATE_REVOCATION_KIND))).await?;
    listed
        .items
        .into_iter()
        .map(|o| {
            let r = o.spec.decode::<Revocation>().map_err(|e| e.within(o.key(), "spec"))?;
            Ok((o.metadata.name.clone(), r))
        })
        .collect()
}

/// Whether the client certificate is revoked: a node's by its node's record, any other's by
/// its serial. Says why when it is.
pub async fn revoked_because(store: &dyn Store, id: &CertificateIdentity) -> Result<Option<String>, Error> {
    if let Some(node) = id.node() {
        let revoked = pki::is_revoked(store, node, &id.serial).await?;
        return Ok(revoked.then(|| format!("the certificate of node {node:?} (serial {}) is revoked", id.serial)));
    }
    match store.get(&key(&id.serial)).await {
        Ok(_) => Ok(Some(format!("the client certificate of {:?} (serial {}) is revoked", id.user.name, id.serial))),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}
