//! Performance at re-keying scale. Run: `scripts/bench.sh` (or
//! `cargo bench --bench perf [-- quick]`). Prints one table of figures;
//! nothing here asserts: the README's Performance section records a run.
//!
//! 1. Parse throughput of `$requestTasks` answers (Parameters -> typed
//!    tasks), JSON and XML, next to the raw floor on the same bytes.
//! 2. A full cycle of 100k tasks against the simulator on loopback, with
//!    batching and with batch_size = 1.
//! 3. The store with 1M patients: open time, peak RSS, lookups; import rate.
//! 4. Bloom filter encoding (records/s on one core), with and without the
//!    normalisation of `config.example.toml`.
//! 5. Peak memory of one poll (`run --once --dry-run`) for a real 100k-task
//!    answer and for hostile answers, next to the answer's size.
//! 7. At WAN latency (the simulator delays every answer by 20 ms): 2,000
//!    `send_idat`, a 100,000-task cycle and `enroll` of 100,000 patients,
//!    with `max_in_flight` at its default (4).
//! 6. The local gPAS service (`serve`, release binary) on a 1M-patient
//!    store: latency of `$pseudonymize` with 1,000 originals, and requests
//!    per second from several clients.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{Duration, Utc};
use fttp_agent::crypto::StoreKey;
use fttp_agent::demo::sample_bloomfilter;
use fttp_agent::fhir::idat::IdatElement;
use fttp_agent::fhir::{Format, Parameter, Parameters};
use fttp_agent::sim::{self, SimOptions, Simulator};
use fttp_agent::store::{LockMode, PseudonymRecord, Record, Store};
use fttp_agent::tasks::{Scope, parse_answer};
use fttp_agent::types::{BloomFilter, Pseudonym};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const STUDY: &str = "mii";
const TARGET: &str = "dic_bench";
const KEY: &str = "bench-key";

fn bf(n: u32) -> String {
    sample_bloomfilter(n).to_base64()
}

/// A `$requestTasks` answer as at a re-keying: 99.8% repeat_request,
/// 0.1% send_idat, 0.1% dic_psn_available.
fn tasks(n: u32) -> Vec<Parameter> {
    let later = Utc::now() + Duration::days(2);
    (0..n)
        .map(|i| match i % 1000 {
            0 => sim::send_idat(
                &format!("task-{i}"),
                later,
                None,
                Some(&bf(i)),
                &[IdatElement::Given, IdatElement::Family, IdatElement::Birthdate],
            ),
            1 => sim::dic_psn_available(&bf(i), TARGET, &format!("mii_{i:08}"), None),
            _ => sim::repeat_request(STUDY, &bf(i), TARGET, Some(later)),
        })
        .collect()
}

fn mb_per_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

/// Runs the functions in turn, round after round, for about `budget`
/// seconds in all; seconds per run of each. Interleaving makes the ratios
/// between them robust against the machine's speed changing meanwhile
/// (other load, frequency scaling).
fn time_interleaved(budget: f64, fs: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    for f in fs.iter_mut() {
        f(); // warm-up
    }
    let mut spent = vec![0.0f64; fs.len()];
    let mut rounds = 0u32;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < budget || rounds < 3 {
        for (f, t) in fs.iter_mut().zip(spent.iter_mut()) {
            let s = Instant::now();
            f();
            *t += s.elapsed().as_secs_f64();
        }
        rounds += 1;
    }
    spent.iter().map(|t| t / f64::from(rounds)).collect()
}

fn xml_floor(bytes: &[u8]) -> usize {
    let mut r = quick_xml::Reader::from_reader(bytes);
    let mut n = 0;
    loop {
        match r.read_event() {
            Ok(quick_xml::events::Event::Eof) | Err(_) => break,
            Ok(_) => n += 1,
        }
    }
    n
}

