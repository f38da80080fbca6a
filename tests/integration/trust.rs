//! The chain of trust over the wire: verdicts in receipts for a delegation chain, revocation
//! from its time on, who may revoke, and trace bundles verified with the pure core only.

use custody::checkpoint::LedgerVerifier;
use custody::proto::{TraceRequest, TraceStatus};
use custody::verify::{verify_trace_bundle, TraceError};
use tonic::Code;

use crate::support::scenario::*;
use crate::support::*;

fn status_of(receipt: &custody::proto::Receipt) -> (i32, Vec<String>) {
    let verdict = receipt.verdict.clone().unwrap();
    (verdict.status, verdict.reasons)
}

#[tokio::test]
async fn a_delegation_chain_traces_and_revocation_breaks_it_from_then_on() {
    let ledger = TestLedger::start().await;
    register(&ledger, &["alice", "bob"], &["mail.example"]).await;
    let (iss, alice, mail) = (issuer(), user("alice"), server("mail.example"));
    let consent = ledger
        .append_ok(
            &alice,
            &event("consent", consent_body("c-alice", "alice", "assistant", 3)),
        )
        .await;
    assert!(consent.verdict.clone().unwrap().consent_user_signed);
    let t1 = ledger
        .append_ok(
            &iss,
            &event(
                "t1",
                issuance("t1", "c-alice", "", "alice", "assistant", &["mail:read"], 5),
            ),
        )
        .await;
    let t2 = ledger
        .append_ok(
            &iss,
            &event(
                "t2",
                issuance(
                    "t2",
                    "c-alice",
                    "t1",
                    "alice",
                    "summarizer",
                    &["mail:read"],
                    4,
                ),
            ),
        )
        .await;
    let t3 = ledger
        .append_ok(
            &iss,
            &event(
                "t3",
                issuance(
                    "t3",
                    "c-alice",
                    "t2",
                    "alice",
                    "fetcher",
                    &["mail:read:inbox"],
                    3,
                ),
            ),
        )
        .await;
    for receipt in [&t1, &t2, &t3] {
        assert_eq!(
            status_of(receipt).0,
            TraceStatus::Traced as i32,
            "{receipt:?}"
        );
    }
    let v = ledger
        .append_ok(&mail, &event("v1", validation("t3", "mail.example", true)))
        .await;
    assert_eq!(status_of(&v).0, TraceStatus::Traced as i32);
    let a1 = ledger
        .append_ok(
            &mail,
            &event("a1", action("t3", "mail.example", "mail:read:inbox")),
        )
        .await;
    let verdict = a1.verdict.clone().unwrap();
    assert_eq!(verdict.status, TraceStatus::Traced as i32);
    assert_eq!(verdict.chain, vec![t3.seq, t2.seq, t1.seq]);
    assert_eq!(verdict.consent_seq, consent.seq);
    // Widening at the action: named precisely.
    let wide = ledger
        .append_ok(
            &mail,
            &event("a2", action("t3", "mail.example", "mail:send")),
        )
        .await;
    assert_eq!(
        status_of(&wide),
        (
            TraceStatus::Violation as i32,
            vec!["SCOPE_NOT_COVERED".to_string()]
        )
    );
    // Bob may not withdraw Alice's consent: refused, nothing written.
    let before = ledger.tree_size().await;
    let status = ledger
        .ledger()
        .await
        .append(sign(
            &user("bob"),
            &event("bob-revokes", revoke_consent("c-alice")),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(ledger.tree_size().await, before);
    // Alice withdraws it: later actions on the grandchild token are violations.
    let mut revocation = event("alice-revokes", revoke_consent("c-alice"));
    revocation.occurred_at_ms = now();
    ledger.append_ok(&alice, &revocation).await;
    let mut earlier = event("a3", action("t3", "mail.example", "mail:read:inbox"));
    earlier.occurred_at_ms = revocation.occurred_at_ms - 10;
    assert_eq!(
        status_of(&ledger.append_ok(&mail, &earlier).await).0,
        TraceStatus::Traced as i32
    );
    let mut later = event("a4", action("t3", "mail.example", "mail:read:inbox"));
    later.occurred_at_ms = revocation.occurred_at_ms + 10;
    let later = ledger.append_ok(&mail, &later).await;
    assert_eq!(
        status_of(&later),
        (
            TraceStatus::Violation as i32,
            vec!["CONSENT_REVOKED".to_string()]
        )
    );
}

#[tokio::test]
async fn trace_bundles_verify_offline_and_tampering_is_caught() {
    let ledger = TestLedger::start().await;
    register(&ledger, &["alice"], &["mail.example"]).await;
    let (iss, alice, mail) = (issuer(), user("alice"), server("mail.example"));
    ledger
        .append_ok(
            &alice,
            &event("consent", consent_body("c1", "alice", "assistant", 2)),
        )
        .await;
    ledger
        .append_ok(
            &iss,
            &event(
                "t1",
                issuance("t1", "c1", "", "alice", "assistant", &["mail:read"], 5),
            ),
        )
        .await;
    ledger
        .append_ok(
            &iss,
            &event(
                "t2",
                issuance("t2", "c1", "t1", "alice", "helper", &["mail:read"], 4),
            ),
        )
        .await;
    ledger
        .append_ok(&mail, &event("v", validation("t2", "mail.example", true)))
        .await;
    let traced = ledger
        .append_ok(
            &mail,
            &event("a", action("t2", "mail.example", "mail:read")),
        )
        .await;
    ledger
        .append_ok(&iss, &event("rev", revoke_token("t1")))
        .await;
    let violation = ledger
        .append_ok(
            &mail,
            &event("late", action("t2", "mail.example", "mail:read")),
        )
        .await;
    assert_eq!(status_of(&violation).0, TraceStatus::Violation as i32);

    let key = LedgerVerifier::parse(&ledger.verifier_key).unwrap();
    let mut audit = ledger.audit().await;
    for receipt in [&traced, &violation] {
        let bundle = audit
            .trace(TraceRequest { seq: receipt.seq })
            .await
            .unwrap()
            .into_inner();
        let report = verify_trace_bundle(&bundle, &key).unwrap();
        assert_eq!(report.seq, receipt.seq);
        assert_eq!(Some(&report.verdict), receipt.verdict.as_ref());
        // The bundle carries the chain, the consent, the validation, the revocation and the
        // grants of every signer back to the genesis.
        let seqs: Vec<u64> = bundle.proofs.iter().map(|p| p.seq).collect();
        assert!(seqs.contains(&0), "genesis missing from {seqs:?}");
        for needed in report
            .verdict
            .chain
            .iter()
            .chain([&report.verdict.consent_seq])
        {
            assert!(seqs.contains(needed), "{needed} missing from {seqs:?}");
        }
    }
    let bundle = audit
        .trace(TraceRequest { seq: violation.seq })
        .await
        .unwrap()
        .into_inner();
    // Dropping the revocation changes the recomputed verdict of the violation.
    let revocation_at = bundle
        .entries
        .iter()
        .position(|e| custody::inspect::entry_json(&e.entry)["event"]["kind"] == "revocation")
        .expect("the revocation that broke the chain is in the bundle");
    let mut without = bundle.clone();
    without.entries.remove(revocation_at);
    without.proofs.remove(revocation_at);
    assert!(matches!(
        verify_trace_bundle(&without, &key),
        Err(TraceError::VerdictMismatch { .. })
    ));
    // Flipping a byte in any entry breaks its inclusion proof (or its decoding).
    for index in 0..bundle.entries.len() {
        let mut tampered = bundle.clone();
        let bytes = &mut tampered.entries[index].entry;
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        assert!(
            verify_trace_bundle(&tampered, &key).is_err(),
            "tampered entry {index} passed"
        );
    }
    // Another ledger's key does not open the checkpoint.
    let other = LedgerVerifier::parse(&TestLedger::start().await.verifier_key).unwrap();
    assert!(matches!(
        verify_trace_bundle(&bundle, &other),
        Err(TraceError::Checkpoint(_))
    ));
    // Only token events can be traced.
    let status = audit.trace(TraceRequest { seq: 1 }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = audit.trace(TraceRequest { seq: 10_000 }).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
}

#[tokio::test]
async fn trace_bundles_carry_every_consent_a_mismatched_chain_names() {
    // Regression: a hop naming another consent than its parent's left the parent's consent
    // out of the bundle, and the offline verifier could not recompute the parent's verdict.
    let ledger = TestLedger::start().await;
    register(&ledger, &["alice"], &["mail.example"]).await;
    let (iss, alice, mail) = (issuer(), user("alice"), server("mail.example"));
    ledger
        .append_ok(
            &alice,
            &event("c1", consent_body("c1", "alice", "assistant", 2)),
        )
        .await;
    ledger
        .append_ok(
            &alice,
            &event("c2", consent_body("c2", "alice", "assistant", 2)),
        )
        .await;
    ledger
        .append_ok(
            &iss,
            &event(
                "t1",
                issuance("t1", "c1", "", "alice", "assistant", &["mail:read"], 5),
            ),
        )
        .await;
    let t2 = ledger
        .append_ok(
            &iss,
            &event(
                "t2",
                issuance("t2", "c2", "t1", "alice", "helper", &["mail:read"], 4),
            ),
        )
        .await;
    assert_eq!(
        t2.verdict.clone().unwrap().reasons,
        vec!["CONSENT_MISMATCH".to_string()]
    );
    let act = ledger
        .append_ok(
            &mail,
            &event("a", action("t2", "mail.example", "mail:read")),
        )
        .await;
    let key = LedgerVerifier::parse(&ledger.verifier_key).unwrap();
    for seq in [t2.seq, act.seq] {
        let bundle = ledger
            .audit()
            .await
            .trace(TraceRequest { seq })
            .await
            .unwrap()
            .into_inner();
        verify_trace_bundle(&bundle, &key).unwrap_or_else(|e| panic!("bundle of {seq}: {e}"));
    }
}
