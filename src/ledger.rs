//! The append pipeline and the ledger's own keys.
//!
//! An append has four stages, which the server runs on four threads so that four batches
//! are in progress at once (see `service::commit_queue`):
//!
//! 1. [`Ledger::prepare`] decodes the events that arrived together and batch-verifies their
//!    signatures against the keys registered so far. It writes nothing; its result is a hint.
//! 2. [`Ledger::judge`], in order, checks each event's shape, recognises an exact retry, finds
//!    its key and verifies its signature (unless stage 1 already did under that very key),
//!    checks the clock, authorizes the signer and evaluates it against the state before it:
//!    the committed store, then the batches judged but not yet durable ([`InFlight`]), then
//!    the batch so far. The accepted events become entries, and one checkpoint is signed over
//!    the tree that includes them. A refused event writes nothing and does not disturb the
//!    others.
//! 3. [`Ledger::apply`], in order, writes the batch to the store as one atomic sled batch,
//!    not yet flushed.
//! 4. [`Ledger::finish`], in order, flushes the store (making that batch, and any applied
//!    after it, durable), then publishes the new head and returns the receipts. No receipt
//!    and no checkpoint is visible before the batch is durable; reads are bounded by the
//!    published head, so they never show an entry that is not yet durable. Batch N+1 may be
//!    applied while batch N is being flushed.
//!
//! [`Ledger::write`] runs the last two one after the other; [`Ledger::append_batch`] runs all
//! four.
//!
//! Concurrency: the judge, apply and finish stages must each be driven by one thread at a
//! time, with batches in the same order; a storage failure in any stage stops all later
//! appends until a restart. The read methods may be called from anywhere at any time.
//!
//! The ledger key (which signed the genesis and signs checkpoints) is rotated in steps, each
//! an entry the ledger writes itself ([`Ledger::begin_key_rotation`],
//! [`Ledger::finish_key_rotation`], [`Ledger::cancel_key_rotation`]; the rules are in
//! [`trust::LedgerKeys`]). They take `&mut self`, so no append runs meanwhile.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::{SigningKey, VerifyingKey};
use prost::Message as _;

