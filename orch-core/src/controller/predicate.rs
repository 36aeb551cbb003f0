//! Event predicates: which changes of a controller's own kind are worth a reconcile (as
//! controller-runtime's `predicate` package). A controller that writes its kind's status would
//! otherwise be woken by every one of its own writes; with [`generation_changed`] it is woken
//! by what its reconcile reads instead.
//!
//! A predicate sees the object as the controller last saw it (`None` for one it has not seen)
//! and as it is now. Deletions always pass.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use orch_core::controller::{Action, Context, Controller, ControllerBuilder, predicate};
//! # use orch_core::{Object, kinds::Node};
//! # struct Nodes;
//! # #[async_trait::async_trait]
//! # impl Controller for Nodes {
//! #     type Kind = Node;
//! #     type Error = orch_core::Error;
//! #     async fn reconcile(&self, _: Arc<Object<Node>>, _: &Context) -> Result<Action, Self::Error> { Ok(Action::Done) }
//! # }
//! let builder = ControllerBuilder::new("nodes", Nodes)
//!     .predicate(predicate::any([predicate::generation_changed(), predicate::labels_changed()]));
//! ```

use std::sync::Arc;

use crate::object::{Object, Resource};

/// Decides whether a change (from the last state the controller saw, if any, to `new`) is
/// worth a reconcile.
pub type Predicate<K> = Arc<dyn Fn(Option<&Object<K>>, &Object<K>) -> bool + Send + Sync>;

/// Passes an object seen for the first time, a change of its spec (its generation), and the
/// changes a reconciler of its lifecycle must see: the start of its deletion and a change of
/// its finalizers or owners. Drops updates of status alone, and of labels or annotations alone.
pub fn generation_changed<K: Resource>() -> Predicate<K> {
    Arc::new(|old, new| match old {
        None => true,
        Some(old) => {
            old.metadata.generation != new.metadata.generation
                || old.metadata.deletion_timestamp != new.metadata.deletion_timestamp
                || old.metadata.finalizers != new.metadata.finalizers
                || old.metadata.owner_references != new.metadata.owner_references
        }
    })
}

/// Passes an object seen for the first time and a change of its labels.
pub fn labels_changed<K: Resource>() -> Predicate<K> {
    Arc::new(|old, new| old.is_none_or(|old| old.metadata.labels != new.metadata.labels))
}

/// Passes an object seen for the first time and a change of its annotations.
pub fn annotations_changed<K: Resource>() -> Predicate<K> {
    Arc::new(|old, new| old.is_none_or(|old| old.metadata.annotations != new.metadata.annotations))
}

/// Your own rule.
pub fn custom<K: Resource>(f: impl Fn(Option<&Object<K>>, &Object<K>) -> bool + Send + Sync + 'static) -> Predicate<K> {
    Arc::new(f)
}

/// Passes what any of `predicates` passes.
pub fn any<K: Resource>(predicates: impl IntoIterator<Item = Predicate<K>>) -> Predicate<K> {
    let all: Vec<Predicate<K>> = predicates.into_iter().collect();
    Arc::new(move |old, new| all.iter().any(|p| p(old, new)))
}

/// Passes what every one of `predicates` passes.
pub fn all<K: Resource>(predicates: impl IntoIterator<Item = Predicate<K>>) -> Predicate<K> {
    let all: Vec<Predicate<K>> = predicates.into_iter().collect();
    Arc::new(move |old, new| all.iter().all(|p| p(old, new)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::Node;
    use crate::meta::{ObjectMeta, Timestamp};

    fn node() -> Object<Node> {
        let mut n = Object::new(ObjectMeta::named("n1"), Node::default());
        n.metadata.generation = 1;
        n
    }

    #[test]
    fn generation_changed_drops_status_and_label_updates_and_keeps_the_rest() {
        let p = generation_changed::<Node>();
        let old = node();
        assert!(p(None, &old), "first sight");
        let mut status = old.clone();
        status.status.conditions.push(crate::kinds::Condition::new(
            "Ready",
            crate::kinds::ConditionStatus::True,
            "AgentReady",
        ));
        assert!(!p(Some(&old), &status), "status only");
        let mut labelled = old.clone();
        labelled.metadata.labels.insert("zone", "a");
        assert!(!p(Some(&old), &labelled), "labels only");
        let mut spec = old.clone();
        spec.metadata.generation = 2;
        assert!(p(Some(&old), &spec), "spec change");
        let mut deleting = old.clone();
        deleting.metadata.deletion_timestamp = Some(Timestamp(5));
        assert!(p(Some(&old), &deleting), "deletion started");
        let mut finalized = old.clone();
        finalized.metadata.finalizers.push("orch.dev/x".into());
        assert!(p(Some(&old), &finalized), "finalizers changed");
    }

    #[test]
    fn combinators_and_label_annotation_predicates() {
        let old = node();
        let mut labelled = old.clone();
        labelled.metadata.labels.insert("zone", "a");
        let mut annotated = old.clone();
        annotated.metadata.annotations.insert("note", "x");
        let either = any([labels_changed::<Node>(), annotations_changed::<Node>()]);
        assert!(either(Some(&old), &labelled) && either(Some(&old), &annotated));
        assert!(!either(Some(&old), &old));
        let both = all([labels_changed::<Node>(), annotations_changed::<Node>()]);
        assert!(!both(Some(&old), &labelled));
        let named = custom(|_, n: &Object<Node>| n.metadata.name.starts_with('n'));
        assert!(named(Some(&old), &old));
    }
}
