//! What a run measures and how: the warm-up / measure / stop phases shared by
//! every load task, per-task latency histograms (hdrhistogram, nanoseconds),
//! and the server's CPU time and resident memory read from `/proc/PID/*`.
//!
//! Only replies that arrive while the phase is [`Phase::Measure`] count, so
//! connection setup, warm-up and the drain at the end never enter a figure.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Where a run stands; every load task reads it before each send and reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Connections are up and loaded, nothing is recorded yet.
    Warmup,
    /// Replies are counted and their latencies recorded.
    Measure,
    /// No more sends; tasks drain what is in flight and end their calls.
    Stop,
}

/// The phase, shared by the orchestrator (which moves it) and every task.
#[derive(Clone, Default)]
pub struct Control(Arc<AtomicU8>);

impl Control {
    pub fn phase(&self) -> Phase {
        match self.0.load(Ordering::Relaxed) {
            0 => Phase::Warmup,
            1 => Phase::Measure,
            _ => Phase::Stop,
        }
    }

    pub fn set(&self, phase: Phase) {
        self.0.store(phase as u8, Ordering::Relaxed);
    }

    pub fn stopped(&self) -> bool {
        self.phase() == Phase::Stop
    }
}

/// Latencies and reply count of one load task (or, merged, of a run).
pub struct TaskStats {
    /// Reply latency in nanoseconds, measured replies only.
    pub latency: Histogram<u64>,
    /// Replies received during the measure phase.
    pub replies: u64,
}

impl TaskStats {
    pub fn new() -> Self {
        TaskStats {
            // 1 ns .. 100 s at 3 significant digits.
            latency: Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds"),
            replies: 0,
        }
    }

    /// Records a reply to a message that was (or should have been) sent at `sent`.
    pub fn record(&mut self, control: &Control, sent: Instant) {
        if control.phase() == Phase::Measure {
            let nanos = sent.elapsed().as_nanos().min(100_000_000_000) as u64;
            self.latency.saturating_record(nanos.max(1));
            self.replies += 1;
        }
    }

    pub fn merge(&mut self, other: &TaskStats) {
        self.latency.add(&other.latency).expect("same histogram bounds");
        self.replies += other.replies;
    }

    /// A latency quantile in microseconds.
    pub fn quantile_us(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }
}

impl Default for TaskStats {
    fn default() -> Self {
        Self::new()
    }
}

/// user + system CPU time consumed so far by process `pid` (all its threads).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second()))
}

/// CPU time used by the whole machine so far (every CPU's busy time in
/// `/proc/stat`: user, nice, system, irq, softirq, steal).
pub fn machine_busy_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| fields.get(i)).sum();
    Some(Duration::from_secs_f64(busy as f64 / clock_ticks_per_second()))
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Raises this process's open-file soft limit to its hard limit; servers
/// started afterwards inherit it. Returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read the plain struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

/// The payload of every request: `size` bytes of ASCII.
pub fn payload(size: usize) -> String {
    "x".repeat(size)
}
