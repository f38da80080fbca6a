//! Hostile input (issue #6): arbitrary and mutated verifier key strings
//! ([`LedgerVerifier::parse`]) and checkpoint notes ([`open`]), and bodies of every shape
//! validly signed by the trusted key (so the tlog-checkpoint parser behind the signature
//! check is reached too). Never a panic; always a [`CheckpointError`]; and whatever opens
//! says exactly what the trusted key signed.

use base64::Engine as _;
use ed25519_dalek::Signer as _;
use proptest::prelude::*;

use super::*;
use crate::mutate::{apply, mutations};

const ORIGIN: &str = "example.com/ledger";

fn signer() -> CheckpointSigner {
    CheckpointSigner::new(ORIGIN, SigningKey::from_bytes(&[11; 32])).unwrap()
}

fn verifier() -> LedgerVerifier {
    LedgerVerifier::parse(&signer().verifier_key()).unwrap()
}

/// Signs `text` as a note by the ledger key, whatever it says (what only the key's holder
/// can do).
fn sign_text(signer: &CheckpointSigner, text: &str) -> String {
    let key = &signer.keys[0];
    let signature = key.signing_key.sign(text.as_bytes());
    let mut sig_bytes = key.note_key_id.to_be_bytes().to_vec();
    sig_bytes.extend_from_slice(&signature.to_bytes());
    format!(
        "{text}\n\u{2014} {} {}\n",
        signer.origin,
        base64::engine::general_purpose::STANDARD.encode(sig_bytes)
    )
}

/// Checkpoint-like bodies: origin, size and hash lines of every shape, maybe extensions.
fn bodies() -> impl Strategy<Value = String> {
    let origin = prop_oneof![3 => Just(ORIGIN.to_owned()), 1 => "\\PC{0,20}"];
    let size = prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        "[-+0-9 ]{0,24}",
        "\\PC{0,8}",
    ];
    let hash = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40)
            .prop_map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
        "[A-Za-z0-9+/=]{0,50}",
    ];
    let extensions = prop::collection::vec("\\PC{0,12}", 0..3);
    (origin, size, hash, extensions).prop_map(|(origin, size, hash, extensions)| {
        let mut text = format!("{origin}\n{size}\n{hash}\n");
        for line in extensions {
            text.push_str(&line);
            text.push('\n');
        }
        text
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary strings, and strings shaped like `<name>+<hash>+<base64>`: a verifier key
    /// or a [`CheckpointError::MalformedVerifierKey`]; what parses parses again the same.
    #[test]
    fn arbitrary_verifier_keys_parse_or_fail_typed(
        text in prop_oneof![
            "\\PC{0,80}",
            "[a-z./]{0,10}\\+[0-9a-f]{0,9}\\+[A-Za-z0-9+/=]{0,48}",
        ],
    ) {
        match LedgerVerifier::parse(&text) {
            Ok(key) => {
                let again = LedgerVerifier::parse(key.key_string()).unwrap();
                prop_assert_eq!(again.public_key(), key.public_key());
                prop_assert_eq!(again.origin(), key.origin());
            }
            Err(error) => prop_assert!(
                matches!(error, CheckpointError::MalformedVerifierKey(_)),
                "{:?}", error
            ),
        }
    }

    /// A valid verifier key string, mutated: refused, or (an edit the format ignores, such as
    /// surrounding white space) the very same key. The key hash covers the name and the key,
    /// so a changed name or key cannot pass unless 32 hash bits collide.
    #[test]
    fn mutated_verifier_keys_are_the_same_key_or_refused(edits in mutations(3)) {
        let original = signer().verifier_key();
        let bytes = apply(original.as_bytes(), &edits);
        let text = String::from_utf8_lossy(&bytes);
        match LedgerVerifier::parse(&text) {
            Ok(key) => {
                prop_assert_eq!(key.origin(), ORIGIN);
                let expected = verifier();
                prop_assert_eq!(key.public_key(), expected.public_key());
            }
            Err(error) => prop_assert!(
                matches!(error, CheckpointError::MalformedVerifierKey(_)),
                "{:?}", error
            ),
        }
    }

    /// Arbitrary text is never a checkpoint signed by the trusted key.
    #[test]
    fn arbitrary_notes_do_not_open(text in prop_oneof![
        "\\PC{0,200}",
        "[a-z]{0,5}\n[0-9]{0,3}\n[A-Za-z0-9+/=]{0,44}\n\n\u{2014} [a-z./]{0,20} [A-Za-z0-9+/=]{0,100}\n",
    ]) {
        prop_assert!(open(&text, &verifier()).is_err());
    }

    /// A signed checkpoint, mutated: refused with a [`CheckpointError`], or it says exactly
    /// what was signed (an edit outside the signed text, e.g. a signature line by an unknown
    /// key, may be ignored).
    #[test]
    fn mutated_notes_open_to_the_signed_checkpoint_or_fail(
        tree_size in any::<u64>(),
        root in any::<[u8; 32]>(),
        edits in mutations(4),
    ) {
        let note = signer().sign(tree_size, &Hash(root));
        let bytes = apply(note.as_bytes(), &edits);
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(checkpoint) = open(&text, &verifier()) {
            prop_assert_eq!(checkpoint.origin(), ORIGIN);
            prop_assert_eq!(checkpoint.tree_size(), tree_size);
            prop_assert_eq!(checkpoint.root(), Hash(root));
        }
    }

    /// Every checkpoint the signer makes opens to exactly its size and root.
    #[test]
    fn signed_checkpoints_open_to_what_was_signed(tree_size in any::<u64>(), root in any::<[u8; 32]>()) {
        let checkpoint = open(&signer().sign(tree_size, &Hash(root)), &verifier()).unwrap();
        prop_assert_eq!(checkpoint.tree_size(), tree_size);
        prop_assert_eq!(checkpoint.root(), Hash(root));
    }

    /// Bodies of every shape, validly signed by the trusted key, reach the checkpoint-body
    /// parser: a checkpoint of the key's origin, or a [`CheckpointError`] (never a panic).
    #[test]
    fn signed_bodies_of_any_shape_parse_or_fail_typed(text in bodies()) {
        let note = sign_text(&signer(), &text);
        match open(&note, &verifier()) {
            Ok(checkpoint) => {
                prop_assert_eq!(checkpoint.origin(), ORIGIN);
                let first_line = format!("{ORIGIN}\n");
                prop_assert!(text.starts_with(&first_line));
            }
            Err(error) => prop_assert!(matches!(
                error,
                CheckpointError::MalformedNote
                    | CheckpointError::MalformedBody
                    | CheckpointError::OriginMismatch { .. }
            ), "{:?}", error),
        }
    }
}
