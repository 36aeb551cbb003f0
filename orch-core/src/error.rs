//! The error type of the store and API layer, classified by kind so callers can act on it.

use std::sync::Arc;

use crate::dynamic::{DynamicObject, ObjectKey};
use crate::json::JsonError;
use crate::validation::ValidationError;

/// Result alias for store and API calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in a store or API call.
///
/// Match on the variant to decide what to do: `Conflict` means re-read and retry, `Compacted` means
/// re-list, `Invalid` means the caller's input must change, `Unavailable` may succeed later.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The object does not exist (or no longer exists).
    #[error("{0} not found")]
    NotFound(ObjectKey),

    /// A create named an object that already exists.
    #[error("{0} already exists")]
    AlreadyExists(ObjectKey),

    /// A write expected a resource version that is no longer current.
    ///
    /// `current` is the object as it is now, or `None` when it has been deleted since.
    #[error("conflict on {key}: expected resource version {expected}, found {}",
        .current.as_ref().map_or_else(|| "no object".to_string(), |c| c.metadata.resource_version.to_string()))]
    Conflict {
        /// The object the write was aimed at.
        key: ObjectKey,
        /// The resource version the caller expected.
        expected: u64,
        /// The object as it is now, if it still exists.
        current: Option<Arc<DynamicObject>>,
    },

    /// A write was guarded by another object's resource version (a fencing token) that moved.
    #[error("precondition failed: {key} is no longer at resource version {expected}")]
    PreconditionFailed {
        /// The guarding object.
        key: ObjectKey,
        /// The resource version the guard required.
        expected: u64,
    },

    /// The revision asked for has been compacted away: re-list and watch from the new revision.
    #[error("revision {requested} has been compacted (oldest available is {compacted})")]
    Compacted {
        /// The revision the caller asked for.
        requested: u64,
        /// The oldest revision still available.
        compacted: u64,
    },

    /// The revision asked for is in the future.
    #[error("revision {requested} is ahead of the store's current revision {current}")]
    FutureRevision {
        /// The revision the caller asked for.
        requested: u64,
        /// The store's current revision.
        current: u64,
    },

    /// The input was refused; the error names each offending field and why.
    #[error("invalid {kind}: {source}")]
    Invalid {
        /// Kind of the object (or request) that was refused.
        kind: String,
        /// The field errors.
        #[source]
        source: ValidationError,
    },

    /// The lease does not exist (never granted, revoked, or expired).
    #[error("lease {0} not found")]
    LeaseNotFound(u64),

    /// An object could not be encoded or decoded as its typed form.
    #[error("cannot decode {what}: {}{source}", crate::json::field_prefix(.path))]
    Serialization {
        /// What was being encoded or decoded: for an object of the store, its kind, namespace
        /// and name (`Workload default/web`).
        what: String,
        /// The field that failed, such as `spec.containers[0].resources.requests.cpu`; empty
        /// when unknown or when the document as a whole is at fault.
        path: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },

    /// The backend could not serve the call now (I/O failure, connection lost, shut down).
    #[error("store unavailable: {message}")]
    Unavailable {
        /// What the backend was doing.
        message: String,
        /// The backend's own error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl From<JsonError> for Error {
    fn from(e: JsonError) -> Self {
        Error::Serialization { what: e.what, path: e.path, source: e.source }
    }
}

impl Error {
    /// Builds an `Invalid` error for a single field.
    pub fn invalid(kind: impl Into<String>, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid { kind: kind.into(), source: ValidationError::single(field, reason) }
    }

    /// True for `NotFound`.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound(_))
    }

    /// True for `Conflict`.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }

    /// True for `Compacted`.
    pub fn is_compacted(&self) -> bool {
        matches!(self, Error::Compacted { .. })
    }

    /// True for `Invalid`.
    pub fn is_invalid(&self) -> bool {
        matches!(self, Error::Invalid { .. })
    }

    /// A short, stable name of the variant, for metrics and model checks.
    pub fn code(&self) -> &'static str {
        match self {
            Error::NotFound(_) => "NotFound",
            Error::AlreadyExists(_) => "AlreadyExists",
            Error::Conflict { .. } => "Conflict",
            Error::PreconditionFailed { .. } => "PreconditionFailed",
            Error::Compacted { .. } => "Compacted",
            Error::FutureRevision { .. } => "FutureRevision",
            Error::Invalid { .. } => "Invalid",
            Error::LeaseNotFound(_) => "LeaseNotFound",
            Error::Serialization { .. } => "Serialization",
            Error::Unavailable { .. } => "Unavailable",
        }
    }
}
