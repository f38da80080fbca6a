//! TLS and access control over real TLS on 127.0.0.1, with certificates generated here (a
//! test CA, a server certificate for `localhost`, client certificates, and a stranger CA).
//!
//! - TLS: the handshake works with the CA; plaintext fails against a TLS server; a client
//!   certificate from another CA fails the handshake; `--require-client-cert` refuses
//!   connections without one.
//! - Readers (`Audit`): an allowed certificate subject or bearer token reads; another
//!   subject or an unknown token gets PERMISSION_DENIED; no credential gets UNAUTHENTICATED;
//!   health stays open.
//! - Writers (`Ledger`): signed events are accepted without a client certificate by default
//!   and refused (UNAUTHENTICATED) without one when writers need it.
//! - The binary: serves TLS with the flags; refuses plaintext on `0.0.0.0` without
//!   `--insecure` (exit 2).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use custody::access::ReaderAllowList;
use custody::proto::{
    audit_client::AuditClient, ledger_client::LedgerClient, Checkpoint, GetCheckpointRequest,
    Receipt, Role,
};
use custody::server::{self, Config, ServerError};
use custody::tls::{Security, TlsFiles};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use sha2::Digest as _;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::*;

const READER_TOKEN: &str = "reader-token-0123456789";

/// A test PKI written to PEM files: `ca.pem`, `server.pem`/`server.key`, and
/// `<name>.pem`/`<name>.key` for each client certificate.
struct Pki {
    dir: TempDir,
}

fn new_key() -> KeyPair {
    KeyPair::generate().unwrap()
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, new_key()).unwrap()
}

impl Pki {
    fn new() -> Self {
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        let ca = new_ca("custody test CA");
        std::fs::write(pki.path("ca.pem"), ca.pem()).unwrap();

        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .distinguished_name
            .push(DnType::CommonName, "custody server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        pki.write_leaf("server", params, &ca);

        for name in ["auditor", "stranger", "writer"] {
            pki.write_client(name, &ca);
        }
        // Same subject as an allowed reader, issued by a CA the server does not trust.
        pki.write_client_as("forged-auditor", "auditor", &new_ca("another CA"));
        pki
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.path(file)).unwrap()
    }

    fn write_client(&self, name: &str, issuer: &CertifiedIssuer<'static, KeyPair>) {
        self.write_client_as(name, name, issuer);
    }

    fn write_client_as(
        &self,
        file: &str,
        common_name: &str,
        issuer: &CertifiedIssuer<'static, KeyPair>,
    ) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Example Audit");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.write_leaf(file, params, issuer);
    }

    fn write_leaf(
        &self,
        file: &str,
        params: CertificateParams,
        issuer: &CertifiedIssuer<'static, KeyPair>,
    ) {
        let key = new_key();
        let certificate = params.signed_by(&key, issuer).unwrap();
        std::fs::write(self.path(&format!("{file}.pem")), certificate.pem()).unwrap();
        std::fs::write(self.path(&format!("{file}.key")), key.serialize_pem()).unwrap();
    }

    /// TLS with this PKI's server certificate and client CA; client certificates optional.
    fn security(&self) -> Security {
        Security {
            tls: Some(TlsFiles {
                cert: self.path("server.pem"),
                key: self.path("server.key"),
            }),
            client_ca: Some(self.path("ca.pem")),
            ..Security::default()
        }
    }

    /// A TLS channel to `addr` trusting the test CA, presenting client certificate `client`.
    async fn connect(
        &self,
        addr: SocketAddr,
        client: Option<&str>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.read("ca.pem")))
            .domain_name("localhost");
        if let Some(name) = client {
            tls = tls.identity(Identity::from_pem(
                self.read(&format!("{name}.pem")),
                self.read(&format!("{name}.key")),
            ));
        }
        Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect()
            .await
    }
}

