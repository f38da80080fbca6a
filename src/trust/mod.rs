//! The rules: which events are well-formed, which keys may sign what, and the verdict each
//! event gets from the state that earlier entries built (DESIGN.md, "Chain of trust").
//!
//! Evaluation is a pure function of the event and a read-only [`TrustView`] of the state before
//! it, returning an [`Evaluation`]: the verdict, the [`StateChange`]s to apply and the index
//! terms to file the entry under. The server's view reads sled (plus the uncommitted part of
//! the current batch); the offline verifier's view is a [`MemoryState`] it builds while
//! replaying. Neither the rules nor their tests know where state lives.
//!
//! For one event the checks run in this order: [`validate_event`] (shape, limits),
//! [`authenticate`] (known key, valid at the event's time, signature), [`authorize`] (role and
//! principal), then [`evaluate`] (state conflicts refuse; chain-of-trust rules give the
//! verdict). The server adds its own checks between them (exact retries, event-id reuse,
//! clock skew); the verifier replays the same functions over stored entries.
//!
//! Pure: no I/O, no async.

mod chain;
mod keys;
mod ledger_keys;
mod limits;
mod memory;
mod preverify;
pub mod reasons;
mod records;
pub mod scopes;

pub use keys::{authorize, key_valid_at, KeyRecord, GENESIS_ADMIN_PRINCIPAL};
pub use ledger_keys::{KeyStatus, LedgerKeys};
pub use limits::{
    validate_event, MAX_DELEGATION_DEPTH, MAX_EVENT_ID_LEN, MAX_ID_LEN, MAX_PAYLOAD_LEN,
    MAX_REPEATED, MAX_TEXT_LEN, MAX_TIME_MS,
};
pub use memory::MemoryState;
pub use preverify::{all_cores, named_key, preverify};
pub use records::{ConsentRecord, TokenRecord};

use std::sync::Arc;

use crate::envelope;
use crate::proto::{event::Body, Event, EventKind, SignedEvent, TraceStatus, Verdict};

/// Version of the chain-of-trust rules that produce verdicts: 1 = the rules in DESIGN.md as
/// first written. An offline verifier must know every version it meets.
pub const RULES_VERSION: u32 = 1;

/// Why an event was refused outright: nothing is written and the caller gets an error.
/// Each variant maps to one gRPC code in `service::status`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The payload does not decode, misses its body, or breaks a field limit.
    #[error("malformed event: {0}")]
    Malformed(String),
    /// `occurred_at_ms` is further from the ledger's clock than the genesis allows.
    #[error("occurred_at_ms {occurred_at_ms} is {skew_ms} ms from the ledger clock; the bound is {max_skew_ms} ms")]
    ClockSkew {
        occurred_at_ms: i64,
        skew_ms: i64,
        max_skew_ms: i64,
    },
    /// No key with this id is registered.
    #[error("unknown key id {0:?}")]
    UnknownKey(String),
    /// The key exists but is not valid at the event's time.
    #[error("key {key_id} is not valid at {at_ms}: {why}")]
    KeyNotValid {
        key_id: String,
        at_ms: i64,
        why: &'static str,
    },
    /// The signature does not verify under the named key.
    #[error("bad signature: {0}")]
    BadSignature(String),
    /// The signer's role may not assert this kind of event.
    #[error("a {role} key may not sign {kind} events")]
    RoleNotAllowed {
        role: &'static str,
        kind: &'static str,
    },
    /// The signer's principal does not match the principal the body names.
    #[error("key principal {principal:?} may not assert {field} {claimed:?}")]
    PrincipalMismatch {
        principal: String,
        field: &'static str,
        claimed: String,
    },
    /// The event id is already on the ledger with other bytes.
    #[error("event_id {event_id:?} already used by entry {seq} with other bytes")]
    EventIdReused { event_id: String, seq: u64 },
    /// The event conflicts with the ledger's state (a key, consent or token id used twice,
    /// revoking something the ledger does not know).
    #[error("{0}")]
    Conflict(String),
}

