//! The entries' bytes, kept outside sled in one append-only file, `entries`, in the store's
//! directory.
//!
//! Why: sled 0.34 stores write-once values at 1.65–1.90 × their size (it rewrites whole leaves
//! and reclaims a segment only when at most half of it is live; `custody-sledspace`), and the
//! entries are most of a ledger's bytes, written once and read by seq. A flat file holds them
//! at 1.03 ×.
//!
//! Format: records back to back from offset 0, each `len: u32 LE | crc32: u32 LE | bytes`,
//! the CRC (IEEE, as `crc32fast`) over the bytes. The file has no index of its own: where each
//! entry starts is kept in sled (the `o` pages of [`super::keys`]), written in the same sled
//! batch as the rest of the commit, so sled says which records are committed.
//!
//! Durability contract: [`EntryLog::append`] returns only after the records are written and
//! `fdatasync`ed, and the store applies its sled batch only after that. sled may write a batch
//! out on its own before any flush, so this order is what guarantees that sled never knows of
//! a record the disk lacks, after a crash or a power loss. The converse happens: records
//! appended whose sled batch was lost (the process died between the two) lie past the
//! committed end; [`EntryLog::open`] cuts them off, keeping them in a side file
//! (`entries.cut-FROM-LEN`), so that no bytes are ever destroyed. The store refuses to open
//! (before any cut) when sled's account is behind its own tree size or empty while the file is
//! not: that is a lost index, not a lost batch, and serving it would fork the log.
//!
//! One writer (the store's `apply`) and any number of readers: readers use positioned reads
//! (`pread`), find records only through the offsets sled holds, and never read past the
//! `written` mark (set after each append's sync, before sled gets the batch).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::StoreError;
use crate::export::MAX_ENTRY_LEN;

/// The file's name in the store directory.
pub const FILE_NAME: &str = "entries";

/// Bytes before each record's bytes: length and CRC.
pub const HEADER: u64 = 8;

/// A first read of a record takes this much, enough for the header and a typical entry.
const FIRST_READ: usize = 1024;

/// Sequential reads ([`EntryLog::records`]) take this much at a time.
const READ_AHEAD: usize = 256 * 1024;

/// What [`EntryLog::append`] wrote: where each record starts, and where the file's records
/// end once they are committed.
#[derive(Debug)]
pub struct Appended {
    pub offsets: Vec<u64>,
    pub end: u64,
}

/// The append-only entries file (see the module doc).
pub struct EntryLog {
    file: Arc<File>,
    /// Offset just past the last committed record.
    end: AtomicU64,
    /// Offset just past the last record written and synced (committed or not). Reads are
    /// bounded by it, not by `end`: a reader finds records through sled's offsets, which sled
    /// shows as soon as it has the batch, a moment before [`EntryLog::advance`].
    written: AtomicU64,
    /// Number of committed records.
    count: AtomicU64,
    /// Tests: the next append fails before writing.
    #[cfg(test)]
    pub(super) fail_next: std::sync::atomic::AtomicBool,
}

/// The record for `bytes`: header and bytes.
pub fn encode_record(bytes: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|&len| u64::from(len) <= MAX_ENTRY_LEN)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("an entry of {} bytes is over the limit", bytes.len()),
            )
        })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// Opens (or creates) one of the store's append-only files for reading and writing.
pub(super) fn open_file(path: &Path) -> Result<File, StoreError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(StoreError::Sync)
}

/// The length a record header announces, or why it is not a record header.
fn record_len(header: &[u8], offset: u64) -> Result<usize, StoreError> {
    let len = header
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| {
            StoreError::Corrupt(format!("entries file ends inside the record at {offset}"))
        })?;
    if u64::from(len) > MAX_ENTRY_LEN {
        return Err(StoreError::Corrupt(format!(
            "entries file: record at {offset} claims {len} bytes"
        )));
    }
    Ok(len as usize)
}

