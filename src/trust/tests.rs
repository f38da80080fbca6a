//! Unit tests of the rules: field limits, key validity, who may sign what, and every
//! chain-of-trust rule passed once and broken once, plus property tests over random chains.

use super::reasons::*;
use super::*;
use crate::proto::{
    revocation::Target, Action, Consent, Denial, Issuance, KeyGrant, Revocation, Role, Validation,
};

fn record(role: Role, principal: &str) -> KeyRecord {
    KeyRecord {
        public_key: ed25519_dalek::SigningKey::from_bytes(&[3; 32])
            .verifying_key()
            .to_bytes()
            .to_vec(),
        role: role as i32,
        principal: principal.into(),
        ..KeyRecord::default()
    }
}

fn event(body: Body) -> Event {
    Event {
        event_id: "e-1".into(),
        occurred_at_ms: 1_000,
        body: Some(body),
    }
}

fn consent(user: &str) -> Body {
    Body::Consent(Consent {
        consent_id: "c".into(),
        user: user.into(),
        agent: "a".into(),
        ..Consent::default()
    })
}

fn action(server: &str) -> Body {
    Body::Action(Action {
        token_id: "t".into(),
        resource_server: server.into(),
        operation: "mail:read".into(),
        ..Action::default()
    })
}

#[test]
fn roles_may_sign_only_their_kinds() {
    let admin = record(Role::Admin, "admin");
    let user = record(Role::User, "alice");
    let issuer = record(Role::Issuer, "as");
    let rs = record(Role::ResourceServer, "mail");
    let agent = record(Role::Agent, "bot");
    let grant = event(Body::KeyGrant(KeyGrant::default()));
    assert_eq!(authorize(&grant, &admin), Ok(()));
    for other in [&user, &issuer, &rs, &agent] {
        assert!(matches!(
            authorize(&grant, other),
            Err(Refusal::RoleNotAllowed { .. })
        ));
    }
    assert_eq!(authorize(&event(consent("alice")), &user), Ok(()));
    assert_eq!(authorize(&event(consent("bob")), &issuer), Ok(()));
    assert!(matches!(
        authorize(&event(consent("alice")), &rs),
        Err(Refusal::RoleNotAllowed { .. })
    ));
    assert_eq!(authorize(&event(action("mail")), &rs), Ok(()));
    assert!(matches!(
        authorize(&event(action("mail")), &agent),
        Err(Refusal::RoleNotAllowed { .. })
    ));
    let denial = |server: &str| {
        event(Body::Denial(Denial {
            resource_server: server.into(),
            ..Denial::default()
        }))
    };
    assert_eq!(authorize(&denial("as"), &issuer), Ok(()));
    assert_eq!(authorize(&denial("mail"), &rs), Ok(()));
    let revoke_token = event(Body::Revocation(Revocation {
        target: Some(Target::TokenId("t".into())),
        reason: String::new(),
    }));
    let revoke_consent = event(Body::Revocation(Revocation {
        target: Some(Target::ConsentId("c".into())),
        reason: String::new(),
    }));
    assert_eq!(authorize(&revoke_token, &issuer), Ok(()));
    assert_eq!(authorize(&revoke_token, &admin), Ok(()));
    assert!(matches!(
        authorize(&revoke_token, &user),
        Err(Refusal::RoleNotAllowed { .. })
    ));
    assert_eq!(authorize(&revoke_consent, &user), Ok(()));
    assert!(matches!(
        authorize(&revoke_consent, &rs),
        Err(Refusal::RoleNotAllowed { .. })
    ));
}

#[test]
fn principals_must_match_the_body() {
    let user = record(Role::User, "alice");
    let rs = record(Role::ResourceServer, "mail");
    assert!(matches!(
        authorize(&event(consent("bob")), &user),
        Err(Refusal::PrincipalMismatch {
            field: "consent user",
            ..
        })
    ));
    assert!(matches!(
        authorize(&event(action("bank")), &rs),
        Err(Refusal::PrincipalMismatch {
            field: "resource_server",
            ..
        })
    ));
}

#[test]
fn key_validity_is_a_half_open_interval_ended_by_revocation() {
    let mut key = record(Role::Issuer, "as");
    key.not_before_ms = 100;
    key.not_after_ms = 200;
    assert!(key_valid_at("k", &key, 99).is_err());
    assert_eq!(key_valid_at("k", &key, 100), Ok(()));
    assert_eq!(key_valid_at("k", &key, 199), Ok(()));
    assert!(matches!(
        key_valid_at("k", &key, 200),
        Err(Refusal::KeyNotValid { why: "expired", .. })
    ));
    key.revoked_at_ms = Some(150);
    assert_eq!(key_valid_at("k", &key, 149), Ok(()));
    assert!(matches!(
        key_valid_at("k", &key, 150),
        Err(Refusal::KeyNotValid { why: "revoked", .. })
    ));
}

