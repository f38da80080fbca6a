//! RFC 9162 Merkle trees over stored hashes: leaf and node hashing, roots, inclusion and
//! consistency proofs, and their verification
//! ([RFC 9162 section 2.1](https://www.rfc-editor.org/rfc/rfc9162#section-2.1)).
//!
//! The tree is kept as the sequence of *stored hashes* in the order of Crosby and Wallach
//! (the `tlog_tiles` crate's `stored_hash_index`): appending leaf `n` stores its leaf hash and
//! the hash of every subtree it completes, on average two hashes per leaf. A root or a proof
//! then costs at most `O(log n)` reads through a [`HashReader`]. Stored hashes are packed in
//! pages of [`HASHES_PER_PAGE`] consecutive indexes (see [`page_of`]) so the store writes one
//! key per page, not one per hash.
//!
//! Pure: no I/O, no async. Shared by the server and the offline verifier.

pub use tlog_tiles::{Hash, HashReader, HASH_SIZE};

/// How many consecutive stored hashes share one storage page (as in C2SP tlog-tiles' tiles of
/// 256 hashes).
pub const HASHES_PER_PAGE: u64 = 256;

/// The root of the empty tree: SHA-256 of the empty string.
pub const EMPTY_ROOT: Hash = tlog_tiles::EMPTY_HASH;

/// A proof or a root that could not be produced or did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// An inclusion proof was asked or checked for a leaf outside the tree.
    #[error("leaf {index} is not in a tree of size {tree_size}")]
    LeafOutOfRange { index: u64, tree_size: u64 },
    /// A consistency proof needs `1 <= old_size <= new_size`.
    #[error("no consistency proof from size {old_size} to size {new_size}: need 1 <= old <= new")]
    SizesOutOfRange { old_size: u64, new_size: u64 },
    /// The proof does not lead to the expected root.
    #[error("proof does not verify")]
    InvalidProof,
    /// The hash reader failed (storage error or missing hashes).
    #[error("couldn't read stored hashes: {0}")]
    Read(String),
}

fn read_error(error: tlog_tiles::Error) -> ProofError {
    match error {
        tlog_tiles::Error::InvalidProof => ProofError::InvalidProof,
        other => ProofError::Read(other.to_string()),
    }
}

/// `SHA-256(0x00 || entry_bytes)`: the Merkle leaf hash of an entry's stored bytes.
pub fn leaf_hash(entry_bytes: &[u8]) -> Hash {
    tlog_tiles::record_hash(entry_bytes)
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: Hash, right: Hash) -> Hash {
    tlog_tiles::node_hash(left, right)
}

/// The stored-hash index of leaf `index` (level 0).
pub fn leaf_stored_index(index: u64) -> u64 {
    tlog_tiles::stored_hash_index(0, index)
}

/// How many stored hashes a tree of `tree_size` leaves has.
pub fn stored_hash_count(tree_size: u64) -> u64 {
    tlog_tiles::stored_hash_count(tree_size)
}

/// The page that holds stored hash `stored_index`, and the hash's slot in it.
pub fn page_of(stored_index: u64) -> (u64, usize) {
    // The remainder is < HASHES_PER_PAGE (256), so the cast cannot truncate.
    (
        stored_index / HASHES_PER_PAGE,
        (stored_index % HASHES_PER_PAGE) as usize,
    )
}

/// The hashes to store, starting at stored index `leaf_stored_index(index)`, when appending
/// leaf `index` with hash `leaf` to a tree of `index` leaves whose hashes `reader` holds.
pub fn hashes_to_store<R: HashReader>(
    index: u64,
    leaf: Hash,
    reader: &R,
) -> Result<Vec<Hash>, ProofError> {
    tlog_tiles::stored_hashes_for_record_hash(index, leaf, reader).map_err(read_error)
}

/// The root hash of the first `tree_size` leaves.
pub fn root<R: HashReader>(tree_size: u64, reader: &R) -> Result<Hash, ProofError> {
    tlog_tiles::tree_hash(tree_size, reader).map_err(read_error)
}

/// The RFC 9162 audit path of leaf `index` in the tree of `tree_size` leaves.
pub fn inclusion_proof<R: HashReader>(
    index: u64,
    tree_size: u64,
    reader: &R,
) -> Result<Vec<Hash>, ProofError> {
    if index >= tree_size {
        return Err(ProofError::LeafOutOfRange { index, tree_size });
    }
    tlog_tiles::prove_record(tree_size, index, reader).map_err(read_error)
}

