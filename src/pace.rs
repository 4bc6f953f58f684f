//! How many requests a dispatcher gets at once: up to `max_in_flight`,
//! halved when it says it is busy (429, 503, a timeout) and grown back by
//! one after a run of successes (additive increase, multiplicative
//! decrease, as TCP does), so a busy gateway is not hammered and a healthy
//! one is used fully. A `Retry-After` also holds back new requests until
//! it has passed. The client reports every answer; the agent's network
//! threads start requests in turn (the order the agent handed them over,
//! soonest expiry first) as the pace allows.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Pace {
    max: usize,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug)]
struct State {
    limit: usize,
    /// Successes since the limit last changed.
    successes: usize,
    /// No new request before this (a `Retry-After`).
    hold_until: Option<Instant>,
    lowest: usize,
    busy: usize,
    /// Requests started and not yet finished.
    in_flight: usize,
    /// Turns handed out, and the next turn to start.
    issued: u64,
    turn: u64,
}

/// What a cycle saw of the pace (for its report and the metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PaceReport {
    /// The lowest limit reached (`max_in_flight` if it never backed off).
    pub lowest: usize,
    /// Answers that said the dispatcher was busy (429, 503, timeouts).
    pub busy: usize,
}

impl Pace {
    pub fn new(max: usize) -> Pace {
        let max = max.max(1);
        Pace {
            max,
            state: Mutex::new(State {
                limit: max,
                successes: 0,
                hold_until: None,
                lowest: max,
                busy: 0,
                in_flight: 0,
                issued: 0,
                turn: 0,
            }),
            changed: Condvar::new(),
        }
    }

    /// A place in the order of starts (taken when a request is handed to
    /// the network threads).
    pub(crate) fn take_turn(&self) -> u64 {
        let mut st = crate::lock(&self.state);
        st.issued += 1;
        st.issued - 1
    }

