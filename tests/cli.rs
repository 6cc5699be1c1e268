//! The command line, run as a real process.

use std::path::PathBuf;
use std::process::{Command, Output};

fn sticky_proxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sticky-proxy")).args(args).output().expect("run sticky-proxy")
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
    assert_eq!(text(&out.stdout).trim(), format!("sticky-proxy {}", env!("CARGO_PKG_VERSION")));
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
