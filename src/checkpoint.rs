//! Checkpoints: [C2SP tlog-checkpoint](https://c2sp.org/tlog-checkpoint) bodies signed as
//! [C2SP signed notes](https://c2sp.org/signed-note) by the ledger key.
//!
//! ```text
//! <origin>\n<tree size>\n<base64 root hash>\n\n— <origin> <base64(key hash || signature)>\n
//! ```
//!
//! The note key name equals the origin. A verifier is given the key as a C2SP verifier key
//! string `<origin>+<key hash hex>+<base64(0x01 || public key)>`; checking signatures
//! ([`open`], or [`parse`] then [`CheckpointNote::verify`]) is the only way to obtain a
//! [`VerifiedCheckpoint`] ("parse, don't validate").
//!
//! While the ledger key is being rotated a note carries one signature line per ledger key
//! (the current key, then the next), all under the same name; a verifier that knows either
//! key opens it.
//!
//! Pure: no I/O, no async. Shared by the server and the offline verifier.

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use signed_note::{Note, StandardVerifier, Verifier, VerifierList};

use crate::merkle::Hash;

/// Signature algorithm byte of Ed25519 in C2SP signed notes.
const ALG_ED25519: u8 = 0x01;

/// Why a checkpoint or a verifier key was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The verifier key string is not `<name>+<hash>+<base64 key>` for an Ed25519 key.
    #[error("malformed verifier key: {0}")]
    MalformedVerifierKey(String),
    /// The origin is not a valid key name (empty, whitespace or '+').
    #[error("invalid origin {0:?}: must be non-empty, without spaces or '+'")]
    InvalidOrigin(String),
    /// The note is not a well-formed signed note.
    #[error("malformed signed note")]
    MalformedNote,
    /// The note carries no signature by the trusted key.
    #[error("checkpoint is not signed by the trusted key")]
    NotSignedByKey,
    /// A signature claiming to be by the trusted key does not verify.
    #[error("checkpoint signature does not verify")]
    BadSignature,
    /// The note's text is not a tlog-checkpoint body.
    #[error("malformed checkpoint body")]
    MalformedBody,
    /// The body's origin differs from the trusted key's name.
    #[error("checkpoint origin {found:?} differs from the key's {expected:?}")]
    OriginMismatch { expected: String, found: String },
    /// The note lacks the signature of a key that must sign it.
    #[error("checkpoint is not signed by ledger key {0}")]
    MissingSignature(String),
}

/// The checkpoint body: origin, tree size and root hash, one per line.
pub fn body(origin: &str, tree_size: u64, root: &Hash) -> String {
    use base64::Engine as _;
    format!(
        "{origin}\n{tree_size}\n{}\n",
        base64::engine::general_purpose::STANDARD.encode(root.0)
    )
}

fn encoded_public_key(key: &VerifyingKey) -> Vec<u8> {
    let mut encoded = vec![ALG_ED25519];
    encoded.extend_from_slice(key.as_bytes());
    encoded
}

/// Checks that `origin` can be a note key name and a checkpoint origin.
pub fn validate_origin(origin: &str) -> Result<(), CheckpointError> {
    if signed_note::is_key_name_valid(origin) {
        Ok(())
    } else {
        Err(CheckpointError::InvalidOrigin(origin.to_owned()))
    }
}

/// One key of a [`CheckpointSigner`] and its note key hash.
struct NoteKey {
    note_key_id: u32,
    signing_key: SigningKey,
}

/// The ledger's checkpoint signer: the origin it signs for and its Ed25519 keys (one, or two
/// while the ledger key is being rotated), each of which signs every note.
pub struct CheckpointSigner {
    origin: String,
    keys: Vec<NoteKey>,
}

impl CheckpointSigner {
    /// A signer for `origin` with `signing_key`.
    pub fn new(origin: &str, signing_key: SigningKey) -> Result<Self, CheckpointError> {
        validate_origin(origin)?;
        let mut signer = Self {
            origin: origin.to_owned(),
            keys: Vec::with_capacity(2),
        };
        signer.add_key(signing_key);
        Ok(signer)
    }

