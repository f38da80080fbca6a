//! Criterion benchmarks of the pure core's hot functions: envelope signatures, Merkle hashing
//! and proofs, checkpoints and chain-of-trust verdicts.
//!
//! ```sh
//! cargo bench --bench core                                            # all of them
//! cargo bench --bench core -- --warm-up-time 1 --measurement-time 2   # a quicker run
//! cargo bench --bench core -- merkle                                  # one group
//! ```
//!
//! Inputs are built once per group, outside the timed loops, from fixed seeds (no I/O).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use custody::checkpoint::{self, CheckpointSigner, LedgerVerifier};
use custody::envelope::{self, BatchItem};
use custody::merkle::{self, Hash, MemoryTree};
use custody::proto::{
    event::Body, Action, Consent, Entry, Event, Issuance, KeyGrant, Role, SignedEvent, TraceStatus,
    Verdict,
};
use custody::trust::{self, KeyRecord, MemoryState, StateChange};
use ed25519_dalek::SigningKey;
use sha2::{Digest as _, Sha256};

/// The base time of every event, in ms (November 2023).
const T: i64 = 1_700_000_000_000;
const HOUR: i64 = 3_600_000;

/// Leaves in the benchmarked Merkle tree.
const TREE_SIZE: u64 = 1_000_000;

fn signing_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A resource server's Action the way the load generator makes them, with the optional
/// request hash filled in and run-scoped ids: about 300 bytes once encoded.
fn action_event(n: usize) -> Event {
    let run = "bench-2f9c1d7e-4b6a-4c1f-9a0e-5d3b8e7f6a21";
    Event {
        event_id: format!("{run}-{n}-act0"),
        occurred_at_ms: T + 5_000,
        body: Some(Body::Action(Action {
            token_id: format!("{run}-{n}-tok1"),
            resource_server: "mail.example".into(),
            agent: "helper-1".into(),
            operation: "mail:read:inbox".into(),
            resource: format!(
                "mailbox/{}/inbox/messages/{n:016}/attachments/2/{}",
                n % 100,
                "content?format=raw&part=body"
            ),
            request_sha256: Sha256::digest(format!("GET /inbox/{n}").as_bytes()).to_vec(),
        })),
    }
}

/// The stored bytes of the entry that holds `signed`: what the Merkle leaf hash covers.
fn entry_bytes(seq: u64, signed: &SignedEvent) -> Vec<u8> {
    let entry = Entry {
        seq,
        prev_hash: vec![0xab; 32],
        received_at_ms: T + 5_003,
        event: Some(signed.clone()),
        verdict: Some(Verdict {
            status: TraceStatus::Traced as i32,
            reasons: vec![],
            consent_seq: seq - 3,
            chain: vec![seq - 1, seq - 2],
            consent_user_signed: true,
            rules_version: trust::RULES_VERSION,
        }),
    };
    prost::Message::encode_to_vec(&entry)
}

