//! Bearer tokens kept in the store: made and revoked through the API by an admin
//! (`orch token create --user`, `orch token revoke`), seen by every server replica, no restart
//! needed.
//!
//! Each is a cluster-scoped `BearerToken` object. It holds the SHA-256 of the token, never the
//! token itself, and is named by the first 32 hex digits of that hash (the token's id, which
//! `orch token list` shows and `orch token revoke` takes). A server looks a presented token up
//! by its id in a cache of these objects and compares the whole hash. A token past its expiry is
//! refused, and dropped by the next token made. Deleting the object revokes the token: the server
//! that deletes it refuses it from its next request on, every other replica as soon as its watch
//! sees the deletion (milliseconds), and each ends the watches opened with it.
//!
//! The token file of a server's data directory ([`Tokens`](super::Tokens)) stays the way to give
//! the first admin a token; it is read when the server starts.

use orch_core::validation::Validator;
use orch_core::{
    DynamicObject, Error, ListRequest, ObjectKey, ObjectMeta, RawJson, Resource, Scope, Selection, Store, Timestamp,
    WriteOptions,
};
use serde::{Deserialize, Serialize};

use super::admission::UserInfo;
use super::auth::{hash, hex};

/// The kind of the store objects that hold bearer tokens.
pub const BEARER_TOKEN_KIND: &str = "BearerToken";

/// The `spec` of a `BearerToken`: whose it is, and the hash of the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BearerToken {
    /// The user it authenticates.
    pub user: String,
    /// The user's groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// The SHA-256 of the token, 64 lowercase hex digits.
    pub sha256: String,
    /// When it stops being accepted, if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Timestamp>,
}

impl Resource for BearerToken {
    const KIND: &'static str = BEARER_TOKEN_KIND;
    const SCOPE: Scope = Scope::Cluster;
    type Status = ();

    fn validate(&self, v: &mut Validator) {
        v.check_with(|| "spec.user".into(), check_user(&self.user));
        for (i, g) in self.groups.iter().enumerate() {
            v.check_with(|| format!("spec.groups[{i}]"), check_user(g));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            v.reject("spec.sha256", "must be 64 lowercase hex digits");
        }
    }

    fn validate_with_metadata(&self, meta: &ObjectMeta, v: &mut Validator) {
        if self.sha256.len() == 64 && meta.name != self.sha256[..32] {
            v.reject("metadata.name", "must be the first 32 hex digits of spec.sha256 (the token's id)");
        }
    }
}

fn check_user(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 253 {
        return Err("must be at most 253 characters".into());
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',') {
        return Err(format!("{name:?}: must not hold spaces, control characters or commas"));
    }
    Ok(())
}

/// A token's id: the first 32 hex digits of its SHA-256, the name of its object.
pub fn token_id(token: &str) -> String {
    hex(&hash(token))[..32].to_string()
}

fn key(id: &str) -> ObjectKey {
    ObjectKey::new(BEARER_TOKEN_KIND, "", id)
}

/// A token just made: the token itself (shown once, kept nowhere) and its id.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// The secret to give the user.
    pub token: String,
    /// Its id (for `orch token revoke`).
    pub id: String,
}

