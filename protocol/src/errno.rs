//! The one errno table of the protocol. Wire values are Linux's (asm-generic) numbers.

use serde::{Deserialize, Serialize};

/// An error number as carried on the wire. Values outside [`Errno::TABLE`] are never
/// sent; a receiver that meets one treats it as `EIO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Errno(pub u32);

macro_rules! errno_table {
    ($($name:ident = $num:expr, $text:expr;)*) => {
        impl Errno {
            $(pub const $name: Errno = Errno($num);)*

            /// Every errno the protocol may carry: (value, name, meaning).
            pub const TABLE: &'static [(u32, &'static str, &'static str)] = &[$(($num, stringify!($name), $text),)*];
        }
    };
}

errno_table! {
    EPERM = 1, "operation not permitted";
    ENOENT = 2, "no such file or directory";
    EIO = 5, "input/output error (the host could not read or write its own storage)";
    ENXIO = 6, "no such device or address (lseek SEEK_DATA/SEEK_HOLE past the end)";
    E2BIG = 7, "argument list too long (xattr value over the limit)";
    EBADF = 9, "bad file handle";
    EAGAIN = 11, "resource temporarily unavailable";
    ENOMEM = 12, "out of memory";
    EACCES = 13, "permission denied";
    EBUSY = 16, "device or resource busy";
    EEXIST = 17, "file exists";
    EXDEV = 18, "cross-device link";
    ENODEV = 19, "no such device";
    ENOTDIR = 20, "not a directory";
    EISDIR = 21, "is a directory";
    EINVAL = 22, "invalid argument (a bad field, or a broken encoding rule)";
    ENFILE = 23, "too many open handles on the server";
    EMFILE = 24, "too many open handles on this connection";
    ETXTBSY = 26, "text file busy";
    EFBIG = 27, "file too large";
    ENOSPC = 28, "no space left on device (overlay full, or an xattr limit)";
    ESPIPE = 29, "illegal seek";
    EROFS = 30, "read-only file system";
    EMLINK = 31, "too many links";
    ERANGE = 34, "result too large (an xattr name over 255 bytes)";
    ENAMETOOLONG = 36, "file name too long";
    ENOLCK = 37, "no locks available";
    ENOSYS = 38, "unknown opcode, or a capability not agreed in the hello";
    ENOTEMPTY = 39, "directory not empty";
    ELOOP = 40, "too many levels of symbolic links";
    ENODATA = 61, "no such extended attribute";
    EPROTO = 71, "protocol-state violation (a first frame that is not a hello, a second hello)";
    EBADMSG = 74, "bad message (not sent: a body with no readable id closes the connection)";
    EOVERFLOW = 75, "the reply would not fit in max_frame";
    EPROTONOSUPPORT = 93, "no protocol version in common";
    EOPNOTSUPP = 95, "operation not supported";
    ETIMEDOUT = 110, "timed out (the host did not answer in time)";
    ESTALE = 116, "the node id names no existing node";
    EDQUOT = 122, "quota exceeded";
}

impl Errno {
    /// The symbolic name (`"ENOENT"`), or `None` for a value outside the table.
    pub fn name(self) -> Option<&'static str> {
        Errno::TABLE
            .iter()
            .find(|(n, _, _)| *n == self.0)
            .map(|(_, name, _)| *name)
    }

    /// The value as the receiver should use it: itself if in the table, else `EIO`.
    pub fn sanitized(self) -> Errno {
        if self.name().is_some() {
            self
        } else {
            Errno::EIO
        }
    }

    /// Maps an OS error to the table; errors with no OS number, or outside it, are `EIO`.
    pub fn from_io(e: &std::io::Error) -> Errno {
        match e.raw_os_error() {
            Some(n) if n > 0 => Errno(n as u32).sanitized(),
            _ if e.kind() == std::io::ErrorKind::NotFound => Errno::ENOENT,
            _ => Errno::EIO,
        }
    }

    pub fn as_i32(self) -> i32 {
        self.0 as i32
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match Errno::TABLE.iter().find(|(n, _, _)| *n == self.0) {
            Some((_, name, text)) => write!(f, "{name} ({text})"),
            None => write!(f, "errno {}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_values_are_unique_and_match_this_platform() {
        let mut seen = std::collections::HashSet::new();
        for (n, name, _) in Errno::TABLE {
            assert!(seen.insert(*n), "{name} duplicates {n}");
            let os = std::io::Error::from_raw_os_error(*n as i32);
            assert_eq!(Errno::from_io(&os), Errno(*n), "{name}");
        }
        assert_eq!(Errno::ENOENT.0 as i32, libc_enoent());
    }

    fn libc_enoent() -> i32 {
        std::io::Error::from(std::io::ErrorKind::NotFound)
            .raw_os_error()
            .unwrap_or(2)
    }

    #[test]
    fn unknown_values_become_eio() {
        assert_eq!(Errno(4000).sanitized(), Errno::EIO);
        assert_eq!(Errno::ENOTEMPTY.sanitized(), Errno::ENOTEMPTY);
        assert_eq!(Errno::from_io(&std::io::Error::other("x")), Errno::EIO);
    }
}
