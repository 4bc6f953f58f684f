//! `repeat_request`s in batches: one request for many Bloom filters, with
//! each batch's bookkeeping (its in-flight marks going to disk, the answer
//! before it recorded) done while the request before it is out.

use super::*;

/// Batches of fewer filters are recorded before the next request, on one
/// thread: starting a thread costs more than their bookkeeping.
pub(super) const OVERLAP_FROM: usize = 16;

/// A batch of `repeat_request`s to be sent.
pub(super) struct Batch {
    pub(super) entries: Vec<LedgerEntry>,
    /// Set once the batch's in-flight marks are on disk (written while
    /// the batch before was out): each entry's status from before, for
    /// a batch that is then not sent after all.
    pub(super) marked: Option<Vec<Status>>,
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
pub(super) fn unmark(mut entries: Vec<LedgerEntry>, prior: Vec<Status>) -> Vec<LedgerEntry> {
    for (e, status) in entries.iter_mut().zip(prior) {
        e.status = status;
        e.attempts = e.attempts.saturating_sub(1);
    }
    entries
}

/// A batch of `repeat_request`s whose request is done, its outcomes not yet recorded.
pub(super) struct Answered {
    pub(super) target: String,
    pub(super) flights: Vec<LedgerEntry>,
    /// The answer, read where the request was made (off the main thread).
    pub(super) result: Result<PsnAnswers, ClientError>,
}

impl Agent<'_> {
    /// Sends one batch of `repeat_request`s. Its answer is recorded later,
    /// while the next batch's request is out (`prev` is the batch before,
    /// recorded here meanwhile), and the in-flight marks of the batch after
    /// (`next`) go to disk meanwhile too: the bookkeeping and the fsync
    /// overlap the network and the dispatcher's work instead of adding to
    /// them. In-flight marks are durable before a request leaves, as ever;
    /// the results of the batch before go to disk with the next marks.
    pub(super) fn repeat_requests(
        &mut self,
        study: &str,
        target: &str,
        this: Batch,
        prev: Option<Answered>,
        next: Option<&mut Batch>,
    ) -> Result<Option<Answered>, AgentError> {
        if let Some(reason) = self.network_down.clone() {
            if let Some(p) = prev {
                self.record_answer(p)?;
            }
            let entries = match this.marked {
                Some(prior) => unmark(this.entries, prior),
                None => this.entries,
            };
            for e in entries {
                self.finish(e, "not_attempted", Some(reason.clone()), None)?;
            }
            return Ok(None);
        }
        let mut flights = this.entries;
        if this.marked.is_none() {
            self.mark(&mut flights)?;
        }
        let bfs: Vec<&BloomFilter> = flights
            .iter()
            .filter_map(|e| match &e.task {
                Some(Task::RepeatRequest { bloomfilter, .. }) => Some(bloomfilter),
                _ => None,
            })
            .collect();
        let deadline = deadline(flights.iter().filter_map(|e| e.expires).min());
        if self.report.received > QUIET_ABOVE {
            log::debug!("[repeat_request] sending {} Bloom filter(s) in one call", bfs.len());
        } else {
            log::info!("[repeat_request] sending {} Bloom filter(s) in one call", bfs.len());
        }
        crashpoint::hit("batch:before");
        let client = self.client;
        // Enough to do meanwhile for a thread to be worth starting: a next
        // batch to mark (an fsync), or many outcomes to record.
        let overlap = next.is_some() || prev.as_ref().is_some_and(|p| p.flights.len() >= OVERLAP_FROM);
        // (The answer is read where the request is made.)
        let request = || {
            client
                .request_psn_from_bf(study, target, &bfs, deadline)
                .map(|a| PsnAnswers::from_parameters(&a))
        };
        let result = if overlap {
            let (result, done) = std::thread::scope(|scope| {
                let call = scope.spawn(request);
                let done = self.meanwhile(prev, next);
                (call.join(), done)
            });
            done?;
            // (A panic in the request is a bug: it goes on as a panic.)
            result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        } else {
            self.meanwhile(prev, next)?;
            request()
        };
        crashpoint::hit("batch:after");
        if let Err(err) = &result {
            self.note_network(err);
        }
        Ok(Some(Answered {
            target: target.to_string(),
            flights,
            result,
        }))
    }

