//! Hostile input (issue #6), whole pipelines: mutated exports through the offline verifier,
//! mutated entries and trace bundles through their decoders and verifiers, and mutated or
//! re-signed events through the ledger's append pipeline. Never a panic, always a typed
//! error, and a clean verification only of what the ledger key signed and the tree hashed.
//!
//! The ledgers here run in-process without a server (the library's `Ledger`, as the service
//! drives it): these properties are about the bytes, and each case appends a batch.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

use custody::checkpoint::LedgerVerifier;
use custody::export;
use custody::inspect;
use custody::ledger::{self, GenesisParams, Ledger};
use custody::proto::{event::Body, Event, KeyRevocation, Role, SignedEvent, TraceBundle};
use custody::store::{Store, StoreError};
use custody::verify::{self, IntegrityFailure, LedgerReport, TraceError, TraceReport};
use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};
use prost::Message as _;

use crate::support::scenario::*;
use crate::support::*;

// The byte mutations the library's own property tests use.
#[path = "../../src/mutate.rs"]
#[allow(dead_code)]
mod mutate;
use mutate::{apply, mutations};

const ORIGIN: &str = "hostile.example/ledger";
const SERVER: &str = "mail.example";
const AGENT: &str = "mail-assistant";

fn ledger_key() -> SigningKey {
    key(2)
}

/// A new in-process ledger in `dir` whose admin is `key(1)`.
fn new_ledger(dir: &std::path::Path) -> Ledger {
    let params = GenesisParams {
        origin: ORIGIN.into(),
        admin_public_key: key(1).verifying_key().to_bytes(),
        max_clock_skew_ms: 60_000,
    };
    Ledger::create(Store::open(dir).unwrap(), ledger_key(), &params).unwrap()
}

/// Who signs what in these ledgers: the admin, a user, an issuer and a resource server.
fn signers() -> Vec<SigningKey> {
    vec![key(1), user("alice"), issuer(), server(SERVER)]
}

/// Appends `events`, expecting every one accepted.
fn append_all(ledger: &Ledger, events: Vec<(SigningKey, Event)>) {
    let signed = events.iter().map(|(k, e)| sign(k, e)).collect();
    for outcome in ledger.append_batch(signed).unwrap() {
        outcome.unwrap();
    }
}

/// Registers the users' keys: after this, `templates` are accepted.
fn register(ledger: &Ledger) {
    let admin = key(1);
    append_all(
        ledger,
        vec![
            (
                admin.clone(),
                key_grant("grant-issuer", &issuer(), Role::Issuer, "auth.example"),
            ),
            (
                admin.clone(),
                key_grant("grant-alice", &user("alice"), Role::User, "alice"),
            ),
            (
                admin,
                key_grant(
                    "grant-server",
                    &server(SERVER),
                    Role::ResourceServer,
                    SERVER,
                ),
            ),
        ],
    );
}

/// One event of every kind a client sends, with ids made unique by `tag`, each with its
/// natural signer; in this order they are all accepted by a ledger after [`register`].
fn templates(tag: &str) -> Vec<(SigningKey, Event)> {
    let (consent, token) = (format!("c-{tag}"), format!("t-{tag}"));
    let id = |what: &str| format!("{what}-{tag}");
    vec![
        (
            user("alice"),
            event(&id("consent"), consent_body(&consent, "alice", AGENT, 1)),
        ),
        (
            issuer(),
            event(
                &id("issue"),
                issuance(&token, &consent, "", "alice", AGENT, &["mail:read"], 1),
            ),
        ),
        (
            server(SERVER),
            event(&id("validate"), validation(&token, SERVER, true)),
        ),
        (
            server(SERVER),
            event(&id("act"), action(&token, SERVER, "mail:read")),
        ),
        (
            server(SERVER),
            event(&id("deny"), denial(&token, SERVER, AGENT)),
        ),
        (issuer(), event(&id("revoke"), revoke_token(&token))),
        // A violation: the token is revoked.
        (
            server(SERVER),
            event(&id("act-late"), action(&token, SERVER, "mail:read")),
        ),
        (
            key(1),
            key_grant(&id("grant"), &key(60), Role::Agent, &id("agent")),
        ),
        (
            key(1),
            event(
                &id("retire"),
                Body::KeyRevocation(KeyRevocation {
                    key_id: key_id(&key(60)),
                    reason: "rotated".into(),
                }),
            ),
        ),
    ]
}