fn bench_envelope(c: &mut Criterion) {
    let server = signing_key(4);
    let signed = envelope::sign_event(&server, &action_event(0));
    let key = server.verifying_key();
    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Bytes(signed.payload.len() as u64));
    group.bench_function(format!("pae/{}B", signed.payload.len()), |b| {
        b.iter(|| envelope::pae(envelope::PAYLOAD_TYPE, black_box(&signed.payload)))
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function(format!("verify_payload/{}B", signed.payload.len()), |b| {
        b.iter(|| {
            envelope::verify_payload(
                black_box(&key),
                black_box(&signed.payload),
                black_box(&signed.signature),
            )
            .unwrap()
        })
    });
    group.finish();

    // A batch as the server sees one: many events from a handful of resource servers.
    let servers: Vec<SigningKey> = (0..16).map(|i| signing_key(100 + i)).collect();
    let events: Vec<(ed25519_dalek::VerifyingKey, SignedEvent)> = (0..1024)
        .map(|n| {
            let key = &servers[n % servers.len()];
            (
                key.verifying_key(),
                envelope::sign_event(key, &action_event(n)),
            )
        })
        .collect();
    let mut group = c.benchmark_group("envelope/verify_batch");
    group.sampling_mode(SamplingMode::Flat).sample_size(20);
    for size in [64usize, 1024] {
        let items: Vec<BatchItem<'_>> = events[..size]
            .iter()
            .map(|(key, signed)| BatchItem {
                key: *key,
                payload: &signed.payload,
                signature: &signed.signature,
            })
            .collect();
        assert!(envelope::verify_batch(&items).iter().all(|&ok| ok));
        group.throughput(Throughput::Elements(size as u64));
        group.bench_function(size.to_string(), |b| {
            b.iter(|| envelope::verify_batch(black_box(&items)))
        });
        // The same batch by ed25519-dalek's batch equation (terms by one key not coalesced).
        assert!(envelope::dalek_batch_holds(&items));
        group.bench_function(format!("dalek/{size}"), |b| {
            b.iter(|| envelope::dalek_batch_holds(black_box(&items)))
        });
    }
    group.finish();
}

fn bench_merkle(c: &mut Criterion) {
    let signed = envelope::sign_event(&signing_key(4), &action_event(0));
    let entry = entry_bytes(1_234, &signed);
    let mut group = c.benchmark_group("merkle");
    group.throughput(Throughput::Bytes(entry.len() as u64));
    group.bench_function(format!("leaf_hash/{}B", entry.len()), |b| {
        b.iter(|| merkle::leaf_hash(black_box(&entry)))
    });
    group.throughput(Throughput::Elements(1));

    let leaf = |i: u64| merkle::leaf_hash(&i.to_be_bytes());
    let mut tree = MemoryTree::new();
    for i in 0..TREE_SIZE {
        tree.push(leaf(i));
    }
    let root = tree.root();
    group.bench_function("root/1000000", |b| {
        b.iter(|| merkle::root(black_box(TREE_SIZE), &tree).unwrap())
    });

    let index = 654_321;
    let path = merkle::inclusion_proof(index, TREE_SIZE, &tree).unwrap();
    group.bench_function("inclusion_proof/1000000", |b| {
        b.iter(|| merkle::inclusion_proof(black_box(index), TREE_SIZE, &tree).unwrap())
    });
    group.bench_function("verify_inclusion/1000000", |b| {
        b.iter(|| {
            merkle::verify_inclusion(black_box(&path), index, TREE_SIZE, leaf(index), root).unwrap()
        })
    });

    let old_size = 600_000;
    let old_root: Hash = merkle::root(old_size, &tree).unwrap();
    let proof = merkle::consistency_proof(old_size, TREE_SIZE, &tree).unwrap();
    group.bench_function("consistency_proof/600000-1000000", |b| {
        b.iter(|| merkle::consistency_proof(black_box(old_size), TREE_SIZE, &tree).unwrap())
    });
    group.bench_function("verify_consistency/600000-1000000", |b| {
        b.iter(|| {
            merkle::verify_consistency(black_box(&proof), old_size, old_root, TREE_SIZE, root)
                .unwrap()
        })
    });
    group.finish();
}

fn bench_checkpoint(c: &mut Criterion) {
    let signer = CheckpointSigner::new("localhost/custody", signing_key(1)).unwrap();
    let verifier = LedgerVerifier::parse(&signer.verifier_key()).unwrap();
    let root = Hash(Sha256::digest(b"some root").into());
    let note = signer.sign(TREE_SIZE, &root);
    assert_eq!(
        checkpoint::open(&note, &verifier).unwrap().tree_size(),
        TREE_SIZE
    );
    let mut group = c.benchmark_group("checkpoint");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sign", |b| {
        b.iter(|| signer.sign(black_box(TREE_SIZE), black_box(&root)))
    });
    group.bench_function("open", |b| {
        b.iter(|| checkpoint::open(black_box(&note), &verifier).unwrap())
    });
    group.finish();
}

/// Registers `key` in `state` as a `role` key of `principal`; returns its record.
fn register(state: &mut MemoryState, key: &SigningKey, role: Role, principal: &str) -> KeyRecord {
    let grant = KeyGrant {
        public_key: key.verifying_key().to_bytes().to_vec(),
        role: role as i32,
        principal: principal.into(),
        not_before_ms: 0,
        not_after_ms: 0,
    };
    let record = KeyRecord::from_grant(&grant, 1);
    state.apply([StateChange::PutKey {
        key_id: record.key_id(),
        record: record.clone(),
    }]);
    record
}

