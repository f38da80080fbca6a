//! The reviewer's CLI against a real server: `custody query` prints JSON lines, `custody
//! trace --out` saves a bundle that verifies offline; refusals exit 1.

use custody::proto::TraceBundle;
use prost::Message as _;

use crate::support::*;

#[tokio::test]
async fn query_prints_json_lines_and_trace_saves_a_verifiable_bundle() {
    let ledger = TestLedger::start().await;
    crate::query::mixed_ledger(&ledger, 8, 5).await;
    let output = run_cli(vec![
        "query".into(),
        "--server".into(),
        ledger.url(),
        "--user".into(),
        "alice".into(),
        "--kind".into(),
        "action".into(),
    ])
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty());
    let mut action_seq = None;
    for line in &lines {
        assert_eq!(line["event"]["kind"], "action");
        let occurred = line["event"]["occurred_at"].as_str().unwrap();
        assert!(
            occurred.ends_with('Z') && occurred.contains('T'),
            "{occurred}"
        );
        assert_eq!(line["leaf_hash"].as_str().unwrap().len(), 64);
        assert!(line["verdict"]["status"]
            .as_str()
            .unwrap()
            .starts_with("TRACE_STATUS_"));
        action_seq.get_or_insert(line["seq"].as_u64().unwrap());
    }
    let seq = action_seq.unwrap();
    let out = ledger.dir.path().join("bundle.pb");
    let output = run_cli(vec![
        "trace".into(),
        "--server".into(),
        ledger.url(),
        seq.to_string(),
        "--out".into(),
        out.display().to_string(),
    ])
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bundle = TraceBundle::decode(std::fs::read(&out).unwrap().as_slice()).unwrap();
    let key = custody::checkpoint::LedgerVerifier::parse(&ledger.verifier_key).unwrap();
    let report = custody::verify::verify_trace_bundle(&bundle, &key).unwrap();
    assert_eq!(report.seq, seq);
    // A refused request exits 1 with the status on stderr.
    let output = run_cli(vec![
        "trace".into(),
        "--server".into(),
        ledger.url(),
        "1".into(),
    ])
    .await;
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("InvalidArgument"));
}
