//! The encoding rules every frame body obeys (docs/PROTOCOL.md §3.1), checked over the
//! raw bytes before any serde decoding: one definite-length CBOR item filling the body,
//! shortest-form heads, no tags, no floats, no simple values other than `false`, `true`
//! and `null`, valid UTF-8 in text strings, text-string map keys, no duplicate key in a
//! map, at most [`MAX_DEPTH`] levels of nesting and [`MAX_ITEMS`] data items.
//!
//! The check walks the bytes once, without recursion, and allocates nothing that depends
//! on a length the bytes claim: a claimed length or count larger than the bytes left is
//! refused before anything else happens. Map-key ordering is *not* checked (senders emit
//! keys in the documented field order, not in RFC 8949 §4.2.1 sorted order).

/// Arrays and maps nest at most this deep (the body's own map counts one). Protocol v1
/// messages nest at most 8 deep (a readdirplus reply down to an entry's `atime`).
pub const MAX_DEPTH: usize = 32;
/// A body holds at most this many data items (every integer, string, array, map, key
/// and value counts one). The largest v1 message, a full readdirplus reply, holds about
/// 200 000.
pub const MAX_ITEMS: usize = 1 << 20;

/// What is wrong with a body, and at which byte offset of the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} at byte {at}")]
pub struct CborError {
    pub at: usize,
    pub kind: CborErrorKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CborErrorKind {
    #[error("truncated item")]
    Truncated,
    #[error("bytes after the message")]
    Trailing,
    #[error("a length or count larger than the rest of the body")]
    TooLong,
    #[error("reserved additional information (28-30)")]
    Reserved,
    #[error("indefinite length or break")]
    Indefinite,
    #[error("a head not in its shortest form")]
    NotShortest,
    #[error("a tag")]
    Tag,
    #[error("a floating-point value")]
    Float,
    #[error("a simple value other than false, true, null")]
    Simple,
    #[error("invalid UTF-8 in a text string")]
    Utf8,
    #[error("a map key that is not a text string")]
    KeyNotText,
    #[error("a duplicate map key")]
    DuplicateKey,
    #[error("nesting deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("more than {MAX_ITEMS} items")]
    TooManyItems,
}

/// Checks that `body` obeys the encoding rules. Encoding any protocol message with
/// [`crate::encode_frame`] yields a body that passes.
pub fn check_canonical(body: &[u8]) -> Result<(), CborError> {
    scan(body).0
}

/// As [`check_canonical`], and on a violation also the request id when it can be read:
/// the body begins with a map head, the text key `"id"` and an unsigned integer, all
/// three obeying the rules, and the first violation comes after them.
pub(crate) fn scan(body: &[u8]) -> (Result<(), CborError>, Option<u64>) {
    let mut s = Scanner { b: body, pos: 0 };
    match s.run() {
        Ok(()) => (Ok(()), None),
        Err(e) => {
            let id = leading_id(body).and_then(|(id, end)| (e.at >= end).then_some(id));
            (Err(e), id)
        }
    }
}

/// The id of a body that begins `{"id": <uint>, ...` in canonical form, and the offset
/// after it.
fn leading_id(body: &[u8]) -> Option<(u64, usize)> {
    let mut s = Scanner { b: body, pos: 0 };
    match s.head().ok()? {
        (5, n) if n >= 1 => {}
        _ => return None,
    }
    if body.get(s.pos..s.pos + 3)? != b"\x62id" {
        return None;
    }
    s.pos += 3;
    match s.head().ok()? {
        (0, id) => Some((id, s.pos)),
        _ => None,
    }
}

/// Maps with at most this many keys are checked for repeats key by key.
const SMALL_MAP: usize = 32;

struct Level {
    /// Items still to come (a map of n entries has 2n).
    left: u64,
    is_map: bool,
    /// Where this map's keys start in `Scanner::run`'s key list.
    key_base: usize,
}

struct Scanner<'a> {
    b: &'a [u8],
    pos: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Root,
    Key,
    Value,
}

