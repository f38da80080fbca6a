//! Durability: a restarted ledger comes back with the same tree and keeps appending on it;
//! the data directory holds its keys with the right permissions.

use custody::proto::{GetCheckpointRequest, GetEntriesRequest, Role};
use custody::server::{self, Config};
use tokio_stream::StreamExt as _;

use crate::support::*;

#[tokio::test]
async fn restart_brings_back_the_same_tree_and_continues_the_chain() {
    let ledger = TestLedger::start().await;
    let issuer = key(2);
    ledger.grant(&issuer, Role::Issuer, "auth.example").await;
    let mut sent = Vec::new();
    for i in 0..20 {
        let event = consent(&format!("e-{i}"), &format!("c-{i}"), "alice");
        ledger.append_ok(&issuer, &event).await;
        sent.push(event);
    }
    let before = ledger
        .audit()
        .await
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    let dir = ledger.stop().await;

    let ledger = TestLedger::start_in(dir).await;
    let after = ledger
        .audit()
        .await
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.tree_size, before.tree_size);
    assert_eq!(after.root_hash, before.root_hash);
    assert_eq!(after.note, before.note);
    // Keys registered before the restart still sign; the exact retry is still a duplicate.
    let retry = ledger.append_ok(&issuer, &sent[3]).await;
    assert!(retry.duplicate);
    let next = ledger
        .append_ok(&issuer, &consent("e-after", "c-after", "alice"))
        .await;
    assert_eq!(next.seq, before.tree_size);

    // The whole chain links: every prev_hash is the previous entry's leaf hash.
    let entries: Vec<_> = ledger
        .audit()
        .await
        .get_entries(GetEntriesRequest { start: 0, end: 0 })
        .await
        .unwrap()
        .into_inner()
        .collect::<Vec<_>>()
        .await;
    assert_eq!(entries.len() as u64, before.tree_size + 1);
    let mut prev = [0u8; 32];
    for (seq, stored) in entries.into_iter().enumerate() {
        let stored = stored.unwrap();
        let entry = stored.decoded.unwrap();
        assert_eq!(entry.seq, seq as u64);
        assert_eq!(entry.prev_hash, prev.to_vec(), "prev_hash of {seq}");
        prev = custody::merkle::leaf_hash(&stored.entry).0;
    }
}

#[tokio::test]
async fn first_start_creates_keys_with_owner_only_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = Config::new(&data);
    let (ledger, startup) = server::open_ledger(&config).unwrap();
    assert!(startup.created);
    let admin_path = startup
        .generated_admin_key
        .clone()
        .expect("an admin key is generated");
    assert_eq!(file_mode(&admin_path), 0o600);
    assert_eq!(file_mode(&data.join("ledger.key")), 0o600);
    let admin: server::KeyPairJson =
        serde_json::from_str(&std::fs::read_to_string(&admin_path).unwrap()).unwrap();
    let admin_key = admin.signing_key().unwrap();
    assert_eq!(admin.key_id, key_id(&admin_key));
    let root = ledger.head().root;
    drop(ledger);

    // Second start: nothing generated, same ledger; a conflicting origin is refused.
    let (ledger, startup) = server::open_ledger(&config).unwrap();
    assert!(!startup.created && startup.generated_admin_key.is_none());
    assert_eq!(ledger.head().root, root);
    drop(ledger);
    let mut other = config.clone();
    other.origin = Some("elsewhere/custody".into());
    let error = server::open_ledger(&other)
        .err()
        .expect("origin mismatch must fail");
    assert!(error.to_string().contains("elsewhere/custody"), "{error}");
    // The wrong ledger key is refused.
    std::fs::write(data.join("ledger.key"), hex::encode([9u8; 32])).unwrap();
    let error = server::open_ledger(&config)
        .err()
        .expect("foreign key must fail");
    assert!(error.to_string().contains("ledger key"), "{error}");
}
