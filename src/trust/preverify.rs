//! Signature pre-verification for a run of events: guess each signer's key (registered
//! before the run, or named by an earlier grant or genesis of the run, see [`named_key`]), then check all signatures with
//! Ed25519 batch verification on every core, settling a failed batch signature by signature.
//! By the signature rule (see [`envelope`]), the answer for each event does not depend on the
//! batch it was in. The result is only a hint for [`authenticate`](super::authenticate): it
//! skips the signature check when the key that actually signs (as the rules find it, in
//! order) is the key the hint verified under, and verifies the signature itself otherwise.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use ed25519_dalek::VerifyingKey;

use crate::envelope::{self, BatchItem};
use crate::proto::{event::Body, Event, SignedEvent};

/// The key an event puts in the registry, by key id: the key a grant grants, or the first
/// admin key a genesis names.
pub fn named_key(event: &Event) -> Option<(String, [u8; 32])> {
    let key = match event.body.as_ref()? {
        Body::KeyGrant(grant) => grant.public_key.as_slice(),
        Body::Genesis(genesis) => genesis.admin_public_key.as_slice(),
        _ => return None,
    };
    let key = <[u8; 32]>::try_from(key).ok()?;
    Some((envelope::key_id(&key), key))
}

/// The number of threads that covers every core (at least one): what callers usually pass
/// to [`preverify`].
pub fn all_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Fewest signatures worth a thread of their own.
const MIN_PER_THREAD: usize = 128;

/// Most signatures verified in one batch equation. Bigger batches cost less per signature
/// (`custody verify` took about 10% longer with batches of 1,024 than of 8,192 on a 1M-entry
/// export); smaller ones share the work among threads more evenly.
const SUB_BATCH: usize = 8192;

/// For each event, the public key its signature verified under, if any. `registered` looks a
/// key id up in the state before the run. Uses up to `threads` threads (at least one).
pub fn preverify<'a>(
    events: impl IntoIterator<Item = (&'a SignedEvent, Option<&'a Event>)>,
    mut registered: impl FnMut(&str) -> Option<[u8; 32]>,
    threads: usize,
) -> Vec<Option<[u8; 32]>> {
    let mut granted: HashMap<String, [u8; 32]> = HashMap::new();
    // Decompressing a key costs about as much as a tenth of a verification; do it once per key.
    let mut parsed: HashMap<[u8; 32], Option<VerifyingKey>> = HashMap::new();
    let mut items: Vec<(usize, [u8; 32], BatchItem<'a>)> = Vec::new();
    let mut count = 0;
    for (i, (signed, event)) in events.into_iter().enumerate() {
        count = i + 1;
        let key = granted
            .get(&signed.key_id)
            .copied()
            .or_else(|| registered(&signed.key_id));
        if let Some((key_id, named)) = event.and_then(named_key) {
            granted.insert(key_id, named);
        }
        let Some(key) = key else { continue };
        let verifying = *parsed
            .entry(key)
            .or_insert_with(|| envelope::parse_public_key(&key).ok());
        let Some(verifying) = verifying else { continue };
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
    // A thread per core for large runs (the calling thread is one of them); small ones are not
    // worth a thread's start-up. The threads take batches in turn rather than a fixed share
    // each, so that one the scheduler leaves behind does not keep the others idle at the end.
    let threads = threads.clamp(1, items.len().div_ceil(MIN_PER_THREAD));
    // At most SUB_BATCH, and small enough that every thread gets a batch.
    let sub_batch = items.len().div_ceil(threads).min(SUB_BATCH);
    let batches = items.len().div_ceil(sub_batch);
    let next = AtomicUsize::new(0);
    let check = || {
        let mut checked = Vec::new();
        loop {
            let b = next.fetch_add(1, Ordering::Relaxed);
            if b >= batches {
                return checked;
            }
            let part = &items[b * sub_batch..((b + 1) * sub_batch).min(items.len())];
            let batch: Vec<BatchItem<'_>> = part
                .iter()
                .map(|(_, _, item)| BatchItem {
                    key: item.key,
                    payload: item.payload,
                    signature: item.signature,
                })
                .collect();
            checked.extend(
                part.iter()
                    .zip(envelope::verify_batch(&batch))
                    .map(|((i, key, _), ok)| (*i, ok.then_some(*key))),
            );
        }
    };
    let results: Vec<Vec<(usize, Option<[u8; 32]>)>> = if threads == 1 {
        vec![check()]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (1..threads).map(|_| scope.spawn(check)).collect();
            // A thread that panics (this one included) leaves the batches it took to be
            // verified one by one when judged: their entries stay None.
            let own = std::panic::catch_unwind(std::panic::AssertUnwindSafe(check));
            let mut results = vec![own.unwrap_or_default()];
            results.extend(handles.into_iter().map(|h| h.join().unwrap_or_default()));
            results
        })
    };
    for (i, key) in results.into_iter().flatten() {
        preverified[i] = key;
    }
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
        for threads in [1, 2, 3] {
            let result = preverify(
                events.iter().map(|(s, e)| (s, e.as_ref())),
                |id| (id == admin_id).then_some(admin_key),
                threads,
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

    #[test]
    fn threads_sharing_batches_flag_exactly_the_bad_signatures() {
        let key = SigningKey::from_bytes(&[4; 32]);
        let public = key.verifying_key().to_bytes();
        let id = envelope::key_id(&public);
        let event = |n: usize| Event {
            event_id: format!("e{n}"),
            occurred_at_ms: 1,
            body: None,
        };
        // Enough signatures for several batches per thread, bad ones in different batches.
        let bad = [0, 130, 131, 599, 1000];
        let events: Vec<(SignedEvent, Event)> = (0..1001)
            .map(|n| {
                let mut signed = envelope::sign_event(&key, &event(n));
                if bad.contains(&n) {
                    signed.signature[5] ^= 0x40;
                }
                (signed, event(n))
            })
            .collect();
        for threads in [1, 2, 4, 16] {
            let result = preverify(
                events.iter().map(|(s, e)| (s, Some(e))),
                |asked| (asked == id).then_some(public),
                threads,
            );
            assert_eq!(result.len(), events.len());
            for (n, got) in result.iter().enumerate() {
                let expected = (!bad.contains(&n)).then_some(public);
                assert_eq!(*got, expected, "event {n} with {threads} threads");
            }
        }
    }
}
