//! The report of a run: one row per (scenario, payload, server), printed as a
//! table, written as JSON and Markdown to `target/bench/`, drawn as an SVG
//! chart (throughput and p99 per scenario), and checked against the targets
//! of issue 5 as ratios measured in the same run.

use std::fmt::Write as _;

use crate::servers::ServerKind;

/// One measured row.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Outcome {
    pub scenario: String,
    pub server: Option<ServerKind>,
    pub payload_bytes: usize,
    /// Echoed messages in the measured window (gRPC-Web: calls x 10).
    pub messages: Option<u64>,
    pub seconds: Option<f64>,
    pub msgs_per_sec: Option<f64>,
    /// gRPC-Web only: completed 10-message calls per second.
    pub calls_per_sec: Option<f64>,
    /// Fixed-rate scenarios: the rate the load generator aimed at.
    pub offered_msgs_per_sec: Option<f64>,
    /// Latency of a reply (gRPC-Web: of a whole call), microseconds.
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub max_us: Option<f64>,
    /// Server user + system CPU time over the window, per echoed message.
    pub server_cpu_us_per_msg: Option<f64>,
    /// CPU used by other processes during the window, in % of one core: a
    /// run with much of it was disturbed and its throughput is not comparable.
    pub foreign_cpu_percent: Option<f64>,
    pub idle_calls: Option<usize>,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub kib_per_idle_call: Option<f64>,
    pub error: Option<String>,
    /// Rounds this row aggregates (its values are their medians); 1 for a
    /// single measurement.
    pub rounds: usize,
    /// Smallest and largest value over the rounds, when there were several.
    pub spread: Option<Spread>,
}

/// The (min, max) of the headline figures over the rounds of a row.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Spread {
    pub msgs_per_sec: Option<(f64, f64)>,
    pub p99_us: Option<(f64, f64)>,
    pub server_cpu_us_per_msg: Option<(f64, f64)>,
    pub kib_per_idle_call: Option<(f64, f64)>,
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

fn min_max(values: &[f64]) -> Option<(f64, f64)> {
    let min = values.iter().copied().reduce(f64::min)?;
    let max = values.iter().copied().reduce(f64::max)?;
    Some((min, max))
}

/// One row per (scenario, payload, server) over all rounds, in the order of
/// the first round: every figure the median of the rounds that measured it
/// without error, the headline figures' min and max beside it. A row that
/// failed in every round keeps its first error.
pub fn aggregate(rounds: &[Vec<Outcome>]) -> Vec<Outcome> {
    let Some(first) = rounds.first() else { return Vec::new() };
    first
        .iter()
        .map(|row| {
            let same: Vec<&Outcome> = rounds
                .iter()
                .flatten()
                .filter(|o| {
                    o.scenario == row.scenario
                        && o.payload_bytes == row.payload_bytes
                        && o.server == row.server
                        && o.error.is_none()
                })
                .collect();
            if same.is_empty() {
                return row.clone();
            }
            let values =
                |field: fn(&Outcome) -> Option<f64>| -> Vec<f64> { same.iter().filter_map(|o| field(o)).collect() };
            let med = |field: fn(&Outcome) -> Option<f64>| median(&mut values(field));
            let spread = (same.len() > 1).then(|| Spread {
                msgs_per_sec: min_max(&values(|o| o.msgs_per_sec)),
                p99_us: min_max(&values(|o| o.p99_us)),
                server_cpu_us_per_msg: min_max(&values(|o| o.server_cpu_us_per_msg)),
                kib_per_idle_call: min_max(&values(|o| o.kib_per_idle_call)),
            });
            Outcome {
                scenario: row.scenario.clone(),
                server: row.server,
                payload_bytes: row.payload_bytes,
                messages: med(|o| o.messages.map(|m| m as f64)).map(|m| m as u64),
                seconds: med(|o| o.seconds),
                msgs_per_sec: med(|o| o.msgs_per_sec),
                calls_per_sec: med(|o| o.calls_per_sec),
                offered_msgs_per_sec: med(|o| o.offered_msgs_per_sec),
                p50_us: med(|o| o.p50_us),
                p99_us: med(|o| o.p99_us),
                p999_us: med(|o| o.p999_us),
                max_us: med(|o| o.max_us),
                server_cpu_us_per_msg: med(|o| o.server_cpu_us_per_msg),
                foreign_cpu_percent: med(|o| o.foreign_cpu_percent),
                idle_calls: row
                    .idle_calls
                    .map(|_| med(|o| o.idle_calls.map(|c| c as f64)).unwrap_or(0.0) as usize),
                rss_before_kib: med(|o| o.rss_before_kib.map(|k| k as f64)).map(|k| k as u64),
                rss_after_kib: med(|o| o.rss_after_kib.map(|k| k as f64)).map(|k| k as u64),
                kib_per_idle_call: med(|o| o.kib_per_idle_call),
                error: None,
                rounds: same.len(),
                spread,
            }
        })
        .collect()
}