/// Checks a whole record (`header` then bytes) and returns its bytes.
fn check_record(record: &[u8], offset: u64) -> Result<&[u8], StoreError> {
    let len = record_len(record, offset)?;
    let crc = record
        .get(4..8)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes);
    let bytes = record
        .get(HEADER as usize..HEADER as usize + len)
        .ok_or_else(|| {
            StoreError::Corrupt(format!("entries file ends inside the record at {offset}"))
        })?;
    if crc != Some(crc32fast::hash(bytes)) {
        return Err(StoreError::Corrupt(format!(
            "entries file: the record at {offset} fails its checksum"
        )));
    }
    Ok(bytes)
}

fn read_error(offset: u64, error: io::Error) -> StoreError {
    StoreError::Read(format!("entries file at {offset}: {error}"))
}

impl EntryLog {
    /// Opens (or creates) the file in `dir`. `last` is sled's account of the last committed
    /// record: its seq and offset (`None` for none). Records past it were appended by a
    /// commit that sled never took; they are cut off and the cut is synced. A file that ends
    /// before the last committed record does is `Corrupt`: sled knows of records that are gone.
    /// So is a non-empty file when sled knows of no record: that is a lost index, not a lost
    /// batch, and cutting everything would let the ledger start over and fork the log. (The
    /// one legitimate case, a crash inside a new ledger's very first commit, needs the file
    /// moved aside by hand; the error says so.)
    pub fn open(dir: &Path, last: Option<(u64, u64)>) -> Result<Self, StoreError> {
        let path = dir.join(FILE_NAME);
        let file = open_file(&path)?;
        let len = file.metadata().map_err(StoreError::Sync)?.len();
        let log = Self {
            file: Arc::new(file),
            end: AtomicU64::new(len),
            written: AtomicU64::new(len),
            count: AtomicU64::new(0),
            #[cfg(test)]
            fail_next: Default::default(),
        };
        let (count, committed_end) = match last {
            None if len > 0 => {
                return Err(StoreError::Corrupt(format!(
                    "{} holds {len} bytes but the index knows of no entry (a replaced or lost \
                     database?); if this is a new ledger whose first commit never completed, \
                     move the file aside",
                    path.display()
                )));
            }
            None => (0, 0),
            Some((seq, offset)) => {
                let end = if offset.saturating_add(HEADER) <= len {
                    log.record_end(offset)?
                } else {
                    u64::MAX
                };
                if end > len {
                    return Err(StoreError::Corrupt(format!(
                        "{} holds {len} bytes, but the committed entries end past {offset}",
                        path.display()
                    )));
                }
                // The last committed record must be whole before anything after it is cut.
                if len > end {
                    log.read(offset)?;
                }
                let count = seq
                    .checked_add(1)
                    .ok_or_else(|| StoreError::Corrupt("entry offsets: seq out of range".into()))?;
                (count, end)
            }
        };
        if len > committed_end {
            keep_cut_tail(&log.file, dir, committed_end, len)?;
            log.file.set_len(committed_end).map_err(StoreError::Sync)?;
        }
        // Synced whether or not it was cut: the records may have been written by a process
        // that died before its own sync.
        log.file.sync_data().map_err(StoreError::Sync)?;
        log.advance(committed_end, count);
        log.written.store(committed_end, Ordering::Release);
        Ok(log)
    }

