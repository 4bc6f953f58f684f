//! One cycle: poll `$requestTasks`, merge into the ledger, resolve every open
//! task soonest-expiring first, record each outcome in store and audit log.
//!
//! The ledger keeps each task's content, so a task whose resolution failed
//! is retried on the next cycle even if the dispatcher does not hand it out
//! again, until it expires.

use crate::audit::{Audit, AuditError, AuditRecord};
use crate::client::{Client, ClientError};
use crate::config::Config;
use crate::crashpoint;
use crate::duration::ts;
use crate::fhir::idat::IdatElement;
use crate::shutdown::Shutdown;
use crate::store::records::ledger_key;
use crate::store::{
    EnrolmentRecord, EnrolmentStatus, LedgerEntry, PollRecord, Progress, PseudonymRecord, Record, Status, Store,
    StoreError,
};
use crate::tasks::{PsnAnswers, Rejected, Task, TaskKind};
use crate::types::{BloomFilter, LocalId, Pseudonym};
use crate::vocab::{AuditKind, Outcome};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::time::Instant;

mod flights;
mod plan;
use flights::skipped_after;
pub use plan::{Plan, dry_run};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("polling failed: {0}")]
    Poll(ClientError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

impl AgentError {
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Poll(e) => e.exit_code(),
            AgentError::Store(e) => e.exit_code(),
            AgentError::Audit(e) => e.exit_code(),
        }
    }
}

/// What happened to one task in this cycle.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOutcome {
    pub kind: TaskKind,
    pub task: String,
    pub outcome: Outcome,
    pub status: Status,
    pub detail: Option<String>,
}

