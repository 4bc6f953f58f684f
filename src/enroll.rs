//! Enrolling stored patients with the fTTP (`enroll`) and replacing
//! filters that changed (`update-bf`).
//!
//! Enrolment is idempotent by construction: the filter to be sent is
//! recorded (fsynced) before the request, a rerun sends only that same
//! filter again, and a patient whose filter has changed since is never
//! enrolled a second time: that is what `update-bf` is for.

use crate::audit::{Audit, AuditError, AuditRecord};
use crate::bloom::RecordEncoder;
use crate::client::{Client, ClientError};
use crate::config::Config;
use crate::pace::Step;
use crate::retry::Retryable;
use crate::shutdown::Shutdown;
use crate::store::{EnrolmentRecord, EnrolmentStatus, PatientRecord, PseudonymRecord, Record, Store, StoreError};
use crate::tasks::PsnAnswers;
use crate::types::{BloomFilter, LocalId};
use crate::vocab::{AuditKind, Outcome};
use chrono::Utc;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("update-bf needs [bloomfilter] version (the bfVersion sent with $updateBf)")]
    NoVersion,
}

impl EnrollError {
    pub fn exit_code(&self) -> u8 {
        match self {
            EnrollError::Store(e) => e.exit_code(),
            EnrollError::Audit(e) => e.exit_code(),
            EnrollError::NoVersion => crate::exit::CONFIG,
        }
    }
}

/// What `enroll` did; every count is of patients.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EnrollReport {
    /// Filters computed for patients who had none.
    pub computed: usize,
    /// Sent to the fTTP in this run (including resends after a crash).
    pub sent: usize,
    pub enrolled: usize,
    pub clearing: usize,
    /// Answered with a final error for the filter (or the whole request).
    pub errors: usize,
    /// Answered with a transient error: sent again by the next run.
    pub retry: usize,
    /// Not answered (network, HTTP error): sent again by the next run.
    pub failed: usize,
    /// Left alone: enrolled earlier with a filter they no longer have.
    pub changed: usize,
    /// Left alone: an earlier enrolment was answered with an error
    /// (`--retry-errors` sends them again).
    pub earlier_errors: usize,
    /// Left alone: in clearing since an earlier run.
    pub waiting: usize,
    /// Patients for whom no filter could be computed, and why.
    pub no_filter: Vec<(LocalId, String)>,
    /// Why the run stopped early, if it did.
    pub stopped: Option<Stopped>,
}

/// Why `enroll` or `update-bf` stopped before the end; the rest is done by
/// the next run.
#[derive(Debug, Clone, PartialEq)]
pub enum Stopped {
    /// SIGTERM or SIGINT.
    Signal,
    /// The dispatcher refused the request as a whole or did not answer;
    /// `exit` is the code `run` would give for it.
    Dispatcher { reason: String, exit: u8 },
}

impl Stopped {
    fn dispatcher(e: &ClientError) -> Stopped {
        Stopped::Dispatcher {
            reason: e.to_string(),
            exit: e.exit_code(),
        }
    }
}

pub struct EnrollOptions {
    pub limit: Option<usize>,
    pub retry_errors: bool,
}

