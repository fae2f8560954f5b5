//! Structural checks run once on open, so that no later read can index out of bounds,
//! loop, or return bytes the index does not account for.

use super::format::{FileData, Index, NodeKind, EXTERNAL, HEADER_LEN, MAX_FRAME_RAW};
use crate::error::{Error, Result};

const S_IFMT: u32 = libc::S_IFMT;

pub fn validate(index: &Index, data_end: u64, version: u32) -> Result<()> {
    if index.base.is_some() && version < 2 {
        return Err(Error::corrupt("a version 1 snapshot names a base snapshot"));
    }
    let mut next_chunk = 0u64;
    for (fi, f) in index.frames.iter().enumerate() {
        let bad = |what: &str| Error::corrupt(format!("frame {fi}: {what}"));
        let end = f
            .offset
            .checked_add(f.stored_len as u64)
            .ok_or_else(|| bad("offset overflows"))?;
        if f.offset < HEADER_LEN as u64 || end > data_end {
            return Err(bad("lies outside the data area"));
        }
        if f.raw_len > MAX_FRAME_RAW || f.stored_len > MAX_FRAME_RAW {
            return Err(bad("larger than the 4 MiB frame limit"));
        }
        if f.first_chunk as u64 != next_chunk || f.chunk_count == 0 {
            return Err(bad("chunks are not contiguous"));
        }
        next_chunk += f.chunk_count as u64;
        let chunks = index
            .chunks
            .get(f.first_chunk as usize..next_chunk as usize)
            .ok_or_else(|| bad("names chunks past the chunk table"))?;
        let mut at = 0u32;
        for c in chunks {
            if c.frame as usize != fi || c.offset != at || c.len == 0 {
                return Err(bad("chunks do not tile the frame"));
            }
            at = at
                .checked_add(c.len)
                .ok_or_else(|| bad("chunk lengths overflow"))?;
        }
        if at != f.raw_len {
            return Err(bad("chunk lengths do not add up to the frame"));
        }
    }
    // After the chunks the frames hold come the ones stored in the base, if any.
    for c in &index.chunks[next_chunk as usize..] {
        if c.frame != EXTERNAL || c.offset != 0 || c.len == 0 {
            return Err(Error::corrupt("chunks not held by any frame"));
        }
        if index.base.is_none() {
            return Err(Error::corrupt(
                "chunk refers to a base snapshot, but none is named",
            ));
        }
    }

    let n = index.nodes.len();
    let mut names = vec![0u32; n];
    let mut dir_seen = vec![false; n];
    for (ni, node) in index.nodes.iter().enumerate() {
        let bad = |what: &str| Error::corrupt(format!("node {ni}: {what}"));
        let ftype = node.mode & S_IFMT;
        let type_ok = match &node.kind {
            NodeKind::Dir(_) => ftype == libc::S_IFDIR,
            NodeKind::File(_) => ftype == libc::S_IFREG,
            NodeKind::Symlink(_) => ftype == libc::S_IFLNK,
            NodeKind::Device(_) => ftype == libc::S_IFCHR || ftype == libc::S_IFBLK,
            NodeKind::Fifo => ftype == libc::S_IFIFO,
            NodeKind::Socket => ftype == libc::S_IFSOCK,
        };
        if !type_ok {
            return Err(bad("mode's file type does not match the node kind"));
        }
        for w in node.xattrs.windows(2) {
            if w[0].name >= w[1].name {
                return Err(bad("xattrs not sorted and unique"));
            }
        }
        match &node.kind {
            NodeKind::Dir(d) => {
                if d.parent as usize >= n {
                    return Err(bad("parent out of range"));
                }
                let mut subdirs = 0u32;
                for (i, e) in d.entries.iter().enumerate() {
                    check_name(&e.name).map_err(|w| bad(&w))?;
                    if i > 0 && d.entries[i - 1].name >= e.name {
                        return Err(bad("entries not sorted and unique"));
                    }
                    let child = e.node as usize;
                    if child == 0 || child >= n {
                        return Err(bad("entry names an invalid node"));
                    }
                    if let NodeKind::Dir(cd) = &index.nodes[child].kind {
                        if cd.parent as usize != ni || dir_seen[child] {
                            return Err(bad("directory graph is not a tree"));
                        }
                        dir_seen[child] = true;
                        subdirs += 1;
                    }
                    names[child] += 1;
                }
                if node.nlink != 2 + subdirs {
                    return Err(bad(
                        "directory link count does not match its subdirectories",
                    ));
                }
            }
            NodeKind::File(data) => check_data(index, data).map_err(|w| bad(&w))?,
            NodeKind::Symlink(t) if t.is_empty() || t.len() > 4095 || t.contains(&0) => {
                return Err(bad("invalid symlink target"));
            }
            _ => {}
        }
    }
    if let Some(root) = index.nodes.first() {
        match &root.kind {
            NodeKind::Dir(d) if d.parent == 0 => {}
            _ => return Err(Error::corrupt("root node is not a directory")),
        }
    }
    for (ni, node) in index.nodes.iter().enumerate().skip(1) {
        if !matches!(node.kind, NodeKind::Dir(_)) && names[ni] != node.nlink {
            return Err(Error::corrupt(format!(
                "node {ni}: link count does not match its names"
            )));
        }
    }
    for (i, s) in index.streams.iter().enumerate() {
        if s.name.is_empty() || (i > 0 && index.streams[i - 1].name >= s.name) {
            return Err(Error::corrupt("stream names not sorted and unique"));
        }
        check_data(index, &s.data)
            .map_err(|w| Error::corrupt(format!("stream {}: {w}", s.name)))?;
    }
    Ok(())
}

fn check_data(index: &Index, data: &FileData) -> std::result::Result<(), String> {
    let mut end = 0u64;
    for e in &data.extents {
        let chunk = index
            .chunks
            .get(e.chunk as usize)
            .ok_or("extent names a missing chunk")?;
        if e.offset < end {
            return Err("extents overlap or are unsorted".into());
        }
        end = e
            .offset
            .checked_add(chunk.len as u64)
            .ok_or("extent overflows")?;
    }
    if end > data.size {
        return Err("extents run past the size".into());
    }
    Ok(())
}

/// Names in a snapshot follow the protocol's one rule for names.
pub fn check_name(name: &[u8]) -> std::result::Result<(), String> {
    hexz_protocol::check_name(name).map_err(|e| e.to_string())
}