/// `value`, followed by ` (min–max)` when the row has a spread for it.
fn with_spread(value: String, spread: Option<(f64, f64)>, show: impl Fn(Option<f64>) -> String) -> String {
    match spread {
        Some((min, max)) => format!("{value} ({}–{})", show(Some(min)), show(Some(max))),
        None => value,
    }
}

impl Outcome {
    fn server_name(&self) -> &'static str {
        self.server.map_or("?", ServerKind::name)
    }

    fn is_memory(&self) -> bool {
        self.idle_calls.is_some()
    }
}

/// The machine a run happened on.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub memory_mib: u64,
    pub kernel: String,
}

impl Machine {
    pub fn this() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map_or("unknown".into(), |m| m.trim().to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: u64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory_mib: memory_kib / 1024,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}

/// One target of issue 5 with its measured ratio.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub target: String,
    pub measured: String,
    /// The ratio (or value) itself; over rounds, the median.
    pub value: f64,
    /// What `value` is in: `x` for a ratio, ` ms`, ` KiB`.
    pub unit: String,
    pub met: bool,
}

fn latency(us: Option<f64>) -> String {
    match us {
        None => "-".into(),
        Some(us) if us < 1000.0 => format!("{us:.0} µs"),
        Some(us) => format!("{:.2} ms", us / 1000.0),
    }
}

fn rate(value: Option<f64>) -> String {
    match value {
        None => "-".into(),
        Some(v) if v >= 10_000.0 => format!("{:.0}k", v / 1000.0),
        Some(v) => format!("{v:.0}"),
    }
}

/// The Markdown tables: load scenarios, then memory.
pub fn markdown(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    out.push_str("| scenario | payload | server | msg/s | p50 | p99 | p99.9 | server CPU / msg | other load |\n");
    out.push_str("|---|---:|---|---:|---:|---:|---:|---:|---:|\n");
    for o in outcomes.iter().filter(|o| !o.is_memory()) {
        if let Some(error) = &o.error {
            let _ = writeln!(
                out,
                "| {} | {} B | {} | failed: {} | | | | | |",
                o.scenario,
                o.payload_bytes,
                o.server_name(),
                error.replace('|', "/")
            );
            continue;
        }
        let spread = o.spread.clone().unwrap_or_default();
        let mut throughput = with_spread(rate(o.msgs_per_sec), spread.msgs_per_sec, rate);
        if let Some(offered) = o.offered_msgs_per_sec {
            let _ = write!(throughput, " (offered {})", rate(Some(offered)));
        }
        if let Some(calls) = o.calls_per_sec {
            let _ = write!(throughput, " ({} calls/s)", rate(Some(calls)));
        }
        let _ = writeln!(
            out,
            "| {} | {} B | {} | {} | {} | {} | {} | {} | {} |",
            o.scenario,
            o.payload_bytes,
            o.server_name(),
            throughput,
            latency(o.p50_us),
            with_spread(latency(o.p99_us), spread.p99_us, latency),
            latency(o.p999_us),
            with_spread(
                o.server_cpu_us_per_msg.map_or("-".into(), |c| format!("{c:.2} µs")),
                spread.server_cpu_us_per_msg,
                |c| c.map_or("-".into(), |c| format!("{c:.2}")),
            ),
            o.foreign_cpu_percent.map_or("-".into(), |c| format!("{c:.0}%")),
        );
    }
    out.push('\n');
    out.push_str("| memory scenario | server | idle calls | server RSS before → after | per idle call |\n");
    out.push_str("|---|---|---:|---:|---:|\n");
    for o in outcomes.iter().filter(|o| o.is_memory()) {
        match &o.error {
            Some(error) => {
                let _ = writeln!(out, "| {} | {} | failed: {} | | |", o.scenario, o.server_name(), error);
            }
            None => {
                let per_call = with_spread(
                    format!("{:.1} KiB", o.kib_per_idle_call.unwrap_or(0.0)),
                    o.spread.as_ref().and_then(|s| s.kib_per_idle_call),
                    |k| format!("{:.1}", k.unwrap_or(0.0)),
                );
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} → {} KiB | {} |",
                    o.scenario,
                    o.server_name(),
                    o.idle_calls.unwrap_or(0),
                    o.rss_before_kib.unwrap_or(0),
                    o.rss_after_kib.unwrap_or(0),
                    per_call
                );
            }
        }
    }
    out
}

