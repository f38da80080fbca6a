//! Transport security of the gRPC listener: TLS (rustls, via tonic) with optional client
//! certificates, the access rules of [`crate::access`], and the rule that plaintext is served
//! on loopback addresses only unless the operator insists (`--insecure`).
//!
//! [`Security`] is the configuration (part of [`crate::server::Config`]); [`Security::load`]
//! checks it against the listening address, reads the PEM files (an error names the file)
//! and yields the [`Transport`] the server applies: a tonic server builder with TLS set up
//! and the two access-control interceptors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::{self, PemObject as _};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::access::{ReaderAllowList, ReaderGate, WriterGate, WriterRule};
use crate::server::ServerError;

/// How long a client may take to complete the TLS handshake before its connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's certificate chain and private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (PEM `CERTIFICATE` blocks).
    pub cert: PathBuf,
    /// The leaf's private key (PEM PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Transport security and access control. The default is custody without TLS: plaintext,
/// on loopback addresses only, every service open to whoever can connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// Serve TLS with this certificate and key; plaintext when `None`.
    pub tls: Option<TlsFiles>,
    /// PEM file of the CA certificate(s) that client certificates are verified against; needs
    /// `tls`. Without it the server asks for no client certificate.
    pub client_ca: Option<PathBuf>,
    /// Every connection must present a client certificate valid under `client_ca`, or the
    /// handshake fails. When false a client without a certificate may connect (and read with
    /// a bearer token); one that presents an invalid certificate still fails the handshake.
    pub require_client_cert: bool,
    /// Calls to `Ledger` (writes) need a verified client certificate; event signatures
    /// authenticate every write either way.
    pub writers_need_client_cert: bool,
    /// Who may call `Audit` (reads); everyone when empty.
    pub readers: ReaderAllowList,
    /// Serve plaintext on a non-loopback address anyway (the operator's explicit choice,
    /// e.g. behind a TLS-terminating proxy on a private network).
    pub insecure: bool,
}

/// Whether `addr` is a loopback address (IPv4-mapped IPv6 included).
pub fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

impl Security {
    /// Checks the settings against each other and against the listening address, without
    /// reading any file. Plaintext is refused on a non-loopback address unless `insecure`;
    /// bearer tokens are refused in plaintext on a non-loopback address even then, since every
    /// call would send a reader's secret in the clear.
    pub fn check(&self, addr: SocketAddr) -> Result<(), ServerError> {
        let config = |message: String| Err(ServerError::Config(message));
        if self.tls.is_none() && self.client_ca.is_some() {
            return config("--client-ca needs TLS (--tls-cert and --tls-key)".into());
        }
        if self.client_ca.is_none() {
            if self.require_client_cert {
                return config("--require-client-cert needs --client-ca".into());
            }
            if self.writers_need_client_cert {
                return config("--writers-need-client-cert needs --client-ca".into());
            }
            if !self.readers.subjects.is_empty() {
                return config(
                    "--reader-subject needs --client-ca: without it no client certificate is \
                     verified, so no subject could ever match"
                        .into(),
                );
            }
        }
        if self.tls.is_none() && !is_loopback(addr) {
            if !self.insecure {
                return config(format!(
                    "refusing to serve plaintext gRPC on {addr}, which is not a loopback \
                     address: give --tls-cert and --tls-key, or --insecure to serve plaintext \
                     anyway"
                ));
            }
            if !self.readers.token_sha256.is_empty() {
                return config(format!(
                    "refusing to take bearer tokens (--reader-token-sha256) in plaintext on \
                     {addr}, which is not a loopback address: every call would send a token \
                     in the clear; give --tls-cert and --tls-key"
                ));
            }
        }
        Ok(())
    }

    /// Checks the settings (see [`check`](Self::check)) and loads the certificates and key.
    pub fn load(&self, addr: SocketAddr) -> Result<Transport, ServerError> {
        self.check(addr)?;
        let mut builder = Server::builder();
        if let Some(files) = &self.tls {
            let tls = self.server_tls(files)?;
            builder = builder.tls_config(tls).map_err(|error| ServerError::Tls {
                what: "certificate",
                path: files.cert.clone(),
                message: format!(
                    "it can't be served with the key {}: {}",
                    files.key.display(),
                    error_chain(&error)
                ),
            })?;
        }
        self.log(addr);
        Ok(Transport {
            builder,
            readers: ReaderGate::new(self.readers.clone()),
            writers: WriterGate::new(WriterRule {
                need_client_certificate: self.writers_need_client_cert,
            }),
        })
    }

