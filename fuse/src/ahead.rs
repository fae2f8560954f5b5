//! Reading small files ahead. A tool that reads a tree (`tar`, `cp -r`, `grep -r`, a
//! build's first pass) reads every small file of a directory it listed, one after the
//! other, and each first read of a file costs a round trip to the host. When the kernel
//! first reads one file of a listed directory, the adapter asks the host for the other
//! small files of that directory in one `read_files` request (docs/PROTOCOL.md §7.1) and
//! answers their first reads from that copy.
//!
//! A copy is the file's whole contents when the host answered. It is dropped when a
//! request that can change the file's data is sent or answered (`changed`), when the
//! kernel forgets the node, and on a reconnect (copies are used only on the connection
//! that answered them); a reply that arrives after a change was sent is not kept (the
//! host may have answered the two in either order). A copy is also dropped once read to
//! its end: the kernel's page cache has it then.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use hexz_protocol::{Op, ReplyBody, MAX_READ_FILES};

use crate::transport::Transport;
use crate::workers::Workers;

/// Files at most this long are read ahead.
pub const SMALL_FILE: u64 = 64 * 1024;
/// Bytes of copies kept at once; beyond, the oldest go.
const MAX_BYTES: usize = 32 << 20;
/// Directories whose small files are remembered (the most recently listed).
const MAX_DIRS: usize = 4096;
/// Listed bytes asked for in one request (the reply must fit one frame too).
const BATCH_BYTES: u64 = 768 * 1024;
/// Nodes remembered as asked for, at most.
const MAX_ASKED_FOR: usize = 1 << 16;
/// Files asked for before the share used decides whether to ask at listing time.
const EAGER_AFTER: u64 = 256;
/// How long a first read waits for a copy already asked for before asking itself.
const WAIT: Duration = Duration::from_secs(5);

struct Small {
    node: u64,
    size: u64,
    /// The name starts with a dot: `.gitignore` and the like, read by tools that walk a
    /// tree without reading it, so reading one is no sign the rest will be read.
    hidden: bool,
}

struct Copy {
    epoch: u64,
    data: Vec<u8>,
}

#[derive(Default)]
struct State {
    /// The small regular files of listed directories, in listing order.
    dirs: HashMap<u64, Vec<Small>>,
    dir_order: VecDeque<u64>,
    /// The directory a small file was listed in.
    parent: HashMap<u64, u64>,
    copies: HashMap<u64, Copy>,
    copy_order: VecDeque<u64>,
    bytes: usize,
    /// Nodes asked for and not yet answered, by request number.
    pending: HashMap<u64, u64>,
    /// Nodes asked for once (answered or not, read or not): not asked for again until
    /// they change. A copy read to its end is gone, but the page cache has the file.
    asked_for: HashSet<u64>,
    next_batch: u64,
    /// Files asked for, and how many of those the kernel then read from their copy
    /// (both halved now and then): while most are used, a walk is reading what it lists.
    asked: u64,
    used: u64,
}

impl State {
    /// A walk reads the files it lists: most copies asked for were used. Then a listed
    /// directory's small files are asked for at once, not at its first read.
    fn eager(&self) -> bool {
        self.asked >= EAGER_AFTER && self.used * 4 >= self.asked * 3
    }

    /// Marks `nodes` asked for (request number returned) and counts them.
    fn ask(&mut self, nodes: &[u64]) -> u64 {
        self.next_batch += 1;
        let batch = self.next_batch;
        if self.asked_for.len() >= MAX_ASKED_FOR {
            self.asked_for.clear();
        }
        for &n in nodes {
            self.pending.insert(n, batch);
            self.asked_for.insert(n);
        }
        self.asked += nodes.len() as u64;
        if self.asked > 2 * EAGER_AFTER {
            self.asked /= 2;
            self.used /= 2;
        }
        batch
    }
}