/// How many tasks of a cycle ended in one condition, by task kind, with
/// one detail as an example.
#[derive(Debug, Clone, Default)]
pub(crate) struct Condition {
    pub count: usize,
    pub by_kind: BTreeMap<&'static str, usize>,
    pub example: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct CycleReport {
    /// Tasks in the dispatcher's answer.
    pub received: usize,
    /// The first `OUTCOMES_LISTED` outcomes, one by one (the demo lists
    /// them); every outcome is counted in the figures below.
    pub outcomes: Vec<TaskOutcome>,
    by_outcome: BTreeMap<Outcome, usize>,
    conditions: BTreeMap<Outcome, Condition>,
    /// Outcomes that left their task open.
    open: usize,
    /// Wall time of each phase (poll, ledger, tasks, end), for the summary
    /// line: where a slow cycle spent its time.
    pub phases: Vec<(&'static str, std::time::Duration)>,
    /// Open tasks not tried this cycle: they wait out the backoff after a
    /// transient error.
    pub deferred: usize,
    /// Studies whose poll failed while others' went on: the study, what
    /// failed, and its exit code.
    pub failed_polls: Vec<(String, String, u8)>,
    /// How far the dispatchers' pace backed off (the lowest of the
    /// studies'), and how many answers said "busy".
    pub pace: crate::pace::PaceReport,
}

/// Outcomes a cycle report lists one by one; the rest are counted only
/// (a re-keying's 100,000 would be 10 MB held for a summary line).
const OUTCOMES_LISTED: usize = 1000;

impl CycleReport {
    /// Counts an outcome (and lists it, among the first).
    fn add(&mut self, o: TaskOutcome) {
        *self.by_outcome.entry(o.outcome).or_insert(0) += 1;
        if !o.status.is_terminal() {
            self.open += 1;
        }
        if is_condition(o.status, o.outcome) {
            let entry = self.conditions.entry(o.outcome).or_default();
            entry.count += 1;
            *entry.by_kind.entry(o.kind.as_str()).or_insert(0) += 1;
            if entry.example.is_none() {
                entry.example.clone_from(&o.detail);
            }
        }
        if self.outcomes.len() < OUTCOMES_LISTED {
            self.outcomes.push(o);
        }
    }

    /// Tasks that are still open after this cycle (failed, waiting for a
    /// patient, waiting out a backoff, or not reached).
    pub fn unresolved(&self) -> usize {
        self.open + self.deferred
    }

    /// Conditions that can repeat every cycle, by outcome (`log_outcome`).
    pub(crate) fn conditions(&self) -> BTreeMap<Outcome, Condition> {
        self.conditions.clone()
    }

    pub fn counts(&self) -> BTreeMap<Outcome, usize> {
        self.by_outcome.clone()
    }
}

/// A study this agent serves, with the client for its dispatcher (its own
/// URL and API key, where it has them).
pub struct StudyClient {
    pub study: crate::config::Study,
    pub client: Client,
}

impl StudyClient {
    /// One for each configured study, in the order written.
    pub(crate) fn for_all(cfg: &Config) -> Result<Vec<StudyClient>, crate::client::ClientSetupError> {
        let mut out = Vec::with_capacity(cfg.studies.len());
        for study in &cfg.studies {
            if let Some(own) = cfg.for_study(&study.name) {
                out.push(StudyClient {
                    study: study.clone(),
                    client: Client::new(&own)?,
                });
            }
        }
        Ok(out)
    }
}

pub struct Agent<'a> {
    cfg: &'a Config,
    studies: &'a [StudyClient],
    store: &'a mut Store,
    audit: &'a mut Audit,
    report: CycleReport,
    /// Per study, set after a failure that will fail every further call
    /// to its dispatcher this cycle (unreachable, credentials refused): its
    /// remaining network tasks wait; other studies go on.
    network_down: BTreeMap<String, String>,
    /// Polls that failed this cycle, by study, in the order polled.
    poll_errors: Vec<(String, ClientError)>,
    /// Checked between tasks: a daemon asked to stop finishes the task in
    /// hand and leaves the rest open for the next run.
    stop: Option<Shutdown>,
    /// Outcomes not yet written: they go to the store together with the next
    /// in-flight record (one fsync per request, not per task) or at the end.
    /// A crash loses only outcomes that the next run recomputes. Each with
    /// the number of audit records that must be written out to the audit
    /// log before it goes to the store (`Audit::written`): an outcome the
    /// store holds is in the audit log too, even after a SIGKILL.
    pending: Vec<(Record, u64)>,
}

/// Why an open task is given up, if it is: one without `expires` (the
/// guide allows it) would otherwise be tried forever, and so would one
/// answered with an error code nobody knows.
fn give_up(d: &crate::config::Dispatcher, e: &LedgerEntry, now: chrono::DateTime<Utc>) -> Option<String> {
    let unknown_error = e.outcome == Outcome::UnknownError;
    if e.expires.is_some() && !unknown_error {
        return None;
    }
    if e.attempts >= d.max_task_attempts.0 {
        return Some(format!(
            "{} attempts without a result{} ([dispatcher] max_task_attempts)",
            e.attempts,
            if unknown_error {
                ", the last answered with an unknown error code"
            } else {
                " and no expiry"
            }
        ));
    }
    let age = (now - e.first_seen).to_std().unwrap_or_default();
    (e.expires.is_none() && age > d.max_task_age.0).then(|| {
        format!(
            "open for {} days with no expiry ([dispatcher] max_task_age)",
            age.as_secs() / 86_400
        )
    })
}

/// Whether a task answered with a transient (or unknown) error waits before
/// it is tried again: `[dispatcher] retry_delay` after the first attempt,
/// doubling with each attempt, at most a day; its expiry still bounds it.
fn waits_out_backoff(e: &LedgerEntry, now: chrono::DateTime<Utc>, base: std::time::Duration) -> bool {
    if e.status != Status::Failed || !e.outcome.backs_off() {
        return false;
    }
    let wait = base
        .saturating_mul(1 << e.attempts.saturating_sub(1).min(20))
        .min(std::time::Duration::from_secs(86_400));
    now < e.updated + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::days(1))
}

/// The ledger status and outcome for an `error-code` answer (README, "What
/// the agent does with each answer").
fn error_verdict(code: &crate::tasks::ErrorCode, task: &str) -> (Status, Outcome) {
    use crate::fhir::outcome::ErrorClass;
    match code.class() {
        ErrorClass::Transient => (Status::Failed, Outcome::TransientError),
        ErrorClass::Unknown => (Status::Failed, Outcome::UnknownError),
        ErrorClass::Final { security } => {
            if security {
                log::warn!(
                    "[repeat_request {task}] the dispatcher refused on security grounds ({code}): check the API key \
                     and the site's rights"
                );
            }
            (Status::Closed, Outcome::DispatcherError)
        }
    }
}

