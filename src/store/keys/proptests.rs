//! Hostile input (issue #6): arbitrary and mutated postings blocks ([`decode_postings`]) and
//! keys ([`index_seq`], [`number_of`], [`decode_u64`]) as a damaged store could hold them.
//! Never a panic; `None` or seqs that are strictly increasing from the key's first.

use proptest::prelude::*;

use super::*;
use crate::mutate::{apply, mutations};

/// A decoded block is well-formed: it starts at `first`, strictly increases, and encodes to
/// a block that decodes to the same seqs.
fn check_block(first: u64, decoded: Option<Vec<u64>>) -> Result<(), TestCaseError> {
    if let Some(seqs) = decoded {
        prop_assert_eq!(seqs.first(), Some(&first));
        prop_assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "{:?}", seqs);
        prop_assert_eq!(decode_postings(first, &encode_postings(&seqs)), Some(seqs));
    }
    Ok(())
}

/// Strictly increasing seqs.
fn postings() -> impl Strategy<Value = Vec<u64>> {
    (any::<u64>(), prop::collection::vec(1u64..1 << 40, 0..40)).prop_map(|(first, gaps)| {
        let mut seqs = vec![first];
        for gap in gaps {
            match seqs.last().unwrap().checked_add(gap) {
                Some(next) => seqs.push(next),
                None => break,
            }
        }
        seqs
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_postings_decode_to_increasing_seqs_or_none(
        first in any::<u64>(),
        value in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        check_block(first, decode_postings(first, &value))?;
    }

    #[test]
    fn postings_round_trip(seqs in postings()) {
        prop_assert_eq!(decode_postings(seqs[0], &encode_postings(&seqs)), Some(seqs));
    }

    #[test]
    fn mutated_postings_decode_to_increasing_seqs_or_none(seqs in postings(), edits in mutations(4)) {
        let value = apply(&encode_postings(&seqs), &edits);
        check_block(seqs[0], decode_postings(seqs[0], &value))?;
    }

    #[test]
    fn arbitrary_keys_decode_or_fail(key in prop::collection::vec(any::<u8>(), 0..24)) {
        if let Some(seq) = index_seq(&key) {
            prop_assert_eq!(&key[key.len() - 8..], &seq.to_be_bytes()[..]);
        }
        if let Some(number) = number_of(ENTRY, &key) {
            let again = entry(number);
            prop_assert_eq!(again.as_slice(), key.as_slice());
        }
        prop_assert_eq!(decode_u64(&key).is_some(), key.len() == 8);
    }
}
