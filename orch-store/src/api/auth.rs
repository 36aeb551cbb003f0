//! Who a client is ([`Tokens`]: bearer tokens, stored hashed), what it may do ([`Authorizer`]:
//! rules, default deny, built-in admin and read-only roles), and the audit log of every decision.
//!
//! The server checks both only when it is given them (`ApiServerBuilder::authentication` and
//! `authorization`): without, every client is anonymous and allowed. A client may also
//! authenticate with a certificate of the cluster CA (see [`pki`](super::pki)); nodes get theirs
//! by presenting a short-lived [`JoinTokens`] token once. Serve over TLS: over plain HTTP a
//! token travels in clear.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use orch_core::Error;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::admission::UserInfo;

/// The group of the built-in admin role: every verb on everything.
pub const ADMINS: &str = "system:admins";
/// The group of the built-in read-only role: `get`, `list` and `watch` on everything.
pub const READERS: &str = "system:readers";

pub(super) fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bearer tokens, kept as their SHA-256 hashes: a leaked token file grants nothing.
///
/// The file form is one token per line, `sha256-hex user group,group…` (`#` starts a comment).
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_hash: HashMap<[u8; 32], UserInfo>,
}

impl Tokens {
    /// No tokens.
    pub fn new() -> Self {
        Tokens::default()
    }

    /// Reads the file form; an error names the line and what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut tokens = Tokens::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(h), Some(user)) = (parts.next(), parts.next()) else {
                return Err(Error::invalid("Tokens", format!("line {}", i + 1), "expected `sha256-hex user [groups]`"));
            };
            let Some(digest) = parse_hash(h) else {
                return Err(Error::invalid("Tokens", format!("line {}", i + 1), "the hash must be 64 hex digits"));
            };
            let groups = parts.next().map(|g| g.split(',').map(str::to_string).collect()).unwrap_or_default();
            tokens.by_hash.insert(digest, UserInfo { name: user.to_string(), groups });
        }
        Ok(tokens)
    }

    /// Reads a token file (see [`Tokens::parse`]).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Unavailable {
            message: format!("cannot read the token file {}", path.display()),
            source: Some(Box::new(e)),
        })?;
        Tokens::parse(&text)
    }

    /// A new random token for `user` in `groups`: the token itself (give it to the user; it is
    /// not kept) and the line to add to the token file.
    pub fn generate(user: &str, groups: &[&str]) -> (String, String) {
        let token = format!("orch-{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        let line = format!("{} {user} {}", hex(&hash(&token)), groups.join(","));
        (token, line.trim_end().to_string())
    }

    /// Adds a token (builder style, for tests and embedding).
    pub fn with(mut self, token: &str, user: UserInfo) -> Self {
        self.by_hash.insert(hash(token), user);
        self
    }

    /// The user a token belongs to.
    pub fn authenticate(&self, token: &str) -> Option<&UserInfo> {
        self.by_digest(&hash(token))
    }

    /// The user of the token whose SHA-256 is `digest`.
    pub(super) fn by_digest(&self, digest: &[u8; 32]) -> Option<&UserInfo> {
        self.by_hash.get(digest)
    }
}

/// Join tokens: short-lived secrets an agent presents once, to the join endpoint only, to have
/// its node certificate signed. Kept as SHA-256 hashes with their expiry.
///
/// The file form is one token per line, `sha256-hex expiry` (RFC 3339; `#` starts a comment).
#[derive(Debug, Clone, Default)]
pub struct JoinTokens {
    by_hash: HashMap<[u8; 32], orch_core::Timestamp>,
}

impl JoinTokens {
    /// No tokens.
    pub fn new() -> Self {
        JoinTokens::default()
    }

    /// Reads the file form; an error names the line and what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut tokens = JoinTokens::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: &str| Error::invalid("JoinTokens", format!("line {}", i + 1), reason);
            let mut parts = line.split_whitespace();
            let (Some(h), Some(expiry)) = (parts.next(), parts.next()) else {
                return Err(bad("expected `sha256-hex expiry`"));
            };
            let digest = parse_hash(h).ok_or_else(|| bad("the hash must be 64 hex digits"))?;
            let expiry = orch_core::Timestamp::parse_rfc3339(expiry)
                .map_err(|e| bad(&format!("the expiry must be an RFC 3339 time: {e}")))?;
            tokens.by_hash.insert(digest, expiry);
        }
        Ok(tokens)
    }

    /// Reads a join token file; a missing file holds no tokens.
    pub fn load(path: &Path) -> Result<Self, Error> {
        match std::fs::read_to_string(path) {
            Ok(text) => JoinTokens::parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(JoinTokens::new()),
            Err(e) => Err(Error::Unavailable {
                message: format!("cannot read the join token file {}", path.display()),
                source: Some(Box::new(e)),
            }),
        }
    }

    /// A new random join token that expires at `expiry`: the token itself (give it to the
    /// node; it is not kept) and the line to add to the join token file.
    pub fn generate(expiry: orch_core::Timestamp) -> (String, String) {
        let token = format!("orchjoin-{}", uuid::Uuid::new_v4().simple());
        let line = format!("{} {}", hex(&hash(&token)), expiry.to_jiff());
        (token, line)
    }

    /// Adds a token (builder style, for tests and embedding).
    pub fn with(mut self, token: &str, expiry: orch_core::Timestamp) -> Self {
        self.by_hash.insert(hash(token), expiry);
        self
    }

    /// Checks a token at `now`: unknown and expired tokens are refused alike (the answer does
    /// not tell a guesser which).
    pub fn check(&self, token: &str, now: orch_core::Timestamp) -> bool {
        self.by_hash.get(&hash(token)).is_some_and(|expiry| *expiry > now)
    }
}

