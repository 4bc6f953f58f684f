//! Progress for long work on a terminal; silent when stderr is not one
//! (cron, systemd, pipes), so logs stay clean.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    label: &'static str,
    total: Option<usize>,
    done: usize,
    active: bool,
    last: Instant,
}

impl Progress {
    pub fn new(label: &'static str, total: Option<usize>) -> Progress {
        Progress {
            label,
            total,
            done: 0,
            active: std::io::stderr().is_terminal(),
            last: Instant::now(),
        }
    }

    pub(crate) fn tick(&mut self, n: usize) {
        self.done += n;
        if self.active && self.last.elapsed() >= Duration::from_millis(200) {
            self.last = Instant::now();
            self.draw();
        }
    }

    fn draw(&self) {
        let mut err = std::io::stderr();
        let _ = match self.total {
            Some(t) => write!(err, "\r{}: {}/{t}", self.label, self.done),
            None => write!(err, "\r{}: {}", self.label, self.done),
        };
        let _ = err.flush();
    }

    pub fn finish(self) {
        if self.active && self.done > 0 {
            self.draw();
            eprintln!();
        }
    }
}
