//! The offline auditor: export a generated ledger of every kind, verify it with only the
//! ledger key, and catch every kind of tampering (byte flips across the whole file, removed,
//! duplicated and reordered entries, truncation, foreign signatures, rewritten history, an
//! entry rewritten in a stopped ledger's directory).

use custody::checkpoint::{CheckpointSigner, LedgerVerifier};
use custody::export;
use custody::proto::{event::Body, KeyRevocation, Role};
use custody::verify::{verify_export, IntegrityFailure, LedgerReport};

use crate::support::*;

fn verify_bytes(
    bytes: &[u8],
    key: &LedgerVerifier,
    previous: Option<&str>,
) -> Result<LedgerReport, IntegrityFailure> {
    verify_export(bytes, key, previous, |_, _| {}).expect("reading from memory cannot fail")
}

/// Splits an export into its header+checkpoint prefix and its entry records.
fn split_export(bytes: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let (mut reader, note) = export::ExportReader::open(bytes).unwrap();
    let mut head = Vec::new();
    export::write_header(&mut head, &note).unwrap();
    let mut entries = Vec::new();
    while let Some(entry) = reader.next_entry().unwrap() {
        entries.push(entry);
    }
    (head, entries)
}

fn join_export(head: &[u8], entries: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = head.to_vec();
    for entry in entries {
        export::write_record(&mut bytes, entry).unwrap();
    }
    bytes
}

/// A ledger of at least 1,000 entries holding every event kind.
async fn big_ledger() -> TestLedger {
    let ledger = TestLedger::start().await;
    crate::query::mixed_ledger(&ledger, 150, 42).await;
    let retired = key(77);
    ledger.grant(&retired, Role::Agent, "retired-agent").await;
    let revocation = event(
        "retire",
        Body::KeyRevocation(KeyRevocation {
            key_id: key_id(&retired),
            reason: "rotated".into(),
        }),
    );
    ledger.append_ok(&ledger.admin.clone(), &revocation).await;
    assert!(
        ledger.tree_size().await >= 1000,
        "only {} entries",
        ledger.tree_size().await
    );
    ledger
}

