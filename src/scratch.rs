//! Disk-backed replay state for the offline verifier, so its memory stays bounded however many
//! consents, tokens and events a ledger holds: records live in an unlinked temporary file
//! (appended through a 4 MiB buffer), found through an open-addressing hash index in memory
//! that costs 16 bytes per slot, at most 32 bytes per record (about 45 MB for a ledger of a
//! million entries). The key registry (a few records) and a bounded cache of recently used
//! consent and token records, kept decoded, also stay in memory (at most [`CACHE_BYTES`]).
//! Nothing here is part of the pure core; it is an I/O edge the CLI plugs into
//! [`crate::verify::ExportVerifier`].
//!
//! Every record is written to the file when it is put, so a record the cache drops is still
//! found on disk. The index keeps a 64-bit tag per record, a hash of its kind and id keyed at
//! random per process (so ids cannot be chosen to collide); a tag only says where to look: a
//! record is taken for an id only after the id stored with it compares equal in full.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasher as _, RandomState};
use std::os::unix::fs::FileExt as _;
use std::sync::Arc;

use crate::trust::{
    ConsentRecord, KeyRecord, ReplayState, StateChange, StateDelta, TokenRecord, TrustView,
    ViewError,
};

const INITIAL_SLOTS: usize = 1 << 16;
/// Appended records are written to the file in pieces of about this size.
const WRITE_BUFFER: usize = 4 << 20;
const KIND_CONSENT: u8 = b'c';
const KIND_TOKEN: u8 = b't';
const KIND_EVENT: u8 = b'i';
/// Most bytes (estimated: map slots, ids and the records' heap buffers) the decoded-record
/// cache holds: two generations of at most half of this each.
pub const CACHE_BYTES: usize = 32 << 20;
/// Bytes of a record header: total length (u32), kind (u8), id length (u16).
const HEADER: usize = 7;

fn corrupt() -> ViewError {
    ViewError("scratch file: corrupt record".into())
}

fn io(error: std::io::Error) -> ViewError {
    ViewError(format!("scratch file: {error}"))
}

/// A consent or token record the cache can hold.
trait CachedRecord: prost::Message + Default + Clone {
    /// The record's kind in the file and the index.
    const KIND: u8;
    /// This kind's records in a cache generation.
    fn map(maps: &mut Maps) -> &mut HashMap<String, Arc<Self>>;
    /// Estimated heap bytes the record owns, with allocator overhead.
    fn heap_bytes(&self) -> usize;
}

/// Heap bytes of a vector's buffer, with about 16 bytes of allocator overhead; nothing when
/// it has no buffer.
fn heap<T>(v: &Vec<T>) -> usize {
    match v.capacity() {
        0 => 0,
        capacity => capacity * std::mem::size_of::<T>() + 16,
    }
}

fn string_bytes(s: &String) -> usize {
    match s.capacity() {
        0 => 0,
        capacity => capacity + 16,
    }
}

fn strings_bytes(v: &Vec<String>) -> usize {
    heap(v) + v.iter().map(string_bytes).sum::<usize>()
}

impl CachedRecord for ConsentRecord {
    const KIND: u8 = KIND_CONSENT;
    fn map(maps: &mut Maps) -> &mut HashMap<String, Arc<Self>> {
        &mut maps.consents
    }
    fn heap_bytes(&self) -> usize {
        string_bytes(&self.user)
            + string_bytes(&self.agent)
            + strings_bytes(&self.scopes)
            + strings_bytes(&self.audiences)
            + strings_bytes(&self.allowed_delegates)
            + heap(&self.revocation_seqs)
    }
}

impl CachedRecord for TokenRecord {
    const KIND: u8 = KIND_TOKEN;
    fn map(maps: &mut Maps) -> &mut HashMap<String, Arc<Self>> {
        &mut maps.tokens
    }
    fn heap_bytes(&self) -> usize {
        string_bytes(&self.consent_id)
            + string_bytes(&self.parent_token_id)
            + string_bytes(&self.user)
            + string_bytes(&self.agent)
            + strings_bytes(&self.scopes)
            + strings_bytes(&self.audiences)
            + heap(&self.token_sha256)
            + heap(&self.chain)
            + heap(&self.revocation_seqs)
    }
}

/// The records of one cache generation, by kind.
#[derive(Default)]
struct Maps {
    consents: HashMap<String, Arc<ConsentRecord>>,
    tokens: HashMap<String, Arc<TokenRecord>>,
}

/// One generation of the cache.
#[derive(Default)]
struct Generation {
    maps: Maps,
    /// Estimated bytes held (see [`RecordCache::cost`]).
    bytes: usize,
}

