//! `custody-readbench`: measures read latency against a running ledger.
//!
//! It reads the newest checkpoint, discovers real targets from the ledger itself (users, token
//! ids and action entries, from entries sampled at random seqs and the newest consents), then
//! times three reads, each over `--requests` calls with random targets spread over
//! `--concurrency` concurrent callers:
//!
//! - `Audit.Query` filtered by one user, newest first, `limit` 100;
//! - `Audit.Trace` of one action entry;
//! - `Audit.GetInclusionProof` of one seq against the checkpoint's tree size.
//!
//! Each call is timed on the client (wall time from the request to the last byte of the
//! answer). Every answer is checked, so the benchmark cannot pass on garbage: query pages for
//! count, order and user, trace bundles and inclusion proofs with `custody::merkle` (and, with
//! `--ledger-key`, the checkpoint signatures and each bundle in full with
//! `custody::verify::verify_trace_bundle`). Checks that need further calls run after the
//! timed phase. Any error or failed check exits non-zero.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _};
use clap::Parser;
use custody::checkpoint::{self, LedgerVerifier};
use custody::merkle::{self, Hash};
use custody::proto::{
    audit_client::AuditClient, event::Body, Checkpoint, ConsistencyProofRequest, Entry, Event,
    EventKind, GetCheckpointRequest, GetEntriesRequest, GetEntryRequest, InclusionProofRequest,
    QueryRequest, StoredEntry, TraceBundle, TraceRequest, TraceStatus, Verdict,
};
use prost::Message as _;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "custody-readbench",
    about = "Read latency benchmark for a running custody ledger"
)]
struct Args {
    /// The ledger's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Calls per measured read (Query, Trace, GetInclusionProof).
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Concurrent callers (sharing one connection).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// The ledger's verifier key (the key string, or @path such as @custody-data/ledger.pub).
    /// When given, checkpoint signatures are checked and every trace bundle is verified in
    /// full after the timed phase; without it, proofs are still checked against the roots.
    #[arg(long)]
    ledger_key: Option<String>,
    /// Random windows of entries to sample when discovering targets.
    #[arg(long, default_value_t = 64)]
    sample_windows: u64,
    /// Seed for the random targets (default: random).
    #[arg(long)]
    seed: Option<u64>,
}

/// Entries read per sampled window.
const WINDOW: u64 = 32;
/// Pages of (up to 1000) consents read when discovering users.
const CONSENT_PAGES: usize = 4;
/// The page size the Query benchmark asks for.
const QUERY_LIMIT: u32 = 100;

type Audit = AuditClient<Channel>;

/// A checkpoint whose fields have been checked (and its signature, with a ledger key).
#[derive(Clone, Copy)]
struct Head {
    tree_size: u64,
    root: Hash,
}

fn head_of(checkpoint: &Checkpoint, key: Option<&LedgerVerifier>) -> anyhow::Result<Head> {
    let root = merkle::hash_from_slice(&checkpoint.root_hash).ok_or_else(|| {
        anyhow!(
            "checkpoint root_hash has {} bytes, not 32",
            checkpoint.root_hash.len()
        )
    })?;
    if let Some(key) = key {
        let opened = checkpoint::open(&checkpoint.note, key)
            .context("the checkpoint note does not verify under --ledger-key")?;
        ensure!(
            opened.tree_size() == checkpoint.tree_size && opened.root() == root,
            "the checkpoint's fields (size {}) differ from its signed note (size {})",
            checkpoint.tree_size,
            opened.tree_size()
        );
    }
    Ok(Head {
        tree_size: checkpoint.tree_size,
        root,
    })
}

fn decode_stored(stored: &StoredEntry) -> anyhow::Result<(Entry, Event)> {
    let entry = Entry::decode(stored.entry.as_slice()).context("an entry does not decode")?;
    let payload = entry
        .event
        .as_ref()
        .map(|e| e.payload.as_slice())
        .unwrap_or_default();
    let event = Event::decode(payload)
        .with_context(|| format!("entry {}: the payload does not decode", entry.seq))?;
    Ok((entry, event))
}

