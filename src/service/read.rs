//! The index-backed reads: `Query` (filters answered from the secondary indexes) and `Trace`
//! (everything needed to check one entry's chain of trust offline). Blocking: call from a
//! blocking thread.

use std::collections::BTreeSet;

use prost::Message as _;
use tonic::Status;

use crate::ledger::{decode_entry, Ledger};
use crate::merkle;
use crate::proto::{
    event::Body, Checkpoint, EventKind, InclusionProof, QueryRequest, StoredEntry, TraceBundle,
    TraceStatus,
};
use crate::store::{keys, StoreError};
use crate::trust;

use super::status;

/// Entries a query returns when it names no limit.
pub const DEFAULT_QUERY_LIMIT: u32 = 100;
/// Most entries one query page returns, whatever the request asks.
pub const MAX_QUERY_LIMIT: u32 = 1000;
/// Most candidate entries one query page examines before it stops (see `query`).
pub const MAX_QUERY_SCAN: usize = 200_000;
/// Most validations of the traced token a trace bundle carries (newest first).
pub const MAX_TRACE_VALIDATIONS: usize = 64;

fn storage(error: StoreError) -> Status {
    status::storage(&error)
}

fn stored_entry(ledger: &Ledger, seq: u64) -> Result<(StoredEntry, crate::proto::Event), Status> {
    let bytes = ledger
        .store()
        .entry(seq)
        .map_err(storage)?
        .ok_or_else(|| storage(StoreError::Corrupt(format!("entry {seq} is missing"))))?;
    let decoded = decode_entry(seq, &bytes).map_err(storage)?;
    let payload = decoded
        .event
        .as_ref()
        .map(|e| e.payload.as_slice())
        .unwrap_or_default();
    let event = crate::proto::Event::decode(payload)
        .map_err(|e| storage(StoreError::Corrupt(format!("entry {seq} payload: {e}"))))?;
    Ok((
        StoredEntry {
            entry: bytes,
            decoded: Some(decoded),
        },
        event,
    ))
}

/// Answers a query: entries matching every given filter, newest first unless ascending, at
/// most `limit` (capped by [`MAX_QUERY_LIMIT`]). At most [`MAX_QUERY_SCAN`] candidates are
/// examined: past that a partial page is returned, or, if nothing matched yet,
/// `RESOURCE_EXHAUSTED` naming the seq to resume from.
pub fn query(ledger: &Ledger, request: &QueryRequest) -> Result<Vec<StoredEntry>, Status> {
    query_scanning(ledger, request, MAX_QUERY_SCAN)
}

/// [`query`] examining at most `max_scan` candidate entries.
pub fn query_scanning(
    ledger: &Ledger,
    request: &QueryRequest,
    max_scan: usize,
) -> Result<Vec<StoredEntry>, Status> {
    let mut kinds = Vec::with_capacity(request.kinds.len());
    for &kind in &request.kinds {
        match EventKind::try_from(kind) {
            Ok(EventKind::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "kinds: {kind} is not an event kind"
                )))
            }
            Ok(_) => kinds.push(kind),
        }
    }
    kinds.sort_unstable();
    kinds.dedup();
    if TraceStatus::try_from(request.status).is_err() {
        return Err(Status::invalid_argument(format!(
            "status: {} is not a trace status",
            request.status
        )));
    }
    if request.to_ms != 0 && request.from_ms >= request.to_ms {
        return Err(Status::invalid_argument("from_ms must be before to_ms"));
    }
    let limit = match request.limit {
        0 => DEFAULT_QUERY_LIMIT,
        n => n.min(MAX_QUERY_LIMIT),
    } as usize;

    // Index terms, most selective first; the first drives the scan, the rest are probed.
    let mut terms: Vec<Vec<u8>> = Vec::new();
    for (tag, value) in [
        (keys::FIELD_TOKEN, &request.token_id),
        (keys::FIELD_CONSENT, &request.consent_id),
        (keys::FIELD_USER, &request.user),
        (keys::FIELD_AGENT, &request.agent),
        (keys::FIELD_RESOURCE_SERVER, &request.resource_server),
    ] {
        if !value.is_empty() {
            terms.push(keys::index_prefix(tag, value));
        }
    }
    if let [kind] = kinds.as_slice() {
        terms.push(keys::index_prefix(keys::FIELD_KIND, &kind.to_string()));
    }
    if request.status != TraceStatus::Unspecified as i32 {
        terms.push(keys::index_prefix(
            keys::FIELD_STATUS,
            &request.status.to_string(),
        ));
    }

    let tree_size = ledger.head().tree_size;
    let descending = !request.ascending;
    let (after, before) = if request.ascending {
        (request.after_seq, Some(tree_size))
    } else {
        let before = match request.before_seq {
            0 => tree_size,
            n => n.min(tree_size),
        };
        (None, Some(before))
    };
    let candidates: Box<dyn Iterator<Item = Result<u64, StoreError>>> = match terms.first() {
        Some(primary) => ledger
            .store()
            .index_seqs(primary, after, before, descending),
        None => {
            let low = after.map_or(0, |a| a.saturating_add(1));
            let high = before.unwrap_or(tree_size);
            if descending {
                Box::new((low..high).rev().map(Ok))
            } else {
                Box::new((low..high).map(Ok))
            }
        }
    };
    let mut found = Vec::new();
    let mut scanned = 0usize;
    'candidates: for candidate in candidates {
        let seq = candidate.map_err(storage)?;
        scanned += 1;
        if scanned > max_scan {
            // Bound the work of one request. A partial page lets the client resume from its
            // last seq; an empty one gets an error naming where to resume.
            if found.is_empty() {
                let (field, value) = if request.ascending {
                    ("after_seq", seq.saturating_sub(1))
                } else {
                    ("before_seq", seq.saturating_add(1))
                };
                return Err(Status::resource_exhausted(format!(
                    "scanned {max_scan} candidate entries without a match; narrow the filters \
                     (user, agent, token, consent, resource server, one kind, status) or resume \
                     with {field} = {value}"
                )));
            }
            break;
        }
        for term in terms.iter().skip(1) {
            if !ledger.store().index_contains(term, seq).map_err(storage)? {
                continue 'candidates;
            }
        }
        let (stored, event) = stored_entry(ledger, seq)?;
        let kind = trust::event_kind(event.body.as_ref()) as i32;
        if kinds.len() > 1 && kinds.binary_search(&kind).is_err() {
            continue;
        }
        if (request.from_ms != 0 && event.occurred_at_ms < request.from_ms)
            || (request.to_ms != 0 && event.occurred_at_ms >= request.to_ms)
        {
            continue;
        }
        found.push(stored);
        if found.len() >= limit {
            break;
        }
    }
    Ok(found)
}