fn find<'a>(outcomes: &'a [Outcome], scenario: &str, payload: usize, server: ServerKind) -> Option<&'a Outcome> {
    outcomes
        .iter()
        .find(|o| o.scenario == scenario && o.payload_bytes == payload && o.server == Some(server) && o.error.is_none())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? / b?).filter(|r| r.is_finite())
}

/// The targets of issue 5, each as a ratio measured in this run. Targets
/// whose rows are missing (a server or scenario not run) are left out.
pub fn checks(outcomes: &[Outcome]) -> Vec<Check> {
    use ServerKind::*;
    let mut checks = Vec::new();
    let mut push = |target: String, value: Option<f64>, unit: &str, met: &dyn Fn(f64) -> bool| {
        if let Some(v) = value {
            checks.push(Check {
                target,
                measured: format!("{v:.2}{unit}"),
                value: v,
                unit: unit.to_string(),
                met: met(v),
            });
        }
    };
    let payloads: Vec<usize> = {
        let mut p: Vec<usize> = outcomes.iter().map(|o| o.payload_bytes).collect();
        p.sort_unstable();
        p.dedup();
        p
    };
    let grpc_scenarios: Vec<String> = {
        let mut s: Vec<String> = outcomes
            .iter()
            .filter(|o| o.scenario.starts_with("grpc ") && !o.is_memory())
            .map(|o| o.scenario.clone())
            .collect();
        s.sort();
        s.dedup();
        s
    };
    for &p in &payloads {
        for scenario in &grpc_scenarios {
            let (Some(sb), Some(tonic)) = (
                find(outcomes, scenario, p, Streambridge),
                find(outcomes, scenario, p, PlainTonic),
            ) else {
                continue;
            };
            push(
                format!("{scenario} {p} B: throughput ≥ 0.97x plain tonic"),
                ratio(sb.msgs_per_sec, tonic.msgs_per_sec),
                "x",
                &|r| r >= 0.97,
            );
            push(
                format!("{scenario} {p} B: server CPU/msg ≤ 1.05x plain tonic"),
                ratio(sb.server_cpu_us_per_msg, tonic.server_cpu_us_per_msg),
                "x",
                &|r| r <= 1.05,
            );
        }
        let grpc_wide = "grpc 4x50x8";
        if let (Some(sb), Some(go)) = (
            find(outcomes, grpc_wide, p, Streambridge),
            find(outcomes, grpc_wide, p, GrpcGo),
        ) {
            push(
                format!("{grpc_wide} {p} B: throughput ≥ 1.5x grpc-go"),
                ratio(sb.msgs_per_sec, go.msgs_per_sec),
                "x",
                &|r| r >= 1.5,
            );
        }
        for codec in ["json", "proto"] {
            let wide = format!("ws-{codec} 200x8");
            let naive_wide = find(outcomes, "ws-json 200x8", p, NaiveWs);
            let node_wide = find(outcomes, "ws-json 200x8", p, NodeWs);
            if let Some(sb) = find(outcomes, &wide, p, Streambridge) {
                if let Some(naive) = naive_wide {
                    push(
                        format!("{wide} {p} B: server CPU/msg ≤ 0.4x naive bridge"),
                        ratio(sb.server_cpu_us_per_msg, naive.server_cpu_us_per_msg),
                        "x",
                        &|r| r <= 0.4,
                    );
                    push(
                        format!("{wide} {p} B: throughput ≥ 1.5x naive bridge"),
                        ratio(sb.msgs_per_sec, naive.msgs_per_sec),
                        "x",
                        &|r| r >= 1.5,
                    );
                }
                if let Some(node) = node_wide {
                    push(
                        format!("{wide} {p} B: throughput ≥ 3x Node ws"),
                        ratio(sb.msgs_per_sec, node.msgs_per_sec),
                        "x",
                        &|r| r >= 3.0,
                    );
                }
                push(
                    format!("{wide} {p} B: p99 < 5 ms"),
                    sb.p99_us.map(|us| us / 1000.0),
                    " ms",
                    &|ms| ms < 5.0,
                );
            }
            let ping = format!("ws-{codec} ping-pong");
            if let (Some(sb), Some(naive)) = (
                find(outcomes, &ping, p, Streambridge),
                find(outcomes, "ws-json ping-pong", p, NaiveWs),
            ) {
                push(
                    format!("{ping} {p} B: p99 ≤ 1.2x naive bridge"),
                    ratio(sb.p99_us, naive.p99_us),
                    "x",
                    &|r| r <= 1.2,
                );
            }
        }
    }
    for &p in &payloads {
        let wide = "grpc 4x50x8";
        if let (Some(sb), Some(nginx)) = (
            find(outcomes, wide, p, StreambridgeProxy),
            find(outcomes, wide, p, NginxProxy),
        ) {
            push(
                format!("{wide} {p} B through a proxy: proxy CPU/msg ≤ 0.8x nginx grpc_pass"),
                ratio(sb.server_cpu_us_per_msg, nginx.server_cpu_us_per_msg),
                "x",
                &|r| r <= 0.8,
            );
            push(
                format!("{wide} {p} B through a proxy: throughput ≥ 1.2x nginx grpc_pass"),
                ratio(sb.msgs_per_sec, nginx.msgs_per_sec),
                "x",
                &|r| r >= 1.2,
            );
        }
    }
    for &p in &payloads {
        for codec in ["json", "proto"] {
            let v2 = format!("ws2-{codec} 200x10x8");
            if let (Some(v2_row), Some(v1_row)) = (
                find(outcomes, &v2, p, Streambridge),
                find(outcomes, &format!("ws-{codec} 200x8"), p, Streambridge),
            ) {
                push(
                    format!("{v2} {p} B: server CPU/msg ≤ 0.6x v1 (ws-{codec} 200x8)"),
                    ratio(v2_row.server_cpu_us_per_msg, v1_row.server_cpu_us_per_msg),
                    "x",
                    &|r| r <= 0.6,
                );
            }
            let v2_rate = format!("ws2-{codec} 200x10 fixed-rate");
            if let (Some(v2_row), Some(v1_row)) = (
                find(outcomes, &v2_rate, p, Streambridge),
                find(outcomes, &format!("ws-{codec} 200 fixed-rate"), p, Streambridge),
            ) {
                push(
                    format!(
                        "{v2_rate} {p} B: server CPU/msg ≤ 0.6x v1 at the same offered rate (ws-{codec} 200 fixed-rate)"
                    ),
                    ratio(v2_row.server_cpu_us_per_msg, v1_row.server_cpu_us_per_msg),
                    "x",
                    &|r| r <= 0.6,
                );
            }
        }
    }
    for o in outcomes
        .iter()
        .filter(|o| o.is_memory() && o.server == Some(Streambridge))
        // Reported beside the idle socket's, with no target of its own (issue 26).
        .filter(|o| !o.scenario.starts_with("idle http"))
    {
        let (limit, what) = if o.scenario.starts_with("idle ws2 calls") {
            (1.0, "≤ 1 KiB per additional idle v2 call")
        } else if o.scenario.starts_with("idle ws2") {
            (4.0, "≤ 4 KiB per idle v2 socket")
        } else if o.scenario.starts_with("idle ws") {
            (4.0, "≤ 4 KiB per idle WebSocket")
        } else {
            (6.0, "≤ 6 KiB per idle gRPC stream")
        };
        push(format!("{}: {what}", o.scenario), o.kib_per_idle_call, " KiB", &|k| {
            k <= limit
        });
    }
    checks
}