/// Outcomes buffered before a write is forced: enough that they usually
/// go to the store with the next group of in-flight marks, one commit for
/// both (1,000 doubled the commits of a 100,000-task cycle; 5,000 took its
/// peak RSS past 150 MB).
const BUFFER: usize = 3000;

/// New ledger entries written to the store at a time while merging a poll.
const MERGE_SLICE: usize = 10_000;

/// A ledger key and its task's expiry.
type KeyExpiry = (String, Option<DateTime<Utc>>);

/// A unit of work: one task, or one batch of repeat_requests sent together,
/// by ledger key (the entries are read when their request is prepared).
enum Work {
    One(String, Option<DateTime<Utc>>),
    Batch {
        study: String,
        target: String,
        keys: Vec<String>,
        /// The soonest of its tasks' expiries.
        expires: Option<DateTime<Utc>>,
    },
}

impl Work {
    /// The tasks in it.
    fn len(&self) -> usize {
        match self {
            Work::One(..) => 1,
            Work::Batch { keys, .. } => keys.len(),
        }
    }

    fn expires(&self) -> Option<DateTime<Utc>> {
        match self {
            Work::One(_, x) | Work::Batch { expires: x, .. } => *x,
        }
    }
}

impl<'a> Agent<'a> {
    pub fn new(cfg: &'a Config, studies: &'a [StudyClient], store: &'a mut Store, audit: &'a mut Audit) -> Self {
        Agent {
            cfg,
            studies,
            store,
            audit,
            report: CycleReport::default(),
            network_down: BTreeMap::new(),
            poll_errors: Vec::new(),
            stop: None,
            pending: Vec::new(),
        }
    }

    /// Buffers a record for the store, to be written once the audit
    /// records written so far are out (an outcome's audit record is written
    /// before its store record is buffered).
    fn buffer(&mut self, r: Record) -> Result<(), AgentError> {
        self.pending.push((r, self.audit.accepted()));
        if self.pending.len() >= BUFFER {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes every buffered record, after their audit records.
    fn flush(&mut self) -> Result<(), AgentError> {
        if !self.pending.is_empty() {
            self.audit.write_out()?;
            let records = self.pending.drain(..).map(|(r, _)| r).collect();
            self.store.write(records)?;
        }
        Ok(())
    }

    /// The buffered records whose audit records are written out already
    /// (the rest wait for a later write; the audit writer is given what it
    /// has not yet been handed, so that they are out by then).
    fn audited(&mut self) -> Result<Vec<Record>, AgentError> {
        let out = self.audit.written();
        let ready = self.pending.partition_point(|(_, need)| *need <= out);
        let records = self.pending.drain(..ready).map(|(r, _)| r).collect();
        self.audit.push()?;
        Ok(records)
    }

    pub(crate) fn with_shutdown(mut self, stop: Shutdown) -> Self {
        self.stop = Some(stop);
        self
    }

    /// The configured study (and its client) a ledger entry belongs to.
    fn study_of(&self, e: &LedgerEntry) -> Option<&'a StudyClient> {
        let studies: &'a [StudyClient] = self.studies;
        studies.iter().find(|s| s.study.name == e.study())
    }

    /// Polls every study, in the order configured, then works on the open
    /// tasks of all of them, soonest expiry first. A study whose poll fails
    /// is reported and audited; the others go on, and its open tasks from
    /// earlier polls are still worked on.
    pub(crate) fn run_cycle(mut self) -> Result<CycleReport, AgentError> {
        let mut clock = Instant::now();
        let mut lap = |phases: &mut Vec<_>, name: &'static str| {
            phases.push((name, clock.elapsed()));
            clock = Instant::now();
        };
        let studies: &'a [StudyClient] = self.studies;
        for sc in studies {
            self.poll(sc)?;
        }
        lap(&mut self.report.phases, "poll");
        crashpoint::hit("ledger:merged");
        lap(&mut self.report.phases, "ledger");
        self.work()?;
        lap(&mut self.report.phases, "tasks");
        self.audit.sync()?;
        lap(&mut self.report.phases, "end");
        for sc in studies {
            let p = sc.client.pace().take_report();
            self.report.pace.busy += p.busy;
            self.report.pace.lowest = match self.report.pace.lowest {
                0 => p.lowest,
                l => l.min(p.lowest),
            };
        }
        crashpoint::hit("cycle:end");
        if self.poll_errors.len() == studies.len()
            && let Some((_, e)) = self.poll_errors.pop()
        {
            // (Every poll failed: the cycle failed, as with one study.)
            return Err(AgentError::Poll(e));
        }
        self.report.failed_polls = self
            .poll_errors
            .iter()
            .map(|(study, e)| (study.clone(), e.to_string(), e.exit_code()))
            .collect();
        Ok(self.report)
    }

