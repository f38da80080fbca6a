//! Group commit: events from every connection queue here; one task takes whatever has
//! arrived (up to a batch limit), appends it as one durable batch on a blocking thread, and
//! only then answers each submitter.
//!
//! The queue is bounded, so when the store falls behind, submitters wait for room instead of
//! growing memory (backpressure).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::ledger::Ledger;
use crate::proto::{Receipt, SignedEvent};

use super::status;

/// The answer to one submitted event: a receipt once durable, or why it was refused.
pub type Reply = Result<Receipt, Status>;

struct Submission {
    event: SignedEvent,
    reply: oneshot::Sender<Reply>,
}

/// Sizes of the group-commit pipeline.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Events that may wait for the commit task before submitters block.
    pub capacity: usize,
    /// Most events appended in one batch (one flush, one checkpoint).
    pub max_batch: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self {
            capacity: 8192,
            max_batch: 2048,
        }
    }
}

/// A handle to submit events to the group-commit task. Cloned into every service; when the
/// last handle is dropped the task finishes the batches it has and ends.
#[derive(Clone)]
pub struct CommitQueue {
    tx: mpsc::Sender<Submission>,
}

impl CommitQueue {
    /// Starts the group-commit task for `ledger`.
    pub fn start(ledger: Arc<Ledger>, limits: QueueLimits) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(limits.capacity.max(1));
        let task = tokio::spawn(run(ledger, rx, limits.max_batch.max(1)));
        (Self { tx }, task)
    }

    /// Queues an event, waiting for room if the queue is full. The returned receiver yields
    /// the reply once the event's batch is durable (or refused).
    pub async fn submit(&self, event: SignedEvent) -> Result<oneshot::Receiver<Reply>, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Submission { event, reply })
            .await
            .map_err(|_| status::unavailable())?;
        Ok(rx)
    }
}

async fn run(ledger: Arc<Ledger>, mut rx: mpsc::Receiver<Submission>, max_batch: usize) {
    let mut submissions = Vec::with_capacity(max_batch);
    loop {
        if rx.recv_many(&mut submissions, max_batch).await == 0 {
            break;
        }
        let (events, replies): (Vec<_>, Vec<_>) =
            submissions.drain(..).map(|s| (s.event, s.reply)).unzip();
        let ledger_for_batch = ledger.clone();
        let outcome =
            tokio::task::spawn_blocking(move || ledger_for_batch.append_batch(events)).await;
        match outcome {
            Ok(Ok(outcomes)) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    // A submitter that went away no longer needs its receipt; its entry stays.
                    let _ = reply.send(outcome.map_err(|refusal| status::refusal(&refusal)));
                }
            }
            Ok(Err(error)) => {
                let status = status::storage(&error);
                for reply in replies {
                    let _ = reply.send(Err(status.clone()));
                }
            }
            Err(join_error) => {
                tracing::error!(%join_error, "append task panicked");
                for reply in replies {
                    let _ = reply.send(Err(Status::internal(
                        "internal error; the batch was not acknowledged",
                    )));
                }
            }
        }
    }
    if let Err(error) = ledger.store().flush() {
        tracing::error!(%error, "final flush failed");
    }
}
