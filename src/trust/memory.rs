//! An in-memory [`TrustView`]: what the offline verifier builds while replaying, and what the
//! rules' tests use.

use std::collections::HashMap;
use std::sync::Arc;

use super::{
    ConsentRecord, KeyRecord, ReplayState, StateChange, StateDelta, TokenRecord, TrustView,
    ViewError,
};

/// The whole trust state in memory.
#[derive(Debug, Default, Clone)]
pub struct MemoryState {
    keys: HashMap<String, KeyRecord>,
    consents: HashMap<String, Arc<ConsentRecord>>,
    tokens: HashMap<String, Arc<TokenRecord>>,
    /// First 16 bytes of SHA-256 of every event id recorded through [`ReplayState`].
    event_ids: std::collections::HashSet<[u8; 16]>,
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
                    self.consents.insert(consent_id, Arc::new(record));
                }
                StateChange::PutToken { token_id, record } => {
                    self.tokens.insert(token_id, Arc::new(record));
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
            self.consents
                .into_iter()
                .map(|(id, record)| (id, Arc::unwrap_or_clone(record)))
                .collect(),
            self.tokens
                .into_iter()
                .map(|(id, record)| (id, Arc::unwrap_or_clone(record)))
                .collect(),
        )
    }
}

impl TrustView for MemoryState {
    fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, ViewError> {
        Ok(self.keys.get(key_id).cloned())
    }
    fn consent(&self, consent_id: &str) -> Result<Option<Arc<ConsentRecord>>, ViewError> {
        Ok(self.consents.get(consent_id).cloned())
    }
    fn token(&self, token_id: &str) -> Result<Option<Arc<TokenRecord>>, ViewError> {
        Ok(self.tokens.get(token_id).cloned())
    }
}

impl ReplayState for MemoryState {
    fn apply_delta(&mut self, delta: StateDelta) -> Result<(), ViewError> {
        self.apply(delta);
        Ok(())
    }

    fn first_sighting(&mut self, event_id: &str) -> Result<bool, ViewError> {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(event_id.as_bytes());
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&digest[..16]);
        Ok(self.event_ids.insert(prefix))
    }
}
