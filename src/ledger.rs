//! The append pipeline and the ledger's own keys.
//!
//! [`Ledger::append_batch`] takes the signed events that arrived together and, in order,
//! decodes each, checks its shape, recognises an exact retry, finds its key, verifies its
//! signature, checks the clock, authorizes the signer and evaluates it against the state
//! before it (committed state plus the batch so far). The accepted ones become entries that
//! are committed as one durable batch with one new signed checkpoint; only then are receipts
//! produced. A refused event writes nothing and does not disturb the others.
//!
//! Concurrency: `append_batch` must be called by one thread at a time (the group-commit task);
//! the read methods may be called from anywhere at any time.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use prost::Message as _;

use crate::checkpoint::{self, CheckpointError, CheckpointSigner, LedgerVerifier};
use crate::envelope;
use crate::merkle::{self, Hash};
use crate::proto::{event::Body, Entry, Event, Genesis, Receipt, SignedEvent, Verdict};
use crate::store::{Commit, Head, PendingHashes, Store, StoreError};
use crate::trust::{self, KeyRecord, Refusal, StateChange, TrustView, ViewError};

/// What the ledger is created with; recorded in the genesis entry.
#[derive(Debug, Clone)]
pub struct GenesisParams {
    /// The log's name: first line of every checkpoint and the note key name.
    pub origin: String,
    /// The first ADMIN key.
    pub admin_public_key: [u8; 32],
    /// How far `occurred_at_ms` may stray from the ledger's clock.
    pub max_clock_skew_ms: i64,
}

/// A failure to create or open the ledger.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The store failed or is inconsistent.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The newest checkpoint does not verify under the ledger key.
    #[error("couldn't verify the stored checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    /// The store belongs to another ledger (other key or origin) or its genesis is unusable.
    #[error("{0}")]
    Mismatch(String),
}

/// Milliseconds since the Unix epoch by the ledger's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A running ledger: the store, the checkpoint signer and the newest head.
pub struct Ledger {
    store: Store,
    signer: CheckpointSigner,
    max_clock_skew_ms: i64,
    head: RwLock<Head>,
    size_tx: tokio::sync::watch::Sender<u64>,
}

impl Ledger {
    /// Creates a new ledger in an empty store: writes and commits the genesis entry (seq 0),
    /// signed by `ledger_key`.
    pub fn create(
        store: Store,
        ledger_key: SigningKey,
        params: &GenesisParams,
    ) -> Result<Self, LedgerError> {
        if store.head()?.is_some() {
            return Err(LedgerError::Mismatch(
                "the store already holds a ledger".into(),
            ));
        }
        let signer = CheckpointSigner::new(&params.origin, ledger_key.clone())?;
        let event = Event {
            event_id: "genesis".into(),
            occurred_at_ms: now_ms(),
            body: Some(Body::Genesis(Genesis {
                origin: params.origin.clone(),
                admin_public_key: params.admin_public_key.to_vec(),
                ledger_public_key: ledger_key.verifying_key().to_bytes().to_vec(),
                max_clock_skew_ms: params.max_clock_skew_ms,
            })),
        };
        trust::validate_event(&event, event.encoded_len())
            .map_err(|e| LedgerError::Mismatch(format!("invalid genesis: {e}")))?;
        let payload = event.encode_to_vec();
        let signed = SignedEvent {
            signature: envelope::sign_payload(&ledger_key, &payload).to_vec(),
            key_id: envelope::key_id(&ledger_key.verifying_key().to_bytes()),
            payload,
        };
        let empty = Head {
            tree_size: 0,
            root: merkle::EMPTY_ROOT,
            checkpoint: String::new(),
        };
        let (size_tx, _) = tokio::sync::watch::channel(0);
        let ledger = Self {
            store,
            signer,
            max_clock_skew_ms: params.max_clock_skew_ms,
            head: RwLock::new(empty),
            size_tx,
        };
        let mut batch = Batch::new(&ledger)?;
        let ledger_record = KeyRecord {
            public_key: ledger_key.verifying_key().to_bytes().to_vec(),
            ..KeyRecord::default()
        };
        let (verdict, delta) = trust::evaluate(&event, &ledger_record, 0, &batch)
            .map_err(view_error)?
            .map_err(|e| LedgerError::Mismatch(format!("genesis refused: {e}")))?;
        batch.push(signed, &event, verdict, delta, now_ms())?;
        ledger.commit(batch)?;
        Ok(ledger)
    }

