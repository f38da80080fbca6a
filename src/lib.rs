//! custody: an append-only, chain-of-trust audit ledger for delegated access.
//!
//! Authorization servers, resource servers and users' devices stream Ed25519-signed events
//! over gRPC; each becomes an entry in an RFC 9162 Merkle tree stored in sled, and the ledger
//! signs C2SP checkpoints over the whole tree.
//!
//! # Layout
//!
//! Pure core (no I/O, no async; shared by the server and the offline verifier):
//!
//! - [`envelope`]: DSSE pre-authentication encoding, Ed25519 signing and verification, key ids.
//! - [`merkle`]: RFC 9162 hashing, roots, inclusion and consistency proofs over stored hashes.
//! - [`checkpoint`]: C2SP signed-note checkpoints: format, sign (with one key, or two during
//!   a ledger key rotation), open.
//! - [`trust`]: field limits, key registry rules, who may sign what, verdicts, and the
//!   ledger's own keys and their rotations ([`trust::LedgerKeys`]).
//!
//! The offline verifier builds on it: [`verify`] (trace bundles and whole ledgers, fed bytes;
//! follows ledger key rotations), [`export`] (the export file format), [`scratch`] (the
//! replay state kept in a temporary file) and [`inspect`] (entries as JSON).
//!
//! Edges:
//!
//! - [`store`]: sled key layout, atomic durable group commits, tail check on open.
//! - [`ledger`]: the append pipeline (prepare: decode and batch-verify; judge: evaluate,
//!   sequence and sign the checkpoint; apply: one atomic write; finish: flush, publish,
//!   receipts), the genesis and the ledger key's rotation steps.
//! - [`service`]: the tonic services `Ledger` and `Audit`; errors to gRPC codes in one place.
//! - [`metrics`]: Prometheus counters, histograms and gauges, and their HTTP endpoint.
//! - [`settings`]: `custody serve`'s settings from flags, environment and a TOML file.
//! - [`server`]: configuration, data directory and key files, listener, health, reflection,
//!   shutdown, key rotation on a stopped ledger.
//! - [`client`]: how the CLI's client commands connect (TLS, client certificates, tokens).
//! - [`tls`]: TLS on the listener, client certificates, the plaintext-on-loopback rule.
//! - [`access`]: who may read (`Audit`) and write (`Ledger`): client certificate subjects,
//!   bearer token digests.
//! - [`proto`]: the generated protobuf and gRPC types of `proto/custody/v1/custody.proto`.
#![forbid(unsafe_code)]

pub mod access;
pub mod checkpoint;
pub mod client;
pub mod envelope;
pub mod export;
pub mod inspect;
pub mod ledger;
pub mod merkle;
pub mod metrics;
pub mod scratch;
pub mod server;
pub mod service;
pub mod settings;
pub mod store;
pub mod tls;
pub mod trust;
pub mod verify;

/// Generated types of the public contract, `custody.v1`.
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("custody.v1");

    /// The encoded file descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/custody_descriptor.bin"));
}

#[cfg(test)]
pub(crate) mod mutate;

#[cfg(test)]
pub(crate) mod test_vectors {
    //! Loads the shared test vectors from `../shared/vectors/`.
    use std::path::PathBuf;

    pub fn load(name: &str) -> serde_json::Value {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/vectors")
            .join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("couldn't read {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap()
    }

    pub fn hex_field(value: &serde_json::Value, field: &str) -> Vec<u8> {
        hex::decode(value[field].as_str().unwrap()).unwrap()
    }
}
