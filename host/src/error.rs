use std::io;
use std::path::PathBuf;

use crate::snapshot::format::FORMAT_VERSION;

/// Every failure of the host crate. Messages are one line: what failed and, where it
/// helps, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: io::Error },
    #[error("not a hexz snapshot (bad magic)")]
    NotASnapshot,
    #[error("snapshot format version {0} is not supported (this hexz reads versions 1 to {FORMAT_VERSION}); use a newer hexz")]
    UnsupportedVersion(u32),
    #[error("corrupt snapshot: {0}; the file is damaged, restore or re-pack it")]
    Corrupt(String),
    #[error("corrupt overlay: {0}")]
    CorruptOverlay(String),
    /// Something would exceed a size the format or a configured limit allows.
    #[error("{0}")]
    TooLarge(String),
    /// The overlay reached its size limit (`--overlay-size`).
    #[error("{0}")]
    NoSpace(String),
    #[error("no such file or directory in snapshot: {0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// A registry could not be reached or refused a request (after retries).
    #[error("{0}")]
    Remote(String),
    #[error("{path}: {err}")]
    At { path: PathBuf, err: Box<Error> },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn corrupt(what: impl Into<String>) -> Error {
        Error::Corrupt(what.into())
    }

    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }

    /// Prefixes the error with the file it concerns (once).
    pub fn at(self, path: impl Into<PathBuf>) -> Error {
        match self {
            e @ (Error::At { .. } | Error::Io { .. }) => e,
            e => Error::At {
                path: path.into(),
                err: Box::new(e),
            },
        }
    }

    /// True when the bytes on disk are not what was written (as opposed to a usage error).
    pub fn is_corruption(&self) -> bool {
        match self {
            Error::Corrupt(_) | Error::NotASnapshot | Error::UnsupportedVersion(_) => true,
            Error::At { err, .. } => err.is_corruption(),
            _ => false,
        }
    }
}
