//! Node ids: the inode numbers a snapshot's files show. Without an inode table (the
//! header flag `FLAG_INODES` clear) node `i` is id `i + 1`; with one, `pack` recorded the
//! inode numbers the files had on the source file system (so tools that remember them,
//! like git's index, still recognise the files) and `commit` keeps the ones they had in
//! the overlay. The root is always id 1, the FUSE root node.

use std::collections::HashMap;

use crate::error::{Error, Result};

/// The root directory's id: the protocol's root node (and the FUSE root).
pub const ROOT_ID: u64 = hexz_protocol::ROOT_NODE;
/// Ids above this are refused in a table, leaving room above it for ids an overlay
/// hands out to new files.
pub const MAX_TABLE_ID: u64 = 1 << 62;

#[derive(Debug, Default)]
pub struct NodeIds {
    table: Option<Vec<u64>>,
    by_id: HashMap<u64, u32>,
    nodes: u32,
    max: u64,
}

impl NodeIds {
    /// Ids `1..=nodes`, in node order.
    pub fn sequential(nodes: usize) -> NodeIds {
        let nodes = nodes as u32;
        NodeIds {
            table: None,
            by_id: HashMap::new(),
            nodes,
            max: nodes as u64,
        }
    }

    /// Checks a table for `nodes` nodes: one id per node, the root's is 1, the others
    /// are at least 2, at most `MAX_TABLE_ID`, and distinct.
    pub fn from_table(table: Vec<u64>, nodes: usize) -> Result<NodeIds> {
        if table.len() != nodes {
            return Err(Error::corrupt(format!(
                "inode table has {} entries for {nodes} nodes",
                table.len()
            )));
        }
        if table.first().is_some_and(|&r| r != ROOT_ID) {
            return Err(Error::corrupt("inode table: the root's number is not 1"));
        }
        let mut by_id = HashMap::with_capacity(table.len());
        let mut max = 0;
        for (i, &id) in table.iter().enumerate() {
            if i > 0 && !(2..=MAX_TABLE_ID).contains(&id) {
                return Err(Error::corrupt(format!(
                    "inode table: node {i} has number {id}, outside 2..=2^62"
                )));
            }
            if by_id.insert(id, i as u32).is_some() {
                return Err(Error::corrupt(format!(
                    "inode table: number {id} is used twice"
                )));
            }
            max = max.max(id);
        }
        Ok(NodeIds {
            nodes: table.len() as u32,
            table: Some(table),
            by_id,
            max,
        })
    }

    /// The id of node `idx` (which must exist).
    pub fn id(&self, idx: u32) -> u64 {
        match &self.table {
            Some(t) => t.get(idx as usize).copied().unwrap_or(idx as u64 + 1),
            None => idx as u64 + 1,
        }
    }

    /// The node with id `id`, if the snapshot has one.
    pub fn index(&self, id: u64) -> Option<u32> {
        match &self.table {
            Some(_) => self.by_id.get(&id).copied(),
            None => id
                .checked_sub(1)
                .and_then(|i| u32::try_from(i).ok())
                .filter(|&i| i < self.nodes),
        }
    }

    /// The smallest id above every node's: where new nodes' ids start.
    pub fn next_free(&self) -> u64 {
        self.max + 1
    }

    /// The recorded table, if the snapshot has one.
    pub fn table(&self) -> Option<&[u64]> {
        self.table.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_ids_are_index_plus_one() {
        let ids = NodeIds::sequential(3);
        assert_eq!((ids.id(0), ids.id(2)), (1, 3));
        assert_eq!(
            (ids.index(1), ids.index(3), ids.index(4)),
            (Some(0), Some(2), None)
        );
        assert_eq!((ids.index(0), ids.next_free()), (None, 4));
    }

    #[test]
    fn a_table_maps_both_ways() {
        let ids = NodeIds::from_table(vec![1, 500, 7], 3).unwrap();
        assert_eq!(
            (ids.id(1), ids.index(7), ids.index(2)),
            (500, Some(2), None)
        );
        assert_eq!(ids.next_free(), 501);
    }

    #[test]
    fn bad_tables_are_refused() {
        for (t, n, what) in [
            (vec![1, 2], 3, "entries"),
            (vec![2, 3], 2, "root"),
            (vec![1, 1], 2, "outside"),
            (vec![1, 0], 2, "outside"),
            (vec![1, (1 << 62) + 1], 2, "outside"),
            (vec![1, 5, 5], 3, "twice"),
        ] {
            let e = NodeIds::from_table(t, n).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
    }
}
