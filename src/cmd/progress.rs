//! Progress on stderr: the live status line of long runs ([`Progress`]) and
//! the sampling bar of the commands that generate ([`SamplingBar`]).

use std::io::IsTerminal;

/// Log lines of long runs: on a terminal, step lines (`pretrain ...`,
/// `grpo ...`, `step ...`) overwrite each other as a live status line and
/// other lines scroll above it; elsewhere (files, CI) every line is printed.
pub struct Progress {
    tty: bool,
    live: bool,
}

impl Progress {
    /// A status line on stderr, live when stderr is a terminal.
    pub fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            live: false,
        }
    }

    /// Prints one log line of a run.
    pub fn line(&mut self, l: &str) {
        let step = ["pretrain ", "grpo ", "step "].iter().any(|p| l.starts_with(p));
        if self.tty && step {
            eprint!("\r{l}\x1b[K");
            self.live = true;
        } else {
            if self.live {
                eprintln!();
                self.live = false;
            }
            eprintln!("{l}");
        }
    }

    /// Ends a live status line, if one is showing.
    pub fn finish(&mut self) {
        if self.live {
            eprintln!();
            self.live = false;
        }
    }
}

/// Sampling progress on stderr: on a terminal, one bar redrawn in place at
/// most ten times a second; otherwise (a log file, a pipe) a plain line at
/// every tenth of the completions, so logs stay short.
pub struct SamplingBar {
    label: &'static str,
    tty: bool,
    drawn: bool,
    last_draw: f64,
    last_tenth: usize,
}

impl SamplingBar {
    /// A bar whose lines start with `label`.
    pub fn new(label: &'static str) -> SamplingBar {
        SamplingBar {
            label,
            tty: std::io::stderr().is_terminal(),
            drawn: false,
            last_draw: f64::NEG_INFINITY,
            last_tenth: 0,
        }
    }

    /// Reports `p`.
    pub fn update(&mut self, p: &aha_sampler::Progress) {
        if self.tty {
            if p.elapsed_s - self.last_draw >= 0.1 || p.finished == p.total {
                eprint!("\r{}: {}\x1b[K", self.label, progress_bar(p, 30));
                self.last_draw = p.elapsed_s;
                self.drawn = true;
            }
        } else {
            let tenth = (p.finished * 10).checked_div(p.total).unwrap_or(10);
            if tenth > self.last_tenth {
                eprintln!("{}: {}", self.label, progress_bar(p, 30));
                self.last_tenth = tenth;
            }
        }
    }

    /// Ends the bar's line on a terminal.
    pub fn finish(&mut self) {
        if self.tty && self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// One line of progress: a bar of `width` cells, completions done, tokens,
/// speed and live sequences.
fn progress_bar(p: &aha_sampler::Progress, width: usize) -> String {
    let frac = if p.total == 0 {
        1.0
    } else {
        p.finished as f64 / p.total as f64
    };
    let full = ((frac * width as f64).floor() as usize).min(width);
    format!(
        "[{}{}] {}/{} completions  {} tokens  {:.0} tokens/s  {} live  {:.1} s",
        "#".repeat(full),
        ".".repeat(width - full),
        p.finished,
        p.total,
        p.generated_tokens,
        p.generated_tokens as f64 / p.elapsed_s.max(1e-9),
        p.live,
        p.elapsed_s
    )
}

#[cfg(test)]
mod tests {
    use super::progress_bar;

    #[test]
    fn progress_bar_fills_with_the_finished_share() {
        let p = aha_sampler::Progress {
            finished: 5,
            total: 20,
            live: 15,
            generated_tokens: 1000,
            elapsed_s: 2.0,
        };
        assert_eq!(
            progress_bar(&p, 8),
            "[##......] 5/20 completions  1000 tokens  500 tokens/s  15 live  2.0 s"
        );
        let done = aha_sampler::Progress { finished: 20, ..p };
        assert!(progress_bar(&done, 8).starts_with("[########] 20/20"));
    }
}
