//! The page as HTML: inline CSS and SVG, no script, every value escaped,
//! and the Content-Security-Policy that holds it to that.

use super::*;

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
