//! The write side: genesis, key grants and revocations, unary and streaming appends, and every
//! refusal the contract names, each leaving the tree size unchanged.

use custody::proto::{
    event::Body, Action, Event, GetEntryRequest, KeyRevocation, Role, SignedEvent, TraceStatus,
};
use ed25519_dalek::SigningKey;
use prost::Message as _;
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn genesis_names_origin_admin_key_and_skew_and_is_signed_by_the_ledger_key() {
    let ledger = TestLedger::start().await;
    assert_eq!(ledger.tree_size().await, 1);
    let stored = ledger
        .audit()
        .await
        .get_entry(GetEntryRequest { seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let entry = stored.decoded.unwrap();
    assert_eq!(entry.seq, 0);
    assert_eq!(entry.prev_hash, vec![0u8; 32]);
    let signed = entry.event.unwrap();
    let event = Event::decode(signed.payload.as_slice()).unwrap();
    let Some(Body::Genesis(genesis)) = event.body else {
        panic!("entry 0 is not a genesis")
    };
    assert_eq!(genesis.origin, "localhost/custody");
    assert_eq!(
        genesis.admin_public_key,
        ledger.admin.verifying_key().to_bytes().to_vec()
    );
    assert_eq!(genesis.max_clock_skew_ms, 300_000);
    // The genesis verifies under the key named by the verifier key string (ledger.pub).
    let ledger_key = custody::envelope::parse_public_key(&genesis.ledger_public_key).unwrap();
    custody::envelope::verify_payload(&ledger_key, &signed.payload, &signed.signature).unwrap();
    assert_eq!(
        signed.key_id,
        custody::envelope::key_id(&ledger_key.to_bytes())
    );
    let pub_file = std::fs::read_to_string(ledger.data_dir().join("ledger.pub")).unwrap();
    assert_eq!(pub_file.trim(), ledger.verifier_key);
    let verifier = custody::checkpoint::LedgerVerifier::parse(&pub_file).unwrap();
    assert_eq!(verifier.origin(), "localhost/custody");
}

#[tokio::test]
async fn granted_keys_sign_events_and_consent_verdict_says_who_signed() {
    let ledger = TestLedger::start().await;
    let issuer = key(2);
    let alice = key(3);
    let grant = ledger.grant(&issuer, Role::Issuer, "auth.example").await;
    assert_eq!(grant.seq, 1);
    assert!(!grant.duplicate);
    ledger.grant(&alice, Role::User, "alice").await;

    let attested = ledger
        .append_ok(&issuer, &consent("c-1", "consent-1", "alice"))
        .await;
    let verdict = attested.verdict.unwrap();
    assert_eq!(verdict.status, TraceStatus::NotApplicable as i32);
    assert!(!verdict.consent_user_signed);

    let user_signed = ledger
        .append_ok(&alice, &consent("c-2", "consent-2", "alice"))
        .await;
    assert!(user_signed.verdict.unwrap().consent_user_signed);
    assert_eq!(user_signed.seq, 4);
    assert_eq!(ledger.tree_size().await, 5);
}

/// Appends `signed` expecting `code`, and checks that the tree did not grow.
async fn refused(ledger: &TestLedger, signed: SignedEvent, code: Code) -> String {
    let before = ledger.tree_size().await;
    let status = ledger
        .ledger()
        .await
        .append(signed)
        .await
        .expect_err("append must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(
        ledger.tree_size().await,
        before,
        "a refusal must write nothing"
    );
    status.message().to_owned()
}

fn action(event_id: &str, resource_server: &str) -> Event {
    event(
        event_id,
        Body::Action(Action {
            token_id: "tok-1".into(),
            resource_server: resource_server.into(),
            agent: "mail-assistant".into(),
            operation: "mail:read".into(),
            resource: "mailbox/1".into(),
            request_sha256: vec![],
        }),
    )
}

#[tokio::test]
async fn refusals_carry_the_contract_codes_and_write_nothing() {
    let ledger = TestLedger::start().await;
    let issuer = key(2);
    let rs = key(4);
    ledger.grant(&issuer, Role::Issuer, "auth.example").await;
    ledger
        .grant(&rs, Role::ResourceServer, "mail.example")
        .await;

    // Bad signature.
    let mut bad = sign(&issuer, &consent("r-1", "consent-r1", "alice"));
    bad.signature[5] ^= 0x40;
    let message = refused(&ledger, bad, Code::Unauthenticated).await;
    assert!(message.contains("signature"), "{message}");
    // Unknown key.
    let stranger = key(99);
    refused(
        &ledger,
        sign(&stranger, &consent("r-2", "consent-r2", "alice")),
        Code::Unauthenticated,
    )
    .await;
    // Role not allowed: an issuer may not grant keys.
    refused(
        &ledger,
        sign(&issuer, &key_grant("r-3", &key(50), Role::Admin, "mallory")),
        Code::PermissionDenied,
    )
    .await;
    // Principal mismatch: a resource server asserting an action for another server.
    let message = refused(
        &ledger,
        sign(&rs, &action("r-4", "bank.example")),
        Code::PermissionDenied,
    )
    .await;
    assert!(message.contains("bank.example"), "{message}");
    // A client may never submit a genesis.
    let genesis = event(
        "r-5",
        Body::Genesis(custody::proto::Genesis {
            origin: "evil".into(),
            admin_public_key: key(60).verifying_key().to_bytes().to_vec(),
            ledger_public_key: key(61).verifying_key().to_bytes().to_vec(),
            max_clock_skew_ms: 1,
        }),
    );
    refused(
        &ledger,
        sign(&ledger.admin, &genesis),
        Code::PermissionDenied,
    )
    .await;
    // Undecodable payload.
    refused(
        &ledger,
        sign_payload(&issuer, vec![0xff, 0xff, 0xff]),
        Code::InvalidArgument,
    )
    .await;
    // Missing body.
    let no_body = Event {
        event_id: "r-6".into(),
        occurred_at_ms: now(),
        body: None,
    };
    refused(&ledger, sign(&issuer, &no_body), Code::InvalidArgument).await;
    // Field limits: event id too long, not printable, too many scopes.
    let long_id = "x".repeat(129);
    refused(
        &ledger,
        sign(&issuer, &consent(&long_id, "c", "alice")),
        Code::InvalidArgument,
    )
    .await;
    refused(
        &ledger,
        sign(&issuer, &consent("tab\tid", "c", "alice")),
        Code::InvalidArgument,
    )
    .await;
    let mut many = consent("r-7", "c", "alice");
    if let Some(Body::Consent(c)) = &mut many.body {
        c.scopes = (0..1000).map(|i| format!("s{i}")).collect();
    }
    refused(&ledger, sign(&issuer, &many), Code::InvalidArgument).await;
    // Clock skew beyond the bound, both ways.
    let mut late = consent("r-8", "c", "alice");
    late.occurred_at_ms -= 400_000;
    let message = refused(&ledger, sign(&issuer, &late), Code::InvalidArgument).await;
    assert!(message.contains("300000"), "{message}");
    let mut early = consent("r-9", "c", "alice");
    early.occurred_at_ms += 400_000;
    refused(&ledger, sign(&issuer, &early), Code::InvalidArgument).await;
    // Weak key in a grant.
    let mut weak = key_grant("r-10", &key(70), Role::User, "bob");
    if let Some(Body::KeyGrant(g)) = &mut weak.body {
        g.public_key = {
            let mut identity = vec![0u8; 32];
            identity[0] = 1;
            identity
        };
    }
    let message = refused(&ledger, sign(&ledger.admin, &weak), Code::InvalidArgument).await;
    assert!(message.contains("weak"), "{message}");
    // A key with a small-order component (no key generation makes one) in a grant.
    let mut mixed = key_grant("r-11", &key(71), Role::User, "bob");
    if let Some(Body::KeyGrant(g)) = &mut mixed.body {
        let point =
            key(71).verifying_key().to_edwards() + curve25519_dalek::constants::EIGHT_TORSION[1];
        g.public_key = point.compress().to_bytes().to_vec();
    }
    let message = refused(&ledger, sign(&ledger.admin, &mixed), Code::InvalidArgument).await;
    assert!(message.contains("prime-order"), "{message}");
}

#[tokio::test]
async fn retries_are_idempotent_and_reused_event_ids_are_refused() {
    let ledger = TestLedger::start().await;
    let issuer = key(2);
    ledger.grant(&issuer, Role::Issuer, "auth.example").await;
    let original = consent("dup-1", "consent-dup", "alice");
    let first = ledger.append_ok(&issuer, &original).await;
    let again = ledger.append_ok(&issuer, &original).await;
    assert!(again.duplicate);
    assert_eq!(
        (again.seq, &again.leaf_hash, &again.verdict),
        (first.seq, &first.leaf_hash, &first.verdict)
    );
    // Same event id, other bytes.
    let mut other = original.clone();
    other.occurred_at_ms += 1;
    let message = refused(&ledger, sign(&issuer, &other), Code::AlreadyExists).await;
    assert!(message.contains("dup-1"), "{message}");
    // Same event id signed by a key that is not registered: authentication comes first.
    refused(&ledger, sign(&key(98), &other), Code::Unauthenticated).await;
}

#[tokio::test]
async fn revoked_and_expired_keys_are_refused_from_their_time_on() {
    let ledger = TestLedger::start().await;
    let issuer = key(2);
    ledger.grant(&issuer, Role::Issuer, "auth.example").await;
    ledger
        .append_ok(&issuer, &consent("before", "consent-a", "alice"))
        .await;
    let revoke = event(
        "revoke-issuer",
        Body::KeyRevocation(KeyRevocation {
            key_id: key_id(&issuer),
            reason: "rotated".into(),
        }),
    );
    ledger.append_ok(&ledger.admin.clone(), &revoke).await;
    let message = refused(
        &ledger,
        sign(&issuer, &consent("after", "consent-b", "alice")),
        Code::Unauthenticated,
    )
    .await;
    assert!(message.contains("revoked"), "{message}");
    // Revoking an unknown key is refused.
    let unknown = event(
        "revoke-unknown",
        Body::KeyRevocation(KeyRevocation {
            key_id: "00".repeat(16),
            reason: String::new(),
        }),
    );
    refused(
        &ledger,
        sign(&ledger.admin, &unknown),
        Code::FailedPrecondition,
    )
    .await;

    // A key whose validity ended before the event.
    let expiring: SigningKey = key(5);
    let mut grant = key_grant("grant-expiring", &expiring, Role::Issuer, "auth2.example");
    if let Some(Body::KeyGrant(g)) = &mut grant.body {
        g.not_before_ms = now() - 60_000;
        g.not_after_ms = now() - 1_000;
    }
    ledger.append_ok(&ledger.admin.clone(), &grant).await;
    let message = refused(
        &ledger,
        sign(&expiring, &consent("late", "consent-c", "alice")),
        Code::Unauthenticated,
    )
    .await;
    assert!(message.contains("expired"), "{message}");
}

#[tokio::test]
async fn append_stream_answers_in_order_and_goes_on_after_a_refusal() {
    let ledger = TestLedger::start().await;
    let issuer = key(2);
    ledger.grant(&issuer, Role::Issuer, "auth.example").await;
    let mut events = Vec::new();
    for i in 0..300 {
        let mut signed = sign(
            &issuer,
            &consent(&format!("s-{i}"), &format!("consent-{i}"), "alice"),
        );
        if i % 50 == 7 {
            signed.signature[0] ^= 1; // refused: bad signature
        }
        events.push(signed);
    }
    events.push(events[3].clone()); // an exact retry inside the stream
    let before = ledger.tree_size().await;
    let receipts: Vec<_> = {
        use tokio_stream::StreamExt as _;
        let stream = ledger
            .ledger()
            .await
            .append_stream(tokio_stream::iter(events.clone()))
            .await
            .unwrap()
            .into_inner();
        stream
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(receipts.len(), events.len());
    let mut next_seq = before;
    for (i, receipt) in receipts.iter().take(300).enumerate() {
        if i % 50 == 7 {
            let error = receipt
                .error
                .as_ref()
                .expect("refused event must carry an error");
            assert_eq!(error.code, Code::Unauthenticated as i32);
        } else {
            assert!(receipt.error.is_none(), "{receipt:?}");
            assert_eq!(receipt.event_id, format!("s-{i}"));
            assert_eq!(receipt.seq, next_seq, "receipts come back in order");
            assert!(!receipt.checkpoint.is_empty());
            next_seq += 1;
        }
    }
    let retry = receipts.last().unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.seq, receipts[3].seq);
    assert_eq!(ledger.tree_size().await, next_seq);
}
