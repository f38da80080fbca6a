//! What `sled::Db::flush` leaves undone, so that a flushed commit survives a power loss and
//! not only a crash of the process.
//!
//! sled 0.34 on Linux ends a flush with `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)`
//! on the range of its log it wrote. That hands the bytes to the device but, unlike
//! `fdatasync`, it neither commits the file's metadata (its size when the log grows, the
//! allocation of new blocks) nor flushes the device's volatile write cache: the page cache
//! survives a killed process, so a crash test passes, but a power loss can take acknowledged
//! commits. And an item too large for the log (over a quarter of a 512 KiB segment, e.g. a
//! leaf of sixteen 8 KiB hash pages) goes to a file of its own under `blobs/`, written and
//! never synced, nor is the directory that names it.
//!
//! [`SledFiles::sync`], called after every flush, closes both gaps: `fdatasync` of the log
//! file, then of every blob file not yet known to be whole and synced, then of the `blobs`
//! directory when it gained files. Any blob that a flushed log entry points to was written
//! in full before that entry was, so it is whole when this runs; one still being written
//! (for a later commit) is synced again at each later call until its checksum shows it
//! whole.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// How recent a change of the `blobs` directory must be for it to be listed again even
/// though its modification time did not change: file systems stamp times from a coarse
/// clock, so two files created within one tick leave one time.
const COARSE_CLOCK: Duration = Duration::from_secs(1);

/// sled's data files in a database directory, synced after each flush.
pub(crate) struct SledFiles {
    log: File,
    blobs: PathBuf,
    state: Mutex<BlobState>,
}

#[derive(Default)]
struct BlobState {
    /// The directory's modification time when it was last listed.
    listed_at: Option<SystemTime>,
    /// Every blob file the last listing found.
    known: HashSet<OsString>,
    /// Blob files synced, or still to be synced, before their checksum showed them whole.
    pending: HashSet<OsString>,
}

impl SledFiles {
    /// The files of the sled database in `dir` (opened by sled already).
    pub(crate) fn open(dir: &Path) -> std::io::Result<Self> {
        let blobs = dir.join("blobs");
        std::fs::create_dir_all(&blobs)?;
        Ok(Self {
            log: File::open(dir.join("db"))?,
            blobs,
            state: Mutex::new(BlobState::default()),
        })
    }

    /// Makes durable everything sled's flush wrote (see the module's documentation). An
    /// error means the data may not be durable: the caller must not acknowledge it.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.log.sync_data()?;
        // A poisoned lock only means an earlier sync failed part-way: the state is still a
        // sound over-approximation of what needs syncing.
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let modified = std::fs::metadata(&self.blobs)?.modified()?;
        let recent = SystemTime::now()
            .duration_since(modified)
            .map_or(true, |age| age < COARSE_CLOCK);
        if state.listed_at != Some(modified) || recent {
            let mut names = HashSet::new();
            for item in std::fs::read_dir(&self.blobs)? {
                names.insert(item?.file_name());
            }
            let state = &mut *state;
            let gained: Vec<OsString> = names.difference(&state.known).cloned().collect();
            state.pending.extend(gained.iter().cloned());
            state.pending.retain(|name| names.contains(name));
            state.known = names;
            state.listed_at = Some(modified);
            if !gained.is_empty() {
                File::open(&self.blobs)?.sync_all()?;
            }
        }
        let mut whole = Vec::new();
        for name in &state.pending {
            let path = self.blobs.join(name);
            let mut file = match File::open(&path) {
                Ok(file) => file,
                // sled removed it (superseded): nothing to keep.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    whole.push(name.clone());
                    continue;
                }
                Err(e) => return Err(e),
            };
            file.sync_data()?;
            if blob_is_whole(&mut file)? {
                whole.push(name.clone());
            }
        }
        for name in whole {
            state.pending.remove(&name);
        }
        Ok(())
    }

    /// How many blob files are still pending and how many the last listing found.
    #[cfg(test)]
    pub(crate) fn pending_and_known(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap();
        (state.pending.len(), state.known.len())
    }
}

/// Whether a sled 0.34 blob file is complete: a little-endian CRC-32 of the rest, a kind
/// byte, then the item.
fn blob_is_whole(file: &mut File) -> std::io::Result<bool> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(match bytes.split_first_chunk::<4>() {
        Some((crc, rest)) if !rest.is_empty() => u32::from_le_bytes(*crc) == crc32fast::hash(rest),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(bytes: &[u8]) -> Vec<u8> {
        let mut file = crc32fast::hash(bytes).to_le_bytes().to_vec();
        file.extend_from_slice(bytes);
        file
    }

    #[test]
    fn a_blob_is_dropped_from_the_pending_set_once_whole_and_synced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"log").unwrap();
        let files = SledFiles::open(dir.path()).unwrap();
        let pending = |files: &SledFiles| files.pending_and_known().0;
        // Cut short (as while sled is still writing it): synced, and kept to sync again.
        let whole = blob(b"\x01an item");
        std::fs::write(files.blobs.join("100"), &whole[..6]).unwrap();
        files.sync().unwrap();
        assert_eq!(pending(&files), 1);
        std::fs::write(files.blobs.join("100"), &whole).unwrap();
        // A second file created within the same clock tick is found too.
        std::fs::write(files.blobs.join("200"), blob(b"\x01another")).unwrap();
        files.sync().unwrap();
        assert_eq!(pending(&files), 0);
        assert_eq!(files.pending_and_known().1, 2);
        // A file removed while pending is forgotten.
        std::fs::write(files.blobs.join("300"), b"xx").unwrap();
        files.sync().unwrap();
        assert_eq!(pending(&files), 1);
        std::fs::remove_file(files.blobs.join("300")).unwrap();
        files.sync().unwrap();
        assert_eq!(pending(&files), 0);
    }

    #[test]
    fn checks_the_blob_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        for (bytes, whole) in [
            (blob(b"\x01item"), true),
            (b"\0\0\0\0".to_vec(), false),
            (vec![], false),
            (
                {
                    let mut b = blob(b"\x01item");
                    b[5] ^= 1;
                    b
                },
                false,
            ),
        ] {
            std::fs::write(&path, &bytes).unwrap();
            assert_eq!(
                blob_is_whole(&mut File::open(&path).unwrap()).unwrap(),
                whole
            );
        }
    }
}