/// Builds the trace bundle of entry `seq`: the entry; for a token event, the token's
/// validations, its issuance chain, the consent and the revocations that touch them; the key
/// grants (and key revocations) of every signer, back to the genesis; and an inclusion proof
/// for each against the newest checkpoint.
pub fn trace(ledger: &Ledger, seq: u64) -> Result<TraceBundle, Status> {
    let head = ledger.head();
    if seq >= head.tree_size {
        return Err(Status::out_of_range(format!(
            "entry {seq} is beyond the newest checkpoint's tree size {}",
            head.tree_size
        )));
    }
    let (target, event) = stored_entry(ledger, seq)?;
    let token_id = match &event.body {
        Some(Body::Action(a)) => a.token_id.clone(),
        Some(Body::Validation(v)) => v.token_id.clone(),
        Some(Body::Issuance(i)) => i.token_id.clone(),
        Some(Body::Denial(d)) => d.token_id.clone(),
        _ => {
            return Err(Status::invalid_argument(format!(
                "entry {seq} is not an action, denial, validation or issuance"
            )))
        }
    };
    let store = ledger.store();
    let mut seqs = BTreeSet::from([seq]);
    if let Some(token) = store
        .token(&token_id)
        .map_err(storage)?
        .filter(|_| !token_id.is_empty())
    {
        seqs.extend(token.chain.iter().copied());
        seqs.extend(token.consent_seq);
        // Every link the rules walk: its issuance, its revocations, its consent and the
        // consent's revocations (links may name other consents than the token's).
        let mut link = Some(token.clone());
        let mut walked = 0;
        while let Some(current) = link.take() {
            seqs.insert(current.seq);
            seqs.extend(current.revocation_seqs.iter().copied());
            if let Some(consent) = store.consent(&current.consent_id).map_err(storage)? {
                seqs.insert(consent.seq);
                seqs.extend(consent.revocation_seqs.iter().copied());
            }
            walked += 1;
            if !current.parent_token_id.is_empty()
                && walked <= trust::MAX_DELEGATION_DEPTH as usize + 2
            {
                link = store.token(&current.parent_token_id).map_err(storage)?;
            }
        }
        let validations = keys::index_prefix(
            keys::FIELD_KIND,
            &(EventKind::Validation as i32).to_string(),
        );
        let mut found = 0;
        for candidate in store.index_seqs(
            &keys::index_prefix(keys::FIELD_TOKEN, &token_id),
            None,
            Some(head.tree_size),
            true,
        ) {
            let candidate = candidate.map_err(storage)?;
            if store
                .index_contains(&validations, candidate)
                .map_err(storage)?
            {
                seqs.insert(candidate);
                found += 1;
                if found >= MAX_TRACE_VALIDATIONS {
                    break;
                }
            }
        }
    }
    // Close over signers: every entry's key grant (and revocation), and the grants' signers.
    let mut entries = std::collections::BTreeMap::new();
    let mut pending: Vec<u64> = seqs.iter().copied().collect();
    while let Some(next) = pending.pop() {
        // State may already name entries of a batch whose checkpoint is not yet published.
        if entries.contains_key(&next) || next >= head.tree_size {
            continue;
        }
        let (stored, _) = if next == seq {
            (target.clone(), event.clone())
        } else {
            stored_entry(ledger, next)?
        };
        let key_id = stored
            .decoded
            .as_ref()
            .and_then(|e| e.event.as_ref())
            .map(|e| e.key_id.clone())
            .unwrap_or_default();
        if let Some(record) = store.key(&key_id).map_err(storage)? {
            pending.push(record.grant_seq);
            pending.extend(record.revocation_seq);
        }
        if next != 0 {
            pending.push(0); // the genesis: the root of the key registry
        }
        entries.insert(next, stored);
    }
    let mut proofs = Vec::with_capacity(entries.len());
    for &entry_seq in entries.keys() {
        let hashes = merkle::inclusion_proof(entry_seq, head.tree_size, store)
            .map_err(|e| status::proof(&e))?;
        proofs.push(InclusionProof {
            seq: entry_seq,
            tree_size: head.tree_size,
            hashes: hashes.into_iter().map(|h| h.0.to_vec()).collect(),
        });
    }
    Ok(TraceBundle {
        checkpoint: Some(Checkpoint {
            note: head.checkpoint.clone(),
            tree_size: head.tree_size,
            root_hash: head.root.0.to_vec(),
        }),
        verdict: target.decoded.as_ref().and_then(|e| e.verdict.clone()),
        entries: entries.into_values().collect(),
        proofs,
        seq,
    })
}
