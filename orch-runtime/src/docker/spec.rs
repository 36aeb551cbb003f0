//! From an [`InstanceSpec`] to the Engine's create request, refusing what cannot run with an
//! error naming the field.

use std::collections::{HashMap, HashSet};

use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType, MountVolumeOptions, PortBinding};
use orch_core::kinds::{Protocol, resource};
use orch_core::runtime::{InstanceSpec, RuntimeError};

use super::{DockerConfig, labels};

/// The Engine refuses memory limits below 6 MiB.
const MIN_MEMORY: i64 = 6 * 1024 * 1024;
/// The Engine refuses CPU limits below 0.01 CPU.
const MIN_MILLI_CPU: i64 = 10;

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::invalid(field, reason)
}

fn no_nul(field: impl FnOnce() -> String, text: &str) -> Result<(), RuntimeError> {
    if text.contains('\0') { Err(invalid(field(), "must not contain a NUL byte")) } else { Ok(()) }
}

/// The labels every container of this runtime carries: the spec's own, then ours. A spec may
/// repeat one of ours only with the same value (the agent passes its node, which must be ours).
pub(super) fn container_labels(
    config: &DockerConfig,
    spec: &InstanceSpec,
) -> Result<HashMap<String, String>, RuntimeError> {
    let ours = [
        (labels::MANAGED_BY, labels::MANAGED_BY_VALUE.to_string()),
        (labels::NODE, config.node.clone()),
        (labels::INSTANCE, spec.id.clone()),
        (labels::HANDLE_VERSION, super::HANDLE_VERSION.to_string()),
    ];
    let mut all: HashMap<String, String> = HashMap::new();
    for (key, value) in spec.labels.iter() {
        if let Some((_, mine)) = ours.iter().find(|(k, _)| k == key)
            && mine != value
        {
            return Err(invalid(
                format!("labels.{key}"),
                format!("{value:?} differs from {mine:?}, which this runtime sets (node {:?})", config.node),
            ));
        }
        no_nul(|| format!("labels.{key}"), value)?;
        all.insert(key.clone(), value.clone());
    }
    all.extend(ours.into_iter().map(|(k, v)| (k.to_string(), v)));
    Ok(all)
}

