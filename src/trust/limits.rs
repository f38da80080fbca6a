//! Field limits and required fields: what makes an event well-formed before any state is read.

use crate::envelope;
use crate::proto::{event::Body, ledger_key_rotation::Step, revocation::Target, Event, Role};

use super::Refusal;

/// Largest accepted event payload, in bytes.
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024;
/// Longest `event_id`, in bytes (1..=128 printable ASCII characters).
pub const MAX_EVENT_ID_LEN: usize = 128;
/// Longest identifier (user, agent, token id, scope, principal ...), in bytes.
pub const MAX_ID_LEN: usize = 512;
/// Longest free-text field (purpose, reason, detail, resource), in bytes.
pub const MAX_TEXT_LEN: usize = 4096;
/// Most members of a repeated field (scopes, audiences, allowed delegates).
pub const MAX_REPEATED: usize = 256;
/// Largest `max_delegation_depth` a consent may allow; chain walks are bounded by it.
pub const MAX_DELEGATION_DEPTH: u32 = 64;
/// Latest time any `*_ms` field may name: 9999-12-31T23:59:59.999Z.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

fn time(field: &str, value: i64) -> Result<(), Refusal> {
    if !(0..=MAX_TIME_MS).contains(&value) {
        return Err(malformed(format!(
            "{field} must be a Unix time in ms between 0 and {MAX_TIME_MS}"
        )));
    }
    Ok(())
}

fn malformed(message: String) -> Refusal {
    Refusal::Malformed(message)
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), Refusal> {
    if value.len() > max {
        return Err(malformed(format!(
            "{field} is {} bytes; the limit is {max}",
            value.len()
        )));
    }
    Ok(())
}

fn required_id(field: &str, value: &str) -> Result<(), Refusal> {
    if value.is_empty() {
        return Err(malformed(format!("{field} is required")));
    }
    optional_id(field, value)
}

fn optional_id(field: &str, value: &str) -> Result<(), Refusal> {
    check_len(field, value, MAX_ID_LEN)?;
    if value.chars().any(char::is_control) {
        return Err(malformed(format!("{field} contains control characters")));
    }
    Ok(())
}

fn ids(field: &str, values: &[String]) -> Result<(), Refusal> {
    if values.len() > MAX_REPEATED {
        return Err(malformed(format!(
            "{field} has {} members; the limit is {MAX_REPEATED}",
            values.len()
        )));
    }
    values
        .iter()
        .try_for_each(|value| required_id(field, value))
}

fn hash(field: &str, value: &[u8], required: bool) -> Result<(), Refusal> {
    match value.len() {
        32 => Ok(()),
        0 if !required => Ok(()),
        len => Err(malformed(format!(
            "{field} must be a 32-byte SHA-256 hash, got {len} bytes"
        ))),
    }
}

fn public_key(field: &str, value: &[u8]) -> Result<(), Refusal> {
    envelope::parse_grantable_key(value)
        .map(|_| ())
        .map_err(|e| malformed(format!("{field}: {e}")))
}

