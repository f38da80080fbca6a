//! Prometheus metrics (`custody serve --metrics-listen ADDR`, text format at `GET /metrics`).
//!
//! | metric | type | what |
//! | --- | --- | --- |
//! | `custody_appended_total` | counter | events appended (new entries) |
//! | `custody_duplicates_total` | counter | exact retries answered with the original receipt |
//! | `custody_refused_total{reason}` | counter | events refused, by [`Refusal::code`] |
//! | `custody_failed_total` | counter | queued events answered with an error because a storage failure (or a panic) stopped their batch |
//! | `custody_batch_events` | histogram | events per group-commit batch |
//! | `custody_stage_seconds{stage}` | histogram | time per batch in each pipeline stage (`verify`: batch signature verification; `judge`; `apply`; `finish`: the flush, i.e. `fsync`) |
//! | `custody_tree_size` | gauge | entries under the newest published checkpoint |
//! | `custody_open_streams` | gauge | open `AppendStream`, `Watch` and `GetEntries` calls |
//! | `custody_appends_stopped` | gauge | 1 once a storage failure stopped appends |
//!
//! The counters are cumulative since the process started.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::ledger::Ledger;
use crate::service::OpenStreams;
use crate::trust::Refusal;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

fn stage_histogram() -> Histogram {
    // 100 µs .. about 13 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// The server's metrics. Cheap to update from any thread.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    appended: Counter,
    duplicates: Counter,
    failed: Counter,
    refused: Family<ReasonLabel, Counter>,
    batch_events: Histogram,
    stage_seconds: Family<StageLabel, Histogram>,
    tree_size: Gauge,
    open_streams: Gauge,
    stopped: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All metrics at zero.
    pub fn new() -> Self {
        let mut metrics = Self {
            registry: Registry::with_prefix("custody"),
            appended: Counter::default(),
            duplicates: Counter::default(),
            failed: Counter::default(),
            refused: Family::default(),
            batch_events: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            stage_seconds: Family::new_with_constructor(stage_histogram),
            tree_size: Gauge::default(),
            open_streams: Gauge::default(),
            stopped: Gauge::default(),
        };
        metrics.registry.register(
            "appended",
            "Events appended as new entries",
            metrics.appended.clone(),
        );
        metrics.registry.register(
            "duplicates",
            "Exact retries answered with the original receipt",
            metrics.duplicates.clone(),
        );
        metrics.registry.register(
            "failed",
            "Queued events answered with an error because a storage failure stopped their batch",
            metrics.failed.clone(),
        );
        metrics.registry.register(
            "refused",
            "Events refused, by reason",
            metrics.refused.clone(),
        );
        metrics.registry.register(
            "batch_events",
            "Events per group-commit batch",
            metrics.batch_events.clone(),
        );
        metrics.registry.register(
            "stage_seconds",
            "Seconds per batch in each append stage (finish is the flush)",
            metrics.stage_seconds.clone(),
        );
        metrics.registry.register(
            "tree_size",
            "Entries under the newest published checkpoint",
            metrics.tree_size.clone(),
        );
        metrics.registry.register(
            "open_streams",
            "Open AppendStream, Watch and GetEntries calls",
            metrics.open_streams.clone(),
        );
        metrics.registry.register(
            "appends_stopped",
            "1 once a storage failure stopped appends",
            metrics.stopped.clone(),
        );
        metrics
    }

    /// One batch passed `stage` in `seconds`.
    pub fn stage(&self, stage: &'static str, seconds: f64) {
        self.stage_seconds
            .get_or_create(&StageLabel { stage })
            .observe(seconds);
    }

    /// A batch of `events` entered the pipeline.
    pub fn batch(&self, events: usize) {
        self.batch_events.observe(events as f64);
    }

    /// An event was appended (`duplicate`: answered with its original receipt).
    pub fn appended(&self, duplicate: bool) {
        if duplicate {
            self.duplicates.inc();
        } else {
            self.appended.inc();
        }
    }

    /// An event was refused.
    pub fn refused(&self, refusal: &Refusal) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: refusal.code(),
            })
            .inc();
    }

    /// `events` queued events got an error instead of an answer (storage failure, panic).
    pub fn failed(&self, events: usize) {
        self.failed.inc_by(events as u64);
    }

    /// The text exposition, with the gauges read now from `ledger` and `streams`.
    pub fn render(&self, ledger: &Ledger, streams: &OpenStreams) -> String {
        self.tree_size
            .set(i64::try_from(ledger.head().tree_size).unwrap_or(i64::MAX));
        self.open_streams
            .set(i64::try_from(streams.open_count()).unwrap_or(i64::MAX));
        self.stopped.set(i64::from(*ledger.stopped().borrow()));
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Serves `GET /metrics` (any path answers the same) over HTTP/1.1 on `listener` until
/// `shutdown` completes. Errors on single connections are logged and do not stop it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    ledger: Arc<Ledger>,
    streams: OpenStreams,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;

    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "metrics listener accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let metrics = metrics.clone();
        let ledger = ledger.clone();
        let streams = streams.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_request| {
                let body = metrics.render(&ledger, &streams);
                async move {
                    hyper::Response::builder()
                        .header(
                            hyper::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(Full::new(Bytes::from(body)))
                }
            });
            // One response per connection: no idle connection outlives its scrape.
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, %peer, "metrics connection");
            }
        });
    }
}