    /// Opens an existing ledger: checks that `ledger_key` is the one its genesis names, that
    /// the newest checkpoint verifies under it and matches the stored hashes, and that the
    /// log's tail agrees with the checkpoint.
    pub fn open(store: Store, ledger_key: SigningKey) -> Result<Self, LedgerError> {
        let head = store
            .head()?
            .ok_or_else(|| LedgerError::Mismatch("the store holds no ledger".into()))?;
        let genesis = read_genesis(&store)?;
        if genesis.ledger_public_key != ledger_key.verifying_key().to_bytes() {
            return Err(LedgerError::Mismatch(
                "the ledger key does not match the one the genesis names".into(),
            ));
        }
        let signer = CheckpointSigner::new(&genesis.origin, ledger_key)?;
        let verifier = LedgerVerifier::parse(&signer.verifier_key())?;
        let verified = checkpoint::open(&head.checkpoint, &verifier)?;
        if verified.tree_size() != head.tree_size || verified.root() != head.root {
            return Err(StoreError::Corrupt(format!(
                "checkpoint says size {} root {}, the stored hashes say size {} root {}",
                verified.tree_size(),
                verified.root(),
                head.tree_size,
                head.root
            ))
            .into());
        }
        store.check_tail(&head)?;
        let (size_tx, _) = tokio::sync::watch::channel(head.tree_size);
        Ok(Self {
            store,
            signer,
            max_clock_skew_ms: genesis.max_clock_skew_ms,
            head: RwLock::new(head),
            size_tx,
        })
    }

    /// The newest committed head.
    pub fn head(&self) -> Head {
        // A poisoned lock means a writer panicked mid-update; the head it guards is replaced
        // whole, so the value inside is still a consistent head.
        self.head.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Follows the tree size as batches commit.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.size_tx.subscribe()
    }

    /// The store, for reads.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The C2SP verifier key string of the ledger key.
    pub fn verifier_key(&self) -> String {
        self.signer.verifier_key()
    }

    /// The log's origin.
    pub fn origin(&self) -> &str {
        self.signer.origin()
    }

    /// Appends the events that arrived together. Returns one outcome per event, in order:
    /// a receipt (fresh or, for an exact retry, the original with `duplicate = true`) or the
    /// refusal. Receipts are returned only after the batch is durable. A storage failure fails
    /// the whole batch and nothing in it is acknowledged.
    pub fn append_batch(
        &self,
        events: Vec<SignedEvent>,
    ) -> Result<Vec<Result<Receipt, Refusal>>, StoreError> {
        let now = now_ms();
        let mut batch = Batch::new(self)?;
        let mut outcomes = Vec::with_capacity(events.len());
        for signed in events {
            outcomes.push(self.admit(signed, now, &mut batch)?);
        }
        let head = if batch.entries.is_empty() {
            self.head()
        } else {
            self.commit(batch)?
        };
        outcomes
            .into_iter()
            .map(|outcome| match outcome {
                Admitted::Refused(refusal) => Ok(Err(refusal)),
                Admitted::New {
                    event_id,
                    seq,
                    leaf,
                    verdict,
                } => Ok(Ok(receipt(event_id, seq, leaf, verdict, false, &head))),
                Admitted::Duplicate { event_id, seq } => {
                    let bytes = self
                        .store
                        .entry(seq)?
                        .ok_or_else(|| StoreError::Corrupt(format!("entry {seq} vanished")))?;
                    let entry = decode_entry(seq, &bytes)?;
                    let verdict = entry.verdict.unwrap_or_default();
                    Ok(Ok(receipt(
                        event_id,
                        seq,
                        merkle::leaf_hash(&bytes),
                        verdict,
                        true,
                        &head,
                    )))
                }
            })
            .collect()
    }

