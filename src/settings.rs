//! The settings of `custody serve`, from three sources. For each setting the first of these
//! that gives it wins:
//!
//! 1. the command-line flag (`--max-streams 64`);
//! 2. the environment variable (`CUSTODY_MAX_STREAMS=64`);
//! 3. the TOML file named by `--config` / `CUSTODY_CONFIG` (`max_streams = 64`);
//! 4. the built-in default.
//!
//! The TOML keys are the flag names with `_` for `-`; an unknown key or a value of the wrong
//! type is an error naming the file, never ignored. Relative paths in the file are taken
//! from the working directory of `custody serve`, as on the command line, not from the
//! file's directory. Example:
//!
//! ```toml
//! data_dir = "/var/lib/custody"
//! listen = "127.0.0.1:50051"
//! metrics_listen = "127.0.0.1:9464"
//! log_format = "json"
//! max_streams = 256
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::access::ReaderAllowList;
use crate::server::{self, Config};
use crate::service::{StreamLimits, MAX_STREAM_COUNT};
use crate::tls::{Security, TlsFiles};

/// How `custody serve` writes its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Every setting of `custody serve`, each optional: as flags (with environment variables) and
/// as the TOML file's schema.
#[derive(Debug, Clone, Default, PartialEq, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSettings {
    /// A TOML file with any of these settings (keys are the flag names with `_`); flags and
    /// environment variables override it.
    #[arg(long, env = "CUSTODY_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Where the database and keys live [default: ./custody-data].
    #[arg(long, env = "CUSTODY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:50051].
    #[arg(long, env = "CUSTODY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The log's origin (new ledger; must match an existing one) [default: localhost/custody].
    #[arg(long, env = "CUSTODY_ORIGIN")]
    pub origin: Option<String>,
    /// Hex Ed25519 public key of the first admin (new ledger). Generated into
    /// DATA_DIR/admin.key when absent.
    #[arg(long, env = "CUSTODY_ADMIN_PUBLIC_KEY", value_name = "HEX")]
    pub admin_public_key: Option<String>,
    /// How far an event's occurred_at_ms may stray from the ledger clock (new ledger)
    /// [default: 300000].
    #[arg(long, env = "CUSTODY_MAX_CLOCK_SKEW_MS")]
    pub max_clock_skew_ms: Option<i64>,
    /// Seconds that SIGTERM or Ctrl-C waits for open calls to finish before closing their
    /// connections; everything acknowledged is durable either way [default: 10].
    #[arg(long, env = "CUSTODY_DRAIN_TIMEOUT", value_name = "SECONDS")]
    pub drain_timeout: Option<f64>,
    /// Largest gRPC message decoded, in bytes (a request, or one event of a stream); larger
    /// ones are refused with OUT_OF_RANGE [default: 1048576].
    #[arg(long, env = "CUSTODY_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Streaming calls (AppendStream, Watch, GetEntries) open at once; one more is refused
    /// with RESOURCE_EXHAUSTED [default: 1024].
    #[arg(long, env = "CUSTODY_MAX_STREAMS", value_name = "N")]
    pub max_streams: Option<usize>,
    /// Receipts one AppendStream may have outstanding before the server stops reading it
    /// (the client's sends then wait) [default: 4096].
    #[arg(long, env = "CUSTODY_MAX_IN_FLIGHT_PER_STREAM", value_name = "N")]
    pub max_in_flight_per_stream: Option<usize>,
    /// Serve Prometheus metrics over HTTP at this address (`GET /metrics`); off by default.
    /// Keep it on loopback or a private network: it tells event counts.
    #[arg(long, env = "CUSTODY_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format on stderr: `text` for people, `json` (one object per line) for log
    /// pipelines. RUST_LOG sets the filter (default `info`) [default: text].
    #[arg(long, env = "CUSTODY_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Serve TLS with this PEM certificate chain (leaf first); needs --tls-key.
    #[arg(
        long,
        env = "CUSTODY_TLS_CERT",
        value_name = "PEM",
        help_heading = "TLS and access control"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(
        long,
        env = "CUSTODY_TLS_KEY",
        value_name = "PEM",
        help_heading = "TLS and access control"
    )]
    pub tls_key: Option<PathBuf>,
    /// Verify client certificates against the CA certificate(s) in this PEM file. Clients
    /// may still connect without one unless --require-client-cert.
    #[arg(
        long,
        env = "CUSTODY_CLIENT_CA",
        value_name = "PEM",
        help_heading = "TLS and access control"
    )]
    pub client_ca: Option<PathBuf>,
    /// Every connection must present a client certificate valid under --client-ca. (A
    /// switch: a flag, variable or file can turn it on, none can turn it off.)
    #[arg(
        long,
        env = "CUSTODY_REQUIRE_CLIENT_CERT",
        help_heading = "TLS and access control"
    )]
    #[serde(default)]
    pub require_client_cert: bool,
    /// Calls to the Ledger service (writes) need a client certificate valid under
    /// --client-ca (UNAUTHENTICATED otherwise). A switch, as above.
    #[arg(
        long,
        env = "CUSTODY_WRITERS_NEED_CLIENT_CERT",
        help_heading = "TLS and access control"
    )]
    #[serde(default)]
    pub writers_need_client_cert: bool,
    /// Allow Audit (reads) to clients whose certificate subject Common Name is exactly this
    /// (repeatable; the variable takes a comma-separated list). With this or
    /// --reader-token-sha256, Audit answers only allowed readers.
    #[arg(
        long = "reader-subject",
        env = "CUSTODY_READER_SUBJECTS",
        value_delimiter = ',',
        value_name = "CN",
        help_heading = "TLS and access control"
    )]
    #[serde(default)]
    pub reader_subjects: Vec<String>,
    /// Allow Audit (reads) to clients sending `authorization: Bearer <token>` whose token's
    /// SHA-256 is this hex digest (repeatable; the variable takes a comma-separated list).
    #[arg(
        long = "reader-token-sha256",
        env = "CUSTODY_READER_TOKEN_SHA256",
        value_delimiter = ',',
        value_name = "HEX",
        help_heading = "TLS and access control"
    )]
    #[serde(default)]
    pub reader_token_sha256: Vec<String>,
    /// Serve plaintext on a non-loopback address (refused otherwise). A switch, as above.
    #[arg(
        long,
        env = "CUSTODY_INSECURE",
        help_heading = "TLS and access control"
    )]
    #[serde(default)]
    pub insecure: bool,
}

