//! `repeat_request`s in batches (one request for many Bloom filters), run
//! as a pipeline of two threads so that the bookkeeping and the network
//! overlap instead of taking turns:
//!
//! - this thread marks each batch in flight (committed to the store with
//!   the outcomes recorded since: on disk when the write returns), then
//!   clears it to go, and records the answers as they come back;
//! - a network thread sends the cleared batches in order, one at a time,
//!   and reads each answer.
//!
//! A request never leaves before its in-flight marks are on disk. At most
//! `AHEAD` batches are marked and not yet recorded, so a crash leaves at
//! most that many in flight; they are sent again on the next run, like
//! any task in flight (a repeated `repeat_request` is harmless).

use super::*;
use crate::progress::Progress as Meter;
use std::sync::mpsc;

/// Batches marked in flight whose answers are not yet recorded: enough
/// that the network thread always finds the next batch cleared to go.
const AHEAD: usize = 3;

/// A batch of `repeat_request`s for one study and target, sent together.
pub(super) struct Batch {
    pub(super) study: String,
    pub(super) target: String,
    pub(super) entries: Vec<LedgerEntry>,
}

/// A batch marked in flight, on its way through the pipeline.
struct Job {
    batch: Batch,
    /// Each entry's status before it was marked, for a batch that is not
    /// sent after all.
    prior: Vec<Status>,
}

/// What became of a job.
enum Sent {
    /// Sent; the answer, read on the network thread.
    Answer(Result<PsnAnswers, ClientError>),
    /// Not sent: a stop was requested meanwhile.
    Halted,
    /// Not sent: an earlier batch found the dispatcher unreachable (or the
    /// key refused); the reason.
    Down(String),
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

/// Undoes in-flight marks for a batch that was not sent after all.
fn unmark(mut entries: Vec<LedgerEntry>, prior: Vec<Status>) -> Vec<LedgerEntry> {
    for (e, status) in entries.iter_mut().zip(prior) {
        e.status = status;
        e.attempts = e.attempts.saturating_sub(1);
    }
    entries
}

/// Why a network task is left for later after `err`.
pub(super) fn skipped_after(err: &ClientError) -> String {
    format!("skipped after an earlier failure this cycle: {err}")
}

/// Sends one job's Bloom filters and reads the answer (network thread).
fn send(client: &Client, job: &Job, quiet: bool) -> Result<PsnAnswers, ClientError> {
    let Batch { study, target, entries } = &job.batch;
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

impl Agent<'_> {
    /// Sends the batches in order and records each one's outcomes (see the
    /// module's comment). Returns false if a stop was requested before all
    /// were sent: the batches not sent are left as they were.
    pub(super) fn repeat_requests(&mut self, batches: Vec<Batch>, meter: &mut Meter) -> Result<bool, AgentError> {
        let studies: &[StudyClient] = self.studies;
        let quiet = self.report.received > QUIET_ABOVE;
        let stop = self.stop.clone();
        std::thread::scope(|scope| {
            let (to_net, net_in) = mpsc::channel::<Job>();
            let (answer_out, answers) = mpsc::channel::<(Job, Sent)>();
            scope.spawn(move || {
                // (Per study: one study's dispatcher down leaves the others.)
                let mut down: BTreeMap<String, String> = BTreeMap::new();
                for job in net_in {
                    let client = studies.iter().find(|s| s.study.name == job.batch.study);
                    let sent = if stop.as_ref().is_some_and(Shutdown::requested) {
                        Sent::Halted
                    } else if let Some(reason) = down.get(&job.batch.study) {
                        Sent::Down(reason.clone())
                    } else if let Some(sc) = client {
                        let result = send(&sc.client, &job, quiet);
                        if let Err(err) = &result
                            && (err.is_unreachable() || err.is_auth())
                        {
                            down.insert(job.batch.study.clone(), skipped_after(err));
                        }
                        Sent::Answer(result)
                    } else {
                        Sent::Down(format!("study {} is not configured", job.batch.study))
                    };
                    if answer_out.send((job, sent)).is_err() {
                        break;
                    }
                }
            });
            // Jobs marked whose answers are not yet recorded.
            let mut out = 0usize;
            let feed = |me: &mut Self, out: &mut usize| -> Result<bool, AgentError> {
                'feed: for mut batch in batches {
                    if me.stop.as_ref().is_some_and(Shutdown::requested) {
                        return Ok(false);
                    }
                    meter.tick(batch.entries.len());
                    if let Some(reason) = me.network_down.get(&batch.study).cloned() {
                        for e in batch.entries {
                            me.finish(e, "not_attempted", Some(reason.clone()), None)?;
                        }
                        continue;
                    }
                    while *out >= AHEAD {
                        // (A thread gone has panicked: the scope passes it on.)
                        let Ok((job, sent)) = answers.recv() else { break 'feed };
                        *out -= 1;
                        me.record(job, sent)?;
                    }
                    // The marks are on disk before the batch may leave.
                    let prior = mark_in_flight(&mut batch.entries);
                    let records = me.with_pending(&batch.entries)?;
                    me.store.write(records)?;
                    if to_net.send(Job { batch, prior }).is_err() {
                        break;
                    }
                    *out += 1;
                    while let Ok((job, sent)) = answers.try_recv() {
                        *out -= 1;
                        me.record(job, sent)?;
                    }
                }
                Ok(true)
            };
            let fed = feed(self, &mut out);
            drop(to_net);
            let finished = fed?;
            for _ in 0..out {
                let Ok((job, sent)) = answers.recv() else { break };
                self.record(job, sent)?;
            }
            Ok(finished)
        })
    }

    /// The outcomes waiting to be written whose audit records are out,
    /// then the entries' progress.
    fn with_pending(&mut self, entries: &[LedgerEntry]) -> Result<Vec<Record>, AgentError> {
        let mut records = self.audited()?;
        records.extend(entries.iter().map(|e| Record::Progress(Progress::of(e))));
        Ok(records)
    }

    /// Records what became of a job.
    fn record(&mut self, job: Job, sent: Sent) -> Result<(), AgentError> {
        let Job { batch, prior } = job;
        match sent {
            Sent::Answer(result) => {
                if let Err(err) = &result {
                    self.note_network(&batch.study, err);
                }
                self.record_answer(&batch.study, batch.entries, result)
            }
            Sent::Halted => {
                for e in unmark(batch.entries, prior) {
                    self.buffer(Record::Progress(Progress::of(&e)))?;
                }
                Ok(())
            }
            Sent::Down(reason) => {
                for e in unmark(batch.entries, prior) {
                    self.finish(e, "not_attempted", Some(reason.clone()), None)?;
                }
                Ok(())
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
                    self.finish(e, "failed", Some(err.to_string()), None)?;
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
                let fp = self
                    .save_pseudonym(&bloomfilter, &sc.study, psn, &e.key)?
                    .map(|id| id.fingerprint());
                let detail = fp
                    .is_none()
                    .then(|| "no local patient has this Bloom filter; pseudonym kept".to_string());
                e.status = Status::Resolved;
                self.finish(e, "stored", detail, fp)?;
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
                    "clearing",
                    Some("in clearing at the fTTP: the pseudonym follows as a dic_psn_available task".into()),
                    None,
                )?;
            }
        }
        Ok(())
    }
}
