//! The requests of a cycle's tasks, up to `[dispatcher] max_in_flight` at
//! once: `send_idat` (one `$providePatientData` each) and batches of
//! `repeat_request`s (one `$requestPsnFromBfWorkflow` for many filters).
//!
//! - This thread takes the tasks in expiry order, prepares each request,
//!   marks its tasks in flight (committed to the store with the outcomes
//!   recorded since: on disk when the write returns), hands it to the
//!   network threads, and records the answers as they come back, each
//!   outcome in the audit log before the store.
//! - `max_in_flight` network threads send what they are handed, in the
//!   order handed, and read the answers.
//!
//! A request never leaves before its in-flight marks are on disk; a
//! request is handed over only while fewer than the dispatcher's pace
//! allows are out (`pace`: halved on 429/503/timeouts, held back by a
//! `Retry-After`), and never more than `max_in_flight` in all. A crash
//! leaves at most that many requests' tasks in flight; they are sent again
//! on the next run, like any task in flight (at-least-once: the dispatcher
//! answers a consumed send_idat with 404/409/410, and a repeated
//! `repeat_request` is harmless).

use super::*;
use crate::client::Delivery;
use crate::fhir::Resource;
use crate::progress::Progress as Meter;
use crate::types::TaskId;
use crate::vocab::Outcome;
use std::collections::HashMap;
use std::sync::{Mutex, mpsc};

/// A batch of `repeat_request`s for one study and target, sent together.
pub(super) struct Batch {
    pub(super) study: String,
    pub(super) target: String,
    pub(super) entries: Vec<LedgerEntry>,
}

/// One `$providePatientData`, prepared: the task (marked in flight) and
/// the Patient with exactly the elements requested that are on file.
pub(super) struct SendJob {
    study: String,
    entry: LedgerEntry,
    task_id: TaskId,
    /// Taken by the network thread.
    patient: Option<Resource>,
    /// The IDAT values sent: an error echoing them is redacted.
    secrets: Vec<String>,
    missing: Vec<IdatElement>,
    /// The local patient's fingerprint.
    fp: String,
    /// It was in flight already (an earlier attempt may have arrived).
    resend: bool,
}

/// A request on its way, with its tasks' status from before the mark
/// (for one that is not sent after all).
enum Flight {
    Batch { batch: Batch, prior: Vec<Status> },
    Send { job: Box<SendJob>, prior: Vec<Status> },
}

/// A flight handed to the network threads with its turn to start.
struct Handed {
    flight: Flight,
    turn: u64,
}

impl Flight {
    fn study(&self) -> &str {
        match self {
            Flight::Batch { batch, .. } => &batch.study,
            Flight::Send { job, .. } => &job.study,
        }
    }

    fn entries_mut(&mut self) -> (&mut [LedgerEntry], &mut Vec<Status>) {
        match self {
            Flight::Batch { batch, prior } => (&mut batch.entries, prior),
            Flight::Send { job, prior } => (std::slice::from_mut(&mut job.entry), prior),
        }
    }

    /// Marks its tasks in flight (in memory).
    fn mark(&mut self) {
        let (entries, prior) = self.entries_mut();
        *prior = mark_in_flight(entries);
    }

    fn entries(&self) -> &[LedgerEntry] {
        match self {
            Flight::Batch { batch, .. } => &batch.entries,
            Flight::Send { job, .. } => std::slice::from_ref(&job.entry),
        }
    }

    /// Sends it and reads the answer (on a network thread).
    fn send(&mut self, client: &Client, target: &str, quiet: bool) -> Answer {
        match self {
            Flight::Batch { batch, .. } => Answer::Psn(send_batch(client, batch, quiet)),
            Flight::Send { job, .. } => {
                let deadline = deadline(job.entry.expires);
                let secrets: Vec<&str> = job.secrets.iter().map(String::as_str).collect();
                let patient = job.patient.take().unwrap_or_else(|| Resource::new("Patient"));
                crashpoint::hit("send:before");
                let result = client.provide_patient_data(&job.task_id, target, patient, &secrets, deadline);
                crashpoint::hit("send:after");
                Answer::Delivery(result)
            }
        }
    }
}

