//! Configuration, the data directory, the listener, health and reflection, and shutdown.
//!
//! Data directory layout (created on first start):
//!
//! | path | what |
//! | --- | --- |
//! | `db/` | the sled database |
//! | `ledger.key` | the current ledger key's Ed25519 seed, hex (mode 0600); signs checkpoints (the first also signed the genesis) |
//! | `ledger.pub` | the C2SP verifier key string auditors are given |
//! | `ledger.next.key` | during a ledger key rotation, the next key's seed (mode 0600) |
//! | `ledger.next.pub` | during a ledger key rotation, the next key's verifier key string |
//! | `admin.key` | the first admin key as JSON (mode 0600), only when the server generated it |
//!
//! A key rotation ([`rotate_key`]) writes `ledger.next.key` before its BEGIN entry, and after
//! its FINISH entry renames it over `ledger.key` (after a CANCEL it removes it). A crash
//! between the entry and the file step is settled the next time the ledger is opened.

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::checkpoint;
use crate::envelope;
use crate::ledger::{GenesisParams, Ledger, LedgerError};
use crate::metrics::Metrics;
use crate::proto::{audit_server::AuditServer, ledger_server::LedgerServer};
use crate::service::opening::Opening;
use crate::service::{
    closed, AuditService, CommitQueue, LedgerService, OpenStreams, QueueLimits, StreamLimits,
};
use crate::store::Store;
use crate::tls::{Security, Transport};

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./custody-data";
/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default origin (checkpoint first line and note key name).
pub const DEFAULT_ORIGIN: &str = "localhost/custody";
/// Default bound on `|occurred_at_ms - ledger clock|`.
pub const DEFAULT_MAX_CLOCK_SKEW_MS: i64 = 300_000;
/// How long shutdown waits for open calls to finish before closing their connections.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default: largest gRPC message the server decodes; a larger one is refused with
/// `OUT_OF_RANGE` before anything is read from it.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// How to start the ledger.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the database and keys live.
    pub data_dir: PathBuf,
    /// The log's origin; on an existing ledger it must match the genesis (or be `None`).
    pub origin: Option<String>,
    /// The first admin key for a new ledger; generated (and saved to `admin.key`) if `None`.
    pub admin_public_key: Option<[u8; 32]>,
    /// Clock-skew bound recorded in a new ledger's genesis.
    pub max_clock_skew_ms: i64,
    /// Group-commit sizes.
    pub queue: QueueLimits,
    /// How long shutdown waits for open calls to finish.
    pub drain_timeout: Duration,
    /// Largest gRPC message decoded (requests and each streamed event).
    pub max_message_bytes: usize,
    /// Open streams and in-flight events per stream.
    pub streams: StreamLimits,
    /// Where to serve Prometheus metrics over HTTP (`GET /metrics`); none by default.
    pub metrics_listen: Option<SocketAddr>,
    /// TLS, client certificates, access control and the plaintext rule (see [`crate::tls`]).
    pub security: Security,
}

impl Config {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            origin: None,
            admin_public_key: None,
            max_clock_skew_ms: DEFAULT_MAX_CLOCK_SKEW_MS,
            queue: QueueLimits::default(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_message_bytes: MAX_MESSAGE_BYTES,
            streams: StreamLimits::default(),
            metrics_listen: None,
            security: Security::default(),
        }
    }
}

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Reading or writing the data directory failed.
    #[error("couldn't {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A key file is malformed.
    #[error("{path}: {message}")]
    KeyFile { path: PathBuf, message: String },
    /// The configuration contradicts the existing ledger or itself.
    #[error("{0}")]
    Config(String),
    /// The ledger could not be created or opened.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A TLS certificate, key or client CA file could not be read or used.
    #[error("couldn't load the TLS {what} {path}: {message}")]
    Tls {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    /// The gRPC transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// What happened while opening, for the operator.
#[derive(Debug, Clone, Default)]
pub struct Startup {
    /// A new ledger was created (genesis written).
    pub created: bool,
    /// Where a generated admin secret key was written.
    pub generated_admin_key: Option<PathBuf>,
}

/// A new Ed25519 key pair as `custody keygen` prints it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct KeyPairJson {
    /// The 32-byte seed, hex.
    pub secret_key: String,
    /// The 32-byte public key, hex.
    pub public_key: String,
    /// The key id (hex of the first 16 bytes of SHA-256 of the public key).
    pub key_id: String,
}

