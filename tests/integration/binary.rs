//! The real `custody` binary, started as an operator would.
//!
//! - Crash safety: it is killed with SIGKILL at random moments while several clients stream
//!   events to it, and restarted each time. Every acknowledged receipt must survive with its
//!   seq and leaf hash, the store must hold exactly the entries its last checkpoint covers,
//!   the export must verify end to end, and every checkpoint seen must be consistent with the
//!   final tree. The kill moments come from a seed printed at the start; set
//!   `CUSTODY_CRASH_SEED` to replay a run.
//!
//!   SIGKILL kills the process, not the machine: the page cache survives it, so this shows
//!   that no receipt is sent before its batch has left the process (sled's buffers written
//!   out). That the files are synced before the receipt is sent (`Store::flush`: sled's
//!   flush, then `fdatasync`, whose order `store::durable`'s unit tests check) is shown by
//!   the code's order (`Ledger::finish`), not by this test: a power loss cannot be staged.
//! - SIGTERM while clients stream: open streams end by themselves (the drain deadline is set
//!   far away), the server exits 0 within seconds, and every receipt sent is durable.
//! - Health: NOT_SERVING while the ledger is still opening, SERVING once it is open.
//! - Logs: human-readable by default, one JSON object per line with `--log-format json`.
//! - Settings: a flag beats its environment variable, which beats the `--config` file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use custody::checkpoint::{self, LedgerVerifier};
use custody::merkle;
use custody::proto::{
    audit_client::AuditClient, ledger_client::LedgerClient, GetCheckpointRequest, Role,
};
use ed25519_dalek::SigningKey;
use tokio_stream::StreamExt as _;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::*;

/// Kill and restart cycles.
const CYCLES: u32 = 12;
/// Concurrent streaming clients per cycle.
const CLIENTS: u8 = 4;

/// What an acknowledged receipt promised.
#[derive(Debug, Clone, PartialEq)]
struct Promise {
    seq: u64,
    leaf: Vec<u8>,
}

#[derive(Default)]
struct Seen {
    /// event_id -> the receipt's promise.
    receipts: BTreeMap<String, Promise>,
    /// Every distinct checkpoint note seen, in receipts or from `GetCheckpoint`.
    checkpoints: BTreeSet<String>,
}

/// A small deterministic generator (xorshift64*), so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound
    }
}

struct Server {
    child: Child,
    url: String,
}

impl Server {
    /// Starts `custody serve` on `data` and waits until it answers.
    async fn start(data: &Path, log: &Path) -> Self {
        Self::start_with(data, log, &[]).await
    }