/// Decoded consent and token records, recently put or read, in two generations: records go
/// into the young one; when it would pass `limit` bytes it becomes the old one (the old one is
/// dropped); a record found in the old generation moves back to the young one. So the cache
/// holds at most about `2 * limit` bytes and keeps whatever was used within the last
/// generation. The young generation shadows the old one, which may keep an outdated version
/// of a record until it is dropped; [`get`](Self::get) returns the current version (every
/// put goes through [`insert`](Self::insert)) or nothing.
struct RecordCache {
    young: Generation,
    old: Generation,
    limit: usize,
}

impl RecordCache {
    fn new(limit: usize) -> Self {
        Self {
            young: Generation::default(),
            old: Generation::default(),
            limit,
        }
    }

    /// Estimated bytes of a cached record: its map slot (twice the inline size, for the map's
    /// spare capacity), its id's buffer, the record's shared allocation and its own buffers.
    fn cost<R: CachedRecord>(id_len: usize, record: &R) -> usize {
        const OVERHEAD: usize = 16; // an allocation's bookkeeping, about
        2 * std::mem::size_of::<(String, Arc<R>)>()
            + id_len
            + OVERHEAD
            + std::mem::size_of::<R>()
            + 2 * std::mem::size_of::<usize>()
            + OVERHEAD
            + record.heap_bytes()
    }

    /// The cached record for `id`, moved to the young generation if it was in the old one.
    fn get<R: CachedRecord>(&mut self, id: &str) -> Option<Arc<R>> {
        if let Some(record) = R::map(&mut self.young.maps).get(id) {
            return Some(Arc::clone(record));
        }
        let (id, record) = R::map(&mut self.old.maps).remove_entry(id)?;
        self.old.bytes = self
            .old
            .bytes
            .saturating_sub(Self::cost(id.len(), &*record));
        self.insert_young(id, Arc::clone(&record));
        Some(record)
    }

    /// Caches `record` as the current version for `id` (it shadows any older one).
    fn insert<R: CachedRecord>(&mut self, id: &str, record: Arc<R>) {
        self.insert_young(id.to_owned(), record);
    }

    fn insert_young<R: CachedRecord>(&mut self, id: String, record: Arc<R>) {
        let cost = Self::cost(id.len(), &*record);
        if self.young.bytes + cost > self.limit {
            // Retire the young generation. An older version of `id` in it now sits in the old
            // one, shadowed by the version inserted below.
            self.old = std::mem::take(&mut self.young);
        }
        let Generation { maps, bytes } = &mut self.young;
        *bytes += cost;
        let id_len = id.len();
        if let Some(replaced) = R::map(maps).insert(id, record) {
            // Give back what the replaced record (under the same id) was charged with.
            *bytes = bytes.saturating_sub(Self::cost(id_len, &*replaced));
        }
    }

    /// Estimated bytes held by both generations.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.young.bytes + self.old.bytes
    }
}

/// Replay state on disk (see the module docs).
pub struct DiskState {
    keys: HashMap<String, KeyRecord>,
    /// Recently put or read consent and token records (not event ids). Behind a `RefCell`
    /// because reads (through `&self`, as [`TrustView`] has them) fill it.
    cache: RefCell<RecordCache>,
    /// Keys the index's tags (random per state, so ids cannot be chosen to collide).
    tagger: RandomState,
    /// Bits of the keyed hash a tag keeps: all of them, except in tests that force tags to
    /// collide.
    tag_bits: u64,
    data: File,
    /// Bytes already in `data`; records from here on are still in `tail`.
    flushed: u64,
    tail: Vec<u8>,
    /// Size at which `tail` is written out.
    buffer: usize,
    /// (tag, offset) per slot; tag 0 is an empty slot.
    index: Vec<(u64, u64)>,
    used: usize,
}

/// Where [`DiskState::find`] got to: the slot holding the record, or the empty slot where it
/// would go, and the record's tag.
struct Found {
    slot: usize,
    existing: Option<u64>,
    tag: u64,
}

