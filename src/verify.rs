//! Offline verification with nothing but the ledger's verifier key: trace bundles now, whole
//! exports later. Pure: it reads no files and opens no sockets; callers hand it bytes.

use prost::Message as _;
use std::collections::HashMap;
use std::sync::mpsc;

use crate::checkpoint::{self, CheckpointError, CheckpointNote, LedgerVerifier};
use crate::merkle::{self, ProofError};
use crate::proto::{Entry, Event, TraceBundle, Verdict};
use crate::trust::{self, LedgerKeys, MemoryState, Refusal, ReplayState};

/// Why a trace bundle does not verify. Every variant is a value a caller can match on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    /// The bundle's checkpoint does not open under the trusted key.
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    /// The bundle is not shaped as the contract says (counts, missing fields, order).
    #[error("malformed bundle: {0}")]
    Malformed(String),
    /// An entry's inclusion proof does not lead to the checkpoint's root.
    #[error("entry {seq}: inclusion proof: {error}")]
    Inclusion { seq: u64, error: ProofError },
    /// An entry would be refused when judged again (bad signature, unknown key, role ...).
    #[error("entry {seq} does not hold: {refusal}")]
    Refused { seq: u64, refusal: Refusal },
    /// The verdict recomputed from the bundle differs from the recorded one.
    #[error("entry {seq}: recorded verdict differs from the recomputed one")]
    VerdictMismatch {
        seq: u64,
        recorded: Box<Verdict>,
        recomputed: Box<Verdict>,
    },
}

/// What a verified trace bundle proves.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceReport {
    /// The traced entry.
    pub seq: u64,
    /// Its verdict, recomputed and equal to the recorded one.
    pub verdict: Verdict,
    /// The tree size of the checkpoint every proof is against.
    pub tree_size: u64,
    /// How many entries the bundle carried.
    pub entries: usize,
}

/// Why one entry does not hold when judged again.
enum EntryFailure {
    Malformed(String),
    Refused(Refusal),
    VerdictMismatch {
        recorded: Box<Verdict>,
        recomputed: Box<Verdict>,
    },
}

/// Judges a stored entry again against the state before it (the genesis and key rotations
/// against the ledger keys, which it updates; see [`trust::rejudge_stored`]) and checks the
/// recorded verdict. `decoded` is the entry's event if the caller has already decoded it.
/// Returns the evaluation and the event. Shared by trace and export verification.
fn rejudge_entry(
    entry: &Entry,
    decoded: Option<Event>,
    state: &impl trust::TrustView,
    ledger_keys: &mut Option<LedgerKeys>,
    preverified: Option<&[u8; 32]>,
) -> Result<(trust::Evaluation, Event), EntryFailure> {
    let signed = entry
        .event
        .as_ref()
        .ok_or_else(|| EntryFailure::Malformed("no event".into()))?;
    let event = match decoded {
        Some(event) => event,
        None => Event::decode(signed.payload.as_slice()).map_err(|e| {
            EntryFailure::Refused(Refusal::Malformed(format!("payload does not decode: {e}")))
        })?,
    };
    let judged = trust::rejudge_stored(signed, &event, entry.seq, state, ledger_keys, preverified)
        .map_err(|e| EntryFailure::Malformed(e.to_string()))?;
    let evaluation = judged.map_err(EntryFailure::Refused)?;
    if entry.verdict.as_ref() != Some(&evaluation.verdict) {
        return Err(EntryFailure::VerdictMismatch {
            recorded: Box::new(entry.verdict.clone().unwrap_or_default()),
            recomputed: Box::new(evaluation.verdict),
        });
    }
    Ok((evaluation, event))
}

fn malformed(message: impl Into<String>) -> TraceError {
    TraceError::Malformed(message.into())
}