/// Computes missing filters (with `encoder`), then enrols every patient
/// with a filter, no pseudonym for this site's target and no earlier
/// enrolment, in batches of `[dispatcher] batch_size`.
pub fn enroll(
    cfg: &Config,
    client: &Client,
    store: &mut Store,
    audit: &mut Audit,
    encoder: Option<&RecordEncoder>,
    opts: &EnrollOptions,
    stop: Option<&Shutdown>,
) -> Result<EnrollReport, EnrollError> {
    let mut report = EnrollReport::default();
    if let Some(encoder) = encoder {
        compute_missing(store, encoder, &mut report)?;
    }
    let study = cfg.study().name.as_str();
    let mut todo: Vec<(LocalId, BloomFilter)> = Vec::new();
    for id in store.without_pseudonym(study)? {
        if opts.limit.is_some_and(|n| todo.len() >= n) {
            break;
        }
        // (An erasure interrupted before the IDAT went: never sent.)
        if store.is_forgotten(&id) {
            continue;
        }
        let Some(bf) = store.patient(&id)?.and_then(|p| p.bloomfilter) else {
            continue;
        };
        match store.enrolment(&id, study, Some(&bf))? {
            None => {}
            Some(e) if !e.same_filter => {
                report.changed += 1;
                continue;
            }
            Some(e) => match e.status {
                // (A transient error is sent again without --retry-errors.)
                EnrolmentStatus::Sending | EnrolmentStatus::Retry => {}
                EnrolmentStatus::Error if opts.retry_errors => {}
                EnrolmentStatus::Error => {
                    report.earlier_errors += 1;
                    continue;
                }
                EnrolmentStatus::Clearing | EnrolmentStatus::Enrolled => {
                    report.waiting += 1;
                    continue;
                }
            },
        }
        todo.push((id, bf));
    }
    let batch_size = cfg.dispatcher.batch_size.0.max(1);
    let total = todo.len();
    let mut progress = crate::progress::Progress::new("patients", Some(total));
    let (study, target) = (cfg.study().name.as_str(), cfg.study().target.as_str());
    let batches: Vec<Vec<(LocalId, BloomFilter)>> = todo.chunks(batch_size).map(<[_]>::to_vec).collect();
    drop(todo);
    let stopping = || stop.is_some_and(Shutdown::requested);
    // Up to `max_in_flight` requests at once, started in order as the
    // dispatcher's pace allows (see `pace::in_turn`).
    crate::pace::in_turn(
        client.pace(),
        batches,
        |batch: &mut Vec<(LocalId, BloomFilter)>| {
            let refs: Vec<&BloomFilter> = batch.iter().map(|(_, bf)| bf).collect();
            client.request_psn_from_bf(study, target, &refs, None)
        },
        stopping,
        |step| -> Result<bool, EnrollError> {
            match step {
                Step::Hand(batch) => {
                    if stopping() {
                        report.stopped = Some(Stopped::Signal);
                        return Ok(false);
                    }
                    // Recorded before the request: a crash after it resends
                    // this filter, never another.
                    let now = Utc::now();
                    store.write(
                        batch
                            .iter()
                            .map(|(id, bf)| enrolment(study, id, bf, EnrolmentStatus::Sending, None, now))
                            .collect(),
                    )?;
                    crate::crashpoint::hit("enroll:sending");
                    Ok(true)
                }
                // (Not sent: a stop came; still `sending`, sent again next time.)
                Step::Answer(_, None) => {
                    report.stopped = Some(Stopped::Signal);
                    Ok(false)
                }
                Step::Answer(batch, Some(Err(e))) => {
                    for (id, bf) in &batch {
                        let mut rec = AuditRecord::new(AuditKind::Enroll, Outcome::Failed, target).in_study(study);
                        rec.patient = Some(id.fingerprint());
                        rec.bloomfilter = Some(bf.fingerprint());
                        rec.detail = Some(e.to_string());
                        audit.write(rec)?;
                    }
                    if report.stopped.is_none() {
                        report.stopped = Some(Stopped::dispatcher(&e));
                    }
                    Ok(false)
                }
                Step::Answer(batch, Some(Ok(answer))) => {
                    record_answer(study, target, store, audit, &batch, &answer, &mut report)?;
                    progress.tick(batch.len());
                    Ok(true)
                }
            }
        },
    )?;
    if matches!(report.stopped, Some(Stopped::Dispatcher { .. })) {
        report.failed += total - report.sent;
    }
    progress.finish();
    audit.sync()?;
    Ok(report)
}

fn enrolment(
    study: &str,
    id: &LocalId,
    bf: &BloomFilter,
    status: EnrolmentStatus,
    detail: Option<String>,
    now: chrono::DateTime<Utc>,
) -> Record {
    Record::Enrolment(EnrolmentRecord {
        local_id: id.clone(),
        study: study.to_string(),
        bloomfilter: bf.clone(),
        status,
        detail,
        updated: now,
    })
}

