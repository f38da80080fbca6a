//! The tonic services: `Ledger` (write side) and `Audit` (read side). The trait impls only
//! translate between the wire and the [`Ledger`]; every error becomes
//! a status in [`status`].

pub mod commit_queue;
pub mod opening;
pub mod read;
pub mod status;

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

use crate::ledger::{decode_entry, Ledger};
use crate::merkle;
use crate::proto::audit_server::Audit;
use crate::proto::ledger_server::Ledger as LedgerRpc;
use crate::proto::{
    Checkpoint, ConsistencyProof, ConsistencyProofRequest, GetCheckpointRequest, GetEntriesRequest,
    GetEntryRequest, InclusionProof, InclusionProofRequest, QueryRequest, Receipt, SignedEvent,
    StoredEntry, TraceBundle, TraceRequest, WatchRequest,
};
pub use commit_queue::{CommitQueue, QueueLimits};

/// Default: receipts a single `AppendStream` may have outstanding (queued or committing)
/// before the server stops reading from that stream.
pub const MAX_IN_FLIGHT_PER_STREAM: usize = 4096;

/// Default: streaming calls (`AppendStream`, `Watch`, `GetEntries`) open at once across all
/// connections.
pub const MAX_STREAMS: usize = 1024;

/// Largest value either [`StreamLimits`] field takes effect with; larger ones are clamped
/// (and refused by `custody serve`'s settings).
pub const MAX_STREAM_COUNT: usize = 1 << 24;

/// What clients may hold open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Streaming calls (`AppendStream`, `Watch`, `GetEntries`) open at once across all
    /// connections; one more is refused with `RESOURCE_EXHAUSTED`.
    pub max_streams: usize,
    /// Receipts one `AppendStream` may have outstanding before the server stops reading it
    /// (backpressure: the client's sends wait).
    pub max_in_flight_per_stream: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_streams: MAX_STREAMS,
            max_in_flight_per_stream: MAX_IN_FLIGHT_PER_STREAM,
        }
    }
}

/// Counts the open streaming calls against [`StreamLimits::max_streams`]; shared by both
/// services.
#[derive(Debug, Clone)]
pub struct OpenStreams {
    permits: Arc<tokio::sync::Semaphore>,
    limits: StreamLimits,
}

impl OpenStreams {
    /// No stream open yet.
    pub fn new(limits: StreamLimits) -> Self {
        // Semaphores and channels panic beyond this; no machine holds that many streams.
        let limits = StreamLimits {
            max_streams: limits.max_streams.min(MAX_STREAM_COUNT),
            max_in_flight_per_stream: limits.max_in_flight_per_stream.clamp(1, MAX_STREAM_COUNT),
        };
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(limits.max_streams)),
            limits,
        }
    }

    /// A place for one more stream, held until the permit is dropped (when the stream's task
    /// ends), or `RESOURCE_EXHAUSTED`.
    fn open(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| status::too_many_streams(self.limits.max_streams))
    }

    /// Streams open now.
    pub fn open_count(&self) -> usize {
        self.limits.max_streams - self.permits.available_permits()
    }
}

/// Entries buffered per streaming read before the server waits for the client.
const STREAM_BUFFER: usize = 256;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The write side: `custody.v1.Ledger`.
#[derive(Clone)]
pub struct LedgerService {
    queue: CommitQueue,
    /// Turns true when the server shuts down: open streams stop taking new events.
    closing: Closing,
    streams: OpenStreams,
}

impl LedgerService {
    /// A service that submits to `queue` until `closing` turns true, its streams counted in
    /// `streams`.
    pub fn new(queue: CommitQueue, closing: Closing, streams: OpenStreams) -> Self {
        Self {
            queue,
            closing,
            streams,
        }
    }
}

/// Tells long-lived streams that the server is shutting down (true) so they can end and the
/// server can drain.
pub type Closing = tokio::sync::watch::Receiver<bool>;

/// Resolves once `closing` turns true (or its sender is gone).
pub async fn closed(mut closing: Closing) {
    let _ = closing.wait_for(|&closing| closing).await;
}

async fn await_reply(rx: oneshot::Receiver<commit_queue::Reply>) -> commit_queue::Reply {
    rx.await.unwrap_or_else(|_| Err(status::unavailable()))
}

#[tonic::async_trait]
impl LedgerRpc for LedgerService {
    async fn append(&self, request: Request<SignedEvent>) -> Result<Response<Receipt>, Status> {
        let rx = self.queue.submit(request.into_inner()).await?;
        await_reply(rx).await.map(Response::new)
    }

    type AppendStreamStream = BoxStream<Receipt>;

