//! `custody-loadgen`: drives a running ledger with a realistic delegated-access mix and
//! reports what it measured.
//!
//! It registers an issuer, users and resource servers (admin-signed grants), pre-signs every
//! event before the clock starts (per session: a user-signed consent, a token, one or two
//! delegation hops, validations, several actions, some denials and revocations), sends them
//! over `--streams` concurrent `AppendStream`s (whole sessions per stream, so each chain stays
//! in order), and prints events/s, receipt latency percentiles and the refused count. At the
//! end it checks that the tree grew by exactly the number of events acknowledged.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use clap::Parser;
use custody::envelope;
use custody::proto::{
    audit_client::AuditClient, event::Body, ledger_client::LedgerClient, revocation::Target,
    Action, Consent, Denial, DenialReason, Event, GetCheckpointRequest, Issuance, KeyGrant,
    Revocation, Role, SignedEvent, Validation,
};
use custody::server::KeyPairJson;
use ed25519_dalek::SigningKey;
use sha2::Digest as _;
use tokio_stream::StreamExt as _;

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
    let mut tasks = Vec::new();
    for events in per_stream {
        let mut client = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let sent_at = Arc::new(Mutex::new(Vec::with_capacity(events.len())));
            let stamps = sent_at.clone();
            let outbound = tokio_stream::iter(events).map(move |event| {
                if let Ok(mut stamps) = stamps.lock() {
                    stamps.push(Instant::now());
                }
                event
            });
            let mut inbound = client.append_stream(outbound).await?.into_inner();
            let (mut latencies, mut acked, mut refused, mut index) =
                (Vec::new(), 0u64, 0u64, 0usize);
            while let Some(receipt) = inbound.next().await {
                let receipt = receipt?;
                let sent = sent_at.lock().ok().and_then(|s| s.get(index).copied());
                if let Some(sent) = sent {
                    latencies.push(sent.elapsed());
                }
                index += 1;
                if receipt.error.is_some() {
                    refused += 1;
                } else if !receipt.duplicate {
                    acked += 1;
                }
            }
            Ok::<_, anyhow::Error>((latencies, acked, refused))
        }));
    }
    let (mut latencies, mut acked, mut refused) = (Vec::new(), 0u64, 0u64);
    for task in tasks {
        let (l, a, r) = task.await??;
        latencies.extend(l);
        acked += a;
        refused += r;
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
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
    Ok(())
}
