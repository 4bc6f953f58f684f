//! The implementation guide's examples (copied into resources/fttp-ig) as test
//! vectors for both codecs: every one parses, JSON round-trips unchanged, and
//! JSON -> XML -> model equals JSON -> model. The XML files come from an
//! independent serialiser, so reading them checks our XML reader against
//! someone else's writer.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fttp_agent::fhir::{self, Format, Parameters, json, xml};
use std::path::{Path, PathBuf};

fn dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("resources/fttp-ig")
        .join(sub)
}

fn files(sub: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir(sub))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    assert!(v.len() >= 9, "expected the IG examples in {sub}");
    v
}

#[test]
fn every_json_example_round_trips_unchanged() {
    for path in files("json") {
        let bytes = std::fs::read(&path).unwrap();
        let original: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let resource = json::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let written: serde_json::Value = serde_json::from_str(&json::to_string(&resource)).unwrap();
        assert_eq!(written, original, "{}", path.display());
    }
}

#[test]
fn every_json_example_survives_json_to_xml_to_model() {
    for path in files("json") {
        let resource = json::parse(&std::fs::read(&path).unwrap()).unwrap();
        let as_xml = xml::to_string(&resource);
        let back = xml::parse(as_xml.as_bytes()).unwrap_or_else(|e| panic!("{}: {e}\n{as_xml}", path.display()));
        assert_eq!(back, resource, "{}", path.display());
    }
}

#[test]
fn independent_xml_renderings_read_as_the_json_examples() {
    for path in files("xml") {
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        let from_xml = xml::parse(&std::fs::read(&path).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let json_path = dir("json").join(format!("{name}.json"));
        let from_json = json::parse(&std::fs::read(&json_path).unwrap()).unwrap();
        assert_eq!(from_xml, from_json, "{name}");
    }
}

#[test]
fn our_xml_matches_the_independent_serialiser_byte_for_byte() {
    // Same element order, same attribute placement, same escaping.
    for path in files("xml") {
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        let expected = std::fs::read_to_string(&path).unwrap().trim_end().to_string();
        let resource = json::parse(&std::fs::read(dir("json").join(format!("{name}.json"))).unwrap()).unwrap();
        assert_eq!(xml::to_string(&resource), expected, "{name}");
    }
}

#[test]
fn parameters_examples_survive_the_typed_model_in_both_formats() {
    for path in files("json") {
        let bytes = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        if !name.starts_with("Parameters-") {
            continue;
        }
        let params = Parameters::parse(Format::Json, &bytes).unwrap();
        let original: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let again: serde_json::Value = serde_json::from_str(&params.to_json()).unwrap();
        assert_eq!(again, original, "{name}: JSON -> Parameters -> JSON");
        let via_xml = Parameters::parse(Format::Xml, params.to_xml().as_bytes()).unwrap();
        assert_eq!(via_xml, params, "{name}: Parameters -> XML -> Parameters");
    }
}

#[test]
fn xml_escaping_round_trips_awkward_values() {
    let nasty = "a & b < c > d \" e ' f\nline2\ttab\r ü 🙂";
    // Specials at both ends and next to multi-byte characters (the escaper
    // copies the runs between specials whole).
    let edges = "&ü<🙂>\"\u{10FFFF}\n\u{7F}&";
    let p = Parameters::new(vec![
        fhir::Parameter::string("study", nasty),
        fhir::Parameter::string("target", edges),
        fhir::Parameter::string("target", ""),
    ]);
    let text = p.to_xml();
    assert!(!text.contains('\n'), "newlines must be character references: {text}");
    assert!(
        text.contains("<valueString value=\"&amp;ü&lt;🙂&gt;&quot;\u{10FFFF}&#xA;\u{7F}&amp;\"/>"),
        "{text}"
    );
    assert!(text.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Parameters xmlns=\"http://hl7.org/fhir\">"));
    assert_eq!(Parameters::parse(Format::Xml, text.as_bytes()).unwrap(), p);
    assert_eq!(Parameters::parse(Format::Json, p.to_json().as_bytes()).unwrap(), p);
}

#[test]
fn xml_outside_the_fhir_namespace_or_with_doctype_is_refused() {
    let no_ns = r#"<Parameters><parameter><name value="x"/></parameter></Parameters>"#;
    assert!(xml::parse(no_ns.as_bytes()).is_err());
    let doctype = r#"<?xml version="1.0"?><!DOCTYPE p [<!ENTITY x "boom">]><Parameters xmlns="http://hl7.org/fhir"/>"#;
    let err = xml::parse(doctype.as_bytes()).unwrap_err().to_string();
    assert!(err.contains("DOCTYPE"), "{err}");
    let entity = r#"<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="&x;"/></parameter></Parameters>"#;
    assert!(xml::parse(entity.as_bytes()).is_err());
    let html = "<html><body>502 Bad Gateway</body></html>";
    assert!(matches!(xml::parse(html.as_bytes()), Err(fhir::FhirError::NotFhir(_))));
}

