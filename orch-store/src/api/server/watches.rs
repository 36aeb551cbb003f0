//! Watches: a collection's changes as a stream of watch lines, each client's count of open
//! watches, the client certificate or stored token a watch was opened with (the watch ends when
//! it expires or is revoked), and the watch lines of recent events, encoded once for every watch that sees them.

use super::*;

/// Counts a client's watch while it is open.
struct WatchSlot(Arc<ClientState>);

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.0.watches.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) async fn watch_collection(
    s: &Arc<Shared>,
    client: &Arc<ClientState>,
    target: Target,
    q: &Query,
    held: Option<Held>,
) -> Answer {
    let Target::Collection { kind, namespace } = target else { unreachable!("only collections are watched") };
    let open = client.watches.fetch_add(1, Ordering::Relaxed);
    let slot = WatchSlot(client.clone());
    if open >= s.limits.max_watches_per_client {
        let mut st = Status::failure(
            429,
            "TooManyRequests",
            format!("this client holds {open} watches, the limit is {}", s.limits.max_watches_per_client),
        );
        st.details.retry_after_seconds = Some(1);
        return Err(st);
    }
    let sel = selection(&kind, namespace.as_deref(), q)?;
    let bookmarks = q.allow_bookmarks || q.progress_interval.is_some();
    let progress_interval = q.progress_interval.or_else(|| q.allow_bookmarks.then_some(s.default_bookmark_interval));
    let err = |e: Error| Status::from_error(&e);
    // Kubernetes' meaning: a watch from resourceVersion N sends what comes after N; without one
    // it first sends the current objects as ADDED. (Kubernetes reads "0" as "from any point",
    // with the current objects first; orch reads it as "after revision 0": the whole history.)
    let (initial, from) = match revision_param(q)? {
        Some(n) => (Vec::new(), n + 1),
        None => {
            let page = s.store.list(&ListRequest::new(sel.clone())).await.map_err(err)?;
            (page.items, page.revision + 1)
        }
    };
    let req = WatchRequest { selection: sel, from_revision: Some(from), progress_interval };
    let stream = s.store.watch(&req).await.map_err(err)?;
    let mut lines: Vec<Bytes> = initial.iter().map(|o| event_line("ADDED", o)).collect();
    lines.reverse();
    let deadline = match (q.timeout, s.limits.max_watch_duration) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let state = WatchState {
        lines: s.lines.clone(),
        initial: lines,
        stream,
        kind,
        bookmarks,
        closing: s.closing.subscribe(),
        deadline: deadline.map(|d| Box::pin(tokio::time::sleep(d))),
        credential: held.map(|h| Credential::new(s.clone(), h, s.limits.revocation_check_interval)),
        done: false,
        _slot: slot,
    };
    let body = Body::from_stream(watch_body(state));
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response())
}

struct WatchState {
    lines: Arc<LineCache>,
    initial: Vec<Bytes>,
    stream: WatchStream,
    kind: String,
    bookmarks: bool,
    closing: watch::Receiver<bool>,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    credential: Option<Credential>,
    done: bool,
    _slot: WatchSlot,
}