impl KeyPairJson {
    /// Describes `key`.
    pub fn from_signing_key(key: &SigningKey) -> Self {
        let public_key = key.verifying_key().to_bytes();
        Self {
            secret_key: hex::encode(key.to_bytes()),
            public_key: hex::encode(public_key),
            key_id: envelope::key_id(&public_key),
        }
    }

    /// The signing key this describes; checks that the public key and id match the seed.
    pub fn signing_key(&self) -> Result<SigningKey, String> {
        let key = parse_seed(&self.secret_key)?;
        if hex::encode(key.verifying_key().to_bytes()) != self.public_key.to_ascii_lowercase() {
            return Err("public_key does not belong to secret_key".into());
        }
        Ok(key)
    }
}

/// Parses a hex-encoded 32-byte Ed25519 seed.
pub fn parse_seed(hex_seed: &str) -> Result<SigningKey, String> {
    let bytes = hex::decode(hex_seed.trim()).map_err(|e| format!("secret key is not hex: {e}"))?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("secret key must be 32 bytes, got {}", b.len()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A fresh random Ed25519 key.
pub fn generate_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ServerError {
    let path = path.to_owned();
    move |source| ServerError::Io { what, path, source }
}

/// Writes `contents` to a new file readable only by its owner (0600), durably and whole or
/// not at all: into `<path>.tmp` (fsynced), then linked as `path` (which fails if `path`
/// exists: nothing is replaced), then the directory is fsynced.
fn write_secret(path: &Path, contents: &str) -> Result<(), ServerError> {
    let tmp = tmp_path(path);
    // Left by a crash mid-write: never linked, so never used.
    if tmp.exists() {
        std::fs::remove_file(&tmp).map_err(io_error("remove", &tmp))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    write_synced(&options, &tmp, contents)?;
    std::fs::hard_link(&tmp, path).map_err(io_error("create", path))?;
    std::fs::remove_file(&tmp).map_err(io_error("remove", &tmp))?;
    sync_dir(path)
}

/// Makes the directory entries of `path`'s directory durable.
fn sync_dir(path: &Path) -> Result<(), ServerError> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("sync", dir)),
        None => Ok(()),
    }
}

fn read_ledger_key(path: &Path) -> Result<SigningKey, ServerError> {
    let text = std::fs::read_to_string(path).map_err(io_error("read", path))?;
    parse_seed(&text).map_err(|message| ServerError::KeyFile {
        path: path.to_owned(),
        message,
    })
}

/// The current ledger key's seed in the data directory.
const LEDGER_KEY: &str = "ledger.key";
/// The current ledger key's verifier key string.
const LEDGER_PUB: &str = "ledger.pub";
/// The next ledger key's seed while a rotation is under way.
const NEXT_KEY: &str = "ledger.next.key";
/// The next ledger key's verifier key string while a rotation is under way.
const NEXT_PUB: &str = "ledger.next.pub";

/// The private ledger keys in `dir`: `ledger.key`, and `ledger.next.key` if present. An
/// unreadable `ledger.next.key` is left out: if a rotation needs it, opening the ledger says
/// so (and `rotate-key cancel` works without it); if none does, [`settle_key_files`] warns.
fn keyring(dir: &Path) -> Result<Vec<SigningKey>, ServerError> {
    let mut keys = vec![read_ledger_key(&dir.join(LEDGER_KEY))?];
    let next = dir.join(NEXT_KEY);
    if next.exists() {
        keys.extend(read_ledger_key(&next).ok());
    }
    Ok(keys)
}

