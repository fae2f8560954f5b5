//! Where the server listens: AF_VSOCK, the hybrid-vsock Unix socket, a Unix socket, or
//! loopback TCP.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// The guest's default port (CID 2 is the host).
pub const DEFAULT_VSOCK_PORT: u32 = 5001;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// AF_VSOCK on `port`, accepting only the VM with context id `cid` (hosts with
    /// vhost-vsock).
    Vsock {
        cid: u32,
        port: u32,
    },
    /// Firecracker / Cloud Hypervisor / vhost-device-vsock convention: a guest
    /// connecting to CID 2 port P reaches the Unix socket `<path>_<P>`.
    VsockUds(PathBuf, u32),
    Unix(PathBuf),
    /// Loopback only: the protocol has no authentication of its own.
    Tcp(SocketAddr),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, rest) = s.split_once(':').ok_or_else(|| format!("'{s}': expected KIND:ADDRESS (vsock:CID:PORT, vsock-uds:PATH[:PORT], unix:PATH, tcp:127.0.0.1:PORT)"))?;
        match kind {
            "vsock" => {
                let bad = || {
                    format!(
                        "'{s}': expected vsock:CID:PORT (the CID of the one VM allowed to connect)"
                    )
                };
                let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
                Ok(ListenAddr::Vsock {
                    cid: cid.parse().map_err(|_| bad())?,
                    port: port.parse().map_err(|_| bad())?,
                })
            }
            "vsock-uds" => {
                let (path, port) = match rest.rsplit_once(':') {
                    Some((p, port))
                        if port.chars().all(|c| c.is_ascii_digit()) && !port.is_empty() =>
                    {
                        (p, port.parse().map_err(|_| format!("'{s}': bad port"))?)
                    }
                    _ => (rest, DEFAULT_VSOCK_PORT),
                };
                if path.is_empty() {
                    return Err(format!("'{s}': empty path"));
                }
                Ok(ListenAddr::VsockUds(PathBuf::from(path), port))
            }
            "unix" if !rest.is_empty() => Ok(ListenAddr::Unix(PathBuf::from(rest))),
            "tcp" => {
                let addr: SocketAddr = rest
                    .parse()
                    .map_err(|_| format!("'{s}': expected tcp:IP:PORT"))?;
                if !addr.ip().is_loopback() {
                    return Err(format!(
                        "'{s}': refusing a non-loopback address: the protocol has no authentication; use vsock or a Unix socket"
                    ));
                }
                Ok(ListenAddr::Tcp(addr))
            }
            _ => Err(format!(
                "'{s}': unknown listener kind '{kind}' (vsock, vsock-uds, unix, tcp)"
            )),
        }
    }
}

impl ListenAddr {
    /// The Unix socket path this listener binds, if any.
    pub fn socket_path(&self) -> Option<PathBuf> {
        match self {
            ListenAddr::VsockUds(p, port) => Some(PathBuf::from(format!("{}_{port}", p.display()))),
            ListenAddr::Unix(p) => Some(p.clone()),
            _ => None,
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            ListenAddr::VsockUds(p, port) => write!(f, "vsock-uds:{}_{port}", p.display()),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_remote_tcp_is_refused() {
        assert_eq!(
            "vsock:3:5001".parse(),
            Ok(ListenAddr::Vsock { cid: 3, port: 5001 })
        );
        assert!("vsock:5001".parse::<ListenAddr>().is_err());
        assert_eq!(
            "vsock-uds:/run/vm.vsock".parse(),
            Ok(ListenAddr::VsockUds("/run/vm.vsock".into(), 5001))
        );
        assert_eq!(
            "vsock-uds:/run/vm.vsock:6000".parse(),
            Ok(ListenAddr::VsockUds("/run/vm.vsock".into(), 6000))
        );
        assert_eq!(
            ListenAddr::VsockUds("/run/vm.vsock".into(), 5001).socket_path(),
            Some(PathBuf::from("/run/vm.vsock_5001"))
        );
        assert_eq!("unix:/tmp/s".parse(), Ok(ListenAddr::Unix("/tmp/s".into())));
        assert!(matches!(
            "tcp:127.0.0.1:7000".parse(),
            Ok(ListenAddr::Tcp(_))
        ));
        assert!("tcp:0.0.0.0:7000"
            .parse::<ListenAddr>()
            .unwrap_err()
            .contains("non-loopback"));
        assert!("http:x".parse::<ListenAddr>().is_err());
        assert!("unix:".parse::<ListenAddr>().is_err());
    }
}