impl Refusal {
    /// A stable upper-case code naming the refusal, for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "MALFORMED",
            Refusal::ClockSkew { .. } => "CLOCK_SKEW",
            Refusal::UnknownKey(_) => "UNKNOWN_KEY",
            Refusal::KeyNotValid { .. } => "KEY_NOT_VALID",
            Refusal::BadSignature(_) => "BAD_SIGNATURE",
            Refusal::RoleNotAllowed { .. } => "ROLE_NOT_ALLOWED",
            Refusal::PrincipalMismatch { .. } => "PRINCIPAL_MISMATCH",
            Refusal::EventIdReused { .. } => "EVENT_ID_REUSED",
            Refusal::Conflict(_) => "CONFLICT",
        }
    }
}

/// A failure to read state through a [`TrustView`] (storage trouble, not a rule).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("couldn't read trust state: {0}")]
pub struct ViewError(pub String);

/// Read-only state before an event. Consents and tokens come shared ([`Arc`]), so a view that
/// keeps records in memory hands them out without copying them; the rules copy a record only
/// to change it.
pub trait TrustView {
    /// The registered key with this id, if any.
    fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, ViewError>;
    /// The consent with this id, if any.
    fn consent(&self, consent_id: &str) -> Result<Option<Arc<ConsentRecord>>, ViewError>;
    /// The token with this id, if its issuance is on the ledger.
    fn token(&self, token_id: &str) -> Result<Option<Arc<TokenRecord>>, ViewError>;
}

/// State a replay (the offline verifier) reads and updates in ledger order.
/// [`MemoryState`] keeps it in memory; the CLI's verifier keeps it on disk
/// (`scratch::DiskState`) so that memory stays flat on any ledger.
pub trait ReplayState: TrustView {
    /// Applies an accepted event's changes. An error means the state could not be kept
    /// (storage trouble), not that the event is wrong.
    fn apply_delta(&mut self, delta: StateDelta) -> Result<(), ViewError>;
    /// Records an event id; false when it was recorded before.
    fn first_sighting(&mut self, event_id: &str) -> Result<bool, ViewError>;
}

/// A change to the trust state that an accepted event makes.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StateChange {
    /// Registers or updates a key.
    PutKey { key_id: String, record: KeyRecord },
    /// Records or updates a consent.
    PutConsent {
        consent_id: String,
        record: ConsentRecord,
    },
    /// Records or updates a token.
    PutToken {
        token_id: String,
        record: TokenRecord,
    },
}

/// Everything an accepted event changes.
pub type StateDelta = Vec<StateChange>;

/// A field an entry can be found by in `Audit.Query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IndexField {
    /// The user the event concerns (for token events, the token's user).
    User,
    /// The agent the event concerns (for token events, the token's holder).
    Agent,
    /// The token the event names.
    Token,
    /// The consent the event rests on.
    Consent,
    /// The resource server the event names.
    ResourceServer,
}

/// One `(field, value)` an entry is filed under.
pub type IndexTerm = (IndexField, String);

/// What evaluating an accepted event yields.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The verdict recorded in the entry.
    pub verdict: Verdict,
    /// The state changes the event makes.
    pub delta: StateDelta,
    /// The index terms the entry is filed under (besides its kind and verdict status).
    pub index: Vec<IndexTerm>,
}

/// A short name of an event body's kind, for messages.
pub fn kind_name(body: &Body) -> &'static str {
    match body {
        Body::Genesis(_) => "Genesis",
        Body::KeyGrant(_) => "KeyGrant",
        Body::KeyRevocation(_) => "KeyRevocation",
        Body::Consent(_) => "Consent",
        Body::Issuance(_) => "Issuance",
        Body::Validation(_) => "Validation",
        Body::Action(_) => "Action",
        Body::Denial(_) => "Denial",
        Body::Revocation(_) => "Revocation",
        Body::LedgerKeyRotation(_) => "LedgerKeyRotation",
    }
}

