//! `custody-loadgen`: drives a running ledger with a realistic delegated-access mix and
//! reports what it measured.
//!
//! It registers an issuer, users and resource servers (admin-signed grants), pre-signs every
//! event before the clock starts (per session: a user-signed consent, a token, one or two
//! delegation hops, validations, several actions, some denials and revocations), sends them
//! over `--streams` concurrent `AppendStream`s (whole sessions per stream, so each chain stays
//! in order) or as many unary clients, as fast as possible or at an offered `--rate`. It prints
//! events/s, receipt latency percentiles (from when each event was due to be sent, so a slow
//! server cannot hide its queueing) and the refused count, and checks that the tree grew by
//! exactly the number of events acknowledged.
//!
//! Then, in the same run on the same machine, it measures two reference rates over the same
//! events: Ed25519 batch verification on every core, and the store alone committing the same
//! entries, hashes, state and index keys (captured from an in-process ledger, replayed into a
//! fresh sled store with one flush per batch, no network, no verification), and prints the
//! ingest rate's ratio to each.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use clap::Parser;
use custody::envelope;
use custody::ledger::{GenesisParams, Ledger};
use custody::proto::{
    audit_client::AuditClient, event::Body, ledger_client::LedgerClient, revocation::Target,
    Action, Consent, Denial, DenialReason, Event, GetCheckpointRequest, Issuance, KeyGrant,
    Receipt, Revocation, Role, SignedEvent, Validation,
};
use custody::server::KeyPairJson;
use custody::store::Store;
use ed25519_dalek::SigningKey;
use sha2::Digest as _;
use tokio_stream::StreamExt as _;

/// The allocator the `custody` binary uses, so that the store-only reference measured here
/// runs on the same allocator as the server it is compared with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "custody-loadgen",
    about = "Load generator for a running custody ledger"
)]
struct Args {
    /// The ledger's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// JSON key file of an ADMIN key (e.g. custody-data/admin.key).
    #[arg(long)]
    admin_key: std::path::PathBuf,
    /// Sessions to generate (about 10 events each).
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Concurrent AppendStreams.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Distinct users.
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// A run id, so repeated runs against one ledger use fresh ids.
    #[arg(long, default_value_t = std::process::id().to_string())]
    run: String,
    /// Offered load in events/s over all streams (open loop, paced in 1 ms steps); 0 sends as
    /// fast as the server takes them.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Send with unary `Append` calls (one event in flight per client, `--streams` clients)
    /// instead of `AppendStream`s.
    #[arg(long)]
    unary: bool,
    /// Skip the two reference rates (batch verification, store only).
    #[arg(long)]
    no_reference: bool,
    /// Events per commit in the store-only reference.
    #[arg(long, default_value_t = 1000)]
    reference_batch: usize,
}

fn now_ms() -> i64 {
    custody::ledger::now_ms()
}

struct Keys {
    issuer: SigningKey,
    users: Vec<SigningKey>,
    servers: Vec<(String, SigningKey)>,
}

