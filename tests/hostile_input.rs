//! Property tests ("fuzzing" within the test suite) for everything that reads
//! untrusted bytes: the JSON and XML Parameters parsers, the task parser and
//! `import`. None may panic; codecs must round-trip whatever they can write.
//! `scripts/fuzz.sh` runs the same properties with many more cases.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fttp_agent::fhir::{self, Format, Identifier, Parameter, Parameters, json, xml};
use fttp_agent::store::{LockMode, Store};
use fttp_agent::tasks::{Scope, parse_response};
use proptest::prelude::*;
use std::path::Path;

const SCOPE: Scope<'static> = Scope {
    study: "mii",
    target: "eyematics",
};

fn examples() -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/fttp-ig");
    let mut out = Vec::new();
    for sub in ["json", "xml"] {
        for e in std::fs::read_dir(root.join(sub)).unwrap() {
            out.push(std::fs::read(e.unwrap().path()).unwrap());
        }
    }
    out
}

/// Every reader of untrusted bytes, for one input.
fn read_everything(bytes: &[u8]) {
    let _ = json::parse(bytes);
    let _ = xml::parse(bytes);
    for format in [Format::Json, Format::Xml] {
        if let Ok(p) = Parameters::parse(format, bytes) {
            let _ = parse_response(&p, &SCOPE);
        }
        let _ = fhir::outcome::OperationOutcome::parse(format, bytes);
        let _ = fttp_agent::tasks::parse_answer(format, bytes, &SCOPE);
    }
    let _ = Format::detect(Some("application/fhir+xml"), bytes);
}

#[derive(Debug, Clone, Copy)]
enum Edit {
    Truncate(usize),
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        (
            any::<usize>(),
            prop::sample::select(b"<>\"'&/={}[],:\\ \x00\xff".to_vec())
        )
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        if bytes.is_empty() {
            break;
        }
        match *e {
            Edit::Truncate(i) => bytes.truncate(i % bytes.len()),
            Edit::Flip(i, b) => {
                let n = bytes.len();
                bytes[i % n] ^= b | 1;
            }
            Edit::Insert(i, b) => {
                let n = bytes.len();
                bytes.insert(i % n, b);
            }
            Edit::Delete(i) => {
                let n = bytes.len();
                bytes.remove(i % n);
            }
        }
    }
    bytes
}

fn text() -> impl Strategy<Value = String> {
    // Printable text with the characters escaping is about, and some Unicode.
    "[ -~äöüß€😀\t\n\r]{1,24}".prop_filter("FHIR strings are not blank", |s| !s.trim().is_empty())
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "dic_psn_available",
            "send_idat",
            "repeat_request",
            "expires",
            "bloomfilter",
            "target",
            "pseudonym",
            "taskId",
            "element",
            "study",
        ])
        .prop_map(str::to_string),
        "[a-z_]{1,12}",
    ]
}

fn leaf() -> impl Strategy<Value = Parameter> {
    (name(), text(), 0..6u8).prop_map(|(n, v, kind)| match kind {
        0 => Parameter::string(&n, &v),
        1 => Parameter::primitive(&n, "instant", "2026-01-02T03:04:05.678+01:00"),
        2 => Parameter::primitive(&n, "base64Binary", "SWNoIGJpbiBlaW4gQmxvb21maWx0ZXIu"),
        3 => Parameter::identifier(&n, Identifier::new(Some("https://ths-greifswald.de/gpas"), &v)),
        4 => Parameter::coding(
            &n,
            fhir::Coding {
                system: Some("https://ths-greifswald.de/fhir/CodeSystem/dispatcher/IdatElements".into()),
                code: Some(v),
                display: None,
            },
        ),
        _ => Parameter::primitive(&n, "id", "a-1.b"),
    })
}

fn parameter() -> impl Strategy<Value = Parameter> {
    leaf().prop_recursive(3, 24, 6, |inner| {
        (name(), prop::collection::vec(inner, 0..6)).prop_map(|(n, parts)| Parameter::with_parts(&n, parts))
    })
}

