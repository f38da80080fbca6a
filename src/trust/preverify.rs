//! Signature pre-verification for a run of events: guess each signer's key (registered
//! before the run, or granted by an earlier event of the run), then check all signatures on
//! every core, either strictly one by one ([`Check::Strict`], what the server uses, so that
//! acceptance is deterministic and equal to a rebuild's) or with Ed25519 batch verification
//! ([`Check::Batch`], the offline verifier's fast path: it accepts every strictly valid
//! signature; it may also accept a signature with a torsion component in `R`, which only the
//! key's holder can make and which the server would have refused; see
//! [`envelope::verify_batch`]). The result is only a hint for
//! [`authenticate`](super::authenticate): it skips the signature check when the key that
//! actually signs (as the rules find it, in order) is the key the hint verified under, and
//! verifies strictly otherwise.

use std::collections::HashMap;

use crate::envelope::{self, BatchItem};
use crate::proto::{event::Body, Event, SignedEvent};

/// How signatures are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// `verify_strict`, one signature at a time (spread over the cores).
    Strict,
    /// Ed25519 batch verification per core, falling back to strict to find a bad signature.
    Batch,
}

/// For each event, the public key its signature verified under, if any. `registered` looks a
/// key id up in the state before the run.
pub fn preverify<'a>(
    events: impl IntoIterator<Item = (&'a SignedEvent, Option<&'a Event>)>,
    mut registered: impl FnMut(&str) -> Option<[u8; 32]>,
    check: Check,
) -> Vec<Option<[u8; 32]>> {
    let mut granted: HashMap<String, [u8; 32]> = HashMap::new();
    let mut items: Vec<(usize, [u8; 32], BatchItem<'a>)> = Vec::new();
    let mut count = 0;
    for (i, (signed, event)) in events.into_iter().enumerate() {
        count = i + 1;
        let key = granted
            .get(&signed.key_id)
            .copied()
            .or_else(|| registered(&signed.key_id));
        if let Some(Event {
            body: Some(Body::KeyGrant(grant)),
            ..
        }) = event
        {
            if let Ok(granted_key) = <[u8; 32]>::try_from(grant.public_key.as_slice()) {
                granted.insert(envelope::key_id(&granted_key), granted_key);
            }
        }
        let Some(key) = key else { continue };
        let Ok(verifying) = envelope::parse_public_key(&key) else {
            continue;
        };
        items.push((
            i,
            key,
            BatchItem {
                key: verifying,
                payload: &signed.payload,
                signature: &signed.signature,
            },
        ));
    }
    let mut preverified = vec![None; count];
    if items.is_empty() {
        return preverified;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = items.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(per_thread)
            .map(|part| {
                scope.spawn(move || {
                    let batch: Vec<BatchItem<'_>> = part
                        .iter()
                        .map(|(_, _, item)| BatchItem {
                            key: item.key,
                            payload: item.payload,
                            signature: item.signature,
                        })
                        .collect();
                    let results = match check {
                        Check::Batch => envelope::verify_batch(&batch),
                        Check::Strict => batch
                            .iter()
                            .map(|item| {
                                envelope::verify_payload(&item.key, item.payload, item.signature)
                                    .is_ok()
                            })
                            .collect(),
                    };
                    part.iter()
                        .zip(results)
                        .map(|((i, key, _), ok)| (*i, ok.then_some(*key)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            // A panicked thread leaves its events to strict verification.
            for (i, key) in handle.join().unwrap_or_default() {
                preverified[i] = key;
            }
        }
    });
    preverified
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{KeyGrant, Role};
    use ed25519_dalek::SigningKey;

    #[test]
    fn follows_grants_within_the_run_and_flags_bad_signatures() {
        let admin = SigningKey::from_bytes(&[1; 32]);
        let fresh = SigningKey::from_bytes(&[2; 32]);
        let grant = Event {
            event_id: "g".into(),
            occurred_at_ms: 1,
            body: Some(Body::KeyGrant(KeyGrant {
                public_key: fresh.verifying_key().to_bytes().to_vec(),
                role: Role::Issuer as i32,
                principal: "as".into(),
                ..KeyGrant::default()
            })),
        };
        let other = Event {
            event_id: "x".into(),
            occurred_at_ms: 1,
            body: None,
        };
        let events = [
            (envelope::sign_event(&admin, &grant), Some(grant.clone())),
            (envelope::sign_event(&fresh, &other), Some(other.clone())),
            (
                envelope::sign_event(&SigningKey::from_bytes(&[3; 32]), &other),
                Some(other.clone()),
            ),
            (
                {
                    let mut bad = envelope::sign_event(&fresh, &other);
                    bad.signature[0] ^= 1;
                    bad
                },
                Some(other.clone()),
            ),
        ];
        let admin_key = admin.verifying_key().to_bytes();
        let admin_id = envelope::key_id(&admin_key);
        for check in [Check::Strict, Check::Batch] {
            let result = preverify(
                events.iter().map(|(s, e)| (s, e.as_ref())),
                |id| (id == admin_id).then_some(admin_key),
                check,
            );
            assert_eq!(result[0], Some(admin_key));
            assert_eq!(
                result[1],
                Some(fresh.verifying_key().to_bytes()),
                "granted earlier in the run"
            );
            assert_eq!(result[2], None, "unknown signer");
            assert_eq!(result[3], None, "bad signature");
        }
    }
}