/// Opens the existing ledger in `dir` (its store already open) with the keys in `dir`, then
/// settles the key files with what the entries record.
fn open_existing(dir: &Path, store: Store) -> Result<Ledger, ServerError> {
    let ledger = Ledger::open(store, &keyring(dir)?)?;
    settle_key_files(dir, &ledger)?;
    Ok(ledger)
}

/// Brings the key files in line with the ledger keys the entries record: finishes the file
/// step of a rotation step that a crash interrupted (renames a `ledger.next.key` that holds
/// the current key over `ledger.key`; removes one whose key can never sign again) and
/// rewrites `ledger.pub` and `ledger.next.pub`.
fn settle_key_files(dir: &Path, ledger: &Ledger) -> Result<(), ServerError> {
    let keys = ledger.ledger_keys();
    let next_path = dir.join(NEXT_KEY);
    let next_file = next_path.exists().then(|| read_ledger_key(&next_path));
    if let Some(Err(error)) = &next_file {
        // Not in use (the ledger opened without it): leave it for the operator.
        tracing::warn!(%error, "ledger.next.key is unreadable and no rotation needs it");
    }
    if let Some(Ok(next)) = next_file {
        let public = next.verifying_key().to_bytes();
        if public == *keys.current() {
            tracing::info!(
                "finishing an interrupted key rotation: ledger.next.key becomes ledger.key"
            );
            replace_file(&next_path, &dir.join(LEDGER_KEY))?;
        } else if keys.next() != Some(&public) && keys.ever_used(&public) {
            tracing::info!("removing ledger.next.key: its rotation was cancelled");
            std::fs::remove_file(&next_path).map_err(io_error("remove", &next_path))?;
        } else if keys.next().is_none() {
            tracing::warn!(
                "ledger.next.key holds a key no rotation uses yet; `custody rotate-key begin` will use it"
            );
        }
    }
    let verifier_keys = ledger.verifier_keys();
    write_public(&dir.join(LEDGER_PUB), &verifier_keys[0])?;
    let next_pub = dir.join(NEXT_PUB);
    match verifier_keys.get(1) {
        Some(next) => write_public(&next_pub, next)?,
        None if next_pub.exists() => {
            std::fs::remove_file(&next_pub).map_err(io_error("remove", &next_pub))?
        }
        None => {}
    }
    Ok(())
}

/// Writes a public key file (a verifier key string and a newline) whole: into `<path>.tmp`,
/// synced, then renamed over `path`.
fn write_public(path: &Path, key: &str) -> Result<(), ServerError> {
    let tmp = tmp_path(path);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    write_synced(&options, &tmp, &format!("{key}\n"))?;
    replace_file(&tmp, path)
}

/// Opens `path` with `options`, writes `contents` and syncs the file.
fn write_synced(
    options: &std::fs::OpenOptions,
    path: &Path,
    contents: &str,
) -> Result<(), ServerError> {
    let mut file = options.open(path).map_err(io_error("create", path))?;
    file.write_all(contents.as_bytes())
        .map_err(io_error("write", path))?;
    file.sync_all().map_err(io_error("sync", path))
}

/// `<path>.tmp`.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Renames `from` over `to` and makes the rename durable.
fn replace_file(from: &Path, to: &Path) -> Result<(), ServerError> {
    std::fs::rename(from, to).map_err(io_error("rename", from))?;
    sync_dir(to)
}

/// A step of a ledger key rotation (see [`rotate_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationStep {
    /// Start signing checkpoints with a next key too.
    Begin,
    /// Make the next key the ledger key.
    Finish,
    /// Withdraw the next key.
    Cancel,
}