/// The stored entries up to the newest checkpoint, and the export of them.
fn export_of(ledger: &Ledger) -> (Vec<Vec<u8>>, Vec<u8>) {
    let head = ledger.head();
    let entries: Vec<Vec<u8>> = ledger
        .store()
        .entries(0, head.tree_size)
        .map(|item| item.unwrap().1)
        .collect();
    let mut bytes = Vec::new();
    export::write_header(&mut bytes, &head.checkpoint).unwrap();
    for entry in &entries {
        export::write_record(&mut bytes, entry).unwrap();
    }
    (entries, bytes)
}

fn verify_bytes(bytes: &[u8], key: &LedgerVerifier) -> Result<LedgerReport, IntegrityFailure> {
    verify::verify_export(bytes, key, None, |_, _| {}).expect("reading from memory cannot fail")
}

/// A small ledger of every event kind, exported, with a trace bundle of its first action.
struct Fixture {
    key: LedgerVerifier,
    note: String,
    entries: Vec<Vec<u8>>,
    export: Vec<u8>,
    report: LedgerReport,
    bundle: Vec<u8>,
    trace: TraceReport,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let ledger = new_ledger(dir.path());
        register(&ledger);
        append_all(&ledger, templates("a"));
        let key = LedgerVerifier::parse(&ledger.verifier_key()).unwrap();
        let (entries, export) = export_of(&ledger);
        let report = verify_bytes(&export, &key).unwrap();
        assert_eq!(report.violations_total, 1, "{report:?}");
        // The first action: genesis, 3 grants, consent, issuance, validation, then it.
        let bundle = custody::service::read::trace(&ledger, 7).unwrap();
        let trace = verify::verify_trace_bundle(&bundle, &key).unwrap();
        Fixture {
            note: ledger.head().checkpoint,
            key,
            entries,
            export,
            report,
            bundle: bundle.encode_to_vec(),
            trace,
        }
    })
}

/// A verified trace report tells the truth about the fixture's ledger: the tree it was
/// checked against, the verdict recorded in the entry it names (which need not be the entry
/// the bundle was made for: the bundle's `seq` is not signed, and a bundle proves every
/// entry it carries), and only entries the ledger stored.
fn check_trace_report(report: &TraceReport, bundle: &TraceBundle) -> Result<(), TestCaseError> {
    let fixture = fixture();
    prop_assert_eq!(report.tree_size, fixture.trace.tree_size);
    let stored = fixture.entries.get(report.seq as usize);
    prop_assert!(stored.is_some(), "{:?}", report);
    let entry = custody::proto::Entry::decode(stored.unwrap().as_slice()).unwrap();
    prop_assert_eq!(entry.verdict.as_ref(), Some(&report.verdict));
    for stored in &bundle.entries {
        prop_assert!(fixture.entries.contains(&stored.entry));
    }
    Ok(())
}

