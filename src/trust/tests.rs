//! Unit tests of the rules that need no store: field limits, key validity, who may sign what.

use super::*;
use crate::proto::{revocation::Target, Action, Consent, Denial, KeyGrant, Revocation};

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
}