/// The targets over several rounds: each ratio is measured within a round
/// (the two servers of a ratio measured minutes apart, never across rounds),
/// and a target is met only when every round measured it and met it.
/// `measured` shows the median and the min–max, and in how many rounds.
pub fn checks_over_rounds(rounds: &[Vec<Outcome>]) -> Vec<Check> {
    let per_round: Vec<Vec<Check>> = rounds.iter().map(|round| checks(round)).collect();
    // Every target any round measured, in the order they first appear.
    let mut targets: Vec<&Check> = Vec::new();
    for check in per_round.iter().flatten() {
        if !targets.iter().any(|t| t.target == check.target) {
            targets.push(check);
        }
    }
    targets
        .into_iter()
        .map(|check| {
            let same: Vec<&Check> = per_round
                .iter()
                .flatten()
                .filter(|c| c.target == check.target)
                .collect();
            let mut values: Vec<f64> = same.iter().map(|c| c.value).collect();
            let (min, max) = min_max(&values).unwrap_or((check.value, check.value));
            let middle = median(&mut values).unwrap_or(check.value);
            let unit = &check.unit;
            let measured = if rounds.len() > 1 {
                format!(
                    "{middle:.2}{unit} ({min:.2}–{max:.2}, {} of {} rounds)",
                    same.len(),
                    rounds.len()
                )
            } else {
                format!("{middle:.2}{unit}")
            };
            Check {
                target: check.target.clone(),
                measured,
                value: middle,
                unit: unit.clone(),
                met: same.len() == rounds.len() && same.iter().all(|c| c.met),
            }
        })
        .collect()
}

