//! The one place that knows how the ledger's keys are laid out in sled.
//!
//! Everything lives in one sled tree so that a whole group commit is one atomic
//! `apply_batch`: after a crash either all of a batch is visible or none of it. Keys start
//! with a one-byte prefix naming what they hold; numbers are big-endian `u64`, so byte order
//! is numeric order.
//!
//! | prefix | key | value |
//! | --- | --- | --- |
//! | `o` | page | where entries `page*256 ..` start in the entries file: up to 256 offsets (u64 LE) |
//! | `e` | seq | only in ledgers created before the entries file: the entry's stored bytes |
//! | `h` | page | up to 256 stored hashes (32 bytes each), indexes `page*256 ..` |
//! | `i` | event_id | seq of the entry that carries it |
//! | `k` | key_id | `KeyRecord` (protobuf) |
//! | `c` | consent_id | `ConsentRecord` (protobuf) |
//! | `t` | token_id | `TokenRecord` (protobuf) |
//! | `x` | field tag, value, `0x00`, first seq | a postings block of the secondary index for `Audit.Query` (below) |
//! | `m` | name | ledger metadata: `checkpoint` (newest signed note), `size` (its tree size), `rebuilding` (a rebuild is under way) |
//!
//! The entries' stored bytes (the Merkle leaves) are in the entries file (`super::entrylog`),
//! or, in a ledger created before it, under `e`; a ledger has one or the other, never both.
//! Only they and `o` are primary; everything else is derived from the entries and can be
//! rebuilt.
//! Index values never contain `0x00` (identifiers refuse control characters), so
//! `tag value 0x00` is a prefix that matches exactly one value. Index field tags: `u` user,
//! `a` agent, `t` token, `c` consent, `r` resource server, `k` kind (enum number in decimal),
//! `s` verdict status (enum number in decimal).
//!
//! Postings blocks: a group commit writes one `x` key per index term it touches, not one per
//! entry, so a batch of 2,000 actions of one kind costs one key, not 2,000. The key ends with
//! the term's first seq in that batch; the value holds the term's further seqs of the batch as
//! LEB128 varint gaps (each > 0). An empty value is a block of one (the format of one key per
//! entry is thus a special case). Blocks of one term never overlap: each covers seqs of one
//! batch, and batches are disjoint and ordered.

pub const ENTRY: u8 = b'e';
pub const OFFSETS: u8 = b'o';
/// Entry offsets per `o` page.
pub const OFFSETS_PER_PAGE: u64 = 256;
pub const HASH_PAGE: u8 = b'h';
pub const EVENT_ID: u8 = b'i';
pub const KEY: u8 = b'k';
pub const META: u8 = b'm';
pub const CONSENT: u8 = b'c';
pub const TOKEN: u8 = b't';
pub const INDEX: u8 = b'x';

/// Index field tags.
pub const FIELD_USER: u8 = b'u';
pub const FIELD_AGENT: u8 = b'a';
pub const FIELD_TOKEN: u8 = b't';
pub const FIELD_CONSENT: u8 = b'c';
pub const FIELD_RESOURCE_SERVER: u8 = b'r';
pub const FIELD_KIND: u8 = b'k';
pub const FIELD_STATUS: u8 = b's';

/// The prefix of every index key for `value` of field `tag`: `x tag value 0x00`.
pub fn index_prefix(tag: u8, value: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(3 + value.len() + 8);
    key.push(INDEX);
    key.push(tag);
    key.extend_from_slice(value.as_bytes());
    key.push(0);
    key
}

/// The key of the postings block of the term `prefix` (from [`index_prefix`]) starting at `seq`.
pub fn block_key(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 8);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The seq at the end of an index key.
pub fn index_seq(key: &[u8]) -> Option<u64> {
    let tail = key.len().checked_sub(8)?;
    decode_u64(&key[tail..])
}

/// The value of a postings block holding `seqs` (strictly increasing; the first is in the
/// key): the gaps after the first, as varints.
pub fn encode_postings(seqs: &[u64]) -> Vec<u8> {
    let mut value = Vec::with_capacity(seqs.len().saturating_sub(1) * 2);
    for pair in seqs.windows(2) {
        let mut gap = pair[1].saturating_sub(pair[0]);
        loop {
            let byte = (gap & 0x7f) as u8;
            gap >>= 7;
            if gap == 0 {
                value.push(byte);
                break;
            }
            value.push(byte | 0x80);
        }
    }
    value
}

/// The seqs of a postings block whose key ends with `first`; `None` if the value is malformed
/// (a truncated varint, a zero gap, an overflow).
pub fn decode_postings(first: u64, value: &[u8]) -> Option<Vec<u64>> {
    let mut seqs = vec![first];
    let mut current = first;
    let mut gap: u64 = 0;
    let mut shift = 0u32;
    for &byte in value {
        // A u64 needs at most ten varint bytes, the tenth holding only its top bit.
        if shift > 63 || (shift == 63 && byte & 0x7f > 1) {
            return None;
        }
        gap |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 != 0 {
            shift += 7;
            continue;
        }
        if gap == 0 {
            return None;
        }
        current = current.checked_add(gap)?;
        seqs.push(current);
        gap = 0;
        shift = 0;
    }
    (shift == 0).then_some(seqs)
}

/// Metadata name of the newest signed checkpoint note.
pub const META_CHECKPOINT: &[u8] = b"checkpoint";
/// Metadata name of the newest checkpoint's tree size (big-endian u64).
pub const META_SIZE: &[u8] = b"size";
/// Metadata name present while a rebuild of the derived data is under way.
pub const META_REBUILDING: &[u8] = b"rebuilding";

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

pub fn offsets_page(page: u64) -> [u8; 9] {
    numbered(OFFSETS, page)
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
mod proptests;

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

    #[test]
    fn index_keys_of_one_value_sort_by_seq_and_exclude_longer_values() {
        let prefix = index_prefix(FIELD_USER, "al");
        let a = block_key(&prefix, 300);
        let b = block_key(&prefix, 5);
        let other = block_key(&index_prefix(FIELD_USER, "alice"), 1);
        assert!(b < a);
        assert!(a.starts_with(&prefix) && b.starts_with(&prefix));
        assert!(!other.starts_with(&prefix), "'al' must not match 'alice'");
        assert_eq!(index_seq(&a), Some(300));
    }

    #[test]
    fn postings_blocks_round_trip_and_refuse_malformed_values() {
        for seqs in [
            vec![7],
            vec![0, 1, 2, 3],
            vec![5, 200, 70_000, 1 << 40, u64::MAX],
        ] {
            let value = encode_postings(&seqs);
            assert_eq!(decode_postings(seqs[0], &value), Some(seqs.clone()));
        }
        assert_eq!(
            encode_postings(&[9]),
            Vec::<u8>::new(),
            "a block of one is empty"
        );
        assert_eq!(decode_postings(1, &[0x80]), None, "truncated varint");
        assert_eq!(decode_postings(1, &[0]), None, "zero gap");
        assert_eq!(decode_postings(u64::MAX, &[1]), None, "overflow");
        assert_eq!(decode_postings(1, &[0xff; 11]), None, "overlong varint");
        let mut too_big = vec![0xff; 9];
        too_big.push(0x02);
        assert_eq!(decode_postings(0, &too_big), None, "more than 64 bits");
    }
}
