//! `run --once --dry-run`: what a cycle would do with each task, and why.

use super::*;

/// What `run --once --dry-run` says about one task.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub kind: TaskKind,
    pub task: String,
    pub action: String,
    pub why: String,
}

/// Polls and says what a cycle would do with each task and why, sending
/// nothing and writing nothing (no store, no ledger, no audit record).
pub fn dry_run(cfg: &Config, client: &Client, store: &Store) -> Result<(usize, Vec<Plan>), AgentError> {
    let study = cfg.study().name.as_str();
    let target = cfg.study().target.as_str();
    let parsed = client.request_tasks(study, target).map_err(AgentError::Poll)?;
    let received = parsed.len();
    let now = Utc::now();
    let mut plans = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut tasks: Vec<(Task, String)> = Vec::new();
    for item in parsed {
        match item {
            Err(rej) => plans.push(Plan {
                kind: TaskKind::Unknown,
                task: rej.key.chars().take(19).collect(),
                action: "reject".into(),
                why: format!("{}: {}", rej.name, rej.reason),
            }),
            Ok(t) => {
                let key = ledger_key(study, &t.key());
                if !seen.insert(key.clone()) {
                    plans.push(Plan {
                        kind: t.kind(),
                        task: t.display_id(),
                        action: "skip".into(),
                        why: "repeated within this answer".into(),
                    });
                } else if let Some(e) = store.ledger(&key).filter(|e| e.status.is_terminal()) {
                    plans.push(Plan {
                        kind: t.kind(),
                        task: t.display_id(),
                        action: "skip (duplicate)".into(),
                        why: format!("already {} ({})", e.status.as_str(), e.outcome),
                    });
                } else if store.ledger(&key).is_none() {
                    tasks.push((t, "received now".into()));
                }
                // (Open in the ledger already: planned below, by its entry.)
            }
        }
    }
    for e in store
        .ledger_entries()
        .filter(|e| !e.status.is_terminal() && e.study() == study)
    {
        // The cycle's own rules for open tasks: given up, or waiting out a
        // backoff, they are not sent.
        let waits = if let Some(why) = super::give_up(&cfg.dispatcher, e, now) {
            Some(("give up".to_string(), why))
        } else if super::waits_out_backoff(e, now, cfg.dispatcher.retry_delay.0) {
            Some(("wait (backoff)".to_string(), format!("after a {}", e.outcome)))
        } else {
            None
        };
        if let Some((action, why)) = waits {
            plans.push(Plan {
                kind: e.kind,
                task: e.display_id.clone(),
                action,
                why,
            });
            continue;
        }
        if let Some(t) = &e.task {
            tasks.push((
                t.clone(),
                format!("open in the ledger ({}, {})", e.status.as_str(), e.outcome),
            ));
        }
    }
    tasks.sort_by_key(|(t, _)| (t.expires().is_none(), t.expires()));
    for (t, origin) in tasks {
        let (action, why) = if t.expires().is_some_and(|x| x <= now) {
            (
                "skip (expired)".to_string(),
                format!("expired at {}", ts(t.expires().unwrap_or(now))),
            )
        } else {
            match &t {
                Task::DicPsnAvailable {
                    bloomfilter, pseudonym, ..
                } => match store.local_id_by_bloomfilter(bloomfilter)? {
                    Some(id) => (
                        "store pseudonym".to_string(),
                        format!("{} for patient {}", pseudonym.fingerprint(), id.fingerprint()),
                    ),
                    None => (
                        "keep pseudonym, wait".to_string(),
                        format!("no local patient has {} (unknown_patient)", bloomfilter.fingerprint()),
                    ),
                },
                Task::SendIdat {
                    pseudonym,
                    bloomfilter,
                    elements,
                    ..
                } => match store.find_patient(study, pseudonym.as_ref(), bloomfilter.as_ref())? {
                    Some(p) if elements.iter().all(|e| p.idat.get(*e).is_none()) => (
                        "wait".to_string(),
                        format!(
                            "patient {}: none of the requested element(s) on file (unknown_patient)",
                            p.local_id.fingerprint()
                        ),
                    ),
                    Some(p) => {
                        let have: Vec<&str> = elements
                            .iter()
                            .filter(|e| p.idat.get(**e).is_some())
                            .map(|e| e.code())
                            .collect();
                        let missing: Vec<&str> = elements
                            .iter()
                            .filter(|e| p.idat.get(**e).is_none())
                            .map(|e| e.code())
                            .collect();
                        (
                            format!("send {} element(s)", have.len()),
                            format!(
                                "patient {}: {}{}",
                                p.local_id.fingerprint(),
                                have.join(", "),
                                if missing.is_empty() {
                                    String::new()
                                } else {
                                    format!("; not on file: {}", missing.join(", "))
                                }
                            ),
                        )
                    }
                    None => (
                        "wait".to_string(),
                        "no local patient has this pseudonym or Bloom filter (unknown_patient)".to_string(),
                    ),
                },
                Task::RepeatRequest { bloomfilter, .. } => (
                    "resend Bloom filter".to_string(),
                    format!(
                        "{} in a $requestPsnFromBfWorkflow batch of up to {}",
                        bloomfilter.fingerprint(),
                        cfg.dispatcher.batch_size.0
                    ),
                ),
            }
        };
        plans.push(Plan {
            kind: t.kind(),
            task: t.display_id(),
            action,
            why: format!("{why} [{origin}]"),
        });
    }
    Ok((received, plans))
}