impl Scanner<'_> {
    fn err(&self, at: usize, kind: CborErrorKind) -> CborError {
        CborError { at, kind }
    }

    fn rest(&self) -> usize {
        self.b.len() - self.pos
    }

    /// Reads a head of major type 0-5: (major type, argument), shortest form enforced.
    fn head(&mut self) -> Result<(u8, u64), CborError> {
        let at = self.pos;
        let ib = *self
            .b
            .get(at)
            .ok_or(self.err(at, CborErrorKind::Truncated))?;
        let (major, ai) = (ib >> 5, ib & 0x1f);
        match major {
            6 => return Err(self.err(at, CborErrorKind::Tag)),
            7 => {
                self.pos += 1;
                return match ai {
                    20..=22 => Ok((7, ai as u64)),
                    25..=27 => Err(self.err(at, CborErrorKind::Float)),
                    31 => Err(self.err(at, CborErrorKind::Indefinite)),
                    28..=30 => Err(self.err(at, CborErrorKind::Reserved)),
                    _ => Err(self.err(at, CborErrorKind::Simple)),
                };
            }
            _ => {}
        }
        let (n, min) = match ai {
            0..=23 => {
                self.pos += 1;
                return Ok((major, ai as u64));
            }
            24 => (1, 24),
            25 => (2, 0x100),
            26 => (4, 0x1_0000),
            27 => (8, 0x1_0000_0000),
            28..=30 => return Err(self.err(at, CborErrorKind::Reserved)),
            _ => return Err(self.err(at, CborErrorKind::Indefinite)),
        };
        let bytes = self
            .b
            .get(at + 1..at + 1 + n)
            .ok_or(self.err(at, CborErrorKind::Truncated))?;
        let arg = bytes.iter().fold(0u64, |v, &x| (v << 8) | x as u64);
        if arg < min {
            return Err(self.err(at, CborErrorKind::NotShortest));
        }
        self.pos = at + 1 + n;
        Ok((major, arg))
    }

    fn run(&mut self) -> Result<(), CborError> {
        let mut stack: Vec<Level> = Vec::with_capacity(MAX_DEPTH);
        // Encoded key ranges of the maps being walked, innermost last.
        let mut keys: Vec<(usize, usize)> = Vec::new();
        let mut items = 0usize;
        loop {
            let role = match stack.last() {
                None => Role::Root,
                Some(l) if l.is_map && l.left % 2 == 0 => Role::Key,
                Some(_) => Role::Value,
            };
            let at = self.pos;
            items += 1;
            if items > MAX_ITEMS {
                return Err(self.err(at, CborErrorKind::TooManyItems));
            }
            let (major, arg) = self.head()?;
            if role == Role::Key && major != 3 {
                return Err(self.err(at, CborErrorKind::KeyNotText));
            }
            let mut opened = false;
            match major {
                2 | 3 => {
                    if arg > self.rest() as u64 {
                        return Err(self.err(at, CborErrorKind::TooLong));
                    }
                    let s = &self.b[self.pos..self.pos + arg as usize];
                    if major == 3 && std::str::from_utf8(s).is_err() {
                        return Err(self.err(at, CborErrorKind::Utf8));
                    }
                    self.pos += arg as usize;
                }
                4 | 5 => {
                    let n = if major == 5 {
                        arg.checked_mul(2)
                    } else {
                        Some(arg)
                    };
                    // Every item takes at least one byte.
                    let n = match n {
                        Some(n) if n <= self.rest() as u64 => n,
                        _ => return Err(self.err(at, CborErrorKind::TooLong)),
                    };
                    if n > 0 {
                        if stack.len() == MAX_DEPTH {
                            return Err(self.err(at, CborErrorKind::TooDeep));
                        }
                        stack.push(Level {
                            left: n,
                            is_map: major == 5,
                            key_base: keys.len(),
                        });
                        opened = true;
                    }
                }
                _ => {}
            }
            if role == Role::Key {
                let base = stack.last().map_or(0, |l| l.key_base);
                let key = &self.b[at..self.pos];
                // Small maps (all of v1's) are checked as each key arrives; a larger one
                // is sorted when it closes.
                if keys.len() - base < SMALL_MAP
                    && keys[base..].iter().any(|&(s, e)| &self.b[s..e] == key)
                {
                    return Err(self.err(at, CborErrorKind::DuplicateKey));
                }
                keys.push((at, self.pos));
            }
            if opened {
                continue;
            }
            // The item is complete: count it in its container, closing finished ones.
            loop {
                let Some(l) = stack.last_mut() else {
                    return if self.pos == self.b.len() {
                        Ok(())
                    } else {
                        Err(self.err(self.pos, CborErrorKind::Trailing))
                    };
                };
                l.left -= 1;
                if l.left > 0 {
                    break;
                }
                let l = stack.pop().expect("non-empty");
                if l.is_map && keys.len() - l.key_base <= SMALL_MAP {
                    keys.truncate(l.key_base);
                } else if l.is_map {
                    let b = self.b;
                    let mine = &mut keys[l.key_base..];
                    // Equal keys end up together, in the order they occur.
                    mine.sort_unstable_by(|x, y| b[x.0..x.1].cmp(&b[y.0..y.1]).then(x.0.cmp(&y.0)));
                    // The violation is the earliest repeat of any key.
                    let repeat = mine
                        .windows(2)
                        .filter(|w| b[w[0].0..w[0].1] == b[w[1].0..w[1].1])
                        .map(|w| w[1].0)
                        .min();
                    if let Some(at) = repeat {
                        return Err(self.err(at, CborErrorKind::DuplicateKey));
                    }
                    keys.truncate(l.key_base);
                }
            }
        }
    }
}