    /// One study's `$requestTasks`, audited, its tasks merged into the
    /// ledger and its poll recorded.
    fn poll(&mut self, sc: &StudyClient) -> Result<(), AgentError> {
        let (study, target) = (sc.study.name.as_str(), sc.study.target.as_str());
        log::info!("polling $requestTasks for study {study}, target {target}");
        crashpoint::hit("poll:before");
        let prev = self.store.last_polls().get(study).cloned();
        let parsed = match sc.client.request_tasks(study, target) {
            Ok(a) => a,
            Err(e) => {
                let detail = e.to_string();
                let record = PollRecord {
                    study: study.to_string(),
                    at: Utc::now(),
                    ok: false,
                    tasks: 0,
                    detail: Some(detail.clone()),
                    last_ok: prev.as_ref().and_then(|p| p.last_ok),
                    failures: prev.as_ref().map_or(0, |p| p.failures) + 1,
                };
                // (Audited first, as every record the store takes.)
                // An unreadable answer is the gateway's fault, not the
                // network's: its own outcome, for the operators to see.
                let outcome = if e.is_protocol() {
                    Outcome::ProtocolError
                } else {
                    Outcome::Failed
                };
                if e.is_protocol() {
                    log::error!(
                        "the dispatcher's answer to $requestTasks for study {study} is not readable FHIR: tell its \
                         operators"
                    );
                } else {
                    log::error!("polling study {study} failed: {e}");
                }
                let mut rec = AuditRecord::new(AuditKind::Poll, outcome, target).in_study(study);
                rec.detail = Some(detail);
                self.audit.write(rec)?;
                self.audit.sync()?;
                self.store.put(Record::Poll(record))?;
                self.note_network(study, &e);
                self.poll_errors.push((study.to_string(), e));
                return Ok(());
            }
        };
        crashpoint::hit("poll:after");
        self.report.received += parsed.len();
        let mut rec = AuditRecord::new(AuditKind::Poll, Outcome::Ok, target).in_study(study);
        rec.tasks = Some(parsed.len());
        self.audit.write(rec)?;
        log::info!("received {} task(s) for study {study}", parsed.len());
        let received = parsed.len();
        self.merge(study, parsed)?;
        let now = Utc::now();
        self.buffer(Record::Poll(PollRecord {
            study: study.to_string(),
            at: now,
            ok: true,
            tasks: received,
            detail: None,
            last_ok: Some(now),
            failures: 0,
        }))?;
        Ok(())
    }