#[test]
fn limits_refuse_malformed_events() {
    let good = event(consent("alice"));
    assert_eq!(validate_event(&good, 10), Ok(()));
    assert!(validate_event(&good, MAX_PAYLOAD_LEN + 1).is_err());
    let mut e = good.clone();
    e.event_id = String::new();
    assert!(validate_event(&e, 10).is_err());
    e.event_id = "é".into();
    assert!(validate_event(&e, 10).is_err());
    e.event_id = "x".repeat(MAX_EVENT_ID_LEN);
    assert_eq!(validate_event(&e, 10), Ok(()));
    let mut e = good.clone();
    e.body = None;
    assert!(validate_event(&e, 10).is_err());
    let mut e = good.clone();
    e.occurred_at_ms = 0;
    assert!(validate_event(&e, 10).is_err());
    let mut e = good.clone();
    if let Some(Body::Consent(c)) = &mut e.body {
        c.scopes = vec!["s".into(); MAX_REPEATED + 1];
    }
    assert!(validate_event(&e, 10).is_err());
    let mut e = good.clone();
    if let Some(Body::Consent(c)) = &mut e.body {
        c.purpose = "p".repeat(MAX_TEXT_LEN + 1);
    }
    assert!(validate_event(&e, 10).is_err());
    let mut e = good;
    if let Some(Body::Consent(c)) = &mut e.body {
        c.consent_text_sha256 = vec![0; 31];
    }
    assert!(validate_event(&e, 10).is_err());
    // A grant needs a real, strong key and a role.
    let grant = |public_key: Vec<u8>, role: Role| {
        event(Body::KeyGrant(KeyGrant {
            public_key,
            role: role as i32,
            principal: "p".into(),
            ..KeyGrant::default()
        }))
    };
    let strong = record(Role::User, "x").public_key;
    assert_eq!(
        validate_event(&grant(strong.clone(), Role::User), 10),
        Ok(())
    );
    assert!(validate_event(&grant(strong, Role::Unspecified), 10).is_err());
    assert!(validate_event(&grant(vec![0; 31], Role::User), 10).is_err());
    // Delegation depth and times are bounded (chain walks and time formatting rely on it).
    let deep = Consent {
        max_delegation_depth: MAX_DELEGATION_DEPTH + 1,
        ..base_consent()
    };
    assert!(validate_event(&event(Body::Consent(deep)), 10).is_err());
    let far = Issuance {
        expires_at_ms: MAX_TIME_MS + 1,
        ..direct()
    };
    assert!(validate_event(&event(Body::Issuance(far)), 10).is_err());
    // A token must expire, after it starts.
    let mut token = direct();
    token.expires_at_ms = 0;
    assert!(validate_event(&event(Body::Issuance(token)), 10).is_err());
}

// ---------------------------------------------------------------------------------------------
// Chain of trust.
// ---------------------------------------------------------------------------------------------

/// Breaks one rule in an otherwise valid issuance.
type Breaker = Box<dyn Fn(&mut Issuance)>;

/// The base time of the scenarios, in ms.
const T: i64 = 1_700_000_000_000;
const HOUR: i64 = 3_600_000;

/// A ledger's state in memory and the next seq; runs events through authorize + evaluate.
struct World {
    state: MemoryState,
    seq: u64,
}

fn issuer() -> KeyRecord {
    record(Role::Issuer, "auth.example")
}
fn alice() -> KeyRecord {
    record(Role::User, "alice")
}
fn mail_server() -> KeyRecord {
    record(Role::ResourceServer, "mail.example")
}

impl World {
    fn new() -> Self {
        Self {
            state: MemoryState::new(),
            seq: 10,
        }
    }

    fn run(&mut self, signer: &KeyRecord, body: Body, at: i64) -> Result<Evaluation, Refusal> {
        let event = Event {
            event_id: format!("e-{}", self.seq),
            occurred_at_ms: at,
            body: Some(body),
        };
        validate_event(&event, 100)?;
        authorize(&event, signer)?;
        let evaluation = evaluate(&event, signer, self.seq, &self.state).unwrap()?;
        self.state.apply(evaluation.delta.clone());
        self.seq += 1;
        Ok(evaluation)
    }

    fn verdict(&mut self, signer: &KeyRecord, body: Body, at: i64) -> Verdict {
        self.run(signer, body, at).unwrap().verdict
    }

