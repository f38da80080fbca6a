//! Starting ledgers in-process and building signed events.

use std::net::SocketAddr;
use std::path::Path;

use custody::envelope;
use custody::proto::{
    audit_client::AuditClient, event::Body, ledger_client::LedgerClient, Consent, Event,
    GetCheckpointRequest, KeyGrant, Receipt, Role, SignedEvent,
};
use custody::server::{self, Config, ServerError};
use ed25519_dalek::SigningKey;
use prost::Message as _;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// A ledger served in-process on 127.0.0.1 with an ephemeral port.
pub struct TestLedger {
    pub dir: TempDir,
    pub addr: SocketAddr,
    pub admin: SigningKey,
    pub verifier_key: String,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServerError>>,
}

/// A deterministic key for tests.
pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

pub fn key_id(key: &SigningKey) -> String {
    envelope::key_id(&key.verifying_key().to_bytes())
}

pub fn now() -> i64 {
    custody::ledger::now_ms()
}

impl TestLedger {
    /// A new ledger in a new temporary directory with admin key `key(1)`.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir).await
    }

    /// Starts (or restarts) the ledger whose data lives in `dir`.
    pub async fn start_in(dir: TempDir) -> Self {
        Self::start_configured(dir, |_| ()).await
    }

    /// As [`start_in`](Self::start_in), with `configure` changing the configuration first.
    pub async fn start_configured(dir: TempDir, configure: impl FnOnce(&mut Config)) -> Self {
        let admin = key(1);
        let mut config = Config::new(dir.path().join("data"));
        config.admin_public_key = Some(admin.verifying_key().to_bytes());
        configure(&mut config);
        let (ledger, _startup) = server::open_ledger(&config).unwrap();
        let verifier_key = ledger.verifier_key();
        let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, ledger, config.clone(), async {
            let _ = stop.await;
        }));
        Self {
            dir,
            addr,
            admin,
            verifier_key,
            shutdown,
            task,
        }
    }

    pub fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// Stops the server cleanly and hands back its directory.
    pub async fn stop(self) -> TempDir {
        let _ = self.shutdown.send(());
        self.task.await.unwrap().unwrap();
        self.dir
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn ledger(&self) -> LedgerClient<Channel> {
        LedgerClient::connect(self.url()).await.unwrap()
    }

    pub async fn audit(&self) -> AuditClient<Channel> {
        AuditClient::connect(self.url()).await.unwrap()
    }

    /// The newest checkpoint.
    pub async fn checkpoint(&self) -> custody::proto::Checkpoint {
        self.audit()
            .await
            .get_checkpoint(GetCheckpointRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Runs a query, expecting success; every entry it streams.
    pub async fn query(
        &self,
        request: custody::proto::QueryRequest,
    ) -> Vec<custody::proto::StoredEntry> {
        use tokio_stream::StreamExt as _;
        let stream = self
            .audit()
            .await
            .query(request)
            .await
            .unwrap()
            .into_inner();
        stream.map(|item| item.unwrap()).collect().await
    }

    pub async fn tree_size(&self) -> u64 {
        self.checkpoint().await.tree_size
    }

    /// Appends `event` signed by `signer`, expecting success.
    pub async fn append_ok(&self, signer: &SigningKey, event: &Event) -> Receipt {
        self.ledger()
            .await
            .append(sign(signer, event))
            .await
            .unwrap_or_else(|status| panic!("append {} refused: {status:?}", event.event_id))
            .into_inner()
    }

    /// Registers `key` with `role` and `principal`, signed by the admin.
    pub async fn grant(&self, key: &SigningKey, role: Role, principal: &str) -> Receipt {
        let event = key_grant(&format!("grant-{}", key_id(key)), key, role, principal);
        self.append_ok(&self.admin.clone(), &event).await
    }
}

/// Signs `event` with `signer`.
pub fn sign(signer: &SigningKey, event: &Event) -> SignedEvent {
    envelope::sign_event(signer, event)
}

pub fn sign_payload(signer: &SigningKey, payload: Vec<u8>) -> SignedEvent {
    SignedEvent {
        signature: envelope::sign_payload(signer, &payload).to_vec(),
        key_id: key_id(signer),
        payload,
    }
}

pub fn event(event_id: &str, body: Body) -> Event {
    Event {
        event_id: event_id.into(),
        occurred_at_ms: now(),
        body: Some(body),
    }
}

pub fn key_grant(event_id: &str, key: &SigningKey, role: Role, principal: &str) -> Event {
    event(
        event_id,
        Body::KeyGrant(KeyGrant {
            public_key: key.verifying_key().to_bytes().to_vec(),
            role: role as i32,
            principal: principal.into(),
            not_before_ms: 0,
            not_after_ms: 0,
        }),
    )
}

pub fn consent(event_id: &str, consent_id: &str, user: &str) -> Event {
    event(
        event_id,
        Body::Consent(Consent {
            consent_id: consent_id.into(),
            user: user.into(),
            agent: "mail-assistant".into(),
            scopes: vec!["mail:read".into()],
            audiences: vec!["mail.example".into()],
            expires_at_ms: now() + 3_600_000,
            purpose: "summarize my inbox".into(),
            ..Consent::default()
        }),
    )
}

pub fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Keys and builders for chain-of-trust scenarios: an issuer, users, resource servers.
pub mod scenario {
    use super::*;
    use custody::proto::{
        revocation::Target, Action, Denial, DenialReason, Issuance, Revocation, Validation,
    };

    pub const HOUR: i64 = 3_600_000;

    pub fn issuer() -> SigningKey {
        key(20)
    }
    pub fn user(name: &str) -> SigningKey {
        key(30 + name.bytes().fold(0u8, |a, b| a.wrapping_add(b)) % 50)
    }
    pub fn server(name: &str) -> SigningKey {
        key(100 + name.bytes().fold(0u8, |a, b| a.wrapping_add(b)) % 50)
    }

    /// Registers the issuer, the users and the resource servers.
    pub async fn register(ledger: &TestLedger, users: &[&str], servers: &[&str]) {
        ledger.grant(&issuer(), Role::Issuer, "auth.example").await;
        for name in users {
            ledger.grant(&user(name), Role::User, name).await;
        }
        for name in servers {
            ledger
                .grant(&server(name), Role::ResourceServer, name)
                .await;
        }
    }

    pub fn consent_body(consent_id: &str, user: &str, agent: &str, depth: u32) -> Body {
        Body::Consent(Consent {
            consent_id: consent_id.into(),
            user: user.into(),
            agent: agent.into(),
            scopes: vec!["mail:read".into(), "cal".into()],
            audiences: vec!["mail.example".into(), "cal.example".into()],
            expires_at_ms: now() + 10 * HOUR,
            purpose: "assist".into(),
            max_delegation_depth: depth,
            ..Consent::default()
        })
    }

    pub fn token_hash(token_id: &str) -> Vec<u8> {
        use sha2::Digest as _;
        sha2::Sha256::digest(token_id.as_bytes()).to_vec()
    }

    pub fn issuance(
        token_id: &str,
        consent_id: &str,
        parent: &str,
        user: &str,
        agent: &str,
        scopes: &[&str],
        hours: i64,
    ) -> Body {
        Body::Issuance(Issuance {
            token_id: token_id.into(),
            token_sha256: token_hash(token_id),
            consent_id: consent_id.into(),
            parent_token_id: parent.into(),
            user: user.into(),
            agent: agent.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            audiences: vec!["mail.example".into()],
            not_before_ms: now() - 1_000,
            expires_at_ms: now() + hours * HOUR,
            grant_type: if parent.is_empty() {
                "authorization_code"
            } else {
                "token-exchange"
            }
            .into(),
        })
    }

    pub fn action(token_id: &str, server: &str, operation: &str) -> Body {
        Body::Action(Action {
            token_id: token_id.into(),
            resource_server: server.into(),
            agent: String::new(),
            operation: operation.into(),
            resource: "mailbox/inbox".into(),
            request_sha256: vec![],
        })
    }

    pub fn validation(token_id: &str, server: &str, valid: bool) -> Body {
        Body::Validation(Validation {
            token_id: token_id.into(),
            token_sha256: token_hash(token_id),
            resource_server: server.into(),
            valid,
            reason: String::new(),
        })
    }

    pub fn denial(token_id: &str, server: &str, agent: &str) -> Body {
        Body::Denial(Denial {
            token_id: token_id.into(),
            resource_server: server.into(),
            agent: agent.into(),
            operation: "mail:send".into(),
            resource: "outbox".into(),
            reason: DenialReason::InsufficientScope as i32,
            detail: "scope mail:send not granted".into(),
        })
    }

    pub fn revoke_token(token_id: &str) -> Body {
        Body::Revocation(Revocation {
            target: Some(Target::TokenId(token_id.into())),
            reason: "compromised".into(),
        })
    }

    pub fn revoke_consent(consent_id: &str) -> Body {
        Body::Revocation(Revocation {
            target: Some(Target::ConsentId(consent_id.into())),
            reason: "withdrawn".into(),
        })
    }
}

/// What gRPC health at `url` says of `service` (`""` for the whole server), or `None` while
/// nothing answers.
pub async fn health_status(url: &str, service: &str) -> Option<i32> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .ok()?
        .connect()
        .await
        .ok()?;
    let response = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    Some(response.into_inner().status)
}

/// Proof hashes as received over the wire.
pub fn hashes(bytes: &[Vec<u8>]) -> Vec<custody::merkle::Hash> {
    bytes
        .iter()
        .map(|b| custody::merkle::hash_from_slice(b).unwrap())
        .collect()
}

/// The consistency proof from `old` to `new`, fetched and parsed.
pub async fn consistency_proof(
    audit: &mut AuditClient<Channel>,
    old: &custody::checkpoint::VerifiedCheckpoint,
    new: &custody::checkpoint::VerifiedCheckpoint,
) -> Vec<custody::merkle::Hash> {
    let proof = audit
        .get_consistency_proof(custody::proto::ConsistencyProofRequest {
            old_size: old.tree_size(),
            new_size: new.tree_size(),
        })
        .await
        .unwrap()
        .into_inner();
    hashes(&proof.hashes)
}

/// Runs the real `custody` binary with `args`.
pub async fn run_cli(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_custody"))
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// Rewrites entry `seq` directly in a stopped ledger's store (its entries file, or sled for a
/// ledger that keeps its entries there), as an attacker with disk access would.
pub fn rewrite_entry(dir: &Path, seq: u64, change: impl FnOnce(&mut custody::proto::Entry)) {
    // A store just closed in this process may hold sled's lock for a moment (as
    // `Store::open` knows): retry for a few seconds.
    let started = std::time::Instant::now();
    let db = loop {
        match sled::open(dir) {
            Ok(db) => break db,
            Err(_) if started.elapsed() < std::time::Duration::from_secs(5) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("couldn't open {}: {e}", dir.display()),
        }
    };
    use custody::store::{entrylog, keys};
    let tree = db.open_tree("ledger").unwrap();
    let key = keys::entry(seq);
    if let Some(bytes) = tree.get(key).unwrap() {
        // A ledger that keeps its entries in sled.
        let mut entry = custody::proto::Entry::decode(bytes.as_ref()).unwrap();
        change(&mut entry);
        tree.insert(key, entry.encode_to_vec()).unwrap();
        db.flush().unwrap();
        return;
    }
    // The entries file: find the record through its `o` page and rewrite it with a checksum
    // that matches, moving the records after it and their offsets, as a careful attacker
    // would.
    let page = tree
        .get(keys::offsets_page(seq / keys::OFFSETS_PER_PAGE))
        .unwrap()
        .expect("no offsets page for the entry");
    let slot = (seq % keys::OFFSETS_PER_PAGE) as usize * 8;
    let offset = u64::from_le_bytes(page[slot..slot + 8].try_into().unwrap()) as usize;
    let path = dir.join(entrylog::FILE_NAME);
    let mut file = std::fs::read(&path).unwrap();
    let len = u32::from_le_bytes(file[offset..offset + 4].try_into().unwrap()) as usize;
    let start = offset + entrylog::HEADER as usize;
    let mut entry = custody::proto::Entry::decode(&file[start..start + len]).unwrap();
    change(&mut entry);
    let mut record = Vec::new();
    entrylog::encode_record(&entry.encode_to_vec(), &mut record).unwrap();
    let grown = record.len() as i64 - (start + len - offset) as i64;
    file.splice(offset..start + len, record);
    std::fs::write(&path, file).unwrap();
    for item in tree.scan_prefix([keys::OFFSETS]) {
        let (key, value) = item.unwrap();
        let moved: Vec<u8> = value
            .chunks(8)
            .flat_map(|o| {
                let o = u64::from_le_bytes(o.try_into().unwrap());
                let o = if o > offset as u64 {
                    o.checked_add_signed(grown).unwrap()
                } else {
                    o
                };
                o.to_le_bytes()
            })
            .collect();
        tree.insert(key, moved).unwrap();
    }
    db.flush().unwrap();
}
