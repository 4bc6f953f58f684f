//! Reading and writing `Parameters` documents: the fast paths for the
//! dispatcher's usual shapes, the generic element tree for anything else.
//! Above the types (`parameters`) and both readers (`json`/`xml` and
//! `fast`), so none of them needs to know about the other.

use super::parameters::Parameters;
use super::{FhirError, Format};

impl Parameters {
    /// Reads a Parameters document: the fast path for the common shape,
    /// the generic element tree for anything else (same result either way).
    pub fn parse(format: Format, body: &[u8]) -> Result<Parameters, FhirError> {
        // JSON is counted before serde builds anything; the XML scanner
        // bounds what it builds itself, so the usual document is read once
        // (the generic reader counts before it parses).
        match format {
            Format::Json => {
                super::limits::check(format, body)?;
                match super::fast::parameters_json(body) {
                    Some(p) => Ok(p),
                    // (Counted already: not a second time.)
                    None => Parameters::from_resource(&super::json::parse(body)?),
                }
            }
            Format::Xml => match super::fast::parameters_xml(body) {
                Some(p) => Ok(p),
                None => Parameters::parse_generic(format, body),
            },
        }
    }

    /// The generic reader alone (the reference the fast paths are tested against).
    pub fn parse_generic(format: Format, body: &[u8]) -> Result<Parameters, FhirError> {
        Parameters::from_resource(&super::parse_resource(format, body)?)
    }

    pub fn to_json(&self) -> String {
        super::fast::write_json(self).unwrap_or_else(|| super::json::to_string(&self.to_resource()))
    }

    pub fn to_xml(&self) -> String {
        super::fast::write_xml(self).unwrap_or_else(|| super::xml::to_string(&self.to_resource()))
    }

    pub fn write(&self, format: Format) -> String {
        match format {
            Format::Json => self.to_json(),
            Format::Xml => self.to_xml(),
        }
    }
}