    fn admit(
        &self,
        signed: SignedEvent,
        now: i64,
        batch: &mut Batch<'_>,
    ) -> Result<Admitted, StoreError> {
        match self.check(&signed, now, batch)? {
            Err(refusal) => Ok(Admitted::Refused(refusal)),
            Ok(Checked::Duplicate { event_id, seq }) => Ok(Admitted::Duplicate { event_id, seq }),
            Ok(Checked::Accepted {
                event,
                verdict,
                delta,
            }) => {
                let (seq, leaf) = batch.push(signed, &event, verdict.clone(), delta, now)?;
                Ok(Admitted::New {
                    event_id: event.event_id,
                    seq,
                    leaf,
                    verdict,
                })
            }
        }
    }

    /// Every check an event passes before it is sequenced, in the order documented on the
    /// module. Storage failures are the outer error; refusals the inner.
    fn check(
        &self,
        signed: &SignedEvent,
        now: i64,
        batch: &Batch<'_>,
    ) -> Result<Result<Checked, Refusal>, StoreError> {
        let event = match Event::decode(signed.payload.as_slice()) {
            Ok(event) => event,
            Err(e) => {
                return Ok(Err(Refusal::Malformed(format!(
                    "payload does not decode as an Event: {e}"
                ))))
            }
        };
        if let Err(refusal) = trust::validate_event(&event, signed.payload.len()) {
            return Ok(Err(refusal));
        }
        let earlier = batch.event_seq(&event.event_id)?;
        if let Some(seq) = earlier {
            if batch.signed_event(seq)? == *signed {
                return Ok(Ok(Checked::Duplicate {
                    event_id: event.event_id,
                    seq,
                }));
            }
        }
        let Some(signer) = batch.key(&signed.key_id).map_err(view_store_error)? else {
            return Ok(Err(Refusal::UnknownKey(signed.key_id.clone())));
        };
        if let Err(refusal) = trust::key_valid_at(&signed.key_id, &signer, event.occurred_at_ms) {
            return Ok(Err(refusal));
        }
        let verified = envelope::parse_public_key(&signer.public_key)
            .and_then(|key| envelope::verify_payload(&key, &signed.payload, &signed.signature));
        if let Err(e) = verified {
            return Ok(Err(Refusal::BadSignature(e.to_string())));
        }
        if let Some(seq) = earlier {
            return Ok(Err(Refusal::EventIdReused {
                event_id: event.event_id,
                seq,
            }));
        }
        let skew_ms = event.occurred_at_ms.saturating_sub(now).saturating_abs();
        if skew_ms > self.max_clock_skew_ms {
            return Ok(Err(Refusal::ClockSkew {
                occurred_at_ms: event.occurred_at_ms,
                skew_ms,
                max_skew_ms: self.max_clock_skew_ms,
            }));
        }
        if let Err(refusal) = trust::authorize(&event, &signer) {
            return Ok(Err(refusal));
        }
        match trust::evaluate(&event, &signer, batch.next_seq(), batch).map_err(view_store_error)? {
            Err(refusal) => Ok(Err(refusal)),
            Ok((verdict, delta)) => Ok(Ok(Checked::Accepted {
                event: Box::new(event),
                verdict,
                delta,
            })),
        }
    }

    /// Signs the batch's checkpoint, commits it durably and publishes the new head.
    fn commit(&self, batch: Batch<'_>) -> Result<Head, StoreError> {
        let tree_size = batch.next_seq();
        let root = merkle::root(tree_size, &batch.hashes)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let checkpoint = self.signer.sign(tree_size, &root);
        let commit = Commit {
            first_seq: batch.first_seq,
            entries: batch
                .entries
                .into_iter()
                .map(|pending| pending.bytes)
                .collect(),
            hashes: batch.hashes.pending,
            event_ids: batch.event_ids.into_iter().collect(),
            keys: batch.keys.into_iter().collect(),
            checkpoint: checkpoint.clone(),
        };
        self.store.commit(&commit)?;
        let head = Head {
            tree_size,
            root,
            checkpoint,
        };
        *self.head.write().unwrap_or_else(|e| e.into_inner()) = head.clone();
        self.size_tx.send_replace(tree_size);
        Ok(head)
    }
}

