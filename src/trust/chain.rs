//! The chain-of-trust rules for consents, issuances, validations, actions, denials and
//! revocations (DESIGN.md, "Chain of trust", rules version 1).

use std::sync::Arc;

use crate::proto::{
    revocation::Target, Action, Consent, Denial, Issuance, Revocation, Role, TraceStatus,
    Validation, Verdict,
};

use super::reasons::{self, Reasons};
use super::scopes;
use super::{
    not_applicable, plain, ConsentRecord, Evaluation, IndexField, IndexTerm, KeyRecord, Refusal,
    StateChange, TokenRecord, TrustView, ViewError, RULES_VERSION,
};

type Outcome = Result<Result<Evaluation, Refusal>, ViewError>;

/// Longest chain walked. Consents allow at most `MAX_DELEGATION_DEPTH` (64) hops, so every
/// link of a chain that can trace is walked; a longer chain is already a violation
/// (DELEGATION_TOO_DEEP) at the hop that exceeded its consent's depth.
const MAX_CHAIN_WALK: usize = super::limits::MAX_DELEGATION_DEPTH as usize + 2;

fn conflict(message: String) -> Outcome {
    Ok(Err(Refusal::Conflict(message)))
}

fn judged(reasons: Reasons) -> Verdict {
    Verdict {
        status: if reasons.is_empty() {
            TraceStatus::Traced
        } else {
            TraceStatus::Violation
        } as i32,
        reasons: reasons.into_strings(),
        rules_version: RULES_VERSION,
        ..Verdict::default()
    }
}

/// Index terms of an entry that names a known token: the token's user, holder and consent.
fn token_terms(token_id: &str, token: Option<&TokenRecord>) -> Vec<IndexTerm> {
    let mut terms = vec![(IndexField::Token, token_id.to_owned())];
    if let Some(token) = token {
        terms.push((IndexField::User, token.user.clone()));
        terms.push((IndexField::Agent, token.agent.clone()));
        terms.push((IndexField::Consent, token.consent_id.clone()));
    }
    terms
}

fn push_term(terms: &mut Vec<IndexTerm>, field: IndexField, value: &str) {
    if !value.is_empty() && !terms.iter().any(|(f, v)| *f == field && v == value) {
        terms.push((field, value.to_owned()));
    }
}

/// The token's ancestors, parent first (stops at a missing link or after MAX_CHAIN_WALK).
fn ancestors(
    token: &TokenRecord,
    view: &impl TrustView,
) -> Result<Vec<Arc<TokenRecord>>, ViewError> {
    let mut links = Vec::new();
    let mut parent_id = token.parent_token_id.clone();
    while !parent_id.is_empty() && links.len() < MAX_CHAIN_WALK {
        let Some(parent) = view.token(&parent_id)? else {
            break;
        };
        parent_id = parent.parent_token_id.clone();
        links.push(parent);
    }
    Ok(links)
}

/// Checks that every link (the token and its ancestors) is valid at `at`: started, not
/// expired, not revoked; and that the consent is known, unrevoked and unexpired.
fn check_links(
    token: &TokenRecord,
    at: i64,
    view: &impl TrustView,
    reasons: &mut Reasons,
) -> Result<Option<Arc<ConsentRecord>>, ViewError> {
    let links = ancestors(token, view)?;
    for link in std::iter::once(token).chain(links.iter().map(Arc::as_ref)) {
        reasons.check(at < link.not_before_ms, reasons::TOKEN_NOT_YET_VALID);
        reasons.check(at >= link.expires_at_ms, reasons::TOKEN_EXPIRED);
        reasons.check(link.revoked_at(at), reasons::TOKEN_REVOKED);
    }
    let consent = view.consent(&token.consent_id)?;
    match &consent {
        None => reasons.add(reasons::CONSENT_UNKNOWN),
        Some(consent) => {
            reasons.check(consent.revoked_at(at), reasons::CONSENT_REVOKED);
            reasons.check(consent.expired_at(at), reasons::CONSENT_EXPIRED);
        }
    }
    Ok(consent)
}