/// The contract's kind of an event body.
pub fn event_kind(body: Option<&Body>) -> EventKind {
    match body {
        None => EventKind::Unspecified,
        Some(Body::Genesis(_)) => EventKind::Genesis,
        Some(Body::KeyGrant(_)) => EventKind::KeyGrant,
        Some(Body::KeyRevocation(_)) => EventKind::KeyRevocation,
        Some(Body::Consent(_)) => EventKind::Consent,
        Some(Body::Issuance(_)) => EventKind::Issuance,
        Some(Body::Validation(_)) => EventKind::Validation,
        Some(Body::Action(_)) => EventKind::Action,
        Some(Body::Denial(_)) => EventKind::Denial,
        Some(Body::Revocation(_)) => EventKind::Revocation,
        Some(Body::LedgerKeyRotation(_)) => EventKind::LedgerKeyRotation,
    }
}

/// A verdict with no chain: keys, genesis, consents, revocations, denials.
pub(crate) fn not_applicable() -> Verdict {
    Verdict {
        status: TraceStatus::NotApplicable as i32,
        rules_version: RULES_VERSION,
        ..Verdict::default()
    }
}

/// Finds the signer's key, checks it is valid at the event's time and verifies the signature
/// (Ed25519 over the DSSE PAE of the payload, by the signature rule of [`envelope`]). `preverified` names a public key under
/// which the caller has already verified this very signature (e.g. in a batch); when the
/// signer's registered key is that key, the signature is not verified again.
pub fn authenticate(
    signed: &SignedEvent,
    event: &Event,
    view: &impl TrustView,
    preverified: Option<&[u8; 32]>,
) -> Result<Result<KeyRecord, Refusal>, ViewError> {
    let Some(signer) = view.key(&signed.key_id)? else {
        return Ok(Err(Refusal::UnknownKey(signed.key_id.clone())));
    };
    if let Err(refusal) = key_valid_at(&signed.key_id, &signer, event.occurred_at_ms) {
        return Ok(Err(refusal));
    }
    if preverified.is_some_and(|key| key.as_slice() == signer.public_key.as_slice()) {
        return Ok(Ok(signer));
    }
    let verified = envelope::parse_public_key(&signer.public_key)
        .and_then(|key| envelope::verify_payload(&key, &signed.payload, &signed.signature));
    Ok(match verified {
        Ok(()) => Ok(signer),
        Err(e) => Err(Refusal::BadSignature(e.to_string())),
    })
}

/// Judges a stored event again as the ledger judged it when appending it at `seq`: shape,
/// authentication, authorization and the rules; everything but what depends on the moment
/// of arrival (clock skew, retries). The server's rebuild and the offline verifier use it;
/// `preverified` is as for [`authenticate`].
pub fn rejudge(
    signed: &SignedEvent,
    event: &Event,
    seq: u64,
    view: &impl TrustView,
    preverified: Option<&[u8; 32]>,
) -> Result<Result<Evaluation, Refusal>, ViewError> {
    if let Err(refusal) = validate_event(event, signed.payload.len()) {
        return Ok(Err(refusal));
    }
    let signer = match authenticate(signed, event, view, preverified)? {
        Ok(signer) => signer,
        Err(refusal) => return Ok(Err(refusal)),
    };
    if let Err(refusal) = authorize(event, &signer) {
        return Ok(Err(refusal));
    }
    evaluate(event, &signer, seq, view)
}

/// Judges entry 0: a genesis signed by the ledger key it names. Returns its evaluation and
/// the ledger keys it starts with. Which ledger this is, is not the genesis's to say: the
/// caller checks that its trusted key is one of the ledger's keys (see [`LedgerKeys`]).
pub fn judge_genesis(
    signed: &SignedEvent,
    event: &Event,
) -> Result<(Evaluation, LedgerKeys), Refusal> {
    validate_event(event, signed.payload.len())?;
    let Some(Body::Genesis(genesis)) = &event.body else {
        return Err(Refusal::Malformed("entry 0 is not a genesis".into()));
    };
    let keys = LedgerKeys::from_genesis(genesis)?;
    ledger_keys::signed_by(
        signed,
        keys.current(),
        event.occurred_at_ms,
        "the genesis is signed by the ledger key it names",
    )?;
    let record = KeyRecord::admin_from_genesis(genesis, 0);
    let evaluation = plain(
        vec![StateChange::PutKey {
            key_id: record.key_id(),
            record,
        }],
        vec![],
    );
    Ok((evaluation, keys))
}

