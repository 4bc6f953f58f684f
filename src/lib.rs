//! fttp-agent: the site-side agent for the THS Greifswald fTTP dispatcher.
//!
//! Module map: `config` (TOML, env, validation) -> `client` (dispatcher
//! operations over HTTP) -> `tasks` (typed tasks from `Parameters`) ->
//! `agent` (one cycle: poll, resolve, record) with `store` (crash-safe local
//! state) and `audit` (outcome log). `fhir` holds the wire formats, `sim` the
//! simulated dispatcher used by `demo` and the tests.

#![forbid(unsafe_code)]

pub mod agent;
pub mod audit;
pub mod auth;
pub mod bloom;
pub mod client;
pub mod commands;
pub mod config;
pub mod crashpoint;
pub mod crypto;
pub mod demo;
pub mod duration;
pub mod enroll;
pub mod error;
pub mod exit;
pub mod fhir;
pub mod fsutil;
pub mod fxhash;
pub mod harden;
pub mod import;
pub mod logger;
pub mod net;
pub mod owner;
pub mod pace;
pub mod page;
pub mod privacy;
pub mod progress;
pub mod report;
pub mod retry;
pub mod secret_file;
pub mod serve;
pub mod shutdown;
pub mod sim;
pub mod store;
pub mod tasks;
pub mod types;
pub mod vocab;

/// Locks a mutex, carrying on past a poisoned one: the data behind our
/// locks (a log file, a token cache, the simulator's state) stays usable
/// after a panic elsewhere.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
