//! [`LocalEtcd`]: throwaway etcd servers on loopback, for tests, benchmarks and examples (feature
//! `local-etcd`, so that a program using the etcd store does not carry a test fixture).
//!
//! Each member runs the `etcd` binary found on `PATH` (Debian: `apt-get install etcd-server`)
//! with its own data directory under the system temp directory and free ports on 127.0.0.1.
//! A member can be killed and restarted on the same data and ports, which is how the tests
//! show that watches resume and that a cluster keeps accepting writes with a member down.
//!
//! Members never outlive the process that started them: a small shell watchdog kills its etcd
//! when that process is gone, even after a `SIGKILL` that skips every destructor. Linux only
//! (it reads `/proc` to tell whether a member is still running).

use std::io;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Runs etcd in the background, writes its pid, and kills it once the test process is gone.
const WATCHDOG: &str = r#"etcd "$@" >"$ORCH_ETCD_LOG" 2>&1 &
e=$!
echo $e >"$ORCH_ETCD_PID.tmp" && mv "$ORCH_ETCD_PID.tmp" "$ORCH_ETCD_PID"
while kill -0 "$ORCH_ETCD_PARENT" 2>/dev/null && kill -0 $e 2>/dev/null; do sleep 0.3; done
kill -9 $e 2>/dev/null
# The test process died without cleaning up: remove the data for it.
kill -0 "$ORCH_ETCD_PARENT" 2>/dev/null || rm -rf "$ORCH_ETCD_DIR"
"#;

/// One or more etcd members on loopback, removed (processes and data) on drop.
#[derive(Debug)]
pub struct LocalEtcd {
    dir: PathBuf,
    members: Vec<Member>,
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// The watchdog shell and etcd's pid, while running.
    running: Option<(Child, u32)>,
}

impl LocalEtcd {
    /// True when an `etcd` binary is on `PATH`.
    pub fn available() -> bool {
        Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// For tests: true when an `etcd` binary is installed. Otherwise the test should return: this
    /// says it is skipped, or panics when `ORCH_REQUIRE_ETCD` is set (CI sets it, so a missing
    /// etcd fails the run instead of skipping the tests that need it).
    ///
    /// # Panics
    /// Without etcd when `ORCH_REQUIRE_ETCD` is set.
    pub fn available_for_test() -> bool {
        if Self::available() {
            return true;
        }
        assert!(
            std::env::var_os("ORCH_REQUIRE_ETCD").is_none(),
            "etcd is not installed and ORCH_REQUIRE_ETCD is set (apt-get install etcd-server)"
        );
        eprintln!("skipped: etcd is not installed (apt-get install etcd-server)");
        false
    }

    /// Starts a single-member etcd and waits until it accepts connections.
    pub fn start() -> io::Result<LocalEtcd> {
        Self::start_cluster(1)
    }

    /// Starts a cluster of `members` etcd members and waits until each accepts connections
    /// (electing a leader may take a moment longer: see [`wait_ready`](Self::wait_ready)).
    pub fn start_cluster(members: usize) -> io::Result<LocalEtcd> {
        if members == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "members: must be >= 1"));
        }
        // A free port can be taken by someone else before etcd binds it: then try new ones.
        let mut attempt = 0;
        loop {
            match Self::try_start(members) {
                Err(e) if attempt < 2 => {
                    attempt += 1;
                    eprintln!("etcd did not start ({e}); trying other ports");
                }
                other => return other,
            }
        }
    }

    fn try_start(members: usize) -> io::Result<LocalEtcd> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "orch-etcd-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let mut etcd = LocalEtcd { dir, members: Vec::new() };
        for i in 0..members {
            etcd.members.push(Member {
                name: format!("m{i}"),
                client_port: free_port()?,
                peer_port: free_port()?,
                running: None,
            });
        }
        for i in 0..members {
            etcd.spawn(i)?;
        }
        for i in 0..members {
            etcd.wait_port(i, Duration::from_secs(20))?;
        }
        Ok(etcd)
    }

    /// The client URL of every member.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// The client URL of member `i`.
    ///
    /// # Panics
    /// When there is no member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    /// The data directory of member `i` (on the same disk as everything else in the temp
    /// directory).
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(&self.members[i].name)
    }

    /// Kills member `i` with `SIGKILL`, as a crash would. Its data stays for a restart.
    pub fn kill(&mut self, i: usize) {
        if let Some((mut watchdog, pid)) = self.members.get_mut(i).and_then(|m| m.running.take()) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            let _ = watchdog.kill();
            let _ = watchdog.wait();
            // The ports are free once the process is gone.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && pid_alive(pid) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts member `i` again on its data and ports, and waits until it accepts connections.
    pub fn restart(&mut self, i: usize) -> io::Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_port(i, Duration::from_secs(20))
    }

    /// Waits until the members answer a read: a leader is elected and serving.
    pub async fn wait_ready(&self, timeout: Duration) -> io::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let attempt = async {
                let mut c = etcd_client::Client::connect(self.endpoints(), None).await?;
                c.get("orch-etcd-ready", None).await
            };
            let outcome = tokio::time::timeout(Duration::from_secs(2), attempt).await;
            match outcome {
                Ok(Ok(_)) => return Ok(()),
                _ if tokio::time::Instant::now() > deadline => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("etcd not ready: {}", self.logs())));
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The tail of every member's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let log = std::fs::read_to_string(self.dir.join(format!("{}.log", m.name))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            out.push_str(&format!("\n--- {} ---\n", m.name));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    fn spawn(&mut self, i: usize) -> io::Result<()> {
        let cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let data_dir = self.data_dir(i);
        let m = &self.members[i];
        let pid_file = self.dir.join(format!("{}.pid", m.name));
        let _ = std::fs::remove_file(&pid_file);
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("sh")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster, "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &format!("orch-{}", self.dir.display())])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .env("ORCH_ETCD_LOG", self.dir.join(format!("{}.log", m.name)))
            .env("ORCH_ETCD_PID", &pid_file)
            .env("ORCH_ETCD_PARENT", std::process::id().to_string())
            .env("ORCH_ETCD_DIR", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse::<u32>().ok()) {
                break pid;
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "etcd did not start (no pid file)"));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.members[i].running = Some((watchdog, pid));
        Ok(())
    }

    fn wait_port(&self, i: usize, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let addr = ("127.0.0.1", self.members[i].client_port);
        loop {
            if TcpStream::connect(addr).is_ok() {
                return Ok(());
            }
            let gone = self.members[i].running.as_ref().is_none_or(|(_, pid)| !pid_alive(*pid));
            if gone || Instant::now() > deadline {
                return Err(io::Error::other(format!("etcd member {i} did not start: {}", self.logs())));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pid_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by the watchdog) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