/// One session's events, in causal order.
fn session(keys: &Keys, run: &str, n: usize) -> Vec<SignedEvent> {
    let id = |what: &str| format!("{run}-{n}-{what}");
    let user_index = n % keys.users.len();
    let user = format!("user-{user_index}");
    let now = now_ms();
    let event = |what: &str, body: Body| Event {
        event_id: id(what),
        occurred_at_ms: now,
        body: Some(body),
    };
    let mut out = Vec::with_capacity(12);
    let consent_id = id("consent");
    out.push(envelope::sign_event(
        &keys.users[user_index],
        &event(
            "consent",
            Body::Consent(Consent {
                consent_id: consent_id.clone(),
                user: user.clone(),
                agent: "assistant".into(),
                scopes: vec!["mail:read".into(), "mail:send".into(), "cal".into()],
                audiences: vec!["mail.example".into(), "cal.example".into()],
                expires_at_ms: now + 3_600_000,
                purpose: "triage my inbox".into(),
                consent_text_sha256: sha2::Sha256::digest(b"consent text").to_vec(),
                max_delegation_depth: 2,
                allowed_delegates: vec![],
            }),
        ),
    ));
    let mut tokens = Vec::new();
    let mut parent = String::new();
    let hops = 1 + n % 2;
    for hop in 0..=hops {
        let token_id = id(&format!("tok{hop}"));
        let scopes = match hop {
            0 => vec!["mail:read".into(), "cal".into()],
            1 => vec!["mail:read".into(), "cal:read".into()],
            _ => vec!["mail:read:inbox".into()],
        };
        out.push(envelope::sign_event(
            &keys.issuer,
            &event(
                &format!("issue{hop}"),
                Body::Issuance(Issuance {
                    token_id: token_id.clone(),
                    token_sha256: sha2::Sha256::digest(token_id.as_bytes()).to_vec(),
                    consent_id: consent_id.clone(),
                    parent_token_id: parent.clone(),
                    user: user.clone(),
                    agent: if hop == 0 {
                        "assistant".into()
                    } else {
                        format!("helper-{hop}")
                    },
                    scopes,
                    audiences: vec!["mail.example".into()],
                    not_before_ms: now - 1_000,
                    expires_at_ms: now + 1_800_000 - hop as i64 * 60_000,
                    grant_type: if hop == 0 {
                        "authorization_code"
                    } else {
                        "urn:ietf:params:oauth:grant-type:token-exchange"
                    }
                    .into(),
                }),
            ),
        ));
        parent = token_id.clone();
        tokens.push(token_id);
    }
    let (server_name, server_key) = &keys.servers[0];
    let last = tokens.last().cloned().unwrap_or_default();
    for v in 0..2 {
        out.push(envelope::sign_event(
            server_key,
            &event(
                &format!("val{v}"),
                Body::Validation(Validation {
                    token_id: last.clone(),
                    token_sha256: sha2::Sha256::digest(last.as_bytes()).to_vec(),
                    resource_server: server_name.clone(),
                    valid: true,
                    reason: String::new(),
                }),
            ),
        ));
    }
    for a in 0..4 {
        out.push(envelope::sign_event(
            server_key,
            &event(
                &format!("act{a}"),
                Body::Action(Action {
                    token_id: last.clone(),
                    resource_server: server_name.clone(),
                    agent: String::new(),
                    operation: if a == 3 && n.is_multiple_of(5) {
                        "mail:send".into()
                    } else {
                        "mail:read:inbox".into()
                    },
                    resource: format!("mailbox/{user_index}/inbox/{a}"),
                    request_sha256: vec![],
                }),
            ),
        ));
    }
    if n.is_multiple_of(3) {
        out.push(envelope::sign_event(
            server_key,
            &event(
                "deny",
                Body::Denial(Denial {
                    token_id: last.clone(),
                    resource_server: server_name.clone(),
                    agent: "helper".into(),
                    operation: "mail:send".into(),
                    resource: "outbox".into(),
                    reason: DenialReason::InsufficientScope as i32,
                    detail: "mail:send not in token".into(),
                }),
            ),
        ));
    }
    if n.is_multiple_of(10) {
        out.push(envelope::sign_event(
            &keys.issuer,
            &event(
                "revoke",
                Body::Revocation(Revocation {
                    target: Some(Target::TokenId(tokens[0].clone())),
                    reason: "session ended".into(),
                }),
            ),
        ));
    }
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let admin_json: KeyPairJson = serde_json::from_str(&std::fs::read_to_string(&args.admin_key)?)
        .with_context(|| format!("{} is not a key file", args.admin_key.display()))?;
    let admin = admin_json.signing_key().map_err(|e| anyhow!(e))?;
    let mut ledger = LedgerClient::connect(args.server.clone()).await?;
    let mut audit = AuditClient::connect(args.server.clone()).await?;

    let keys = Keys {
        issuer: SigningKey::generate(&mut rand::rngs::OsRng),
        users: (0..args.users.max(1))
            .map(|_| SigningKey::generate(&mut rand::rngs::OsRng))
            .collect(),
        servers: vec![(
            "mail.example".into(),
            SigningKey::generate(&mut rand::rngs::OsRng),
        )],
    };
    let mut grants = vec![(
        keys.issuer.clone(),
        Role::Issuer,
        "auth.example".to_string(),
    )];
    for (i, user) in keys.users.iter().enumerate() {
        grants.push((user.clone(), Role::User, format!("user-{i}")));
    }
    for (name, key) in &keys.servers {
        grants.push((key.clone(), Role::ResourceServer, name.clone()));
    }
    let grant_events: Vec<SignedEvent> = grants
        .iter()
        .map(|(key, role, principal)| {
            envelope::sign_event(
                &admin,
                &Event {
                    event_id: format!(
                        "{}-grant-{}",
                        args.run,
                        envelope::key_id(&key.verifying_key().to_bytes())
                    ),
                    occurred_at_ms: now_ms(),
                    body: Some(Body::KeyGrant(KeyGrant {
                        public_key: key.verifying_key().to_bytes().to_vec(),
                        role: *role as i32,
                        principal: principal.clone(),
                        not_before_ms: 0,
                        not_after_ms: 0,
                    })),
                },
            )
        })
        .collect();
    let grant_events_for_reference = grant_events.clone();
    let public_keys: std::collections::HashMap<String, [u8; 32]> = grants
        .iter()
        .map(|(key, _, _)| {
            let public = key.verifying_key().to_bytes();
            (envelope::key_id(&public), public)
        })
        .chain(std::iter::once({
            let public = admin.verifying_key().to_bytes();
            (envelope::key_id(&public), public)
        }))
        .collect();
    let granted = ledger
        .append_stream(tokio_stream::iter(grant_events))
        .await?
        .into_inner()
        .collect::<Vec<_>>()
        .await;
    if let Some(bad) = granted
        .iter()
        .find(|r| r.as_ref().map_or(true, |r| r.error.is_some()))
    {
        return Err(anyhow!("a key grant was refused: {bad:?}"));
    }

    eprintln!("pre-signing {} sessions ...", args.sessions);
    let streams = args.streams.max(1);
    let mut per_stream: Vec<Vec<SignedEvent>> = vec![Vec::new(); streams];
    for n in 0..args.sessions {
        per_stream[n % streams].extend(session(&keys, &args.run, n));
    }
    let total: usize = per_stream.iter().map(Vec::len).sum();
    let before = audit
        .get_checkpoint(GetCheckpointRequest {})
        .await?
        .into_inner()
        .tree_size;
    eprintln!("sending {total} events over {streams} streams ...");

    let started = Instant::now();
    let rate_per_stream = (args.rate > 0).then(|| args.rate as f64 / streams as f64);
    let mut tasks = Vec::new();
    for events in per_stream.clone() {
        let client = ledger.clone();
        let unary = args.unary;
        tasks.push(tokio::spawn(async move {
            if unary {
                send_unary(client, events, rate_per_stream).await
            } else {
                send_stream(client, events, rate_per_stream).await
            }
        }));
    }
    let (mut samples, mut acked, mut refused) = (Vec::new(), 0u64, 0u64);
    for task in tasks {
        let outcome = task.await??;
        samples.extend(outcome.samples);
        acked += outcome.acked;
        refused += outcome.refused;
    }
    let elapsed = started.elapsed();
    let mut latencies: Vec<Duration> = samples.iter().map(|(_, latency)| *latency).collect();
    latencies.sort_unstable();
    // The tail second by second of when events were due: shows whether slow receipts
    // cluster (e.g. at the start of a run) or spread.
    let mut by_second: std::collections::BTreeMap<u64, Vec<Duration>> = Default::default();
    for (due, latency) in &samples {
        let second = due.saturating_duration_since(started).as_secs();
        by_second.entry(second).or_default().push(*latency);
    }
    let after = audit
        .get_checkpoint(GetCheckpointRequest {})
        .await?
        .into_inner()
        .tree_size;
    println!("events sent:        {total}");
    println!("acknowledged:       {acked}");
    println!("refused:            {refused}");
    println!("elapsed:            {:.2} s", elapsed.as_secs_f64());
    println!(
        "ingest rate:        {:.0} events/s",
        acked as f64 / elapsed.as_secs_f64()
    );
    println!(
        "receipt latency:    p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms",
        percentile(&latencies, 50.0).as_secs_f64() * 1e3,
        percentile(&latencies, 99.0).as_secs_f64() * 1e3,
        percentile(&latencies, 99.9).as_secs_f64() * 1e3
    );
    let seconds: Vec<String> = by_second
        .into_iter()
        .map(|(second, mut latencies)| {
            latencies.sort_unstable();
            format!(
                "{second}s {:.1}",
                percentile(&latencies, 99.0).as_secs_f64() * 1e3
            )
        })
        .collect();
    println!("p99 by second (ms): {}", seconds.join(", "));
    println!(
        "tree size:          {before} -> {after} (+{})",
        after - before
    );
    if after - before != acked {
        return Err(anyhow!(
            "the tree grew by {} but {acked} events were acknowledged",
            after - before
        ));
    }
    println!("check:              tree grew by exactly the acknowledged count");
    if args.no_reference {
        return Ok(());
    }
    let ingest = acked as f64 / elapsed.as_secs_f64();
    let all: Vec<SignedEvent> = grant_events_for_reference
        .into_iter()
        .chain(per_stream.into_iter().flatten())
        .collect();
    eprintln!(
        "reference: batch verification of {} signatures ...",
        all.len()
    );
    let (verify_rate, dalek_rate) = tokio::task::spawn_blocking({
        let (all, keys) = (all.clone(), public_keys.clone());
        move || -> anyhow::Result<(f64, f64)> {
            let coalesced = |batch: &[envelope::BatchItem<'_>]| {
                envelope::verify_batch(batch).iter().all(|ok| *ok)
            };
            Ok((
                reference_verify(&all, &keys, coalesced)?,
                reference_verify(&all, &keys, envelope::dalek_batch_holds)?,
            ))
        }
    })
    .await??;
    let threads = custody::trust::all_cores();
    println!(
        "reference verify:   {verify_rate:.0} signatures/s (Ed25519 batch verification as custody does it, ZIP 215, terms by one key coalesced; {threads} threads)"
    );
    println!(
        "                    {dalek_rate:.0} signatures/s (ed25519-dalek verify_batch, not coalesced; {threads} threads)"
    );
    eprintln!("reference: store only ...");
    let batch = args.reference_batch.max(1);
    let (store_rate, committed) =
        tokio::task::spawn_blocking(move || reference_store(all, &admin, batch)).await??;
    println!(
        "reference store:    {store_rate:.0} events/s ({committed} entries, commits of {batch}, one flush each)"
    );
    println!(
        "ratios:             ingest / verify {:.2}, ingest / store {:.2}",
        ingest / verify_rate,
        ingest / store_rate
    );
    Ok(())
}

