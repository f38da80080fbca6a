//! Signed events: the DSSE v1 pre-authentication encoding (PAE), Ed25519 signing and
//! verification, and key ids.
//!
//! # The signature rule
//!
//! A signature `(R, s)` by public key `A` over message `M = PAE(PAYLOAD_TYPE, payload)` is
//! valid when `s` is canonical (`s < ℓ`), `R` decodes to a curve point, and the *cofactored*
//! RFC 8032 equation holds: `[8]([s]B − [k]A − R) = 0` with `k = SHA-512(R ‖ A ‖ M) mod ℓ`.
//! Keys are refused when they are registered unless they lie in the prime-order subgroup
//! ([`parse_grantable_key`]), as every key made by standard key generation does; so an
//! honest signer's signatures are also valid under the strict (cofactorless) RFC 8032 check
//! that other tools use (libsodium, Go's `crypto/ed25519`, `verify_strict`).
//!
//! This is the rule of ZIP 215, chosen because it makes batch verification exact: a batch
//! that passes contains only valid signatures (except with negligible probability), and a
//! batch that fails is settled signature by signature with the same rule, so whether an event
//! is accepted never depends on which other events shared its batch. The server, a rebuild
//! and the offline verifier therefore always agree. Every signature RFC 8032's strict
//! verification (`verify_strict`) accepts is valid here; beyond those, the rule also accepts
//! signatures whose `R` differs by a small-order point, which only the key's holder can make
//! (they are not forgeries, and a third party cannot turn one valid signature into another:
//! `s` must be canonical and any change to `R` changes `k`). Such an entry is the key
//! holder's own deliberate act; an auditor checking signatures with a cofactorless tool would
//! report it as a bad signature, and `custody verify` accepts it.
//!
//! A submitter encodes an `Event` to `payload` and signs
//! `PAE("application/vnd.custody.event.v1+protobuf", payload)`, where, as in
//! [DSSE v1](https://github.com/secure-systems-lab/dsse/blob/master/protocol.md),
//! `PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`.
//!
//! Pure: no I/O, no async. Shared by the server and the offline verifier.

use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::IsIdentity as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256, Sha512};

/// The DSSE payload type of every custody event.
pub const PAYLOAD_TYPE: &str = "application/vnd.custody.event.v1+protobuf";

/// Length of an Ed25519 public key in bytes.
pub const PUBLIC_KEY_LEN: usize = 32;

/// DSSE v1 pre-authentication encoding of `body` under `payload_type`.
pub fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let type_len = payload_type.len().to_string();
    let body_len = body.len().to_string();
    let mut out = Vec::with_capacity(
        6 + 3 + type_len.len() + payload_type.len() + body_len.len() + body.len(),
    );
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(type_len.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body_len.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body);
    out
}

/// The key id of an Ed25519 public key: lowercase hex of the first 16 bytes of
/// SHA-256(public key), 32 characters.
pub fn key_id(public_key: &[u8; PUBLIC_KEY_LEN]) -> String {
    hex::encode(&Sha256::digest(public_key)[..16])
}

/// Signs an event payload: Ed25519 over `PAE(PAYLOAD_TYPE, payload)`.
pub fn sign_payload(signing_key: &SigningKey, payload: &[u8]) -> [u8; 64] {
    signing_key.sign(&pae(PAYLOAD_TYPE, payload)).to_bytes()
}

/// Encodes `event` and signs it: the `SignedEvent` a client submits.
pub fn sign_event(
    signing_key: &SigningKey,
    event: &crate::proto::Event,
) -> crate::proto::SignedEvent {
    let payload = prost::Message::encode_to_vec(event);
    crate::proto::SignedEvent {
        signature: sign_payload(signing_key, &payload).to_vec(),
        key_id: key_id(&signing_key.verifying_key().to_bytes()),
        payload,
    }
}

/// Why a public key or a signature was not accepted. A value, so callers can match on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// The public key is not 32 bytes or not a valid curve point encoding.
    #[error("malformed public key")]
    MalformedKey,
    /// The public key has small order; such keys are refused at registration because batch
    /// and strict verification would disagree about them.
    #[error("weak public key (small order)")]
    WeakKey,
    /// The public key has a small-order component: it is not in the prime-order subgroup, so
    /// no standard key generation made it.
    #[error("public key with a small-order component (not in the prime-order subgroup)")]
    MixedOrderKey,
    /// The signature is not 64 bytes.
    #[error("malformed signature: expected 64 bytes, got {len}")]
    MalformedSignature { len: usize },
    /// The signature does not verify under the key (the rule in the module docs).
    #[error("signature does not verify")]
    BadSignature,
}

