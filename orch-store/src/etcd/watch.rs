//! Watches on etcd: a selection's changes from a revision on, resumed after a lost connection,
//! with progress notifications.

use super::*;

/// The error a watch ends with once its store is dropped.
fn store_closed() -> Error {
    Error::Unavailable { message: "store closed".into(), source: None }
}

/// Where a watch stands with progress notifications.
///
/// etcd before 3.5 answers a progress request out of band, with its current revision, even
/// while the watch is still catching up from an older revision or has events queued: the answer
/// can overtake events it counts. So an answer's revision is only reported after the watch has
/// then stayed quiet for [`CONFIRM_QUIET`] (catch-up batches come every 100 ms), and any event
/// in between cancels it. The watch's own position (`next`) only ever moves with events, so even
/// a wrong guess would never make it skip one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProgressState {
    /// Nothing asked.
    Idle,
    /// A request is out since then.
    Asked { since: Instant },
    /// etcd answered `revision` at `at`; it is reported if nothing arrives until `at + CONFIRM_QUIET`.
    Candidate { revision: u64, at: Instant },
}

/// How long a watch must stay quiet after a progress answer before it is reported.
const CONFIRM_QUIET: Duration = Duration::from_millis(500);

/// One watch: an etcd watch on the selection's key range, re-opened from the next revision
/// to deliver whenever the connection drops. It does not keep its store alive: once the store
/// is dropped it ends with `Unavailable` ("store closed"), like the other backends' watches.
pub(super) struct Watch {
    pub(super) inner: Weak<Inner>,
    /// Fails once the store is dropped.
    pub(super) dropped: tokio::sync::watch::Receiver<()>,
    pub(super) kind_prefix: Vec<u8>,
    pub(super) selection: Selection,
    pub(super) prefix: Vec<u8>,
    /// The next revision to deliver: everything before it has been delivered.
    pub(super) next: u64,
    pub(super) stream: Option<etcd_client::WatchStream>,
    pub(super) buffer: VecDeque<WatchEvent>,
    pub(super) progress_interval: Option<Duration>,
    /// When the last event (or progress notification) went out.
    pub(super) last_sent: Instant,
    pub(super) progress: ProgressState,
    pub(super) failed: bool,
}

impl Watch {
    /// Opens the etcd watch from `next`, waiting for etcd to confirm it.
    pub(super) async fn open(&mut self) -> Result<()> {
        self.stream = None;
        self.progress = ProgressState::Idle;
        let Some(inner) = self.inner.upgrade() else { return Err(store_closed()) };
        inner.check_floor(self.next).await?;
        let options = WatchOptions::new()
            .with_range(prefix_end(&self.prefix))
            .with_start_revision(to_i64(self.next))
            .with_prev_key();
        let mut wc = inner.watch.clone();
        let mut stream = inner
            .call("open a watch", wc.watch(self.prefix.clone(), Some(options)))
            .await
            .map_err(CallError::into_error)?;
        let first = inner.call("open a watch", stream.message()).await.map_err(CallError::into_error)?;
        match first {
            Some(resp) if resp.created() && !resp.canceled() => {
                self.stream = Some(stream);
                // Events may share the first message on some servers.
                self.take(resp)
            }
            Some(resp) if resp.compact_revision() > 0 => {
                Err(Error::Compacted { requested: self.next, compacted: to_u64(resp.compact_revision()) })
            }
            Some(resp) => Err(Error::Unavailable {
                message: format!("etcd refused the watch: {}", resp.cancel_reason()),
                source: None,
            }),
            None => Err(Error::Unavailable { message: "etcd closed the watch as it opened".into(), source: None }),
        }
    }

