//! Admission: what a write must pass before it reaches the store, after authentication.
//!
//! The server runs its [`Admission`] hooks in order on every create, update, status update and
//! patch (on the object as it will be written) and on deletes. The first hook that refuses ends
//! the request with its error (an `Invalid` naming the fields answers `422`).
//! [`BuiltinValidation`] checks orch's own kinds with the same validation the typed
//! [`Api`](orch_core::Api) applies; the store itself checks every object's metadata.

use orch_core::kinds::{
    DaemonSet, Deployment, EndpointSlice, Event, Job, Node, NodeLease, PersistentVolume, ReplicaSet, Service,
    StatefulSet, VolumeClaim, Workflow, Workload,
};
use orch_core::{DynamicObject, Error, Object, ObjectKey, Resource};

use super::bearer::{BEARER_TOKEN_KIND, BearerToken};

/// What a request does to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// A create.
    Create,
    /// An update of metadata and spec (a replace or a patch).
    Update,
    /// An update of the status.
    UpdateStatus,
    /// A delete.
    Delete,
}

/// Who is asking: the name and groups authentication found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserInfo {
    /// The user's name (`system:anonymous` for an unauthenticated client).
    pub name: String,
    /// The groups the user is in.
    pub groups: Vec<String>,
}

impl UserInfo {
    /// The user of a client that presented no credential.
    pub fn anonymous() -> Self {
        UserInfo { name: "system:anonymous".into(), groups: vec!["system:unauthenticated".into()] }
    }
}

/// One request as an admission hook sees it.
#[derive(Debug)]
pub struct AdmissionRequest<'a> {
    /// What the request does.
    pub operation: Operation,
    /// The object it is about.
    pub key: &'a ObjectKey,
    /// Who asks.
    pub user: &'a UserInfo,
    /// True for a dry run: nothing will be written.
    pub dry_run: bool,
}

/// A rule every write must pass: an application's own admission policy.
///
/// # To ensure correctness
/// A hook decides from the request and the object alone, quickly (it runs inside the request),
/// and answers `Invalid` naming each field it refuses, so the client sees a `422` with causes.
/// It may change the object (defaulting) on create and update; changes on delete are ignored.
pub trait Admission: Send + Sync + 'static {
    /// Admits the object (possibly changed) or refuses it.
    fn admit(&self, req: &AdmissionRequest<'_>, obj: &mut DynamicObject) -> Result<(), Error>;
}

/// Checks orch's built-in kinds (`Workload`, `Node`, `NodeLease`, `Deployment`, `ReplicaSet`,
/// `DaemonSet`, `StatefulSet`, `Job`, `Workflow`, `Event`, `Service`, `EndpointSlice`, `VolumeClaim`, `PersistentVolume`,
/// `BearerToken`) as the typed `Api` does:
/// every bad field named, the spec and status decoded.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuiltinValidation;

fn check<K: Resource>(obj: &DynamicObject) -> Result<(), Error> {
    Object::<K>::from_dynamic(obj)?.validate()
}

/// A status write keeps the stored spec, so it may carry none (the agent's status-only writes
/// send only metadata and status): only the status is checked.
fn check_status<K: Resource>(obj: &DynamicObject) -> Result<(), Error> {
    if obj.status.is_null() {
        return Ok(());
    }
    let status: K::Status = obj.status.decode().map_err(|e| e.within(obj.key(), "status"))?;
    let mut v = orch_core::Validator::new();
    K::validate_status(&status, &mut v);
    v.finish().map_err(|source| Error::Invalid { kind: K::KIND.into(), source })
}

impl Admission for BuiltinValidation {
    fn admit(&self, req: &AdmissionRequest<'_>, obj: &mut DynamicObject) -> Result<(), Error> {
        if req.operation == Operation::Delete {
            return Ok(());
        }
        let status_only = req.operation == Operation::UpdateStatus;
        match (obj.kind.as_str(), status_only) {
            (Workload::KIND, false) => check::<Workload>(obj),
            (Workload::KIND, true) => check_status::<Workload>(obj),
            (Node::KIND, false) => check::<Node>(obj),
            (Node::KIND, true) => check_status::<Node>(obj),
            (NodeLease::KIND, false) => check::<NodeLease>(obj),
            (NodeLease::KIND, true) => check_status::<NodeLease>(obj),
            (Deployment::KIND, false) => check::<Deployment>(obj),
            (Deployment::KIND, true) => check_status::<Deployment>(obj),
            (ReplicaSet::KIND, false) => check::<ReplicaSet>(obj),
            (ReplicaSet::KIND, true) => check_status::<ReplicaSet>(obj),
            (DaemonSet::KIND, false) => check::<DaemonSet>(obj),
            (DaemonSet::KIND, true) => check_status::<DaemonSet>(obj),
            (StatefulSet::KIND, false) => check::<StatefulSet>(obj),
            (StatefulSet::KIND, true) => check_status::<StatefulSet>(obj),
            (Job::KIND, false) => check::<Job>(obj),
            (Job::KIND, true) => check_status::<Job>(obj),
            (Workflow::KIND, false) => check::<Workflow>(obj),
            (Workflow::KIND, true) => check_status::<Workflow>(obj),
            (Event::KIND, false) => check::<Event>(obj),
            (Event::KIND, true) => check_status::<Event>(obj),
            (Service::KIND, false) => check::<Service>(obj),
            (Service::KIND, true) => check_status::<Service>(obj),
            (EndpointSlice::KIND, false) => check::<EndpointSlice>(obj),
            (EndpointSlice::KIND, true) => check_status::<EndpointSlice>(obj),
            (VolumeClaim::KIND, false) => check::<VolumeClaim>(obj),
            (VolumeClaim::KIND, true) => check_status::<VolumeClaim>(obj),
            (PersistentVolume::KIND, false) => check::<PersistentVolume>(obj),
            (PersistentVolume::KIND, true) => check_status::<PersistentVolume>(obj),
            (BEARER_TOKEN_KIND, false) => check::<BearerToken>(obj),
            _ => Ok(()),
        }
    }
}