/// Creates a file in the temporary directory and unlinks it at once: it lives while open.
fn anonymous_file(what: &str) -> std::io::Result<File> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    // The counter keeps names apart within a process even on a coarse clock.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path =
        std::env::temp_dir().join(format!("custody-{what}-{}-{nanos}-{n}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

impl DiskState {
    /// An empty state backed by an unlinked temporary file.
    pub fn new() -> std::io::Result<Self> {
        Self::with_sizes(WRITE_BUFFER, CACHE_BYTES)
    }

    /// An empty state that caches at most about `cache_bytes` of decoded records (the rest
    /// is read back from the file): for memory-constrained runs, and for tests that make the
    /// cache evict.
    pub fn with_cache_bytes(cache_bytes: usize) -> std::io::Result<Self> {
        Self::with_sizes(WRITE_BUFFER, cache_bytes)
    }

    /// An empty state appending through a `buffer`-byte buffer, caching at most about
    /// `cache_bytes` of decoded records.
    fn with_sizes(buffer: usize, cache_bytes: usize) -> std::io::Result<Self> {
        Ok(Self {
            keys: HashMap::new(),
            cache: RefCell::new(RecordCache::new(cache_bytes / 2)),
            tagger: RandomState::new(),
            tag_bits: u64::MAX,
            data: anonymous_file("data")?,
            flushed: 0,
            tail: Vec::with_capacity(buffer),
            buffer,
            index: vec![(0, 0); INITIAL_SLOTS],
            used: 0,
        })
    }

    /// The index tag of (kind, id): never 0, which marks an empty slot.
    fn tag(&self, kind: u8, id: &str) -> u64 {
        (self.tagger.hash_one((kind, id)) & self.tag_bits) | 1
    }

    /// Reads the header of the record at `offset`: (total length, kind, id length).
    fn read_header(&self, offset: u64) -> Result<(usize, u8, usize), ViewError> {
        let mut header = [0u8; HEADER];
        self.read_at(offset, &mut header)?;
        let total = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let id_len = u16::from_le_bytes([header[5], header[6]]) as usize;
        if total < HEADER + id_len {
            return Err(corrupt());
        }
        Ok((total, header[4], id_len))
    }

    /// Whether the record at `offset` is (kind, id), comparing the whole id.
    fn holds(&self, offset: u64, kind: u8, id: &str) -> Result<bool, ViewError> {
        let (_, found_kind, id_len) = self.read_header(offset)?;
        if found_kind != kind || id_len != id.len() {
            return Ok(false);
        }
        let at = offset + HEADER as u64;
        if at >= self.flushed {
            let start = usize::try_from(at - self.flushed).map_err(|_| corrupt())?;
            let stored = start
                .checked_add(id_len)
                .and_then(|end| self.tail.get(start..end))
                .ok_or_else(corrupt)?;
            return Ok(stored == id.as_bytes());
        }
        let mut stored = vec![0u8; id_len];
        self.read_at(at, &mut stored)?;
        Ok(stored == id.as_bytes())
    }

    /// Reads the value of the record at `offset`.
    fn read_value(&self, offset: u64) -> Result<Vec<u8>, ViewError> {
        let (total, _, id_len) = self.read_header(offset)?;
        let mut value = vec![0u8; total - HEADER - id_len];
        self.read_at(offset + (HEADER + id_len) as u64, &mut value)?;
        Ok(value)
    }

    /// Fills `buf` from the records' bytes at `offset`: the file below `flushed`, the buffer
    /// from there on (a record is written out whole, so it never spans both).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ViewError> {
        if offset < self.flushed {
            return self.data.read_exact_at(buf, offset).map_err(io);
        }
        let start = usize::try_from(offset - self.flushed).map_err(|_| corrupt())?;
        let bytes = start
            .checked_add(buf.len())
            .and_then(|end| self.tail.get(start..end))
            .ok_or_else(corrupt)?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    /// The slot holding (kind, id), or the empty slot where it would go. A slot whose tag
    /// matches holds the record only if the stored kind and id are equal too.
    fn find(&self, kind: u8, id: &str) -> Result<Found, ViewError> {
        let tag = self.tag(kind, id);
        let slots = self.index.len();
        let mut slot = (tag % slots as u64) as usize;
        loop {
            let (slot_tag, offset) = self.index[slot];
            if slot_tag == 0 {
                return Ok(Found {
                    slot,
                    existing: None,
                    tag,
                });
            }
            if slot_tag == tag && self.holds(offset, kind, id)? {
                return Ok(Found {
                    slot,
                    existing: Some(offset),
                    tag,
                });
            }
            slot = (slot + 1) % slots;
        }
    }

    /// The current record of `R`'s kind for `id`: from the cache, else from the file (and
    /// then cached).
    fn get<R: CachedRecord>(&self, id: &str) -> Result<Option<Arc<R>>, ViewError> {
        if let Some(record) = self.cache.borrow_mut().get::<R>(id) {
            return Ok(Some(record));
        }
        let Some(offset) = self.find(R::KIND, id)?.existing else {
            return Ok(None);
        };
        let value = self.read_value(offset)?;
        let record = Arc::new(
            R::decode(value.as_slice()).map_err(|e| ViewError(format!("scratch record: {e}")))?,
        );
        self.cache.borrow_mut().insert(id, Arc::clone(&record));
        Ok(Some(record))
    }

    /// Writes `record` as the current one for `id`, to the file and the cache.
    fn put<R: CachedRecord>(&mut self, id: &str, record: R) -> Result<(), ViewError> {
        let found = self.find_with_room(R::KIND, id)?;
        self.put_at(R::KIND, id, &record.encode_to_vec(), found)?;
        self.cache.get_mut().insert(id, Arc::new(record));
        Ok(())
    }

    /// As [`find`](Self::find), first doubling the index if one more record would fill it
    /// past half.
    fn find_with_room(&mut self, kind: u8, id: &str) -> Result<Found, ViewError> {
        if (self.used + 1) * 2 > self.index.len() {
            self.grow();
        }
        self.find(kind, id)
    }

    /// Writes a record and points the slot `found` (from [`find`](Self::find) for the same
    /// kind and id, no growth since) at it.
    fn put_at(&mut self, kind: u8, id: &str, value: &[u8], found: Found) -> Result<(), ViewError> {
        let id_len =
            u16::try_from(id.len()).map_err(|_| ViewError("scratch file: id too long".into()))?;
        let total = u32::try_from(HEADER + id.len() + value.len())
            .map_err(|_| ViewError("scratch file: record too long".into()))?;
        let offset = self.flushed + self.tail.len() as u64;
        self.tail.extend_from_slice(&total.to_le_bytes());
        self.tail.push(kind);
        self.tail.extend_from_slice(&id_len.to_le_bytes());
        self.tail.extend_from_slice(id.as_bytes());
        self.tail.extend_from_slice(value);
        if self.tail.len() >= self.buffer {
            self.data
                .write_all_at(&self.tail, self.flushed)
                .map_err(io)?;
            self.flushed += self.tail.len() as u64;
            self.tail.clear();
        }
        if found.existing.is_none() {
            self.used += 1;
        }
        self.index[found.slot] = (found.tag, offset);
        Ok(())
    }

    /// Doubles the index, re-placing every slot by its tag.
    fn grow(&mut self) {
        let slots = self.index.len() * 2;
        let mut index = vec![(0u64, 0u64); slots];
        for &(slot_tag, offset) in &self.index {
            if slot_tag == 0 {
                continue;
            }
            let mut target = (slot_tag % slots as u64) as usize;
            while index[target].0 != 0 {
                target = (target + 1) % slots;
            }
            index[target] = (slot_tag, offset);
        }
        self.index = index;
    }
}

impl TrustView for DiskState {
    fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, ViewError> {
        Ok(self.keys.get(key_id).cloned())
    }
    fn consent(&self, consent_id: &str) -> Result<Option<Arc<ConsentRecord>>, ViewError> {
        self.get(consent_id)
    }
    fn token(&self, token_id: &str) -> Result<Option<Arc<TokenRecord>>, ViewError> {
        self.get(token_id)
    }
}

impl ReplayState for DiskState {
    fn apply_delta(&mut self, delta: StateDelta) -> Result<(), ViewError> {
        for change in delta {
            match change {
                StateChange::PutKey { key_id, record } => {
                    self.keys.insert(key_id, record);
                }
                StateChange::PutConsent { consent_id, record } => {
                    self.put(&consent_id, record)?;
                }
                StateChange::PutToken { token_id, record } => {
                    self.put(&token_id, record)?;
                }
            }
        }
        Ok(())
    }

    fn first_sighting(&mut self, event_id: &str) -> Result<bool, ViewError> {
        let found = self.find_with_room(KIND_EVENT, event_id)?;
        if found.existing.is_some() {
            return Ok(false);
        }
        self.put_at(KIND_EVENT, event_id, &[], found)?;
        Ok(true)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_updates_and_grows_without_losing_records() {
        // A small write buffer, so records are read back both from the file and the buffer.
        let mut state = DiskState::with_sizes(4096, CACHE_BYTES).unwrap();
        let n = 100_000u64; // forces the index to double a few times
        for i in 0..n {
            let record = TokenRecord {
                seq: i,
                user: format!("user-{i}"),
                ..TokenRecord::default()
            };
            state
                .apply_delta(vec![StateChange::PutToken {
                    token_id: format!("t{i}"),
                    record,
                }])
                .unwrap();
        }
        // An update replaces the record.
        let updated = TokenRecord {
            seq: 7,
            revoked_at_ms: Some(5),
            ..TokenRecord::default()
        };
        state
            .apply_delta(vec![StateChange::PutToken {
                token_id: "t7".into(),
                record: updated.clone(),
            }])
            .unwrap();
        assert_eq!(state.token("t7").unwrap(), Some(Arc::new(updated)));
        for i in (0..n).step_by(997) {
            if i == 7 {
                continue;
            }
            assert_eq!(state.token(&format!("t{i}")).unwrap().unwrap().seq, i);
        }
        assert_eq!(state.token("missing").unwrap(), None);
        assert_eq!(state.consent("t1").unwrap(), None, "kinds are separate");
        assert!(state.first_sighting("e1").unwrap());
        assert!(!state.first_sighting("e1").unwrap());
        assert!(state.first_sighting("e2").unwrap());
        assert!(
            state.flushed > 0 && !state.tail.is_empty(),
            "both paths were used"
        );
    }

    fn token(seq: u64, user: &str) -> TokenRecord {
        TokenRecord {
            seq,
            user: user.into(),
            scopes: vec!["read".into(), "write".into()],
            ..TokenRecord::default()
        }
    }

    fn put_token(state: &mut DiskState, id: &str, record: TokenRecord) {
        state
            .apply_delta(vec![StateChange::PutToken {
                token_id: id.into(),
                record,
            }])
            .unwrap();
    }

    #[test]
    fn records_the_cache_dropped_are_read_back_from_disk() {
        // A cache of a few hundred bytes keeps a record or two: nearly every read goes to disk.
        let mut state = DiskState::with_sizes(4096, 1024).unwrap();
        for i in 0..2_000u64 {
            put_token(&mut state, &format!("t{i}"), token(i, &format!("u{i}")));
        }
        assert!(
            state.cache.get_mut().bytes() <= 1024 + RecordCache::cost(8, &token(0, "u0000")),
            "the cache stays within its budget"
        );
        for i in (0..2_000u64).rev() {
            let found = state.token(&format!("t{i}")).unwrap().unwrap();
            assert_eq!(*found, token(i, &format!("u{i}")));
        }
        // An update replaces the cached and the stored record; neither old version comes back
        // after the cache has turned over.
        put_token(&mut state, "t5", token(5, "updated"));
        assert_eq!(state.token("t5").unwrap().unwrap().user, "updated");
        for i in 100..200u64 {
            state.token(&format!("t{i}")).unwrap().unwrap();
        }
        assert_eq!(state.token("t5").unwrap().unwrap().user, "updated");
        assert_eq!(state.token("t2000").unwrap(), None);
    }

    #[test]
    fn the_cache_keeps_recent_records_and_stays_bounded() {
        let record = token(1, "someone");
        let each = RecordCache::cost(3, &record);
        let mut cache = RecordCache::new(10 * each);
        for i in 0..100 {
            cache.insert(&format!("t{i:02}"), Arc::new(token(i, "someone")));
            assert!(cache.bytes() <= 2 * 10 * each, "at most two generations");
        }
        assert!(
            cache.get::<TokenRecord>("t99").is_some(),
            "the newest is kept"
        );
        assert!(
            cache.get::<TokenRecord>("t00").is_none(),
            "the oldest is dropped"
        );
        assert!(
            cache.get::<ConsentRecord>("t99").is_none(),
            "kinds are separate"
        );
        // Replacing a record charges the cache once.
        let mut cache = RecordCache::new(10 * each);
        cache.insert("t01", Arc::new(token(1, "someone")));
        let before = cache.bytes();
        cache.insert("t01", Arc::new(token(2, "someone")));
        assert_eq!(cache.bytes(), before);
        assert_eq!(cache.get::<TokenRecord>("t01").unwrap().seq, 2);
    }

    #[test]
    fn colliding_tags_never_return_another_ids_record() {
        // Every (kind, id) gets the same tag: each lookup must compare the stored ids.
        let mut state = DiskState::with_sizes(256, 0).unwrap();
        state.tag_bits = 0;
        for i in 0..300u64 {
            put_token(&mut state, &format!("t{i}"), token(i, &format!("u{i}")));
        }
        for i in 0..300u64 {
            assert_eq!(state.token(&format!("t{i}")).unwrap().unwrap().seq, i);
        }
        assert_eq!(state.token("t300").unwrap(), None);
        assert_eq!(
            state.token("t1 ").unwrap(),
            None,
            "a longer id is another id"
        );
        assert_eq!(state.consent("t1").unwrap(), None, "kinds are separate");
        assert!(
            state.first_sighting("t1").unwrap(),
            "event ids are a kind of their own"
        );
        assert!(!state.first_sighting("t1").unwrap());
        assert!(state.first_sighting("t2").unwrap());
    }
}
