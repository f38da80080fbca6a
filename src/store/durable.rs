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
//! [`SledFiles::sync`], called after every flush, closes both gaps, blobs first: each
//! blob file not yet known to be whole and synced is read, then `fdatasync`ed, and forgotten
//! only if the read showed it whole (sled creates a blob file new and writes it once, so a
//! whole file read before the sync is whole on disk after it); then the `blobs` directory is
//! `fsync`ed if it gained files; then the log file is `fdatasync`ed. Any blob that a flushed
//! log entry points to was written in full before that entry, so it is whole when this runs;
//! one still being written (for a later commit) stays pending and is synced again at every
//! later call until a read shows it whole. The guarantee holds as far as the device honours
//! cache flushes.
//!
//! What this cannot order: sled's flush has already handed the log to the device before
//! `sync` starts, so after a power loss the log may hold a commit not yet acknowledged whose
//! blob did not reach the disk. sled's recovery skips an update whose blob is missing, so
//! such a commit can come back torn; the ledger's checks on open (the newest checkpoint
//! against the stored hashes, the tail against the checkpoint) then refuse to serve it
//! rather than serve a torn commit. Acknowledged commits are not affected.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// How long after a change of the `blobs` directory a listing is trusted to have seen every
/// file created at that modification time: file systems stamp times from a coarse clock
/// (a few milliseconds on ext4, 2 s on FAT), so files created within one tick leave one
/// time, and only a listing taken later than a tick after it cannot have missed one.
const COARSE_CLOCK: Duration = Duration::from_secs(2);

/// sled's data files in a database directory, synced after each flush.
pub(crate) struct SledFiles {
    log: File,
    blobs: PathBuf,
    state: Mutex<BlobState>,
    /// What the file operations did, in order, for the tests.
    #[cfg(test)]
    ops: Mutex<Vec<String>>,
    /// Makes the next directory sync fail, for the tests.
    #[cfg(test)]
    fail_directory_sync: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct BlobState {
    /// The directory's modification time at the last listing.
    listed_at: Option<SystemTime>,
    /// Whether that listing was taken long enough after that time to have seen every file.
    settled: bool,
    /// Every blob file the last listing found.
    known: HashSet<OsString>,
    /// Blob files not yet seen whole and synced.
    pending: HashSet<OsString>,
    /// Whether the directory gained files since its last successful `fsync`.
    directory_unsynced: bool,
}

impl SledFiles {
    /// The files of the sled database in `dir`, which sled has opened (and recovered)
    /// already. Syncs the blob files already there, sled's `conf`, `blobs/`, `dir` and its
    /// parent, so that what a crashed process (or sled's creation of the database) left is
    /// durable before anything new is acknowledged.
    pub(crate) fn open(dir: &Path) -> std::io::Result<Self> {
        let blobs = dir.join("blobs");
        std::fs::create_dir_all(&blobs)?;
        let files = Self {
            log: File::open(dir.join("db"))?,
            blobs,
            state: Mutex::new(BlobState::default()),
            #[cfg(test)]
            ops: Mutex::default(),
            #[cfg(test)]
            fail_directory_sync: Default::default(),
        };
        let mut state = files.lock();
        for name in files.relist(&mut state, SystemTime::now())? {
            // Nothing writes yet: no checksum to wait for.
            files.sync_if_present(&files.blobs.join(&name), &name)?;
        }
        drop(state);
        // sled writes its `conf` (the format parameters it checks on every open) without a
        // sync: a power loss soon after a ledger is created could leave it empty.
        files.sync_if_present(&dir.join("conf"), OsStr::new("conf"))?;
        files.sync_directory(&files.blobs)?;
        files.sync_directory(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            files.sync_directory(parent)?;
        }
        // What sled recovered after a crash may include commits never acknowledged; the
        // ledger serves them from its head on, so make them durable first.
        files.log.sync_data()?;
        files.record(|| "sync log".into());
        Ok(files)
    }

    /// Makes durable everything sled's flush wrote (see the module's documentation). An
    /// error means the data may not be durable: the caller must not acknowledge it (the
    /// ledger stops appending until restarted). A file or directory is marked synced only
    /// after its sync succeeded, so a later call redoes what a failed one left.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.sync_at(SystemTime::now())
    }

