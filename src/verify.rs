//! Offline verification with nothing but the ledger's verifier key: trace bundles now, whole
//! exports later. Pure: it reads no files and opens no sockets; callers hand it bytes.

use prost::Message as _;

use crate::checkpoint::{self, CheckpointError, LedgerVerifier};
use crate::merkle::{self, ProofError};
use crate::proto::{Entry, Event, TraceBundle, Verdict};
use crate::trust::{self, MemoryState, Refusal};

/// Why a trace bundle does not verify. Every variant is a value a caller can match on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    /// The bundle's checkpoint does not open under the trusted key.
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    /// The bundle is not shaped as the contract says (counts, missing fields, order).
    #[error("malformed bundle: {0}")]
    Malformed(String),
    /// An entry's inclusion proof does not lead to the checkpoint's root.
    #[error("entry {seq}: inclusion proof: {error}")]
    Inclusion { seq: u64, error: ProofError },
    /// An entry would be refused when judged again (bad signature, unknown key, role ...).
    #[error("entry {seq} does not hold: {refusal}")]
    Refused { seq: u64, refusal: Refusal },
    /// The verdict recomputed from the bundle differs from the recorded one.
    #[error("entry {seq}: recorded verdict differs from the recomputed one")]
    VerdictMismatch {
        seq: u64,
        recorded: Box<Verdict>,
        recomputed: Box<Verdict>,
    },
}

/// What a verified trace bundle proves.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceReport {
    /// The traced entry.
    pub seq: u64,
    /// Its verdict, recomputed and equal to the recorded one.
    pub verdict: Verdict,
    /// The tree size of the checkpoint every proof is against.
    pub tree_size: u64,
    /// How many entries the bundle carried.
    pub entries: usize,
}

fn malformed(message: impl Into<String>) -> TraceError {
    TraceError::Malformed(message.into())
}

/// Verifies a trace bundle: the checkpoint's signature, every entry's inclusion proof against
/// it, every entry's signature and verdict judged again in ledger order from the bundle's
/// entries alone (the key registry replayed from the genesis and the key grants it carries),
/// and the traced entry's verdict.
pub fn verify_trace_bundle(
    bundle: &TraceBundle,
    key: &LedgerVerifier,
) -> Result<TraceReport, TraceError> {
    let note = bundle
        .checkpoint
        .as_ref()
        .ok_or_else(|| malformed("no checkpoint"))?;
    let checkpoint = checkpoint::open(&note.note, key)?;
    if bundle.entries.len() != bundle.proofs.len() {
        return Err(malformed(format!(
            "{} entries but {} proofs",
            bundle.entries.len(),
            bundle.proofs.len()
        )));
    }
    let mut entries = Vec::with_capacity(bundle.entries.len());
    for (stored, proof) in bundle.entries.iter().zip(&bundle.proofs) {
        // Only the stored bytes count; the `decoded` convenience copy is ignored.
        let entry = Entry::decode(stored.entry.as_slice())
            .map_err(|e| malformed(format!("entry does not decode: {e}")))?;
        let seq = entry.seq;
        if proof.seq != seq || proof.tree_size != checkpoint.tree_size() {
            return Err(malformed(format!(
                "proof for entry {seq} names seq {} in tree {}",
                proof.seq, proof.tree_size
            )));
        }
        let path = proof
            .hashes
            .iter()
            .map(|h| {
                merkle::hash_from_slice(h).ok_or_else(|| {
                    malformed(format!(
                        "proof for entry {seq} has a hash of {} bytes",
                        h.len()
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        merkle::verify_inclusion(
            &path,
            seq,
            checkpoint.tree_size(),
            merkle::leaf_hash(&stored.entry),
            checkpoint.root(),
        )
        .map_err(|error| TraceError::Inclusion { seq, error })?;
        entries.push(entry);
    }
    entries.sort_by_key(|e| e.seq);
    if entries.windows(2).any(|pair| pair[0].seq == pair[1].seq) {
        return Err(malformed("an entry appears twice"));
    }
    let mut state = MemoryState::new();
    let mut target = None;
    for entry in &entries {
        let seq = entry.seq;
        let signed = entry
            .event
            .clone()
            .ok_or_else(|| malformed(format!("entry {seq} has no event")))?;
        let event = Event::decode(signed.payload.as_slice()).map_err(|e| TraceError::Refused {
            seq,
            refusal: Refusal::Malformed(e.to_string()),
        })?;
        let judged = if seq == 0 {
            trust::judge_genesis(&signed, &event, key.public_key())
        } else {
            // MemoryState reads cannot fail.
            trust::rejudge(&signed, &event, seq, &state).map_err(|e| malformed(e.to_string()))?
        };
        let evaluation = judged.map_err(|refusal| TraceError::Refused { seq, refusal })?;
        let recorded = entry.verdict.clone().unwrap_or_default();
        if evaluation.verdict != recorded {
            return Err(TraceError::VerdictMismatch {
                seq,
                recorded: Box::new(recorded),
                recomputed: Box::new(evaluation.verdict),
            });
        }
        if seq == bundle.seq {
            target = Some(evaluation.verdict.clone());
        }
        state.apply(evaluation.delta);
    }
    let verdict = target.ok_or_else(|| {
        malformed(format!(
            "the traced entry {} is not in the bundle",
            bundle.seq
        ))
    })?;
    if bundle.verdict.as_ref() != Some(&verdict) {
        return Err(TraceError::VerdictMismatch {
            seq: bundle.seq,
            recorded: Box::new(bundle.verdict.clone().unwrap_or_default()),
            recomputed: Box::new(verdict),
        });
    }
    Ok(TraceReport {
        seq: bundle.seq,
        verdict,
        tree_size: checkpoint.tree_size(),
        entries: entries.len(),
    })
}
