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
