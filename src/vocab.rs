//! The words the agent writes into its ledger and audit log: each kind of
//! audit record and each outcome is a variant here with its text in one
//! place, so code compares variants, never strings, and a test can check
//! that the README's audit section names every one. The text on disk is
//! what `as_str` returns and never changes for a variant: trust-centre
//! operators grep for it, and the audit chain hashes it.

use crate::tasks::TaskKind;

/// An enum of words, each with its text: `as_str`, `parse`, `ALL`, and
/// serde as that text.
macro_rules! words {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub const ALL: &[$name] = &[$($name::$variant,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The variant whose text `s` is.
            pub fn parse(s: &str) -> Option<$name> {
                match s {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        // (Ordered by their text, as the strings they replace were: reports
        // and metrics list them in the same order as before.)
        impl Ord for $name {
            fn cmp(&self, other: &$name) -> std::cmp::Ordering {
                self.as_str().cmp(other.as_str())
            }
        }

        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &$name) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $name::parse(&s).ok_or_else(|| {
                    serde::de::Error::custom(format!(concat!("unknown ", stringify!($name), " '{}'"), s))
                })
            }
        }
    };
}

words! {
    /// What became of a task, a poll or an operator's action: the ledger's
    /// `outcome` and the audit record's.
    Outcome {
        // A poll.
        Ok => "ok",
        ProtocolError => "protocol_error",
        // Tasks.
        Received => "received",
        Stored => "stored",
        Sent => "sent",
        /// An interrupted earlier attempt arrived.
        Delivered => "delivered",
        /// The pseudonym follows as a `dic_psn_available`.
        Clearing => "clearing",
        UnknownPatient => "unknown_patient",
        Expired => "expired",
        Duplicate => "duplicate",
        Rejected => "rejected",
        /// A refused send whose patient's data changed.
        Reopened => "reopened",
        Failed => "failed",
        /// A final error code or refusal: the task is closed.
        DispatcherError => "dispatcher_error",
        /// An error code the guide calls transient: retried after a delay.
        TransientError => "transient_error",
        /// An error code nobody knows: retried after a delay, then given up.
        UnknownError => "unknown_error",
        NotAttempted => "not_attempted",
        GaveUp => "gave_up",
        // Enrolment and filter updates.
        Enrolled => "enrolled",
        Updated => "updated",
        // Operators' actions.
        Purged => "purged",
        Pseudonyms => "pseudonyms",
        Erased => "erased",
        NotFound => "not_found",
        Undone => "undone",
        NotForgotten => "not_forgotten",
        Migrated => "migrated",
        StudyAssigned => "study_assigned",
        RestoreAccepted => "restore_accepted",
        BackedUp => "backed_up",
        // The local gPAS service: the operation answered, or why not.
        Pseudonymize => "pseudonymize",
        PseudonymizeAllowCreate => "pseudonymizeAllowCreate",
        DePseudonymize => "dePseudonymize",
        Refused => "refused",
    }
}

words! {
    /// What an audit record is about.
    AuditKind {
        Poll => "poll",
        DicPsnAvailable => "dic_psn_available",
        SendIdat => "send_idat",
        RepeatRequest => "repeat_request",
        /// A task whose kind the agent does not know (only ever rejected).
        UnknownTask => "unknown",
        Enroll => "enroll",
        UpdateBf => "update_bf",
        Purge => "purge",
        Export => "export",
        Gpas => "gpas",
        Forget => "forget",
        Store => "store",
    }
}

impl From<TaskKind> for AuditKind {
    fn from(k: TaskKind) -> AuditKind {
        match k {
            TaskKind::DicPsnAvailable => AuditKind::DicPsnAvailable,
            TaskKind::SendIdat => AuditKind::SendIdat,
            TaskKind::RepeatRequest => AuditKind::RepeatRequest,
            TaskKind::Unknown => AuditKind::UnknownTask,
        }
    }
}

impl Outcome {
    /// A ledger entry with this outcome waits before it is tried again
    /// (`[dispatcher] retry_delay`).
    pub(crate) fn backs_off(self) -> bool {
        matches!(self, Outcome::TransientError | Outcome::UnknownError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_reads_back_as_itself_and_no_two_share_a_text() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse(o.as_str()), Some(*o));
            let json = serde_json::to_string(o).unwrap();
            assert_eq!(serde_json::from_str::<Outcome>(&json).unwrap(), *o);
        }
        for k in AuditKind::ALL {
            assert_eq!(AuditKind::parse(k.as_str()), Some(*k));
        }
        let mut texts: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        texts.sort_unstable();
        texts.dedup();
        assert_eq!(texts.len(), Outcome::ALL.len());
        assert!(serde_json::from_str::<Outcome>("\"nonsense\"").is_err());
    }

    #[test]
    fn task_kinds_keep_their_text_in_the_audit_log() {
        for k in [
            TaskKind::DicPsnAvailable,
            TaskKind::SendIdat,
            TaskKind::RepeatRequest,
            TaskKind::Unknown,
        ] {
            assert_eq!(AuditKind::from(k).as_str(), k.as_str());
        }
    }
}
