//! The Idat Patient profile: identifying data sent for a clearing.
//!
//! Mapping from the IdatElements codes, as given in the comment of
//! StructureDefinition-Idat.json:
//! given -> name.given, family -> name.family (use != maiden), prefix ->
//! name.prefix, suffix -> name.suffix, birthdate -> birthDate, gender ->
//! gender, address-line/-city/-postalcode -> address.line/city/postalCode,
//! birthplace -> extension patient-birthPlace .valueAddress.city,
//! maidenname -> name.family with use = maiden, degree -> name.prefix with
//! the iso21090-EN-qualifier extension "AC", language ->
//! communication.language (preferred = true), nationality -> extension
//! patient-nationality .code, maritalstatus -> maritalStatus.

use super::element::{Node, Primitive, Resource, Value};
use serde::{Deserialize, Serialize};

pub(crate) const PROFILE: &str = "https://ths-greifswald.de/fhir/StructureDefinition/dispatcher/Patient/Idat";
pub(crate) const ELEMENTS_SYSTEM: &str = "https://ths-greifswald.de/fhir/CodeSystem/dispatcher/IdatElements";
pub(crate) const EXT_BIRTHPLACE: &str = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace";
pub(crate) const EXT_NATIONALITY: &str = "http://hl7.org/fhir/StructureDefinition/patient-nationality";
pub(crate) const EXT_QUALIFIER: &str = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-qualifier";
pub(crate) const SYSTEM_COUNTRY: &str = "urn:iso:std:iso:3166";
pub(crate) const SYSTEM_LANGUAGE: &str = "urn:ietf:bcp:47";
pub(crate) const SYSTEM_MARITAL: &str = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus";
/// `UNK` belongs to this code system, not to v3-MaritalStatus (R4's
/// marital-status value set takes it from here).
pub(crate) const SYSTEM_NULL_FLAVOR: &str = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor";
/// Identifier system under which `import` reads a patient's Bloom filter
/// (base64) from a FHIR Patient resource. Defined by fttp-agent.
pub const BLOOMFILTER_SYSTEM: &str = "urn:fttp-agent:bloomfilter";

/// One code of the IdatElements code system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdatElement {
    Given,
    Family,
    Prefix,
    Suffix,
    Birthdate,
    Gender,
    AddressLine,
    AddressCity,
    AddressPostalcode,
    Birthplace,
    Maidenname,
    Degree,
    Language,
    Nationality,
    Maritalstatus,
}

impl IdatElement {
    pub const ALL: [IdatElement; 15] = [
        IdatElement::Given,
        IdatElement::Family,
        IdatElement::Prefix,
        IdatElement::Suffix,
        IdatElement::Birthdate,
        IdatElement::Gender,
        IdatElement::AddressLine,
        IdatElement::AddressCity,
        IdatElement::AddressPostalcode,
        IdatElement::Birthplace,
        IdatElement::Maidenname,
        IdatElement::Degree,
        IdatElement::Language,
        IdatElement::Nationality,
        IdatElement::Maritalstatus,
    ];

    pub fn code(self) -> &'static str {
        match self {
            IdatElement::Given => "given",
            IdatElement::Family => "family",
            IdatElement::Prefix => "prefix",
            IdatElement::Suffix => "suffix",
            IdatElement::Birthdate => "birthdate",
            IdatElement::Gender => "gender",
            IdatElement::AddressLine => "address-line",
            IdatElement::AddressCity => "address-city",
            IdatElement::AddressPostalcode => "address-postalcode",
            IdatElement::Birthplace => "birthplace",
            IdatElement::Maidenname => "maidenname",
            IdatElement::Degree => "degree",
            IdatElement::Language => "language",
            IdatElement::Nationality => "nationality",
            IdatElement::Maritalstatus => "maritalstatus",
        }
    }

    pub(crate) fn from_code(code: &str) -> Option<IdatElement> {
        IdatElement::ALL.into_iter().find(|e| e.code() == code)
    }
}

/// A patient's identifying data as the site keeps it. Every field is optional:
/// a site sends what it has and the audit log lists what it lacked.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Idat {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// `YYYY-MM-DD` (or a FHIR partial date).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birthdate: Option<String>,
    /// FHIR administrative gender: male, female, other, unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gender: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_line: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_city: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_postalcode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birthplace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maidenname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degree: Option<String>,
    /// BCP-47 language code, e.g. `de`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// ISO 3166 country code, e.g. `DE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nationality: Option<String>,
    /// v3 MaritalStatus code, e.g. `M`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maritalstatus: Option<String>,
}

