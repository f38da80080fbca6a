//! The ledger's storage: the entries' bytes and the Merkle tree's stored hashes in two
//! append-only files ([`entrylog`], [`hashlog`]), and in one sled tree where each entry
//! starts, the event-id index, the key registry, trust state, the query index and the newest
//! checkpoint (layout in [`keys`]). Ledgers created before those files keep their entries and
//! hash pages in sled (`e` and `h` keys) and are served as they are.
//!
//! Contract: [`Store::commit`] writes a whole batch atomically and returns only after it is
//! on disk; once it returns, the batch survives a crash of the process or a power loss. It is
//! [`Store::apply`] (atomic, visible to readers at once, not yet durable) followed by
//! [`Store::flush`] (everything applied so far becomes durable: sled's flush, then
//! `fdatasync` of sled's files, which sled's flush alone does not do; see `durable`). `apply`
//! appends the entries and hashes to their files and syncs them before it hands sled the
//! batch that records where the entries start and the new tree size, so sled never refers to
//! bytes the disk lacks; what was appended for a batch sled never took is cut off on open. The
//! server applies a batch while the one before it is being flushed, and acknowledges a batch
//! only after a flush that follows its apply. If the process dies before it returns, recovery
//! shows the store as it was before the batch (sled applies a batch atomically), never half
//! of it. [`Store::open`] checks the tail of the log against the newest checkpoint before the
//! ledger serves anything.
//!
//! The store is used by one writer (the group-commit task) and many readers.

mod durable;
pub mod entrylog;
pub mod hashlog;
pub mod keys;

use std::path::Path;

use crate::merkle::{self, Hash, HashReader, HASHES_PER_PAGE, HASH_SIZE};
use crate::trust::{ConsentRecord, KeyRecord, TokenRecord};

/// A storage failure. Reaches gRPC clients only as a generic `INTERNAL`; the detail is logged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled failed (I/O error, corruption it detected itself).
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    /// Another process (or a store not yet closed) holds the database directory.
    #[error("the database {0} is in use by another process")]
    Locked(std::path::PathBuf),
    /// An earlier storage failure stopped the ledger's appends until it is restarted.
    #[error("appends stopped after an earlier storage failure; restart the ledger")]
    Stopped,
    /// Writing or syncing the store's files (the entries and hashes files, a side file for a
    /// cut tail, sled's files on a flush) failed: the batch may not survive a power loss, so
    /// it is not acknowledged.
    #[error("couldn't write or sync the store's files: {0}")]
    Sync(std::io::Error),
    /// Reading state for a rule failed.
    #[error("couldn't read state: {0}")]
    Read(String),
    /// The stored data contradicts itself (e.g. a missing entry below the tree size, a
    /// checkpoint that does not match the stored hashes).
    #[error("store is inconsistent: {0}")]
    Corrupt(String),
}

/// sled's page cache, by sled's own accounting. sled's default is 1 GiB, which a ledger of a
/// million entries fills, making the server's memory grow past half a gigabyte. With the
/// entries and hashes in files, sled's cache holds small keys, whose real size sled counts
/// low: at 128 MiB a long run of small commits took the server to 589 MiB, at 64 MiB the
/// receipt tail grew, 96 MiB levelled off near 485 MiB (BENCHMARKS.md).
pub const CACHE_BYTES: u64 = 96 * 1024 * 1024;

/// How long [`Store::open`] waits for another holder of the directory lock to let go.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The newest checkpoint and what it commits to.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    /// Number of entries in the tree.
    pub tree_size: u64,
    /// Root hash of those entries.
    pub root: Hash,
    /// The signed checkpoint note for (`tree_size`, `root`).
    pub checkpoint: String,
}

/// One group commit: entries `first_seq ..` and everything derived from them.
#[derive(Debug, Default, Clone)]
pub struct Commit {
    /// Seq of the first entry; must equal the current tree size.
    pub first_seq: u64,
    /// The entries' stored bytes, in seq order.
    pub entries: Vec<Vec<u8>>,
    /// The new stored hashes, starting at stored index `stored_hash_count(first_seq)`.
    pub hashes: Vec<Hash>,
    /// `event_id -> seq` for every new entry.
    pub event_ids: Vec<(String, u64)>,
    /// Key registry records that are new or changed.
    pub keys: Vec<(String, KeyRecord)>,
    /// Consent records that are new or changed.
    pub consents: Vec<(String, ConsentRecord)>,
    /// Token records that are new or changed.
    pub tokens: Vec<(String, TokenRecord)>,
    /// Postings of the new entries: (term, seq), the term an index prefix from
    /// [`keys::index_prefix`]; each term's seqs in increasing order.
    pub index: Vec<(Vec<u8>, u64)>,
    /// The checkpoint note over the tree including these entries.
    pub checkpoint: String,
}

/// Stored entries in order, as `(seq, bytes)` (see [`Store::entries`]).
pub type Entries = Box<dyn Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + Send>;

/// What one key prefix holds (see [`Store::usage`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrefixUsage {
    /// The prefix byte (`e` entries, `h` hash pages, ...).
    pub prefix: u8,
    /// Number of keys.
    pub keys: u64,
    /// Bytes of the keys.
    pub key_bytes: u64,
    /// Bytes of the values.
    pub value_bytes: u64,
}