use crate::checkpoint::{self, CheckpointError, CheckpointSigner, LedgerVerifier};
use crate::envelope;
use crate::merkle::{self, Hash};
use crate::proto::ledger_key_rotation::Step;
use crate::proto::{
    event::Body, Entry, Event, EventKind, Genesis, LedgerKeyRotation, Receipt, SignedEvent, Verdict,
};
use crate::store::keys as store_keys;
use crate::store::{Commit, Head, PendingHashes, Store, StoreError};
use crate::trust::{
    self, ConsentRecord, Evaluation, IndexField, KeyRecord, LedgerKeys, MemoryState, Refusal,
    TokenRecord, TrustView, ViewError,
};

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
    /// The newest checkpoint is not signed by the ledger keys its entries record.
    #[error("couldn't verify the stored checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    /// The store belongs to another ledger (other key or origin), its genesis is unusable, or
    /// a ledger key it needs was not given.
    #[error("{0}")]
    Mismatch(String),
    /// A key rotation step does not fit the ledger's keys (e.g. a finish with no rotation
    /// under way); nothing was written.
    #[error("key rotation refused: {0}")]
    Rotation(Refusal),
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
    /// The ledger keys as the entries record them; `signer` holds their private halves.
    ledger_keys: LedgerKeys,
    /// The private halves of the current key and, during a rotation, the next key.
    current_key: SigningKey,
    next_key: Option<SigningKey>,
    max_clock_skew_ms: i64,
    head: RwLock<Head>,
    size_tx: tokio::sync::watch::Sender<u64>,
    /// Turns true after a storage failure: the in-memory head may no longer match the store,
    /// so the ledger refuses further appends until it is restarted (and re-checks itself on
    /// open). Never turns back.
    failed: tokio::sync::watch::Sender<bool>,
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
        let genesis = Genesis {
            origin: params.origin.clone(),
            admin_public_key: params.admin_public_key.to_vec(),
            ledger_public_key: ledger_key.verifying_key().to_bytes().to_vec(),
            max_clock_skew_ms: params.max_clock_skew_ms,
        };
        let ledger_keys = LedgerKeys::from_genesis(&genesis)
            .map_err(|e| LedgerError::Mismatch(format!("invalid genesis: {e}")))?;
        let event = Event {
            event_id: "genesis".into(),
            occurred_at_ms: now_ms(),
            body: Some(Body::Genesis(genesis)),
        };
        trust::validate_event(&event, event.encoded_len())
            .map_err(|e| LedgerError::Mismatch(format!("invalid genesis: {e}")))?;
        let signed = envelope::sign_event(&ledger_key, &event);
        let empty = Head {
            tree_size: 0,
            root: merkle::EMPTY_ROOT,
            checkpoint: String::new(),
        };
        let (size_tx, _) = tokio::sync::watch::channel(0);
        let ledger = Self {
            store,
            signer,
            ledger_keys,
            current_key: ledger_key.clone(),
            next_key: None,
            max_clock_skew_ms: params.max_clock_skew_ms,
            head: RwLock::new(empty),
            size_tx,
            failed: tokio::sync::watch::Sender::new(false),
        };
        let none_in_flight = VecDeque::new();
        let mut batch = Batch::new(&ledger.store, 0, &none_in_flight)?;
        let ledger_record = KeyRecord {
            public_key: ledger_key.verifying_key().to_bytes().to_vec(),
            ..KeyRecord::default()
        };
        let evaluation = trust::evaluate(&event, &ledger_record, 0, &batch)
            .map_err(view_error)?
            .map_err(|e| LedgerError::Mismatch(format!("genesis refused: {e}")))?;
        batch.push(signed, &event, evaluation, now_ms())?;
        let (commit, head, _) = batch.seal(&ledger.signer)?;
        ledger.store.commit(&commit)?;
        ledger.publish(head);
        Ok(ledger)
    }

    /// Opens an existing ledger with the private ledger keys in `keyring`: finds the ledger
    /// keys the entries record (the genesis key and its rotations), picks their private
    /// halves from `keyring` (the current key, and the next key if a rotation is under way;
    /// any other key given is ignored), checks that the newest checkpoint carries the
    /// signatures of those keys and matches the stored hashes, and that the log's tail
    /// agrees with the checkpoint.
    ///
    /// If only the entries are left (the derived data was deleted or lost), everything else is
    /// rebuilt from them first: each entry is judged again and must get its recorded verdict.
    pub fn open(store: Store, keyring: &[SigningKey]) -> Result<Self, LedgerError> {
        Self::open_with(store, keyring, true)
    }

    /// Withdraws the rotation under way on a stopped ledger whose next private key is lost:
    /// opens it with the current key alone (checking the newest checkpoint's signature by
    /// the current key; rebuilding the derived data first if it is missing, with checkpoints
    /// the current key alone signs) and appends the CANCEL, signed by the current key.
    /// Returns the entry's receipt once it is durable. Nothing else can be done with a
    /// ledger opened without its next key, so none is returned.
    pub fn cancel_key_rotation_without_next_key(
        store: Store,
        keyring: &[SigningKey],
    ) -> Result<Receipt, LedgerError> {
        Self::open_with(store, keyring, false)?.cancel_key_rotation()
    }

    /// [`open`](Self::open); with `need_next` false, a missing next key is no error (the
    /// ledger may then only cancel the rotation).
    fn open_with(
        store: Store,
        keyring: &[SigningKey],
        need_next: bool,
    ) -> Result<Self, LedgerError> {
        let genesis = read_genesis(&store)?;
        if store.head()?.is_none() || store.rebuild_pending()? {
            // Find the keys first (the kind index is gone): the rebuild signs checkpoints.
            let (current_key, next_key) =
                private_keys(&scanned_ledger_keys(&store)?, keyring, need_next)?;
            let signer = checkpoint_signer(&genesis.origin, &current_key, next_key.as_ref())?;
            // A rebuild interrupted by a crash starts over: the marker is removed only with
            // the last chunk.
            store.drop_derived()?;
            rebuild(&store, &signer)?;
        }
        let head = store
            .head()?
            .ok_or_else(|| LedgerError::Mismatch("the store holds no ledger".into()))?;
        let ledger_keys = indexed_ledger_keys(&store, head.tree_size)?;
        let (current_key, next_key) = private_keys(&ledger_keys, keyring, need_next)?;
        let signer = checkpoint_signer(&genesis.origin, &current_key, next_key.as_ref())?;
        // Without the next key (only to cancel its rotation), the head is checked against the
        // current key alone: a rebuild just now could sign it with no other.
        let required = if need_next {
            ledger_keys.active()
        } else {
            vec![*ledger_keys.current()]
        };
        let verifiers = required
            .iter()
            .map(|key| LedgerVerifier::from_public_key(&genesis.origin, key))
            .collect::<Result<Vec<_>, _>>()?;
        let verified = checkpoint::parse(&head.checkpoint)?.verify(&verifiers)?;
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
            ledger_keys,
            current_key,
            next_key,
            max_clock_skew_ms: genesis.max_clock_skew_ms,
            head: RwLock::new(head),
            size_tx,
            failed: tokio::sync::watch::Sender::new(false),
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

    /// Follows whether appends have stopped after a storage failure (or a panic in an append
    /// stage): `false` until then, `true` from then until the process ends.
    pub fn stopped(&self) -> tokio::sync::watch::Receiver<bool> {
        self.failed.subscribe()
    }

    /// The store, for reads.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The C2SP verifier key string of the (current) ledger key.
    pub fn verifier_key(&self) -> String {
        self.signer.verifier_key()
    }

    /// The C2SP verifier key strings of the keys that sign checkpoints now: the current
    /// ledger key, then the next key while a rotation is under way.
    pub fn verifier_keys(&self) -> Vec<String> {
        self.signer.verifier_keys()
    }

    /// The ledger keys as the entries record them.
    pub fn ledger_keys(&self) -> &LedgerKeys {
        &self.ledger_keys
    }

    /// Whether `key`'s 4-byte note key hash equals the current ledger key's (one chance in
    /// 2^32): checkpoint notes could not tell the two keys' signatures apart, so such a key
    /// cannot be the next key.
    pub fn note_key_id_collides(&self, key: &VerifyingKey) -> bool {
        checkpoint::note_key_id(self.origin(), key)
            == checkpoint::note_key_id(self.origin(), &self.current_key.verifying_key())
    }

    /// Begins rotating the ledger key to `next`: appends a BEGIN entry signed by the current
    /// key, durably, and returns its receipt. Its checkpoint and every later one carry the
    /// signatures of both keys until the rotation is finished or cancelled. Refused (nothing
    /// written) while another rotation is under way, or if `next` was a ledger key before.
    pub fn begin_key_rotation(&mut self, next: SigningKey) -> Result<Receipt, LedgerError> {
        let next_public = next.verifying_key().to_bytes();
        if self.note_key_id_collides(&next.verifying_key()) {
            return Err(LedgerError::Rotation(Refusal::Conflict(
                "the next key's note key hash equals the current key's; use another key".into(),
            )));
        }
        let after =
            CheckpointSigner::new(self.origin(), self.current_key.clone())?.with_next(next.clone());
        let signer = self.current_key.clone();
        let receipt = self.write_rotation(Step::Begin, &signer, next_public, after)?;
        self.next_key = Some(next);
        Ok(receipt)
    }

    /// Finishes the rotation under way: appends a FINISH entry signed by the next key, which
    /// becomes the ledger key and from this entry on signs checkpoints alone; the old key
    /// signs nothing more. Returns the entry's receipt once it is durable.
    pub fn finish_key_rotation(&mut self) -> Result<Receipt, LedgerError> {
        let next = self.rotation_under_way()?;
        let after = CheckpointSigner::new(self.origin(), next.clone())?;
        let receipt =
            self.write_rotation(Step::Finish, &next, next.verifying_key().to_bytes(), after)?;
        self.current_key = next;
        self.next_key = None;
        Ok(receipt)
    }

    /// Cancels the rotation under way: appends a CANCEL entry signed by the current key,
    /// which from this entry on signs checkpoints alone; the withdrawn next key may never
    /// become a ledger key. Returns the entry's receipt once it is durable.
    pub fn cancel_key_rotation(&mut self) -> Result<Receipt, LedgerError> {
        // Only the next key's public half is needed: it may be lost.
        let Some(&next) = self.ledger_keys.next() else {
            return Err(no_rotation_under_way());
        };
        let after = CheckpointSigner::new(self.origin(), self.current_key.clone())?;
        let signer = self.current_key.clone();
        let receipt = self.write_rotation(Step::Cancel, &signer, next, after)?;
        self.next_key = None;
        Ok(receipt)
    }

    fn rotation_under_way(&self) -> Result<SigningKey, LedgerError> {
        self.next_key.clone().ok_or_else(no_rotation_under_way)
    }

    /// Appends one rotation step signed by `signing_key` as a batch of its own whose
    /// checkpoint `after` signs, and makes `after` the checkpoint signer.
    fn write_rotation(
        &mut self,
        step: Step,
        signing_key: &SigningKey,
        next_public: [u8; 32],
        after: CheckpointSigner,
    ) -> Result<Receipt, LedgerError> {
        let written =
            self.unless_failed(|| self.commit_rotation(step, signing_key, next_public, &after))?;
        let (receipt, head, keys_after) = written.map_err(LedgerError::Rotation)?;
        self.publish(head);
        self.signer = after;
        self.ledger_keys = keys_after;
        Ok(receipt)
    }

    /// Builds, judges and durably commits one rotation step; publishes nothing.
    fn commit_rotation(
        &self,
        step: Step,
        signing_key: &SigningKey,
        next_public: [u8; 32],
        after: &CheckpointSigner,
    ) -> Result<Result<(Receipt, Head, LedgerKeys), Refusal>, StoreError> {
        let none_in_flight = VecDeque::new();
        let mut batch = Batch::new(&self.store, self.head().tree_size, &none_in_flight)?;
        // A fresh random id: a client that took some id first cannot block the step.
        let event_id = loop {
            let mut nonce = [0u8; 8];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
            let id = format!(
                "ledger-key-{}-{}",
                step.as_str_name()
                    .trim_start_matches("STEP_")
                    .to_ascii_lowercase(),
                hex::encode(nonce)
            );
            if batch.event_seq(&id)?.is_none() {
                break id;
            }
        };
        let event = Event {
            event_id,
            occurred_at_ms: now_ms(),
            body: Some(Body::LedgerKeyRotation(LedgerKeyRotation {
                step: step as i32,
                ledger_public_key: self.ledger_keys.current().to_vec(),
                next_ledger_public_key: next_public.to_vec(),
            })),
        };
        let signed = envelope::sign_event(signing_key, &event);
        let mut keys_after = self.ledger_keys.clone();
        let evaluation = match keys_after.judge(&signed, &event, batch.next_seq()) {
            Ok(evaluation) => evaluation,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let verdict = evaluation.verdict.clone();
        let (seq, leaf) = batch.push(signed, &event, evaluation, now_ms())?;
        let (commit, head, _) = batch.seal(after)?;
        self.store.commit(&commit)?;
        let receipt = receipt(event.event_id, seq, leaf, verdict, false, &head);
        Ok(Ok((receipt, head, keys_after)))
    }

    /// The log's origin.
    pub fn origin(&self) -> &str {
        self.signer.origin()
    }

    /// Appends the events that arrived together. Returns one outcome per event, in order:
    /// a receipt (fresh or, for an exact retry, the original with `duplicate = true`) or the
    /// refusal. Receipts are returned only after the batch is durable. A storage failure fails
    /// the whole batch and nothing in it is acknowledged.
    ///
    /// The same as [`prepare`](Self::prepare) followed by
    /// [`append_prepared`](Self::append_prepared).
    pub fn append_batch(
        &self,
        events: Vec<SignedEvent>,
    ) -> Result<Vec<Result<Receipt, Refusal>>, StoreError> {
        self.append_prepared(self.prepare(events, trust::all_cores()))
    }

    /// The first stage of an append, which may run while an earlier batch is being committed:
    /// decodes the events and batch-verifies their signatures on up to `threads` threads
    /// against the keys registered so far. Writes nothing; the result only saves
    /// [`append_prepared`](Self::append_prepared) work (any event it could not check, e.g.
    /// one signed by a key granted in a batch not yet committed, is checked there).
    pub fn prepare(&self, events: Vec<SignedEvent>, threads: usize) -> PreparedBatch {
        let mut known: HashMap<String, Option<[u8; 32]>> = HashMap::new();
        let decoded: Vec<Result<Event, prost::DecodeError>> = events
            .iter()
            .map(|signed| Event::decode(signed.payload.as_slice()))
            .collect();
        let preverified = trust::preverify(
            events
                .iter()
                .zip(&decoded)
                .map(|(signed, event)| (signed, event.as_ref().ok())),
            // A batch names few distinct keys: read each from the store once.
            |key_id| {
                *known.entry(key_id.to_owned()).or_insert_with(|| {
                    let record = self.store.key(key_id).ok().flatten()?;
                    <[u8; 32]>::try_from(record.public_key.as_slice()).ok()
                })
            },
            threads,
        );
        PreparedBatch {
            events,
            decoded,
            preverified,
        }
    }

    /// The second and third stages of an append, one after the other: judges each prepared
    /// event in order against the state before it, commits the accepted ones as one durable
    /// batch with one checkpoint and returns the outcomes (as
    /// [`append_batch`](Self::append_batch)). Must not run concurrently with another append.
    pub fn append_prepared(
        &self,
        prepared: PreparedBatch,
    ) -> Result<Vec<Result<Receipt, Refusal>>, StoreError> {
        self.append_prepared_observed(prepared, |_| ())
    }

    /// As [`append_prepared`](Self::append_prepared), also showing `observe` the batch's
    /// durable form just before it is written (the load generator replays these to measure
    /// the store alone).
    pub fn append_prepared_observed(
        &self,
        prepared: PreparedBatch,
        observe: impl FnOnce(&Commit),
    ) -> Result<Vec<Result<Receipt, Refusal>>, StoreError> {
        let mut in_flight = InFlight::default();
        let judged = self.judge(prepared, &mut in_flight)?;
        self.write(judged, observe)
    }

    /// The second stage of an append, which may run while the previous batch is being
    /// written: judges each prepared event in order against the state before it (the store,
    /// then the batches in `in_flight`, then the batch so far), builds the accepted ones into
    /// entries and signs the checkpoint that will cover them. Writes nothing; the batch joins
    /// `in_flight` so the next batch sees it.
    ///
    /// Batches must be judged by one thread, with one `InFlight`, in the order they are then
    /// given to [`apply`](Self::apply). A storage failure here stops the ledger's appends as
    /// one in `apply` or `finish` does.
    pub fn judge(
        &self,
        prepared: PreparedBatch,
        in_flight: &mut InFlight,
    ) -> Result<JudgedBatch, StoreError> {
        self.unless_failed(|| self.judge_unchecked(prepared, in_flight))
    }

    /// The third and fourth stages of an append, one after the other
    /// ([`apply`](Self::apply), then [`finish`](Self::finish)): commits a judged batch durably
    /// (one atomic write, one flush), publishes the new head, and only then returns the
    /// receipts and refusals, in the order of the events. A storage failure fails the whole
    /// batch, acknowledges nothing and stops further appends (later batches already judged
    /// fail with [`StoreError::Stopped`]) until the ledger is restarted.
    pub fn write(
        &self,
        judged: JudgedBatch,
        observe: impl FnOnce(&Commit),
    ) -> Result<Vec<Result<Receipt, Refusal>>, StoreError> {
        let applied = self.apply(judged, observe)?;
        self.finish(applied)
    }

    /// The third stage of an append, which may run while the previous batch is being flushed:
    /// writes a judged batch to the store as one atomic batch, not yet durable, after showing
    /// `observe` its durable form (the load generator replays these to measure the store
    /// alone). Publishes nothing. Batches must be applied by one thread, in the order they
    /// were judged, and then given to [`finish`](Self::finish) in the same order.
    pub fn apply(
        &self,
        judged: JudgedBatch,
        observe: impl FnOnce(&Commit),
    ) -> Result<AppliedBatch, StoreError> {
        self.unless_failed(|| {
            let head = match judged.commit {
                Some((commit, head)) => {
                    observe(&commit);
                    self.store.apply(&commit)?;
                    Some(head)
                }
                None => None,
            };
            Ok(AppliedBatch {
                head,
                outcomes: judged.outcomes,
            })
        })
    }

    /// The fourth stage of an append: flushes the store, so that the batch (and any applied
    /// after it) is durable, publishes the batch's head and only then returns the receipts and
    /// refusals, in the order of the events. A storage failure acknowledges nothing and stops
    /// further appends.
    pub fn finish(
        &self,
        applied: AppliedBatch,
    ) -> Result<Vec<Result<Receipt, Refusal>>, StoreError> {
        self.unless_failed(|| self.finish_unchecked(applied))
    }

    /// Runs `stage` unless an earlier storage failure stopped appends; a failure of `stage`
    /// stops them.
    fn unless_failed<T>(
        &self,
        stage: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if *self.failed.borrow() {
            return Err(StoreError::Stopped);
        }
        // A stage that panics stops appends too: the judge's memory of batches in flight, or
        // the head, may no longer match the store.
        let _guard = StopOnPanic(&self.failed);
        let outcome = stage();
        if outcome.is_err() {
            self.failed.send_replace(true);
        }
        outcome
    }

    fn judge_unchecked(
        &self,
        prepared: PreparedBatch,
        in_flight: &mut InFlight,
    ) -> Result<JudgedBatch, StoreError> {
        let now = now_ms();
        let durable_size = self.head().tree_size;
        in_flight.prune(durable_size);
        let mut batch = Batch::new(&self.store, durable_size, &in_flight.batches)?;
        let PreparedBatch {
            events,
            decoded,
            preverified,
        } = prepared;
        let mut outcomes = Vec::with_capacity(events.len());
        for ((signed, event), preverified) in events.into_iter().zip(decoded).zip(preverified) {
            outcomes.push(self.admit(signed, event, preverified, now, &mut batch)?);
        }
        if batch.entries.is_empty() {
            return Ok(JudgedBatch {
                commit: None,
                outcomes,
            });
        }
        let (commit, head, uncommitted) = batch.seal(&self.signer)?;
        in_flight.batches.push_back(uncommitted);
        Ok(JudgedBatch {
            commit: Some((commit, head)),
            outcomes,
        })
    }

    fn finish_unchecked(
        &self,
        applied: AppliedBatch,
    ) -> Result<Vec<Result<Receipt, Refusal>>, StoreError> {
        // Flushed even when the batch wrote nothing: its duplicates may name entries of an
        // earlier batch, whose receipts must not be outrun.
        self.store.flush()?;
        let head = match applied.head {
            Some(head) => {
                self.publish(head.clone());
                head
            }
            None => self.head(),
        };
        // Every earlier batch was finished before this one, so every seq named here is
        // durable.
        applied
            .outcomes
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
        event: Result<Event, prost::DecodeError>,
        preverified: Option<[u8; 32]>,
        now: i64,
        batch: &mut Batch<'_>,
    ) -> Result<Admitted, StoreError> {
        match self.check(&signed, event, preverified, now, batch)? {
            Err(refusal) => Ok(Admitted::Refused(refusal)),
            Ok(Checked::Duplicate { event_id, seq }) => Ok(Admitted::Duplicate { event_id, seq }),
            Ok(Checked::Accepted { event, evaluation }) => {
                let verdict = evaluation.verdict.clone();
                let (seq, leaf) = batch.push(signed, &event, evaluation, now)?;
                Ok(Admitted::New {
                    event_id: event.event_id,
                    seq,
                    leaf,
                    verdict,
                })
            }
        }
    }

    /// Every check an event passes before it is sequenced, in the order documented on
    /// [`trust`]: shape, exact retry, authentication, event-id reuse, clock skew, role and
    /// principal, then the rules. Storage failures are the outer error; refusals the inner.
    fn check(
        &self,
        signed: &SignedEvent,
        event: Result<Event, prost::DecodeError>,
        preverified: Option<[u8; 32]>,
        now: i64,
        batch: &Batch<'_>,
    ) -> Result<Result<Checked, Refusal>, StoreError> {
        let event = match event {
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
        let signer = match trust::authenticate(signed, &event, batch, preverified.as_ref())
            .map_err(view_store_error)?
        {
            Ok(signer) => signer,
            Err(refusal) => return Ok(Err(refusal)),
        };
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
            Ok(evaluation) => Ok(Ok(Checked::Accepted {
                event: Box::new(event),
                evaluation,
            })),
        }
    }

    /// Makes a durable head the one readers see.
    fn publish(&self, head: Head) {
        let tree_size = head.tree_size;
        *self.head.write().unwrap_or_else(|e| e.into_inner()) = head;
        self.size_tx.send_replace(tree_size);
    }
}

/// Events decoded and signature-checked by [`Ledger::prepare`], waiting to be judged by
/// [`Ledger::judge`].
pub struct PreparedBatch {
    events: Vec<SignedEvent>,
    decoded: Vec<Result<Event, prost::DecodeError>>,
    preverified: Vec<Option<[u8; 32]>>,
}

impl PreparedBatch {
    /// Number of events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether it holds no event.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// Sets the flag if dropped while its thread panics.
struct StopOnPanic<'a>(&'a tokio::sync::watch::Sender<bool>);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.send_replace(true);
        }
    }
}

