//! Where the server listens: AF_VSOCK, the hybrid-vsock Unix socket, a Unix socket, or
//! loopback TCP. One address type and spelling for both sides lives in the protocol
//! crate (`hexz_protocol::addr`); this adds what only a listener needs.

pub use hexz_protocol::addr::{Addr as ListenAddr, AddrError, DEFAULT_VSOCK_PORT};

/// Parses a `--listen` value: any address, but TCP only on loopback (the protocol has
/// no authentication of its own).
pub fn parse_listen(s: &str) -> Result<ListenAddr, AddrError> {
    let a: ListenAddr = s.parse()?;
    a.check_listen()?;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn listen_addresses_parse_and_remote_tcp_is_refused() {
        assert_eq!(
            parse_listen("vsock:3:5001").unwrap(),
            ListenAddr::Vsock { cid: 3, port: 5001 }
        );
        assert!(parse_listen("vsock:5001").is_err());
        let uds = parse_listen("vsock-uds:/run/vm.vsock").unwrap();
        assert_eq!(uds.socket_path(), Some(PathBuf::from("/run/vm.vsock_5001")));
        assert!(parse_listen("tcp:127.0.0.1:7000").is_ok());
        let e = parse_listen("tcp:0.0.0.0:7000").unwrap_err().to_string();
        assert!(e.contains("loopback"), "{e}");
        assert!(parse_listen("unix:").is_err());
    }
}
