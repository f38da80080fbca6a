//! The materialized chain-of-trust state: consents and tokens as the ledger keeps them.
//! Encoded with protobuf in the store; derived from the entries and rebuildable from them.

/// A consent on the ledger.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ConsentRecord {
    /// The consent's entry.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// The user who consented.
    #[prost(string, tag = "2")]
    pub user: String,
    /// The agent the user authorized.
    #[prost(string, tag = "3")]
    pub agent: String,
    /// What the agent may do.
    #[prost(string, repeated, tag = "4")]
    pub scopes: Vec<String>,
    /// Where the agent may do it.
    #[prost(string, repeated, tag = "5")]
    pub audiences: Vec<String>,
    /// When the consent ends; 0 for no end.
    #[prost(int64, tag = "6")]
    pub expires_at_ms: i64,
    /// Hops of delegation allowed below the directly issued token.
    #[prost(uint32, tag = "7")]
    pub max_delegation_depth: u32,
    /// Agents that may receive delegated tokens; empty: any.
    #[prost(string, repeated, tag = "8")]
    pub allowed_delegates: Vec<String>,
    /// Signed by the user's own key (rather than attested by an issuer).
    #[prost(bool, tag = "9")]
    pub user_signed: bool,
    /// Earliest revocation time, if revoked.
    #[prost(int64, optional, tag = "10")]
    pub revoked_at_ms: Option<i64>,
    /// The revocation entries that name this consent.
    #[prost(uint64, repeated, tag = "11")]
    pub revocation_seqs: Vec<u64>,
}

/// A token whose issuance is on the ledger (traced or not).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TokenRecord {
    /// The issuance entry.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// The consent the issuance names.
    #[prost(string, tag = "2")]
    pub consent_id: String,
    /// The parent token for a delegation hop; empty for a direct token.
    #[prost(string, tag = "3")]
    pub parent_token_id: String,
    /// The user the token acts for.
    #[prost(string, tag = "4")]
    pub user: String,
    /// The agent holding the token.
    #[prost(string, tag = "5")]
    pub agent: String,
    /// The token's scopes.
    #[prost(string, repeated, tag = "6")]
    pub scopes: Vec<String>,
    /// The token's audiences (resource servers).
    #[prost(string, repeated, tag = "7")]
    pub audiences: Vec<String>,
    /// First valid millisecond.
    #[prost(int64, tag = "8")]
    pub not_before_ms: i64,
    /// First invalid millisecond.
    #[prost(int64, tag = "9")]
    pub expires_at_ms: i64,
    /// SHA-256 of the token as issued.
    #[prost(bytes = "vec", tag = "10")]
    pub token_sha256: Vec<u8>,
    /// The issuance was TRACED.
    #[prost(bool, tag = "11")]
    pub traced: bool,
    /// Delegation hops from the consent: 0 for a direct token.
    #[prost(uint32, tag = "12")]
    pub depth: u32,
    /// Issuance entries from this token up to the consent (this token's first).
    #[prost(uint64, repeated, tag = "13")]
    pub chain: Vec<u64>,
    /// The consent's entry, when known.
    #[prost(uint64, optional, tag = "14")]
    pub consent_seq: Option<u64>,
    /// Earliest revocation time, if revoked.
    #[prost(int64, optional, tag = "15")]
    pub revoked_at_ms: Option<i64>,
    /// The revocation entries that name this token.
    #[prost(uint64, repeated, tag = "16")]
    pub revocation_seqs: Vec<u64>,
}

fn revoked_by(revoked_at_ms: Option<i64>, at_ms: i64) -> bool {
    revoked_at_ms.is_some_and(|revoked| revoked <= at_ms)
}

/// Keeps the earliest revocation time and remembers the revoking entry.
fn record_revocation(revoked_at_ms: &mut Option<i64>, seqs: &mut Vec<u64>, at_ms: i64, seq: u64) {
    *revoked_at_ms = Some(revoked_at_ms.map_or(at_ms, |old| old.min(at_ms)));
    seqs.push(seq);
}

impl ConsentRecord {
    /// Revoked at or before `at_ms`.
    pub fn revoked_at(&self, at_ms: i64) -> bool {
        revoked_by(self.revoked_at_ms, at_ms)
    }

    /// Expired at `at_ms`.
    pub fn expired_at(&self, at_ms: i64) -> bool {
        self.expires_at_ms != 0 && at_ms >= self.expires_at_ms
    }

    /// Records a revocation at `at_ms` by entry `seq`.
    pub fn revoke(&mut self, at_ms: i64, seq: u64) {
        record_revocation(
            &mut self.revoked_at_ms,
            &mut self.revocation_seqs,
            at_ms,
            seq,
        );
    }
}

impl TokenRecord {
    /// Revoked at or before `at_ms`.
    pub fn revoked_at(&self, at_ms: i64) -> bool {
        revoked_by(self.revoked_at_ms, at_ms)
    }

    /// Records a revocation at `at_ms` by entry `seq`.
    pub fn revoke(&mut self, at_ms: i64, seq: u64) {
        record_revocation(
            &mut self.revoked_at_ms,
            &mut self.revocation_seqs,
            at_ms,
            seq,
        );
    }
}
