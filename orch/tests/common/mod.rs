//! What the tests of the `orch` binary share: its processes (stopped with SIGTERM, then killed),
//! tokens made by `orch token create`, and free loopback ports.

// Each test file uses part of this.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A process that gets SIGTERM when dropped, and SIGKILL if it has not exited 20 s later.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the `orch` binary with `args`, its log in `log`.
pub(crate) fn orch(args: &[&str], log: &Path) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_orch"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("start orch"),
    )
}

/// A bearer token for `user` in `group`, stored in the server's data directory `data`.
pub(crate) fn token(data: &Path, user: &str, group: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_orch"))
        .args(["token", "create", "--data-dir", data.to_str().unwrap(), "--user", user, "--group", group])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A loopback TCP port free at the time of the call.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `probe` every 100 ms until it answers something, for at most 90 s (containers and
/// processes on a loaded machine); panics naming `what` when it never does.
pub(crate) async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
