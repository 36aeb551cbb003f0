//! Watches on the index: each is a cursor that reads the shared history at its own pace, so a
//! slow watcher never holds up a writer.

use std::collections::VecDeque;
use std::sync::Weak;
use std::time::Duration;

use orch_core::{Error, Result, Selection, WatchEvent};
use tokio::sync::watch;
use tokio::time::Instant;

use super::index::Inner;

/// Events a watcher takes from the history in one go, so it holds the read lock only briefly.
const WATCH_BATCH: usize = 1024;

/// One watch: a cursor into the shared history.
pub(super) struct Watcher {
    pub(super) inner: Weak<Inner>,
    pub(super) selection: Selection,
    /// Next revision to deliver.
    pub(super) cursor: u64,
    /// Absolute position (counting dropped entries) of the next history entry to look at.
    pub(super) next_index: u64,
    pub(super) rx: watch::Receiver<u64>,
    pub(super) buffer: VecDeque<WatchEvent>,
    pub(super) progress_interval: Option<Duration>,
    /// When the last event (or progress notification) went out.
    pub(super) last_sent: Instant,
    /// The last `fill` read everything there was (it did not stop at the batch limit).
    pub(super) caught_up: bool,
    pub(super) failed: bool,
}

/// The error a watch ends with when its store is dropped or closed.
pub(crate) fn store_closed() -> Error {
    Error::Unavailable { message: "store closed".into(), source: None }
}

impl Watcher {
    /// Moves events from the history into the buffer; false when the store is gone, or closed
    /// and every event it had was read.
    fn fill(&mut self) -> Result<bool> {
        let Some(inner) = self.inner.upgrade() else { return Ok(false) };
        let closed = inner.is_closed();
        self.rx.borrow_and_update();
        let st = inner.read();
        if self.next_index < st.popped {
            // Entries this watcher still needed were dropped.
            return Err(Error::Compacted { requested: self.cursor, compacted: st.floor });
        }
        let start = (self.next_index - st.popped) as usize;
        let mut last_rev = None;
        let mut examined = 0;
        self.caught_up = true;
        for c in st.history.range(start..) {
            if examined >= WATCH_BATCH && last_rev != Some(c.revision) {
                self.caught_up = false;
                break;
            }
            examined += 1;
            // A watch from a future revision skips what comes before it.
            if c.revision < self.cursor {
                continue;
            }
            last_rev = Some(c.revision);
            if c.object.kind != self.selection.kind {
                continue;
            }
            let now = !c.deleted && self.selection.matches(&c.object);
            let before = c.prev.as_ref().is_some_and(|p| self.selection.matches(p));
            let event = match (before, now) {
                (false, true) => WatchEvent::Added(c.object.clone()),
                (true, true) => WatchEvent::Modified(c.object.clone()),
                (true, false) => WatchEvent::Deleted(c.object.clone()),
                (false, false) => continue,
            };
            self.buffer.push_back(event);
        }
        self.next_index += examined as u64;
        match last_rev {
            Some(rev) => self.cursor = rev + 1,
            // Nothing newer: everything up to the current revision has been seen. (Not when the
            // batch ended early on entries before a future start: those are not all examined.)
            None if self.caught_up => self.cursor = self.cursor.max(st.revision + 1),
            None => {}
        }
        Ok(!(closed && self.caught_up && self.buffer.is_empty()))
    }

    /// Ends the stream with the error that says why.
    fn end(&mut self, e: Error) -> Option<Result<WatchEvent>> {
        self.failed = true;
        Some(Err(e))
    }

