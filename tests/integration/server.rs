//! Server plumbing: gRPC health reports both services serving; reflection (v1 and v1alpha)
//! lists them, as `grpcurl -plaintext 127.0.0.1:50051 list` would ask.

use tokio_stream::StreamExt as _;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse, ServerReflectionRequest,
};

use crate::support::*;

async fn channel(ledger: &TestLedger) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(ledger.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn health_reports_serving_for_both_services() {
    let ledger = TestLedger::start().await;
    let mut health = HealthClient::new(channel(&ledger).await);
    for service in ["custody.v1.Ledger", "custody.v1.Audit"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.status, ServingStatus::Serving as i32, "{service}");
    }
}

#[tokio::test]
async fn reflection_lists_the_services() {
    let ledger = TestLedger::start().await;
    let mut client = ServerReflectionClient::new(channel(&ledger).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "custody.v1.Ledger",
        "custody.v1.Audit",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn health_turns_not_serving_when_appends_stop_after_a_storage_failure() {
    use custody::ledger::InFlight;
    use custody::proto::Role;
    let dir = tempfile::tempdir().unwrap();
    let admin = key(1);
    let mut config = custody::server::Config::new(dir.path().join("data"));
    config.admin_public_key = Some(admin.verifying_key().to_bytes());
    let (ledger, _) = custody::server::open_ledger(&config).unwrap();
    let listener = custody::server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(custody::server::run(
        listener,
        ledger.clone(),
        config.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    for service in ["", "custody.v1.Ledger", "custody.v1.Audit"] {
        assert_eq!(
            health_status(&url, service).await,
            Some(ServingStatus::Serving as i32)
        );
    }

    // Two batches written out of order: the store refuses the second, and appends stop.
    let grant = |n: u8| {
        sign(
            &admin,
            &key_grant(&format!("g{n}"), &key(n), Role::Issuer, "a"),
        )
    };
    let mut in_flight = InFlight::default();
    let first = ledger
        .judge(ledger.prepare(vec![grant(2)], 1), &mut in_flight)
        .unwrap();
    let second = ledger
        .judge(ledger.prepare(vec![grant(3)], 1), &mut in_flight)
        .unwrap();
    assert!(ledger.write(second, |_| ()).is_err());
    drop(first);

    let started = std::time::Instant::now();
    for service in ["", "custody.v1.Ledger", "custody.v1.Audit"] {
        loop {
            let status = health_status(&url, service).await;
            if status == Some(ServingStatus::NotServing as i32) {
                break;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "{service:?} still reports {status:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// `GET /metrics` over plain HTTP/1.1.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: custody\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the sample named exactly `series` (name and labels) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_count_appends_refusals_batches_and_stages() {
    use custody::proto::Role;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger =
        TestLedger::start_configured(dir, |config| config.metrics_listen = Some(metrics_addr))
            .await;
    let issuer = key(2);
    ledger.grant(&issuer, Role::Issuer, "auth.example").await;
    let event = consent("m-1", "c-1", "alice");
    ledger.append_ok(&issuer, &event).await;
    assert!(ledger.append_ok(&issuer, &event).await.duplicate);
    // Signed by a key nobody granted.
    let stranger = ledger
        .ledger()
        .await
        .append(sign(&key(99), &consent("m-2", "c-2", "alice")))
        .await
        .unwrap_err();
    assert_eq!(stranger.code(), tonic::Code::Unauthenticated);

    let text = scrape(metrics_addr).await;
    assert_eq!(sample(&text, "custody_appended_total"), Some(2.0), "{text}");
    assert_eq!(
        sample(&text, "custody_duplicates_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "custody_refused_total{reason=\"UNKNOWN_KEY\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "custody_tree_size"), Some(3.0), "{text}");
    assert_eq!(sample(&text, "custody_open_streams"), Some(0.0), "{text}");
    assert_eq!(
        sample(&text, "custody_appends_stopped"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "custody_batch_events_count"),
        Some(4.0),
        "{text}"
    );
    for stage in ["verify", "judge", "apply", "finish"] {
        let count = sample(
            &text,
            &format!("custody_stage_seconds_count{{stage=\"{stage}\"}}"),
        );
        assert!(count.is_some_and(|n| n >= 3.0), "{stage}: {text}");
    }
}
