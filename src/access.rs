//! Who may call what: reader access control on `custody.v1.Audit`, and the client-certificate
//! rule on `custody.v1.Ledger`.
//!
//! Two tonic interceptors, one per service, each a thin shell over a pure decision
//! ([`ReaderAllowList::authorize`], [`WriterRule::authorize`]) that yields an [`Denied`] value;
//! [`crate::service::status::access`] turns it into the gRPC status. Health and reflection are
//! not wrapped and stay open.
//!
//! What counts as a credential:
//!
//! - a **client certificate**: the first certificate of the chain the client presented in the
//!   TLS handshake, which rustls has already verified against `--client-ca` (an unverifiable
//!   certificate fails the handshake and never reaches this module). A reader is allowed when
//!   the certificate's subject has exactly one Common Name (CN) and it is equal, byte for
//!   byte, to one of the configured subjects; other attributes of the subject (O, OU, ...) are
//!   not compared, so the client CA should be one that issues certificates for custody only.
//! - a **bearer token**: the request metadata `authorization: Bearer <token>` (scheme
//!   case-insensitive, one space, a non-empty token without spaces). A reader is allowed when
//!   the SHA-256 of the token's bytes equals one of the configured digests; digests are
//!   compared in constant time. The server never holds the tokens themselves.

use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tonic::metadata::MetadataMap;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::service::status;

/// The readers allowed to call `Audit`. Empty (the default): `Audit` is open to anyone who
/// can connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReaderAllowList {
    /// Common Names of client certificates allowed to read (see the module docs).
    pub subjects: Vec<String>,
    /// SHA-256 digests of bearer tokens allowed to read.
    pub token_sha256: Vec<[u8; 32]>,
}

/// Why a call was refused. Mapped to a gRPC status in [`crate::service::status::access`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Denied {
    /// Reader access control is on and the call carried neither a client certificate nor an
    /// `authorization` header (`UNAUTHENTICATED`).
    NoReaderCredential,
    /// The `authorization` metadata is not a single `Bearer <token>` (`UNAUTHENTICATED`).
    MalformedAuthorization,
    /// A client certificate or bearer token was presented, and none is an allowed reader
    /// (`PERMISSION_DENIED`).
    ReaderNotAllowed,
    /// Writers need a client certificate and the connection presented none
    /// (`UNAUTHENTICATED`).
    NoWriterCertificate,
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Denied::NoReaderCredential => {
                "reading the ledger needs a client certificate or an `authorization: Bearer` token"
            }
            Denied::MalformedAuthorization => {
                "the authorization metadata must be a single `Bearer <token>`"
            }
            Denied::ReaderNotAllowed => {
                "the client certificate or bearer token presented is not an allowed reader"
            }
            Denied::NoWriterCertificate => {
                "writing to the ledger needs a client certificate issued by the ledger's client CA"
            }
        })
    }
}

/// The bearer credential of a call, as far as it could be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bearer<'a> {
    /// No `authorization` metadata.
    Absent,
    /// `authorization` metadata that is not one `Bearer <token>`.
    Malformed,
    /// The token after `Bearer `.
    Token(&'a [u8]),
}

impl<'a> Bearer<'a> {
    /// Reads the `authorization` metadata of a call.
    pub fn from_metadata(metadata: &'a MetadataMap) -> Self {
        let mut values = metadata.get_all("authorization").iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return if metadata.get("authorization").is_none() {
                Bearer::Absent
            } else {
                Bearer::Malformed
            };
        };
        Self::parse(value.as_bytes())
    }

    /// Parses an `authorization` value: `Bearer <token>`, the scheme in any case.
    pub fn parse(value: &'a [u8]) -> Self {
        const SCHEME: &[u8] = b"bearer ";
        if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
            return Bearer::Malformed;
        }
        let token = &value[SCHEME.len()..];
        if token.iter().any(|b| !b.is_ascii_graphic()) {
            return Bearer::Malformed;
        }
        Bearer::Token(token)
    }
}

/// Parses a `--reader-token-sha256` value: 64 hex digits.
pub fn parse_token_sha256(hex_digest: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(hex_digest.trim())
        .map_err(|e| format!("a token digest must be hex (SHA-256, 64 digits): {e}"))?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        format!(
            "a token digest must be 32 bytes (SHA-256, 64 hex digits), got {}",
            b.len()
        )
    })
}