/// The create request for `spec`, or `InvalidSpec` naming the first bad field. `host_cpus` is
/// the daemon's CPU count, when known, to refuse limits above it.
pub(super) fn create_body(
    config: &DockerConfig,
    spec: &InstanceSpec,
    host_cpus: Option<i64>,
) -> Result<ContainerCreateBody, RuntimeError> {
    orch_core::runtime::check_instance_id(&spec.id)?;
    let c = &spec.container;
    let image = match c.image.as_deref() {
        Some(i) if !i.trim().is_empty() => i,
        _ => return Err(invalid("container.image", "required: the docker runtime runs images")),
    };
    if image.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
        return Err(invalid("container.image", format!("{image:?} is not an image reference")));
    }
    if c.command.first().is_some_and(String::is_empty) {
        return Err(invalid("container.command[0]", "must not be empty"));
    }
    for (i, part) in c.command.iter().enumerate() {
        no_nul(|| format!("container.command[{i}]"), part)?;
    }
    for (i, arg) in c.args.iter().enumerate() {
        no_nul(|| format!("container.args[{i}]"), arg)?;
    }
    let mut env = vec![format!("ORCH_INSTANCE_ID={}", spec.id)];
    for (i, var) in c.env.iter().enumerate() {
        if var.name.is_empty() || var.name.contains('=') {
            return Err(invalid(
                format!("container.env[{i}].name"),
                format!("{:?} must be non-empty without '='", var.name),
            ));
        }
        no_nul(|| format!("container.env[{i}].name"), &var.name)?;
        no_nul(|| format!("container.env[{i}].value"), &var.value)?;
        env.push(format!("{}={}", var.name, var.value));
    }
    if let Some(dir) = &c.working_dir {
        if !dir.starts_with('/') {
            return Err(invalid("container.workingDir", format!("{dir:?} must be an absolute path in the container")));
        }
        no_nul(|| "container.workingDir".into(), dir)?;
    }

    let mut exposed = Vec::new();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    let mut host_ports = HashSet::new();
    for (i, p) in c.ports.iter().enumerate() {
        if !(1..=65535).contains(&p.container_port) {
            return Err(invalid(
                format!("container.ports[{i}].containerPort"),
                format!("{} is not in 1-65535", p.container_port),
            ));
        }
        let proto = match p.protocol {
            Protocol::TCP => "tcp",
            Protocol::UDP => "udp",
        };
        let key = format!("{}/{proto}", p.container_port);
        if !exposed.contains(&key) {
            exposed.push(key.clone());
        }
        if let Some(host) = p.host_port {
            if !(1..=65535).contains(&host) {
                return Err(invalid(format!("container.ports[{i}].hostPort"), format!("{host} is not in 1-65535")));
            }
            if !host_ports.insert((host, proto)) {
                return Err(invalid(
                    format!("container.ports[{i}].hostPort"),
                    format!("{host}/{proto} is bound twice"),
                ));
            }
            bindings
                .entry(key)
                .or_insert_with(|| Some(Vec::new()))
                .get_or_insert_with(Vec::new)
                .push(PortBinding { host_ip: None, host_port: Some(host.to_string()) });
        }
    }

    let ours = container_labels(config, spec)?;
    let mut mounts = Vec::new();
    let mut targets = HashSet::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        if !v.host_path.is_absolute() {
            return Err(invalid(
                format!("volumes[{i}].hostPath"),
                format!("{} must be absolute", v.host_path.display()),
            ));
        }
    }
    for (i, m) in c.volume_mounts.iter().enumerate() {
        if m.name.is_empty() {
            return Err(invalid(format!("container.volumeMounts[{i}].name"), "required"));
        }
        if !m.mount_path.starts_with('/') || m.mount_path.contains('\0') || m.mount_path.contains(':') {
            return Err(invalid(
                format!("container.volumeMounts[{i}].mountPath"),
                format!("{:?} must be an absolute path without ':'", m.mount_path),
            ));
        }
        if !targets.insert(m.mount_path.trim_end_matches('/').to_string()) {
            return Err(invalid(
                format!("container.volumeMounts[{i}].mountPath"),
                format!("{} is mounted twice", m.mount_path),
            ));
        }
        let mount = match spec.volumes.iter().find(|v| v.name == m.name) {
            // A volume the agent resolved to a host directory: bind it.
            Some(v) => Mount {
                target: Some(m.mount_path.clone()),
                source: Some(v.host_path.to_string_lossy().into_owned()),
                typ: Some(MountType::BIND),
                read_only: Some(m.read_only),
                ..Default::default()
            },
            // Otherwise a fresh volume of this instance, removed with it.
            None => Mount {
                target: Some(m.mount_path.clone()),
                typ: Some(MountType::VOLUME),
                read_only: Some(m.read_only),
                volume_options: Some(MountVolumeOptions {
                    labels: Some(
                        ours.iter()
                            .filter(|(k, _)| k.starts_with("orch.dev/"))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .chain([(labels::VOLUME.to_string(), m.name.clone())])
                            .collect(),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            },
        };
        mounts.push(mount);
    }

    let mut host = HostConfig {
        init: Some(config.init),
        network_mode: config.network.clone(),
        port_bindings: (!bindings.is_empty()).then_some(bindings),
        mounts: (!mounts.is_empty()).then_some(mounts),
        ..Default::default()
    };
    if let Some(dns) = &config.dns {
        let domain = &dns.cluster_domain;
        let mut search = Vec::with_capacity(3);
        if let Some(ns) = spec.labels.get("orch.dev/namespace") {
            search.push(format!("{ns}.svc.{domain}"));
        }
        search.extend([format!("svc.{domain}"), domain.clone()]);
        host.dns = Some(dns.servers.iter().map(ToString::to_string).collect());
        host.dns_search = Some(search);
        host.dns_options = Some(vec!["ndots:5".to_string()]);
    }
    if let Some(q) = c.resources.limits.get(resource::MEMORY) {
        let bytes = q.units_ceil();
        if bytes < MIN_MEMORY {
            return Err(invalid(
                "container.resources.limits.memory",
                format!("{q} is below 6Mi, the Docker Engine's minimum"),
            ));
        }
        host.memory = Some(bytes);
        // No swap beyond the limit, so the limit is what the instance gets (and OOM is seen).
        host.memory_swap = Some(bytes);
    }
    if let Some(q) = c.resources.limits.get(resource::CPU) {
        let milli = q.milli_ceil();
        if milli < MIN_MILLI_CPU {
            return Err(invalid(
                "container.resources.limits.cpu",
                format!("{q} is below 10m, the Docker Engine's minimum"),
            ));
        }
        if let Some(cpus) = host_cpus.filter(|n| *n > 0)
            && milli > cpus * 1000
        {
            return Err(invalid("container.resources.limits.cpu", format!("{q} is more than the node's {cpus} CPUs")));
        }
        host.nano_cpus = Some(milli * 1_000_000);
    }

    // Kubernetes' reading of command and args: `command` replaces the image's entry point (and
    // then its CMD is dropped), `args` replaces its CMD.
    let entrypoint = (!c.command.is_empty()).then(|| c.command.clone());
    let cmd = (!c.args.is_empty()).then(|| c.args.clone());
    Ok(ContainerCreateBody {
        image: Some(image.to_string()),
        entrypoint,
        cmd,
        env: Some(env),
        working_dir: c.working_dir.clone(),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        labels: Some(ours),
        attach_stdin: Some(false),
        attach_stdout: Some(false),
        attach_stderr: Some(false),
        tty: Some(false),
        host_config: Some(host),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_core::kinds::{Container, ContainerPort, EnvVar, VolumeMount};
    use orch_core::runtime::HostVolume;

    fn spec() -> InstanceSpec {
        InstanceSpec {
            id: "default.web.main.abc-0".into(),
            container: Container {
                name: "main".into(),
                image: Some("web:1".into()),
                command: vec!["/bin/sh".into(), "-c".into()],
                args: vec!["sleep 1".into()],
                ..Default::default()
            },
            volumes: Vec::new(),
            labels: [("orch.dev/node", "n1"), ("orch.dev/workload", "web")].into(),
        }
    }

    #[test]
    fn containers_get_the_cluster_dns_and_their_namespaces_search_domains_when_configured() {
        let plain = create_body(&DockerConfig::new("n1"), &spec(), Some(2)).unwrap().host_config.unwrap();
        assert_eq!((plain.dns, plain.dns_search, plain.dns_options), (None, None, None));
        let mut config = DockerConfig::new("n1");
        config.dns = Some(super::super::ContainerDns {
            servers: vec!["10.97.0.10".parse().unwrap()],
            cluster_domain: "cluster.local".into(),
        });
        let mut s = spec();
        s.labels = [("orch.dev/namespace", "shop"), ("orch.dev/workload", "web")].into();
        let host = create_body(&config, &s, Some(2)).unwrap().host_config.unwrap();
        assert_eq!(host.dns, Some(vec!["10.97.0.10".to_string()]));
        assert_eq!(
            host.dns_search,
            Some(vec!["shop.svc.cluster.local".to_string(), "svc.cluster.local".into(), "cluster.local".into()])
        );
        assert_eq!(host.dns_options, Some(vec!["ndots:5".to_string()]));
        // Without a namespace label (an instance started outside an agent): the cluster-wide ones.
        let host = create_body(&config, &spec(), Some(2)).unwrap().host_config.unwrap();
        assert_eq!(host.dns_search, Some(vec!["svc.cluster.local".to_string(), "cluster.local".into()]));
    }

    fn field(e: RuntimeError) -> String {
        match e {
            RuntimeError::InvalidSpec { field, .. } => field,
            other => panic!("expected InvalidSpec, got {other}"),
        }
    }

    fn refused(change: impl FnOnce(&mut InstanceSpec)) -> String {
        let mut s = spec();
        change(&mut s);
        field(create_body(&DockerConfig::new("n1"), &s, Some(2)).unwrap_err())
    }

    #[test]
    fn a_full_spec_maps_to_the_engine_request() {
        let mut s = spec();
        s.container.env.push(EnvVar { name: "A".into(), value: "b c".into() });
        s.container.working_dir = Some("/srv".into());
        s.container.ports = vec![
            ContainerPort { container_port: 80, host_port: Some(8080), ..Default::default() },
            ContainerPort { container_port: 53, protocol: Protocol::UDP, ..Default::default() },
        ];
        s.container.resources.limits.insert("memory".into(), "64Mi".parse().unwrap());
        s.container.resources.limits.insert("cpu".into(), "500m".parse().unwrap());
        s.container.volume_mounts = vec![
            VolumeMount { name: "data".into(), mount_path: "/data".into(), read_only: true },
            VolumeMount { name: "scratch".into(), mount_path: "/scratch".into(), read_only: false },
        ];
        s.volumes = vec![HostVolume { name: "data".into(), host_path: "/srv/data".into() }];
        let body = create_body(&DockerConfig::new("n1"), &s, Some(2)).unwrap();
        assert_eq!(body.entrypoint.as_deref(), Some(&["/bin/sh".to_string(), "-c".to_string()][..]));
        assert_eq!(body.cmd.as_deref(), Some(&["sleep 1".to_string()][..]));
        let env = body.env.unwrap();
        assert!(
            env.contains(&"A=b c".to_string()) && env.contains(&"ORCH_INSTANCE_ID=default.web.main.abc-0".to_string())
        );
        let labels = body.labels.unwrap();
        assert_eq!(labels[labels::NODE], "n1");
        assert_eq!(labels[labels::INSTANCE], "default.web.main.abc-0");
        assert_eq!(labels[labels::HANDLE_VERSION], "1");
        assert_eq!(labels["orch.dev/workload"], "web");
        let mut exposed = body.exposed_ports.unwrap();
        exposed.sort();
        assert_eq!(exposed, ["53/udp", "80/tcp"]);
        let host = body.host_config.unwrap();
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.memory_swap, Some(64 << 20));
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.init, Some(true));
        let bound = host.port_bindings.unwrap();
        assert_eq!(bound["80/tcp"].as_ref().unwrap()[0].host_port.as_deref(), Some("8080"));
        assert!(!bound.contains_key("53/udp"));
        let mounts = host.mounts.unwrap();
        assert_eq!(
            (mounts[0].typ, mounts[0].source.as_deref(), mounts[0].read_only),
            (Some(MountType::BIND), Some("/srv/data"), Some(true))
        );
        assert_eq!(mounts[1].typ, Some(MountType::VOLUME));
        assert!(mounts[1].source.is_none(), "a fresh volume of the instance");
        let vol_labels = mounts[1].volume_options.as_ref().unwrap().labels.as_ref().unwrap();
        assert_eq!(vol_labels[labels::INSTANCE], "default.web.main.abc-0");
    }

    #[test]
    fn bad_fields_are_named() {
        assert_eq!(refused(|s| s.container.image = None), "container.image");
        assert_eq!(refused(|s| s.container.image = Some("a b".into())), "container.image");
        assert_eq!(refused(|s| s.container.command[0].clear()), "container.command[0]");
        assert_eq!(refused(|s| s.container.args[0] = "a\0b".into()), "container.args[0]");
        assert_eq!(
            refused(|s| s.container.env.push(EnvVar { name: "A=B".into(), value: "".into() })),
            "container.env[0].name"
        );
        assert_eq!(refused(|s| s.container.working_dir = Some("rel".into())), "container.workingDir");
        assert_eq!(
            refused(|s| s.container.ports.push(ContainerPort { container_port: 0, ..Default::default() })),
            "container.ports[0].containerPort"
        );
        assert_eq!(
            refused(|s| s.container.ports.push(ContainerPort {
                container_port: 1,
                host_port: Some(70000),
                ..Default::default()
            })),
            "container.ports[0].hostPort"
        );
        assert_eq!(
            refused(|s| {
                s.container.ports.push(ContainerPort {
                    container_port: 1,
                    host_port: Some(9000),
                    ..Default::default()
                });
                s.container.ports.push(ContainerPort {
                    container_port: 2,
                    host_port: Some(9000),
                    ..Default::default()
                });
            }),
            "container.ports[1].hostPort"
        );
        assert_eq!(
            refused(|s| s.container.volume_mounts.push(VolumeMount {
                name: "x".into(),
                mount_path: "data".into(),
                read_only: false
            })),
            "container.volumeMounts[0].mountPath"
        );
        assert_eq!(
            refused(|s| {
                let m = VolumeMount { name: "x".into(), mount_path: "/d".into(), read_only: false };
                s.container.volume_mounts = vec![m.clone(), m];
            }),
            "container.volumeMounts[1].mountPath"
        );
        assert_eq!(
            refused(|s| s.volumes.push(HostVolume { name: "x".into(), host_path: "rel/dir".into() })),
            "volumes[0].hostPath"
        );
        assert_eq!(
            refused(|s| s.container.resources.limits.insert("memory".into(), "1Mi".parse().unwrap()).map_or((), drop)),
            "container.resources.limits.memory"
        );
        assert_eq!(
            refused(|s| s.container.resources.limits.insert("cpu".into(), "5m".parse().unwrap()).map_or((), drop)),
            "container.resources.limits.cpu"
        );
        assert_eq!(
            refused(|s| s.container.resources.limits.insert("cpu".into(), "3".parse().unwrap()).map_or((), drop)),
            "container.resources.limits.cpu"
        );
        assert_eq!(refused(|s| s.labels = [("orch.dev/node", "elsewhere")].into()), "labels.orch.dev/node");
        assert_eq!(refused(|s| s.id = "Bad Id".into()), "id");
    }
}
