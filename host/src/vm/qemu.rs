//! QEMU's command line for a hexz microVM, and the running QEMU process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

pub const QEMU: &str = "qemu-system-x86_64";

/// How the guest's CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// The guest's vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VsockDevice {
    /// vhost-user, served by vhost-device-vsock on this socket (needs shared memory).
    VhostUser { socket: PathBuf },
    /// The kernel's vhost-vsock, with this guest CID.
    Kernel { cid: u32 },
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Console {
    /// To this file; QEMU's own stdin is closed.
    Log(PathBuf),
    /// To the user's terminal (`-nographic`; Ctrl-A X quits QEMU).
    Terminal,
}

#[derive(Clone, Debug)]
pub struct Machine {
    pub accel: Accel,
    pub memory_mib: u64,
    pub cpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel command line after the fixed part (`hexz.*=` settings).
    pub extra_cmdline: String,
    pub vsock: VsockDevice,
    pub console: Console,
    /// An NBD server's Unix socket whose export becomes the guest's virtio-blk disk
    /// (`/dev/vda`).
    pub nbd_disk: Option<PathBuf>,
}

/// The QEMU binary on `PATH`.
pub fn binary() -> Result<PathBuf> {
    super::find_in_path(QEMU).ok_or_else(|| {
        Error::Invalid(format!(
            "{QEMU} not found: install it (Debian: `apt-get install --no-install-recommends qemu-system-x86`; see images/README.md when qemu-utils is newer)"
        ))
    })
}

/// True when `/dev/kvm` opens and answers the API version query. (A host where KVM
/// answers but cannot run guests must be forced to TCG with `--accel tcg`.)
pub fn kvm_usable() -> bool {
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    else {
        return false;
    };
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a number.
    let v = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), KVM_GET_API_VERSION, 0) };
    v == 12
}

/// The host TSC frequency in kHz (from /proc/cpuinfo); the microvm machine hangs at boot
/// under TCG unless the kernel is told it (`tsc_early_khz`).
pub fn tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// The guest kernel's command line: the fixed part, then `extra` (`hexz.*=` settings).
pub fn kernel_cmdline(extra: &str) -> String {
    // cryptomgr.notests: the kernel's boot-time self-tests of every crypto algorithm it
    // registers cost ~0.4 s under TCG (docs/BENCHMARKS.md, start-up); `fips=1` would
    // still force them.
    let mut c = String::from("console=ttyS0 panic=-1 quiet reboot=t cryptomgr.notests");
    if let Some(khz) = tsc_khz() {
        c.push_str(&format!(" tsc_early_khz={khz}"));
    }
    if !extra.is_empty() {
        c.push(' ');
        c.push_str(extra);
    }
    c
}

impl Machine {
    pub fn cmdline(&self) -> String {
        kernel_cmdline(&self.extra_cmdline)
    }

    /// The full QEMU command (not started).
    pub fn command(&self, qemu: &Path) -> Command {
        let mut cmd = Command::new(qemu);
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", "max"),
        };
        let mem = format!("{}M", self.memory_mib);
        cmd.args(["-accel", accel, "-cpu", cpu, "-m", &mem]);
        cmd.args(["-smp", &self.cpus.to_string()]);
        match &self.vsock {
            VsockDevice::VhostUser { socket } => {
                cmd.args(["-M", "microvm,memory-backend=mem"]);
                cmd.arg("-object")
                    .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"));
                cmd.arg("-chardev")
                    .arg(format!("socket,id=vsock,path={}", socket.display()));
                cmd.args(["-device", "vhost-user-vsock-device,chardev=vsock"]);
            }
            VsockDevice::Kernel { cid } => {
                cmd.args(["-M", "microvm"]);
                cmd.arg("-device")
                    .arg(format!("vhost-vsock-device,guest-cid={cid}"));
            }
        }
        if let Some(socket) = &self.nbd_disk {
            // JSON, so no character of the path can be taken for an option separator.
            let spec = serde_json::json!({
                "driver": "raw",
                "node-name": "disk0",
                "file": {
                    "driver": "nbd",
                    "server": {"type": "unix", "path": socket.to_string_lossy()},
                },
            });
            cmd.arg("-blockdev").arg(spec.to_string());
            cmd.args(["-device", "virtio-blk-device,drive=disk0"]);
        }
        cmd.arg("-kernel").arg(&self.kernel);
        cmd.arg("-initrd").arg(&self.initrd);
        cmd.arg("-append").arg(self.cmdline());
        cmd.args(["-no-reboot", "-no-user-config"]);
        cmd.args(bench_extra_args());
        match &self.console {
            Console::Log(path) => {
                cmd.args(["-display", "none", "-monitor", "none"]);
                cmd.arg("-serial").arg(format!("file:{}", path.display()));
                cmd.stdin(Stdio::null());
            }
            Console::Terminal => {
                cmd.arg("-nographic");
            }
        }
        cmd
    }
}

