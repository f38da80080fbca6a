//! `custody-sledspace`: how much disk sled 0.34 spends on the kinds of keys a ledger writes,
//! measured on sled alone (no custody code, no network, no signatures), to tell the store's
//! own space amplification from the ledger's layout.
//!
//! It commits `--events` synthetic events in batches of `--batch`, one sled batch and one
//! flush per batch as the ledger does, with the same cache size, and writes the parts chosen
//! with `--parts` (letters, any order):
//!
//! - `e`: an entry per event, 305 random bytes under a sequential 9-byte key;
//! - `h`: about two stored hashes per event, packed 256 to an 8 KiB page, the incomplete last
//!   page rewritten by every batch (the ledger's hash pages);
//! - `r`: small keys spread over the key space: an event id per event (8-byte value), a
//!   token record per 4 events (150 bytes), a consent per 10 (90 bytes), and two index
//!   postings (6 bytes) at 0.4 each.
//!
//! It prints events/s, bytes written per event (`write_bytes` of `/proc/self/io`), the
//! directory's size after closing, and that size and the logical bytes written as multiples
//! of the entries' bytes (314 per event: key and value), the measure of issue #5's data
//! directory target. Seeded: two runs write the same keys.

use anyhow::{bail, Context};
use custody::store::keys;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

const ENTRY_VALUE: usize = 305;
const ENTRY_BYTES: u64 = 9 + ENTRY_VALUE as u64;
const PAGE_BYTES: usize = 256 * 32;

struct Args {
    events: u64,
    batch: u64,
    parts: String,
    dir: PathBuf,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        events: 100_000,
        batch: 15,
        parts: "ehr".into(),
        dir: std::env::temp_dir().join("custody-sledspace"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--events" => args.events = value()?.parse().context("--events")?,
            "--batch" => args.batch = value()?.parse().context("--batch")?,
            "--parts" => args.parts = value()?,
            "--dir" => args.dir = PathBuf::from(value()?),
            "--help" | "-h" => {
                println!(
                    "usage: custody-sledspace [--events N] [--batch N] [--parts ehr] [--dir PATH]\n\
                     (the directory is emptied first; see the source's header for the parts)"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other} (try --help)"),
        }
    }
    if args.batch == 0 || args.events == 0 {
        bail!("--events and --batch must be at least 1");
    }
    if args.parts.is_empty() || !args.parts.chars().all(|c| "ehr".contains(c)) {
        bail!("--parts takes letters from e, h, r");
    }
    Ok(args)
}

fn written_bytes() -> anyhow::Result<u64> {
    let io = std::fs::read_to_string("/proc/self/io").context("reading /proc/self/io")?;
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .context("no write_bytes in /proc/self/io")
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("emptying {}", args.dir.display()))?;
    }
    let db = sled::Config::new()
        .path(&args.dir)
        .cache_capacity(custody::store::CACHE_BYTES)
        .flush_every_ms(None)
        .open()?;
    let tree = db.open_tree("ledger")?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (with_entries, with_pages, with_random) = (
        args.parts.contains('e'),
        args.parts.contains('h'),
        args.parts.contains('r'),
    );
    let written_before = written_bytes()?;
    let started = std::time::Instant::now();
    let (mut seq, mut stored_hashes, mut logical) = (0u64, 0u64, 0u64);
    let mut tail_page: Vec<u8> = Vec::with_capacity(PAGE_BYTES);
    while seq < args.events {
        let mut batch = sled::Batch::default();
        let len = args.batch.min(args.events - seq);
        for seq in seq..seq + len {
            if with_entries {
                let value: Vec<u8> = (0..ENTRY_VALUE).map(|_| rng.gen()).collect();
                batch.insert(&keys::entry(seq), value);
                logical += ENTRY_BYTES;
            }
            if with_random {
                for (prefix, value_len, share) in [
                    (keys::EVENT_ID, 8, 1.0),
                    (keys::TOKEN, 150, 0.25),
                    (keys::CONSENT, 90, 0.1),
                    (keys::INDEX, 6, 0.4),
                    (keys::INDEX, 6, 0.4),
                ] {
                    if rng.gen::<f64>() < share {
                        let name: Vec<u8> = (0..16).map(|_| rng.gen_range(b'a'..=b'z')).collect();
                        logical += 17 + value_len as u64;
                        batch.insert(keys::named(prefix, &name), vec![7u8; value_len]);
                    }
                }
            }
        }
        if with_pages {
            let mut hashes = 2 * len;
            while hashes > 0 {
                let page = stored_hashes / 256;
                let take = hashes.min(256 - stored_hashes % 256);
                tail_page.resize(tail_page.len() + 32 * take as usize, 9);
                batch.insert(&keys::hash_page(page), tail_page.clone());
                logical += 32 * take;
                if tail_page.len() == PAGE_BYTES {
                    tail_page.clear();
                }
                stored_hashes += take;
                hashes -= take;
            }
        }
        batch.insert(
            keys::named(keys::META, keys::META_CHECKPOINT),
            vec![1u8; 200],
        );
        tree.apply_batch(batch)?;
        db.flush()?;
        seq += len;
    }
    let seconds = started.elapsed().as_secs_f64();
    let written = written_bytes()? - written_before;
    drop(tree);
    drop(db);
    let on_disk = custody::store::directory_bytes(&args.dir)?;
    let entries = (ENTRY_BYTES * args.events) as f64;
    println!(
        "parts {} batch {}: {} events, {:.0} events/s, {:.2} KiB written per event, \
         {:.1} MB on disk = {:.2} x the entries' bytes (logical {:.2} x)",
        args.parts,
        args.batch,
        args.events,
        args.events as f64 / seconds,
        written as f64 / args.events as f64 / 1024.0,
        on_disk as f64 / 1e6,
        on_disk as f64 / entries,
        logical as f64 / entries,
    );
    Ok(())
}
