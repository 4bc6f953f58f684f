//! The status page: one self-contained HTML document (inline CSS and SVG,
//! no script, no external resource) for the people who watch the agent,
//! served by the local service (`GET /`) and written by `report --html`.
//!
//! `gather` reads what the page shows from the store, the status report
//! and the audit log into a `Page` that holds nothing identifying (tasks
//! are named by kind, Bloom filter fingerprint and taskId, as in `tasks`);
//! `render` turns it into HTML, escaping every value.

mod render;

pub(crate) use render::content_security_policy;
pub use render::render;

use crate::audit::{Chain, Verdict};
use crate::report::{Health, Heartbeat, StatusReport};
use crate::store::Store;
use crate::vocab::{AuditKind, Outcome};
use chrono::{DateTime, Local, NaiveDate, Utc};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Days the chart covers.
pub(crate) const DAYS: usize = 30;

/// What the page shows.
#[derive(Debug, Clone)]
pub struct Page {
    pub version: String,
    pub generated: DateTime<Utc>,
    pub health: Health,
    pub warnings: Vec<String>,
    /// When the daemon polls next (unknown under a timer).
    pub next_poll: Option<DateTime<Utc>>,
    pub studies: Vec<StudyPage>,
    pub audit: AuditState,
    /// The store directory's files, in bytes.
    pub store_bytes: Option<u64>,
    /// Why the store could not be read (then studies show no figures).
    pub store_error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct StudyPage {
    pub name: String,
    pub target: String,
    pub last_poll: Option<DateTime<Utc>>,
    pub last_poll_ok: bool,
    pub last_poll_detail: Option<String>,
    pub last_successful_poll: Option<DateTime<Utc>>,
    pub failed_polls_in_a_row: u32,
    /// Open tasks, soonest expiry first.
    pub open: Vec<OpenTask>,
    /// Ledger entries by (kind, outcome).
    pub counts: BTreeMap<(String, Outcome), usize>,
    /// Outcomes per day, oldest first, `DAYS` of them (the audit log's).
    pub days: Vec<Day>,
}

#[derive(Debug, Clone)]
pub struct OpenTask {
    pub kind: String,
    pub task: String,
    /// Of the task's Bloom filter, where it has one.
    pub fingerprint: Option<String>,
    pub status: String,
    pub outcome: Outcome,
    pub expires: Option<DateTime<Utc>>,
    /// It expires before the next poll: lost unless something is done.
    pub before_next_poll: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Day {
    pub date: Option<NaiveDate>,
    pub done: usize,
    pub failed: usize,
    pub expired: usize,
    pub other: usize,
    pub failed_polls: usize,
}

#[derive(Debug, Clone)]
pub struct AuditState {
    pub intact: bool,
    /// `audit verify`'s verdict, in a line.
    pub verdict: String,
    pub last_record: Option<DateTime<Utc>>,
}

/// Where the page's figures come from.
pub(crate) struct Sources<'a> {
    pub store: Result<&'a Store, String>,
    /// Each study's name and dispatcher target, as configured.
    pub studies: &'a [(String, String)],
    pub report: Option<&'a StatusReport>,
    pub heartbeat: Option<&'a Heartbeat>,
    pub store_dir: &'a Path,
    /// The audit files in rotation order (oldest first), whether older
    /// (compressed) ones were left out, and the chain's key.
    pub audit_files: Vec<PathBuf>,
    pub audit_partial: bool,
    pub audit_chain: Option<&'a Chain>,
}

/// The category an outcome counts in on the chart.
fn category(outcome: Outcome) -> Option<usize> {
    use Outcome as O;
    Some(match outcome {
        O::Stored | O::Sent | O::Delivered | O::Clearing | O::Enrolled | O::Updated => 0,
        O::Failed | O::DispatcherError | O::TransientError | O::UnknownError | O::GaveUp => 1,
        O::Expired => 2,
        O::Duplicate | O::Rejected | O::UnknownPatient | O::NotAttempted | O::Reopened => 3,
        _ => return None,
    })
}

#[derive(serde::Deserialize)]
struct AuditLine<'a> {
    ts: &'a str,
    kind: &'a str,
    outcome: &'a str,
    #[serde(default)]
    study: Option<&'a str>,
}

