//! The command line: `run`, `check`, `route`, `import-nginx`, `demo` and
//! `probe`, and for packagers the hidden `completions` and `man`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use tracing::warn;
use tracing_subscriber::EnvFilter;

use crate::app;
use crate::config::{Config, LogFormat, MissingKey, RecordKind};
use crate::routing::RoutingTable;
use crate::tools::demo::DemoInstance;
use crate::tools::nginx_import;

/// `0.1.0 (1a2b3c4)`: the package version and the git commit it was built
/// from (`unknown` outside a git checkout; see build.rs).
const VERSION: &str = match option_env!("STICKY_PROXY_VERSION") {
    Some(version) => version,
    // Built without build.rs (e.g. only src/ copied somewhere).
    None => concat!(env!("CARGO_PKG_VERSION"), " (unknown)"),
};

/// Routes every request about a device, WebSocket and HTTP alike, to the one
/// backend that owns it, by consistent hashing of the device ID.
#[derive(Parser, Debug)]
#[command(name = "sticky-proxy", version = VERSION, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy with a config file (stop with SIGINT or SIGTERM).
    Run {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file: exit 0 if it is good, 1 with the problem if
    /// not. Warnings (accepted, but probably not meant) go to stderr.
    Check {
        /// The TOML config file (or give it with -c).
        #[arg(value_name = "FILE", required_unless_present = "config", conflicts_with = "config")]
        file: Option<PathBuf>,
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print which backend owns a device (offline: reads only the config).
    Route {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// The device ID as the proxy hashes it (percent-decoded; raw with
        /// `routing.hash = "nginx"`).
        #[arg(required_unless_present = "stdin")]
        device_id: Option<String>,
        /// Read device IDs from stdin, one a line, and print a line for
        /// each (`ID<TAB>address` as text), e.g. to compare with an nginx
        /// access log.
        #[arg(long, conflicts_with = "device_id")]
        stdin: bool,
        /// What to print: `text` (`ID -> backend (address)`), `json` (an
        /// object a line) or `id` (the backend id alone).
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Print the sticky-proxy config equivalent to an nginx upstream that uses
    /// `hash … consistent`. Exit 0: it routes like nginx; 2: it is printed,
    /// but routes some requests differently (reasons on stderr); 1: error.
    ImportNginx {
        /// nginx's config file, e.g. /etc/nginx/nginx.conf (includes are followed).
        file: PathBuf,
        /// The upstream to translate; needed when several use `hash`.
        #[arg(long, value_name = "NAME")]
        upstream: Option<String>,
    },
    /// Start the proxy and three demo app instances, and print how to try them.
    Demo {
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the admin API listens.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// Port of the first demo instance; the others take the next ports.
        #[arg(long, default_value_t = 9001)]
        first_backend_port: u16,
        /// Number of demo app instances.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=50))]
        instances: u16,
        /// Play the demo by itself on free loopback ports and print a transcript:
        /// exit 0 if every step did what it promises.
        #[arg(long, conflicts_with = "app")]
        tour: bool,
        /// Run only one demo app instance, named NAME, on --listen (no proxy),
        /// e.g. one container each (deploy/docker/compose.yaml).
        #[arg(long, value_name = "NAME")]
        app: Option<String>,
    },
    /// GET an http:// URL: exit 0 on a 2xx answer, 1 otherwise. The container
    /// image's HEALTHCHECK, e.g. `sticky-proxy probe http://127.0.0.1:9901/readyz`.
    Probe {
        url: String,
        /// Give up after this many milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Print a shell completion script, e.g. `sticky-proxy completions bash
    /// > /usr/share/bash-completion/completions/sticky-proxy`.
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), e.g. `sticky-proxy man > sticky-proxy.1`.
    #[command(hide = true)]
    Man,
}

/// `route --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// `ID -> backend (address)`; with --stdin `ID<TAB>address`.
    Text,
    /// One JSON object a line: `device_id`, `backend`, `address`, `ring_owner`.
    Json,
    /// The backend id alone (`-` for none with --stdin).
    Id,
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { file, config } => {
            let Some(config) = file.or(config) else { return fail("give the config file: check FILE") };
            check(&config)
        }
        Command::Route { config, device_id, stdin, format } => match Config::load(&config) {
            Ok(c) => {
                let table = RoutingTable::offline(&c);
                match device_id {
                    _ if stdin => route_lines(&table, format),
                    Some(id) => route_one(&table, &id, format),
                    None => fail("give a device ID or --stdin"),
                }
            }
            Err(e) => fail(e),
        },
        Command::ImportNginx { file, upstream } => match nginx_import::import(&file, upstream.as_deref()) {
            Ok(import) => {
                print!("{}", import.toml);
                for note in &import.notes {
                    eprintln!("{note}");
                }
                if import.routes_differently() {
                    eprintln!(
                        "import-nginx: the printed config routes some requests differently from nginx (see above)"
                    );
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => fail(e),
        },
        Command::Run { config: path } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            init_logging(config.server.log_format);
            for warning in &config.warnings {
                warn!("config: {warning}");
            }
            // Thread per core: the workers run runtimes of their own (see
            // `app`); this one drives the admin API, health checks, reloads.
            let threads = if config.server.thread_per_core() { 1 } else { config.server.workers };
            block_on(threads, app::run(config, path))
        }
        Command::Probe { url, timeout_ms } => {
            block_on(1, crate::tools::probe::probe(&url, std::time::Duration::from_millis(timeout_ms)))
        }
        Command::Demo { tour: true, .. } => block_on(crate::config::default_workers(), crate::tools::tour::tour()),
        Command::Demo { app: Some(name), listen, .. } => {
            init_logging(LogFormat::Text);
            block_on(1, crate::tools::tour::app_only(name, listen))
        }
        Command::Demo { listen, admin, first_backend_port, instances, .. } => {
            init_logging(LogFormat::Text);
            block_on(crate::config::default_workers(), demo(listen, admin, first_backend_port, instances))
        }
        Command::Completions { shell } => {
            // Into memory first: clap_complete panics on a failed write
            // (e.g. a closed pipe); write_stdout reports it instead.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "sticky-proxy", &mut script);
            write_stdout(&script)
        }
        Command::Man => {
            let mut page = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut page) {
                Ok(()) => write_stdout(&page),
                Err(e) => fail(format!("cannot render the man page: {e}")),
            }
        }
    }
}

