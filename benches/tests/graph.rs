//! The graph workload end to end on two real rig builders (sshd + Nix 2.8), with a tiny graph
//! (4 leaves, 2 middle, 1 top; 50 ms builds; one slot per builder): every side builds it,
//! remotely, on both builders. No timing assertions.

use nixmux_benches::env::Targets;
use nixmux_benches::report::Outcome;
use nixmux_benches::runner::Quiet;
use nixmux_benches::workloads::{Options, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_graph_is_built_by_every_side() {
    let report = run(
        Options {
            targets: Targets::Embedded {
                builders: 2,
                max_sessions: None,
            },
            workloads: vec!["graph".into()],
            repeat: Some(1),
            quick: true,
            wan: None,
        },
        &Quiet,
    )
    .await
    .expect("bench runs");
    let table = nixmux_benches::render::table(&report);
    let w = report.workload("graph").expect("graph workload");
    let case = &w.cases[0];
    for id in [
        "nixmux-2",
        "nixmux-1",
        "nixmux-2-lease-first",
        "nix-build-2",
        "nix-build-2-poll0",
    ] {
        let s = case.side(id).unwrap_or_else(|| panic!("{id} in {table}"));
        assert_eq!(
            s.outcome,
            Outcome::Measured,
            "{id}: {table} {:?}",
            s.details
        );
        assert_eq!(s.details.get("builds").map(String::as_str), Some("7"));
        // Every build ran on a rig builder (its marker), never locally.
        let spread = &s.details["built_on_last_sample"];
        assert!(!spread.contains("unknown"), "{id}: {spread}");
        if id.ends_with("lease-first") {
            // Its first wave may well go to one builder: that is what it shows.
            continue;
        }
        let want = if id == "nixmux-1" { "1" } else { "2" };
        assert_eq!(
            s.details.get("fewest_builders_used").map(String::as_str),
            Some(want),
            "{id}: {spread}"
        );
    }
}