/// The Common Name of a DER certificate's subject, when it has exactly one and it is a string.
pub fn certificate_common_name(der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = certificate.subject().iter_common_name();
    match (names.next(), names.next()) {
        (Some(name), None) => name.as_str().ok().map(str::to_owned),
        _ => None,
    }
}

impl ReaderAllowList {
    /// Whether reader access control is on.
    pub fn is_configured(&self) -> bool {
        !self.subjects.is_empty() || !self.token_sha256.is_empty()
    }

    /// Decides whether a call with this client certificate (DER, already verified by TLS)
    /// and bearer credential may read. Allowed when either credential is allowed; refused
    /// with [`Denied::ReaderNotAllowed`] when a certificate or well-formed token was
    /// presented but none is allowed; otherwise [`Denied::MalformedAuthorization`] or
    /// [`Denied::NoReaderCredential`].
    pub fn authorize(&self, certificate: Option<&[u8]>, bearer: Bearer<'_>) -> Result<(), Denied> {
        if !self.is_configured() {
            return Ok(());
        }
        if let Some(der) = certificate {
            if let Some(name) = certificate_common_name(der) {
                if self.subjects.contains(&name) {
                    return Ok(());
                }
            }
        }
        if let Bearer::Token(token) = bearer {
            let digest: [u8; 32] = Sha256::digest(token).into();
            // Compare with every allowed digest, without stopping at a match.
            let allowed = self
                .token_sha256
                .iter()
                .fold(subtle::Choice::from(0), |found, allowed| {
                    found | allowed.ct_eq(&digest)
                });
            if bool::from(allowed) {
                return Ok(());
            }
        }
        match (certificate, bearer) {
            (Some(_), _) | (_, Bearer::Token(_)) => Err(Denied::ReaderNotAllowed),
            (None, Bearer::Malformed) => Err(Denied::MalformedAuthorization),
            (None, Bearer::Absent) => Err(Denied::NoReaderCredential),
        }
    }
}

/// Whether calls to `Ledger` need a verified client certificate. Event signatures
/// authenticate every write either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterRule {
    /// Refuse calls from connections without a verified client certificate.
    pub need_client_certificate: bool,
}

impl WriterRule {
    /// Decides whether a call whose connection presented `certificate` may write.
    pub fn authorize(self, certificate: Option<&[u8]>) -> Result<(), Denied> {
        if self.need_client_certificate && certificate.is_none() {
            return Err(Denied::NoWriterCertificate);
        }
        Ok(())
    }
}

/// The client certificate chain the connection presented and TLS verified, leaf first.
type PeerChain = Option<Arc<Vec<rustls_pki_types::CertificateDer<'static>>>>;

/// The leaf of a verified client certificate chain.
fn leaf(chain: &PeerChain) -> Option<&[u8]> {
    chain
        .as_deref()
        .and_then(|chain| chain.first())
        .map(|der| der.as_ref())
}

/// The interceptor on `Audit`: applies the [`ReaderAllowList`].
#[derive(Debug, Clone, Default)]
pub struct ReaderGate {
    allow: Arc<ReaderAllowList>,
}

impl ReaderGate {
    /// A gate admitting the readers in `allow` (everyone when it is empty).
    pub fn new(allow: ReaderAllowList) -> Self {
        Self {
            allow: Arc::new(allow),
        }
    }
}

impl Interceptor for ReaderGate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if !self.allow.is_configured() {
            return Ok(request);
        }
        let chain = request.peer_certs();
        let bearer = Bearer::from_metadata(request.metadata());
        match self.allow.authorize(leaf(&chain), bearer) {
            Ok(()) => Ok(request),
            Err(denied) => Err(status::access(denied)),
        }
    }
}

/// The interceptor on `Ledger`: applies the [`WriterRule`].
#[derive(Debug, Clone, Copy, Default)]
pub struct WriterGate {
    rule: WriterRule,
}

impl WriterGate {
    /// A gate applying `rule`.
    pub fn new(rule: WriterRule) -> Self {
        Self { rule }
    }
}