fn write_stdout(bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("writing stdout: {e}")),
    }
}

/// `check FILE`: the summary on stdout, warnings on stderr.
fn check(path: &std::path::Path) -> ExitCode {
    let c = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    for warning in &c.warnings {
        eprintln!("warning: {warning}");
    }
    let tls = c.server.tls.as_ref().map_or_else(String::new, |tls| {
        let names: Vec<String> = tls.certificates.names().map(|n| n.join(" ")).collect();
        format!(", TLS on {} (certificates for: {})", tls.listen, names.join("; "))
    });
    let warnings = match c.warnings.len() {
        0 => String::new(),
        1 => ", 1 warning".to_string(),
        n => format!(", {n} warnings"),
    };
    // Discovered backends are not looked up here (check must pass with the
    // DNS server down), so the names are listed instead of a count.
    let discovery: Vec<String> = c
        .discovery
        .iter()
        .map(|d| match d.kind {
            RecordKind::Srv => format!("SRV {}", d.dns),
            RecordKind::A => format!("A/AAAA {}:{}", d.dns, d.port.unwrap_or_default()),
        })
        .collect();
    let discovery = match discovery.len() {
        0 => String::new(),
        _ => format!(" and those found in DNS ({})", discovery.join(", ")),
    };
    println!(
        "{}: OK ({} backends{discovery}, proxy on {}{tls}, admin on {}, device ID from {}{warnings})",
        path.display(),
        c.backends.len(),
        c.server.listen,
        c.admin.listen,
        RoutingTable::offline(&c).keys().describe()
    );
    ExitCode::SUCCESS
}

