//! Logging to stderr and, if configured, a file; as text for people or as
//! JSON lines for ELK/Graylog. Only fttp-agent's own records are emitted, so
//! no dependency can log a request header. SIGHUP makes the file reopen on
//! its next line, for logrotate.

use chrono::{SecondsFormat, Utc};
use log::{Level, LevelFilter, Log, Metadata, Record};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

static REOPEN: OnceLock<Arc<AtomicBool>> = OnceLock::new();

fn reopen_flag() -> &'static Arc<AtomicBool> {
    REOPEN.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Reopen the log file on SIGHUP (logrotate's postrotate).
pub(crate) fn reopen_on_sighup() -> std::io::Result<()> {
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(reopen_flag())).map(|_| ())
}

struct Logger {
    level: LevelFilter,
    format: LogFormat,
    color: bool,
    file: Option<Mutex<(PathBuf, File)>>,
}

fn open(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    OpenOptions::new().append(true).create(true).mode(0o600).open(path)
}

/// Splits the per-task context `[kind id] rest` off a message.
fn task_context(msg: &str) -> (Option<&str>, Option<&str>, &str) {
    if let Some(rest) = msg.strip_prefix('[')
        && let Some((ctx, tail)) = rest.split_once("] ")
    {
        let mut it = ctx.splitn(2, ' ');
        return (it.next(), it.next(), tail);
    }
    (None, None, msg)
}

impl Logger {
    fn line(&self, record: &Record<'_>, color: bool) -> String {
        let ts = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let msg = record.args().to_string();
        match self.format {
            // (JSON escapes control characters itself.)
            LogFormat::Json => {
                let (kind, task, text) = task_context(&msg);
                let mut m = serde_json::Map::new();
                m.insert("ts".into(), ts.into());
                m.insert("level".into(), record.level().as_str().into());
                m.insert("message".into(), text.into());
                if let Some(k) = kind {
                    m.insert("kind".into(), k.into());
                }
                if let Some(t) = task {
                    m.insert("task".into(), t.into());
                }
                serde_json::Value::Object(m).to_string()
            }
            LogFormat::Text => {
                let msg = crate::privacy::escape_controls(&msg);
                let level = record.level().as_str();
                if color {
                    let c = match record.level() {
                        Level::Error => "31",
                        Level::Warn => "33",
                        Level::Info => "34",
                        _ => "36",
                    };
                    format!("{ts} \x1b[{c}m{level:<5}\x1b[0m {msg}")
                } else {
                    format!("{ts} {level:<5} {msg}")
                }
            }
        }
    }
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level && m.target().starts_with("fttp_agent")
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        eprintln!("{}", self.line(record, self.color));
        if let Some(file) = &self.file {
            let mut guard = crate::lock(file);
            if reopen_flag().swap(false, Ordering::SeqCst)
                && let Ok(f) = open(&guard.0)
            {
                guard.1 = f;
            }
            let line = self.line(record, false) + "\n";
            let _ = guard.1.write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

pub fn init(level: LevelFilter, file: Option<&Path>, format: LogFormat) -> Result<(), String> {
    let file = match file {
        Some(p) => Some(Mutex::new((
            p.to_path_buf(),
            open(p).map_err(|e| format!("cannot open log file {}: {e}", p.display()))?,
        ))),
        None => None,
    };
    let logger = Logger {
        level,
        format,
        color: format == LogFormat::Text && std::io::stderr().is_terminal(),
        file,
    };
    // A second init (a command calling another) keeps the first logger.
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn task_context_is_split_off() {
        assert_eq!(
            super::task_context("[send_idat t-1] sent: 2 missing"),
            (Some("send_idat"), Some("t-1"), "sent: 2 missing")
        );
        assert_eq!(super::task_context("polling"), (None, None, "polling"));
    }
}
