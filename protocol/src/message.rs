//! Every message of protocol v1. The CBOR shape of each is given in docs/PROTOCOL.md:
//! structs are maps with the field names as text keys, enums are one-key maps
//! (`{"lookup": {...}}`), byte strings are CBOR byte strings, `Option` fields are left
//! out when absent.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::Errno;

/// A node (file, directory, ...) as named by the server. Never reused within one
/// `fs_id`; valid across reconnects and server restarts for as long as the node exists
/// (it has a name, or some connection holds a reference or handle on it, or it is in
/// its grace period: docs/PROTOCOL.md §5.3). The root is [`ROOT_NODE`].
pub type NodeId = u64;
/// An open file or directory: an unpredictable value, valid only on the connection
/// that opened it (docs/PROTOCOL.md §5.2).
pub type Handle = u64;

pub const ROOT_NODE: NodeId = 1;

/// A client request. `id` is chosen by the client and must be unique among its
/// requests still awaiting a reply on this connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub op: Op,
}

/// A server reply to the request with the same `id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    pub r: ReplyBody,
}

/// A time: seconds since the epoch and nanoseconds, encoded `[sec, nsec]`. Decoding
/// refuses `nsec >= 1e9` (a request carrying one is answered `EINVAL`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Timespec(pub i64, pub u32);

/// One more than the largest valid `Timespec` nanoseconds value.
pub const NSEC_PER_SEC: u32 = 1_000_000_000;

impl<'de> Deserialize<'de> for Timespec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (sec, nsec) = <(i64, u32)>::deserialize(d)?;
        if nsec >= NSEC_PER_SEC {
            return Err(serde::de::Error::custom(format_args!(
                "Timespec nanoseconds {nsec} out of range (must be below 1e9)"
            )));
        }
        Ok(Timespec(sec, nsec))
    }
}

/// A time to set: the server's current time, or a given one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetTime {
    Now,
    At(Timespec),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol versions the client speaks.
    pub versions: Vec<u32>,
    pub max_frame: u32,
    pub max_read: u32,
    pub max_write: u32,
    pub max_in_flight: u32,
    pub caps: Vec<String>,
    /// Free text naming the client, for logs.
    pub client: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    pub version: u32,
    pub max_frame: u32,
    pub max_read: u32,
    pub max_write: u32,
    pub max_in_flight: u32,
    pub caps: Vec<String>,
    pub root: NodeId,
    /// Identity of the served filesystem (snapshot + overlay); unchanged across server
    /// restarts on the same overlay, so a reconnecting client knows its node ids hold.
    #[serde(with = "serde_bytes")]
    pub fs_id: Vec<u8>,
    pub server: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: u64,
    /// Full `st_mode`: file type bits and permission bits.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    pub blksize: u32,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub node: NodeId,
    pub generation: u64,
    pub attr: Attr,
    /// How long the client may cache the name → node binding.
    pub entry_ttl_ms: u32,
    /// How long the client may cache `attr`.
    pub attr_ttl_ms: u32,
    /// Replies to operations that add a name (`mknod`, `mkdir`, `symlink`, `link`,
    /// `create`): the directory's attributes after the change, valid for `attr_ttl_ms`
    /// (servers may leave it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir_attr: Option<Attr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub ino: u64,
    /// File type bits of `st_mode` (`mode & S_IFMT`).
    pub kind: u32,
    /// Pass as `cookie` to continue after this entry.
    pub cookie: u64,
}

/// A byte range to read along with `open`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadAt {
    pub offset: u64,
    pub size: u32,
}

/// Entries listed along with `opendir`, as a `readdirplus` from cookie 0 returns them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirList {
    pub entries: Vec<DirEntryPlus>,
    pub eof: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntryPlus {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub cookie: u64,
    pub entry: Entry,
}