    async fn append_stream(
        &self,
        request: Request<Streaming<SignedEvent>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        let permit = self.streams.open()?;
        let mut inbound = request.into_inner();
        let queue = self.queue.clone();
        // Pending replies in submission order; bounded, so a stream cannot queue without limit.
        let (pending_tx, mut pending_rx) =
            mpsc::channel(self.streams.limits.max_in_flight_per_stream);
        let (out_tx, out_rx) = mpsc::channel(STREAM_BUFFER);
        let closing = self.closing.clone();
        // Why the server stopped reading early, if it did: sent after the last receipt.
        let (cut_tx, cut_rx) = oneshot::channel::<Status>();
        tokio::spawn(async move {
            // At shutdown, stop reading new events; those already queued still get receipts,
            // and then the stream ends with UNAVAILABLE so the client knows it was cut short.
            let mut closing = std::pin::pin!(closed(closing));
            let mut cut_tx = Some(cut_tx);
            loop {
                let item = tokio::select! {
                    item = inbound.next() => item,
                    () = &mut closing => {
                        if let Some(cut) = cut_tx.take() {
                            let _ = cut.send(Status::unavailable(
                                "the ledger is shutting down; events after the last receipt were not read",
                            ));
                        }
                        break;
                    }
                };
                let Some(item) = item else { break };
                let event = match item {
                    Ok(event) => event,
                    // A message the transport refused (e.g. over the size limit): the client
                    // learns why, after the receipts of the events before it.
                    Err(status) => {
                        if let Some(cut) = cut_tx.take() {
                            let _ = cut.send(status);
                        }
                        break;
                    }
                };
                let pending = match queue.submit(event).await {
                    Ok(rx) => rx,
                    Err(status) => {
                        let (tx, rx) = oneshot::channel();
                        let _ = tx.send(Err(status));
                        rx
                    }
                };
                if pending_tx.send(pending).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            // The stream counts as open until its last receipt is sent.
            let _permit = permit;
            while let Some(pending) = pending_rx.recv().await {
                let receipt = match await_reply(pending).await {
                    Ok(receipt) => receipt,
                    Err(status) => Receipt {
                        error: Some(status::receipt_error(&status)),
                        ..Receipt::default()
                    },
                };
                if out_tx.send(Ok(receipt)).await.is_err() {
                    return;
                }
            }
            if let Ok(status) = cut_rx.await {
                let _ = out_tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

/// The read side: `custody.v1.Audit`.
#[derive(Clone)]
pub struct AuditService {
    ledger: Arc<Ledger>,
    /// Turns true when the server shuts down: `Watch` streams end.
    closing: Closing,
    streams: OpenStreams,
}

impl AuditService {
    /// A service reading `ledger`; its `Watch` streams end when `closing` turns true.
    pub fn new(ledger: Arc<Ledger>, closing: Closing, streams: OpenStreams) -> Self {
        Self {
            ledger,
            closing,
            streams,
        }
    }

    fn stored_entry(&self, seq: u64) -> Result<StoredEntry, Status> {
        let bytes = self
            .ledger
            .store()
            .entry(seq)
            .map_err(|e| status::storage(&e))?
            .ok_or_else(|| {
                status::storage(&crate::store::StoreError::Corrupt(format!(
                    "entry {seq} is missing"
                )))
            })?;
        to_stored_entry(seq, bytes)
    }
}

fn to_stored_entry(seq: u64, bytes: Vec<u8>) -> Result<StoredEntry, Status> {
    let decoded = decode_entry(seq, &bytes).map_err(|e| status::storage(&e))?;
    Ok(StoredEntry {
        entry: bytes,
        decoded: Some(decoded),
    })
}

/// Streams entries `[start, end)` from the store into `tx`; returns the next seq to send, or
/// `None` once the receiver is gone.
async fn send_entries(
    ledger: &Arc<Ledger>,
    start: u64,
    end: u64,
    tx: &mpsc::Sender<Result<StoredEntry, Status>>,
) -> Option<u64> {
    let mut next = start;
    for item in ledger.store().entries(start, end) {
        let message = item
            .map_err(|e| status::storage(&e))
            .and_then(|(seq, bytes)| to_stored_entry(seq, bytes));
        let failed = message.is_err();
        if tx.send(message).await.is_err() || failed {
            return None;
        }
        next += 1;
    }
    Some(next)
}

fn hashes_to_bytes(hashes: Vec<merkle::Hash>) -> Vec<Vec<u8>> {
    hashes.into_iter().map(|h| h.0.to_vec()).collect()
}

#[tonic::async_trait]
impl Audit for AuditService {
    async fn get_checkpoint(
        &self,
        _request: Request<GetCheckpointRequest>,
    ) -> Result<Response<Checkpoint>, Status> {
        let head = self.ledger.head();
        Ok(Response::new(Checkpoint {
            note: head.checkpoint,
            tree_size: head.tree_size,
            root_hash: head.root.0.to_vec(),
        }))
    }

    async fn get_entry(
        &self,
        request: Request<GetEntryRequest>,
    ) -> Result<Response<StoredEntry>, Status> {
        let seq = request.into_inner().seq;
        let size = self.ledger.head().tree_size;
        if seq >= size {
            return Err(Status::out_of_range(format!(
                "entry {seq} is beyond the newest checkpoint's tree size {size}"
            )));
        }
        self.stored_entry(seq).map(Response::new)
    }

    type GetEntriesStream = BoxStream<StoredEntry>;

    async fn get_entries(
        &self,
        request: Request<GetEntriesRequest>,
    ) -> Result<Response<Self::GetEntriesStream>, Status> {
        let GetEntriesRequest { start, end } = request.into_inner();
        let size = self.ledger.head().tree_size;
        let end = if end == 0 { size } else { end };
        if end > size {
            return Err(Status::out_of_range(format!(
                "end {end} is beyond the newest checkpoint's tree size {size}"
            )));
        }
        if start > end {
            return Err(Status::invalid_argument(format!(
                "start {start} is after end {end}"
            )));
        }
        let permit = self.streams.open()?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let ledger = self.ledger.clone();
        tokio::spawn(async move {
            let _permit = permit;
            send_entries(&ledger, start, end, &tx).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<InclusionProofRequest>,
    ) -> Result<Response<InclusionProof>, Status> {
        let InclusionProofRequest { seq, tree_size } = request.into_inner();
        let size = self.ledger.head().tree_size;
        let tree_size = if tree_size == 0 { size } else { tree_size };
        if tree_size > size {
            return Err(Status::out_of_range(format!(
                "tree_size {tree_size} is beyond the newest checkpoint's tree size {size}"
            )));
        }
        let hashes = merkle::inclusion_proof(seq, tree_size, self.ledger.store())
            .map_err(|e| status::proof(&e))?;
        Ok(Response::new(InclusionProof {
            seq,
            tree_size,
            hashes: hashes_to_bytes(hashes),
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<ConsistencyProofRequest>,
    ) -> Result<Response<ConsistencyProof>, Status> {
        let ConsistencyProofRequest { old_size, new_size } = request.into_inner();
        let size = self.ledger.head().tree_size;
        let new_size = if new_size == 0 { size } else { new_size };
        if new_size > size {
            return Err(Status::out_of_range(format!(
                "new_size {new_size} is beyond the newest checkpoint's tree size {size}"
            )));
        }
        if old_size == 0 || old_size > new_size {
            return Err(Status::invalid_argument(format!(
                "old_size must be between 1 and new_size ({new_size}), got {old_size}"
            )));
        }
        let hashes = merkle::consistency_proof(old_size, new_size, self.ledger.store())
            .map_err(|e| status::proof(&e))?;
        Ok(Response::new(ConsistencyProof {
            old_size,
            new_size,
            hashes: hashes_to_bytes(hashes),
        }))
    }

    type QueryStream = BoxStream<StoredEntry>;

    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<Self::QueryStream>, Status> {
        let request = request.into_inner();
        let ledger = self.ledger.clone();
        let found = tokio::task::spawn_blocking(move || read::query(&ledger, &request))
            .await
            .map_err(|_| Status::internal("internal error; the query was not completed"))??;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            found.into_iter().map(Ok),
        ))))
    }

    async fn trace(&self, request: Request<TraceRequest>) -> Result<Response<TraceBundle>, Status> {
        let seq = request.into_inner().seq;
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || read::trace(&ledger, seq))
            .await
            .map_err(|_| Status::internal("internal error; the trace was not completed"))?
            .map(Response::new)
    }

    type WatchStream = BoxStream<StoredEntry>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let start = request.into_inner().start_seq;
        let mut sizes = self.ledger.subscribe();
        let size = *sizes.borrow_and_update();
        if start > size {
            return Err(Status::out_of_range(format!(
                "start_seq {start} is beyond the newest checkpoint's tree size {size}"
            )));
        }
        let permit = self.streams.open()?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let ledger = self.ledger.clone();
        let closing = self.closing.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut next = start;
            loop {
                let size = *sizes.borrow_and_update();
                if size > next {
                    // A client that stops reading must not hold the stream open past shutdown.
                    let sent = tokio::select! {
                        sent = send_entries(&ledger, next, size, &tx) => sent,
                        () = closed(closing.clone()) => None,
                    };
                    match sent {
                        Some(sent_up_to) => next = sent_up_to,
                        None => return,
                    }
                }
                tokio::select! {
                    changed = sizes.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                    () = closed(closing.clone()) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