/// Verifies a trace bundle: the checkpoint's signature, every entry's inclusion proof against
/// it, every entry's signature and verdict judged again in ledger order from the bundle's
/// entries alone (the key registry replayed from the genesis and the key grants it carries),
/// and the traced entry's verdict.
///
/// `key` must be a key that signed the bundle's checkpoint. A bundle holds no rotation
/// entries, so unlike [`verify_export`] it cannot follow a ledger key rotation: after one
/// finishes, verify bundles with the new key.
pub fn verify_trace_bundle(
    bundle: &TraceBundle,
    key: &LedgerVerifier,
) -> Result<TraceReport, TraceError> {
    let note = bundle
        .checkpoint
        .as_ref()
        .ok_or_else(|| malformed("no checkpoint"))?;
    let checkpoint = checkpoint::open(&note.note, key)?;
    if bundle.entries.len() != bundle.proofs.len() {
        return Err(malformed(format!(
            "{} entries but {} proofs",
            bundle.entries.len(),
            bundle.proofs.len()
        )));
    }
    let mut entries = Vec::with_capacity(bundle.entries.len());
    for (stored, proof) in bundle.entries.iter().zip(&bundle.proofs) {
        // Only the stored bytes count; the `decoded` convenience copy is ignored.
        let entry = Entry::decode(stored.entry.as_slice())
            .map_err(|e| malformed(format!("entry does not decode: {e}")))?;
        let seq = entry.seq;
        if proof.seq != seq || proof.tree_size != checkpoint.tree_size() {
            return Err(malformed(format!(
                "proof for entry {seq} names seq {} in tree {}",
                proof.seq, proof.tree_size
            )));
        }
        let path = proof
            .hashes
            .iter()
            .map(|h| {
                merkle::hash_from_slice(h).ok_or_else(|| {
                    malformed(format!(
                        "proof for entry {seq} has a hash of {} bytes",
                        h.len()
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        merkle::verify_inclusion(
            &path,
            seq,
            checkpoint.tree_size(),
            merkle::leaf_hash(&stored.entry),
            checkpoint.root(),
        )
        .map_err(|error| TraceError::Inclusion { seq, error })?;
        entries.push(entry);
    }
    entries.sort_by_key(|e| e.seq);
    if entries.windows(2).any(|pair| pair[0].seq == pair[1].seq) {
        return Err(malformed("an entry appears twice"));
    }
    let mut state = MemoryState::new();
    let mut ledger_keys = None;
    let mut target = None;
    let mut event_ids = std::collections::HashSet::new();
    for entry in &entries {
        let seq = entry.seq;
        let (evaluation, event) = rejudge_entry(entry, None, &state, &mut ledger_keys, None)
            .map_err(|failure| match failure {
                EntryFailure::Malformed(what) => malformed(format!("entry {seq}: {what}")),
                EntryFailure::Refused(refusal) => TraceError::Refused { seq, refusal },
                EntryFailure::VerdictMismatch {
                    recorded,
                    recomputed,
                } => TraceError::VerdictMismatch {
                    seq,
                    recorded,
                    recomputed,
                },
            })?;
        if !event_ids.insert(event.event_id) {
            return Err(malformed(format!(
                "entry {seq} repeats an event_id of an earlier entry"
            )));
        }
        if seq == bundle.seq {
            target = Some(evaluation.verdict.clone());
        }
        state.apply(evaluation.delta);
    }
    let verdict = target.ok_or_else(|| {
        malformed(format!(
            "the traced entry {} is not in the bundle",
            bundle.seq
        ))
    })?;
    if bundle.verdict.as_ref() != Some(&verdict) {
        return Err(TraceError::VerdictMismatch {
            seq: bundle.seq,
            recorded: Box::new(bundle.verdict.clone().unwrap_or_default()),
            recomputed: Box::new(verdict),
        });
    }
    Ok(TraceReport {
        seq: bundle.seq,
        verdict,
        tree_size: checkpoint.tree_size(),
        entries: entries.len(),
    })
}

// ---------------------------------------------------------------------------------------------
// Whole ledgers (exports and stopped ledgers' directories), streamed.
// ---------------------------------------------------------------------------------------------

/// The first thing that makes a ledger fail verification. Tampering, a bad signature, a broken
/// chain: `custody verify` exits 1 on any of these.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum IntegrityFailure {
    /// The export's structure is damaged (header, lengths, truncation).
    #[error("malformed export: {0}")]
    Malformed(String),
    /// The checkpoint is malformed, or lacks a valid signature by a ledger key that must sign
    /// it (the ledger keys active at its tree size, as the entries record them).
    #[error("checkpoint: {0}")]
    Checkpoint(CheckpointError),
    /// The previous checkpoint is malformed, or lacks a valid signature by a ledger key that
    /// was active at its tree size.
    #[error("previous checkpoint: {0}")]
    PreviousCheckpoint(CheckpointError),
    /// The trusted key is not a ledger key of this ledger (never one, or a next key whose
    /// rotation was cancelled), by its entries.
    #[error("the trusted key {key} is not a ledger key of this ledger: {why}")]
    UntrustedKey { key: String, why: String },
    /// The ledger is shorter than the previous checkpoint: entries were removed.
    #[error("the ledger has {size} entries, fewer than the previous checkpoint's {previous}")]
    ShorterThanPrevious { size: u64, previous: u64 },
    /// An entry is out of place: wrong seq, broken prev_hash, undecodable.
    #[error("entry {seq}: {what}")]
    Entry { seq: u64, what: String },
    /// An entry would be refused (bad signature, unknown or invalid key, role not allowed).
    #[error("entry {seq} does not hold: {refusal}")]
    Refused { seq: u64, refusal: Refusal },
    /// The recorded verdict differs from the one the rules give.
    #[error(
        "entry {seq}: recorded verdict {recorded:?} differs from the recomputed {recomputed:?}"
    )]
    VerdictMismatch {
        seq: u64,
        recorded: Box<Verdict>,
        recomputed: Box<Verdict>,
    },
    /// More or fewer entries than the checkpoint commits to.
    #[error("the ledger holds {found} entries; the checkpoint commits to {expected}")]
    Count { found: u64, expected: u64 },
    /// The Merkle root of the entries differs from the checkpoint's.
    #[error("the entries' Merkle root {computed} differs from the checkpoint's {expected}")]
    RootMismatch { computed: String, expected: String },
    /// The replay state could not be kept (scratch storage failed): not evidence about the
    /// ledger; the CLI reports it as an I/O error (exit 2).
    #[error("couldn't keep the replay state: {0}")]
    State(String),
    /// The first entries do not give the previous checkpoint's root: history was rewritten.
    #[error("the first {size} entries do not have the previous checkpoint's root: history was rewritten")]
    NotExtending { size: u64 },
}

impl IntegrityFailure {
    /// The entry at fault, when one is.
    pub fn seq(&self) -> Option<u64> {
        match self {
            IntegrityFailure::Entry { seq, .. }
            | IntegrityFailure::Refused { seq, .. }
            | IntegrityFailure::VerdictMismatch { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}

/// One recorded violation, as the report lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ViolationReport {
    /// The entry.
    pub seq: u64,
    /// Its kind (`action`, `issuance`, `validation`).
    pub kind: String,
    /// The user on whose behalf it happened, when known.
    pub user: String,
    /// The agent involved, when known.
    pub agent: String,
    /// The broken rules.
    pub reasons: Vec<String>,
}

/// Most violations a [`LedgerReport`] lists; the rest are counted.
pub const MAX_LISTED_VIOLATIONS: usize = 10_000;

/// What a verified ledger holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LedgerReport {
    /// The log's origin.
    pub origin: String,
    /// Entries verified (the checkpoint's tree size).
    pub tree_size: u64,
    /// The checkpoint's root, hex.
    pub root: String,
    /// The previous checkpoint's tree size, when one was checked.
    pub extends_previous: Option<u64>,
    /// The verifier keys of the ledger keys that signed the checkpoint: the current ledger
    /// key, then the next key while a rotation is under way.
    pub ledger_keys: Vec<String>,
    /// What the trusted key is to this ledger: the current key, the next key of a rotation
    /// under way, or a key a rotation retired (the report is then only as strong as that
    /// retired key's secrecy: trust the current key from now on).
    pub trusted_key: trust::KeyStatus,
    /// Entries by kind.
    pub entries_by_kind: std::collections::BTreeMap<String, u64>,
    /// Actions whose verdict is TRACED.
    pub actions_traced: u64,
    /// All actions.
    pub actions: u64,
    /// How many entries record a violation.
    pub violations_total: u64,
    /// The first [`MAX_LISTED_VIOLATIONS`] of them, in ledger order (the list is bounded so
    /// the verifier's memory stays flat).
    pub violations: Vec<ViolationReport>,
}

fn kind_label(kind: crate::proto::EventKind) -> String {
    kind.as_str_name()
        .trim_start_matches("EVENT_KIND_")
        .to_ascii_lowercase()
}

/// Entries handed to the checking thread at a time (their signatures in batches of up to
/// 8,192, shared by every core). Bigger chunks mean fewer hand-offs between the checking
/// thread and the judging thread: 16,384 took about 10% less time than 4,096 on a 1.2M-entry
/// export, and 32,768 (with the batches shared in turn) about 7% less than 16,384 on a
/// 1M-entry one, at about the same peak memory under mimalloc (BENCHMARKS.md). Unit tests
/// use 4,096, so that a few thousand entries already cross chunk boundaries; nothing in the
/// verifier depends on the size.
const CHUNK_ENTRIES: usize = if cfg!(test) { 4096 } else { 32_768 };

/// A chunk of entries whose signatures have been checked.
struct Preverified {
    chunk: Vec<Vec<u8>>,
    entries: Vec<Option<Entry>>,
    /// Each entry's event, if it decodes.
    events: Vec<Option<Event>>,
    /// Each entry's Merkle leaf hash.
    leaves: Vec<merkle::Hash>,
    /// Per entry, the key its signature verified under, if any.
    keys: Vec<Option<[u8; 32]>>,
    /// The keys the chunk's grants (and its genesis, for the first admin) name, by key id.
    grants: Vec<(String, [u8; 32])>,
}

/// Decodes a chunk and batch-verifies its signatures on every core, finding each signer's
/// key among `hints` or the chunk's own earlier grants. Only a hint for the judge, which
/// checks the key is the registered one and verifies the signature itself otherwise.
fn preverify_chunk(chunk: Vec<Vec<u8>>, hints: &HashMap<String, [u8; 32]>) -> Preverified {
    let entries: Vec<Option<Entry>> = chunk
        .iter()
        .map(|bytes| Entry::decode(bytes.as_slice()).ok())
        .collect();
    let events: Vec<Option<Event>> = entries
        .iter()
        .map(|entry| {
            let signed = entry.as_ref()?.event.as_ref()?;
            Event::decode(signed.payload.as_slice()).ok()
        })
        .collect();
    let leaves = chunk.iter().map(|bytes| merkle::leaf_hash(bytes)).collect();
    let grants: Vec<(String, [u8; 32])> = events
        .iter()
        .filter_map(|event| trust::named_key(event.as_ref()?))
        .collect();
    // Entries that cannot be checked stand in as a signature that matches no key.
    let placeholder = crate::proto::SignedEvent::default();
    let keys = trust::preverify(
        entries.iter().zip(&events).map(|(entry, event)| {
            match entry.as_ref().and_then(|e| e.event.as_ref()) {
                Some(signed) => (signed, event.as_ref()),
                None => (&placeholder, None),
            }
        }),
        |key_id| hints.get(key_id).copied(),
        trust::all_cores(),
    );
    Preverified {
        chunk,
        entries,
        events,
        leaves,
        keys,
        grants,
    }
}

/// The thread that decodes chunks and checks their signatures, one chunk ahead of the judging.
/// It lives as long as the verifier, so its allocator heap stays warm: with a thread per chunk
/// (each starting on an empty heap) page clearing took about 7% of a verify's samples, with
/// one thread about 3.5% (`perf`; the helper threads of [`trust::preverify`] still start per
/// chunk). It stops after its current chunk once the verifier is dropped.
struct Checker {
    chunks: mpsc::SyncSender<Vec<Vec<u8>>>,
    checked: mpsc::Receiver<Preverified>,
}

impl Checker {
    fn start() -> std::io::Result<Self> {
        let (chunks, chunks_rx) = mpsc::sync_channel::<Vec<Vec<u8>>>(1);
        let (checked_tx, checked) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("custody-preverify".into())
            .spawn(move || {
                // Every key a grant or the genesis seen so far names, by key id: where
                // signatures are checked before the grants are judged. Only hints (see
                // [`trust::preverify`]).
                let mut hints: HashMap<String, [u8; 32]> = HashMap::new();
                while let Ok(chunk) = chunks_rx.recv() {
                    let checked = preverify_chunk(chunk, &hints);
                    hints.extend(checked.grants.iter().cloned());
                    if checked_tx.send(checked).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self { chunks, checked })
    }
}

/// The checking thread is gone (it panicked) before handing a chunk back or taking one.
fn checking_stopped() -> IntegrityFailure {
    IntegrityFailure::State("signature checking stopped unexpectedly".into())
}

/// A checkpoint note whose signatures wait for the entries: which ledger keys must have signed
/// it depends on the rotations recorded before its tree size.
struct PendingCheckpoint {
    note: CheckpointNote,
    tree_size: u64,
    root: merkle::Hash,
    /// Whether it carries a valid signature by the trusted key.
    signed_by_trusted: bool,
}

impl PendingCheckpoint {
    /// Parses `note`, checks its origin against the trusted key's name and checks the
    /// trusted key's signature if it carries one (a bad one fails now, a missing one is left
    /// to [`verify`](Self::verify)).
    fn parse(note: &str, trusted: &LedgerVerifier) -> Result<Self, CheckpointError> {
        let note = checkpoint::parse(note)?;
        let (origin, tree_size, root) = note.unverified_body()?;
        if origin != trusted.origin() {
            return Err(CheckpointError::OriginMismatch {
                expected: trusted.origin().to_owned(),
                found: origin,
            });
        }
        let signed_by_trusted = match note.verify(std::slice::from_ref(trusted)) {
            Ok(_) => true,
            Err(CheckpointError::NotSignedByKey) => false,
            Err(other) => return Err(other),
        };
        Ok(Self {
            note,
            tree_size,
            root,
            signed_by_trusted,
        })
    }

    /// Checks that every ledger key active at the checkpoint's tree size signed it.
    fn verify(&self, origin: &str, keys: &LedgerKeys) -> Result<(), CheckpointError> {
        let verifiers = keys
            .active()
            .iter()
            .map(|key| LedgerVerifier::from_public_key(origin, key))
            .collect::<Result<Vec<_>, _>>()?;
        self.note.verify(&verifiers).map(|_| ())
    }
}

/// Verifies a whole ledger entry by entry, in memory bounded by three chunks of entries
/// ([`CHUNK_ENTRIES`] each, decoded) plus the trust state (keys, consents, tokens). Feed it
/// every entry in order, then call [`finish`](Self::finish). Signatures are checked a chunk
/// at a time with Ed25519 batch verification on every core, in a background thread that
/// overlaps with the judging of the chunk before (which runs in ledger order) and with the
/// reading of the chunk after.
pub struct ExportVerifier<S: ReplayState = MemoryState> {
    pending: Vec<Vec<u8>>,
    /// The checking thread, once the first chunk is full.
    checker: Option<Checker>,
    /// The length of the chunk before `pending`, while the checking thread has it.
    checking: Option<usize>,
    checkpoint: PendingCheckpoint,
    /// The previous checkpoint, until the entries reach its tree size and it is checked.
    previous: Option<PendingCheckpoint>,
    /// The key the caller trusts.
    trusted: LedgerVerifier,
    /// The ledger keys the entries so far record (`None` before the genesis).
    ledger_keys: Option<LedgerKeys>,
    state: S,
    frontier: merkle::Frontier,
    prev_leaf: [u8; 32],
    /// Entries by kind so far (a few kinds: a short list beats a map keyed by label); moved
    /// into the report's `entries_by_kind` when finishing.
    kind_counts: Vec<(crate::proto::EventKind, u64)>,
    report: LedgerReport,
}

impl ExportVerifier<MemoryState> {
    /// Starts verifying a ledger whose newest checkpoint is `note` (and which must extend
    /// `previous`, if given) for a caller that trusts `key`; keeps the replay state in memory.
    /// See [`with_state`](ExportVerifier::with_state).
    pub fn new(
        note: &str,
        key: &LedgerVerifier,
        previous: Option<&str>,
    ) -> Result<Self, IntegrityFailure> {
        Self::with_state(note, key, previous, MemoryState::new())
    }
}

impl<S: ReplayState> ExportVerifier<S> {
    /// Starts verifying a ledger whose newest checkpoint is `note` (and which must extend
    /// `previous`, if given) for a caller that trusts `key`; keeps the replay state in
    /// `state`.
    ///
    /// Which ledger keys must have signed a checkpoint depends on the key rotations the
    /// entries record before its tree size, so the signatures are checked as the entries
    /// reach each checkpoint: every ledger key active there must have signed it. `key` must
    /// be the current ledger key at the newest checkpoint, the next key of a rotation under
    /// way there, or a key a finished rotation retired (it signed the step that handed its
    /// authority on); a withdrawn next key or a key no entry names is refused. The report's
    /// `trusted_key` says which. A bad signature by `key` fails at once; a missing one only
    /// after the replay.
    pub fn with_state(
        note: &str,
        key: &LedgerVerifier,
        previous: Option<&str>,
        state: S,
    ) -> Result<Self, IntegrityFailure> {
        let checkpoint =
            PendingCheckpoint::parse(note, key).map_err(IntegrityFailure::Checkpoint)?;
        let previous = previous
            .map(|note| {
                PendingCheckpoint::parse(note, key).map_err(IntegrityFailure::PreviousCheckpoint)
            })
            .transpose()?;
        let previous = match previous {
            // Never reached by the entries: only the trusted key's signature can vouch for it.
            Some(previous)
                if previous.tree_size == 0 || previous.tree_size > checkpoint.tree_size =>
            {
                if !previous.signed_by_trusted {
                    return Err(IntegrityFailure::PreviousCheckpoint(
                        CheckpointError::NotSignedByKey,
                    ));
                }
                if previous.tree_size > checkpoint.tree_size {
                    return Err(IntegrityFailure::ShorterThanPrevious {
                        size: checkpoint.tree_size,
                        previous: previous.tree_size,
                    });
                }
                if previous.root != merkle::EMPTY_ROOT {
                    return Err(IntegrityFailure::NotExtending { size: 0 });
                }
                None
            }
            previous => previous,
        };
        let report = LedgerReport {
            origin: key.origin().to_owned(),
            tree_size: checkpoint.tree_size,
            root: hex::encode(checkpoint.root.0),
            extends_previous: previous.as_ref().map(|p| p.tree_size),
            ledger_keys: Vec::new(),
            trusted_key: trust::KeyStatus::Unknown,
            entries_by_kind: Default::default(),
            actions_traced: 0,
            actions: 0,
            violations_total: 0,
            violations: Vec::new(),
        };
        Ok(Self {
            pending: Vec::with_capacity(CHUNK_ENTRIES),
            checker: None,
            checking: None,
            checkpoint,
            previous,
            trusted: key.clone(),
            ledger_keys: None,
            state,
            frontier: merkle::Frontier::new(),
            prev_leaf: [0; 32],
            kind_counts: Vec::new(),
            report,
        })
    }

    /// How many entries the checkpoint commits to.
    pub fn expected_entries(&self) -> u64 {
        self.checkpoint.tree_size
    }

    /// Takes the next entry's stored bytes. Failures are reported in ledger order: an error
    /// may name an earlier entry of the current or the previous chunk.
    pub fn push(&mut self, bytes: Vec<u8>) -> Result<(), IntegrityFailure> {
        let waiting = self.checking.unwrap_or(0);
        let seen = self.frontier.size() + (waiting + self.pending.len()) as u64;
        if seen >= self.checkpoint.tree_size {
            self.drain()?;
            return Err(IntegrityFailure::Count {
                found: seen + 1,
                expected: self.checkpoint.tree_size,
            });
        }
        self.pending.push(bytes);
        if self.pending.len() >= CHUNK_ENTRIES {
            self.flush_chunk()?;
        }
        Ok(())
    }

    /// Waits for the chunk the checking thread has, if it has one.
    fn collect_checked(&mut self) -> Result<Option<Preverified>, IntegrityFailure> {
        if self.checking.take().is_none() {
            return Ok(None);
        }
        let checker = self.checker.as_ref().ok_or_else(checking_stopped)?;
        checker
            .checked
            .recv()
            .map(Some)
            .map_err(|_| checking_stopped())
    }

    /// Takes the chunk the checking thread has checked, hands it the pending chunk and judges
    /// the taken one meanwhile. The checking goes on after this returns, while the caller
    /// reads the next chunk.
    fn flush_chunk(&mut self) -> Result<(), IntegrityFailure> {
        let previous = self.collect_checked()?;
        let chunk = std::mem::take(&mut self.pending);
        if !chunk.is_empty() {
            let len = chunk.len();
            if self.checker.is_none() {
                self.checker = Some(Checker::start().map_err(|e| {
                    IntegrityFailure::State(format!("couldn't start signature checking: {e}"))
                })?);
            }
            let sent = self
                .checker
                .as_ref()
                .is_some_and(|checker| checker.chunks.send(chunk).is_ok());
            if !sent {
                return Err(checking_stopped());
            }
            self.checking = Some(len);
            self.pending = Vec::with_capacity(CHUNK_ENTRIES);
        }
        match previous {
            Some(previous) => self.judge_chunk(previous),
            None => Ok(()),
        }
    }

    /// Judges everything fed so far.
    fn drain(&mut self) -> Result<(), IntegrityFailure> {
        self.flush_chunk()?;
        match self.collect_checked()? {
            Some(last) => self.judge_chunk(last),
            None => Ok(()),
        }
    }

    fn judge_chunk(&mut self, chunk: Preverified) -> Result<(), IntegrityFailure> {
        let Preverified {
            chunk,
            entries,
            events,
            leaves,
            keys,
            ..
        } = chunk;
        for ((((bytes, entry), event), leaf), preverified) in
            chunk.iter().zip(entries).zip(events).zip(leaves).zip(keys)
        {
            self.judge(bytes, entry, event, leaf, preverified.as_ref())?;
        }
        Ok(())
    }

    /// Judges one entry in ledger order.
    fn judge(
        &mut self,
        bytes: &[u8],
        entry: Option<Entry>,
        event: Option<Event>,
        leaf: merkle::Hash,
        preverified: Option<&[u8; 32]>,
    ) -> Result<(), IntegrityFailure> {
        let seq = self.frontier.size();
        let entry_failure = |what: String| IntegrityFailure::Entry { seq, what };
        let entry = match entry {
            Some(entry) => entry,
            None => {
                let error = Entry::decode(bytes)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                return Err(entry_failure(format!("does not decode: {error}")));
            }
        };
        if entry.seq != seq {
            return Err(entry_failure(format!("carries seq {}", entry.seq)));
        }
        if entry.prev_hash != self.prev_leaf {
            return Err(entry_failure(
                "prev_hash is not the previous entry's leaf hash".into(),
            ));
        }
        let (evaluation, event) = rejudge_entry(
            &entry,
            event,
            &self.state,
            &mut self.ledger_keys,
            preverified,
        )
        .map_err(|failure| match failure {
            EntryFailure::Malformed(what) => entry_failure(what),
            EntryFailure::Refused(refusal) => IntegrityFailure::Refused { seq, refusal },
            EntryFailure::VerdictMismatch {
                recorded,
                recomputed,
            } => IntegrityFailure::VerdictMismatch {
                seq,
                recorded,
                recomputed,
            },
        })?;
        // An event may be on the ledger once: a repeated event_id means an entry was replayed.
        let first = self
            .state
            .first_sighting(&event.event_id)
            .map_err(|e| IntegrityFailure::State(e.to_string()))?;
        if !first {
            return Err(entry_failure(format!(
                "repeats event_id {:?} of an earlier entry",
                event.event_id
            )));
        }
        self.frontier.push(leaf);
        self.prev_leaf = leaf.0;
        self.tally(seq, &event, &evaluation.verdict);
        self.state
            .apply_delta(evaluation.delta)
            .map_err(|e| IntegrityFailure::State(e.to_string()))?;
        if self
            .previous
            .as_ref()
            .is_some_and(|previous| previous.tree_size == self.frontier.size())
        {
            self.check_previous()?;
        }
        Ok(())
    }

    /// The entries have reached the previous checkpoint's tree size: the ledger keys active
    /// there must have signed it, and its root must be theirs.
    fn check_previous(&mut self) -> Result<(), IntegrityFailure> {
        let Some(previous) = self.previous.take() else {
            return Ok(());
        };
        let keys = self
            .ledger_keys
            .as_ref()
            .ok_or(IntegrityFailure::PreviousCheckpoint(
                CheckpointError::NotSignedByKey,
            ))?;
        previous
            .verify(self.trusted.origin(), keys)
            .map_err(IntegrityFailure::PreviousCheckpoint)?;
        if self.frontier.root() != previous.root {
            return Err(IntegrityFailure::NotExtending {
                size: previous.tree_size,
            });
        }
        Ok(())
    }

    fn tally(&mut self, seq: u64, event: &Event, verdict: &Verdict) {
        use crate::proto::{event::Body, EventKind, TraceStatus};
        let kind = trust::event_kind(event.body.as_ref());
        match self.kind_counts.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, count)) => *count += 1,
            None => self.kind_counts.push((kind, 1)),
        }
        let traced = verdict.status == TraceStatus::Traced as i32;
        if kind == EventKind::Action {
            self.report.actions += 1;
            self.report.actions_traced += u64::from(traced);
        }
        if verdict.status == TraceStatus::Violation as i32 {
            self.report.violations_total += 1;
            if self.report.violations.len() >= MAX_LISTED_VIOLATIONS {
                return;
            }
            let token_party = |token_id: &str| {
                self.state
                    .token(token_id)
                    .ok()
                    .flatten()
                    .map(|t| (t.user.clone(), t.agent.clone()))
                    .unwrap_or_default()
            };
            let (user, agent) = match &event.body {
                Some(Body::Issuance(i)) => (i.user.clone(), i.agent.clone()),
                Some(Body::Action(a)) => token_party(&a.token_id),
                Some(Body::Validation(v)) => token_party(&v.token_id),
                _ => Default::default(),
            };
            self.report.violations.push(ViolationReport {
                seq,
                kind: kind_label(kind),
                user,
                agent,
                reasons: verdict.reasons.clone(),
            });
        }
    }

    /// Judges what is left, then checks the count and the root.
    pub fn finish(mut self) -> Result<LedgerReport, IntegrityFailure> {
        self.drain()?;
        let found = self.frontier.size();
        if found != self.checkpoint.tree_size {
            return Err(IntegrityFailure::Count {
                found,
                expected: self.checkpoint.tree_size,
            });
        }
        let root = self.frontier.root();
        if root != self.checkpoint.root {
            return Err(IntegrityFailure::RootMismatch {
                computed: hex::encode(root.0),
                expected: hex::encode(self.checkpoint.root.0),
            });
        }
        // Every entry holds and the root is the checkpoint's: now the ledger keys the entries
        // record say who must have signed it, and whether the trusted key leads to them.
        let origin = self.trusted.origin().to_owned();
        let Some(keys) = self.ledger_keys.as_ref() else {
            return Err(IntegrityFailure::Malformed(
                "the checkpoint commits to no entries; a ledger starts with its genesis".into(),
            ));
        };
        self.checkpoint
            .verify(&origin, keys)
            .map_err(IntegrityFailure::Checkpoint)?;
        let status = keys.status(self.trusted.public_key());
        let why = match status {
            trust::KeyStatus::Current { .. }
            | trust::KeyStatus::Next { .. }
            | trust::KeyStatus::Retired { .. } => None,
            trust::KeyStatus::Withdrawn { at } => Some(format!(
                "it was the next key of a rotation cancelled at entry {at}"
            )),
            trust::KeyStatus::Unknown => Some("no entry names it".to_owned()),
        };
        if let Some(why) = why {
            return Err(IntegrityFailure::UntrustedKey {
                key: self.trusted.key_string().to_owned(),
                why,
            });
        }
        self.report.trusted_key = status;
        self.report.ledger_keys = keys
            .active()
            .iter()
            .map(|key| {
                LedgerVerifier::from_public_key(&origin, key)
                    .map(|verifier| verifier.key_string().to_owned())
                    .map_err(IntegrityFailure::Checkpoint)
            })
            .collect::<Result<_, _>>()?;
        for (kind, count) in std::mem::take(&mut self.kind_counts) {
            *self
                .report
                .entries_by_kind
                .entry(kind_label(kind))
                .or_default() += count;
        }
        Ok(self.report)
    }
}

/// Verifies an export read from `reader`; `progress(done, total)` is called as entries pass.
/// The outer error is an I/O failure (not evidence); the inner result is the verdict on the
/// ledger.
pub fn verify_export<R: std::io::BufRead>(
    reader: R,
    key: &LedgerVerifier,
    previous: Option<&str>,
    progress: impl FnMut(u64, u64),
) -> Result<Result<LedgerReport, IntegrityFailure>, std::io::Error> {
    verify_export_with(reader, key, previous, MemoryState::new(), progress)
}

/// [`verify_export`] keeping the replay state in `state` (e.g. on disk).
pub fn verify_export_with<R: std::io::BufRead, S: ReplayState>(
    reader: R,
    key: &LedgerVerifier,
    previous: Option<&str>,
    state: S,
    progress: impl FnMut(u64, u64),
) -> Result<Result<LedgerReport, IntegrityFailure>, std::io::Error> {
    use crate::export::{ExportError, ExportReader};
    let outcome = ExportReader::open(reader).and_then(|(mut export, note)| {
        let entries = std::iter::from_fn(|| export.next_entry().transpose());
        verify_entries(&note, entries, key, previous, state, progress)
    });
    match outcome {
        Ok(verdict) => Ok(verdict),
        Err(ExportError::Io(e)) => Err(e),
        Err(ExportError::Malformed(what)) => Ok(Err(IntegrityFailure::Malformed(what))),
    }
}

/// Verifies a ledger given its checkpoint note and every entry's stored bytes in order, from
/// any source (an export, a stopped ledger's store). The outer error is the source's own
/// failure (not evidence); the inner result is the verdict on the ledger.
pub fn verify_entries<E, S: ReplayState>(
    note: &str,
    entries: impl IntoIterator<Item = Result<Vec<u8>, E>>,
    key: &LedgerVerifier,
    previous: Option<&str>,
    state: S,
    mut progress: impl FnMut(u64, u64),
) -> Result<Result<LedgerReport, IntegrityFailure>, E> {
    let mut verifier = match ExportVerifier::with_state(note, key, previous, state) {
        Ok(verifier) => verifier,
        Err(failure) => return Ok(Err(failure)),
    };
    let total = verifier.expected_entries();
    for (done, bytes) in (1u64..).zip(entries) {
        if let Err(failure) = verifier.push(bytes?) {
            return Ok(Err(failure));
        }
        progress(done, total);
    }
    Ok(verifier.finish())
}