    /// [`sync`](Self::sync) with the clock read at `now`, which must be taken before the
    /// directory is listed.
    fn sync_at(&self, now: SystemTime) -> std::io::Result<()> {
        let mut state = self.lock();
        let new = self.relist(&mut state, now)?;
        state.directory_unsynced |= !new.is_empty();
        state.pending.extend(new);
        let mut done = Vec::new();
        for name in &state.pending {
            match self.read_whole(name) {
                Ok(whole) => {
                    self.sync_if_present(&self.blobs.join(name), name)?;
                    if whole {
                        done.push(name.clone());
                    }
                }
                // sled removed it (superseded): nothing to keep.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => done.push(name.clone()),
                Err(e) => return Err(e),
            }
        }
        for name in done {
            state.pending.remove(&name);
        }
        if state.directory_unsynced {
            self.sync_directory(&self.blobs)?;
            state.directory_unsynced = false;
        }
        drop(state);
        self.log.sync_data()?;
        self.record(|| "sync log".into());
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BlobState> {
        // A poisoned lock only means an earlier call failed part-way; nothing under the lock
        // is left half-updated in a way that hides work (see `sync_at`).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lists the `blobs` directory unless the last listing is known to be current (same
    /// modification time, taken a clock tick after it; `now` read before this call), records
    /// the listing, forgets pending files that are gone, and returns the files the last
    /// listing did not have (every file, on the first call).
    fn relist(&self, state: &mut BlobState, now: SystemTime) -> std::io::Result<Vec<OsString>> {
        let modified = std::fs::metadata(&self.blobs)?.modified()?;
        if state.listed_at == Some(modified) && state.settled {
            return Ok(Vec::new());
        }
        let mut names = HashSet::new();
        for item in std::fs::read_dir(&self.blobs)? {
            names.insert(item?.file_name());
        }
        self.record(|| "list blobs/".into());
        let new = names.difference(&state.known).cloned().collect();
        state.pending.retain(|name| names.contains(name));
        state.known = names;
        state.listed_at = Some(modified);
        state.settled = settled(modified, now);
        Ok(new)
    }

    /// `fdatasync`s the file at `path` (`name` in the test record), unless it is gone.
    fn sync_if_present(&self, path: &Path, name: &OsStr) -> std::io::Result<()> {
        match File::open(path) {
            Ok(file) => {
                file.sync_data()?;
                self.record(|| format!("sync {}", name.to_string_lossy()));
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn sync_directory(&self, path: &Path) -> std::io::Result<()> {
        #[cfg(test)]
        if self
            .fail_directory_sync
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(std::io::Error::other("injected directory sync failure"));
        }
        File::open(path)?.sync_all()?;
        self.record(|| match path.file_name() {
            Some(name) if path == self.blobs => format!("sync {}/", name.to_string_lossy()),
            _ => "sync directory".into(),
        });
        Ok(())
    }

    /// Whether the blob file `name` is whole: sled 0.34 writes a little-endian CRC-32 of the
    /// rest, a kind byte, then the item.
    fn read_whole(&self, name: &OsString) -> std::io::Result<bool> {
        let mut bytes = Vec::new();
        File::open(self.blobs.join(name))?.read_to_end(&mut bytes)?;
        let whole = match bytes.split_first_chunk::<4>() {
            Some((crc, rest)) if !rest.is_empty() => {
                u32::from_le_bytes(*crc) == crc32fast::hash(rest)
            }
            _ => false,
        };
        self.record(|| {
            let seen = if whole { "whole" } else { "partial" };
            format!("{seen} {}", name.to_string_lossy())
        });
        Ok(whole)
    }

    #[cfg(test)]
    fn record(&self, op: impl FnOnce() -> String) {
        self.ops.lock().unwrap().push(op());
    }

    #[cfg(not(test))]
    fn record(&self, _: impl FnOnce() -> String) {}

    /// How many blob files are still pending and how many the last listing found.
    #[cfg(test)]
    pub(crate) fn pending_and_known(&self) -> (usize, usize) {
        let state = self.lock();
        (state.pending.len(), state.known.len())
    }
}

/// Whether a listing taken at `now` has seen every file stamped `modified`. A time in the
/// future (the clock went back) is not settled.
fn settled(modified: SystemTime, now: SystemTime) -> bool {
    now.duration_since(modified)
        .is_ok_and(|age| age >= COARSE_CLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(bytes: &[u8]) -> Vec<u8> {
        let mut file = crc32fast::hash(bytes).to_le_bytes().to_vec();
        file.extend_from_slice(bytes);
        file
    }

    fn store_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"log").unwrap();
        dir
    }

    fn take_ops(files: &SledFiles) -> Vec<String> {
        std::mem::take(&mut *files.ops.lock().unwrap())
    }

    fn set_modified(path: &Path, time: SystemTime) {
        File::open(path).unwrap().set_modified(time).unwrap();
    }

    #[test]
    fn blobs_are_checked_then_synced_then_the_directory_then_the_log() {
        let dir = store_dir();
        let files = SledFiles::open(dir.path()).unwrap();
        take_ops(&files);
        std::fs::write(files.blobs.join("100"), blob(b"\x01an item")).unwrap();
        files.sync().unwrap();
        assert_eq!(
            take_ops(&files),
            [
                "list blobs/",
                "whole 100",
                "sync 100",
                "sync blobs/",
                "sync log"
            ]
        );
        assert_eq!(files.pending_and_known(), (0, 1));
        // Nothing new: nothing but the log is synced (the directory is listed again while
        // its time is within a clock tick of the listing).
        files.sync().unwrap();
        let ops = take_ops(&files);
        assert_eq!(ops.last().map(String::as_str), Some("sync log"));
        assert!(ops.iter().all(|op| op == "list blobs/" || op == "sync log"));
    }

    #[test]
    fn a_failed_directory_sync_is_redone_by_the_next_call() {
        let dir = store_dir();
        let files = SledFiles::open(dir.path()).unwrap();
        std::fs::write(files.blobs.join("100"), blob(b"\x01an item")).unwrap();
        files
            .fail_directory_sync
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(files.sync().is_err());
        take_ops(&files);
        files.sync().unwrap();
        let ops = take_ops(&files);
        assert!(ops.contains(&"sync blobs/".to_string()), "{ops:?}");
        assert_eq!(ops.last().map(String::as_str), Some("sync log"));
    }

    #[test]
    fn a_blob_still_being_written_is_synced_again_until_seen_whole() {
        let dir = store_dir();
        let files = SledFiles::open(dir.path()).unwrap();
        let whole = blob(b"\x01an item");
        std::fs::write(files.blobs.join("100"), &whole[..6]).unwrap();
        files.sync().unwrap();
        assert_eq!(files.pending_and_known(), (1, 1));
        // sled finishes writing it between two calls.
        std::fs::write(files.blobs.join("100"), &whole).unwrap();
        take_ops(&files);
        files.sync().unwrap();
        let mut ops = take_ops(&files);
        // Listed again or not (within a clock tick of its time), the blob is synced again.
        ops.retain(|op| op != "list blobs/");
        assert_eq!(ops, ["whole 100", "sync 100", "sync log"]);
        assert_eq!(files.pending_and_known(), (0, 1));
        // A pending file that sled removes is forgotten.
        std::fs::write(files.blobs.join("300"), b"xx").unwrap();
        files.sync().unwrap();
        assert_eq!(files.pending_and_known(), (1, 2));
        std::fs::remove_file(files.blobs.join("300")).unwrap();
        files.sync().unwrap();
        assert_eq!(files.pending_and_known(), (0, 1));
    }

    #[test]
    fn a_blob_created_within_the_listings_clock_tick_is_found_later() {
        let dir = store_dir();
        let files = SledFiles::open(dir.path()).unwrap();
        std::fs::write(files.blobs.join("100"), blob(b"\x01one")).unwrap();
        let tick = std::fs::metadata(&files.blobs).unwrap().modified().unwrap();
        // Listed within the tick: not settled.
        files.sync_at(tick + Duration::from_millis(1)).unwrap();
        assert_eq!(files.pending_and_known(), (0, 1));
        // A second file stamped with the same time, found by a call much later.
        std::fs::write(files.blobs.join("200"), blob(b"\x01two")).unwrap();
        set_modified(&files.blobs, tick);
        files.sync_at(tick + Duration::from_secs(60)).unwrap();
        assert_eq!(files.pending_and_known(), (0, 2));
        // Now settled: an unchanged directory is not listed again.
        take_ops(&files);
        files.sync_at(tick + Duration::from_secs(61)).unwrap();
        assert_eq!(take_ops(&files), ["sync log"]);
        // A store opened long after its blobs directory last changed is settled at once.
        set_modified(&files.blobs, SystemTime::now() - Duration::from_secs(60));
        let reopened = SledFiles::open(dir.path()).unwrap();
        take_ops(&reopened);
        reopened.sync().unwrap();
        assert_eq!(take_ops(&reopened), ["sync log"]);
    }

    #[test]
    fn opening_syncs_the_blobs_already_there() {
        let dir = store_dir();
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        for name in ["1", "2"] {
            std::fs::write(dir.path().join("blobs").join(name), blob(b"\x01x")).unwrap();
        }
        std::fs::write(dir.path().join("conf"), b"segment_size: 524288").unwrap();
        let files = SledFiles::open(dir.path()).unwrap();
        let ops = take_ops(&files);
        let mut blobs: Vec<&str> = ops[1..3].iter().map(String::as_str).collect();
        blobs.sort();
        assert_eq!(blobs, ["sync 1", "sync 2"]);
        assert_eq!(ops[0], "list blobs/");
        assert_eq!(
            ops[3..],
            [
                "sync conf",
                "sync blobs/",
                "sync directory",
                "sync directory",
                "sync log"
            ]
        );
        assert_eq!(files.pending_and_known(), (0, 2));
    }

    #[test]
    fn checks_the_blob_checksum() {
        let dir = store_dir();
        let files = SledFiles::open(dir.path()).unwrap();
        let mut flipped = blob(b"\x01item");
        flipped[5] ^= 1;
        for (bytes, whole) in [
            (blob(b"\x01item"), true),
            (b"\0\0\0\0".to_vec(), false),
            (vec![], false),
            (flipped, false),
        ] {
            std::fs::write(files.blobs.join("b"), &bytes).unwrap();
            assert_eq!(files.read_whole(&OsString::from("b")).unwrap(), whole);
        }
    }
}
