//! `nixmux ping`: every builder concurrently, staged and timed.

use std::io::Write;

use nixmux::BuilderConfig;
use nixmux::ping::{PingReport, PingStage, TrustReport, ping};

use crate::exit_code;

/// Pings every builder at once and returns the reports in input order.
pub(crate) async fn run_all(builders: Vec<BuilderConfig>, rounds: usize) -> Vec<PingReport> {
    let mut set = tokio::task::JoinSet::new();
    for (i, b) in builders.into_iter().enumerate() {
        set.spawn(async move { (i, ping(&b, rounds).await) });
    }
    let mut out: Vec<(usize, PingReport)> = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(x) => out.push(x),
            Err(e) => tracing::error!("ping task failed: {e}"),
        }
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

/// The exit code: 0 when all succeeded, else the code of the first failed builder (in the
/// order given).
pub(crate) fn exit_code(reports: &[PingReport]) -> i32 {
    reports
        .iter()
        .find(|r| !r.ok)
        .map(|r| {
            r.error_kind
                .map(exit_code::for_kind)
                .unwrap_or(exit_code::FAILURE)
        })
        .unwrap_or(exit_code::OK)
}

fn stage_ms(r: &PingReport, s: PingStage) -> Option<f64> {
    r.stages.iter().find(|t| t.stage == s).map(|t| t.ms)
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0} ms"),
        Some(v) if v >= 1.0 => format!("{v:.1} ms"),
        Some(v) => format!("{v:.2} ms"),
        None => "-".into(),
    }
}

/// The table for people.
pub(crate) fn render_table(reports: &[PingReport], out: &mut impl Write) -> std::io::Result<()> {
    let rows: Vec<[String; 8]> = reports
        .iter()
        .map(|r| {
            let connect: f64 = r
                .stages
                .iter()
                .filter(|s| {
                    !matches!(
                        s.stage,
                        PingStage::Exec | PingStage::DaemonSocket | PingStage::Handshake
                    )
                })
                .map(|s| s.ms)
                .sum();
            [
                r.builder.clone(),
                if r.ok { "ok".into() } else { "FAILED".into() },
                match &r.protocol_version {
                    Some(v) => format!("{} {v}", r.protocol),
                    None => r.protocol.clone(),
                },
                r.remote_nix_version.clone().unwrap_or_else(|| "-".into()),
                match r.trust {
                    TrustReport::Trusted => "trusted".into(),
                    TrustReport::Untrusted => "untrusted".into(),
                    TrustReport::Unknown => "unknown".into(),
                },
                fmt_ms((connect > 0.0).then_some(connect)),
                fmt_ms(
                    stage_ms(r, PingStage::Exec)
                        .or(stage_ms(r, PingStage::DaemonSocket))
                        .zip(stage_ms(r, PingStage::Handshake))
                        .map(|(a, b)| a + b),
                ),
                fmt_ms(r.rtt_ms.map(|x| x[1])),
            ]
        })
        .collect();
    let header = [
        "BUILDER", "RESULT", "PROTOCOL", "NIX", "TRUST", "CONNECT", "SESSION", "RTT",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in &rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    for r in reports {
        writeln!(out)?;
        let stages: Vec<String> = r
            .stages
            .iter()
            .map(|s| format!("{} {}", s.stage, fmt_ms(Some(s.ms))))
            .collect();
        writeln!(out, "{} ({})", r.builder, r.endpoint)?;
        if !stages.is_empty() {
            writeln!(out, "  stages: {}", stages.join(", "))?;
        }
        if let Some(hk) = &r.host_key {
            writeln!(
                out,
                "  host key: {} {} (verified by {})",
                hk.algorithm, hk.fingerprint, hk.verified_by
            )?;
        }
        if let Some((kex, cipher)) = &r.algorithms {
            match r.compression.as_deref() {
                Some(c) if c != "none" => writeln!(out, "  ssh: {kex}, {cipher}, {c}")?,
                _ => writeln!(out, "  ssh: {kex}, {cipher}")?,
            }
        }
        match (&r.session_path, &r.session_path_reason) {
            (Some(path), Some(why)) => writeln!(out, "  session: {path} ({why})")?,
            (Some(path), None) => writeln!(out, "  session: {path}")?,
            (None, Some(why)) => writeln!(out, "  session: {why}")?,
            (None, None) => {}
        }
        if let Some([min, med, max]) = r.rtt_ms {
            writeln!(
                out,
                "  round trip: min {} / median {} / max {}",
                fmt_ms(Some(min)),
                fmt_ms(Some(med)),
                fmt_ms(Some(max))
            )?;
        }
        if let Some(bulk) = &r.bulk_compression {
            writeln!(out, "  bulk transfers: {bulk}")?;
        }
        if let Some(ahead) = &r.send_ahead {
            writeln!(out, "  writes ahead: {ahead}")?;
        }
        if let Some(f) = &r.failure {
            writeln!(out, "  FAILED at {} ({}): {}", f.stage, f.kind, f.message)?;
            if let Some(h) = &f.hint {
                writeln!(out, "  fix: {h}")?;
            }
        }
    }
    Ok(())
}

/// The JSON document for programs.
pub(crate) fn render_json(reports: &[PingReport], out: &mut impl Write) -> std::io::Result<()> {
    let doc = serde_json::json!({
        "ok": reports.iter().all(|r| r.ok),
        "exit_code": exit_code(reports),
        "builders": reports,
    });
    serde_json::to_writer_pretty(&mut *out, &doc)?;
    writeln!(out)
}