/// What `custody serve` runs with, every setting decided.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The ledger's configuration.
    pub config: Config,
    /// Where gRPC listens.
    pub listen: SocketAddr,
    /// How the log is written.
    pub log_format: LogFormat,
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// The configuration file could not be read.
    #[error("couldn't read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML for these settings.
    #[error("configuration file {path}: {message}")]
    File { path: PathBuf, message: String },
    /// A value is out of range or malformed.
    #[error("{setting}: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
}

impl ServeSettings {
    /// Parses the TOML text of a configuration file (`path` names it in errors).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, SettingsError> {
        toml::from_str(text).map_err(|e| SettingsError::File {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Each setting of `self`, or else of `lower`.
    pub fn or(self, lower: Self) -> Self {
        Self {
            config: self.config.or(lower.config),
            data_dir: self.data_dir.or(lower.data_dir),
            listen: self.listen.or(lower.listen),
            origin: self.origin.or(lower.origin),
            admin_public_key: self.admin_public_key.or(lower.admin_public_key),
            max_clock_skew_ms: self.max_clock_skew_ms.or(lower.max_clock_skew_ms),
            drain_timeout: self.drain_timeout.or(lower.drain_timeout),
            max_message_bytes: self.max_message_bytes.or(lower.max_message_bytes),
            max_streams: self.max_streams.or(lower.max_streams),
            max_in_flight_per_stream: self
                .max_in_flight_per_stream
                .or(lower.max_in_flight_per_stream),
            metrics_listen: self.metrics_listen.or(lower.metrics_listen),
            log_format: self.log_format.or(lower.log_format),
            tls_cert: self.tls_cert.or(lower.tls_cert),
            tls_key: self.tls_key.or(lower.tls_key),
            client_ca: self.client_ca.or(lower.client_ca),
            require_client_cert: self.require_client_cert || lower.require_client_cert,
            writers_need_client_cert: self.writers_need_client_cert
                || lower.writers_need_client_cert,
            reader_subjects: non_empty_or(self.reader_subjects, lower.reader_subjects),
            reader_token_sha256: non_empty_or(self.reader_token_sha256, lower.reader_token_sha256),
            insecure: self.insecure || lower.insecure,
        }
    }

    /// Reads the configuration file, if one is named, under these settings (flags and
    /// environment), fills in the defaults and checks every value.
    pub fn resolve(self) -> Result<Resolved, SettingsError> {
        let merged = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
                    path: path.clone(),
                    source,
                })?;
                let file = Self::from_toml(&text, path)?;
                self.or(file)
            }
            None => self,
        };
        merged.with_defaults()
    }

    /// Fills in the defaults and checks every value; no file is read.
    pub fn with_defaults(self) -> Result<Resolved, SettingsError> {
        let mut config = Config::new(
            self.data_dir
                .unwrap_or_else(|| PathBuf::from(server::DEFAULT_DATA_DIR)),
        );
        config.origin = self.origin;
        config.admin_public_key = self
            .admin_public_key
            .map(|hex_key| parse_public_key(&hex_key))
            .transpose()?;
        config.max_clock_skew_ms = self
            .max_clock_skew_ms
            .unwrap_or(server::DEFAULT_MAX_CLOCK_SKEW_MS);
        if config.max_clock_skew_ms < 0 {
            return Err(invalid("max_clock_skew_ms", "must not be negative"));
        }
        if let Some(seconds) = self.drain_timeout {
            config.drain_timeout = Duration::try_from_secs_f64(seconds)
                .map_err(|e| invalid("drain_timeout", &format!("{seconds}: {e}")))?;
        }
        config.max_message_bytes = in_range(
            "max_message_bytes",
            self.max_message_bytes,
            server::MAX_MESSAGE_BYTES,
            usize::MAX,
        )?;
        let defaults = StreamLimits::default();
        config.streams = StreamLimits {
            max_streams: in_range(
                "max_streams",
                self.max_streams,
                defaults.max_streams,
                MAX_STREAM_COUNT,
            )?,
            max_in_flight_per_stream: in_range(
                "max_in_flight_per_stream",
                self.max_in_flight_per_stream,
                defaults.max_in_flight_per_stream,
                MAX_STREAM_COUNT,
            )?,
        };
        config.metrics_listen = self.metrics_listen;
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => return Err(invalid("tls_cert", "tls_cert and tls_key go together")),
        };
        let token_sha256 = self
            .reader_token_sha256
            .iter()
            .map(|digest| crate::access::parse_token_sha256(digest))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| invalid("reader_token_sha256", &message))?;
        config.security = Security {
            tls,
            client_ca: self.client_ca,
            require_client_cert: self.require_client_cert,
            writers_need_client_cert: self.writers_need_client_cert,
            readers: ReaderAllowList {
                subjects: self.reader_subjects,
                token_sha256,
            },
            insecure: self.insecure,
        };
        let listen = match self.listen {
            Some(listen) => listen,
            None => server::DEFAULT_LISTEN
                .parse()
                .map_err(|_| invalid("listen", "the built-in default does not parse"))?,
        };
        Ok(Resolved {
            config,
            listen,
            log_format: self.log_format.unwrap_or(LogFormat::Text),
        })
    }
}

