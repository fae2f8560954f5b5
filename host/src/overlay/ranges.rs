//! A set of disjoint byte ranges: which parts of a lower-backed file live in the upper file.

use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end, disjoint, non-adjacent.
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(&s, &e)| (s, e))
    }

    /// Adds `[start, end)`, merging with neighbours. Returns false if it was already covered.
    pub fn insert(&mut self, mut start: u64, mut end: u64) -> bool {
        if start >= end {
            return false;
        }
        if let Some((&s, &e)) = self.map.range(..=start).next_back() {
            if s <= start && end <= e {
                return false;
            }
            if e >= start {
                start = s;
                end = end.max(e);
                self.map.remove(&s);
            }
        }
        let overlapping: Vec<u64> = self.map.range(start..=end).map(|(&s, _)| s).collect();
        for s in overlapping {
            if let Some(e) = self.map.remove(&s) {
                end = end.max(e);
            }
        }
        self.map.insert(start, end);
        true
    }

    /// Drops everything at or after `len`.
    pub fn truncate(&mut self, len: u64) {
        let after: Vec<u64> = self.map.range(len..).map(|(&s, _)| s).collect();
        for s in after {
            self.map.remove(&s);
        }
        if let Some((&s, e)) = self.map.range_mut(..len).next_back() {
            if *e > len {
                *e = len;
            }
            let _ = s;
        }
    }

    /// The range containing `pos`, if any.
    pub fn containing(&self, pos: u64) -> Option<(u64, u64)> {
        self.map
            .range(..=pos)
            .next_back()
            .filter(|(_, &e)| e > pos)
            .map(|(&s, &e)| (s, e))
    }

    /// The first range starting after `pos`.
    pub fn next_after(&self, pos: u64) -> Option<(u64, u64)> {
        self.map.range(pos + 1..).next().map(|(&s, &e)| (s, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_a_bitmap(ops in prop::collection::vec((0u64..200, 0u64..50, any::<bool>()), 0..40)) {
            let mut set = RangeSet::new();
            let mut bits = vec![false; 260];
            for (start, len, trunc) in ops {
                if trunc {
                    set.truncate(start);
                    for b in bits.iter_mut().skip(start as usize) { *b = false; }
                } else {
                    set.insert(start, start + len);
                    for b in bits.iter_mut().skip(start as usize).take(len as usize) { *b = true; }
                }
                for (i, &bit) in bits.iter().enumerate() {
                    prop_assert_eq!(set.containing(i as u64).is_some(), bit, "pos {}", i);
                }
                let v: Vec<_> = set.iter().collect();
                for w in v.windows(2) {
                    prop_assert!(w[0].1 < w[1].0, "ranges touch or overlap: {:?}", v);
                }
            }
        }
    }
}