/// Judges a stored entry again, whatever its kind: entry 0 as [`judge_genesis`], the
/// ledger's key rotations by [`LedgerKeys::judge`] against `ledger_keys` (the keys the
/// entries before built; `None` before the genesis), every other entry as [`rejudge`].
/// `ledger_keys` is updated when the entry holds. The server's rebuild and the offline
/// verifier both judge through here.
pub fn rejudge_stored(
    signed: &SignedEvent,
    event: &Event,
    seq: u64,
    view: &impl TrustView,
    ledger_keys: &mut Option<LedgerKeys>,
    preverified: Option<&[u8; 32]>,
) -> Result<Result<Evaluation, Refusal>, ViewError> {
    if seq == 0 {
        return Ok(judge_genesis(signed, event).map(|(evaluation, keys)| {
            *ledger_keys = Some(keys);
            evaluation
        }));
    }
    if let Some(Body::LedgerKeyRotation(_)) = &event.body {
        let Some(keys) = ledger_keys.as_mut() else {
            return Ok(Err(Refusal::Malformed(
                "a ledger key rotation without the genesis before it".into(),
            )));
        };
        return Ok(keys.judge(signed, event, seq));
    }
    rejudge(signed, event, seq, view, preverified)
}

/// Evaluates an authorized event (key valid, signature checked, [`authorize`] passed) at
/// entry `seq` against the state before it. Returns the evaluation, or a refusal when the
/// event contradicts the state (an id used twice, an unknown revocation target, a user
/// revoking another user's consent).
pub fn evaluate(
    event: &Event,
    signer: &KeyRecord,
    seq: u64,
    view: &impl TrustView,
) -> Result<Result<Evaluation, Refusal>, ViewError> {
    let Some(body) = &event.body else {
        return Ok(Err(Refusal::Malformed("event has no body".into())));
    };
    let at = event.occurred_at_ms;
    match body {
        Body::Genesis(genesis) => {
            let record = KeyRecord::admin_from_genesis(genesis, seq);
            Ok(Ok(plain(
                vec![StateChange::PutKey {
                    key_id: record.key_id(),
                    record,
                }],
                vec![],
            )))
        }
        Body::KeyGrant(grant) => {
            let record = KeyRecord::from_grant(grant, seq);
            let key_id = record.key_id();
            if view.key(&key_id)?.is_some() {
                return Ok(Err(Refusal::Conflict(format!(
                    "key {key_id} is already registered"
                ))));
            }
            Ok(Ok(plain(
                vec![StateChange::PutKey { key_id, record }],
                vec![],
            )))
        }
        Body::KeyRevocation(revocation) => {
            let Some(mut record) = view.key(&revocation.key_id)? else {
                return Ok(Err(Refusal::Conflict(format!(
                    "key {} to revoke is not registered",
                    revocation.key_id
                ))));
            };
            record.revoked_at_ms = Some(record.revoked_at_ms.map_or(at, |old| old.min(at)));
            record.revocation_seq.get_or_insert(seq);
            let key_id = revocation.key_id.clone();
            Ok(Ok(plain(
                vec![StateChange::PutKey { key_id, record }],
                vec![],
            )))
        }
        Body::Consent(consent) => chain::consent(consent, signer, seq, view),
        Body::Issuance(issuance) => chain::issuance(issuance, at, seq, view),
        Body::Validation(validation) => chain::validation(validation, at, view),
        Body::Action(action) => chain::action(action, at, view),
        Body::Denial(denial) => chain::denial(denial, view),
        Body::Revocation(revocation) => chain::revocation(revocation, signer, at, seq, view),
        // `authorize` lets no key sign one: the ledger writes them, judged by `LedgerKeys`.
        Body::LedgerKeyRotation(_) => Ok(Err(Refusal::RoleNotAllowed {
            role: keys::role_name(signer.role()),
            kind: "LedgerKeyRotation",
        })),
    }
}

/// An evaluation with a NOT_APPLICABLE verdict.
fn plain(delta: StateDelta, index: Vec<IndexTerm>) -> Evaluation {
    Evaluation {
        verdict: not_applicable(),
        delta,
        index,
    }
}

#[cfg(test)]
mod tests;