/// What became of a flight.
enum Answer {
    /// A batch sent; its answer.
    Psn(Result<PsnAnswers, ClientError>),
    /// A send_idat sent; its answer.
    Delivery(Result<Delivery, ClientError>),
    /// Not sent: a stop was requested meanwhile.
    Halted,
    /// Not sent: an earlier request found the dispatcher unreachable (or
    /// the key refused); the reason.
    Down(String),
}

impl Answer {
    fn error(&self) -> Option<&ClientError> {
        match self {
            Answer::Psn(Err(e)) | Answer::Delivery(Err(e)) => Some(e),
            _ => None,
        }
    }
}

/// Marks entries in flight (in memory); returns each one's status from before.
pub(super) fn mark_in_flight(entries: &mut [LedgerEntry]) -> Vec<Status> {
    let now = Utc::now();
    let prior = entries.iter().map(|e| e.status).collect();
    for e in entries.iter_mut() {
        e.status = Status::InFlight;
        e.attempts += 1;
        e.updated = now;
    }
    prior
}

/// Undoes in-flight marks for a request that was not sent after all.
fn unmark(entries: &mut [LedgerEntry], prior: &[Status]) {
    for (e, status) in entries.iter_mut().zip(prior) {
        e.status = *status;
        e.attempts = e.attempts.saturating_sub(1);
    }
}

/// Why a network task is left for later after `err`.
pub(super) fn skipped_after(err: &ClientError) -> String {
    format!("skipped after an earlier failure this cycle: {err}")
}

/// Sends one batch's Bloom filters and reads the answer (network thread).
fn send_batch(client: &Client, batch: &Batch, quiet: bool) -> Result<PsnAnswers, ClientError> {
    let Batch { study, target, entries } = batch;
    let bfs: Vec<&BloomFilter> = entries
        .iter()
        .filter_map(|e| match &e.task {
            Some(Task::RepeatRequest { bloomfilter, .. }) => Some(bloomfilter),
            _ => None,
        })
        .collect();
    let deadline = deadline(entries.iter().filter_map(|e| e.expires).min());
    if quiet {
        log::debug!("[repeat_request] sending {} Bloom filter(s) in one call", bfs.len());
    } else {
        log::info!("[repeat_request] sending {} Bloom filter(s) in one call", bfs.len());
    }
    crashpoint::hit("batch:before");
    let result = client
        .request_psn_from_bf(study, target, &bfs, deadline)
        .map(|a| PsnAnswers::from_parameters(&a));
    crashpoint::hit("batch:after");
    result
}

/// Requests handed over beyond those being sent: their marks are on disk
/// and they start as soon as the pace allows, so the network never waits
/// for this thread's bookkeeping; the next group is marked in one
/// transaction once `ahead` have come back (fewer, larger transactions:
/// four times as many as are sent at once measured a tenth faster than
/// twice, at 100,000 tasks). With `max_in_flight = 1`: three out at most,
/// one marked at a time, the pipeline of the releases before concurrency.
fn ahead(threads: usize) -> usize {
    if threads == 1 { 2 } else { 4 * threads }
}

/// The network threads' side: what they are handed, and what they hand back.
struct Lines<'s> {
    to_net: mpsc::Sender<Handed>,
    answers: mpsc::Receiver<(Flight, Answer)>,
    /// Requests out (handed over, answer not yet recorded), by study.
    out: BTreeMap<String, usize>,
    /// At most this many out in all.
    max: usize,
    /// The next group is marked once no more than this many are out.
    refill: usize,
    _scope: std::marker::PhantomData<&'s ()>,
}

