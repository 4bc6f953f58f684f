//! Graceful shutdown: SIGTERM and SIGINT set a process-wide flag that the
//! daemon loop checks between tasks, while sleeping between polls and while
//! waiting to retry, so the task in hand is finished and recorded before
//! the process exits.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

#[derive(Clone)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    pub(crate) fn install() -> std::io::Result<Shutdown> {
        let flag = Arc::clone(FLAG.get_or_init(|| Arc::new(AtomicBool::new(false))));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, Arc::clone(&flag))?;
        }
        Ok(Shutdown(flag))
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Sleeps up to `d`, waking early on shutdown. Returns false if shutdown was requested.
    pub fn sleep(&self, d: Duration) -> bool {
        sleep_flag(&self.0, d)
    }
}

/// Whether a stop was requested (false where no handler is installed).
pub fn requested() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::SeqCst))
}

/// Sleeps up to `d` unless a stop is requested; false if it was.
pub fn sleep(d: Duration) -> bool {
    match FLAG.get() {
        Some(f) => sleep_flag(f, d),
        None => {
            std::thread::sleep(d);
            true
        }
    }
}

fn sleep_flag(flag: &AtomicBool, d: Duration) -> bool {
    let end = Instant::now() + d;
    while !flag.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(100)));
    }
    false
}
