//! The operators' view: the ledger as a table, NDJSON or a FHIR Task
//! Bundle; health status for monitoring; Prometheus metrics; the daemon's
//! heartbeat; retention. Nothing here shows IDAT, raw Bloom filters or
//! pseudonyms: they appear as fingerprints.

use crate::fhir::element::{Node, Resource, Value};
use crate::store::{LedgerEntry, Status, Store};
use crate::tasks::{Task, TaskKind};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// An instant as RFC 3339 in UTC, with at least milliseconds and every
/// fractional digit it came with: `expires` is a FHIR `instant`, and the
/// dispatcher compares it to the millisecond.
pub fn ts(t: DateTime<Utc>) -> String {
    let nanos = t.timestamp_subsec_nanos();
    let format = if nanos.is_multiple_of(1_000_000) {
        SecondsFormat::Millis
    } else if nanos.is_multiple_of(1_000) {
        SecondsFormat::Micros
    } else {
        SecondsFormat::Nanos
    };
    t.to_rfc3339_opts(format, true)
}

/// `T` for `--since`: an RFC 3339 time, a date (`2026-11-01`), or a
/// duration back from now (`24h`, `7d`).
pub fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc());
    }
    let d = crate::duration::parse_duration(s).map_err(|_| {
        format!(
            "'{s}' is neither a time (RFC 3339, e.g. 2026-11-01T10:00:00Z), a date (YYYY-MM-DD) nor a \
                 duration back from now (24h, 7d)"
        )
    })?;
    let d = chrono::Duration::from_std(d).map_err(|_| "duration too large".to_string())?;
    Ok(Utc::now() - d)
}

/// One ledger entry as `tasks --format json` prints it.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct TaskLine {
    pub key: String,
    pub kind: String,
    pub task: String,
    pub status: String,
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    pub first_seen: String,
    pub last_seen: String,
    pub updated: String,
    pub attempts: u32,
}

impl From<&LedgerEntry> for TaskLine {
    fn from(e: &LedgerEntry) -> Self {
        TaskLine {
            key: e.key.clone(),
            kind: e.kind.as_str().into(),
            task: e.display_id.clone(),
            status: e.status.as_str().into(),
            outcome: e.outcome.clone(),
            detail: e.detail.clone(),
            expires: e.expires.map(ts),
            first_seen: ts(e.first_seen),
            last_seen: ts(e.last_seen),
            updated: ts(e.updated),
            attempts: e.attempts,
        }
    }
}

pub fn table(entries: &[&LedgerEntry]) -> String {
    let rows: Vec<[String; 7]> = entries
        .iter()
        .map(|e| {
            [
                e.kind.as_str().to_string(),
                crate::privacy::escape_controls(&e.display_id).into_owned(),
                e.status.as_str().to_string(),
                e.outcome.clone(),
                e.expires.map_or("-".into(), ts),
                e.first_seen.format("%Y-%m-%d %H:%M").to_string(),
                crate::privacy::escape_controls(e.detail.as_deref().unwrap_or_default()).into_owned(),
            ]
        })
        .collect();
    let head = [
        "KIND",
        "TASK",
        "STATUS",
        "OUTCOME",
        "EXPIRES (UTC)",
        "FIRST SEEN",
        "DETAIL",
    ];
    let mut width = head.map(|h| h.chars().count());
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let fmt = |cells: &[String]| {
        let mut line = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        line.trim_end().to_string() + "\n"
    };
    let mut out = fmt(&head.map(String::from));
    for r in &rows {
        out.push_str(&fmt(r));
    }
    out.push_str(&format!("{} task(s)\n", rows.len()));
    out
}

/// FHIR Task.status for a ledger status.
pub fn fhir_status(s: Status) -> &'static str {
    match s {
        Status::Pending => "requested",
        Status::InFlight => "in-progress",
        Status::Resolved => "completed",
        Status::Failed => "failed",
        Status::Expired => "cancelled",
        Status::Rejected => "rejected",
        Status::Closed => "failed",
    }
}

pub const TASK_ID_SYSTEM: &str = "urn:fttp-agent:task";

fn input(name: &str, value_name: &str, value: Value) -> Node {
    let mut n = Node::new().with_node("type", Node::new().with("text", name));
    n.push(value_name, value);
    n
}

fn prim(s: &str) -> Value {
    Value::Primitive(crate::fhir::Primitive::new(s))
}

