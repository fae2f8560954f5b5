//! The vsock transport between host and guest, in one of two forms:
//! - **kernel**: `/dev/vhost-vsock` exists; QEMU gives the guest a CID and the host
//!   listens on AF_VSOCK ports;
//! - **hybrid**: no vhost-vsock; the user-space backend `vhost-device-vsock` carries the
//!   guest's vsock, and a guest connection to CID 2 port P arrives on the host's Unix
//!   socket `<uds>_P` (the Firecracker convention).
//!
//! Nothing here opens an AF_VSOCK socket unless the kernel form was picked.

use std::fs::File;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

pub const BACKEND: &str = "vhost-device-vsock";
pub const BACKEND_INSTALL: &str = "cargo install vhost-device-vsock --version 0.3.0 --locked";
/// The guest's CID with the hybrid backend (each VM has its own backend, so it can repeat).
const HYBRID_GUEST_CID: u32 = 3;

/// True when this host has the kernel's vhost-vsock device.
pub fn kernel_vsock_available() -> bool {
    Path::new("/dev/vhost-vsock").exists()
}

/// The user-space backend's binary: on `PATH`, else in cargo's install directory.
pub fn backend_binary() -> Result<PathBuf> {
    if let Some(p) = super::find_in_path(BACKEND) {
        return Ok(p);
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(p) = home.map(|h| h.join("bin").join(BACKEND)) {
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::Invalid(format!(
        "{BACKEND} not found (this host has no /dev/vhost-vsock, so the guest's vsock needs the user-space backend): install it with `{BACKEND_INSTALL}`"
    )))
}

/// A running `vhost-device-vsock` for one VM; killed when dropped.
pub struct HybridBackend {
    child: Child,
    /// The vhost-user socket QEMU connects to.
    pub vhost_socket: PathBuf,
    /// The hybrid-vsock base path: guest port P is `<uds>_P`.
    pub uds: PathBuf,
}

impl HybridBackend {
    /// Starts the backend in `dir` and waits (bounded) until its vhost-user socket exists.
    pub fn start(binary: &Path, dir: &Path, log: File) -> Result<HybridBackend> {
        let vhost_socket = dir.join("vhost.sock");
        let uds = dir.join("vm.vsock");
        let mut cmd = Command::new(binary);
        cmd.arg("--guest-cid")
            .arg(HYBRID_GUEST_CID.to_string())
            .arg("--socket")
            .arg(&vhost_socket)
            .arg("--uds-path")
            .arg(&uds)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| Error::io("vsock log", e))?)
            .stderr(log);
        let child = super::spawn_owned(&mut cmd, false)
            .map_err(|e| Error::Invalid(format!("cannot start {}: {e}", binary.display())))?;
        let mut backend = HybridBackend {
            child,
            vhost_socket,
            uds,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !backend.vhost_socket.exists() {
            if let Ok(Some(status)) = backend.child.try_wait() {
                return Err(Error::Invalid(format!(
                    "{BACKEND} exited at start ({status}); reinstall it with `{BACKEND_INSTALL}`"
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Invalid(format!(
                    "{BACKEND} did not create {} within 10 s",
                    backend.vhost_socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(backend)
    }

    /// The Unix socket a guest connection to host port `port` arrives on.
    pub fn port_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds.display()))
    }
}

impl Drop for HybridBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the guest's connections to one host port arrive; polled, never blocking.
pub enum PortListener {
    Hybrid(UnixListener, PathBuf),
    /// AF_VSOCK, accepting only the guest's CID.
    Kernel {
        fd: std::os::fd::OwnedFd,
        cid: u32,
    },
}

impl PortListener {
    pub fn hybrid(path: PathBuf) -> Result<PortListener> {
        let l = UnixListener::bind(&path).map_err(|e| Error::io(&path, e))?;
        l.set_nonblocking(true).map_err(|e| Error::io(&path, e))?;
        Ok(PortListener::Hybrid(l, path))
    }

    /// Listens on AF_VSOCK `port` (hosts with /dev/vhost-vsock only).
    pub fn kernel(port: u32, cid: u32) -> Result<PortListener> {
        use nix::sys::socket::VsockAddr;
        use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};
        use std::os::fd::AsRawFd;
        let what = format!("vsock port {port}");
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| Error::io(&what, e.into()))?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))
            .map_err(|e| Error::io(&what, e.into()))?;
        listen(
            &fd,
            Backlog::new(4).map_err(|e| Error::io(&what, e.into()))?,
        )
        .map_err(|e| Error::io(&what, e.into()))?;
        Ok(PortListener::Kernel { fd, cid })
    }

    /// A connection if one is waiting (set to blocking), else `None`.
    pub fn try_accept(&self) -> Result<Option<File>> {
        match self {
            PortListener::Hybrid(l, path) => match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).map_err(|e| Error::io(path, e))?;
                    Ok(Some(File::from(std::os::fd::OwnedFd::from(s))))
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(Error::io(path, e)),
            },
            PortListener::Kernel { fd, cid } => {
                use nix::sys::socket::{accept4, getpeername, SockFlag, VsockAddr};
                use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
                match accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                    // SAFETY: accept4 returned a new descriptor that nothing else owns.
                    Ok(raw) => {
                        let conn = unsafe { OwnedFd::from_raw_fd(raw) };
                        let peer = getpeername::<VsockAddr>(conn.as_raw_fd())
                            .map_err(|e| Error::io("vsock peer", e.into()))?;
                        if peer.cid() != *cid {
                            tracing::warn!("refused a vsock connection from CID {}", peer.cid());
                            return Ok(None);
                        }
                        Ok(Some(File::from(conn)))
                    }
                    Err(nix::errno::Errno::EAGAIN) => Ok(None),
                    Err(e) => Err(Error::io("vsock accept", e.into())),
                }
            }
        }
    }
}

impl Drop for PortListener {
    fn drop(&mut self) {
        if let PortListener::Hybrid(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}
