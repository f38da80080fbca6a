//! Every receipt is proved against its own checkpoint, and early checkpoints against late
//! ones, using only the pure core (`checkpoint::open`, `merkle::verify_*`).

use custody::checkpoint::{self, LedgerVerifier, VerifiedCheckpoint};
use custody::merkle;
use custody::proto::{
    ConsistencyProofRequest, GetEntriesRequest, GetEntryRequest, InclusionProofRequest, Receipt,
    Role, WatchRequest,
};
use tonic::Code;

use crate::support::*;

async fn append_many(ledger: &TestLedger, count: usize) -> Vec<Receipt> {
    let issuer = key(2);
    ledger.grant(&issuer, Role::Issuer, "auth.example").await;
    let mut receipts = Vec::new();
    // Unary appends, each with its own checkpoint, then a stream whose batches share them.
    for i in 0..count / 2 {
        receipts.push(
            ledger
                .append_ok(
                    &issuer,
                    &consent(&format!("p-{i}"), &format!("c-{i}"), "alice"),
                )
                .await,
        );
    }
    let events: Vec<_> = (count / 2..count)
        .map(|i| {
            sign(
                &issuer,
                &consent(&format!("p-{i}"), &format!("c-{i}"), "alice"),
            )
        })
        .collect();
    use tokio_stream::StreamExt as _;
    let stream = ledger
        .ledger()
        .await
        .append_stream(tokio_stream::iter(events))
        .await
        .unwrap()
        .into_inner();
    receipts.extend(
        stream
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .map(Result::unwrap),
    );
    receipts
}

#[tokio::test]
async fn every_receipt_is_included_in_its_checkpoint_and_checkpoints_are_consistent() {
    let ledger = TestLedger::start().await;
    let receipts = append_many(&ledger, 120).await;
    let verifier = LedgerVerifier::parse(&ledger.verifier_key).unwrap();
    let mut audit = ledger.audit().await;
    let mut checkpoints: Vec<VerifiedCheckpoint> = Vec::new();
    for receipt in &receipts {
        assert!(receipt.error.is_none());
        let cp = checkpoint::open(&receipt.checkpoint, &verifier).unwrap();
        assert!(
            receipt.seq < cp.tree_size(),
            "the checkpoint's tree contains the entry"
        );
        let proof = audit
            .get_inclusion_proof(InclusionProofRequest {
                seq: receipt.seq,
                tree_size: cp.tree_size(),
            })
            .await
            .unwrap()
            .into_inner();
        let leaf = merkle::hash_from_slice(&receipt.leaf_hash).unwrap();
        merkle::verify_inclusion(
            &hashes(&proof.hashes),
            receipt.seq,
            cp.tree_size(),
            leaf,
            cp.root(),
        )
        .unwrap();
        // The receipt's leaf hash is the hash of the stored entry bytes.
        let stored = audit
            .get_entry(GetEntryRequest { seq: receipt.seq })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(merkle::leaf_hash(&stored.entry), leaf);
        // A proof for another leaf does not verify.
        if receipt.seq > 0 {
            let wrong = merkle::verify_inclusion(
                &hashes(&proof.hashes),
                receipt.seq - 1,
                cp.tree_size(),
                leaf,
                cp.root(),
            );
            assert!(wrong.is_err());
        }
        checkpoints.push(cp);
    }
    let early = checkpoints.first().unwrap();
    let late = checkpoints.last().unwrap();
    assert!(early.tree_size() < late.tree_size());
    for old in [early, &checkpoints[checkpoints.len() / 2]] {
        let proof = consistency_proof(&mut audit, old, late).await;
        merkle::verify_consistency(
            &proof,
            old.tree_size(),
            old.root(),
            late.tree_size(),
            late.root(),
        )
        .unwrap();
        let mut forged = old.root();
        forged.0[0] ^= 1;
        assert!(merkle::verify_consistency(
            &proof,
            old.tree_size(),
            forged,
            late.tree_size(),
            late.root()
        )
        .is_err());
    }
    // new_size 0 means the newest checkpoint.
    let newest = audit
        .get_consistency_proof(ConsistencyProofRequest {
            old_size: early.tree_size(),
            new_size: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(newest.new_size, ledger.tree_size().await);
}

#[tokio::test]
async fn out_of_range_reads_are_refused_with_clear_messages() {
    let ledger = TestLedger::start().await;
    append_many(&ledger, 4).await;
    let size = ledger.tree_size().await;
    let mut audit = ledger.audit().await;
    let status = audit
        .get_entry(GetEntryRequest { seq: size })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(status.message().contains(&size.to_string()), "{status:?}");
    let status = audit
        .get_inclusion_proof(InclusionProofRequest {
            seq: size,
            tree_size: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let status = audit
        .get_inclusion_proof(InclusionProofRequest {
            seq: 0,
            tree_size: size + 1,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let status = audit
        .get_consistency_proof(ConsistencyProofRequest {
            old_size: 0,
            new_size: size,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = audit
        .get_consistency_proof(ConsistencyProofRequest {
            old_size: 3,
            new_size: 2,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = audit
        .get_consistency_proof(ConsistencyProofRequest {
            old_size: 1,
            new_size: size + 5,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let status = audit
        .get_entries(GetEntriesRequest {
            start: 0,
            end: size + 1,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let status = audit
        .get_entries(GetEntriesRequest { start: 3, end: 2 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = audit
        .watch(WatchRequest {
            start_seq: size + 1,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
}