/// What a rotation step did.
#[derive(Debug, Clone)]
pub struct RotationOutcome {
    /// The receipt of the step's entry.
    pub receipt: crate::proto::Receipt,
    /// The verifier key strings that sign checkpoints from the step on (the current key, then
    /// the next key during a rotation).
    pub verifier_keys: Vec<String>,
    /// For a begin: whether the next key was generated (rather than taken from an existing
    /// `ledger.next.key`).
    pub generated: bool,
}

/// Takes one step of a ledger key rotation on the stopped ledger in `data_dir` (the
/// database is locked while a server runs):
///
/// - **begin**: uses `ledger.next.key` if it exists (not a symbolic link, accessible to its
///   owner only, owned by `ledger.key`'s owner), else generates it (see [`write_secret`]),
///   then appends the BEGIN entry signed by the current key. Checkpoints
///   from then on carry the signatures of both keys; `ledger.next.pub` holds the next key's
///   verifier key.
/// - **finish**: appends the FINISH entry signed by the next key, then renames
///   `ledger.next.key` over `ledger.key` (the old seed's file is unlinked; its bytes may
///   remain on the disk until overwritten).
/// - **cancel**: appends the CANCEL entry signed by the current key (the next key's
///   private half is not needed: it may be lost), then removes `ledger.next.key`.
///
/// Each entry is durable before its file step; a crash between the two is settled the next
/// time the ledger is opened.
pub fn rotate_key(data_dir: &Path, step: RotationStep) -> Result<RotationOutcome, ServerError> {
    let open_store = || -> Result<Store, ServerError> {
        let store = Store::open(&data_dir.join("db")).map_err(LedgerError::from)?;
        if !store.has_entries().map_err(LedgerError::from)? {
            return Err(ServerError::Config(format!(
                "{} holds no ledger",
                data_dir.display()
            )));
        }
        Ok(store)
    };
    let next_path = data_dir.join(NEXT_KEY);
    let mut generated = false;
    let receipt = match step {
        RotationStep::Begin => {
            let mut ledger = open_existing(data_dir, open_store()?)?;
            let next = if next_path.exists() {
                read_owner_only_key(&next_path, &data_dir.join(LEDGER_KEY))?
            } else {
                let key = loop {
                    let key = generate_key();
                    if !ledger.note_key_id_collides(&key.verifying_key()) {
                        break key;
                    }
                };
                write_secret(&next_path, &format!("{}\n", hex::encode(key.to_bytes())))?;
                generated = true;
                key
            };
            ledger.begin_key_rotation(next)?
        }
        RotationStep::Finish => {
            let mut ledger = open_existing(data_dir, open_store()?)?;
            let receipt = ledger.finish_key_rotation()?;
            replace_file(&next_path, &data_dir.join(LEDGER_KEY)).map_err(|error| {
                ServerError::Config(format!(
                    "the FINISH is recorded (entry {}), but {error}; the next start of the \
                     ledger completes the file step",
                    receipt.seq
                ))
            })?;
            receipt
        }
        RotationStep::Cancel => {
            let receipt =
                Ledger::cancel_key_rotation_without_next_key(open_store()?, &keyring(data_dir)?)?;
            // A readable next key file is settled below (removed if it holds the withdrawn
            // key, kept if it holds another); an unreadable one belonged to this rotation.
            if next_path.exists() && read_ledger_key(&next_path).is_err() {
                std::fs::remove_file(&next_path).map_err(io_error("remove", &next_path))?;
            }
            receipt
        }
    };
    // Reopened: opening settles the key files; report the keys that sign now.
    let ledger = open_existing(data_dir, open_store()?)?;
    Ok(RotationOutcome {
        receipt,
        verifier_keys: ledger.verifier_keys(),
        generated,
    })
}