/// Runs an event through the rules as the ledger would and applies its changes.
fn append(state: &mut MemoryState, signer: &KeyRecord, seq: u64, event: &Event) {
    trust::validate_event(event, prost::Message::encoded_len(event)).unwrap();
    trust::authorize(event, signer).unwrap();
    let evaluation = trust::evaluate(event, signer, seq, state).unwrap().unwrap();
    state.apply(evaluation.delta);
}

fn bench_trust(c: &mut Criterion) {
    // The chain the load generator builds: a user-signed consent, a direct token, one
    // delegation hop; then the resource server reports an action under the hop's token.
    let mut state = MemoryState::new();
    let user = register(&mut state, &signing_key(2), Role::User, "user-0");
    let issuer = register(&mut state, &signing_key(3), Role::Issuer, "auth.example");
    let server = register(
        &mut state,
        &signing_key(4),
        Role::ResourceServer,
        "mail.example",
    );
    let action = action_event(0);
    let Some(Body::Action(body)) = &action.body else {
        unreachable!()
    };
    let hop_token = body.token_id.clone();
    let direct_token = hop_token.replace("tok1", "tok0");
    let consent_id = hop_token.replace("tok1", "consent");
    let event = |what: &str, body: Body| Event {
        event_id: format!("{consent_id}-{what}"),
        occurred_at_ms: T,
        body: Some(body),
    };
    append(
        &mut state,
        &user,
        10,
        &event(
            "consent",
            Body::Consent(Consent {
                consent_id: consent_id.clone(),
                user: "user-0".into(),
                agent: "assistant".into(),
                scopes: vec!["mail:read".into(), "mail:send".into(), "cal".into()],
                audiences: vec!["mail.example".into(), "cal.example".into()],
                expires_at_ms: T + HOUR,
                purpose: "triage my inbox".into(),
                consent_text_sha256: Sha256::digest(b"consent text").to_vec(),
                max_delegation_depth: 2,
                allowed_delegates: vec![],
            }),
        ),
    );
    let issuance = |token_id: &str, parent: &str, agent: &str, scopes: &[&str]| Issuance {
        token_id: token_id.into(),
        token_sha256: Sha256::digest(token_id.as_bytes()).to_vec(),
        consent_id: consent_id.clone(),
        parent_token_id: parent.into(),
        user: "user-0".into(),
        agent: agent.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        audiences: vec!["mail.example".into()],
        not_before_ms: T - 1_000,
        expires_at_ms: T + HOUR / 2,
        grant_type: if parent.is_empty() {
            "authorization_code"
        } else {
            "urn:ietf:params:oauth:grant-type:token-exchange"
        }
        .into(),
    };
    append(
        &mut state,
        &issuer,
        11,
        &event(
            "issue0",
            Body::Issuance(issuance(
                &direct_token,
                "",
                "assistant",
                &["mail:read", "cal"],
            )),
        ),
    );
    append(
        &mut state,
        &issuer,
        12,
        &event(
            "issue1",
            Body::Issuance(issuance(
                &hop_token,
                &direct_token,
                "helper-1",
                &["mail:read", "cal:read"],
            )),
        ),
    );
    trust::authorize(&action, &server).unwrap();
    let evaluation = trust::evaluate(&action, &server, 13, &state)
        .unwrap()
        .unwrap();
    assert_eq!(
        evaluation.verdict.status,
        TraceStatus::Traced as i32,
        "{:?}",
        evaluation.verdict
    );
    assert_eq!(evaluation.verdict.chain.len(), 2);

    let mut group = c.benchmark_group("trust");
    group.throughput(Throughput::Elements(1));
    group.bench_function("evaluate/action_via_1_hop", |b| {
        b.iter(|| {
            trust::evaluate(black_box(&action), &server, 13, &state)
                .unwrap()
                .unwrap()
        })
    });
    group.finish();
}

/// Short defaults so a plain `cargo bench` stays quick; the command line overrides them.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = core;
    config = config();
    targets = bench_envelope, bench_merkle, bench_checkpoint, bench_trust
}
criterion_main!(core);