fn proof_path(hashes: &[Vec<u8>]) -> anyhow::Result<Vec<Hash>> {
    hashes
        .iter()
        .map(|h| {
            merkle::hash_from_slice(h)
                .ok_or_else(|| anyhow!("a proof hash has {} bytes, not 32", h.len()))
        })
        .collect()
}

/// What discovery found on the ledger.
#[derive(Default)]
struct Targets {
    users: Vec<String>,
    /// token id -> user, from issuances.
    token_users: HashMap<String, String>,
    /// action seq -> (token id, recorded verdict).
    actions: Vec<(u64, String, Verdict)>,
    sampled: usize,
    consents_queried: usize,
}

impl Targets {
    fn note(&mut self, users: &mut BTreeSet<String>, entry: &Entry, event: &Event) {
        match &event.body {
            Some(Body::Consent(c)) => {
                users.insert(c.user.clone());
            }
            Some(Body::Issuance(i)) => {
                users.insert(i.user.clone());
                self.token_users.insert(i.token_id.clone(), i.user.clone());
            }
            Some(Body::Action(a)) => self.actions.push((
                entry.seq,
                a.token_id.clone(),
                entry.verdict.clone().unwrap_or_default(),
            )),
            _ => {}
        }
    }
}

async fn discover(
    audit: &mut Audit,
    head: Head,
    windows: u64,
    rng: &mut rand::rngs::StdRng,
) -> anyhow::Result<Targets> {
    let mut targets = Targets::default();
    let mut users = BTreeSet::new();
    // Windows of consecutive entries at random starts, spread over the whole tree.
    let mut starts = BTreeSet::new();
    if head.tree_size <= windows * WINDOW {
        starts.extend((0..head.tree_size).step_by(WINDOW as usize));
    } else {
        while (starts.len() as u64) < windows {
            starts.insert(rng.gen_range(0..head.tree_size - WINDOW) / WINDOW * WINDOW);
        }
    }
    let mut seen = HashSet::new();
    for start in starts {
        let end = (start + WINDOW).min(head.tree_size);
        let mut stream = audit
            .get_entries(GetEntriesRequest { start, end })
            .await
            .with_context(|| format!("GetEntries [{start}, {end})"))?
            .into_inner();
        while let Some(stored) = stream.next().await {
            let stored = stored.with_context(|| format!("GetEntries [{start}, {end})"))?;
            let (entry, event) = decode_stored(&stored)?;
            ensure!(
                (start..end).contains(&entry.seq) && seen.insert(entry.seq),
                "GetEntries [{start}, {end}) returned entry {} (out of range or repeated)",
                entry.seq
            );
            targets.note(&mut users, &entry, &event);
            targets.sampled += 1;
        }
    }
    // The newest consents (a few pages), for users the sample may have missed.
    let mut before_seq = 0;
    for _ in 0..CONSENT_PAGES {
        let mut stream = audit
            .query(QueryRequest {
                kinds: vec![EventKind::Consent as i32],
                limit: 1000,
                before_seq,
                ..Default::default()
            })
            .await
            .context("Query kind=consent")?
            .into_inner();
        let mut oldest = None;
        while let Some(stored) = stream.next().await {
            let (entry, event) = decode_stored(&stored.context("Query kind=consent")?)?;
            ensure!(
                matches!(event.body, Some(Body::Consent(_))),
                "Query kind=consent returned entry {}, which is not a consent",
                entry.seq
            );
            targets.note(&mut users, &entry, &event);
            targets.consents_queried += 1;
            oldest = Some(entry.seq);
        }
        match oldest {
            Some(seq) if seq > 0 => before_seq = seq,
            _ => break,
        }
    }
    targets.users = users.into_iter().filter(|u| !u.is_empty()).collect();
    if targets.users.is_empty() {
        bail!(
            "no users found (no consents or issuances among {} sampled entries and {} queried \
             consents); fill the ledger first, e.g. with custody-loadgen",
            targets.sampled,
            targets.consents_queried
        );
    }
    if targets.actions.is_empty() {
        bail!(
            "no action entries among {} sampled entries; fill the ledger first (e.g. with \
             custody-loadgen) or raise --sample-windows",
            targets.sampled
        );
    }
    Ok(targets)
}