/// Reads a key file supplied by the operator (`ledger.next.key` before a begin), refusing one
/// that is a symbolic link, that others than its owner may read or change, or whose owner is
/// not `ledger.key`'s. The checks and the read are on one open file.
fn read_owner_only_key(path: &Path, owner_of: &Path) -> Result<SigningKey, ServerError> {
    #[cfg(unix)]
    {
        use std::io::Read as _;
        use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
        let refuse = |message: String| ServerError::KeyFile {
            path: path.to_owned(),
            message,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| {
                refuse(format!(
                    "couldn't open it (a symbolic link is refused): {e}"
                ))
            })?;
        let metadata = file.metadata().map_err(io_error("inspect", path))?;
        let mode = metadata.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(refuse(format!(
                "mode {mode:o} lets others read or change it: `chmod 600` it, or remove it to \
                 have a fresh key generated"
            )));
        }
        let owner = std::fs::metadata(owner_of)
            .map_err(io_error("inspect", owner_of))?
            .uid();
        if metadata.uid() != owner {
            return Err(refuse(format!(
                "it belongs to user {}, not to the owner of {} (user {owner})",
                metadata.uid(),
                owner_of.display()
            )));
        }
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(io_error("read", path))?;
        parse_seed(&text).map_err(refuse)
    }
    #[cfg(not(unix))]
    {
        let _ = owner_of;
        read_ledger_key(path)
    }
}

/// Opens the ledger in `config.data_dir`, creating it (keys, genesis) on first start.
pub fn open_ledger(config: &Config) -> Result<(Arc<Ledger>, Startup), ServerError> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).map_err(io_error("create", dir))?;
    if let Some(origin) = &config.origin {
        checkpoint::validate_origin(origin).map_err(|e| ServerError::Config(e.to_string()))?;
    }
    let store = Store::open(&dir.join("db")).map_err(LedgerError::from)?;
    let key_path = dir.join(LEDGER_KEY);
    let mut startup = Startup::default();
    let ledger = if store.has_entries().map_err(LedgerError::from)? {
        let ledger = open_existing(dir, store)?;
        if let Some(origin) = &config.origin {
            if origin != ledger.origin() {
                return Err(ServerError::Config(format!(
                    "--origin {origin:?} differs from this ledger's origin {:?}",
                    ledger.origin()
                )));
            }
        }
        ledger
    } else {
        let ledger_key = if key_path.exists() {
            read_ledger_key(&key_path)?
        } else {
            let key = generate_key();
            write_secret(&key_path, &format!("{}\n", hex::encode(key.to_bytes())))?;
            key
        };
        let admin_public_key = match config.admin_public_key {
            Some(key) => key,
            None => {
                let admin = generate_key();
                let path = dir.join("admin.key");
                let json = serde_json::to_string_pretty(&KeyPairJson::from_signing_key(&admin))
                    .map_err(|e| ServerError::Config(e.to_string()))?;
                write_secret(&path, &format!("{json}\n"))?;
                startup.generated_admin_key = Some(path);
                admin.verifying_key().to_bytes()
            }
        };
        startup.created = true;
        let params = GenesisParams {
            origin: config
                .origin
                .clone()
                .unwrap_or_else(|| DEFAULT_ORIGIN.to_owned()),
            admin_public_key,
            max_clock_skew_ms: config.max_clock_skew_ms,
        };
        let ledger = Ledger::create(store, ledger_key, &params)?;
        settle_key_files(dir, &ledger)?;
        ledger
    };
    Ok((Arc::new(ledger), startup))
}

/// Serves the `Ledger` and `Audit` services, gRPC health and reflection on `listener` until
/// `shutdown` completes, with `config`'s queue sizes, limits, drain timeout and security (its
/// data directory is not used: `ledger` is already open); then stops accepting, ends open
/// streams, lets open calls finish (for at most the drain timeout), commits and flushes what
/// was queued, and returns. With the default security (plaintext, no access control)
/// `listener` must be on a loopback address.
pub async fn run(
    listener: TcpListener,
    ledger: Arc<Ledger>,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let transport = config
        .security
        .load(listener.local_addr().map_err(listen_error)?)?;
    serve_ledger(
        listener,
        ledger,
        &config,
        Health::new(),
        &transport,
        shutdown,
    )
    .await
}