/// Reads a head of a body already known to pass [`check_canonical`].
fn head_of(b: &[u8], pos: &mut usize) -> Option<(u8, u64)> {
    let ib = *b.get(*pos)?;
    let (major, ai) = (ib >> 5, ib & 0x1f);
    let n = match ai {
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        _ => 0,
    };
    let arg = if n == 0 || major == 7 {
        ai as u64
    } else {
        b.get(*pos + 1..*pos + 1 + n)?
            .iter()
            .fold(0u64, |v, &x| (v << 8) | x as u64)
    };
    *pos += 1 + if major == 7 { 0 } else { n };
    Some((major, arg))
}

/// Skips one item of a body already known to pass [`check_canonical`].
fn skip(b: &[u8], pos: &mut usize) -> Option<()> {
    let mut pending = 1u64;
    while pending > 0 {
        pending -= 1;
        let (major, arg) = head_of(b, pos)?;
        match major {
            2 | 3 => *pos = pos.checked_add(usize::try_from(arg).ok()?)?,
            4 => pending += arg,
            5 => pending += arg * 2,
            _ => {}
        }
    }
    Some(())
}

fn text<'a>(b: &'a [u8], pos: &mut usize) -> Option<&'a str> {
    let start = *pos;
    match head_of(b, pos)? {
        (3, len) => {
            let s = b.get(*pos..*pos + len as usize)?;
            *pos += len as usize;
            std::str::from_utf8(s).ok()
        }
        _ => {
            *pos = start;
            None
        }
    }
}

