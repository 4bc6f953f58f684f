//! The ledger in memory: entries by key, each with the place it arrived in.
//!
//! The cycle works tasks soonest expiry first; among tasks that expire
//! together (a poll's worth often does) it takes them in the order they
//! arrived, which is the order of their rows. A batch's in-flight marks and
//! outcomes then rewrite a few neighbouring pages of the ledger table, not
//! one page per task: at 100,000 tasks that is most of what each commit
//! writes.

use super::records::LedgerEntry;
use std::collections::HashMap;

#[derive(Default)]
pub(crate) struct Ledger {
    entries: HashMap<String, (u64, LedgerEntry)>,
    next: u64,
}

impl Ledger {
    pub(crate) fn get(&self, key: &str) -> Option<&LedgerEntry> {
        self.entries.get(key).map(|(_, e)| e)
    }

    /// Adds an entry, or replaces it where it stands (it keeps its place).
    pub(crate) fn insert(&mut self, key: String, entry: LedgerEntry) {
        match self.entries.get_mut(&key) {
            Some(slot) => slot.1 = entry,
            None => {
                self.entries.insert(key, (self.next, entry));
                self.next += 1;
            }
        }
    }

    pub(crate) fn remove(&mut self, key: &str) {
        self.entries.remove(key);
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn reserve(&mut self, n: usize) {
        self.entries.reserve(n);
    }

    /// In no particular order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &LedgerEntry> {
        self.entries.values().map(|(_, e)| e)
    }

    /// In the order the entries arrived (read from the store: row order).
    pub(crate) fn in_arrival_order(&self) -> Vec<&LedgerEntry> {
        let mut all: Vec<&(u64, LedgerEntry)> = self.entries.values().collect();
        all.sort_unstable_by_key(|(n, _)| *n);
        all.into_iter().map(|(_, e)| e).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::Status;
    use crate::tasks::TaskKind;
    use crate::vocab::Outcome;

    fn entry(key: &str) -> LedgerEntry {
        let now = chrono::Utc::now();
        LedgerEntry {
            key: key.into(),
            kind: TaskKind::RepeatRequest,
            display_id: key.into(),
            task: None,
            status: Status::Pending,
            outcome: Outcome::Received,
            detail: None,
            expires: None,
            first_seen: now,
            last_seen: now,
            updated: now,
            attempts: 0,
        }
    }

    #[test]
    fn entries_keep_the_place_they_arrived_in_when_they_change() {
        let mut l = Ledger::default();
        for k in ["c", "a", "d", "b"] {
            l.insert(k.into(), entry(k));
        }
        let mut changed = entry("a");
        changed.status = Status::Resolved;
        l.insert("a".into(), changed);
        l.remove("d");
        let order: Vec<&str> = l.in_arrival_order().iter().map(|e| e.key.as_str()).collect();
        assert_eq!(order, ["c", "a", "b"]);
        assert_eq!(l.get("a").map(|e| e.status), Some(Status::Resolved));
    }
}
