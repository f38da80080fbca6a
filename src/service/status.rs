//! The one place where errors become gRPC statuses.
//!
//! Refusals keep their message (the client needs it to fix the event). Storage failures reach
//! the client as `INTERNAL` with a generic message; the cause goes to the log.

use tonic::{Code, Status};

use crate::access::Denied;
use crate::merkle::ProofError;
use crate::proto::ReceiptError;
use crate::store::StoreError;
use crate::trust::Refusal;

/// The gRPC code of a refusal.
pub fn refusal_code(refusal: &Refusal) -> Code {
    match refusal {
        Refusal::Malformed(_) | Refusal::ClockSkew { .. } => Code::InvalidArgument,
        Refusal::UnknownKey(_) | Refusal::KeyNotValid { .. } | Refusal::BadSignature(_) => {
            Code::Unauthenticated
        }
        Refusal::RoleNotAllowed { .. } | Refusal::PrincipalMismatch { .. } => {
            Code::PermissionDenied
        }
        Refusal::EventIdReused { .. } => Code::AlreadyExists,
        Refusal::Conflict(_) => Code::FailedPrecondition,
        // Refusal is non_exhaustive for other crates only; every variant is listed above.
    }
}

/// A refused event as a status.
pub fn refusal(refusal: &Refusal) -> Status {
    Status::new(refusal_code(refusal), refusal.to_string())
}

/// A storage failure: logged with its cause, reported as a generic `INTERNAL`.
pub fn storage(error: &StoreError) -> Status {
    if matches!(error, StoreError::Stopped) {
        return Status::unavailable(error.to_string());
    }
    tracing::error!(%error, "storage failure");
    Status::internal("internal storage error; the operation was not completed")
}

/// A proof request that cannot be served.
pub fn proof(error: &ProofError) -> Status {
    match error {
        ProofError::LeafOutOfRange { .. } | ProofError::SizesOutOfRange { .. } => {
            Status::out_of_range(error.to_string())
        }
        ProofError::InvalidProof | ProofError::Read(_) => {
            tracing::error!(%error, "couldn't build a proof from stored hashes");
            Status::internal("internal storage error; the proof could not be built")
        }
    }
}

/// One streaming call more than the server's limit.
pub fn too_many_streams(limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "too many open streams (the limit is {limit}); close one or retry later"
    ))
}

/// The ledger is still opening (or rebuilding); retry shortly.
pub fn opening() -> Status {
    Status::unavailable("the ledger is opening; retry shortly")
}

/// The ledger is shutting down or its commit task stopped.
pub fn unavailable() -> Status {
    Status::unavailable("the ledger is shutting down")
}

/// A status carried inside a streamed receipt.
pub fn receipt_error(status: &Status) -> ReceiptError {
    ReceiptError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

/// A call refused by access control: no usable credential is `UNAUTHENTICATED`, a credential
/// that is not allowed `PERMISSION_DENIED`.
pub fn access(denied: Denied) -> Status {
    let code = match denied {
        Denied::NoReaderCredential
        | Denied::MalformedAuthorization
        | Denied::NoWriterCertificate => Code::Unauthenticated,
        Denied::ReaderNotAllowed => Code::PermissionDenied,
    };
    Status::new(code, denied.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_refusals_map_to_contract_codes() {
        for (denied, code) in [
            (Denied::NoReaderCredential, Code::Unauthenticated),
            (Denied::MalformedAuthorization, Code::Unauthenticated),
            (Denied::NoWriterCertificate, Code::Unauthenticated),
            (Denied::ReaderNotAllowed, Code::PermissionDenied),
        ] {
            assert_eq!(access(denied).code(), code, "{denied}");
        }
    }

    #[test]
    fn refusals_map_to_contract_codes() {
        let cases = [
            (Refusal::Malformed("x".into()), Code::InvalidArgument),
            (
                Refusal::ClockSkew {
                    occurred_at_ms: 1,
                    skew_ms: 2,
                    max_skew_ms: 1,
                },
                Code::InvalidArgument,
            ),
            (Refusal::UnknownKey("k".into()), Code::Unauthenticated),
            (Refusal::BadSignature("x".into()), Code::Unauthenticated),
            (
                Refusal::KeyNotValid {
                    key_id: "k".into(),
                    at_ms: 1,
                    why: "revoked",
                },
                Code::Unauthenticated,
            ),
            (
                Refusal::RoleNotAllowed {
                    role: "USER",
                    kind: "Action",
                },
                Code::PermissionDenied,
            ),
            (
                Refusal::PrincipalMismatch {
                    principal: "a".into(),
                    field: "f",
                    claimed: "b".into(),
                },
                Code::PermissionDenied,
            ),
            (
                Refusal::EventIdReused {
                    event_id: "e".into(),
                    seq: 1,
                },
                Code::AlreadyExists,
            ),
            (Refusal::Conflict("c".into()), Code::FailedPrecondition),
        ];
        for (r, code) in cases {
            assert_eq!(refusal(&r).code(), code, "{r}");
            assert_eq!(refusal(&r).message(), r.to_string());
        }
    }

    #[test]
    fn storage_errors_do_not_leak_detail() {
        let status = storage(&StoreError::Corrupt("secret path /var/x".into()));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("/var/x"));
    }
}