#[test]
fn the_fixture_verifies() {
    let fixture = fixture();
    assert_eq!(fixture.report.tree_size, fixture.entries.len() as u64);
    assert_eq!(fixture.trace.seq, 7);
    assert_eq!(fixture.report.actions, 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// A mutated export verifies clean only if it still holds the very entries and the very
    /// checkpoint the ledger signed (an export's varints may be re-encoded, and a signature
    /// line by an unknown key is ignored); anything else is an [`IntegrityFailure`].
    #[test]
    fn mutated_exports_verify_only_as_what_was_signed(edits in mutations(4)) {
        let fixture = fixture();
        let bytes = apply(&fixture.export, &edits);
        if let Ok(report) = verify_bytes(&bytes, &fixture.key) {
            prop_assert_eq!(&report, &fixture.report);
            let (mut reader, _) = export::ExportReader::open(bytes.as_slice()).unwrap();
            for entry in &fixture.entries {
                let read = reader.next_entry().unwrap();
                prop_assert_eq!(read.as_ref(), Some(entry));
            }
            prop_assert_eq!(reader.next_entry().unwrap(), None);
        }
    }

    /// Arbitrary bytes after a header, or after the fixture's header and checkpoint.
    #[test]
    fn arbitrary_exports_fail(
        after_note in any::<bool>(),
        tail in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let fixture = fixture();
        let mut bytes = Vec::new();
        if after_note {
            export::write_header(&mut bytes, &fixture.note).unwrap();
        } else {
            bytes.extend_from_slice(export::HEADER);
        }
        bytes.extend_from_slice(&tail);
        prop_assert!(verify_bytes(&bytes, &fixture.key).is_err());
    }

    /// One stored entry mutated: it decodes or is reported corrupt, renders as JSON, and
    /// the ledger around it verifies only if its bytes are unchanged.
    #[test]
    fn a_mutated_entry_is_caught_unless_unchanged(which in any::<Index>(), edits in mutations(4)) {
        let fixture = fixture();
        let seq = which.index(fixture.entries.len());
        let mutated = apply(&fixture.entries[seq], &edits);
        match ledger::decode_entry(seq as u64, &mutated) {
            Ok(_) => {}
            Err(error) => prop_assert!(matches!(error, StoreError::Corrupt(_)), "{:?}", error),
        }
        prop_assert!(inspect::entry_json(&mutated).is_object());
        let mut entries = fixture.entries.clone();
        entries[seq] = mutated.clone();
        let outcome = verify::verify_entries(
            &fixture.note,
            entries.into_iter().map(Ok::<_, std::convert::Infallible>),
            &fixture.key,
            None,
            custody::trust::MemoryState::new(),
            |_, _| {},
        )
        .unwrap();
        prop_assert_eq!(outcome.is_ok(), mutated == fixture.entries[seq], "{:?}", outcome);
    }

    /// A mutated trace bundle: it does not decode, or it verifies to a true report (see
    /// [`check_trace_report`]), or it fails with a [`TraceError`].
    #[test]
    fn mutated_trace_bundles_verify_only_as_what_was_signed(edits in mutations(4)) {
        let fixture = fixture();
        let bytes = apply(&fixture.bundle, &edits);
        let Ok(bundle) = TraceBundle::decode(bytes.as_slice()) else {
            return Ok(());
        };
        if let Ok(report) = verify::verify_trace_bundle(&bundle, &fixture.key) {
            check_trace_report(&report, &bundle)?;
        }
    }

    /// Arbitrary bytes as a trace bundle: no decode, or a [`TraceError`].
    #[test]
    fn arbitrary_trace_bundles_fail(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(bundle) = TraceBundle::decode(bytes.as_slice()) {
            let outcome: Result<TraceReport, TraceError> =
                verify::verify_trace_bundle(&bundle, &fixture().key);
            prop_assert!(outcome.is_err());
        }
    }
}

/// A change to a trace bundle's structure (entries, proofs, the seq it names): deeper than
/// byte mutations reach, since the result still decodes.
#[derive(Debug, Clone)]
enum BundleEdit {
    DropEntry(Index),
    DropProof(Index),
    DuplicateEntry(Index),
    SwapEntries(Index, Index),
    SwapProofs(Index, Index),
    TraceSeq(u64),
    ProofSeq(Index, u64),
    ProofTreeSize(Index, u64),
    DropHash(Index, Index),
    DropVerdict,
}

fn bundle_edit() -> impl Strategy<Value = BundleEdit> {
    let small = prop_oneof![0u64..16, any::<u64>()];
    prop_oneof![
        any::<Index>().prop_map(BundleEdit::DropEntry),
        any::<Index>().prop_map(BundleEdit::DropProof),
        any::<Index>().prop_map(BundleEdit::DuplicateEntry),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| BundleEdit::SwapEntries(a, b)),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| BundleEdit::SwapProofs(a, b)),
        small.clone().prop_map(BundleEdit::TraceSeq),
        (any::<Index>(), small.clone()).prop_map(|(i, seq)| BundleEdit::ProofSeq(i, seq)),
        (any::<Index>(), small).prop_map(|(i, size)| BundleEdit::ProofTreeSize(i, size)),
        (any::<Index>(), any::<Index>()).prop_map(|(i, h)| BundleEdit::DropHash(i, h)),
        Just(BundleEdit::DropVerdict),
    ]
}

