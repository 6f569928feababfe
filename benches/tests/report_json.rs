//! `--json` output must round-trip through the documented types: every field and every enum
//! variant, written and read back, gives the same value.

use std::collections::BTreeMap;

use nixmux_benches::report::{
    CaseResult, CpuTime, Environment, Figure, Goal, Outcome, Report, Role, SCHEMA_VERSION,
    Settings, SideResult, Summary, Targets, Verdict, WanSettings, WorkloadResult,
};

fn summary(base: f64) -> Summary {
    Summary {
        n: 7,
        median: base,
        p90: base * 1.1,
        p99: base * 1.3,
        min: base * 0.9,
        max: base * 1.5,
        mean: base * 1.05,
    }
}

fn side(id: &str, role: Role, outcome: Outcome, base: f64) -> SideResult {
    let measured = matches!(outcome, Outcome::Measured);
    SideResult {
        id: id.into(),
        label: format!("{id} \"quoted\" <label> ×"),
        role,
        outcome,
        samples: if measured { 7 } else { 0 },
        failures: 1,
        sample_seconds: if measured {
            vec![base, base * 1.1, 0.1 + 0.2]
        } else {
            vec![]
        },
        wall: measured.then(|| summary(base)),
        per_op: measured.then(|| summary(base / 100.0)),
        throughput: measured.then(|| summary(3.456e8)),
        bytes_per_sample: measured.then_some(209_715_400),
        ratio: None,
        cpu: measured.then_some(CpuTime {
            user_s: 0.0123,
            system_s: 0.004_56,
            children_user_s: 0.1,
            children_system_s: 1.0 / 3.0,
        }),
        peak_rss_bytes: measured.then_some(23 << 20),
        details: BTreeMap::from([("cipher".to_owned(), "aes128-gcm@openssh.com".to_owned())]),
    }
}

fn report() -> Report {
    let mut case = CaseResult {
        label: "16 sessions".into(),
        param: Some(16.0),
        reference: Some("nixmux-ssh-ng".into()),
        sides: vec![
            side("nixmux-ssh-ng", Role::Subject, Outcome::Measured, 0.0517),
            side(
                "openssh-ssh-ng",
                Role::Baseline,
                Outcome::Measured,
                0.281_234_567_890_123,
            ),
            side("ssh-true", Role::Reference, Outcome::Measured, 0.2),
            side(
                "nix-build-ssh",
                Role::Baseline,
                Outcome::Unavailable {
                    reason: "needs the embedded rig".into(),
                },
                0.0,
            ),
            side(
                "openssh-cm-ssh-ng",
                Role::Baseline,
                Outcome::Failed {
                    error: "channel open failed: no more sessions".into(),
                },
                0.0,
            ),
        ],
    };
    case.compute_ratios(Figure::Wall);
    let figures = [Figure::Wall, Figure::PerOp, Figure::Throughput];
    let verdicts = [Verdict::Met, Verdict::NotMet, Verdict::Unknown];
    Report {
        schema_version: SCHEMA_VERSION,
        nixmux_version: "0.1.0".into(),
        started_unix: 1_795_000_000,
        duration_s: 201.337,
        environment: Environment {
            cpus: 2,
            load_before: [3.12, 3.21, 2.02],
            load_after: [4.5, 3.9, 2.5],
            kernel: "6.18.0".into(),
            nix_version: Some("nix (Nix) 2.8.0".into()),
            openssh_version: None,
            targets: Targets {
                embedded: true,
                builders: vec!["builder0".into(), "builder1".into()],
            },
        },
        settings: Settings {
            repeat: Some(5),
            quick: false,
            wan: Some(WanSettings {
                rtt_ms: 50.0,
                mbit: Some(100.0),
            }),
            workloads: vec!["cold-session".into(), "concurrency".into()],
        },
        workloads: figures
            .iter()
            .zip(verdicts)
            .enumerate()
            .map(|(k, (&primary, verdict))| WorkloadResult {
                name: format!("w{k}"),
                title: "a title".into(),
                description: "what is timed".into(),
                primary,
                cases: vec![case.clone()],
                goals: vec![Goal {
                    text: "cold session ≤ 0.1 s".into(),
                    issue: "#6".into(),
                    verdict,
                    measured: "0.0517 s".into(),
                }],
                notes: vec!["a note".into()],
            })
            .collect(),
    }
}

#[test]
fn report_round_trips_through_json() {
    let r = report();
    let text = r.to_json().expect("serialise");
    let back = Report::from_json(&text).expect("parse");
    assert_eq!(back, r);
    // And the text is stable: writing what was read gives the same document.
    assert_eq!(back.to_json().expect("serialise again"), text);
}

#[test]
fn json_shape_is_as_documented() {
    let v: serde_json::Value =
        serde_json::from_str(&report().to_json().expect("json")).expect("value");
    assert_eq!(v["schema_version"], SCHEMA_VERSION);
    let side = &v["workloads"][0]["cases"][0]["sides"][3];
    assert_eq!(side["outcome"]["status"], "unavailable");
    assert_eq!(side["outcome"]["reason"], "needs the embedded rig");
    assert_eq!(v["workloads"][1]["primary"], "per_op");
    assert_eq!(v["workloads"][1]["goals"][0]["verdict"], "not_met");
    assert_eq!(v["workloads"][0]["cases"][0]["sides"][0]["role"], "subject");
    // Ratios: the baseline's time over nixmux's.
    let ratio = v["workloads"][0]["cases"][0]["sides"][1]["ratio"]
        .as_f64()
        .expect("ratio");
    assert!((ratio - 0.281_234_567_890_123 / 0.0517).abs() < 1e-12);
    assert!(v["workloads"][0]["cases"][0]["sides"][0]["ratio"].is_null());
}

#[test]
fn charts_and_table_render_every_workload() {
    let r = report();
    let table = nixmux_benches::render::table(&r);
    assert!(table.contains("w0") && table.contains("unavailable") && table.contains("FAILED"));
    let dir = tempfile::tempdir().expect("tmp");
    let written = nixmux_benches::render::write_charts(&r, dir.path()).expect("charts");
    assert_eq!(written.len(), 3);
    for p in written {
        let svg = std::fs::read_to_string(p).expect("svg");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("&quot;quoted&quot; &lt;label&gt;"));
    }
}