    /// What is done while a batch's request is out: the next batch's
    /// in-flight marks go to disk (with the outcomes waiting to be
    /// written), and while the disk syncs them they are applied in memory
    /// and the outcomes of the batch before are recorded (to go to disk
    /// with the marks after). The marks are durable before their own
    /// request leaves, as ever. (A few outcomes are recorded first, on
    /// this thread: a thread to sync on costs more than recording them.)
    fn meanwhile(&mut self, prev: Option<Answered>, next: Option<&mut Batch>) -> Result<(), AgentError> {
        let Some(next) = next else {
            return prev.map_or(Ok(()), |p| self.record_answer(p));
        };
        if prev.as_ref().is_none_or(|p| p.flights.len() < OVERLAP_FROM) {
            if let Some(p) = prev {
                self.record_answer(p)?;
            }
            next.marked = Some(self.mark(&mut next.entries)?);
            return Ok(());
        }
        let prior = mark_in_flight(&mut next.entries);
        let records = self.with_pending(&next.entries);
        let recorded = self.write_while(records, |me| prev.map_or(Ok(()), |p| me.record_answer(p)))?;
        next.marked = Some(prior);
        recorded
    }

    /// Writes records durably; while the disk syncs them (on a second
    /// thread) they are applied and `then` runs. Returns what `then` did.
    fn write_while<R>(&mut self, records: Vec<Record>, then: impl FnOnce(&mut Self) -> R) -> Result<R, AgentError> {
        let (appended, records) = self.store.write_ahead(records)?;
        let (synced, done) = std::thread::scope(|scope| {
            let sync = scope.spawn(|| appended.sync());
            self.store.apply(records);
            let done = then(self);
            (sync.join(), done)
        });
        // (A panic in the sync is a bug: it goes on as a panic.)
        let synced = synced.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        self.store.settle(appended, synced)?;
        Ok(done)
    }

    /// Marks a batch in flight, durably and with the outcomes waiting to be
    /// written; returns each entry's status from before.
    fn mark(&mut self, entries: &mut [LedgerEntry]) -> Result<Vec<Status>, AgentError> {
        let prior = mark_in_flight(entries);
        let records = self.with_pending(entries);
        self.store.write(records)?;
        Ok(prior)
    }

    /// The outcomes waiting to be written, then the entries' progress.
    fn with_pending(&mut self, entries: &[LedgerEntry]) -> Vec<Record> {
        let mut records = std::mem::take(&mut self.pending);
        records.extend(entries.iter().map(|e| Record::Progress(Progress::of(e))));
        records
    }

    /// Records the outcome of each task of an answered batch.
    pub(super) fn record_answer(&mut self, batch: Answered) -> Result<(), AgentError> {
        let Answered {
            target,
            flights,
            result,
        } = batch;
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
                e.status = Status::Failed;
                self.finish(
                    e,
                    "dispatcher_error",
                    Some(format!("whole batch refused: {code}")),
                    None,
                )?;
            } else if let Some(psn) = psns.remove(&bloomfilter) {
                let fp = self
                    .save_pseudonym(&bloomfilter, &target, psn, &e.key)?
                    .map(|id| id.fingerprint());
                let detail = fp
                    .is_none()
                    .then(|| "no local patient has this Bloom filter; pseudonym kept".to_string());
                e.status = Status::Resolved;
                self.finish(e, "stored", detail, fp)?;
            } else if let Some(code) = errors.get(&bloomfilter) {
                e.status = Status::Failed;
                self.finish(e, "dispatcher_error", Some(format!("error code {code}")), None)?;
            } else {
                e.status = Status::Failed;
                self.finish(
                    e,
                    "failed",
                    Some("the answer had nothing for this Bloom filter".into()),
                    None,
                )?;
            }
        }
        Ok(())
    }
}