/// The files of `files` (but `except`) to ask for in one request: no copy, none asked
/// for, not `opened`, within a request's bounds.
fn batch_of<'a>(
    s: &State,
    files: impl Iterator<Item = &'a Small>,
    except: Option<u64>,
    opened: impl Fn(u64) -> bool,
) -> Vec<u64> {
    let mut nodes = Vec::new();
    let mut bytes = 0;
    for f in files {
        if Some(f.node) == except
            || s.copies.contains_key(&f.node)
            || s.pending.contains_key(&f.node)
            || s.asked_for.contains(&f.node)
            || !s.parent.contains_key(&f.node) // the kernel forgot it
            || opened(f.node)
        {
            continue;
        }
        if bytes + f.size > BATCH_BYTES || nodes.len() == MAX_READ_FILES {
            break;
        }
        bytes += f.size;
        nodes.push(f.node);
    }
    nodes
}

struct Job {
    batch: u64,
    nodes: Vec<u64>,
}

pub struct Ahead {
    state: Mutex<State>,
    answered: Condvar,
    conn: Arc<dyn Transport>,
    workers: Arc<Workers>,
    /// This adapter's own `Arc`, for the jobs (which end quietly once it is gone).
    me: Weak<Ahead>,
}

/// One listed entry, as the adapter passes it on.
pub struct Listed<'a> {
    pub node: u64,
    pub name: &'a [u8],
    pub mode: u32,
    pub size: u64,
}