/// Parses a 32-byte Ed25519 public key, refusing weak (small-order) keys.
pub fn parse_public_key(bytes: &[u8]) -> Result<VerifyingKey, SignatureError> {
    let array: &[u8; PUBLIC_KEY_LEN] =
        bytes.try_into().map_err(|_| SignatureError::MalformedKey)?;
    let key = VerifyingKey::from_bytes(array).map_err(|_| SignatureError::MalformedKey)?;
    if key.is_weak() {
        return Err(SignatureError::WeakKey);
    }
    Ok(key)
}

/// Parses a public key that is to be registered (a key grant, the genesis keys): as
/// [`parse_public_key`], and the key must lie in the prime-order subgroup. Costs a scalar
/// multiplication, so it is for registration, not for every signature.
pub fn parse_grantable_key(bytes: &[u8]) -> Result<VerifyingKey, SignatureError> {
    let key = parse_public_key(bytes)?;
    if !key.to_edwards().is_torsion_free() {
        return Err(SignatureError::MixedOrderKey);
    }
    Ok(key)
}

/// Verifies `signature` over `PAE(PAYLOAD_TYPE, payload)` under `key` by the signature
/// rule in the module docs (cofactored, canonical `s`).
pub fn verify_payload(
    key: &VerifyingKey,
    payload: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    let bytes: &[u8; 64] =
        signature
            .try_into()
            .map_err(|_| SignatureError::MalformedSignature {
                len: signature.len(),
            })?;
    let (r_bytes, s_bytes) = bytes.split_at(32);
    let r_bytes: [u8; 32] = r_bytes
        .try_into()
        .map_err(|_| SignatureError::BadSignature)?;
    let s_bytes: [u8; 32] = s_bytes
        .try_into()
        .map_err(|_| SignatureError::BadSignature)?;
    let s = Option::<Scalar>::from(Scalar::from_canonical_bytes(s_bytes))
        .ok_or(SignatureError::BadSignature)?;
    let r = CompressedEdwardsY(r_bytes)
        .decompress()
        .ok_or(SignatureError::BadSignature)?;
    let k = Scalar::from_hash(
        Sha512::new()
            .chain_update(r_bytes)
            .chain_update(key.as_bytes())
            .chain_update(pae(PAYLOAD_TYPE, payload)),
    );
    let difference =
        EdwardsPoint::vartime_double_scalar_mul_basepoint(&(-k), &key.to_edwards(), &s) - r;
    if difference.mul_by_cofactor().is_identity() {
        Ok(())
    } else {
        Err(SignatureError::BadSignature)
    }
}

/// One signature to check in a batch: the key, the payload, the signature bytes.
pub struct BatchItem<'a> {
    /// The signer's key.
    pub key: VerifyingKey,
    /// The signed payload (the PAE is computed here).
    pub payload: &'a [u8],
    /// The signature bytes.
    pub signature: &'a [u8],
}