/// Records a batch's answer: each patient's pseudonym, clearing or error,
/// audited before stored.
fn record_answer(
    study: &str,
    target: &str,
    store: &mut Store,
    audit: &mut Audit,
    batch: &[(LocalId, BloomFilter)],
    answer: &crate::fhir::Parameters,
    report: &mut EnrollReport,
) -> Result<(), EnrollError> {
    let now = Utc::now();
    let record = |id: &LocalId, bf: &BloomFilter, status, detail| enrolment(study, id, bf, status, detail, now);
    report.sent += batch.len();
    let mut answers = PsnAnswers::from_parameters(answer);
    if answers.malformed > 0 {
        log::warn!("enroll: ignoring {} malformed part(s) of the answer", answers.malformed);
    }
    let mut records = Vec::with_capacity(2 * batch.len());
    for (id, bf) in batch {
        let (outcome, status, detail) = if let Some(code) = &answers.batch_error {
            let (outcome, status) = enrolment_verdict(code);
            (outcome, status, Some(format!("whole request refused: {code}")))
        } else if let Some(psn) = answers.pseudonyms.remove(bf) {
            records.push(Record::Pseudonym(PseudonymRecord {
                bloomfilter: bf.clone(),
                study: study.to_string(),
                target: target.to_string(),
                pseudonym: psn,
                received: now,
                source: "enroll".into(),
            }));
            (Outcome::Enrolled, EnrolmentStatus::Enrolled, None)
        } else if let Some(code) = answers.errors.get(bf) {
            let (outcome, status) = enrolment_verdict(code);
            (outcome, status, Some(format!("error code {code}")))
        } else {
            (Outcome::Clearing, EnrolmentStatus::Clearing, None)
        };
        match status {
            EnrolmentStatus::Enrolled => report.enrolled += 1,
            EnrolmentStatus::Clearing => report.clearing += 1,
            EnrolmentStatus::Retry => report.retry += 1,
            _ => report.errors += 1,
        }
        let mut rec = AuditRecord::new(AuditKind::Enroll, outcome, target).in_study(study);
        rec.patient = Some(id.fingerprint());
        rec.bloomfilter = Some(bf.fingerprint());
        rec.detail = detail.clone();
        audit.write(rec)?;
        if matches!(status, EnrolmentStatus::Error | EnrolmentStatus::Retry) {
            log::warn!(
                "[enroll {}] {outcome}: {}",
                id.fingerprint(),
                detail.as_deref().unwrap_or("")
            );
        } else {
            log::debug!("[enroll {}] {outcome}", id.fingerprint());
        }
        records.push(record(id, bf, status, detail));
    }
    crate::crashpoint::hit("enroll:answered");
    // The audit records first: what the store holds is audited.
    audit.write_out()?;
    store.write(records)?;
    Ok(())
}

/// The rule every `error-code` answer follows (README, "What the agent
/// does with each answer"): transient -> sent again by the next `enroll`;
/// anything else final (an unknown code too: `enroll` is run by hand, and
/// `--retry-errors` sends it again).
fn enrolment_verdict(code: &crate::tasks::ErrorCode) -> (Outcome, EnrolmentStatus) {
    use crate::fhir::outcome::ErrorClass;
    match code.class() {
        ErrorClass::Transient => (Outcome::TransientError, EnrolmentStatus::Retry),
        ErrorClass::Final { security: true } => {
            log::warn!(
                "enroll: the dispatcher refused on security grounds ({code}): check the API key and the site's rights"
            );
            (Outcome::DispatcherError, EnrolmentStatus::Error)
        }
        ErrorClass::Final { .. } | ErrorClass::Unknown => (Outcome::DispatcherError, EnrolmentStatus::Error),
    }
}

fn compute_missing(store: &mut Store, encoder: &RecordEncoder, report: &mut EnrollReport) -> Result<(), StoreError> {
    let mut pending = Vec::new();
    for id in store.without_bloomfilter()? {
        let Some(p) = store.patient(&id)? else { continue };
        match encoder.encode(&p.idat) {
            Ok(bf) => {
                report.computed += 1;
                pending.push(Record::Patient(PatientRecord {
                    bloomfilter: Some(bf),
                    updated: Utc::now(),
                    ..p
                }));
                if pending.len() >= 1000 {
                    store.write(std::mem::take(&mut pending))?;
                }
            }
            Err(e) => report.no_filter.push((id, e.to_string())),
        }
    }
    store.write(pending)
}

/// What `update-bf` did; every count is of patients.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpdateReport {
    /// Filter unchanged under the current configuration.
    pub unchanged: usize,
    /// `$updateBf` accepted: new filter and pseudonym stored.
    pub updated: usize,
    /// Changed, but never sent to the fTTP: the new filter is just stored.
    pub local: usize,
    /// Changed, but an enrolment with the old filter awaits its pseudonym:
    /// updated by a later run, once the pseudonym has come.
    pub waiting: usize,
    /// Refused by the fTTP (HTTP 4xx): (patient fingerprint, reason).
    pub refused: Vec<(String, String)>,
    /// Not answered: tried again by the next run.
    pub failed: usize,
    pub no_filter: Vec<(LocalId, String)>,
    pub stopped: Option<Stopped>,
}

