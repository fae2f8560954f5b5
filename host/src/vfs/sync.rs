//! Group commit: many threads that need "everything up to point P is durable" share one
//! sync call instead of each issuing its own.

use std::sync::{Condvar, Mutex};

#[derive(Default)]
struct State {
    /// Everything up to here is durable.
    synced: u64,
    /// A thread is syncing now; the others wait for it.
    running: bool,
}

#[derive(Default)]
pub struct GroupSync {
    state: Mutex<State>,
    done: Condvar,
}

impl GroupSync {
    /// Returns once everything up to `target` is durable. At most one caller runs `sync`
    /// at a time; `sync` returns the point it made durable (read before it syncs), which
    /// covers every caller whose target was taken before that read. A failed sync is
    /// reported to its caller; waiters then try again themselves.
    pub fn sync_to(
        &self,
        target: u64,
        sync: impl FnOnce() -> std::io::Result<u64>,
    ) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut sync = Some(sync);
        loop {
            if st.synced >= target {
                return Ok(());
            }
            if !st.running {
                st.running = true;
                drop(st);
                let r = match sync.take() {
                    Some(f) => f(),
                    None => Err(std::io::Error::other("sync ran twice")),
                };
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.running = false;
                if let Ok(p) = r {
                    st.synced = st.synced.max(p);
                }
                self.done.notify_all();
                return r.map(|_| ());
            }
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Records that everything up to `point` became durable some other way.
    pub fn mark(&self, point: u64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.synced = st.synced.max(point);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn concurrent_callers_share_syncs_and_none_returns_before_its_point_is_durable() {
        let g = Arc::new(GroupSync::default());
        let written = Arc::new(AtomicU64::new(0));
        let durable = Arc::new(AtomicU64::new(0));
        let syncs = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (g, written, durable, syncs) =
                    (g.clone(), written.clone(), durable.clone(), syncs.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let me = written.fetch_add(1, Ordering::SeqCst) + 1;
                        g.sync_to(me, || {
                            let p = written.load(Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_micros(200));
                            durable.fetch_max(p, Ordering::SeqCst);
                            syncs.fetch_add(1, Ordering::SeqCst);
                            Ok(p)
                        })
                        .unwrap();
                        assert!(durable.load(Ordering::SeqCst) >= me);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(syncs.load(Ordering::SeqCst) < 1600, "no sharing happened");
    }
}
