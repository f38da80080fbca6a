//! Integration tests: each starts a real ledger in-process on `127.0.0.1:0` and drives it over
//! a real socket with the generated tonic clients.
//!
//! - `audit`: export and offline verification; every kind of tampering caught.
//! - `binary`: the real `custody` binary: SIGKILLed while streaming, SIGTERM drain, health
//!   while opening.
//! - `cli`: `custody query` and `custody trace` as a reviewer runs them.
//! - `support`: starting and stopping servers, keys, signed-event builders.
//! - `write`: genesis, key grants, unary and streaming appends, every refusal.
//! - `hostile`: mutated exports, entries, trace bundles and events: typed errors, never a
//!   clean verification of altered bytes, and the verifier agrees with what the ledger accepts.
//! - `limits`: oversized messages and streams beyond the limit refused, nothing written.
//! - `durability`: restart keeps size, root and the hash chain; data-directory files.
//! - `query`: `Audit.Query` against a brute-force oracle over a mixed ledger.
//! - `proofs`: receipts proved against checkpoints with the pure core only; out-of-range reads.
//! - `trust`: verdicts over the wire, revocation, who may revoke, trace bundles verified offline.
//! - `watch`: existing entries, then live ones.
//! - `server`: gRPC health and reflection.
//! - `tls`: TLS with generated certificates, client certificates, reader and writer access
//!   control, the plaintext-on-loopback rule.

mod audit;
mod binary;
mod cli;
mod durability;
mod hostile;
mod limits;
mod proofs;
mod query;
mod server;
mod support;
mod tls;
mod trust;
mod watch;
mod write;
