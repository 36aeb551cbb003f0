//! Validation of a workload's spec: every bad field named with its path and the reason.

use std::collections::HashSet;

use super::*;
use crate::kinds::{resource, validate_resources};
use crate::quantity::Quantity;
use crate::validation::{self, Validator};

fn check_port(v: &mut Validator, field: impl FnOnce() -> String, port: u32) {
    if !(1..=65535).contains(&port) {
        v.reject(field(), format!("must be between 1 and 65535 (is {port})"));
    }
}

fn validate_probe(field: &str, p: &Probe, v: &mut Validator) {
    match &p.action {
        ProbeAction::Exec { command } if command.is_empty() => {
            v.reject(format!("{field}.action.exec.command"), "must not be empty")
        }
        ProbeAction::Http { path, port } => {
            check_port(v, || format!("{field}.action.http.port"), *port);
            if !path.starts_with('/') {
                v.reject(format!("{field}.action.http.path"), "must start with '/'");
            }
        }
        ProbeAction::Tcp { port } => check_port(v, || format!("{field}.action.tcp.port"), *port),
        ProbeAction::Exec { .. } => {}
    }
    for (name, value) in [
        ("periodSeconds", p.period_seconds),
        ("timeoutSeconds", p.timeout_seconds),
        ("failureThreshold", p.failure_threshold),
        ("successThreshold", p.success_threshold),
    ] {
        if value == 0 {
            v.reject(format!("{field}.{name}"), "must be >= 1");
        }
    }
}

fn validate_node_term(field: &str, t: &NodeSelectorTerm, v: &mut Validator) {
    for (i, r) in t.match_expressions.iter().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        v.check_with(|| format!("{f}.key"), validation::qualified_name(&r.key));
        match r.operator {
            NodeSelectorOperator::In | NodeSelectorOperator::NotIn if r.values.is_empty() => {
                v.reject(format!("{f}.values"), "must not be empty for In and NotIn")
            }
            NodeSelectorOperator::Exists | NodeSelectorOperator::DoesNotExist if !r.values.is_empty() => {
                v.reject(format!("{f}.values"), "must be empty for Exists and DoesNotExist")
            }
            NodeSelectorOperator::Gt | NodeSelectorOperator::Lt
                if r.values.len() != 1 || r.values[0].parse::<i64>().is_err() =>
            {
                v.reject(format!("{f}.values"), "must be exactly one integer for Gt and Lt")
            }
            _ => {}
        }
    }
}

fn validate_weight(field: String, w: i32, v: &mut Validator) {
    if !(1..=100).contains(&w) {
        v.reject(field, format!("must be between 1 and 100 (is {w})"));
    }
}

fn validate_affinity_term(field: &str, t: &AffinityTerm, v: &mut Validator) {
    if let Err(crate::Error::Invalid { source, .. }) = t.label_selector.validate(&format!("{field}.labelSelector")) {
        for e in source.errors {
            v.reject(e.field, e.reason);
        }
    }
    v.check_with(|| format!("{field}.topologyKey"), validation::qualified_name(&t.topology_key));
    for (i, ns) in t.namespaces.iter().enumerate() {
        v.check_with(|| format!("{field}.namespaces[{i}]"), validation::dns1123_label(ns));
    }
}

fn validate_workload_affinity(field: &str, a: &WorkloadAffinity, v: &mut Validator) {
    for (i, t) in a.required.iter().enumerate() {
        validate_affinity_term(&format!("{field}.required[{i}]"), t, v);
    }
    for (i, w) in a.preferred.iter().enumerate() {
        validate_weight(format!("{field}.preferred[{i}].weight"), w.weight, v);
        validate_affinity_term(&format!("{field}.preferred[{i}].term"), &w.term, v);
    }
}

/// Checks a workload's spec, naming every bad field under `spec.`.
/// A working directory is an absolute path, or `$(ORCH_VOLUME_<NAME>)` naming one of the
/// workload's volumes (no other `$(...)` is expanded).
fn validate_working_dir(field: &str, dir: &str, volumes: &[Volume], v: &mut Validator) {
    if !dir.contains("$(") {
        if !dir.starts_with('/') {
            v.reject(field, "must be an absolute path or $(ORCH_VOLUME_<NAME>)");
        }
        return;
    }
    let named = dir.strip_prefix("$(").and_then(|r| r.strip_suffix(')')).filter(|n| n.starts_with("ORCH_VOLUME_"));
    match named {
        Some(var) if volumes.iter().any(|vol| Volume::env_var(&vol.name) == var) => {}
        Some(var) => v.reject(
            field,
            format!(
                "$({var}) names none of the workload's volumes (it has: {})",
                volumes.iter().map(|vol| Volume::env_var(&vol.name)).collect::<Vec<_>>().join(", ")
            ),
        ),
        None => v.reject(field, format!("{dir:?}: only the whole of $(ORCH_VOLUME_<NAME>) is expanded")),
    }
}