/// Verifies many signatures at once with Ed25519 batch verification; if the batch fails,
/// verifies them one by one with [`verify_payload`] to find the bad ones. Returns one result
/// per item, always equal to [`verify_payload`]'s (see the module docs: a passing batch holds
/// only signatures valid by the cofactored rule).
///
/// The batch is ZIP 215 batch verification (`ed25519-zebra`, the Zcash Foundation's
/// implementation of that rule): one random linear combination of the cofactored equations,
/// with the terms of signatures by the same key added up first, so a batch that a hundred
/// keys sign costs little more than one multiscalar multiplication over its `R`s.
pub fn verify_batch(items: &[BatchItem<'_>]) -> Vec<bool> {
    if zip215_batch_holds(items) {
        return vec![true; items.len()];
    }
    items
        .iter()
        .map(|item| verify_payload(&item.key, item.payload, item.signature).is_ok())
        .collect()
}

/// Whether every signature in `items` is valid, by one ZIP 215 batch equation (false also
/// when some signature is not 64 bytes).
fn zip215_batch_holds(items: &[BatchItem<'_>]) -> bool {
    let mut batch = ed25519_zebra::batch::Verifier::new();
    for item in items {
        let Ok(bytes) = <[u8; 64]>::try_from(item.signature) else {
            return false;
        };
        let key = ed25519_zebra::VerificationKeyBytes::from(item.key.to_bytes());
        let message = pae(PAYLOAD_TYPE, item.payload);
        batch.queue((key, ed25519_zebra::Signature::from(bytes), &message));
    }
    batch.verify(rand::thread_rng()).is_ok()
}

/// ed25519-dalek's batch verification of `items` (the PAE of each payload): the rate the load
/// generator and the benchmarks report next to [`verify_batch`]'s. Its equation is
/// cofactorless and does not coalesce the terms of signatures by one key, so it is no
/// substitute for the fast path (a batch holding a signature with a small-order component in
/// `R`, valid by the rule, may fail it).
pub fn dalek_batch_holds(items: &[BatchItem<'_>]) -> bool {
    let mut messages = Vec::with_capacity(items.len());
    let mut signatures = Vec::with_capacity(items.len());
    let mut keys = Vec::with_capacity(items.len());
    for item in items {
        let Ok(bytes) = <&[u8; 64]>::try_from(item.signature) else {
            return false;
        };
        signatures.push(Signature::from_bytes(bytes));
        messages.push(pae(PAYLOAD_TYPE, item.payload));
        keys.push(item.key);
    }
    let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    ed25519_dalek::verify_batch(&refs, &signatures, &keys).is_ok()
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_vectors::{hex_field, load};

    #[test]
    fn reproduces_envelope_vector() {
        let v = load("envelope.json");
        let seed: [u8; 32] = hex_field(&v, "seed").try_into().unwrap();
        let signing_key = SigningKey::from_bytes(&seed);
        let public_key = signing_key.verifying_key().to_bytes();
        assert_eq!(public_key.to_vec(), hex_field(&v, "public_key"));
        assert_eq!(key_id(&public_key), v["key_id"].as_str().unwrap());
        assert_eq!(PAYLOAD_TYPE, v["payload_type"].as_str().unwrap());
        let payload = hex_field(&v, "payload");
        assert_eq!(pae(PAYLOAD_TYPE, &payload), hex_field(&v, "pae"));
        let signature = sign_payload(&signing_key, &payload);
        assert_eq!(signature.to_vec(), hex_field(&v, "signature"));
        verify_payload(&signing_key.verifying_key(), &payload, &signature).unwrap();
    }

    #[test]
    fn refuses_tampered_payload_and_signature() {
        let signing_key = SigningKey::from_bytes(&[7; 32]);
        let key = signing_key.verifying_key();
        let signature = sign_payload(&signing_key, b"payload");
        assert_eq!(
            verify_payload(&key, b"payloae", &signature),
            Err(SignatureError::BadSignature)
        );
        let mut bad = signature;
        bad[0] ^= 1;
        assert_eq!(
            verify_payload(&key, b"payload", &bad),
            Err(SignatureError::BadSignature)
        );
        assert_eq!(
            verify_payload(&key, b"payload", &signature[..63]),
            Err(SignatureError::MalformedSignature { len: 63 })
        );
    }

    #[test]
    fn batch_verification_finds_the_bad_signature() {
        let keys: Vec<SigningKey> = (1..=20u8)
            .map(|i| SigningKey::from_bytes(&[i; 32]))
            .collect();
        let payloads: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 10 + i as usize]).collect();
        let mut signatures: Vec<[u8; 64]> = keys
            .iter()
            .zip(&payloads)
            .map(|(k, p)| sign_payload(k, p))
            .collect();
        let items = |signatures: &[[u8; 64]]| -> Vec<bool> {
            let batch: Vec<BatchItem<'_>> = keys
                .iter()
                .zip(&payloads)
                .zip(signatures)
                .map(|((k, p), s)| BatchItem {
                    key: k.verifying_key(),
                    payload: p,
                    signature: s,
                })
                .collect();
            verify_batch(&batch)
        };
        assert!(items(&signatures).iter().all(|&ok| ok));
        signatures[13][7] ^= 1;
        let results = items(&signatures);
        assert_eq!(results.iter().filter(|&&ok| !ok).count(), 1);
        assert!(!results[13]);
    }

    /// A signature whose `R` carries a small-order point: valid by the cofactored rule (only
    /// the secret key's holder can make one), refused by `verify_strict`.
    fn torsion_signature(signing_key: &SigningKey, payload: &[u8], nonce: u64) -> [u8; 64] {
        use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT, EIGHT_TORSION};
        let expanded = Sha512::digest(signing_key.to_bytes());
        let mut lower = [0u8; 32];
        lower.copy_from_slice(&expanded[..32]);
        let a = Scalar::from_bytes_mod_order(curve25519_dalek::scalar::clamp_integer(lower));
        let r = Scalar::from(nonce + 1_000);
        let big_r = (ED25519_BASEPOINT_POINT * r + EIGHT_TORSION[1]).compress();
        let k = Scalar::from_hash(
            Sha512::new()
                .chain_update(big_r.as_bytes())
                .chain_update(signing_key.verifying_key().as_bytes())
                .chain_update(pae(PAYLOAD_TYPE, payload)),
        );
        let s = r + k * a;
        let mut signature = [0u8; 64];
        signature[..32].copy_from_slice(big_r.as_bytes());
        signature[32..].copy_from_slice(s.as_bytes());
        signature
    }

    #[test]
    fn the_rule_accepts_torsion_in_r_and_batches_always_agree_with_it() {
        let signer = SigningKey::from_bytes(&[5; 32]);
        let key = signer.verifying_key();
        let odd = torsion_signature(&signer, b"odd one", 0);
        assert!(key
            .verify_strict(&pae(PAYLOAD_TYPE, b"odd one"), &Signature::from_bytes(&odd))
            .is_err());
        assert_eq!(verify_payload(&key, b"odd one", &odd), Ok(()));
        let mut tampered = odd;
        tampered[40] ^= 1;
        assert_eq!(
            verify_payload(&key, b"odd one", &tampered),
            Err(SignatureError::BadSignature)
        );
        // The fast path's batch equation is cofactored, as the rule: it accepts every batch
        // holding the torsion signature. ed25519-dalek's cofactorless batch equation accepts
        // such a batch only when the random coefficient happens to cancel the torsion, so it
        // could not be the fast path. Either way every item gets the rule's answer.
        let others: Vec<(SigningKey, Vec<u8>)> = (0..16u8)
            .map(|i| (SigningKey::from_bytes(&[20 + i; 32]), vec![i; 30]))
            .collect();
        let mut batch_passed = 0;
        for round in 0..24u64 {
            let odd = torsion_signature(&signer, b"odd one", round);
            let good: Vec<[u8; 64]> = others.iter().map(|(k, p)| sign_payload(k, p)).collect();
            let mut items: Vec<BatchItem<'_>> = others
                .iter()
                .zip(&good)
                .take(1 + (round as usize % 16))
                .map(|((k, p), s)| BatchItem {
                    key: k.verifying_key(),
                    payload: p,
                    signature: s,
                })
                .collect();
            items.push(BatchItem {
                key,
                payload: b"odd one",
                signature: &odd,
            });
            let refs: Vec<&[u8]> = items.iter().map(|i| i.payload).collect();
            let messages: Vec<Vec<u8>> = refs.iter().map(|p| pae(PAYLOAD_TYPE, p)).collect();
            let message_refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
            let signatures: Vec<Signature> = items
                .iter()
                .map(|i| Signature::from_slice(i.signature).unwrap())
                .collect();
            let keys: Vec<VerifyingKey> = items.iter().map(|i| i.key).collect();
            if ed25519_dalek::verify_batch(&message_refs, &signatures, &keys).is_ok() {
                batch_passed += 1;
            }
            assert!(zip215_batch_holds(&items), "round {round}");
            assert!(verify_batch(&items).iter().all(|&ok| ok), "round {round}");
            // With one bad signature too, the fallback singles out exactly that one.
            let bad = {
                let mut bad = good[0];
                bad[3] ^= 1;
                bad
            };
            items[0].signature = &bad;
            assert!(!zip215_batch_holds(&items));
            let results = verify_batch(&items);
            assert!(
                !results[0] && results[1..].iter().all(|&ok| ok),
                "round {round}"
            );
        }
        // dalek's equation refused some of these batches and passed others.
        assert!(
            batch_passed > 0 && batch_passed < 24,
            "{batch_passed} of 24 passed"
        );
    }

    #[test]
    fn refuses_non_canonical_s() {
        let signer = SigningKey::from_bytes(&[6; 32]);
        let mut signature = sign_payload(&signer, b"p");
        // s + ℓ: the same scalar, encoded non-canonically (ℓ little-endian below).
        let mut carry = 0u16;
        let ell: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        for i in 0..32 {
            let sum = u16::from(signature[32 + i]) + u16::from(ell[i]) + carry;
            signature[32 + i] = sum as u8;
            carry = sum >> 8;
        }
        assert_eq!(
            verify_payload(&signer.verifying_key(), b"p", &signature),
            Err(SignatureError::BadSignature)
        );
    }

    #[test]
    fn refuses_weak_and_malformed_keys() {
        // The identity point (y = 1) has small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(parse_public_key(&identity), Err(SignatureError::WeakKey));
        assert_eq!(
            parse_public_key(&[1, 2, 3]),
            Err(SignatureError::MalformedKey)
        );
        let good = SigningKey::from_bytes(&[9; 32]).verifying_key();
        assert_eq!(parse_public_key(good.as_bytes()), Ok(good));
        assert_eq!(parse_grantable_key(good.as_bytes()), Ok(good));
        // A key plus a point of order 8: usable, but no key generation makes one.
        let mixed = (good.to_edwards() + curve25519_dalek::constants::EIGHT_TORSION[1]).compress();
        assert!(parse_public_key(mixed.as_bytes()).is_ok());
        assert_eq!(
            parse_grantable_key(mixed.as_bytes()),
            Err(SignatureError::MixedOrderKey)
        );
    }
}
