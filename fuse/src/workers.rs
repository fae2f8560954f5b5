//! The threads that send read-ahead requests in the background, shared by the small
//! files read ahead (`ahead.rs`) and the listings read ahead (`prelist.rs`).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

pub type Job = Box<dyn FnOnce() + Send>;

pub struct Workers {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl Workers {
    /// `n` threads, each running one job at a time (a job waits for its reply).
    pub fn start(n: usize) -> Arc<Workers> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..n {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("hexz-ahead-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return, // the adapter is gone
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("no read-ahead thread: {e}");
            }
        }
        Arc::new(Workers {
            jobs: Mutex::new(tx),
        })
    }

    /// Runs `job` on a worker; if none is left, here (rather than leave it pending).
    pub fn run(&self, job: Job) {
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job);
        if let Err(mpsc::SendError(job)) = sent {
            job();
        }
    }
}
