//! Progress of long work (training steps, embeddings, evaluation) on stderr: a live bar with
//! rate and ETA on a terminal; on a pipe or log file, where a bar would be invisible or noise,
//! a plain line at every tenth of the work and at least every 30 seconds.
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Progress {
    bar: Option<ProgressBar>,
    what: String,
    total: u64,
    start: Instant,
    /// Plain mode: the last tenth and the time a line was printed.
    last: Mutex<(u64, Instant)>,
}

impl Progress {
    /// Progress of `total` units of `what`.
    pub fn new(total: u64, what: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total);
            let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            b.set_style(style);
            b.set_prefix(what.to_string());
            b.enable_steady_tick(Duration::from_millis(500));
            b
        });
        let now = Instant::now();
        Progress { bar, what: what.to_string(), total: total.max(1), start: now, last: Mutex::new((0, now)) }
    }

    /// `done` units finished; `msg` (losses, rates) shown next to the count.
    pub fn set(&self, done: u64, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_position(done);
            b.set_message(msg.to_string());
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let tenth = done * 10 / self.total;
        if tenth > last.0 || last.1.elapsed() >= Duration::from_secs(30) || done == self.total {
            let el = self.start.elapsed().as_secs_f64();
            let eta = if done > 0 { el * (self.total - done.min(self.total)) as f64 / done as f64 } else { f64::NAN };
            eprintln!("{}: {done}/{} [{el:.0}s, eta {eta:.0}s] {msg}", self.what, self.total);
            *last = (tenth, Instant::now());
        }
    }

    /// Leaves the bar's last state on screen.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