fn parse_section(sizes: &[u32]) {
    println!("\n## 1. Parse throughput: $requestTasks answer -> typed tasks (same bytes, same run)\n");
    println!("| tasks | format | size MB | raw floor MB/s | Parameters MB/s | typed tasks MB/s | ratio |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    let scope = Scope {
        study: STUDY,
        target: TARGET,
    };
    for &n in sizes {
        let p = Parameters::new(tasks(n));
        for format in [Format::Json, Format::Xml] {
            let text = p.write(format);
            let bytes = text.as_bytes();
            let budget = if n >= 100_000 { 6.0 } else { 2.0 };
            let mut floor_run = || match format {
                Format::Json => {
                    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
                    std::hint::black_box(v);
                }
                Format::Xml => {
                    std::hint::black_box(xml_floor(bytes));
                }
            };
            let mut params_run = || {
                std::hint::black_box(Parameters::parse(format, bytes).unwrap());
            };
            // What the agent does with an answer (`Client::request_tasks`).
            let mut typed_run = || {
                let tasks = parse_answer(format, bytes, &scope).unwrap();
                assert_eq!(tasks.len(), n as usize);
                std::hint::black_box(tasks);
            };
            let times = time_interleaved(budget, &mut [&mut floor_run, &mut params_run, &mut typed_run]);
            let (floor, params_only, typed) = (times[0], times[1], times[2]);
            println!(
                "| {n} | {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0}% |",
                if format == Format::Json { "JSON" } else { "XML" },
                bytes.len() as f64 / 1e6,
                mb_per_s(bytes.len(), floor),
                mb_per_s(bytes.len(), params_only),
                mb_per_s(bytes.len(), typed),
                100.0 * floor / typed
            );
        }
    }
}

fn bench_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Patients for the send_idat and dic_psn_available tasks of `tasks(n)`.
fn patients_csv(path: &Path, ids: impl Iterator<Item = u32>) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(f, "local_id,bloomfilter,given,family,birthdate,gender,address_city").unwrap();
    for i in ids {
        writeln!(
            f,
            "p{i},{},Vorname{i},Nachname{},19{:02}-0{}-1{},{},Stadt{}",
            bf(i),
            i % 977,
            i % 100,
            1 + i % 9,
            i % 10,
            if i % 2 == 0 { "f" } else { "m" },
            i % 331
        )
        .unwrap();
    }
}

fn write_config(dir: &Path, url: &str, batch: usize) -> PathBuf {
    write_config_with(dir, url, batch, "")
}