/// `route ID`: the backend serving the device with every backend up.
fn route_one(table: &RoutingTable, id: &str, format: Format) -> ExitCode {
    if id.is_empty() {
        // What the proxy does with a request whose ID is empty: it has none.
        let what = match table.config().routing.missing_key {
            MissingKey::Reject => format!(
                "the proxy answers such a request 400 \"no device ID in request: looked for {}\"",
                table.keys().describe()
            ),
            MissingKey::Spread => "the proxy sends such a request to any backend, round robin \
                                   (routing.missing_key = \"spread\")"
                .to_string(),
        };
        return fail(format!("an empty device ID is no device ID: {what}"));
    }
    let first = table.candidates(id.as_bytes(), None).next().map(|c| c.backend);
    let (owner, b) = match (table.owner(id.as_bytes()), first) {
        (Some(owner), Some(b)) => (owner, b),
        (Some(_), None) => return fail("every backend is draining"),
        (None, _) => return fail("the ring is empty"),
    };
    let line = match format {
        Format::Text if b.id == owner.id => format!("{id} -> {} ({})", b.id, b.address),
        Format::Text => format!("{id} -> {} ({}) [ring owner {} is draining]", b.id, b.address, owner.id),
        Format::Json => json_line(id, Some((&b.id, &b.address, &owner.id))),
        Format::Id => b.id.clone(),
    };
    println!("{line}");
    ExitCode::SUCCESS
}

/// One `route --format json` line; `None`: the proxy would pick no backend
/// by the ID (there is none).
fn json_line(id: &str, routed: Option<(&str, &str, &str)>) -> String {
    let (backend, address, owner) = routed.map_or((None, None, None), |(b, a, o)| (Some(b), Some(a), Some(o)));
    serde_json::json!({ "device_id": id, "backend": backend, "address": address, "ring_owner": owner }).to_string()
}

/// `route --stdin`: a line per line read (`ID<TAB>address` as text).
fn route_lines(table: &RoutingTable, format: Format) -> ExitCode {
    use std::io::{BufRead, Write};
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for line in std::io::stdin().lock().split(b'\n') {
        let line = match line {
            Ok(l) => l,
            Err(e) => return fail(format!("reading stdin: {e}")),
        };
        let id = line.strip_suffix(b"\r").unwrap_or(&line);
        // nginx logs an empty variable as "-": no device ID, round robin.
        let backend = match id {
            b"" | b"-" => None,
            id => table.candidates(id, None).next().map(|c| c.backend),
        };
        let written = match format {
            Format::Text => out
                .write_all(id)
                .and_then(|()| writeln!(out, "\t{}", backend.as_ref().map_or("-", |b| b.address.as_str()))),
            Format::Id => writeln!(out, "{}", backend.as_ref().map_or("-", |b| b.id.as_str())),
            Format::Json => {
                // JSON holds text: bytes that are not UTF-8 become U+FFFD.
                let id = String::from_utf8_lossy(id);
                let owner = table.owner(id.as_bytes()).map(|o| o.id.as_str());
                let routed = backend.as_ref().map(|b| (b.id.as_str(), b.address.as_str(), owner.unwrap_or("")));
                writeln!(out, "{}", json_line(&id, routed))
            }
        };
        if let Err(e) = written {
            return fail(format!("writing stdout: {e}"));
        }
    }
    match out.flush() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("writing stdout: {e}")),
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}

/// Installs the one tracing subscriber (`server.log_format` is read here,
/// so changing it takes a restart).
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            // Colours only on a terminal, so piped and collected logs stay plain.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            subscriber.with_ansi(ansi).init();
        }
        // One object a line, the event's fields beside `message` at the
        // top level; no span fields (the proxy logs events, not spans).
        LogFormat::Json => {
            subscriber.json().flatten_event(true).with_current_span(false).with_span_list(false).init();
        }
    }
}

