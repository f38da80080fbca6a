//! Durability: a restarted ledger comes back with the same tree and keeps appending on it;
//! the data directory holds its keys with the right permissions.

use custody::proto::{GetEntriesRequest, Role};
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
    let before = ledger.checkpoint().await;
    let dir = ledger.stop().await;

    let ledger = TestLedger::start_in(dir).await;
    let after = ledger.checkpoint().await;
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

/// The query results a reviewer would look at, for comparing before and after a rebuild.
async fn review(ledger: &TestLedger) -> Vec<Vec<Vec<u8>>> {
    use custody::proto::{EventKind, QueryRequest, TraceStatus};
    let requests = [
        QueryRequest {
            user: "alice".into(),
            limit: 1000,
            ..QueryRequest::default()
        },
        QueryRequest {
            agent: "helper".into(),
            limit: 1000,
            ascending: true,
            ..QueryRequest::default()
        },
        QueryRequest {
            status: TraceStatus::Violation as i32,
            limit: 1000,
            ..QueryRequest::default()
        },
        QueryRequest {
            kinds: vec![EventKind::Action as i32],
            resource_server: "mail.example".into(),
            limit: 1000,
            ..QueryRequest::default()
        },
        QueryRequest {
            token_id: "tok3".into(),
            limit: 1000,
            ..QueryRequest::default()
        },
    ];
    let mut results = Vec::new();
    for request in requests {
        let entries = ledger.query(request).await;
        results.push(entries.into_iter().map(|e| e.entry).collect());
    }
    results
}

#[tokio::test]
async fn derived_data_is_rebuilt_from_the_entries_alone() {
    let ledger = TestLedger::start().await;
    crate::query::mixed_ledger(&ledger, 30, 7).await;
    let checkpoint = ledger.checkpoint().await;
    let reviewed = review(&ledger).await;
    assert!(
        reviewed.iter().all(|r| !r.is_empty()),
        "every review query should match something"
    );
    let dir = ledger.stop().await;

    // Delete everything but the entries.
    let store = custody::store::Store::open(&dir.path().join("data/db")).unwrap();
    store.drop_derived().unwrap();
    assert!(store.head().unwrap().is_none());
    drop(store);

    let ledger = TestLedger::start_in(dir).await;
    let rebuilt = ledger.checkpoint().await;
    assert_eq!(rebuilt.tree_size, checkpoint.tree_size);
    assert_eq!(rebuilt.root_hash, checkpoint.root_hash);
    assert_eq!(
        rebuilt.note, checkpoint.note,
        "Ed25519 is deterministic: the same checkpoint note"
    );
    assert_eq!(review(&ledger).await, reviewed);
    // State came back too: keys sign, consents and tokens are known.
    let receipt = ledger
        .append_ok(
            &scenario_server(),
            &event(
                "after-rebuild",
                crate::support::scenario::action("tok3", "mail.example", "mail:read"),
            ),
        )
        .await;
    assert_ne!(
        receipt.verdict.unwrap().reasons,
        vec!["UNKNOWN_TOKEN".to_string()]
    );
}

fn scenario_server() -> ed25519_dalek::SigningKey {
    crate::support::scenario::server("mail.example")
}

#[tokio::test]
async fn a_rewritten_entry_stops_the_rebuild() {
    let ledger = TestLedger::start().await;
    crate::query::mixed_ledger(&ledger, 5, 3).await;
    let dir = ledger.stop().await;
    // Rewrite a stored verdict (a field no signature covers) directly in sled.
    rewrite_entry(&dir.path().join("data/db"), 12, |entry| {
        entry
            .verdict
            .as_mut()
            .unwrap()
            .reasons
            .push("NOTHING_TO_SEE".into());
    });
    // With the derived data intact, the tail check passes only if the tail is untouched; the
    // rewritten entry is in the middle, so drop the derived data to force a full replay.
    let store = custody::store::Store::open(&dir.path().join("data/db")).unwrap();
    store.drop_derived().unwrap();
    drop(store);
    let mut config = Config::new(dir.path().join("data"));
    config.admin_public_key = Some(key(1).verifying_key().to_bytes());
    let error = server::open_ledger(&config)
        .err()
        .expect("a rewritten entry must stop the rebuild");
    assert!(error.to_string().contains("entry 12"), "{error}");
}

