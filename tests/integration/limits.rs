//! Server limits: a message over `max_message_bytes` and a stream over `max_streams` are
//! refused with clear statuses and write nothing. (Field limits inside events are in
//! `write`.)

use std::time::{Duration, Instant};

use custody::proto::{event::Body, Role, WatchRequest};
use tokio_stream::StreamExt as _;
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn a_message_over_the_limit_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = TestLedger::start_configured(dir, |config| config.max_message_bytes = 2048).await;
    let issuer = key(2);
    ledger.grant(&issuer, Role::Issuer, "auth.example").await;
    let before = ledger.tree_size().await;
    let mut big = consent("big", "c-big", "alice");
    if let Some(Body::Consent(c)) = &mut big.body {
        c.purpose = "p".repeat(3000);
    }

    let status = ledger
        .ledger()
        .await
        .append(sign(&issuer, &big))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("2048"), "{status:?}");

    // In a stream the oversized event ends the stream with the same status.
    let small = sign(&issuer, &consent("small", "c-small", "alice"));
    let events = tokio_stream::iter(vec![sign(&issuer, &big), small.clone()]);
    let outcome = match ledger.ledger().await.append_stream(events).await {
        Err(status) => Err(status),
        Ok(response) => {
            let mut receipts = response.into_inner();
            let mut outcome = Ok(());
            while let Some(item) = receipts.next().await {
                if let Err(status) = item {
                    outcome = Err(status);
                }
            }
            outcome
        }
    };
    let status = outcome.expect_err("the stream carried an oversized message");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    assert_eq!(ledger.tree_size().await, before, "nothing was written");
    // The same event, small enough, goes through.
    let receipt = ledger
        .ledger()
        .await
        .append(small)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.seq, before);
}

#[tokio::test]
async fn streams_beyond_the_limit_are_refused_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = TestLedger::start_configured(dir, |config| config.streams.max_streams = 2).await;
    let mut audit = ledger.audit().await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = audit
            .watch(WatchRequest { start_seq: 0 })
            .await
            .unwrap()
            .into_inner();
        // The genesis arrives: the stream is established.
        assert!(stream.next().await.unwrap().is_ok());
        open.push(stream);
    }

    let status = audit
        .watch(WatchRequest { start_seq: 0 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("limit is 2"), "{status:?}");
    let status = ledger
        .ledger()
        .await
        .append_stream(tokio_stream::iter(Vec::new()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Unary calls are not streams.
    assert_eq!(ledger.tree_size().await, 1);

    // Closing one makes room (the server notices the client has gone).
    drop(open.pop());
    let started = Instant::now();
    loop {
        match audit.watch(WatchRequest { start_seq: 0 }).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "no room 10 s after a stream closed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