    fn server_tls(&self, files: &TlsFiles) -> Result<ServerTlsConfig, ServerError> {
        let cert_pem = read_pem(&files.cert, "certificate")?;
        check_certificates(&cert_pem, &files.cert, "certificate")?;
        let key_pem = read_pem(&files.key, "private key")?;
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| ServerError::Tls {
            what: "private key",
            path: files.key.clone(),
            message: match error {
                pem::Error::NoItemsFound => {
                    "no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file".into()
                }
                error => error.to_string(),
            },
        })?;
        let mut tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert_pem, key_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.client_ca {
            let ca_pem = read_pem(ca, "client CA")?;
            check_certificates(&ca_pem, ca, "client CA")?;
            tls = tls
                .client_ca_root(Certificate::from_pem(ca_pem))
                .client_auth_optional(!self.require_client_cert);
        }
        Ok(tls)
    }

    fn log(&self, addr: SocketAddr) {
        let readers = if self.readers.is_configured() {
            format!(
                "{} subject(s), {} token digest(s)",
                self.readers.subjects.len(),
                self.readers.token_sha256.len()
            )
        } else {
            "open".into()
        };
        if self.tls.is_some() {
            let client_certificates = match (&self.client_ca, self.require_client_cert) {
                (None, _) => "not requested",
                (Some(_), false) => "optional",
                (Some(_), true) => "required",
            };
            tracing::info!(
                client_certificates,
                readers,
                writers_need_client_cert = self.writers_need_client_cert,
                "TLS on"
            );
        } else if is_loopback(addr) {
            tracing::info!(
                readers,
                "plaintext on a loopback address (no TLS configured)"
            );
        } else {
            tracing::warn!(
                %addr,
                readers,
                "plaintext on a non-loopback address (--insecure): anyone on the network path \
                 can read and alter the traffic"
            );
        }
    }
}

/// [`Security`] checked and loaded: what the server applies.
#[derive(Debug, Clone)]
pub struct Transport {
    /// A tonic server builder with TLS set up (or none).
    builder: Server,
    /// The interceptor on `Audit`.
    readers: ReaderGate,
    /// The interceptor on `Ledger`.
    writers: WriterGate,
}

impl Transport {
    /// A tonic server builder with TLS (if configured) set up.
    pub fn server_builder(&self) -> Server {
        self.builder.clone()
    }

    /// The interceptor for `Audit`.
    pub fn reader_gate(&self) -> ReaderGate {
        self.readers.clone()
    }

    /// The interceptor for `Ledger`.
    pub fn writer_gate(&self) -> WriterGate {
        self.writers
    }
}

fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|source| ServerError::Tls {
        what,
        path: path.to_owned(),
        message: source.to_string(),
    })
}

/// Checks that `pem_bytes` holds at least one PEM certificate and that each is X.509.
fn check_certificates(
    pem_bytes: &[u8],
    path: &Path,
    what: &'static str,
) -> Result<(), ServerError> {
    let error = |message: String| ServerError::Tls {
        what,
        path: path.to_owned(),
        message,
    };
    let mut count = 0;
    for certificate in CertificateDer::pem_slice_iter(pem_bytes) {
        let certificate = certificate.map_err(|e| error(e.to_string()))?;
        count += 1;
        x509_parser::parse_x509_certificate(certificate.as_ref())
            .map_err(|e| error(format!("certificate {count} is not valid X.509: {e}")))?;
    }
    if count == 0 {
        return Err(error("no PEM certificate in the file".into()));
    }
    Ok(())
}

