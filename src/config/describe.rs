//! What `check` prints: every effective setting, secrets only as set/unset.

use super::*;

impl Config {
    /// What `check` prints: every effective setting, secrets shown only as set/unset.
    pub(crate) fn describe(&self) -> Vec<(String, String)> {
        let d = &self.dispatcher;
        let fmt_dur = |h: &HumanDuration| format_duration(h.0);
        let mut out: Vec<(String, String)> = vec![
            ("dispatcher.url".into(), d.url.0.clone()),
            (
                "dispatcher.api_key".into(),
                if d.api_key.is_some() {
                    "set (hidden)".into()
                } else {
                    "unset".into()
                },
            ),
            ("dispatcher.api_key_header".into(), d.api_key_header.0.clone()),
            (
                "dispatcher.api_key_in".into(),
                format!("{:?}", d.api_key_in).to_lowercase(),
            ),
            ("dispatcher.format".into(), format!("{:?}", d.format).to_lowercase()),
            ("dispatcher.timeout".into(), fmt_dur(&d.timeout)),
            ("dispatcher.batch_size".into(), d.batch_size.0.to_string()),
            ("dispatcher.max_in_flight".into(), d.max_in_flight.0.to_string()),
            ("dispatcher.max_attempts".into(), d.max_attempts.0.to_string()),
            ("dispatcher.retry_delay".into(), fmt_dur(&d.retry_delay)),
            ("dispatcher.max_task_attempts".into(), d.max_task_attempts.0.to_string()),
            ("dispatcher.max_task_age".into(), fmt_dur(&d.max_task_age)),
            (
                "dispatcher.bloomfilter_form".into(),
                match d.bloomfilter_form {
                    BloomfilterForm::Plain => "plain".into(),
                    BloomfilterForm::WithVersion => "with_version".into(),
                },
            ),
            ("dispatcher.max_response_bytes".into(), d.max_response_bytes.to_string()),
            (
                "dispatcher.ca_file".into(),
                d.ca_file
                    .as_ref()
                    .map_or("unset (system roots)".into(), |p| p.display().to_string()),
            ),
            (
                "dispatcher.client_cert".into(),
                d.client_cert
                    .as_ref()
                    .map_or("unset".into(), |p| p.display().to_string()),
            ),
            (
                "dispatcher.proxy".into(),
                if d.proxy.is_some() {
                    "set (hidden)".into()
                } else {
                    "from environment, if any".into()
                },
            ),
            (
                "dispatcher.auth".into(),
                if d.auth.token_url.is_some() {
                    if d.auth.username.is_some() {
                        "oauth2 password grant"
                    } else {
                        "oauth2 client credentials"
                    }
                } else if d.auth.basic_user.is_some() {
                    "http basic"
                } else {
                    "api key only"
                }
                .into(),
            ),
            (
                "studies".into(),
                self.studies
                    .iter()
                    .map(|s| format!("{} (target {})", s.name, s.target))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            ("schedule.interval".into(), fmt_dur(&self.schedule.interval)),
            ("schedule.warn_before".into(), fmt_dur(&self.schedule.warn_before)),
            (
                "schedule.critical_failed_polls".into(),
                self.schedule.critical_failed_polls.to_string(),
            ),
            ("store.retention".into(), fmt_dur(&self.store.retention)),
            ("store.path".into(), self.store.path.display().to_string()),
            (
                "store.key_file".into(),
                self.store
                    .key_file
                    .as_ref()
                    .map_or("unset".into(), |p| p.display().to_string()),
            ),
            (
                "log.file".into(),
                self.log
                    .file
                    .as_ref()
                    .map_or("(stderr only)".into(), |p| p.display().to_string()),
            ),
            ("log.level".into(), format!("{:?}", self.log.level).to_lowercase()),
            ("log.format".into(), format!("{:?}", self.log.format).to_lowercase()),
            (
                "log.metrics".into(),
                self.log
                    .metrics
                    .as_ref()
                    .map_or("unset".into(), |p| p.display().to_string()),
            ),
            ("log.audit".into(), self.audit_path().display().to_string()),
            (
                "log.audit_hmac_key_file".into(),
                self.log
                    .audit_hmac_key_file
                    .as_ref()
                    .map_or("unset (SHA-256 chain)".into(), |p| p.display().to_string()),
            ),
            (
                "log.report".into(),
                self.log
                    .report
                    .as_ref()
                    .map_or("unset".into(), |p| p.display().to_string()),
            ),
        ];
        match &self.bloomfilter {
            None => out.push(("bloomfilter".into(), "unset (filters come with the import)".into())),
            Some(b) => {
                let fields: Vec<String> = b
                    .fields
                    .iter()
                    .map(|f| {
                        let src: Vec<&str> = f.source.elements().iter().map(|e| e.code()).collect();
                        format!("{} <- {}", f.name, src.join("+"))
                    })
                    .collect();
                out.extend([
                    (
                        "bloomfilter.length".into(),
                        format!(
                            "{} ({})",
                            b.length,
                            if b.balanced { "balanced" } else { "not balanced" }
                        ),
                    ),
                    (
                        "bloomfilter.random_position_number".into(),
                        b.random_position_number.to_string(),
                    ),
                    (
                        "bloomfilter.vocabulary".into(),
                        format!("{} characters", b.vocabulary.chars().count()),
                    ),
                    ("bloomfilter.fields".into(), fields.join(", ")),
                    (
                        "bloomfilter.seeds_file".into(),
                        format!("{} (seeds hidden)", b.seeds_file.display()),
                    ),
                    (
                        "bloomfilter.version".into(),
                        b.version.clone().unwrap_or_else(|| "unset".into()),
                    ),
                ]);
            }
        }
        match &self.serve {
            None => out.push(("serve".into(), "unset (no local service)".into())),
            Some(s) => out.extend(s.describe()),
        }
        out
    }
}
