//! Booting a snapshot in a QEMU microVM: the guest image (`image.rs`, `cpio.rs`), the
//! vsock transport (`vsock.rs`), a raw stream as its disk (`disk.rs`), programs copied
//! into the image (`programs.rs`), QEMU itself (`qemu.rs`, QMP in `qmp.rs`), the sandbox
//! that ties them to a VFS server (`sandbox.rs`), `hexz-host run`, the host end of
//! docs/PROTOCOL.md §12 (`exec.rs`), and memory templates that `run` restores instead of
//! booting (`template/`).

pub mod cpio;
pub mod disk;
pub mod exec;
pub mod image;
pub mod programs;
pub mod qemu;
pub mod qmp;
pub mod sandbox;
pub mod template;
pub mod vsock;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::Instant;

/// Set (to anything) to have `run`/`serve --vm` print when each start-up step ends, on
/// the host and — through `hexz.trace` on the kernel command line — in the guest.
pub const TRACE_ENV: &str = "HEXZ_TRACE";

/// True when start-up steps are traced (`HEXZ_TRACE`, read once).
pub fn tracing_startup() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os(TRACE_ENV).is_some())
}

/// With `HEXZ_TRACE`: prints the time since the first call and `step` to stderr.
pub fn trace(step: &str) {
    static START: OnceLock<Instant> = OnceLock::new();
    if tracing_startup() {
        let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
        eprintln!("hexz-host: +{t:.3} s {step}");
    }
}

/// The first `name` on `PATH` that is a file.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Spawns a helper (QEMU, the vsock backend) that must not outlive this process: it gets
/// SIGKILL when this process dies, even by SIGKILL, and — unless it needs the terminal —
/// its own process group, so a terminal's Ctrl-C reaches only us and we decide how to
/// stop it. Call from the main thread: the death signal follows the spawning thread.
pub fn spawn_owned(cmd: &mut Command, needs_terminal: bool) -> std::io::Result<Child> {
    if !needs_terminal {
        cmd.process_group(0);
    }
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}
