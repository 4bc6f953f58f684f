//! Health for monitoring: `status` as text or JSON, per study, with the
//! rules that make a stale poll or a task near expiry a warning.

use super::Heartbeat;
use crate::duration::{format_left, ts};
use crate::store::{LedgerEntry, Store};
use crate::vocab::Outcome;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Ok,
    Warning,
    Critical,
}

impl Health {
    pub fn exit_code(self) -> u8 {
        match self {
            Health::Ok => 0,
            Health::Warning => 1,
            Health::Critical => 2,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct PendingTask {
    pub kind: String,
    pub task: String,
    pub status: String,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Seconds until it expires (negative: already past).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_left: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub health: Health,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_poll: Option<String>,
    pub last_poll_ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_poll_detail: Option<String>,
    pub failed_polls_in_a_row: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_successful_poll: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_poll: Option<String>,
    pub outcomes: BTreeMap<Outcome, usize>,
    /// Patients by enrolment status (`enroll`), if any were enrolled.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub enrolments: BTreeMap<String, usize>,
    /// Every open task: `pending` lists the soonest-expiring of them.
    pub open_tasks: usize,
    pub pending: Vec<PendingTask>,
    pub warnings: Vec<String>,
    /// Each study's last poll and open tasks (the figures above are the
    /// worst study's poll and all studies' tasks).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub studies: Vec<StudyStatus>,
}

/// One study in `status`.
#[derive(Debug, Serialize)]
pub struct StudyStatus {
    pub study: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_poll: Option<String>,
    pub last_poll_ok: bool,
    pub failed_polls_in_a_row: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_successful_poll: Option<String>,
    pub open_tasks: usize,
}

/// Each study's line of `status`: its last poll and its open tasks.
pub(crate) fn study_status(store: &Store, studies: &[&str]) -> Vec<StudyStatus> {
    studies
        .iter()
        .map(|name| {
            let poll = store.last_polls().get(*name);
            StudyStatus {
                study: name.to_string(),
                last_poll: poll.map(|p| ts(p.at)),
                last_poll_ok: poll.is_some_and(|p| p.ok),
                failed_polls_in_a_row: poll.map_or(0, |p| p.failures),
                last_successful_poll: poll.and_then(|p| p.last_ok).map(ts),
                open_tasks: store
                    .ledger_entries()
                    .filter(|e| !e.status.is_terminal() && e.study() == *name)
                    .count(),
            }
        })
        .collect()
}

pub struct StatusRules {
    /// The last successful poll older than this is critical.
    pub stale_after: Duration,
    /// Open tasks listed (all of them are counted).
    pub list_at_most: Option<usize>,
    pub warn_before: Duration,
    pub critical_failed_polls: u32,
}

/// The critical warning for an agent whose last successful poll, at
/// `last_ok`, is older than `[schedule] stale_after`: it stopped polling.
fn stale(last_ok: DateTime<Utc>, now: DateTime<Utc>, rules: &StatusRules) -> Option<String> {
    let stale_after = chrono::Duration::from_std(rules.stale_after).unwrap_or(chrono::Duration::days(1));
    (now - last_ok > stale_after).then(|| {
        format!(
            "CRITICAL: no successful poll for {} ([schedule] stale_after {}): is the timer or daemon running?",
            format_left(now - last_ok),
            crate::duration::format_duration(rules.stale_after)
        )
    })
}

pub fn status(store: &Store, heartbeat: Option<&Heartbeat>, rules: &StatusRules) -> StatusReport {
    let now = Utc::now();
    let mut warnings = Vec::new();
    let mut health = Health::Ok;
    let mut raise = |h: Health, msg: String, warnings: &mut Vec<String>| {
        health = health.max(h);
        warnings.push(msg);
    };
    let poll = store.last_poll();
    // Known only for the daemon; a timer's or cron's next run is theirs.
    let next_poll = heartbeat.and_then(|h| h.next_poll);
    if let Some(w) = poll.and_then(|p| p.last_ok).and_then(|t| stale(t, now, rules)) {
        raise(Health::Critical, w, &mut warnings);
    }
    match poll {
        None => raise(Health::Warning, "the agent has never polled".into(), &mut warnings),
        Some(p) if p.failures >= rules.critical_failed_polls => raise(
            Health::Critical,
            format!("CRITICAL: the last {} polls failed", p.failures),
            &mut warnings,
        ),
        Some(p) if !p.ok => raise(
            Health::Warning,
            format!("the last poll failed ({} in a row)", p.failures),
            &mut warnings,
        ),
        Some(_) => {}
    }
    let warn_before = chrono::Duration::from_std(rules.warn_before).unwrap_or(chrono::Duration::hours(24));
    let mut open: Vec<&LedgerEntry> = store.ledger_entries().filter(|e| !e.status.is_terminal()).collect();
    open.sort_by_key(|e| (e.expires.is_none(), e.expires));
    let mut pending = Vec::new();
    let open_tasks = open.len();
    for e in open {
        let left = e.expires.map(|x| x - now);
        if let (Some(x), Some(left)) = (e.expires, left) {
            let name = format!("{} {}", e.kind, e.display_id);
            if next_poll.is_some_and(|n| x <= n) {
                raise(
                    Health::Critical,
                    format!("CRITICAL: {name} expires at {} — before the next poll", ts(x)),
                    &mut warnings,
                );
            } else if left <= warn_before {
                raise(
                    Health::Warning,
                    format!("WARNING: {name} expires in {} ({})", format_left(left), ts(x)),
                    &mut warnings,
                );
            }
        }
        if rules.list_at_most.is_some_and(|n| pending.len() >= n) {
            continue;
        }
        pending.push(PendingTask {
            kind: e.kind.as_str().into(),
            task: e.display_id.clone(),
            status: e.status.as_str().into(),
            outcome: e.outcome,
            expires: e.expires.map(ts),
            seconds_left: left.map(|l| l.num_seconds()),
        });
    }
    let mut outcomes = BTreeMap::new();
    let mut given_up = 0;
    for e in store.ledger_entries() {
        *outcomes.entry(e.outcome).or_insert(0) += 1;
        given_up += usize::from(e.outcome == Outcome::GaveUp && now - e.updated < chrono::Duration::days(7));
    }
    if given_up > 0 {
        raise(
            Health::Warning,
            format!(
                "{given_up} task(s) given up in the last 7 days (no expiry, or an unknown error code, and no \
                 result after [dispatcher] max_task_attempts or max_task_age): see `fttp-agent tasks --status closed`"
            ),
            &mut warnings,
        );
    }
    let enrolments = match store.enrolment_counts() {
        Ok(counts) => counts.into_iter().map(|(k, v)| (k.as_str().to_string(), v)).collect(),
        Err(e) => {
            raise(
                Health::Critical,
                format!("cannot read the enrolments: {e}"),
                &mut warnings,
            );
            BTreeMap::new()
        }
    };
    StatusReport {
        health,
        last_poll: poll.map(|p| ts(p.at)),
        last_poll_ok: poll.is_some_and(|p| p.ok),
        last_poll_detail: poll.and_then(|p| p.detail.clone()),
        failed_polls_in_a_row: poll.map_or(0, |p| p.failures),
        last_successful_poll: poll.and_then(|p| p.last_ok).map(ts),
        next_poll: next_poll.map(ts),
        outcomes,
        enrolments,
        open_tasks,
        pending,
        studies: Vec::new(),
        warnings,
    }
}

/// When the first still-open task expires.
pub(crate) fn soonest_open_expiry(store: &Store) -> Option<DateTime<Utc>> {
    store
        .ledger_entries()
        .filter(|e| !e.status.is_terminal())
        .filter_map(|e| e.expires)
        .min()
}

pub(crate) fn status_text(r: &StatusReport) -> String {
    let mut s = String::new();
    let health = match r.health {
        Health::Ok => "OK",
        Health::Warning => "WARNING",
        Health::Critical => "CRITICAL",
    };
    s.push_str(&format!("fttp-agent status: {health}\n"));
    match &r.last_poll {
        Some(t) => s.push_str(&format!(
            "last poll:            {t} ({})\n",
            if r.last_poll_ok {
                "ok".to_string()
            } else {
                format!(
                    "failed, {} in a row: {}",
                    r.failed_polls_in_a_row,
                    crate::privacy::escape_controls(r.last_poll_detail.as_deref().unwrap_or(""))
                )
            }
        )),
        None => s.push_str("last poll:            never\n"),
    }
    s.push_str(&format!(
        "last successful poll: {}\n",
        r.last_successful_poll.as_deref().unwrap_or("never")
    ));
    s.push_str(&format!(
        "next poll:            {}\n",
        r.next_poll.as_deref().unwrap_or(
            "unknown (not a daemon: a systemd timer or cron decides; `systemctl list-timers fttp-agent.timer`)"
        )
    ));
    if r.studies.len() > 1 {
        s.push_str("studies:\n");
        for st in &r.studies {
            let poll = match (&st.last_poll, st.last_poll_ok) {
                (None, _) => "never polled".to_string(),
                (Some(t), true) => format!("last poll {t} ok"),
                (Some(t), false) => format!("last poll {t} failed, {} in a row", st.failed_polls_in_a_row),
            };
            s.push_str(&format!("  {:<18} {poll}; {} open task(s)\n", st.study, st.open_tasks));
        }
    }
    s.push_str("tasks by outcome:\n");
    for (k, v) in &r.outcomes {
        s.push_str(&format!("  {k:<18} {v}\n"));
    }
    if !r.enrolments.is_empty() {
        s.push_str("patients by enrolment:\n");
        for (k, v) in &r.enrolments {
            s.push_str(&format!("  {k:<18} {v}\n"));
        }
    }
    s.push_str(&format!("open tasks: {}\n", r.open_tasks));
    for p in &r.pending {
        let left = p.seconds_left.map_or("no expiry".into(), |l| {
            format!("{} left", format_left(chrono::Duration::seconds(l)))
        });
        s.push_str(&format!(
            "  {:<18} {:<38} {:<10} {:<16} {left}\n",
            p.kind, p.task, p.status, p.outcome
        ));
    }
    if r.open_tasks > r.pending.len() {
        s.push_str(&format!(
            "  ... and {} more (`status --all` lists every one)\n",
            r.open_tasks - r.pending.len()
        ));
    }
    for w in &r.warnings {
        s.push_str(w);
        s.push('\n');
    }
    s
}