    /// Records the base consent and the direct token; returns their seqs.
    fn with_consent_and_token() -> (Self, u64, u64) {
        let mut world = Self::new();
        let consent_seq = world.seq;
        world.verdict(&alice(), Body::Consent(base_consent()), T);
        let token_seq = world.seq;
        let verdict = world.verdict(&issuer(), Body::Issuance(direct()), T);
        assert_eq!(verdict.status, TraceStatus::Traced as i32, "{verdict:?}");
        (world, consent_seq, token_seq)
    }
}

fn base_consent() -> Consent {
    Consent {
        consent_id: "c1".into(),
        user: "alice".into(),
        agent: "assistant".into(),
        scopes: vec!["mail:read".into(), "cal".into()],
        audiences: vec!["mail.example".into(), "cal.example".into()],
        expires_at_ms: T + 10 * HOUR,
        purpose: "summaries".into(),
        consent_text_sha256: vec![7; 32],
        max_delegation_depth: 3,
        allowed_delegates: vec![],
    }
}

fn direct() -> Issuance {
    Issuance {
        token_id: "t1".into(),
        token_sha256: vec![1; 32],
        consent_id: "c1".into(),
        parent_token_id: String::new(),
        user: "alice".into(),
        agent: "assistant".into(),
        scopes: vec!["mail:read".into(), "cal:read".into()],
        audiences: vec!["mail.example".into(), "cal.example".into()],
        not_before_ms: T,
        expires_at_ms: T + 5 * HOUR,
        grant_type: "authorization_code".into(),
    }
}

/// A delegation hop from `parent`, to `agent`, one hour shorter.
fn hop(parent: &Issuance, token_id: &str, agent: &str) -> Issuance {
    Issuance {
        token_id: token_id.into(),
        token_sha256: vec![token_id.len() as u8; 32],
        parent_token_id: parent.token_id.clone(),
        agent: agent.into(),
        expires_at_ms: parent.expires_at_ms - HOUR,
        grant_type: "urn:ietf:params:oauth:grant-type:token-exchange".into(),
        ..parent.clone()
    }
}

fn act(token_id: &str, operation: &str) -> Body {
    Body::Action(Action {
        token_id: token_id.into(),
        resource_server: "mail.example".into(),
        agent: String::new(),
        operation: operation.into(),
        resource: "mailbox/1".into(),
        request_sha256: vec![],
    })
}

fn validate(token_id: &str, hash: Vec<u8>, valid: bool) -> Body {
    Body::Validation(Validation {
        token_id: token_id.into(),
        token_sha256: hash,
        resource_server: "mail.example".into(),
        valid,
        reason: String::new(),
    })
}

fn revoke(target: Target) -> Body {
    Body::Revocation(Revocation {
        target: Some(target),
        reason: "user asked".into(),
    })
}

fn reasons_of(verdict: &Verdict) -> Vec<&str> {
    verdict.reasons.iter().map(String::as_str).collect()
}

/// Asserts a VIOLATION naming exactly `expected`.
fn assert_violation(verdict: &Verdict, expected: &[&str]) {
    assert_eq!(verdict.status, TraceStatus::Violation as i32, "{verdict:?}");
    let mut got = reasons_of(verdict);
    got.sort_unstable();
    let mut want = expected.to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "{verdict:?}");
}

#[test]
fn consent_verdict_tells_user_signed_from_attested() {
    let mut world = World::new();
    let own = world.verdict(&alice(), Body::Consent(base_consent()), T);
    assert_eq!(own.status, TraceStatus::NotApplicable as i32);
    assert!(own.consent_user_signed);
    assert_eq!(own.rules_version, RULES_VERSION);
    let attested = world.verdict(
        &issuer(),
        Body::Consent(Consent {
            consent_id: "c2".into(),
            ..base_consent()
        }),
        T,
    );
    assert!(!attested.consent_user_signed);
    // The same consent id twice is refused.
    assert!(matches!(
        world.run(&issuer(), Body::Consent(base_consent()), T),
        Err(Refusal::Conflict(_))
    ));
}