/// `extra`: more `[dispatcher]` lines.
fn write_config_with(dir: &Path, url: &str, batch: usize, extra: &str) -> PathBuf {
    StoreKey::generate(&dir.join("store.key")).unwrap_or(());
    let text = format!(
        "[dispatcher]\nurl = \"{url}\"\napi_key = \"{KEY}\"\nformat = \"xml\"\ntimeout = \"120s\"\nbatch_size = {batch}\n\
         max_attempts = 1\n{extra}\n[site]\nstudy = \"{STUDY}\"\ntarget = \"{TARGET}\"\n\n[store]\npath = \"store\"\n\
         key_file = \"store.key\"\n\n[log]\nlevel = \"info\"\naudit = \"audit.ndjson\"\n"
    );
    let path = dir.join("fttp-agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the release binary under GNU time: (wall seconds, peak RSS MB, exit code).
///
/// `BENCH_WRAP="perf record -g -o /tmp/perf.data"` runs the binary under a
/// profiler (the wrapper's own time is then included).
fn timed(args: &[&str]) -> (f64, f64, i32) {
    let (wall, rss, code, _) = timed_with_log(args);
    (wall, rss, code)
}

/// `cmd` without the `FTTP_AGENT_*` variables of the shell that runs the
/// benchmark: a measured run uses only the configuration it writes.
fn without_agent_env(cmd: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("FTTP_AGENT_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// `timed`, also returning what the binary wrote to stderr (its log).
fn timed_with_log(args: &[&str]) -> (f64, f64, i32, String) {
    let wrap = std::env::var("BENCH_WRAP").unwrap_or_default();
    let out = without_agent_env(&mut Command::new("/usr/bin/time"))
        .args(["-f", "TIME %e %M %U %S"])
        .args(wrap.split_whitespace())
        .arg(env!("CARGO_BIN_EXE_fttp-agent"))
        .args(args)
        .output()
        .expect("GNU time at /usr/bin/time");
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().rev().find(|l| l.starts_with("TIME ")).unwrap_or("TIME 0 0");
    let mut it = line.split_whitespace().skip(1);
    let wall: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let rss: f64 = it.next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 1024.0;
    if std::env::var_os("BENCH_TRACE").is_some() {
        eprintln!(
            "cpu user {} s, sys {} s",
            it.next().unwrap_or("?"),
            it.next().unwrap_or("?")
        );
    }
    let code = out.status.code().unwrap_or(-1);
    if code != 0 || std::env::var_os("BENCH_TRACE").is_some() {
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| !l.contains("] stored") && !l.contains("] sent"))
            .collect();
        eprintln!("{}", lines.join("\n"));
    }
    (wall, rss, code, err.into_owned())
}

/// The seconds of one phase in a cycle's summary line (`cycle done: …
/// (2.06 s: poll 0.28, ledger 0.33, tasks 1.22, end 0.23)`).
fn phase_seconds(log: &str, phase: &str) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.contains("cycle done"))?;
    let (_, phases) = line.rsplit_once(" s: ")?;
    phases
        .trim_end_matches(')')
        .split(", ")
        .find_map(|p| p.strip_prefix(phase)?.strip_prefix(' ')?.parse().ok())
}

/// CPU seconds (user + system) of this process so far: during a cycle,
/// the simulator's share of the two cores.
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime and
    // stime are the 12th and 13th, in clock ticks (100 per second here).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

/// Runs of each batched cycle (the median is reported): this VM's speed
/// changes by a third from run to run, and one batched cycle is short.
/// The unbatched cycle, ten times longer, runs once.
const BATCHED_RUNS: usize = 3;

fn cycle_section(n: u32, batch_sizes: &[usize]) {
    println!("\n## 2. One cycle of {n} tasks against the simulator on loopback (release binary)\n");
    println!("| batch_size | wall s | tasks phase s | HTTP requests | TCP connections | peak RSS MB | exit |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut walls = Vec::new();
    let mut tasks_phases = Vec::new();
    for &batch in batch_sizes {
        let runs = if batch > 1 { BATCHED_RUNS } else { 1 };
        let mut results: Vec<(f64, f64, i32, usize, usize, f64)> = (0..runs).map(|_| one_cycle(n, batch)).collect();
        results.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (wall, rss, code, requests, connections, tasks) = results[results.len() / 2];
        let spread = match results.len() {
            1 => String::new(),
            _ => format!(
                " (median of {runs}: {})",
                results
                    .iter()
                    .map(|r| format!("{:.2}", r.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        println!("| {batch} | {wall:.2}{spread} | {tasks:.2} | {requests} | {connections} | {rss:.0} | {code} |");
        walls.push(wall);
        tasks_phases.push(tasks);
    }
    if walls.len() == 2 && walls[0] > 0.0 {
        println!("\nbatching speed-up: {:.1}x", walls[1] / walls[0]);
        // (The median run's tasks phase: the requests and their
        // bookkeeping, without the poll, ledger and compaction that
        // batching does not touch.)
        println!(
            "batching speed-up of the tasks phase alone: {:.1}x",
            tasks_phases[1] / tasks_phases[0]
        );
    }
}

/// One timed `run --once` of `n` tasks against a fresh simulator and store:
/// (wall s, peak RSS MB, exit code, HTTP requests, TCP connections, tasks
/// phase s (NaN if the log has no summary line)).
fn one_cycle(n: u32, batch: usize) -> (f64, f64, i32, usize, usize, f64) {
    let dir = bench_dir(&format!("cycle-{batch}"));
    let sim = Simulator::start(SimOptions {
        api_key: KEY.into(),
        ..SimOptions::default()
    })
    .unwrap();
    for t in tasks(n) {
        sim.add_task(t);
    }
    let config = write_config(&dir, sim.url(), batch);
    let csv = dir.join("patients.csv");
    patients_csv(&csv, (0..n).filter(|i| i % 1000 < 2));
    let cfg = config.to_str().unwrap();
    let (_, _, code) = timed(&["--config", cfg, "import", csv.to_str().unwrap()]);
    assert_eq!(code, 0);
    // Whatever earlier runs left for the kernel to write back goes to
    // disk first, not into this cycle's fsyncs.
    let _ = Command::new("sync").status();
    let sim_cpu = own_cpu_seconds();
    let (wall, rss, code, log) = timed_with_log(&["--config", cfg, "run", "--once"]);
    if std::env::var_os("BENCH_TRACE").is_some() {
        eprintln!("simulator cpu {:.2} s", own_cpu_seconds() - sim_cpu);
    }
    let tasks = phase_seconds(&log, "tasks").unwrap_or(f64::NAN);
    let st = sim.state();
    (wall, rss, code, st.received.len(), st.connections, tasks)
}

/// Child mode: open the store, look up, report. A fresh process, so the
/// peak RSS is the store's alone.
fn store_child(dir: &Path, n: u32) {
    let key = StoreKey::load(&dir.join("store.key")).unwrap();
    let start = Instant::now();
    let store = Store::open(&dir.join("store"), LockMode::Try, key).unwrap();
    let open = start.elapsed().as_secs_f64();
    assert_eq!(store.patient_count().unwrap(), n as usize);
    let probes: Vec<BloomFilter> = (0..10_000u32)
        .map(|i| sample_bloomfilter((i.wrapping_mul(7919)) % n))
        .collect();
    let start = Instant::now();
    for p in &probes {
        assert!(store.patient_by_bloomfilter(p).unwrap().is_some());
    }
    let by_bf = start.elapsed().as_secs_f64() / probes.len() as f64;
    let start = Instant::now();
    let mut found = 0;
    for i in 0..10_000u32 {
        let id = (i.wrapping_mul(7919)) % (n / 10);
        if store
            .patient_by_pseudonym(STUDY, &format!("mii_{id:08}"))
            .unwrap()
            .is_some()
        {
            found += 1;
        }
    }
    assert_eq!(found, 10_000);
    let by_psn = start.elapsed().as_secs_f64() / 10_000.0;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    println!("CHILD {open} {} {} {}", hwm_kb / 1024.0, by_bf * 1e6, by_psn * 1e6);
}

fn store_section(n: u32, import_rows: u32) {
    println!("\n## 3. Store with {n} patients\n");
    let dir = bench_dir("store");
    StoreKey::generate(&dir.join("store.key")).unwrap();
    // Import rate, through the real import path.
    let csv = dir.join("patients.csv");
    patients_csv(&csv, 0..import_rows);
    {
        let key = StoreKey::load(&dir.join("store.key")).unwrap();
        let mut store = Store::open(&dir.join("store"), LockMode::Try, key).unwrap();
        // (Only the import's own time: the store exists already.)
        let start = Instant::now();
        let r = fttp_agent::import::import_file(&mut store, &csv, None).unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(r.added, import_rows as usize);
        println!(
            "import: {import_rows} CSV rows in {secs:.2} s = {:.0} rows/s",
            f64::from(import_rows) / secs
        );
        // The rest of the patients, and pseudonyms for a tenth of all.
        let csv2 = dir.join("rest.csv");
        patients_csv(&csv2, import_rows..n);
        fttp_agent::import::import_file(&mut store, &csv2, None).unwrap();
        add_pseudonyms(&mut store, n / 10);
    }
    let size: u64 = std::fs::read_dir(dir.join("store"))
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    // Three fresh processes: the first open follows the import's writes,
    // and the machine's noise shows in the spread.
    let runs: Vec<Vec<f64>> = (0..3)
        .map(|_| {
            let out = Command::new(std::env::current_exe().unwrap())
                .env("FTTP_BENCH_CHILD", format!("{}:{n}", dir.display()))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text
                .lines()
                .find(|l| l.starts_with("CHILD "))
                .unwrap_or("CHILD 0 0 0 0");
            line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect()
        })
        .collect();
    let v = &runs[runs.len() - 1];
    println!("store files: {:.0} MB", size as f64 / 1e6);
    let opens: Vec<String> = runs.iter().map(|r| format!("{:.1}", r[0] * 1e3)).collect();
    let rss = runs.iter().map(|r| r[1]).fold(0.0, f64::max);
    println!(
        "open: {} ms (three processes), peak RSS of open + 20,000 lookups {rss:.0} MB",
        opens.join(" / ")
    );
    println!(
        "lookup by Bloom filter: {:.1} us, by pseudonym: {:.1} us (each decrypts the record)",
        v[2], v[3]
    );
    // A cycle of 1,000 tasks on this store, in the release binary.
    let sim = Simulator::start(SimOptions {
        api_key: KEY.into(),
        ..SimOptions::default()
    })
    .unwrap();
    for t in tasks(1_000) {
        sim.add_task(t);
    }
    let config = write_config(&dir, sim.url(), 100);
    let (wall, rss, code) = timed(&["--config", config.to_str().unwrap(), "run", "--once"]);
    println!("cycle of 1,000 tasks on this store: {wall:.2} s, peak RSS {rss:.0} MB (exit {code})");
}

/// A simulator that delays every answer by `latency`.
fn wan_sim(latency: std::time::Duration) -> Simulator {
    Simulator::start(SimOptions {
        api_key: KEY.into(),
        latency,
        ..SimOptions::default()
    })
    .unwrap()
}

/// One timed `run --once` of `tasks` against a simulator at `latency`, with
/// `extra` dispatcher settings: (wall s, peak RSS MB, exit, requests, most
/// requests in flight at once).
fn wan_cycle(
    name: &str,
    tasks: Vec<Parameter>,
    patients: impl Iterator<Item = u32>,
    latency: std::time::Duration,
    extra: &str,
) -> (f64, f64, i32, usize, usize) {
    let dir = bench_dir(name);
    let sim = wan_sim(latency);
    for t in tasks {
        sim.add_task(t);
    }
    let config = write_config_with(&dir, sim.url(), 100, extra);
    let csv = dir.join("patients.csv");
    patients_csv(&csv, patients);
    let cfg = config.to_str().unwrap();
    let (_, _, code) = timed(&["--config", cfg, "import", csv.to_str().unwrap()]);
    assert_eq!(code, 0);
    let _ = Command::new("sync").status();
    let sim_cpu = own_cpu_seconds();
    let (wall, rss, code) = timed(&["--config", cfg, "run", "--once"]);
    if std::env::var_os("BENCH_TRACE").is_some() {
        eprintln!("simulator cpu {:.2} s", own_cpu_seconds() - sim_cpu);
    }
    let st = sim.state();
    (wall, rss, code, st.received.len(), st.max_in_flight)
}

fn wan_section(quick: bool) {
    let latency = std::time::Duration::from_millis(20);
    println!("\n## 7. At WAN latency: every answer delayed by 20 ms (release binary, max_in_flight 4)\n");
    println!("| case | wall s | requests | most in flight | peak RSS MB | exit |");
    println!("|---|---:|---:|---:|---:|---:|");
    // BENCH_WAN_CASE=send|cycle|enroll runs one case (to profile it).
    let case = std::env::var("BENCH_WAN_CASE").unwrap_or_default();
    let run = |c: &str| case.is_empty() || case == c;
    let sends = if quick { 500u32 } else { 2_000 };
    let later = Utc::now() + Duration::days(2);
    let send_tasks = |n: u32| -> Vec<Parameter> {
        (0..n)
            .map(|i| {
                sim::send_idat(
                    &format!("task-{i}"),
                    later + Duration::seconds(i64::from(i)),
                    None,
                    Some(&bf(i)),
                    &[IdatElement::Given, IdatElement::Family, IdatElement::Birthdate],
                )
            })
            .collect()
    };
    let mut cases: Vec<(String, u32, &str)> = vec![(format!("{sends} send_idat"), sends, "")];
    if std::env::var_os("BENCH_WAN_SERIAL").is_some() {
        cases.push((
            format!("{sends} send_idat, max_in_flight 1"),
            sends,
            "max_in_flight = 1",
        ));
    }
    for (name, n, extra) in cases.into_iter().filter(|_| run("send")) {
        let (wall, rss, code, requests, most) = wan_cycle("wan-send", send_tasks(n), 0..n, latency, extra);
        println!("| {name} | {wall:.2} | {requests} | {most} | {rss:.0} | {code} |");
    }
    let n = if quick { 10_000 } else { 100_000 };
    if run("cycle") {
        let (wall, rss, code, requests, most) =
            wan_cycle("wan-cycle", tasks(n), (0..n).filter(|i| i % 1000 < 2), latency, "");
        println!(
            "| cycle of {n} tasks (re-keying mix, batch_size 100) | {wall:.2} | {requests} | {most} | {rss:.0} | {code} |"
        );
    }
    if !run("enroll") {
        return;
    }
    // enroll: every patient has a filter and no pseudonym yet.
    let dir = bench_dir("wan-enroll");
    let sim = wan_sim(latency);
    let config = write_config(&dir, sim.url(), 100);
    let csv = dir.join("patients.csv");
    patients_csv(&csv, 0..n);
    let cfg = config.to_str().unwrap();
    let (_, _, code) = timed(&["--config", cfg, "import", csv.to_str().unwrap()]);
    assert_eq!(code, 0);
    let _ = Command::new("sync").status();
    let (wall, rss, code) = timed(&["--config", cfg, "enroll"]);
    let st = sim.state();
    println!(
        "| enroll of {n} patients (batch_size 100) | {wall:.2} | {} | {} | {rss:.0} | {code} |",
        st.received.len(),
        st.max_in_flight
    );
}

/// Starts the release binary's `serve` on `config` and returns it with
/// its base URL (read from its log on stderr).
fn start_service(config: &Path) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = without_agent_env(&mut Command::new(env!("CARGO_BIN_EXE_fttp-agent")))
        .arg("--config")
        .arg(config)
        .arg("serve")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some((_, url)) = line.split_once("local service listening on ") {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let url = rx.recv_timeout(std::time::Duration::from_secs(60)).unwrap();
    (child, url)
}

fn serve_section(n: u32, seconds: u64) {
    println!("\n## 6. Local gPAS service on a store with {n} patients\n");
    let dir = bench_dir("serve");
    StoreKey::generate(&dir.join("store.key")).unwrap();
    let with_psn = n / 10;
    {
        let key = StoreKey::load(&dir.join("store.key")).unwrap();
        let mut store = Store::open(&dir.join("store"), LockMode::Try, key).unwrap();
        let csv = dir.join("patients.csv");
        patients_csv(&csv, 0..n);
        fttp_agent::import::import_file(&mut store, &csv, None).unwrap();
        add_pseudonyms(&mut store, with_psn);
    }
    let config = write_config(&dir, "http://127.0.0.1:9", 100);
    std::fs::write(dir.join("serve.pw"), "bench-password").unwrap();
    let mut perms = std::fs::metadata(dir.join("serve.pw")).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    std::fs::set_permissions(dir.join("serve.pw"), perms).unwrap();
    let text = std::fs::read_to_string(&config).unwrap()
        + "\n[serve]\nlisten = \"127.0.0.1:0\"\nbasic_user = \"bench\"\nbasic_password_file = \"serve.pw\"\n";
    std::fs::write(&config, text).unwrap();
    let (mut child, url) = start_service(&config);
    let auth = {
        use base64::Engine as _;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("bench:bench-password")
        )
    };
    let body = |ids: &mut dyn Iterator<Item = u32>| {
        let mut p = vec![Parameter::string("target", STUDY)];
        p.extend(ids.map(|i| Parameter::string("original", &format!("p{i}"))));
        Parameters::new(p).to_json()
    };
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let post = |agent: &ureq::Agent, body: &str| {
        let mut resp = agent
            .post(&format!("{url}/$pseudonymize"))
            .header("Content-Type", "application/fhir+json")
            .header("Authorization", &auth)
            .send(body)
            .unwrap();
        resp.body_mut().read_to_string().unwrap()
    };
    // Latency: 1,000 originals a request, all known, spread over the store.
    let mut times = Vec::new();
    for r in 0..30u32 {
        let b = body(&mut (0..1_000u32).map(|i| (i * 7919 + r * 104_729) % with_psn));
        let start = Instant::now();
        let answer = post(&agent, &b);
        times.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(answer.matches("\"name\":\"pseudonym\",\"part\"").count(), 1_000);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "$pseudonymize, 1,000 originals (all found): median {:.1} ms, 95th percentile {:.1} ms, max {:.1} ms (30 requests)",
        times[times.len() / 2],
        times[times.len() * 95 / 100],
        times[times.len() - 1]
    );
    // Throughput: clients on keep-alive connections, one original each.
    for (clients, per_request) in [(4u32, 1u32), (4, 10)] {
        let done = std::sync::atomic::AtomicU64::new(0);
        let until = Instant::now() + std::time::Duration::from_secs(seconds);
        std::thread::scope(|scope| {
            for c in 0..clients {
                let (done, body, post) = (&done, &body, &post);
                scope.spawn(move || {
                    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
                    let mut k = c;
                    while Instant::now() < until {
                        k = k.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                        let b = body(&mut (0..per_request).map(|j| (k + j) % n));
                        post(&agent, &b);
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        let total = done.load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "{clients} clients, {per_request} original(s) a request: {:.0} requests/s",
            total as f64 / seconds as f64
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Pseudonyms `mii_00000000`.. for the first `n` sample filters, 10,000 a
/// transaction.
fn add_pseudonyms(store: &mut Store, n: u32) {
    let mut batch = Vec::new();
    for i in 0..n {
        batch.push(Record::Pseudonym(PseudonymRecord {
            study: STUDY.into(),
            bloomfilter: sample_bloomfilter(i),
            target: TARGET.into(),
            pseudonym: Pseudonym {
                system: Some(sim::GPAS.into()),
                value: format!("mii_{i:08}"),
            },
            received: Utc::now(),
            source: "bench".into(),
        }));
        if batch.len() == 10_000 {
            store.write(std::mem::take(&mut batch)).unwrap();
        }
    }
    store.write(batch).unwrap();
}

/// Invented IDAT with the characters real names bring: umlauts, titles,
/// hyphens, lower case.
fn sample_idat(n: u32) -> fttp_agent::fhir::idat::Idat {
    const GIVEN: [&str; 8] = [
        "Erika",
        "Jürgen",
        "Anna-Lena",
        "Dr. Max",
        "Sören",
        "Émile",
        "Özlem",
        "Hans Peter",
    ];
    const FAMILY: [&str; 8] = [
        "Mustermann",
        "Müller",
        "Schmidt",
        "von Bülow",
        "Weiß",
        "Öztürk",
        "Meyer-Lüdenscheidt",
        "Nguyen",
    ];
    fttp_agent::fhir::idat::Idat {
        given: Some(format!("{}{}", GIVEN[n as usize % 8], n % 97)),
        family: Some(FAMILY[(n / 8) as usize % 8].to_string()),
        birthdate: Some(format!("{}-{:02}-{:02}", 1930 + n % 80, 1 + n % 12, 1 + n % 28)),
        gender: Some(if n.is_multiple_of(2) { "female" } else { "male" }.to_string()),
        ..Default::default()
    }
}

fn bloom_section(records: u32) {
    use fttp_agent::bloom::{Encoder, Params};
    println!("\n## 4. Bloom filter encoding, {records} records, one thread");
    let dir = bench_dir("bloom");
    std::fs::create_dir_all(&dir).unwrap();
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml")).unwrap();
    let key = dir.join("api-key");
    std::fs::write(&key, "k").unwrap();
    let seeds = dir.join("seeds.toml");
    std::fs::write(
        &seeds,
        "balanced.seed = 154866848\nfield.firstName.seed = 487484864\nfield.lastName.seed = 311296856\nfield.birthDate.seed = 897689196\nfield.gender.seed = 298767897\n",
    )
    .unwrap();
    std::fs::set_permissions(&seeds, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    println!("| length | normalisation | records/s | µs/record |");
    println!("|---:|---|---:|---:|");
    for length in [500usize, 1000] {
        let cfg_path = dir.join("config.toml");
        std::fs::write(
            &cfg_path,
            example
                .replace("/etc/fttp-agent/api-key", key.to_str().unwrap())
                .replace("/etc/fttp-agent/store.key", "store.key")
                .replace("/etc/fttp-agent/bloom-seeds.toml", seeds.to_str().unwrap())
                .replace("length = 500", &format!("length = {length}")),
        )
        .unwrap();
        let cfg = fttp_agent::config::Config::load(&cfg_path).unwrap();
        let encoder = cfg.bloom_encoder().unwrap().unwrap();
        let idat: Vec<_> = (0..records).map(sample_idat).collect();
        let start = Instant::now();
        let mut ones = 0usize;
        for i in &idat {
            ones += encoder.encode(i).map_or(0, |bf| bf.as_bytes().len());
        }
        let full = start.elapsed().as_secs_f64();
        // The encoder alone, on values already normalised.
        let normalised: Vec<Vec<Option<String>>> = idat.iter().map(|i| encoder.fields(i).unwrap()).collect();
        let plain = Encoder::new(&Params {
            length,
            positions: 15,
            vocabulary: "ABCDEFGHIJKLMNOPQRSTUVWXYZ .-0123456789".into(),
            balanced_seed: Some(154866848),
            fields: (0..4).map(|i| (format!("f{i}"), 1000 + i)).collect(),
        })
        .unwrap();
        let start = Instant::now();
        for v in &normalised {
            let refs: Vec<Option<&str>> = v.iter().map(Option::as_deref).collect();
            ones += plain.encode_bytes(&refs).len();
        }
        let bare = start.elapsed().as_secs_f64();
        std::hint::black_box(ones);
        for (what, secs) in [("config.example.toml", full), ("none (values given)", bare)] {
            println!(
                "| {length} | {what} | {:.0} | {:.2} |",
                f64::from(records) / secs,
                secs * 1e6 / f64::from(records)
            );
        }
    }
}

/// Peak RSS of a poll whose answer is `body`, next to the body's size.
fn memory_case(name: &str, format: Format, body: Vec<u8>) {
    let sim = Simulator::start(SimOptions {
        api_key: KEY.into(),
        ..SimOptions::default()
    })
    .unwrap();
    let mime = match format {
        Format::Json => "application/fhir+json",
        Format::Xml => "application/fhir+xml",
    };
    let mb = body.len() as f64 / 1e6;
    sim.push(
        Some("$requestTasks"),
        sim::FaultKind::Raw {
            status: 200,
            content_type: mime.into(),
            body,
        },
    );
    let dir = bench_dir("memory");
    let config = write_config(&dir, sim.url(), 100);
    let (wall, rss, code) = timed(&["--config", config.to_str().unwrap(), "run", "--once", "--dry-run"]);
    println!(
        "| {name} | {mb:.1} | {rss:.0} | {:.1} | {wall:.2} | {code} |",
        rss / mb.max(0.001)
    );
}

fn memory_section() {
    println!("\n## 5. Peak memory of one poll (run --once --dry-run)\n");
    println!("| answer | size MB | peak RSS MB | RSS / size | wall s | exit |");
    println!("|---|---:|---:|---:|---:|---:|");
    let real = Parameters::new(tasks(100_000));
    memory_case(
        "100,000 tasks, JSON",
        Format::Json,
        real.write(Format::Json).into_bytes(),
    );
    memory_case("100,000 tasks, XML", Format::Xml, real.write(Format::Xml).into_bytes());
    // About the most structure the caps let through: 120,000 parameters
    // of seven tiny parts each (4.8 M JSON values).
    let part = r#"{"name":"a","valueString":"b"}"#;
    let one = format!(r#"{{"name":"t","part":[{}]}}"#, [part; 7].join(","));
    let dense = format!(
        r#"{{"resourceType":"Parameters","parameter":[{}]}}"#,
        vec![one.as_str(); 120_000].join(",")
    );
    memory_case(
        "120,000 x 7 tiny parts, JSON (at the caps)",
        Format::Json,
        dense.into_bytes(),
    );
    let tiny = [
        br#"{"resourceType":"Parameters","parameter":["#.as_slice(),
        &br#"{"name":"a"},"#.repeat(4_600_000),
        br#"{"name":"a"}]}"#,
    ]
    .concat();
    memory_case("60 MB of tiny parameters, JSON (refused)", Format::Json, tiny);
    let zeros = [
        br#"{"resourceType":"Parameters","x":["#.as_slice(),
        &b"0,".repeat(30_000_000),
        b"0]}",
    ]
    .concat();
    memory_case("60 MB of numbers, JSON (refused)", Format::Json, zeros);
    let xml = [
        br#"<Parameters xmlns="http://hl7.org/fhir">"#.as_slice(),
        &br#"<parameter><name value="a"/></parameter>"#.repeat(1_500_000),
        b"</Parameters>",
    ]
    .concat();
    memory_case("60 MB of tiny parameters, XML (refused)", Format::Xml, xml);
}

fn main() {
    if let Ok(spec) = std::env::var("FTTP_BENCH_CHILD") {
        let (dir, n) = spec.rsplit_once(':').unwrap();
        store_child(Path::new(dir), n.parse().unwrap());
        return;
    }
    let quick = std::env::args().any(|a| a == "quick");
    println!("# fttp-agent benchmark{}", if quick { " (quick)" } else { "" });
    println!(
        "machine: {} cores",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    // BENCH_ONLY=parse|cycle|memory|store|bloom|serve|wan runs one section.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |s: &str| only.is_empty() || only == s;
    if run("parse") {
        parse_section(if quick {
            &[1_000, 10_000]
        } else {
            &[1_000, 10_000, 100_000]
        });
    }
    if run("cycle") {
        let batches: &[usize] = if std::env::var_os("BENCH_NO_UNBATCHED").is_some() {
            &[100]
        } else {
            &[100, 1]
        };
        cycle_section(if quick { 10_000 } else { 100_000 }, batches);
    }
    if run("memory") {
        memory_section();
    }
    if run("bloom") {
        bloom_section(if quick { 50_000 } else { 200_000 });
    }
    if run("wan") {
        wan_section(quick);
    }
    if run("serve") {
        serve_section(if quick { 100_000 } else { 1_000_000 }, if quick { 2 } else { 5 });
    }
    if run("store") {
        if quick {
            store_section(100_000, 20_000);
        } else {
            store_section(1_000_000, 100_000);
        }
    }
}
