//! What the workload controllers share: when a workload counts as ready or available, a gate
//! that keeps a controller from acting on a cache that has not yet seen its own last writes,
//! and the event recorder each controller creates on first use.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use orch_core::cache::ObjectRef;
use orch_core::controller::Context;
use orch_core::events::{Recorder, RecorderConfig};
use orch_core::kinds::{ConditionStatus, Phase, Workload, find_condition};
use orch_core::meta::Timestamp;
use orch_core::object::Object;

/// True while the workload runs and passes its readiness probe.
pub(crate) fn is_ready(w: &Object<Workload>) -> bool {
    w.status.phase == Phase::Running
        && find_condition(&w.status.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
}

/// When the workload becomes available (ready for `min_ready`); `None` when it is not ready.
pub(crate) fn available_at(w: &Object<Workload>, min_ready: Duration) -> Option<Timestamp> {
    if !is_ready(w) {
        return None;
    }
    let since = find_condition(&w.status.conditions, "Ready").and_then(|c| c.last_transition_time);
    Some(since.map_or(Timestamp(i64::MIN), |t| t.plus(min_ready)))
}

/// True for a workload that is not being deleted and has not finished.
pub(crate) fn is_active(w: &Object<Workload>) -> bool {
    !w.metadata.is_being_deleted() && !matches!(w.status.phase, Phase::Succeeded | Phase::Failed)
}

/// Remembers, per object, the store revision of the last write a reconcile of it made, so the
/// next reconcile waits until the cache it reads has caught up (otherwise it would count the
/// workloads it just created as missing and create them again).
#[derive(Debug, Default)]
pub(crate) struct WriteGate {
    needs: Mutex<HashMap<ObjectRef, u64>>,
}

impl WriteGate {
    /// Notes a write at `revision` made for `key`.
    pub(crate) fn wrote(&self, key: &ObjectRef, revision: u64) {
        let mut needs = self.needs.lock().unwrap_or_else(|e| e.into_inner());
        let e = needs.entry(key.clone()).or_insert(0);
        *e = (*e).max(revision);
    }

    /// True when a cache at `cache_revision` has seen every write made for `key`.
    pub(crate) fn caught_up(&self, key: &ObjectRef, cache_revision: u64) -> bool {
        let mut needs = self.needs.lock().unwrap_or_else(|e| e.into_inner());
        match needs.get(key) {
            Some(&r) if r > cache_revision => false,
            Some(_) => {
                needs.remove(key);
                true
            }
            None => true,
        }
    }

    /// Forgets `key` (it was deleted).
    pub(crate) fn forget(&self, key: &ObjectRef) {
        self.needs.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

/// A recorder made on first use, from the reconcile's store and clock.
#[derive(Debug, Default)]
pub(crate) struct LazyRecorder {
    source: &'static str,
    recorder: OnceLock<Recorder>,
}

impl LazyRecorder {
    pub(crate) fn new(source: &'static str) -> Self {
        LazyRecorder { source, recorder: OnceLock::new() }
    }

    pub(crate) fn get(&self, ctx: &Context) -> &Recorder {
        self.recorder.get_or_init(|| {
            Recorder::with_clock(ctx.store().clone(), self.source, RecorderConfig::default(), ctx.clock().clone())
        })
    }
}

/// A random suffix of `n` lowercase letters and digits for a generated name.
pub(crate) fn random_suffix(n: usize) -> String {
    let mut s = orch_core::hash::short_name(uuid::Uuid::new_v4().as_u128() as u64);
    s.truncate(n);
    s
}

/// `name` cut to at most `max` characters, without a trailing `-` or `.`, as a prefix of a
/// generated DNS-1123 name.
pub(crate) fn name_prefix(name: &str, max: usize) -> String {
    let mut p: String = name.chars().take(max).collect();
    while p.ends_with(['-', '.']) {
        p.pop();
    }
    p
}