fn receipt(
    event_id: String,
    seq: u64,
    leaf: Hash,
    verdict: Verdict,
    duplicate: bool,
    head: &Head,
) -> Receipt {
    Receipt {
        event_id,
        seq,
        leaf_hash: leaf.0.to_vec(),
        verdict: Some(verdict),
        duplicate,
        checkpoint: head.checkpoint.clone(),
        error: None,
    }
}

/// Decodes stored entry bytes; a failure means the store is corrupt.
pub fn decode_entry(seq: u64, bytes: &[u8]) -> Result<Entry, StoreError> {
    Entry::decode(bytes)
        .map_err(|e| StoreError::Corrupt(format!("entry {seq} does not decode: {e}")))
}

fn read_genesis(store: &Store) -> Result<Genesis, LedgerError> {
    let bytes = store
        .entry(0)?
        .ok_or_else(|| LedgerError::Mismatch("the store has no genesis entry".into()))?;
    let entry = decode_entry(0, &bytes)?;
    let payload = entry.event.map(|e| e.payload).unwrap_or_default();
    match Event::decode(payload.as_slice()).map(|e| e.body) {
        Ok(Some(Body::Genesis(genesis))) => Ok(genesis),
        _ => Err(LedgerError::Mismatch("entry 0 is not a genesis".into())),
    }
}

fn view_error(error: ViewError) -> LedgerError {
    LedgerError::Store(view_store_error(error))
}

fn view_store_error(error: ViewError) -> StoreError {
    StoreError::Read(error.0)
}

enum Checked {
    Duplicate {
        event_id: String,
        seq: u64,
    },
    Accepted {
        event: Box<Event>,
        verdict: Verdict,
        delta: trust::StateDelta,
    },
}

enum Admitted {
    Refused(Refusal),
    Duplicate {
        event_id: String,
        seq: u64,
    },
    New {
        event_id: String,
        seq: u64,
        leaf: Hash,
        verdict: Verdict,
    },
}

struct PendingEntry {
    signed: SignedEvent,
    bytes: Vec<u8>,
}

/// The batch being assembled: committed state plus what the batch has added so far.
struct Batch<'a> {
    store: &'a Store,
    first_seq: u64,
    prev_leaf: [u8; 32],
    entries: Vec<PendingEntry>,
    hashes: PendingHashes<'a>,
    event_ids: HashMap<String, u64>,
    keys: HashMap<String, KeyRecord>,
}

impl<'a> Batch<'a> {
    fn new(ledger: &'a Ledger) -> Result<Self, StoreError> {
        let first_seq = ledger.head().tree_size;
        let prev_leaf = match first_seq.checked_sub(1) {
            None => [0; 32],
            Some(last) => {
                use merkle::HashReader as _;
                ledger
                    .store
                    .read_hashes(&[merkle::leaf_stored_index(last)])
                    .map_err(|e| StoreError::Corrupt(format!("leaf hash of entry {last}: {e}")))?[0]
                    .0
            }
        };
        Ok(Self {
            store: &ledger.store,
            first_seq,
            prev_leaf,
            entries: Vec::new(),
            hashes: PendingHashes {
                store: &ledger.store,
                start: merkle::stored_hash_count(first_seq),
                pending: Vec::new(),
            },
            event_ids: HashMap::new(),
            keys: HashMap::new(),
        })
    }

    fn next_seq(&self) -> u64 {
        self.first_seq + self.entries.len() as u64
    }

    fn event_seq(&self, event_id: &str) -> Result<Option<u64>, StoreError> {
        match self.event_ids.get(event_id) {
            Some(&seq) => Ok(Some(seq)),
            None => self.store.event_seq(event_id),
        }
    }

