//! The snapshot file format: one immutable, verified, random-access file holding a
//! file tree and/or raw byte streams. Layout in docs/FORMAT.md.

pub mod codec;
pub mod format;
pub mod ids;
pub mod reader;
mod validate;
pub mod writer;

pub use codec::Compression;
pub use format::{ChunkId, FileData, Node, NodeKind, Stream};
pub use ids::{NodeIds, ROOT_ID};
pub use reader::{NodeIdx, Snapshot, ROOT};
pub use validate::{check_name, validate};
pub use writer::{SnapshotWriter, WriteStats, WriterOptions};
