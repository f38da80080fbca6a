//! The export file: what an auditor carries away and `custody verify` reads. Specified in
//! `docs/EXPORT.md`:
//!
//! ```text
//! "custody-export v1\n"                      header line (ASCII)
//! varint(len) || checkpoint note             the newest signed checkpoint (UTF-8 text)
//! varint(len) || entry 0 bytes               every entry's stored bytes, seq 0 ..
//! ...                                        .. up to the checkpoint's tree size - 1
//! ```
//!
//! `varint` is the protobuf unsigned LEB128 encoding. The file ends right after the last
//! entry. Reading and writing go through `std::io` traits; nothing here opens files.

use std::io::{BufRead, Write};

/// The first line of every export.
pub const HEADER: &[u8] = b"custody-export v1\n";
/// Longest checkpoint note accepted.
pub const MAX_NOTE_LEN: u64 = 64 * 1024;
/// Longest entry accepted (events are at most 64 KiB; entries add a little).
pub const MAX_ENTRY_LEN: u64 = 1024 * 1024;

/// Why an export could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// Reading or writing failed (the file, the disk): not evidence about the ledger.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a well-formed export (wrong header, bad length, truncated): the file
    /// was damaged or altered.
    #[error("malformed export: {0}")]
    Malformed(String),
}

fn read_varint<R: BufRead>(reader: &mut R) -> Result<Option<u64>, ExportError> {
    let mut value = 0u64;
    for i in 0..10 {
        let mut byte = [0u8; 1];
        match reader.read(&mut byte)? {
            0 if i == 0 => return Ok(None),
            0 => return Err(ExportError::Malformed("truncated length".into())),
            _ => {}
        }
        // The tenth byte holds only bit 63: anything more would be silently dropped.
        if i == 9 && byte[0] > 1 {
            return Err(ExportError::Malformed(
                "length varint overflows 64 bits".into(),
            ));
        }
        value |= u64::from(byte[0] & 0x7f) << (7 * i);
        if byte[0] & 0x80 == 0 {
            return Ok(Some(value));
        }
    }
    Err(ExportError::Malformed(
        "length varint longer than 10 bytes".into(),
    ))
}

fn read_exact_or_malformed<R: BufRead>(
    reader: &mut R,
    len: u64,
    what: &str,
) -> Result<Vec<u8>, ExportError> {
    // len is bounded by the caller (at most MAX_ENTRY_LEN), so it fits in usize.
    let mut bytes = vec![0u8; len as usize];
    reader.read_exact(&mut bytes).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ExportError::Malformed(format!("truncated {what}")),
        _ => ExportError::Io(e),
    })?;
    Ok(bytes)
}

/// Reads an export as a stream: the checkpoint note first, then one entry at a time.
pub struct ExportReader<R> {
    reader: R,
    entries_read: u64,
}

impl<R: BufRead> ExportReader<R> {
    /// Reads the header and the checkpoint note.
    pub fn open(mut reader: R) -> Result<(Self, String), ExportError> {
        let mut header = vec![0u8; HEADER.len()];
        reader.read_exact(&mut header).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                ExportError::Malformed("not a custody export (too short)".into())
            }
            _ => ExportError::Io(e),
        })?;
        if header != HEADER {
            return Err(ExportError::Malformed(
                "not a custody export v1 (bad header line)".into(),
            ));
        }
        let len = read_varint(&mut reader)?
            .ok_or_else(|| ExportError::Malformed("no checkpoint".into()))?;
        if len > MAX_NOTE_LEN {
            return Err(ExportError::Malformed(format!("checkpoint of {len} bytes")));
        }
        let note = read_exact_or_malformed(&mut reader, len, "checkpoint")?;
        let note = String::from_utf8(note)
            .map_err(|_| ExportError::Malformed("checkpoint is not UTF-8".into()))?;
        Ok((
            Self {
                reader,
                entries_read: 0,
            },
            note,
        ))
    }

    /// The next entry's stored bytes, or `None` at the end of the file.
    pub fn next_entry(&mut self) -> Result<Option<Vec<u8>>, ExportError> {
        let Some(len) = read_varint(&mut self.reader)? else {
            return Ok(None);
        };
        if len > MAX_ENTRY_LEN {
            return Err(ExportError::Malformed(format!(
                "entry {} claims {len} bytes",
                self.entries_read
            )));
        }
        let bytes = read_exact_or_malformed(
            &mut self.reader,
            len,
            &format!("entry {}", self.entries_read),
        )?;
        self.entries_read += 1;
        Ok(Some(bytes))
    }
}

/// Writes the header and the checkpoint note.
pub fn write_header<W: Write>(writer: &mut W, note: &str) -> Result<(), ExportError> {
    writer.write_all(HEADER)?;
    write_record(writer, note.as_bytes())
}

/// Writes one length-delimited record (an entry).
pub fn write_record<W: Write>(writer: &mut W, bytes: &[u8]) -> Result<(), ExportError> {
    let mut length = Vec::with_capacity(10);
    prost::encoding::encode_varint(bytes.len() as u64, &mut length);
    writer.write_all(&length)?;
    writer.write_all(bytes)?;
    Ok(())
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let mut file = Vec::new();
        write_header(&mut file, "note\n").unwrap();
        let entries = [vec![1u8; 3], vec![], vec![7u8; 300]];
        for entry in &entries {
            write_record(&mut file, entry).unwrap();
        }
        let (mut reader, note) = ExportReader::open(file.as_slice()).unwrap();
        assert_eq!(note, "note\n");
        for entry in &entries {
            assert_eq!(reader.next_entry().unwrap().as_ref(), Some(entry));
        }
        assert!(reader.next_entry().unwrap().is_none());
        // Truncated inside the last entry.
        let cut = &file[..file.len() - 1];
        let (mut reader, _) = ExportReader::open(cut).unwrap();
        reader.next_entry().unwrap();
        reader.next_entry().unwrap();
        assert!(matches!(
            reader.next_entry(),
            Err(ExportError::Malformed(_))
        ));
        // Wrong header.
        let mut bad = file.clone();
        bad[0] ^= 1;
        assert!(matches!(
            ExportReader::open(bad.as_slice()),
            Err(ExportError::Malformed(_))
        ));
        // An absurd length.
        let mut huge = Vec::new();
        write_header(&mut huge, "n\n").unwrap();
        prost::encoding::encode_varint(u64::MAX, &mut huge);
        let (mut reader, _) = ExportReader::open(huge.as_slice()).unwrap();
        assert!(matches!(
            reader.next_entry(),
            Err(ExportError::Malformed(_))
        ));
    }
}
