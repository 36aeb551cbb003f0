//! The live lease table of the embedded store, as of the last commit.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use orch_core::{LeaseId, LeaseInfo, ObjectKey};
use tokio::time::Instant;

/// Live leases. A lease leaves this table as soon as a batch decides to revoke or expire it
/// (and comes back only if that batch fails to commit).
#[derive(Default)]
pub(super) struct Leases {
    pub(super) live: HashMap<LeaseId, Lease>,
    pub(super) deadlines: BTreeSet<(Instant, LeaseId)>,
}

pub(super) struct Lease {
    pub(super) ttl: Duration,
    pub(super) deadline: Instant,
    /// Objects attached to the lease, as of the last commit.
    pub(super) keys: HashSet<ObjectKey>,
}

impl Leases {
    pub(super) fn insert(&mut self, id: LeaseId, ttl: Duration, deadline: Instant) {
        self.deadlines.insert((deadline, id));
        self.live.insert(id, Lease { ttl, deadline, keys: HashSet::new() });
    }

    pub(super) fn restore(&mut self, id: LeaseId, lease: Lease) {
        self.deadlines.insert((lease.deadline, id));
        self.live.insert(id, lease);
    }

    pub(super) fn take(&mut self, id: LeaseId) -> Option<Lease> {
        let lease = self.live.remove(&id)?;
        self.deadlines.remove(&(lease.deadline, id));
        Some(lease)
    }

    pub(super) fn due(&self, now: Instant) -> Vec<LeaseId> {
        self.deadlines.range(..=(now, LeaseId::MAX)).map(|(_, id)| *id).collect()
    }

    pub(super) fn info(&self, id: LeaseId, now: Instant) -> Option<LeaseInfo> {
        let l = self.live.get(&id)?;
        Some(LeaseInfo { id, ttl: l.ttl, remaining: l.deadline.saturating_duration_since(now) })
    }
}
