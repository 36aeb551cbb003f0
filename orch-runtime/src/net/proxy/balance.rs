//! The endpoints of one proxied port and the choice among them: power of two choices on open
//! connections, and draining of endpoints that leave.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use tokio::sync::watch;

/// One endpoint behind a proxied port.
#[derive(Debug)]
pub(crate) struct Backend {
    pub(crate) addr: SocketAddr,
    /// Connections (or UDP sessions) open to it, and connects under way.
    open: AtomicUsize,
    /// True once it left the pool: it takes no new connections, and the open ones get the grace
    /// period to finish. Back to false if it returns before they are cut.
    draining: watch::Sender<bool>,
}

impl Backend {
    fn new(addr: SocketAddr) -> Self {
        Backend { addr, open: AtomicUsize::new(0), draining: watch::channel(false).0 }
    }

    /// Connections open to it now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub(crate) fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Counts one connection until the guard drops.
    pub(crate) fn hold(self: &Arc<Self>) -> OpenGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.clone())
    }

    /// Resolves once the backend has been out of the pool for `grace` without coming back: the
    /// moment its open connections are cut.
    pub(crate) async fn drained(&self, grace: Duration) {
        let mut rx = self.draining.subscribe();
        loop {
            let left = rx.wait_for(|d| *d).await.is_ok();
            if !left {
                return futures::future::pending().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(grace) => return,
                back = async { rx.wait_for(|d| !*d).await.is_ok() } => if !back {
                    return futures::future::pending().await;
                },
            }
        }
    }
}

/// Counts an open connection on its backend while alive.
#[derive(Debug)]
pub(crate) struct OpenGuard(Arc<Backend>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The backends that take new connections on one proxied port.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    live: RwLock<Arc<[Arc<Backend>]>>,
    /// Backends that left recently, so one that comes back keeps its open connections.
    retired: Mutex<HashMap<SocketAddr, Weak<Backend>>>,
}

impl Pool {
    /// The backends taking new connections now.
    pub(crate) fn snapshot(&self) -> Arc<[Arc<Backend>]> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes `addrs` the backends: new ones join, missing ones start draining, a retired one
    /// that returns stops draining.
    pub(crate) fn set(&self, addrs: &[SocketAddr]) {
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        if live.len() == addrs.len() && live.iter().zip(addrs).all(|(b, a)| b.addr == *a) {
            return;
        }
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        let mut current: HashMap<SocketAddr, Arc<Backend>> = live.iter().map(|b| (b.addr, b.clone())).collect();
        let mut next = Vec::with_capacity(addrs.len());
        for a in addrs {
            let b = current
                .remove(a)
                .or_else(|| retired.remove(a).and_then(|w| w.upgrade()))
                .unwrap_or_else(|| Arc::new(Backend::new(*a)));
            if b.is_draining() {
                b.draining.send_replace(false);
            }
            if !next.iter().any(|n: &Arc<Backend>| n.addr == *a) {
                next.push(b);
            }
        }
        for (addr, gone) in current {
            gone.draining.send_replace(true);
            retired.insert(addr, Arc::downgrade(&gone));
        }
        retired.retain(|_, w| w.strong_count() > 0);
        *live = next.into();
    }

    /// Drains every backend (the port is no longer served).
    pub(crate) fn close(&self) {
        self.set(&[]);
    }
}