fn identifier_node(id: &crate::fhir::Identifier) -> Value {
    let mut n = Node::new();
    if let Some(s) = &id.system {
        n.push_primitive("system", s);
    }
    if let Some(v) = &id.value {
        n.push_primitive("value", v);
    }
    Value::Complex(n)
}

/// One ledger entry as a FHIR R4 Task. Inputs carry the task's parts, with
/// Bloom filters and pseudonyms as fingerprints.
pub fn fhir_task(e: &LedgerEntry) -> Resource {
    let mut t = Resource::new("Task");
    let id: String = e
        .key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    t.node.push_primitive("id", id);
    t.node.push_complex(
        "identifier",
        Node::new().with("system", TASK_ID_SYSTEM).with("value", &e.display_id),
    );
    t.node.push_primitive("status", fhir_status(e.status));
    t.node
        .push_complex("businessStatus", Node::new().with("text", &e.outcome));
    t.node.push_primitive("intent", "order");
    t.node.push_complex("code", Node::new().with("text", e.kind.as_str()));
    if let Some(d) = &e.detail {
        t.node.push_primitive("description", d);
    }
    t.node.push_primitive("authoredOn", ts(e.first_seen));
    t.node.push_primitive("lastModified", ts(e.updated));
    if let Some(x) = e.expires {
        t.node.push_complex(
            "restriction",
            Node::new().with_node("period", Node::new().with("end", ts(x))),
        );
    }
    let mut inputs = Vec::new();
    match &e.task {
        Some(Task::DicPsnAvailable {
            expires,
            bloomfilter,
            target,
            pseudonym,
        }) => {
            if let Some(x) = expires {
                inputs.push(input("expires", "valueInstant", prim(&ts(*x))));
            }
            inputs.push(input("bloomfilter", "valueString", prim(&bloomfilter.fingerprint())));
            inputs.push(input("target", "valueIdentifier", identifier_node(target)));
            inputs.push(input("pseudonym", "valueString", prim(&pseudonym.fingerprint())));
        }
        Some(Task::SendIdat {
            expires,
            task_id,
            pseudonym,
            bloomfilter,
            elements,
        }) => {
            inputs.push(input("expires", "valueInstant", prim(&ts(*expires))));
            inputs.push(input("taskId", "valueId", prim(task_id.as_str())));
            if let Some(p) = pseudonym {
                inputs.push(input("pseudonym", "valueString", prim(&p.fingerprint())));
            }
            if let Some(b) = bloomfilter {
                inputs.push(input("bloomfilter", "valueString", prim(&b.fingerprint())));
            }
            for el in elements {
                let coding = Node::new()
                    .with("system", crate::fhir::idat::ELEMENTS_SYSTEM)
                    .with("code", el.code());
                inputs.push(input("element", "valueCoding", Value::Complex(coding)));
            }
        }
        Some(Task::RepeatRequest {
            expires,
            study,
            bloomfilter,
            target,
        }) => {
            if let Some(x) = expires {
                inputs.push(input("expires", "valueInstant", prim(&ts(*x))));
            }
            inputs.push(input("study", "valueIdentifier", identifier_node(study)));
            inputs.push(input("bloomfilter", "valueString", prim(&bloomfilter.fingerprint())));
            inputs.push(input("target", "valueIdentifier", identifier_node(target)));
        }
        None => {}
    }
    for i in inputs {
        t.node.push_complex("input", i);
    }
    t
}

pub fn fhir_bundle(entries: &[&LedgerEntry]) -> Resource {
    let mut b = Resource::new("Bundle");
    b.node.push_primitive("type", "searchset");
    b.node
        .push_primitive("timestamp", Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true));
    b.node.push_primitive("total", entries.len().to_string());
    for e in entries {
        let mut entry = Node::new();
        entry.push("resource", Value::Resource(fhir_task(e)));
        entry.push_complex("search", Node::new().with("mode", "match"));
        b.node.push_complex("entry", entry);
    }
    b
}

// ------------------------------------------------------------ heartbeat

/// Written by the agent after every cycle, read by `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Heartbeat {
    pub pid: u32,
    pub cycle_end: DateTime<Utc>,
    /// Whether that cycle succeeded (absent in heartbeats before it was
    /// recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cycle_ok: Option<bool>,
    /// How long that cycle took (for `/metrics` between cycles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cycle_seconds: Option<f64>,
    /// How far that cycle's pace backed off, and the busy answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pace: Option<crate::pace::PaceReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<DateTime<Utc>>,
    /// When the daemon will poll next (absent for `run --once`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_poll: Option<DateTime<Utc>>,
    /// When the first still-open task expires: the daemon polls sooner for
    /// it without opening the store again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soonest_expiry: Option<DateTime<Utc>>,
    /// When the retention purge last ran (daily, from any cycle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_purge: Option<DateTime<Utc>>,
}