/// Runs `work` on a runtime of `workers` threads (the proxy's own
/// thread-per-core workers, if any, are started by [`app`]).
fn block_on(workers: usize, work: impl std::future::Future<Output = std::io::Result<()>>) -> ExitCode {
    crate::util::socket::raise_fd_limit();
    // One worker: a current-thread runtime does the same work without the
    // multi-threaded scheduler's cross-thread bookkeeping.
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// The config the demo runs with: the example's routing over local instances.
fn demo_config(listen: SocketAddr, admin: SocketAddr, backends: &[(String, SocketAddr)]) -> String {
    let mut text = format!(
        r#"[server]
listen = "{listen}"

[admin]
listen = "{admin}"

[routing]
key = ["header:x-device-id", "path:/devices/{{id}}/*", "query:device_id", "cookie:device_id"]
missing_key = "reject"
"#
    );
    for (id, addr) in backends {
        text.push_str(&format!("\n[[backends]]\nid = \"{id}\"\naddress = \"{addr}\"\nweight = 1\n"));
    }
    text
}

async fn demo(listen: SocketAddr, admin: SocketAddr, first_port: u16, instances: u16) -> std::io::Result<()> {
    let mut apps = Vec::new();
    for i in 0..instances {
        let name = format!("app-{}", i + 1);
        let port = first_port.checked_add(i).ok_or_else(|| std::io::Error::other("backend port out of range"))?;
        let addr = SocketAddr::new(listen.ip(), port);
        let app = DemoInstance::bind(name.clone(), addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start demo instance {name} on {addr}: {e}")))?;
        apps.push(app);
    }
    let backends: Vec<(String, SocketAddr)> = apps.iter().map(|a| (a.name().to_string(), a.addr())).collect();
    let config = Config::parse(&demo_config(listen, admin, &backends)).map_err(std::io::Error::other)?;
    let running = app::start(&config).await?;

    let owner = running.router().load().owner(b"phone-42").map_or("?".to_string(), |b| b.id.clone());
    let (proxy, admin) = (running.proxy_addr(), running.admin_addr());
    let count = backends.len();
    let instances: Vec<String> = backends.iter().map(|(n, a)| format!("{n} on {a}")).collect();
    println!(
        r#"
sticky-proxy demo: proxy on http://{proxy}, admin on http://{admin}
demo app instances: {instances}

Try it in a second terminal. Connect a device (keep it open; websocat is at
https://github.com/vi/websocat, any WebSocket client works):

  websocat ws://{proxy}/devices/phone-42/ws

In a third terminal, push a message to that device through the proxy. The
proxy sends it to {owner}, the instance holding phone-42's socket, and the
message appears in the first terminal:

  curl -i -X POST --data 'hello phone-42' http://{proxy}/devices/phone-42/messages

Ask which instance owns a device, through the proxy or the admin API:

  curl -H 'x-device-id: phone-42' http://{proxy}/whoami
  curl 'http://{admin}/route?key=phone-42'

Without sticky routing, {others} in {count} of these POSTs would reach an
instance without the socket. See for yourself, straight to each instance:
the others answer 421 Misdirected Request ("not here"):

  for port in {ports}; do curl -s -w ' %{{http_code}}\n' -X POST --data hi http://{ip}:$port/devices/phone-42/messages; done

Through the proxy, a 421 is never the end: it tries the device's other
candidates, and holds the message (up to 3 s) while the device reconnects.
Close websocat, send the POST through the proxy, and reconnect within 3 s:
the message arrives, and the admin API says how it got there:

  curl 'http://{admin}/devices/phone-42'

Stop with Ctrl-C."#,
        instances = instances.join(", "),
        others = count.saturating_sub(1),
        ip = listen.ip(),
        ports = backends.iter().map(|(_, a)| a.port().to_string()).collect::<Vec<_>>().join(" "),
    );
    tokio::signal::ctrl_c().await?;
    running.shutdown().await;
    Ok(())
}