/// The sled-backed store. Cheap to share behind an `Arc`; reads may run concurrently with the
/// single writer.
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    files: durable::SledFiles,
    /// The entries file; `None` for a ledger that keeps its entries in sled (`e` keys).
    log: Option<entrylog::EntryLog>,
    /// The hashes file: present exactly when `log` is (else hash pages are in sled).
    hashes: Option<hashlog::HashLog>,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    ///
    /// sled locks the directory; a store closing in this process (or a process exiting) can
    /// hold the lock for a moment after its last handle is dropped, so a held lock is retried
    /// for up to [`LOCK_WAIT`] before the error is returned.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let started = std::time::Instant::now();
        loop {
            match sled::Config::new()
                .path(dir)
                .cache_capacity(CACHE_BYTES)
                // Every commit flushes; sled's own periodic flush would only compete with it.
                .flush_every_ms(None)
                .open()
            {
                Ok(db) => {
                    let tree = db.open_tree("ledger")?;
                    let in_sled = tree.scan_prefix([keys::ENTRY]).next().is_some();
                    let (log, hashes) = if in_sled {
                        (None, None)
                    } else {
                        let last = last_offset(&tree)?;
                        let size = stored_size(&tree)?;
                        check_index_covers(last, size)?;
                        (
                            Some(entrylog::EntryLog::open(dir, last)?),
                            Some(hashlog::HashLog::open(
                                dir,
                                merkle::stored_hash_count(size),
                            )?),
                        )
                    };
                    // After the entries file exists, so that its directory entry is synced.
                    let files = durable::SledFiles::open(dir).map_err(StoreError::Sync)?;
                    return Ok(Self {
                        db,
                        tree,
                        files,
                        log,
                        hashes,
                    });
                }
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.to_string().contains("could not acquire lock") =>
                {
                    if started.elapsed() >= LOCK_WAIT {
                        return Err(StoreError::Locked(dir.to_owned()));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn head_size(&self) -> Result<u64, StoreError> {
        stored_size(&self.tree)
    }

    /// The newest committed checkpoint's tree size and note, or `None` for a new store.
    /// The root is read from the stored hashes.
    pub fn head(&self) -> Result<Option<Head>, StoreError> {
        let Some(checkpoint) = self
            .tree
            .get(keys::named(keys::META, keys::META_CHECKPOINT))?
        else {
            return Ok(None);
        };
        let tree_size = self.head_size()?;
        let checkpoint = String::from_utf8(checkpoint.to_vec())
            .map_err(|_| StoreError::Corrupt("checkpoint is not UTF-8".into()))?;
        let root = merkle::root(tree_size, self).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(Some(Head {
            tree_size,
            root,
            checkpoint,
        }))
    }

    /// Checks the log's tail against `head`: entry `tree_size - 1` exists and its leaf hash is
    /// the stored one, and no entry exists at or beyond `tree_size`. O(log n) reads.
    pub fn check_tail(&self, head: &Head) -> Result<(), StoreError> {
        if let Some(last) = self.last_entry()? {
            if last + 1 != head.tree_size {
                return Err(StoreError::Corrupt(format!(
                    "last entry is {last} but the checkpoint says {} entries",
                    head.tree_size
                )));
            }
            let bytes = self
                .entry(last)?
                .ok_or_else(|| StoreError::Corrupt(format!("entry {last} vanished")))?;
            let stored = self
                .read_hashes(&[merkle::leaf_stored_index(last)])
                .map_err(|e| StoreError::Corrupt(format!("leaf hash of {last}: {e}")))?;
            if stored.first() != Some(&merkle::leaf_hash(&bytes)) {
                return Err(StoreError::Corrupt(format!(
                    "entry {last} does not match its stored leaf hash"
                )));
            }
        } else if head.tree_size != 0 {
            return Err(StoreError::Corrupt("checkpoint without entries".into()));
        }
        Ok(())
    }

    /// The seq of the last stored entry, if any.
    fn last_entry(&self) -> Result<Option<u64>, StoreError> {
        if let Some(log) = &self.log {
            return Ok(log.count().checked_sub(1));
        }
        let Some((key, _)) = self
            .tree
            .range(keys::entry(0)..=keys::entry(u64::MAX))
            .next_back()
            .transpose()?
        else {
            return Ok(None);
        };
        keys::number_of(keys::ENTRY, &key)
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt("malformed entry key".into()))
    }

    /// Whether the entries are in the entries file (every ledger created since it exists)
    /// rather than in sled.
    pub fn entries_in_file(&self) -> bool {
        self.log.is_some()
    }

    /// Where entry `seq` starts in the entries file, as sled holds it (`None`: no such entry).
    fn entry_offset(&self, seq: u64) -> Result<Option<u64>, StoreError> {
        Ok(offset_in(&self.tree, seq)?)
    }

    /// The stored bytes of entry `seq`.
    pub fn entry(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        match &self.log {
            None => Ok(self.tree.get(keys::entry(seq))?.map(|v| v.to_vec())),
            Some(log) => match self.entry_offset(seq)? {
                Some(offset) => log.read(offset).map(Some),
                None => Ok(None),
            },
        }
    }

    /// Entries `[start, end)` in order, as `(seq, bytes)`; stops at the last committed entry.
    pub fn entries(&self, start: u64, end: u64) -> Entries {
        let Some(log) = &self.log else {
            return Box::new(
                self.tree
                    .range(keys::entry(start)..keys::entry(end))
                    .map(|item| {
                        let (key, value) = item?;
                        let seq = keys::number_of(keys::ENTRY, &key)
                            .ok_or_else(|| StoreError::Corrupt("malformed entry key".into()))?;
                        Ok((seq, value.to_vec()))
                    }),
            );
        };
        // sled's account of the entries, not the log's counter: sled shows a batch a moment
        // before the counter moves.
        let located = last_offset(&self.tree).and_then(|last| {
            let count = last.map_or(0, |(seq, _)| seq.saturating_add(1));
            let end = end.min(count);
            Ok(match start < end {
                true => self.entry_offset(start)?.map(|offset| (offset, end)),
                false => None,
            })
        });
        let (offset, end) = match located {
            Ok(Some(found)) => found,
            Ok(None) => return Box::new(std::iter::empty()),
            Err(error) => return Box::new(std::iter::once(Err(error))),
        };
        // Records are read one after another; the position of the first record of each page
        // of offsets, and of the last one read, is checked against the one sled holds, so a
        // record slipped in between shows as a position that does not match.
        let tree = self.tree.clone();
        Box::new(
            (start..)
                .zip(log.records(offset, end - start))
                .map(move |(seq, record)| {
                    let (at, bytes) = record?;
                    let checked = seq % keys::OFFSETS_PER_PAGE == 0 || seq + 1 == end;
                    if checked && offset_in(&tree, seq)? != Some(at) {
                        return Err(StoreError::Corrupt(format!(
                            "entry {seq} is not where its offset says"
                        )));
                    }
                    Ok((seq, bytes))
                }),
        )
    }

    /// The seq of the entry that carries `event_id`.
    pub fn event_seq(&self, event_id: &str) -> Result<Option<u64>, StoreError> {
        match self
            .tree
            .get(keys::named(keys::EVENT_ID, event_id.as_bytes()))?
        {
            None => Ok(None),
            Some(value) => keys::decode_u64(&value)
                .map(Some)
                .ok_or_else(|| StoreError::Corrupt(format!("event id index for {event_id:?}"))),
        }
    }

    fn record<M: prost::Message + Default>(
        &self,
        prefix: u8,
        id: &str,
    ) -> Result<Option<M>, StoreError> {
        match self.tree.get(keys::named(prefix, id.as_bytes()))? {
            None => Ok(None),
            Some(value) => M::decode(value.as_ref()).map(Some).map_err(|e| {
                StoreError::Corrupt(format!("state record {}{id}: {e}", prefix as char))
            }),
        }
    }

    /// The registered key with this id.
    pub fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.record(keys::KEY, key_id)
    }

    /// The consent with this id.
    pub fn consent(&self, consent_id: &str) -> Result<Option<ConsentRecord>, StoreError> {
        self.record(keys::CONSENT, consent_id)
    }

    /// The token with this id.
    pub fn token(&self, token_id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.record(keys::TOKEN, token_id)
    }

    /// Seqs filed under `prefix` (from [`keys::index_prefix`]) within `(after, before)`
    /// (both exclusive), newest first when `descending`. Lazy: blocks are read as the
    /// iterator advances.
    pub fn index_seqs(
        &self,
        prefix: &[u8],
        after: Option<u64>,
        before: Option<u64>,
        descending: bool,
    ) -> Box<dyn Iterator<Item = Result<u64, StoreError>> + Send> {
        let low = match after {
            Some(u64::MAX) => return Box::new(std::iter::empty()),
            Some(seq) => seq + 1,
            None => 0,
        };
        let high = match before {
            Some(0) => return Box::new(std::iter::empty()),
            Some(seq) => seq - 1,
            None => u64::MAX,
        };
        if low > high {
            return Box::new(std::iter::empty());
        }
        // The block holding `low` may start before it.
        let start = match self.postings_block_at(prefix, low) {
            Ok(Some((key, _))) => key,
            Ok(None) => keys::block_key(prefix, low),
            Err(error) => return Box::new(std::iter::once(Err(error))),
        };
        let range = self.tree.range(start..=keys::block_key(prefix, high));
        let in_range = move |block: sled::Result<(sled::IVec, sled::IVec)>| {
            let seqs = block
                .map_err(StoreError::from)
                .and_then(|(key, value)| decode_block(&key, &value));
            match seqs {
                Ok(seqs) => seqs
                    .into_iter()
                    .filter(|seq| (low..=high).contains(seq))
                    .map(Ok)
                    .collect::<Vec<_>>(),
                Err(error) => vec![Err(error)],
            }
        };
        if descending {
            Box::new(range.rev().flat_map(move |block| {
                let mut seqs = in_range(block);
                seqs.reverse();
                seqs
            }))
        } else {
            Box::new(range.flat_map(in_range))
        }
    }

    /// Whether entry `seq` is filed under `prefix` (from [`keys::index_prefix`]).
    pub fn index_contains(&self, prefix: &[u8], seq: u64) -> Result<bool, StoreError> {
        Ok(match self.postings_block_at(prefix, seq)? {
            Some((key, value)) => decode_block(&key, &value)?.binary_search(&seq).is_ok(),
            None => false,
        })
    }

    /// The postings block of `prefix` that would hold `seq`: the last one starting at or
    /// before it.
    fn postings_block_at(
        &self,
        prefix: &[u8],
        seq: u64,
    ) -> Result<Option<(Vec<u8>, sled::IVec)>, StoreError> {
        match self
            .tree
            .range(keys::block_key(prefix, 0)..=keys::block_key(prefix, seq))
            .next_back()
        {
            Some(item) => {
                let (key, value) = item?;
                Ok(Some((key.to_vec(), value)))
            }
            None => Ok(None),
        }
    }

    /// Keys and bytes stored under each key prefix (layout in [`keys`]), for capacity
    /// planning. Reads every key: seconds for millions of entries.
    pub fn usage(&self) -> Result<Vec<PrefixUsage>, StoreError> {
        let mut usage: std::collections::BTreeMap<u8, PrefixUsage> = Default::default();
        for item in self.tree.iter() {
            let (key, value) = item?;
            let prefix = key.first().copied().unwrap_or_default();
            let entry = usage.entry(prefix).or_insert(PrefixUsage {
                prefix,
                ..PrefixUsage::default()
            });
            entry.keys += 1;
            entry.key_bytes += key.len() as u64;
            entry.value_bytes += value.len() as u64;
        }
        // The files, under the prefix their data had in sled: a "key" per entry or hash, no
        // key bytes, their bytes as values (the entries file's size less the record headers).
        let mut file_row = |prefix: u8, keys: u64, value_bytes: u64| {
            let row = PrefixUsage {
                prefix,
                keys,
                key_bytes: 0,
                value_bytes,
            };
            usage.insert(prefix, row);
        };
        if let Some(log) = &self.log {
            let count = log.count();
            let bytes = log.end().saturating_sub(count * entrylog::HEADER);
            file_row(keys::ENTRY, count, bytes);
        }
        if let Some(hashes) = &self.hashes {
            let count = hashes.count();
            file_row(keys::HASH_PAGE, count, count * HASH_SIZE as u64);
        }
        Ok(usage.into_values().collect())
    }

    /// Whether any entry is stored (even if the derived data is gone).
    pub fn has_entries(&self) -> Result<bool, StoreError> {
        Ok(self.last_entry()?.is_some())
    }

    /// Number of stored entries, checking they are contiguous from 0.
    pub fn entry_count(&self) -> Result<u64, StoreError> {
        let Some(last) = self.last_entry()? else {
            return Ok(0);
        };
        let count = match &self.log {
            // Every page below the last full, in order.
            Some(_) => {
                let mut count = 0u64;
                for (page, item) in self.tree.scan_prefix([keys::OFFSETS]).enumerate() {
                    let (key, value) = item?;
                    if keys::number_of(keys::OFFSETS, &key) != Some(page as u64)
                        || !count.is_multiple_of(keys::OFFSETS_PER_PAGE)
                        || value.len() % 8 != 0
                    {
                        return Err(StoreError::Corrupt(format!(
                            "entry offsets: page {page} is not where it belongs"
                        )));
                    }
                    count += value.len() as u64 / 8;
                }
                count
            }
            None => self.tree.range(keys::entry(0)..=keys::entry(last)).count() as u64,
        };
        if count != last + 1 {
            return Err(StoreError::Corrupt(format!(
                "entries are not contiguous: {count} entries up to seq {last}"
            )));
        }
        Ok(count)
    }

    /// Deletes everything derived from the entries (hash pages, indexes, state, checkpoint),
    /// keeping only the entries, marks a rebuild as pending, and flushes. The ledger rebuilds
    /// the rest on open; the mark stays until [`finish_rebuild`](Self::finish_rebuild), so a
    /// rebuild cut short by a crash starts over.
    pub fn drop_derived(&self) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for item in self.tree.iter().keys() {
            let key = item?;
            // The entries, and where each starts in the entries file, are primary.
            if !matches!(key.first(), Some(&keys::ENTRY | &keys::OFFSETS)) {
                batch.remove(key);
            }
        }
        batch.insert(keys::named(keys::META, keys::META_REBUILDING), &[]);
        self.tree.apply_batch(batch)?;
        self.flush()?;
        // The tree size is gone, so the next open would cut the hashes too.
        match &self.hashes {
            Some(hashes) => hashes.cut(0),
            None => Ok(()),
        }
    }

    /// Whether a rebuild was started and not finished.
    pub fn rebuild_pending(&self) -> Result<bool, StoreError> {
        Ok(self
            .tree
            .contains_key(keys::named(keys::META, keys::META_REBUILDING))?)
    }

    /// Clears the rebuild mark (after the last rebuilt chunk is committed) and flushes.
    pub fn finish_rebuild(&self) -> Result<(), StoreError> {
        self.tree
            .remove(keys::named(keys::META, keys::META_REBUILDING))?;
        self.flush()
    }

    /// The packed page stored under `key` (empty if there is none yet).
    fn page(&self, key: [u8; 9]) -> Result<Vec<u8>, StoreError> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()).unwrap_or_default())
    }

    /// Adds `items`, each `size` bytes, to packed pages of `per_page` items under `page_key`,
    /// the first at item index `index`: merged into the incomplete last page, then new pages.
    /// Returns the index after the last. `what` names the pages in errors.
    fn extend_pages(
        &self,
        batch: &mut sled::Batch,
        page_key: fn(u64) -> [u8; 9],
        per_page: u64,
        mut index: u64,
        items: &[&[u8]],
        what: &str,
    ) -> Result<u64, StoreError> {
        let mut pending = items;
        while let Some(size) = pending.first().map(|item| item.len()) {
            let (page, slot) = (index / per_page, (index % per_page) as usize);
            let mut bytes = self.page(page_key(page))?;
            if bytes.len() != slot * size {
                return Err(StoreError::Corrupt(format!(
                    "{what} page {page} holds {} bytes, expected {}",
                    bytes.len(),
                    slot * size
                )));
            }
            let room = per_page as usize - slot;
            let (now, later) = pending.split_at(room.min(pending.len()));
            for item in now {
                bytes.extend_from_slice(item);
            }
            batch.insert(&page_key(page), bytes);
            index += now.len() as u64;
            pending = later;
        }
        Ok(index)
    }

    /// Writes `commit` atomically and flushes it to disk. Durable once this returns `Ok`.
    pub fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
        self.apply(commit)?;
        // If we crash before flush returns, the batch may or may not be present, but whole;
        // no receipt has been sent for it yet.
        self.flush()
    }

    /// Writes `commit` atomically, without waiting for the disk: readers of the store see it
    /// at once, and a crash before the next [`flush`](Self::flush) returns may lose it (whole,
    /// never half). The next commit may be applied while this one is being flushed; a flush
    /// makes everything applied before it durable.
    pub fn apply(&self, commit: &Commit) -> Result<(), StoreError> {
        let committed_size = self.head_size()?;
        if commit.first_seq != committed_size {
            // Never overwrite: a writer whose view is stale must not reuse sequence numbers.
            return Err(StoreError::Corrupt(format!(
                "commit starts at {} but the log has {committed_size} entries",
                commit.first_seq
            )));
        }
        let mut batch = sled::Batch::default();
        let tree_size = commit.first_seq + commit.entries.len() as u64;
        let first_hash = merkle::stored_hash_count(commit.first_seq);
        let hash_count = merkle::stored_hash_count(tree_size);
        if first_hash + commit.hashes.len() as u64 != hash_count {
            return Err(StoreError::Corrupt(format!(
                "commit of {} entries from {} brings {} hashes; the tree needs {}",
                commit.entries.len(),
                commit.first_seq,
                commit.hashes.len(),
                hash_count - first_hash
            )));
        }
        // The entries: appended to the entries file and synced before sled hears of them
        // (see `entrylog`), their offsets packed into pages; or, in a ledger that keeps them
        // in sled, one key each.
        let appended = match &self.log {
            Some(log) => {
                // A rebuild commits entries that are stored already (`drop_derived` keeps
                // them): those are checked, not written again.
                let stored = usize::try_from(log.count().saturating_sub(commit.first_seq))
                    .unwrap_or(usize::MAX)
                    .min(commit.entries.len());
                for (seq, bytes) in (commit.first_seq..).zip(&commit.entries[..stored]) {
                    if self.entry(seq)?.as_ref() != Some(bytes) {
                        return Err(StoreError::Corrupt(format!(
                            "commit rewrites stored entry {seq} with other bytes"
                        )));
                    }
                }
                let appended = log
                    .append(&commit.entries[stored..])
                    .map_err(StoreError::Sync)?;
                let offsets: Vec<[u8; 8]> =
                    appended.offsets.iter().map(|o| o.to_le_bytes()).collect();
                let offsets: Vec<&[u8]> = offsets.iter().map(|o| o.as_slice()).collect();
                self.extend_pages(
                    &mut batch,
                    keys::offsets_page,
                    keys::OFFSETS_PER_PAGE,
                    commit.first_seq + stored as u64,
                    &offsets,
                    "entry offsets",
                )?;
                Some((
                    log,
                    appended.end,
                    commit.first_seq + commit.entries.len() as u64,
                ))
            }
            None => {
                for (offset, bytes) in commit.entries.iter().enumerate() {
                    batch.insert(
                        &keys::entry(commit.first_seq + offset as u64),
                        bytes.as_slice(),
                    );
                }
                None
            }
        };
        // The hashes: appended to the hashes file and synced before sled hears of them, or,
        // in a ledger that keeps them in sled, merged into the tail page and new pages.
        match &self.hashes {
            Some(hashes) => hashes.append(first_hash, &commit.hashes)?,
            None => {
                let hashes: Vec<&[u8]> = commit.hashes.iter().map(|h| h.0.as_slice()).collect();
                self.extend_pages(
                    &mut batch,
                    keys::hash_page,
                    HASHES_PER_PAGE,
                    first_hash,
                    &hashes,
                    "hash",
                )?;
            }
        }
        for (event_id, seq) in &commit.event_ids {
            batch.insert(
                keys::named(keys::EVENT_ID, event_id.as_bytes()),
                &seq.to_be_bytes(),
            );
        }
        for (key_id, record) in &commit.keys {
            batch.insert(
                keys::named(keys::KEY, key_id.as_bytes()),
                prost::Message::encode_to_vec(record),
            );
        }
        for (consent_id, record) in &commit.consents {
            batch.insert(
                keys::named(keys::CONSENT, consent_id.as_bytes()),
                prost::Message::encode_to_vec(record),
            );
        }
        for (token_id, record) in &commit.tokens {
            batch.insert(
                keys::named(keys::TOKEN, token_id.as_bytes()),
                prost::Message::encode_to_vec(record),
            );
        }
        // One postings block per term (see `keys`): the term's first seq in the key, the
        // rest in the value.
        let mut postings: std::collections::BTreeMap<&[u8], Vec<u64>> = Default::default();
        for (term, seq) in &commit.index {
            postings.entry(term.as_slice()).or_default().push(*seq);
        }
        for (term, mut seqs) in postings {
            seqs.sort_unstable();
            seqs.dedup();
            if let Some(&first) = seqs.first() {
                batch.insert(keys::block_key(term, first), keys::encode_postings(&seqs));
            }
        }
        batch.insert(
            keys::named(keys::META, keys::META_SIZE),
            &tree_size.to_be_bytes(),
        );
        batch.insert(
            keys::named(keys::META, keys::META_CHECKPOINT),
            commit.checkpoint.as_bytes(),
        );
        // If we crash before apply_batch returns, the batch is absent after recovery (and
        // its entries are cut off the file on open).
        self.tree.apply_batch(batch)?;
        if let Some((log, end, count)) = appended {
            log.advance(end, count.max(log.count()));
        }
        if let Some(hashes) = &self.hashes {
            hashes.advance(hash_count);
        }
        Ok(())
    }

    /// Makes everything applied so far durable: once this returns `Ok`, it survives a crash
    /// of the process or a power loss, as far as the device honours cache flushes (sled's
    /// flush writes it out; `fdatasync` of sled's blob and log files then commits their
    /// metadata and the device's write cache).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.files.sync().map_err(StoreError::Sync)
    }
}

