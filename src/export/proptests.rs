//! Hostile input (issue #6): arbitrary and mutated bytes fed to the export reader
//! ([`ExportReader`]). Never a panic, never an I/O error from bytes in memory, always an end:
//! the records written, or [`ExportError::Malformed`].

use proptest::prelude::*;

use super::*;
use crate::mutate::{apply, mutations};

/// Reads a whole export from memory: the note and every entry, or the first error.
fn read_all(bytes: &[u8]) -> Result<(String, Vec<Vec<u8>>), ExportError> {
    let (mut reader, note) = ExportReader::open(bytes)?;
    let mut entries = Vec::new();
    // Each record consumes at least one byte, so this ends.
    while let Some(entry) = reader.next_entry()? {
        entries.push(entry);
    }
    Ok((note, entries))
}

fn write_all(note: &str, entries: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = Vec::new();
    write_header(&mut bytes, note).unwrap();
    for entry in entries {
        write_record(&mut bytes, entry).unwrap();
    }
    bytes
}

/// Bytes in memory are read or found malformed; reading them is never an I/O failure.
fn assert_malformed_or_ok(
    outcome: &Result<(String, Vec<Vec<u8>>), ExportError>,
) -> Result<(), TestCaseError> {
    if let Err(error) = outcome {
        prop_assert!(matches!(error, ExportError::Malformed(_)), "{:?}", error);
    }
    Ok(())
}

fn entries() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..6)
}

#[test]
fn regression_a_length_varint_overflowing_64_bits_is_malformed() {
    // Nine continuation bytes and a tenth byte above 1: more than 64 bits. The bits beyond
    // the 64th used to be dropped silently, so this read as a 5-byte entry.
    let mut bytes = write_all("note\n", &[]);
    bytes.extend_from_slice(&[0x85, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02]);
    bytes.extend_from_slice(b"12345");
    assert!(matches!(read_all(&bytes), Err(ExportError::Malformed(_))));
    // The largest u64, in ten bytes, is a valid varint (and an absurd length).
    let mut bytes = write_all("note\n", &[]);
    prost::encoding::encode_varint(u64::MAX, &mut bytes);
    assert!(matches!(read_all(&bytes), Err(ExportError::Malformed(_))));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes, with and without a valid header line in front.
    #[test]
    fn arbitrary_bytes_read_or_are_malformed(
        with_header in any::<bool>(),
        tail in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut bytes = if with_header { HEADER.to_vec() } else { Vec::new() };
        bytes.extend_from_slice(&tail);
        assert_malformed_or_ok(&read_all(&bytes))?;
    }

    /// What is written is read back exactly.
    #[test]
    fn exports_round_trip(note in "\\PC{0,100}", entries in entries()) {
        let (read_note, read_entries) = read_all(&write_all(&note, &entries)).unwrap();
        prop_assert_eq!(read_note, note);
        prop_assert_eq!(read_entries, entries);
    }

    /// A valid export, mutated: read (as other records) or malformed.
    #[test]
    fn mutated_exports_read_or_are_malformed(
        note in "\\PC{0,100}",
        entries in entries(),
        edits in mutations(4),
    ) {
        let bytes = apply(&write_all(&note, &entries), &edits);
        assert_malformed_or_ok(&read_all(&bytes))?;
    }

    /// Record lengths are protobuf varints: the reader takes exactly the values protobuf's own
    /// decoder takes, and refuses the rest.
    #[test]
    fn lengths_agree_with_protobuf_varints(
        continued in prop::collection::vec(0x80u8..=0xff, 0..12),
        tail in prop::collection::vec(any::<u8>(), 0..3),
    ) {
        // Runs of continuation bytes reach the ten-byte limit and the 64-bit overflow.
        let bytes = [continued, tail].concat();
        let ours = read_varint(&mut bytes.as_slice());
        let protobuf = prost::encoding::decode_varint(&mut bytes.as_slice());
        match (ours, protobuf) {
            (Ok(Some(ours)), Ok(protobuf)) => prop_assert_eq!(ours, protobuf),
            (Ok(None), Err(_)) => prop_assert!(bytes.is_empty()),
            (Err(ExportError::Malformed(_)), Err(_)) => {}
            (ours, protobuf) => prop_assert!(false, "{:?} vs protobuf's {:?}", ours, protobuf),
        }
    }
}