/// Checks the event's shape: event id, a body, required fields, lengths and counts, hash and
/// key sizes. Reads no state.
pub fn validate_event(event: &Event, payload_len: usize) -> Result<(), Refusal> {
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(malformed(format!(
            "payload is {payload_len} bytes; the limit is {MAX_PAYLOAD_LEN}"
        )));
    }
    let id = &event.event_id;
    if id.is_empty() || id.len() > MAX_EVENT_ID_LEN {
        return Err(malformed(format!(
            "event_id must be 1..={MAX_EVENT_ID_LEN} bytes, got {}",
            id.len()
        )));
    }
    if !id.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(malformed("event_id must be printable ASCII".into()));
    }
    if event.occurred_at_ms <= 0 {
        return Err(malformed(
            "occurred_at_ms must be a positive Unix time in ms".into(),
        ));
    }
    let Some(body) = &event.body else {
        return Err(malformed("event has no body".into()));
    };
    match body {
        Body::Genesis(genesis) => {
            required_id("origin", &genesis.origin)?;
            public_key("admin_public_key", &genesis.admin_public_key)?;
            public_key("ledger_public_key", &genesis.ledger_public_key)?;
            if genesis.max_clock_skew_ms <= 0 {
                return Err(malformed("max_clock_skew_ms must be positive".into()));
            }
        }
        Body::KeyGrant(grant) => {
            public_key("public_key", &grant.public_key)?;
            match Role::try_from(grant.role) {
                Ok(Role::Unspecified) | Err(_) => {
                    return Err(malformed(format!(
                        "role {} is not a known role",
                        grant.role
                    )))
                }
                Ok(_) => {}
            }
            required_id("principal", &grant.principal)?;
            time("not_before_ms", grant.not_before_ms)?;
            time("not_after_ms", grant.not_after_ms)?;
            if grant.not_after_ms != 0 && grant.not_after_ms <= grant.not_before_ms {
                return Err(malformed(
                    "not_after_ms must be 0 or after not_before_ms".into(),
                ));
            }
        }
        Body::KeyRevocation(revocation) => {
            required_id("key_id", &revocation.key_id)?;
            check_len("reason", &revocation.reason, MAX_TEXT_LEN)?;
        }
        Body::Consent(consent) => {
            required_id("consent_id", &consent.consent_id)?;
            required_id("user", &consent.user)?;
            required_id("agent", &consent.agent)?;
            ids("scopes", &consent.scopes)?;
            ids("audiences", &consent.audiences)?;
            ids("allowed_delegates", &consent.allowed_delegates)?;
            check_len("purpose", &consent.purpose, MAX_TEXT_LEN)?;
            hash("consent_text_sha256", &consent.consent_text_sha256, false)?;
            time("expires_at_ms", consent.expires_at_ms)?;
            if consent.max_delegation_depth > MAX_DELEGATION_DEPTH {
                return Err(malformed(format!(
                    "max_delegation_depth may be at most {MAX_DELEGATION_DEPTH}"
                )));
            }
        }
        Body::Issuance(issuance) => {
            required_id("token_id", &issuance.token_id)?;
            hash("token_sha256", &issuance.token_sha256, true)?;
            required_id("consent_id", &issuance.consent_id)?;
            optional_id("parent_token_id", &issuance.parent_token_id)?;
            required_id("user", &issuance.user)?;
            required_id("agent", &issuance.agent)?;
            ids("scopes", &issuance.scopes)?;
            ids("audiences", &issuance.audiences)?;
            optional_id("grant_type", &issuance.grant_type)?;
            time("not_before_ms", issuance.not_before_ms)?;
            time("expires_at_ms", issuance.expires_at_ms)?;
            if issuance.expires_at_ms <= 0 || issuance.expires_at_ms <= issuance.not_before_ms {
                return Err(malformed(
                    "a token needs expires_at_ms > 0 and after not_before_ms".into(),
                ));
            }
        }
        Body::Validation(validation) => {
            required_id("token_id", &validation.token_id)?;
            hash("token_sha256", &validation.token_sha256, true)?;
            required_id("resource_server", &validation.resource_server)?;
            check_len("reason", &validation.reason, MAX_TEXT_LEN)?;
        }
        Body::Action(action) => {
            required_id("token_id", &action.token_id)?;
            required_id("resource_server", &action.resource_server)?;
            optional_id("agent", &action.agent)?;
            required_id("operation", &action.operation)?;
            check_len("resource", &action.resource, MAX_TEXT_LEN)?;
            hash("request_sha256", &action.request_sha256, false)?;
        }
        Body::Denial(denial) => {
            optional_id("token_id", &denial.token_id)?;
            required_id("resource_server", &denial.resource_server)?;
            optional_id("agent", &denial.agent)?;
            optional_id("operation", &denial.operation)?;
            check_len("resource", &denial.resource, MAX_TEXT_LEN)?;
            check_len("detail", &denial.detail, MAX_TEXT_LEN)?;
        }
        Body::Revocation(revocation) => {
            match &revocation.target {
                Some(Target::TokenId(id)) => required_id("token_id", id)?,
                Some(Target::ConsentId(id)) => required_id("consent_id", id)?,
                None => return Err(malformed("revocation names no token or consent".into())),
            }
            check_len("reason", &revocation.reason, MAX_TEXT_LEN)?;
        }
        Body::LedgerKeyRotation(rotation) => {
            match Step::try_from(rotation.step) {
                Ok(Step::Begin | Step::Finish | Step::Cancel) => {}
                Ok(Step::Unspecified) | Err(_) => {
                    return Err(malformed(format!(
                        "step {} is not a known rotation step",
                        rotation.step
                    )))
                }
            }
            public_key("ledger_public_key", &rotation.ledger_public_key)?;
            public_key("next_ledger_public_key", &rotation.next_ledger_public_key)?;
        }
    }
    Ok(())
}
