//! Gang scheduling: members of a scheduling group are bound all together or not at all.

use std::time::Duration;

use crate::framework::{Locality, Permit, Plugin, Points, Prepare, Unfit};
use crate::queue::Events;
use crate::snapshot::{Placement, Snapshot, WorkloadInfo};

/// All-or-nothing placement of a [`SchedulingGroup`](orch_core::kinds::SchedulingGroup).
///
/// Pre-filter turns a member away while fewer than `minMembers` of its gang exist (pending or
/// placed), so a gang that cannot complete holds no resources. Permit holds each placed member
/// (its resources reserved) until `minMembers` are placed, then releases them all to bind at
/// once; if the gang does not complete within its timeout, or one member fits nowhere, the
/// scheduling core rolls every held member back.
#[derive(Debug, Clone)]
pub struct Gang {
    default_timeout: Duration,
}

impl Default for Gang {
    fn default() -> Self {
        Gang { default_timeout: Duration::from_secs(60) }
    }
}

impl Gang {
    /// Waits at most `timeout` for gangs that do not set their own.
    pub fn with_default_timeout(timeout: Duration) -> Self {
        Gang { default_timeout: timeout }
    }
}

impl Plugin for Gang {
    fn name(&self) -> &str {
        "Gang"
    }
    fn points(&self) -> Points {
        Points::FILTER | Points::PERMIT
    }
    fn locality(&self) -> Locality {
        // Its pre-filter depends on the queue, not on nodes: never cache it per class.
        Locality::Cluster
    }
    fn wake_on(&self) -> Events {
        Events::WORKLOAD_PENDING | Events::WORKLOAD_DELETED | Events::NODE_ADDED
    }
    fn pre_filter(&self, snapshot: &Snapshot, w: &WorkloadInfo) -> Result<Prepare, Unfit> {
        let (Some(g), Some(key)) = (&w.spec().scheduling_group, w.group_key()) else { return Ok(Prepare::Skip) };
        let known = snapshot.group_pending(&key) + snapshot.group_placed(&key);
        if known < g.min_members {
            return Err(Unfit::new(format!("gang {key} has {known} of {} members", g.min_members)));
        }
        // Nothing to filter per node: the gang is judged at permit.
        Ok(Prepare::Skip)
    }
    fn permit(&self, snapshot: &Snapshot, w: &WorkloadInfo, _: &Placement) -> Permit {
        let (Some(g), Some(key)) = (&w.spec().scheduling_group, w.group_key()) else { return Permit::Allow };
        // Placed members (held or bound), plus this one.
        if snapshot.group_placed(&key) + 1 >= g.min_members {
            Permit::AllowGroup(key)
        } else {
            let timeout = g.timeout_seconds.map_or(self.default_timeout, Duration::from_secs);
            Permit::Wait { group: key, timeout }
        }
    }
}
