//! The volume binder: provides a volume for each claim once a workload using it is bound to a
//! node, binds the two, and reclaims the volume when the claim goes.
//!
//! Every volume class is node-local and waits for the first consumer: a claim stays `Pending`
//! (condition `Bound=False`, reason `WaitForFirstConsumer`) until the scheduler binds a workload
//! using it, which [`VolumeBinding`](https://docs.rs/orch-scheduler) places only on a node whose
//! agent provides the class with room for it. The binder then creates the volume
//! ([`volume_name_for_claim`]) on that node, with the claim's size, access mode, class and
//! reclaim policy, the [`VOLUME_RECLAIM_FINALIZER`] the node's agent removes once it deleted the
//! data, and the [`VOLUME_PROTECTION_FINALIZER`] the binder removes once the claim is gone (so a
//! bound volume deleted by hand waits for its claim, data and all); then the claim turns `Bound`.
//! The node's agent creates the storage itself when a workload first uses it.
//!
//! Claims carry the [`CLAIM_PROTECTION_FINALIZER`]: a deleted claim stays until no workload uses
//! it; then its volume is deleted (`Delete`) or turns `Released` with its data (`Retain`), and the
//! claim goes. A bound claim whose volume is gone turns `Lost`.
//!
//! A claim no node can ever hold (a class no node provides, an access mode the class does not
//! offer, a size larger than any node's room for the class) says so in its `Bound` condition
//! (`UnknownVolumeClass`, `UnsupportedAccessMode`, `TooLarge`).

use std::sync::Arc;

use orch_core::cache::{CLAIM_INDEX, ObjectRef};
use orch_core::controller::{Action, Context, Controller, ControllerBuilder};
use orch_core::error::Error;
use orch_core::kinds::{
    CLAIM_PROTECTION_FINALIZER, ClaimPhase, ClaimReference, Condition, ConditionStatus, EventType, Node,
    ObjectReference, PersistentVolume, Phase, VOLUME_PROTECTION_FINALIZER, VOLUME_RECLAIM_FINALIZER, VolumeClaim,
    VolumePhase, VolumeSource, Workload, find_condition, set_condition, volume_name_for_claim,
};
use orch_core::meta::ObjectMeta;
use orch_core::object::Object;
use orch_core::store::DeleteOptions;

use crate::workloads::LazyRecorder;

/// The condition type a claim reports its binding in.
pub const BOUND_CONDITION: &str = "Bound";

/// The controller (register it with [`VolumeBinder::builder`]).
#[derive(Debug)]
pub struct VolumeBinder {
    recorder: LazyRecorder,
}

impl VolumeBinder {
    /// The controller wired to its triggers: claims, the workloads that use them, the volumes
    /// bound to them, and nodes (whose storage decides whether a claim can be held at all).
    pub fn builder() -> ControllerBuilder<VolumeBinder> {
        ControllerBuilder::new("volume-binder", VolumeBinder { recorder: LazyRecorder::new("volume-binder") })
            .watches::<Workload>(|w| {
                w.spec
                    .volumes
                    .iter()
                    .filter_map(|v| match &v.source {
                        VolumeSource::Claim { claim_name } => {
                            Some(ObjectRef::new(w.metadata.namespace.clone(), claim_name.clone()))
                        }
                        _ => None,
                    })
                    .collect()
            })
            .watches::<PersistentVolume>(|pv| {
                pv.spec.claim_ref.iter().map(|c| ObjectRef::new(c.namespace.clone(), c.name.clone())).collect()
            })
            .reads::<Node>()
            // A node that starts providing a class (or more room) changes what a waiting claim
            // says; nodes are not mapped to claims, so claims are looked at again now and then.
            .resync(std::time::Duration::from_secs(30))
    }
}

/// Whether `w` still holds its volumes (not finished; its instance may still run).
fn holds_volumes(w: &Object<Workload>) -> bool {
    !matches!(w.status.phase, Phase::Succeeded | Phase::Failed) || w.metadata.is_being_deleted()
}

/// Why no node can ever hold `claim` as the cluster is, if none can.
fn never_fits(claim: &VolumeClaim, nodes: &[Arc<Object<Node>>]) -> Option<(&'static str, String)> {
    let of_class: Vec<_> =
        nodes.iter().flat_map(|n| n.status.storage.iter()).filter(|s| s.volume_class == claim.volume_class).collect();
    if of_class.is_empty() {
        return Some(("UnknownVolumeClass", format!("no node provides volume class {:?}", claim.volume_class)));
    }
    let offers: Vec<_> = of_class.into_iter().filter(|s| s.access_modes.contains(&claim.access_mode)).collect();
    if offers.is_empty() {
        return Some((
            "UnsupportedAccessMode",
            format!("volume class {:?} does not offer {} on any node", claim.volume_class, claim.access_mode),
        ));
    }
    let largest = offers.iter().map(|s| s.capacity).max().expect("not empty");
    (largest < claim.size).then(|| {
        (
            "TooLarge",
            format!(
                "{} is more than any node holds for volume class {:?} (the most is {largest})",
                claim.size, claim.volume_class
            ),
        )
    })
}

