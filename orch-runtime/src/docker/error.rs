//! [`DockerError`]: what went wrong on the Docker Engine, classified so callers can act.

use orch_core::runtime::RuntimeError;

/// Why a call to the Docker Engine failed. It reaches callers as the `#[source]` of a
/// [`RuntimeError::Unavailable`] (whose message is this error's text, so it also shows where
/// only the message is printed); [`DockerError::of`] finds it again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DockerError {
    /// Nothing listens at the daemon's address (no socket file, or nobody behind it).
    #[error(
        "no Docker daemon answers at {address}: start it (`systemctl start docker` or `dockerd`) or point DOCKER_HOST / DockerConfig::host at one that runs"
    )]
    DaemonNotRunning {
        /// Where the runtime looked for the daemon.
        address: String,
        /// What the client saw.
        #[source]
        source: bollard::errors::Error,
    },
    /// The daemon's socket exists but this process may not open it.
    #[error(
        "permission denied on the Docker socket {address}: run the agent as root or as a member of the `docker` group"
    )]
    PermissionDenied {
        /// The socket.
        address: String,
        /// What the client saw.
        #[source]
        source: bollard::errors::Error,
    },
    /// The image is not on the node and the runtime may not pull it.
    #[error(
        "image {image:?} is not present on this node and pulling is off: load it here (`docker load`, `docker import`, `docker build`) or set DockerConfig::pull to PullPolicy::IfMissing where a registry is reachable"
    )]
    ImageNotFound {
        /// The image as the workload names it.
        image: String,
    },
    /// The image was missing and pulling it failed.
    #[error(
        "image {image:?} is not present on this node and pulling it failed (is a registry reachable from the daemon?)"
    )]
    PullFailed {
        /// The image as the workload names it.
        image: String,
        /// What the daemon said.
        #[source]
        source: bollard::errors::Error,
    },
    /// A host port of the instance is already bound on the node.
    #[error(
        "host port {port} is already in use on this node: stop what holds it or give the container another hostPort"
    )]
    PortInUse {
        /// The host port.
        port: u32,
        /// What the daemon said.
        #[source]
        source: bollard::errors::Error,
    },
    /// Any other failure of the daemon or of the connection to it.
    #[error("the Docker daemon failed to {action}: {source}")]
    Api {
        /// What the runtime asked for.
        action: String,
        /// What the client saw.
        #[source]
        source: bollard::errors::Error,
    },
}

impl DockerError {
    /// The Docker error behind a runtime error, if there is one.
    pub fn of(error: &RuntimeError) -> Option<&DockerError> {
        match error {
            RuntimeError::Unavailable { source: Some(source), .. } => source.downcast_ref::<DockerError>(),
            _ => None,
        }
    }

    /// Classifies a client error: connection failures by their OS error, everything else as
    /// [`DockerError::Api`].
    pub(crate) fn classify(address: &str, action: impl Into<String>, source: bollard::errors::Error) -> DockerError {
        if matches!(source, bollard::errors::Error::SocketNotFoundError(_)) {
            return DockerError::DaemonNotRunning { address: address.into(), source };
        }
        match io_kind(&source) {
            Some(std::io::ErrorKind::PermissionDenied) => {
                DockerError::PermissionDenied { address: address.into(), source }
            }
            Some(std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
                DockerError::DaemonNotRunning { address: address.into(), source }
            }
            _ => DockerError::Api { action: action.into(), source },
        }
    }
}

impl From<DockerError> for RuntimeError {
    fn from(e: DockerError) -> Self {
        RuntimeError::Unavailable { message: e.to_string(), source: Some(Box::new(e)) }
    }
}

/// The kind of the first OS error in the chain of causes (a refused or forbidden connection).
fn io_kind(error: &bollard::errors::Error) -> Option<std::io::ErrorKind> {
    // Transparent: its `source` skips the OS error itself.
    if let bollard::errors::Error::IOError { err } = error {
        return Some(err.kind());
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cause = e.source();
    }
    None
}

/// The HTTP status and message of an error answer from the daemon.
pub(crate) fn answer(error: &bollard::errors::Error) -> Option<(u16, &str)> {
    match error {
        bollard::errors::Error::DockerResponseServerError { status_code, message } => {
            Some((*status_code, message.as_str()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: std::io::ErrorKind) -> bollard::errors::Error {
        bollard::errors::Error::IOError { err: std::io::Error::new(kind, "from the socket") }
    }

    #[test]
    fn connection_failures_are_classified_by_their_os_error() {
        let addr = "unix:///var/run/docker.sock";
        let e = DockerError::classify(addr, "ping", io(std::io::ErrorKind::PermissionDenied));
        assert!(matches!(e, DockerError::PermissionDenied { .. }), "{e}");
        assert!(e.to_string().contains("docker` group"), "says what to do: {e}");
        let e = DockerError::classify(addr, "ping", io(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(e, DockerError::DaemonNotRunning { .. }), "{e}");
        let e = DockerError::classify(addr, "ping", bollard::errors::Error::SocketNotFoundError("/x.sock".into()));
        assert!(matches!(e, DockerError::DaemonNotRunning { .. }), "{e}");
        let e = DockerError::classify(addr, "ping", io(std::io::ErrorKind::TimedOut));
        assert!(matches!(e, DockerError::Api { .. }), "{e}");
    }

    #[test]
    fn a_runtime_error_carries_the_docker_error_as_its_source() {
        let r: RuntimeError = DockerError::ImageNotFound { image: "web:1".into() }.into();
        assert!(r.to_string().contains("\"web:1\""), "names the image: {r}");
        assert!(matches!(DockerError::of(&r), Some(DockerError::ImageNotFound { image }) if image == "web:1"));
        assert!(DockerError::of(&RuntimeError::NotFound("x".into())).is_none());
    }
}