/// The client certificate or stored token a watch was opened with: the watch ends when it
/// expires or is revoked, as a new request would be refused.
struct Credential {
    server: Arc<Shared>,
    held: Held,
    every: Duration,
    tick: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Credential {
    fn new(server: Arc<Shared>, held: Held, every: Duration) -> Self {
        let first = Credentials::next_look(&held, every);
        Credential { server, held, every, tick: Box::pin(tokio::time::sleep(first)) }
    }

    /// Resolves when it is time to look; true when the watch must end.
    async fn lapsed(&mut self) -> bool {
        self.tick.as_mut().await;
        if !self.server.credentials.still_good(&self.held).await {
            return true;
        }
        let next = tokio::time::Instant::now() + Credentials::next_look(&self.held, self.every);
        self.tick.as_mut().reset(next);
        false
    }
}

/// The watch lines of recent events, shared by every watch of the server: an event many watches
/// see is encoded once. An object's state at a revision never changes, so (revision, type, key)
/// names a line for good; the oldest lines are dropped past a few thousand.
#[derive(Default)]
pub(super) struct LineCache {
    inner: Mutex<LineCacheInner>,
}

/// A revision and an event type.
type LineId = (u64, &'static str);

#[derive(Default)]
struct LineCacheInner {
    lines: HashMap<LineId, Vec<(Arc<DynamicObject>, Bytes)>>,
    order: std::collections::VecDeque<LineId>,
}

const LINE_CACHE_REVISIONS: usize = 4096;

impl LineCache {
    fn line(&self, kind: &'static str, obj: &Arc<DynamicObject>) -> Bytes {
        let id = (obj.metadata.resource_version, kind);
        let same = |o: &Arc<DynamicObject>| {
            Arc::ptr_eq(o, obj)
                || (o.metadata.name == obj.metadata.name
                    && o.metadata.namespace == obj.metadata.namespace
                    && o.kind == obj.kind)
        };
        {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(hit) = inner.lines.get(&id).and_then(|v| v.iter().find(|(o, _)| same(o))) {
                return hit.1.clone();
            }
        }
        let line = event_line(kind, obj);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let entry = inner.lines.entry(id).or_default();
        if !entry.iter().any(|(o, _)| same(o)) {
            entry.push((obj.clone(), line.clone()));
        }
        if entry.len() == 1 {
            inner.order.push_back(id);
            if inner.order.len() > LINE_CACHE_REVISIONS
                && let Some(old) = inner.order.pop_front()
            {
                inner.lines.remove(&old);
            }
        }
        line
    }
}

fn event_line(kind: &str, obj: &DynamicObject) -> Bytes {
    let mut out = Vec::with_capacity(64 + obj.spec.len() + obj.status.len());
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    serde_json::to_writer(&mut out, &WireObject(obj)).expect("objects serialize");
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

fn watch_body(state: WatchState) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        if let Some(line) = st.initial.pop() {
            return Some((Ok(line), st));
        }
        loop {
            let closing = async {
                let _ = st.closing.wait_for(|c| *c).await;
            };
            let deadline = async {
                match st.deadline.as_mut() {
                    Some(d) => d.await,
                    None => futures::future::pending().await,
                }
            };
            let credential = async {
                match st.credential.as_mut() {
                    Some(c) => c.lapsed().await,
                    None => futures::future::pending().await,
                }
            };
            let next = tokio::select! {
                biased;
                e = st.stream.next() => e,
                _ = closing => return None,
                _ = deadline => return None,
                lapsed = credential => if lapsed { return None } else { continue },
            };
            let line = match next {
                Some(Ok(WatchEvent::Added(o))) => st.lines.line("ADDED", &o),
                Some(Ok(WatchEvent::Modified(o))) => st.lines.line("MODIFIED", &o),
                Some(Ok(WatchEvent::Deleted(o))) => st.lines.line("DELETED", &o),
                Some(Ok(WatchEvent::Progress(r))) => {
                    if !st.bookmarks {
                        continue;
                    }
                    let mut text = wire::bookmark_json(&st.kind, r);
                    text.push('\n');
                    Bytes::from(text)
                }
                Some(Err(e)) => {
                    st.done = true;
                    let status = Status::from_error(&e);
                    let text = format!(
                        "{{\"type\":\"ERROR\",\"object\":{}}}\n",
                        serde_json::to_string(&status).expect("status serializes")
                    );
                    Bytes::from(text)
                }
                None => return None,
            };
            return Some((Ok(line), st));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_encoded_once_for_every_watch() {
        let cache = LineCache::default();
        let mut o = DynamicObject::new("Thing", orch_core::ObjectMeta::namespaced("ns", "a"));
        o.metadata.resource_version = 7;
        let a = Arc::new(o.clone());
        let first = cache.line("ADDED", &a);
        let again = cache.line("ADDED", &Arc::new(o.clone()));
        assert_eq!(first.as_ptr(), again.as_ptr(), "the same event shares its bytes");
        assert_ne!(cache.line("MODIFIED", &a), first, "another type is another line");
        o.metadata.name = "b".into();
        let other = cache.line("ADDED", &Arc::new(o));
        assert!(std::str::from_utf8(&other).unwrap().contains("\"name\":\"b\""), "another object at the same revision");
    }
}