impl Lines<'_> {
    fn total(&self) -> usize {
        self.out.values().sum()
    }
}

impl Agent<'_> {
    /// Works on the cycle's items in order (see the module's comment):
    /// local tasks at once, requests through the network threads. Returns
    /// false if a stop was requested: what was not sent is left as it was.
    pub(super) fn fly(&mut self, items: Vec<Work>, meter: &mut Meter) -> Result<bool, AgentError> {
        let studies: &[StudyClient] = self.studies;
        let quiet = self.report.received > QUIET_ABOVE;
        let stop = self.stop.clone();
        let threads = studies.iter().map(|s| s.client.pace().max()).max().unwrap_or(1);
        // (Per study: one study's dispatcher down leaves the others.)
        let down: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());
        let (to_net, net_in) = mpsc::channel::<Handed>();
        let net_in = Mutex::new(net_in);
        let (answer_out, answers) = mpsc::channel::<(Flight, Answer)>();
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let (net_in, answer_out, down, stop) = (&net_in, answer_out.clone(), &down, stop.clone());
                scope.spawn(move || {
                    loop {
                        let next = crate::lock(net_in).recv();
                        let Ok(Handed { mut flight, turn }) = next else { break };
                        let study = flight.study().to_string();
                        let stopping = || stop.as_ref().is_some_and(Shutdown::requested);
                        let answer = match studies.iter().find(|s| s.study.name == study) {
                            // (Handed over only for a configured study.)
                            None => Answer::Down(format!("study {study} is not configured")),
                            Some(sc) => {
                                let pace = sc.client.pace();
                                // In turn, as the pace allows; checked again
                                // once started: the dispatcher may have gone
                                // down or a stop come while this one waited.
                                let known = crate::lock(down).get(&study).cloned();
                                let go = pace.start(turn, known.is_none(), stopping);
                                let known = known.or_else(|| crate::lock(down).get(&study).cloned());
                                let answer = match (go, known) {
                                    (false, Some(reason)) => Answer::Down(reason),
                                    (false, None) => Answer::Halted,
                                    (true, Some(reason)) => Answer::Down(reason),
                                    (true, None) => flight.send(&sc.client, &sc.study.target, quiet),
                                };
                                if go {
                                    pace.finished();
                                }
                                if let Some(err) = answer.error()
                                    && (err.is_unreachable() || err.is_auth())
                                {
                                    crate::lock(down).insert(study, skipped_after(err));
                                }
                                answer
                            }
                        };
                        if answer_out.send((flight, answer)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(answer_out);
            let mut lines = Lines {
                to_net,
                answers,
                out: BTreeMap::new(),
                max: threads + ahead(threads),
                refill: ahead(threads),
                _scope: std::marker::PhantomData,
            };
            let fed = self.feed(items, meter, &mut lines);
            let Lines {
                to_net, answers, out, ..
            } = lines;
            drop(to_net);
            // Whatever is out is recorded, also after a failure above (as
            // far as the store and audit log let it be).
            for _ in 0..out.values().sum::<usize>() {
                let Ok((flight, answer)) = answers.recv() else { break };
                self.record_flight(flight, answer)?;
            }
            fed
        })
    }

    fn feed(&mut self, items: Vec<Work>, meter: &mut Meter, lines: &mut Lines<'_>) -> Result<bool, AgentError> {
        let mut items = items.into_iter();
        let mut group: Vec<Flight> = Vec::new();
        let mut exhausted = false;
        loop {
            // As many as there is room for, their marks in one transaction:
            // the store writes a page the group's tasks share once, not once
            // a request.
            let room = lines.max.saturating_sub(lines.total());
            while group.len() < room && !exhausted {
                if self.stop.as_ref().is_some_and(Shutdown::requested) {
                    // (Prepared, not marked: left as they are.)
                    return Ok(false);
                }
                match items.next() {
                    None => exhausted = true,
                    Some(item) => group.extend(self.take_flight(item, meter)?),
                }
            }
            if group.is_empty() && exhausted {
                return Ok(true);
            }
            if !group.is_empty() {
                // The marks are on disk before the requests may leave.
                for flight in &mut group {
                    flight.mark();
                }
                let mut records = self.audited()?;
                for flight in &group {
                    records.extend(flight.entries().iter().map(|e| Record::Progress(Progress::of(e))));
                }
                self.store.write(records)?;
                for flight in group.drain(..) {
                    let study = flight.study().to_string();
                    let turn = self.study_of_name(&study).map_or(0, |sc| sc.client.pace().take_turn());
                    if lines.to_net.send(Handed { flight, turn }).is_err() {
                        return Ok(true);
                    }
                    *lines.out.entry(study).or_insert(0) += 1;
                }
            }
            // The next group once this many are left out.
            while lines.total() > lines.refill {
                // (Network threads gone: the scope passes their panic on.)
                let Ok((flight, answer)) = lines.answers.recv() else {
                    return Ok(true);
                };
                Self::took(lines, &flight);
                self.record_flight(flight, answer)?;
            }
            while let Ok((flight, answer)) = lines.answers.try_recv() {
                Self::took(lines, &flight);
                self.record_flight(flight, answer)?;
            }
        }
    }

    /// The request an item needs, if any; a task done here and now (a
    /// pseudonym to store, a patient not known) is recorded instead.
    fn take_flight(&mut self, item: Work, meter: &mut Meter) -> Result<Option<Flight>, AgentError> {
        Ok(match item {
            Work::One(key, _) => {
                meter.tick(1);
                // (Gone from the ledger: nothing to do.)
                let Some(e) = self.store.ledger(&key).cloned() else {
                    return Ok(None);
                };
                let Some(sc) = self.study_of(&e) else { return Ok(None) };
                match e.task.clone() {
                    Some(Task::DicPsnAvailable {
                        bloomfilter, pseudonym, ..
                    }) => {
                        self.dic_psn_available(sc, e, bloomfilter, pseudonym)?;
                        None
                    }
                    Some(Task::SendIdat {
                        pseudonym,
                        bloomfilter,
                        elements,
                        task_id,
                        ..
                    }) => self
                        .prepare_send(sc, e, task_id, pseudonym, bloomfilter, &elements)?
                        .map(|job| Flight::Send {
                            job: Box::new(job),
                            prior: Vec::new(),
                        }),
                    _ => None,
                }
            }
            Work::Batch {
                study, target, keys, ..
            } => {
                meter.tick(keys.len());
                let entries: Vec<LedgerEntry> = keys.iter().filter_map(|k| self.store.ledger(k).cloned()).collect();
                match self.network_down.get(&study).cloned() {
                    _ if entries.is_empty() => None,
                    Some(reason) => {
                        for e in entries {
                            self.finish(e, Outcome::NotAttempted, Some(reason.clone()), None)?;
                        }
                        None
                    }
                    None => Some(Flight::Batch {
                        batch: Batch { study, target, entries },
                        prior: Vec::new(),
                    }),
                }
            }
        })
    }

    /// Counts an answered flight off.
    fn took(lines: &mut Lines<'_>, flight: &Flight) {
        if let Some(n) = lines.out.get_mut(flight.study()) {
            *n = n.saturating_sub(1);
        }
    }

    fn study_of_name(&self, name: &str) -> Option<&StudyClient> {
        self.studies.iter().find(|s| s.study.name == name)
    }

    /// Prepares a send_idat's request, or records why there is none: the
    /// patient is not known, none of the elements is on file, or the
    /// study's dispatcher is down this cycle.
    fn prepare_send(
        &mut self,
        sc: &StudyClient,
        e: LedgerEntry,
        task_id: TaskId,
        pseudonym: Option<Pseudonym>,
        bloomfilter: Option<BloomFilter>,
        elements: &[IdatElement],
    ) -> Result<Option<SendJob>, AgentError> {
        let Some(patient) = self
            .store
            .find_patient(&sc.study.name, pseudonym.as_ref(), bloomfilter.as_ref())?
        else {
            let mut done = e;
            done.status = Status::Pending;
            self.finish(
                done,
                Outcome::UnknownPatient,
                Some("no local patient has this pseudonym or Bloom filter".into()),
                None,
            )?;
            return Ok(None);
        };
        let fp = patient.local_id.fingerprint();
        if let Some(reason) = self.network_down.get(&sc.study.name).cloned() {
            self.finish(e, Outcome::NotAttempted, Some(reason), Some(fp))?;
            return Ok(None);
        }
        let resend = e.status == Status::InFlight;
        let (resource, missing) = patient.idat.to_patient(elements);
        if missing.len() == elements.len() {
            // An empty Patient tells the fTTP nothing and would end the
            // task: it waits for the data instead, as for an unknown patient.
            let mut done = e;
            done.status = Status::Pending;
            log::warn!(
                "[send_idat {}] none of the {} requested element(s) is on file for patient {fp}: import them",
                done.display_id,
                elements.len()
            );
            self.finish(
                done,
                Outcome::UnknownPatient,
                Some(format!("none of the {} requested element(s) on file", elements.len())),
                Some(fp),
            )?;
            return Ok(None);
        }
        Ok(Some(SendJob {
            study: sc.study.name.clone(),
            secrets: patient.idat.values().map(str::to_string).collect(),
            entry: e,
            task_id,
            patient: Some(resource),
            missing,
            fp,
            resend,
        }))
    }

    /// Records what became of a flight.
    fn record_flight(&mut self, flight: Flight, answer: Answer) -> Result<(), AgentError> {
        if let Some(err) = answer.error() {
            self.note_network(flight.study(), err);
        }
        match (flight, answer) {
            (Flight::Batch { batch, .. }, Answer::Psn(result)) => {
                self.record_answer(&batch.study, batch.entries, result)
            }
            (Flight::Send { job, .. }, Answer::Delivery(result)) => self.record_send(*job, result),
            (mut flight, Answer::Halted) => {
                let (entries, prior) = flight.entries_mut();
                unmark(entries, prior);
                for e in flight.entries() {
                    self.buffer(Record::Progress(Progress::of(e)))?;
                }
                Ok(())
            }
            (mut flight, Answer::Down(reason)) => {
                let (entries, prior) = flight.entries_mut();
                unmark(entries, prior);
                let (entries, fp) = match flight {
                    Flight::Batch { batch, .. } => (batch.entries, None),
                    Flight::Send { job, .. } => (vec![job.entry], Some(job.fp)),
                };
                for e in entries {
                    self.finish(e, Outcome::NotAttempted, Some(reason.clone()), fp.clone())?;
                }
                Ok(())
            }
            // (A batch is answered as a batch, a send as a send.)
            (_, Answer::Psn(_) | Answer::Delivery(_)) => Ok(()),
        }
    }

    /// Records the answer to a send_idat.
    fn record_send(&mut self, job: SendJob, result: Result<Delivery, ClientError>) -> Result<(), AgentError> {
        let SendJob {
            entry: mut done,
            missing,
            fp,
            resend,
            ..
        } = job;
        match result {
            Ok(Delivery::Accepted) => {
                done.status = Status::Resolved;
                let detail =
                    (!missing.is_empty()).then(|| format!("{} requested element(s) not on file", missing.len()));
                let mut rec = self.record_for(&done, Outcome::Sent, detail, Some(fp));
                rec.missing = missing.iter().map(|e| e.code().to_string()).collect();
                self.commit(done, Outcome::Sent, rec)
            }
            Ok(Delivery::ByEarlierAttempt) => self.delivered(done, &missing, fp),
            Err(err) if resend && err.task_unknown() => self.delivered(done, &missing, fp),
            Err(err) if err.is_final_refusal() => {
                // Sent unchanged, it would be refused again every cycle:
                // closed, reopened only if the patient's IDAT changes.
                done.status = Status::Closed;
                log::warn!(
                    "[send_idat {}] refused for good: {err}; sent again only if the patient's data change",
                    done.display_id
                );
                self.finish(done, Outcome::DispatcherError, Some(err.to_string()), Some(fp))
            }
            Err(err) => {
                // A transport failure may have happened after the dispatcher
                // got the request: its fate is unknown, so it stays in flight.
                done.status = if err.is_unreachable() {
                    Status::InFlight
                } else {
                    Status::Failed
                };
                self.finish(done, Outcome::Failed, Some(err.to_string()), Some(fp))
            }
        }
    }

    /// Records the outcome of each task of an answered batch.
    fn record_answer(
        &mut self,
        study: &str,
        flights: Vec<LedgerEntry>,
        result: Result<PsnAnswers, ClientError>,
    ) -> Result<(), AgentError> {
        let Some(sc) = self.studies.iter().find(|s| s.study.name == study) else {
            return Ok(());
        };
        let answers = match result {
            Ok(a) => a,
            Err(err) => {
                for mut e in flights {
                    e.status = Status::Failed;
                    self.finish(e, Outcome::Failed, Some(err.to_string()), None)?;
                }
                return Ok(());
            }
        };
        let PsnAnswers {
            pseudonyms: mut psns,
            errors,
            batch_error,
            malformed,
        } = answers;
        if malformed > 0 {
            log::warn!("[repeat_request] ignoring {malformed} malformed part(s) of the answer");
        }
        // The patients and stored pseudonyms of the filters answered with a
        // pseudonym, looked up together.
        let answered: Vec<&BloomFilter> = flights
            .iter()
            .filter_map(|e| match &e.task {
                Some(Task::RepeatRequest { bloomfilter, .. }) if psns.contains_key(bloomfilter) => Some(bloomfilter),
                _ => None,
            })
            .collect();
        let found = self.store.patients_and_pseudonyms(&answered, &sc.study.name)?;
        let mut found: HashMap<BloomFilter, crate::store::Found> = answered.into_iter().cloned().zip(found).collect();
        for mut e in flights {
            // (Only the filter is needed: no copy of the whole task.)
            let Some(Task::RepeatRequest { bloomfilter, .. }) = &e.task else {
                continue;
            };
            let bloomfilter = bloomfilter.clone();
            if let Some(code) = &batch_error {
                let (status, outcome) = super::error_verdict(code, &e.display_id);
                e.status = status;
                self.finish(e, outcome, Some(format!("whole batch refused: {code}")), None)?;
            } else if let Some(psn) = psns.remove(&bloomfilter) {
                let (patient, known) = found.remove(&bloomfilter).unwrap_or_default();
                let fp = self
                    .save_known_pseudonym(&bloomfilter, &sc.study, psn, &e.key, patient, known)?
                    .map(|id| id.fingerprint());
                let detail = fp
                    .is_none()
                    .then(|| "no local patient has this Bloom filter; pseudonym kept".to_string());
                e.status = Status::Resolved;
                self.finish(e, Outcome::Stored, detail, fp)?;
            } else if let Some(code) = errors.get(&bloomfilter) {
                let (status, outcome) = super::error_verdict(code, &e.display_id);
                e.status = status;
                self.finish(e, outcome, Some(format!("error code {code}")), None)?;
            } else {
                // Nothing for the filter: it went to clearing, and the
                // pseudonym comes as a dic_psn_available task. Sending it
                // again could start another clearing.
                e.status = Status::Resolved;
                self.finish(
                    e,
                    Outcome::Clearing,
                    Some("in clearing at the fTTP: the pseudonym follows as a dic_psn_available task".into()),
                    None,
                )?;
            }
        }
        Ok(())
    }
}
