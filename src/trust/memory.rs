//! An in-memory [`TrustView`]: what the offline verifier builds while replaying, and what the
//! rules' tests use.

use std::collections::HashMap;

use super::{ConsentRecord, KeyRecord, StateChange, TokenRecord, TrustView, ViewError};

/// The whole trust state in memory.
#[derive(Debug, Default, Clone)]
pub struct MemoryState {
    keys: HashMap<String, KeyRecord>,
    consents: HashMap<String, ConsentRecord>,
    tokens: HashMap<String, TokenRecord>,
}

impl MemoryState {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies an accepted event's changes.
    pub fn apply(&mut self, delta: impl IntoIterator<Item = StateChange>) {
        for change in delta {
            match change {
                StateChange::PutKey { key_id, record } => {
                    self.keys.insert(key_id, record);
                }
                StateChange::PutConsent { consent_id, record } => {
                    self.consents.insert(consent_id, record);
                }
                StateChange::PutToken { token_id, record } => {
                    self.tokens.insert(token_id, record);
                }
            }
        }
    }
}

/// Every record a [`MemoryState`] holds, by kind.
pub type StateParts = (
    Vec<(String, KeyRecord)>,
    Vec<(String, ConsentRecord)>,
    Vec<(String, TokenRecord)>,
);

impl MemoryState {
    /// Every record held, by kind (for writing them out).
    pub fn into_parts(self) -> StateParts {
        (
            self.keys.into_iter().collect(),
            self.consents.into_iter().collect(),
            self.tokens.into_iter().collect(),
        )
    }
}

impl TrustView for MemoryState {
    fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, ViewError> {
        Ok(self.keys.get(key_id).cloned())
    }
    fn consent(&self, consent_id: &str) -> Result<Option<ConsentRecord>, ViewError> {
        Ok(self.consents.get(consent_id).cloned())
    }
    fn token(&self, token_id: &str) -> Result<Option<TokenRecord>, ViewError> {
        Ok(self.tokens.get(token_id).cloned())
    }
}