#[tokio::test]
async fn exports_verify_and_every_kind_of_tampering_fails() {
    let ledger = big_ledger().await;
    let key = LedgerVerifier::parse(&ledger.verifier_key).unwrap();
    let path = ledger.dir.path().join("ledger.export");
    let output = run_cli(vec![
        "export".into(),
        "--server".into(),
        ledger.url(),
        "--out".into(),
        path.display().to_string(),
    ])
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bytes = std::fs::read(&path).unwrap();

    let report = verify_bytes(&bytes, &key, None).unwrap();
    assert_eq!(report.tree_size, ledger.tree_size().await);
    for kind in [
        "genesis",
        "key_grant",
        "key_revocation",
        "consent",
        "issuance",
        "validation",
        "action",
        "denial",
        "revocation",
    ] {
        assert!(
            report.entries_by_kind.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} in {:?}",
            report.entries_by_kind
        );
    }
    assert!(!report.violations.is_empty() && report.actions_traced > 0);
    // The CLI agrees: verified with findings, exit 3; human and JSON reports.
    let ledger_pub = format!("@{}", ledger.data_dir().join("ledger.pub").display());
    let output = run_cli(vec![
        "verify".into(),
        path.display().to_string(),
        "--ledger-key".into(),
        ledger_pub.clone(),
    ])
    .await;
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("VERIFIED") && text.contains("violations recorded"),
        "{text}"
    );
    let output = run_cli(vec![
        "verify".into(),
        path.display().to_string(),
        "--ledger-key".into(),
        ledger.verifier_key.clone(),
        "--json".into(),
    ])
    .await;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["result"], "findings");
    assert_eq!(json["report"]["tree_size"], report.tree_size);

    // The disk-backed replay state the CLI uses reaches the same report.
    let on_disk = custody::verify::verify_export_with(
        bytes.as_slice(),
        &key,
        None,
        custody::scratch::DiskState::new().unwrap(),
        |_, _| {},
    )
    .unwrap()
    .unwrap();
    assert_eq!(on_disk, report);
    // So does one whose record cache holds almost nothing: every lookup past the newest few
    // records goes back to the file.
    let evicting = custody::verify::verify_export_with(
        bytes.as_slice(),
        &key,
        None,
        custody::scratch::DiskState::with_cache_bytes(512).unwrap(),
        |_, _| {},
    )
    .unwrap()
    .unwrap();
    assert_eq!(evicting, report);

    // 500+ single-byte flips spread over the whole file, each caught.
    let positions: Vec<usize> = (0..520).map(|i| i * (bytes.len() - 1) / 519).collect();
    let caught = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for half in positions.chunks(positions.len().div_ceil(2)) {
            let (bytes, key, caught) = (&bytes, &key, &caught);
            scope.spawn(move || {
                let mut copy = bytes.clone();
                for &position in half {
                    copy[position] ^= 0x01;
                    let outcome = verify_bytes(&copy, key, None);
                    assert!(
                        outcome.is_err(),
                        "flipping byte {position} of {} went unnoticed",
                        copy.len()
                    );
                    copy[position] ^= 0x01;
                    caught.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    assert_eq!(caught.into_inner(), positions.len());

    // Removing, duplicating, reordering entries; truncating the tail.
    let (head, entries) = split_export(&bytes);
    let middle = entries.len() / 2;
    let mut removed = entries.clone();
    removed.remove(middle);
    assert!(matches!(
        verify_bytes(&join_export(&head, &removed), &key, None),
        Err(IntegrityFailure::Entry { .. })
    ));
    let mut duplicated = entries.clone();
    duplicated.insert(middle, entries[middle].clone());
    assert!(matches!(
        verify_bytes(&join_export(&head, &duplicated), &key, None),
        Err(IntegrityFailure::Entry { .. })
    ));
    let mut reordered = entries.clone();
    reordered.swap(middle, middle + 1);
    assert!(verify_bytes(&join_export(&head, &reordered), &key, None).is_err());
    let truncated = join_export(&head, &entries[..entries.len() - 1]);
    assert!(matches!(
        verify_bytes(&truncated, &key, None),
        Err(IntegrityFailure::Count { .. })
    ));
    assert!(matches!(
        verify_bytes(&bytes[..bytes.len() - 3], &key, None),
        Err(IntegrityFailure::Malformed(_))
    ));
    let mut extra = bytes.clone();
    export::write_record(&mut extra, &entries[3]).unwrap();
    assert!(matches!(
        verify_bytes(&extra, &key, None),
        Err(IntegrityFailure::Count { .. })
    ));

    // An operator replays an existing signed event as a new entry and re-signs the checkpoint
    // with the real ledger key: the tree is consistent, but the event_id repeats.
    {
        use prost::Message as _;
        let seed = std::fs::read_to_string(ledger.data_dir().join("ledger.key")).unwrap();
        let ledger_key = custody::server::parse_seed(&seed).unwrap();
        let signer = CheckpointSigner::new(key.origin(), ledger_key).unwrap();
        let mut tree = custody::merkle::Frontier::new();
        for entry in &entries {
            tree.push(custody::merkle::leaf_hash(entry));
        }
        // An action: replaying it conflicts with no state, only the event_id repeats.
        let action_at = entries
            .iter()
            .position(|e| custody::inspect::entry_json(e)["event"]["kind"] == "action")
            .unwrap();
        let replayed_from = custody::proto::Entry::decode(entries[action_at].as_slice()).unwrap();
        let last = custody::merkle::leaf_hash(entries.last().unwrap());
        let replay = custody::proto::Entry {
            seq: entries.len() as u64,
            prev_hash: last.0.to_vec(),
            ..replayed_from
        }
        .encode_to_vec();
        tree.push(custody::merkle::leaf_hash(&replay));
        let mut head = Vec::new();
        export::write_header(&mut head, &signer.sign(tree.size(), &tree.root())).unwrap();
        let mut all = entries.clone();
        all.push(replay);
        let replayed = join_export(&head, &all);
        let outcome = verify_bytes(&replayed, &key, None);
        assert!(
            matches!(&outcome, Err(IntegrityFailure::Entry { what, .. }) if what.contains("repeats event_id")),
            "{outcome:?}"
        );
    }

    // A checkpoint re-signed by another key (same origin, same root).
    let note = ledger.checkpoint().await;
    let impostor = CheckpointSigner::new(key.origin(), crate::support::key(200)).unwrap();
    let root = custody::merkle::hash_from_slice(&note.root_hash).unwrap();
    let mut forged = Vec::new();
    export::write_header(&mut forged, &impostor.sign(note.tree_size, &root)).unwrap();
    let forged = join_export(&forged, &entries);
    assert!(matches!(
        verify_bytes(&forged, &key, None),
        Err(IntegrityFailure::Checkpoint(_))
    ));
    let missing = ledger
        .dir
        .path()
        .join("missing.export")
        .display()
        .to_string();
    let output = run_cli(vec![
        "verify".into(),
        missing,
        "--ledger-key".into(),
        ledger_pub,
    ])
    .await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "a missing file is an I/O error"
    );
}

#[tokio::test]
async fn previous_checkpoints_catch_rewritten_history_and_accept_extensions() {
    let ledger = TestLedger::start().await;
    crate::query::mixed_ledger(&ledger, 10, 1).await;
    let early = ledger.checkpoint().await;
    crate::query::mixed_ledger_more(&ledger, 10, 2).await;
    let key = LedgerVerifier::parse(&ledger.verifier_key).unwrap();
    let path = ledger.dir.path().join("later.export");
    let output = run_cli(vec![
        "export".into(),
        "--server".into(),
        ledger.url(),
        "--out".into(),
        path.display().to_string(),
    ])
    .await;
    assert!(output.status.success());
    let later = std::fs::read(&path).unwrap();
    let report = verify_bytes(&later, &key, Some(&early.note)).unwrap();
    assert_eq!(report.extends_previous, Some(early.tree_size));

    // The operator rewrites history: a second ledger under the same ledger key (a copy of
    // ledger.key), with other events, signs a perfectly valid checkpoint of its own.
    let forked_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(forked_dir.path().join("data")).unwrap();
    std::fs::copy(
        ledger.data_dir().join("ledger.key"),
        forked_dir.path().join("data/ledger.key"),
    )
    .unwrap();
    let fork = TestLedger::start_in(forked_dir).await;
    assert_eq!(fork.verifier_key, ledger.verifier_key);
    crate::query::mixed_ledger(&fork, 25, 9).await;
    let path = fork.dir.path().join("fork.export");
    let output = run_cli(vec![
        "export".into(),
        "--server".into(),
        fork.url(),
        "--out".into(),
        path.display().to_string(),
    ])
    .await;
    assert!(output.status.success());
    let forked = std::fs::read(&path).unwrap();
    assert!(
        verify_bytes(&forked, &key, None).is_ok(),
        "alone, the rewritten ledger verifies"
    );
    let caught = verify_bytes(&forked, &key, Some(&early.note));
    assert!(
        matches!(caught, Err(IntegrityFailure::NotExtending { .. })),
        "{caught:?}"
    );
    // A previous checkpoint larger than the export: entries were removed.
    let current = ledger.checkpoint().await;
    let older_export = custody::verify::ExportVerifier::new(&early.note, &key, Some(&current.note));
    assert!(matches!(
        older_export,
        Err(IntegrityFailure::ShorterThanPrevious { .. })
    ));
}

#[tokio::test]
async fn verify_data_dir_catches_an_entry_rewritten_in_sled() {
    let ledger = TestLedger::start().await;
    crate::query::mixed_ledger(&ledger, 10, 4).await;
    let verifier_key = ledger.verifier_key.clone();
    let dir = ledger.stop().await;
    let data = dir.path().join("data");
    let output = run_cli(vec![
        "verify".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--ledger-key".into(),
        verifier_key.clone(),
    ])
    .await;
    assert!(
        matches!(output.status.code(), Some(0) | Some(3)),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let output = run_cli(vec![
        "export".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--out".into(),
        dir.path().join("x.export").display().to_string(),
    ])
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Rewrite a field no signature covers.
    rewrite_entry(&data.join("db"), 20, |entry| entry.received_at_ms += 1);
    let output = run_cli(vec![
        "verify".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--ledger-key".into(),
        verifier_key,
    ])
    .await;
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("entry 21"),
        "the next entry's prev_hash breaks"
    );
}
