//! The status page: one self-contained HTML document (inline CSS and SVG,
//! no script, no external resource) for the people who watch the agent,
//! served by the local service (`GET /`) and written by `report --html`.
//!
//! `gather` reads what the page shows from the store, the status report
//! and the audit log into a `Page` that holds nothing identifying (tasks
//! are named by kind, Bloom filter fingerprint and taskId, as in `tasks`);
//! `render` turns it into HTML, escaping every value.

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

// ------------------------------------------------------------ rendering

const STYLE: &str = "
:root{--fg:#1a1a1a;--bg:#fff;--muted:#555;--line:#ccc;--ok:#0072b2;--warn:#e69f00;--bad:#d55e00}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:var(--fg);background:var(--bg);margin:0 auto;max-width:72rem;padding:1rem}
h1{font-size:1.5rem;margin:.2rem 0}h2{font-size:1.25rem;margin:1.6rem 0 .4rem;border-bottom:2px solid var(--line)}h3{font-size:1.05rem;margin:1rem 0 .3rem}
.badge{display:inline-block;padding:.1rem .6rem;border-radius:.3rem;font-weight:700;border:2px solid}
.h-ok{border-color:var(--ok);color:var(--ok)}.h-warning{border-color:var(--warn);color:#8a5a00}.h-critical{border-color:var(--bad);color:#a33a00}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem;margin:.4rem 0}dt{color:var(--muted)}dd{margin:0}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;margin:.4rem 0}th,td{text-align:left;padding:.25rem .5rem;border-bottom:1px solid var(--line);vertical-align:top}
th{background:#f2f2f2}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr.late td{background:#fde3d6;font-weight:600}tr.late td:first-child{border-left:4px solid var(--bad)}
.mark{font-weight:700;color:#a33a00}
ul.warnings{padding-left:1.2rem}ul.warnings li{margin:.2rem 0}
code{font-family:ui-monospace,monospace;font-size:.92em;word-break:break-all}
.muted{color:var(--muted)}
svg{max-width:100%;height:auto}
.legend span{margin-right:1rem;white-space:nowrap}.legend svg{vertical-align:middle}
details summary{cursor:pointer;color:var(--muted)}
@media (max-width:40rem){body{padding:.5rem;font-size:14px}dl{grid-template-columns:1fr}dt{font-weight:600}th,td{padding:.2rem .3rem}}
@media print{body{max-width:none}.scroll{overflow:visible}tr.late td{background:none}a{color:inherit}}
";

/// The `Content-Security-Policy` the page is served with: nothing but its
/// own inline style (by hash), no script, no connection, no frame.
pub(crate) fn content_security_policy() -> String {
    format!("{}; frame-ancestors 'none'", document_policy())
}

/// The policy the document states itself (a `<meta>` cannot say
/// `frame-ancestors`): the written file keeps it when opened from disk.
fn document_policy() -> String {
    use base64::Engine as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, STYLE.as_bytes());
    format!(
        "default-src 'none'; style-src 'sha256-{}'; img-src data:; base-uri 'none'; form-action 'none'",
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    )
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// UTC, with the site's local time beside it.
fn when(t: DateTime<Utc>) -> String {
    let local = t.with_timezone(&Local);
    format!(
        "<time datetime=\"{}\">{} UTC</time> <span class=\"muted\">({} local, UTC{})</span>",
        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        t.format("%Y-%m-%d %H:%M"),
        local.format("%Y-%m-%d %H:%M"),
        local.format("%:z")
    )
}

fn left(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let d = t - now;
    if d < chrono::Duration::zero() {
        "past".into()
    } else {
        crate::duration::format_left(d)
    }
}

fn health_word(h: Health) -> &'static str {
    match h {
        Health::Ok => "ok",
        Health::Warning => "warning",
        Health::Critical => "critical",
    }
}

/// Series of the chart: name, colour, and a pattern so that print and
/// colour-blind readers tell them apart by more than colour.
const SERIES: [(&str, &str, &str); 4] = [
    ("done", "#0072b2", "solid"),
    ("failed", "#d55e00", "hatch"),
    ("expired", "#e69f00", "dots"),
    ("other", "#999999", "cross"),
];

fn pattern_defs(prefix: &str) -> String {
    let mut s = String::from("<defs>");
    for (name, colour, kind) in SERIES {
        let inner = match kind {
            "hatch" => "<path d=\"M0 6L6 0\" stroke=\"#000\" stroke-width=\"1.2\"/>".to_string(),
            "dots" => "<circle cx=\"3\" cy=\"3\" r=\"1.2\" fill=\"#000\"/>".to_string(),
            "cross" => "<path d=\"M0 3H6M3 0V6\" stroke=\"#000\" stroke-width=\"0.8\"/>".to_string(),
            _ => String::new(),
        };
        s.push_str(&format!(
            "<pattern id=\"{prefix}-{name}\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\">\
             <rect width=\"6\" height=\"6\" fill=\"{colour}\"/>{inner}</pattern>"
        ));
    }
    s.push_str("</defs>");
    s
}

fn chart(study: &StudyPage, id: &str) -> String {
    let (w, h, left_pad, bottom) = (620.0, 180.0, 34.0, 22.0);
    let max = study
        .days
        .iter()
        .map(|d| d.done + d.failed + d.expired + d.other)
        .max()
        .unwrap_or(0)
        .max(1);
    let bar_w = (w - left_pad) / DAYS as f64;
    let scale = (h - bottom - 8.0) / max as f64;
    let mut s = format!(
        "<svg role=\"img\" aria-labelledby=\"{id}-t {id}-d\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" \
         xmlns=\"http://www.w3.org/2000/svg\"><title id=\"{id}-t\">Task outcomes per day, last {DAYS} days, \
         study {}</title><desc id=\"{id}-d\">Stacked bars per day: done, failed, expired, other. The table \
         below gives the same figures.</desc>{}",
        esc(&study.name),
        pattern_defs(id)
    );
    s.push_str(&format!(
        "<line x1=\"{left_pad}\" y1=\"{}\" x2=\"{w}\" y2=\"{}\" stroke=\"#666\"/>\
         <text x=\"{}\" y=\"14\" font-size=\"11\" text-anchor=\"end\">{max}</text>\
         <text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">0</text>",
        h - bottom,
        h - bottom,
        left_pad - 4.0,
        left_pad - 4.0,
        h - bottom
    ));
    for (i, day) in study.days.iter().enumerate() {
        let x = left_pad + i as f64 * bar_w + 1.0;
        let mut y = h - bottom;
        for ((name, _, _), n) in SERIES.iter().zip([day.done, day.failed, day.expired, day.other]) {
            if n == 0 {
                continue;
            }
            let bh = n as f64 * scale;
            y -= bh;
            s.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"url(#{id}-{name})\" \
                 stroke=\"#333\" stroke-width=\"0.3\"><title>{}: {n} {name}</title></rect>",
                bar_w - 2.0,
                day.date.map(|d| d.to_string()).unwrap_or_default()
            ));
        }
        if i % 5 == 0 || i + 1 == DAYS {
            // (The last label ends at the chart's edge instead of past it.)
            let (anchor, at) = if i + 1 == DAYS {
                ("end", x + bar_w - 1.0)
            } else {
                ("middle", x + bar_w / 2.0)
            };
            s.push_str(&format!(
                "<text x=\"{at:.1}\" y=\"{}\" font-size=\"10\" text-anchor=\"{anchor}\">{}</text>",
                h - 6.0,
                day.date.map(|d| d.format("%m-%d").to_string()).unwrap_or_default()
            ));
        }
    }
    s.push_str("</svg>");
    s
}

fn legend(id: &str) -> String {
    let mut s = String::from("<p class=\"legend\" aria-hidden=\"true\">");
    for (name, _, _) in SERIES {
        s.push_str(&format!(
            "<span><svg width=\"14\" height=\"14\" viewBox=\"0 0 14 14\">{}<rect width=\"14\" height=\"14\" \
             fill=\"url(#{id}-l-{name})\" stroke=\"#333\"/></svg> {name}</span>",
            pattern_defs(&format!("{id}-l"))
        ));
    }
    s.push_str("</p>");
    s
}

pub fn render(page: &Page) -> String {
    let now = page.generated;
    let mut s = String::with_capacity(32 * 1024);
    s.push_str(&format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"{}\">\
         <title>fttp-agent: {}</title><style>{STYLE}</style></head><body>",
        document_policy(),
        health_word(page.health)
    ));
    s.push_str(&format!(
        "<header><h1>fttp-agent status <span class=\"badge h-{0}\">{1}</span></h1>\
         <p class=\"muted\">Generated {2}. fttp-agent {3}.</p></header><main>",
        health_word(page.health),
        health_word(page.health).to_uppercase(),
        when(now),
        esc(&page.version)
    ));
    // Summary.
    s.push_str("<section id=\"summary\" aria-labelledby=\"summary-h\"><h2 id=\"summary-h\">Summary</h2><dl>");
    s.push_str(&format!(
        "<dt>Health</dt><dd>{}</dd><dt>Next poll</dt><dd>{}</dd><dt>Audit chain</dt><dd>{}{}</dd>\
         <dt>Last audit record</dt><dd>{}</dd><dt>Store size</dt><dd>{}</dd><dt>Version</dt><dd>{}</dd>",
        health_word(page.health).to_uppercase(),
        page.next_poll.map_or(
            "unknown (not a daemon: a systemd timer or cron decides)".to_string(),
            |t| format!("{} (in {})", when(t), left(t, now))
        ),
        if page.audit.intact {
            ""
        } else {
            "<span class=\"mark\">⚠ </span>"
        },
        esc(&page.audit.verdict),
        page.audit.last_record.map_or("none".to_string(), when),
        page.store_bytes
            .map_or("unknown".to_string(), |b| format!("{:.1} MB", b as f64 / 1e6)),
        esc(&page.version),
    ));
    s.push_str("</dl>");
    if let Some(e) = &page.store_error {
        s.push_str(&format!("<p class=\"mark\">⚠ The store cannot be read: {}</p>", esc(e)));
    }
    if page.warnings.is_empty() {
        s.push_str("<p>No warnings.</p>");
    } else {
        s.push_str("<h3>Warnings</h3><ul class=\"warnings\">");
        for w in &page.warnings {
            s.push_str(&format!("<li>{}</li>", esc(w)));
        }
        s.push_str("</ul>");
    }
    s.push_str("</section>");
    for (i, study) in page.studies.iter().enumerate() {
        s.push_str(&study_section(study, i, now));
    }
    s.push_str(
        "</main><footer><p class=\"muted\">Tasks are named by kind, taskId and Bloom filter \
         fingerprint; this page holds no identifying data, pseudonym or local id.</p></footer></body></html>\n",
    );
    s
}

