//! The `custody` command: a thin layer over the library.
//!
//! Exit codes: 0 success; 1 the server refused the request; 2 usage, I/O or connection error.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use prost::Message as _;

use custody::envelope;
use custody::proto::{
    audit_client::AuditClient, event, ledger_client::LedgerClient, Event, GetCheckpointRequest,
    KeyGrant, Receipt, Role, SignedEvent, TraceStatus,
};
use custody::server::{self, Config, KeyPairJson};

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
    /// Runs the ledger: creates it (keys, genesis) on first start, then serves gRPC.
    Serve {
        /// Where the database and keys live.
        #[arg(long, default_value = server::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = server::DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// The log's origin (new ledger; must match an existing one) [default: localhost/custody].
        #[arg(long)]
        origin: Option<String>,
        /// Hex Ed25519 public key of the first admin (new ledger). Generated into
        /// <data-dir>/admin.key when absent.
        #[arg(long, value_name = "HEX")]
        admin_public_key: Option<String>,
        /// How far an event's occurred_at_ms may stray from the ledger clock (new ledger).
        #[arg(long, default_value_t = server::DEFAULT_MAX_CLOCK_SKEW_MS)]
        max_clock_skew_ms: i64,
    },
    /// Prints a new Ed25519 key pair as JSON (secret_key hex seed, public_key hex, key_id).
    Keygen,
    /// Prints the table of verdict reason codes (Markdown, as in docs/REASONS.md).
    Reasons,
    /// Prints the ledger's newest signed checkpoint note.
    Checkpoint {
        /// The ledger's gRPC address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
    },
    /// Registers a key: sends an admin-signed KeyGrant and prints the receipt as JSON.
    GrantKey {
        /// The ledger's gRPC address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
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

/// An outcome the CLI reports with exit code 1 rather than 2.
struct Refused(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("custody: couldn't start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(Refused(message))) => {
            eprintln!("custody: refused: {message}");
            ExitCode::from(1)
        }
        Err(error) => {
            eprintln!("custody: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<Result<(), Refused>> {
    match cli.command {
        Command::Serve {
            data_dir,
            listen,
            origin,
            admin_public_key,
            max_clock_skew_ms,
        } => {
            init_logging();
            let mut config = Config::new(data_dir);
            config.origin = origin;
            config.max_clock_skew_ms = max_clock_skew_ms;
            config.admin_public_key = admin_public_key
                .map(|hex_key| parse_public_key(&hex_key))
                .transpose()?;
            serve(config, listen).await?;
        }
        Command::Keygen => {
            let pair = KeyPairJson::from_signing_key(&server::generate_key());
            println!("{}", serde_json::to_string_pretty(&pair)?);
        }
        Command::Reasons => print!("{}", custody::trust::reasons::markdown_table()),
        Command::Checkpoint { server } => {
            let mut client = AuditClient::connect(server.clone())
                .await
                .with_context(|| format!("couldn't connect to {server}"))?;
            let checkpoint = client
                .get_checkpoint(GetCheckpointRequest {})
                .await?
                .into_inner();
            print!("{}", checkpoint.note);
        }
        Command::GrantKey {
            server,
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
            let payload = event.encode_to_vec();
            let signed = SignedEvent {
                signature: envelope::sign_payload(&signing_key, &payload).to_vec(),
                key_id: pair.key_id.clone(),
                payload,
            };
            let mut client = LedgerClient::connect(server.clone())
                .await
                .with_context(|| format!("couldn't connect to {server}"))?;
            match client.append(signed).await {
                Ok(receipt) => println!("{}", receipt_json(&receipt.into_inner())),
                Err(status) => {
                    return Ok(Err(Refused(format!(
                        "{:?}: {}",
                        status.code(),
                        status.message()
                    ))))
                }
            }
        }
    }
    Ok(Ok(()))
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
        "verdict": {
            "status": TraceStatus::try_from(verdict.status).map(|s| s.as_str_name()).unwrap_or("UNKNOWN"),
            "reasons": verdict.reasons,
            "rules_version": verdict.rules_version,
        },
        "checkpoint": receipt.checkpoint,
    })
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

async fn serve(config: Config, listen: SocketAddr) -> anyhow::Result<()> {
    let (ledger, startup) = server::open_ledger(&config)?;
    if startup.created {
        tracing::info!(
            origin = ledger.origin(),
            "created a new ledger (genesis written)"
        );
    }
    if let Some(path) = &startup.generated_admin_key {
        tracing::warn!(path = %path.display(), "generated the first admin key; keep this file secret");
    }
    let head = ledger.head();
    tracing::info!(
        verifier_key = %ledger.verifier_key(),
        path = %config.data_dir.join("ledger.pub").display(),
        tree_size = head.tree_size,
        "ledger key (give this to auditors)"
    );
    let listener = server::bind(listen).await?;
    tracing::info!(address = %listener.local_addr()?, "serving custody.v1.Ledger and custody.v1.Audit");
    server::run(listener, ledger, config.queue, shutdown_signal()).await?;
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