/// Power of two choices: two distinct backends at random (leaving out `tried`), the one with
/// fewer open connections. `None` when none is left.
pub(crate) fn pick(backends: &[Arc<Backend>], tried: &[SocketAddr]) -> Option<Arc<Backend>> {
    let n = backends.len();
    if tried.is_empty() {
        return match n {
            0 => None,
            1 => Some(backends[0].clone()),
            _ => {
                let i = fastrand::usize(..n);
                let mut j = fastrand::usize(..n - 1);
                if j >= i {
                    j += 1;
                }
                let (a, b) = (&backends[i], &backends[j]);
                Some(if b.open() < a.open() { b.clone() } else { a.clone() })
            }
        };
    }
    let left: Vec<&Arc<Backend>> = backends.iter().filter(|b| !tried.contains(&b.addr)).collect();
    match left.len() {
        0 => None,
        1 => Some(left[0].clone()),
        m => {
            let i = fastrand::usize(..m);
            let mut j = fastrand::usize(..m - 1);
            if j >= i {
                j += 1;
            }
            let (a, b) = (left[i], left[j]);
            Some(if b.open() < a.open() { b.clone() } else { a.clone() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 10_000 + i))
    }

    #[test]
    fn the_less_loaded_of_two_wins() {
        let pool = Pool::default();
        pool.set(&[addr(1), addr(2)]);
        let snap = pool.snapshot();
        let _held: Vec<OpenGuard> = (0..3).map(|_| snap[0].hold()).collect();
        for _ in 0..50 {
            assert_eq!(pick(&snap, &[]).unwrap().addr, addr(2));
        }
    }

    #[test]
    fn a_backend_that_leaves_drains_and_one_that_returns_keeps_its_connections() {
        let pool = Pool::default();
        pool.set(&[addr(1), addr(2)]);
        let first = pool.snapshot()[0].clone();
        let guard = first.hold();
        pool.set(&[addr(2)]);
        assert!(first.is_draining());
        assert!(pool.snapshot().iter().all(|b| b.addr != addr(1)));
        pool.set(&[addr(1), addr(2)]);
        let back = pool.snapshot()[0].clone();
        assert!(Arc::ptr_eq(&first, &back), "the same backend returns");
        assert!(!back.is_draining());
        assert_eq!(back.open(), 1);
        drop(guard);
        assert_eq!(back.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn open_connections_are_cut_after_the_grace_period_unless_it_returns() {
        let pool = Pool::default();
        pool.set(&[addr(1)]);
        let b = pool.snapshot()[0].clone();
        let grace = Duration::from_secs(10);
        let start = tokio::time::Instant::now();
        pool.close();
        b.drained(grace).await;
        assert_eq!(start.elapsed(), grace);

        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.drained(grace).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        pool.set(&[addr(1)]);
        tokio::time::sleep(grace * 3).await;
        assert!(!waiter.is_finished(), "a backend that came back is not cut");
        waiter.abort();
    }

    proptest! {
        #[test]
        fn pick_never_returns_a_tried_or_unknown_backend(n in 0usize..8, tried_mask in 0u8..=255) {
            let pool = Pool::default();
            let addrs: Vec<SocketAddr> = (0..n as u16).map(addr).collect();
            pool.set(&addrs);
            let tried: Vec<SocketAddr> = addrs.iter().enumerate().filter(|(i, _)| tried_mask & (1 << i) != 0).map(|(_, a)| *a).collect();
            let snap = pool.snapshot();
            match pick(&snap, &tried) {
                Some(b) => {
                    prop_assert!(addrs.contains(&b.addr));
                    prop_assert!(!tried.contains(&b.addr));
                }
                None => prop_assert!(addrs.iter().all(|a| tried.contains(a))),
            }
        }

        #[test]
        fn set_keeps_each_address_once_in_order(addrs in proptest::collection::vec(0u16..6, 0..10)) {
            let pool = Pool::default();
            pool.set(&[addr(0), addr(3)]);
            let addrs: Vec<SocketAddr> = addrs.into_iter().map(addr).collect();
            pool.set(&addrs);
            let mut expect: Vec<SocketAddr> = Vec::new();
            for a in &addrs {
                if !expect.contains(a) {
                    expect.push(*a);
                }
            }
            let got: Vec<SocketAddr> = pool.snapshot().iter().map(|b| b.addr).collect();
            prop_assert_eq!(got, expect);
        }
    }
}
