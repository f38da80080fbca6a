//! `Audit.Query` against a brute-force oracle: a realistic mixed ledger, then many random
//! filter combinations, each compared page by page with a plain filter over all entries.

use std::collections::{HashMap, HashSet};

use custody::proto::{
    event::Body, revocation::Target, Entry, Event, EventKind, GetEntriesRequest, QueryRequest,
    SignedEvent, TraceStatus,
};
use prost::Message as _;
use rand::{rngs::StdRng, Rng as _, SeedableRng as _};
use tokio_stream::StreamExt as _;

use crate::support::scenario::*;
use crate::support::*;

const USERS: [&str; 3] = ["alice", "bob", "carol"];
const SERVERS: [&str; 2] = ["mail.example", "cal.example"];

/// Builds a mixed ledger: sessions of consent, token, delegation, validations, actions
/// (some violating), denials and revocations, with occurred_at spread over ~4 minutes.
pub async fn mixed_ledger(ledger: &TestLedger, sessions: usize, seed: u64) {
    register(ledger, &USERS, &SERVERS).await;
    mixed_ledger_more(ledger, sessions, seed).await;
}

/// More sessions on a ledger whose keys `mixed_ledger` registered (ids depend on `seed`).
pub async fn mixed_ledger_more(ledger: &TestLedger, sessions: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut events: Vec<SignedEvent> = Vec::new();
    let base = now() - 240_000;
    let mut clock = base;
    let mut tick = |rng: &mut StdRng| {
        clock += rng.gen_range(1..800);
        clock
    };
    for n in 0..sessions {
        let s = if seed == 7 {
            n.to_string()
        } else {
            format!("{seed}-{n}")
        };
        let user_name = USERS[rng.gen_range(0..USERS.len())];
        let consent_id = format!("c{s}");
        let agent = if rng.gen_bool(0.5) {
            "assistant"
        } else {
            "planner"
        };
        let mut e = event(
            &format!("s{s}-consent"),
            consent_body(&consent_id, user_name, agent, 2),
        );
        e.occurred_at_ms = tick(&mut rng);
        let signer = if rng.gen_bool(0.5) {
            user(user_name)
        } else {
            issuer()
        };
        events.push(sign(&signer, &e));
        let token = format!("tok{s}");
        let scopes: &[&str] = if rng.gen_bool(0.8) {
            &["mail:read"]
        } else {
            &["mail:send"]
        };
        let mut e = event(
            &format!("s{s}-issue"),
            issuance(&token, &consent_id, "", user_name, agent, scopes, 2),
        );
        e.occurred_at_ms = tick(&mut rng);
        events.push(sign(&issuer(), &e));
        let mut acting = token.clone();
        if rng.gen_bool(0.5) {
            let child = format!("tok{s}-hop");
            let mut e = event(
                &format!("s{s}-hop"),
                issuance(
                    &child,
                    &consent_id,
                    &token,
                    user_name,
                    "helper",
                    &["mail:read:inbox"],
                    1,
                ),
            );
            e.occurred_at_ms = tick(&mut rng);
            events.push(sign(&issuer(), &e));
            acting = child;
        }
        for v in 0..rng.gen_range(0..3) {
            let rs = SERVERS[rng.gen_range(0..SERVERS.len())];
            let mut e = event(
                &format!("s{s}-val{v}"),
                validation(&acting, rs, rng.gen_bool(0.8)),
            );
            e.occurred_at_ms = tick(&mut rng);
            events.push(sign(&server(rs), &e));
        }
        for a in 0..rng.gen_range(1..5) {
            let rs = SERVERS[rng.gen_range(0..SERVERS.len())];
            let op = ["mail:read", "mail:read:inbox", "mail:send", "cal:read"][rng.gen_range(0..4)];
            let token_id = if rng.gen_bool(0.9) {
                acting.clone()
            } else {
                format!("ghost{s}")
            };
            let mut e = event(&format!("s{s}-act{a}"), action(&token_id, rs, op));
            e.occurred_at_ms = tick(&mut rng);
            events.push(sign(&server(rs), &e));
        }
        if rng.gen_bool(0.3) {
            let mut e = event(
                &format!("s{s}-deny"),
                denial(&acting, "mail.example", "helper"),
            );
            e.occurred_at_ms = tick(&mut rng);
            events.push(sign(&server("mail.example"), &e));
        }
        if rng.gen_bool(0.2) {
            let mut e = event(&format!("s{s}-revoke"), revoke_token(&token));
            e.occurred_at_ms = tick(&mut rng);
            events.push(sign(&issuer(), &e));
        } else if rng.gen_bool(0.2) {
            let mut e = event(&format!("s{s}-withdraw"), revoke_consent(&consent_id));
            e.occurred_at_ms = tick(&mut rng);
            events.push(sign(&user(user_name), &e));
        }
    }
    let count = events.len();
    let receipts: Vec<_> = ledger
        .ledger()
        .await
        .append_stream(tokio_stream::iter(events))
        .await
        .unwrap()
        .into_inner()
        .collect::<Vec<_>>()
        .await;
    assert_eq!(receipts.len(), count);
    for receipt in receipts {
        let receipt = receipt.unwrap();
        assert!(
            receipt.error.is_none(),
            "scenario event refused: {receipt:?}"
        );
    }
}