/// Judges an event that uses a token (an accepted validation, an action): UNKNOWN_TOKEN if the
/// ledger never saw it issued; otherwise the event's own `checks`, then every link and the
/// consent at `at`. The verdict carries the token's chain.
fn judge_token_use(
    token: Option<Arc<TokenRecord>>,
    at: i64,
    view: &impl TrustView,
    index: Vec<IndexTerm>,
    checks: impl FnOnce(&TokenRecord, &mut Reasons),
) -> Outcome {
    let mut reasons = Reasons::default();
    let verdict = match token {
        None => {
            reasons.add(reasons::UNKNOWN_TOKEN);
            judged(reasons)
        }
        Some(token) => {
            checks(&token, &mut reasons);
            let consent = check_links(&token, at, view, &mut reasons)?;
            with_chain(judged(reasons), &token, consent.as_deref())
        }
    };
    Ok(Ok(Evaluation {
        verdict,
        delta: vec![],
        index,
    }))
}

/// Fills a verdict's chain fields from the token it rests on.
fn with_chain(
    mut verdict: Verdict,
    token: &TokenRecord,
    consent: Option<&ConsentRecord>,
) -> Verdict {
    verdict.chain = token.chain.clone();
    verdict.consent_seq = token.consent_seq.unwrap_or_default();
    verdict.consent_user_signed = consent.is_some_and(|c| c.user_signed);
    verdict
}

pub(super) fn consent(
    consent: &Consent,
    signer: &KeyRecord,
    seq: u64,
    view: &impl TrustView,
) -> Outcome {
    if let Some(existing) = view.consent(&consent.consent_id)? {
        return conflict(format!(
            "consent {:?} is already recorded at entry {}",
            consent.consent_id, existing.seq
        ));
    }
    let user_signed = signer.role() == Role::User;
    let record = ConsentRecord {
        seq,
        user: consent.user.clone(),
        agent: consent.agent.clone(),
        scopes: consent.scopes.clone(),
        audiences: consent.audiences.clone(),
        expires_at_ms: consent.expires_at_ms,
        max_delegation_depth: consent.max_delegation_depth,
        allowed_delegates: consent.allowed_delegates.clone(),
        user_signed,
        revoked_at_ms: None,
        revocation_seqs: Vec::new(),
    };
    let mut evaluation = plain(
        vec![StateChange::PutConsent {
            consent_id: consent.consent_id.clone(),
            record,
        }],
        vec![
            (IndexField::Consent, consent.consent_id.clone()),
            (IndexField::User, consent.user.clone()),
            (IndexField::Agent, consent.agent.clone()),
        ],
    );
    evaluation.verdict.consent_user_signed = user_signed;
    Ok(Ok(evaluation))
}

/// What a token must stay within: its parent's (or the consent's) scopes, audiences, expiry.
struct Bounds<'a> {
    scopes: &'a [String],
    audiences: &'a [String],
    /// 0: no end.
    expires_at_ms: i64,
}

