//! Tasks as the dispatcher writes them: the builders tests, the demo and
//! the benchmark queue with `Simulator::add_task`.

use super::*;

fn instant(t: DateTime<Utc>) -> Parameter {
    Parameter::primitive("expires", "instant", &t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

pub(super) fn bf_part(b64: &str) -> Parameter {
    Parameter::primitive("bloomfilter", "base64Binary", b64)
}

pub fn dic_psn_available(bf_b64: &str, target: &str, pseudonym: &str, expires: Option<DateTime<Utc>>) -> Parameter {
    let mut parts = Vec::new();
    if let Some(e) = expires {
        parts.push(instant(e));
    }
    parts.push(bf_part(bf_b64));
    parts.push(Parameter::identifier("target", Identifier::new(Some(GPAS), target)));
    parts.push(Parameter::identifier(
        "pseudonym",
        Identifier::new(Some(GPAS), pseudonym),
    ));
    Parameter::with_parts("dic_psn_available", parts)
}

/// The patient is named by pseudonym if `pseudonym` is given, else by Bloom filter.
pub fn send_idat(
    task_id: &str,
    expires: DateTime<Utc>,
    pseudonym: Option<&str>,
    bf_b64: Option<&str>,
    elements: &[IdatElement],
) -> Parameter {
    let mut parts = vec![instant(expires), Parameter::primitive("taskId", "id", task_id)];
    if let Some(p) = pseudonym {
        parts.push(Parameter::identifier("pseudonym", Identifier::new(Some(GPAS), p)));
    }
    if let Some(b) = bf_b64 {
        parts.push(bf_part(b));
    }
    for e in elements {
        parts.push(Parameter::coding(
            "element",
            Coding {
                system: Some(ELEMENTS_SYSTEM.into()),
                code: Some(e.code().into()),
                display: None,
            },
        ));
    }
    Parameter::with_parts("send_idat", parts)
}

pub fn repeat_request(study: &str, bf_b64: &str, target: &str, expires: Option<DateTime<Utc>>) -> Parameter {
    let mut parts = Vec::new();
    if let Some(e) = expires {
        parts.push(instant(e));
    }
    parts.push(Parameter::identifier("study", Identifier::new(Some(GPAS), study)));
    parts.push(bf_part(bf_b64));
    parts.push(Parameter::identifier("target", Identifier::new(Some(GPAS), target)));
    Parameter::with_parts("repeat_request", parts)
}