/// Binds nothing itself: serves gRPC health on `listener` at once, reporting NOT_SERVING while
/// the ledger in `config.data_dir` is opened (or created) on a blocking thread, then serves everything as
/// [`run`] does (TLS for the health server too; a bad setting or file is an error before
/// anything is served). `opened` is told the ledger
/// and what happened while opening (e.g. to log it). A `shutdown` while the ledger is
/// still opening returns once the opening has finished, without serving it. Other calls
/// during the opening get `UNAVAILABLE` ("the ledger is opening"), which clients retry.
pub async fn open_and_run(
    listener: TcpListener,
    config: Config,
    opened: impl FnOnce(&Ledger, &Startup),
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let transport = config
        .security
        .load(listener.local_addr().map_err(listen_error)?)?;
    let health = Health::new();
    set_all(&health.reporter, ServingStatus::NotServing).await;
    // Two handles on one socket: the health-only server accepts on the first while the ledger
    // opens; the full server accepts on the second. Connections waiting in the backlog at the
    // hand-over are accepted by the full server.
    let listener = listener.into_std().map_err(listen_error)?;
    let full_listener = listener.try_clone().map_err(listen_error)?;
    let opening_listener = TcpListener::from_std(listener).map_err(listen_error)?;
    let (opened_tx, opened_rx) = tokio::sync::oneshot::channel::<()>();
    let health_only = tokio::spawn(
        transport
            .server_builder()
            .add_service(health.service.clone())
            .add_service(LedgerServer::new(Opening))
            .add_service(AuditServer::new(Opening))
            .serve_with_incoming_shutdown(TcpIncoming::from(opening_listener), async {
                let _ = opened_rx.await;
            }),
    );
    let open_config = config.clone();
    let mut opening = tokio::task::spawn_blocking(move || open_ledger(&open_config));
    let mut shutdown = std::pin::pin!(shutdown);
    let opened_now = tokio::select! {
        opened = &mut opening => Some(opened),
        () = &mut shutdown => None,
    };
    let _ = opened_tx.send(());
    // The health-only server stops accepting at once, but a client may hold a health `Watch`
    // stream open on it for ever: give its calls a moment, then leave them (the shared
    // reporter keeps them up to date) rather than never serving the ledger.
    match tokio::time::timeout(Duration::from_secs(1), health_only).await {
        Ok(Ok(Err(error))) => tracing::warn!(%error, "health server during startup"),
        Ok(_) => {}
        Err(_) => tracing::debug!("health calls from startup still open; left running"),
    }
    let Some(opening) = opened_now else {
        tracing::info!("shutdown requested while the ledger was opening; waiting for it to open");
        // The opening writes keys and the genesis: let it finish before returning.
        if let Ok(Err(error)) = opening.await {
            tracing::warn!(%error, "opening the ledger failed during shutdown");
        }
        return Ok(());
    };
    let (ledger, startup) = opening.map_err(|join_error| {
        ServerError::Config(format!("opening the ledger panicked: {join_error}"))
    })??;
    opened(&ledger, &startup);
    let listener = TcpListener::from_std(full_listener).map_err(listen_error)?;
    serve_ledger(listener, ledger, &config, health, &transport, shutdown).await
}

fn listen_error(source: std::io::Error) -> ServerError {
    ServerError::Io {
        what: "listen on",
        path: PathBuf::from("the listening socket"),
        source,
    }
}

/// The gRPC health service and the handle that sets what it reports.
struct Health {
    reporter: HealthReporter,
    service: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
}

impl Health {
    fn new() -> Self {
        let reporter = HealthReporter::new();
        let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        Self {
            reporter,
            service: tonic_health::pb::health_server::HealthServer::new(service),
        }
    }
}

/// Sets what health reports for the server as a whole (`""`) and for both services.
async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for name in ["", LEDGER_SERVICE, AUDIT_SERVICE] {
        reporter.set_service_status(name, status).await;
    }
}