fn token_digest(token: &str) -> [u8; 32] {
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// The allow-list of the reader tests: subject `auditor`, token [`READER_TOKEN`].
fn readers() -> ReaderAllowList {
    ReaderAllowList {
        subjects: vec!["auditor".into()],
        token_sha256: vec![token_digest(READER_TOKEN)],
    }
}

/// A ledger served in-process over TLS on 127.0.0.1.
struct TlsLedger {
    addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServerError>>,
    _dir: TempDir,
}

impl TlsLedger {
    /// Starts a new ledger (admin `key(1)`) with `security`; returns once it is open.
    async fn start(security: Security) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new(dir.path().join("data"));
        config.admin_public_key = Some(key(1).verifying_key().to_bytes());
        config.security = security;
        let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (opened_tx, opened_rx) = oneshot::channel::<()>();
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(server::open_and_run(
            listener,
            config,
            move |_, _| {
                let _ = opened_tx.send(());
            },
            async {
                let _ = stop.await;
            },
        ));
        if opened_rx.await.is_err() {
            panic!("the server stopped while opening: {:?}", task.await);
        }
        Self {
            addr,
            shutdown,
            task,
            _dir: dir,
        }
    }

    async fn stop(self) {
        let _ = self.shutdown.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// `Audit.GetCheckpoint` on `channel`, with `authorization: Bearer <token>` if given.
async fn read(channel: Channel, token: Option<&str>) -> Result<Checkpoint, Status> {
    let authorization = token.map(|token| format!("Bearer {token}").parse().unwrap());
    let mut client = AuditClient::with_interceptor(channel, move |mut request: Request<()>| {
        if let Some(value) = &authorization {
            request
                .metadata_mut()
                .insert("authorization", Clone::clone(value));
        }
        Ok(request)
    });
    client
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .map(|response| response.into_inner())
}

fn code<T: std::fmt::Debug>(result: Result<T, Status>) -> Code {
    result.expect_err("expected a refusal").code()
}

/// `Ledger.Append` of an admin-signed key grant on `channel`.
async fn write(channel: Channel, id: &str, seed: u8) -> Result<Receipt, Status> {
    let event = key_grant(id, &key(seed), Role::Issuer, "auth.example");
    LedgerClient::new(channel)
        .append(sign(&key(1), &event))
        .await
        .map(|response| response.into_inner())
}

#[tokio::test]
async fn tls_handshake_works_and_plaintext_fails() {
    let pki = Pki::new();
    let ledger = TlsLedger::start(pki.security()).await;
    let checkpoint = read(pki.connect(ledger.addr, None).await.unwrap(), None)
        .await
        .unwrap();
    assert_eq!(checkpoint.tree_size, 1, "the genesis");

    let plaintext = async {
        let mut client = AuditClient::connect(format!("http://{}", ledger.addr))
            .await
            .map_err(|e| e.to_string())?;
        client
            .get_checkpoint(GetCheckpointRequest {})
            .await
            .map_err(|e| e.to_string())
    };
    assert!(
        plaintext.await.is_err(),
        "plaintext gRPC answered by a TLS server"
    );
    ledger.stop().await;
}

/// A client certificate from a CA the server does not trust never gets through, even with an
/// allowed subject: the server ends the handshake (with TLS 1.3 the client may only notice
/// on its first call).
#[tokio::test]
async fn client_certificate_from_another_ca_fails_the_handshake() {
    let pki = Pki::new();
    let ledger = TlsLedger::start(Security {
        readers: readers(),
        ..pki.security()
    })
    .await;
    let outcome = match pki.connect(ledger.addr, Some("forged-auditor")).await {
        Err(error) => Err(error.to_string()),
        Ok(channel) => read(channel, None).await.map_err(|status| {
            assert!(
                !matches!(
                    status.code(),
                    Code::PermissionDenied | Code::Unauthenticated
                ),
                "the handshake succeeded and the call reached access control: {status:?}"
            );
            status.to_string()
        }),
    };
    assert!(
        outcome.is_err(),
        "read with a forged certificate: {outcome:?}"
    );
    ledger.stop().await;
}

#[tokio::test]
async fn readers_need_an_allowed_subject_or_token() {
    let pki = Pki::new();
    let ledger = TlsLedger::start(Security {
        readers: readers(),
        ..pki.security()
    })
    .await;
    let addr = ledger.addr;
    let pki_ref = &pki;
    let anonymous = move || async move { pki_ref.connect(addr, None).await.unwrap() };

    // Allowed client certificate.
    let channel = pki.connect(addr, Some("auditor")).await.unwrap();
    assert_eq!(read(channel, None).await.unwrap().tree_size, 1);
    // Another subject under the same CA.
    let channel = pki.connect(addr, Some("stranger")).await.unwrap();
    assert_eq!(code(read(channel, None).await), Code::PermissionDenied);
    // No certificate, no token.
    assert_eq!(
        code(read(anonymous().await, None).await),
        Code::Unauthenticated
    );
    // Allowed token; unknown token.
    assert_eq!(
        read(anonymous().await, Some(READER_TOKEN))
            .await
            .unwrap()
            .tree_size,
        1
    );
    assert_eq!(
        code(read(anonymous().await, Some("not-the-token")).await),
        Code::PermissionDenied
    );
    // A disallowed certificate with the allowed token reads (either credential suffices).
    let channel = pki.connect(addr, Some("stranger")).await.unwrap();
    assert!(read(channel, Some(READER_TOKEN)).await.is_ok());
    // A malformed authorization header is no credential.
    let mut client = AuditClient::new(anonymous().await);
    let mut request = Request::new(GetCheckpointRequest {});
    request
        .metadata_mut()
        .insert("authorization", "Basic YXVkaXRvcjpwdw==".parse().unwrap());
    assert_eq!(
        code(client.get_checkpoint(request).await),
        Code::Unauthenticated
    );

    // Health stays open; writes are authenticated by their signatures alone by default.
    let health = tonic_health::pb::health_client::HealthClient::new(anonymous().await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "custody.v1.Audit".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);
    let receipt = write(anonymous().await, "grant-anonymous", 2)
        .await
        .unwrap();
    assert_eq!(receipt.seq, 1);
    ledger.stop().await;
}

#[tokio::test]
async fn writers_need_a_client_certificate_when_configured() {
    let pki = Pki::new();
    let ledger = TlsLedger::start(Security {
        writers_need_client_cert: true,
        ..pki.security()
    })
    .await;
    let anonymous = pki.connect(ledger.addr, None).await.unwrap();
    assert_eq!(
        code(write(anonymous.clone(), "grant-anonymous", 2).await),
        Code::Unauthenticated
    );
    // Reads stay open: no reader access control is configured.
    assert_eq!(read(anonymous, None).await.unwrap().tree_size, 1);
    // Any certificate valid under the client CA may write; the event signature still decides.
    let writer = pki.connect(ledger.addr, Some("writer")).await.unwrap();
    assert_eq!(
        write(writer.clone(), "grant-with-cert", 2)
            .await
            .unwrap()
            .seq,
        1
    );
    let forged = key_grant("grant-forged", &key(3), Role::Issuer, "auth.example");
    let status = LedgerClient::new(writer)
        .append(sign(&key(9), &forged))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    ledger.stop().await;
}

#[tokio::test]
async fn required_client_certificates_refuse_connections_without_one() {
    let pki = Pki::new();
    let ledger = TlsLedger::start(Security {
        require_client_cert: true,
        ..pki.security()
    })
    .await;
    let outcome = match pki.connect(ledger.addr, None).await {
        Err(error) => Err(error.to_string()),
        Ok(channel) => read(channel, None).await.map_err(|s| s.to_string()),
    };
    assert!(outcome.is_err(), "read without a certificate: {outcome:?}");
    let channel = pki.connect(ledger.addr, Some("stranger")).await.unwrap();
    assert_eq!(read(channel, None).await.unwrap().tree_size, 1);
    ledger.stop().await;
}

/// Runs `custody serve` with `args` (after `--data-dir`); returns the child.
fn spawn_serve(data: &Path, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_custody"))
        .arg("serve")
        .arg("--data-dir")
        .arg(data)
        .arg("--admin-public-key")
        .arg(hex::encode(key(1).verifying_key().to_bytes()))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (up to 30 s) for `child` to exit; kills it and fails if it does not.
fn wait_for_exit(mut child: std::process::Child) -> std::process::Output {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("custody serve is still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn binary_refuses_plaintext_off_loopback_without_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let child = spawn_serve(&data, &["--listen", "0.0.0.0:0"]);
    let output = tokio::task::spawn_blocking(move || wait_for_exit(child))
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not a loopback address") && stderr.contains("--insecure"),
        "{stderr}"
    );
    assert!(!data.exists(), "the ledger was created before the check");
}

#[tokio::test]
async fn binary_serves_tls_with_reader_and_writer_rules() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let path = |file: &str| pki.path(file).to_str().unwrap().to_owned();
    let digest = hex::encode(token_digest(READER_TOKEN));
    let args = [
        "--listen",
        &addr.to_string(),
        "--tls-cert",
        &path("server.pem"),
        "--tls-key",
        &path("server.key"),
        "--client-ca",
        &path("ca.pem"),
        "--reader-subject",
        "auditor",
        "--reader-token-sha256",
        &digest,
        "--writers-need-client-cert",
    ]
    .map(str::to_owned);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = spawn_serve(&dir.path().join("data"), &args);
    let started = Instant::now();
    let checkpoint = loop {
        if let Ok(channel) = pki.connect(addr, None).await {
            if let Ok(checkpoint) = read(channel, Some(READER_TOKEN)).await {
                break checkpoint;
            }
        }
        if started.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!(
                "custody serve did not answer over TLS: {:?}",
                child.wait_with_output()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(checkpoint.tree_size, 1);
    let anonymous = pki.connect(addr, None).await.unwrap();
    assert_eq!(
        code(read(anonymous.clone(), None).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(write(anonymous, "grant-anonymous", 2).await),
        Code::Unauthenticated
    );
    let auditor = pki.connect(addr, Some("auditor")).await.unwrap();
    assert!(read(auditor.clone(), None).await.is_ok());
    assert_eq!(write(auditor, "grant-auditor", 2).await.unwrap().seq, 1);

    // The CLI's client commands over the same TLS, with a certificate or a token.
    let https = format!("https://127.0.0.1:{port}");
    let cli = |command: &str, credentials: &[&str], extra: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_custody"))
            .args([command, "--server", &https, "--tls-ca", &path("ca.pem")])
            .args(credentials)
            .args(extra)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let auditor_cert = [
        "--tls-cert",
        &path("auditor.pem"),
        "--tls-key",
        &path("auditor.key"),
    ];
    let token_file = dir.path().join("reader.token");
    std::fs::write(&token_file, format!("{READER_TOKEN}\n")).unwrap();
    let token = ["--token-file", token_file.to_str().unwrap()];
    let (code, stdout, stderr) = cli("checkpoint", &auditor_cert, &["--tls-domain", "localhost"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("localhost/custody\n2\n"), "{stdout}");
    // A name the server's certificate does not carry fails the handshake (exit 2).
    let (code, _, stderr) = cli(
        "checkpoint",
        &auditor_cert,
        &["--tls-domain", "other.example"],
    );
    assert_eq!(code, Some(2), "{stderr}");
    let (code, stdout, stderr) = cli("query", &token, &["--kind", "key-grant"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    // Without a credential the ledger refuses (exit 1); without the CA the client does.
    let (code, _, stderr) = cli("checkpoint", &[], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    let output = Command::new(env!("CARGO_BIN_EXE_custody"))
        .args(["checkpoint", "--server", &https])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--tls-ca"));
    // A write with the writer's certificate, then an export over TLS that verifies.
    let admin = dir.path().join("admin.json");
    let pair = custody::server::KeyPairJson::from_signing_key(&key(1));
    std::fs::write(&admin, serde_json::to_string(&pair).unwrap()).unwrap();
    let writer_cert = [
        "--tls-cert",
        &path("writer.pem"),
        "--tls-key",
        &path("writer.key"),
    ];
    let issuer_hex = hex::encode(key(3).verifying_key().to_bytes());
    let grant = [
        "--admin-key",
        admin.to_str().unwrap(),
        "--public-key",
        &issuer_hex,
        "--role",
        "issuer",
        "--principal",
        "auth.example",
    ];
    let (code, stdout, stderr) = cli("grant-key", &writer_cert, &grant);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("\"seq\":2"), "{stdout}");
    let export = dir.path().join("ledger.export");
    // Refused (no credential): exit 1 and no file left behind.
    let (code, _, stderr) = cli("export", &[], &["--out", export.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!export.exists() && !export.with_extension("partial").exists());
    let (code, _, stderr) = cli("export", &token, &["--out", export.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    let ledger_pub = std::fs::read_to_string(dir.path().join("data/ledger.pub")).unwrap();
    let key = custody::checkpoint::LedgerVerifier::parse(&ledger_pub).unwrap();
    let file = std::io::BufReader::new(std::fs::File::open(&export).unwrap());
    let report = custody::verify::verify_export(file, &key, None, |_, _| ())
        .unwrap()
        .unwrap();
    assert_eq!(report.tree_size, 3);
    let _ = child.kill();
    let _ = child.wait();
}