fn study_section(study: &StudyPage, i: usize, now: DateTime<Utc>) -> String {
    let id = format!("s{i}");
    let mut s = format!(
        "<section class=\"study\" id=\"study-{}\" aria-labelledby=\"{id}-h\"><h2 id=\"{id}-h\">Study {} \
         <span class=\"muted\">(target {})</span></h2><dl>",
        esc(&study.name),
        esc(&study.name),
        esc(&study.target)
    );
    let poll = match study.last_poll {
        None => "never".to_string(),
        Some(t) if study.last_poll_ok => format!("{}: ok", when(t)),
        Some(t) => format!(
            "{}: <span class=\"mark\">⚠ failed</span>{}",
            when(t),
            study
                .last_poll_detail
                .as_deref()
                .map(|d| format!(" ({})", esc(d)))
                .unwrap_or_default()
        ),
    };
    s.push_str(&format!(
        "<dt>Last poll</dt><dd>{poll}</dd><dt>Last successful poll</dt><dd>{}</dd>\
         <dt>Failed polls in a row</dt><dd>{}</dd><dt>Open tasks</dt><dd>{}</dd></dl>",
        study.last_successful_poll.map_or("never".to_string(), when),
        study.failed_polls_in_a_row,
        study.open.len()
    ));
    // Open tasks.
    s.push_str(&format!("<h3 id=\"{id}-open\">Open tasks, soonest expiry first</h3>"));
    if study.open.is_empty() {
        s.push_str("<p>None.</p>");
    } else {
        s.push_str(&format!(
            "<div class=\"scroll\"><table aria-describedby=\"{id}-open\"><thead><tr><th scope=\"col\">Kind</th>\
             <th scope=\"col\">Task</th><th scope=\"col\">Bloom filter</th><th scope=\"col\">Status</th>\
             <th scope=\"col\">Outcome</th><th scope=\"col\">Expires</th><th scope=\"col\" class=\"n\">Time left</th>\
             </tr></thead><tbody>"
        ));
        for t in &study.open {
            s.push_str(&format!(
                "<tr{}><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td>\
                 <td class=\"n\">{}</td></tr>",
                if t.before_next_poll { " class=\"late\"" } else { "" },
                esc(&t.kind),
                esc(&t.task),
                esc(t.fingerprint.as_deref().unwrap_or("-")),
                esc(&t.status),
                t.outcome.as_str(),
                t.expires.map_or("no expiry".to_string(), when),
                match (t.expires, t.before_next_poll) {
                    (Some(x), true) => format!("<span class=\"mark\">⚠ {} (before the next poll)</span>", left(x, now)),
                    (Some(x), false) => left(x, now),
                    (None, _) => "-".to_string(),
                }
            ));
        }
        s.push_str("</tbody></table></div>");
    }
    // Counts.
    s.push_str(&format!(
        "<h3 id=\"{id}-counts\">Tasks in the ledger by kind and outcome</h3>"
    ));
    if study.counts.is_empty() {
        s.push_str("<p>None.</p>");
    } else {
        s.push_str(&format!(
            "<div class=\"scroll\"><table aria-describedby=\"{id}-counts\"><thead><tr><th scope=\"col\">Kind</th>\
             <th scope=\"col\">Outcome</th><th scope=\"col\" class=\"n\">Tasks</th></tr></thead><tbody>"
        ));
        for ((kind, outcome), n) in &study.counts {
            s.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td class=\"n\">{n}</td></tr>",
                esc(kind),
                outcome.as_str()
            ));
        }
        s.push_str("</tbody></table></div>");
    }
    // Chart, its legend, and the same figures as a table.
    s.push_str(&format!(
        "<h3 id=\"{id}-chart\">Outcomes per day, last {DAYS} days</h3><figure aria-labelledby=\"{id}-chart\">{}{}\
         </figure>",
        chart(study, &id),
        legend(&id)
    ));
    s.push_str(&format!(
        "<details><summary>The chart's figures</summary><div class=\"scroll\"><table><caption>Outcomes and failed \
         polls per day, study {}</caption><thead><tr><th scope=\"col\">Day (UTC)</th><th scope=\"col\" class=\"n\">\
         Done</th><th scope=\"col\" class=\"n\">Failed</th><th scope=\"col\" class=\"n\">Expired</th>\
         <th scope=\"col\" class=\"n\">Other</th><th scope=\"col\" class=\"n\">Failed polls</th></tr></thead><tbody>",
        esc(&study.name)
    ));
    for d in &study.days {
        s.push_str(&format!(
            "<tr><th scope=\"row\">{}</th><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            d.date.map(|d| d.to_string()).unwrap_or_default(),
            d.done,
            d.failed,
            d.expired,
            d.other,
            d.failed_polls
        ));
    }
    s.push_str("</tbody></table></div></details>");
    let failed_polls: usize = study.days.iter().map(|d| d.failed_polls).sum();
    s.push_str(&format!(
        "<h3>Failed polls</h3><p>{failed_polls} in the last {DAYS} days; {} in a row now.</p></section>",
        study.failed_polls_in_a_row
    ));
    s
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
