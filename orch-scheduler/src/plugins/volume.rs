//! Volume binding: a workload goes where its data is.
//!
//! A workload's `claim` volumes decide where it may run:
//! - a claim bound to a node-local volume pins the workload to the volume's node; when that node
//!   is gone, cordoned or tainted against the workload, the workload waits and says so ("volume
//!   claim web-data lives on node-2 (not ready)");
//! - a claim not bound yet whose volume was already provided (for a first consumer that went
//!   before the claim read `Bound`) pins the workload to that volume's node;
//! - a claim not bound yet whose claim is already used by a placed workload (bound or assumed)
//!   pins the workload to that workload's node, so a single-node volume is never used from two
//!   nodes, even before its volume exists;
//! - any other pending claim needs a node whose agent provides the claim's class
//!   (`status.storage`) with the access mode and room left for it: the room is the class's
//!   capacity on the node less the volumes of that class already there and the pending claims
//!   placed workloads there already hold (wait for the first consumer, as Kubernetes' local
//!   volumes do). The volume binder then provides the volume on the node the workload was bound
//!   to.
//!
//! A missing claim, a claim being deleted and a claim whose volume is lost keep the workload
//! waiting with the reason.

use std::collections::HashMap;

use crate::framework::{Ctx, Locality, Plugin, Points, Prepare, Unfit};
use crate::queue::Events;
use crate::snapshot::{NodeId, NodeInfo, Snapshot, WorkloadInfo};
use orch_core::cache::{Cache, ObjectRef};
use orch_core::kinds::{
    AccessMode, ClaimPhase, PersistentVolume, TaintEffect, VolumeClaim, VolumePhase, volume_name_for_claim,
};
use orch_core::quantity::Quantity;

const NANOS_PER_BYTE: i128 = 1_000_000_000;

fn bytes(q: &Quantity) -> i128 {
    q.nanos() / NANOS_PER_BYTE
}

/// Places workloads where their volume claims' data is, or where a pending claim fits.
///
/// It reads claims and volumes from shared caches; add it to a profile with
/// `.with(VolumeBinding::new(claims, volumes), 0)` and let the scheduler wake waiting workloads
/// when they change (`SchedulerService::wake_on`).
#[derive(Clone)]
pub struct VolumeBinding {
    claims: Cache<VolumeClaim>,
    volumes: Cache<PersistentVolume>,
}

impl std::fmt::Debug for VolumeBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeBinding")
            .field("claims", &self.claims.len())
            .field("volumes", &self.volumes.len())
            .finish()
    }
}

/// A pending claim the workload needs room for.
#[derive(Debug)]
struct Need {
    claim: String,
    class: String,
    mode: AccessMode,
    size: i128,
}

/// What pre-filter found.
#[derive(Debug, Default)]
struct Plan {
    /// The one node the workload may use, and why (`volume claim "db" lives on node n1`).
    pinned: Option<(NodeId, String)>,
    /// Pending claims to make room for.
    needs: Vec<Need>,
    /// Room taken per (node, class): volumes there, and pending claims placed workloads hold.
    used: HashMap<(NodeId, String), i128>,
}

impl VolumeBinding {
    /// Reads claims and volumes from these caches.
    pub fn new(claims: Cache<VolumeClaim>, volumes: Cache<PersistentVolume>) -> Self {
        VolumeBinding { claims, volumes }
    }

