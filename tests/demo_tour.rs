//! `sticky-proxy demo --tour` and `sticky-proxy probe`, as the real binary
//! runs them (the README's demo section and the image's HEALTHCHECK).

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sticky_proxy::tools::demo::DemoInstance;

/// Runs the binary with `args`, killing it past `limit`: (status, stdout, stderr).
fn run(args: &[&str], limit: Duration) -> (ExitStatus, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sticky-proxy"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sticky-proxy");
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("stdout")));
    let err = reader(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sticky-proxy {args:?} still running after {limit:?}: {}", out.join().unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, out.join().expect("stdout reader"), err.join().expect("stderr reader"))
}

#[test]
fn the_tour_plays_every_step_and_every_promise_holds() {
    let (status, out, err) = run(&["demo", "--tour"], Duration::from_secs(90));
    assert!(status.success(), "exit {status}\nstdout:\n{out}\nstderr:\n{err}");
    for line in [
        "1. Devices connect through the proxy",
        "ok: 12 devices connected (101 Switching Protocols, echo answered)",
        "ok: each device is held by exactly the instance the ring names",
        "2. A POST through the proxy is delivered to the device's socket",
        "HTTP/1.1 200 OK",
        "ok: phone-42's socket received \"hello phone-42\"",
        "3. The same POST straight to another instance is refused",
        "HTTP/1.1 421 Misdirected Request",
        "4. A backend is added: its devices move, and nothing is lost",
        "ok: the reload is applied (200 OK)",
        "ok: all 12 POSTs answered 200 OK",
        "ok: every device received its message exactly once: nothing lost",
        "ok: every device is held by its new owner",
        "ok: the other devices kept their sockets (connected once)",
        "tour: every promise held",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert!(!out.contains("BROKEN"), "{out}");
}

#[test]
fn probe_exits_0_on_2xx_and_1_otherwise() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let app = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        DemoInstance::spawn("app-1", listener).expect("demo app")
    });
    let base = format!("http://{}", app.addr());
    let limit = Duration::from_secs(30);

    let (status, out, err) = run(&["probe", &format!("{base}/health")], limit);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("200 OK"), "{out}");

    let (status, _, err) = run(&["probe", &format!("{base}/nowhere")], limit);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("404"), "{err}");

    drop(app);
    let (status, _, err) = run(&["probe", "--timeout-ms", "2000", &format!("{base}/health")], limit);
    assert_eq!(status.code(), Some(1), "nothing listening: {err}");

    let (status, _, err) = run(&["probe", "https://127.0.0.1:1/"], limit);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("http://"), "{err}");
}