#[test]
fn direct_issuance_traces_and_each_rule_breaks_alone() {
    let (mut world, consent_seq, token_seq) = World::with_consent_and_token();
    let traced = world.state.token("t1").unwrap().unwrap();
    assert!(traced.traced);
    assert_eq!(traced.chain, vec![token_seq]);
    assert_eq!(traced.consent_seq, Some(consent_seq));

    let cases: Vec<(&str, Breaker)> = vec![
        (CONSENT_UNKNOWN, Box::new(|i| i.consent_id = "nope".into())),
        (USER_MISMATCH, Box::new(|i| i.user = "bob".into())),
        (AGENT_MISMATCH, Box::new(|i| i.agent = "other-agent".into())),
        (
            SCOPE_NOT_COVERED,
            Box::new(|i| i.scopes.push("mail:send".into())),
        ),
        (
            AUDIENCE_NOT_ALLOWED,
            Box::new(|i| i.audiences.push("bank.example".into())),
        ),
        (
            EXPIRY_EXCEEDS_PARENT,
            Box::new(|i| i.expires_at_ms = T + 11 * HOUR),
        ),
    ];
    for (i, (code, break_rule)) in cases.into_iter().enumerate() {
        let mut issuance = Issuance {
            token_id: format!("bad-{i}"),
            ..direct()
        };
        break_rule(&mut issuance);
        let verdict = world.verdict(&issuer(), Body::Issuance(issuance), T);
        assert_violation(&verdict, &[code]);
    }
    // An expired consent, then a revoked one.
    let late = world.verdict(
        &issuer(),
        Body::Issuance(Issuance {
            token_id: "late".into(),
            expires_at_ms: T + 10 * HOUR,
            ..direct()
        }),
        T + 10 * HOUR,
    );
    assert_violation(&late, &[CONSENT_EXPIRED]);
    world.verdict(&alice(), revoke(Target::ConsentId("c1".into())), T + HOUR);
    let after = world.verdict(
        &issuer(),
        Body::Issuance(Issuance {
            token_id: "after".into(),
            ..direct()
        }),
        T + HOUR,
    );
    assert_violation(&after, &[CONSENT_REVOKED]);
    // The same token id twice is refused.
    assert!(matches!(
        world.run(&issuer(), Body::Issuance(direct()), T),
        Err(Refusal::Conflict(_))
    ));
}

#[test]
fn a_verdict_names_every_broken_rule() {
    let (mut world, _, _) = World::with_consent_and_token();
    let issuance = Issuance {
        token_id: "many".into(),
        user: "bob".into(),
        agent: "other".into(),
        scopes: vec!["bank".into()],
        audiences: vec!["bank.example".into()],
        expires_at_ms: T + 20 * HOUR,
        ..direct()
    };
    let verdict = world.verdict(&issuer(), Body::Issuance(issuance), T);
    assert_violation(
        &verdict,
        &[
            USER_MISMATCH,
            AGENT_MISMATCH,
            SCOPE_NOT_COVERED,
            AUDIENCE_NOT_ALLOWED,
            EXPIRY_EXCEEDS_PARENT,
        ],
    );
}

#[test]
fn narrowing_delegation_chains_of_depth_three_trace() {
    let (mut world, consent_seq, t1_seq) = World::with_consent_and_token();
    let mut t2 = hop(&direct(), "t2", "summarizer");
    t2.scopes = vec!["mail:read".into()];
    t2.audiences = vec!["mail.example".into()];
    let t2_seq = world.seq;
    assert_eq!(
        world
            .verdict(&issuer(), Body::Issuance(t2.clone()), T)
            .status,
        TraceStatus::Traced as i32
    );
    let mut t3 = hop(&t2, "t3", "fetcher");
    t3.scopes = vec!["mail:read:inbox".into()];
    let t3_seq = world.seq;
    world.verdict(&issuer(), Body::Issuance(t3.clone()), T);
    let t4 = hop(&t3, "t4", "reader");
    let t4_seq = world.seq;
    let verdict = world.verdict(&issuer(), Body::Issuance(t4), T);
    assert_eq!(verdict.status, TraceStatus::Traced as i32, "{verdict:?}");
    assert_eq!(verdict.chain, vec![t4_seq, t3_seq, t2_seq, t1_seq]);
    assert_eq!(verdict.consent_seq, consent_seq);
    assert!(verdict.consent_user_signed);

    let action = world.verdict(&mail_server(), act("t4", "mail:read:inbox"), T + 1);
    assert_eq!(action.status, TraceStatus::Traced as i32, "{action:?}");
    assert_eq!(action.chain, vec![t4_seq, t3_seq, t2_seq, t1_seq]);
    assert_eq!(action.consent_seq, consent_seq);
    // Outside the narrowed scope.
    let wider = world.verdict(&mail_server(), act("t4", "mail:read:sent"), T + 1);
    assert_violation(&wider, &[SCOPE_NOT_COVERED]);
}