pub(super) fn issuance(issuance: &Issuance, at: i64, seq: u64, view: &impl TrustView) -> Outcome {
    if let Some(existing) = view.token(&issuance.token_id)? {
        return conflict(format!(
            "token {:?} is already issued at entry {}",
            issuance.token_id, existing.seq
        ));
    }
    let mut reasons = Reasons::default();
    let consent = view.consent(&issuance.consent_id)?;
    match &consent {
        None => reasons.add(reasons::CONSENT_UNKNOWN),
        Some(c) => {
            reasons.check(c.revoked_at(at), reasons::CONSENT_REVOKED);
            reasons.check(c.expired_at(at), reasons::CONSENT_EXPIRED);
            reasons.check(issuance.user != c.user, reasons::USER_MISMATCH);
        }
    }
    let consent_bounds = consent.as_ref().map(|c| Bounds {
        scopes: &c.scopes,
        audiences: &c.audiences,
        expires_at_ms: c.expires_at_ms,
    });
    let mut chain = vec![seq];
    let mut depth = 0;
    let parent = if issuance.parent_token_id.is_empty() {
        if let Some(c) = &consent {
            reasons.check(issuance.agent != c.agent, reasons::AGENT_MISMATCH);
        }
        None
    } else {
        view.token(&issuance.parent_token_id)?
    };
    if !issuance.parent_token_id.is_empty() {
        match &parent {
            None => reasons.add(reasons::UNKNOWN_TOKEN),
            Some(p) => {
                reasons.check(!p.traced, reasons::UNTRACED_PARENT);
                reasons.check(at < p.not_before_ms, reasons::TOKEN_NOT_YET_VALID);
                reasons.check(at >= p.expires_at_ms, reasons::TOKEN_EXPIRED);
                let revoked =
                    p.revoked_at(at) || ancestors(p, view)?.iter().any(|a| a.revoked_at(at));
                reasons.check(revoked, reasons::TOKEN_REVOKED);
                reasons.check(p.user != issuance.user, reasons::USER_MISMATCH);
                reasons.check(
                    p.consent_id != issuance.consent_id,
                    reasons::CONSENT_MISMATCH,
                );
                depth = p.depth.saturating_add(1);
                chain.extend_from_slice(&p.chain);
            }
        }
        if let Some(c) = &consent {
            reasons.check(depth > c.max_delegation_depth, reasons::DELEGATION_TOO_DEEP);
            let allowed =
                c.allowed_delegates.is_empty() || c.allowed_delegates.contains(&issuance.agent);
            reasons.check(!allowed, reasons::DELEGATE_NOT_ALLOWED);
        }
    }
    let bounds = match &parent {
        Some(p) => Some(Bounds {
            scopes: &p.scopes,
            audiences: &p.audiences,
            expires_at_ms: p.expires_at_ms,
        }),
        None => consent_bounds,
    };
    if let Some(bounds) = bounds {
        reasons.check(
            !scopes::within(&issuance.scopes, bounds.scopes),
            reasons::SCOPE_NOT_COVERED,
        );
        let audiences_ok = issuance
            .audiences
            .iter()
            .all(|a| bounds.audiences.contains(a));
        reasons.check(!audiences_ok, reasons::AUDIENCE_NOT_ALLOWED);
        let exceeds = bounds.expires_at_ms != 0 && issuance.expires_at_ms > bounds.expires_at_ms;
        reasons.check(exceeds, reasons::EXPIRY_EXCEEDS_PARENT);
    }
    let traced = reasons.is_empty();
    let mut verdict = judged(reasons);
    verdict.chain = chain.clone();
    verdict.consent_seq = consent.as_ref().map(|c| c.seq).unwrap_or_default();
    verdict.consent_user_signed = consent.as_ref().is_some_and(|c| c.user_signed);
    let record = TokenRecord {
        seq,
        consent_id: issuance.consent_id.clone(),
        parent_token_id: issuance.parent_token_id.clone(),
        user: issuance.user.clone(),
        agent: issuance.agent.clone(),
        scopes: issuance.scopes.clone(),
        audiences: issuance.audiences.clone(),
        not_before_ms: issuance.not_before_ms,
        expires_at_ms: issuance.expires_at_ms,
        token_sha256: issuance.token_sha256.clone(),
        traced,
        depth,
        chain,
        consent_seq: consent.as_ref().map(|c| c.seq),
        revoked_at_ms: None,
        revocation_seqs: Vec::new(),
    };
    let mut index = token_terms(&issuance.token_id, Some(&record));
    if let Some(parent) = &parent {
        push_term(&mut index, IndexField::Agent, &parent.agent);
    }
    Ok(Ok(Evaluation {
        verdict,
        delta: vec![StateChange::PutToken {
            token_id: issuance.token_id.clone(),
            record,
        }],
        index,
    }))
}

