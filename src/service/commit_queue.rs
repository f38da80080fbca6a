//! Group commit in four stages, each on its own blocking thread, so that a machine's cores
//! work on four batches at once. Events from every connection queue here.
//!
//! 1. Verify: takes whatever has arrived (up to a batch limit), decodes it and batch-verifies
//!    its signatures on every core ([`Ledger::prepare`]).
//! 2. Judge: in order, judges each event against the state before it, builds the entries and
//!    signs the batch's checkpoint ([`Ledger::judge`]); it sees the batches still being
//!    written through its [`InFlight`] memory.
//! 3. Apply: in order, writes each batch to the store with one atomic write
//!    ([`Ledger::apply`]), while the batch before it is being flushed.
//! 4. Finish: in order, flushes the store ([`Ledger::finish`]) and only then publishes the
//!    batch's head and answers each submitter.
//!
//! Every queue is bounded (the submission queue by `capacity` events, each hand-over between
//! stages by one batch), so when the store falls behind, submitters wait for room instead of
//! growing memory (backpressure).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::ledger::{AppliedBatch, InFlight, JudgedBatch, Ledger, PreparedBatch};
use crate::metrics::Metrics;
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
    /// Starts the group-commit task for `ledger`. Once `closing` turns true (or its sender is
    /// dropped) the queue takes no more submissions (they fail with `UNAVAILABLE`); those
    /// already queued are committed and answered, and then the task ends, even while some
    /// handles are still held.
    ///
    /// Batch sizes, stage times and outcomes are counted in `metrics`.
    pub fn start(
        ledger: Arc<Ledger>,
        limits: QueueLimits,
        closing: tokio::sync::watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(limits.capacity.max(1));
        // One batch waits at each hand-over: enough to keep every stage busy, little enough to
        // bound memory.
        let (prepared_tx, prepared_rx) = mpsc::channel(1);
        let (judged_tx, judged_rx) = mpsc::channel(1);
        let (applied_tx, applied_rx) = mpsc::channel(1);
        tokio::spawn(verify_stage(
            ledger.clone(),
            rx,
            closing,
            prepared_tx,
            limits.max_batch.max(1),
            metrics.clone(),
        ));
        tokio::spawn(judge_stage(
            ledger.clone(),
            prepared_rx,
            judged_tx,
            metrics.clone(),
        ));
        tokio::spawn(apply_stage(
            ledger.clone(),
            judged_rx,
            applied_tx,
            metrics.clone(),
        ));
        let task = tokio::spawn(finish_stage(ledger, applied_rx, metrics));
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

type Replies = Vec<oneshot::Sender<Reply>>;

/// Takes what has arrived, prepares it off the runtime and hands it to the judge stage.
/// Ends when every submitter is gone, or once `closing` turns true and the queue is empty.
async fn verify_stage(
    ledger: Arc<Ledger>,
    mut rx: mpsc::Receiver<Submission>,
    closing: tokio::sync::watch::Receiver<bool>,
    prepared_tx: mpsc::Sender<(PreparedBatch, Replies)>,
    max_batch: usize,
    metrics: Arc<Metrics>,
) {
    let threads = crate::trust::all_cores();
    let mut submissions = Vec::with_capacity(max_batch);
    let mut closing = closing;
    let mut open = true;
    loop {
        let received = if open {
            tokio::select! {
                // Cancel-safe: nothing is taken from the queue unless this branch completes.
                received = rx.recv_many(&mut submissions, max_batch) => received,
                _ = closing.wait_for(|closing| *closing) => {
                    // Refuse new submissions; what is queued is still received.
                    rx.close();
                    open = false;
                    continue;
                }
            }
        } else {
            rx.recv_many(&mut submissions, max_batch).await
        };
        if received == 0 {
            break;
        }
        let (events, replies): (Vec<_>, Replies) =
            submissions.drain(..).map(|s| (s.event, s.reply)).unzip();
        metrics.batch(events.len());
        let ledger_for_batch = ledger.clone();
        let prepared = run_stage(&metrics, "verify", events.len(), move || {
            ledger_for_batch.prepare(events, threads)
        })
        .await;
        match prepared {
            Ok(prepared) => {
                if prepared_tx.send((prepared, replies)).await.is_err() {
                    break;
                }
            }
            Err(join_error) => fail_all(&metrics, replies, &join_error),
        }
    }
}

/// Judges prepared batches in order and hands them to the apply stage. A storage failure
/// answers the batch's submitters; the ledger then refuses every later batch.
async fn judge_stage(
    ledger: Arc<Ledger>,
    mut prepared_rx: mpsc::Receiver<(PreparedBatch, Replies)>,
    judged_tx: mpsc::Sender<(JudgedBatch, Replies)>,
    metrics: Arc<Metrics>,
) {
    let mut in_flight = Some(InFlight::default());
    while let Some((prepared, replies)) = prepared_rx.recv().await {
        let ledger_for_batch = ledger.clone();
        let mut memory = in_flight.take().unwrap_or_default();
        let judged = run_stage(&metrics, "judge", prepared.len(), move || {
            let judged = ledger_for_batch.judge(prepared, &mut memory);
            (judged, memory)
        })
        .await;
        match judged {
            Ok((Ok(judged), memory)) => {
                in_flight = Some(memory);
                if judged_tx.send((judged, replies)).await.is_err() {
                    break;
                }
            }
            Ok((Err(error), memory)) => {
                in_flight = Some(memory);
                fail_storage(&metrics, replies, &error);
            }
            // The memory of batches in flight is lost with the panicked thread; the panic
            // stopped the ledger's appends, so every later batch is refused.
            Err(join_error) => fail_all(&metrics, replies, &join_error),
        }
    }
}

/// Applies judged batches to the store in order and hands them to the finish stage.
async fn apply_stage(
    ledger: Arc<Ledger>,
    mut judged_rx: mpsc::Receiver<(JudgedBatch, Replies)>,
    applied_tx: mpsc::Sender<(AppliedBatch, Replies)>,
    metrics: Arc<Metrics>,
) {
    while let Some((judged, replies)) = judged_rx.recv().await {
        let ledger_for_batch = ledger.clone();
        let outcome = run_stage(&metrics, "apply", replies.len(), move || {
            ledger_for_batch.apply(judged, |_| ())
        })
        .await;
        match outcome {
            Ok(Ok(applied)) => {
                if applied_tx.send((applied, replies)).await.is_err() {
                    break;
                }
            }
            Ok(Err(error)) => fail_storage(&metrics, replies, &error),
            Err(join_error) => fail_all(&metrics, replies, &join_error),
        }
    }
}

/// Flushes applied batches in order and answers their submitters once each is durable.
/// Ends (after a final flush) when the earlier stages have ended and everything is written.
async fn finish_stage(
    ledger: Arc<Ledger>,
    mut applied_rx: mpsc::Receiver<(AppliedBatch, Replies)>,
    metrics: Arc<Metrics>,
) {
    while let Some((applied, replies)) = applied_rx.recv().await {
        let ledger_for_batch = ledger.clone();
        let outcome = run_stage(&metrics, "finish", replies.len(), move || {
            ledger_for_batch.finish(applied)
        })
        .await;
        match outcome {
            Ok(Ok(outcomes)) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    match &outcome {
                        Ok(receipt) => metrics.appended(receipt.duplicate),
                        Err(refusal) => metrics.refused(refusal),
                    }
                    // A submitter that went away no longer needs its receipt; its entry stays.
                    let _ = reply.send(outcome.map_err(|refusal| status::refusal(&refusal)));
                }
            }
            Ok(Err(error)) => fail_storage(&metrics, replies, &error),
            Err(join_error) => fail_all(&metrics, replies, &join_error),
        }
    }
    if let Err(error) = ledger.store().flush() {
        tracing::error!(%error, "final flush failed");
    }
}

/// Runs one stage's work on a blocking thread, logging the batch size and the duration at
/// debug level and counting the duration in `metrics`.
async fn run_stage<T: Send + 'static>(
    metrics: &Metrics,
    stage: &'static str,
    events: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    let started = std::time::Instant::now();
    let outcome = tokio::task::spawn_blocking(work).await;
    let elapsed = started.elapsed();
    metrics.stage(stage, elapsed.as_secs_f64());
    tracing::debug!(stage, events, micros = elapsed.as_micros() as u64);
    outcome
}

fn fail_storage(metrics: &Metrics, replies: Replies, error: &crate::store::StoreError) {
    metrics.failed(replies.len());
    let status = status::storage(error);
    for reply in replies {
        let _ = reply.send(Err(status.clone()));
    }
}

fn fail_all(metrics: &Metrics, replies: Replies, join_error: &tokio::task::JoinError) {
    metrics.failed(replies.len());
    tracing::error!(%join_error, "append task panicked");
    for reply in replies {
        let _ = reply.send(Err(Status::internal(
            "internal error; the batch was not acknowledged",
        )));
    }
}