    /// The same signer with `next` signing every note too, after the keys it has (a ledger
    /// key rotation under way). A key it already has is not added twice.
    pub fn with_next(mut self, next: SigningKey) -> Self {
        if !self
            .keys
            .iter()
            .any(|k| k.signing_key.verifying_key() == next.verifying_key())
        {
            self.add_key(next);
        }
        self
    }

    fn add_key(&mut self, signing_key: SigningKey) {
        let note_key_id = note_key_id(&self.origin, &signing_key.verifying_key());
        self.keys.push(NoteKey {
            note_key_id,
            signing_key,
        });
    }

    /// The origin (and note key name).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The C2SP verifier key string of the first key (the current ledger key).
    pub fn verifier_key(&self) -> String {
        verifier_key_string(&self.origin, &self.keys[0].signing_key.verifying_key())
    }

    /// The C2SP verifier key strings of every key, in signing order.
    pub fn verifier_keys(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| verifier_key_string(&self.origin, &k.signing_key.verifying_key()))
            .collect()
    }

    /// The public keys, in signing order.
    pub fn public_keys(&self) -> Vec<[u8; 32]> {
        self.keys
            .iter()
            .map(|k| k.signing_key.verifying_key().to_bytes())
            .collect()
    }

    /// Signs the checkpoint of a tree with every key and returns the whole signed note.
    pub fn sign(&self, tree_size: u64, root: &Hash) -> String {
        use base64::Engine as _;
        let mut note = body(&self.origin, tree_size, root);
        let text_len = note.len();
        note.push('\n');
        for key in &self.keys {
            let signature = key.signing_key.sign(&note.as_bytes()[..text_len]);
            let mut sig_bytes = key.note_key_id.to_be_bytes().to_vec();
            sig_bytes.extend_from_slice(&signature.to_bytes());
            note.push_str(&format!(
                "\u{2014} {} {}\n",
                self.origin,
                base64::engine::general_purpose::STANDARD.encode(sig_bytes)
            ));
        }
        note
    }
}

/// The 4-byte note key hash of Ed25519 `key` under `name`, which names its signature lines.
pub fn note_key_id(name: &str, key: &VerifyingKey) -> u32 {
    signed_note::key_id(name, &encoded_public_key(key))
}

/// The C2SP verifier key string of an Ed25519 key under `name`.
fn verifier_key_string(name: &str, key: &VerifyingKey) -> String {
    signed_note::new_ed25519_verifier_key(name, key)
}

/// A trusted ledger key, parsed from a C2SP verifier key string.
#[derive(Clone)]
pub struct LedgerVerifier {
    inner: StandardVerifier,
    key_string: String,
    public_key: [u8; 32],
}

impl std::fmt::Debug for LedgerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key_string)
    }
}

impl LedgerVerifier {
    /// Parses `<name>+<hash>+<base64(0x01 || key)>`.
    pub fn parse(key_string: &str) -> Result<Self, CheckpointError> {
        let key_string = key_string.trim();
        let inner = StandardVerifier::new(key_string)
            .map_err(|e| CheckpointError::MalformedVerifierKey(e.to_string()))?;
        // StandardVerifier accepted `<name>+<hash>+<base64(0x01 || key)>`; keep the raw key.
        use base64::Engine as _;
        // The name and the hash hold no '+'; the base64 key may.
        let encoded = key_string.splitn(3, '+').nth(2).unwrap_or_default();
        let public_key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()
            .and_then(|bytes| match bytes.as_slice() {
                [ALG_ED25519, key @ ..] => <[u8; 32]>::try_from(key).ok(),
                _ => None,
            })
            .ok_or_else(|| CheckpointError::MalformedVerifierKey("not an Ed25519 key".into()))?;
        Ok(Self {
            inner,
            key_string: key_string.to_owned(),
            public_key,
        })
    }