    /// Number of committed records.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Where the committed records end.
    pub fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Writes `entries` after the committed end and syncs them, without committing them: until
    /// [`advance`](Self::advance) a later append overwrites them, and only a reader that
    /// found their offsets in sled reads them. Returns where each record starts and where
    /// they end.
    pub fn append(&self, entries: &[Vec<u8>]) -> io::Result<Appended> {
        #[cfg(test)]
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(io::Error::other("injected append failure"));
        }
        let start = self.end();
        // Nothing past the committed end is readable while it is being overwritten.
        self.written.store(start, Ordering::Release);
        if entries.is_empty() {
            return Ok(Appended {
                offsets: Vec::new(),
                end: start,
            });
        }
        let mut buffer =
            Vec::with_capacity(entries.iter().map(|e| e.len() + HEADER as usize).sum());
        let mut offsets = Vec::with_capacity(entries.len());
        for bytes in entries {
            offsets.push(start + buffer.len() as u64);
            encode_record(bytes, &mut buffer)?;
        }
        self.file.write_all_at(&buffer, start)?;
        self.file.sync_data()?;
        self.written
            .store(start + buffer.len() as u64, Ordering::Release);
        Ok(Appended {
            offsets,
            end: start + buffer.len() as u64,
        })
    }

    /// Commits what [`append`](Self::append) wrote, once sled holds its offsets: the records
    /// now end at `end` and number `count`.
    pub fn advance(&self, end: u64, count: u64) {
        self.end.store(end, Ordering::Release);
        self.count.store(count, Ordering::Release);
    }

    /// Where the record at `offset` ends (reads its header).
    pub fn record_end(&self, offset: u64) -> Result<u64, StoreError> {
        let mut header = [0u8; HEADER as usize];
        self.file
            .read_exact_at(&mut header, offset)
            .map_err(|e| read_error(offset, e))?;
        Ok(offset + HEADER + record_len(&header, offset)? as u64)
    }

    /// The bytes of the record at `offset`, checked against its CRC. Only offsets sled holds
    /// are read, so the record is committed, or its batch is being handed to sled.
    pub fn read(&self, offset: u64) -> Result<Vec<u8>, StoreError> {
        let end = self.written.load(Ordering::Acquire);
        let available = end.saturating_sub(offset).min(FIRST_READ as u64) as usize;
        let mut record = vec![0u8; available];
        self.file
            .read_exact_at(&mut record, offset)
            .map_err(|e| read_error(offset, e))?;
        let whole = HEADER as usize + record_len(&record, offset)?;
        if whole > record.len() {
            if offset + whole as u64 > end {
                return Err(StoreError::Corrupt(format!(
                    "entries file: the record at {offset} runs past the written end {end}"
                )));
            }
            let have = record.len();
            record.resize(whole, 0);
            self.file
                .read_exact_at(&mut record[have..], offset + have as u64)
                .map_err(|e| read_error(offset, e))?;
        }
        let bytes_len = check_record(&record, offset)?.len();
        record.drain(..HEADER as usize);
        record.truncate(bytes_len);
        Ok(record)
    }

    /// The `count` records from `offset` on, read sequentially in large pieces, each with
    /// its offset.
    pub fn records(&self, offset: u64, count: u64) -> Records {
        Records {
            file: Arc::clone(&self.file),
            end: self.written.load(Ordering::Acquire),
            buffer: Vec::new(),
            buffer_at: offset,
            used: 0,
            left: count,
        }
    }
}

/// Iterator of [`EntryLog::records`]: each record's bytes, checked.
pub struct Records {
    file: Arc<File>,
    /// The written end when the iterator was made; nothing past it is read.
    end: u64,
    buffer: Vec<u8>,
    /// File offset of `buffer[0]`.
    buffer_at: u64,
    /// Bytes of `buffer` already returned.
    used: usize,
    left: u64,
}

impl Records {
    /// Makes `buffer[used..]` hold at least `want` bytes, reading from the file.
    fn fill(&mut self, want: usize) -> Result<(), StoreError> {
        if self.buffer.len() - self.used >= want {
            return Ok(());
        }
        let offset = self.buffer_at + self.used as u64;
        let size = want.max(READ_AHEAD) as u64;
        let size = size.min(self.end.saturating_sub(offset)) as usize;
        if size < want {
            return Err(StoreError::Corrupt(format!(
                "entries file: the record at {offset} runs past the written end {}",
                self.end
            )));
        }
        let mut buffer = vec![0u8; size];
        self.file
            .read_exact_at(&mut buffer, offset)
            .map_err(|e| read_error(offset, e))?;
        self.buffer = buffer;
        self.buffer_at = offset;
        self.used = 0;
        Ok(())
    }

    fn next_record(&mut self) -> Result<(u64, Vec<u8>), StoreError> {
        let offset = self.buffer_at + self.used as u64;
        self.fill(HEADER as usize)?;
        let len = record_len(&self.buffer[self.used..], offset)?;
        self.fill(HEADER as usize + len)?;
        let bytes = check_record(&self.buffer[self.used..], offset)?.to_vec();
        self.used += HEADER as usize + len;
        Ok((offset, bytes))
    }
}