impl Idat {
    pub fn get(&self, e: IdatElement) -> Option<&str> {
        let v = match e {
            IdatElement::Given => &self.given,
            IdatElement::Family => &self.family,
            IdatElement::Prefix => &self.prefix,
            IdatElement::Suffix => &self.suffix,
            IdatElement::Birthdate => &self.birthdate,
            IdatElement::Gender => &self.gender,
            IdatElement::AddressLine => &self.address_line,
            IdatElement::AddressCity => &self.address_city,
            IdatElement::AddressPostalcode => &self.address_postalcode,
            IdatElement::Birthplace => &self.birthplace,
            IdatElement::Maidenname => &self.maidenname,
            IdatElement::Degree => &self.degree,
            IdatElement::Language => &self.language,
            IdatElement::Nationality => &self.nationality,
            IdatElement::Maritalstatus => &self.maritalstatus,
        };
        v.as_deref().filter(|s| !s.trim().is_empty())
    }

    pub fn set(&mut self, e: IdatElement, value: Option<String>) {
        let slot = match e {
            IdatElement::Given => &mut self.given,
            IdatElement::Family => &mut self.family,
            IdatElement::Prefix => &mut self.prefix,
            IdatElement::Suffix => &mut self.suffix,
            IdatElement::Birthdate => &mut self.birthdate,
            IdatElement::Gender => &mut self.gender,
            IdatElement::AddressLine => &mut self.address_line,
            IdatElement::AddressCity => &mut self.address_city,
            IdatElement::AddressPostalcode => &mut self.address_postalcode,
            IdatElement::Birthplace => &mut self.birthplace,
            IdatElement::Maidenname => &mut self.maidenname,
            IdatElement::Degree => &mut self.degree,
            IdatElement::Language => &mut self.language,
            IdatElement::Nationality => &mut self.nationality,
            IdatElement::Maritalstatus => &mut self.maritalstatus,
        };
        *slot = value.filter(|s| !s.trim().is_empty());
    }

    /// Every value, for registering with a redactor.
    pub fn values(&self) -> impl Iterator<Item = &str> {
        IdatElement::ALL.into_iter().filter_map(|e| self.get(e))
    }

    /// The elements this record has a value for.
    pub fn present(&self) -> Vec<IdatElement> {
        IdatElement::ALL
            .into_iter()
            .filter(|e| self.get(*e).is_some())
            .collect()
    }

