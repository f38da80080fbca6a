//! What the `Ledger` and `Audit` services answer while the ledger is still opening (the
//! health-only phase of `server::open_and_run`): `UNAVAILABLE`, which gRPC clients treat as
//! "retry later", rather than the `UNIMPLEMENTED` of an unknown service.

use tonic::{Request, Response, Status, Streaming};

use super::{status, BoxStream};
use crate::proto::audit_server::Audit;
use crate::proto::ledger_server::Ledger as LedgerRpc;
use crate::proto::{
    Checkpoint, ConsistencyProof, ConsistencyProofRequest, GetCheckpointRequest, GetEntriesRequest,
    GetEntryRequest, InclusionProof, InclusionProofRequest, QueryRequest, Receipt, SignedEvent,
    StoredEntry, TraceBundle, TraceRequest, WatchRequest,
};

/// Both services, answering every call with [`status::opening`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Opening;

#[tonic::async_trait]
impl LedgerRpc for Opening {
    async fn append(&self, _: Request<SignedEvent>) -> Result<Response<Receipt>, Status> {
        Err(status::opening())
    }

    type AppendStreamStream = BoxStream<Receipt>;

    async fn append_stream(
        &self,
        _: Request<Streaming<SignedEvent>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        Err(status::opening())
    }
}

#[tonic::async_trait]
impl Audit for Opening {
    async fn get_checkpoint(
        &self,
        _: Request<GetCheckpointRequest>,
    ) -> Result<Response<Checkpoint>, Status> {
        Err(status::opening())
    }

    async fn get_entry(
        &self,
        _: Request<GetEntryRequest>,
    ) -> Result<Response<StoredEntry>, Status> {
        Err(status::opening())
    }

    type GetEntriesStream = BoxStream<StoredEntry>;

    async fn get_entries(
        &self,
        _: Request<GetEntriesRequest>,
    ) -> Result<Response<Self::GetEntriesStream>, Status> {
        Err(status::opening())
    }

    async fn get_inclusion_proof(
        &self,
        _: Request<InclusionProofRequest>,
    ) -> Result<Response<InclusionProof>, Status> {
        Err(status::opening())
    }

    async fn get_consistency_proof(
        &self,
        _: Request<ConsistencyProofRequest>,
    ) -> Result<Response<ConsistencyProof>, Status> {
        Err(status::opening())
    }

    type QueryStream = BoxStream<StoredEntry>;

    async fn query(&self, _: Request<QueryRequest>) -> Result<Response<Self::QueryStream>, Status> {
        Err(status::opening())
    }

    async fn trace(&self, _: Request<TraceRequest>) -> Result<Response<TraceBundle>, Status> {
        Err(status::opening())
    }

    type WatchStream = BoxStream<StoredEntry>;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(status::opening())
    }
}