    /// As [`start`](Self::start), with more arguments for `custody serve`.
    async fn start_with(data: &Path, log: &Path, extra: &[&str]) -> Self {
        let mut server = Self::spawn_with(data, log, extra);
        let started = Instant::now();
        loop {
            if let Ok(mut audit) = AuditClient::connect(server.url.clone()).await {
                if audit.get_checkpoint(GetCheckpointRequest {}).await.is_ok() {
                    return server;
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = server.child.kill();
                let _ = server.child.wait();
                panic!("the server did not come up within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts `custody serve` on `data` on a free port, without waiting for it.
    fn spawn(data: &Path, log: &Path) -> Self {
        Self::spawn_with(data, log, &[])
    }

    /// As [`spawn`](Self::spawn), with more arguments for `custody serve`.
    // The child is moved into the returned `Server`, which `kill` and `terminate` wait for.
    #[allow(clippy::zombie_processes)]
    fn spawn_with(data: &Path, log: &Path, extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_custody"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin-public-key")
            .arg(hex::encode(key(1).verifying_key().to_bytes()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Waits (up to 30 s) until health reports `status`.
    async fn wait_for_health(&self, status: ServingStatus) {
        let started = Instant::now();
        loop {
            let now = health_status(&self.url, "").await;
            if now == Some(status as i32) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "health still {now:?}, waiting for {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL on Unix
        self.child.wait().unwrap();
    }

    /// Stops the server with SIGTERM; it must exit 0 within 30 s. Returns how long it took.
    fn terminate(mut self) -> Duration {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "custody serve exited with {status}");
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "custody serve did not exit within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn checkpoint(&self) -> String {
        AuditClient::connect(self.url.clone())
            .await
            .unwrap()
            .get_checkpoint(GetCheckpointRequest {})
            .await
            .unwrap()
            .into_inner()
            .note
    }
}

/// A test that fails midway must not leave its server running.
impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn issuer(client: u8) -> SigningKey {
    key(2 + client)
}

/// Streams consents until the server goes away, recording every acknowledged receipt.
async fn stream_until_cut(url: String, client: u8, cycle: u32, seen: Arc<Mutex<Seen>>) {
    let Ok(mut ledger) = LedgerClient::connect(url).await else {
        return;
    };
    let signer = issuer(client);
    let events = tokio_stream::iter(0..100_000u32).map(move |n| {
        let id = format!("k{cycle}-c{client}-{n}");
        sign(&signer, &consent(&id, &id, &format!("user-{client}")))
    });
    let Ok(response) = ledger.append_stream(events).await else {
        return;
    };
    let mut receipts = response.into_inner();
    while let Some(Ok(receipt)) = receipts.next().await {
        if let Some(error) = &receipt.error {
            // Only a server going away may turn an event down here, and it says so.
            assert_eq!(
                error.code,
                tonic::Code::Unavailable as i32,
                "refused: {error:?}"
            );
            continue;
        }
        assert!(
            !receipt.duplicate,
            "fresh event {} was a duplicate",
            receipt.event_id
        );
        let mut seen = seen.lock().unwrap();
        seen.checkpoints.insert(receipt.checkpoint.clone());
        let promise = Promise {
            seq: receipt.seq,
            leaf: receipt.leaf_hash.clone(),
        };
        assert!(seen.receipts.insert(receipt.event_id, promise).is_none());
    }
}

fn read_verifier(data: &Path) -> LedgerVerifier {
    let key = std::fs::read_to_string(data.join("ledger.pub")).unwrap();
    LedgerVerifier::parse(key.trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_entries_survive_repeated_sigkill() {
    let seed = std::env::var("CUSTODY_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash test seed: {seed} (CUSTODY_CRASH_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let data: PathBuf = dir.path().join("data");
    let log = dir.path().join("server.log");

    let mut server = Server::start(&data, &log).await;
    let verifier = read_verifier(&data);
    grant_issuers(&server).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut size_before = 0;
    for cycle in 0..CYCLES {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                tokio::spawn(stream_until_cut(
                    server.url.clone(),
                    client,
                    cycle,
                    seen.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100 + rng.below(700))).await;
        server.kill();
        for client in clients {
            client.await.unwrap();
        }

        server = Server::start(&data, &log).await;
        let note = server.checkpoint().await;
        let head = checkpoint::open(&note, &verifier).unwrap();
        let mut so_far = seen.lock().unwrap();
        let highest = so_far.receipts.values().map(|p| p.seq).max().unwrap_or(0);
        assert!(
            head.tree_size() > highest,
            "cycle {cycle}: restarted at {} entries, but seq {highest} was acknowledged",
            head.tree_size()
        );
        assert!(
            head.tree_size() >= size_before,
            "cycle {cycle}: the tree shrank"
        );
        size_before = head.tree_size();
        eprintln!(
            "cycle {cycle}: restarted at {} entries, {} receipts so far",
            head.tree_size(),
            so_far.receipts.len()
        );
        so_far.checkpoints.insert(note);
    }

    // Every checkpoint seen verifies and is a prefix of the final tree.
    let final_note = server.checkpoint().await;
    let last = checkpoint::open(&final_note, &verifier).unwrap();
    let mut audit = AuditClient::connect(server.url.clone()).await.unwrap();
    let notes = seen.lock().unwrap().checkpoints.clone();
    assert!(notes.len() > CYCLES as usize, "too few checkpoints seen");
    for note in &notes {
        let old = checkpoint::open(note, &verifier).unwrap();
        if old.tree_size() == last.tree_size() {
            assert_eq!(old.root(), last.root(), "two roots for one tree size");
            continue;
        }
        let proof = consistency_proof(&mut audit, &old, &last).await;
        merkle::verify_consistency(
            &proof,
            old.tree_size(),
            old.root(),
            last.tree_size(),
            last.root(),
        )
        .unwrap_or_else(|e| panic!("checkpoint at {} is not a prefix: {e}", old.tree_size()));
    }
    server.terminate();

    // The stopped store holds exactly the entries its last checkpoint covers.
    let store = custody::store::Store::open(&data.join("db")).unwrap();
    let head = store.head().unwrap().unwrap();
    assert_eq!(head.tree_size, last.tree_size());
    assert_eq!(store.entry_count().unwrap(), head.tree_size);
    store.check_tail(&head).unwrap();
    drop(store);

    let report = check_export(dir.path(), &data, &verifier, &seen.lock().unwrap());
    assert_eq!(report.tree_size, last.tree_size());
}

/// Exports the stopped ledger in `data` and checks that the export verifies end to end and
/// holds every acknowledged entry where its receipt said, with the same leaf hash.
fn check_export(
    scratch: &Path,
    data: &Path,
    verifier: &LedgerVerifier,
    seen: &Seen,
) -> custody::verify::LedgerReport {
    let export = scratch.join("ledger.export");
    let output = Command::new(env!("CARGO_BIN_EXE_custody"))
        .arg("export")
        .arg("--data-dir")
        .arg(data)
        .arg("--out")
        .arg(&export)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let file = std::io::BufReader::new(std::fs::File::open(&export).unwrap());
    let report = custody::verify::verify_export(file, verifier, None, |_, _| ())
        .unwrap()
        .unwrap();

    let file = std::io::BufReader::new(std::fs::File::open(&export).unwrap());
    let (mut reader, _) = custody::export::ExportReader::open(file).unwrap();
    let mut leaves = Vec::new();
    while let Some(bytes) = reader.next_entry().unwrap() {
        leaves.push(merkle::leaf_hash(&bytes).0.to_vec());
    }
    assert!(
        seen.receipts.len() > 100,
        "too few receipts to mean anything"
    );
    for (event_id, promise) in &seen.receipts {
        assert_eq!(
            leaves.get(promise.seq as usize),
            Some(&promise.leaf),
            "acknowledged {event_id} at seq {} is not in the ledger as promised",
            promise.seq
        );
    }
    eprintln!(
        "{} receipts, all present; {} entries verified",
        seen.receipts.len(),
        report.tree_size
    );
    report
}

/// Grants the clients' issuer keys.
async fn grant_issuers(server: &Server) {
    let admin = key(1);
    let mut ledger = LedgerClient::connect(server.url.clone()).await.unwrap();
    for client in 0..CLIENTS {
        let grant = key_grant(
            &format!("grant-{client}"),
            &issuer(client),
            Role::Issuer,
            "auth.example",
        );
        ledger.append(sign(&admin, &grant)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_ends_open_streams_and_exits_zero_with_every_receipt_durable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    let server = Server::start_with(&data, &log, &["--drain-timeout", "600"]).await;
    let verifier = read_verifier(&data);
    grant_issuers(&server).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            tokio::spawn(stream_until_cut(
                server.url.clone(),
                client,
                0,
                seen.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let took = server.terminate();
    eprintln!("exited 0 {} ms after SIGTERM", took.as_millis());
    // Far below the drain deadline: the streams ended by themselves.
    assert!(took < Duration::from_secs(20), "took {took:?}");
    // Every stream has ended: the clients return.
    for client in clients {
        tokio::time::timeout(Duration::from_secs(10), client)
            .await
            .expect("a stream stayed open after the server exited")
            .unwrap();
    }
    check_export(dir.path(), &data, &verifier, &seen.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_until_the_ledger_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    // The first server holds the database; the second waits (up to 5 s) for it to let go,
    // listening all the while.
    let first = Server::start(&data, &log).await;
    let second = Server::spawn(&data, &log);
    second.wait_for_health(ServingStatus::NotServing).await;
    // A health Watch opened during startup stays open across the hand-over to the full
    // server (it must not hold the ledger back) and sees SERVING.
    let channel = tonic::transport::Endpoint::from_shared(second.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = tonic_health::pb::health_client::HealthClient::new(channel)
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first_status = watch.next().await.unwrap().unwrap().status;
    assert_eq!(first_status, ServingStatus::NotServing as i32);
    // Calls before the ledger is open are told to retry.
    let early = AuditClient::connect(second.url.clone())
        .await
        .unwrap()
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .unwrap_err();
    assert_eq!(early.code(), tonic::Code::Unavailable, "{early:?}");
    let early = LedgerClient::connect(second.url.clone())
        .await
        .unwrap()
        .append(sign(&key(1), &consent("early", "c-early", "alice")))
        .await
        .unwrap_err();
    assert_eq!(early.code(), tonic::Code::Unavailable, "{early:?}");
    first.terminate();
    second.wait_for_health(ServingStatus::Serving).await;
    let seen = tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await
        .expect("the startup Watch heard nothing")
        .unwrap()
        .unwrap();
    assert_eq!(seen.status, ServingStatus::Serving as i32);
    let note = second.checkpoint().await;
    checkpoint::open(&note, &read_verifier(&data)).unwrap();
    second.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_text_by_default_and_json_lines_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let text_log = dir.path().join("text.log");
    let server = Server::spawn(&data, &text_log);
    server.wait_for_health(ServingStatus::Serving).await;
    server.terminate();
    let text = std::fs::read_to_string(&text_log).unwrap();
    assert!(
        text.contains("INFO") && text.contains("stopped cleanly"),
        "{text}"
    );
    assert!(text
        .lines()
        .all(|line| serde_json::from_str::<serde_json::Value>(line).is_err()));

    let json_log = dir.path().join("json.log");
    let server = Server::spawn_with(&data, &json_log, &["--log-format", "json"]);
    server.wait_for_health(ServingStatus::Serving).await;
    server.terminate();
    let json = std::fs::read_to_string(&json_log).unwrap();
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect();
    assert!(lines.len() >= 3, "{json}");
    for line in &lines {
        assert!(
            line["timestamp"].is_string() && line["level"].is_string(),
            "{line}"
        );
    }
    assert!(lines
        .iter()
        .any(|line| line["message"] == "stopped cleanly; everything acknowledged is on disk"));
    // Fields are top-level keys, as log pipelines expect.
    assert!(lines.iter().any(|line| line["verifier_key"]
        .as_str()
        .is_some_and(|k| k.starts_with("localhost/custody+"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_flags_then_environment_then_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("from-file");
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (file_port, env_port) = (free_port(), free_port());
    let config = dir.path().join("custody.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\nlisten = \"127.0.0.1:{file_port}\"\nmax_streams = 1\nlog_format = \"text\"\nadmin_public_key = \"{}\"\n",
            hex::encode(key(1).verifying_key().to_bytes())
        ),
    )
    .unwrap();
    let log = dir.path().join("server.log");
    let child = Command::new(env!("CARGO_BIN_EXE_custody"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--log-format")
        .arg("json")
        .env("CUSTODY_LISTEN", format!("127.0.0.1:{env_port}"))
        .env("CUSTODY_LOG_FORMAT", "text")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // The environment's address wins over the file's.
    let server = Server {
        child,
        url: format!("http://127.0.0.1:{env_port}"),
    };
    server.wait_for_health(ServingStatus::Serving).await;
    // The file's data directory and stream limit apply.
    assert!(data.join("ledger.pub").exists());
    let mut audit = AuditClient::connect(server.url.clone()).await.unwrap();
    let _first = audit
        .watch(custody::proto::WatchRequest { start_seq: 0 })
        .await
        .unwrap();
    let second = audit
        .watch(custody::proto::WatchRequest { start_seq: 0 })
        .await
        .unwrap_err();
    assert_eq!(second.code(), tonic::Code::ResourceExhausted);
    drop(audit);
    server.terminate();
    // The flag's log format wins over the environment's.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.is_empty());
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"));
    }

    // A bad file stops the server before it starts, naming the file.
    std::fs::write(&config, "max_stream = 1\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_custody"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("custody.toml") && stderr.contains("max_stream"),
        "{stderr}"
    );
}

/// The ledger key rotated as the README tells an operator to: stop the server, `rotate-key
/// begin`, serve (checkpoints carry both keys' signatures), stop, `rotate-key finish`,
/// serve. Auditors holding the old key or the new one verify the ledger at every step, and the
/// old seed is gone from the data directory at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_key_rotates_in_steps_taken_while_the_server_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    let read = |file: &str| std::fs::read_to_string(data.join(file)).map(|s| s.trim().to_owned());
    let rotate = |step: &str| {
        Command::new(env!("CARGO_BIN_EXE_custody"))
            .args(["rotate-key", step, "--data-dir"])
            .arg(&data)
            .output()
            .unwrap()
    };
    // `custody verify` of the stopped ledger; its output.
    let run_verify = |key: &str, previous: Option<&Path>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_custody"));
        command
            .args(["verify", "--data-dir"])
            .arg(&data)
            .args(["--ledger-key", key]);
        if let Some(previous) = previous {
            command.arg("--previous-checkpoint").arg(previous);
        }
        command.output().unwrap()
    };
    // The same, which must succeed; its stdout.
    let verify = |key: &str, previous: Option<&Path>| {
        let output = run_verify(key, previous);
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let opens = |note: &str, key: &str| {
        checkpoint::open(note, &LedgerVerifier::parse(key).unwrap())
            .map(|c| c.tree_size())
            .ok()
    };

    let server = Server::start(&data, &log).await;
    grant_issuers(&server).await;
    let before = dir.path().join("before.note");
    std::fs::write(&before, server.checkpoint().await).unwrap();
    server.terminate();
    let old_pub = read("ledger.pub").unwrap();
    let old_seed = read("ledger.key").unwrap();

    // Nothing under way yet: finish and cancel are refused (exit 1) and write nothing.
    for step in ["finish", "cancel"] {
        let output = rotate(step);
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("no ledger key rotation is under way"),
            "{stderr}"
        );
    }

    // Begin: a next key is generated (owner-only) and both keys sign from now on.
    let output = rotate("begin");
    assert!(output.status.success(), "{output:?}");
    let began: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let next_pub = read("ledger.next.pub").unwrap();
    assert_eq!(
        began["checkpoint_keys"],
        serde_json::json!([old_pub, next_pub])
    );
    assert_eq!(began["generated_next_key"], true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(data.join("ledger.next.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let next_seed = read("ledger.next.key").unwrap();
    // A second begin is refused while this one is under way.
    assert_eq!(rotate("begin").status.code(), Some(1));

    // Serving mid-rotation: appends go on under checkpoints both keys sign.
    let server = Server::start(&data, &log).await;
    let mut ledger = LedgerClient::connect(server.url.clone()).await.unwrap();
    let grant = key_grant("grant-mid-rotation", &key(77), Role::Issuer, "auth.example");
    ledger.append(sign(&key(1), &grant)).await.unwrap();
    let note = server.checkpoint().await;
    assert!(opens(&note, &old_pub).is_some() && opens(&note, &next_pub).is_some());
    server.terminate();
    for key in [&old_pub, &next_pub] {
        let stdout = verify(key, Some(&before));
        assert!(stdout.contains(&format!("checkpoint signed by: {old_pub}, {next_pub}\n")));
    }

    // Finish: the next key becomes the ledger key; the old seed is gone.
    let output = rotate("finish");
    assert!(output.status.success(), "{output:?}");
    let finished: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(finished["checkpoint_keys"], serde_json::json!([next_pub]));
    assert_eq!(read("ledger.key").unwrap(), next_seed);
    assert_eq!(read("ledger.pub").unwrap(), next_pub);
    assert!(!data.join("ledger.next.key").exists() && !data.join("ledger.next.pub").exists());
    let all_files: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .collect();
    assert!(!all_files.iter().any(|text| text.contains(&old_seed)));

    // Serving after the rotation: the new key alone signs.
    let server = Server::start(&data, &log).await;
    let note = server.checkpoint().await;
    assert!(opens(&note, &next_pub).is_some());
    assert_eq!(opens(&note, &old_pub), None);
    server.terminate();
    // An auditor holding the old key follows the recorded rotation; one holding the new key
    // accepts the history the old key signed, and both see it extend the earlier checkpoint.
    for key in [&old_pub, &next_pub] {
        let stdout = verify(key, Some(&before));
        assert!(stdout.contains(&format!("checkpoint signed by: {next_pub}\n")));
        assert!(stdout.contains("ledger_key_rotation 2"), "{stdout}");
        // The old key still verifies, with a warning to move on.
        let warned = stdout.contains("warning: the trusted key was retired");
        assert_eq!(warned, key == &old_pub, "{stdout}");
    }
    // A key that never was this ledger's is refused.
    let stranger = custody::checkpoint::CheckpointSigner::new(
        LedgerVerifier::parse(&old_pub).unwrap().origin(),
        SigningKey::from_bytes(&[99; 32]),
    )
    .unwrap()
    .verifier_key();
    let output = run_verify(&stranger, None);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("not a ledger key of this ledger"));
}
