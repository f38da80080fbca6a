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