/// A crash between a rotation step's entry and its file step: the next open settles the key
/// files with what the entries record.
#[test]
fn a_rotation_step_interrupted_before_its_file_step_is_settled_on_the_next_open() {
    use custody::ledger::Ledger;
    use custody::store::Store;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let read = |file: &str| std::fs::read_to_string(data.join(file)).unwrap();
    let config = Config::new(data);
    // The ledger with both keys on disk, opened directly (as `rotate-key` does).
    let open_with_both = || {
        let keyring: Vec<_> = ["ledger.key", "ledger.next.key"]
            .iter()
            .map(|file| server::parse_seed(&read(file)).unwrap())
            .collect();
        Ledger::open(Store::open(&data.join("db")).unwrap(), &keyring).unwrap()
    };
    drop(server::open_ledger(&config).unwrap());
    let begun = server::rotate_key(data, server::RotationStep::Begin).unwrap();
    assert_eq!(begun.verifier_keys.len(), 2);
    let next_seed = read("ledger.next.key");

    // The FINISH entry is durable, then the process dies before renaming the key file.
    let mut ledger = open_with_both();
    ledger.finish_key_rotation().unwrap();
    drop(ledger);
    assert_ne!(read("ledger.key"), next_seed);

    let (ledger, _) = server::open_ledger(&config).unwrap();
    assert_eq!(read("ledger.key"), next_seed);
    assert!(!data.join("ledger.next.key").exists());
    assert_eq!(read("ledger.pub").trim(), ledger.verifier_key());
    assert!(!data.join("ledger.next.pub").exists());
    drop(ledger);

    // The same for a CANCEL whose key file was not removed: the withdrawn key's file goes.
    server::rotate_key(data, server::RotationStep::Begin).unwrap();
    let mut ledger = open_with_both();
    ledger.cancel_key_rotation().unwrap();
    drop(ledger);
    assert!(data.join("ledger.next.key").exists());
    let (ledger, _) = server::open_ledger(&config).unwrap();
    assert!(!data.join("ledger.next.key").exists());
    assert!(!data.join("ledger.next.pub").exists());
    assert_eq!(ledger.verifier_keys(), vec![ledger.verifier_key()]);
    drop(ledger);

    // A begin that died after writing the next key but before its entry: the key is not in
    // use, and the next begin takes it.
    let spare = server::generate_key();
    std::fs::write(data.join("ledger.next.key"), hex::encode(spare.to_bytes())).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let owner_only = std::fs::Permissions::from_mode(0o600);
        std::fs::set_permissions(data.join("ledger.next.key"), owner_only).unwrap();
    }
    drop(server::open_ledger(&config).unwrap());
    assert!(data.join("ledger.next.key").exists());
    let begun = server::rotate_key(data, server::RotationStep::Begin).unwrap();
    assert!(!begun.generated);
    assert!(begun.verifier_keys[1].ends_with(&{
        use base64::Engine as _;
        let mut encoded = vec![1u8];
        encoded.extend_from_slice(spare.verifying_key().as_bytes());
        base64::engine::general_purpose::STANDARD.encode(encoded)
    }));
}

/// A next key lost (or garbled) mid-rotation: the ledger refuses to serve, saying how to get
/// out, and `rotate-key cancel` withdraws the rotation with the current key alone.
#[test]
fn a_lost_next_key_blocks_serving_until_the_rotation_is_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let config = Config::new(data);
    drop(server::open_ledger(&config).unwrap());
    server::rotate_key(data, server::RotationStep::Begin).unwrap();
    let next = data.join("ledger.next.key");
    for damage in [Some("not a key\n"), None] {
        match damage {
            Some(garbage) => std::fs::write(&next, garbage).unwrap(),
            None => std::fs::remove_file(&next).unwrap(),
        }
        let error = server::open_ledger(&config)
            .err()
            .expect("opened without the next key");
        assert!(error.to_string().contains("rotate-key cancel"), "{error}");
    }
    // Finishing needs the next key; cancelling does not, even when the derived data must be
    // rebuilt first (the rebuild signs with the current key alone).
    assert!(server::rotate_key(data, server::RotationStep::Finish).is_err());
    custody::store::Store::open(&data.join("db"))
        .unwrap()
        .drop_derived()
        .unwrap();
    let cancelled = server::rotate_key(data, server::RotationStep::Cancel).unwrap();
    assert_eq!(cancelled.verifier_keys.len(), 1);
    let (ledger, _) = server::open_ledger(&config).unwrap();
    assert_eq!(ledger.verifier_keys(), cancelled.verifier_keys);
    drop(ledger);
    // A garbled next key file that no rotation needs only draws a warning.
    std::fs::write(&next, "garbage\n").unwrap();
    drop(server::open_ledger(&config).unwrap());
    std::fs::remove_file(&next).unwrap();

    // A next key file that others may read is not taken up.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let spare = server::generate_key();
        std::fs::write(&next, hex::encode(spare.to_bytes())).unwrap();
        std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = server::rotate_key(data, server::RotationStep::Begin).unwrap_err();
        assert!(error.to_string().contains("chmod 600"), "{error}");
        // Nor is a symbolic link to a key.
        let elsewhere = dir.path().join("elsewhere.key");
        std::fs::rename(&next, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &next).unwrap();
        let error = server::rotate_key(data, server::RotationStep::Begin).unwrap_err();
        assert!(error.to_string().contains("symbolic link"), "{error}");
        std::fs::remove_file(&next).unwrap();
        std::fs::rename(&elsewhere, &next).unwrap();
        std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o600)).unwrap();
        let begun = server::rotate_key(data, server::RotationStep::Begin).unwrap();
        assert!(!begun.generated);
    }
}
