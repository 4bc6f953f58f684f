//! Loading patients into the store from CSV or NDJSON of FHIR Patients.
//!
//! A bad row is reported by line number and reason (never by its content)
//! and skipped; the good rows are imported. Importing the same file again
//! updates rows in place and writes nothing for unchanged ones.

use crate::fhir::idat::{BLOOMFILTER_SYSTEM, Idat, IdatElement, normalize_gender, valid_birthdate};
use crate::fhir::{Format, Resource};
use crate::store::{PatientRecord, Record, Store, StoreError};
use crate::types::{BloomFilter, LocalId};
use chrono::Utc;
use std::io::BufRead;
use std::path::Path;

/// CSV columns: `local_id`, `bloomfilter`, then one per IDAT element.
pub const CSV_COLUMNS: [&str; 17] = [
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
    #[error("{path}: {reason}")]
    Header { path: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct ImportReport {
    pub added: usize,
    pub updated: usize,
    pub unchanged: usize,
    /// (line number, reason) of each row that was skipped.
    pub errors: Vec<(usize, String)>,
}

/// A parsed row: the patient's key, IDAT and Bloom filter.
pub type Row = (LocalId, Idat, Option<BloomFilter>);

const WRITE_BATCH: usize = 1000;

pub fn import_file(store: &mut Store, path: &Path) -> Result<ImportReport, ImportError> {
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
    let mut report = ImportReport::default();
    let mut progress = crate::progress::Progress::new("rows", None);
    let mut pending: Vec<Record> = Vec::new();
    let mut sink = |store: &mut Store, report: &mut ImportReport, row: Row| -> Result<(), ImportError> {
        progress.tick(1);
        upsert(store, report, &mut pending, row)?;
        if pending.len() >= WRITE_BATCH {
            store.write(std::mem::take(&mut pending))?;
        }
        Ok(())
    };
    if ndjson {
        for (i, line) in reader.lines().enumerate() {
            let lineno = i + 1;
            let line = match line {
                Ok(l) => l,
                Err(_) => {
                    report.errors.push((lineno, "not valid UTF-8".into()));
                    continue;
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            match parse_ndjson_line(&line) {
                Ok(row) => sink(store, &mut report, row)?,
                Err(reason) => report.errors.push((lineno, reason)),
            }
        }
    } else {
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
                    match parse_csv_row(&columns, &record) {
                        Ok(row) => sink(store, &mut report, row)?,
                        Err(reason) => report.errors.push((lineno, reason)),
                    }
                }
                Err(e) => {
                    let line = e.position().map_or(lineno, |p| p.line() as usize);
                    report.errors.push((line, csv_reason(&e)));
                    if !matches!(
                        e.kind(),
                        csv::ErrorKind::UnequalLengths { .. } | csv::ErrorKind::Utf8 { .. }
                    ) {
                        break;
                    }
                }
            }
        }
    }
    store.write(pending)?;
    store.maybe_compact()?;
    progress.finish();
    Ok(report)
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
    (local_id, idat, bf): Row,
) -> Result<(), ImportError> {
    // A row without a Bloom filter keeps the one already stored.
    let existing = store.patient(&local_id)?;
    let bloomfilter = bf.or_else(|| existing.as_ref().and_then(|p| p.bloomfilter.clone()));
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