    /// The verifier of Ed25519 `public_key` under the name `origin`.
    pub fn from_public_key(origin: &str, public_key: &[u8; 32]) -> Result<Self, CheckpointError> {
        validate_origin(origin)?;
        let key = VerifyingKey::from_bytes(public_key)
            .map_err(|_| CheckpointError::MalformedVerifierKey("not an Ed25519 key".into()))?;
        Self::parse(&verifier_key_string(origin, &key))
    }

    /// The key name, which is the ledger's origin.
    pub fn origin(&self) -> &str {
        self.inner.name()
    }

    /// The verifier key string.
    pub fn key_string(&self) -> &str {
        &self.key_string
    }

    /// The ledger's Ed25519 public key (which also signs the genesis).
    pub fn public_key(&self) -> &[u8; 32] {
        &self.public_key
    }
}

/// A checkpoint whose signature by the trusted key has been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedCheckpoint {
    origin: String,
    tree_size: u64,
    root: Hash,
    note: String,
}

impl VerifiedCheckpoint {
    /// The log's origin.
    pub fn origin(&self) -> &str {
        &self.origin
    }
    /// Number of entries the checkpoint commits to.
    pub fn tree_size(&self) -> u64 {
        self.tree_size
    }
    /// Root hash of those entries.
    pub fn root(&self) -> Hash {
        self.root
    }
    /// The signed note as given.
    pub fn note(&self) -> &str {
        &self.note
    }
}

/// Parses a signed checkpoint note and verifies its signature by `key` (other signatures
/// are ignored).
pub fn open(note: &str, key: &LedgerVerifier) -> Result<VerifiedCheckpoint, CheckpointError> {
    parse(note)?.verify(std::slice::from_ref(key))
}

/// Parses a signed checkpoint note without checking any signature yet.
pub fn parse(note: &str) -> Result<CheckpointNote, CheckpointError> {
    let parsed = Note::from_bytes(note.as_bytes()).map_err(|_| CheckpointError::MalformedNote)?;
    Ok(CheckpointNote {
        parsed,
        note: note.to_owned(),
    })
}

/// A well-formed signed note whose signatures have not been checked: nothing it says is
/// trusted until [`verify`](Self::verify) returns a [`VerifiedCheckpoint`].
#[derive(Debug)]
pub struct CheckpointNote {
    parsed: Note,
    note: String,
}

impl CheckpointNote {
    /// The checkpoint body, unverified: for a caller that must replay entries before it knows
    /// which keys to check the signatures with.
    pub fn unverified_body(&self) -> Result<(String, u64, Hash), CheckpointError> {
        let checkpoint = tlog_tiles::Checkpoint::from_bytes(self.parsed.text())
            .map_err(|_| CheckpointError::MalformedBody)?;
        Ok((
            checkpoint.origin().to_owned(),
            checkpoint.size(),
            *checkpoint.hash(),
        ))
    }