    /// Records newly seen tasks in the ledger; reports repeats of finished ones.
    fn merge(&mut self, study: &str, parsed: Vec<Result<Task, Rejected>>) -> Result<(), AgentError> {
        let now = Utc::now();
        let mut batch: Vec<Record> = Vec::new();
        // Keys seen in this answer, by a 64-bit keyed hash (a set of 100,000
        // keys would be 11 MB). Two keys colliding (about one answer in
        // 10^9 at 100,000 tasks) makes the second a "duplicate" this once:
        // the next poll hands it out again, under another hash key.
        let hasher = std::collections::hash_map::RandomState::new();
        let mut seen_now: std::collections::HashSet<u64> = Default::default();
        self.store.reserve_ledger(parsed.len());
        // (Taken from the front, the answer's buffer shrinking as it goes,
        // so that it and the ledger entries made of it are not held twice.)
        let mut parsed = std::collections::VecDeque::from(parsed);
        let mut taken = 0usize;
        while let Some(item) = parsed.pop_front() {
            taken += 1;
            if taken.is_multiple_of(MERGE_SLICE) {
                parsed.shrink_to_fit();
            }
            let (key, entry) = match item {
                Ok(task) => {
                    let own = task.key();
                    let key = ledger_key(study, &own);
                    let entry = LedgerEntry {
                        key: key.clone(),
                        kind: task.kind(),
                        display_id: task.display_id_of(&own),
                        expires: task.expires(),
                        task: Some(task),
                        status: Status::Pending,
                        outcome: Outcome::Received,
                        detail: None,
                        first_seen: now,
                        last_seen: now,
                        updated: now,
                        attempts: 0,
                    };
                    (key, entry)
                }
                Err(rej) => {
                    let kind = rej.name.parse().unwrap_or(TaskKind::Unknown);
                    let key = ledger_key(study, &rej.key);
                    let entry = LedgerEntry {
                        key: key.clone(),
                        kind,
                        display_id: rej.key.chars().take(19).collect(),
                        task: None,
                        status: Status::Rejected,
                        outcome: Outcome::Rejected,
                        detail: Some(rej.reason.clone()),
                        expires: None,
                        first_seen: now,
                        last_seen: now,
                        updated: now,
                        attempts: 0,
                    };
                    (key, entry)
                }
            };
            if !seen_now.insert(std::hash::BuildHasher::hash_one(&hasher, &key)) {
                self.outcome(
                    &entry,
                    Outcome::Duplicate,
                    entry.status,
                    Some("repeated within one answer".into()),
                    None,
                )?;
                continue;
            }
            match self.store.ledger(&key).cloned() {
                Some(mut old) if self.idat_changed_since_refusal(&old)? => {
                    // Refused for good with the data it had; the patient's
                    // data changed since, so the dispatcher may take it now.
                    old.status = Status::Pending;
                    old.outcome = Outcome::Reopened;
                    old.detail = Some("the patient's data changed since the dispatcher refused it".into());
                    old.last_seen = now;
                    old.updated = now;
                    self.outcome(&old, Outcome::Reopened, Status::Pending, old.detail.clone(), None)?;
                    batch.push(Record::Progress(Progress::of(&old)));
                }
                Some(old) if old.status.is_terminal() => {
                    self.outcome(
                        &old,
                        Outcome::Duplicate,
                        old.status,
                        Some(format!("already {}", old.status.as_str())),
                        None,
                    )?;
                }
                Some(mut old) => {
                    old.last_seen = now;
                    batch.push(Record::Progress(Progress::of(&old)));
                }
                None => {
                    if entry.status == Status::Rejected {
                        self.outcome(&entry, Outcome::Rejected, Status::Rejected, entry.detail.clone(), None)?;
                    }
                    batch.push(Record::Ledger(entry));
                }
            }
            // (Written a slice at a time: a copy of a whole re-keying's
            // entries on their way to the store would double its memory.
            // A task not yet written when the process dies is handed out
            // again by the next poll.)
            if batch.len() >= MERGE_SLICE {
                self.audit.write_out()?;
                self.store.write(std::mem::take(&mut batch))?;
            }
        }
        // (Rejected tasks' audit records before their ledger records.)
        self.audit.write_out()?;
        self.store.write(batch)?;
        Ok(())
    }

