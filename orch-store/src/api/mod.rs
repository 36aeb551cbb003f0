//! The control plane over the network: an API server that serves any [`Store`](orch_core::Store)
//! in the Kubernetes API's conventions (feature `server`), and [`RemoteStore`], the `Store` that
//! speaks to it (feature `remote`).
//!
//! | piece | feature | what it is |
//! |---|---|---|
//! | [`wire`] | `server` or `remote` | the JSON shapes both sides share: objects, lists, watch lines, `Status` errors, paths |
//! | `ApiServer` | `server` | axum over hyper (HTTP/1.1 and HTTP/2), over TLS or plain: CRUD, status, merge and JSON patch, watch, leases, discovery, limits |
//! | [`auth`], [`bearer`], [`pki`], [`revocation`] | `server` | bearer tokens (a file read at start, and tokens in the store, made and revoked through the API), rules, the audit log; the cluster CA, client and node certificates, node join; revoked node and user certificates |
//! | `discover_ca` | `remote` | a joining node finds the cluster CA from the digest its join token pins |
//! | `RemoteStore` | `remote` | a `Store` over HTTP/2 (https trusting the cluster CA, with a client certificate or a token): passes the store conformance suite; watches resume after a lost connection |

pub mod wire;

#[cfg(feature = "server")]
pub mod admission;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod bearer;
#[cfg(feature = "remote")]
mod discovery;
#[cfg(feature = "server")]
pub mod kinds;
#[cfg(feature = "server")]
mod node_auth;
#[cfg(feature = "server")]
pub mod pki;
#[cfg(feature = "remote")]
mod remote;
#[cfg(feature = "server")]
pub mod revocation;
#[cfg(feature = "server")]
mod server;
#[cfg(any(feature = "server", feature = "remote"))]
mod tls;

#[cfg(feature = "server")]
pub use admission::{Admission, AdmissionRequest, BuiltinValidation, Operation, UserInfo};
#[cfg(feature = "server")]
pub use auth::{AuditLog, Authorizer, JoinTokens, Rule, Tokens};
#[cfg(feature = "remote")]
pub use discovery::{ca_digest, discover_ca, pinned_join_token, split_join_token};
#[cfg(feature = "server")]
pub use kinds::{KindInfo, Kinds};
#[cfg(feature = "server")]
pub use pki::{AgentServerCert, CertificateIdentity, ClusterCa, Issued, agent_client_config, serve_tls};
#[cfg(feature = "remote")]
pub use remote::{RemoteStore, RemoteStoreBuilder, Upgrade};
#[cfg(feature = "server")]
pub use server::{ApiServer, ApiServerBuilder, Limits, NodeJoin, RunningServer};
