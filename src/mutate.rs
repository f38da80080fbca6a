//! Byte mutations for the hostile-input property tests (issue #6): flip a bit, overwrite,
//! truncate, insert, delete, or splice in a copy of another part of the input. Test-only;
//! the integration tests include this file too (`tests/integration/hostile.rs`), so it uses
//! nothing but `proptest`.

use proptest::prelude::*;
use proptest::sample::Index;

/// One edit of a byte string. Positions are [`Index`]es, resolved against the length of the
/// bytes at the time the edit is applied, so every edit applies to any input.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Flips bit `bit` of one byte.
    FlipBit { at: Index, bit: u8 },
    /// Overwrites one byte.
    SetByte { at: Index, value: u8 },
    /// Keeps only the bytes before `at`.
    Truncate { at: Index },
    /// Inserts `bytes` before `at`.
    Insert { at: Index, bytes: Vec<u8> },
    /// Deletes up to `len` bytes from `at`.
    Delete { at: Index, len: usize },
    /// Replaces up to `len` bytes at `to` with a copy of up to `copy_len` bytes from `from`:
    /// duplicates, moves and overlaps of the input's own structure.
    Splice {
        from: Index,
        copy_len: usize,
        to: Index,
        len: usize,
    },
}

/// Any one [`Mutation`]; small lengths, so edits stay local.
pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        1 => any::<Index>().prop_map(|at| Mutation::Truncate { at }),
        2 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..12))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        2 => (any::<Index>(), 1usize..12).prop_map(|(at, len)| Mutation::Delete { at, len }),
        1 => (any::<Index>(), 1usize..64, any::<Index>(), 0usize..64).prop_map(
            |(from, copy_len, to, len)| Mutation::Splice { from, copy_len, to, len }
        ),
    ]
}

/// One to `max` mutations, applied in order.
pub fn mutations(max: usize) -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..=max)
}

/// Applies `mutations` to a copy of `bytes`.
pub fn apply(bytes: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for mutation in mutations {
        apply_one(&mut out, mutation);
    }
    out
}

fn apply_one(out: &mut Vec<u8>, mutation: &Mutation) {
    // Positions in 0..len for edits of a byte, 0..=len for edits between bytes.
    let on_byte = |at: &Index, len: usize| (len > 0).then(|| at.index(len));
    let between = |at: &Index, len: usize| at.index(len + 1);
    match mutation {
        Mutation::FlipBit { at, bit } => {
            if let Some(i) = on_byte(at, out.len()) {
                out[i] ^= 1 << bit;
            }
        }
        Mutation::SetByte { at, value } => {
            if let Some(i) = on_byte(at, out.len()) {
                out[i] = *value;
            }
        }
        Mutation::Truncate { at } => {
            let i = between(at, out.len());
            out.truncate(i);
        }
        Mutation::Insert { at, bytes } => {
            let i = between(at, out.len());
            out.splice(i..i, bytes.iter().copied());
        }
        Mutation::Delete { at, len } => {
            if let Some(i) = on_byte(at, out.len()) {
                let end = (i + len).min(out.len());
                out.drain(i..end);
            }
        }
        Mutation::Splice {
            from,
            copy_len,
            to,
            len,
        } => {
            let Some(start) = on_byte(from, out.len()) else {
                return;
            };
            let copied = out[start..(start + copy_len).min(out.len())].to_vec();
            let i = between(to, out.len());
            let end = (i + len).min(out.len());
            out.splice(i..end, copied);
        }
    }
}