/// Benchmark hook (bench/vm.sh): extra QEMU arguments from `HEXZ_QEMU_EXTRA_ARGS`,
/// split on whitespace, appended as they are (e.g. a virtio-9p or vhost-user-fs device
/// beside the workspace, to compare them in the same guest). Not for production use:
/// nothing checks them.
pub const EXTRA_ARGS_ENV: &str = "HEXZ_QEMU_EXTRA_ARGS";

fn bench_extra_args() -> Vec<String> {
    std::env::var(EXTRA_ARGS_ENV)
        .map(|v| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// A running QEMU; killed when dropped.
pub struct Qemu {
    child: Child,
}

impl Qemu {
    /// Starts a headless QEMU command built elsewhere (a memory template's), its stdout
    /// and stderr to `log`.
    pub fn spawn(mut cmd: Command, log: std::fs::File) -> Result<Qemu> {
        let out = log.try_clone().map_err(|e| Error::io("qemu log", e))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(log);
        let child = super::spawn_owned(&mut cmd, false)
            .map_err(|e| Error::Invalid(format!("cannot start {:?}: {e}", cmd.get_program())))?;
        Ok(Qemu { child })
    }

    pub fn start(machine: &Machine, qemu: &Path, log: std::fs::File) -> Result<Qemu> {
        let mut cmd = machine.command(qemu);
        if let Console::Log(_) = machine.console {
            let out = log.try_clone().map_err(|e| Error::io("qemu log", e))?;
            cmd.stdout(out).stderr(log);
        } else {
            cmd.stderr(log);
        }
        let child = super::spawn_owned(&mut cmd, machine.console == Console::Terminal)
            .map_err(|e| Error::Invalid(format!("cannot start {}: {e}", qemu.display())))?;
        Ok(Qemu { child })
    }

    /// The exit status once QEMU has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `limit` for QEMU to exit by itself (the guest powered off), then kills it.
    pub fn stop(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait(&mut self) -> Option<ExitStatus> {
        self.child.wait().ok()
    }
}

impl Drop for Qemu {
    /// SIGTERM first, so QEMU restores a terminal it put in raw mode; SIGKILL after 2 s.
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        self.stop(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_with_vhost_user_uses_shared_memory_and_logs_the_console() {
        let m = Machine {
            accel: Accel::Tcg,
            memory_mib: 512,
            cpus: 1,
            kernel: "/k".into(),
            initrd: "/i".into(),
            extra_cmdline: "hexz.exec_port=5002".into(),
            vsock: VsockDevice::VhostUser {
                socket: "/d/vhost.sock".into(),
            },
            console: Console::Log("/d/console.log".into()),
            nbd_disk: Some("/d/disk,0.sock".into()),
        };
        let args: Vec<String> = m
            .command(Path::new("qemu"))
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg -cpu max -m 512M"));
        assert!(joined.contains("-M microvm,memory-backend=mem"));
        assert!(joined.contains("memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(joined.contains("vhost-user-vsock-device,chardev=vsock"));
        assert!(joined.contains("-serial file:/d/console.log"));
        assert!(m.cmdline().ends_with("hexz.exec_port=5002"));
        assert!(!joined.contains("-nographic"));
        assert!(joined.contains(r#""path":"/d/disk,0.sock""#));
        assert!(joined.contains("virtio-blk-device,drive=disk0"));
    }

    #[test]
    fn kvm_with_kernel_vsock_names_the_guest_cid() {
        let m = Machine {
            accel: Accel::Kvm,
            memory_mib: 256,
            cpus: 2,
            kernel: "/k".into(),
            initrd: "/i".into(),
            extra_cmdline: String::new(),
            vsock: VsockDevice::Kernel { cid: 42 },
            console: Console::Terminal,
            nbd_disk: None,
        };
        let joined: Vec<String> = m
            .command(Path::new("qemu"))
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = joined.join(" ");
        assert!(joined.contains("-accel kvm -cpu host"));
        assert!(joined.contains("vhost-vsock-device,guest-cid=42"));
        assert!(joined.contains("-nographic"));
        assert!(!joined.contains("memfd"));
        assert!(!joined.contains("-blockdev"));
    }
}