/// What the oracle knows of one entry.
#[derive(Debug, Default)]
struct Facts {
    seq: u64,
    kind: i32,
    status: i32,
    occurred_at_ms: i64,
    users: HashSet<String>,
    agents: HashSet<String>,
    tokens: HashSet<String>,
    consents: HashSet<String>,
    servers: HashSet<String>,
}

type TokenFacts = HashMap<String, (String, String, String)>;

/// Files an entry under a token and, when known, the token's user, holder and consent.
fn add_token(f: &mut Facts, tokens: &TokenFacts, id: &str) {
    f.tokens.insert(id.to_owned());
    if let Some((u, a, c)) = tokens.get(id) {
        f.users.insert(u.clone());
        f.agents.insert(a.clone());
        f.consents.insert(c.clone());
    }
}

/// Derives every entry's facts by replaying the ledger in order, independently of the indexes.
async fn oracle(ledger: &TestLedger) -> Vec<Facts> {
    let stream = ledger
        .audit()
        .await
        .get_entries(GetEntriesRequest { start: 0, end: 0 })
        .await
        .unwrap()
        .into_inner();
    let stored: Vec<_> = stream.collect::<Vec<_>>().await;
    let mut tokens: TokenFacts = HashMap::new(); // id -> (user, agent, consent)
    let mut consents: HashMap<String, (String, String)> = HashMap::new(); // id -> (user, agent)
    let mut all = Vec::new();
    for item in stored {
        let entry = Entry::decode(item.unwrap().entry.as_slice()).unwrap();
        let event = Event::decode(entry.event.unwrap().payload.as_slice()).unwrap();
        let mut f = Facts {
            seq: entry.seq,
            kind: custody::trust::event_kind(event.body.as_ref()) as i32,
            status: entry.verdict.unwrap().status,
            occurred_at_ms: event.occurred_at_ms,
            ..Facts::default()
        };
        match event.body.unwrap() {
            Body::Consent(c) => {
                f.users.insert(c.user.clone());
                f.agents.insert(c.agent.clone());
                f.consents.insert(c.consent_id.clone());
                consents.insert(c.consent_id, (c.user, c.agent));
            }
            Body::Issuance(i) => {
                if let Some((_, parent_agent, _)) = tokens.get(&i.parent_token_id) {
                    f.agents.insert(parent_agent.clone());
                }
                tokens.insert(i.token_id.clone(), (i.user, i.agent, i.consent_id));
                add_token(&mut f, &tokens, &i.token_id);
            }
            Body::Validation(v) => {
                add_token(&mut f, &tokens, &v.token_id);
                f.servers.insert(v.resource_server);
            }
            Body::Action(a) => {
                add_token(&mut f, &tokens, &a.token_id);
                f.servers.insert(a.resource_server);
                if !a.agent.is_empty() {
                    f.agents.insert(a.agent);
                }
            }
            Body::Denial(d) => {
                if !d.token_id.is_empty() {
                    add_token(&mut f, &tokens, &d.token_id);
                }
                f.servers.insert(d.resource_server);
                if !d.agent.is_empty() {
                    f.agents.insert(d.agent);
                }
            }
            Body::Revocation(r) => match r.target.unwrap() {
                Target::TokenId(id) => add_token(&mut f, &tokens, &id),
                Target::ConsentId(id) => {
                    let (u, a) = consents[&id].clone();
                    f.users.insert(u);
                    f.agents.insert(a);
                    f.consents.insert(id);
                }
            },
            Body::Genesis(_)
            | Body::KeyGrant(_)
            | Body::KeyRevocation(_)
            | Body::LedgerKeyRotation(_) => {}
        }
        all.push(f);
    }
    all
}