/// An error and its sources, `": "`-separated (tonic's transport error says little alone).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn tls() -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: "cert.pem".into(),
            key: "key.pem".into(),
        })
    }

    fn refusal(security: &Security, at: &str) -> String {
        match security.check(addr(at)) {
            Err(ServerError::Config(message)) => message,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn plaintext_only_on_loopback_unless_insecure() {
        let plain = Security::default();
        for ok in [
            "127.0.0.1:50051",
            "127.8.9.10:1",
            "[::1]:50051",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(plain.check(addr(ok)).is_ok(), "{ok}");
        }
        for refused in [
            "0.0.0.0:50051",
            "[::]:1",
            "10.0.0.1:50051",
            "[::ffff:10.0.0.1]:1",
        ] {
            let message = refusal(&plain, refused);
            assert!(message.contains("--insecure"), "{message}");
        }
        let insecure = Security {
            insecure: true,
            ..Security::default()
        };
        assert!(insecure.check(addr("0.0.0.0:50051")).is_ok());
        let with_tls = Security {
            tls: tls(),
            ..Security::default()
        };
        assert!(with_tls.check(addr("0.0.0.0:50051")).is_ok());
    }

    #[test]
    fn bearer_tokens_never_in_plaintext_off_loopback() {
        let tokens = Security {
            insecure: true,
            readers: ReaderAllowList {
                token_sha256: vec![[7; 32]],
                ..ReaderAllowList::default()
            },
            ..Security::default()
        };
        assert!(tokens.check(addr("127.0.0.1:1")).is_ok());
        assert!(refusal(&tokens, "0.0.0.0:1").contains("bearer tokens"));
        let with_tls = Security {
            tls: tls(),
            ..tokens
        };
        assert!(with_tls.check(addr("0.0.0.0:1")).is_ok());
    }

    #[test]
    fn client_certificate_settings_need_a_client_ca_and_tls() {
        let ca = Security {
            client_ca: Some("ca.pem".into()),
            ..Security::default()
        };
        assert!(refusal(&ca, "127.0.0.1:1").contains("--client-ca needs TLS"));
        for (security, flag) in [
            (
                Security {
                    tls: tls(),
                    require_client_cert: true,
                    ..Security::default()
                },
                "--require-client-cert",
            ),
            (
                Security {
                    tls: tls(),
                    writers_need_client_cert: true,
                    ..Security::default()
                },
                "--writers-need-client-cert",
            ),
            (
                Security {
                    tls: tls(),
                    readers: ReaderAllowList {
                        subjects: vec!["auditor".into()],
                        ..ReaderAllowList::default()
                    },
                    ..Security::default()
                },
                "--reader-subject",
            ),
        ] {
            let message = refusal(&security, "127.0.0.1:1");
            assert!(message.starts_with(flag), "{message}");
            let fixed = Security {
                client_ca: Some("ca.pem".into()),
                ..security
            };
            assert!(fixed.check(addr("127.0.0.1:1")).is_ok());
        }
    }

    #[test]
    fn unreadable_or_malformed_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not pem at all\n").unwrap();
        let missing = dir.path().join("missing.pem");
        let security = Security {
            tls: Some(TlsFiles {
                cert: missing.clone(),
                key: garbage.clone(),
            }),
            ..Security::default()
        };
        let error = security.load(addr("127.0.0.1:1")).unwrap_err().to_string();
        assert!(
            error.contains("certificate") && error.contains("missing.pem"),
            "{error}"
        );

        let security = Security {
            tls: Some(TlsFiles {
                cert: garbage.clone(),
                key: garbage.clone(),
            }),
            ..Security::default()
        };
        let error = security.load(addr("127.0.0.1:1")).unwrap_err().to_string();
        assert!(error.contains("no PEM certificate"), "{error}");

        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_path = dir.path().join("cert.pem");
        std::fs::write(&cert_path, certificate.pem()).unwrap();
        let security = Security {
            tls: Some(TlsFiles {
                cert: cert_path.clone(),
                key: garbage.clone(),
            }),
            ..Security::default()
        };
        let error = security.load(addr("127.0.0.1:1")).unwrap_err().to_string();
        assert!(
            error.contains("private key") && error.contains("garbage.pem"),
            "{error}"
        );

        // A key that belongs to another certificate.
        let other_key = dir.path().join("other.key");
        std::fs::write(
            &other_key,
            rcgen::KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        let security = Security {
            tls: Some(TlsFiles {
                cert: cert_path.clone(),
                key: other_key,
            }),
            ..Security::default()
        };
        let error = security.load(addr("127.0.0.1:1")).unwrap_err().to_string();
        assert!(error.contains("other.key"), "{error}");

        let key_path = dir.path().join("key.pem");
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let security = Security {
            tls: Some(TlsFiles {
                cert: cert_path,
                key: key_path,
            }),
            client_ca: Some(garbage),
            ..Security::default()
        };
        let error = security.load(addr("127.0.0.1:1")).unwrap_err().to_string();
        assert!(
            error.contains("client CA") && error.contains("garbage.pem"),
            "{error}"
        );
    }
}
