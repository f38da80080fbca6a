//! The Merkle tree's stored hashes (see [`crate::merkle`]), kept outside sled in one
//! append-only file, `hashes`, in the store's directory: hash `i` at offset `32 × i`.
//!
//! Why: packed in sled, the incomplete last page of 256 hashes was rewritten by every commit
//! (8 KiB for a commit of ten events) and sled kept the old copies until its cleaner ran;
//! here each hash is written once.
//!
//! Same contract as [`super::entrylog`]: [`HashLog::append`] writes and `fdatasync`s before
//! the store applies the sled batch that moves the tree size, so sled never counts a hash the
//! disk lacks; hashes past sled's count (a commit that sled never took) are cut off on open.
//! The hashes carry no checksum: they are derived data that every reader checks against a
//! signed checkpoint (open recomputes the root of the newest one from them, and every proof
//! a client gets verifies against a checkpoint or fails).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::StoreError;
use crate::merkle::{Hash, HASH_SIZE};

/// The file's name in the store directory.
pub const FILE_NAME: &str = "hashes";

const SIZE: u64 = HASH_SIZE as u64;

/// The append-only hashes file (see the module doc).
pub struct HashLog {
    file: File,
    /// Number of committed hashes.
    count: AtomicU64,
    /// Number of hashes written and synced (committed or not). Reads are bounded by it: a
    /// reader asks for hashes of a tree size it learnt from sled, which sled shows as soon as
    /// it has the batch, a moment before [`HashLog::advance`].
    written: AtomicU64,
    /// Tests: the next append fails before writing.
    #[cfg(test)]
    pub(super) fail_next: std::sync::atomic::AtomicBool,
}

impl HashLog {
    /// Opens (or creates) the file in `dir`, holding `count` committed hashes by sled's
    /// account. Hashes past them are cut off and the cut is synced; fewer is `Corrupt`.
    pub fn open(dir: &Path, count: u64) -> Result<Self, StoreError> {
        let file = super::entrylog::open_file(&dir.join(FILE_NAME))?;
        let log = Self {
            file,
            count: AtomicU64::new(0),
            written: AtomicU64::new(0),
            #[cfg(test)]
            fail_next: Default::default(),
        };
        log.cut(count)?;
        Ok(log)
    }

    /// Makes the file hold exactly the first `count` hashes (which it must have), synced.
    pub fn cut(&self, count: u64) -> Result<(), StoreError> {
        let len = self.file.metadata().map_err(StoreError::Sync)?.len();
        let want = count.saturating_mul(SIZE);
        if len < want {
            return Err(StoreError::Corrupt(format!(
                "the hashes file holds {len} bytes, but the tree needs {count} hashes"
            )));
        }
        if len > want {
            self.file.set_len(want).map_err(StoreError::Sync)?;
        }
        self.file.sync_data().map_err(StoreError::Sync)?;
        self.count.store(count, Ordering::Release);
        self.written.store(count, Ordering::Release);
        Ok(())
    }

    /// Number of committed hashes.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Writes `hashes` as hashes `first ..` and syncs them without committing them; `first`
    /// must be the committed count. Until [`advance`](Self::advance) a later append
    /// overwrites them; they are read only by a reader that learnt the new tree size from
    /// sled.
    pub fn append(&self, first: u64, hashes: &[Hash]) -> Result<(), StoreError> {
        if first != self.count() {
            return Err(StoreError::Corrupt(format!(
                "hashes appended at {first}, but {} are stored",
                self.count()
            )));
        }
        #[cfg(test)]
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Sync(io::Error::other(
                "injected append failure",
            )));
        }
        // Nothing past the committed count is readable while it is being overwritten.
        self.written.store(first, Ordering::Release);
        if hashes.is_empty() {
            return Ok(());
        }
        let bytes: Vec<u8> = hashes.iter().flat_map(|h| h.0).collect();
        self.file
            .write_all_at(&bytes, first * SIZE)
            .and_then(|()| self.file.sync_data())
            .map_err(StoreError::Sync)?;
        self.written
            .store(first + hashes.len() as u64, Ordering::Release);
        Ok(())
    }

    /// Commits what [`append`](Self::append) wrote, once sled holds the new tree size.
    pub fn advance(&self, count: u64) {
        self.count.store(count, Ordering::Release);
    }

    /// Hash `index`, if written (committed, or in the batch being handed to sled).
    pub fn read(&self, index: u64) -> io::Result<Option<Hash>> {
        if index >= self.written.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut hash = [0u8; HASH_SIZE];
        self.file.read_exact_at(&mut hash, index * SIZE)?;
        Ok(Some(Hash(hash)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(range: std::ops::Range<u8>) -> Vec<Hash> {
        range.map(|i| Hash([i; HASH_SIZE])).collect()
    }

    #[test]
    fn appends_are_read_once_committed_and_cut_back_to_sleds_count() {
        let dir = tempfile::tempdir().unwrap();
        let log = HashLog::open(dir.path(), 0).unwrap();
        assert_eq!(log.read(0).unwrap(), None);
        log.append(0, &hashes(0..5)).unwrap();
        assert_eq!(log.count(), 0, "not committed before advance");
        log.advance(5);
        assert!(matches!(
            log.append(4, &hashes(9..10)),
            Err(StoreError::Corrupt(_))
        ));
        // Appended and synced, but sled never took it.
        log.append(5, &hashes(5..9)).unwrap();
        assert_eq!(log.read(4).unwrap(), Some(Hash([4; HASH_SIZE])));
        assert_eq!(log.read(9).unwrap(), None);
        drop(log);
        let log = HashLog::open(dir.path(), 5).unwrap();
        let len = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len();
        assert_eq!(len, 5 * SIZE);
        assert_eq!(log.read(2).unwrap(), Some(Hash([2; HASH_SIZE])));
        assert_eq!(log.read(5).unwrap(), None, "cut off");
        drop(log);
        assert!(matches!(
            HashLog::open(dir.path(), 6),
            Err(StoreError::Corrupt(_))
        ));
    }
}