/// Refuses, before anything is cut, an index that has lost entries rather than a batch: a
/// tree size beyond the entries whose offsets it holds. Cutting the entries file to those
/// would hide committed entries, and the ledger would go on from an earlier size, forking the
/// log. (The entries file itself refuses a non-empty file beside no offsets at all.)
fn check_index_covers(last: Option<(u64, u64)>, size: u64) -> Result<(), StoreError> {
    let known = last.map_or(0, |(seq, _)| seq.saturating_add(1));
    if size > known {
        return Err(StoreError::Corrupt(format!(
            "the index holds a tree of {size} entries but offsets for only {known}"
        )));
    }
    Ok(())
}

/// Where entry `seq` starts in the entries file, from its `o` page.
fn offset_in(tree: &sled::Tree, seq: u64) -> Result<Option<u64>, sled::Error> {
    let (page, slot) = (seq / keys::OFFSETS_PER_PAGE, seq % keys::OFFSETS_PER_PAGE);
    let at = slot as usize * 8;
    Ok(tree
        .get(keys::offsets_page(page))?
        .and_then(|bytes| bytes.get(at..at + 8).and_then(|b| b.try_into().ok()))
        .map(u64::from_le_bytes))
}

/// The tree size sled holds (0 for none).
fn stored_size(tree: &sled::Tree) -> Result<u64, StoreError> {
    match tree.get(keys::named(keys::META, keys::META_SIZE))? {
        None => Ok(0),
        Some(size) => keys::decode_u64(&size)
            .ok_or_else(|| StoreError::Corrupt("tree size is not 8 bytes".into())),
    }
}