fn edit_bundle(bundle: &mut TraceBundle, edit: &BundleEdit) {
    let pick = |at: &Index, len: usize| (len > 0).then(|| at.index(len));
    let entries = bundle.entries.len();
    let proofs = bundle.proofs.len();
    match edit {
        BundleEdit::DropEntry(at) => {
            if let Some(i) = pick(at, entries) {
                bundle.entries.remove(i);
            }
        }
        BundleEdit::DropProof(at) => {
            if let Some(i) = pick(at, proofs) {
                bundle.proofs.remove(i);
            }
        }
        BundleEdit::DuplicateEntry(at) => {
            if let (Some(i), Some(j)) = (pick(at, entries), pick(at, proofs)) {
                bundle.entries.push(bundle.entries[i].clone());
                bundle.proofs.push(bundle.proofs[j].clone());
            }
        }
        BundleEdit::SwapEntries(a, b) => {
            if let (Some(i), Some(j)) = (pick(a, entries), pick(b, entries)) {
                bundle.entries.swap(i, j);
            }
        }
        BundleEdit::SwapProofs(a, b) => {
            if let (Some(i), Some(j)) = (pick(a, proofs), pick(b, proofs)) {
                bundle.proofs.swap(i, j);
            }
        }
        BundleEdit::TraceSeq(seq) => bundle.seq = *seq,
        BundleEdit::ProofSeq(at, seq) => {
            if let Some(i) = pick(at, proofs) {
                bundle.proofs[i].seq = *seq;
            }
        }
        BundleEdit::ProofTreeSize(at, size) => {
            if let Some(i) = pick(at, proofs) {
                bundle.proofs[i].tree_size = *size;
            }
        }
        BundleEdit::DropHash(at, hash) => {
            if let Some(i) = pick(at, proofs) {
                let hashes = &mut bundle.proofs[i].hashes;
                if let Some(h) = pick(hash, hashes.len()) {
                    hashes.remove(h);
                }
            }
        }
        BundleEdit::DropVerdict => bundle.verdict = None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// A trace bundle whose structure was changed: it verifies to a true report (see
    /// [`check_trace_report`]), or fails with a [`TraceError`].
    #[test]
    fn restructured_trace_bundles_verify_only_as_what_was_signed(
        edits in prop::collection::vec(bundle_edit(), 1..4),
    ) {
        let fixture = fixture();
        let mut bundle = TraceBundle::decode(fixture.bundle.as_slice()).unwrap();
        for edit in &edits {
            edit_bundle(&mut bundle, edit);
        }
        if let Ok(report) = verify::verify_trace_bundle(&bundle, &fixture.key) {
            check_trace_report(&report, &bundle)?;
        }
    }

    /// The previous checkpoint an auditor hands in (`--previous-checkpoint`), mutated: it
    /// opens to the signed one (and the export extends it), or it is reported as a bad
    /// previous checkpoint.
    #[test]
    fn mutated_previous_checkpoints_open_as_signed_or_fail(edits in mutations(4)) {
        let fixture = fixture();
        let previous = String::from_utf8_lossy(&apply(fixture.note.as_bytes(), &edits)).into_owned();
        let outcome = verify::verify_export(
            fixture.export.as_slice(),
            &fixture.key,
            Some(&previous),
            |_, _| {},
        )
        .unwrap();
        match outcome {
            Ok(report) => prop_assert_eq!(report.extends_previous, Some(fixture.report.tree_size)),
            Err(failure) => prop_assert!(
                matches!(failure, IntegrityFailure::PreviousCheckpoint(_)),
                "{:?}", failure
            ),
        }
    }
}

/// What one case submits: a template event as it is, its envelope's bytes mutated (so the
/// signature no longer matches, most of the time), or its payload mutated and signed again
/// by its own signer or another registered key (so it reaches the rules).
#[derive(Debug, Clone)]
enum Submission {
    Plain {
        template: Index,
    },
    Envelope {
        template: Index,
        edits: Vec<mutate::Mutation>,
    },
    Resigned {
        template: Index,
        signer: Option<Index>,
        edits: Vec<mutate::Mutation>,
    },
}

fn submission() -> impl Strategy<Value = Submission> {
    prop_oneof![
        1 => any::<Index>().prop_map(|template| Submission::Plain { template }),
        1 => (any::<Index>(), mutations(2))
            .prop_map(|(template, edits)| Submission::Envelope { template, edits }),
        4 => (any::<Index>(), prop::option::weighted(0.25, any::<Index>()), mutations(2))
            .prop_map(|(template, signer, edits)| Submission::Resigned { template, signer, edits }),
    ]
}

fn submit(submission: &Submission, tag: &str) -> Option<SignedEvent> {
    let templates = templates(tag);
    match submission {
        Submission::Plain { template } => {
            let (signer, event) = template.get(&templates);
            Some(sign(signer, event))
        }
        Submission::Envelope { template, edits } => {
            let (signer, event) = template.get(&templates);
            let bytes = apply(&sign(signer, event).encode_to_vec(), edits);
            SignedEvent::decode(bytes.as_slice()).ok()
        }
        Submission::Resigned {
            template,
            signer,
            edits,
        } => {
            let (natural, event) = template.get(&templates);
            let signer = match signer {
                Some(i) => i.get(&signers()).clone(),
                None => natural.clone(),
            };
            Some(sign_payload(&signer, apply(&event.encode_to_vec(), edits)))
        }
    }
}

/// Mutated and re-signed events through the append pipeline, a batch per case, into one
/// ledger: each is accepted or refused with a [`custody::trust::Refusal`] (never a storage
/// error, never a panic), and after every batch the offline verifier passes the whole ledger
/// clean: whatever the ledger accepted from hostile input, the verifier agrees with.
#[test]
fn hostile_events_are_accepted_or_refused_and_the_ledger_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = new_ledger(dir.path());
    register(&ledger);
    let key = LedgerVerifier::parse(&ledger.verifier_key()).unwrap();
    let case = AtomicU64::new(0);
    let accepted = AtomicU64::new(0);
    let refused = std::sync::Mutex::new(std::collections::BTreeMap::<&str, u64>::new());
    let mut runner = TestRunner::new(Config {
        source_file: Some(file!()),
        ..Config::with_cases(128)
    });
    let batches = prop::collection::vec(submission(), 1..8);
    runner
        .run(&batches, |batch| {
            let tag = case.fetch_add(1, Relaxed);
            // A quarter of the cases reuse the ids of the first, so mutations meet its state.
            let tag = if tag.is_multiple_of(4) {
                "x".to_owned()
            } else {
                tag.to_string()
            };
            let events: Vec<SignedEvent> = batch.iter().filter_map(|s| submit(s, &tag)).collect();
            let count = events.len();
            let outcomes = ledger
                .append_batch(events)
                .map_err(|e| TestCaseError::fail(format!("storage error: {e}")))?;
            prop_assert_eq!(outcomes.len(), count);
            let head = ledger.head();
            for outcome in &outcomes {
                match outcome {
                    Ok(receipt) => {
                        prop_assert!(receipt.seq < head.tree_size);
                        accepted.fetch_add(u64::from(!receipt.duplicate), Relaxed);
                    }
                    Err(refusal) => {
                        *refused.lock().unwrap().entry(refusal.code()).or_default() += 1;
                    }
                }
            }
            let (_, bytes) = export_of(&ledger);
            let report = verify_bytes(&bytes, &key);
            prop_assert!(report.is_ok(), "{:?}", report);
            prop_assert_eq!(report.unwrap().tree_size, head.tree_size);
            Ok(())
        })
        .unwrap();
    // Both paths were taken: hostile events reached the rules and were accepted, and others
    // were refused.
    let (accepted, refused) = (accepted.into_inner(), refused.into_inner().unwrap());
    eprintln!("hostile events: {accepted} accepted; refused: {refused:?}");
    assert!(
        accepted > 0 && !refused.is_empty(),
        "{accepted} accepted; refused: {refused:?}"
    );
}