pub(super) fn validate_spec(w: &Workload, v: &mut Validator) {
    if w.containers.is_empty() {
        v.reject("spec.containers", "must have at least one container");
    }
    if let Some(g) = &w.scheduling_group {
        v.check_with(|| "spec.schedulingGroup.name".into(), validation::dns1123_label(&g.name));
        if g.min_members == 0 {
            v.reject("spec.schedulingGroup.minMembers", "must be >= 1");
        }
        if let Some(t) = g.timeout_seconds.filter(|t| !(1..=86_400).contains(t)) {
            v.reject("spec.schedulingGroup.timeoutSeconds", format!("must be between 1 and 86400 (is {t})"));
        }
    }
    if let Some(gpu) = w.requests().get(resource::GPU)
        && *gpu > Quantity::from_units(1)
        && gpu.nanos() % 1_000_000_000 != 0
    {
        v.reject(
            "spec.containers",
            format!(
                "the containers' gpu requests add up to {gpu}: a share of one GPU must be below 1, more must be whole"
            ),
        );
    }
    let mut volume_names = HashSet::new();
    for (i, vol) in w.volumes.iter().enumerate() {
        v.check_with(|| format!("spec.volumes[{i}].name"), validation::dns1123_label(&vol.name));
        if !volume_names.insert(vol.name.as_str()) {
            v.reject(format!("spec.volumes[{i}].name"), format!("duplicate volume name {:?}", vol.name));
        }
        match &vol.source {
            VolumeSource::HostPath { path } if !path.starts_with('/') => {
                v.reject(format!("spec.volumes[{i}].source.hostPath.path"), "must be an absolute path")
            }
            VolumeSource::EmptyDir { size_limit: Some(q) } if q.is_negative() => {
                v.reject(format!("spec.volumes[{i}].source.emptyDir.sizeLimit"), "must be >= 0")
            }
            VolumeSource::Claim { claim_name } => v.check_with(
                || format!("spec.volumes[{i}].source.claim.claimName"),
                validation::dns1123_subdomain(claim_name),
            ),
            _ => {}
        }
    }
    let mut names = HashSet::new();
    let mut port_names = HashSet::new();
    let mut host_ports = HashSet::new();
    for (ci, c) in w.containers.iter().enumerate() {
        let f = format!("spec.containers[{ci}]");
        v.check_with(|| format!("{f}.name"), validation::dns1123_label(&c.name));
        if !names.insert(c.name.as_str()) {
            v.reject(format!("{f}.name"), format!("duplicate container name {:?}", c.name));
        }
        if c.image.as_deref().is_none_or(str::is_empty) && c.command.is_empty() {
            v.reject(format!("{f}.command"), "an image or a command is required");
        }
        if c.command.first().is_some_and(String::is_empty) {
            v.reject(format!("{f}.command[0]"), "must not be empty");
        }
        for (ei, e) in c.env.iter().enumerate() {
            if e.name.is_empty() || e.name.contains('=') || e.name.contains('\0') {
                v.reject(format!("{f}.env[{ei}].name"), "must be non-empty, without '=' or NUL");
            }
        }
        if let Some(dir) = &c.working_dir {
            validate_working_dir(&format!("{f}.workingDir"), dir, &w.volumes, v);
        }
        validate_resources(&format!("{f}.resources.requests"), &c.resources.requests, v);
        validate_resources(&format!("{f}.resources.limits"), &c.resources.limits, v);
        for (name, req) in &c.resources.requests {
            if let Some(lim) = c.resources.limits.get(name)
                && req > lim
            {
                v.reject(
                    format!("{f}.resources.requests.{name}"),
                    format!("must not exceed the limit ({req} > {lim})"),
                );
            }
        }
        if let Some(gpu) = c.resources.requests.get(resource::GPU)
            && *gpu > Quantity::from_units(1)
            && gpu.nanos() % 1_000_000_000 != 0
        {
            v.reject(
                format!("{f}.resources.requests.gpu"),
                format!("a share of one GPU must be below 1; more than one must be whole (is {gpu})"),
            );
        }
        let mut container_ports = HashSet::new();
        for (pi, p) in c.ports.iter().enumerate() {
            let pf = format!("{f}.ports[{pi}]");
            check_port(v, || format!("{pf}.containerPort"), p.container_port);
            if let Some(hp) = p.host_port {
                check_port(v, || format!("{pf}.hostPort"), hp);
                if !host_ports.insert((hp, p.protocol)) {
                    v.reject(format!("{pf}.hostPort"), format!("host port {hp}/{:?} is used twice", p.protocol));
                }
            }
            if !container_ports.insert((p.container_port, p.protocol)) {
                v.reject(
                    format!("{pf}.containerPort"),
                    format!("port {}/{:?} is listed twice", p.container_port, p.protocol),
                );
            }
            if let Some(name) = &p.name {
                v.check_with(|| format!("{pf}.name"), validation::dns1123_label(name));
                if !port_names.insert(name.as_str()) {
                    v.reject(format!("{pf}.name"), format!("duplicate port name {name:?}"));
                }
            }
        }
        let mut mount_paths = HashSet::new();
        for (mi, m) in c.volume_mounts.iter().enumerate() {
            if !volume_names.contains(m.name.as_str()) {
                v.reject(format!("{f}.volumeMounts[{mi}].name"), format!("no volume named {:?}", m.name));
            }
            if !m.mount_path.starts_with('/') {
                v.reject(format!("{f}.volumeMounts[{mi}].mountPath"), "must be an absolute path");
            } else if !mount_paths.insert(m.mount_path.as_str()) {
                v.reject(format!("{f}.volumeMounts[{mi}].mountPath"), format!("{:?} is mounted twice", m.mount_path));
            }
        }
        for (name, probe) in [
            ("livenessProbe", &c.liveness_probe),
            ("readinessProbe", &c.readiness_probe),
            ("startupProbe", &c.startup_probe),
        ] {
            if let Some(p) = probe {
                validate_probe(&format!("{f}.{name}"), p, v);
            }
        }
    }
    if let Some(d) = w.pre_stop_delay_seconds.filter(|d| *d > 3600) {
        v.reject("spec.preStopDelaySeconds", format!("must be between 0 and 3600 (is {d})"));
    }
    if let Some(node) = &w.node_name {
        v.check_with(|| "spec.nodeName".into(), validation::dns1123_subdomain(node));
    }
    for (k, val) in &w.node_selector {
        v.check_with(|| format!("spec.nodeSelector[{k:?}]"), validation::qualified_name(k));
        v.check_with(|| format!("spec.nodeSelector[{k:?}]"), validation::label_value(val));
    }
    for (i, t) in w.tolerations.iter().enumerate() {
        if t.operator == TolerationOperator::Exists && !t.value.is_empty() {
            v.reject(format!("spec.tolerations[{i}].value"), "must be empty when operator is Exists");
        }
        if t.key.is_empty() && t.operator != TolerationOperator::Exists {
            v.reject(format!("spec.tolerations[{i}].operator"), "must be Exists when key is empty");
        }
        if !t.key.is_empty() {
            v.check_with(|| format!("spec.tolerations[{i}].key"), validation::qualified_name(&t.key));
        }
    }
    if let Some(a) = &w.affinity {
        if let Some(na) = &a.node_affinity {
            for (i, t) in na.required.iter().enumerate() {
                validate_node_term(&format!("spec.affinity.nodeAffinity.required[{i}]"), t, v);
            }
            for (i, w) in na.preferred.iter().enumerate() {
                validate_weight(format!("spec.affinity.nodeAffinity.preferred[{i}].weight"), w.weight, v);
                validate_node_term(&format!("spec.affinity.nodeAffinity.preferred[{i}].term"), &w.term, v);
            }
        }
        if let Some(wa) = &a.workload_affinity {
            validate_workload_affinity("spec.affinity.workloadAffinity", wa, v);
        }
        if let Some(wa) = &a.workload_anti_affinity {
            validate_workload_affinity("spec.affinity.workloadAntiAffinity", wa, v);
        }
    }
    for (i, t) in w.topology_spread_constraints.iter().enumerate() {
        if t.max_skew < 1 {
            v.reject(
                format!("spec.topologySpreadConstraints[{i}].maxSkew"),
                format!("must be >= 1 (is {})", t.max_skew),
            );
        }
        v.check_with(
            || format!("spec.topologySpreadConstraints[{i}].topologyKey"),
            validation::qualified_name(&t.topology_key),
        );
    }
}