#[test]
fn prefixed_fhir_namespace_is_accepted() {
    let doc = r#"<f:Parameters xmlns:f="http://hl7.org/fhir"><f:parameter><f:name value="study"/><f:valueString value="mii"/></f:parameter></f:Parameters>"#;
    let p = Parameters::parse(Format::Xml, doc.as_bytes()).unwrap();
    assert_eq!(p.first_string("study"), Some("mii"));
}

#[test]
fn narrative_xhtml_is_kept_verbatim() {
    let doc = r#"<OperationOutcome xmlns="http://hl7.org/fhir"><text><status value="generated"/><div xmlns="http://www.w3.org/1999/xhtml"><p>bad <b>request</b></p></div></text><issue><severity value="error"/><code value="invalid"/><diagnostics value="missing study"/></issue></OperationOutcome>"#;
    let r = xml::parse(doc.as_bytes()).unwrap();
    let oo = fhir::outcome::OperationOutcome::from_resource(&r).unwrap();
    assert_eq!(oo.issues[0].diagnostics.as_deref(), Some("missing study"));
    let j: serde_json::Value = serde_json::from_str(&json::to_string(&r)).unwrap();
    assert_eq!(
        j["text"]["div"],
        "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>bad <b>request</b></p></div>"
    );
}

#[test]
fn the_fast_paths_take_the_dispatcher_examples() {
    // So that the agreement property test compares something.
    for name in [
        "Parameters-Parameters-RequestTasks-response-example-1",
        "Parameters-Parameters-RequestPsnFromBfWorkflow-response-example-1",
        "Parameters-Parameters-RequestTasks-request-example-1",
    ] {
        let json = std::fs::read(dir("json").join(format!("{name}.json"))).unwrap();
        let xml = std::fs::read(dir("xml").join(format!("{name}.xml"))).unwrap();
        let fast_json = fhir::fast::parameters_json(&json).unwrap_or_else(|| panic!("{name} json"));
        let fast_xml = fhir::fast::parameters_xml(&xml).unwrap_or_else(|| panic!("{name} xml"));
        assert_eq!(fast_json, Parameters::parse_generic(Format::Json, &json).unwrap());
        assert_eq!(fast_xml, Parameters::parse_generic(Format::Xml, &xml).unwrap());
    }
    // The tasks of the guide's example, read straight from XML into tasks.
    let xml = std::fs::read(dir("xml").join("Parameters-Parameters-RequestTasks-response-example-1.xml")).unwrap();
    let scope = fttp_agent::tasks::Scope {
        study: "mii",
        target: "eyematics",
    };
    let typed = fttp_agent::tasks::typed_xml(&xml, &scope).expect("the typed XML path takes the example");
    assert_eq!(typed.len(), 3);
    assert_eq!(
        typed,
        fttp_agent::tasks::parse_response(&Parameters::parse_generic(Format::Xml, &xml).unwrap(), &scope)
    );
    // A contained resource is not for the fast path.
    let provide =
        std::fs::read(dir("json").join("Parameters-Parameters-ProvidePatientData-request-example-1.json")).unwrap();
    assert!(fhir::fast::parameters_json(&provide).is_none());
}

#[test]
fn the_xml_fast_path_agrees_on_awkward_but_valid_documents() {
    let docs = [
        r#"<?xml version="1.0"?><Parameters xmlns="http://hl7.org/fhir"><!-- c --><parameter><name value='a &amp; b &#x41;&#66;'/><valueString value="x&gt;y"/></parameter></Parameters>"#,
        // (A parameter with nothing in it is left to the generic reader:
        // tests/hostile_input.rs.)
        "<Parameters xmlns=\"http://hl7.org/fhir\">\n  <parameter >\n    <name   value = \"n\" />\n    <valueString value=\"v\"/>\n  </parameter >\n</Parameters>\n<!-- trailing -->",
        r#" <?xml version="1.0"?><Parameters xmlns="http://hl7.org/fhir"/>"#,
        r#"<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="a&#0;"/></parameter></Parameters>"#,
        r#"<Parameters xmlns="http://hl7.org/fhir"><parameter><name xmlns="http://hl7.org/fhir" value="n"/></parameter></Parameters>"#,
        r#"<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="n"/><valueIdentifier><system value="s"/></valueIdentifier><part><name value="p"/><valueCoding/></part></parameter></Parameters>"#,
        r#"<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="n"/></parametr></Parameters>"#,
        r#"<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="n"/>text</parameter></Parameters>"#,
    ];
    let mut taken = 0;
    for doc in docs {
        let generic = Parameters::parse_generic(Format::Xml, doc.as_bytes());
        if let Some(fast) = fhir::fast::parameters_xml(doc.as_bytes()) {
            taken += 1;
            assert_eq!(Ok(fast), generic, "{doc}");
        }
    }
    assert!(taken >= 3, "the fast path took only {taken} of the valid documents");
}