#[test]
fn delegation_hops_break_each_rule() {
    let (mut world, _, _) = World::with_consent_and_token();
    let parent = direct();
    let cases: Vec<(&[&str], Breaker)> = vec![
        (
            &[SCOPE_NOT_COVERED],
            Box::new(|i| i.scopes = vec!["mail".into()]),
        ),
        (
            &[AUDIENCE_NOT_ALLOWED],
            Box::new(|i| i.audiences.push("drive.example".into())),
        ),
        (
            &[EXPIRY_EXCEEDS_PARENT],
            Box::new(|i| i.expires_at_ms = T + 6 * HOUR),
        ),
        (&[USER_MISMATCH], Box::new(|i| i.user = "mallory".into())),
        (
            &[CONSENT_UNKNOWN, CONSENT_MISMATCH],
            Box::new(|i| i.consent_id = "c-other".into()),
        ),
        (
            &[UNKNOWN_TOKEN],
            Box::new(|i| i.parent_token_id = "never-issued".into()),
        ),
    ];
    for (i, (codes, break_rule)) in cases.into_iter().enumerate() {
        let mut issuance = hop(&parent, &format!("h-{i}"), "helper");
        break_rule(&mut issuance);
        let verdict = world.verdict(&issuer(), Body::Issuance(issuance), T);
        assert_violation(&verdict, codes);
    }
    // A parent that was itself a violation.
    let untraced = Issuance {
        token_id: "untraced".into(),
        scopes: vec!["bank".into()],
        ..direct()
    };
    world.verdict(&issuer(), Body::Issuance(untraced.clone()), T);
    let child = Issuance {
        scopes: vec![],
        ..hop(&untraced, "child-of-untraced", "helper")
    };
    assert_violation(
        &world.verdict(&issuer(), Body::Issuance(child), T),
        &[UNTRACED_PARENT],
    );
    // An expired parent.
    let expired = world.verdict(
        &issuer(),
        Body::Issuance(hop(&parent, "after-expiry", "helper")),
        T + 5 * HOUR,
    );
    assert_violation(&expired, &[TOKEN_EXPIRED]);
    // A revoked parent, from the revocation's time on.
    world.verdict(
        &issuer(),
        revoke(Target::TokenId("t1".into())),
        T + 2 * HOUR,
    );
    let before = world.verdict(
        &issuer(),
        Body::Issuance(hop(&parent, "before-revoke", "helper")),
        T + HOUR,
    );
    assert_eq!(before.status, TraceStatus::Traced as i32, "{before:?}");
    let after = world.verdict(
        &issuer(),
        Body::Issuance(hop(&parent, "after-revoke", "helper")),
        T + 2 * HOUR,
    );
    assert_violation(&after, &[TOKEN_REVOKED]);
}

#[test]
fn delegation_depth_and_allowed_delegates_are_enforced() {
    let mut world = World::new();
    let consent = Consent {
        max_delegation_depth: 1,
        allowed_delegates: vec!["helper".into(), "sub".into()],
        ..base_consent()
    };
    world.verdict(&alice(), Body::Consent(consent), T);
    world.verdict(&issuer(), Body::Issuance(direct()), T);
    let one = hop(&direct(), "one", "helper");
    assert_eq!(
        world
            .verdict(&issuer(), Body::Issuance(one.clone()), T)
            .status,
        TraceStatus::Traced as i32
    );
    let two = hop(&one, "two", "sub");
    assert_violation(
        &world.verdict(&issuer(), Body::Issuance(two), T),
        &[DELEGATION_TOO_DEEP],
    );
    let stranger = hop(&direct(), "stranger", "unknown-agent");
    assert_violation(
        &world.verdict(&issuer(), Body::Issuance(stranger), T),
        &[DELEGATE_NOT_ALLOWED],
    );
    // Depth 0: no delegation at all.
    let mut world = World::new();
    world.verdict(
        &alice(),
        Body::Consent(Consent {
            max_delegation_depth: 0,
            ..base_consent()
        }),
        T,
    );
    world.verdict(&issuer(), Body::Issuance(direct()), T);
    assert_violation(
        &world.verdict(&issuer(), Body::Issuance(hop(&direct(), "x", "y")), T),
        &[DELEGATION_TOO_DEEP],
    );
}