    /// Why `node` cannot take the workload now, if it cannot: gone, cordoned, or tainted against it.
    fn node_trouble(snapshot: &Snapshot, w: &WorkloadInfo, node: &str) -> Option<&'static str> {
        let Some(info) = snapshot.node_id(node).and_then(|id| snapshot.node(id)) else { return Some("gone") };
        if info.unschedulable {
            return Some("cordoned");
        }
        let tolerations = &w.spec().tolerations;
        let blocked = info.taints.iter().find(|t| {
            matches!(t.effect, TaintEffect::NoSchedule | TaintEffect::NoExecute)
                && !tolerations.iter().any(|tol| tol.tolerates(t))
        })?;
        Some(if blocked.key.contains("unreachable") || blocked.key.contains("not-ready") {
            "not ready"
        } else {
            "tainted"
        })
    }

    fn plan(&self, snapshot: &Snapshot, w: &WorkloadInfo) -> Result<Plan, Unfit> {
        let mut plan = Plan::default();
        let pin = |plan: &mut Plan, id: NodeId, why: String| -> Result<(), Unfit> {
            match &plan.pinned {
                Some((other, first)) if *other != id => {
                    Err(Unfit::new(format!("{first}, but {why}: no node has both")))
                }
                Some(_) => Ok(()),
                None => {
                    plan.pinned = Some((id, why));
                    Ok(())
                }
            }
        };
        for name in &w.claims {
            let key = ObjectRef::new(w.namespace(), name.as_str());
            let Some(claim) = self.claims.get(&key) else {
                return Err(Unfit::new(format!("volume claim {name:?} not found")));
            };
            if claim.metadata.deletion_timestamp.is_some() {
                return Err(Unfit::new(format!("volume claim {name:?} is being deleted")));
            }
            match claim.status.phase {
                ClaimPhase::Lost => {
                    return Err(Unfit::new(format!("volume claim {name:?} lost its volume")));
                }
                ClaimPhase::Bound => {
                    let pv_name = claim.status.volume_name.clone().unwrap_or_default();
                    let Some(pv) = self.volumes.get(&ObjectRef::new("", pv_name.as_str())) else {
                        return Err(Unfit::new(format!(
                            "volume claim {name:?} is bound to volume {pv_name:?}, not found"
                        )));
                    };
                    let Some(node) = &pv.spec.node_name else { continue };
                    if let Some(trouble) = Self::node_trouble(snapshot, w, node) {
                        return Err(Unfit::new(format!("volume claim {name:?} lives on node {node} ({trouble})")));
                    }
                    let id = snapshot.node_id(node).expect("node_trouble checked it exists");
                    pin(&mut plan, id, format!("volume claim {name:?} lives on node {node}"))?;
                }
                ClaimPhase::Pending => {
                    // Its volume may exist already (provided for a first consumer that went
                    // before the claim read Bound): its data decides.
                    let provided = self
                        .volumes
                        .get(&ObjectRef::new("", volume_name_for_claim(&claim.metadata.uid)))
                        .and_then(|pv| pv.spec.node_name.clone());
                    if let Some(node) = provided {
                        if let Some(trouble) = Self::node_trouble(snapshot, w, &node) {
                            return Err(Unfit::new(format!("volume claim {name:?} lives on node {node} ({trouble})")));
                        }
                        let id = snapshot.node_id(&node).expect("node_trouble checked it exists");
                        pin(&mut plan, id, format!("volume claim {name:?} lives on node {node}"))?;
                    } else if let Some(&(id, _)) = snapshot.claim_users(&key).first() {
                        let node = snapshot.node(id).map(|n| n.name.to_string()).unwrap_or_default();
                        if let Some(trouble) = Self::node_trouble(snapshot, w, &node) {
                            return Err(Unfit::new(format!(
                                "volume claim {name:?} is in use on node {node} ({trouble})"
                            )));
                        }
                        pin(&mut plan, id, format!("volume claim {name:?} is in use on node {node}"))?;
                    } else {
                        plan.needs.push(Need {
                            claim: name.clone(),
                            class: claim.spec.volume_class.clone(),
                            mode: claim.spec.access_mode,
                            size: bytes(&claim.spec.size),
                        });
                    }
                }
            }
        }
        if plan.needs.is_empty() {
            return Ok(plan);
        }
        // Room already taken: provided volumes on each node, then pending claims of placed
        // workloads (their volumes are about to be provided there).
        for pv in self.volumes.list() {
            let Some(id) = pv.spec.node_name.as_deref().and_then(|n| snapshot.node_id(n)) else { continue };
            if pv.status.phase == VolumePhase::Failed && pv.metadata.deletion_timestamp.is_some() {
                continue;
            }
            *plan.used.entry((id, pv.spec.volume_class.clone())).or_default() += bytes(&pv.spec.capacity);
        }
        for (key, users) in snapshot.claims_in_use() {
            let Some(claim) = self.claims.get(key) else { continue };
            if claim.status.phase != ClaimPhase::Pending {
                continue;
            }
            if let Some(&(id, _)) = users.first() {
                *plan.used.entry((id, claim.spec.volume_class.clone())).or_default() += bytes(&claim.spec.size);
            }
        }
        Ok(plan)
    }
}

impl Plugin for VolumeBinding {
    fn name(&self) -> &str {
        "VolumeBinding"
    }

    fn points(&self) -> Points {
        Points::FILTER
    }

    fn locality(&self) -> Locality {
        // Claims, volumes and other nodes' workloads decide: never cached per class.
        Locality::Cluster
    }

    fn wake_on(&self) -> Events {
        Events::STORAGE | Events::NODE_ADDED | Events::NODE_UPDATED | Events::WORKLOAD_DELETED
    }

    fn pre_filter(&self, snapshot: &Snapshot, w: &WorkloadInfo) -> Result<Prepare, Unfit> {
        if w.claims.is_empty() {
            return Ok(Prepare::Skip);
        }
        let plan = self.plan(snapshot, w)?;
        if plan.pinned.is_none() && plan.needs.is_empty() {
            return Ok(Prepare::Skip);
        }
        Ok(Prepare::Run(Some(Box::new(plan))))
    }

    fn filter(&self, cx: &Ctx<'_>, node: &NodeInfo) -> Result<(), Unfit> {
        let Some(plan) = cx.state::<Plan>() else { return Ok(()) };
        if let Some((id, why)) = &plan.pinned
            && *id != node.id
        {
            return Err(Unfit::new(why.clone()));
        }
        let mut wanted: HashMap<&str, i128> = HashMap::new();
        for need in &plan.needs {
            let Some(offer) = node.storage.iter().find(|s| s.volume_class == need.class) else {
                return Err(Unfit::new(format!("no volume class {:?}", need.class)));
            };
            if !offer.access_modes.contains(&need.mode) {
                return Err(Unfit::new(format!("volume class {:?} does not offer {}", need.class, need.mode)));
            }
            let want = wanted.entry(need.class.as_str()).or_default();
            *want += need.size;
            let used = plan.used.get(&(node.id, need.class.clone())).copied().unwrap_or(0);
            if used + *want > bytes(&offer.capacity) {
                return Err(Unfit::new(format!(
                    "not enough {:?} storage for volume claim {:?}",
                    need.class, need.claim
                )));
            }
        }
        Ok(())
    }
}
