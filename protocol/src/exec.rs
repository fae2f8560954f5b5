//! The exec channel: the host asks the guest's init to run one command in /workspace
//! and receives its output and exit status. One connection per command, framed like the
//! file protocol (`crate::frame`: 4-byte big-endian length, one CBOR item), because the
//! hybrid-vsock transport does not pass a half-close: every message, including the end
//! of stdin, is a frame. The contract is docs/PROTOCOL.md §12.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// The exec channel's version; the guest refuses a [`Run`] with another one.
pub const EXEC_VERSION: u32 = 1;

/// The port the guest connects to (CID 2) for the exec channel, unless the kernel
/// command line names another (`hexz.exec_port=`).
pub const DEFAULT_EXEC_PORT: u32 = 5002;

/// Largest frame body either side sends or accepts on the exec channel.
pub const MAX_EXEC_FRAME: u32 = 1 << 20;

/// Bytes of entropy the host sends in [`HostMsg::Resume`].
pub const RESUME_ENTROPY_LEN: usize = 64;

/// Largest `Stdin`/`Stdout`/`Stderr` payload a sender puts in one frame.
pub const MAX_CHUNK: usize = 64 << 10;

/// The command to run. `argv[0]` is looked up in `PATH` from `env` (or the guest's
/// default `PATH` when `env` has none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub version: u32,
    pub argv: Vec<ByteBuf>,
    /// `KEY=VALUE` entries added to the guest's default environment (they override it).
    pub env: Vec<ByteBuf>,
    /// Working directory; relative paths are taken from /workspace.
    pub workdir: String,
    pub uid: u32,
    pub gid: u32,
    /// Must be false: this version has no pseudo-terminal.
    pub tty: bool,
}

/// Host → guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostMsg {
    /// Sent once, first.
    Run(Run),
    Stdin(ByteBuf),
    /// Closes the command's stdin.
    StdinEof,
    /// Delivers this signal number to the command's process group.
    Signal(i32),
    /// Restored from a memory template (docs/PROTOCOL.md §12.4): sent once, before `Run`,
    /// to a guest that said [`GuestMsg::Parked`]. The guest mixes `entropy` into its
    /// random number generator (credited, then reseeded) and sets its wall clock.
    Resume {
        entropy: ByteBuf,
        /// Host wall time, nanoseconds since the Unix epoch.
        unix_nanos: u64,
    },
}

/// Guest → host. Exactly one of `Exited`, `Killed` or `Error` ends the exchange; all
/// output the command produced precedes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestMsg {
    /// Booted in template mode and waiting for [`HostMsg::Resume`]: the host may save the
    /// machine now. Sent once, before anything else.
    Parked,
    /// /workspace is mounted and the command is running.
    Started {
        pid: u32,
    },
    Stdout(ByteBuf),
    Stderr(ByteBuf),
    Exited {
        code: i32,
    },
    Killed {
        signal: i32,
    },
    /// The command could not be run. `errno` is Linux's number when the cause was a
    /// system call (ENOENT: not found; EACCES, ENOEXEC: not executable).
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        errno: Option<u32>,
        what: String,
    },
}

const ENOENT: u32 = 2;
const ENOEXEC: u32 = 8;
const EACCES: u32 = 13;
const EISDIR: u32 = 21;
const EPERM: u32 = 1;

/// The exit status a shell would give for a command that could not be run: 127 when it
/// was not found, 126 when it is not executable, 125 for anything else (the sandbox
/// itself failed).
pub fn exit_code_of_error(errno: Option<u32>) -> i32 {
    match errno {
        Some(ENOENT) => 127,
        Some(EACCES | ENOEXEC | EISDIR | EPERM) => 126,
        _ => 125,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_body, encode_frame, PREFIX_LEN};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn roundtrip<T>(msg: &T) -> Vec<u8>
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let mut out = Vec::new();
        encode_frame(msg, MAX_EXEC_FRAME, &mut out).expect("encode");
        let back: T = decode_body(&out[PREFIX_LEN..]).expect("decode");
        assert_eq!(&back, msg);
        out
    }

    /// The example frames of docs/PROTOCOL.md §12, byte for byte.
    #[test]
    fn golden_frames_match_the_document() {
        let run = HostMsg::Run(Run {
            version: EXEC_VERSION,
            argv: vec![ByteBuf::from(b"ls".to_vec())],
            env: vec![],
            workdir: ".".into(),
            uid: 0,
            gid: 0,
            tty: false,
        });
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md"))
                .expect("docs/PROTOCOL.md");
        let examples = [
            ("run", roundtrip(&run)),
            ("stdin-eof", roundtrip(&HostMsg::StdinEof)),
            (
                "stdout",
                roundtrip(&GuestMsg::Stdout(ByteBuf::from(b"hi\n".to_vec()))),
            ),
            ("exited", roundtrip(&GuestMsg::Exited { code: 3 })),
        ];
        let missing: Vec<String> = examples
            .iter()
            .map(|(name, frame)| format!("{name}: {}", hex(frame)))
            .filter(|line| !doc.contains(line.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/PROTOCOL.md §12 should contain these lines:\n{}",
            missing.join("\n")
        );
    }

    #[test]
    fn every_message_roundtrips_and_errors_map_like_a_shell() {
        roundtrip(&HostMsg::Stdin(ByteBuf::from(vec![0u8, 255, 10])));
        roundtrip(&HostMsg::Signal(15));
        roundtrip(&GuestMsg::Started { pid: 7 });
        roundtrip(&GuestMsg::Parked);
        roundtrip(&HostMsg::Resume {
            entropy: ByteBuf::from(vec![7u8; 64]),
            unix_nanos: 1_795_331_631_000_000_000,
        });
        roundtrip(&GuestMsg::Stderr(ByteBuf::from(b"e".to_vec())));
        roundtrip(&GuestMsg::Killed { signal: 9 });
        roundtrip(&GuestMsg::Error {
            errno: None,
            what: "mount failed".into(),
        });
        roundtrip(&GuestMsg::Error {
            errno: Some(ENOENT),
            what: "nosuch: not found".into(),
        });
        assert_eq!(exit_code_of_error(Some(ENOENT)), 127);
        assert_eq!(exit_code_of_error(Some(EACCES)), 126);
        assert_eq!(exit_code_of_error(Some(ENOEXEC)), 126);
        assert_eq!(exit_code_of_error(None), 125);
        assert_eq!(exit_code_of_error(Some(5)), 125);
    }
}
