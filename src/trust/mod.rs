//! The rules: which events are well-formed, which keys may sign what, and the verdict each
//! event gets from the state that earlier entries built.
//!
//! Evaluation is a pure function of the event and a read-only [`TrustView`] of the state before
//! it, returning a [`Verdict`] and the [`StateDelta`] to apply. The server's view reads sled
//! (plus the uncommitted part of the current batch); the offline verifier's view is an
//! in-memory map it builds while replaying. Neither the rules nor their tests know where state
//! lives.
//!
//! Pure: no I/O, no async.

mod keys;
mod limits;

pub use keys::{authorize, key_valid_at, KeyRecord};
pub use limits::{validate_event, MAX_EVENT_ID_LEN, MAX_PAYLOAD_LEN, MAX_REPEATED, MAX_TEXT_LEN};

use crate::proto::{event::Body, Event, Role, TraceStatus, Verdict};

/// Version of the chain-of-trust rules that produce verdicts. `0` marks verdicts that do not
/// evaluate a chain (issue #3 brings rules version 1 as written in DESIGN.md); an offline
/// verifier must know every version it meets.
pub const RULES_VERSION: u32 = 0;

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
    /// The event conflicts with the ledger's state (e.g. a key granted twice).
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

/// Read-only state before an event.
pub trait TrustView {
    /// The registered key with this id, if any.
    fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, ViewError>;
}

/// A change to the trust state that an accepted event makes.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StateChange {
    /// Registers a key.
    PutKey { key_id: String, record: KeyRecord },
}

/// Everything an accepted event changes.
pub type StateDelta = Vec<StateChange>;

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
    }
}

fn verdict(status: TraceStatus) -> Verdict {
    Verdict {
        status: status as i32,
        rules_version: RULES_VERSION,
        ..Verdict::default()
    }
}

/// Evaluates an authorized event (its key valid, signature checked, [`authorize`] passed)
/// against the state before it. Returns the verdict to record and the state changes, or a
/// refusal when the event contradicts the state (e.g. granting a key twice).
pub fn evaluate(
    event: &Event,
    signer: &KeyRecord,
    seq: u64,
    view: &impl TrustView,
) -> Result<Result<(Verdict, StateDelta), Refusal>, ViewError> {
    let Some(body) = &event.body else {
        return Ok(Err(Refusal::Malformed("event has no body".into())));
    };
    let outcome = match body {
        Body::Genesis(genesis) => {
            let record = KeyRecord::admin_from_genesis(genesis, seq);
            let key_id = record.key_id();
            Ok((
                verdict(TraceStatus::NotApplicable),
                vec![StateChange::PutKey { key_id, record }],
            ))
        }
        Body::KeyGrant(grant) => {
            let record = KeyRecord::from_grant(grant, seq);
            let key_id = record.key_id();
            if view.key(&key_id)?.is_some() {
                Err(Refusal::Conflict(format!(
                    "key {key_id} is already registered"
                )))
            } else {
                Ok((
                    verdict(TraceStatus::NotApplicable),
                    vec![StateChange::PutKey { key_id, record }],
                ))
            }
        }
        Body::KeyRevocation(revocation) => match view.key(&revocation.key_id)? {
            None => Err(Refusal::Conflict(format!(
                "key {} to revoke is not registered",
                revocation.key_id
            ))),
            Some(mut record) => {
                let at = event.occurred_at_ms;
                record.revoked_at_ms = Some(record.revoked_at_ms.map_or(at, |old| old.min(at)));
                Ok((
                    verdict(TraceStatus::NotApplicable),
                    vec![StateChange::PutKey {
                        key_id: revocation.key_id.clone(),
                        record,
                    }],
                ))
            }
        },
        Body::Consent(_) => {
            let mut v = verdict(TraceStatus::NotApplicable);
            v.consent_user_signed = signer.role() == Role::User;
            Ok((v, vec![]))
        }
        Body::Denial(_) | Body::Revocation(_) => Ok((verdict(TraceStatus::NotApplicable), vec![])),
        // Chains of trust are evaluated from rules version 1 on (issue #3).
        Body::Issuance(_) | Body::Validation(_) | Body::Action(_) => {
            Ok((verdict(TraceStatus::Unspecified), vec![]))
        }
    };
    Ok(outcome)
}

#[cfg(test)]
mod tests;
