//! The command line, run as a real process.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example");

fn sticky_proxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sticky-proxy")).args(args).output().expect("run sticky-proxy")
}

/// Runs with `input` on stdin.
fn sticky_proxy_with_stdin(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sticky-proxy"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sticky-proxy");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
    child.wait_with_output().expect("wait for sticky-proxy")
}

/// Writes `text` to a fresh file in the temp dir.
fn config_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sticky-proxy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

fn example() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example")).expect("example config")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_and_help() {
    let out = sticky_proxy(&["--version"]);
    assert!(out.status.success());
    // `sticky-proxy 0.1.0 (1a2b3c4)`, or `(unknown)` outside a git checkout.
    let version = text(&out.stdout);
    let commit = version
        .trim()
        .strip_prefix(&format!("sticky-proxy {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("unexpected --version: {version:?}"));
    assert!(commit == "unknown" || (commit.len() >= 7 && commit.bytes().all(|b| b.is_ascii_hexdigit())), "{version:?}");
    let help = text(&sticky_proxy(&["--help"]).stdout);
    for command in ["run", "check", "route", "demo"] {
        assert!(help.contains(command), "--help mentions {command}:\n{help}");
    }
}

#[test]
fn the_example_config_passes_check() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example");
    let out = sticky_proxy(&["check", "--config", path]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("OK (3 backends"), "{}", text(&out.stdout));
}

#[test]
fn bad_configs_exit_1_and_name_the_problem() {
    let good = example();
    let cases = [
        ("unknown-key", good.replace("missing_key = ", "missing_keys = "), "missing_keys"),
        ("duplicate-id", good.replace("id = \"app-2\"", "id = \"app-1\""), "backends[1].id: duplicate backend id"),
        ("zero-weight", good.replacen("weight = 1 ", "weight = 0 ", 1), "backends[0].weight"),
        ("bad-address", good.replace("127.0.0.1:9002", "127.0.0.1"), "backends[1].address"),
        ("bad-pattern", good.replace("path:/devices/{id}/*", "path:/devices/*/{id}"), "routing.key[1]"),
        ("bad-listen", good.replace("0.0.0.0:8080", "0.0.0.0"), "server.listen"),
        ("no-backends", good.split("[[backends]]").next().unwrap_or_default().to_string(), "no backends configured"),
        ("not-toml", "[server\nlisten =".to_string(), ":1:"),
    ];
    for (name, config, expected) in cases {
        let path = config_file(&format!("{name}.toml"), &config);
        let out = sticky_proxy(&["check", "-c", path.to_str().expect("utf-8 path")]);
        assert_eq!(out.status.code(), Some(1), "{name} must fail");
        let err = text(&out.stderr);
        assert!(err.contains(expected), "{name}: expected {expected:?} in {err:?}");
        assert!(err.contains(&format!("{name}.toml")), "{name}: the message names the file: {err}");
    }
    let out = sticky_proxy(&["check", "-c", "/nonexistent/sticky.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read config file"), "{}", text(&out.stderr));
    // `run` refuses a bad file the same way, before binding anything.
    let path = config_file("run-bad.toml", &good.replace("weight = 1 ", "weight = -3 "));
    let out = sticky_proxy(&["run", "-c", path.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("weight"), "{}", text(&out.stderr));
}

#[test]
fn route_prints_the_owner_like_the_running_proxy_decides() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example");
    let config = sticky_proxy::config::Config::load(path.as_ref()).expect("example loads");
    let table = sticky_proxy::routing::RoutingTable::offline(&config);
    for device in ["phone-42", "sensor-7", "café"] {
        let out = sticky_proxy(&["route", "--config", path, device]);
        assert!(out.status.success());
        let owner = table.owner(device.as_bytes()).expect("owner");
        assert_eq!(text(&out.stdout).trim(), format!("{device} -> {} ({})", owner.id, owner.address));
    }
}

#[test]
fn check_takes_the_file_as_an_argument_too() {
    let out = sticky_proxy(&["check", EXAMPLE]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("OK (3 backends"), "{}", text(&out.stdout));
    // Both, or neither: a usage error (2), not a check result.
    assert_eq!(sticky_proxy(&["check", EXAMPLE, "-c", EXAMPLE]).status.code(), Some(2));
    assert_eq!(sticky_proxy(&["check"]).status.code(), Some(2));
}