    fn work(&mut self) -> Result<(), AgentError> {
        // Decided by reference, sorted by expiry once: the items hold the
        // tasks' keys, and each entry is copied out of the ledger only when
        // its request is prepared (at 100,000 open tasks a copy of every
        // entry would double the cycle's memory).
        let now = Utc::now();
        let configured: Vec<&str> = self.studies.iter().map(|s| s.study.name.as_str()).collect();
        // (In the order they arrived, then sorted stably: tasks that expire
        // together are worked in that order, so a batch's marks and
        // outcomes rewrite neighbouring rows of the store.)
        let mut open: Vec<&LedgerEntry> = self.store.ledger_in_arrival_order();
        open.retain(|e| !e.status.is_terminal() && e.task.is_some());
        open.sort_by(|a, b| {
            (a.expires.is_none(), a.expires, a.first_seen).cmp(&(b.expires.is_none(), b.expires, b.first_seen))
        });
        let mut unconfigured = 0usize;
        let mut expired: Vec<String> = Vec::new();
        let mut gave_up: Vec<(String, String)> = Vec::new();
        let mut items: Vec<Work> = Vec::new();
        // repeat_requests by (study, target): a handful of groups at most.
        let mut groups: Vec<((String, String), Vec<KeyExpiry>)> = Vec::new();
        for e in open {
            // (Tasks of a study no longer configured wait, untouched, until
            // it is configured again or retention purges them.)
            if !configured.contains(&e.study()) {
                unconfigured += 1;
                continue;
            }
            if e.expires.is_some_and(|x| x <= now) {
                expired.push(e.key.clone());
                continue;
            }
            if let Some(why) = give_up(&self.cfg.dispatcher, e, now) {
                gave_up.push((e.key.clone(), why));
                continue;
            }
            if waits_out_backoff(e, now, self.cfg.dispatcher.retry_delay.0) {
                self.report.deferred += 1;
                continue;
            }
            let Some(Task::RepeatRequest { target, .. }) = &e.task else {
                items.push(Work::One(e.key.clone(), e.expires));
                continue;
            };
            // (Batches never mix studies: grouped by the study polled.)
            let (study, target) = (e.study(), target.value.as_deref().unwrap_or_default());
            let i = match groups.iter().position(|((s, t), _)| s == study && t == target) {
                Some(i) => i,
                None => {
                    groups.push(((study.to_string(), target.to_string()), Vec::new()));
                    groups.len() - 1
                }
            };
            groups[i].1.push((e.key.clone(), e.expires));
        }
        if unconfigured > 0 {
            log::warn!("{unconfigured} open task(s) belong to a study that is not configured; left as they are");
        }
        for key in expired {
            if let Some(mut done) = self.store.ledger(&key).cloned() {
                done.status = Status::Expired;
                self.finish(
                    done,
                    Outcome::Expired,
                    Some("expired before it could be done".into()),
                    None,
                )?;
            }
        }
        for (key, why) in gave_up {
            if let Some(mut done) = self.store.ledger(&key).cloned() {
                done.status = Status::Closed;
                log::warn!("[{} {}] gave up: {why}", done.kind.as_str(), done.display_id);
                self.finish(done, Outcome::GaveUp, Some(why), None)?;
            }
        }
        groups.sort_by(|a, b| a.0.cmp(&b.0));
        let size = self.cfg.dispatcher.batch_size.0;
        for ((study, target), keys) in groups {
            let mut rest = keys.into_iter().peekable();
            while rest.peek().is_some() {
                let keys: Vec<KeyExpiry> = rest.by_ref().take(size).collect();
                items.push(Work::Batch {
                    study: study.clone(),
                    target: target.clone(),
                    expires: keys.iter().filter_map(|(_, x)| *x).min(),
                    keys: keys.into_iter().map(|(k, _)| k).collect(),
                });
            }
        }
        items.sort_by_key(|w| (w.expires().is_none(), w.expires()));
        // (Counted in tasks, as it is ticked.)
        let total = items.iter().map(Work::len).sum();
        let mut progress = crate::progress::Progress::new("tasks", Some(total));
        if !self.fly(items, &mut progress)? {
            log::info!("stop requested: leaving the remaining tasks for the next run");
        }
        progress.finish();
        self.flush()
    }

    /// A send_idat refused for good whose patient's IDAT changed since.
    fn idat_changed_since_refusal(&self, e: &LedgerEntry) -> Result<bool, AgentError> {
        if e.status != Status::Closed || e.outcome != Outcome::DispatcherError {
            return Ok(false);
        }
        let Some(Task::SendIdat {
            pseudonym, bloomfilter, ..
        }) = &e.task
        else {
            return Ok(false);
        };
        let patient = self
            .store
            .find_patient(e.study(), pseudonym.as_ref(), bloomfilter.as_ref())?;
        Ok(patient.is_some_and(|p| p.updated > e.updated))
    }

