//! Reason codes: stable upper-case strings naming each chain-of-trust rule an event broke.
//! They are part of the public contract; `docs/REASONS.md` is generated from [`ALL`] (a test
//! keeps the two equal).

/// An action, validation or delegation names a token the ledger never saw issued.
pub const UNKNOWN_TOKEN: &str = "UNKNOWN_TOKEN";
/// A delegated token's parent was itself issued in violation of the rules.
pub const UNTRACED_PARENT: &str = "UNTRACED_PARENT";
/// The token used was issued in violation of the rules.
pub const UNTRACED_TOKEN: &str = "UNTRACED_TOKEN";
/// A scope or operation is not covered by the parent's, the consent's or the token's scopes.
pub const SCOPE_NOT_COVERED: &str = "SCOPE_NOT_COVERED";
/// An audience or resource server is outside what the parent, consent or token allows.
pub const AUDIENCE_NOT_ALLOWED: &str = "AUDIENCE_NOT_ALLOWED";
/// A token in the chain had expired at `occurred_at_ms`.
pub const TOKEN_EXPIRED: &str = "TOKEN_EXPIRED";
/// A token in the chain was not yet valid at `occurred_at_ms`.
pub const TOKEN_NOT_YET_VALID: &str = "TOKEN_NOT_YET_VALID";
/// A token in the chain was revoked at or before `occurred_at_ms`.
pub const TOKEN_REVOKED: &str = "TOKEN_REVOKED";
/// The consent named is not on the ledger.
pub const CONSENT_UNKNOWN: &str = "CONSENT_UNKNOWN";
/// The consent was revoked at or before `occurred_at_ms`.
pub const CONSENT_REVOKED: &str = "CONSENT_REVOKED";
/// The consent had expired at `occurred_at_ms`.
pub const CONSENT_EXPIRED: &str = "CONSENT_EXPIRED";
/// A delegated token names another consent than its parent's.
pub const CONSENT_MISMATCH: &str = "CONSENT_MISMATCH";
/// The delegation hop count exceeds the consent's `max_delegation_depth`.
pub const DELEGATION_TOO_DEEP: &str = "DELEGATION_TOO_DEEP";
/// The delegate is not among the consent's `allowed_delegates`.
pub const DELEGATE_NOT_ALLOWED: &str = "DELEGATE_NOT_ALLOWED";
/// The user differs from the consent's or the parent token's user.
pub const USER_MISMATCH: &str = "USER_MISMATCH";
/// The agent differs from the consent's agent (direct token) or the token's holder (action).
pub const AGENT_MISMATCH: &str = "AGENT_MISMATCH";
/// A delegated token outlives its parent or its consent.
pub const EXPIRY_EXCEEDS_PARENT: &str = "EXPIRY_EXCEEDS_PARENT";
/// A resource server accepted a token whose hash differs from the issued one.
pub const TOKEN_HASH_MISMATCH: &str = "TOKEN_HASH_MISMATCH";

/// Every reason code with what it means.
pub const ALL: &[(&str, &str)] = &[
    (UNKNOWN_TOKEN, "the token (or the parent of a delegated token) was never issued on this ledger"),
    (UNTRACED_PARENT, "a delegated token's parent was itself issued in violation of the rules"),
    (UNTRACED_TOKEN, "the token used (validated or acted on) was issued in violation of the rules"),
    (SCOPE_NOT_COVERED, "a requested scope or the operation is not covered by the parent's, consent's or token's scopes"),
    (AUDIENCE_NOT_ALLOWED, "an audience or the resource server is outside the parent's, consent's or token's audiences"),
    (TOKEN_EXPIRED, "a token in the chain had expired at occurred_at_ms"),
    (TOKEN_NOT_YET_VALID, "a token in the chain was not yet valid (before not_before_ms) at occurred_at_ms"),
    (TOKEN_REVOKED, "a token in the chain (the token or an ancestor) was revoked at or before occurred_at_ms"),
    (CONSENT_UNKNOWN, "the consent the token names is not on this ledger"),
    (CONSENT_REVOKED, "the consent was revoked at or before occurred_at_ms"),
    (CONSENT_EXPIRED, "the consent had expired at occurred_at_ms"),
    (CONSENT_MISMATCH, "a delegated token names another consent than its parent's"),
    (DELEGATION_TOO_DEEP, "the delegation hop count exceeds the consent's max_delegation_depth"),
    (DELEGATE_NOT_ALLOWED, "the delegated token's agent is not among the consent's allowed_delegates"),
    (USER_MISMATCH, "the token's user differs from the consent's or the parent token's user"),
    (AGENT_MISMATCH, "a direct token's agent differs from the consent's agent, or an action's agent from the token's holder"),
    (EXPIRY_EXCEEDS_PARENT, "a token expires later than its parent token or its consent"),
    (TOKEN_HASH_MISMATCH, "a resource server accepted a token whose SHA-256 differs from the issued token's"),
];

/// The reason-code table in Markdown, as `docs/REASONS.md` holds it.
pub fn markdown_table() -> String {
    let mut out = String::from(
        "# Verdict reason codes\n\n\
         Generated from `src/trust/reasons.rs` (a unit test keeps this file equal to it).\n\
         A verdict names every rule that failed, each once, in the order that event kind's\n\
         rules are checked (`src/trust/chain.rs`).\n\n\
         | code | meaning |\n| --- | --- |\n",
    );
    for (code, meaning) in ALL {
        out.push_str(&format!("| `{code}` | {meaning} |\n"));
    }
    out
}

/// The reasons a verdict collects: each code once, in the order found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reasons(Vec<&'static str>);

impl Reasons {
    /// Adds `code` unless already present.
    pub fn add(&mut self, code: &'static str) {
        if !self.0.contains(&code) {
            self.0.push(code);
        }
    }

    /// Adds `code` when `failed`.
    pub fn check(&mut self, failed: bool, code: &'static str) {
        if failed {
            self.add(code);
        }
    }

    /// No rule failed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The codes as owned strings, for a verdict.
    pub fn into_strings(self) -> Vec<String> {
        self.0.into_iter().map(str::to_owned).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_table_matches_the_code() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/REASONS.md");
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == markdown_table(),
            "docs/REASONS.md is stale; regenerate it with `cargo run -- reasons > docs/REASONS.md`"
        );
    }

    #[test]
    fn codes_are_unique_upper_case() {
        let mut seen = std::collections::HashSet::new();
        for (code, meaning) in ALL {
            assert!(seen.insert(code), "{code} listed twice");
            assert!(
                code.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "{code}"
            );
            assert!(!meaning.is_empty());
        }
    }

    #[test]
    fn reasons_keep_first_order_without_repeats() {
        let mut reasons = Reasons::default();
        reasons.add(TOKEN_EXPIRED);
        reasons.check(true, USER_MISMATCH);
        reasons.check(false, SCOPE_NOT_COVERED);
        reasons.add(TOKEN_EXPIRED);
        assert_eq!(
            reasons.into_strings(),
            vec!["TOKEN_EXPIRED", "USER_MISMATCH"]
        );
    }
}
