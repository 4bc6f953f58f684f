//! The one retry helper: exponential backoff with jitter and a cap, bounded
//! by an attempt count and by a deadline (a task's expiry).

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    pub(crate) const MAX_DELAY: Duration = Duration::from_secs(300);

    /// Delay before attempt `attempt + 1`: base * 2^(attempt-1), capped, with
    /// up to 50% subtracted at random so that many sites restarted together
    /// do not hit the gateway in lockstep.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let capped = exp.min(self.max_delay);
        capped.mul_f64(1.0 - 0.5 * jitter())
    }
}

/// A failure that may be worth retrying.
pub(crate) trait Retryable {
    fn is_transient(&self) -> bool;
    /// A server-requested wait (Retry-After), if any.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

/// Runs `op` until it succeeds, fails permanently, runs out of attempts, or
/// the next attempt could not start before `deadline`.
pub(crate) fn with_backoff<T, E: Retryable + std::fmt::Display>(
    policy: &RetryPolicy,
    deadline: Option<Instant>,
    mut op: impl FnMut(u32) -> Result<T, E>,
) -> Result<T, E> {
    let mut attempt = 1;
    loop {
        match op(attempt) {
            Ok(v) => return Ok(v),
            Err(e) if !e.is_transient() || attempt >= policy.max_attempts => return Err(e),
            Err(e) => {
                let delay = e
                    .retry_after()
                    .map(|d| d.min(policy.max_delay))
                    .unwrap_or_else(|| policy.backoff(attempt));
                if deadline.is_some_and(|d| Instant::now() + delay >= d) {
                    log::warn!("{e}; not retrying: the task would expire first");
                    return Err(e);
                }
                log::warn!(
                    "{e}; attempt {attempt} of {}, retrying in {:.1}s",
                    policy.max_attempts,
                    delay.as_secs_f64()
                );
                if !crate::shutdown::sleep(delay) {
                    log::warn!("stop requested: not retrying");
                    return Err(e);
                }
                attempt += 1;
            }
        }
    }
}

/// A number in [0, 1) from the OS random source (0.5 if it is unavailable).
pub fn jitter() -> f64 {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut b = [0u8; 2];
    match SystemRandom::new().fill(&mut b) {
        Ok(()) => f64::from(u16::from_le_bytes(b)) / 65536.0,
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(bool);
    impl Retryable for E {
        fn is_transient(&self) -> bool {
            self.0
        }
    }
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "e")
        }
    }

    const FAST: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(4),
    };

    #[test]
    fn retries_transient_errors_up_to_the_limit() {
        let mut calls = 0;
        let r: Result<(), E> = with_backoff(&FAST, None, |_| {
            calls += 1;
            Err(E(true))
        });
        assert!(r.is_err());
        assert_eq!(calls, 3);
    }

    #[test]
    fn permanent_errors_are_not_retried_and_success_stops() {
        let mut calls = 0;
        let _ = with_backoff(&FAST, None, |_| -> Result<(), E> {
            calls += 1;
            Err(E(false))
        });
        assert_eq!(calls, 1);
        let r = with_backoff(&FAST, None, |n| if n < 2 { Err(E(true)) } else { Ok(n) });
        assert_eq!(r.unwrap(), 2);
    }

    #[test]
    fn never_retries_past_the_deadline() {
        let mut calls = 0;
        let slow = RetryPolicy {
            base_delay: Duration::from_secs(60),
            max_delay: Duration::from_secs(600),
            ..FAST
        };
        let deadline = Instant::now() + Duration::from_secs(1);
        let _ = with_backoff(&slow, Some(deadline), |_| -> Result<(), E> {
            calls += 1;
            Err(E(true))
        });
        assert_eq!(calls, 1);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
        };
        let d3 = p.backoff(3);
        assert!(d3 >= Duration::from_secs(2) && d3 <= Duration::from_secs(4));
        assert!(p.backoff(30) <= Duration::from_secs(10));
    }
}
