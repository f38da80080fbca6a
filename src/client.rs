//! How the CLI's client commands reach a ledger: plaintext (`http://`) or TLS (`https://`,
//! with the CA to trust, optionally a client certificate), and optionally a reader's bearer
//! token on every call.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A client connection's security settings.
#[derive(Debug, Clone, Default)]
pub struct ClientSecurity {
    /// CA certificate(s), PEM, that the server's certificate must chain to (`https://` only).
    pub ca: Option<PathBuf>,
    /// The name the server's certificate must carry, if not the address's host.
    pub domain: Option<String>,
    /// A client certificate chain and its private key, PEM, to present.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// A file holding a bearer token for `authorization: Bearer` (surrounding whitespace
    /// is trimmed).
    pub token_file: Option<PathBuf>,
}

/// Why a client could not be set up or connect.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The settings contradict each other or the address.
    #[error("{0}")]
    Settings(String),
    /// A certificate, key or token file could not be read.
    #[error("couldn't read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The connection failed.
    #[error("couldn't connect to {server}")]
    Connect {
        server: String,
        source: tonic::transport::Error,
    },
}

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel to the ledger with the token interceptor.
pub type ClientChannel = InterceptedService<Channel, BearerToken>;

fn read(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Whether `server`'s host is a loopback IP address. A name (even `localhost`) is not taken
/// on trust: the resolver decides where it leads.
fn is_loopback(uri: &tonic::codegen::http::Uri) -> bool {
    match uri.host() {
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// Connects to `server` (`http://` or `https://`) with `security`. TLS settings with an
/// `http://` address, an `https://` address without a CA, or a bearer token sent in
/// plaintext to a host that is not loopback are refused before connecting.
pub async fn connect(
    server: &str,
    security: &ClientSecurity,
) -> Result<ClientChannel, ClientError> {
    let mut endpoint = Endpoint::from_shared(server.to_owned())
        .map_err(|e| ClientError::Settings(format!("{server:?} is not a server address: {e}")))?;
    let uri = endpoint.uri().clone();
    let tls = uri.scheme_str() == Some("https");
    if tls {
        let ca = security.ca.as_ref().ok_or_else(|| {
            ClientError::Settings(format!(
                "{server} is https: give --tls-ca, the CA certificate to verify it with"
            ))
        })?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let Some(domain) = &security.domain {
            config = config.domain_name(domain.clone());
        }
        if let Some((cert, key)) = &security.identity {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|source| ClientError::Connect {
                server: server.to_owned(),
                source,
            })?;
    } else if security.ca.is_some() || security.domain.is_some() || security.identity.is_some() {
        return Err(ClientError::Settings(format!(
            "the --tls-* settings need an https:// server, not {server}"
        )));
    }
    let token = match &security.token_file {
        Some(path) => {
            if !tls && !is_loopback(&uri) {
                return Err(ClientError::Settings(format!(
                    "refusing to send a bearer token in plaintext to {server}: use https://"
                )));
            }
            let text = String::from_utf8(read(path)?).map_err(|_| {
                ClientError::Settings(format!("{} does not hold a text token", path.display()))
            })?;
            let mut value =
                MetadataValue::try_from(format!("Bearer {}", text.trim())).map_err(|_| {
                    ClientError::Settings(format!(
                        "the token in {} is not a valid header value",
                        path.display()
                    ))
                })?;
            // Kept out of HTTP/2 header compression tables and debug output.
            value.set_sensitive(true);
            Some(value)
        }
        None => None,
    };
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            server: server.to_owned(),
            source,
        })?;
    Ok(InterceptedService::new(channel, BearerToken(token)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn contradictory_settings_are_refused_before_connecting() {
        let token = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(token.path(), "secret\n").unwrap();
        let with_token = ClientSecurity {
            token_file: Some(token.path().to_owned()),
            ..ClientSecurity::default()
        };
        let refused = |result: Result<ClientChannel, ClientError>| match result {
            Err(ClientError::Settings(message)) => message,
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("connected"),
        };
        // A token in plaintext off loopback (nothing listens there: refused before).
        let message = refused(connect("http://192.0.2.1:50051", &with_token).await);
        assert!(message.contains("plaintext"), "{message}");
        // https without a CA; a CA with http.
        let message = refused(connect("https://127.0.0.1:1", &ClientSecurity::default()).await);
        assert!(message.contains("--tls-ca"), "{message}");
        let with_ca = ClientSecurity {
            ca: Some("ca.pem".into()),
            ..ClientSecurity::default()
        };
        let message = refused(connect("http://127.0.0.1:1", &with_ca).await);
        assert!(message.contains("https://"), "{message}");
        assert!(matches!(
            connect("not a url", &ClientSecurity::default()).await,
            Err(ClientError::Settings(_))
        ));
        // Loopback IP addresses only; names are not trusted.
        for host in ["http://127.0.0.1:1", "http://127.5.0.1:1", "http://[::1]:1"] {
            assert!(is_loopback(&host.parse().unwrap()), "{host}");
        }
        for host in [
            "http://10.0.0.1:1",
            "http://localhost:1",
            "http://localhost.example.com:1",
            "http://127.0.0.1.example.com:1",
            "http://127.0.0.1@example.com:1",
            "http://0.0.0.0:1",
        ] {
            assert!(!is_loopback(&host.parse().unwrap()), "{host}");
        }
    }
}