/// A list from a higher source replaces the lower one whole; an empty one leaves it.
fn non_empty_or<T>(higher: Vec<T>, lower: Vec<T>) -> Vec<T> {
    if higher.is_empty() {
        lower
    } else {
        higher
    }
}

fn invalid(setting: &'static str, message: &str) -> SettingsError {
    SettingsError::Invalid {
        setting,
        message: message.to_owned(),
    }
}

fn in_range(
    setting: &'static str,
    value: Option<usize>,
    default: usize,
    max: usize,
) -> Result<usize, SettingsError> {
    match value {
        Some(value) if value == 0 || value > max => Err(invalid(
            setting,
            &format!("{value} is out of range (1 to {max})"),
        )),
        Some(value) => Ok(value),
        None => Ok(default),
    }
}

/// A hex Ed25519 public key, checked as every key is ([`crate::envelope::parse_public_key`]:
/// 32 bytes, a curve point, not weak).
fn parse_public_key(hex_key: &str) -> Result<[u8; 32], SettingsError> {
    let bytes = hex::decode(hex_key.trim())
        .map_err(|e| invalid("admin_public_key", &format!("not hex: {e}")))?;
    crate::envelope::parse_public_key(&bytes)
        .map(|key| key.to_bytes())
        .map_err(|e| invalid("admin_public_key", &e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> ServeSettings {
        ServeSettings::from_toml(text, Path::new("custody.toml")).unwrap()
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let resolved = ServeSettings::default().with_defaults().unwrap();
        assert_eq!(resolved.listen, server::DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(
            resolved.config.data_dir,
            PathBuf::from(server::DEFAULT_DATA_DIR)
        );
        assert_eq!(resolved.config.streams, StreamLimits::default());
        assert_eq!(resolved.config.max_message_bytes, server::MAX_MESSAGE_BYTES);
        assert_eq!(resolved.config.drain_timeout, server::DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(resolved.config.metrics_listen, None);
        assert_eq!(resolved.log_format, LogFormat::Text);
    }

    #[test]
    fn the_file_fills_what_flags_and_environment_leave_unset() {
        let from_file = file(
            r#"
            data_dir = "/var/lib/custody"
            listen = "127.0.0.1:6000"
            max_streams = 7
            drain_timeout = 2.5
            log_format = "json"
            metrics_listen = "127.0.0.1:9464"
            "#,
        );
        let flags = ServeSettings {
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            max_streams: Some(9),
            ..ServeSettings::default()
        };
        let resolved = flags.or(from_file).with_defaults().unwrap();
        assert_eq!(resolved.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(resolved.config.streams.max_streams, 9);
        assert_eq!(resolved.config.data_dir, PathBuf::from("/var/lib/custody"));
        assert_eq!(resolved.config.drain_timeout, Duration::from_millis(2500));
        assert_eq!(resolved.log_format, LogFormat::Json);
        assert_eq!(
            resolved.config.metrics_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
    }

    #[test]
    fn unknown_keys_wrong_types_and_bad_values_are_errors() {
        let path = Path::new("custody.toml");
        for text in [
            "max_stream = 3",              // misspelt
            "max_streams = \"many\"",      // wrong type
            "listen = \"not an address\"", // malformed
            "log_format = \"xml\"",        // not a format
            "config = \"other.toml\"",     // only a flag
        ] {
            let error = ServeSettings::from_toml(text, path).unwrap_err();
            assert!(
                error.to_string().contains("custody.toml"),
                "{text}: {error}"
            );
        }
        for (settings, name) in [
            (file("max_streams = 0"), "max_streams"),
            (file("max_streams = 4294967296"), "max_streams"),
            (
                file("max_in_flight_per_stream = 4294967296"),
                "max_in_flight_per_stream",
            ),
            (file("max_message_bytes = 0"), "max_message_bytes"),
            (file("drain_timeout = -1.0"), "drain_timeout"),
            (file("admin_public_key = \"abcd\""), "admin_public_key"),
            // The identity point: 32 bytes of hex, but a weak key.
            (
                file(&format!("admin_public_key = \"01{}\"", "00".repeat(31))),
                "admin_public_key",
            ),
            (file("max_clock_skew_ms = -5"), "max_clock_skew_ms"),
        ] {
            let error = settings.with_defaults().unwrap_err();
            assert!(error.to_string().starts_with(name), "{error}");
        }
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let settings = ServeSettings {
            config: Some(PathBuf::from("/nonexistent/custody.toml")),
            ..ServeSettings::default()
        };
        let error = settings.resolve().unwrap_err();
        assert!(error.to_string().contains("/nonexistent/custody.toml"));
    }
}