impl Interceptor for WriterGate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if !self.rule.need_client_certificate {
            return Ok(request);
        }
        match self.rule.authorize(leaf(&request.peer_certs())) {
            Ok(()) => Ok(request),
            Err(denied) => Err(status::access(denied)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(common_names: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example");
        for name in common_names {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, *name);
        }
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn digest(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    fn allow_list() -> ReaderAllowList {
        ReaderAllowList {
            subjects: vec!["auditor".into()],
            token_sha256: vec![digest("s3cret-token")],
        }
    }

    #[test]
    fn an_empty_allow_list_admits_everyone() {
        assert_eq!(
            ReaderAllowList::default().authorize(None, Bearer::Absent),
            Ok(())
        );
    }

    #[test]
    fn allowed_certificate_or_token_reads() {
        let allow = allow_list();
        let auditor = certificate(&["auditor"]);
        assert_eq!(allow.authorize(Some(&auditor), Bearer::Absent), Ok(()));
        assert_eq!(
            allow.authorize(None, Bearer::parse(b"Bearer s3cret-token")),
            Ok(())
        );
        assert_eq!(
            allow.authorize(None, Bearer::parse(b"bEaReR s3cret-token")),
            Ok(())
        );
        // Either allowed credential is enough.
        assert_eq!(
            allow.authorize(Some(&auditor), Bearer::parse(b"Bearer wrong")),
            Ok(())
        );
        let stranger = certificate(&["stranger"]);
        assert_eq!(
            allow.authorize(Some(&stranger), Bearer::parse(b"Bearer s3cret-token")),
            Ok(())
        );
    }

    #[test]
    fn presented_but_not_allowed_is_permission_denied() {
        let allow = allow_list();
        let stranger = certificate(&["stranger"]);
        assert_eq!(
            allow.authorize(Some(&stranger), Bearer::Absent),
            Err(Denied::ReaderNotAllowed)
        );
        assert_eq!(
            allow.authorize(None, Bearer::parse(b"Bearer s3cret-tokeN")),
            Err(Denied::ReaderNotAllowed)
        );
        // Only the CN is compared, and there must be one. (rcgen cannot write a subject with
        // two CNs, which `certificate_common_name` also refuses.)
        let no_name = certificate(&[]);
        assert_eq!(
            allow.authorize(Some(&no_name), Bearer::Absent),
            Err(Denied::ReaderNotAllowed)
        );
        let prefix = certificate(&["auditor2"]);
        assert_eq!(
            allow.authorize(Some(&prefix), Bearer::Absent),
            Err(Denied::ReaderNotAllowed)
        );
        assert_eq!(
            allow.authorize(Some(b"not a certificate"), Bearer::Absent),
            Err(Denied::ReaderNotAllowed)
        );
    }

    #[test]
    fn no_credential_is_unauthenticated() {
        let allow = allow_list();
        assert_eq!(
            allow.authorize(None, Bearer::Absent),
            Err(Denied::NoReaderCredential)
        );
        for malformed in [
            &b"Bearer"[..],
            b"Bearer ",
            b"Basic dXNlcjpwdw==",
            b"Bearer two words",
            b"Bearers3cret-token",
            b"s3cret-token",
        ] {
            assert_eq!(Bearer::parse(malformed), Bearer::Malformed, "{malformed:?}");
            assert_eq!(
                allow.authorize(None, Bearer::parse(malformed)),
                Err(Denied::MalformedAuthorization)
            );
        }
    }

    #[test]
    fn bearer_metadata_must_be_single() {
        let mut metadata = MetadataMap::new();
        assert_eq!(Bearer::from_metadata(&metadata), Bearer::Absent);
        metadata.insert("authorization", "Bearer a".parse().unwrap());
        assert_eq!(Bearer::from_metadata(&metadata), Bearer::Token(b"a"));
        metadata.append("authorization", "Bearer b".parse().unwrap());
        assert_eq!(Bearer::from_metadata(&metadata), Bearer::Malformed);
    }

    #[test]
    fn token_digests_parse_from_hex() {
        let hex_digest = hex::encode(digest("t"));
        assert_eq!(parse_token_sha256(&hex_digest), Ok(digest("t")));
        assert!(parse_token_sha256("abcd").unwrap_err().contains("32 bytes"));
        assert!(parse_token_sha256("zz").unwrap_err().contains("hex"));
    }

    #[test]
    fn writers_need_a_certificate_only_when_configured() {
        let open = WriterRule::default();
        assert_eq!(open.authorize(None), Ok(()));
        let strict = WriterRule {
            need_client_certificate: true,
        };
        assert_eq!(strict.authorize(None), Err(Denied::NoWriterCertificate));
        assert_eq!(strict.authorize(Some(&certificate(&["w"]))), Ok(()));
    }
}