impl VolumeBinder {
    async fn set_bound_condition(
        &self,
        claim: &Object<VolumeClaim>,
        ctx: &Context,
        status: ConditionStatus,
        reason: &str,
        message: String,
    ) -> Result<(), Error> {
        let same = find_condition(&claim.status.conditions, BOUND_CONDITION)
            .is_some_and(|c| c.status == status && c.reason == reason && c.message == message);
        if same {
            return Ok(());
        }
        let mut status_now = claim.status.clone();
        let mut c = Condition::new(BOUND_CONDITION, status, reason);
        c.message = message;
        set_condition(&mut status_now.conditions, c, ctx.clock().now());
        ctx.api::<VolumeClaim>(&claim.metadata.namespace).write_status(&claim.metadata, &status_now).await?;
        Ok(())
    }

    /// The claim is being deleted: once no workload uses it, deletes or releases its volume and
    /// lets the claim go.
    async fn reclaim(&self, claim: &Object<VolumeClaim>, users: usize, ctx: &Context) -> Result<Action, Error> {
        if !claim.metadata.finalizers.iter().any(|f| f == CLAIM_PROTECTION_FINALIZER) {
            return Ok(Action::Done);
        }
        if users > 0 {
            // A workload leaving triggers the next look.
            return Ok(Action::Done);
        }
        let volumes = ctx.api_all::<PersistentVolume>();
        // The volume provided for it, even when the claim went before it was marked bound.
        let name = claim.status.volume_name.clone().unwrap_or_else(|| volume_name_for_claim(&claim.metadata.uid));
        if let Some(pv) = volumes.get_opt(&name).await?
            && pv.spec.claim_ref.as_ref().is_some_and(|r| r.uid == claim.metadata.uid)
        {
            let name = &name;
            match pv.spec.reclaim_policy {
                orch_core::kinds::ReclaimPolicy::Delete => {
                    if !pv.metadata.is_being_deleted() {
                        match volumes.delete(name, &DeleteOptions::default()).await {
                            Ok(_) => {}
                            Err(e) if e.is_not_found() => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                orch_core::kinds::ReclaimPolicy::Retain => {
                    if pv.status.phase != VolumePhase::Released {
                        let mut status = pv.status.clone();
                        status.phase = VolumePhase::Released;
                        volumes.write_status(&pv.metadata, &status).await?;
                    }
                }
            }
            // Its claim is going: the volume is no longer protected (a `Delete` volume's agent
            // now deletes the data; a `Released` one may be deleted by an operator).
            match volumes
                .retry_on_conflict(name, |v| {
                    v.metadata.finalizers.retain(|f| f != VOLUME_PROTECTION_FINALIZER);
                    Ok(())
                })
                .await
            {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        let api = ctx.api::<VolumeClaim>(&claim.metadata.namespace);
        match api
            .retry_on_conflict(&claim.metadata.name, |c| {
                c.metadata.finalizers.retain(|f| f != CLAIM_PROTECTION_FINALIZER);
                Ok(())
            })
            .await
        {
            Ok(_) => Ok(Action::Done),
            Err(e) if e.is_not_found() => Ok(Action::Done),
            Err(e) => Err(e),
        }
    }

    /// Provides the volume of a pending claim on `node` and binds the claim to it.
    async fn provide(&self, claim: &Object<VolumeClaim>, node: &str, ctx: &Context) -> Result<(), Error> {
        let volumes = ctx.api_all::<PersistentVolume>();
        let name = volume_name_for_claim(&claim.metadata.uid);
        let pv = match volumes.get_opt(&name).await? {
            Some(pv) => pv,
            None => {
                let mut meta = ObjectMeta::named(name.clone());
                meta.finalizers = vec![VOLUME_RECLAIM_FINALIZER.to_string(), VOLUME_PROTECTION_FINALIZER.to_string()];
                let spec = PersistentVolume {
                    capacity: claim.spec.size,
                    access_modes: vec![claim.spec.access_mode],
                    volume_class: claim.spec.volume_class.clone(),
                    reclaim_policy: claim.spec.reclaim_policy,
                    node_name: Some(node.to_string()),
                    claim_ref: Some(ClaimReference {
                        namespace: claim.metadata.namespace.clone(),
                        name: claim.metadata.name.clone(),
                        uid: claim.metadata.uid.clone(),
                    }),
                };
                match volumes.create(&Object::new(meta, spec)).await {
                    Ok(pv) => pv,
                    Err(Error::AlreadyExists(_)) => volumes.get(&name).await?,
                    Err(e) => return Err(e),
                }
            }
        };
        // A volume provided earlier (the claim's first consumer went before the claim was marked
        // bound) stays where its data is, whatever node this consumer is on.
        let node = pv.spec.node_name.as_deref().unwrap_or(node);
        if pv.status.phase != VolumePhase::Bound {
            let mut status = pv.status.clone();
            status.phase = VolumePhase::Bound;
            volumes.write_status(&pv.metadata, &status).await?;
        }
        let mut status = claim.status.clone();
        status.phase = ClaimPhase::Bound;
        status.volume_name = Some(name.clone());
        let mut c = Condition::new(BOUND_CONDITION, ConditionStatus::True, "Provided");
        c.message = format!("volume {name} on node {node}");
        set_condition(&mut status.conditions, c, ctx.clock().now());
        ctx.api::<VolumeClaim>(&claim.metadata.namespace).write_status(&claim.metadata, &status).await?;
        self.recorder.get(ctx).record(
            &ObjectReference::of(claim),
            EventType::Normal,
            "Provided",
            format!("volume {name} of {} on node {node}", claim.spec.size),
        );
        Ok(())
    }
}

#[async_trait::async_trait]
impl Controller for VolumeBinder {
    type Kind = VolumeClaim;
    type Error = Error;

    async fn reconcile(&self, claim: Arc<Object<VolumeClaim>>, ctx: &Context) -> Result<Action, Error> {
        let workloads = ctx.cache::<Workload>().expect("registered by the builder");
        let key = format!("{}/{}", claim.metadata.namespace, claim.metadata.name);
        let users: Vec<Arc<Object<Workload>>> =
            workloads.by_index(CLAIM_INDEX, &key).into_iter().filter(|w| holds_volumes(w)).collect();
        if claim.metadata.is_being_deleted() {
            return self.reclaim(&claim, users.len(), ctx).await;
        }
        if !claim.metadata.finalizers.iter().any(|f| f == CLAIM_PROTECTION_FINALIZER) {
            let api = ctx.api::<VolumeClaim>(&claim.metadata.namespace);
            api.retry_on_conflict(&claim.metadata.name, |c| {
                if !c.metadata.finalizers.iter().any(|f| f == CLAIM_PROTECTION_FINALIZER) {
                    c.metadata.finalizers.push(CLAIM_PROTECTION_FINALIZER.to_string());
                }
                Ok(())
            })
            .await?;
            // The write triggers the next look, with the finalizer in place.
            return Ok(Action::Done);
        }
        match claim.status.phase {
            ClaimPhase::Bound => {
                let name = claim.status.volume_name.clone().unwrap_or_default();
                // A volume being deleted is still there, data and all (its protection holds it
                // while this claim exists): only a volume gone or given to another claim is lost.
                let ours = |pv: &Object<PersistentVolume>| {
                    pv.spec.claim_ref.as_ref().is_some_and(|r| r.uid == claim.metadata.uid)
                };
                let cached = ctx.cache::<PersistentVolume>().and_then(|c| c.get(&ObjectRef::new("", name.as_str())));
                // The cache may lag behind a volume just provided: a miss is checked in the store.
                let ours = match cached {
                    Some(pv) if ours(&pv) => true,
                    _ => ctx.api_all::<PersistentVolume>().get_opt(&name).await?.is_some_and(|pv| ours(&pv)),
                };
                if !ours {
                    let mut status = claim.status.clone();
                    status.phase = ClaimPhase::Lost;
                    let mut c = Condition::new(BOUND_CONDITION, ConditionStatus::False, "VolumeLost");
                    c.message = format!("its volume {name} is gone: the data is lost");
                    set_condition(&mut status.conditions, c, ctx.clock().now());
                    ctx.api::<VolumeClaim>(&claim.metadata.namespace).write_status(&claim.metadata, &status).await?;
                    self.recorder.get(ctx).record(
                        &ObjectReference::of(&*claim),
                        EventType::Warning,
                        "VolumeLost",
                        format!("volume {name} is gone"),
                    );
                }
                Ok(Action::Done)
            }
            ClaimPhase::Lost => Ok(Action::Done),
            ClaimPhase::Pending => {
                // The first consumer the scheduler bound decides where the volume lives.
                let first = users
                    .iter()
                    .filter_map(|w| w.spec.node_name.as_deref().map(|n| (w.metadata.create_revision, n)))
                    .min();
                if let Some((_, node)) = first {
                    self.provide(&claim, node, ctx).await?;
                    return Ok(Action::Done);
                }
                let nodes = ctx.cache::<Node>().expect("registered by the builder").list();
                let (reason, message) = match never_fits(&claim.spec, &nodes) {
                    Some((reason, message)) => (reason, message),
                    None => ("WaitForFirstConsumer", "provided on the node of the first workload using it".to_string()),
                };
                self.set_bound_condition(&claim, ctx, ConditionStatus::False, reason, message).await?;
                Ok(Action::Done)
            }
        }
    }
}
