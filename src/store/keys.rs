//! The one place that knows how the ledger's keys are laid out in sled.
//!
//! Everything lives in one sled tree so that a whole group commit is one atomic
//! `apply_batch`: after a crash either all of a batch is visible or none of it. Keys start
//! with a one-byte prefix naming what they hold; numbers are big-endian `u64`, so byte order
//! is numeric order.
//!
//! | prefix | key | value |
//! | --- | --- | --- |
//! | `e` | seq | the entry's stored bytes (the Merkle leaf) |
//! | `h` | page | up to 256 stored hashes (32 bytes each), indexes `page*256 ..` |
//! | `i` | event_id | seq of the entry that carries it |
//! | `k` | key_id | `KeyRecord` (protobuf) |
//! | `m` | name | ledger metadata: `checkpoint` (newest signed note), `size` (its tree size) |
//!
//! Only `e` is primary; `h`, `i`, `k` and `m` are derived from the entries.

pub const ENTRY: u8 = b'e';
pub const HASH_PAGE: u8 = b'h';
pub const EVENT_ID: u8 = b'i';
pub const KEY: u8 = b'k';
pub const META: u8 = b'm';

/// Metadata name of the newest signed checkpoint note.
pub const META_CHECKPOINT: &[u8] = b"checkpoint";
/// Metadata name of the newest checkpoint's tree size (big-endian u64).
pub const META_SIZE: &[u8] = b"size";

pub fn numbered(prefix: u8, number: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = prefix;
    key[1..].copy_from_slice(&number.to_be_bytes());
    key
}

pub fn named(prefix: u8, name: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(prefix);
    key.extend_from_slice(name);
    key
}

pub fn entry(seq: u64) -> [u8; 9] {
    numbered(ENTRY, seq)
}

pub fn hash_page(page: u64) -> [u8; 9] {
    numbered(HASH_PAGE, page)
}

/// Decodes the number of a `numbered` key, if it has that prefix.
pub fn number_of(prefix: u8, key: &[u8]) -> Option<u64> {
    match key {
        [p, rest @ ..] if *p == prefix => Some(u64::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

pub fn decode_u64(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_keys_sort_numerically() {
        let mut keys: Vec<_> = [300u64, 2, 256, 1 << 40, 0]
            .iter()
            .map(|&n| entry(n))
            .collect();
        keys.sort();
        let numbers: Vec<_> = keys.iter().map(|k| number_of(ENTRY, k).unwrap()).collect();
        assert_eq!(numbers, vec![0, 2, 256, 300, 1 << 40]);
        assert_eq!(number_of(HASH_PAGE, &entry(3)), None);
        assert_eq!(number_of(ENTRY, b"e12"), None);
    }
}
