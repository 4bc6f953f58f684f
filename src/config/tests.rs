//! Reading, overriding and validating configurations.

use super::*;

const GOOD: &str = r#"
[dispatcher]
url = "https://fttp.example.org/ttp-fhir/fhir/dispatcher/"
api_key = "k"
timeout = "10s"

[site]
study = "mii"
target = "dic_test"

[schedule]
interval = "1h30m"

[store]
path = "store"
key_file = "store.key"
"#;

#[test]
fn durations_are_shown_as_written() {
    for text in ["6h", "1h30m", "500ms", "14d", "2s", "1d2h3m4s5ms"] {
        assert_eq!(format_duration(parse_duration(text).unwrap()), text);
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration("6h").unwrap(), Duration::from_secs(21600));
    assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert!(parse_duration("6 hours").is_err());
    assert!(parse_duration("h").is_err());
}

#[test]
fn a_good_file_parses_with_defaults() {
    let c = Config::parse(GOOD, Path::new("x.toml")).unwrap();
    assert_eq!(c.dispatcher.url.0, "https://fttp.example.org/ttp-fhir/fhir/dispatcher");
    assert_eq!(c.dispatcher.api_key_header.0, "apikey");
    assert_eq!(c.dispatcher.format, Format::Xml);
    assert_eq!(c.dispatcher.batch_size.0, 100);
    assert_eq!(c.schedule.interval.0, Duration::from_secs(5400));
    assert_eq!(format!("{:?}", c.dispatcher.api_key), "Some([redacted])");
}

#[test]
fn unknown_keys_and_bad_values_name_key_and_line() {
    let bad = GOOD.replace("timeout = \"10s\"", "timeout = \"10 parsecs\"");
    let e = Config::parse(&bad, Path::new("x.toml")).unwrap_err().to_string();
    assert!(e.contains("line 5") && e.contains("timeout"), "{e}");
    let bad = GOOD.replace("[site]", "[site]\nstudyy = \"x\"");
    let e = Config::parse(&bad, Path::new("x.toml")).unwrap_err().to_string();
    assert!(e.contains("line 8") && e.contains("studyy"), "{e}");
    let bad = GOOD.replace("https://fttp", "ftp://fttp");
    let e = Config::parse(&bad, Path::new("x.toml")).unwrap_err().to_string();
    assert!(e.contains("line 3") && e.contains("https://"), "{e}");
    for (key, bad, range) in [("batch_size", "0", "1 and 10000"), ("max_attempts", "21", "1 and 20")] {
        let text = GOOD.replace("timeout = \"10s\"", &format!("timeout = \"10s\"\n{key} = {bad}"));
        let e = Config::parse(&text, Path::new("x.toml")).unwrap_err().to_string();
        assert!(
            e.contains("line 6") && e.contains(&format!("{key} must be between {range}")),
            "{e}"
        );
    }
}

#[test]
fn loopback_detection() {
    for url in [
        "http://127.0.0.1:8080/x",
        "http://localhost/x",
        "http://[::1]:80/",
        "http://127.9.9.9",
    ] {
        assert!(is_loopback_url(url), "{url}");
    }
    for url in [
        "http://10.0.0.1/x",
        "http://example.org",
        "http://localhost.example.org/",
        "http://user@10.1.1.1",
    ] {
        assert!(!is_loopback_url(url), "{url}");
    }
}

#[test]
fn plain_http_beyond_loopback_needs_an_explicit_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let text = GOOD.replace("https://fttp.example.org", "http://10.20.30.40");
    std::fs::write(&path, &text).unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(e.contains("plain http://") && e.contains("allow_insecure_http"), "{e}");
    std::fs::write(
        &path,
        text.replace("api_key = \"k\"", "api_key = \"k\"\nallow_insecure_http = true"),
    )
    .unwrap();
    assert!(Config::load(&path).is_ok());
    std::fs::write(&path, GOOD.replace("https://fttp.example.org", "http://127.0.0.1:9")).unwrap();
    assert!(Config::load(&path).is_ok());
}

#[test]
fn replacements_keep_the_order_they_are_written_in() {
    let t: BloomTransformer =
        toml::from_str("replacement = { \"b\" = \"c\", \"a\" = \"b\", 'Dr\\.' = \"\" }\ntrim = true\n").unwrap();
    let keys: Vec<&str> = t.replacement.0.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["b", "a", "Dr\\."]);
    assert!(t.trim && !t.upper_case);
    let f: BloomField = toml::from_str("name = \"x\"\nsource = [\"given\", \"family\"]\n").unwrap();
    assert_eq!(f.source.elements().len(), 2);
    let err = toml::from_str::<BloomField>("name = \"x\"\nsource = \"nickname\"\n").unwrap_err();
    assert!(
        err.to_string()
            .contains("unknown IDAT element 'nickname' (known: given, family"),
        "{err}"
    );
}

