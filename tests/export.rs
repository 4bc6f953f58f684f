//! `fttp-agent pseudonyms`: the pseudonyms received, by local patient, for
//! the site's data pipeline (issue 23, part 1), against a store built by
//! real cycles and an enrolment against the simulator.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::{Duration, Utc};
use common::bf;

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn csv_lists_each_local_patients_pseudonym_with_what_delivered_it() {
    let site = common::site_with_pseudonyms();
    let out = site.run(&["pseudonyms"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = text(&out);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "local_id,study,target,pseudonym_system,pseudonym,received_at,source"
    );
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(
        lines[1].contains(",mii_CLEARED,") && lines[1].ends_with(",dic_psn_available"),
        "{csv}"
    );
    assert!(
        lines[2].starts_with("p2,mii,") && lines[2].ends_with(",enroll"),
        "{csv}"
    );
    assert!(
        lines[3].starts_with("p3,mii,") && lines[3].ends_with(",repeat_request"),
        "{csv}"
    );
    assert!(!csv.contains("mii_NOBODY"));
    // One patient; nothing since tomorrow; an unknown study is refused.
    let one = text(&site.run(&["pseudonyms", "--local-id", "p3"]));
    assert_eq!(one.lines().count(), 2, "{one}");
    let tomorrow = (Utc::now() + Duration::days(1)).format("%Y-%m-%d").to_string();
    let none = text(&site.run(&["pseudonyms", "--since", &tomorrow]));
    assert_eq!(none.lines().count(), 1, "{none}");
    assert_eq!(site.run(&["pseudonyms", "--study", "gecco"]).status.code(), Some(2));
    // Each export is audited with its count and filters, never values.
    let audited: Vec<_> = site.audit().into_iter().filter(|r| r["kind"] == "export").collect();
    assert_eq!(audited.len(), 3);
    assert!(
        audited[0]["detail"]
            .as_str()
            .unwrap()
            .contains("3 row(s) exported; filters: none")
    );
    assert!(audited[1]["detail"].as_str().unwrap().contains("one local id"));
    assert!(!serde_json::to_string(&audited).unwrap().contains("p3"));
}

#[test]
fn ndjson_fhir_and_unmatched() {
    let site = common::site_with_pseudonyms();
    let nd = text(&site.run(&["pseudonyms", "--format", "ndjson"]));
    let rows: Vec<serde_json::Value> = nd.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["local_id"], "p1");
    assert_eq!(rows[0]["pseudonym"], "mii_CLEARED");
    assert_eq!(rows[0]["source"], "dic_psn_available");
    let fhir = text(&site.run(&["pseudonyms", "--format", "fhir"]));
    let p: serde_json::Value = serde_json::from_str(&fhir).unwrap();
    assert_eq!(p["resourceType"], "Parameters");
    let params = p["parameter"].as_array().unwrap();
    assert_eq!(params.len(), 3);
    let parts = params[0]["part"].as_array().unwrap();
    let names: Vec<&str> = parts.iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["original", "target", "pseudonym"]);
    assert_eq!(parts[0]["valueIdentifier"]["value"], "p1");
    assert_eq!(parts[1]["valueIdentifier"]["value"], "mii");
    assert_eq!(parts[2]["valueIdentifier"]["value"], "mii_CLEARED");
    // A pseudonym no local patient has: named by its filter's fingerprint.
    let un = text(&site.run(&["pseudonyms", "--unmatched"]));
    let lines: Vec<&str> = un.lines().collect();
    assert_eq!(lines[0].split(',').next(), Some("bloomfilter"));
    assert_eq!(lines.len(), 2, "{un}");
    assert!(lines[1].starts_with("bf:") && lines[1].contains("mii_NOBODY"), "{un}");
    assert!(!un.contains(&bf(5)), "never the filter itself");
}