pub(super) fn validation(validation: &Validation, at: i64, view: &impl TrustView) -> Outcome {
    let token = view.token(&validation.token_id)?;
    let mut index = token_terms(&validation.token_id, token.as_deref());
    push_term(
        &mut index,
        IndexField::ResourceServer,
        &validation.resource_server,
    );
    if !validation.valid {
        // The resource server refused the token: nothing to trace, nothing broken.
        let verdict = match &token {
            Some(t) => with_chain(not_applicable(), t, view.consent(&t.consent_id)?.as_deref()),
            None => not_applicable(),
        };
        return Ok(Ok(Evaluation {
            verdict,
            delta: vec![],
            index,
        }));
    }
    judge_token_use(token, at, view, index, |token, found| {
        found.check(!token.traced, reasons::UNTRACED_TOKEN);
        found.check(
            validation.token_sha256 != token.token_sha256,
            reasons::TOKEN_HASH_MISMATCH,
        );
        found.check(
            !token.audiences.contains(&validation.resource_server),
            reasons::AUDIENCE_NOT_ALLOWED,
        );
    })
}

pub(super) fn action(action: &Action, at: i64, view: &impl TrustView) -> Outcome {
    let token = view.token(&action.token_id)?;
    let mut index = token_terms(&action.token_id, token.as_deref());
    push_term(
        &mut index,
        IndexField::ResourceServer,
        &action.resource_server,
    );
    push_term(&mut index, IndexField::Agent, &action.agent);
    judge_token_use(token, at, view, index, |token, found| {
        found.check(!token.traced, reasons::UNTRACED_TOKEN);
        found.check(
            !token.audiences.contains(&action.resource_server),
            reasons::AUDIENCE_NOT_ALLOWED,
        );
        found.check(
            !scopes::covered_by_any(&token.scopes, &action.operation),
            reasons::SCOPE_NOT_COVERED,
        );
        found.check(
            !action.agent.is_empty() && action.agent != token.agent,
            reasons::AGENT_MISMATCH,
        );
    })
}

pub(super) fn denial(denial: &Denial, view: &impl TrustView) -> Outcome {
    let mut index = Vec::new();
    if !denial.token_id.is_empty() {
        index = token_terms(&denial.token_id, view.token(&denial.token_id)?.as_deref());
    }
    push_term(
        &mut index,
        IndexField::ResourceServer,
        &denial.resource_server,
    );
    push_term(&mut index, IndexField::Agent, &denial.agent);
    Ok(Ok(plain(vec![], index)))
}

pub(super) fn revocation(
    revocation: &Revocation,
    signer: &KeyRecord,
    at: i64,
    seq: u64,
    view: &impl TrustView,
) -> Outcome {
    match &revocation.target {
        Some(Target::TokenId(token_id)) => {
            let Some(token) = view.token(token_id)? else {
                return conflict(format!(
                    "token {token_id:?} to revoke was never issued on this ledger"
                ));
            };
            let mut token = Arc::unwrap_or_clone(token);
            token.revoke(at, seq);
            let index = token_terms(token_id, Some(&token));
            Ok(Ok(plain(
                vec![StateChange::PutToken {
                    token_id: token_id.clone(),
                    record: token,
                }],
                index,
            )))
        }
        Some(Target::ConsentId(consent_id)) => {
            let Some(consent) = view.consent(consent_id)? else {
                return conflict(format!(
                    "consent {consent_id:?} to revoke is not on this ledger"
                ));
            };
            let mut consent = Arc::unwrap_or_clone(consent);
            if signer.role() == Role::User && signer.principal != consent.user {
                return Ok(Err(Refusal::PrincipalMismatch {
                    principal: signer.principal.clone(),
                    field: "consent user",
                    claimed: consent.user.clone(),
                }));
            }
            consent.revoke(at, seq);
            let index = vec![
                (IndexField::Consent, consent_id.clone()),
                (IndexField::User, consent.user.clone()),
                (IndexField::Agent, consent.agent.clone()),
            ];
            Ok(Ok(plain(
                vec![StateChange::PutConsent {
                    consent_id: consent_id.clone(),
                    record: consent,
                }],
                index,
            )))
        }
        None => Ok(Err(Refusal::Malformed(
            "revocation names no token or consent".into(),
        ))),
    }
}
