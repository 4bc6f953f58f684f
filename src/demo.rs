//! The embedded default: a temporary site with sample patients, the
//! simulator with sample tasks of every kind (one expired, one malformed),
//! one real cycle, and a readable summary.

use crate::agent::CycleReport;
use crate::fhir::Format;
use crate::fhir::idat::IdatElement;
use crate::privacy::sha256_hex;
use crate::sim::{self, SimOptions, Simulator};
use crate::types::BloomFilter;
use chrono::{Duration, Utc};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub const STUDY: &str = "mii";
pub const TARGET: &str = "dic_demo";
pub const API_KEY: &str = "demo-api-key";
/// The demo's second study, with its own tasks at the same simulator.
pub(crate) const SECOND_STUDY: &str = "napkon";

/// A deterministic, fictional 64-byte "Bloom filter" for sample patient `n`.
pub fn sample_bloomfilter(n: u32) -> BloomFilter {
    let a = sha256_hex(format!("fttp-agent demo patient {n}").as_bytes());
    let b = sha256_hex(a.as_bytes());
    let hex = a + &b;
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect();
    // 64 bytes from two digests: never empty.
    BloomFilter::from_bytes(bytes).unwrap_or_else(|_| unreachable!())
}

/// Sample patients (invented people) as import CSV.
pub(crate) fn sample_csv() -> String {
    let rows = [
        "p-001,Erika,Mustermann,,,1964-08-12,f,Heidestr. 17,Köln,51147,Berlin,Gabler,,de,DE,M",
        "p-002,Max,Mustermann,,,1962-03-01,m,Heidestr. 17,Köln,51147,Bonn,,Dr.,de,DE,M",
        "p-003,Anna,Schmidt,,,1990-11-23,w,Lindenweg 3,Greifswald,17489,Rostock,,,de,DE,S",
        "p-004,Jonas,Weber,,,2001-05-30,m,,Münster,48149,,,,de,DE,",
    ];
    let mut csv = String::from(
        "local_id,bloomfilter,given,family,prefix,suffix,birthdate,gender,address_line,address_city,\
         address_postalcode,birthplace,maidenname,degree,language,nationality,maritalstatus\n",
    );
    for (i, row) in rows.iter().enumerate() {
        let (id, rest) = row.split_once(',').unwrap_or((row, ""));
        let _ = writeln!(csv, "{id},{},{rest}", sample_bloomfilter(i as u32 + 1).to_base64());
    }
    csv
}

/// Queues one task of every kind, plus an expired and a malformed one.
pub(crate) fn load_sample_tasks(sim: &Simulator) {
    let now = Utc::now();
    let bf = |n| sample_bloomfilter(n).to_base64();
    sim.add_task(sim::dic_psn_available(&bf(1), TARGET, "mii_DEMO0001", None));
    sim.add_task(sim::send_idat(
        "demo-task-0001",
        now + Duration::days(2),
        None,
        Some(&bf(2)),
        &[
            IdatElement::Given,
            IdatElement::Family,
            IdatElement::Birthdate,
            IdatElement::Gender,
        ],
    ));
    sim.add_task(sim::repeat_request(
        STUDY,
        &bf(3),
        TARGET,
        Some(now + Duration::days(1)),
    ));
    sim.add_task(sim::repeat_request(
        STUDY,
        &bf(4),
        TARGET,
        Some(now + Duration::days(3)),
    ));
    sim.add_task(sim::send_idat(
        "demo-task-0002",
        now - Duration::hours(1),
        None,
        Some(&bf(3)),
        &[IdatElement::Family],
    ));
    let mut malformed = sim::send_idat("demo-task-0003", now + Duration::days(1), None, Some(&bf(4)), &[]);
    malformed.part.retain(|p| p.name != "taskId");
    sim.add_task(malformed);
    // The second study: the same patient 1 gets its own pseudonym there.
    sim.add_study_task(
        SECOND_STUDY,
        sim::dic_psn_available(&bf(1), TARGET, "napkon_DEMO0001", None),
    );
    sim.add_study_task(
        SECOND_STUDY,
        sim::repeat_request(SECOND_STUDY, &bf(2), TARGET, Some(now + Duration::days(2))),
    );
}

pub(crate) fn start_simulator() -> std::io::Result<Simulator> {
    Simulator::start(SimOptions {
        api_key: API_KEY.into(),
        ..SimOptions::default()
    })
}

/// A config file for the demo site, pointing at the simulator.
pub fn write_config(dir: &Path, url: &str, format: Format) -> std::io::Result<PathBuf> {
    let fmt = match format {
        Format::Xml => "xml",
        Format::Json => "json",
    };
    let text = format!(
        "# Written by `fttp-agent demo`.\n\
         [dispatcher]\nurl = \"{url}\"\napi_key = \"{API_KEY}\"\nformat = \"{fmt}\"\ntimeout = \"10s\"\n\
         max_attempts = 2\nretry_delay = \"200ms\"\n\n\
         [[study]]\nname = \"{STUDY}\"\ntarget = \"{TARGET}\"\n\n\
         [[study]]\nname = \"{SECOND_STUDY}\"\ntarget = \"{TARGET}\"\n\n\
         [store]\npath = \"store\"\nkey_file = \"store.key\"\n\n\
         [log]\naudit = \"audit.ndjson\"\n"
    );
    let path = dir.join("fttp-agent.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

pub fn summary(report: &CycleReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\nTasks received: {}", report.received);
    let _ = writeln!(
        s,
        "{:<18} {:<22} {:<16} {:<10} detail",
        "kind", "task", "outcome", "status"
    );
    for o in &report.outcomes {
        let _ = writeln!(
            s,
            "{:<18} {:<22} {:<16} {:<10} {}",
            o.kind.as_str(),
            o.task,
            o.outcome,
            o.status.as_str(),
            o.detail.as_deref().unwrap_or("")
        );
    }
    let _ = writeln!(s, "\nBy outcome:");
    for (outcome, n) in report.counts() {
        let _ = writeln!(s, "  {outcome:<16} {n}");
    }
    s
}
