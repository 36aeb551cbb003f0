//! [`AgentConfig`]: what a node agent is told about its node and how it paces itself.

use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use orch_core::kinds::{Resources, Taint};
use orch_core::{Labels, Quantity};

use crate::Enforcement;

/// The host ports an agent allocates from unless told otherwise.
pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 20000..=29999;

/// Settings of a node agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The node's name (a DNS-1123 subdomain).
    pub node_name: String,
    /// Node labels.
    pub labels: Labels,
    /// Node taints.
    pub taints: Vec<Taint>,
    /// Resources the node offers; `None` reads CPUs and memory from the host.
    pub capacity: Option<Resources>,
    /// Heartbeat lease time to live: how long a dead agent goes unnoticed (default 40 s).
    pub lease_ttl: Duration,
    /// How often the lease is renewed (default 10 s; a renewal writes nothing).
    pub renew_interval: Duration,
    /// How often the runtime's instances are checked against what the agent last saw, even
    /// without events (default 10 s): a difference (an exit whose event was missed, an instance
    /// gone behind the agent's back) syncs its workload, as does a workload bound here with no
    /// instance yet, or an instance whose workload is gone. Unchanged workloads cost one status
    /// read each, not a sync.
    pub resync_interval: Duration,
    /// First crash-loop delay (default 10 s); doubles per crash up to `backoff_max`.
    pub backoff_base: Duration,
    /// Longest crash-loop delay (default 5 min).
    pub backoff_max: Duration,
    /// Running this long without a crash resets the backoff (default 10 min).
    pub backoff_reset: Duration,
    /// How long a deleted workload with ports keeps running, terminating in its services'
    /// endpoints, before it is signalled, when its spec does not say (`preStopDelaySeconds`;
    /// default 2 s). Workloads without ports are stopped at once unless their spec asks.
    pub pre_stop_delay: Duration,
    /// Grace period when stopping instances (when the workload does not set one; default 30 s).
    pub stop_grace: Duration,
    /// Rotate an instance's log file past this size (default 10 MiB), on each resync.
    pub log_max_bytes: u64,
    /// Rotated log files kept per stream (default 3).
    pub log_keep: usize,
    /// Where the agent keeps what it makes on the node: the `emptyDir` volumes of its workloads
    /// live under `<data_root>/volumes/`, its `local` volumes under `<data_root>/local-volumes/`
    /// and its record of published volumes under `<data_root>/published/` (default:
    /// `orch-agent/<node>` in the system's temp directory).
    pub data_root: PathBuf,
    /// The address other nodes reach this node's workloads at (reported in the node's status
    /// and in each workload's; default 127.0.0.1, right for a cluster on one machine).
    pub address: IpAddr,
    /// Where host ports come from for container ports that do not fix a `hostPort` (default
    /// 20000-29999). The agent never gives one port to two workloads, skips ports something
    /// else on the node holds, and frees a workload's ports when it is gone.
    /// An empty range (start after end) gives no port: a workload needing one is not started
    /// and waits with `PortsUnavailable`, naming the range.
    pub port_range: RangeInclusive<u16>,
    /// Room for the volumes of class `local` on this node, in bytes (`10Gi`): what the node
    /// advertises in `status.storage` and what `local` volumes are accounted against (they live
    /// under `<data_root>/local-volumes/`). `None` (the default) takes the free space of the
    /// file system holding `data_root` when the agent first starts (read with `statvfs`) and
    /// keeps it in `<data_root>/local-capacity`, so the node advertises the same room on every
    /// start. Ignored when a `local` provider is given with
    /// [`Agent::with_volume_provider`](super::Agent::with_volume_provider).
    pub local_storage: Option<Quantity>,
    /// Whether the sizes of `local` volumes are enforced: [`Enforcement::Auto`] (the default)
    /// makes each volume a loop-mounted ext4 file system where that works under
    /// `<data_root>/local-volumes/`, else only accounts them, saying why in the log. Ignored
    /// when a `local` provider is given.
    pub local_storage_enforcement: Enforcement,
}

impl AgentConfig {
    /// Defaults for node `name`.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        AgentConfig {
            node_name: name.clone(),
            labels: Labels::new(),
            taints: Vec::new(),
            capacity: None,
            lease_ttl: Duration::from_secs(40),
            renew_interval: Duration::from_secs(10),
            resync_interval: Duration::from_secs(10),
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            backoff_reset: Duration::from_secs(600),
            stop_grace: Duration::from_secs(30),
            pre_stop_delay: Duration::from_secs(2),
            log_max_bytes: 10 * 1024 * 1024,
            log_keep: 3,
            data_root: std::env::temp_dir().join("orch-agent").join(&name),
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port_range: DEFAULT_PORT_RANGE,
            local_storage: None,
            local_storage_enforcement: Enforcement::Auto,
        }
    }
}
