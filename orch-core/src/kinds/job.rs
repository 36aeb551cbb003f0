//! [`Job`]: run a workload template to completion a number of times, retrying failures with a
//! growing delay.

use serde::{Deserialize, Serialize};

use super::{Condition, RestartPolicy, WorkloadTemplate, validate_conditions};
use crate::meta::Timestamp;
use crate::object::{Resource, Scope};
use crate::validation::Validator;

/// The annotation (and environment variable `JOB_COMPLETION_INDEX`) giving an indexed job's
/// workload its index.
pub const COMPLETION_INDEX_ANNOTATION: &str = "orch.dev/completion-index";

/// How a job counts completions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompletionMode {
    /// `completions` successes, from any workloads.
    #[default]
    NonIndexed,
    /// One success for each index `0..completions`; each workload knows its index.
    Indexed,
}

/// Run a template to completion `completions` times, `parallelism` at once; a failed workload
/// is retried after a delay that doubles with each failure, until `backoffLimit` failures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Job {
    /// What each workload runs; its restart policy must be `Never` or `OnFailure`.
    pub template: WorkloadTemplate,
    /// Successes needed (default 1; at least 1).
    pub completions: u32,
    /// Workloads running at once at most (default 1; at least 1).
    pub parallelism: u32,
    /// Failures (failed workloads plus container restarts) tolerated before the job fails
    /// (default 6).
    pub backoff_limit: u32,
    /// Delay before the first retry, doubled for each further failure up to 6 minutes
    /// (default 10; at least 1).
    pub backoff_seconds: u32,
    /// The job fails once it has run this long.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_deadline_seconds: Option<u64>,
    /// How completions are counted.
    pub completion_mode: CompletionMode,
    /// Delete the job (and, through the garbage collector, its workloads) this long after it
    /// finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<u64>,
}

impl Default for Job {
    fn default() -> Self {
        Job {
            template: WorkloadTemplate::default(),
            completions: 1,
            parallelism: 1,
            backoff_limit: 6,
            backoff_seconds: 10,
            active_deadline_seconds: None,
            completion_mode: CompletionMode::NonIndexed,
            ttl_seconds_after_finished: None,
        }
    }
}

/// Condition types of a job.
pub mod job_condition {
    /// Every completion succeeded.
    pub const COMPLETE: &str = "Complete";
    /// The job gave up: reason `BackoffLimitExceeded` or `DeadlineExceeded`, and a message
    /// saying what failed last.
    pub const FAILED: &str = "Failed";
}

/// What the job controller observes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct JobStatus {
    /// Workloads running or about to.
    pub active: u32,
    /// Successful completions.
    pub succeeded: u32,
    /// Failures: failed workloads plus container restarts.
    pub failed: u32,
    /// For an indexed job, the indexes that succeeded, as ranges (`0-3,5`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub completed_indexes: String,
    /// When the controller first started it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Timestamp>,
    /// When it completed or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Timestamp>,
    /// When the last failure was seen (the retry delay counts from here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Timestamp>,
    /// `Complete` or `Failed`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl Resource for Job {
    const KIND: &'static str = "Job";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = JobStatus;

    fn validate(&self, v: &mut Validator) {
        self.template.validate_under("spec.template", v);
        if self.template.spec.restart_policy == RestartPolicy::Always {
            v.reject("spec.template.spec.restartPolicy", "must be Never or OnFailure: a job's workloads finish");
        }
        if self.completions == 0 {
            v.reject("spec.completions", "must be >= 1");
        }
        if self.parallelism == 0 {
            v.reject("spec.parallelism", "must be >= 1");
        }
        if self.backoff_seconds == 0 {
            v.reject("spec.backoffSeconds", "must be >= 1");
        }
        if self.active_deadline_seconds == Some(0) {
            v.reject("spec.activeDeadlineSeconds", "must be >= 1");
        }
        if self.completion_mode == CompletionMode::Indexed && self.completions > 100_000 {
            v.reject(
                "spec.completions",
                format!("must be at most 100000 for an indexed job (is {})", self.completions),
            );
        }
    }

    fn validate_status(status: &JobStatus, v: &mut Validator) {
        validate_conditions("status.conditions", &status.conditions, v);
    }
}

/// Indexes as ranges: `[0, 1, 2, 3, 5]` → `0-3,5`.
pub fn format_indexes(sorted: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        out.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::Workload;
    use crate::meta::ObjectMeta;
    use crate::object::Object;

    #[test]
    fn job_validation_names_fields() {
        let j = Job {
            template: WorkloadTemplate::new(Default::default(), Workload::command("main", &["x"])),
            completions: 0,
            parallelism: 0,
            backoff_seconds: 0,
            active_deadline_seconds: Some(0),
            ..Default::default()
        };
        let err = Object::new(ObjectMeta::namespaced("default", "j"), j).validate().unwrap_err();
        let crate::Error::Invalid { source, .. } = &err else { panic!("{err}") };
        for f in [
            "spec.template.spec.restartPolicy",
            "spec.completions",
            "spec.parallelism",
            "spec.backoffSeconds",
            "spec.activeDeadlineSeconds",
        ] {
            assert!(source.has_field(f), "missing {f} in {err}");
        }
    }

    #[test]
    fn indexes_print_as_ranges() {
        assert_eq!(format_indexes(&[0, 1, 2, 3, 5, 7, 8]), "0-3,5,7-8");
        assert_eq!(format_indexes(&[]), "");
    }
}
