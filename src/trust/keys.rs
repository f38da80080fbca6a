//! The key registry's records and the rules on who may sign what.

use crate::envelope;
use crate::proto::{event::Body, revocation::Target, Event, Genesis, KeyGrant, Role};

use super::{kind_name, Refusal};

/// A registered key, as the ledger's state keeps it. Encoded with protobuf in the store.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyRecord {
    /// The 32-byte Ed25519 public key (weak keys never get here).
    #[prost(bytes = "vec", tag = "1")]
    pub public_key: Vec<u8>,
    /// A `Role` value: what the key may sign.
    #[prost(int32, tag = "2")]
    pub role: i32,
    /// Who the key speaks for: user id, issuer id, resource server id or agent id.
    #[prost(string, tag = "3")]
    pub principal: String,
    /// First millisecond at which the key is valid.
    #[prost(int64, tag = "4")]
    pub not_before_ms: i64,
    /// First millisecond at which the key is no longer valid; 0 for no end.
    #[prost(int64, tag = "5")]
    pub not_after_ms: i64,
    /// From this millisecond on the key is revoked.
    #[prost(int64, optional, tag = "6")]
    pub revoked_at_ms: Option<i64>,
    /// The entry that registered the key (its KeyGrant, or 0 for the genesis admin key).
    #[prost(uint64, tag = "7")]
    pub grant_seq: u64,
    /// The first KeyRevocation entry that named the key, if any.
    #[prost(uint64, optional, tag = "8")]
    pub revocation_seq: Option<u64>,
}

/// The principal name of the first admin key, the one the genesis names.
pub const GENESIS_ADMIN_PRINCIPAL: &str = "admin";

impl KeyRecord {
    /// The record a KeyGrant at `seq` creates.
    pub fn from_grant(grant: &KeyGrant, seq: u64) -> Self {
        Self {
            public_key: grant.public_key.clone(),
            role: grant.role,
            principal: grant.principal.clone(),
            not_before_ms: grant.not_before_ms,
            not_after_ms: grant.not_after_ms,
            revoked_at_ms: None,
            grant_seq: seq,
            revocation_seq: None,
        }
    }

    /// The first admin key, named by the genesis at `seq` (0).
    pub fn admin_from_genesis(genesis: &Genesis, seq: u64) -> Self {
        Self {
            public_key: genesis.admin_public_key.clone(),
            role: Role::Admin as i32,
            principal: GENESIS_ADMIN_PRINCIPAL.to_owned(),
            not_before_ms: 0,
            not_after_ms: 0,
            revoked_at_ms: None,
            grant_seq: seq,
            revocation_seq: None,
        }
    }

    /// The key's id (hex of the first 16 bytes of SHA-256 of the public key).
    pub fn key_id(&self) -> String {
        match <&[u8; 32]>::try_from(self.public_key.as_slice()) {
            Ok(key) => envelope::key_id(key),
            // Only 32-byte keys are ever registered (validate_event checks grants).
            Err(_) => String::new(),
        }
    }

    /// The key's role; an unknown value reads as `Unspecified`, which may sign nothing.
    pub fn role(&self) -> Role {
        Role::try_from(self.role).unwrap_or(Role::Unspecified)
    }
}

/// Checks that `record` is valid at `at_ms`: within `[not_before, not_after)` and not revoked
/// at or before `at_ms`.
pub fn key_valid_at(key_id: &str, record: &KeyRecord, at_ms: i64) -> Result<(), Refusal> {
    let why = if at_ms < record.not_before_ms {
        Some("not yet valid")
    } else if record.not_after_ms != 0 && at_ms >= record.not_after_ms {
        Some("expired")
    } else if record.revoked_at_ms.is_some_and(|revoked| revoked <= at_ms) {
        Some("revoked")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(Refusal::KeyNotValid {
            key_id: key_id.to_owned(),
            at_ms,
            why,
        }),
    }
}

pub(super) fn role_name(role: Role) -> &'static str {
    match role {
        Role::Unspecified => "unspecified",
        Role::Admin => "ADMIN",
        Role::User => "USER",
        Role::Issuer => "ISSUER",
        Role::ResourceServer => "RESOURCE_SERVER",
        Role::Agent => "AGENT",
    }
}

fn principal_must_be(
    signer: &KeyRecord,
    field: &'static str,
    claimed: &str,
) -> Result<(), Refusal> {
    if signer.principal == claimed {
        Ok(())
    } else {
        Err(Refusal::PrincipalMismatch {
            principal: signer.principal.clone(),
            field,
            claimed: claimed.to_owned(),
        })
    }
}

/// Checks that the signer's role may assert the event's kind and that its principal matches
/// the body where the design says so. The genesis is never accepted from a client.
pub fn authorize(event: &Event, signer: &KeyRecord) -> Result<(), Refusal> {
    let Some(body) = &event.body else {
        return Err(Refusal::Malformed("event has no body".into()));
    };
    let role = signer.role();
    let denied = || Refusal::RoleNotAllowed {
        role: role_name(role),
        kind: kind_name(body),
    };
    match (body, role) {
        (Body::KeyGrant(_) | Body::KeyRevocation(_), Role::Admin) => Ok(()),
        (Body::Consent(consent), Role::User) => {
            principal_must_be(signer, "consent user", &consent.user)
        }
        (Body::Consent(_), Role::Issuer) => Ok(()),
        (Body::Issuance(_), Role::Issuer) => Ok(()),
        (Body::Validation(validation), Role::ResourceServer) => {
            principal_must_be(signer, "resource_server", &validation.resource_server)
        }
        (Body::Action(action), Role::ResourceServer) => {
            principal_must_be(signer, "resource_server", &action.resource_server)
        }
        (Body::Denial(denial), Role::ResourceServer | Role::Issuer) => {
            principal_must_be(signer, "resource_server", &denial.resource_server)
        }
        (Body::Revocation(_), Role::Admin | Role::Issuer) => Ok(()),
        // A user may withdraw consents only; `evaluate` checks the consent is the user's own.
        (Body::Revocation(revocation), Role::User) => match revocation.target {
            Some(Target::ConsentId(_)) => Ok(()),
            _ => Err(denied()),
        },
        _ => Err(denied()),
    }
}