/// Valid tasks of every kind for SCOPE, then edits that make some of them
/// invalid or unusual: parts dropped, doubled or given odd values.
fn task_document() -> impl Strategy<Value = Parameters> {
    use fttp_agent::fhir::idat::IdatElement;
    use fttp_agent::sim;
    let odd = prop::sample::select(vec![
        "",
        "a&b",
        "x<y",
        "not base64!",
        "QUJD",
        "mii",
        "eyematics",
        "elsewhere",
        "2030-01-01",
        "2030-01-01T00:00:00+02:00",
        "task-1",
        "bad id!",
        "given",
        "shoe-size",
    ]);
    let edit = (
        0usize..3,
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        odd,
    );
    (1usize..6, prop::collection::vec(edit, 0..3)).prop_map(|(n, edits)| {
        let later = chrono::Utc::now() + chrono::Duration::days(1);
        let bf = |i: usize| fttp_agent::demo::sample_bloomfilter(i as u32).to_base64();
        let mut tasks: Vec<Parameter> = (0..n)
            .map(|i| match i % 3 {
                0 => sim::repeat_request("mii", &bf(i), "eyematics", Some(later)),
                1 => sim::send_idat(
                    &format!("t-{i}"),
                    later,
                    (i % 2 == 0).then_some("mii_P1"),
                    Some(&bf(i)),
                    &[IdatElement::Given, IdatElement::Family, IdatElement::Given],
                ),
                _ => sim::dic_psn_available(&bf(i), "eyematics", "mii_P2", (i % 2 == 0).then_some(later)),
            })
            .collect();
        for (kind, task, part, value) in edits {
            let t = task.index(tasks.len());
            let parts = &mut tasks[t].part;
            let at = part.index(parts.len());
            match kind {
                0 => {
                    parts.remove(at);
                }
                1 => {
                    let again = parts[at].clone();
                    parts.push(again);
                }
                _ => match &mut parts[at].value {
                    Some(fhir::ParamValue::Primitive { value: v, .. }) => *v = value.to_string(),
                    Some(fhir::ParamValue::Identifier(id)) => id.value = Some(value.to_string()),
                    Some(fhir::ParamValue::Coding(c)) => c.code = Some(value.to_string()),
                    _ => {}
                },
            }
        }
        Parameters::new(tasks)
    })
}

