//! The one spelling of a hexz endpoint, shared by the guest (`--connect`) and the server
//! (`--listen`). Parsing and printing only: no sockets here.
//!
//! | spelling | guest (connects) | server (listens) |
//! |---|---|---|
//! | `vsock:CID:PORT` | AF_VSOCK to CID (the host is 2) | AF_VSOCK on PORT, accepting only peer CID (the VM's) |
//! | `vsock-uds:PATH[:PORT]` | the Unix socket `PATH_PORT` | binds `PATH_PORT` (the hybrid-vsock convention of Firecracker, Cloud Hypervisor, vhost-device-vsock) |
//! | `unix:PATH` | the Unix socket PATH | binds PATH |
//! | `tcp:IP:PORT` | TCP to IP:PORT | TCP on IP:PORT, loopback only ([`Addr::check_listen`]) |
//!
//! `PORT` defaults to [`DEFAULT_VSOCK_PORT`] only in `vsock-uds`; `Display` always prints
//! it, and parsing what `Display` printed gives the same address back.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// The host's CID as a guest sees it (`VMADDR_CID_HOST`).
pub const HOST_CID: u32 = 2;
/// The port the guest daemon connects to by default.
pub const DEFAULT_VSOCK_PORT: u32 = 5001;

/// Where a hexz server is (for a client) or listens (for the server).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Addr {
    /// AF_VSOCK. For a client, `cid` is the CID to connect to (normally [`HOST_CID`]);
    /// for the server, the one peer CID it accepts (the VM's CID); it listens on `port`.
    Vsock { cid: u32, port: u32 },
    /// Hybrid vsock: a guest connecting to CID 2 port `port` reaches the Unix socket
    /// `<path>_<port>` on the host ([`Addr::socket_path`]).
    VsockUds { path: PathBuf, port: u32 },
    /// A Unix stream socket.
    Unix(PathBuf),
    /// TCP. A server only listens on loopback ([`Addr::check_listen`]).
    Tcp(SocketAddr),
    /// A virtio-serial port's character device in a guest (`/dev/vport0p2`): a client
    /// opens it read-write; the host end is a QEMU chardev. Clients only.
    VirtioPort(PathBuf),
}

/// Why an address string was refused; the message names the expected spellings.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AddrError(pub String);

const SPELLINGS: &str =
    "vsock:CID:PORT, vsock-uds:PATH[:PORT], unix:PATH, tcp:IP:PORT or virtio-port:PATH";

fn number(s: &str, what: &str, whole: &str) -> Result<u32, AddrError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AddrError(format!("'{whole}': {what} must be a number")));
    }
    s.parse()
        .map_err(|_| AddrError(format!("'{whole}': {what} is out of range")))
}

impl FromStr for Addr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Addr, AddrError> {
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| AddrError(format!("'{s}': expected {SPELLINGS}")))?;
        match kind {
            "vsock" => {
                let (cid, port) = rest.split_once(':').ok_or_else(|| {
                    AddrError(format!(
                        "'{s}': expected vsock:CID:PORT (the guest connects to CID {HOST_CID}; \
                         a server names the VM's CID it accepts)"
                    ))
                })?;
                Ok(Addr::Vsock {
                    cid: number(cid, "the vsock CID", s)?,
                    port: number(port, "the vsock port", s)?,
                })
            }
            "vsock-uds" => {
                let (path, port) = match rest.rsplit_once(':') {
                    Some((p, port))
                        if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) =>
                    {
                        (p, number(port, "the vsock port", s)?)
                    }
                    _ => (rest, DEFAULT_VSOCK_PORT),
                };
                if path.is_empty() {
                    return Err(AddrError(format!("'{s}': empty path")));
                }
                Ok(Addr::VsockUds {
                    path: PathBuf::from(path),
                    port,
                })
            }
            "unix" if !rest.is_empty() => Ok(Addr::Unix(PathBuf::from(rest))),
            "unix" => Err(AddrError(format!("'{s}': empty path"))),
            "virtio-port" if !rest.is_empty() => Ok(Addr::VirtioPort(PathBuf::from(rest))),
            "virtio-port" => Err(AddrError(format!("'{s}': empty path"))),
            "tcp" => rest.parse().map(Addr::Tcp).map_err(|_| {
                AddrError(format!(
                    "'{s}': expected tcp:IP:PORT (an IP address, not a host name)"
                ))
            }),
            _ => Err(AddrError(format!(
                "'{s}': unknown kind '{kind}': expected {SPELLINGS}"
            ))),
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Addr::VsockUds { path, port } => write!(f, "vsock-uds:{}:{port}", path.display()),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(a) => write!(f, "tcp:{a}"),
            Addr::VirtioPort(p) => write!(f, "virtio-port:{}", p.display()),
        }
    }
}