pub fn heartbeat_path(store_dir: &Path) -> std::path::PathBuf {
    store_dir.join("heartbeat.json")
}

pub fn write_heartbeat(store_dir: &Path, hb: &Heartbeat) -> std::io::Result<()> {
    crate::fsutil::write_atomic(
        &heartbeat_path(store_dir),
        serde_json::to_string(hb).unwrap_or_default().as_bytes(),
        0o600,
    )
}

pub fn read_heartbeat(store_dir: &Path) -> Option<Heartbeat> {
    serde_json::from_slice(&std::fs::read(heartbeat_path(store_dir)).ok()?).ok()
}

// ------------------------------------------------------------ status

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
    pub outcome: String,
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
    pub outcomes: BTreeMap<String, usize>,
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
pub fn study_status(store: &Store, studies: &[&str]) -> Vec<StudyStatus> {
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
            human(now - last_ok),
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
                    format!("WARNING: {name} expires in {} ({})", human(left), ts(x)),
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
            outcome: e.outcome.clone(),
            expires: e.expires.map(ts),
            seconds_left: left.map(|l| l.num_seconds()),
        });
    }
    let mut outcomes = BTreeMap::new();
    let mut given_up = 0;
    for e in store.ledger_entries() {
        *outcomes.entry(e.outcome.clone()).or_insert(0) += 1;
        given_up += usize::from(e.outcome == "gave_up" && now - e.updated < chrono::Duration::days(7));
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
pub fn soonest_open_expiry(store: &Store) -> Option<DateTime<Utc>> {
    store
        .ledger_entries()
        .filter(|e| !e.status.is_terminal())
        .filter_map(|e| e.expires)
        .min()
}

pub fn human(d: chrono::Duration) -> String {
    let s = d.num_seconds();
    if s < 0 {
        return "no time (past)".into();
    }
    match s {
        0 => format!("{}ms", d.num_milliseconds()),
        1..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

pub fn status_text(r: &StatusReport) -> String {
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
            format!("{} left", human(chrono::Duration::seconds(l)))
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

// ------------------------------------------------------------ metrics

/// Prometheus text exposition for node_exporter's textfile collector.
pub fn metrics(
    store: &Store,
    studies: &[&str],
    cycle_seconds: f64,
    cycle_ok: bool,
    pace: Option<crate::pace::PaceReport>,
) -> String {
    let mut by: BTreeMap<(String, TaskKind, Status, String), usize> = BTreeMap::new();
    let mut open: BTreeMap<String, usize> = BTreeMap::new();
    for e in store.ledger_entries() {
        *by.entry((e.study().to_string(), e.kind, e.status, e.outcome.clone()))
            .or_insert(0) += 1;
        if !e.status.is_terminal() {
            *open.entry(e.study().to_string()).or_insert(0) += 1;
        }
    }
    // (Study names are plain: letters, digits, '.', '_', '-'.)
    let mut s = String::new();
    s.push_str("# HELP fttp_agent_tasks Tasks in the ledger by study, kind, status and outcome.\n");
    s.push_str("# TYPE fttp_agent_tasks gauge\n");
    for ((study, k, st, o), n) in &by {
        s.push_str(&format!(
            "fttp_agent_tasks{{study=\"{study}\",kind=\"{}\",status=\"{}\",outcome=\"{}\"}} {n}\n",
            k.as_str(),
            st.as_str(),
            o.replace(['"', '\\', '\n'], "_")
        ));
    }
    s.push_str("# HELP fttp_agent_pending_tasks Tasks not yet resolved, expired or rejected, by study.\n");
    s.push_str("# TYPE fttp_agent_pending_tasks gauge\n");
    for study in studies {
        s.push_str(&format!(
            "fttp_agent_pending_tasks{{study=\"{study}\"}} {}\n",
            open.get(*study).copied().unwrap_or(0)
        ));
    }
    // Always written, so that an alert on it never sees an absent series:
    // +Inf when no open task has an expiry (Prometheus reads it; `< 3600`
    // is then false, as it should be).
    s.push_str(
        "# HELP fttp_agent_seconds_until_soonest_expiry Seconds until the first open task expires (+Inf: none).\n",
    );
    s.push_str("# TYPE fttp_agent_seconds_until_soonest_expiry gauge\n");
    match soonest_open_expiry(store) {
        Some(soonest) => s.push_str(&format!(
            "fttp_agent_seconds_until_soonest_expiry {}\n",
            (soonest - Utc::now()).num_seconds()
        )),
        None => s.push_str("fttp_agent_seconds_until_soonest_expiry +Inf\n"),
    }
    let polled: Vec<(&String, DateTime<Utc>)> = store
        .last_polls()
        .iter()
        .filter_map(|(study, p)| Some((study, p.last_ok?)))
        .collect();
    if !polled.is_empty() {
        s.push_str(
            "# HELP fttp_agent_last_successful_poll_timestamp_seconds Unix time of the last successful poll, by study.\n",
        );
        s.push_str("# TYPE fttp_agent_last_successful_poll_timestamp_seconds gauge\n");
        for (study, t) in polled {
            s.push_str(&format!(
                "fttp_agent_last_successful_poll_timestamp_seconds{{study=\"{study}\"}} {}\n",
                t.timestamp()
            ));
        }
    }
    s.push_str("# HELP fttp_agent_cycle_duration_seconds Duration of the last cycle.\n");
    s.push_str("# TYPE fttp_agent_cycle_duration_seconds gauge\n");
    s.push_str(&format!("fttp_agent_cycle_duration_seconds {cycle_seconds:.3}\n"));
    s.push_str("# HELP fttp_agent_cycle_success Whether the last cycle reached the dispatcher (1) or not (0).\n");
    s.push_str("# TYPE fttp_agent_cycle_success gauge\n");
    s.push_str(&format!("fttp_agent_cycle_success {}\n", u8::from(cycle_ok)));
    if let Some(p) = pace {
        s.push_str(
            "# HELP fttp_agent_requests_in_flight_lowest The fewest requests in flight the last cycle's pace came \
             down to (max_in_flight: it never backed off).\n",
        );
        s.push_str("# TYPE fttp_agent_requests_in_flight_lowest gauge\n");
        s.push_str(&format!("fttp_agent_requests_in_flight_lowest {}\n", p.lowest));
        s.push_str(
            "# HELP fttp_agent_busy_answers Answers of the last cycle that said the dispatcher was busy (429, 503, \
             timeouts).\n",
        );
        s.push_str("# TYPE fttp_agent_busy_answers gauge\n");
        s.push_str(&format!("fttp_agent_busy_answers {}\n", p.busy));
    }
    s
}

// ------------------------------------------------------------ retention

/// Finished ledger entries last changed before `cutoff`; open ones never.
pub fn purgeable(store: &Store, cutoff: DateTime<Utc>) -> Vec<String> {
    store
        .ledger_entries()
        .filter(|e| e.status.is_terminal() && e.updated < cutoff)
        .map(|e| e.key.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_keep_their_precision_and_show_at_least_milliseconds() {
        let at = |s| ts(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc));
        assert_eq!(at("2026-12-04T10:00:00+01:00"), "2026-12-04T09:00:00.000Z");
        assert_eq!(at("2026-12-04T10:00:00.5Z"), "2026-12-04T10:00:00.500Z");
        assert_eq!(at("2026-12-04T10:00:00.123456Z"), "2026-12-04T10:00:00.123456Z");
        assert_eq!(at("2026-12-04T10:00:00.123456789Z"), "2026-12-04T10:00:00.123456789Z");
    }

    #[test]
    fn since_accepts_times_dates_and_durations() {
        assert_eq!(
            ts(parse_since("2026-11-01T10:00:00+01:00").unwrap()),
            "2026-11-01T09:00:00.000Z"
        );
        assert_eq!(ts(parse_since("2026-11-01").unwrap()), "2026-11-01T00:00:00.000Z");
        let ago = Utc::now() - parse_since("24h").unwrap();
        assert!((ago.num_seconds() - 86_400).abs() < 5);
        assert!(parse_since("yesterday").is_err());
    }

    #[test]
    fn every_ledger_status_maps_to_a_fhir_task_status() {
        let got: Vec<&str> = Status::ALL.iter().map(|s| fhir_status(*s)).collect();
        assert_eq!(
            got,
            vec![
                "requested",
                "in-progress",
                "completed",
                "failed",
                "cancelled",
                "rejected",
                "failed"
            ]
        );
    }
}