/// sled's account of the last committed entry in the entries file: its seq and offset.
fn last_offset(tree: &sled::Tree) -> Result<Option<(u64, u64)>, StoreError> {
    let Some((key, value)) = tree.scan_prefix([keys::OFFSETS]).next_back().transpose()? else {
        return Ok(None);
    };
    let page = keys::number_of(keys::OFFSETS, &key)
        .ok_or_else(|| StoreError::Corrupt("malformed entry offsets key".into()))?;
    let slots = value.len() as u64 / 8;
    let malformed = || StoreError::Corrupt(format!("entry offsets page {page} is malformed"));
    let last = value
        .len()
        .checked_sub(8)
        .filter(|_| value.len() % 8 == 0 && slots <= keys::OFFSETS_PER_PAGE)
        .and_then(|at| value[at..].try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(malformed)?;
    let seq = page
        .checked_mul(keys::OFFSETS_PER_PAGE)
        .and_then(|first| first.checked_add(slots - 1))
        .ok_or_else(malformed)?;
    Ok(Some((seq, last)))
}

/// Bytes of the files under `dir`, recursively: a store directory's size on disk (for
/// `custody store-stats` and `custody-sledspace`).
pub fn directory_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let meta = item.metadata()?;
        total += if meta.is_dir() {
            directory_bytes(&item.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

fn decode_block(key: &[u8], value: &[u8]) -> Result<Vec<u64>, StoreError> {
    keys::index_seq(key)
        .and_then(|first| keys::decode_postings(first, value))
        .ok_or_else(|| StoreError::Corrupt("malformed index postings block".into()))
}

fn reader_error(error: StoreError) -> tlog_tiles::Error {
    tlog_tiles::Error::InvalidInput(error.to_string())
}

impl HashReader for Store {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        if let Some(file) = &self.hashes {
            return indexes
                .iter()
                .map(|&index| {
                    file.read(index)
                        .map_err(|e| reader_error(StoreError::Read(format!("hash {index}: {e}"))))?
                        .ok_or(tlog_tiles::Error::IndexesNotInTree)
                })
                .collect();
        }
        let mut hashes = Vec::with_capacity(indexes.len());
        let mut cached: Option<(u64, Vec<u8>)> = None;
        for &index in indexes {
            let (page, slot) = merkle::page_of(index);
            if cached.as_ref().map(|(p, _)| *p) != Some(page) {
                cached = Some((
                    page,
                    self.page(keys::hash_page(page)).map_err(reader_error)?,
                ));
            }
            let bytes = cached
                .as_ref()
                .map(|(_, b)| b.as_slice())
                .unwrap_or_default();
            let hash = bytes
                .get(slot * HASH_SIZE..(slot + 1) * HASH_SIZE)
                .and_then(merkle::hash_from_slice)
                .ok_or(tlog_tiles::Error::IndexesNotInTree)?;
            hashes.push(hash);
        }
        Ok(hashes)
    }
}

/// A hash reader over the store plus hashes not yet committed (the current batch's).
pub struct PendingHashes<'a> {
    /// The committed hashes.
    pub store: &'a Store,
    /// Stored index of `pending[0]`.
    pub start: u64,
    /// Hashes of the current batch so far.
    pub pending: Vec<Hash>,
}

impl HashReader for PendingHashes<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        let committed: Vec<u64> = indexes
            .iter()
            .copied()
            .filter(|&i| i < self.start)
            .collect();
        let mut from_store = self.store.read_hashes(&committed)?.into_iter();
        indexes
            .iter()
            .map(|&i| {
                if i < self.start {
                    from_store.next().ok_or(tlog_tiles::Error::IndexesNotInTree)
                } else {
                    usize::try_from(i - self.start)
                        .ok()
                        .and_then(|offset| self.pending.get(offset).copied())
                        .ok_or(tlog_tiles::Error::IndexesNotInTree)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::MemoryTree;

    #[test]
    fn commits_pages_that_agree_with_memory_tree() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut reference = MemoryTree::new();
        let mut seq = 0u64;
        // Batches of odd sizes cross page boundaries at different slots.
        for batch_len in [1usize, 7, 300, 1, 513, 40] {
            let start = merkle::stored_hash_count(seq);
            let mut pending = PendingHashes {
                store: &store,
                start,
                pending: vec![],
            };
            let mut commit = Commit {
                first_seq: seq,
                ..Commit::default()
            };
            for _ in 0..batch_len {
                let bytes = format!("entry {seq}").into_bytes();
                let leaf = merkle::leaf_hash(&bytes);
                let new = merkle::hashes_to_store(seq, leaf, &pending).unwrap();
                pending.pending.extend(new);
                reference.push(leaf);
                commit.entries.push(bytes);
                commit.event_ids.push((format!("ev-{seq}"), seq));
                commit
                    .index
                    .push((keys::index_prefix(keys::FIELD_USER, "all"), seq));
                if seq.is_multiple_of(3) {
                    commit
                        .index
                        .push((keys::index_prefix(keys::FIELD_USER, "thirds"), seq));
                }
                seq += 1;
            }
            commit.hashes = pending.pending;
            commit.checkpoint = format!("note {seq}\n");
            store.commit(&commit).unwrap();
            let head = store.head().unwrap().unwrap();
            assert_eq!(head.tree_size, seq);
            assert_eq!(head.root, reference.root());
            store.check_tail(&head).unwrap();
        }
        assert_eq!(store.event_seq("ev-5").unwrap(), Some(5));
        let proof = merkle::inclusion_proof(123, seq, &store).unwrap();
        assert_eq!(
            proof,
            merkle::inclusion_proof(123, seq, &reference).unwrap()
        );
        // Postings: one block per term per commit, read back over any window in either order.
        let thirds = keys::index_prefix(keys::FIELD_USER, "thirds");
        let all = keys::index_prefix(keys::FIELD_USER, "all");
        let blocks = store.tree.scan_prefix(&all).count();
        assert_eq!(blocks, 6, "one block per commit");
        for (after, before) in [
            (None, None),
            (Some(5), Some(400)),
            (Some(0), Some(1)),
            (None, Some(9)),
        ] {
            for descending in [false, true] {
                let mut expected: Vec<u64> = (0..seq)
                    .filter(|s| s % 3 == 0)
                    .filter(|s| after.is_none_or(|a| *s > a) && before.is_none_or(|b| *s < b))
                    .collect();
                if descending {
                    expected.reverse();
                }
                let got: Vec<u64> = store
                    .index_seqs(&thirds, after, before, descending)
                    .map(Result::unwrap)
                    .collect();
                assert_eq!(
                    got, expected,
                    "after {after:?} before {before:?} desc {descending}"
                );
            }
        }
        for probe in 0..seq + 2 {
            assert_eq!(
                store.index_contains(&thirds, probe).unwrap(),
                probe % 3 == 0 && probe < seq
            );
        }
        assert_eq!(
            store.index_seqs(&all, None, None, false).count() as u64,
            seq
        );
        // A key per entry with an empty value (blocks of one) reads the same way.
        let single = keys::index_prefix(keys::FIELD_AGENT, "single");
        for s in [4u64, 9, 10] {
            store.tree.insert(keys::block_key(&single, s), &[]).unwrap();
        }
        let got: Vec<u64> = store
            .index_seqs(&single, Some(4), None, true)
            .map(Result::unwrap)
            .collect();
        assert_eq!(got, vec![10, 9]);
        assert!(store.index_contains(&single, 9).unwrap());
        assert!(!store.index_contains(&single, 5).unwrap());
        // A malformed block is reported, not skipped.
        store
            .tree
            .insert(keys::block_key(&single, 20), &[0x80])
            .unwrap();
        assert!(matches!(
            store.index_contains(&single, 20),
            Err(StoreError::Corrupt(_))
        ));
        drop(store);
        // Reopen: same head.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.head().unwrap().unwrap().root, reference.root());
    }

    /// A commit of `entries` after the first `first_seq`, with their hashes and one index term.
    fn commit_of(store: &Store, first_seq: u64, entries: &[Vec<u8>]) -> Commit {
        let mut pending = PendingHashes {
            store,
            start: merkle::stored_hash_count(first_seq),
            pending: vec![],
        };
        for (seq, bytes) in (first_seq..).zip(entries) {
            let new = merkle::hashes_to_store(seq, merkle::leaf_hash(bytes), &pending).unwrap();
            pending.pending.extend(new);
        }
        let end = first_seq + entries.len() as u64;
        Commit {
            first_seq,
            entries: entries.to_vec(),
            hashes: pending.pending,
            index: (first_seq..end)
                .map(|seq| (keys::index_prefix(keys::FIELD_USER, "u"), seq))
                .collect(),
            checkpoint: format!("note {end}\n"),
            ..Commit::default()
        }
    }

    fn numbered_entries(range: std::ops::Range<u64>) -> Vec<Vec<u8>> {
        range
            .map(|seq| format!("entry {seq}").into_bytes())
            .collect()
    }

    fn file_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(entrylog::FILE_NAME))
            .unwrap()
            .len()
    }

    fn hashes_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(hashlog::FILE_NAME))
            .unwrap()
            .len()
    }

    #[test]
    fn entries_appended_for_a_batch_sled_never_took_are_cut_off_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.entries_in_file());
        store
            .commit(&commit_of(&store, 0, &numbered_entries(0..300)))
            .unwrap();
        let committed = file_len(dir.path());
        let hashes = hashes_len(dir.path());
        assert_eq!(hashes, merkle::stored_hash_count(300) * HASH_SIZE as u64);
        // The process dies after the entries and hashes are appended and synced, before
        // sled's batch.
        let next = commit_of(&store, 300, &numbered_entries(300..310));
        let log = store.log.as_ref().unwrap();
        log.append(&next.entries).unwrap();
        let hash_log = store.hashes.as_ref().unwrap();
        hash_log
            .append(merkle::stored_hash_count(300), &next.hashes)
            .unwrap();
        assert!(file_len(dir.path()) > committed);
        assert!(hashes_len(dir.path()) > hashes);
        assert_eq!(store.entries(0, u64::MAX).count(), 300, "not visible");
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(file_len(dir.path()), committed);
        assert_eq!(hashes_len(dir.path()), hashes);
        assert_eq!(store.entry_count().unwrap(), 300);
        store.check_tail(&store.head().unwrap().unwrap()).unwrap();
        // The ledger goes on from there.
        store
            .commit(&commit_of(&store, 300, &numbered_entries(300..700)))
            .unwrap();
        let all: Vec<_> = store.entries(0, 700).map(Result::unwrap).collect();
        assert_eq!(
            all,
            (0..700).zip(numbered_entries(0..700)).collect::<Vec<_>>()
        );
        assert_eq!(store.entry(299).unwrap().unwrap(), b"entry 299");
        assert_eq!(store.entry(700).unwrap(), None);
        let usage = store.usage().unwrap();
        let entries = usage.iter().find(|u| u.prefix == keys::ENTRY).unwrap();
        let bytes: usize = numbered_entries(0..700).iter().map(Vec::len).sum();
        assert_eq!((entries.keys, entries.value_bytes), (700, bytes as u64));
        assert!(usage.iter().any(|u| u.prefix == keys::OFFSETS));
        let stored = usage.iter().find(|u| u.prefix == keys::HASH_PAGE).unwrap();
        assert_eq!(stored.keys, merkle::stored_hash_count(700));
        assert_eq!(store.tree.scan_prefix([keys::HASH_PAGE]).count(), 0);
        assert_eq!(store.tree.scan_prefix([keys::ENTRY]).count(), 0);
    }

    #[test]
    fn a_failed_append_leaves_sled_without_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .commit(&commit_of(&store, 0, &numbered_entries(0..10)))
            .unwrap();
        let head = store.head().unwrap().unwrap();
        // The files are written before sled's batch: when either fails, sled never has it.
        for fail in [
            &store.log.as_ref().unwrap().fail_next,
            &store.hashes.as_ref().unwrap().fail_next,
        ] {
            fail.store(true, std::sync::atomic::Ordering::SeqCst);
            let next = commit_of(&store, 10, &numbered_entries(10..20));
            assert!(matches!(store.commit(&next), Err(StoreError::Sync(_))));
            assert_eq!(store.head().unwrap().unwrap(), head);
            assert_eq!(store.entries(0, u64::MAX).count(), 10);
            assert_eq!(store.entry(10).unwrap(), None);
        }
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        store.check_tail(&store.head().unwrap().unwrap()).unwrap();
        store
            .commit(&commit_of(&store, 10, &numbered_entries(10..20)))
            .unwrap();
        assert_eq!(store.entry(19).unwrap().unwrap(), b"entry 19");
    }

    /// A new store holding `count` entries in one commit, and its root.
    fn store_of(count: u64) -> (tempfile::TempDir, Store, Vec<Vec<u8>>, Hash) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let entries = numbered_entries(0..count);
        store.commit(&commit_of(&store, 0, &entries)).unwrap();
        let root = store.head().unwrap().unwrap().root;
        (dir, store, entries, root)
    }

    #[test]
    fn a_rebuild_cut_short_starts_over_without_writing_entries_again() {
        let (dir, store, entries, root) = store_of(700);
        let (len, hashes) = (file_len(dir.path()), hashes_len(dir.path()));
        store.drop_derived().unwrap();
        store
            .commit(&commit_of(&store, 0, &entries[..256]))
            .unwrap();
        // The process dies here, the rebuild mark still set.
        assert!(store.rebuild_pending().unwrap());
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(store.rebuild_pending().unwrap());
        assert_eq!(store.head().unwrap().unwrap().tree_size, 256);
        assert_eq!(
            hashes_len(dir.path()),
            merkle::stored_hash_count(256) * HASH_SIZE as u64
        );
        // What the ledger does on open: drop and rebuild from the start.
        store.drop_derived().unwrap();
        store
            .commit(&commit_of(&store, 0, &entries[..500]))
            .unwrap();
        store
            .commit(&commit_of(&store, 500, &entries[500..]))
            .unwrap();
        store.finish_rebuild().unwrap();
        assert_eq!(
            (file_len(dir.path()), hashes_len(dir.path())),
            (len, hashes)
        );
        assert_eq!(store.head().unwrap().unwrap().root, root);
        // An index that has lost its offsets but not its tree is refused, not cut to nothing.
        store.tree.remove(keys::offsets_page(0)).unwrap();
        store.tree.remove(keys::offsets_page(1)).unwrap();
        store.tree.remove(keys::offsets_page(2)).unwrap();
        store.flush().unwrap();
        drop(store);
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(file_len(dir.path()), len);
    }

    #[test]
    fn an_index_that_lost_entries_is_refused_before_anything_is_cut() {
        let (dir, store, _, _) = store_of(600);
        let len = file_len(dir.path());
        // The offsets of the last page lost, the tree size kept.
        store.tree.remove(keys::offsets_page(2)).unwrap();
        store.flush().unwrap();
        drop(store);
        let refused = Store::open(dir.path()).err().expect("refused");
        assert!(
            refused.to_string().contains("offsets for only 512"),
            "{refused}"
        );
        assert_eq!(file_len(dir.path()), len);
        // sled's database replaced by an empty one beside the entries file.
        for name in ["db", "conf", "blobs"] {
            let path = dir.path().join(name);
            let _ = std::fs::remove_file(&path).or_else(|_| std::fs::remove_dir_all(&path));
        }
        for item in std::fs::read_dir(dir.path()).unwrap() {
            let path = item.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("snap.")
            {
                std::fs::remove_file(path).unwrap();
            }
        }
        let refused = Store::open(dir.path()).err().expect("refused");
        assert!(
            refused.to_string().contains("knows of no entry"),
            "{refused}"
        );
        assert_eq!(file_len(dir.path()), len);
        let cut = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|item| {
                let name = item.as_ref().unwrap().file_name();
                name.to_string_lossy().contains(".cut-")
            })
            .count();
        assert_eq!(cut, 0, "nothing cut");
    }

    #[test]
    fn a_rebuild_recommits_stored_entries_without_writing_them_again() {
        let (dir, store, entries, root) = store_of(600);
        let len = file_len(dir.path());
        let hashes = hashes_len(dir.path());
        store.drop_derived().unwrap();
        assert_eq!(store.head().unwrap(), None);
        assert_eq!(
            store.entry_count().unwrap(),
            600,
            "entries and offsets kept"
        );
        assert_eq!(hashes_len(dir.path()), 0, "hashes are derived");
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        // Other bytes for a stored entry are refused.
        let mut altered = entries[..100].to_vec();
        altered[42] = b"forged".to_vec();
        assert!(matches!(
            store.commit(&commit_of(&store, 0, &altered)),
            Err(StoreError::Corrupt(_))
        ));
        for chunk in [0..256u64, 256..600] {
            let part = &entries[chunk.start as usize..chunk.end as usize];
            store.commit(&commit_of(&store, chunk.start, part)).unwrap();
        }
        assert_eq!(file_len(dir.path()), len);
        assert_eq!(hashes_len(dir.path()), hashes);
        assert_eq!(store.head().unwrap().unwrap().root, root);
        store
            .commit(&commit_of(&store, 600, &numbered_entries(600..601)))
            .unwrap();
        assert_eq!(store.entry_count().unwrap(), 601);
    }

    #[test]
    fn a_ledger_with_its_entries_in_sled_is_served_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let entries = numbered_entries(0..500);
        {
            // The layout before the entries file: entries as `e` keys.
            let db = sled::open(dir.path()).unwrap();
            let tree = db.open_tree("ledger").unwrap();
            for (seq, bytes) in (0..300).zip(&entries) {
                tree.insert(keys::entry(seq), bytes.as_slice()).unwrap();
            }
            db.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert!(!store.entries_in_file());
        assert!(!dir.path().join(entrylog::FILE_NAME).exists());
        assert_eq!(store.entry_count().unwrap(), 300);
        store.drop_derived().unwrap();
        store
            .commit(&commit_of(&store, 0, &entries[..300]))
            .unwrap();
        store
            .commit(&commit_of(&store, 300, &entries[300..]))
            .unwrap();
        let head = store.head().unwrap().unwrap();
        store.check_tail(&head).unwrap();
        let mut reference = MemoryTree::new();
        for bytes in &entries {
            reference.push(merkle::leaf_hash(bytes));
        }
        assert_eq!(head.root, reference.root());
        assert_eq!(store.entry(499).unwrap().unwrap(), b"entry 499");
        assert_eq!(store.entries(250, 260).count(), 10);
        assert_eq!(store.tree.scan_prefix([keys::ENTRY]).count(), 500);
        assert_eq!(store.tree.scan_prefix([keys::OFFSETS]).count(), 0);
        assert!(store.tree.scan_prefix([keys::HASH_PAGE]).count() > 0);
        assert!(!dir.path().join(hashlog::FILE_NAME).exists());
        let proof = merkle::inclusion_proof(123, 500, &store).unwrap();
        assert_eq!(
            proof,
            merkle::inclusion_proof(123, 500, &reference).unwrap()
        );
        // Reopened as it is (hash pages, tree size, no rebuild), it takes further appends.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(!store.entries_in_file());
        store.check_tail(&store.head().unwrap().unwrap()).unwrap();
        let more = numbered_entries(500..530);
        store.commit(&commit_of(&store, 500, &more)).unwrap();
        for bytes in &more {
            reference.push(merkle::leaf_hash(bytes));
        }
        assert_eq!(store.head().unwrap().unwrap().root, reference.root());
        assert_eq!(store.entries(0, u64::MAX).count(), 530);
        assert!(!dir.path().join(entrylog::FILE_NAME).exists());
    }

    #[test]
    fn a_flush_syncs_the_blob_files_sled_writes_and_sees_them_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Far over a quarter of a 512 KiB segment: sled writes it to a file of its own.
        store.tree.insert(b"big", vec![7u8; 400 * 1024]).unwrap();
        store.flush().unwrap();
        let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
        assert!(blobs > 0, "sled wrote no blob file");
        let state = store.files.pending_and_known();
        assert_eq!(state, (0, blobs), "every blob synced and seen whole");
    }

    #[test]
    fn refuses_a_commit_with_missing_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let commit = Commit {
            first_seq: 0,
            entries: vec![b"x".to_vec(), b"y".to_vec()],
            hashes: vec![merkle::leaf_hash(b"x")],
            checkpoint: "n\n".into(),
            ..Commit::default()
        };
        assert!(matches!(store.commit(&commit), Err(StoreError::Corrupt(_))));
        assert_eq!(store.head().unwrap(), None);
    }
}