    /// The signed event of entry `seq` (committed or in this batch).
    fn signed_event(&self, seq: u64) -> Result<SignedEvent, StoreError> {
        if seq >= self.first_seq {
            let offset = usize::try_from(seq - self.first_seq).unwrap_or(usize::MAX);
            return self
                .entries
                .get(offset)
                .map(|pending| pending.signed.clone())
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("event id index points past the log at {seq}"))
                });
        }
        let bytes = self.store.entry(seq)?.ok_or_else(|| {
            StoreError::Corrupt(format!("event id index points to missing entry {seq}"))
        })?;
        Ok(decode_entry(seq, &bytes)?.event.unwrap_or_default())
    }

    /// Sequences an accepted event: builds its entry, its stored hashes and its state changes.
    fn push(
        &mut self,
        signed: SignedEvent,
        event: &Event,
        verdict: Verdict,
        delta: trust::StateDelta,
        received_at_ms: i64,
    ) -> Result<(u64, Hash), StoreError> {
        let seq = self.next_seq();
        let entry = Entry {
            seq,
            prev_hash: self.prev_leaf.to_vec(),
            received_at_ms,
            event: Some(signed.clone()),
            verdict: Some(verdict),
        };
        let bytes = entry.encode_to_vec();
        let leaf = merkle::leaf_hash(&bytes);
        let new_hashes = merkle::hashes_to_store(seq, leaf, &self.hashes)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.hashes.pending.extend(new_hashes);
        self.prev_leaf = leaf.0;
        self.event_ids.insert(event.event_id.clone(), seq);
        for change in delta {
            match change {
                StateChange::PutKey { key_id, record } => {
                    self.keys.insert(key_id, record);
                }
            }
        }
        self.entries.push(PendingEntry { signed, bytes });
        Ok((seq, leaf))
    }
}

impl TrustView for Batch<'_> {
    fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, ViewError> {
        if let Some(record) = self.keys.get(key_id) {
            return Ok(Some(record.clone()));
        }
        self.store.key(key_id).map_err(|e| ViewError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{KeyGrant, Role};

    fn signed(key: &SigningKey, event: &Event) -> SignedEvent {
        let payload = event.encode_to_vec();
        SignedEvent {
            signature: envelope::sign_payload(key, &payload).to_vec(),
            key_id: envelope::key_id(&key.verifying_key().to_bytes()),
            payload,
        }
    }

    #[test]
    fn a_batch_is_one_commit_with_one_checkpoint_and_refusals_do_not_disturb_it() {
        let dir = tempfile::tempdir().unwrap();
        let admin = SigningKey::from_bytes(&[1; 32]);
        let params = GenesisParams {
            origin: "test/ledger".into(),
            admin_public_key: admin.verifying_key().to_bytes(),
            max_clock_skew_ms: 60_000,
        };
        let ledger = Ledger::create(
            Store::open(dir.path()).unwrap(),
            SigningKey::from_bytes(&[2; 32]),
            &params,
        )
        .unwrap();
        let grant = |i: u8| Event {
            event_id: format!("grant-{i}"),
            occurred_at_ms: now_ms(),
            body: Some(Body::KeyGrant(KeyGrant {
                public_key: SigningKey::from_bytes(&[10 + i; 32])
                    .verifying_key()
                    .to_bytes()
                    .to_vec(),
                role: Role::Issuer as i32,
                principal: format!("issuer-{i}"),
                not_before_ms: 0,
                not_after_ms: 0,
            })),
        };
        let mut events: Vec<_> = (0..10).map(|i| signed(&admin, &grant(i))).collect();
        events[4].signature[0] ^= 1;
        let outcomes = ledger.append_batch(events).unwrap();
        let receipts: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        assert_eq!(receipts.len(), 9);
        assert!(matches!(outcomes[4], Err(Refusal::BadSignature(_))));
        let seqs: Vec<u64> = receipts.iter().map(|r| r.seq).collect();
        assert_eq!(
            seqs,
            (1..10).collect::<Vec<_>>(),
            "accepted events get consecutive seqs"
        );
        // One checkpoint for the whole batch, over all of it.
        assert!(receipts
            .iter()
            .all(|r| r.checkpoint == receipts[0].checkpoint));
        let verifier = LedgerVerifier::parse(&ledger.verifier_key()).unwrap();
        let checkpoint = checkpoint::open(&receipts[0].checkpoint, &verifier).unwrap();
        assert_eq!(checkpoint.tree_size(), 10);
        assert_eq!(ledger.head().tree_size, 10);
    }
}