    fn dic_psn_available(
        &mut self,
        sc: &StudyClient,
        e: LedgerEntry,
        bf: BloomFilter,
        psn: Pseudonym,
    ) -> Result<(), AgentError> {
        let patient = self
            .save_pseudonym(&bf, &sc.study, psn, &e.key)?
            .map(|id| id.fingerprint());
        let mut done = e;
        match patient {
            Some(fp) => {
                done.status = Status::Resolved;
                self.finish(done, Outcome::Stored, None, Some(fp))
            }
            None => {
                // The pseudonym is kept under its Bloom filter; an import of
                // the patient later links it. The task stays open so the
                // next cycle reports it again until then.
                done.status = Status::Pending;
                self.finish(
                    done,
                    Outcome::UnknownPatient,
                    Some("no local patient has this Bloom filter; pseudonym kept".into()),
                    None,
                )
            }
        }
    }

    /// Stores a pseudonym under its Bloom filter; returns the local patient
    /// with that filter, if any (looked up once, for the caller too).
    fn save_pseudonym(
        &mut self,
        bf: &BloomFilter,
        study: &crate::config::Study,
        psn: Pseudonym,
        source: &str,
    ) -> Result<Option<LocalId>, AgentError> {
        let (patient, known) = self.store.patient_and_pseudonym(bf, &study.name)?;
        self.save_known_pseudonym(bf, study, psn, source, patient, known)
    }

    /// `save_pseudonym` with the patient and the pseudonym stored for the
    /// filter already looked up (a batch's, at once).
    fn save_known_pseudonym(
        &mut self,
        bf: &BloomFilter,
        study: &crate::config::Study,
        psn: Pseudonym,
        source: &str,
        patient: Option<LocalId>,
        known: Option<PseudonymRecord>,
    ) -> Result<Option<LocalId>, AgentError> {
        if known.is_some_and(|p| p.pseudonym == psn) {
            return Ok(patient);
        }
        self.buffer(Record::Pseudonym(PseudonymRecord {
            bloomfilter: bf.clone(),
            study: study.name.clone(),
            target: study.target.clone(),
            pseudonym: psn,
            received: Utc::now(),
            source: source.to_string(),
        }))?;
        // A patient `enroll` left in clearing: the clearing has ended.
        if let Some(id) = &patient
            && self
                .store
                .enrolment(id, &study.name, Some(bf))?
                .is_some_and(|e| e.same_filter && e.status == EnrolmentStatus::Clearing)
        {
            self.buffer(Record::Enrolment(EnrolmentRecord {
                local_id: id.clone(),
                study: study.name.clone(),
                bloomfilter: bf.clone(),
                status: EnrolmentStatus::Enrolled,
                detail: Some("after clearing".into()),
                updated: Utc::now(),
            }))?;
        }
        Ok(patient)
    }

    /// At-least-once: an earlier attempt got no answer (a crash, timeout or
    /// reset after the request left), and the dispatcher no longer knowing
    /// the task means that attempt arrived.
    fn delivered(&mut self, mut done: LedgerEntry, missing: &[IdatElement], fp: String) -> Result<(), AgentError> {
        done.status = Status::Resolved;
        let detail = Some("delivered by an interrupted earlier attempt; the dispatcher reports the task done".into());
        let mut rec = self.record_for(&done, Outcome::Delivered, detail, Some(fp));
        rec.missing = missing.iter().map(|e| e.code().to_string()).collect();
        self.commit(done, Outcome::Delivered, rec)
    }

    fn note_network(&mut self, study: &str, err: &ClientError) {
        if err.is_unreachable() || err.is_auth() {
            self.network_down.insert(study.to_string(), skipped_after(err));
        }
    }

    fn record_for(
        &self,
        e: &LedgerEntry,
        outcome: Outcome,
        detail: Option<String>,
        patient: Option<String>,
    ) -> AuditRecord {
        let target = self.study_of(e).map_or("", |s| s.study.target.as_str());
        let mut rec = AuditRecord::new(e.kind, outcome, target);
        if !e.study().is_empty() {
            rec.study = Some(e.study().to_string());
        }
        rec.task = Some(e.display_id.clone());
        rec.status = Some(e.status.as_str().to_string());
        rec.expires = e.expires.map(ts);
        rec.patient = patient;
        rec.bloomfilter = match &e.task {
            Some(Task::DicPsnAvailable { bloomfilter, .. } | Task::RepeatRequest { bloomfilter, .. }) => {
                Some(bloomfilter.fingerprint())
            }
            Some(Task::SendIdat { bloomfilter, .. }) => bloomfilter.as_ref().map(BloomFilter::fingerprint),
            None => None,
        };
        if let Some(Task::SendIdat { elements, .. }) = &e.task {
            rec.elements = elements.iter().map(|x| x.code().to_string()).collect();
        }
        rec.detail = detail;
        rec
    }

