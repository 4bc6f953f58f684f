//! The ledger for people and tools: a table, NDJSON lines, a FHIR Task
//! Bundle; and which finished entries retention may purge.

use crate::duration::ts;
use crate::fhir::element::{Node, Resource, Value};
use crate::store::{LedgerEntry, Status, Store};
use crate::tasks::Task;
use crate::vocab::Outcome;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// One ledger entry as `tasks --format json` prints it.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct TaskLine {
    pub key: String,
    pub kind: String,
    pub task: String,
    pub status: String,
    pub outcome: Outcome,
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
            outcome: e.outcome,
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
                e.outcome.as_str().to_string(),
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
        .push_complex("businessStatus", Node::new().with("text", e.outcome.as_str()));
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