/// Recomputes every patient's filter under the current `[bloomfilter]`;
/// for each that changed and has a pseudonym, sends `$updateBf` and then
/// stores the new filter with the pseudonym. A crash in between sends the
/// same update again on the next run (the fTTP keeps the newer filter).
pub fn update_bf(
    cfg: &Config,
    client: &Client,
    store: &mut Store,
    audit: &mut Audit,
    encoder: &RecordEncoder,
    limit: Option<usize>,
    stop: Option<&Shutdown>,
) -> Result<UpdateReport, EnrollError> {
    let version = cfg
        .bloomfilter
        .as_ref()
        .and_then(|b| b.version.clone())
        .ok_or(EnrollError::NoVersion)?;
    let (study, target) = (cfg.study().name.as_str(), cfg.study().target.as_str());
    let mut report = UpdateReport::default();
    let mut sent = 0usize;
    // Filters that changed locally only, written a thousand at a time (a
    // new configuration changes every patient's).
    let mut local: Vec<Record> = Vec::new();
    // The patients whose new filter goes to the fTTP, found first (the
    // store is read and written here, then only the answers are written).
    let mut to_send: Vec<(PatientRecord, BloomFilter, PseudonymRecord)> = Vec::new();
    for id in store.local_ids()? {
        if limit.is_some_and(|n| sent >= n) {
            break;
        }
        if store.is_forgotten(&id) {
            continue;
        }
        if stop.is_some_and(Shutdown::requested) {
            report.stopped = Some(Stopped::Signal);
            break;
        }
        let Some(p) = store.patient(&id)? else { continue };
        let new = match encoder.encode(&p.idat) {
            Ok(bf) => bf,
            Err(e) => {
                report.no_filter.push((id, e.to_string()));
                continue;
            }
        };
        let Some(old) = p.bloomfilter.clone() else {
            // Never had one: enroll computes and sends it.
            continue;
        };
        if old == new {
            report.unchanged += 1;
            continue;
        }
        let with_new = |p: &PatientRecord| {
            Record::Patient(PatientRecord {
                bloomfilter: Some(new.clone()),
                updated: Utc::now(),
                ..p.clone()
            })
        };
        let Some(psn) = store.pseudonym(&old, study)? else {
            if store
                .enrolment(&id, study, Some(&old))?
                .is_some_and(|e| e.status != EnrolmentStatus::Error)
            {
                report.waiting += 1;
            } else {
                local.push(with_new(&p));
                report.local += 1;
                if local.len() >= 1000 {
                    store.write(std::mem::take(&mut local))?;
                }
            }
            continue;
        };
        sent += 1;
        to_send.push((p, new, psn));
    }
    store.write(local)?;
    if report.stopped.is_some() {
        audit.sync()?;
        return Ok(report);
    }
    let stopping = || stop.is_some_and(Shutdown::requested);
    // Up to `max_in_flight` at once, in turn (see `pace::in_turn`); a
    // filter is replaced in the store only once the fTTP has taken it.
    crate::pace::in_turn(
        client.pace(),
        to_send,
        |(_, new, psn): &mut (PatientRecord, BloomFilter, PseudonymRecord)| {
            client.update_bf(study, new, target, &psn.pseudonym.value, &version)
        },
        stopping,
        |step| -> Result<bool, EnrollError> {
            let Step::Answer((p, new, psn), answer) = step else {
                if stopping() {
                    report.stopped.get_or_insert(Stopped::Signal);
                }
                return Ok(report.stopped.is_none());
            };
            let Some(answer) = answer else {
                report.stopped.get_or_insert(Stopped::Signal);
                return Ok(false);
            };
            let id = &p.local_id;
            let mut rec = AuditRecord::new(AuditKind::UpdateBf, Outcome::Updated, target).in_study(study);
            rec.patient = Some(id.fingerprint());
            rec.bloomfilter = Some(new.fingerprint());
            match answer {
                Ok(()) => {
                    crate::crashpoint::hit("update_bf:answered");
                    // The audit record first: what the store holds is audited.
                    audit.write(rec)?;
                    audit.write_out()?;
                    store.write(vec![
                        Record::Patient(PatientRecord {
                            bloomfilter: Some(new.clone()),
                            updated: Utc::now(),
                            ..p
                        }),
                        Record::Pseudonym(PseudonymRecord {
                            bloomfilter: new,
                            received: Utc::now(),
                            source: "update_bf".into(),
                            ..psn
                        }),
                    ])?;
                    report.updated += 1;
                    Ok(true)
                }
                // Not this patient's fault: stop, the next run sends it again.
                Err(e) if e.is_transient() || e.is_auth() => {
                    rec.set_outcome(Outcome::Failed);
                    rec.detail = Some(e.to_string());
                    audit.write(rec)?;
                    report.failed += 1;
                    report.stopped.get_or_insert(Stopped::dispatcher(&e));
                    Ok(false)
                }
                Err(e) => {
                    log::warn!("[update_bf {}] refused: {e}", id.fingerprint());
                    rec.set_outcome(Outcome::DispatcherError);
                    rec.detail = Some(e.to_string());
                    audit.write(rec)?;
                    report.refused.push((id.fingerprint(), e.to_string()));
                    Ok(true)
                }
            }
        },
    )?;
    audit.sync()?;
    Ok(report)
}