/// The RFC 9162 consistency proof from the tree of `old_size` leaves to the tree of
/// `new_size` leaves.
pub fn consistency_proof<R: HashReader>(
    old_size: u64,
    new_size: u64,
    reader: &R,
) -> Result<Vec<Hash>, ProofError> {
    if old_size == 0 || old_size > new_size {
        return Err(ProofError::SizesOutOfRange { old_size, new_size });
    }
    tlog_tiles::prove_tree(new_size, old_size, reader).map_err(read_error)
}

/// Checks that `proof` shows leaf `index` with hash `leaf` is in the tree of `tree_size`
/// leaves whose root is `root`.
pub fn verify_inclusion(
    proof: &[Hash],
    index: u64,
    tree_size: u64,
    leaf: Hash,
    root: Hash,
) -> Result<(), ProofError> {
    if index >= tree_size {
        return Err(ProofError::LeafOutOfRange { index, tree_size });
    }
    // A path longer than the tree's height cannot be valid; refuse before any work.
    if proof.len() > 64 {
        return Err(ProofError::InvalidProof);
    }
    tlog_tiles::check_record(&proof.to_vec(), tree_size, root, index, leaf).map_err(read_error)
}

/// Checks that `proof` shows the tree (`old_size`, `old_root`) is a prefix of the tree
/// (`new_size`, `new_root`).
pub fn verify_consistency(
    proof: &[Hash],
    old_size: u64,
    old_root: Hash,
    new_size: u64,
    new_root: Hash,
) -> Result<(), ProofError> {
    if old_size == 0 || old_size > new_size {
        return Err(ProofError::SizesOutOfRange { old_size, new_size });
    }
    if proof.len() > 128 {
        return Err(ProofError::InvalidProof);
    }
    tlog_tiles::check_tree(&proof.to_vec(), new_size, new_root, old_size, old_root)
        .map_err(read_error)
}

/// Parses a 32-byte hash from a byte slice (e.g. a proof element received over the wire).
pub fn hash_from_slice(bytes: &[u8]) -> Option<Hash> {
    Some(Hash(bytes.try_into().ok()?))
}

/// The right edge of a growing tree: the roots of its perfect subtrees, largest first. Enough
/// to compute the root after every append in O(log n) memory; what a streaming verifier keeps.
#[derive(Debug, Default, Clone)]
pub struct Frontier {
    /// (height, hash) of each perfect subtree, heights strictly decreasing.
    subtrees: Vec<(u32, Hash)>,
    size: u64,
}

impl Frontier {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut node = (0u32, leaf);
        while let Some(&(height, left)) = self.subtrees.last() {
            if height != node.0 {
                break;
            }
            self.subtrees.pop();
            node = (height + 1, node_hash(left, node.1));
        }
        self.subtrees.push(node);
        self.size += 1;
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The RFC 9162 root of the leaves so far.
    pub fn root(&self) -> Hash {
        let mut hashes = self.subtrees.iter().rev().map(|&(_, hash)| hash);
        match hashes.next() {
            None => EMPTY_ROOT,
            Some(first) => hashes.fold(first, |right, left| node_hash(left, right)),
        }
    }
}

/// A whole tree's stored hashes in memory: what the offline verifier builds while it replays
/// an export, and what tests use as a reference.
#[derive(Debug, Default, Clone)]
pub struct MemoryTree {
    stored: Vec<Hash>,
    size: u64,
}

impl MemoryTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a leaf hash; returns its index.
    pub fn push(&mut self, leaf: Hash) -> u64 {
        let index = self.size;
        // Reading from our own complete stored hashes cannot fail.
        let hashes = hashes_to_store(index, leaf, self).unwrap_or_default();
        self.stored.extend(hashes);
        self.size += 1;
        index
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Root of the whole tree.
    pub fn root(&self) -> Hash {
        root(self.size, self).unwrap_or(EMPTY_ROOT)
    }
}

impl HashReader for MemoryTree {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|&i| {
                usize::try_from(i)
                    .ok()
                    .and_then(|i| self.stored.get(i).copied())
                    .ok_or(tlog_tiles::Error::IndexesNotInTree)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_vectors::load;

    fn hex_hash(value: &serde_json::Value) -> Hash {
        hash_from_slice(&hex::decode(value.as_str().unwrap()).unwrap()).unwrap()
    }

    fn vector_tree(n: usize) -> MemoryTree {
        let v = load("merkle.json");
        let mut tree = MemoryTree::new();
        for leaf in v["leaves"].as_array().unwrap().iter().take(n) {
            tree.push(leaf_hash(&hex::decode(leaf.as_str().unwrap()).unwrap()));
        }
        tree
    }