fn matches(f: &Facts, q: &QueryRequest) -> bool {
    let has = |set: &HashSet<String>, want: &str| want.is_empty() || set.contains(want);
    has(&f.users, &q.user)
        && has(&f.agents, &q.agent)
        && has(&f.tokens, &q.token_id)
        && has(&f.consents, &q.consent_id)
        && has(&f.servers, &q.resource_server)
        && (q.kinds.is_empty() || q.kinds.contains(&f.kind))
        && (q.status == 0 || q.status == f.status)
        && (q.from_ms == 0 || f.occurred_at_ms >= q.from_ms)
        && (q.to_ms == 0 || f.occurred_at_ms < q.to_ms)
}

async fn run_query(ledger: &TestLedger, request: QueryRequest) -> Vec<u64> {
    let entries = ledger.query(request).await;
    entries
        .into_iter()
        .map(|e| e.decoded.unwrap().seq)
        .collect()
}

/// Pages through a query to its end; returns every seq in order.
async fn all_pages(ledger: &TestLedger, mut request: QueryRequest) -> Vec<u64> {
    let mut seqs = Vec::new();
    loop {
        let page = run_query(ledger, request.clone()).await;
        assert!(page.len() <= request.limit as usize);
        let Some(&last) = page.last() else {
            return seqs;
        };
        seqs.extend(&page);
        // Nothing precedes entry 0 (and before_seq = 0 means "no bound").
        if !request.ascending && last == 0 {
            return seqs;
        }
        if request.ascending {
            request.after_seq = Some(last);
        } else {
            request.before_seq = last;
        }
    }
}