    /// Records an outcome in the ledger (if it changed) and the audit log.
    fn finish(
        &mut self,
        e: LedgerEntry,
        outcome: Outcome,
        detail: Option<String>,
        patient: Option<String>,
    ) -> Result<(), AgentError> {
        let rec = self.record_for(&e, outcome, detail, patient);
        self.commit(e, outcome, rec)
    }

    fn commit(&mut self, mut e: LedgerEntry, outcome: Outcome, rec: AuditRecord) -> Result<(), AgentError> {
        let old = self.store.ledger(&e.key);
        let changed =
            old.is_none_or(|old| old.status != e.status || old.outcome != outcome || old.detail != rec.detail);
        let known = old.is_some();
        e.outcome = outcome;
        e.detail = rec.detail.clone();
        e.updated = Utc::now();
        // The audit record first: the store record waits for it (`buffer`).
        self.audit.write(rec)?;
        if changed {
            // Once recorded, a task's content never changes: only its progress is written.
            let record = if known {
                Record::Progress(Progress::of(&e))
            } else {
                Record::Ledger(e.clone())
            };
            self.buffer(record)?;
        }
        log_outcome(&e, outcome, e.detail.as_deref(), self.report.received > QUIET_ABOVE);
        self.report.add(TaskOutcome {
            kind: e.kind,
            task: e.display_id,
            outcome,
            status: e.status,
            detail: e.detail,
        });
        Ok(())
    }

    /// A duplicate: audit and report only, the ledger entry is unchanged.
    fn outcome(
        &mut self,
        e: &LedgerEntry,
        outcome: Outcome,
        status: Status,
        detail: Option<String>,
        patient: Option<String>,
    ) -> Result<(), AgentError> {
        let mut rec = self.record_for(e, outcome, detail, patient);
        rec.status = Some(status.as_str().to_string());
        let detail = rec.detail.clone();
        self.audit.write(rec)?;
        log_outcome(e, outcome, detail.as_deref(), self.report.received > QUIET_ABOVE);
        self.report.add(TaskOutcome {
            kind: e.kind,
            task: e.display_id.clone(),
            outcome,
            // A duplicate of a finished task is itself finished.
            status: if status.is_terminal() { status } else { Status::Resolved },
            detail,
        });
        Ok(())
    }
}

/// Per-task log context: `[kind id] outcome: detail`; problems as warnings.
/// In a cycle with more tasks than this, successful outcomes are logged at
/// debug level (the audit log has every one, and the summary counts them):
/// a re-keying of 100,000 tasks should not write 100,000 lines to journald.
const QUIET_ABOVE: usize = 1000;

/// One task's outcome, at debug for a condition that can repeat every
/// cycle (a failure, a rejection, a patient not found, a duplicate): those
/// get one summary line per condition at the end of the cycle
/// (`CycleReport::conditions`), so that 6,000 unknown patients are one
/// warning, not 6,000 every cycle.
fn log_outcome(e: &LedgerEntry, outcome: Outcome, detail: Option<&str>, quiet: bool) {
    let level = if is_condition(e.status, outcome) || quiet {
        log::Level::Debug
    } else {
        log::Level::Info
    };
    // (Nothing is formatted for a line that is not logged.)
    if log::log_enabled!(level) {
        let detail = detail.map(|d| format!(": {d}")).unwrap_or_default();
        log::log!(level, "[{} {}] {outcome}{detail}", e.kind, e.display_id);
    }
}

/// A task outcome that is summarised per cycle, not logged per task.
pub(crate) fn is_condition(status: Status, outcome: Outcome) -> bool {
    matches!(status, Status::Failed | Status::Rejected)
        || matches!(outcome, Outcome::UnknownPatient | Outcome::Duplicate)
}

/// The monotonic instant of a wall-clock expiry, for retry deadlines.
fn deadline(expires: Option<DateTime<Utc>>) -> Option<Instant> {
    let left = (expires? - Utc::now()).to_std().ok()?;
    Some(Instant::now() + left)
}