impl Ahead {
    /// Requests go on `conn`, sent by `workers`.
    pub fn start(conn: Arc<dyn Transport>, workers: Arc<Workers>) -> Arc<Ahead> {
        Arc::new_cyclic(|me| Ahead {
            state: Mutex::new(State::default()),
            answered: Condvar::new(),
            conn,
            workers,
            me: me.clone(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A page of `dir`'s listing reached the kernel (`first`: from its start).
    pub fn listed(&self, dir: u64, first: bool, entries: &[Listed<'_>]) {
        let mut s = self.state();
        if first || !s.dirs.contains_key(&dir) {
            if s.dirs.insert(dir, Vec::new()).is_none() {
                s.dir_order.push_back(dir);
            }
            while s.dirs.len() > MAX_DIRS {
                let Some(old) = s.dir_order.pop_front() else {
                    break;
                };
                if let Some(files) = s.dirs.remove(&old) {
                    for f in files {
                        if s.parent.get(&f.node) == Some(&old) {
                            s.parent.remove(&f.node);
                        }
                    }
                }
            }
        }
        let mut add = Vec::new();
        for e in entries {
            if e.mode & libc::S_IFMT == libc::S_IFREG && e.size > 0 && e.size <= SMALL_FILE {
                add.push(Small {
                    node: e.node,
                    size: e.size,
                    hidden: e.name.first() == Some(&b'.'),
                });
            }
        }
        for f in &add {
            s.parent.insert(f.node, dir);
        }
        let mut job = None;
        if s.eager() {
            let nodes = batch_of(&s, add.iter(), None, |_| false);
            if !nodes.is_empty() {
                let batch = s.ask(&nodes);
                job = Some(Job { batch, nodes });
            }
        }
        if let Some(files) = s.dirs.get_mut(&dir) {
            files.extend(add);
        }
        drop(s);
        if let Some(job) = job {
            self.send(job);
        }
    }

    /// Sends `job`'s request on a worker; its answer is kept by [`Ahead::answer`].
    fn send(&self, job: Job) {
        let (conn, me) = (self.conn.clone(), self.me.clone());
        self.workers.run(Box::new(move || {
            let r = conn.call_epoch(Op::ReadFiles {
                nodes: job.nodes.clone(),
                max_size: SMALL_FILE as u32,
            });
            if let Some(me) = me.upgrade() {
                me.answer(job, r.ok());
            }
        }));
    }

    /// A request that can change `node`'s data is about to be sent, or was answered; or
    /// the kernel forgot it: no copy of it is used from now on.
    pub fn changed(&self, node: u64) {
        let mut s = self.state();
        s.pending.remove(&node);
        s.asked_for.remove(&node);
        if let Some(c) = s.copies.remove(&node) {
            s.bytes -= c.data.len();
        }
    }

    /// The kernel forgot `node` (a file or a directory).
    pub fn forget(&self, node: u64) {
        self.changed(node);
        let mut s = self.state();
        s.parent.remove(&node);
        s.dirs.remove(&node);
    }

    /// A read of `node` answered from a copy made on connection `epoch`, waiting for one
    /// already asked for. `None`: there is none; read from the host.
    pub fn read(&self, node: u64, epoch: u64, offset: u64, size: u32) -> Option<Vec<u8>> {
        let mut s = self.state();
        let deadline = Instant::now() + WAIT;
        while s.pending.contains_key(&node) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let (next, _) = self
                .answered
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner());
            s = next;
        }
        let c = s.copies.get(&node)?;
        if c.epoch != epoch {
            return None;
        }
        let len = c.data.len() as u64;
        let start = offset.min(len) as usize;
        let end = offset.saturating_add(size as u64).min(len) as usize;
        let out = c.data[start..end].to_vec();

        if end as u64 == len {
            // Read to its end: the kernel's page cache has it now.
            if let Some(c) = s.copies.remove(&node) {
                s.bytes -= c.data.len();
            }
            s.used += 1;
        }
        Some(out)
    }

    /// The kernel's first read of `node` missed: ask for the other small files of its
    /// directory that have no copy, none asked for, and are not `opened` yet.
    pub fn missed(&self, node: u64, opened: impl Fn(u64) -> bool) {
        let job = {
            let mut s = self.state();
            let Some(&dir) = s.parent.get(&node) else {
                return;
            };
            let Some(files) = s.dirs.get(&dir) else {
                return;
            };
            if files.iter().any(|f| f.node == node && f.hidden) {
                return;
            }
            let nodes = batch_of(&s, files.iter(), Some(node), opened);
            if nodes.is_empty() {
                return;
            }
            let batch = s.ask(&nodes);
            Job { batch, nodes }
        };
        self.send(job);
    }

    /// Keeps what the host answered for `job` (on connection `epoch`), unless a change
    /// was sent meanwhile; wakes the reads waiting for it.
    fn answer(&self, job: Job, r: Option<(ReplyBody, u64)>) {
        let mut s = self.state();
        if let Some((ReplyBody::Files { files }, epoch)) = r {
            for f in files {
                if s.pending.get(&f.node) != Some(&job.batch) {
                    continue; // changed (or forgotten) since it was asked for
                }
                s.pending.remove(&f.node);
                s.bytes += f.data.len();
                let old = s.copies.insert(
                    f.node,
                    Copy {
                        epoch,
                        data: f.data.into_vec(),
                    },
                );
                if let Some(old) = old {
                    s.bytes -= old.data.len();
                } else {
                    s.copy_order.push_back(f.node);
                }
            }
            while s.bytes > MAX_BYTES {
                let Some(old) = s.copy_order.pop_front() else {
                    break;
                };
                if let Some(c) = s.copies.remove(&old) {
                    s.bytes -= c.data.len();
                }
            }
        }
        for n in &job.nodes {
            if s.pending.get(n) == Some(&job.batch) {
                s.pending.remove(n);
            }
        }
        // copy_order may name nodes whose copy is gone: trim it when it grows.
        if s.copy_order.len() > 2 * s.copies.len() + 1024 {
            let State {
                copies, copy_order, ..
            } = &mut *s;
            copy_order.retain(|n| copies.contains_key(n));
        }
        drop(s);
        self.answered.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::CallError;
    use hexz_protocol::ByteBuf;
    use hexz_protocol::{FileData, Limits};
    use std::sync::mpsc::{self, Receiver, SyncSender};

    /// Answers `read_files` with each node's id as its contents, once the test lets it.
    struct Gate {
        asked: Mutex<SyncSender<Vec<u64>>>,
        go: Mutex<Receiver<()>>,
    }

    impl Transport for Gate {
        fn call_epoch(&self, op: Op) -> Result<(ReplyBody, u64), CallError> {
            let Op::ReadFiles { nodes, .. } = op else {
                return Err(CallError::Errno(hexz_protocol::Errno::ENOSYS));
            };
            let _ = self.asked.lock().unwrap().send(nodes.clone());
            let _ = self.go.lock().unwrap().recv();
            let files = nodes
                .iter()
                .map(|&node| FileData {
                    node,
                    data: ByteBuf::from(node.to_le_bytes().to_vec()),
                })
                .collect();
            Ok((ReplyBody::Files { files }, 1))
        }
        fn call_on(&self, _: u64, _: Op) -> Result<ReplyBody, CallError> {
            Err(CallError::Stale)
        }
        fn post_on(&self, _: u64, _: Op) {}
        fn forget(&self, _: &[(u64, u64)]) {}
        fn limits(&self) -> Limits {
            Limits::default()
        }
        fn epoch(&self) -> u64 {
            1
        }
    }

    /// An `Ahead` over a [`Gate`]: what each request asked for, and the sender that lets
    /// the next one be answered.
    fn gated() -> (Arc<Ahead>, Receiver<Vec<u64>>, mpsc::Sender<()>) {
        let (asked_tx, asked) = mpsc::sync_channel(4);
        let (go, go_rx) = mpsc::channel();
        let gate = Arc::new(Gate {
            asked: Mutex::new(asked_tx),
            go: Mutex::new(go_rx),
        });
        (Ahead::start(gate, Workers::start(2)), asked, go)
    }

    fn listed(ahead: &Ahead, dir: u64, nodes: &[(u64, &'static [u8])]) {
        let entries: Vec<Listed<'_>> = nodes
            .iter()
            .map(|&(node, name)| Listed {
                node,
                name,
                mode: libc::S_IFREG | 0o644,
                size: 8,
            })
            .collect();
        ahead.listed(dir, true, &entries);
    }

    #[test]
    fn once_a_walk_reads_what_it_lists_files_are_asked_for_at_listing() {
        let (ahead, asked, go) = gated();
        let names: Vec<Vec<u8>> = (0..300).map(|i| format!("f{i}").into_bytes()).collect();
        let list = |dir: u64, base: u64| {
            let entries: Vec<Listed<'_>> = names
                .iter()
                .enumerate()
                .map(|(i, n)| Listed {
                    node: base + i as u64,
                    name: n,
                    mode: libc::S_IFREG | 0o644,
                    size: 8,
                })
                .collect();
            ahead.listed(dir, true, &entries);
        };
        // Not yet: a listing alone asks for nothing.
        list(1, 1000);
        assert!(asked.recv_timeout(Duration::from_millis(100)).is_err());
        ahead.missed(1000, |_| false);
        assert_eq!(asked.recv().unwrap().len(), 299);
        go.send(()).unwrap();
        for n in 1001..1300 {
            assert!(ahead.read(n, 1, 0, 4096).is_some(), "{n}");
        }
        // Every copy was used: the next listing asks at once.
        list(2, 2000);
        assert_eq!(asked.recv().unwrap().len(), 300);
        go.send(()).unwrap();
        assert!(ahead.read(2000, 1, 0, 4096).is_some());
    }

    #[test]
    fn a_copy_asked_for_before_a_change_is_not_kept_and_others_are_used() {
        let (ahead, asked, go) = gated();
        listed(
            &ahead,
            1,
            &[(10, b"a"), (11, b"b"), (12, b"c"), (13, b".hidden")],
        );
        // The first read of 10 misses and asks for the others (not 10 itself).
        assert_eq!(ahead.read(10, 1, 0, 4096), None);
        ahead.missed(10, |_| false);
        assert_eq!(asked.recv().unwrap(), vec![11, 12, 13]);
        // 12 changes while the request is on its way: its copy must not be kept.
        ahead.changed(12);
        go.send(()).unwrap();
        assert_eq!(
            ahead.read(11, 1, 0, 4096),
            Some(11u64.to_le_bytes().to_vec())
        );
        assert_eq!(
            ahead.read(12, 1, 0, 4096),
            None,
            "a copy older than a change"
        );
        // Copies are used only on the connection that answered them, and slices are
        // bounded by the file's end; read to its end, a copy goes.
        assert_eq!(ahead.read(13, 2, 0, 4096), None);
        assert_eq!(ahead.read(13, 1, 6, 4096), Some(vec![0, 0]));
        assert_eq!(
            ahead.read(13, 1, 0, 4096),
            None,
            "read to its end, then dropped"
        );
        // A miss on a hidden file asks for nothing; nor one whose others are opened.
        listed(&ahead, 2, &[(20, b".gitignore"), (21, b"x")]);
        ahead.missed(20, |_| false);
        listed(&ahead, 3, &[(30, b"y"), (31, b"z")]);
        ahead.missed(30, |n| n == 31);
        assert!(asked.recv_timeout(Duration::from_millis(200)).is_err());
    }
}
