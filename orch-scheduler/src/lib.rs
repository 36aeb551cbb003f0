//! Placement: the [`Scheduler`] trait, the plugin [`Framework`] that implements it with the
//! default plugins, the scheduling [`queue`], a synchronous [`SchedulingCore`] (queue, snapshot,
//! waiting gangs) that benches and simulations drive directly, and the [`SchedulerService`]
//! that runs it against a store inside an [`orch_core::Manager`].
//!
//! Two ways to plug research in:
//! - a [`Plugin`] at one or more extension points (filter, score, permit…) in a
//!   [`Profile`], keeping everything else of the default scheduler;
//! - a whole [`Scheduler`], which sees the [`Snapshot`] read-only and answers with a
//!   [`Decision`] per workload (or a batch of them at once). The core checks every decision
//!   against the snapshot, so a buggy policy can never overcommit a node.
//!
//! Speed comes from exactness, not sampling: workloads with identical scheduling-relevant specs
//! form an equivalence class, node-local plugin results are cached per class, and only nodes
//! that changed since the last cycle are re-evaluated (the snapshot keeps a change log). Every
//! feasible node is considered for every workload.

pub mod core;
mod error;
pub mod framework;
pub mod plugins;
pub mod queue;
pub mod service;
pub mod snapshot;

use std::sync::Arc;
use std::time::Duration;

pub use self::core::{Outcome, OutcomeKind, SchedulingCore};
pub use error::SchedulerError;
pub use framework::{Ctx, Diagnosis, Framework, Permit, Plugin, Points, Profile, State, Unfit};
pub use queue::{Events, SchedulingQueue};
pub use service::{SchedulerConfig, SchedulerService};
pub use snapshot::{NodeId, NodeInfo, Placement, Snapshot, WorkloadInfo};

use orch_core::cache::ObjectRef;
use orch_core::kinds::Workload;
use orch_core::object::Object;
use snapshot::DeviceShare;

/// The [`DEVICES_ANNOTATION`] text for a placement: `id:milli` per device share, by device id
/// (indices change when a node's device list does; ids do not).
pub fn devices_annotation(node: &NodeInfo, shares: &[DeviceShare]) -> String {
    let parts: Vec<String> = shares
        .iter()
        .filter_map(|s| node.devices.get(s.device as usize).map(|d| format!("{}:{}", d.id, s.milli)))
        .collect();
    parts.join(",")
}

/// Reads a bound workload's device shares back from its annotation, when they name devices of
/// `node` that still have room and add up to its `gpu` request.
pub fn parse_devices(node: &NodeInfo, object: &Object<Workload>, gpu: i64) -> Option<Vec<DeviceShare>> {
    let text = object.metadata.annotations.get(DEVICES_ANNOTATION)?;
    let mut free: Vec<i64> = node.devices.iter().map(|d| d.free).collect();
    let mut shares = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (id, milli) = part.rsplit_once(':')?;
        let milli: i64 = milli.parse().ok()?;
        let index = node.devices.iter().position(|d| d.id == id)?;
        if milli <= 0 || free[index] < milli {
            return None;
        }
        free[index] -= milli;
        shares.push(DeviceShare { device: index as u16, milli });
    }
    (shares.iter().map(|s| s.milli).sum::<i64>() == gpu).then_some(shares)
}

/// Name of the default scheduler; workloads with no `schedulerName` go to it.
pub const DEFAULT_SCHEDULER: &str = "default-scheduler";

/// The condition type a scheduler sets on workloads it cannot place.
pub const SCHEDULED_CONDITION: &str = "Scheduled";

/// Annotation recording which devices (GPU ids and shares) a bound workload was given.
pub const DEVICES_ANNOTATION: &str = "scheduling.orch.dev/devices";

/// What a scheduler decided for one workload.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Bind here.
    Place(Placement),
    /// Hold the placement (resources stay reserved) until the rest of its gang is placed, at
    /// most `timeout`.
    Wait {
        /// The reserved placement.
        placement: Placement,
        /// The gang key it waits with.
        group: String,
        /// How long to wait.
        timeout: Duration,
    },
    /// Bind here after evicting `victims` (all of lower priority).
    Preempt {
        /// The placement once the victims are gone.
        placement: Placement,
        /// Workloads to evict from that node.
        victims: Vec<ObjectRef>,
    },
    /// Fits nowhere now; the diagnosis says why and which events may change that.
    Unschedulable(Diagnosis),
}

/// A placement policy. It reads the cluster [`Snapshot`] and decides; the [`SchedulingCore`]
/// applies its decisions.
///
/// # To ensure correctness
/// - Decisions are checked by the core before they count: a placement that does not fit the
///   snapshot (resources, devices, ports) is refused and the workload is requeued, so a policy
///   cannot overcommit a node. Preemption victims must have a lower priority than the preemptor.
/// - `schedule` must not assume its own earlier decisions are in the snapshot unless the core
///   applied them; between calls it does.
pub trait Scheduler: Send {
    /// Name used in workloads' `schedulerName`.
    fn name(&self) -> &str;

    /// Queue order: smaller keys are scheduled first. Default: higher priority, then first come.
    fn sort_key(&self, w: &WorkloadInfo) -> (i64, u64) {
        (-(w.priority() as i64), w.seq)
    }

    /// Decides for one workload.
    fn schedule(&mut self, snapshot: &Snapshot, workload: &WorkloadInfo) -> Decision;

    /// Decides for several workloads at once (in queue order), or `None` to be called one at a
    /// time. Decisions are applied in order, each checked against the snapshot as updated by
    /// the ones before it.
    fn schedule_batch(&mut self, snapshot: &Snapshot, batch: &[Arc<WorkloadInfo>]) -> Option<Vec<Decision>> {
        let _ = (snapshot, batch);
        None
    }

    /// A placement this scheduler decided was rolled back (bind failed, gang timed out).
    fn unreserve(&mut self, workload: &WorkloadInfo, placement: &Placement) {
        let _ = (workload, placement);
    }
}

impl Scheduler for Box<dyn Scheduler> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn sort_key(&self, w: &WorkloadInfo) -> (i64, u64) {
        (**self).sort_key(w)
    }
    fn schedule(&mut self, snapshot: &Snapshot, workload: &WorkloadInfo) -> Decision {
        (**self).schedule(snapshot, workload)
    }
    fn schedule_batch(&mut self, snapshot: &Snapshot, batch: &[Arc<WorkloadInfo>]) -> Option<Vec<Decision>> {
        (**self).schedule_batch(snapshot, batch)
    }
    fn unreserve(&mut self, workload: &WorkloadInfo, placement: &Placement) {
        (**self).unreserve(workload, placement)
    }
}