/// Runs one timed phase as `concurrency` tasks, each made by `call(task index, its rng)` and
/// returning its calls' latencies and the answers to check later. Returns the sorted
/// latencies, the answers and the phase's wall time.
async fn run_phase<T, F, Fut>(
    concurrency: usize,
    seed: u64,
    mut call: F,
) -> anyhow::Result<(Vec<Duration>, Vec<T>, Duration)>
where
    T: Send + 'static,
    F: FnMut(usize, rand::rngs::StdRng) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(Vec<Duration>, Vec<T>)>> + Send + 'static,
{
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for task in 0..concurrency {
        let rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(task as u64));
        tasks.push(tokio::spawn(call(task, rng)));
    }
    let (mut latencies, mut results) = (Vec::new(), Vec::new());
    for task in tasks {
        let (l, r) = task.await.context("a benchmark task panicked")??;
        latencies.extend(l);
        results.extend(r);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok((latencies, results, elapsed))
}

/// How many of `requests` calls task `task` of `concurrency` makes.
fn share(requests: usize, concurrency: usize, task: usize) -> usize {
    requests / concurrency + usize::from(task < requests % concurrency)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn report_line(name: &str, sorted: &[Duration], elapsed: Duration) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name:<28} {:>8.2} {:>8.2} {:>9.2} {:>8.2} {:>9.0}",
        ms(percentile(sorted, 50.0)),
        ms(percentile(sorted, 99.0)),
        ms(percentile(sorted, 99.9)),
        ms(sorted.last().copied().unwrap_or_default()),
        sorted.len() as f64 / elapsed.as_secs_f64()
    );
}

/// One Query page as seen by the client: user, entries returned, oldest seq returned.
struct Page {
    user: String,
    returned: usize,
    oldest: Option<u64>,
}

/// Checks one newest-first page of `user`'s entries: at most the limit, seqs strictly
/// descending, and every entry that names a user (directly or through a known token) names
/// this one.
fn check_page(
    user: &str,
    page: &[StoredEntry],
    token_users: &HashMap<String, String>,
) -> anyhow::Result<Option<u64>> {
    ensure!(
        page.len() <= QUERY_LIMIT as usize,
        "Query user={user} limit={QUERY_LIMIT} returned {} entries",
        page.len()
    );
    let mut previous: Option<u64> = None;
    for stored in page {
        let (entry, event) = decode_stored(stored)?;
        let seq = entry.seq;
        ensure!(
            previous.is_none_or(|p| seq < p),
            "Query user={user}: entry {seq} after entry {previous:?} (not newest first)"
        );
        previous = Some(seq);
        let named = match &event.body {
            Some(Body::Consent(c)) => Some(c.user.as_str()),
            Some(Body::Issuance(i)) => Some(i.user.as_str()),
            Some(Body::Action(a)) => token_users.get(&a.token_id).map(String::as_str),
            Some(Body::Validation(v)) => token_users.get(&v.token_id).map(String::as_str),
            Some(Body::Denial(d)) => token_users.get(&d.token_id).map(String::as_str),
            _ => None,
        };
        if let Some(named) = named {
            ensure!(
                named == user,
                "Query user={user} returned entry {seq}, which belongs to {named}"
            );
        }
    }
    Ok(previous)
}

