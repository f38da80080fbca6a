//! Signed events: the DSSE v1 pre-authentication encoding (PAE), Ed25519 signing and strict
//! verification, and key ids.
//!
//! A submitter encodes an `Event` to `payload` and signs
//! `PAE("application/vnd.custody.event.v1+protobuf", payload)`, where, as in
//! [DSSE v1](https://github.com/secure-systems-lab/dsse/blob/master/protocol.md),
//! `PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`.
//!
//! Pure: no I/O, no async. Shared by the server and the offline verifier.

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

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
    /// The signature is not 64 bytes.
    #[error("malformed signature: expected 64 bytes, got {len}")]
    MalformedSignature { len: usize },
    /// The signature does not verify under the key (strict RFC 8032 verification).
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

/// Strictly verifies `signature` over `PAE(PAYLOAD_TYPE, payload)` under `key`
/// (`verify_strict`: rejects small-order components and non-canonical encodings).
pub fn verify_payload(
    key: &VerifyingKey,
    payload: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    let sig_bytes: &[u8; 64] =
        signature
            .try_into()
            .map_err(|_| SignatureError::MalformedSignature {
                len: signature.len(),
            })?;
    let signature = Signature::from_bytes(sig_bytes);
    key.verify_strict(&pae(PAYLOAD_TYPE, payload), &signature)
        .map_err(|_| SignatureError::BadSignature)
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
/// verifies them one by one (strictly) to find the bad ones. Returns one result per item.
///
/// Batch verification accepts every signature `verify_strict` accepts, but not only those:
/// a signature whose `R` has a small-order component, which only the key's holder can make,
/// passes a batch with some probability (the random coefficients may cancel the torsion).
/// Such a signature is still the key holder's own, not a forgery; callers that need exactly
/// `verify_strict`'s answer (the server, a rebuild) must not rely on a batch result.
pub fn verify_batch(items: &[BatchItem<'_>]) -> Vec<bool> {
    let mut messages = Vec::with_capacity(items.len());
    let mut signatures = Vec::with_capacity(items.len());
    let mut keys = Vec::with_capacity(items.len());
    let mut well_formed = true;
    for item in items {
        match <&[u8; 64]>::try_from(item.signature) {
            Ok(bytes) => signatures.push(Signature::from_bytes(bytes)),
            Err(_) => well_formed = false,
        }
        messages.push(pae(PAYLOAD_TYPE, item.payload));
        keys.push(item.key);
    }
    if well_formed {
        let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        if ed25519_dalek::verify_batch(&refs, &signatures, &keys).is_ok() {
            return vec![true; items.len()];
        }
    }
    items
        .iter()
        .map(|item| verify_payload(&item.key, item.payload, item.signature).is_ok())
        .collect()
}

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
    }
}
