//! Loading patients into the store from CSV or NDJSON of FHIR Patients.
//!
//! A bad row is reported by line number and reason (never by its content)
//! and skipped; the good rows are imported. Importing the same file again
//! updates rows in place and writes nothing for unchanged ones.

use crate::bloom::RecordEncoder;
use crate::fhir::idat::{BLOOMFILTER_SYSTEM, Idat, IdatElement, normalize_gender, valid_birthdate};
use crate::fhir::{Format, Resource};
use crate::store::{PatientRecord, Record, Store, StoreError};
use crate::types::{BloomFilter, LocalId};
use chrono::Utc;
use std::io::BufRead;
use std::path::Path;

/// CSV columns: `local_id`, `bloomfilter`, then one per IDAT element.
pub(crate) const CSV_COLUMNS: [&str; 17] = [
    "local_id",
    "bloomfilter",
    "given",
    "family",
    "prefix",
    "suffix",
    "birthdate",
    "gender",
    "address_line",
    "address_city",
    "address_postalcode",
    "birthplace",
    "maidenname",
    "degree",
    "language",
    "nationality",
    "maritalstatus",
];

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("{path}: {reason}")]
    Header { path: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ImportError {
    pub fn exit_code(&self) -> u8 {
        match self {
            // The file given is missing or not an import file: a usage error.
            ImportError::Read { .. } | ImportError::Header { .. } => crate::exit::CONFIG,
            ImportError::Write { .. } => crate::exit::IO,
            ImportError::Store(e) => e.exit_code(),
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct ImportReport {
    pub added: usize,
    pub updated: usize,
    pub unchanged: usize,
    /// (line number, reason) of each row that was skipped.
    pub errors: Vec<(usize, String)>,
    /// Bloom filters computed from IDAT (rows without one).
    pub computed: usize,
    /// (line number, reason) of rows imported without a Bloom filter
    /// because none could be computed.
    pub without_filter: Vec<(usize, String)>,
    /// Lines not imported: a skipped row is one line, or more when a quote
    /// was not closed and swallowed the lines after it.
    pub lines_skipped: usize,
    /// (line, earlier line) of each row whose local_id an earlier row of
    /// the same file had: the later row wins, as in a second import.
    pub repeated: Vec<(usize, usize)>,
    /// Rows of patients erased by `forget`: not imported again.
    pub forgotten: usize,
}

/// A parsed row: the patient's key, IDAT and Bloom filter.
pub(crate) type Row = (LocalId, Idat, Option<BloomFilter>);

/// Rows per store write (one transaction): a commit rewrites every page its
/// rows touched into the WAL, and random keys touch many; at 1,000 rows a
/// write the import ran at about 40,000 rows/s, at 10,000 at 55,000.
const WRITE_BATCH: usize = 10_000;

/// Imports a file. With `encoder` (a `[bloomfilter]` section), a row
/// without a Bloom filter gets one computed from its IDAT, unless the
/// patient already has one (changing a filter is `update-bf`'s job).
pub fn import_file(
    store: &mut Store,
    path: &Path,
    encoder: Option<&RecordEncoder>,
) -> Result<ImportReport, ImportError> {
    let mut report = ImportReport::default();
    let mut progress = crate::progress::Progress::new("rows", None);
    let mut pending: Vec<Record> = Vec::new();
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    read_rows(path, |lineno, row| {
        progress.tick(1);
        match row {
            Ok(row) if store.is_forgotten(&row.0) => report.forgotten += 1,
            Ok(row) => {
                if let Some(earlier) = seen.insert(row.0.0.clone(), lineno) {
                    report.repeated.push((lineno, earlier));
                }
                upsert(store, &mut report, &mut pending, encoder, lineno, row)?;
                if pending.len() >= WRITE_BATCH {
                    store.write(std::mem::take(&mut pending))?;
                }
            }
            Err(skip) => {
                report.lines_skipped += skip.lines;
                report.errors.push((lineno, skip.reason));
            }
        }
        Ok(())
    })?;
    store.write(pending)?;
    progress.finish();
    Ok(report)
}

/// `fttp-agent bloom`: each row's Bloom filter computed from its IDAT, as
/// CSV `local_id,bloomfilter` on `out`. Returns the rows that had none,
/// by line number and reason.
pub(crate) fn bloom_file(
    path: &Path,
    encoder: &RecordEncoder,
    out: &mut impl std::io::Write,
) -> Result<(usize, Vec<(usize, String)>), ImportError> {
    let mut errors = Vec::new();
    let mut written = 0;
    let write_err = |e: csv::Error| ImportError::Write {
        path: "the output".into(),
        source: e.into(),
    };
    let mut csv = csv::Writer::from_writer(out);
    csv.write_record(["local_id", "bloomfilter"]).map_err(write_err)?;
    read_rows(path, |lineno, row| {
        match row.and_then(|(id, idat, _)| {
            encoder
                .encode(&idat)
                .map(|bf| (id, bf))
                .map_err(|e| Skip::from(e.to_string()))
        }) {
            Ok((id, bf)) => {
                csv.write_record([id.0.as_str(), bf.to_base64().as_str()])
                    .map_err(write_err)?;
                written += 1;
            }
            Err(skip) => errors.push((lineno, skip.reason)),
        }
        Ok(())
    })?;
    csv.flush().map_err(|source| ImportError::Write {
        path: "the output".into(),
        source,
    })?;
    Ok((written, errors))
}

/// Reads CSV or NDJSON of FHIR Patients (by extension, else by the first
/// character) and hands each row, or why it is bad, to `sink` with its line.
fn read_rows(
    path: &Path,
    mut sink: impl FnMut(usize, Result<Row, Skip>) -> Result<(), ImportError>,
) -> Result<(), ImportError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| ImportError::Read {
        path: shown.clone(),
        source,
    })?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut reader = std::io::BufReader::new(file);
    let ndjson = match ext.as_str() {
        "csv" => false,
        "ndjson" | "jsonl" | "json" => true,
        _ => {
            let head = reader.fill_buf().map_err(|source| ImportError::Read {
                path: shown.clone(),
                source,
            })?;
            head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        }
    };
    if ndjson {
        for (i, line) in reader.lines().enumerate() {
            let lineno = i + 1;
            match line {
                Ok(l) if l.trim().is_empty() => {}
                Ok(l) => sink(lineno, parse_ndjson_line(&l).map_err(Skip::from))?,
                Err(_) => sink(lineno, Err(Skip::from("not valid UTF-8".to_string())))?,
            }
        }
        return Ok(());
    }
    let mut csv = csv::ReaderBuilder::new().flexible(false).from_reader(reader);
    let headers = csv
        .headers()
        .map_err(|e| ImportError::Header {
            path: shown.clone(),
            reason: format!("cannot read the header row: {}", csv_reason(&e)),
        })?
        .clone();
    let columns: Vec<String> = headers.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
    if let Some(bad) = columns.iter().find(|c| !CSV_COLUMNS.contains(&c.as_str())) {
        return Err(ImportError::Header {
            path: shown,
            reason: format!("unknown column '{bad}'; known columns: {}", CSV_COLUMNS.join(",")),
        });
    }
    if !columns.iter().any(|c| c == "local_id") {
        return Err(ImportError::Header {
            path: shown,
            reason: "the header row has no local_id column".into(),
        });
    }
    let mut record = csv::StringRecord::new();
    loop {
        let lineno = csv.position().line() as usize;
        match csv.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let lineno = record.position().map_or(lineno, |p| p.line() as usize);
                if let Some(skip) = run_on(&csv, lineno) {
                    sink(lineno, Err(skip))?;
                    continue;
                }
                sink(lineno, parse_csv_row(&columns, &record).map_err(Skip::from))?;
            }
            Err(e) => {
                let line = e.position().map_or(lineno, |p| p.line() as usize);
                let skip = run_on(&csv, line).unwrap_or_else(|| Skip::from(csv_reason(&e)));
                sink(line, Err(skip))?;
                if !matches!(
                    e.kind(),
                    csv::ErrorKind::UnequalLengths { .. } | csv::ErrorKind::Utf8 { .. }
                ) {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// A row is one line: one that ran on from `line` was opened by a quote
/// that did not close where it should have, and swallowed the lines after
/// it (the csv reader takes them as one field).
fn run_on<R: std::io::Read>(csv: &csv::Reader<R>, line: usize) -> Option<Skip> {
    let next = csv.position().line() as usize;
    let last = if csv.is_done() { next } else { next.saturating_sub(1) };
    (last > line).then(|| Skip {
        reason: format!("quoted field not closed at line {line}; lines {line}-{last} not imported"),
        lines: last - line + 1,
    })
}

/// Why a row was not imported, and how many lines of the file that is
/// (more than one when an unclosed quote swallowed the lines after it).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Skip {
    pub reason: String,
    pub lines: usize,
}

impl From<String> for Skip {
    fn from(reason: String) -> Skip {
        Skip { reason, lines: 1 }
    }
}

// csv's messages can include a field's bytes for UTF-8 errors; describe by kind.
fn csv_reason(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
            format!("row has {len} fields, the header has {expected_len}")
        }
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".into(),
        csv::ErrorKind::Io(_) => "read error".into(),
        _ => "malformed CSV".into(),
    }
}

fn element_for_column(col: &str) -> Option<IdatElement> {
    IdatElement::from_code(&col.replace('_', "-"))
}

fn parse_csv_row(columns: &[String], record: &csv::StringRecord) -> Result<Row, String> {
    let mut local_id = None;
    let mut bf = None;
    let mut idat = Idat::default();
    for (col, value) in columns.iter().zip(record.iter()) {
        let value = value.trim();
        match col.as_str() {
            "local_id" => local_id = Some(value.to_string()),
            "bloomfilter" if !value.is_empty() => {
                bf = Some(BloomFilter::from_base64(value).map_err(|e| e.to_string())?);
            }
            "bloomfilter" => {}
            other => {
                if let Some(e) = element_for_column(other) {
                    idat.set(e, Some(value.to_string()));
                }
            }
        }
    }
    let local_id = local_id.filter(|s| !s.is_empty()).ok_or("empty local_id")?;
    validate(&mut idat)?;
    Ok((LocalId(local_id), idat, bf))
}

fn parse_ndjson_line(line: &str) -> Result<Row, String> {
    let resource: Resource = crate::fhir::parse_resource(Format::Json, line.as_bytes()).map_err(|e| e.to_string())?;
    if resource.resource_type != "Patient" {
        return Err(format!("expected a Patient resource, got {}", resource.resource_type));
    }
    let local_id = resource
        .node
        .str("id")
        .filter(|s| !s.is_empty())
        .ok_or("Patient without id (the local id)")?
        .to_string();
    let mut bf = None;
    for ident in resource.node.nodes("identifier") {
        if ident.str("system") == Some(BLOOMFILTER_SYSTEM) {
            let v = ident.str("value").ok_or("Bloom filter identifier without value")?;
            bf = Some(BloomFilter::from_base64(v).map_err(|e| e.to_string())?);
        }
    }
    let mut idat = Idat::from_patient(&resource);
    validate(&mut idat)?;
    Ok((LocalId(local_id), idat, bf))
}

fn validate(idat: &mut Idat) -> Result<(), String> {
    use crate::fhir::idat::{IdatElement, in_value_set};
    for (e, what) in [
        (IdatElement::Nationality, "an ISO 3166-1 alpha-2 country code, e.g. DE"),
        (IdatElement::Language, "a BCP-47 language tag, e.g. de or de-DE"),
        (
            IdatElement::Maritalstatus,
            "a code of FHIR's marital-status value set: A, D, I, L, M, P, S, T, U, W or UNK",
        ),
    ] {
        // (The value itself is IDAT: named by its column only.)
        if idat.get(e).is_some_and(|v| !in_value_set(e, v)) {
            return Err(format!("{} must be {what}", e.code()));
        }
    }
    if let Some(g) = idat.gender.as_deref() {
        let norm = normalize_gender(g).ok_or("gender must be male, female, other or unknown (or m/f/w/d/u)")?;
        idat.gender = Some(norm.to_string());
    }
    if let Some(d) = idat.birthdate.as_deref()
        && !valid_birthdate(d)
    {
        return Err("birthdate must be a date as YYYY-MM-DD".into());
    }
    Ok(())
}

fn upsert(
    store: &Store,
    report: &mut ImportReport,
    pending: &mut Vec<Record>,
    encoder: Option<&RecordEncoder>,
    lineno: usize,
    (local_id, idat, bf): Row,
) -> Result<(), ImportError> {
    // A row without a Bloom filter keeps the one already stored, else gets
    // one computed (when configured).
    let existing = store.patient(&local_id)?;
    let mut bloomfilter = bf.or_else(|| existing.as_ref().and_then(|p| p.bloomfilter.clone()));
    if bloomfilter.is_none()
        && let Some(encoder) = encoder
    {
        match encoder.encode(&idat) {
            Ok(bf) => {
                bloomfilter = Some(bf);
                report.computed += 1;
            }
            Err(e) => report.without_filter.push((lineno, e.to_string())),
        }
    }
    match existing {
        Some(old) if old.idat == idat && old.bloomfilter == bloomfilter => {
            report.unchanged += 1;
            return Ok(());
        }
        Some(_) => report.updated += 1,
        None => report.added += 1,
    }
    pending.push(Record::Patient(PatientRecord {
        local_id,
        idat,
        bloomfilter,
        updated: Utc::now(),
    }));
    Ok(())
}
