//! Hostile input (issue #6): arbitrary and mutated bytes fed to the event decoders a client
//! reaches: the `SignedEvent` envelope, its `Event` payload with [`validate_event`], public
//! keys, and signatures. Never a panic; always a typed error; and a changed payload or
//! signature never verifies.

use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use prost::Message as _;

use super::*;
use crate::mutate::{apply, mutations};
use crate::proto::{event::Body, revocation::Target, Event, SignedEvent};
use crate::trust::{validate_event, Refusal};

fn signer() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

/// One well-formed event of every kind (each passes [`validate_event`]).
fn valid_events() -> Vec<Event> {
    use crate::proto::*;
    let key = |seed: u8| {
        SigningKey::from_bytes(&[seed; 32])
            .verifying_key()
            .to_bytes()
    };
    let bodies = vec![
        Body::Genesis(Genesis {
            origin: "example/ledger".into(),
            admin_public_key: key(1).to_vec(),
            ledger_public_key: key(2).to_vec(),
            max_clock_skew_ms: 60_000,
        }),
        Body::KeyGrant(KeyGrant {
            public_key: key(3).to_vec(),
            role: Role::User as i32,
            principal: "alice".into(),
            not_before_ms: 0,
            not_after_ms: 0,
        }),
        Body::KeyRevocation(KeyRevocation {
            key_id: "0123456789abcdef0123456789abcdef".into(),
            reason: "rotated".into(),
        }),
        Body::Consent(Consent {
            consent_id: "c1".into(),
            user: "alice".into(),
            agent: "assistant".into(),
            scopes: vec!["mail:read".into()],
            audiences: vec!["mail.example".into()],
            expires_at_ms: 1_800_000_000_000,
            purpose: "summaries".into(),
            consent_text_sha256: vec![5; 32],
            max_delegation_depth: 2,
            allowed_delegates: vec!["helper".into()],
        }),
        Body::Issuance(Issuance {
            token_id: "t1".into(),
            token_sha256: vec![7; 32],
            consent_id: "c1".into(),
            parent_token_id: String::new(),
            user: "alice".into(),
            agent: "assistant".into(),
            scopes: vec!["mail:read".into()],
            audiences: vec!["mail.example".into()],
            not_before_ms: 1_700_000_000_000,
            expires_at_ms: 1_700_000_600_000,
            grant_type: "authorization_code".into(),
        }),
        Body::Validation(Validation {
            token_id: "t1".into(),
            token_sha256: vec![7; 32],
            resource_server: "mail.example".into(),
            valid: true,
            reason: String::new(),
        }),
        Body::Action(Action {
            token_id: "t1".into(),
            resource_server: "mail.example".into(),
            agent: "assistant".into(),
            operation: "mail:read".into(),
            resource: "inbox".into(),
            request_sha256: vec![9; 32],
        }),
        Body::Denial(Denial {
            token_id: "t1".into(),
            resource_server: "mail.example".into(),
            agent: "assistant".into(),
            operation: "mail:send".into(),
            resource: "outbox".into(),
            reason: DenialReason::InsufficientScope as i32,
            detail: "no".into(),
        }),
        Body::Revocation(Revocation {
            target: Some(Target::TokenId("t1".into())),
            reason: "compromised".into(),
        }),
    ];
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| Event {
            event_id: format!("event-{i}"),
            occurred_at_ms: 1_700_000_000_000,
            body: Some(body),
        })
        .collect()
}