/// A batch written by [`Ledger::apply`], waiting for [`Ledger::finish`] to flush it and
/// answer its events.
pub struct AppliedBatch {
    /// The head the batch makes, if it accepted any event.
    head: Option<Head>,
    outcomes: Vec<Admitted>,
}

/// A batch judged by [`Ledger::judge`], waiting for [`Ledger::apply`].
pub struct JudgedBatch {
    /// The durable form of the accepted entries and the head it makes, if any was accepted.
    commit: Option<(Commit, Head)>,
    outcomes: Vec<Admitted>,
}

/// Entries replayed per commit while rebuilding.
const REBUILD_CHUNK: usize = 4096;

/// Rebuilds everything derived (hashes, indexes, state, checkpoint) from the stored entries,
/// judging each entry again; any difference from the recorded verdict, a broken hash chain or
/// an entry that would now be refused means the entries were altered, and the rebuild stops.
fn rebuild(store: &Store, signer: &CheckpointSigner) -> Result<(), LedgerError> {
    let total = store.entry_count()?;
    tracing::warn!(
        entries = total,
        "derived data missing: rebuilding from the entries"
    );
    let mut ledger_keys = None;
    let mut next = 0u64;
    while next < total {
        let end = total.min(next + REBUILD_CHUNK as u64);
        let none_in_flight = VecDeque::new();
        let mut batch = Batch::new(store, next, &none_in_flight)?;
        for item in store.entries(next, end) {
            let (seq, bytes) = item?;
            let corrupt = |what: String| {
                LedgerError::Store(StoreError::Corrupt(format!("entry {seq}: {what}")))
            };
            let entry = decode_entry(seq, &bytes)?;
            if entry.seq != seq || entry.prev_hash != batch.prev_leaf {
                return Err(corrupt(
                    "sequence number or prev_hash does not follow the log".into(),
                ));
            }
            let signed = entry.event.clone().unwrap_or_default();
            let event = Event::decode(signed.payload.as_slice())
                .map_err(|e| corrupt(format!("payload does not decode: {e}")))?;
            let judged =
                trust::rejudge_stored(&signed, &event, seq, &batch, &mut ledger_keys, None)
                    .map_err(view_error)?;
            let evaluation =
                judged.map_err(|refusal| corrupt(format!("would be refused: {refusal}")))?;
            if let Some(earlier) = batch.event_seq(&event.event_id)? {
                return Err(corrupt(format!("repeats the event_id of entry {earlier}")));
            }
            if Some(&evaluation.verdict) != entry.verdict.as_ref() {
                return Err(corrupt(
                    "the recorded verdict differs from the rules' verdict".into(),
                ));
            }
            batch.push_bytes(signed, bytes, &event, evaluation)?;
        }
        let (commit, _, _) = batch.seal(signer)?;
        store.commit(&commit)?;
        next = end;
    }
    store.finish_rebuild()?;
    tracing::info!(entries = total, "rebuild complete");
    Ok(())
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

/// The ledger keys as the entries up to `tree_size` record them, read through the kind index:
/// the genesis and each rotation step, judged again in order.
fn indexed_ledger_keys(store: &Store, tree_size: u64) -> Result<LedgerKeys, LedgerError> {
    let prefix = store_keys::index_prefix(
        store_keys::FIELD_KIND,
        &(EventKind::LedgerKeyRotation as i32).to_string(),
    );
    let rotations = store.index_seqs(&prefix, None, Some(tree_size), false);
    ledger_keys_of(std::iter::once(Ok(0)).chain(rotations).map(|seq| {
        let seq = seq?;
        let bytes = store
            .entry(seq)?
            .ok_or_else(|| StoreError::Corrupt(format!("entry {seq} is missing")))?;
        Ok((seq, bytes))
    }))
}

/// The ledger keys as every stored entry records them, found by decoding each (for a
/// rebuild, when the kind index is gone).
fn scanned_ledger_keys(store: &Store) -> Result<LedgerKeys, LedgerError> {
    let total = store.entry_count()?;
    ledger_keys_of(store.entries(0, total))
}

/// Judges the genesis and the rotation steps among `entries` (in order, starting with entry
/// 0; other entries are skipped).
fn ledger_keys_of(
    entries: impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>>,
) -> Result<LedgerKeys, LedgerError> {
    let mut keys = None;
    for item in entries {
        let (seq, bytes) = item?;
        let entry = decode_entry(seq, &bytes)?;
        let signed = entry.event.unwrap_or_default();
        let corrupt =
            |what: String| LedgerError::Store(StoreError::Corrupt(format!("entry {seq}: {what}")));
        let event = Event::decode(signed.payload.as_slice())
            .map_err(|e| corrupt(format!("payload does not decode: {e}")))?;
        if seq != 0 && !matches!(event.body, Some(Body::LedgerKeyRotation(_))) {
            continue;
        }
        trust::rejudge_stored(&signed, &event, seq, &MemoryState::new(), &mut keys, None)
            .map_err(view_error)?
            .map_err(|refusal| corrupt(format!("would be refused: {refusal}")))?;
    }
    keys.ok_or_else(|| LedgerError::Mismatch("the store has no genesis entry".into()))
}

fn no_rotation_under_way() -> LedgerError {
    LedgerError::Rotation(Refusal::Conflict(
        "no ledger key rotation is under way".into(),
    ))
}

/// Picks from `keyring` the private halves of the current ledger key and of the next key,
/// if a rotation is under way (a missing next key is an error only if `need_next`).
fn private_keys(
    keys: &LedgerKeys,
    keyring: &[SigningKey],
    need_next: bool,
) -> Result<(SigningKey, Option<SigningKey>), LedgerError> {
    let find = |public: &[u8; 32]| {
        keyring
            .iter()
            .find(|key| key.verifying_key().as_bytes() == public)
            .cloned()
    };
    let current = find(keys.current()).ok_or_else(|| {
        LedgerError::Mismatch(format!(
            "none of the keys given is the ledger key {}",
            envelope::key_id(keys.current())
        ))
    })?;
    let next = match keys.next().map(|public| (public, find(public))) {
        Some((_, Some(key))) => Some(key),
        Some((public, None)) if need_next => {
            return Err(LedgerError::Mismatch(format!(
                "a ledger key rotation to key {} is under way, but that key's private half was \
                 not given (ledger.next.key is missing or unreadable): restore it, or withdraw \
                 the rotation with `custody rotate-key cancel`",
                envelope::key_id(public)
            )))
        }
        Some((_, None)) | None => None,
    };
    Ok((current, next))
}

/// The checkpoint signer for the current key and, during a rotation, the next key.
fn checkpoint_signer(
    origin: &str,
    current: &SigningKey,
    next: Option<&SigningKey>,
) -> Result<CheckpointSigner, LedgerError> {
    let signer = CheckpointSigner::new(origin, current.clone())?;
    Ok(match next {
        Some(next) => signer.with_next(next.clone()),
        None => signer,
    })
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
        evaluation: Evaluation,
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

/// The index tag of a field (layout in `store::keys`).
fn field_tag(field: IndexField) -> u8 {
    match field {
        IndexField::User => store_keys::FIELD_USER,
        IndexField::Agent => store_keys::FIELD_AGENT,
        IndexField::Token => store_keys::FIELD_TOKEN,
        IndexField::Consent => store_keys::FIELD_CONSENT,
        IndexField::ResourceServer => store_keys::FIELD_RESOURCE_SERVER,
    }
}

/// The index terms (see `store::keys`) an entry is filed under: the evaluation's terms, the
/// event's kind and the verdict's status.
pub(crate) fn index_terms(event: &Event, evaluation: &Evaluation) -> Vec<Vec<u8>> {
    let kind = trust::event_kind(event.body.as_ref()) as i32;
    let mut terms = vec![
        store_keys::index_prefix(store_keys::FIELD_KIND, &kind.to_string()),
        store_keys::index_prefix(
            store_keys::FIELD_STATUS,
            &evaluation.verdict.status.to_string(),
        ),
    ];
    for (field, value) in &evaluation.index {
        terms.push(store_keys::index_prefix(field_tag(*field), value));
    }
    terms.sort();
    terms.dedup();
    terms
}

/// A judged batch whose commit may not be durable yet: what later batches must see of it
/// before the store has it.
struct Uncommitted {
    first_seq: u64,
    last_leaf: [u8; 32],
    event_ids: HashMap<String, u64>,
    state: MemoryState,
    signed: Vec<SignedEvent>,
    hashes: Vec<Hash>,
}

impl Uncommitted {
    fn end(&self) -> u64 {
        self.first_seq + self.signed.len() as u64
    }
}

/// The judge stage's memory of batches it has judged that the store may not have yet (at
/// most the few batches between the judge and the finish stage). Owned by the one thread that
/// judges.
#[derive(Default)]
pub struct InFlight {
    batches: VecDeque<Uncommitted>,
}

impl InFlight {
    /// Forgets the batches the store has made durable (ending at or below `durable_size`).
    fn prune(&mut self, durable_size: u64) {
        while self
            .batches
            .front()
            .is_some_and(|batch| batch.end() <= durable_size)
        {
            self.batches.pop_front();
        }
    }
}

/// The batch being assembled: committed state, then the batches in flight, then what this
/// batch has added so far.
struct Batch<'a> {
    store: &'a Store,
    in_flight: &'a VecDeque<Uncommitted>,
    first_seq: u64,
    prev_leaf: [u8; 32],
    entries: Vec<PendingEntry>,
    hashes: PendingHashes<'a>,
    /// Where this batch's own hashes start in `hashes.pending` (after the in-flight ones).
    own_hashes: usize,
    event_ids: HashMap<String, u64>,
    /// The state changes of the batch so far, read before the store.
    state: MemoryState,
    index: Vec<(Vec<u8>, u64)>,
    /// Key records read from the store during this batch (a batch names few keys; those it
    /// changes are read from `state` first).
    stored_keys: std::cell::RefCell<HashMap<String, Option<KeyRecord>>>,
}

impl<'a> Batch<'a> {
    /// A batch following the committed log (`durable_size` entries) and the batches in flight
    /// after it.
    fn new(
        store: &'a Store,
        durable_size: u64,
        in_flight: &'a VecDeque<Uncommitted>,
    ) -> Result<Self, StoreError> {
        let base = in_flight.front().map_or(durable_size, |b| b.first_seq);
        let first_seq = in_flight.back().map_or(durable_size, Uncommitted::end);
        let prev_leaf = match in_flight.back() {
            Some(batch) => batch.last_leaf,
            None => match first_seq.checked_sub(1) {
                None => [0; 32],
                Some(last) => {
                    use merkle::HashReader as _;
                    store
                        .read_hashes(&[merkle::leaf_stored_index(last)])
                        .map_err(|e| {
                            StoreError::Corrupt(format!("leaf hash of entry {last}: {e}"))
                        })?
                        .first()
                        .map(|hash| hash.0)
                        .ok_or_else(|| {
                            StoreError::Corrupt(format!("leaf hash of entry {last} is missing"))
                        })?
                }
            },
        };
        let pending: Vec<Hash> = in_flight
            .iter()
            .flat_map(|b| b.hashes.iter().copied())
            .collect();
        Ok(Self {
            store,
            in_flight,
            first_seq,
            prev_leaf,
            entries: Vec::new(),
            own_hashes: pending.len(),
            hashes: PendingHashes {
                store,
                start: merkle::stored_hash_count(base),
                pending,
            },
            event_ids: HashMap::new(),
            state: MemoryState::new(),
            index: Vec::new(),
            stored_keys: Default::default(),
        })
    }

    fn next_seq(&self) -> u64 {
        self.first_seq + self.entries.len() as u64
    }

    fn event_seq(&self, event_id: &str) -> Result<Option<u64>, StoreError> {
        let found = std::iter::once(&self.event_ids)
            .chain(self.in_flight.iter().map(|b| &b.event_ids))
            .find_map(|ids| ids.get(event_id).copied());
        match found {
            Some(seq) => Ok(Some(seq)),
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
        if let Some(batch) = self
            .in_flight
            .iter()
            .find(|b| (b.first_seq..b.end()).contains(&seq))
        {
            let offset = usize::try_from(seq - batch.first_seq).unwrap_or(usize::MAX);
            if let Some(signed) = batch.signed.get(offset) {
                return Ok(signed.clone());
            }
        }
        let bytes = self.store.entry(seq)?.ok_or_else(|| {
            StoreError::Corrupt(format!("event id index points to missing entry {seq}"))
        })?;
        Ok(decode_entry(seq, &bytes)?.event.unwrap_or_default())
    }

    /// Sequences an accepted event: builds and encodes its entry, then files it.
    fn push(
        &mut self,
        signed: SignedEvent,
        event: &Event,
        evaluation: Evaluation,
        received_at_ms: i64,
    ) -> Result<(u64, Hash), StoreError> {
        let entry = Entry {
            seq: self.next_seq(),
            prev_hash: self.prev_leaf.to_vec(),
            received_at_ms,
            event: Some(signed.clone()),
            verdict: Some(evaluation.verdict.clone()),
        };
        self.push_bytes(signed, entry.encode_to_vec(), event, evaluation)
    }

    /// Files an entry's stored bytes: stored hashes, event id, index keys, state changes.
    fn push_bytes(
        &mut self,
        signed: SignedEvent,
        bytes: Vec<u8>,
        event: &Event,
        evaluation: Evaluation,
    ) -> Result<(u64, Hash), StoreError> {
        let seq = self.next_seq();
        let leaf = merkle::leaf_hash(&bytes);
        let new_hashes = merkle::hashes_to_store(seq, leaf, &self.hashes)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.hashes.pending.extend(new_hashes);
        self.prev_leaf = leaf.0;
        self.event_ids.insert(event.event_id.clone(), seq);
        self.index.extend(
            index_terms(event, &evaluation)
                .into_iter()
                .map(|term| (term, seq)),
        );
        self.state.apply(evaluation.delta);
        self.entries.push(PendingEntry { signed, bytes });
        Ok((seq, leaf))
    }

    /// Signs the checkpoint over the tree including the batch and builds its durable form.
    fn seal(self, signer: &CheckpointSigner) -> Result<(Commit, Head, Uncommitted), StoreError> {
        let tree_size = self.next_seq();
        let root = merkle::root(tree_size, &self.hashes)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let checkpoint = signer.sign(tree_size, &root);
        let (commit, uncommitted) = self.into_commit(checkpoint.clone());
        let head = Head {
            tree_size,
            root,
            checkpoint,
        };
        Ok((commit, head, uncommitted))
    }

    /// The durable form of the batch, with its checkpoint, and what later batches must see
    /// of it until it is durable.
    fn into_commit(self, checkpoint: String) -> (Commit, Uncommitted) {
        let hashes = self.hashes.pending[self.own_hashes..].to_vec();
        let uncommitted_state = self.state.clone();
        let (keys, consents, tokens) = self.state.into_parts();
        let (signed, entries) = self
            .entries
            .into_iter()
            .map(|pending| (pending.signed, pending.bytes))
            .unzip();
        let uncommitted = Uncommitted {
            first_seq: self.first_seq,
            last_leaf: self.prev_leaf,
            event_ids: self.event_ids.clone(),
            state: uncommitted_state,
            signed,
            hashes: hashes.clone(),
        };
        let commit = Commit {
            first_seq: self.first_seq,
            entries,
            hashes,
            event_ids: self.event_ids.into_iter().collect(),
            keys,
            consents,
            tokens,
            index: self.index,
            checkpoint,
        };
        (commit, uncommitted)
    }
}

fn view_result<T>(result: Result<Option<T>, StoreError>) -> Result<Option<T>, ViewError> {
    result.map_err(|e| ViewError(e.to_string()))
}

impl Batch<'_> {
    /// The newest state first: this batch, then the batches in flight, newest first.
    fn overlays(&self) -> impl Iterator<Item = &MemoryState> {
        std::iter::once(&self.state).chain(self.in_flight.iter().rev().map(|b| &b.state))
    }
}

impl TrustView for Batch<'_> {
    fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, ViewError> {
        for state in self.overlays() {
            if let Some(record) = state.key(key_id)? {
                return Ok(Some(record));
            }
        }
        if let Some(record) = self.stored_keys.borrow().get(key_id) {
            return Ok(record.clone());
        }
        let record = view_result(self.store.key(key_id))?;
        self.stored_keys
            .borrow_mut()
            .insert(key_id.to_owned(), record.clone());
        Ok(record)
    }
    fn consent(&self, consent_id: &str) -> Result<Option<Arc<ConsentRecord>>, ViewError> {
        for state in self.overlays() {
            if let Some(record) = state.consent(consent_id)? {
                return Ok(Some(record));
            }
        }
        Ok(view_result(self.store.consent(consent_id))?.map(Arc::new))
    }
    fn token(&self, token_id: &str) -> Result<Option<Arc<TokenRecord>>, ViewError> {
        for state in self.overlays() {
            if let Some(record) = state.token(token_id)? {
                return Ok(Some(record));
            }
        }
        Ok(view_result(self.store.token(token_id))?.map(Arc::new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{KeyGrant, Role};
    use sha2::Digest as _;

    #[test]
    fn a_batch_is_one_commit_with_one_checkpoint_and_refusals_do_not_disturb_it() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = new_ledger(dir.path());
        let mut events: Vec<_> = (0..10u8)
            .map(|i| {
                let key = SigningKey::from_bytes(&[10 + i; 32]);
                grant(&key, Role::Issuer, &format!("issuer-{i}"))
            })
            .collect();
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

    /// The admin key of the test ledgers.
    fn admin() -> SigningKey {
        SigningKey::from_bytes(&[1; 32])
    }

    /// A new ledger in `dir` whose first admin is [`admin`].
    fn new_ledger(dir: &std::path::Path) -> Ledger {
        let params = GenesisParams {
            origin: "test/ledger".into(),
            admin_public_key: admin().verifying_key().to_bytes(),
            max_clock_skew_ms: 60_000,
        };
        Ledger::create(
            Store::open(dir).unwrap(),
            SigningKey::from_bytes(&[2; 32]),
            &params,
        )
        .unwrap()
    }

    /// The admin's grant of `key` to `principal` in `role`.
    fn grant(key: &SigningKey, role: Role, principal: &str) -> SignedEvent {
        envelope::sign_event(
            &admin(),
            &Event {
                event_id: format!("grant-{principal}"),
                occurred_at_ms: now_ms(),
                body: Some(Body::KeyGrant(KeyGrant {
                    public_key: key.verifying_key().to_bytes().to_vec(),
                    role: role as i32,
                    principal: principal.into(),
                    not_before_ms: 0,
                    not_after_ms: 0,
                })),
            },
        )
    }

    /// A ledger with an admin, a user key and an issuer key registered.
    fn ledger_with_keys(dir: &std::path::Path) -> (Ledger, SigningKey, SigningKey) {
        let user = SigningKey::from_bytes(&[3; 32]);
        let issuer = SigningKey::from_bytes(&[4; 32]);
        let ledger = new_ledger(dir);
        let outcomes = ledger
            .append_batch(vec![
                grant(&user, Role::User, "alice"),
                grant(&issuer, Role::Issuer, "as.example"),
            ])
            .unwrap();
        assert!(outcomes.iter().all(Result::is_ok));
        (ledger, user, issuer)
    }

    fn consent_and_token(user: &SigningKey, issuer: &SigningKey) -> (SignedEvent, SignedEvent) {
        use crate::proto::{Consent, Issuance};
        let now = now_ms();
        let consent = envelope::sign_event(
            user,
            &Event {
                event_id: "consent-1".into(),
                occurred_at_ms: now,
                body: Some(Body::Consent(Consent {
                    consent_id: "c1".into(),
                    user: "alice".into(),
                    agent: "assistant".into(),
                    scopes: vec!["mail:read".into()],
                    audiences: vec!["mail.example".into()],
                    expires_at_ms: now + 3_600_000,
                    max_delegation_depth: 1,
                    ..Consent::default()
                })),
            },
        );
        let token = envelope::sign_event(
            issuer,
            &Event {
                event_id: "issue-1".into(),
                occurred_at_ms: now,
                body: Some(Body::Issuance(Issuance {
                    token_id: "t1".into(),
                    token_sha256: vec![7; 32],
                    consent_id: "c1".into(),
                    user: "alice".into(),
                    agent: "assistant".into(),
                    scopes: vec!["mail:read".into()],
                    audiences: vec!["mail.example".into()],
                    not_before_ms: now - 1_000,
                    expires_at_ms: now + 600_000,
                    grant_type: "authorization_code".into(),
                    ..Issuance::default()
                })),
            },
        );
        (consent, token)
    }

    #[test]
    fn a_batch_judged_before_the_previous_is_written_sees_all_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, user, issuer) = ledger_with_keys(dir.path());
        let (consent, token) = consent_and_token(&user, &issuer);
        // The same event_id with other content: not a retry.
        let mut other = Event::decode(consent.payload.as_slice()).unwrap();
        other.occurred_at_ms += 1;
        let reused = envelope::sign_event(&user, &other);
        let before = ledger.head().tree_size;

        let mut in_flight = InFlight::default();
        let first = ledger
            .judge(ledger.prepare(vec![consent.clone()], 1), &mut in_flight)
            .unwrap();
        let second = ledger
            .judge(
                ledger.prepare(vec![token, consent, reused], 1),
                &mut in_flight,
            )
            .unwrap();
        assert_eq!(ledger.head().tree_size, before, "judging writes nothing");

        let first = ledger.write(first, |_| ()).unwrap();
        let second = ledger.write(second, |_| ()).unwrap();
        let consent_receipt = first[0].as_ref().unwrap();
        assert_eq!(consent_receipt.seq, before);
        // The token traces to the consent of the batch that was not yet written.
        let token_receipt = second[0].as_ref().unwrap();
        assert_eq!(token_receipt.seq, before + 1);
        assert_eq!(
            token_receipt.verdict.as_ref().unwrap().status,
            crate::proto::TraceStatus::Traced as i32
        );
        // An exact retry of an unwritten event is recognised, with the original seq.
        let retry = second[1].as_ref().unwrap();
        assert!(retry.duplicate);
        assert_eq!(retry.seq, before);
        assert_eq!(retry.leaf_hash, consent_receipt.leaf_hash);
        assert!(matches!(second[2], Err(Refusal::EventIdReused { seq, .. }) if seq == before));
        assert_eq!(ledger.head().tree_size, before + 2);

        // What was committed in two overlapping stages rebuilds to the same head.
        let head = ledger.head();
        drop(ledger);
        let store = Store::open(dir.path()).unwrap();
        store.drop_derived().unwrap();
        let reopened = Ledger::open(store, &[SigningKey::from_bytes(&[2; 32])]).unwrap();
        assert_eq!(reopened.head().root, head.root);
    }

    #[test]
    fn a_batch_applied_before_the_previous_is_flushed_is_published_only_when_finished() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, user, issuer) = ledger_with_keys(dir.path());
        let (consent, token) = consent_and_token(&user, &issuer);
        let before = ledger.head();
        let mut in_flight = InFlight::default();
        let first = ledger
            .judge(ledger.prepare(vec![consent.clone()], 1), &mut in_flight)
            .unwrap();
        let second = ledger
            .judge(ledger.prepare(vec![token, consent], 1), &mut in_flight)
            .unwrap();
        let first = ledger.apply(first, |_| ()).unwrap();
        let second = ledger.apply(second, |_| ()).unwrap();
        // Both are in the store, but neither head is published before its flush.
        assert!(ledger
            .store()
            .entry(before.tree_size + 1)
            .unwrap()
            .is_some());
        assert_eq!(ledger.head(), before);

        let first = ledger.finish(first).unwrap();
        assert_eq!(ledger.head().tree_size, before.tree_size + 1);
        assert_eq!(first[0].as_ref().unwrap().seq, before.tree_size);
        let second = ledger.finish(second).unwrap();
        assert_eq!(ledger.head().tree_size, before.tree_size + 2);
        let token_receipt = second[0].as_ref().unwrap();
        assert_eq!(token_receipt.seq, before.tree_size + 1);
        assert_eq!(token_receipt.checkpoint, ledger.head().checkpoint);
        // The retry of the first batch's event gets the first batch's seq.
        let retry = second[1].as_ref().unwrap();
        assert!(retry.duplicate);
        assert_eq!(retry.seq, before.tree_size);
    }

    #[test]
    fn a_failed_write_stops_the_batches_judged_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, user, issuer) = ledger_with_keys(dir.path());
        let (consent, token) = consent_and_token(&user, &issuer);
        let before = ledger.head().tree_size;
        let mut in_flight = InFlight::default();
        let first = ledger
            .judge(ledger.prepare(vec![consent], 1), &mut in_flight)
            .unwrap();
        let second = ledger
            .judge(ledger.prepare(vec![token], 1), &mut in_flight)
            .unwrap();
        // Written out of order, the second batch does not start at the committed size: the
        // store refuses it, and nothing after that is written or acknowledged.
        assert!(matches!(
            ledger.write(second, |_| ()),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            ledger.write(first, |_| ()),
            Err(StoreError::Stopped)
        ));
        assert_eq!(ledger.head().tree_size, before);
        assert!(matches!(
            ledger.append_batch(vec![]),
            Err(StoreError::Stopped)
        ));
    }

    #[test]
    fn the_offline_verifier_follows_keys_granted_in_the_chunk_before() {
        use crate::proto::Consent;
        let dir = tempfile::tempdir().unwrap();
        let (ledger, _, _) = ledger_with_keys(dir.path());
        let now = now_ms();
        let mut events = Vec::new();
        // A grant, then two consents signed by the key it grants: the verifier's chunks of
        // 4,096 split some of these triples, so a key is granted in one chunk and used in the
        // next while the first is still being judged.
        for i in 0..3000u32 {
            let seed: [u8; 32] = sha2::Sha256::digest(i.to_be_bytes()).into();
            let user = SigningKey::from_bytes(&seed);
            events.push(grant(&user, Role::User, &format!("u{i}")));
            for c in 0..2 {
                events.push(envelope::sign_event(
                    &user,
                    &Event {
                        event_id: format!("consent-u{i}-{c}"),
                        occurred_at_ms: now,
                        body: Some(Body::Consent(Consent {
                            consent_id: format!("c{i}-{c}"),
                            user: format!("u{i}"),
                            agent: "assistant".into(),
                            scopes: vec!["mail:read".into()],
                            expires_at_ms: now + 60_000,
                            ..Consent::default()
                        })),
                    },
                ));
            }
        }
        for chunk in events.chunks(1000) {
            let outcomes = ledger.append_batch(chunk.to_vec()).unwrap();
            assert!(outcomes.iter().all(Result::is_ok));
        }
        let head = ledger.head();
        assert!(head.tree_size > 2 * 4096);
        let key = LedgerVerifier::parse(&ledger.verifier_key()).unwrap();
        let entries = || {
            ledger
                .store()
                .entries(0, head.tree_size)
                .map(|item| item.map(|(_, bytes)| bytes))
        };
        let report = crate::verify::verify_entries(
            &head.checkpoint,
            entries(),
            &key,
            None,
            MemoryState::new(),
            |_, _| (),
        )
        .unwrap()
        .unwrap();
        assert_eq!(report.tree_size, head.tree_size);
        assert_eq!(report.violations_total, 0);

        // A signature broken in the third chunk is found, at its entry.
        let target = 2 * 4096 + 10;
        let tampered = entries().map(|item| {
            item.map(|bytes| {
                let mut entry = Entry::decode(bytes.as_slice()).unwrap();
                if entry.seq == target {
                    if let Some(signed) = entry.event.as_mut() {
                        signed.signature[5] ^= 1;
                    }
                }
                entry.encode_to_vec()
            })
        });
        let failure = crate::verify::verify_entries(
            &head.checkpoint,
            tampered,
            &key,
            None,
            MemoryState::new(),
            |_, _| (),
        )
        .unwrap()
        .unwrap_err();
        assert!(
            failure.to_string().contains(&target.to_string()),
            "{failure}"
        );
    }

    /// Verifies the ledger's stored entries up to `note`'s tree size for a caller trusting
    /// `key`, optionally extending `previous`.
    fn verify_stored(
        ledger: &Ledger,
        note: &str,
        key: &SigningKey,
        previous: Option<&str>,
    ) -> Result<crate::verify::LedgerReport, crate::verify::IntegrityFailure> {
        let size = checkpoint::parse(note)
            .unwrap()
            .unverified_body()
            .unwrap()
            .1;
        let key = LedgerVerifier::from_public_key(ledger.origin(), key.verifying_key().as_bytes())
            .unwrap();
        let entries = ledger
            .store()
            .entries(0, size)
            .map(|item| item.map(|(_, bytes)| bytes));
        crate::verify::verify_entries(note, entries, &key, previous, MemoryState::new(), |_, _| ())
            .unwrap()
    }

    /// The ledger's newest checkpoint as `key` alone would sign it.
    fn signed_alone(ledger: &Ledger, key: &SigningKey) -> String {
        let head = ledger.head();
        CheckpointSigner::new(ledger.origin(), key.clone())
            .unwrap()
            .sign(head.tree_size, &head.root)
    }

    /// Whether `note` carries a valid signature by `key`.
    fn signed_by(ledger: &Ledger, note: &str, key: &SigningKey) -> bool {
        let key = LedgerVerifier::from_public_key(ledger.origin(), key.verifying_key().as_bytes())
            .unwrap();
        checkpoint::open(note, &key).is_ok()
    }

    #[test]
    fn the_ledger_key_rotates_in_recorded_steps_and_verifiers_follow_them() {
        use crate::proto::LedgerKeyRotation;
        use crate::verify::IntegrityFailure;
        let dir = tempfile::tempdir().unwrap();
        let (mut ledger, user, issuer) = ledger_with_keys(dir.path());
        let old = SigningKey::from_bytes(&[2; 32]);
        let new = SigningKey::from_bytes(&[5; 32]);
        let withdrawn = SigningKey::from_bytes(&[6; 32]);
        let stranger = SigningKey::from_bytes(&[7; 32]);
        let before = ledger.head().checkpoint;

        // Nothing under way: finish and cancel are refused and write nothing.
        assert!(matches!(
            ledger.finish_key_rotation(),
            Err(LedgerError::Rotation(Refusal::Conflict(_)))
        ));
        assert!(matches!(
            ledger.cancel_key_rotation(),
            Err(LedgerError::Rotation(Refusal::Conflict(_)))
        ));
        assert_eq!(ledger.head().tree_size, 3);

        // A rotation begun and cancelled: while under way both keys sign; afterwards the old
        // key alone, and the withdrawn key may not come back.
        let begun = ledger.begin_key_rotation(withdrawn.clone()).unwrap();
        assert_eq!(begun.seq, 3);
        assert!(signed_by(&ledger, &begun.checkpoint, &old));
        assert!(signed_by(&ledger, &begun.checkpoint, &withdrawn));
        assert_eq!(ledger.verifier_keys().len(), 2);
        assert!(matches!(
            ledger.begin_key_rotation(new.clone()),
            Err(LedgerError::Rotation(Refusal::Conflict(_)))
        ));
        let cancelled = ledger.cancel_key_rotation().unwrap();
        assert!(signed_by(&ledger, &cancelled.checkpoint, &old));
        assert!(!signed_by(&ledger, &cancelled.checkpoint, &withdrawn));
        assert!(matches!(
            ledger.begin_key_rotation(withdrawn.clone()),
            Err(LedgerError::Rotation(Refusal::Conflict(_)))
        ));

        // The real rotation. Appends go on meanwhile, under checkpoints both keys sign.
        ledger.begin_key_rotation(new.clone()).unwrap();
        let (consent, token) = consent_and_token(&user, &issuer);
        let outcomes = ledger.append_batch(vec![consent, token]).unwrap();
        let during = outcomes[1].as_ref().unwrap().checkpoint.clone();
        assert!(signed_by(&ledger, &during, &old) && signed_by(&ledger, &during, &new));
        // No client can write a rotation step: not the admin, not with the ledger's own key.
        let forged_step = Event {
            event_id: "forged-step".into(),
            occurred_at_ms: now_ms(),
            body: Some(Body::LedgerKeyRotation(LedgerKeyRotation {
                step: Step::Finish as i32,
                ledger_public_key: old.verifying_key().to_bytes().to_vec(),
                next_ledger_public_key: new.verifying_key().to_bytes().to_vec(),
            })),
        };
        let outcomes = ledger
            .append_batch(vec![
                envelope::sign_event(&admin(), &forged_step),
                envelope::sign_event(&new, &forged_step),
            ])
            .unwrap();
        assert!(matches!(outcomes[0], Err(Refusal::RoleNotAllowed { .. })));
        assert!(matches!(outcomes[1], Err(Refusal::UnknownKey(_))));

        // Mid-rotation, a verifier trusting either key accepts the ledger; the withdrawn key
        // and a stranger are not the ledger's.
        for (key, status) in [
            (&old, trust::KeyStatus::Current { since: 0 }),
            (&new, trust::KeyStatus::Next { since: 5 }),
        ] {
            let report = verify_stored(&ledger, &during, key, Some(&before)).unwrap();
            assert_eq!(report.ledger_keys, ledger.verifier_keys());
            assert_eq!(report.entries_by_kind["ledger_key_rotation"], 3);
            assert_eq!(report.trusted_key, status);
        }
        for key in [&withdrawn, &stranger] {
            assert!(matches!(
                verify_stored(&ledger, &during, key, None),
                Err(IntegrityFailure::UntrustedKey { .. })
            ));
        }
        // A checkpoint signed by the old key alone, after the rotation began, is refused.
        assert!(matches!(
            verify_stored(&ledger, &signed_alone(&ledger, &old), &old, None),
            Err(IntegrityFailure::Checkpoint(
                CheckpointError::MissingSignature(_)
            ))
        ));

        // Reopening needs the next key too.
        drop(ledger);
        let reopen = |keys: &[SigningKey]| Ledger::open(Store::open(dir.path()).unwrap(), keys);
        assert!(matches!(
            reopen(std::slice::from_ref(&old)),
            Err(LedgerError::Mismatch(_))
        ));
        let mut ledger = reopen(&[stranger.clone(), new.clone(), old.clone()]).unwrap();
        assert_eq!(ledger.verifier_keys().len(), 2);

        // Finish: the new key alone signs from now on.
        let finished = ledger.finish_key_rotation().unwrap();
        assert!(signed_by(&ledger, &finished.checkpoint, &new));
        assert!(!signed_by(&ledger, &finished.checkpoint, &old));
        assert_eq!(
            ledger.ledger_keys().current(),
            new.verifying_key().as_bytes()
        );
        let after = ledger.head().checkpoint;
        // An auditor still holding the old key follows the rotation to the new one; one
        // holding the new key also accepts the history the old key signed.
        let finish_seq = finished.seq;
        for (key, status) in [
            (&old, trust::KeyStatus::Retired { at: finish_seq }),
            (&new, trust::KeyStatus::Current { since: finish_seq }),
        ] {
            let report = verify_stored(&ledger, &after, key, Some(&before)).unwrap();
            assert_eq!(report.ledger_keys, vec![ledger.verifier_key()]);
            assert_eq!(report.trusted_key, status);
            assert_eq!(report.extends_previous, Some(3));
            let report = verify_stored(&ledger, &after, key, Some(&during)).unwrap();
            assert_eq!(report.tree_size, ledger.head().tree_size);
        }
        assert!(matches!(
            verify_stored(&ledger, &after, &withdrawn, None),
            Err(IntegrityFailure::UntrustedKey { .. })
        ));
        // The retired key signs nothing any more: a checkpoint it alone signs is refused.
        let head = ledger.head();
        assert!(matches!(
            verify_stored(&ledger, &signed_alone(&ledger, &old), &old, None),
            Err(IntegrityFailure::Checkpoint(
                CheckpointError::NotSignedByKey
            ))
        ));

        // The old key alone no longer opens the ledger; rebuilt from the entries alone, it
        // comes back with the same head under the new key.
        drop(ledger);
        assert!(matches!(
            reopen(std::slice::from_ref(&old)),
            Err(LedgerError::Mismatch(_))
        ));
        let store = Store::open(dir.path()).unwrap();
        store.drop_derived().unwrap();
        let rebuilt = Ledger::open(store, std::slice::from_ref(&new)).unwrap();
        assert_eq!(rebuilt.head().root, head.root);
        assert!(signed_by(&rebuilt, &rebuilt.head().checkpoint, &new));
        assert_eq!(rebuilt.verifier_keys(), vec![rebuilt.verifier_key()]);
    }

    #[test]
    fn a_stage_that_panics_stops_appends() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, _, _) = ledger_with_keys(dir.path());
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ledger.unless_failed::<()>(|| panic!("a stage failed unexpectedly"))
        }));
        assert!(panicked.is_err());
        assert!(*ledger.stopped().borrow());
        assert!(matches!(
            ledger.append_batch(vec![]),
            Err(StoreError::Stopped)
        ));
    }
}
