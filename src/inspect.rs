//! Entries as JSON for people and scripts: hashes and signatures in hex, times in RFC 3339
//! UTC, enums by name. Used by `custody query` and `custody trace`.

use prost::Message as _;
use serde_json::{json, Value};

use crate::merkle;
use crate::proto::{
    event::Body, ledger_key_rotation::Step, revocation::Target, DenialReason, Entry, Event, Role,
    TraceStatus, Verdict,
};

/// Unix milliseconds as RFC 3339 UTC (millisecond precision); out-of-range values as numbers.
pub fn rfc3339(ms: i64) -> Value {
    // humantime cannot format years past 9999; such values are shown as numbers.
    match u64::try_from(ms)
        .ok()
        .filter(|&ms| ms <= crate::trust::MAX_TIME_MS as u64)
    {
        Some(ms) => {
            let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
            Value::String(humantime::format_rfc3339_millis(time).to_string())
        }
        None => json!(ms),
    }
}

fn optional_time(ms: i64) -> Value {
    if ms == 0 {
        Value::Null
    } else {
        rfc3339(ms)
    }
}

fn enum_name<E: TryFrom<i32>>(value: i32, name: impl Fn(E) -> &'static str) -> Value {
    match E::try_from(value) {
        Ok(e) => json!(name(e)),
        Err(_) => json!(value),
    }
}

/// A verdict as JSON.
pub fn verdict_json(verdict: &Verdict) -> Value {
    json!({
        "status": enum_name(verdict.status, |s: TraceStatus| s.as_str_name()),
        "reasons": verdict.reasons,
        "consent_seq": verdict.consent_seq,
        "chain": verdict.chain,
        "consent_user_signed": verdict.consent_user_signed,
        "rules_version": verdict.rules_version,
    })
}

fn body_json(body: &Body) -> (&'static str, Value) {
    match body {
        Body::Genesis(g) => (
            "genesis",
            json!({
                "origin": g.origin,
                "admin_public_key": hex::encode(&g.admin_public_key),
                "ledger_public_key": hex::encode(&g.ledger_public_key),
                "max_clock_skew_ms": g.max_clock_skew_ms,
            }),
        ),
        Body::KeyGrant(k) => (
            "key_grant",
            json!({
                "public_key": hex::encode(&k.public_key),
                "role": enum_name(k.role, |r: Role| r.as_str_name()),
                "principal": k.principal,
                "not_before": optional_time(k.not_before_ms),
                "not_after": optional_time(k.not_after_ms),
            }),
        ),
        Body::KeyRevocation(k) => (
            "key_revocation",
            json!({ "key_id": k.key_id, "reason": k.reason }),
        ),
        Body::Consent(c) => (
            "consent",
            json!({
                "consent_id": c.consent_id,
                "user": c.user,
                "agent": c.agent,
                "scopes": c.scopes,
                "audiences": c.audiences,
                "expires_at": optional_time(c.expires_at_ms),
                "purpose": c.purpose,
                "consent_text_sha256": hex::encode(&c.consent_text_sha256),
                "max_delegation_depth": c.max_delegation_depth,
                "allowed_delegates": c.allowed_delegates,
            }),
        ),
        Body::Issuance(i) => (
            "issuance",
            json!({
                "token_id": i.token_id,
                "token_sha256": hex::encode(&i.token_sha256),
                "consent_id": i.consent_id,
                "parent_token_id": i.parent_token_id,
                "user": i.user,
                "agent": i.agent,
                "scopes": i.scopes,
                "audiences": i.audiences,
                "not_before": optional_time(i.not_before_ms),
                "expires_at": rfc3339(i.expires_at_ms),
                "grant_type": i.grant_type,
            }),
        ),
        Body::Validation(v) => (
            "validation",
            json!({
                "token_id": v.token_id,
                "token_sha256": hex::encode(&v.token_sha256),
                "resource_server": v.resource_server,
                "valid": v.valid,
                "reason": v.reason,
            }),
        ),
        Body::Action(a) => (
            "action",
            json!({
                "token_id": a.token_id,
                "resource_server": a.resource_server,
                "agent": a.agent,
                "operation": a.operation,
                "resource": a.resource,
                "request_sha256": hex::encode(&a.request_sha256),
            }),
        ),
        Body::Denial(d) => (
            "denial",
            json!({
                "token_id": d.token_id,
                "resource_server": d.resource_server,
                "agent": d.agent,
                "operation": d.operation,
                "resource": d.resource,
                "reason": enum_name(d.reason, |r: DenialReason| r.as_str_name()),
                "detail": d.detail,
            }),
        ),
        Body::Revocation(r) => (
            "revocation",
            match &r.target {
                Some(Target::TokenId(id)) => json!({ "token_id": id, "reason": r.reason }),
                Some(Target::ConsentId(id)) => json!({ "consent_id": id, "reason": r.reason }),
                None => json!({ "reason": r.reason }),
            },
        ),
        Body::LedgerKeyRotation(r) => (
            "ledger_key_rotation",
            json!({
                "step": enum_name(r.step, |s: Step| s.as_str_name()),
                "ledger_public_key": hex::encode(&r.ledger_public_key),
                "next_ledger_public_key": hex::encode(&r.next_ledger_public_key),
            }),
        ),
    }
}

/// An entry's stored bytes as JSON: the entry, its decoded event and its leaf hash.
pub fn entry_json(bytes: &[u8]) -> Value {
    let entry = match Entry::decode(bytes) {
        Ok(entry) => entry,
        Err(e) => return json!({ "error": format!("entry does not decode: {e}") }),
    };
    let signed = entry.event.clone().unwrap_or_default();
    let event = match Event::decode(signed.payload.as_slice()) {
        Ok(event) => {
            let mut value = json!({
                "event_id": event.event_id,
                "occurred_at": rfc3339(event.occurred_at_ms),
            });
            if let Some(body) = &event.body {
                let (kind, body) = body_json(body);
                value["kind"] = json!(kind);
                value[kind] = body;
            }
            value
        }
        Err(e) => json!({ "error": format!("payload does not decode: {e}") }),
    };
    json!({
        "seq": entry.seq,
        "leaf_hash": hex::encode(merkle::leaf_hash(bytes).0),
        "prev_hash": hex::encode(&entry.prev_hash),
        "received_at": rfc3339(entry.received_at_ms),
        "key_id": signed.key_id,
        "signature": hex::encode(&signed.signature),
        "event": event,
        "verdict": entry.verdict.as_ref().map(verdict_json),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_render_as_rfc3339_utc() {
        assert_eq!(rfc3339(0), json!("1970-01-01T00:00:00.000Z"));
        assert_eq!(
            rfc3339(1_700_000_000_123),
            json!("2023-11-14T22:13:20.123Z")
        );
        assert_eq!(rfc3339(-5), json!(-5));
        // Regression: years past 9999 panicked in formatting.
        assert_eq!(rfc3339(300_000_000_000_000), json!(300_000_000_000_000i64));
        assert_eq!(
            rfc3339(crate::trust::MAX_TIME_MS),
            json!("9999-12-31T23:59:59.999Z")
        );
    }

    #[test]
    fn garbage_entries_render_as_an_error_not_a_panic() {
        assert!(entry_json(&[0xff, 0xff]).get("error").is_some());
    }
}