    /// The next item of the stream. The stream never ends silently: it ends after an error,
    /// `Compacted` or, once its store is dropped or closed (and every event before was
    /// delivered), `Unavailable` ("store closed").
    pub(super) async fn next_event(&mut self) -> Option<Result<WatchEvent>> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(e) = self.buffer.pop_front() {
                self.last_sent = Instant::now();
                return Some(Ok(e));
            }
            // `fill` marks the notification as seen before it reads the history, so once it has
            // caught up nothing new can arrive without `changed` firing: wait before reading
            // again. This halves the work per event when a thousand watchers wake together. A
            // closed store sends no more notifications: read what is left and end.
            if self.caught_up && !self.inner.upgrade().is_none_or(|i| i.is_closed()) {
                match self.progress_interval {
                    Some(interval) => {
                        match tokio::time::timeout_at(self.last_sent + interval, self.rx.changed()).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return self.end(store_closed()),
                            Err(_) => {
                                // Quiet for a whole interval: catch up, and if there is still
                                // nothing for this watcher, say how far it has got.
                                match self.fill() {
                                    Ok(true) => {}
                                    Ok(false) => return self.end(store_closed()),
                                    Err(e) => return self.end(e),
                                }
                                if self.buffer.is_empty() {
                                    self.last_sent = Instant::now();
                                    return Some(Ok(WatchEvent::Progress(self.cursor - 1)));
                                }
                                continue;
                            }
                        }
                    }
                    None => {
                        if self.rx.changed().await.is_err() {
                            return self.end(store_closed());
                        }
                    }
                }
            }
            match self.fill() {
                Ok(true) => {}
                // Events read by this last fill go out first; the next call ends the stream.
                Ok(false) if !self.buffer.is_empty() => {}
                Ok(false) => return self.end(store_closed()),
                Err(e) => return self.end(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use orch_core::{Error, ListRequest, Selection, Store, WatchEvent, WatchRequest, WriteOptions};

    use crate::memory::MemoryStore;
    use crate::memory::tests::obj;

    #[tokio::test(start_paused = true)]
    async fn watcher_behind_trimmed_history_gets_compacted_then_relists() {
        let s = MemoryStore::builder().history_limit(8).build();
        let sel = Selection::kind("Thing");
        let mut slow = s.watch(&WatchRequest::from(sel.clone(), 1)).await.unwrap();
        for i in 0..20 {
            s.create(obj(&format!("o{i:02}")), &WriteOptions::default()).await.unwrap();
        }
        match slow.next().await {
            Some(Err(Error::Compacted { requested: 1, compacted })) => assert!(compacted > 1),
            other => panic!("expected Compacted, got {other:?}"),
        }
        assert!(slow.next().await.is_none(), "the stream ends after its error");
        // Re-list and re-watch from the list's revision: every object once, then live events.
        let page = s.list(&ListRequest::new(sel.clone())).await.unwrap();
        assert_eq!(page.items.len(), 20);
        let mut again = s.watch(&WatchRequest::from(sel, page.revision + 1)).await.unwrap();
        let c = s.create(obj("late"), &WriteOptions::default()).await.unwrap();
        match again.next().await {
            Some(Ok(WatchEvent::Added(o))) => assert_eq!(o.metadata.resource_version, c.metadata.resource_version),
            other => panic!("expected the live event, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_from_a_future_revision_misses_nothing_after_it() {
        let s = MemoryStore::new();
        let mut w = s.watch(&WatchRequest::from(Selection::kind("Thing"), 2000)).await.unwrap();
        for i in 0..3000 {
            s.create(obj(&format!("o{i}")), &WriteOptions::default()).await.unwrap();
        }
        let mut revs = Vec::new();
        while revs.len() < 1001 {
            match w.next().await {
                Some(Ok(e)) => revs.push(e.revision()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(revs.first(), Some(&2000));
        assert_eq!(revs.last(), Some(&3000));
        assert!(revs.windows(2).all(|p| p[1] == p[0] + 1), "a gap or a repeat");
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_store_ends_watches_with_an_error() {
        let s = MemoryStore::new();
        let mut w = s.watch(&WatchRequest::from(Selection::kind("Thing"), 1)).await.unwrap();
        let quiet = WatchRequest { progress_interval: Some(Duration::from_secs(1)), ..Default::default() };
        let mut idle = s.watch(&quiet).await.unwrap();
        s.create(obj("a"), &WriteOptions::default()).await.unwrap();
        assert!(matches!(w.next().await, Some(Ok(WatchEvent::Added(_)))));
        drop(s);
        for w in [&mut w, &mut idle] {
            match w.next().await {
                Some(Err(Error::Unavailable { message, .. })) => assert_eq!(message, "store closed"),
                other => panic!("expected the store-closed error, got {other:?}"),
            }
            assert!(w.next().await.is_none(), "then the stream ends");
        }
    }
}