impl DirEntryPlus {
    /// Whether the entry gave the client a reference on its node: every entry but `.`
    /// and `..` does (docs/PROTOCOL.md §5.3).
    pub fn is_referenced(&self) -> bool {
        self.name != b"." && self.name != b".."
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub frsize: u32,
    pub namelen: u32,
}

/// Flags of [`Op::Rename`].
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;
/// Flags of [`Op::Setxattr`].
pub const XATTR_CREATE: u32 = 1;
pub const XATTR_REPLACE: u32 = 2;
/// `whence` of [`Op::Lseek`].
pub const SEEK_DATA: u32 = 3;
pub const SEEK_HOLE: u32 = 4;

/// Capabilities of protocol v1 (docs/PROTOCOL.md §4), and which requests need them
/// ([`Op::required_cap`]).
pub const CAP_READDIRPLUS: &str = "readdirplus";
pub const CAP_XATTR: &str = "xattr";
pub const CAP_RENAME2: &str = "rename2";
pub const CAP_LSEEK: &str = "lseek";
pub const CAP_FALLOCATE: &str = "fallocate";
pub const CAP_READ_FILES: &str = "read_files";
pub const CAP_WRITE_BEHIND: &str = "write_behind";
pub const CAP_LIST_DIRS: &str = "list_dirs";
/// Every capability protocol v1 defines.
pub const CAPS: &[&str] = &[
    CAP_READDIRPLUS,
    CAP_XATTR,
    CAP_RENAME2,
    CAP_LSEEK,
    CAP_FALLOCATE,
    CAP_READ_FILES,
    CAP_WRITE_BEHIND,
    CAP_LIST_DIRS,
];

/// Most nodes one [`Op::ReadFiles`] may name.
pub const MAX_READ_FILES: usize = 4096;
/// Most directories one [`Op::ListDirs`] may name.
pub const MAX_LIST_DIRS: usize = 256;
/// Most node ids one [`Op::Reserve`] may ask for.
pub const MAX_RESERVE: u32 = 1024;
/// Most node ids one connection may hold reserved and unused at once.
pub const MAX_RESERVED: usize = 4096;
/// Most requests one [`Op::Batch`] may carry.
pub const MAX_BATCH: usize = 256;

/// Every operation. Names are the CBOR keys (snake_case).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Hello(Hello),
    Lookup {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    Forget {
        node: NodeId,
        nlookup: u64,
    },
    BatchForget {
        items: Vec<(NodeId, u64)>,
    },
    /// Takes `n` references on each node again (after a reconnect, for nodes the client
    /// still references); nodes that no longer exist are skipped silently. At most
    /// [`crate::hello::MAX_BATCH_FORGET`] items.
    Retain {
        items: Vec<(NodeId, u64)>,
    },
    Getattr {
        node: NodeId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fh: Option<Handle>,
    },
    Setattr {
        node: NodeId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fh: Option<Handle>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gid: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        atime: Option<SetTime>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mtime: Option<SetTime>,
    },
    Readlink {
        node: NodeId,
    },
    Symlink {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
        uid: u32,
        gid: u32,
    },
    Mknod {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    },
    Mkdir {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Unlink {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    Rmdir {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    Rename {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        new_parent: NodeId,
        #[serde(with = "serde_bytes")]
        new_name: Vec<u8>,
        flags: u32,
    },
    Link {
        node: NodeId,
        new_parent: NodeId,
        #[serde(with = "serde_bytes")]
        new_name: Vec<u8>,
    },
    Open {
        node: NodeId,
        flags: u32,
        /// Also read this range and return it in `opened.data`: the first read of a
        /// file in the same round trip.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        read: Option<ReadAt>,
    },
    Read {
        fh: Handle,
        offset: u64,
        size: u32,
    },
    Write {
        fh: Handle,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Flush {
        fh: Handle,
        lock_owner: u64,
    },
    Release {
        fh: Handle,
    },
    Fsync {
        fh: Handle,
        datasync: bool,
    },
    Opendir {
        node: NodeId,
        /// Also list up to this many entries from the start (as `readdirplus`, which it
        /// needs) and return them in `opened.list`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        list: Option<u32>,
    },
    Readdir {
        fh: Handle,
        cookie: u64,
        max_entries: u32,
    },
    Readdirplus {
        fh: Handle,
        cookie: u64,
        max_entries: u32,
    },
    Releasedir {
        fh: Handle,
    },
    Fsyncdir {
        fh: Handle,
        datasync: bool,
    },
    Statfs {
        node: NodeId,
    },
    Setxattr {
        node: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        flags: u32,
    },
    Getxattr {
        node: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    Listxattr {
        node: NodeId,
    },
    Removexattr {
        node: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    Create {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        mode: u32,
        flags: u32,
        uid: u32,
        gid: u32,
    },
    Fallocate {
        fh: Handle,
        offset: u64,
        length: u64,
        mode: u32,
    },
    Lseek {
        fh: Handle,
        offset: u64,
        whence: u32,
    },
    /// The whole contents of each named regular file no longer than `max_size`, without
    /// handles: many small files in one round trip (a client reading ahead).
    ReadFiles {
        nodes: Vec<NodeId>,
        max_size: u32,
    },
    /// The whole listing of each named directory of at most `max_entries` entries, as
    /// `readdirplus` from cookie 0 gives it, without handles: many directories in one
    /// round trip (a client listing ahead of a tree walk).
    ListDirs {
        nodes: Vec<NodeId>,
        max_entries: u32,
    },
    /// Sets `count` fresh node ids aside for this connection, to be named by its
    /// [`Op::CreateAs`] requests (so a client can answer a create before the server has
    /// made the file).
    Reserve {
        count: u32,
    },
    /// `create` with `O_EXCL` whose new node gets the reserved id `node` and the
    /// contents `data`.
    CreateAs {
        parent: NodeId,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        mode: u32,
        flags: u32,
        uid: u32,
        gid: u32,
        node: NodeId,
        data: ByteBuf,
    },
    /// Requests executed one after another, in order, each as if sent alone at the
    /// client's time `at` (every time it sets from the clock is `at`); one reply per
    /// request, in order.
    Batch {
        ops: Vec<Timed>,
    },
}

/// One request of a [`Op::Batch`] and the time it happened at the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timed {
    pub at: Timespec,
    pub op: Op,
}

/// One file of a [`ReplyBody::Files`] reply: its whole contents when the reply was made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileData {
    pub node: NodeId,
    pub data: ByteBuf,
}

/// One directory of a [`ReplyBody::Listings`] reply: its whole listing, or none (not an
/// existing directory, or longer than asked).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirListing {
    pub node: NodeId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<DirEntryPlus>>,
}

/// The reply to each operation; which variant answers which op is in docs/PROTOCOL.md.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyBody {
    /// The operation failed.
    Err(Errno),
    /// Success with nothing to return; `unlink` and `rmdir` may say what the directory's
    /// attributes are after the removal (`dir_attr`, valid for `attr_ttl_ms`).
    Ok {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dir_attr: Option<Attr>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attr_ttl_ms: Option<u32>,
    },
    Hello(HelloReply),
    Entry(Entry),
    Attr {
        attr: Attr,
        attr_ttl_ms: u32,
    },
    Opened {
        fh: Handle,
        /// The client may keep cached pages of this file from earlier opens.
        keep_cache: bool,
        /// `open` with `read`: the bytes read, if the read succeeded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<ByteBuf>,
        /// `opendir` with `list`: the first entries, if listing succeeded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        list: Option<DirList>,
    },
    Created {
        entry: Entry,
        fh: Handle,
    },
    /// Bytes: file data (read), a symlink target (readlink), an xattr value (getxattr).
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    Written {
        size: u32,
        /// The file's attributes after the write (servers may leave it out).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attr: Option<Attr>,
        /// How long the client may cache `attr`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attr_ttl_ms: Option<u32>,
    },
    Dir {
        entries: Vec<DirEntry>,
        eof: bool,
    },
    DirPlus {
        entries: Vec<DirEntryPlus>,
        eof: bool,
    },
    Statfs(Statfs),
    Names {
        names: Vec<ByteBuf>,
    },
    Offset {
        offset: u64,
    },
    Files {
        files: Vec<FileData>,
    },
    /// `list_dirs`: one item per directory named, in order, up to where the reply stops.
    Listings {
        dirs: Vec<DirListing>,
    },
    /// `reserve`: the ids `first .. first + count`.
    Reserved {
        first: NodeId,
        count: u32,
    },
    /// `batch`: the reply to each request, in order.
    Batch {
        replies: Vec<ReplyBody>,
    },
}

impl Op {
    /// The opcode's wire name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Hello(_) => "hello",
            Op::Lookup { .. } => "lookup",
            Op::Forget { .. } => "forget",
            Op::BatchForget { .. } => "batch_forget",
            Op::Retain { .. } => "retain",
            Op::Getattr { .. } => "getattr",
            Op::Setattr { .. } => "setattr",
            Op::Readlink { .. } => "readlink",
            Op::Symlink { .. } => "symlink",
            Op::Mknod { .. } => "mknod",
            Op::Mkdir { .. } => "mkdir",
            Op::Unlink { .. } => "unlink",
            Op::Rmdir { .. } => "rmdir",
            Op::Rename { .. } => "rename",
            Op::Link { .. } => "link",
            Op::Open { .. } => "open",
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Flush { .. } => "flush",
            Op::Release { .. } => "release",
            Op::Fsync { .. } => "fsync",
            Op::Opendir { .. } => "opendir",
            Op::Readdir { .. } => "readdir",
            Op::Readdirplus { .. } => "readdirplus",
            Op::Releasedir { .. } => "releasedir",
            Op::Fsyncdir { .. } => "fsyncdir",
            Op::Statfs { .. } => "statfs",
            Op::Setxattr { .. } => "setxattr",
            Op::Getxattr { .. } => "getxattr",
            Op::Listxattr { .. } => "listxattr",
            Op::Removexattr { .. } => "removexattr",
            Op::Create { .. } => "create",
            Op::Fallocate { .. } => "fallocate",
            Op::Lseek { .. } => "lseek",
            Op::ReadFiles { .. } => "read_files",
            Op::ListDirs { .. } => "list_dirs",
            Op::Reserve { .. } => "reserve",
            Op::CreateAs { .. } => "create_as",
            Op::Batch { .. } => "batch",
        }
    }

    /// The capability (docs/PROTOCOL.md §4) this request needs, if any. A server answers
    /// a request whose capability was not agreed in the hello with `ENOSYS`.
    pub fn required_cap(&self) -> Option<&'static str> {
        match self {
            Op::Readdirplus { .. } => Some(CAP_READDIRPLUS),
            Op::Setxattr { .. }
            | Op::Getxattr { .. }
            | Op::Listxattr { .. }
            | Op::Removexattr { .. } => Some(CAP_XATTR),
            Op::Rename { flags, .. } if *flags != 0 => Some(CAP_RENAME2),
            Op::Lseek { .. } => Some(CAP_LSEEK),
            Op::Fallocate { .. } => Some(CAP_FALLOCATE),
            Op::ReadFiles { .. } => Some(CAP_READ_FILES),
            Op::ListDirs { .. } => Some(CAP_LIST_DIRS),
            Op::Reserve { .. } | Op::CreateAs { .. } | Op::Batch { .. } => Some(CAP_WRITE_BEHIND),
            _ => None,
        }
    }