#[test]
fn a_url_whose_checked_host_could_differ_from_the_connected_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    for url in [
        "http://10.20.30.40#@localhost",
        "http://10.20.30.40?@127.0.0.1",
        "http://user@127.0.0.1",
        "https://a\\\\b.example.org",
    ] {
        std::fs::write(&path, GOOD.replace("https://fttp.example.org", url)).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("url must not contain"), "{url}: {e}");
    }
    // The token endpoint is held to the dispatcher's rule.
    let text = format!(
        "{GOOD}\n[dispatcher.auth]\ntoken_url = \"http://10.1.2.3/token\"\nclient_id = \"c\"\nclient_secret_file = \"s\"\n"
    );
    std::fs::write(&path, text).unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(e.contains("token_url uses plain http://"), "{e}");
}

#[test]
fn durations_too_long_for_a_clock_are_refused() {
    assert!(parse_duration("3650d").is_ok());
    assert!(parse_duration("3651d").unwrap_err().contains("too long"));
    assert!(
        parse_duration("18446744073709551615s")
            .unwrap_err()
            .contains("too long")
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, GOOD.replace("interval = \"1h30m\"", "interval = \"365d\"")).unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(e.contains("interval must be between 1s and 31d"), "{e}");
}

#[test]
fn an_unknown_key_gets_a_did_you_mean() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, GOOD.replace("interval = ", "intervall = ")).unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(
        e.contains("unknown field `intervall`") && e.contains("did you mean `interval`?"),
        "{e}"
    );
    std::fs::write(&path, GOOD.replace("timeout = ", "timout = ")).unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(e.contains("did you mean `timeout`?"), "{e}");
    // Nothing close: no guess.
    std::fs::write(&path, GOOD.replace("interval = ", "colour = ")).unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(
        e.contains("unknown field `colour`") && !e.contains("did you mean"),
        "{e}"
    );
}

const TWO_STUDIES: &str = r#"
[dispatcher]
url = "https://fttp.example.org/ttp-fhir/fhir/dispatcher/"
api_key = "k"

[[study]]
name = "napkon"
target = "dic_example"
api_key = "napkon-key"
url = "https://other.example.org/dispatcher"

[[study]]
name = "mii"
target = "dic_example"

[store]
path = "store"
key_file = "store.key"
"#;

#[test]
fn studies_come_from_site_or_from_the_study_list_in_the_order_written() {
    let one = Config::parse(GOOD, Path::new("x.toml")).unwrap();
    assert_eq!(one.studies.len(), 1);
    assert_eq!(
        (one.study().name.as_str(), one.study().target.as_str()),
        ("mii", "dic_test")
    );
    let two = Config::parse(TWO_STUDIES, Path::new("x.toml")).unwrap();
    let names: Vec<&str> = two.studies.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["napkon", "mii"]);
    // A study's own key and URL, else the dispatcher's.
    let napkon = two.for_study("napkon").unwrap();
    assert_eq!(napkon.dispatcher.api_key.as_ref().unwrap().expose(), "napkon-key");
    assert_eq!(napkon.dispatcher.url.0, "https://other.example.org/dispatcher");
    assert_eq!(napkon.studies.len(), 1);
    let mii = two.for_study("mii").unwrap();
    assert_eq!(mii.dispatcher.api_key.as_ref().unwrap().expose(), "k");
    assert!(mii.dispatcher.url.0.starts_with("https://fttp.example.org"));
    assert!(two.for_study("gecco").is_none());
    assert_eq!(
        two.find_study("gecco").unwrap_err(),
        "no study named 'gecco' is configured (configured: napkon, mii)"
    );
}

#[test]
fn both_forms_no_study_a_name_twice_or_an_odd_name_are_errors() {
    let both = format!("{TWO_STUDIES}\n[site]\nstudy = \"mii\"\ntarget = \"t\"\n");
    let e = Config::parse(&both, Path::new("x.toml")).unwrap_err().to_string();
    let site_line = both.lines().position(|l| l == "[site]").unwrap() + 1;
    assert!(
        e.contains(&format!("[site] (line {site_line})")) && e.contains("[[study]] (line 6)"),
        "{e}"
    );
    let none = GOOD.replace("[site]\nstudy = \"mii\"\ntarget = \"dic_test\"\n", "");
    let e = Config::parse(&none, Path::new("x.toml")).unwrap_err().to_string();
    assert!(e.contains("no study configured"), "{e}");
    let twice = TWO_STUDIES.replace("name = \"napkon\"", "name = \"mii\"");
    let e = Config::parse(&twice, Path::new("x.toml")).unwrap_err().to_string();
    assert!(e.contains("study 'mii' is configured twice"), "{e}");
    let odd = TWO_STUDIES.replace("name = \"napkon\"", "name = \"na/pkon\"");
    let e = Config::parse(&odd, Path::new("x.toml")).unwrap_err().to_string();
    assert!(e.contains("may hold only letters"), "{e}");
}
