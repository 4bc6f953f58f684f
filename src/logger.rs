//! Human-readable logging to stderr and, if configured, a file.

use simplelog::{
    ColorChoice, CombinedLogger, ConfigBuilder, LevelFilter, SharedLogger, TermLogger, TerminalMode, WriteLogger,
};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

pub fn init(level: LevelFilter, file: Option<&Path>) -> Result<(), String> {
    let config = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        // Dependencies (HTTP, TLS) log request details at debug/trace level;
        // only our own crate logs, so nothing of theirs can leak headers.
        .add_filter_allow_str("fttp_agent")
        .build();
    let mut loggers: Vec<Box<dyn SharedLogger>> = vec![TermLogger::new(
        level,
        config.clone(),
        TerminalMode::Stderr,
        ColorChoice::Auto,
    )];
    if let Some(path) = file {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("cannot create log directory {}: {e}", dir.display()))?;
        }
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
        loggers.push(WriteLogger::new(level, config, f));
    }
    // A second init (tests calling commands twice) keeps the first logger.
    let _ = CombinedLogger::init(loggers);
    Ok(())
}