/// Decodes a payload and checks its shape as the ledger does: no panic, and a failure is a
/// [`Refusal::Malformed`].
fn check_payload(payload: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(event) = Event::decode(payload) {
        match validate_event(&event, payload.len()) {
            Ok(()) | Err(Refusal::Malformed(_)) => {}
            Err(other) => prop_assert!(false, "shape check refused with {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn the_sample_events_are_well_formed() {
    for event in valid_events() {
        validate_event(&event, event.encoded_len()).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes as a `SignedEvent`, as an `Event`, and as an event's payload.
    #[test]
    fn arbitrary_bytes_decode_or_fail_typed(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_payload(&bytes)?;
        if let Ok(signed) = SignedEvent::decode(bytes.as_slice()) {
            check_payload(&signed.payload)?;
            let key = signer().verifying_key();
            prop_assert!(verify_payload(&key, &signed.payload, &signed.signature).is_err());
        }
    }

    /// A valid signed event of each kind, its encoded envelope mutated: whatever still
    /// decodes is checked as the ledger checks it, and verifies only if the payload and the
    /// signature are the original ones.
    #[test]
    fn mutated_signed_events_verify_only_if_unchanged(
        which in any::<prop::sample::Index>(),
        edits in mutations(4),
    ) {
        let events = valid_events();
        let event = which.get(&events);
        let original = sign_event(&signer(), event);
        let bytes = apply(&original.encode_to_vec(), &edits);
        let Ok(signed) = SignedEvent::decode(bytes.as_slice()) else {
            return Ok(());
        };
        check_payload(&signed.payload)?;
        let verified = verify_payload(&signer().verifying_key(), &signed.payload, &signed.signature);
        let unchanged = signed.payload == original.payload && signed.signature == original.signature;
        prop_assert_eq!(verified.is_ok(), unchanged, "{:?}", verified);
        if signed.signature.len() != 64 {
            prop_assert_eq!(
                verified,
                Err(SignatureError::MalformedSignature { len: signed.signature.len() })
            );
        }
    }

    /// Mutated payloads alone (the event's own bytes): decode or fail; the shape check never
    /// panics and refuses only as malformed.
    #[test]
    fn mutated_payloads_are_checked_without_panics(
        which in any::<prop::sample::Index>(),
        edits in mutations(6),
    ) {
        let events = valid_events();
        let payload = apply(&which.get(&events).encode_to_vec(), &edits);
        check_payload(&payload)?;
    }

    /// Arbitrary signatures of any length never verify; the error says why.
    #[test]
    fn arbitrary_signatures_are_refused(
        payload in prop::collection::vec(any::<u8>(), 0..64),
        signature in prop::collection::vec(any::<u8>(), 0..80),
    ) {
        let verified = verify_payload(&signer().verifying_key(), &payload, &signature);
        if signature.len() == 64 {
            prop_assert_eq!(verified, Err(SignatureError::BadSignature));
        } else {
            prop_assert_eq!(verified, Err(SignatureError::MalformedSignature { len: signature.len() }));
        }
    }

    /// Arbitrary public key bytes: parsed exactly, or refused with a reason.
    #[test]
    fn arbitrary_public_keys_parse_exactly_or_fail_typed(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 32),
            prop::collection::vec(any::<u8>(), 0..40),
        ],
    ) {
        match parse_public_key(&bytes) {
            Ok(key) => prop_assert_eq!(key.as_bytes().as_slice(), bytes.as_slice()),
            Err(error) => prop_assert!(matches!(
                error,
                SignatureError::MalformedKey | SignatureError::WeakKey
            )),
        }
        if parse_grantable_key(&bytes).is_ok() {
            prop_assert!(parse_public_key(&bytes).is_ok());
        }
    }

    /// A batch of valid signatures, some of them (or their payloads) mutated: every item's
    /// result is what verifying it alone gives.
    #[test]
    fn batches_with_mutated_items_agree_with_single_verification(
        edits in prop::collection::vec(prop::option::of((any::<bool>(), mutations(2))), 1..6),
    ) {
        let key = signer();
        let items: Vec<(Vec<u8>, Vec<u8>)> = edits
            .iter()
            .enumerate()
            .map(|(i, edit)| {
                let payload = format!("payload {i}").into_bytes();
                let signature = sign_payload(&key, &payload).to_vec();
                match edit {
                    None => (payload, signature),
                    Some((true, edits)) => (apply(&payload, edits), signature),
                    Some((false, edits)) => (payload, apply(&signature, edits)),
                }
            })
            .collect();
        let batch: Vec<BatchItem<'_>> = items
            .iter()
            .map(|(payload, signature)| BatchItem {
                key: key.verifying_key(),
                payload,
                signature,
            })
            .collect();
        let alone: Vec<bool> = items
            .iter()
            .map(|(payload, signature)| {
                verify_payload(&key.verifying_key(), payload, signature).is_ok()
            })
            .collect();
        prop_assert_eq!(verify_batch(&batch), alone);
    }
}
