//! The ledger's own keys: the key that signed the genesis and signs checkpoints, and its
//! rotations.
//!
//! The genesis names the first ledger key. Each `LedgerKeyRotation` entry takes one step:
//!
//! | step | signed by | names | afterwards checkpoints are signed by |
//! | --- | --- | --- | --- |
//! | BEGIN | the current key | the next key, never used before | the current key and the next key |
//! | FINISH | the next key | the rotation under way | the next key alone, now the current key |
//! | CANCEL | the current key | the rotation under way | the current key alone |
//!
//! [`LedgerKeys`] is the state these entries build and [`LedgerKeys::judge`] the rule each
//! step must pass. Authority passes only forward: a key that was current hands it on with the
//! BEGIN it signs, so a verifier that trusts such a key (the genesis key or a key a FINISH made
//! current) can follow the entries to the keys that sign a later checkpoint. A withdrawn
//! next key never was current and hands nothing on.
//!
//! Pure: no I/O, no async.

use std::collections::HashMap;

use crate::envelope;
use crate::proto::{event::Body, ledger_key_rotation::Step, Event, Genesis, SignedEvent};

use super::{plain, validate_event, Evaluation, Refusal};

/// A 32-byte Ed25519 public key.
pub type PublicKey = [u8; 32];

/// What a key is to a ledger, by its entries so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum KeyStatus {
    /// The ledger key, current since entry `since` (0: the genesis key).
    Current { since: u64 },
    /// The next key of the rotation begun at entry `since`, still under way.
    Next { since: u64 },
    /// A former ledger key, retired by the FINISH at entry `at`.
    Retired { at: u64 },
    /// A next key withdrawn by the CANCEL at entry `at`.
    Withdrawn { at: u64 },
    /// Never one of this ledger's keys.
    Unknown,
}

/// The ledger keys as the entries so far record them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerKeys {
    current: PublicKey,
    /// The entry that made `current` the ledger key (0: the genesis).
    current_since: u64,
    /// The next key and the entry of its BEGIN.
    next: Option<(PublicKey, u64)>,
    /// Keys that were current before `current`, each with the entry of the FINISH that
    /// retired it.
    former: HashMap<PublicKey, u64>,
    /// Next keys whose rotation was cancelled, each with the entry of the CANCEL.
    withdrawn: HashMap<PublicKey, u64>,
}

impl LedgerKeys {
    /// The keys a genesis starts with: the ledger key it names, alone. The genesis must have
    /// passed [`validate_event`].
    pub fn from_genesis(genesis: &Genesis) -> Result<Self, Refusal> {
        Ok(Self {
            current: public_key("ledger_public_key", &genesis.ledger_public_key)?,
            current_since: 0,
            next: None,
            former: HashMap::new(),
            withdrawn: HashMap::new(),
        })
    }

    /// The ledger key now.
    pub fn current(&self) -> &PublicKey {
        &self.current
    }

    /// The key a rotation under way moves to.
    pub fn next(&self) -> Option<&PublicKey> {
        self.next.as_ref().map(|(key, _)| key)
    }

    /// The keys every checkpoint must be signed by now: the current key, then the next key
    /// while a rotation is under way.
    pub fn active(&self) -> Vec<PublicKey> {
        std::iter::once(self.current)
            .chain(self.next.map(|(key, _)| key))
            .collect()
    }

    /// What `key` is to this ledger.
    pub fn status(&self, key: &PublicKey) -> KeyStatus {
        if *key == self.current {
            KeyStatus::Current {
                since: self.current_since,
            }
        } else if let Some((_, since)) = self.next.filter(|(next, _)| next == key) {
            KeyStatus::Next { since }
        } else if let Some(&at) = self.former.get(key) {
            KeyStatus::Retired { at }
        } else if let Some(&at) = self.withdrawn.get(key) {
            KeyStatus::Withdrawn { at }
        } else {
            KeyStatus::Unknown
        }
    }

    /// Whether `key` has had any part in this ledger's keys: current, next, retired or
    /// withdrawn (a rotation moves only to a key that has not).
    pub fn ever_used(&self, key: &PublicKey) -> bool {
        self.status(key) != KeyStatus::Unknown
    }