#[test]
fn validations_trace_or_name_what_the_server_should_not_have_accepted() {
    let (mut world, consent_seq, token_seq) = World::with_consent_and_token();
    let ok = world.verdict(&mail_server(), validate("t1", vec![1; 32], true), T + 1);
    assert_eq!(ok.status, TraceStatus::Traced as i32, "{ok:?}");
    assert_eq!(
        (ok.chain.clone(), ok.consent_seq),
        (vec![token_seq], consent_seq)
    );
    assert_violation(
        &world.verdict(&mail_server(), validate("t1", vec![2; 32], true), T + 1),
        &[TOKEN_HASH_MISMATCH],
    );
    assert_violation(
        &world.verdict(&mail_server(), validate("ghost", vec![1; 32], true), T + 1),
        &[UNKNOWN_TOKEN],
    );
    assert_violation(
        &world.verdict(
            &mail_server(),
            validate("t1", vec![1; 32], true),
            T + 5 * HOUR,
        ),
        &[TOKEN_EXPIRED],
    );
    assert_violation(
        &world.verdict(&mail_server(), validate("t1", vec![1; 32], true), T - 1),
        &[TOKEN_NOT_YET_VALID],
    );
    // Refusing a bad token is not a violation.
    let refused = world.verdict(&mail_server(), validate("ghost", vec![1; 32], false), T + 1);
    assert_eq!(refused.status, TraceStatus::NotApplicable as i32);
    world.verdict(
        &issuer(),
        Body::Issuance(Issuance {
            token_id: "bad".into(),
            scopes: vec!["x".into()],
            ..direct()
        }),
        T,
    );
    assert_violation(
        &world.verdict(&mail_server(), validate("bad", vec![1; 32], true), T + 1),
        &[UNTRACED_TOKEN],
    );
    world.verdict(&issuer(), revoke(Target::TokenId("t1".into())), T + 2);
    assert_violation(
        &world.verdict(&mail_server(), validate("t1", vec![1; 32], true), T + 3),
        &[TOKEN_REVOKED],
    );
}

#[test]
fn actions_trace_and_each_rule_breaks_alone() {
    let (mut world, consent_seq, token_seq) = World::with_consent_and_token();
    let ok = world.verdict(&mail_server(), act("t1", "mail:read"), T + 1);
    assert_eq!(ok.status, TraceStatus::Traced as i32, "{ok:?}");
    assert_eq!(
        (ok.chain.clone(), ok.consent_seq, ok.consent_user_signed),
        (vec![token_seq], consent_seq, true)
    );
    assert_violation(
        &world.verdict(&mail_server(), act("ghost", "mail:read"), T + 1),
        &[UNKNOWN_TOKEN],
    );
    assert_violation(
        &world.verdict(&mail_server(), act("t1", "mail:send"), T + 1),
        &[SCOPE_NOT_COVERED],
    );
    assert_violation(
        &world.verdict(&mail_server(), act("t1", "mail:read"), T - 1),
        &[TOKEN_NOT_YET_VALID],
    );
    assert_violation(
        &world.verdict(&mail_server(), act("t1", "mail:read"), T + 5 * HOUR),
        &[TOKEN_EXPIRED],
    );
    let wrong_agent = Body::Action(Action {
        agent: "impostor".into(),
        ..match act("t1", "mail:read") {
            Body::Action(a) => a,
            _ => unreachable!(),
        }
    });
    assert_violation(
        &world.verdict(&mail_server(), wrong_agent, T + 1),
        &[AGENT_MISMATCH],
    );
    // A resource server outside the token's audience.
    let drive = record(Role::ResourceServer, "drive.example");
    let elsewhere = Body::Action(Action {
        resource_server: "drive.example".into(),
        ..match act("t1", "mail:read") {
            Body::Action(a) => a,
            _ => unreachable!(),
        }
    });
    assert_violation(
        &world.verdict(&drive, elsewhere, T + 1),
        &[AUDIENCE_NOT_ALLOWED],
    );
    // An untraced token.
    world.verdict(
        &issuer(),
        Body::Issuance(Issuance {
            token_id: "bad".into(),
            user: "bob".into(),
            ..direct()
        }),
        T,
    );
    assert_violation(
        &world.verdict(&mail_server(), act("bad", "mail:read"), T + 1),
        &[UNTRACED_TOKEN],
    );
}

#[test]
fn an_expired_consent_breaks_actions_on_a_longer_token() {
    // A token that (wrongly) outlives its consent is untraced; the consent's expiry is named too.
    let mut world = World::new();
    world.verdict(
        &alice(),
        Body::Consent(Consent {
            expires_at_ms: T + HOUR,
            ..base_consent()
        }),
        T,
    );
    world.verdict(&issuer(), Body::Issuance(direct()), T);
    let verdict = world.verdict(&mail_server(), act("t1", "mail:read"), T + 2 * HOUR);
    assert_violation(&verdict, &[UNTRACED_TOKEN, CONSENT_EXPIRED]);
}