    /// An Idat-profile Patient holding only the `requested` elements, and the
    /// requested elements this record has no value for.
    pub fn to_patient(&self, requested: &[IdatElement]) -> (Resource, Vec<IdatElement>) {
        let want = |e: IdatElement| requested.contains(&e);
        let val = |e: IdatElement| if want(e) { self.get(e) } else { None };
        let missing: Vec<IdatElement> = IdatElement::ALL
            .into_iter()
            .filter(|e| want(*e) && self.get(*e).is_none())
            .collect();

        let mut p = Resource::new("Patient");
        p.node.push_complex("meta", Node::new().with("profile", PROFILE));

        if let Some(city) = val(IdatElement::Birthplace) {
            p.node.push_complex(
                "extension",
                Node::new()
                    .with("url", EXT_BIRTHPLACE)
                    .with_node("valueAddress", Node::new().with("city", city)),
            );
        }
        if let Some(code) = val(IdatElement::Nationality) {
            let concept = Node::new().with_node("coding", coding(SYSTEM_COUNTRY, code));
            let inner = Node::new()
                .with("url", "code")
                .with_node("valueCodeableConcept", concept);
            p.node.push_complex(
                "extension",
                Node::new().with("url", EXT_NATIONALITY).with_node("extension", inner),
            );
        }

        let mut name = Node::new();
        if let Some(v) = val(IdatElement::Family) {
            name.push_primitive("family", v);
        }
        if let Some(v) = val(IdatElement::Given) {
            for given in list_items(v) {
                name.push_primitive("given", given);
            }
        }
        if let Some(v) = val(IdatElement::Prefix) {
            name.push_primitive("prefix", v);
        }
        if let Some(v) = val(IdatElement::Degree) {
            let qualifier = Node::new().with("url", EXT_QUALIFIER).with("valueCode", "AC");
            name.push(
                "prefix",
                Value::Primitive(Primitive {
                    value: Some(v.to_string()),
                    id: None,
                    extension: vec![qualifier],
                }),
            );
        }
        if let Some(v) = val(IdatElement::Suffix) {
            name.push_primitive("suffix", v);
        }
        if !name.children.is_empty() {
            p.node.push_complex("name", name);
        }
        if let Some(v) = val(IdatElement::Maidenname) {
            p.node
                .push_complex("name", Node::new().with("use", "maiden").with("family", v));
        }
        if let Some(v) = val(IdatElement::Gender) {
            p.node.push_primitive("gender", v);
        }
        if let Some(v) = val(IdatElement::Birthdate) {
            p.node.push_primitive("birthDate", v);
        }

        let mut address = Node::new();
        if let Some(v) = val(IdatElement::AddressLine) {
            for line in list_items(v) {
                address.push_primitive("line", line);
            }
        }
        if let Some(v) = val(IdatElement::AddressCity) {
            address.push_primitive("city", v);
        }
        if let Some(v) = val(IdatElement::AddressPostalcode) {
            address.push_primitive("postalCode", v);
        }
        if !address.children.is_empty() {
            p.node.push_complex("address", address);
        }
        if let Some(code) = val(IdatElement::Maritalstatus) {
            let text = marital_display(code).unwrap_or(code);
            p.node.push_complex(
                "maritalStatus",
                Node::new()
                    .with_node(
                        "coding",
                        coding(
                            if code == "UNK" {
                                SYSTEM_NULL_FLAVOR
                            } else {
                                SYSTEM_MARITAL
                            },
                            code,
                        ),
                    )
                    .with("text", text),
            );
        }
        if let Some(code) = val(IdatElement::Language) {
            let language = Node::new().with_node("coding", coding(SYSTEM_LANGUAGE, code));
            p.node.push_complex(
                "communication",
                Node::new().with_node("language", language).with("preferred", "true"),
            );
        }
        (p, missing)
    }

    /// Reads a Patient resource (the Idat profile or a plain R4 Patient) back
    /// into the site's form. Used by `import` and to check what was sent.
    pub fn from_patient(p: &Resource) -> Idat {
        let n = &p.node;
        let mut idat = Idat::default();
        let set = |idat: &mut Idat, e, v: Option<&str>| {
            if idat.get(e).is_none() {
                idat.set(e, v.map(str::to_string));
            }
        };
        for ext in n.nodes("extension") {
            match ext.str("url") {
                Some(EXT_BIRTHPLACE) => {
                    set(
                        &mut idat,
                        IdatElement::Birthplace,
                        ext.node("valueAddress").and_then(|a| a.str("city")),
                    );
                }
                Some(EXT_NATIONALITY) => {
                    let code = ext
                        .nodes("extension")
                        .filter(|e| e.str("url") == Some("code"))
                        .find_map(|e| e.node("valueCodeableConcept"))
                        .and_then(|cc| {
                            cc.nodes("coding")
                                .find_map(|c| c.str("code"))
                                .or_else(|| cc.str("text"))
                        });
                    set(&mut idat, IdatElement::Nationality, code);
                }
                _ => {}
            }
        }
        for name in n.nodes("name") {
            if name.str("use") == Some("maiden") {
                set(&mut idat, IdatElement::Maidenname, name.str("family"));
                continue;
            }
            set(&mut idat, IdatElement::Family, name.str("family"));
            let given: Vec<&str> = name
                .all("given")
                .filter_map(|v| v.as_primitive()?.value.as_deref())
                .collect();
            if !given.is_empty() {
                set(&mut idat, IdatElement::Given, Some(&given.join(LIST_SEPARATOR)));
            }
            for prefix in name.all("prefix").filter_map(Value::as_primitive) {
                let academic = prefix
                    .extension
                    .iter()
                    .any(|e| e.str("url") == Some(EXT_QUALIFIER) && e.str("valueCode") == Some("AC"));
                let e = if academic {
                    IdatElement::Degree
                } else {
                    IdatElement::Prefix
                };
                set(&mut idat, e, prefix.value.as_deref());
            }
            set(&mut idat, IdatElement::Suffix, name.str("suffix"));
        }
        set(&mut idat, IdatElement::Gender, n.str("gender"));
        set(&mut idat, IdatElement::Birthdate, n.str("birthDate"));
        if let Some(a) = n.node("address") {
            let lines: Vec<&str> = a
                .all("line")
                .filter_map(|v| v.as_primitive()?.value.as_deref())
                .collect();
            if !lines.is_empty() {
                set(&mut idat, IdatElement::AddressLine, Some(&lines.join(LIST_SEPARATOR)));
            }
            set(&mut idat, IdatElement::AddressCity, a.str("city"));
            set(&mut idat, IdatElement::AddressPostalcode, a.str("postalCode"));
        }
        if let Some(m) = n.node("maritalStatus") {
            let code = m.nodes("coding").find_map(|c| c.str("code")).or_else(|| m.str("text"));
            set(&mut idat, IdatElement::Maritalstatus, code);
        }
        for c in n.nodes("communication") {
            if c.str("preferred") == Some("true") || idat.language.is_none() {
                let code = c
                    .node("language")
                    .and_then(|l| l.nodes("coding").find_map(|c| c.str("code")).or_else(|| l.str("text")));
                idat.language = None;
                set(&mut idat, IdatElement::Language, code);
            }
        }
        idat
    }
}

