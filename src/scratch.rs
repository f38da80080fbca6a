//! Disk-backed replay state for the offline verifier, so its memory stays small however many
//! consents, tokens and events a ledger holds: records live in an unlinked temporary file
//! (appended through a 4 MiB buffer), found through an open-addressing hash index in memory
//! that costs 16 bytes per slot, at most 32 bytes per record (about 45 MB for a ledger of a
//! million entries). The key registry (a few records) and a bounded cache of recent records
//! also stay in memory. Nothing here is part of the pure core; it is an I/O edge the CLI
//! plugs into [`crate::verify::ExportVerifier`].

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt as _;

use prost::Message as _;
use sha2::Digest as _;

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
/// Records kept decoded-ready in memory (most lookups are for recent tokens); when the cache
/// is full it is emptied, which bounds its memory without bookkeeping.
const CACHE_RECORDS: usize = 32 * 1024;

fn corrupt() -> ViewError {
    ViewError("scratch file: corrupt record".into())
}

fn io(error: std::io::Error) -> ViewError {
    ViewError(format!("scratch file: {error}"))
}

/// Replay state on disk (see the module docs).
pub struct DiskState {
    keys: HashMap<String, KeyRecord>,
    /// Recently written or read consent and token records (not event ids).
    cache: HashMap<(u8, String), Vec<u8>>,
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

fn tag(kind: u8, id: &str) -> u64 {
    let digest = sha2::Sha256::new()
        .chain_update([kind])
        .chain_update(id.as_bytes())
        .finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    // 0 marks an empty slot.
    u64::from_le_bytes(bytes) | 1
}

impl DiskState {
    /// An empty state backed by an unlinked temporary file.
    pub fn new() -> std::io::Result<Self> {
        Self::with_buffer(WRITE_BUFFER)
    }

    fn with_buffer(buffer: usize) -> std::io::Result<Self> {
        Ok(Self {
            keys: HashMap::new(),
            cache: HashMap::new(),
            data: anonymous_file("data")?,
            flushed: 0,
            tail: Vec::with_capacity(buffer),
            buffer,
            index: vec![(0, 0); INITIAL_SLOTS],
            used: 0,
        })
    }

    /// Reads the record at `offset`: (kind, id, value).
    fn read_record(&self, offset: u64) -> Result<(u8, String, Vec<u8>), ViewError> {
        let mut header = [0u8; 7];
        self.read_at(offset, &mut header)?;
        let total = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let mut body = vec![0u8; total.saturating_sub(7)];
        self.read_at(offset + 7, &mut body)?;
        let kind = header[4];
        let id_len = u16::from_le_bytes([header[5], header[6]]) as usize;
        let value = body.split_off(id_len.min(body.len()));
        let id = String::from_utf8(body).map_err(|_| corrupt())?;
        Ok((kind, id, value))
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

    /// The slot holding (kind, id), or the empty slot where it would go.
    fn find(&self, kind: u8, id: &str) -> Result<(usize, Option<u64>), ViewError> {
        let tag = tag(kind, id);
        let slots = self.index.len();
        let mut slot = (tag % slots as u64) as usize;
        loop {
            let (slot_tag, offset) = self.index[slot];
            if slot_tag == 0 {
                return Ok((slot, None));
            }
            if slot_tag == tag {
                let (found_kind, found_id, _) = self.read_record(offset)?;
                if found_kind == kind && found_id == id {
                    return Ok((slot, Some(offset)));
                }
            }
            slot = (slot + 1) % slots;
        }
    }

    fn get(&self, kind: u8, id: &str) -> Result<Option<Vec<u8>>, ViewError> {
        if let Some(value) = self.cache.get(&(kind, id.to_owned())) {
            return Ok(Some(value.clone()));
        }
        match self.find(kind, id)? {
            (_, None) => Ok(None),
            (_, Some(offset)) => Ok(Some(self.read_record(offset)?.2)),
        }
    }

    fn remember(&mut self, kind: u8, id: &str, value: &[u8]) {
        if self.cache.len() >= CACHE_RECORDS {
            self.cache.clear();
        }
        self.cache.insert((kind, id.to_owned()), value.to_vec());
    }

    fn put(&mut self, kind: u8, id: &str, value: &[u8]) -> Result<(), ViewError> {
        let found = self.find_with_room(kind, id)?;
        self.put_at(kind, id, value, found)
    }

    /// As [`find`](Self::find), first doubling the index if one more record would fill it
    /// past half.
    fn find_with_room(&mut self, kind: u8, id: &str) -> Result<(usize, Option<u64>), ViewError> {
        if (self.used + 1) * 2 > self.index.len() {
            self.grow();
        }
        self.find(kind, id)
    }

    /// Writes a record and points `slot` (from [`find`](Self::find), no growth since) at it.
    fn put_at(
        &mut self,
        kind: u8,
        id: &str,
        value: &[u8],
        (slot, existing): (usize, Option<u64>),
    ) -> Result<(), ViewError> {
        let id_len =
            u16::try_from(id.len()).map_err(|_| ViewError("scratch file: id too long".into()))?;
        let total = 7 + id.len() + value.len();
        let offset = self.flushed + self.tail.len() as u64;
        self.tail.extend_from_slice(
            &u32::try_from(total)
                .map_err(|_| ViewError("scratch file: record too long".into()))?
                .to_le_bytes(),
        );
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
        if existing.is_none() {
            self.used += 1;
        }
        self.index[slot] = (tag(kind, id), offset);
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

fn decode<M: prost::Message + Default>(bytes: Option<Vec<u8>>) -> Result<Option<M>, ViewError> {
    bytes
        .map(|b| M::decode(b.as_slice()).map_err(|e| ViewError(format!("scratch record: {e}"))))
        .transpose()
}

impl TrustView for DiskState {
    fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, ViewError> {
        Ok(self.keys.get(key_id).cloned())
    }
    fn consent(&self, consent_id: &str) -> Result<Option<ConsentRecord>, ViewError> {
        decode(self.get(KIND_CONSENT, consent_id)?)
    }
    fn token(&self, token_id: &str) -> Result<Option<TokenRecord>, ViewError> {
        decode(self.get(KIND_TOKEN, token_id)?)
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
                    let value = record.encode_to_vec();
                    self.put(KIND_CONSENT, &consent_id, &value)?;
                    self.remember(KIND_CONSENT, &consent_id, &value);
                }
                StateChange::PutToken { token_id, record } => {
                    let value = record.encode_to_vec();
                    self.put(KIND_TOKEN, &token_id, &value)?;
                    self.remember(KIND_TOKEN, &token_id, &value);
                }
            }
        }
        Ok(())
    }

    fn first_sighting(&mut self, event_id: &str) -> Result<bool, ViewError> {
        let found = self.find_with_room(KIND_EVENT, event_id)?;
        if found.1.is_some() {
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
        let mut state = DiskState::with_buffer(4096).unwrap();
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
        assert_eq!(state.token("t7").unwrap(), Some(updated));
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
}