#[test]
fn revocation_cascades_from_its_time_on_and_earlier_actions_stay_traced() {
    let (mut world, _, _) = World::with_consent_and_token();
    world.verdict(&issuer(), Body::Issuance(hop(&direct(), "t2", "helper")), T);
    world.verdict(
        &issuer(),
        Body::Issuance(hop(&hop(&direct(), "t2", "helper"), "t3", "sub")),
        T,
    );
    // Revoke the root token at T+100: the grandchild's actions before stay traced.
    world.verdict(&issuer(), revoke(Target::TokenId("t1".into())), T + 100);
    let before = world.verdict(&mail_server(), act("t3", "mail:read"), T + 99);
    assert_eq!(before.status, TraceStatus::Traced as i32, "{before:?}");
    assert_violation(
        &world.verdict(&mail_server(), act("t3", "mail:read"), T + 100),
        &[TOKEN_REVOKED],
    );
    // Consent revocation reaches every token under it.
    let (mut world, _, _) = World::with_consent_and_token();
    world.verdict(&issuer(), Body::Issuance(hop(&direct(), "t2", "helper")), T);
    world.verdict(&alice(), revoke(Target::ConsentId("c1".into())), T + 50);
    assert_eq!(
        world
            .verdict(&mail_server(), act("t2", "mail:read"), T + 49)
            .status,
        TraceStatus::Traced as i32
    );
    assert_violation(
        &world.verdict(&mail_server(), act("t2", "mail:read"), T + 50),
        &[CONSENT_REVOKED],
    );
}

#[test]
fn only_the_right_parties_may_revoke() {
    let (mut world, _, _) = World::with_consent_and_token();
    let bob = record(Role::User, "bob");
    assert!(matches!(
        world.run(&bob, revoke(Target::ConsentId("c1".into())), T),
        Err(Refusal::PrincipalMismatch { .. })
    ));
    assert!(matches!(
        world.run(&alice(), revoke(Target::TokenId("t1".into())), T),
        Err(Refusal::RoleNotAllowed { .. })
    ));
    assert!(matches!(
        world.run(&mail_server(), revoke(Target::TokenId("t1".into())), T),
        Err(Refusal::RoleNotAllowed { .. })
    ));
    assert!(matches!(
        world.run(&issuer(), revoke(Target::TokenId("ghost".into())), T),
        Err(Refusal::Conflict(_))
    ));
    assert!(matches!(
        world.run(&issuer(), revoke(Target::ConsentId("ghost".into())), T),
        Err(Refusal::Conflict(_))
    ));
    let admin = record(Role::Admin, "admin");
    assert!(world
        .run(&admin, revoke(Target::ConsentId("c1".into())), T)
        .is_ok());
    assert!(world
        .run(&issuer(), revoke(Target::TokenId("t1".into())), T)
        .is_ok());
    assert!(world
        .run(&alice(), revoke(Target::ConsentId("c1".into())), T)
        .is_ok());
}

