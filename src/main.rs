//! The `custody` command: a thin layer over the library.
//!
//! Exit codes: 0 success; 1 the server refused the request, or verification failed; 2 usage,
//! I/O or connection error; 3 verified, and the ledger records violations.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use prost::Message as _;

use custody::checkpoint::LedgerVerifier;
use custody::proto::{
    audit_client::AuditClient, event, ledger_client::LedgerClient, Event, EventKind,
    GetCheckpointRequest, GetEntriesRequest, KeyGrant, QueryRequest, Receipt, Role, TraceBundle,
    TraceRequest, TraceStatus,
};
use custody::scratch::DiskState;
use custody::server::{self, Config, KeyPairJson};
use custody::settings::{LogFormat, ServeSettings};
use custody::store::{keys, Store};
use custody::{envelope, export, inspect, verify};
use tokio_stream::StreamExt as _;

#[derive(Parser)]
#[command(
    name = "custody",
    version,
    about = "Append-only chain-of-trust audit ledger for delegated access"
)]
#[command(
    after_help = "Exit codes: 0 success; 1 the server refused the request; 2 usage, I/O or connection error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the ledger: creates it (keys, genesis) on first start, then serves gRPC. Each
    /// setting comes from its flag, else its environment variable, else the --config file,
    /// else its default.
    Serve(ServeSettings),
    /// Prints a new Ed25519 key pair as JSON (secret_key hex seed, public_key hex, key_id).
    Keygen,
    /// Prints the table of verdict reason codes (Markdown, as in docs/REASONS.md).
    Reasons,
    /// Prints the ledger's newest signed checkpoint note.
    Checkpoint {
        /// The ledger's gRPC address (https://… for TLS).
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        #[command(flatten)]
        tls: ClientTls,
    },
    /// Prints the entries matching all given filters as JSON lines (newest first).
    Query {
        /// The ledger's gRPC address (https://… for TLS).
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        #[command(flatten)]
        tls: ClientTls,
        #[command(flatten)]
        filters: QueryFilters,
    },
    /// Fetches the trace bundle of an action, denial, validation or issuance entry: prints it
    /// as JSON, or saves it (protobuf `TraceBundle`) with --out for offline verification.
    Trace {
        /// The ledger's gRPC address (https://… for TLS).
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        #[command(flatten)]
        tls: ClientTls,
        /// The entry to trace.
        seq: u64,
        /// Save the bundle to this file instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Writes the ledger (newest checkpoint and every entry) to an export file, from a running
    /// ledger (--server) or a stopped ledger's directory (--data-dir). Format: docs/EXPORT.md.
    Export {
        /// The running ledger's gRPC address (https://… for TLS).
        #[arg(
            long,
            conflicts_with = "data_dir",
            required_unless_present = "data_dir"
        )]
        server: Option<String>,
        #[command(flatten)]
        tls: ClientTls,
        /// A stopped ledger's data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The export file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Verifies an export (or a stopped ledger's directory) offline with only the ledger key:
    /// checkpoint signature, seq contiguity, hash chain, Merkle root, every signature against
    /// the key registry replayed from the ledger, every verdict recomputed.
    #[command(
        after_help = "Exit codes: 0 verified, no violations; 3 verified, the ledger records violations; 1 verification failed (tampering, bad signature, broken chain); 2 usage or I/O error."
    )]
    Verify {
        /// The export file.
        #[arg(required_unless_present = "data_dir", conflicts_with = "data_dir")]
        file: Option<PathBuf>,
        /// A stopped ledger's data directory instead of an export.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The ledger's verifier key string, or @path to a file holding it (e.g. @ledger.pub).
        #[arg(long)]
        ledger_key: String,
        /// A checkpoint note trusted earlier: the ledger must extend it.
        #[arg(long)]
        previous_checkpoint: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verifies one saved trace bundle offline (see `custody trace --out`).
    #[command(
        after_help = "Exit codes: 0 verified (traced or not applicable); 3 verified, the entry is a violation; 1 verification failed; 2 usage or I/O error."
    )]
    VerifyTrace {
        /// The bundle file (protobuf TraceBundle).
        bundle: PathBuf,
        /// The ledger's verifier key string, or @path to a file holding it.
        #[arg(long)]
        ledger_key: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rotates the ledger key of a stopped ledger, one step at a time, each recorded as an
    /// entry: `begin` (checkpoints are signed by the current and the next key), then `finish`
    /// (the next key becomes the ledger key) or `cancel`. Prints the step's receipt and the
    /// keys that sign checkpoints from now on as JSON. Procedure: README, "Rotating the
    /// ledger key".
    RotateKey {
        /// begin, finish or cancel.
        step: StepArg,
        /// The stopped ledger's data directory.
        #[arg(long, default_value = server::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Prints what a stopped ledger's store holds: keys and bytes per kind of key, and the
    /// size of the database directory on disk.
    StoreStats {
        /// The stopped ledger's data directory.
        #[arg(long, default_value = server::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Registers a key: sends an admin-signed KeyGrant and prints the receipt as JSON.
    GrantKey {
        /// The ledger's gRPC address (https://… for TLS).
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        #[command(flatten)]
        tls: ClientTls,
        /// JSON key file of an ADMIN key (as written by `custody keygen` or admin.key).
        #[arg(long)]
        admin_key: PathBuf,
        /// Hex Ed25519 public key to register.
        #[arg(long, value_name = "HEX")]
        public_key: String,
        /// What the key may sign.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Who the key speaks for (user id, issuer id, resource server id, agent id).
        #[arg(long)]
        principal: String,
        /// Unix ms after which the key is no longer valid (0: no end).
        #[arg(long, default_value_t = 0)]
        not_after_ms: i64,
    },
}

#[derive(clap::Args)]
struct QueryFilters {
    /// Entries on behalf of this user.
    #[arg(long)]
    user: Option<String>,
    /// Entries by or for this agent.
    #[arg(long)]
    agent: Option<String>,
    /// Entries naming this token.
    #[arg(long)]
    token: Option<String>,
    /// Entries resting on this consent.
    #[arg(long)]
    consent: Option<String>,
    /// Entries naming this resource server.
    #[arg(long)]
    resource_server: Option<String>,
    /// Only these kinds (repeatable).
    #[arg(long = "kind", value_enum)]
    kinds: Vec<KindArg>,
    /// Only this verdict status.
    #[arg(long, value_enum)]
    status: Option<StatusArg>,
    /// occurred_at >= this (RFC 3339 or Unix ms).
    #[arg(long, value_parser = parse_time)]
    from: Option<i64>,
    /// occurred_at < this (RFC 3339 or Unix ms).
    #[arg(long, value_parser = parse_time)]
    to: Option<i64>,
    /// Most entries to print (the server caps it).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Oldest first.
    #[arg(long)]
    ascending: bool,
    /// Resume newest-first paging below this seq.
    #[arg(long)]
    before_seq: Option<u64>,
    /// Resume oldest-first paging above this seq.
    #[arg(long)]
    after_seq: Option<u64>,
}

fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let time =
        humantime::parse_rfc3339_weak(text).map_err(|e| format!("not RFC 3339 or Unix ms: {e}"))?;
    let ms = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| "before 1970".to_string())?
        .as_millis();
    i64::try_from(ms).map_err(|_| "too far in the future".to_string())
}