    #[test]
    fn reproduces_vector_roots() {
        let v = load("merkle.json");
        let roots = v["roots"].as_object().unwrap();
        assert!(roots.len() >= 9);
        for (size, expected) in roots {
            let size: usize = size.parse().unwrap();
            assert_eq!(
                vector_tree(size).root(),
                hex_hash(expected),
                "root of size {size}"
            );
        }
        assert_eq!(MemoryTree::new().root(), EMPTY_ROOT);
    }

    #[test]
    fn reproduces_and_verifies_vector_inclusion_paths() {
        let v = load("merkle.json");
        let full = vector_tree(8);
        let cases = v["inclusion"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let index = case["index"].as_u64().unwrap();
            let size = case["tree_size"].as_u64().unwrap();
            let expected: Vec<Hash> = case["path"]
                .as_array()
                .unwrap()
                .iter()
                .map(hex_hash)
                .collect();
            // Proofs for an older size come from the same (larger) stored tree.
            assert_eq!(
                inclusion_proof(index, size, &full).unwrap(),
                expected,
                "{case}"
            );
            let tree = vector_tree(size as usize);
            let leaf = full.read_hashes(&[leaf_stored_index(index)]).unwrap()[0];
            verify_inclusion(&expected, index, size, leaf, tree.root()).unwrap();
            let mut wrong = leaf;
            wrong.0[0] ^= 1;
            assert_eq!(
                verify_inclusion(&expected, index, size, wrong, tree.root()),
                Err(ProofError::InvalidProof)
            );
        }
    }

    #[test]
    fn reproduces_and_verifies_vector_consistency_proofs() {
        let v = load("merkle.json");
        let full = vector_tree(8);
        let cases = v["consistency"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let old = case["old_size"].as_u64().unwrap();
            let new = case["new_size"].as_u64().unwrap();
            let expected: Vec<Hash> = case["proof"]
                .as_array()
                .unwrap()
                .iter()
                .map(hex_hash)
                .collect();
            assert_eq!(
                consistency_proof(old, new, &full).unwrap(),
                expected,
                "{case}"
            );
            let old_root = vector_tree(old as usize).root();
            let new_root = vector_tree(new as usize).root();
            verify_consistency(&expected, old, old_root, new, new_root).unwrap();
            if old != new {
                let mut wrong = old_root;
                wrong.0[31] ^= 1;
                assert_eq!(
                    verify_consistency(&expected, old, wrong, new, new_root),
                    Err(ProofError::InvalidProof)
                );
            }
        }
    }

    #[test]
    fn refuses_out_of_range_requests() {
        let tree = vector_tree(4);
        assert_eq!(
            inclusion_proof(4, 4, &tree),
            Err(ProofError::LeafOutOfRange {
                index: 4,
                tree_size: 4
            })
        );
        assert_eq!(
            consistency_proof(0, 4, &tree),
            Err(ProofError::SizesOutOfRange {
                old_size: 0,
                new_size: 4
            })
        );
        assert_eq!(
            consistency_proof(5, 4, &tree),
            Err(ProofError::SizesOutOfRange {
                old_size: 5,
                new_size: 4
            })
        );
        assert_eq!(
            verify_inclusion(&[], 3, 2, EMPTY_ROOT, EMPTY_ROOT),
            Err(ProofError::LeafOutOfRange {
                index: 3,
                tree_size: 2
            })
        );
    }

    #[test]
    fn frontier_roots_agree_with_the_stored_tree_and_the_vectors() {
        let v = load("merkle.json");
        let mut frontier = Frontier::new();
        assert_eq!(frontier.root(), EMPTY_ROOT);
        for (i, leaf) in v["leaves"].as_array().unwrap().iter().enumerate() {
            frontier.push(leaf_hash(&hex::decode(leaf.as_str().unwrap()).unwrap()));
            assert_eq!(
                frontier.root(),
                hex_hash(&v["roots"][(i + 1).to_string()]),
                "size {}",
                i + 1
            );
        }
        let mut tree = MemoryTree::new();
        let mut frontier = Frontier::new();
        for i in 0..1000u32 {
            let leaf = leaf_hash(&i.to_be_bytes());
            tree.push(leaf);
            frontier.push(leaf);
            assert_eq!(frontier.root(), tree.root(), "size {}", i + 1);
        }
        assert_eq!(frontier.size(), 1000);
        assert!(frontier.subtrees.len() <= 10, "memory stays logarithmic");
    }

    #[test]
    fn page_arithmetic() {
        assert_eq!(page_of(0), (0, 0));
        assert_eq!(page_of(255), (0, 255));
        assert_eq!(page_of(256), (1, 0));
        assert_eq!(page_of(1000), (3, 232));
        // About two stored hashes per leaf.
        assert_eq!(stored_hash_count(1), 1);
        assert_eq!(stored_hash_count(2), 3);
        assert_eq!(stored_hash_count(1024), 2047);
    }
}