    /// Every opcode name of protocol v1.
    pub const NAMES: &'static [&'static str] = &[
        "hello",
        "lookup",
        "forget",
        "batch_forget",
        "retain",
        "getattr",
        "setattr",
        "readlink",
        "symlink",
        "mknod",
        "mkdir",
        "unlink",
        "rmdir",
        "rename",
        "link",
        "open",
        "read",
        "write",
        "flush",
        "release",
        "fsync",
        "opendir",
        "readdir",
        "readdirplus",
        "releasedir",
        "fsyncdir",
        "statfs",
        "setxattr",
        "getxattr",
        "listxattr",
        "removexattr",
        "create",
        "fallocate",
        "lseek",
        "read_files",
        "list_dirs",
        "reserve",
        "create_as",
        "batch",
    ];
}

impl ReplyBody {
    /// `ok` with nothing more.
    pub const fn ok() -> ReplyBody {
        ReplyBody::Ok {
            dir_attr: None,
            attr_ttl_ms: None,
        }
    }
}

impl ReplyBody {
    /// The variant's wire name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            ReplyBody::Err(_) => "err",
            ReplyBody::Ok { .. } => "ok",
            ReplyBody::Hello(_) => "hello",
            ReplyBody::Entry(_) => "entry",
            ReplyBody::Attr { .. } => "attr",
            ReplyBody::Opened { .. } => "opened",
            ReplyBody::Created { .. } => "created",
            ReplyBody::Data(_) => "data",
            ReplyBody::Written { .. } => "written",
            ReplyBody::Dir { .. } => "dir",
            ReplyBody::DirPlus { .. } => "dir_plus",
            ReplyBody::Statfs(_) => "statfs",
            ReplyBody::Names { .. } => "names",
            ReplyBody::Offset { .. } => "offset",
            ReplyBody::Files { .. } => "files",
            ReplyBody::Listings { .. } => "listings",
            ReplyBody::Reserved { .. } => "reserved",
            ReplyBody::Batch { .. } => "batch",
        }
    }

    /// Every reply variant name of protocol v1.
    pub const NAMES: &'static [&'static str] = &[
        "err", "ok", "hello", "entry", "attr", "opened", "created", "data", "written", "dir",
        "dir_plus", "statfs", "names", "offset", "files", "listings", "reserved", "batch",
    ];
}