fn parse_hash(h: &str) -> Option<[u8; 32]> {
    if h.len() != 64 {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..h.len()).step_by(2).map(|j| h.get(j..j + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect();
    <[u8; 32]>::try_from(bytes?.as_slice()).ok()
}

/// One rule: who (users or groups), which verbs, on which kinds, namespaces and names. An empty
/// list, or one holding `*`, matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// `user:NAME` or `group:NAME`.
    pub subjects: Vec<String>,
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`.
    pub verbs: Vec<String>,
    /// Kinds (`Workload`); orch's own calls are `Revision`, `Lease`, `Compaction`.
    pub kinds: Vec<String>,
    /// Namespaces (`""` for cluster-scoped objects).
    pub namespaces: Vec<String>,
    /// Object names.
    pub names: Vec<String>,
    /// Kinds the rule does not cover even where `kinds` does (the read-only role leaves out
    /// `BearerToken`, as Kubernetes' `view` role leaves out secrets).
    pub except_kinds: Vec<String>,
}

fn any(list: &[String], value: &str) -> bool {
    list.is_empty() || list.iter().any(|v| v == "*" || v == value)
}

impl Rule {
    /// Everything, for members of `group`.
    pub fn admin(group: &str) -> Self {
        Rule { subjects: vec![format!("group:{group}")], ..Rule::default() }
    }

    /// `get`, `list` and `watch` on everything but bearer tokens, for members of `group`.
    pub fn read_only(group: &str) -> Self {
        Rule {
            subjects: vec![format!("group:{group}")],
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            except_kinds: vec![super::bearer::BEARER_TOKEN_KIND.into()],
            ..Rule::default()
        }
    }

    fn applies_to(&self, user: &UserInfo) -> bool {
        self.subjects.iter().any(|s| {
            s == "*"
                || s.strip_prefix("user:").is_some_and(|u| u == user.name)
                || s.strip_prefix("group:").is_some_and(|g| user.groups.iter().any(|ug| ug == g))
        })
    }

    /// True when the rule allows `user` to do `verb` on the object.
    pub fn allows(&self, user: &UserInfo, req: &Access<'_>) -> bool {
        self.applies_to(user)
            && any(&self.verbs, req.verb)
            && any(&self.kinds, req.kind)
            && !self.except_kinds.iter().any(|k| k == req.kind)
            && any(&self.namespaces, req.namespace)
            // A rule for named objects does not cover a whole collection.
            && any(&self.names, req.name)
    }
}

/// What a request does, as rules see it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Access<'a> {
    /// The verb.
    pub verb: &'a str,
    /// The kind.
    pub kind: &'a str,
    /// The namespace (empty for cluster-scoped objects and all-namespace lists).
    pub namespace: &'a str,
    /// The object's name (empty for collections).
    pub name: &'a str,
}

/// Rules; whatever no rule allows is denied.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    rules: Vec<Rule>,
}

impl Authorizer {
    /// The built-in roles: [`ADMINS`] may do everything, [`READERS`] may read everything.
    pub fn with_builtin_roles() -> Self {
        Authorizer { rules: vec![Rule::admin(ADMINS), Rule::read_only(READERS)] }
    }

    /// Adds a rule (builder style).
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// True when some rule allows it.
    pub fn allows(&self, user: &UserInfo, req: &Access<'_>) -> bool {
        self.rules.iter().any(|r| r.allows(user, req))
    }
}

/// One line of the audit log.
#[derive(Debug, Serialize)]
pub(crate) struct AuditRecord<'a> {
    pub(crate) time: orch_core::Timestamp,
    pub(crate) user: &'a str,
    pub(crate) groups: &'a [String],
    #[serde(flatten)]
    pub(crate) access: Access<'a>,
    pub(crate) allowed: bool,
}

/// Where audit records go: JSON lines, one per request that reached authorization.
pub struct AuditLog {
    out: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

impl AuditLog {
    /// Appends to a file.
    pub fn file(path: &Path) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog::writer(f))
    }

    /// Writes to any writer (tests).
    pub fn writer(w: impl Write + Send + 'static) -> Self {
        AuditLog { out: Mutex::new(Box::new(w)) }
    }

    pub(crate) fn record(&self, rec: &AuditRecord<'_>) {
        let mut line = serde_json::to_vec(rec).expect("audit records serialize");
        line.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = out.write_all(&line).and_then(|_| out.flush()) {
            tracing::warn!(error = %e, "cannot write the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_core::{Clock, SystemClock, Timestamp};

    #[test]
    fn join_token_files_hold_hashes_with_their_expiry() {
        let now = SystemClock.now();
        let (token, line) = JoinTokens::generate(now.plus(std::time::Duration::from_secs(3600)));
        assert!(!line.contains(&token), "the file holds the hash, not the token");
        let tokens = JoinTokens::parse(&format!("# a comment\n\n{line}\n")).unwrap();
        assert!(tokens.check(&token, now));
        assert!(!tokens.check(&token, now.plus(std::time::Duration::from_secs(3601))), "expired");
        assert!(!tokens.check("orchjoin-guess", now));
        let old = JoinTokens::new().with("t", Timestamp(now.as_millis() - 1));
        assert!(!old.check("t", now));
        let e = JoinTokens::parse(&format!("{line}\nabc 2026-01-01T00:00:00Z\n")).unwrap_err();
        assert!(e.to_string().contains("line 2") && e.to_string().contains("64 hex digits"), "{e}");
        let hash = line.split_whitespace().next().unwrap();
        let e = JoinTokens::parse(&format!("{hash} tomorrow")).unwrap_err();
        assert!(e.to_string().contains("RFC 3339"), "{e}");
        let e = JoinTokens::parse(hash).unwrap_err();
        assert!(e.to_string().contains("expected"), "{e}");
    }
}
