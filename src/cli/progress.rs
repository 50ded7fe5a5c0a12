//! Progress output for `backup -p`: a bar on a terminal, plain lines in a
//! log, or JSON lines for wrappers. The copier only reports guest bytes
//! done (`backup::Progress`); everything shown is derived here.
//!
//! Invariants: everything goes to stderr (stdout is reserved for the
//! `--output=json` result); the line and JSON forms print a first line when
//! the plan is known and a last one at 100 %, so a log always shows the
//! start and the end.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use qbackup::backup;

use super::size::human;

/// How `-p/--progress` reports.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressArg {
    /// A bar on a terminal, else plain lines.
    Auto,
    /// A bar (drawn only when stderr is a terminal).
    Bar,
    /// Plain lines every 10 % or 10 s.
    Lines,
    /// One JSON object per line, every 1 % or 1 s.
    Json,
}

/// Reports copier progress in the chosen form.
pub enum Reporter {
    /// No progress output.
    Off,
    /// indicatif's bar.
    Bar(ProgressBar),
    /// Periodic lines (plain or JSON).
    Lines(Mutex<LineState>),
}

/// The state of the periodic forms.
pub struct LineState {
    json: bool,
    started: Instant,
    total: u64,
    done: u64,
    /// The last percentage step printed.
    last_step: u64,
    last_at: Instant,
    /// True once the 100 % line is out.
    finished: bool,
}

impl Reporter {
    /// A reporter for `mode` (`None`: no `-p`).
    pub fn new(mode: Option<ProgressArg>) -> Reporter {
        use std::io::IsTerminal;
        let mode = match mode {
            None => return Reporter::Off,
            Some(ProgressArg::Auto) if std::io::stderr().is_terminal() => ProgressArg::Bar,
            Some(ProgressArg::Auto) => ProgressArg::Lines,
            Some(m) => m,
        };
        match mode {
            ProgressArg::Bar | ProgressArg::Auto => {
                let b = ProgressBar::new(0);
                b.set_style(
                    ProgressStyle::with_template(
                        "{bar:40} {percent:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
                    )
                    .expect("valid template"),
                );
                Reporter::Bar(b)
            }
            ProgressArg::Lines | ProgressArg::Json => {
                let now = Instant::now();
                Reporter::Lines(Mutex::new(LineState {
                    json: mode == ProgressArg::Json,
                    started: now,
                    total: 0,
                    done: 0,
                    last_step: 0,
                    last_at: now,
                    finished: false,
                }))
            }
        }
    }

    /// The plan is known: `total` guest bytes to handle.
    pub fn start(&self, total: u64) {
        match self {
            Reporter::Off => {}
            Reporter::Bar(b) => b.set_length(total),
            Reporter::Lines(m) => {
                let mut s = lock(m);
                s.total = total;
                s.started = Instant::now();
                s.last_at = s.started;
                s.emit();
            }
        }
    }

    /// The backup succeeded: the last line, with the elapsed time.
    pub fn finish(&self) {
        match self {
            Reporter::Off => {}
            Reporter::Bar(b) => {
                b.set_style(
                    ProgressStyle::with_template("{bar:40} 100% {binary_total_bytes} in {elapsed}")
                        .expect("valid template"),
                );
                b.finish();
            }
            Reporter::Lines(m) => {
                let mut s = lock(m);
                if !s.finished {
                    s.done = s.total;
                    s.emit();
                }
            }
        }
    }

    /// The backup failed: stop drawing, leave the error line alone.
    pub fn abandon(&self) {
        if let Reporter::Bar(b) = self {
            b.abandon();
        }
    }
}

fn lock(m: &Mutex<LineState>) -> std::sync::MutexGuard<'_, LineState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl backup::Progress for Reporter {
    fn advance(&self, bytes: u64) {
        match self {
            Reporter::Off => {}
            Reporter::Bar(b) => b.inc(bytes),
            Reporter::Lines(m) => {
                let mut s = lock(m);
                s.done = (s.done + bytes).min(s.total);
                let (step, every) = if s.json {
                    (1, Duration::from_secs(1))
                } else {
                    (10, Duration::from_secs(10))
                };
                let now = Instant::now();
                if s.percent() / step > s.last_step / step || now - s.last_at >= every {
                    s.emit();
                }
            }
        }
    }

    fn removed_leftover(&self, path: &std::path::Path, bytes: u64) {
        let line = format!(
            "qbackup: {}: removed the temporary file of an interrupted backup ({})",
            path.display(),
            human(bytes)
        );
        // Never panic on a closed stderr (a hung-up terminal).
        let say = || {
            let _ = writeln!(std::io::stderr(), "{line}");
        };
        match self {
            Reporter::Bar(b) => b.suspend(say),
            _ => say(),
        }
    }
}

impl LineState {
    /// Whole percent done (100 for an empty plan).
    fn percent(&self) -> u64 {
        (self.done * 100).checked_div(self.total).unwrap_or(100)
    }

    /// Prints one line for the current state.
    fn emit(&mut self) {
        let now = Instant::now();
        let pct = self.percent();
        self.last_step = pct;
        self.last_at = now;
        self.finished = self.done >= self.total;
        let elapsed = now - self.started;
        let secs = elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        };
        let eta = (rate > 0.0).then(|| (self.total - self.done) as f64 / rate);
        let line = if self.json {
            serde_json::json!({
                "done": self.done,
                "total": self.total,
                "percent": pct,
                "elapsed-seconds": round3(secs),
                "bytes-per-second": rate.round() as u64,
                "eta-seconds": if self.finished { Some(0.0) } else { eta.map(round3) },
            })
            .to_string()
        } else if self.finished && self.done > 0 {
            format!(
                "qbackup: progress: 100% of {} in {:.1} s, {}/s",
                human(self.total),
                secs,
                human(rate as u64)
            )
        } else if self.done == 0 {
            format!("qbackup: progress: {pct}% of {}", human(self.total))
        } else {
            format!(
                "qbackup: progress: {pct}% ({} of {}), {}/s, ETA {}",
                human(self.done),
                human(self.total),
                human(rate as u64),
                eta.map_or("unknown".into(), |e| format!("{e:.0} s"))
            )
        };
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }
}

/// Seconds with millisecond precision, for JSON.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
