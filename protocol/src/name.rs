//! The one rule for directory-entry names, used by every side that accepts a name.

use crate::Errno;

pub const NAME_MAX: usize = 255;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("'.' or '..' used as a name")]
    Dot,
    #[error("name longer than {NAME_MAX} bytes")]
    TooLong,
    #[error("name contains '/'")]
    Slash,
    #[error("name contains NUL")]
    Nul,
}

impl NameError {
    pub fn errno(self) -> Errno {
        match self {
            NameError::TooLong => Errno::ENAMETOOLONG,
            _ => Errno::EINVAL,
        }
    }
}

/// Accepts exactly the names a POSIX directory entry may have: 1..=255 bytes, no `/`,
/// no NUL, not `.` or `..`. Names are bytes; no encoding is assumed.
pub fn check_name(name: &[u8]) -> Result<(), NameError> {
    match name {
        [] => Err(NameError::Empty),
        b"." | b".." => Err(NameError::Dot),
        n if n.len() > NAME_MAX => Err(NameError::TooLong),
        n if n.contains(&b'/') => Err(NameError::Slash),
        n if n.contains(&0) => Err(NameError::Nul),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_refused_with_the_right_errno() {
        assert_eq!(check_name(b"ok.txt"), Ok(()));
        assert_eq!(check_name(b"..."), Ok(()));
        assert_eq!(check_name(b""), Err(NameError::Empty));
        assert_eq!(check_name(b".."), Err(NameError::Dot));
        assert_eq!(check_name(b"a/b"), Err(NameError::Slash));
        assert_eq!(check_name(b"a\0b"), Err(NameError::Nul));
        assert_eq!(
            check_name(&[b'x'; 256]).map_err(NameError::errno),
            Err(Errno::ENAMETOOLONG)
        );
        assert_eq!(check_name(&[b'x'; 255]), Ok(()));
    }
}
