//! The bench end to end against one real rig builder (real sshd + Nix 2.8), tiny sizes: proves
//! every layer still fits together. No timing assertions.

use nixmux_benches::env::Targets;
use nixmux_benches::report::{Outcome, Report};
use nixmux_benches::runner::Quiet;
use nixmux_benches::workloads::{Options, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_workloads_run_against_the_rig() {
    let report = run(
        Options {
            targets: Targets::Embedded {
                builders: 1,
                max_sessions: None,
            },
            workloads: vec!["cold-session".into(), "new-channel".into()],
            repeat: Some(1),
            quick: true,
            wan: None,
        },
        &Quiet,
    )
    .await
    .expect("bench runs");
    let table = nixmux_benches::render::table(&report);
    for w in &report.workloads {
        let case = &w.cases[0];
        for id in ["nixmux-ssh-ng", "nixmux-ssh"] {
            let s = case.side(id).unwrap_or_else(|| panic!("{id} in {table}"));
            assert_eq!(s.outcome, Outcome::Measured, "{id}: {table}");
            assert!(s.wall.is_some(), "{table}");
        }
        // The OpenSSH baselines run on the same builders.
        assert!(
            case.sides
                .iter()
                .any(|s| s.id.starts_with("openssh") && s.outcome == Outcome::Measured),
            "{table}"
        );
    }
    let back = Report::from_json(&report.to_json().expect("json")).expect("parse");
    assert_eq!(back, report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_wan_push_goes_through_the_relay() {
    let report = run(
        Options {
            targets: Targets::Embedded {
                builders: 1,
                max_sessions: None,
            },
            workloads: vec!["push-small".into()],
            repeat: Some(1),
            quick: true,
            wan: Some(nixmux_benches::report::WanSettings {
                rtt_ms: 10.0,
                mbit: Some(200.0),
            }),
        },
        &Quiet,
    )
    .await
    .expect("bench runs");
    let table = nixmux_benches::render::table(&report);
    let case = &report.workloads[0].cases[0];
    for id in [
        "nixmux-ssh-ng",
        "nixmux-ssh",
        "nix-copy-ssh",
        "nix-copy-ssh-ng",
    ] {
        let s = case.side(id).unwrap_or_else(|| panic!("{id} in {table}"));
        assert_eq!(s.outcome, Outcome::Measured, "{id}: {table}");
    }
}