    /// Turns one etcd answer into events in the buffer.
    fn take(&mut self, resp: etcd_client::WatchResponse) -> Result<()> {
        if resp.compact_revision() > 0 {
            return Err(Error::Compacted { requested: self.next, compacted: to_u64(resp.compact_revision()) });
        }
        if resp.canceled() {
            return Err(Error::Unavailable {
                message: format!("etcd canceled the watch: {}", resp.cancel_reason()),
                source: None,
            });
        }
        if resp.created() {
            return Ok(());
        }
        if resp.events().is_empty() {
            // A progress answer: everything up to its revision has been sent, except what an
            // older etcd let it overtake (see `ProgressState`).
            let revision = resp.header().map(|h| to_u64(h.revision())).unwrap_or_default();
            if let ProgressState::Asked { .. } = self.progress {
                self.progress = ProgressState::Candidate { revision, at: Instant::now() };
            }
            return Ok(());
        }
        self.progress = ProgressState::Idle;
        let mut last = None;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let rev = to_u64(kv.mod_revision());
            // After a reconnect etcd starts at `next`; anything older was delivered already.
            if rev < self.next {
                continue;
            }
            last = Some(rev);
            let prev = ev.prev_kv().map(decode).transpose()?;
            let event = match ev.event_type() {
                EventType::Put => {
                    let obj = decode(kv)?;
                    let now = self.selection.matches(&obj);
                    // Without the previous value (etcd may have compacted it), a later version
                    // is taken to have matched as it does now.
                    let before = match &prev {
                        Some(p) => self.selection.matches(p),
                        None => kv.version() > 1 && now,
                    };
                    match (before, now) {
                        (false, true) => WatchEvent::Added(Arc::new(obj)),
                        (true, true) => WatchEvent::Modified(Arc::new(obj)),
                        (true, false) => WatchEvent::Deleted(Arc::new(obj)),
                        (false, false) => continue,
                    }
                }
                EventType::Delete => {
                    let mut last_state = match prev {
                        Some(p) if self.selection.matches(&p) => p,
                        Some(_) => continue,
                        None => self.bare_object(kv.key()),
                    };
                    last_state.metadata.version += 1;
                    last_state.metadata.resource_version = rev;
                    WatchEvent::Deleted(Arc::new(last_state))
                }
            };
            self.buffer.push_back(event);
        }
        if let Some(rev) = last {
            self.next = rev + 1;
        }
        Ok(())
    }

    /// The identity of a deleted object whose last state etcd no longer has.
    fn bare_object(&self, key: &[u8]) -> DynamicObject {
        let rest = String::from_utf8_lossy(&key[self.kind_prefix.len().min(key.len())..]);
        let (ns, name) = rest.split_once('!').unwrap_or(("", &rest));
        DynamicObject::new(&self.selection.kind, ObjectMeta::namespaced(ns, name))
    }

    /// The next item of the stream, which never ends silently: it ends after `Compacted`, or
    /// after `Unavailable` ("store closed") once the store is dropped. A lost connection is
    /// not an end: the watch re-opens from the next revision to deliver.
    pub(super) async fn next_event(&mut self) -> Option<Result<WatchEvent>> {
        let mut dropped = self.dropped.clone();
        tokio::select! {
            biased;
            item = self.next_item() => item,
            _ = dropped.changed() => {
                // Events already received still go out first.
                match self.buffer.pop_front() {
                    Some(e) => Some(Ok(e)),
                    None => self.end(store_closed()),
                }
            }
        }
    }

    fn end(&mut self, e: Error) -> Option<Result<WatchEvent>> {
        self.failed = true;
        self.buffer.clear();
        Some(Err(e))
    }

    async fn next_item(&mut self) -> Option<Result<WatchEvent>> {
        // Every watch of a process reconnects after the same etcd restart: jitter spreads them.
        let mut retries = Attempts::new(Backoff::new(Duration::from_millis(50), Duration::from_secs(2)).full_jitter());
        loop {
            if let Some(e) = self.buffer.pop_front() {
                self.last_sent = Instant::now();
                return Some(Ok(e));
            }
            if self.failed {
                return None;
            }
            if self.stream.is_none() {
                match self.open().await {
                    Ok(()) => retries.succeed(),
                    Err(e @ Error::Compacted { .. }) => return self.end(e),
                    Err(_) if self.inner.strong_count() == 0 => return self.end(store_closed()),
                    Err(e) => {
                        tracing::debug!(error = %e, next = self.next, "etcd watch: reconnecting");
                        tokio::time::sleep(retries.fail()).await;
                    }
                }
                continue;
            }
            let message = match self.progress_interval {
                Some(interval) => {
                    let due = match self.progress {
                        ProgressState::Idle => self.last_sent + interval,
                        // An answer that never came: ask again.
                        ProgressState::Asked { since } => since + interval,
                        ProgressState::Candidate { at, .. } => at + CONFIRM_QUIET,
                    };
                    let stream = self.stream.as_mut()?;
                    match tokio::time::timeout_at(due, stream.message()).await {
                        Ok(m) => m,
                        Err(_) => {
                            if let ProgressState::Candidate { revision, .. } = self.progress {
                                let at = revision.max(self.next.saturating_sub(1));
                                self.buffer.push_back(WatchEvent::Progress(at));
                                self.progress = ProgressState::Idle;
                            } else if stream.request_progress().await.is_err() {
                                self.stream = None;
                            } else {
                                self.progress = ProgressState::Asked { since: Instant::now() };
                            }
                            continue;
                        }
                    }
                }
                None => self.stream.as_mut()?.message().await,
            };
            match message {
                Ok(Some(resp)) => {
                    if let Err(e) = self.take(resp) {
                        if e.is_compacted() {
                            return self.end(e);
                        }
                        tracing::debug!(error = %e, "etcd watch: re-opening");
                        self.stream = None;
                    }
                }
                Ok(None) | Err(_) => {
                    tracing::debug!(next = self.next, "etcd watch: connection lost, resuming");
                    self.stream = None;
                }
            }
        }
    }
}