fn coding(system: &str, code: &str) -> Node {
    Node::new().with("system", system).with("code", code)
}

/// Separates the items of a repeated element (several given names or
/// address lines) in the one value the store and a CSV cell hold; they are
/// sent as repeated FHIR elements, in order.
pub(crate) const LIST_SEPARATOR: &str = "|";

/// The items of a value that may hold a list (see `LIST_SEPARATOR`),
/// trimmed, empty ones left out.
pub(crate) fn list_items(value: &str) -> impl Iterator<Item = &str> {
    value.split(LIST_SEPARATOR).map(str::trim).filter(|s| !s.is_empty())
}

/// The codes of R4's marital-status value set (v3-MaritalStatus, and
/// `UNK` from v3-NullFlavor), the Idat profile's required binding.
pub(crate) const MARITAL_STATUS: [&str; 11] = ["A", "D", "I", "L", "M", "P", "S", "T", "U", "W", "UNK"];

/// Whether a coded IDAT value is in its element's value set (the Idat
/// profile's required bindings): nationality ISO 3166-1 alpha-2, language
/// a BCP-47 tag whose primary subtag is an ISO 639 code, marital status
/// R4's marital-status. Other elements are not coded: always true.
pub(crate) fn in_value_set(element: IdatElement, value: &str) -> bool {
    use super::codes::{ISO639, ISO3166_ALPHA2};
    match element {
        IdatElement::Nationality => ISO3166_ALPHA2.binary_search(&value).is_ok(),
        IdatElement::Maritalstatus => MARITAL_STATUS.contains(&value),
        IdatElement::Language => {
            let mut subtags = value.split('-');
            let primary = subtags.next().unwrap_or("").to_ascii_lowercase();
            (2..=3).contains(&primary.len())
                && ISO639.binary_search(&primary.as_str()).is_ok()
                && subtags.all(|t| (1..=8).contains(&t.len()) && t.chars().all(|c| c.is_ascii_alphanumeric()))
        }
        _ => true,
    }
}

fn marital_display(code: &str) -> Option<&'static str> {
    Some(match code {
        "A" => "Annulled",
        "D" => "Divorced",
        "I" => "Interlocutory",
        "L" => "Legally Separated",
        "M" => "Married",
        "C" => "Common Law",
        "P" => "Polygamous",
        "T" => "Domestic partner",
        "U" => "unmarried",
        "S" => "Never Married",
        "W" => "Widowed",
        "UNK" => "unknown",
        _ => return None,
    })
}

/// Maps the gender spellings found in hospital exports to FHIR's
/// administrative gender; `None` for anything else.
pub(crate) fn normalize_gender(s: &str) -> Option<&'static str> {
    match s.trim().to_ascii_lowercase().as_str() {
        "male" | "m" => Some("male"),
        "female" | "f" | "w" => Some("female"),
        "other" | "d" | "x" | "o" => Some("other"),
        "unknown" | "u" => Some("unknown"),
        _ => None,
    }
}

