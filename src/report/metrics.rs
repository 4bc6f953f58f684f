//! Prometheus metrics for node_exporter's textfile collector and `/metrics`.

use super::soonest_open_expiry;
use crate::store::{Status, Store};
use crate::tasks::TaskKind;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

/// Prometheus text exposition for node_exporter's textfile collector.
pub fn metrics(
    store: &Store,
    studies: &[&str],
    cycle_seconds: f64,
    cycle_ok: bool,
    pace: Option<crate::pace::PaceReport>,
) -> String {
    let mut by: BTreeMap<(String, TaskKind, Status, crate::vocab::Outcome), usize> = BTreeMap::new();
    let mut open: BTreeMap<String, usize> = BTreeMap::new();
    for e in store.ledger_entries() {
        *by.entry((e.study().to_string(), e.kind, e.status, e.outcome))
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
            o.as_str()
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