pub(crate) fn gather(src: &Sources<'_>) -> Page {
    let now = Utc::now();
    let next_poll = src.heartbeat.and_then(|h| h.next_poll);
    let first_day = (now - chrono::Duration::days(DAYS as i64 - 1)).date_naive();
    let (days, last_record) = audit_days(&src.audit_files, first_day);
    let single = src.studies.len() == 1;
    let studies = src
        .studies
        .iter()
        .map(|(name, target)| {
            let mut study = StudyPage {
                name: name.clone(),
                target: target.clone(),
                last_poll: None,
                last_poll_ok: false,
                last_poll_detail: None,
                last_successful_poll: None,
                failed_polls_in_a_row: 0,
                open: Vec::new(),
                counts: BTreeMap::new(),
                days: (0..DAYS)
                    .map(|i| Day {
                        date: first_day.checked_add_days(chrono::Days::new(i as u64)),
                        ..Day::default()
                    })
                    .collect(),
            };
            // (Records from before several studies carry no study: the
            // only study's, or of none in particular.)
            for ((s, date), day) in &days {
                if (s.as_deref() == Some(name.as_str()) || (s.is_none() && single))
                    && let Some(slot) = study.days.iter_mut().find(|d| d.date == Some(*date))
                {
                    slot.done += day.done;
                    slot.failed += day.failed;
                    slot.expired += day.expired;
                    slot.other += day.other;
                    slot.failed_polls += day.failed_polls;
                }
            }
            if let Ok(store) = &src.store {
                if let Some(p) = store.last_polls().get(name) {
                    study.last_poll = Some(p.at);
                    study.last_poll_ok = p.ok;
                    study.last_poll_detail = p.detail.clone();
                    study.last_successful_poll = p.last_ok;
                    study.failed_polls_in_a_row = p.failures;
                }
                for e in store.ledger_entries().filter(|e| e.study() == name) {
                    *study
                        .counts
                        .entry((e.kind.as_str().to_string(), e.outcome))
                        .or_insert(0) += 1;
                    if e.status.is_terminal() {
                        continue;
                    }
                    study.open.push(OpenTask {
                        kind: e.kind.as_str().to_string(),
                        task: e.display_id.clone(),
                        fingerprint: e.task.as_ref().and_then(task_fingerprint),
                        status: e.status.as_str().to_string(),
                        outcome: e.outcome,
                        expires: e.expires,
                        before_next_poll: matches!((e.expires, next_poll), (Some(x), Some(n)) if x <= n),
                    });
                }
                study.open.sort_by_key(|t| (t.expires.is_none(), t.expires));
            }
            study
        })
        .collect();
    let audit = match crate::audit::verify(&src.audit_files, src.audit_chain, src.audit_partial) {
        _ if src.audit_files.is_empty() => AuditState {
            intact: true,
            verdict: "no audit log yet".into(),
            last_record,
        },
        Ok(Verdict::Intact { records, .. }) => AuditState {
            intact: true,
            verdict: format!(
                "intact: {records} record(s), every hash and link checks out{}",
                if src.audit_partial {
                    " (compressed rotated files not read)"
                } else {
                    ""
                }
            ),
            last_record,
        },
        Ok(Verdict::Broken { file, line, reason }) => AuditState {
            intact: false,
            verdict: format!(
                "BROKEN at {}:{line}: {reason}",
                file.file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
            last_record,
        },
        Err(e) => AuditState {
            intact: false,
            verdict: format!("cannot be read: {e}"),
            last_record,
        },
    };
    let mut health = src.report.map_or(Health::Critical, |r| r.health);
    let mut warnings = src.report.map(|r| r.warnings.clone()).unwrap_or_default();
    if !audit.intact {
        health = Health::Critical;
        warnings.insert(0, format!("CRITICAL: the audit log {}", audit.verdict));
    }
    Page {
        version: env!("CARGO_PKG_VERSION").to_string(),
        generated: now,
        health,
        warnings,
        next_poll,
        studies,
        audit,
        store_bytes: dir_size(src.store_dir),
        store_error: src.store.as_ref().err().cloned(),
    }
}

fn task_fingerprint(t: &crate::tasks::Task) -> Option<String> {
    use crate::tasks::Task;
    match t {
        Task::DicPsnAvailable { bloomfilter, .. } | Task::RepeatRequest { bloomfilter, .. } => {
            Some(bloomfilter.fingerprint())
        }
        Task::SendIdat { bloomfilter, .. } => bloomfilter.as_ref().map(super::types::BloomFilter::fingerprint),
    }
}

type DayKey = (Option<String>, NaiveDate);

/// Outcomes per study and day since `first_day`, and the last record's
/// time, from the audit files (a line that is not a record is skipped:
/// the verdict reports it).
fn audit_days(files: &[PathBuf], first_day: NaiveDate) -> (BTreeMap<DayKey, Day>, Option<DateTime<Utc>>) {
    let mut days: BTreeMap<DayKey, Day> = BTreeMap::new();
    let mut last = None;
    let first = first_day.format("%Y-%m-%d").to_string();
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines() {
            let Ok(rec) = serde_json::from_str::<AuditLine<'_>>(line) else {
                continue;
            };
            if let Ok(t) = DateTime::parse_from_rfc3339(rec.ts) {
                last = Some(t.with_timezone(&Utc));
            }
            if rec.ts.get(..10).is_none_or(|d| d < first.as_str()) {
                continue;
            }
            let Ok(date) = NaiveDate::parse_from_str(&rec.ts[..10], "%Y-%m-%d") else {
                continue;
            };
            let day = days.entry((rec.study.map(str::to_string), date)).or_default();
            let outcome = Outcome::parse(rec.outcome);
            match AuditKind::parse(rec.kind) {
                Some(AuditKind::Poll) => day.failed_polls += usize::from(outcome == Some(Outcome::Failed)),
                Some(AuditKind::DicPsnAvailable | AuditKind::SendIdat | AuditKind::RepeatRequest) => {
                    match outcome.and_then(category) {
                        Some(0) => day.done += 1,
                        Some(1) => day.failed += 1,
                        Some(2) => day.expired += 1,
                        _ => day.other += 1,
                    }
                }
                _ => {}
            }
        }
    }
    (days, last)
}