#[test]
fn denials_are_not_applicable_and_filed_under_the_tokens_user() {
    let (mut world, _, _) = World::with_consent_and_token();
    let denial = Body::Denial(Denial {
        token_id: "t1".into(),
        resource_server: "mail.example".into(),
        agent: "assistant".into(),
        operation: "mail:send".into(),
        resource: "outbox".into(),
        reason: crate::proto::DenialReason::InsufficientScope as i32,
        detail: String::new(),
    });
    let evaluation = world.run(&mail_server(), denial, T + 1).unwrap();
    assert_eq!(evaluation.verdict.status, TraceStatus::NotApplicable as i32);
    assert!(evaluation
        .index
        .contains(&(IndexField::User, "alice".into())));
    assert!(evaluation.index.contains(&(IndexField::Token, "t1".into())));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// One hop's narrowing choices: keep a subset of scopes (each maybe extended by a
    /// sub-segment), a subset of audiences, and shorten expiry.
    #[derive(Debug, Clone)]
    struct Narrowing {
        keep_scope: Vec<bool>,
        extend: Vec<Option<String>>,
        keep_audience: Vec<bool>,
        shorten_ms: i64,
    }

    fn narrowing() -> impl Strategy<Value = Narrowing> {
        (
            prop::collection::vec(any::<bool>(), 3),
            prop::collection::vec(prop::option::of("[a-c]{1,3}"), 3),
            prop::collection::vec(any::<bool>(), 3),
            0i64..HOUR,
        )
            .prop_map(
                |(keep_scope, extend, keep_audience, shorten_ms)| Narrowing {
                    keep_scope,
                    extend,
                    keep_audience,
                    shorten_ms,
                },
            )
    }

    fn narrow(parent: &Issuance, n: &Narrowing, token_id: String) -> Issuance {
        let mut scopes: Vec<String> = parent
            .scopes
            .iter()
            .enumerate()
            .filter(|(i, _)| n.keep_scope.get(*i).copied().unwrap_or(true))
            .map(|(i, s)| match n.extend.get(i).cloned().flatten() {
                Some(sub) => format!("{s}:{sub}"),
                None => s.clone(),
            })
            .collect();
        if scopes.is_empty() {
            scopes = parent.scopes.iter().take(1).cloned().collect();
        }
        let mut audiences: Vec<String> = parent
            .audiences
            .iter()
            .enumerate()
            .filter(|(i, _)| n.keep_audience.get(*i).copied().unwrap_or(true))
            .map(|(_, a)| a.clone())
            .collect();
        if audiences.is_empty() {
            audiences = parent.audiences.iter().take(1).cloned().collect();
        }
        Issuance {
            token_id: token_id.clone(),
            token_sha256: vec![9; 32],
            parent_token_id: parent.token_id.clone(),
            agent: format!("agent-{token_id}"),
            scopes,
            audiences,
            expires_at_ms: parent.expires_at_ms - n.shorten_ms,
            ..parent.clone()
        }
    }

    /// Builds a consent, a direct token and `hops` narrowing hops; returns the world and chain.
    fn attenuating_chain(hops: &[Narrowing]) -> (World, Vec<Issuance>) {
        let mut world = World::new();
        let consent = Consent {
            scopes: vec!["mail".into(), "cal:read".into(), "drive:files".into()],
            audiences: vec![
                "mail.example".into(),
                "cal.example".into(),
                "drive.example".into(),
            ],
            max_delegation_depth: 8,
            ..base_consent()
        };
        world.verdict(&alice(), Body::Consent(consent.clone()), T);
        let root = Issuance {
            scopes: consent.scopes.clone(),
            audiences: consent.audiences.clone(),
            ..direct()
        };
        let mut chain = vec![root];
        for (i, n) in hops.iter().enumerate() {
            let next = narrow(chain.last().unwrap(), n, format!("hop-{i}"));
            chain.push(next);
        }
        (world, chain)
    }

    proptest! {
        #[test]
        fn attenuating_chains_always_trace(hops in prop::collection::vec(narrowing(), 0..6)) {
            let (mut world, chain) = attenuating_chain(&hops);
            for issuance in &chain {
                let verdict = world.verdict(&issuer(), Body::Issuance(issuance.clone()), T);
                prop_assert_eq!(verdict.status, TraceStatus::Traced as i32, "{:?} for {:?}", verdict, issuance);
            }
            let last = chain.last().unwrap();
            let server = record(Role::ResourceServer, &last.audiences[0]);
            let body = Body::Action(Action {
                token_id: last.token_id.clone(),
                resource_server: last.audiences[0].clone(),
                agent: last.agent.clone(),
                operation: last.scopes[0].clone(),
                resource: "r".into(),
                request_sha256: vec![],
            });
            let verdict = world.verdict(&server, body, T + 1);
            prop_assert_eq!(verdict.status, TraceStatus::Traced as i32, "{:?}", verdict);
            prop_assert_eq!(verdict.chain.len(), chain.len());
        }

        #[test]
        fn a_widening_anywhere_is_a_violation(
            hops in prop::collection::vec(narrowing(), 1..6),
            at in any::<prop::sample::Index>(),
            how in 0usize..3,
        ) {
            let (mut world, mut chain) = attenuating_chain(&hops);
            let widened = 1 + at.index(chain.len() - 1);
            let parent = chain[widened - 1].clone();
            let expected = {
                let hop = &mut chain[widened];
                match how {
                    0 => { hop.scopes.push("bank:transfer".into()); SCOPE_NOT_COVERED }
                    1 => { hop.audiences.push("bank.example".into()); AUDIENCE_NOT_ALLOWED }
                    _ => { hop.expires_at_ms = parent.expires_at_ms + 1; EXPIRY_EXCEEDS_PARENT }
                }
            };
            for (i, issuance) in chain.iter().enumerate() {
                let verdict = world.verdict(&issuer(), Body::Issuance(issuance.clone()), T);
                if i < widened {
                    prop_assert_eq!(verdict.status, TraceStatus::Traced as i32);
                } else if i == widened {
                    prop_assert_eq!(verdict.status, TraceStatus::Violation as i32);
                    prop_assert!(verdict.reasons.iter().any(|r| r == expected), "{:?}", verdict);
                } else {
                    // Everything below a widened hop rests on an untraced parent.
                    prop_assert_eq!(verdict.status, TraceStatus::Violation as i32);
                    prop_assert!(verdict.reasons.iter().any(|r| r == UNTRACED_PARENT), "{:?}", verdict);
                }
            }
        }
    }
}