// Cases: 256 by default; PROPTEST_CASES raises it (scripts/fuzz.sh).
proptest! {

    /// The XML reader straight into tasks gives what the Parameters path
    /// gives, or leaves the document to it.
    #[test]
    fn typed_xml_agrees_with_the_parameters_path(doc in task_document()) {
        let bytes = doc.to_xml().into_bytes();
        let reference = parse_response(&Parameters::parse_generic(Format::Xml, &bytes).unwrap(), &SCOPE);
        if let Some(fast) = fttp_agent::tasks::typed_xml(&bytes, &SCOPE) {
            prop_assert_eq!(&fast, &reference);
            prop_assert!(fast.iter().all(Result::is_ok));
        } else {
            // It gives up only on documents with something the fast path does not do.
            prop_assert!(reference.iter().any(Result::is_err) || doc.to_xml().contains('&'));
        }
        prop_assert_eq!(fttp_agent::tasks::parse_answer(Format::Xml, &bytes, &SCOPE).unwrap(), reference);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        read_everything(&bytes);
    }

    #[test]
    fn mutated_ig_examples_never_panic(which in any::<prop::sample::Index>(), edits in prop::collection::vec(edit(), 1..8)) {
        let all = examples();
        let bytes = apply(all[which.index(all.len())].clone(), &edits);
        read_everything(&bytes);
    }

    #[test]
    fn the_fast_paths_agree_with_the_generic_reader(
        params in prop::collection::vec(parameter(), 0..6),
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec(edit(), 0..4),
    ) {
        let p = Parameters::new(params);
        let mut docs = vec![(Format::Json, p.to_json().into_bytes()), (Format::Xml, p.to_xml().into_bytes())];
        let all = examples();
        let example = all[which.index(all.len())].clone();
        docs.push((Format::Json, apply(example.clone(), &edits)));
        docs.push((Format::Xml, apply(example, &edits)));
        for (format, bytes) in docs {
            let fast = match format {
                Format::Json => fhir::fast::parameters_json(&bytes),
                Format::Xml => fhir::fast::parameters_xml(&bytes),
            };
            if let Some(fast) = fast {
                let generic = Parameters::parse_generic(format, &bytes);
                prop_assert_eq!(Ok(fast), generic);
            }
        }
    }

    #[test]
    fn the_fast_writers_equal_the_tree_writers(params in prop::collection::vec(parameter(), 0..6), id in proptest::option::of("[a-z0-9-]{1,10}")) {
        let mut p = Parameters::new(params);
        p.id = id;
        let tree = p.to_resource();
        prop_assert_eq!(fhir::fast::write_xml(&p).unwrap(), xml::to_string(&tree));
        let fast: serde_json::Value = serde_json::from_str(&fhir::fast::write_json(&p).unwrap()).unwrap();
        let slow: serde_json::Value = serde_json::from_str(&json::to_string(&tree)).unwrap();
        prop_assert_eq!(fast, slow);
    }

    #[test]
    fn any_parameters_round_trip_through_json_and_xml(params in prop::collection::vec(parameter(), 0..6)) {
        let p = Parameters::new(params);
        let from_json = Parameters::parse(Format::Json, p.to_json().as_bytes()).unwrap();
        prop_assert_eq!(&from_json, &p);
        let from_xml = Parameters::parse(Format::Xml, p.to_xml().as_bytes()).unwrap();
        prop_assert_eq!(&from_xml, &p);
        let _ = parse_response(&p, &SCOPE);
    }

    #[test]
    fn import_never_panics_and_accounts_for_every_row(rows in prop::collection::vec("[a-zA-Z0-9 ,\"=/+\\-]{0,60}", 1..20)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.csv");
        let body = format!("local_id,bloomfilter,given,birthdate,gender\n{}\n", rows.join("\n"));
        std::fs::write(&path, body).unwrap();
        let key = fttp_agent::crypto::StoreKey::from_bytes(&[9; 32]);
        let mut store = Store::open(&dir.path().join("store"), LockMode::Try, key).unwrap();
        let r = fttp_agent::import::import_file(&mut store, &path, None).unwrap();
        prop_assert!(r.added + r.updated + r.unchanged + r.errors.len() <= rows.len());
        prop_assert_eq!(store.patient_count().unwrap(), r.added);
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let mut xml_doc = String::from(r#"<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="x"/>"#);
    for _ in 0..100_000 {
        xml_doc.push_str(r#"<part><name value="x"/>"#);
    }
    assert!(matches!(
        xml::parse(xml_doc.as_bytes()),
        Err(fhir::FhirError::TooDeep { .. })
    ));
    let json_doc = "[".repeat(100_000);
    assert!(json::parse(json_doc.as_bytes()).is_err());
    let mut nested = serde_json::json!({"name": "x"});
    for _ in 0..200 {
        nested = serde_json::json!({"name": "x", "part": [nested]});
    }
    let doc = serde_json::json!({"resourceType": "Parameters", "parameter": [nested]}).to_string();
    assert!(Parameters::parse(Format::Json, doc.as_bytes()).is_err());
}

#[test]
fn empty_parameters_go_to_the_counting_reader_and_too_many_are_refused() {
    // (The fast XML reader would otherwise build up to its cap of them,
    // some 200 MB, before the document is refused: README, Performance, 5.)
    let one = r#"<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="a"/></parameter></Parameters>"#;
    assert!(fhir::fast::parameters_xml(one.as_bytes()).is_none());
    assert_eq!(
        Parameters::parse(Format::Xml, one.as_bytes()),
        Parameters::parse_generic(Format::Xml, one.as_bytes())
    );
    let mut many = String::from(r#"<Parameters xmlns="http://hl7.org/fhir">"#);
    for _ in 0..300_000 {
        many.push_str(r#"<parameter><name value="a"/></parameter>"#);
    }
    many.push_str("</Parameters>");
    assert!(Parameters::parse(Format::Xml, many.as_bytes()).is_err());
}