/// How a client command reaches a ledger that serves TLS or checks readers.
#[derive(clap::Args, Clone, Default)]
struct ClientTls {
    /// CA certificate(s), PEM, to verify an https:// server's certificate with.
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// The name the server's certificate carries, if not the address's host (e.g. when
    /// connecting to an IP address).
    #[arg(long, value_name = "NAME")]
    tls_domain: Option<String>,
    /// A client certificate chain, PEM, to present (with --tls-key).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key, PEM.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A file holding a reader's bearer token, sent as `authorization: Bearer` (only over
    /// TLS or to a loopback address).
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
}

impl ClientTls {
    fn security(&self) -> custody::client::ClientSecurity {
        custody::client::ClientSecurity {
            ca: self.tls_ca.clone(),
            domain: self.tls_domain.clone(),
            identity: self.tls_cert.clone().zip(self.tls_key.clone()),
            token_file: self.token_file.clone(),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum StepArg {
    Begin,
    Finish,
    Cancel,
}

impl From<StepArg> for server::RotationStep {
    fn from(step: StepArg) -> Self {
        match step {
            StepArg::Begin => server::RotationStep::Begin,
            StepArg::Finish => server::RotationStep::Finish,
            StepArg::Cancel => server::RotationStep::Cancel,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Genesis,
    KeyGrant,
    KeyRevocation,
    Consent,
    Issuance,
    Validation,
    Action,
    Denial,
    Revocation,
    LedgerKeyRotation,
}

impl From<KindArg> for EventKind {
    fn from(kind: KindArg) -> Self {
        match kind {
            KindArg::Genesis => EventKind::Genesis,
            KindArg::KeyGrant => EventKind::KeyGrant,
            KindArg::KeyRevocation => EventKind::KeyRevocation,
            KindArg::Consent => EventKind::Consent,
            KindArg::Issuance => EventKind::Issuance,
            KindArg::Validation => EventKind::Validation,
            KindArg::Action => EventKind::Action,
            KindArg::Denial => EventKind::Denial,
            KindArg::Revocation => EventKind::Revocation,
            KindArg::LedgerKeyRotation => EventKind::LedgerKeyRotation,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum StatusArg {
    NotApplicable,
    Traced,
    Violation,
}

impl From<StatusArg> for TraceStatus {
    fn from(status: StatusArg) -> Self {
        match status {
            StatusArg::NotApplicable => TraceStatus::NotApplicable,
            StatusArg::Traced => TraceStatus::Traced,
            StatusArg::Violation => TraceStatus::Violation,
        }
    }
}

impl QueryFilters {
    fn request(self) -> QueryRequest {
        QueryRequest {
            user: self.user.unwrap_or_default(),
            agent: self.agent.unwrap_or_default(),
            token_id: self.token.unwrap_or_default(),
            consent_id: self.consent.unwrap_or_default(),
            resource_server: self.resource_server.unwrap_or_default(),
            kinds: self
                .kinds
                .into_iter()
                .map(|k| EventKind::from(k) as i32)
                .collect(),
            status: self
                .status
                .map_or(TraceStatus::Unspecified, TraceStatus::from) as i32,
            from_ms: self.from.unwrap_or(0),
            to_ms: self.to.unwrap_or(0),
            limit: self.limit,
            before_seq: self.before_seq.unwrap_or(0),
            ascending: self.ascending,
            after_seq: self.after_seq,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Admin,
    User,
    Issuer,
    ResourceServer,
    Agent,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::Admin => Role::Admin,
            RoleArg::User => Role::User,
            RoleArg::Issuer => Role::Issuer,
            RoleArg::ResourceServer => Role::ResourceServer,
            RoleArg::Agent => Role::Agent,
        }
    }
}

/// `println!` that ignores a closed stdout (e.g. `custody verify ... | head`) instead of
/// panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// An outcome that is not success but not a usage or I/O error either.
enum Failure {
    /// The server refused the request: exit 1, with the status on stderr.
    Refused(String),
    /// Verification failed (already reported on stdout): exit 1.
    Integrity,
    /// Verified, and the ledger records violations (already reported): exit 3.
    Findings,
}

/// The allocator: mimalloc instead of glibc's malloc. The verifier decodes entries on one
/// thread and frees them on another, and the append pipeline hands buffers from thread to
/// thread; glibc's malloc and free took about 28% of `custody verify`'s samples (`perf`);
/// with mimalloc a 1M-entry verify took 8.1 s instead of 13.5 s, and ingest rose from about
/// 18,000 to 24,000–29,000 events/s (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` and `mi_option_allow_thp` (mimalloc.h): how long freed
/// memory stays committed before it is returned to the OS, and whether mimalloc asks for
/// transparent huge pages. 15 and 43 in mimalloc 3.3 as libmimalloc-sys 0.1.49 builds it;
/// Cargo.toml pins that version, since the sys crate names no constant for them.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// Tunes the allocator for the long-running server (measured in BENCHMARKS.md):
///
/// - Freed memory goes back to the OS at once rather than after mimalloc's default delay of
///   one second: over a million events at full speed the peak RSS was 516 MiB with the delay
///   and 463–469 MiB without, at the same throughput. Offline commands keep the delay:
///   purging at once cost `custody verify` about 7% of its samples in page faults.
/// - No transparent huge pages: mimalloc asks for them on its arenas, and a fresh server's
///   first touch of each zeroes 2 MiB at once. In the first seconds of load after a restart
///   that showed as receipt p99 of 45–145 ms (13% of samples in `clear_page_erms` under
///   huge-page faults); without them 22–26 ms, and peak RSS 466–518 MiB against 558–612 MiB.
///   The process opts out with `PR_SET_THP_DISABLE`, which covers memory mimalloc reserved
///   before `main`.
///
/// An operator's `MIMALLOC_PURGE_DELAY` or `MIMALLOC_ALLOW_THP` takes precedence (mimalloc
/// reads them when the process starts). Must run before any other thread starts.
fn tune_allocator_for_serving() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options, a plain integer it reads when it purges;
        // any value is valid for it. No other thread exists yet (the caller runs before the
        // async runtime starts), so nothing reads the option while it is written.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: as above; a plain boolean option mimalloc reads when it reserves memory.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0) };
        #[cfg(target_os = "linux")]
        // SAFETY: PR_SET_THP_DISABLE takes one integer argument and touches no memory of
        // ours; the remaining arguments must be zero.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
            // Only a latency tail at stake: say so and go on.
            eprintln!(
                "custody: couldn't turn off transparent huge pages: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve(_)) {
        tune_allocator_for_serving();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("custody: couldn't start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(Failure::Refused(message))) => {
            eprintln!("custody: refused: {message}");
            ExitCode::from(1)
        }
        Ok(Err(Failure::Integrity)) => ExitCode::from(1),
        Ok(Err(Failure::Findings)) => ExitCode::from(3),
        Err(error) => {
            eprintln!("custody: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<Result<(), Failure>> {
    match cli.command {
        Command::Serve(settings) => {
            let resolved = settings.resolve()?;
            init_logging(resolved.log_format);
            serve(resolved.config, resolved.listen).await?;
        }
        Command::Keygen => {
            let pair = KeyPairJson::from_signing_key(&server::generate_key());
            println!("{}", serde_json::to_string_pretty(&pair)?);
        }
        Command::Reasons => print!("{}", custody::trust::reasons::markdown_table()),
        Command::Checkpoint { server, tls } => {
            let mut client = connect_audit(&server, &tls).await?;
            match client.get_checkpoint(GetCheckpointRequest {}).await {
                Ok(checkpoint) => print!("{}", checkpoint.into_inner().note),
                Err(status) => return Ok(Err(refused(&status))),
            }
        }
        Command::Query {
            server,
            tls,
            filters,
        } => {
            let mut client = connect_audit(&server, &tls).await?;
            let mut stream = match client.query(filters.request()).await {
                Ok(response) => response.into_inner(),
                Err(status) => return Ok(Err(refused(&status))),
            };
            let mut out = std::io::stdout().lock();
            while let Some(item) = stream.next().await {
                match item {
                    Ok(stored) => {
                        use std::io::Write as _;
                        // A closed pipe (e.g. `| head`) ends the listing quietly.
                        if writeln!(out, "{}", inspect::entry_json(&stored.entry)).is_err() {
                            break;
                        }
                    }
                    Err(status) => return Ok(Err(refused(&status))),
                }
            }
        }
        Command::Trace {
            server,
            tls,
            seq,
            out,
        } => {
            let mut client = connect_audit(&server, &tls).await?;
            let bundle = match client.trace(TraceRequest { seq }).await {
                Ok(response) => response.into_inner(),
                Err(status) => return Ok(Err(refused(&status))),
            };
            match out {
                Some(path) => {
                    std::fs::write(&path, bundle.encode_to_vec())
                        .with_context(|| format!("couldn't write {}", path.display()))?;
                    eprintln!(
                        "saved the trace bundle of entry {seq} ({} entries) to {}",
                        bundle.entries.len(),
                        path.display()
                    );
                }
                None => println!("{}", serde_json::to_string_pretty(&bundle_json(&bundle))?),
            }
        }
        Command::Export {
            server,
            tls,
            data_dir,
            out,
        } => {
            return export(server, &tls, data_dir, out).await;
        }
        Command::Verify {
            file,
            data_dir,
            ledger_key,
            previous_checkpoint,
            json,
        } => {
            let key = read_ledger_key(&ledger_key)?;
            let previous = previous_checkpoint
                .map(|path| {
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("couldn't read {}", path.display()))
                })
                .transpose()?;
            let outcome = tokio::task::spawn_blocking(move || {
                verify(file, data_dir, &key, previous.as_deref())
            })
            .await??;
            return report_verification(outcome, json);
        }
        Command::VerifyTrace {
            bundle,
            ledger_key,
            json,
        } => {
            let key = read_ledger_key(&ledger_key)?;
            let bytes = std::fs::read(&bundle)
                .with_context(|| format!("couldn't read {}", bundle.display()))?;
            let outcome = TraceBundle::decode(bytes.as_slice())
                .map_err(|e| format!("not a trace bundle: {e}"))
                .and_then(|b| verify::verify_trace_bundle(&b, &key).map_err(|e| e.to_string()));
            return Ok(report_trace(outcome, json));
        }
        Command::RotateKey { step, data_dir } => {
            let outcome =
                tokio::task::spawn_blocking(move || server::rotate_key(&data_dir, step.into()))
                    .await?;
            match outcome {
                Ok(outcome) => {
                    let value = serde_json::json!({
                        "receipt": receipt_json(&outcome.receipt),
                        "checkpoint_keys": outcome.verifier_keys,
                        "generated_next_key": outcome.generated,
                    });
                    println!("{}", serde_json::to_string_pretty(&value)?);
                }
                Err(server::ServerError::Ledger(custody::ledger::LedgerError::Rotation(
                    refusal,
                ))) => {
                    return Ok(Err(Failure::Refused(format!(
                        "key rotation refused: {refusal}"
                    ))))
                }
                Err(other) => return Err(other.into()),
            }
        }
        Command::StoreStats { data_dir } => {
            tokio::task::spawn_blocking(move || store_stats(&data_dir)).await??;
        }
        Command::GrantKey {
            server,
            tls,
            admin_key,
            public_key,
            role,
            principal,
            not_after_ms,
        } => {
            let text = std::fs::read_to_string(&admin_key)
                .with_context(|| format!("couldn't read {}", admin_key.display()))?;
            let pair: KeyPairJson = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a key JSON file", admin_key.display()))?;
            let signing_key = pair
                .signing_key()
                .map_err(|e| anyhow!("{}: {e}", admin_key.display()))?;
            let public_key = parse_public_key(&public_key)?;
            let now = custody::ledger::now_ms();
            let event = Event {
                event_id: format!("key-grant-{}-{now}", envelope::key_id(&public_key)),
                occurred_at_ms: now,
                body: Some(event::Body::KeyGrant(KeyGrant {
                    public_key: public_key.to_vec(),
                    role: Role::from(role) as i32,
                    principal,
                    not_before_ms: 0,
                    not_after_ms,
                })),
            };
            let signed = envelope::sign_event(&signing_key, &event);
            let channel = custody::client::connect(&server, &tls.security()).await?;
            match LedgerClient::new(channel).append(signed).await {
                Ok(receipt) => println!("{}", receipt_json(&receipt.into_inner())),
                Err(status) => return Ok(Err(refused(&status))),
            }
        }
    }
    Ok(Ok(()))
}

/// Reads `--ledger-key`: the key string itself, or `@path`.
fn read_ledger_key(arg: &str) -> anyhow::Result<LedgerVerifier> {
    let text = match arg.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("couldn't read {path}"))?
        }
        None => arg.to_owned(),
    };
    LedgerVerifier::parse(&text).map_err(|e| anyhow!("--ledger-key: {e}"))
}

fn store_stats(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let db = data_dir.join("db");
    let store = Store::open(&db).with_context(|| format!("couldn't open {}", db.display()))?;
    let usage = store.usage()?;
    let on_disk = custody::store::directory_bytes(&db)
        .with_context(|| format!("couldn't read {}", db.display()))?;
    let in_file = store.entries_in_file();
    let name = |prefix: u8| match prefix {
        keys::ENTRY if in_file => "entries (file)",
        keys::ENTRY => "entries",
        keys::OFFSETS => "entry offsets",
        keys::HASH_PAGE if in_file => "hashes (file)",
        keys::HASH_PAGE => "hash pages",
        keys::EVENT_ID => "event ids",
        keys::KEY => "key registry",
        keys::CONSENT => "consents",
        keys::TOKEN => "tokens",
        keys::INDEX => "index postings",
        keys::META => "metadata",
        _ => "other",
    };
    let row = |kind: &str,
               keys: &dyn std::fmt::Display,
               key: &dyn std::fmt::Display,
               value: &dyn std::fmt::Display| {
        outln!("{kind:<16} {keys:>12} {key:>14} {value:>14}");
    };
    row("kind", &"keys", &"key bytes", &"value bytes");
    let mut total = (0u64, 0u64, 0u64);
    for usage in &usage {
        row(
            name(usage.prefix),
            &usage.keys,
            &usage.key_bytes,
            &usage.value_bytes,
        );
        total.0 += usage.keys;
        total.1 += usage.key_bytes;
        total.2 += usage.value_bytes;
    }
    row("total", &total.0, &total.1, &total.2);
    let entry_bytes = usage
        .iter()
        .find(|row| row.prefix == keys::ENTRY)
        .map_or(0, |row| row.value_bytes);
    let size = |name: &str| std::fs::metadata(db.join(name)).map_or(0, |m| m.len());
    let entries_file = size(custody::store::entrylog::FILE_NAME);
    let hashes_file = size(custody::store::hashlog::FILE_NAME);
    // Tails cut off the entries file on open (see `store::entrylog`), kept beside it.
    let cut_prefix = format!("{}.cut-", custody::store::entrylog::FILE_NAME);
    let cut_files: u64 = std::fs::read_dir(&db)
        .with_context(|| format!("couldn't read {}", db.display()))?
        .filter_map(Result::ok)
        .filter(|item| item.file_name().to_string_lossy().starts_with(&cut_prefix))
        .filter_map(|item| item.metadata().ok())
        .map(|meta| meta.len())
        .sum();
    outln!(
        "on disk: {on_disk} bytes in {} (entries file {entries_file}, hashes file {hashes_file}, \
         cut-off tails {cut_files}, sled {}); {:.2} x the entries' bytes",
        db.display(),
        on_disk.saturating_sub(entries_file + hashes_file + cut_files),
        on_disk as f64 / entry_bytes.max(1) as f64
    );
    Ok(())
}

async fn export(
    server: Option<String>,
    tls: &ClientTls,
    data_dir: Option<PathBuf>,
    out: PathBuf,
) -> anyhow::Result<Result<(), Failure>> {
    // Everything is written to `<out>.partial`, synced, then renamed: `out` is whole or absent.
    // The partial file is created only once the source has answered, and removed on failure.
    let partial = out.with_extension("partial");
    let create = || -> anyhow::Result<std::io::BufWriter<std::fs::File>> {
        let file = std::fs::File::create(&partial)
            .with_context(|| format!("couldn't create {}", partial.display()))?;
        Ok(std::io::BufWriter::new(file))
    };
    let written: anyhow::Result<(std::io::BufWriter<std::fs::File>, u64)> = match (server, data_dir)
    {
        (Some(server), _) => {
            let mut client = connect_audit(&server, tls).await?;
            let checkpoint = match client.get_checkpoint(GetCheckpointRequest {}).await {
                Ok(checkpoint) => checkpoint.into_inner(),
                Err(status) => return Ok(Err(refused(&status))),
            };
            let request = GetEntriesRequest {
                start: 0,
                end: checkpoint.tree_size,
            };
            let mut stream = match client.get_entries(request).await {
                Ok(stream) => stream.into_inner(),
                Err(status) => return Ok(Err(refused(&status))),
            };
            let mut writer = create()?;
            async {
                export::write_header(&mut writer, &checkpoint.note)?;
                let mut count = 0u64;
                while let Some(stored) = stream.next().await {
                    export::write_record(&mut writer, &stored?.entry)?;
                    count += 1;
                }
                Ok(count)
            }
            .await
            .map(|count| (writer, count))
        }
        (None, Some(dir)) => {
            let store = Store::open(&dir.join("db"))
                .with_context(|| format!("couldn't open the ledger in {}", dir.display()))?;
            let head = store
                .head()?
                .ok_or_else(|| anyhow!("{} holds no checkpoint", dir.display()))?;
            let mut writer = create()?;
            (|| {
                export::write_header(&mut writer, &head.checkpoint)?;
                let mut count = 0u64;
                for item in store.entries(0, head.tree_size) {
                    export::write_record(&mut writer, &item?.1)?;
                    count += 1;
                }
                Ok(count)
            })()
            .map(|count| (writer, count))
        }
        (None, None) => return Err(anyhow!("give --server or --data-dir")),
    };
    let finished = written.and_then(|(writer, count)| {
        writer
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()?;
        std::fs::rename(&partial, &out)
            .with_context(|| format!("couldn't write {}", out.display()))?;
        Ok(count)
    });
    match finished {
        Ok(count) => {
            eprintln!("exported {count} entries to {}", out.display());
            Ok(Ok(()))
        }
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            Err(error)
        }
    }
}

/// Runs a verification; the outer error is usage or I/O (exit 2).
fn verify(
    file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    key: &LedgerVerifier,
    previous: Option<&str>,
) -> anyhow::Result<Result<verify::LedgerReport, verify::IntegrityFailure>> {
    let progress = Progress::new();
    let state = DiskState::new().context("couldn't create the scratch files")?;
    let show = |done, total| progress.show(done, total);
    let outcome = match (file, data_dir) {
        (Some(path), _) => {
            let file = std::fs::File::open(&path)
                .with_context(|| format!("couldn't open {}", path.display()))?;
            let reader = std::io::BufReader::with_capacity(1 << 20, file);
            verify::verify_export_with(reader, key, previous, state, show)
                .with_context(|| format!("couldn't read {}", path.display()))?
        }
        (None, Some(dir)) => {
            let store = Store::open(&dir.join("db"))
                .with_context(|| format!("couldn't open the ledger in {}", dir.display()))?;
            let Some(head) = store.head()? else {
                return Ok(Err(verify::IntegrityFailure::Malformed(
                    "the directory holds no checkpoint".into(),
                )));
            };
            let entries = store
                .entries(0, u64::MAX)
                .map(|item| item.map(|(_, bytes)| bytes));
            verify::verify_entries(&head.checkpoint, entries, key, previous, state, show)?
        }
        (None, None) => return Err(anyhow!("give an export FILE or --data-dir")),
    };
    progress.clear();
    Ok(outcome)
}

/// A progress line on stderr, only when it is a terminal and the run is long.
struct Progress {
    enabled: bool,
}

impl Progress {
    fn new() -> Self {
        use std::io::IsTerminal as _;
        Self {
            enabled: std::io::stderr().is_terminal(),
        }
    }

    fn show(&self, done: u64, total: u64) {
        if self.enabled && total >= 10_000 && done.is_multiple_of((total / 100).max(1)) {
            eprint!(
                "\rverifying: {done}/{total} entries ({}%)",
                done * 100 / total.max(1)
            );
        }
    }

    fn clear(&self) {
        if self.enabled {
            eprint!("\r\x1b[2K");
        }
    }
}

fn report_verification(
    outcome: Result<verify::LedgerReport, verify::IntegrityFailure>,
    json: bool,
) -> anyhow::Result<Result<(), Failure>> {
    if let Err(verify::IntegrityFailure::State(why)) = &outcome {
        return Err(anyhow!("couldn't keep the replay state: {why}"));
    }
    Ok(match outcome {
        Err(failure) => {
            if json {
                let value = serde_json::json!({ "result": "integrity_failure", "seq": failure.seq(), "failure": failure.to_string() });
                outln!("{value}");
            } else {
                match failure.seq() {
                    Some(seq) => outln!("FAILED at entry {seq}: {failure}"),
                    None => outln!("FAILED: {failure}"),
                }
            }
            Err(Failure::Integrity)
        }
        Ok(report) => {
            let findings = report.violations_total > 0;
            if json {
                let result = if findings { "findings" } else { "verified" };
                outln!(
                    "{}",
                    serde_json::json!({ "result": result, "report": report })
                );
            } else {
                outln!(
                    "VERIFIED: ledger {}, {} entries, root {}",
                    report.origin,
                    report.tree_size,
                    report.root
                );
                if let Some(previous) = report.extends_previous {
                    outln!("  extends the previous checkpoint of {previous} entries");
                }
                outln!("  checkpoint signed by: {}", report.ledger_keys.join(", "));
                match report.trusted_key {
                    custody::trust::KeyStatus::Next { since } => outln!(
                        "  note: the trusted key is the next key of the rotation begun at entry {since}, not yet finished; until it is, the current key is the stronger anchor"
                    ),
                    custody::trust::KeyStatus::Retired { at } => outln!(
                        "  warning: the trusted key was retired at entry {at}; this ledger's key is now {}. A retired key that leaked could sign a forged history: trust the current key from now on",
                        report.ledger_keys.first().map(String::as_str).unwrap_or("?")
                    ),
                    _ => {}
                }
                let kinds: Vec<String> = report
                    .entries_by_kind
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                outln!("  entries by kind: {}", kinds.join(", "));
                outln!(
                    "  actions traced: {} of {}",
                    report.actions_traced,
                    report.actions
                );
                outln!("  violations recorded: {}", report.violations_total);
                if report.violations_total > report.violations.len() as u64 {
                    outln!("  (the first {} are listed)", report.violations.len());
                }
                for v in &report.violations {
                    outln!(
                        "    seq {} {} user={} agent={}: {}",
                        v.seq,
                        v.kind,
                        v.user,
                        v.agent,
                        v.reasons.join(", ")
                    );
                }
            }
            if findings {
                Err(Failure::Findings)
            } else {
                Ok(())
            }
        }
    })
}

fn report_trace(outcome: Result<verify::TraceReport, String>, json: bool) -> Result<(), Failure> {
    match outcome {
        Err(failure) => {
            if json {
                outln!(
                    "{}",
                    serde_json::json!({ "result": "integrity_failure", "failure": failure })
                );
            } else {
                outln!("FAILED: {failure}");
            }
            Err(Failure::Integrity)
        }
        Ok(report) => {
            let violation = report.verdict.status == TraceStatus::Violation as i32;
            if json {
                let result = if violation { "findings" } else { "verified" };
                outln!(
                    "{}",
                    serde_json::json!({ "result": result, "seq": report.seq, "tree_size": report.tree_size, "entries": report.entries, "verdict": inspect::verdict_json(&report.verdict) })
                );
            } else {
                outln!(
                    "VERIFIED: entry {} against a checkpoint of {} entries ({} entries in the bundle); verdict {}",
                    report.seq,
                    report.tree_size,
                    report.entries,
                    inspect::verdict_json(&report.verdict)
                );
            }
            if violation {
                return Err(Failure::Findings);
            }
            Ok(())
        }
    }
}

fn refused(status: &tonic::Status) -> Failure {
    Failure::Refused(format!("{:?}: {}", status.code(), status.message()))
}

async fn connect_audit(
    server: &str,
    tls: &ClientTls,
) -> anyhow::Result<AuditClient<custody::client::ClientChannel>> {
    Ok(AuditClient::new(
        custody::client::connect(server, &tls.security()).await?,
    ))
}

fn bundle_json(bundle: &TraceBundle) -> serde_json::Value {
    serde_json::json!({
        "seq": bundle.seq,
        "verdict": bundle.verdict.as_ref().map(inspect::verdict_json),
        "checkpoint": bundle.checkpoint.as_ref().map(|c| c.note.clone()),
        "entries": bundle.entries.iter().map(|e| inspect::entry_json(&e.entry)).collect::<Vec<_>>(),
        "proofs": bundle.proofs.iter().map(|p| serde_json::json!({
            "seq": p.seq,
            "tree_size": p.tree_size,
            "hashes": p.hashes.iter().map(hex::encode).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn parse_public_key(hex_key: &str) -> anyhow::Result<[u8; 32]> {
    let bytes = hex::decode(hex_key.trim()).context("public key is not hex")?;
    let key = envelope::parse_public_key(&bytes).map_err(|e| anyhow!("public key: {e}"))?;
    Ok(key.to_bytes())
}

fn receipt_json(receipt: &Receipt) -> serde_json::Value {
    let verdict = receipt.verdict.clone().unwrap_or_default();
    serde_json::json!({
        "event_id": receipt.event_id,
        "seq": receipt.seq,
        "leaf_hash": hex::encode(&receipt.leaf_hash),
        "duplicate": receipt.duplicate,
        "verdict": inspect::verdict_json(&verdict),
        "checkpoint": receipt.checkpoint,
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn serve(config: Config, listen: SocketAddr) -> anyhow::Result<()> {
    // Checked again on the bound address; here so a refusal comes before "listening".
    config.security.check(listen)?;
    let listener = server::bind(listen).await?;
    tracing::info!(
        address = %listener.local_addr()?,
        data_dir = %config.data_dir.display(),
        "listening; health is NOT_SERVING until the ledger is open"
    );
    let pub_path = config.data_dir.join("ledger.pub");
    let opened = move |ledger: &custody::ledger::Ledger, startup: &server::Startup| {
        if startup.created {
            tracing::info!(
                origin = ledger.origin(),
                "created a new ledger (genesis written)"
            );
        }
        if let Some(path) = &startup.generated_admin_key {
            tracing::warn!(path = %path.display(), "generated the first admin key; keep this file secret");
        }
        tracing::info!(
            verifier_key = %ledger.verifier_key(),
            path = %pub_path.display(),
            tree_size = ledger.head().tree_size,
            "ledger key (give this to auditors)"
        );
        if let Some(next) = ledger.verifier_keys().get(1) {
            tracing::info!(
                verifier_key = %next,
                "a ledger key rotation is under way: checkpoints are signed by this next key too"
            );
        }
        tracing::info!("serving custody.v1.Ledger and custody.v1.Audit");
    };
    server::open_and_run(listener, config, opened, shutdown_signal()).await?;
    tracing::info!("stopped cleanly; everything acknowledged is on disk");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(%e, "couldn't listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(%e, "couldn't listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT: shutting down"),
        () = terminate => tracing::info!("SIGTERM: shutting down"),
    }
}