#[test]
fn toml_errors_name_the_field_in_plain_words() {
    let good = example();
    let cases = [
        (
            "typo",
            good.replace("shutdown_grace = ", "shutdown_grac = "),
            "server.shutdown_grac: unknown field; did you mean `shutdown_grace`?",
        ),
        (
            "string-weight",
            good.replace("address = \"127.0.0.1:9003\"\nweight = 1", "address = \"127.0.0.1:9003\"\nweight = \"3\""),
            "backends[2].weight: expected a whole number, found the string \"3\"",
        ),
        (
            "single-brackets",
            good.replace("[[backends]]", "[backends]"),
            "backends: `backends` is a list: write each backend as [[backends]], not [backends]",
        ),
    ];
    for (name, config, expected) in cases {
        let path = config_file(&format!("{name}.toml"), &config);
        let out = sticky_proxy(&["check", path.to_str().expect("utf-8 path")]);
        assert_eq!(out.status.code(), Some(1), "{name} must fail");
        let err = text(&out.stderr);
        assert!(err.contains(expected), "{name}: expected {expected:?} in {err:?}");
        assert!(err.contains(&format!("{name}.toml:")), "{name}: names the file and line: {err}");
    }
}

#[test]
fn check_prints_warnings_and_still_passes() {
    let config = example().replace("127.0.0.1:9003", "127.0.0.1:9001").replace(
        "id = \"app-2\"",
        "id = \"app-2\"\nhealth = { path = \"/healthz\", interval = \"1s\", timeout = \"1s\" }",
    );
    let path = config_file("warnings.toml", &config);
    let out = sticky_proxy(&["check", path.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "warnings don't fail check: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("2 warnings"), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("warning: ") && err.contains("warnings.toml:"), "{err}");
    assert!(err.contains("backends[2].address: 2 backends share the address 127.0.0.1:9001 (app-1, app-3)"), "{err}");
    assert!(err.contains("backends[1].health.timeout: 1s is not shorter than the interval (1s)"), "{err}");
}

#[test]
fn route_formats_for_scripts() {
    let config = sticky_proxy::config::Config::load(EXAMPLE.as_ref()).expect("example loads");
    let table = sticky_proxy::routing::RoutingTable::offline(&config);
    let owner = table.owner(b"phone-42").expect("owner");

    let out = sticky_proxy(&["route", "-c", EXAMPLE, "--format", "id", "phone-42"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), format!("{}\n", owner.id));

    let out = sticky_proxy(&["route", "-c", EXAMPLE, "--format", "json", "phone-42"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["device_id"], "phone-42");
    assert_eq!(json["backend"], owner.id.as_str());
    assert_eq!(json["address"], owner.address.as_str());
    assert_eq!(json["ring_owner"], owner.id.as_str());

    // --stdin: a line out per line in; `-` and empty lines have no backend.
    let sensor = table.owner(b"sensor-7").expect("owner");
    let out =
        sticky_proxy_with_stdin(&["route", "-c", EXAMPLE, "--stdin", "--format", "id"], "phone-42\n-\nsensor-7\n");
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), format!("{}\n-\n{}\n", owner.id, sensor.id));
    let out = sticky_proxy_with_stdin(&["route", "-c", EXAMPLE, "--stdin", "--format", "json"], "phone-42\n\n");
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> =
        text(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["backend"], owner.id.as_str());
    assert!(lines[1]["backend"].is_null() && lines[1]["address"].is_null(), "{}", lines[1]);
    let out = sticky_proxy_with_stdin(&["route", "-c", EXAMPLE, "--stdin"], "phone-42\n");
    assert_eq!(text(&out.stdout), format!("phone-42\t{}\n", owner.address));
}

#[test]
fn route_of_an_empty_id_fails_as_live_traffic_does() {
    let out = sticky_proxy(&["route", "-c", EXAMPLE, ""]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).is_empty());
    let err = text(&out.stderr);
    assert!(err.contains("400 \"no device ID in request: looked for header x-device-id"), "{err}");
    let spread = config_file("spread.toml", &example().replace("missing_key = \"reject\"", "missing_key = \"spread\""));
    let out = sticky_proxy(&["route", "-c", spread.to_str().expect("utf-8 path"), "--format", "id", ""]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("round robin"), "{}", text(&out.stderr));
}

#[test]
fn completions_and_man_page() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = sticky_proxy(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.contains("sticky-proxy") && script.contains("import-nginx"), "{shell}: {script}");
    }
    assert_eq!(sticky_proxy(&["completions", "tcsh"]).status.code(), Some(2));
    let out = sticky_proxy(&["man"]);
    assert!(out.status.success());
    let page = text(&out.stdout);
    assert!(page.contains(".TH sticky-proxy 1") && page.contains("import\\-nginx"), "{page}");
    // Hidden from --help: they are for packagers.
    assert!(!text(&sticky_proxy(&["--help"]).stdout).contains("completions"));
}