/// FHIR `date`: YYYY, YYYY-MM or YYYY-MM-DD with a real calendar date.
pub(crate) fn valid_birthdate(s: &str) -> bool {
    match s.len() {
        4 => s.chars().all(|c| c.is_ascii_digit()),
        7 => chrono::NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d").is_ok(),
        10 => chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Idat {
        let mut i = Idat::default();
        for (n, e) in IdatElement::ALL.into_iter().enumerate() {
            let v = match e {
                IdatElement::Birthdate => "1970-01-02".to_string(),
                IdatElement::Gender => "female".to_string(),
                IdatElement::Maritalstatus => "M".to_string(),
                _ => format!("v{n}"),
            };
            i.set(e, Some(v));
        }
        i
    }

    #[test]
    fn each_element_alone_round_trips_through_the_profile() {
        let idat = full();
        for e in IdatElement::ALL {
            let (patient, missing) = idat.to_patient(&[e]);
            assert!(missing.is_empty());
            let back = Idat::from_patient(&patient);
            assert_eq!(back.present(), vec![e], "element {}", e.code());
            assert_eq!(back.get(e), idat.get(e));
        }
    }

    #[test]
    fn coded_elements_are_checked_against_their_value_sets() {
        use IdatElement::{Language, Maritalstatus, Nationality};
        for (e, ok) in [
            (Nationality, "DE"),
            (Nationality, "TR"),
            (Language, "de"),
            (Language, "de-DE"),
            (Language, "sr-Latn-RS"),
            (Language, "gsw"),
            (Maritalstatus, "M"),
            (Maritalstatus, "UNK"),
        ] {
            assert!(in_value_set(e, ok), "{ok}");
        }
        for (e, bad) in [
            (Nationality, "de"),
            (Nationality, "XX"),
            (Nationality, "DEU"),
            (Language, "german"),
            (Language, "xx"),
            (Language, "de-"),
            (Maritalstatus, "C"),
            (Maritalstatus, "married"),
        ] {
            assert!(!in_value_set(e, bad), "{bad}");
        }
        assert!(in_value_set(IdatElement::Given, "anything"));
    }

    #[test]
    fn several_given_names_and_address_lines_are_repeated_elements() {
        let idat = Idat {
            given: Some("Anna|Maria".into()),
            address_line: Some("Hauptstr. 1|Hinterhaus".into()),
            ..Idat::default()
        };
        let (patient, _) = idat.to_patient(&[IdatElement::Given, IdatElement::AddressLine]);
        let json = crate::fhir::json::to_string(&patient);
        assert!(json.contains(r#""given":["Anna","Maria"]"#), "{json}");
        assert!(json.contains(r#""line":["Hauptstr. 1","Hinterhaus"]"#), "{json}");
        assert_eq!(Idat::from_patient(&patient), idat);
    }

    #[test]
    fn an_unknown_marital_status_is_a_null_flavor() {
        let mut idat = Idat::default();
        for (code, system) in [("UNK", SYSTEM_NULL_FLAVOR), ("M", SYSTEM_MARITAL)] {
            idat.maritalstatus = Some(code.into());
            let (patient, _) = idat.to_patient(&[IdatElement::Maritalstatus]);
            let coding = patient
                .node
                .node("maritalStatus")
                .and_then(|m| m.node("coding"))
                .unwrap();
            assert_eq!((coding.str("system"), coding.str("code")), (Some(system), Some(code)));
            assert_eq!(Idat::from_patient(&patient).maritalstatus.as_deref(), Some(code));
        }
    }

    #[test]
    fn all_elements_together_and_missing_ones_reported() {
        let idat = full();
        let (patient, _) = idat.to_patient(&IdatElement::ALL);
        assert_eq!(Idat::from_patient(&patient), idat);
        let partial = Idat {
            family: Some("X".into()),
            ..Idat::default()
        };
        let (patient, missing) = partial.to_patient(&[IdatElement::Family, IdatElement::Given]);
        assert_eq!(missing, vec![IdatElement::Given]);
        assert_eq!(Idat::from_patient(&patient).present(), vec![IdatElement::Family]);
    }

    #[test]
    fn codes_round_trip() {
        for e in IdatElement::ALL {
            assert_eq!(IdatElement::from_code(e.code()), Some(e));
        }
        assert_eq!(IdatElement::from_code("shoe-size"), None);
        assert_eq!(normalize_gender("W"), Some("female"));
        assert!(valid_birthdate("1965-12-03"));
        assert!(!valid_birthdate("1965-02-30"));
    }
}