/// What one sender saw.
struct Sent {
    /// When each event was due, and how long its receipt took from then.
    samples: Vec<(Instant, Duration)>,
    acked: u64,
    refused: u64,
}

impl Sent {
    fn with_capacity(events: usize) -> Self {
        Self {
            samples: Vec::with_capacity(events),
            acked: 0,
            refused: 0,
        }
    }

    fn record(&mut self, due: Instant, receipt: &Receipt) {
        self.samples.push((due, due.elapsed()));
        if receipt.error.is_some() {
            self.refused += 1;
        } else if !receipt.duplicate {
            self.acked += 1;
        }
    }
}

/// Waits until the `i`th event is due and returns when it was due: paced at `rate` events/s
/// from `start`, or at once (returning now) for an unpaced run.
async fn when_due(i: usize, rate: Option<f64>, start: Instant) -> Instant {
    match rate {
        Some(rate) => {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
            due
        }
        None => Instant::now(),
    }
}

/// Sends `events` over one AppendStream, paced by a feeder task. Latency counts from when an
/// event was due (or handed to the stream, unpaced) to its receipt.
async fn send_stream(
    mut client: LedgerClient<tonic::transport::Channel>,
    events: Vec<SignedEvent>,
    rate: Option<f64>,
) -> anyhow::Result<Sent> {
    let count = events.len();
    let (tx, rx) = tokio::sync::mpsc::channel::<SignedEvent>(4096);
    let (stamp_tx, mut stamp_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let feeder = tokio::spawn(async move {
        let start = Instant::now();
        for (i, event) in events.into_iter().enumerate() {
            let stamp = when_due(i, rate, start).await;
            if stamp_tx.send(stamp).is_err() || tx.send(event).await.is_err() {
                break;
            }
        }
    });
    let mut inbound = client
        .append_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut sent = Sent::with_capacity(count);
    while let Some(receipt) = inbound.next().await {
        let receipt = receipt?;
        let due = stamp_rx
            .recv()
            .await
            .ok_or_else(|| anyhow!("a receipt arrived for an event never sent"))?;
        sent.record(due, &receipt);
    }
    feeder.await?;
    Ok(sent)
}

/// Sends `events` one unary `Append` at a time (paced if `rate` is set).
async fn send_unary(
    mut client: LedgerClient<tonic::transport::Channel>,
    events: Vec<SignedEvent>,
    rate: Option<f64>,
) -> anyhow::Result<Sent> {
    let start = Instant::now();
    let mut sent = Sent::with_capacity(events.len());
    for (i, event) in events.into_iter().enumerate() {
        let stamp = when_due(i, rate, start).await;
        let receipt = match client.append(event).await {
            Ok(receipt) => receipt.into_inner(),
            Err(status) if is_refusal(&status) => Receipt {
                error: Some(custody::proto::ReceiptError::default()),
                ..Receipt::default()
            },
            Err(status) => return Err(status.into()),
        };
        sent.record(stamp, &receipt);
    }
    Ok(sent)
}

/// A unary refusal (the event was judged and not written), as opposed to a transport error.
fn is_refusal(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::FailedPrecondition
            | tonic::Code::AlreadyExists
    )
}