/// Makes a token for `user` in `groups`, good until `expires` (or for good), and drops the
/// tokens expired at `now`. Errors name the bad field.
pub async fn create_token(
    store: &dyn Store,
    user: &str,
    groups: &[String],
    expires: Option<Timestamp>,
    now: Timestamp,
) -> Result<NewToken, Error> {
    let token = format!("orch-{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let digest = hex(&hash(&token));
    let id = digest[..32].to_string();
    let spec = BearerToken { user: user.into(), groups: groups.to_vec(), sha256: digest, expires };
    let meta = ObjectMeta::named(&id);
    let mut v = Validator::new();
    spec.validate(&mut v);
    spec.validate_with_metadata(&meta, &mut v);
    v.finish().map_err(|source| Error::Invalid { kind: BEARER_TOKEN_KIND.into(), source })?;
    if expires.is_some_and(|at| at <= now) {
        return Err(Error::invalid(BEARER_TOKEN_KIND, "spec.expires", "is not in the future"));
    }
    let body = RawJson::encode(&spec).map_err(|e| e.within(key(&id), "spec"))?;
    store.create(DynamicObject::new(BEARER_TOKEN_KIND, meta).with_spec(body), &WriteOptions::default()).await?;
    // The token is made: tidying up after others does not undo it.
    if let Err(e) = drop_expired(store, now).await {
        tracing::warn!(error = %e, "cannot drop expired bearer tokens");
    }
    Ok(NewToken { token, id })
}

/// Every stored token, by id. An object that is not a token (written by hand) is left out,
/// with a warning naming it; it authenticates nobody, and `revoke_token` deletes it by its id.
pub async fn list_tokens(store: &dyn Store) -> Result<Vec<(String, BearerToken)>, Error> {
    let listed = store.list(&ListRequest::new(Selection::kind(BEARER_TOKEN_KIND))).await?;
    Ok(listed
        .items
        .into_iter()
        .filter_map(|o| match o.spec.decode::<BearerToken>() {
            Ok(t) => Some((o.metadata.name.clone(), t)),
            Err(e) => {
                tracing::warn!(object = %o.key(), error = %e.within(o.key(), "spec"), "not a bearer token; left out");
                None
            }
        })
        .collect())
}

/// Revokes the token with this id (or the token itself): answers `false` when there is none.
pub async fn revoke_token(store: &dyn Store, id_or_token: &str) -> Result<bool, Error> {
    let id = if id_or_token.starts_with("orch-") { token_id(id_or_token) } else { id_or_token.to_string() };
    if id.len() != 32 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(Error::invalid(
            BEARER_TOKEN_KIND,
            "id",
            format!("{id_or_token:?} is neither a token id (32 hex digits) nor a token"),
        ));
    }
    match store.delete(&key(&id), &Default::default()).await {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Revokes every stored token of `user`: answers their ids.
pub async fn revoke_user(store: &dyn Store, user: &str) -> Result<Vec<String>, Error> {
    let mut revoked = Vec::new();
    for (id, t) in list_tokens(store).await? {
        if t.user == user && revoke_token(store, &id).await? {
            revoked.push(id);
        }
    }
    Ok(revoked)
}

/// Deletes the tokens expired at `now`; answers how many.
pub async fn drop_expired(store: &dyn Store, now: Timestamp) -> Result<usize, Error> {
    let mut dropped = 0;
    for (id, t) in list_tokens(store).await? {
        if t.expires.is_some_and(|at| at <= now) && revoke_token(store, &id).await? {
            dropped += 1;
        }
    }
    Ok(dropped)
}

impl BearerToken {
    /// The user this token authenticates at `now`, if the token whose SHA-256 (hex) is
    /// `sha256` is this one and has not expired.
    pub fn user_at(&self, sha256: &str, now: Timestamp) -> Option<UserInfo> {
        (self.sha256 == sha256 && self.expires.is_none_or(|at| at > now))
            .then(|| UserInfo { name: self.user.clone(), groups: self.groups.clone() })
    }
}

/// Refuses a `BearerToken` write that would authenticate someone with more than the writer has:
/// a token for another user, or with a group the writer is not in, takes membership in
/// [`ADMINS`](super::auth::ADMINS). Anyone allowed to write tokens may make their own (as a
/// personal access token). The server checks this on every create, update and patch of a
/// token while it authorizes requests.
pub(crate) fn check_identity(writer: &UserInfo, obj: &DynamicObject) -> Result<(), Error> {
    if writer.groups.iter().any(|g| g == super::auth::ADMINS) {
        return Ok(());
    }
    let token: BearerToken = obj.spec.decode().map_err(|e| e.within(obj.key(), "spec"))?;
    if token.user != writer.name {
        return Err(Error::invalid(
            BEARER_TOKEN_KIND,
            "spec.user",
            format!(
                "{:?}: only members of {} may make tokens for other users ({:?} may make its own)",
                token.user,
                super::auth::ADMINS,
                writer.name
            ),
        ));
    }
    if let Some((i, g)) = token.groups.iter().enumerate().find(|(_, g)| !writer.groups.contains(g)) {
        return Err(Error::invalid(
            BEARER_TOKEN_KIND,
            format!("spec.groups[{i}]"),
            format!(
                "{g:?}: {:?} is not in this group, and only members of {} may give it",
                writer.name,
                super::auth::ADMINS
            ),
        ));
    }
    Ok(())
}