#[tokio::test]
async fn query_agrees_with_a_brute_force_filter_on_random_combinations() {
    let ledger = TestLedger::start().await;
    mixed_ledger(&ledger, 60, 7).await;
    let facts = oracle(&ledger).await;
    assert!(
        facts
            .iter()
            .any(|f| f.status == TraceStatus::Violation as i32),
        "the scenario must record violations"
    );
    let (first_time, last_time) = (
        facts
            .iter()
            .skip(1)
            .map(|f| f.occurred_at_ms)
            .min()
            .unwrap(),
        facts.iter().map(|f| f.occurred_at_ms).max().unwrap(),
    );
    let mut rng = StdRng::seed_from_u64(99);
    let pick = |rng: &mut StdRng, values: &[&str]| -> String {
        if rng.gen_bool(0.3) {
            values[rng.gen_range(0..values.len())].to_string()
        } else {
            String::new()
        }
    };
    let mut non_empty = 0;
    for round in 0..200 {
        let mut request = QueryRequest {
            user: pick(&mut rng, &USERS),
            agent: pick(&mut rng, &["assistant", "planner", "helper"]),
            token_id: pick(&mut rng, &["tok1", "tok3", "tok3-hop", "ghost2"]),
            consent_id: pick(&mut rng, &["c1", "c2", "c5"]),
            resource_server: pick(&mut rng, &SERVERS),
            limit: rng.gen_range(1..40),
            ascending: rng.gen_bool(0.5),
            ..QueryRequest::default()
        };
        let kinds = [
            EventKind::Action,
            EventKind::Issuance,
            EventKind::Validation,
            EventKind::Denial,
            EventKind::Revocation,
            EventKind::Consent,
        ];
        for _ in 0..rng.gen_range(0..3) {
            request
                .kinds
                .push(kinds[rng.gen_range(0..kinds.len())] as i32);
        }
        if rng.gen_bool(0.3) {
            request.status = [
                TraceStatus::Traced,
                TraceStatus::Violation,
                TraceStatus::NotApplicable,
            ][rng.gen_range(0..3)] as i32;
        }
        if rng.gen_bool(0.3) {
            request.from_ms = rng.gen_range(first_time..=last_time);
            if rng.gen_bool(0.5) {
                request.to_ms = request.from_ms + rng.gen_range(1..120_000);
            }
        }
        let mut expected: Vec<u64> = facts
            .iter()
            .filter(|f| matches(f, &request))
            .map(|f| f.seq)
            .collect();
        if !request.ascending {
            expected.reverse();
        }
        let got = all_pages(&ledger, request.clone()).await;
        assert_eq!(got, expected, "round {round}: {request:?}");
        non_empty += usize::from(!expected.is_empty());
    }
    assert!(
        non_empty > 60,
        "too few combinations matched anything ({non_empty}); the test would prove little"
    );
    // The server caps the page size.
    let everything = run_query(
        &ledger,
        QueryRequest {
            limit: 100_000,
            ..QueryRequest::default()
        },
    )
    .await;
    assert_eq!(
        everything.len(),
        facts
            .len()
            .min(custody::service::read::MAX_QUERY_LIMIT as usize)
    );
    let default_page = run_query(&ledger, QueryRequest::default()).await;
    assert_eq!(
        default_page.len(),
        facts
            .len()
            .min(custody::service::read::DEFAULT_QUERY_LIMIT as usize)
    );
    // Nonsense filters are refused.
    let status = ledger
        .audit()
        .await
        .query(QueryRequest {
            kinds: vec![0],
            ..QueryRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = ledger
        .audit()
        .await
        .query(QueryRequest {
            from_ms: 10,
            to_ms: 5,
            ..QueryRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn a_query_stops_after_its_scan_budget_and_says_where_to_resume() {
    use custody::service::read::query_scanning;
    let ledger = TestLedger::start().await;
    mixed_ledger(&ledger, 10, 7).await;
    let dir = ledger.stop().await;
    let mut config = custody::server::Config::new(dir.path().join("data"));
    config.admin_public_key = Some(key(1).verifying_key().to_bytes());
    let (opened, _) = custody::server::open_ledger(&config).unwrap();
    // Two kinds (no index term) and a time range nothing matches: every entry is a candidate.
    let request = QueryRequest {
        kinds: vec![EventKind::Action as i32, EventKind::Denial as i32],
        from_ms: now() + 3_600_000,
        ..QueryRequest::default()
    };
    let status = query_scanning(&opened, &request, 5).unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    let size = opened.head().tree_size;
    assert!(
        status
            .message()
            .contains(&format!("before_seq = {}", size - 5)),
        "{status:?}"
    );
    // With matches in the budget, a partial page comes back instead.
    let some = QueryRequest {
        kinds: request.kinds.clone(),
        ..QueryRequest::default()
    };
    let page = query_scanning(&opened, &some, 20).unwrap();
    assert!(!page.is_empty() && page.len() <= 20);
    // A budget that covers everything answers fully.
    assert!(query_scanning(&opened, &request, 1_000_000)
        .unwrap()
        .is_empty());
}