    /// Waits for `turn` and, with `send`, for room under the limit and the
    /// end of any `Retry-After`; then starts it (counted in flight until
    /// `finished`). False, without starting, if `stop` says so meanwhile
    /// (or `send` is false): the turn is passed on either way.
    pub fn start(&self, turn: u64, send: bool, stop: impl Fn() -> bool) -> bool {
        let mut st = crate::lock(&self.state);
        loop {
            let stopping = !send || stop();
            if st.turn == turn {
                let held = st.hold_until.is_some_and(|t| t > Instant::now());
                if stopping || (st.in_flight < st.limit && !held) {
                    st.turn += 1;
                    if !stopping {
                        st.in_flight += 1;
                    }
                    self.changed.notify_all();
                    return !stopping;
                }
            }
            // (Woken by a finish or a turn passed on; the timeout catches a
            // Retry-After running out and a stop.)
            st = match self.changed.wait_timeout(st, Duration::from_millis(50)) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// A started request has its answer (or failed).
    pub fn finished(&self) {
        let mut st = crate::lock(&self.state);
        st.in_flight = st.in_flight.saturating_sub(1);
        self.changed.notify_all();
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Requests that may be in flight now.
    pub fn limit(&self) -> usize {
        crate::lock(&self.state).limit
    }

    /// How long to wait before starting another request (a `Retry-After`).
    pub fn hold(&self) -> Option<Duration> {
        let st = crate::lock(&self.state);
        st.hold_until
            .map(|t| t.saturating_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    /// An answer that was not a "busy" one.
    pub fn success(&self) {
        let mut st = crate::lock(&self.state);
        st.successes += 1;
        if st.limit < self.max && st.successes >= st.limit {
            st.limit += 1;
            st.successes = 0;
            log::info!("dispatcher answering again: up to {} request(s) in flight", st.limit);
            self.changed.notify_all();
        }
    }

    /// A 429 or 503 (with its `Retry-After`, if any), or a timeout.
    pub fn busy(&self, retry_after: Option<Duration>) {
        let mut st = crate::lock(&self.state);
        st.busy += 1;
        st.successes = 0;
        let halved = (st.limit / 2).max(1);
        if halved < st.limit {
            log::warn!(
                "dispatcher busy: down to {halved} request(s) in flight (from {})",
                st.limit
            );
        }
        st.limit = halved;
        st.lowest = st.lowest.min(halved);
        if let Some(d) = retry_after {
            let until = Instant::now() + d.min(crate::retry::RetryPolicy::MAX_DELAY);
            st.hold_until = Some(st.hold_until.map_or(until, |t| t.max(until)));
        }
    }

    /// The lowest limit and the busy answers since the last call; the
    /// lowest starts again from the current limit.
    pub(crate) fn take_report(&self) -> PaceReport {
        let mut st = crate::lock(&self.state);
        let report = PaceReport {
            lowest: st.lowest,
            busy: st.busy,
        };
        st.lowest = st.limit;
        st.busy = 0;
        report
    }
}

/// A step of `in_turn`, for the caller's thread.
pub(crate) enum Step<'a, J, A> {
    /// About to hand `J` to the network threads: true to hand it over
    /// (its marks are on disk by then), false to stop handing over.
    Hand(&'a mut J),
    /// A job's answer (`None`: not sent, a stop came first); false to stop
    /// handing over more.
    Answer(J, Option<A>),
}

/// Requests handed over beyond those being sent, so that the network never
/// waits for the caller's bookkeeping.
pub(crate) const AHEAD: usize = 2;

/// Sends `jobs` of one dispatcher on `pace.max()` network threads, started
/// in the order given as `pace` allows; `main` prepares each on this
/// thread before it is handed over and records each answer here. At most
/// `max + AHEAD` are out at once. The first error of `main` ends the
/// handing over; the answers of what is out are still given to `main`.
pub(crate) fn in_turn<J: Send, A: Send, E>(
    pace: &Pace,
    jobs: impl IntoIterator<Item = J>,
    send: impl Fn(&mut J) -> A + Sync,
    stop: impl Fn() -> bool + Sync,
    mut main: impl FnMut(Step<'_, J, A>) -> Result<bool, E>,
) -> Result<(), E> {
    let threads = pace.max();
    let (to_net, net_in) = std::sync::mpsc::channel::<(J, u64)>();
    let net_in = Mutex::new(net_in);
    let (answer_out, answers) = std::sync::mpsc::channel::<(J, Option<A>)>();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (net_in, answer_out, send, stop) = (&net_in, answer_out.clone(), &send, &stop);
            scope.spawn(move || {
                loop {
                    let next = crate::lock(net_in).recv();
                    let Ok((mut job, turn)) = next else { break };
                    let answer = pace.start(turn, true, stop).then(|| {
                        let a = send(&mut job);
                        pace.finished();
                        a
                    });
                    if answer_out.send((job, answer)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(answer_out);
        let mut result = Ok(());
        let mut out = 0usize;
        let mut feeding = true;
        let answered = |r: Result<bool, E>, result: &mut Result<(), E>, feeding: &mut bool| match r {
            Ok(true) => {}
            Ok(false) => *feeding = false,
            Err(e) => {
                *feeding = false;
                if result.is_ok() {
                    *result = Err(e);
                }
            }
        };
        for mut job in jobs {
            while feeding && out >= threads + AHEAD {
                let Ok((j, a)) = answers.recv() else { break };
                out -= 1;
                answered(main(Step::Answer(j, a)), &mut result, &mut feeding);
            }
            if !feeding {
                break;
            }
            match main(Step::Hand(&mut job)) {
                Ok(true) => {}
                other => {
                    answered(other, &mut result, &mut feeding);
                    break;
                }
            }
            if to_net.send((job, pace.take_turn())).is_err() {
                break;
            }
            out += 1;
            while let Ok((j, a)) = answers.try_recv() {
                out -= 1;
                answered(main(Step::Answer(j, a)), &mut result, &mut feeding);
            }
        }
        drop(to_net);
        for _ in 0..out {
            let Ok((j, a)) = answers.recv() else { break };
            answered(main(Step::Answer(j, a)), &mut result, &mut feeding);
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_answers_halve_the_limit_and_successes_grow_it_back_by_one() {
        let pace = Pace::new(8);
        pace.busy(None);
        assert_eq!(pace.limit(), 4);
        pace.busy(None);
        pace.busy(None);
        pace.busy(None);
        assert_eq!(pace.limit(), 1, "never below one");
        pace.success();
        assert_eq!(pace.limit(), 2, "one success at a limit of one");
        pace.success();
        assert_eq!(pace.limit(), 2, "two needed at two");
        pace.success();
        assert_eq!(pace.limit(), 3);
        for _ in 0..100 {
            pace.success();
        }
        assert_eq!(pace.limit(), 8, "never above the maximum");
        assert_eq!(pace.take_report(), PaceReport { lowest: 1, busy: 4 });
        assert_eq!(pace.take_report(), PaceReport { lowest: 8, busy: 0 });
    }

    #[test]
    fn requests_start_in_turn_and_never_more_than_the_limit_at_once() {
        // (A limit of one: each starts after the one before has finished,
        // so the order recorded is the order started.)
        let pace = std::sync::Arc::new(Pace::new(1));
        let turns: Vec<u64> = (0..6).map(|_| pace.take_turn()).collect();
        let started = std::sync::Arc::new(Mutex::new(Vec::new()));
        let most = std::sync::Arc::new(Mutex::new((0usize, 0usize)));
        // Taken by threads in reverse: they still start in turn.
        let handles: Vec<_> = turns
            .into_iter()
            .rev()
            .map(|t| {
                let (pace, started, most) = (pace.clone(), started.clone(), most.clone());
                std::thread::spawn(move || {
                    assert!(pace.start(t, true, || false));
                    {
                        let mut m = crate::lock(&most);
                        m.0 += 1;
                        m.1 = m.1.max(m.0);
                    }
                    crate::lock(&started).push(t);
                    std::thread::sleep(Duration::from_millis(20));
                    crate::lock(&most).0 -= 1;
                    pace.finished();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(*crate::lock(&started), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(crate::lock(&most).1, 1);
        // A stop passes the turn on without starting.
        let t = pace.take_turn();
        assert!(!pace.start(t, true, || true));
        let t = pace.take_turn();
        assert!(pace.start(t, true, || false));
    }

    #[test]
    fn retry_after_holds_new_requests_back() {
        let pace = Pace::new(4);
        assert_eq!(pace.hold(), None);
        pace.busy(Some(Duration::from_secs(30)));
        let hold = pace.hold().unwrap();
        assert!(hold > Duration::from_secs(29) && hold <= Duration::from_secs(30));
    }
}