/// Copies the records past `from` (appended by a commit sled never took, as far as sled
/// knows) to `entries.cut-FROM-LEN` beside the file and syncs it, so that cutting them off
/// never destroys data, whatever the reason sled's account is short.
fn keep_cut_tail(file: &File, dir: &Path, from: u64, len: u64) -> Result<(), StoreError> {
    // A name not taken yet: an earlier cut at the same place is never overwritten.
    let name = format!("{FILE_NAME}.cut-{from}-{len}");
    let mut side = dir.join(&name);
    let mut suffix = 0u32;
    let mut out = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&side)
        {
            Ok(out) => break out,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && suffix < 1000 => {
                suffix += 1;
                side = dir.join(format!("{name}.{suffix}"));
            }
            Err(e) => return Err(StoreError::Sync(e)),
        }
    };
    tracing::warn!(
        bytes = len - from,
        kept_in = %side.display(),
        "cutting off entries past the last one the index holds (a commit that never completed)"
    );
    let mut copy = || -> io::Result<()> {
        let mut at = from;
        let mut buffer = vec![0u8; READ_AHEAD];
        while at < len {
            let n = (len - at).min(READ_AHEAD as u64) as usize;
            file.read_exact_at(&mut buffer[..n], at)?;
            io::Write::write_all(&mut out, &buffer[..n])?;
            at += n as u64;
        }
        out.sync_all()?;
        File::open(dir)?.sync_all()
    };
    copy().map_err(|e| {
        // Nothing was cut; a partial copy would only mislead.
        let _ = std::fs::remove_file(&side);
        StoreError::Sync(e)
    })
}