/// Checks a trace bundle's shape and proofs against its own checkpoint, without the ledger
/// key: the traced entry is in it with its recorded verdict, and every proof verifies.
fn check_bundle(bundle: &TraceBundle, seq: u64, recorded: &Verdict) -> anyhow::Result<(u64, Hash)> {
    ensure!(
        bundle.seq == seq,
        "Trace {seq} returned the bundle of {}",
        bundle.seq
    );
    let checkpoint = bundle
        .checkpoint
        .as_ref()
        .ok_or_else(|| anyhow!("Trace {seq}: no checkpoint"))?;
    let head = head_of(checkpoint, None).with_context(|| format!("Trace {seq}"))?;
    ensure!(
        bundle.entries.len() == bundle.proofs.len(),
        "Trace {seq}: {} entries but {} proofs",
        bundle.entries.len(),
        bundle.proofs.len()
    );
    ensure!(
        bundle.verdict.as_ref() == Some(recorded),
        "Trace {seq}: the bundle's verdict differs from the entry's recorded verdict"
    );
    let mut seqs = HashSet::new();
    for (stored, proof) in bundle.entries.iter().zip(&bundle.proofs) {
        let (entry, _) = decode_stored(stored).with_context(|| format!("Trace {seq}"))?;
        ensure!(
            proof.seq == entry.seq && proof.tree_size == head.tree_size,
            "Trace {seq}: the proof of entry {} names seq {} in tree {}",
            entry.seq,
            proof.seq,
            proof.tree_size
        );
        merkle::verify_inclusion(
            &proof_path(&proof.hashes)?,
            entry.seq,
            head.tree_size,
            merkle::leaf_hash(&stored.entry),
            head.root,
        )
        .with_context(|| format!("Trace {seq}: the proof of entry {}", entry.seq))?;
        seqs.insert(entry.seq);
    }
    ensure!(
        seqs.contains(&seq),
        "Trace {seq}: the traced entry is not in the bundle"
    );
    ensure!(
        seqs.contains(&0),
        "Trace {seq}: the genesis is not in the bundle"
    );
    for link in recorded.chain.iter().chain(
        Some(&recorded.consent_seq).filter(|_| recorded.status == TraceStatus::Traced as i32),
    ) {
        ensure!(
            seqs.contains(link),
            "Trace {seq}: entry {link} of the verdict's chain is not in the bundle"
        );
    }
    Ok((head.tree_size, head.root))
}