impl Addr {
    /// The Unix socket this address binds or connects to, if it is one: `PATH` for
    /// `unix`, `<PATH>_<PORT>` for `vsock-uds`.
    pub fn socket_path(&self) -> Option<PathBuf> {
        match self {
            Addr::VsockUds { path, port } => {
                let mut p = path.clone().into_os_string();
                p.push(format!("_{port}"));
                Some(PathBuf::from(p))
            }
            Addr::Unix(p) => Some(p.clone()),
            Addr::Vsock { .. } | Addr::Tcp(_) | Addr::VirtioPort(_) => None,
        }
    }

    /// Whether a server may listen here: TCP only on loopback (the protocol has no
    /// authentication of its own).
    pub fn check_listen(&self) -> Result<(), AddrError> {
        match self {
            Addr::Tcp(a) if !a.ip().is_loopback() => Err(AddrError(format!(
                "'{self}': refusing a non-loopback address: the protocol has no \
                 authentication; use vsock or a Unix socket"
            ))),
            Addr::VirtioPort(_) => Err(AddrError(format!(
                "'{self}': a virtio port is a guest's client end; a server cannot listen on it"
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Addr, AddrError> {
        s.parse()
    }

    #[test]
    fn every_spelling_parses_and_prints_back() {
        let cases = [
            ("vsock:2:5001", Addr::Vsock { cid: 2, port: 5001 }),
            (
                "vsock-uds:/run/vm.vsock:6000",
                Addr::VsockUds {
                    path: "/run/vm.vsock".into(),
                    port: 6000,
                },
            ),
            ("unix:/run/h.sock", Addr::Unix("/run/h.sock".into())),
            (
                "tcp:127.0.0.1:7000",
                Addr::Tcp("127.0.0.1:7000".parse().unwrap()),
            ),
            ("tcp:[::1]:7000", Addr::Tcp("[::1]:7000".parse().unwrap())),
            (
                "virtio-port:/dev/vport0p2",
                Addr::VirtioPort("/dev/vport0p2".into()),
            ),
        ];
        for (s, want) in cases {
            assert_eq!(p(s), Ok(want.clone()), "{s}");
            assert_eq!(want.to_string(), s);
            assert_eq!(p(&want.to_string()), Ok(want));
        }
    }

    #[test]
    fn vsock_uds_port_is_optional_and_the_socket_is_path_underscore_port() {
        let a = p("vsock-uds:/run/vm.vsock").unwrap();
        assert_eq!(
            a,
            Addr::VsockUds {
                path: "/run/vm.vsock".into(),
                port: DEFAULT_VSOCK_PORT
            }
        );
        assert_eq!(a.socket_path(), Some(PathBuf::from("/run/vm.vsock_5001")));
        assert_eq!(p(&a.to_string()), Ok(a));
        // A colon in the path that is not followed by a port stays in the path.
        assert_eq!(
            p("vsock-uds:/a:b/c"),
            Ok(Addr::VsockUds {
                path: "/a:b/c".into(),
                port: DEFAULT_VSOCK_PORT
            })
        );
        assert_eq!(
            p("unix:/x").unwrap().socket_path(),
            Some(PathBuf::from("/x"))
        );
        assert_eq!(p("vsock:3:5001").unwrap().socket_path(), None);
    }

    #[test]
    fn bad_spellings_are_refused_with_the_expected_forms() {
        for s in [
            "vsock:5001", // the old server spelling: the CID is required now
            "vsock:2",
            "vsock:x:5001",
            "vsock:2:",
            "vsock:2:99999999999",
            "vsock:-1:5",
            "vsock-uds:",
            "vsock-uds::5001",
            "unix:",
            "tcp:localhost:7000",
            "tcp:127.0.0.1",
            "ftp:x",
            "nothing",
            "",
        ] {
            assert!(p(s).is_err(), "{s} parsed");
        }
        assert!(p("vsock:5001").unwrap_err().0.contains("vsock:CID:PORT"));
        assert!(p("ftp:x").unwrap_err().0.contains("unix:PATH"));
    }

    #[test]
    fn a_server_listens_on_tcp_only_on_loopback() {
        assert!(p("tcp:127.0.0.1:7000").unwrap().check_listen().is_ok());
        assert!(p("tcp:[::1]:7000").unwrap().check_listen().is_ok());
        let e = p("tcp:0.0.0.0:7000").unwrap().check_listen().unwrap_err();
        assert!(e.0.contains("non-loopback"), "{e}");
        assert!(p("tcp:10.1.2.3:7000").unwrap().check_listen().is_err());
        assert!(p("vsock:3:5001").unwrap().check_listen().is_ok());
        assert!(p("unix:/s").unwrap().check_listen().is_ok());
    }
}