/// Ed25519 batch verification of every event's signature (keys parsed beforehand) by
/// `batch_holds`, split over every core in batches of 1,024: signatures per second.
fn reference_verify(
    events: &[SignedEvent],
    keys: &std::collections::HashMap<String, [u8; 32]>,
    batch_holds: fn(&[envelope::BatchItem<'_>]) -> bool,
) -> anyhow::Result<f64> {
    let parsed: std::collections::HashMap<&str, ed25519_dalek::VerifyingKey> = keys
        .iter()
        .map(|(id, key)| Ok((id.as_str(), envelope::parse_public_key(key)?)))
        .collect::<Result<_, envelope::SignatureError>>()?;
    let items: Vec<envelope::BatchItem<'_>> = events
        .iter()
        .map(|event| {
            Ok(envelope::BatchItem {
                key: *parsed
                    .get(event.key_id.as_str())
                    .ok_or_else(|| anyhow!("no key for {}", event.key_id))?,
                payload: &event.payload,
                signature: &event.signature,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let per_thread = items.len().div_ceil(custody::trust::all_cores()).max(1);
    let started = Instant::now();
    let bad = std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(per_thread)
            .map(|part| {
                scope.spawn(move || {
                    part.chunks(1024)
                        .filter(|batch| !batch_holds(batch))
                        .count()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(usize::MAX))
            .sum::<usize>()
    });
    let elapsed = started.elapsed();
    if bad != 0 {
        return Err(anyhow!("{bad} batches failed batch verification"));
    }
    Ok(items.len() as f64 / elapsed.as_secs_f64())
}

/// The store alone: appends `events` to an in-process ledger in a scratch directory,
/// capturing each batch's durable form, then times committing those same batches (entries,
/// hashes, event ids, state, index keys, checkpoint; one flush each) into a fresh store.
/// Returns events/s and the number of entries committed.
fn reference_store(
    events: Vec<SignedEvent>,
    admin: &SigningKey,
    batch: usize,
) -> anyhow::Result<(f64, u64)> {
    let scratch = std::env::temp_dir().join(format!("custody-loadgen-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(scratch.clone());
    let params = GenesisParams {
        origin: "loadgen/reference".into(),
        admin_public_key: admin.verifying_key().to_bytes(),
        // Events were signed before the run started; the reference must not refuse them.
        max_clock_skew_ms: 86_400_000,
    };
    let ledger_key = SigningKey::generate(&mut rand::rngs::OsRng);
    let captured = {
        let ledger = Ledger::create(
            Store::open(&scratch.join("a"))?,
            ledger_key.clone(),
            &params,
        )?;
        let mut captured = Vec::new();
        for chunk in events.chunks(batch) {
            let prepared = ledger.prepare(chunk.to_vec(), custody::trust::all_cores());
            let outcomes = ledger
                .append_prepared_observed(prepared, |commit| captured.push(commit.clone()))?;
            if let Some(refusal) = outcomes.iter().find_map(|o| o.as_ref().err()) {
                return Err(anyhow!("the reference ledger refused an event: {refusal}"));
            }
        }
        captured
    };
    drop(Ledger::create(
        Store::open(&scratch.join("b"))?,
        ledger_key,
        &params,
    )?);
    let store = Store::open(&scratch.join("b"))?;
    let started = Instant::now();
    let mut committed = 0u64;
    for commit in &captured {
        store.commit(commit)?;
        committed += commit.entries.len() as u64;
    }
    let elapsed = started.elapsed();
    Ok((committed as f64 / elapsed.as_secs_f64(), committed))
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