    /// Checks that the note carries a valid signature by every one of `keys` (at least one,
    /// all named by the checkpoint's origin; signatures by other keys are ignored) and
    /// returns the checkpoint. [`CheckpointError::NotSignedByKey`] means a single key did not
    /// sign it, [`CheckpointError::MissingSignature`] that one of several did not.
    pub fn verify(&self, keys: &[LedgerVerifier]) -> Result<VerifiedCheckpoint, CheckpointError> {
        let Some(first) = keys.first() else {
            return Err(CheckpointError::NotSignedByKey);
        };
        let mut distinct: Vec<&LedgerVerifier> = Vec::with_capacity(keys.len());
        for key in keys {
            if !distinct.iter().any(|k| k.key_string == key.key_string) {
                distinct.push(key);
            }
        }
        let verifiers = VerifierList::new(
            distinct
                .iter()
                .map(|key| Box::new(key.inner.clone()) as Box<dyn Verifier>)
                .collect(),
        );
        let (verified, _) = self.parsed.verify(&verifiers).map_err(|e| match e {
            signed_note::NoteError::InvalidSignature { .. } => CheckpointError::BadSignature,
            _ if distinct.len() > 1 => {
                CheckpointError::MissingSignature(first.key_string().to_owned())
            }
            _ => CheckpointError::NotSignedByKey,
        })?;
        for key in &distinct {
            let id = key.inner.key_id();
            if !verified
                .iter()
                .any(|sig| sig.name() == key.origin() && sig.id() == id)
            {
                return Err(if distinct.len() == 1 {
                    CheckpointError::NotSignedByKey
                } else {
                    CheckpointError::MissingSignature(key.key_string().to_owned())
                });
            }
        }
        let (origin, tree_size, root) = self.unverified_body()?;
        if let Some(key) = keys.iter().find(|key| key.origin() != origin) {
            return Err(CheckpointError::OriginMismatch {
                expected: key.origin().to_owned(),
                found: origin,
            });
        }
        Ok(VerifiedCheckpoint {
            origin,
            tree_size,
            root,
            note: self.note.clone(),
        })
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_vectors::{hex_field, load};

    fn vector_signer() -> (serde_json::Value, CheckpointSigner) {
        let v = load("checkpoint.json");
        let seed: [u8; 32] = hex_field(&v, "seed").try_into().unwrap();
        let signer =
            CheckpointSigner::new(v["origin"].as_str().unwrap(), SigningKey::from_bytes(&seed))
                .unwrap();
        (v, signer)
    }

    #[test]
    fn reproduces_checkpoint_vector() {
        let (v, signer) = vector_signer();
        let root = Hash(hex_field(&v, "root_hash").try_into().unwrap());
        let size = v["tree_size"].as_u64().unwrap();
        assert_eq!(
            body(signer.origin(), size, &root),
            v["body"].as_str().unwrap()
        );
        assert_eq!(signer.sign(size, &root), v["note"].as_str().unwrap());
        assert_eq!(signer.verifier_key(), v["verifier_key"].as_str().unwrap());
    }

    #[test]
    fn opens_vector_note() {
        let v = load("checkpoint.json");
        let key = LedgerVerifier::parse(v["verifier_key"].as_str().unwrap()).unwrap();
        let checkpoint = open(v["note"].as_str().unwrap(), &key).unwrap();
        assert_eq!(checkpoint.origin(), v["origin"].as_str().unwrap());
        assert_eq!(checkpoint.tree_size(), v["tree_size"].as_u64().unwrap());
        assert_eq!(checkpoint.root().0.to_vec(), hex_field(&v, "root_hash"));
        let seed: [u8; 32] = hex_field(&v, "seed").try_into().unwrap();
        assert_eq!(
            key.public_key(),
            SigningKey::from_bytes(&seed).verifying_key().as_bytes()
        );
    }

    #[test]
    fn verifier_keys_whose_base64_holds_a_plus_keep_their_public_key() {
        // Regression: the key's base64 may contain '+', the field separator.
        let (seed, signer) = (0u8..=255)
            .map(|i| {
                (
                    i,
                    CheckpointSigner::new("o", SigningKey::from_bytes(&[i; 32])).unwrap(),
                )
            })
            .find(|(_, s)| {
                s.verifier_key()
                    .splitn(3, '+')
                    .nth(2)
                    .unwrap()
                    .contains('+')
            })
            .expect("some seed gives a '+' in base64");
        let key = LedgerVerifier::parse(&signer.verifier_key()).unwrap();
        assert_eq!(
            key.public_key(),
            SigningKey::from_bytes(&[seed; 32])
                .verifying_key()
                .as_bytes()
        );
    }

    #[test]
    fn refuses_altered_notes_and_other_keys() {
        let (v, signer) = vector_signer();
        let key = LedgerVerifier::parse(&signer.verifier_key()).unwrap();
        let note = v["note"].as_str().unwrap();
        // Altered tree size.
        let altered = note.replacen("\n8\n", "\n9\n", 1);
        assert_eq!(open(&altered, &key), Err(CheckpointError::BadSignature));
        // Signed by another key under the same name.
        let other =
            CheckpointSigner::new(signer.origin(), SigningKey::from_bytes(&[5; 32])).unwrap();
        let forged = other.sign(8, &Hash([0; 32]));
        assert_eq!(open(&forged, &key), Err(CheckpointError::NotSignedByKey));
        // Garbage.
        assert_eq!(open("nonsense", &key), Err(CheckpointError::MalformedNote));
        assert!(LedgerVerifier::parse("not+a+key").is_err());
        assert!(CheckpointSigner::new("has space", SigningKey::from_bytes(&[1; 32])).is_err());
    }

    #[test]
    fn a_signer_with_a_next_key_signs_with_both_and_either_key_opens_the_note() {
        let old = SigningKey::from_bytes(&[1; 32]);
        let new = SigningKey::from_bytes(&[2; 32]);
        let signer = CheckpointSigner::new("example.com/log", old.clone())
            .unwrap()
            .with_next(new.clone())
            // Adding a key it already has changes nothing.
            .with_next(old.clone());
        assert_eq!(signer.verifier_keys().len(), 2);
        assert_eq!(signer.verifier_key(), signer.verifier_keys()[0]);
        assert_eq!(
            signer.public_keys(),
            vec![
                old.verifying_key().to_bytes(),
                new.verifying_key().to_bytes()
            ]
        );
        let root = Hash([7; 32]);
        let note = signer.sign(42, &root);
        assert_eq!(note.matches('\u{2014}').count(), 2, "{note}");
        let keys: Vec<LedgerVerifier> = signer
            .verifier_keys()
            .iter()
            .map(|k| LedgerVerifier::parse(k).unwrap())
            .collect();
        for key in &keys {
            let opened = open(&note, key).unwrap();
            assert_eq!((opened.tree_size(), opened.root()), (42, root));
        }
        // Both at once, in either order, and a key given twice.
        let both = [keys[1].clone(), keys[0].clone(), keys[1].clone()];
        assert_eq!(parse(&note).unwrap().verify(&both).unwrap().tree_size(), 42);
        // A note by the old key alone lacks the new key's signature.
        let old_only = CheckpointSigner::new("example.com/log", old)
            .unwrap()
            .sign(42, &root);
        assert_eq!(
            parse(&old_only).unwrap().verify(&keys),
            Err(CheckpointError::MissingSignature(
                keys[1].key_string().to_owned()
            ))
        );
        assert_eq!(
            open(&old_only, &keys[1]),
            Err(CheckpointError::NotSignedByKey)
        );
        assert_eq!(
            parse(&note).unwrap().verify(&[]),
            Err(CheckpointError::NotSignedByKey)
        );
        // One altered signature fails the note even for the other key's holder.
        let other = CheckpointSigner::new("example.com/log", new)
            .unwrap()
            .sign(43, &root);
        let (kept, _) = note.trim_end().rsplit_once('\n').unwrap();
        let forged = format!(
            "{kept}\n{}\n",
            other.trim_end().rsplit_once('\n').unwrap().1
        );
        assert_eq!(open(&forged, &keys[0]).unwrap().tree_size(), 42);
        assert_eq!(open(&forged, &keys[1]), Err(CheckpointError::BadSignature));
    }

    #[test]
    fn verifiers_are_made_from_public_keys_as_from_key_strings() {
        let (_, signer) = vector_signer();
        let public = signer.public_keys()[0];
        let made = LedgerVerifier::from_public_key(signer.origin(), &public).unwrap();
        assert_eq!(made.key_string(), signer.verifier_key());
        assert_eq!(made.public_key(), &public);
        assert!(LedgerVerifier::from_public_key("has space", &public).is_err());
    }
}
