//! The finalizer helper: cleanup that is guaranteed to run before an object disappears.
//!
//! Wrap a reconcile in [`finalizer`]: on a live object it makes sure the finalizer is present
//! (so a delete can only mark the object) and then runs your apply step; on an object marked for
//! deletion it runs your cleanup step and, once that succeeds, removes the finalizer so the
//! store can delete the object.

use std::future::Future;
use std::sync::Arc;

use super::Action;
use crate::api::Api;
use crate::object::{Object, Resource};

/// Which step to run.
#[derive(Debug, Clone)]
pub enum FinalizerEvent<K: Resource> {
    /// The object is live and carries the finalizer: converge it.
    Apply(Arc<Object<K>>),
    /// The object is being deleted: release what it holds.
    Cleanup(Arc<Object<K>>),
}

/// Why a finalizer-wrapped reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum FinalizerError<E: std::error::Error + 'static> {
    /// Adding the finalizer failed (often a conflict: the next reconcile retries).
    #[error("adding finalizer {finalizer:?}: {source}")]
    Add {
        /// The finalizer.
        finalizer: String,
        /// The store's error.
        #[source]
        source: crate::Error,
    },
    /// Removing the finalizer after cleanup failed; cleanup will run again, so it must be
    /// idempotent.
    #[error("removing finalizer {finalizer:?}: {source}")]
    Remove {
        /// The finalizer.
        finalizer: String,
        /// The store's error.
        #[source]
        source: crate::Error,
    },
    /// The apply step failed.
    #[error("apply failed: {0}")]
    Apply(#[source] E),
    /// The cleanup step failed; the finalizer stays and cleanup is retried.
    #[error("cleanup failed: {0}")]
    Cleanup(#[source] E),
}

/// Runs `step` under finalizer `name` (a qualified name such as `example.com/cleanup`).
///
/// The finalizer comes off only when the cleanup step answers [`Action::Done`]; any other
/// answer keeps it and is passed on, so cleanup can take several rounds.
pub async fn finalizer<K, F, Fut, E>(
    api: &Api<K>,
    name: &str,
    obj: Arc<Object<K>>,
    step: F,
) -> Result<Action, FinalizerError<E>>
where
    K: Resource,
    F: FnOnce(FinalizerEvent<K>) -> Fut,
    Fut: Future<Output = Result<Action, E>>,
    E: std::error::Error + 'static,
{
    let has = obj.metadata.finalizers.iter().any(|f| f == name);
    match (obj.metadata.is_being_deleted(), has) {
        (true, true) => {
            let action = step(FinalizerEvent::Cleanup(obj.clone())).await.map_err(FinalizerError::Cleanup)?;
            if action != Action::Done {
                // Cleanup is not finished (it asked to look again): keep the finalizer.
                return Ok(action);
            }
            let mut next = (*obj).clone();
            next.metadata.finalizers.retain(|f| f != name);
            api.replace(&next).await.map_err(|source| FinalizerError::Remove { finalizer: name.into(), source })?;
            Ok(action)
        }
        // Someone else's finalizer holds it; nothing for us to do.
        (true, false) => Ok(Action::Done),
        (false, false) => {
            let mut next = (*obj).clone();
            next.metadata.finalizers.push(name.to_string());
            api.replace(&next).await.map_err(|source| FinalizerError::Add { finalizer: name.into(), source })?;
            // The write is a change: the object comes back with the finalizer in place.
            Ok(Action::Done)
        }
        (false, true) => step(FinalizerEvent::Apply(obj)).await.map_err(FinalizerError::Apply),
    }
}