impl Iterator for Records {
    type Item = Result<(u64, Vec<u8>), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let record = self.next_record();
        // After an error, stop: what follows cannot be located.
        self.left = if record.is_ok() { self.left - 1 } else { 0 };
        Some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: usize) -> Vec<Vec<u8>> {
        // Sizes around the first read's size, so both read paths run.
        (0..n)
            .map(|i| vec![i as u8; [0, 1, 300, FIRST_READ - 8, FIRST_READ, 5000][i % 6]])
            .collect()
    }

    #[test]
    fn appends_read_back_one_by_one_and_in_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let log = EntryLog::open(dir.path(), None).unwrap();
        let first = entries(7);
        let appended = log.append(&first).unwrap();
        assert_eq!(
            (log.end(), log.count()),
            (0, 0),
            "not committed before advance"
        );
        log.advance(appended.end, 7);
        let second = entries(13);
        let more = log.append(&second).unwrap();
        log.advance(more.end, 20);
        let all: Vec<_> = first.iter().chain(&second).cloned().collect();
        let offsets: Vec<_> = appended
            .offsets
            .iter()
            .chain(&more.offsets)
            .copied()
            .collect();
        for (offset, bytes) in offsets.iter().zip(&all) {
            assert_eq!(&log.read(*offset).unwrap(), bytes);
        }
        let read: Vec<_> = log
            .records(0, all.len() as u64)
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            read,
            offsets.iter().copied().zip(all.clone()).collect::<Vec<_>>()
        );
        let tail: Vec<_> = log.records(offsets[5], 3).map(|r| r.unwrap().1).collect();
        assert_eq!(tail, all[5..8]);
        assert_eq!(log.record_end(offsets[19]).unwrap(), more.end);
        // Past the written end nothing is read.
        assert!(log
            .records(0, all.len() as u64 + 1)
            .last()
            .unwrap()
            .is_err());
    }

    #[test]
    fn an_uncommitted_append_is_overwritten_and_cut_off_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = EntryLog::open(dir.path(), None).unwrap();
        let kept = log.append(&[b"kept".to_vec()]).unwrap();
        log.advance(kept.end, 1);
        // Written and synced, but sled never took it.
        log.append(&[b"lost lost lost".to_vec()]).unwrap();
        let again = log.append(&[b"next".to_vec()]).unwrap();
        assert_eq!(again.offsets, vec![kept.end], "the next append overwrites");
        drop(log);
        let len = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len();
        assert!(len > kept.end);
        let whole = std::fs::read(dir.path().join(FILE_NAME)).unwrap();
        let log = EntryLog::open(dir.path(), Some((0, 0))).unwrap();
        assert_eq!((log.end(), log.count()), (kept.end, 1));
        assert_eq!(
            std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len(),
            kept.end
        );
        assert_eq!(log.read(0).unwrap(), b"kept");
        // What was cut is kept beside the file, never destroyed.
        let side = dir
            .path()
            .join(format!("{FILE_NAME}.cut-{}-{len}", kept.end));
        assert_eq!(
            std::fs::read(side).unwrap(),
            whole[kept.end as usize..].to_vec()
        );
        // The same cut again (the same bytes lost at the same place) does not overwrite the
        // first side file.
        log.append(&[b"lost lost lost".to_vec()]).unwrap();
        drop(log);
        EntryLog::open(dir.path(), Some((0, 0))).unwrap();
        let again = dir
            .path()
            .join(format!("{FILE_NAME}.cut-{}-{len}.1", kept.end));
        let mut lost = Vec::new();
        encode_record(b"lost lost lost", &mut lost).unwrap();
        assert_eq!(std::fs::read(again).unwrap(), lost);
        let first = dir
            .path()
            .join(format!("{FILE_NAME}.cut-{}-{len}", kept.end));
        assert_eq!(std::fs::read(first).unwrap(), whole[kept.end as usize..]);
        // An empty account beside a non-empty file is a lost index: refused, nothing cut.
        let before = std::fs::read(dir.path().join(FILE_NAME)).unwrap();
        assert!(matches!(
            EntryLog::open(dir.path(), None),
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(std::fs::read(dir.path().join(FILE_NAME)).unwrap(), before);
        assert!(!dir
            .path()
            .join(format!("{FILE_NAME}.cut-0-{}", kept.end))
            .exists());
    }

    #[test]
    fn refuses_a_short_file_and_damaged_records() {
        let dir = tempfile::tempdir().unwrap();
        let log = EntryLog::open(dir.path(), None).unwrap();
        let appended = log.append(&entries(4)).unwrap();
        log.advance(appended.end, 4);
        drop(log);
        let last = Some((3, appended.offsets[3]));
        // sled knows of a fifth record the file lacks, or of a last record whose header is
        // cut short.
        for wrong in [Some((4, appended.end)), Some((3, appended.end - 4))] {
            assert!(matches!(
                EntryLog::open(dir.path(), wrong),
                Err(StoreError::Corrupt(_))
            ));
        }
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        // Flip a byte of record 2's bytes: its checksum fails, the others still read.
        let at = appended.offsets[2] as usize + HEADER as usize + 10;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let log = EntryLog::open(dir.path(), last).unwrap();
        assert!(matches!(
            log.read(appended.offsets[2]),
            Err(StoreError::Corrupt(_))
        ));
        assert!(log.read(appended.offsets[3]).is_ok());
        let read: Vec<_> = log.records(0, 4).collect();
        assert_eq!(read.len(), 3, "stops at the damaged record");
        assert!(matches!(read[2], Err(StoreError::Corrupt(_))));
        drop(log);
        // Nothing is cut after a last committed record that is not whole.
        assert!(matches!(
            EntryLog::open(dir.path(), Some((2, appended.offsets[2]))),
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), appended.end);
        // A length past the limit is refused before anything is allocated for it.
        bytes[at] ^= 1;
        bytes[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let log = EntryLog::open(dir.path(), last).unwrap();
        assert!(matches!(log.read(0), Err(StoreError::Corrupt(_))));
        assert!(matches!(log.record_end(0), Err(StoreError::Corrupt(_))));
        // A record that claims to run past the written end.
        bytes[..4].copy_from_slice(&(appended.end as u32).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let log = EntryLog::open(dir.path(), last).unwrap();
        assert!(matches!(log.read(0), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn refuses_to_append_an_entry_over_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let log = EntryLog::open(dir.path(), None).unwrap();
        let huge = vec![0u8; MAX_ENTRY_LEN as usize + 1];
        assert_eq!(
            log.append(&[huge]).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