    /// Judges a `LedgerKeyRotation` event at entry `seq` against the keys before it: its
    /// shape, the step (see the module docs) and its signature. If it holds, takes the step
    /// (changes `self`) and returns the evaluation (NOT_APPLICABLE; the step changes nothing
    /// in the trust state); if not, leaves `self` as it was. Constant time in the number of
    /// earlier steps.
    pub fn judge(
        &mut self,
        signed: &SignedEvent,
        event: &Event,
        seq: u64,
    ) -> Result<Evaluation, Refusal> {
        validate_event(event, signed.payload.len())?;
        let Some(Body::LedgerKeyRotation(rotation)) = &event.body else {
            return Err(Refusal::Malformed("not a ledger key rotation".into()));
        };
        let named_current = public_key("ledger_public_key", &rotation.ledger_public_key)?;
        let named_next = public_key("next_ledger_public_key", &rotation.next_ledger_public_key)?;
        if named_current != self.current {
            return Err(Refusal::Conflict(format!(
                "the rotation names ledger key {}; the ledger key is {}",
                envelope::key_id(&named_current),
                envelope::key_id(&self.current)
            )));
        }
        let step = Step::try_from(rotation.step)
            .map_err(|_| Refusal::Malformed(format!("unknown rotation step {}", rotation.step)))?;
        let under_way = || match self.next() {
            Some(next) if *next == named_next => Ok(()),
            Some(next) => Err(Refusal::Conflict(format!(
                "the rotation under way moves to key {}, not {}",
                envelope::key_id(next),
                envelope::key_id(&named_next)
            ))),
            None => Err(Refusal::Conflict(
                "no ledger key rotation is under way".into(),
            )),
        };
        let signer = match step {
            Step::Begin => {
                if let Some(next) = self.next() {
                    return Err(Refusal::Conflict(format!(
                        "a rotation to key {} is already under way",
                        envelope::key_id(next)
                    )));
                }
                if self.ever_used(&named_next) {
                    return Err(Refusal::Conflict(format!(
                        "key {} has been a ledger key before: a rotation moves to a fresh key",
                        envelope::key_id(&named_next)
                    )));
                }
                self.current
            }
            Step::Finish => {
                under_way()?;
                named_next
            }
            Step::Cancel => {
                under_way()?;
                self.current
            }
            Step::Unspecified => {
                return Err(Refusal::Malformed(
                    "the rotation step is unspecified".into(),
                ))
            }
        };
        signed_by(
            signed,
            &signer,
            event.occurred_at_ms,
            "a BEGIN or CANCEL is signed by the current ledger key, a FINISH by the next key",
        )?;
        // Every check passed: take the step.
        match step {
            Step::Begin => self.next = Some((named_next, seq)),
            Step::Finish => {
                self.former.insert(self.current, seq);
                self.current = named_next;
                self.current_since = seq;
                self.next = None;
            }
            Step::Cancel => {
                self.withdrawn.insert(named_next, seq);
                self.next = None;
            }
            Step::Unspecified => {}
        }
        Ok(plain(Vec::new(), Vec::new()))
    }
}

/// A key field that [`validate_event`] has checked.
fn public_key(field: &str, bytes: &[u8]) -> Result<PublicKey, Refusal> {
    PublicKey::try_from(bytes)
        .map_err(|_| Refusal::Malformed(format!("{field} must be a 32-byte Ed25519 key")))
}