/// The targets as a Markdown list.
pub fn checks_markdown(checks: &[Check]) -> String {
    let mut out = String::from("| target | measured | met |\n|---|---:|---|\n");
    for c in checks {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            c.target,
            c.measured,
            if c.met { "yes" } else { "**no**" }
        );
    }
    out
}

fn color(server: Option<ServerKind>) -> &'static str {
    match server {
        Some(ServerKind::Streambridge) => "#2b6cb0",
        Some(ServerKind::PlainTonic) => "#38a169",
        Some(ServerKind::StockTonic) => "#68d391",
        Some(ServerKind::GrpcGo) => "#00add8",
        Some(ServerKind::NaiveWs) => "#dd6b20",
        Some(ServerKind::StreambridgeProxy) => "#805ad5",
        Some(ServerKind::NginxProxy) => "#009639",
        Some(ServerKind::StreambridgeAdded) => "#d53f8c",
        Some(ServerKind::StreambridgeEdge) => "#2c5282",
        Some(ServerKind::StreambridgeAddedEdge) => "#97266d",
        Some(ServerKind::NodeWs) => "#805ad5",
        None => "#999999",
    }
}

/// A horizontal bar chart: for each scenario, one bar per server for
/// throughput (left) and p99 (right), each scaled to the scenario's largest.
pub fn svg(outcomes: &[Outcome], title: &str) -> String {
    const ROW: f64 = 16.0;
    const LABEL: f64 = 330.0;
    const PANEL: f64 = 330.0;
    const GAP: f64 = 150.0;
    let rows: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| !o.is_memory() && o.error.is_none() && o.msgs_per_sec.is_some())
        .collect();
    let mut groups: Vec<(String, Vec<&Outcome>)> = Vec::new();
    for o in rows {
        let key = format!("{} · {} B", o.scenario, o.payload_bytes);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(o),
            None => groups.push((key, vec![o])),
        }
    }
    let lines: usize = groups.iter().map(|(_, m)| m.len() + 1).sum();
    let height = 70.0 + lines as f64 * ROW + 20.0;
    let width = LABEL + 2.0 * PANEL + GAP + 120.0;
    let right = LABEL + PANEL + GAP;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let _ = writeln!(
        s,
        r#"<text x="{LABEL}" y="45" font-weight="bold">throughput, msg/s (longer is better)</text><text x="{right}" y="45" font-weight="bold">p99 latency (shorter is better)</text>"#
    );
    let mut y = 70.0;
    for (key, members) in &groups {
        let _ = writeln!(
            s,
            r#"<text x="10" y="{}" font-weight="bold">{}</text>"#,
            y + 11.0,
            escape(key)
        );
        y += ROW;
        let max_rate = members.iter().filter_map(|o| o.msgs_per_sec).fold(0.0, f64::max);
        let max_p99 = members.iter().filter_map(|o| o.p99_us).fold(0.0, f64::max);
        for o in members {
            let fill = color(o.server);
            let _ = writeln!(s, r#"<text x="24" y="{}">{}</text>"#, y + 11.0, o.server_name());
            let rate_value = o.msgs_per_sec.unwrap_or(0.0);
            let w = if max_rate > 0.0 {
                rate_value / max_rate * PANEL
            } else {
                0.0
            };
            let _ = writeln!(
                s,
                r#"<rect x="{LABEL}" y="{}" width="{w:.1}" height="{}" fill="{fill}"/><text x="{}" y="{}">{}</text>"#,
                y + 2.0,
                ROW - 4.0,
                LABEL + w + 4.0,
                y + 11.0,
                rate(Some(rate_value))
            );
            let p99 = o.p99_us.unwrap_or(0.0);
            let w = if max_p99 > 0.0 { p99 / max_p99 * PANEL } else { 0.0 };
            let _ = writeln!(
                s,
                r#"<rect x="{right}" y="{}" width="{w:.1}" height="{}" fill="{fill}"/><text x="{}" y="{}">{}</text>"#,
                y + 2.0,
                ROW - 4.0,
                right + w + 4.0,
                y + 11.0,
                latency(Some(p99))
            );
            y += ROW;
        }
    }
    s.push_str("</svg>\n");
    s
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