/// Checks that the tree (`size`, `root`) extends the benchmark's checkpoint, so that proofs
/// against it are proofs against the ledger the benchmark started from.
async fn check_extends(audit: &mut Audit, base: Head, size: u64, root: Hash) -> anyhow::Result<()> {
    if size == base.tree_size {
        ensure!(
            root == base.root,
            "two different roots for tree size {size}"
        );
        return Ok(());
    }
    ensure!(
        size > base.tree_size,
        "a bundle's tree ({size}) is older than the benchmark's checkpoint ({})",
        base.tree_size
    );
    let proof = audit
        .get_consistency_proof(ConsistencyProofRequest {
            old_size: base.tree_size,
            new_size: size,
        })
        .await
        .with_context(|| format!("GetConsistencyProof {} -> {size}", base.tree_size))?
        .into_inner();
    merkle::verify_consistency(
        &proof_path(&proof.hashes)?,
        base.tree_size,
        base.root,
        size,
        root,
    )
    .with_context(|| format!("the tree of size {size} does not extend the checkpoint"))?;
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(args.requests > 0, "--requests must be at least 1");
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let concurrency = args.concurrency.min(args.requests);
    let key = match &args.ledger_key {
        None => None,
        Some(arg) => {
            let text = match arg.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("couldn't read {path}"))?,
                None => arg.clone(),
            };
            Some(LedgerVerifier::parse(&text).map_err(|e| anyhow!("--ledger-key: {e}"))?)
        }
    };
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut audit = AuditClient::connect(args.server.clone())
        .await
        .with_context(|| format!("couldn't connect to {}", args.server))?
        .max_decoding_message_size(64 << 20);

    let checkpoint = audit
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .context("GetCheckpoint")?
        .into_inner();
    let head = head_of(&checkpoint, key.as_ref())?;
    ensure!(
        head.tree_size > 1,
        "the ledger holds {} entries; fill it first, e.g. with custody-loadgen",
        head.tree_size
    );
    eprintln!(
        "tree size {}: discovering targets ({} windows of {WINDOW} entries) ...",
        head.tree_size, args.sample_windows
    );
    let targets = discover(&mut audit, head, args.sample_windows.max(1), &mut rng).await?;
    println!(
        "custody-readbench against {} at tree size {} (root {}), seed {seed}",
        args.server,
        head.tree_size,
        hex::encode(head.root.0)
    );
    println!(
        "targets: {} users, {} token ids, {} action entries (from {} sampled entries and {} \
         queried consents)",
        targets.users.len(),
        targets.token_users.len(),
        targets.actions.len(),
        targets.sampled,
        targets.consents_queried
    );
    println!(
        "{} calls per read, concurrency {concurrency}; latency is per call, client wall time",
        args.requests
    );
    let users = std::sync::Arc::new(targets.users);
    let token_users = std::sync::Arc::new(targets.token_users);
    let actions = std::sync::Arc::new(targets.actions);

    // Query: one user's newest 100 entries.
    let (query_latencies, pages, query_elapsed) =
        run_phase(concurrency, seed ^ 0x51, |task, mut rng| {
            let calls = share(args.requests, concurrency, task);
            let (mut audit, users, token_users) =
                (audit.clone(), users.clone(), token_users.clone());
            async move {
                let (mut latencies, mut pages) = (Vec::new(), Vec::new());
                for _ in 0..calls {
                    let user = users.choose(&mut rng).cloned().unwrap_or_default();
                    let request = QueryRequest {
                        user: user.clone(),
                        limit: QUERY_LIMIT,
                        ..Default::default()
                    };
                    let started = Instant::now();
                    let page: Vec<StoredEntry> = audit
                        .query(request)
                        .await
                        .with_context(|| format!("Query user={user}"))?
                        .into_inner()
                        .collect::<Result<_, _>>()
                        .await
                        .with_context(|| format!("Query user={user}"))?;
                    latencies.push(started.elapsed());
                    let oldest = check_page(&user, &page, &token_users)?;
                    pages.push(Page {
                        user,
                        returned: page.len(),
                        oldest,
                    });
                }
                Ok((latencies, pages))
            }
        })
        .await?;

    // Trace: one action entry.
    let (trace_latencies, bundles, trace_elapsed) =
        run_phase(concurrency, seed ^ 0x7a, |task, mut rng| {
            let calls = share(args.requests, concurrency, task);
            let (mut audit, actions) = (audit.clone(), actions.clone());
            async move {
                let (mut latencies, mut bundles) = (Vec::new(), Vec::new());
                for _ in 0..calls {
                    let index = rng.gen_range(0..actions.len());
                    let seq = actions[index].0;
                    let started = Instant::now();
                    let bundle = audit
                        .trace(TraceRequest { seq })
                        .await
                        .with_context(|| format!("Trace {seq}"))?
                        .into_inner();
                    latencies.push(started.elapsed());
                    bundles.push((index, bundle));
                }
                Ok((latencies, bundles))
            }
        })
        .await?;

    // GetInclusionProof: a random seq against the checkpoint's tree size.
    let (proof_latencies, proofs, proof_elapsed) =
        run_phase(concurrency, seed ^ 0x1c, |task, mut rng| {
            let calls = share(args.requests, concurrency, task);
            let mut audit = audit.clone();
            async move {
                let (mut latencies, mut proofs) = (Vec::new(), Vec::new());
                for _ in 0..calls {
                    let seq = rng.gen_range(0..head.tree_size);
                    let request = InclusionProofRequest {
                        seq,
                        tree_size: head.tree_size,
                    };
                    let started = Instant::now();
                    let proof = audit
                        .get_inclusion_proof(request)
                        .await
                        .with_context(|| {
                            format!("GetInclusionProof seq={seq} tree_size={}", head.tree_size)
                        })?
                        .into_inner();
                    latencies.push(started.elapsed());
                    proofs.push((seq, proof));
                }
                Ok((latencies, proofs))
            }
        })
        .await?;

    // Checks that need further calls, outside the timed phases.
    eprintln!("checking the answers ...");
    // Query: a short page must be the user's last one.
    let mut short: HashMap<&str, (usize, Option<u64>)> = HashMap::new();
    for page in pages.iter().filter(|p| p.returned < QUERY_LIMIT as usize) {
        short.insert(&page.user, (page.returned, page.oldest));
    }
    for (user, (returned, oldest)) in &short {
        // Discovery saw an entry of every user, so an empty page is wrong too.
        let oldest = oldest.ok_or_else(|| {
            anyhow!("Query user={user} returned no entries, but the ledger has some")
        })?;
        let more = match oldest {
            0 => 0,
            _ => audit
                .query(QueryRequest {
                    user: user.to_string(),
                    limit: 1,
                    before_seq: oldest,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("Query user={user} (check)"))?
                .into_inner()
                .collect::<Result<Vec<_>, _>>()
                .await
                .with_context(|| format!("Query user={user} (check)"))?
                .len(),
        };
        ensure!(
            more == 0,
            "Query user={user} limit={QUERY_LIMIT} returned only {returned} entries, but the \
             user has more"
        );
    }
    // Trace: every bundle's proofs, against a tree that extends the checkpoint.
    let mut roots: HashMap<u64, Hash> = HashMap::new();
    let mut bundle_entries = 0usize;
    for (index, bundle) in &bundles {
        let (seq, _, verdict) = &actions[*index];
        let (size, root) = check_bundle(bundle, *seq, verdict)?;
        if let Some(known) = roots.get(&size) {
            ensure!(*known == root, "two different roots for tree size {size}");
        } else {
            check_extends(&mut audit, head, size, root).await?;
            roots.insert(size, root);
        }
        if let Some(key) = &key {
            custody::verify::verify_trace_bundle(bundle, key)
                .with_context(|| format!("Trace {seq}: the bundle does not verify"))?;
        }
        bundle_entries += bundle.entries.len();
    }
    // GetInclusionProof: every proof against the checkpoint's root, with the entry's leaf hash.
    let mut leaves: HashMap<u64, Hash> = HashMap::new();
    let mut proof_hashes = 0usize;
    for (seq, proof) in &proofs {
        ensure!(
            proof.seq == *seq && proof.tree_size == head.tree_size,
            "GetInclusionProof seq={seq} tree_size={} answered for seq {} tree_size {}",
            head.tree_size,
            proof.seq,
            proof.tree_size
        );
        let leaf = match leaves.get(seq) {
            Some(leaf) => *leaf,
            None => {
                let stored = audit
                    .get_entry(GetEntryRequest { seq: *seq })
                    .await
                    .with_context(|| format!("GetEntry {seq} (check)"))?
                    .into_inner();
                let (entry, _) = decode_stored(&stored)?;
                ensure!(
                    entry.seq == *seq,
                    "GetEntry {seq} returned entry {}",
                    entry.seq
                );
                let leaf = merkle::leaf_hash(&stored.entry);
                leaves.insert(*seq, leaf);
                leaf
            }
        };
        merkle::verify_inclusion(
            &proof_path(&proof.hashes)?,
            *seq,
            head.tree_size,
            leaf,
            head.root,
        )
        .with_context(|| {
            format!(
                "GetInclusionProof seq={seq} tree_size={}: the proof does not verify",
                head.tree_size
            )
        })?;
        proof_hashes += proof.hashes.len();
    }

    println!();
    println!(
        "{:<28} {:>8} {:>8} {:>9} {:>8} {:>9}",
        "read", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "calls/s"
    );
    report_line("Query user, limit 100", &query_latencies, query_elapsed);
    report_line("Trace action", &trace_latencies, trace_elapsed);
    report_line("GetInclusionProof", &proof_latencies, proof_elapsed);
    println!();
    let returned: usize = pages.iter().map(|p| p.returned).sum();
    println!(
        "Query: {:.1} entries returned on average (min {}, max {}); {} short pages, each \
         confirmed to be the user's whole history",
        returned as f64 / pages.len() as f64,
        pages.iter().map(|p| p.returned).min().unwrap_or(0),
        pages.iter().map(|p| p.returned).max().unwrap_or(0),
        pages
            .iter()
            .filter(|p| p.returned < QUERY_LIMIT as usize)
            .count()
    );
    println!(
        "Trace: {:.1} entries per bundle on average; every proof verified against a tree \
         extending the checkpoint ({} tree size{} seen){}",
        bundle_entries as f64 / bundles.len() as f64,
        roots.len(),
        if roots.len() == 1 { "" } else { "s" },
        if key.is_some() {
            ", every bundle verified in full"
        } else {
            " (pass --ledger-key to verify signatures and verdicts too)"
        }
    );
    println!(
        "GetInclusionProof: {:.1} hashes per proof on average; every proof verified against \
         the checkpoint root{}",
        proof_hashes as f64 / proofs.len() as f64,
        if key.is_some() { " (signed)" } else { "" }
    );
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(error) = run(Args::parse()).await {
        eprintln!("custody-readbench: error: {error:#}");
        std::process::exit(1);
    }
}