/// Checks that `signed` names `key` and that its signature verifies under it; `why` says
/// which key the event must be signed by.
pub(super) fn signed_by(
    signed: &SignedEvent,
    key: &PublicKey,
    at_ms: i64,
    why: &'static str,
) -> Result<(), Refusal> {
    if signed.key_id != envelope::key_id(key) {
        return Err(Refusal::KeyNotValid {
            key_id: signed.key_id.clone(),
            at_ms,
            why,
        });
    }
    let key = envelope::parse_public_key(key).map_err(|e| Refusal::BadSignature(e.to_string()))?;
    envelope::verify_payload(&key, &signed.payload, &signed.signature)
        .map_err(|e| Refusal::BadSignature(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::LedgerKeyRotation;
    use ed25519_dalek::SigningKey;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn public(seed: u8) -> PublicKey {
        key(seed).verifying_key().to_bytes()
    }

    fn genesis_keys() -> LedgerKeys {
        LedgerKeys::from_genesis(&Genesis {
            origin: "o".into(),
            admin_public_key: public(9).to_vec(),
            ledger_public_key: public(1).to_vec(),
            max_clock_skew_ms: 1,
        })
        .unwrap()
    }

    /// A rotation step from `current` to `next`, signed by `signer`.
    fn step(step: Step, current: u8, next: u8, signer: u8) -> (SignedEvent, Event) {
        let event = Event {
            event_id: format!("rotation-{}-{current}-{next}", step.as_str_name()),
            occurred_at_ms: 1_700_000_000_000,
            body: Some(Body::LedgerKeyRotation(LedgerKeyRotation {
                step: step as i32,
                ledger_public_key: public(current).to_vec(),
                next_ledger_public_key: public(next).to_vec(),
            })),
        };
        (envelope::sign_event(&key(signer), &event), event)
    }

    /// Judges `step` at entry `seq` on a copy of `keys`; a refused step must leave the copy
    /// as it was.
    fn judge_at(
        keys: &LedgerKeys,
        (signed, event): (SignedEvent, Event),
        seq: u64,
    ) -> Result<LedgerKeys, Refusal> {
        let mut after = keys.clone();
        match after.judge(&signed, &event, seq) {
            Ok(evaluation) => {
                assert_eq!(evaluation.verdict, super::super::not_applicable());
                assert!(evaluation.delta.is_empty() && evaluation.index.is_empty());
                Ok(after)
            }
            Err(refusal) => {
                assert_eq!(&after, keys, "a refused step changed the keys");
                Err(refusal)
            }
        }
    }

    fn judge(keys: &LedgerKeys, step: (SignedEvent, Event)) -> Result<LedgerKeys, Refusal> {
        judge_at(keys, step, 10)
    }

    #[test]
    fn begin_then_finish_hands_the_ledger_to_the_next_key() {
        let start = genesis_keys();
        assert_eq!(start.active(), vec![public(1)]);
        assert_eq!(start.status(&public(1)), KeyStatus::Current { since: 0 });
        assert_eq!(start.status(&public(2)), KeyStatus::Unknown);
        let begun = judge_at(&start, step(Step::Begin, 1, 2, 1), 5).unwrap();
        assert_eq!(begun.active(), vec![public(1), public(2)]);
        assert_eq!(begun.next(), Some(&public(2)));
        assert_eq!(begun.status(&public(2)), KeyStatus::Next { since: 5 });
        let finished = judge_at(&begun, step(Step::Finish, 1, 2, 2), 9).unwrap();
        assert_eq!(finished.active(), vec![public(2)]);
        assert_eq!(finished.current(), &public(2));
        assert_eq!(finished.status(&public(1)), KeyStatus::Retired { at: 9 });
        assert_eq!(finished.status(&public(2)), KeyStatus::Current { since: 9 });
        // A second rotation goes on from the new key.
        let again = judge(&finished, step(Step::Begin, 2, 3, 2)).unwrap();
        assert_eq!(again.active(), vec![public(2), public(3)]);
    }

    #[test]
    fn cancel_withdraws_the_next_key_for_good() {
        let begun = judge(&genesis_keys(), step(Step::Begin, 1, 2, 1)).unwrap();
        let cancelled = judge_at(&begun, step(Step::Cancel, 1, 2, 1), 12).unwrap();
        assert_eq!(cancelled.active(), vec![public(1)]);
        assert_eq!(
            cancelled.status(&public(2)),
            KeyStatus::Withdrawn { at: 12 }
        );
        // The withdrawn key may not come back, nor may a former one.
        assert!(matches!(
            judge(&cancelled, step(Step::Begin, 1, 2, 1)),
            Err(Refusal::Conflict(_))
        ));
        let finished = judge(
            &judge(&cancelled, step(Step::Begin, 1, 3, 1)).unwrap(),
            step(Step::Finish, 1, 3, 3),
        )
        .unwrap();
        assert!(matches!(
            judge(&finished, step(Step::Begin, 3, 1, 3)),
            Err(Refusal::Conflict(_))
        ));
    }

    #[test]
    fn steps_out_of_order_or_by_the_wrong_key_are_refused() {
        let start = genesis_keys();
        let begun = judge(&start, step(Step::Begin, 1, 2, 1)).unwrap();
        let conflict = |r: Result<LedgerKeys, Refusal>| matches!(r, Err(Refusal::Conflict(_)));
        let wrong_key =
            |r: Result<LedgerKeys, Refusal>| matches!(r, Err(Refusal::KeyNotValid { .. }));
        // Nothing under way.
        assert!(conflict(judge(&start, step(Step::Finish, 1, 2, 2))));
        assert!(conflict(judge(&start, step(Step::Cancel, 1, 2, 1))));
        // Two at once; a finish or cancel naming another key; a stale current key.
        assert!(conflict(judge(&begun, step(Step::Begin, 1, 3, 1))));
        assert!(conflict(judge(&begun, step(Step::Finish, 1, 3, 3))));
        assert!(conflict(judge(&begun, step(Step::Cancel, 1, 3, 1))));
        assert!(conflict(judge(&start, step(Step::Begin, 4, 2, 4))));
        // Rotating to the current key.
        assert!(conflict(judge(&start, step(Step::Begin, 1, 1, 1))));
        // Signed by the wrong key: a begin by the next key, a finish by the old key, a
        // cancel by the next key, or by a stranger.
        assert!(wrong_key(judge(&start, step(Step::Begin, 1, 2, 2))));
        assert!(wrong_key(judge(&begun, step(Step::Finish, 1, 2, 1))));
        assert!(wrong_key(judge(&begun, step(Step::Cancel, 1, 2, 2))));
        assert!(wrong_key(judge(&start, step(Step::Begin, 1, 2, 7))));
        // A signature naming the right key id but made by another key.
        let (mut signed, event) = step(Step::Begin, 1, 2, 1);
        signed.signature = step(Step::Begin, 1, 2, 2).0.signature;
        assert!(matches!(
            judge(&start, (signed, event)),
            Err(Refusal::BadSignature(_))
        ));
        // Not a rotation at all, or an unspecified step.
        let (signed, mut event) = step(Step::Begin, 1, 2, 1);
        event.body = None;
        assert!(matches!(
            judge(&start, (signed, event)),
            Err(Refusal::Malformed(_))
        ));
        assert!(matches!(
            judge(&start, step(Step::Unspecified, 1, 2, 1)),
            Err(Refusal::Malformed(_))
        ));
    }
}