fn dir_size(dir: &Path) -> Option<u64> {
    let entries = std::fs::read_dir(dir).ok()?;
    Some(
        entries
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(std::fs::Metadata::is_file)
            .map(|m| m.len())
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> Page {
        let now = Utc::now();
        Page {
            version: "0.1.0".into(),
            generated: now,
            health: Health::Warning,
            warnings: vec!["WARNING: send_idat <script>x</script> expires".into()],
            next_poll: Some(now + chrono::Duration::hours(6)),
            studies: vec![StudyPage {
                name: "mii".into(),
                target: "dic_a".into(),
                last_poll: Some(now),
                last_poll_ok: false,
                last_poll_detail: Some("503 \"busy\"".into()),
                last_successful_poll: None,
                failed_polls_in_a_row: 2,
                open: vec![OpenTask {
                    kind: "send_idat".into(),
                    task: "t-1".into(),
                    fingerprint: Some("bf:0123".into()),
                    status: "pending".into(),
                    outcome: Outcome::Failed,
                    expires: Some(now + chrono::Duration::hours(1)),
                    before_next_poll: true,
                }],
                counts: [(("send_idat".to_string(), Outcome::Failed), 1)].into(),
                days: (0..DAYS)
                    .map(|i| Day {
                        done: i,
                        failed: i % 3,
                        ..Day::default()
                    })
                    .collect(),
            }],
            audit: AuditState {
                intact: true,
                verdict: "intact".into(),
                last_record: Some(now),
            },
            store_bytes: Some(1_234_567),
            store_error: None,
        }
    }

    #[test]
    fn the_page_escapes_every_value_and_marks_late_tasks_by_more_than_colour() {
        let html = render(&page());
        assert!(!html.contains("<script"), "an unescaped value");
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("class=\"late\"") && html.contains("⚠"));
        assert!(html.contains("<title id=\"s0-t\">"));
        assert!(html.contains("scope=\"col\""));
        assert!(!html.contains("style=\""), "inline style attributes break the CSP");
        assert!(
            !html.contains("http://") || !html.contains("src="),
            "no external resource"
        );
    }

    #[test]
    fn the_policy_allows_exactly_the_pages_style() {
        let csp = content_security_policy();
        assert!(csp.starts_with("default-src 'none'; style-src 'sha256-"));
        assert!(!csp.contains("unsafe"));
    }
}
