//! `Audit.Watch`: entries from `start_seq` that exist, then new ones as they are appended.

use std::time::Duration;

use custody::proto::{Role, StoredEntry, WatchRequest};
use tokio_stream::StreamExt as _;

use crate::support::*;

/// The next watched entry, with a generous bound so a busy machine does not fail the test
/// (the stream answers at once).
async fn next(
    stream: &mut tonic::Streaming<StoredEntry>,
) -> Option<Result<StoredEntry, tonic::Status>> {
    tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("watch stalled")
}

#[tokio::test]
async fn watch_replays_existing_entries_then_follows_new_ones() {
    let ledger = TestLedger::start().await;
    let issuer = key(2);
    ledger.grant(&issuer, Role::Issuer, "auth.example").await;
    ledger
        .append_ok(&issuer, &consent("w-0", "c-0", "alice"))
        .await;
    let mut stream = ledger
        .audit()
        .await
        .watch(WatchRequest { start_seq: 1 })
        .await
        .unwrap()
        .into_inner();
    // A generous bound so a busy machine does not fail the test; the stream answers at once.
    let first = next(&mut stream).await.unwrap().unwrap();
    assert_eq!(first.decoded.unwrap().seq, 1);
    let second = next(&mut stream).await.unwrap().unwrap();
    assert_eq!(second.decoded.unwrap().seq, 2);
    // Now live: entries appended after the watch started arrive in order.
    for i in 1..=3 {
        let receipt = ledger
            .append_ok(
                &issuer,
                &consent(&format!("w-{i}"), &format!("c-{i}"), "alice"),
            )
            .await;
        let live = next(&mut stream).await.unwrap().unwrap();
        assert_eq!(live.decoded.unwrap().seq, receipt.seq);
        assert_eq!(
            custody::merkle::leaf_hash(&live.entry).0.to_vec(),
            receipt.leaf_hash
        );
    }
}

#[tokio::test]
async fn shutdown_ends_open_watch_and_append_streams() {
    // Regression: a server with an open Watch (or a client's idle AppendStream) never finished
    // its graceful shutdown. The drain deadline is set far beyond the test's timeout, so only
    // the streams ending on their own can let the server stop in time.
    let dir = tempfile::tempdir().unwrap();
    let ledger = TestLedger::start_configured(dir, |config| {
        config.drain_timeout = Duration::from_secs(600);
    })
    .await;
    let mut watch = ledger
        .audit()
        .await
        .watch(WatchRequest { start_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(
        next(&mut watch).await.is_some(),
        "the genesis arrives first"
    );
    let (_hold_open, idle) = tokio::sync::mpsc::channel::<custody::proto::SignedEvent>(1);
    let mut append = ledger
        .ledger()
        .await
        .append_stream(tokio_stream::wrappers::ReceiverStream::new(idle))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(30), ledger.stop())
        .await
        .expect("shutdown must not wait for clients to hang up");
    // The watch stream ends (or errors) instead of hanging.
    let _ = tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await
        .expect("the watch stream ended");
    // The append stream tells the client it was cut short rather than ending cleanly.
    let last = tokio::time::timeout(Duration::from_secs(30), append.next())
        .await
        .expect("the append stream ended");
    let status = last
        .expect("an error, not a clean end")
        .expect_err("an error, not a receipt");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}
