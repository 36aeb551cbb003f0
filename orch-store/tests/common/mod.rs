//! Test helpers shared by the integration tests.

#![allow(dead_code, unreachable_pub)]

#[cfg(feature = "etcd")]
pub mod etcd;

/// A directory for this test process's store files: `<target tmp>/<suite>/<pid>`. Every test
/// runs in its own process under nextest, so each gets its own directory; the directories of
/// processes that have ended are removed here, so runs do not pile up files.
pub fn scratch_dir(suite: &str) -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let parent = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(suite);
        for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            let ended = match entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
                Some(pid) => !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                None => true,
            };
            if ended {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = parent.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory for the store files");
        dir
    })
    .clone()
}

/// Reads `watch` until it ends, for at most `limit`: its last error, or `None` when it ended
/// without one. Panics when it does not end in time.
pub async fn watch_end(watch: &mut orch_core::WatchStream, limit: std::time::Duration) -> Option<String> {
    use futures::StreamExt;
    tokio::time::timeout(limit, async {
        loop {
            match watch.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(e.to_string()),
                None => return None,
            }
        }
    })
    .await
    .expect("the watch ends")
}