/// From a request body that passes [`check_canonical`] but does not decode: its `"id"`
/// (an unsigned integer value of the top-level map) and its opcode (the only key of the
/// `"op"` map, when `"op"` is a map of one entry), each if present.
pub(crate) fn id_and_opcode(b: &[u8]) -> (Option<u64>, Option<&str>) {
    let (mut id, mut op) = (None, None);
    let mut pos = 0;
    let Some((5, n)) = head_of(b, &mut pos) else {
        return (None, None);
    };
    for _ in 0..n {
        let Some(key) = text(b, &mut pos) else {
            break;
        };
        let value_at = pos;
        match key {
            "id" => {
                if let Some((0, v)) = head_of(b, &mut pos) {
                    id = Some(v);
                }
            }
            "op" => {
                if let Some((5, 1)) = head_of(b, &mut pos) {
                    op = text(b, &mut pos);
                }
            }
            _ => {}
        }
        pos = value_at;
        if skip(b, &mut pos).is_none() {
            break;
        }
    }
    (id, op)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(b: &[u8]) -> Option<CborErrorKind> {
        check_canonical(b).err().map(|e| e.kind)
    }

    #[test]
    fn canonical_items_pass() {
        for b in [
            &[0x00][..],
            &[0x17],
            &[0x18, 0x18],
            &[0x19, 0x01, 0x00],
            &[0x1a, 0x00, 0x01, 0x00, 0x00],
            &[0x1b, 0, 0, 0, 1, 0, 0, 0, 0],
            &[0x20],
            &[0x38, 0x18],
            &[0x40],
            &[0x62, b'h', b'i'],
            &[0x82, 0x01, 0xa0],
            &[0xa2, 0x61, b'a', 0xf4, 0x61, b'b', 0xf6],
            &[0xf5],
        ] {
            assert_eq!(check_canonical(b), Ok(()), "{b:02x?}");
        }
    }

    #[test]
    fn each_rule_is_enforced() {
        use CborErrorKind::*;
        let cases: &[(&[u8], CborErrorKind)] = &[
            (&[], Truncated),
            (&[0x18], Truncated),
            (&[0x18, 0x17], NotShortest),
            (&[0x19, 0x00, 0xff], NotShortest),
            (&[0x1a, 0x00, 0x00, 0xff, 0xff], NotShortest),
            (&[0x1b, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff], NotShortest),
            (&[0x38, 0x00], NotShortest),
            (&[0x58, 0x01, 0x00], NotShortest),
            (&[0x98, 0x01, 0x00], NotShortest),
            (&[0x1c], Reserved),
            (&[0x5f, 0x40, 0xff], Indefinite),
            (&[0x7f, 0x60, 0xff], Indefinite),
            (&[0x9f, 0xff], Indefinite),
            (&[0xbf, 0xff], Indefinite),
            (&[0xff], Indefinite),
            (&[0xc1, 0x00], Tag),
            (&[0xd8, 0x20, 0x60], Tag),
            (&[0xf9, 0x3c, 0x00], Float),
            (&[0xfa, 0, 0, 0, 0], Float),
            (&[0xfb, 0, 0, 0, 0, 0, 0, 0, 0], Float),
            (&[0xf7], Simple),
            (&[0xf0], Simple),
            (&[0xf8, 0x20], Simple),
            (&[0x62, 0xc3, 0x28], Utf8),
            (&[0xa1, 0x01, 0x00], KeyNotText),
            (&[0xa1, 0x41, b'a', 0x00], KeyNotText),
            (&[0xa2, 0x61, b'a', 0x00, 0x61, b'a', 0x01], DuplicateKey),
            (&[0x00, 0x00], Trailing),
            (&[0x5a, 0xff, 0xff, 0xff, 0xff], TooLong),
            (
                &[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                TooLong,
            ),
            (&[0xbb, 0x80, 0, 0, 0, 0, 0, 0, 0], TooLong),
            (&[0x82, 0x00], TooLong),
            (&[0x82, 0x00, 0x18], Truncated),
        ];
        for (b, want) in cases {
            assert_eq!(kind(b), Some(*want), "{b:02x?}");
        }
    }

    #[test]
    fn duplicate_keys_are_found_in_nested_maps_but_equal_keys_in_sibling_maps_are_fine() {
        // {"a": {"x": 1}, "b": {"x": 2}}
        let ok = [
            0xa2, 0x61, b'a', 0xa1, 0x61, b'x', 0x01, 0x61, b'b', 0xa1, 0x61, b'x', 0x02,
        ];
        assert_eq!(check_canonical(&ok), Ok(()));
        // {"a": {"x": 1, "x": 2}}
        let dup = [0xa1, 0x61, b'a', 0xa2, 0x61, b'x', 0x01, 0x61, b'x', 0x02];
        assert_eq!(kind(&dup), Some(CborErrorKind::DuplicateKey));
        // {"a": 1, "b": {"a": 2}, "a": 3}: the outer "a" twice, across a nested map.
        let dup = [
            0xa3, 0x61, b'a', 0x01, 0x61, b'b', 0xa1, 0x61, b'a', 0x02, 0x61, b'a', 0x03,
        ];
        assert_eq!(kind(&dup), Some(CborErrorKind::DuplicateKey));
    }

    #[test]
    fn depth_and_item_count_are_bounded() {
        let mut deep = vec![0x81; MAX_DEPTH];
        deep.push(0x00);
        assert_eq!(check_canonical(&deep), Ok(()));
        let mut deeper = vec![0x81; MAX_DEPTH + 1];
        deeper.push(0x00);
        assert_eq!(kind(&deeper), Some(CborErrorKind::TooDeep));
        // An array of MAX_ITEMS zeros is MAX_ITEMS + 1 items.
        let mut many = vec![0x9a];
        many.extend_from_slice(&(MAX_ITEMS as u32).to_be_bytes());
        many.resize(many.len() + MAX_ITEMS, 0);
        assert_eq!(kind(&many), Some(CborErrorKind::TooManyItems));
        many[1..5].copy_from_slice(&(MAX_ITEMS as u32 - 1).to_be_bytes());
        many.pop();
        assert_eq!(check_canonical(&many), Ok(()));
    }

    #[test]
    fn on_a_violation_the_id_is_read_only_from_a_leading_id_entry() {
        // {"id": 7, "op": 1.0 (half float)}
        let b = [
            0xa2, 0x62, b'i', b'd', 0x07, 0x62, b'o', b'p', 0xf9, 0x3c, 0x00,
        ];
        let (r, id) = scan(&b);
        assert_eq!(r.unwrap_err().kind, CborErrorKind::Float);
        assert_eq!(id, Some(7));
        // {"op": 1.0, "id": 7}
        let b = [
            0xa2, 0x62, b'o', b'p', 0xf9, 0x3c, 0x00, 0x62, b'i', b'd', 0x07,
        ];
        assert_eq!(scan(&b).1, None);
        // {"id": 24 in a long form}: the id itself breaks the rules.
        let b = [0xa1, 0x62, b'i', b'd', 0x19, 0x00, 0x18];
        assert_eq!(scan(&b).1, None);
        // {"x": {"id": 3}, ...}: only the top-level map's "id" counts.
        let b = [0xa1, 0x61, b'x', 0xa1, 0x62, b'i', b'd', 0x03, 0xf7];
        assert_eq!(scan(&b).1, None);
        // {"x": 1, "id": 7, "op": undefined}: "id" must be the first key.
        let b = [
            0xa3, 0x61, b'x', 0x01, 0x62, b'i', b'd', 0x07, 0x62, b'o', b'p', 0xf7,
        ];
        assert_eq!(scan(&b).1, None);
        // {"id": 7, "id": 8}: the repeat comes after the first id.
        let b = [0xa2, 0x62, b'i', b'd', 0x07, 0x62, b'i', b'd', 0x08];
        let (r, id) = scan(&b);
        assert_eq!(
            r.unwrap_err(),
            CborError {
                at: 5,
                kind: CborErrorKind::DuplicateKey
            }
        );
        assert_eq!(id, Some(7));
        // A map head claiming more entries than there are bytes: the head is the violation.
        let b = [0xb8, 0x20, 0x62, b'i', b'd', 0x07];
        let (r, id) = scan(&b);
        assert_eq!(r.unwrap_err().at, 0);
        assert_eq!(id, None);
        // A well-formed body: no violation, so nothing to recover.
        assert_eq!(scan(&[0xa1, 0x62, b'i', b'd', 0x07]), (Ok(()), None));
    }

    #[test]
    fn repeats_are_found_in_large_maps_too() {
        // {"k00": 0, ..., "k39": 0}, then the same with "k39" renamed "k03".
        let map = |last: &str| {
            let mut b = vec![0xb8, 40];
            let mut at = 0;
            for i in 0..40 {
                let k = if i == 39 {
                    last.to_string()
                } else {
                    format!("k{i:02}")
                };
                at = b.len();
                b.push(0x63);
                b.extend(k.as_bytes());
                b.push(0x00);
            }
            (b, at)
        };
        assert_eq!(check_canonical(&map("k39").0), Ok(()));
        let (b, at) = map("k03");
        assert_eq!(
            check_canonical(&b),
            Err(CborError {
                at,
                kind: CborErrorKind::DuplicateKey
            })
        );
    }

    #[test]
    fn a_duplicate_key_is_reported_at_its_first_repeat() {
        // {"a": 1, "b": 2, "a": 3, "b": 4, "a": 5}
        let b = [
            0xa5, 0x61, b'a', 0x01, 0x61, b'b', 0x02, 0x61, b'a', 0x03, 0x61, b'b', 0x04, 0x61,
            b'a', 0x05,
        ];
        assert_eq!(
            check_canonical(&b),
            Err(CborError {
                at: 7,
                kind: CborErrorKind::DuplicateKey
            })
        );
    }

    #[test]
    fn id_and_opcode_are_read_from_a_well_formed_body() {
        // {"op": {"frob": {"a": [1, 2]}}, "x": "y", "id": 300}
        let b = [
            0xa3, 0x62, b'o', b'p', 0xa1, 0x64, b'f', b'r', b'o', b'b', 0xa1, 0x61, b'a', 0x82,
            0x01, 0x02, 0x61, b'x', 0x61, b'y', 0x62, b'i', b'd', 0x19, 0x01, 0x2c,
        ];
        assert_eq!(check_canonical(&b), Ok(()));
        assert_eq!(id_and_opcode(&b), (Some(300), Some("frob")));
        // {"id": -1, "op": "statfs"}
        let b = [
            0xa2, 0x62, b'i', b'd', 0x20, 0x62, b'o', b'p', 0x66, b's', b't', b'a', b't', b'f',
            b's',
        ];
        // (and "op" as a text string names no opcode)
        assert_eq!(id_and_opcode(&b), (None, None));
        assert_eq!(id_and_opcode(&[0x80]), (None, None));
    }
}