const LEDGER_SERVICE: &str = <LedgerServer<LedgerService> as tonic::server::NamedService>::NAME;
const AUDIT_SERVICE: &str = <AuditServer<AuditService> as tonic::server::NamedService>::NAME;

async fn serve_ledger(
    listener: TcpListener,
    ledger: Arc<Ledger>,
    config: &Config,
    health: Health,
    transport: &Transport,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let drain_timeout = config.drain_timeout;
    let streams = OpenStreams::new(config.streams);
    let metrics = Arc::new(Metrics::new());
    // Long-lived streams (Watch, AppendStream) end when this turns true, so the server can
    // drain instead of waiting for clients to hang up; the commit queue then takes nothing
    // new and ends once what it holds is committed.
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let (queue, commit_task) = CommitQueue::start(
        ledger.clone(),
        config.queue,
        closing.clone(),
        metrics.clone(),
    );
    let metrics_task = match config.metrics_listen {
        Some(addr) => {
            let listener = bind(addr).await?;
            tracing::info!(address = %listener.local_addr().map_err(listen_error)?, "serving Prometheus metrics at /metrics");
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                metrics,
                ledger.clone(),
                streams.clone(),
                closed(closing.clone()),
            )))
        }
        None => None,
    };
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let draining_reporter = health.reporter.clone();
    let shutdown = async move {
        shutdown.await;
        // Load balancers stop sending here while open calls drain.
        set_all(&draining_reporter, ServingStatus::NotServing).await;
        closing_tx.send_replace(true);
        let _ = draining_tx.send(());
    };
    set_all(&health.reporter, ServingStatus::Serving).await;
    // After a storage failure the ledger refuses appends until restarted: say so.
    let mut stopped = ledger.stopped();
    let reporter = health.reporter.clone();
    let watch_failure = tokio::spawn(async move {
        if stopped.wait_for(|stopped| *stopped).await.is_ok() {
            tracing::error!("appends stopped after a storage failure; health is NOT_SERVING");
            set_all(&reporter, ServingStatus::NotServing).await;
        }
    });
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Config(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServerError::Config(format!("reflection: {e}")))?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = Box::pin(
        transport
            .server_builder()
            .add_service(health.service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(InterceptedService::new(
                LedgerServer::new(LedgerService::new(queue, closing.clone(), streams.clone()))
                    .max_decoding_message_size(config.max_message_bytes),
                transport.writer_gate(),
            ))
            .add_service(InterceptedService::new(
                AuditServer::new(AuditService::new(ledger.clone(), closing, streams))
                    .max_decoding_message_size(config.max_message_bytes),
                transport.reader_gate(),
            ))
            .serve_with_incoming_shutdown(incoming, shutdown),
    );
    // Once shutdown starts, open calls get `drain_timeout` to finish; then the server stops
    // waiting for them (a receipt not yet sent is lost to its client, never its durability).
    // tonic runs each connection in its own task: in the binary they end with the runtime
    // when `main` returns; a library caller that keeps its runtime keeps them until their
    // clients hang up.
    let deadline = async {
        if draining_rx.await.is_ok() {
            tokio::time::sleep(drain_timeout).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let served = tokio::select! {
        served = &mut server => served,
        () = deadline => {
            tracing::warn!(
                seconds = drain_timeout.as_secs_f64(),
                "calls still open after the drain timeout; closing their connections"
            );
            Ok(())
        }
    };
    drop(server);
    watch_failure.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    // The queue stopped taking submissions when shutdown began: the commit task drains and
    // ends.
    if let Err(join_error) = commit_task.await {
        tracing::error!(%join_error, "commit task failed");
    }
    ledger.store().flush().map_err(LedgerError::from)?;
    served?;
    Ok(())
}

/// Binds `addr`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Io {
            what: "listen on",
            path: PathBuf::from(addr.to_string()),
            source,
        })
}
