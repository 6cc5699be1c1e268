//! `routing.hash = "nginx"` against placements recorded from real nginx.
//!
//! Each fixture in `tests/fixtures/nginx/` holds an upstream's `server`
//! lines and, for each of `sample::varied_ids(7, 10000)`, the server nginx
//! 1.22 sent it to (`tests/nginx/compare.sh` records them and, in CI,
//! checks that nginx still agrees). Here the proxy's routing table must
//! choose the same server for every ID, `down` servers included.

use std::path::{Path, PathBuf};

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::Uri;
use sticky_proxy::config::Config;
use sticky_proxy::routing::ring::{nginx_identity, Member, Ring, Ties, NGINX_REPLICAS};
use sticky_proxy::routing::{Decision, RoutingTable};

const SEED: u64 = 7;
const COUNT: usize = 10_000;

/// One recorded upstream.
struct Fixture {
    name: String,
    /// The `server` lines' text after `server `.
    servers: Vec<String>,
    /// Per ID, the index of the server nginx chose.
    answers: Vec<usize>,
}

fn fixtures() -> Vec<Fixture> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nginx");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixture dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 7, "fixtures missing in {}", dir.display());
    paths.iter().map(|p| parse(p)).collect()
}

fn parse(path: &Path) -> Fixture {
    let text = std::fs::read_to_string(path).expect("read fixture");
    let (head, answers) = text.split_once("\nanswers\n").expect("an `answers` line");
    let servers = head.lines().filter_map(|l| l.strip_prefix("server ")).map(str::to_string).collect();
    let answers: Vec<usize> = answers.lines().map(|l| l.parse().expect("a server index")).collect();
    assert_eq!(answers.len(), COUNT, "{}", path.display());
    Fixture { name: path.file_stem().expect("name").to_string_lossy().into_owned(), servers, answers }
}

/// The server line's address, weight and `down`.
fn server_parts(line: &str) -> (&str, u32, bool) {
    let mut words = line.split_whitespace();
    let address = words.next().expect("address");
    let (mut weight, mut down) = (1, false);
    for w in words {
        match w.strip_prefix("weight=") {
            Some(n) => weight = n.parse().expect("weight"),
            None if w == "down" => down = true,
            None => panic!("unexpected server parameter {w:?}"),
        }
    }
    (address, weight, down)
}

/// The sticky-proxy config equivalent to a fixture's upstream.
fn config_for(f: &Fixture) -> Config {
    let mut text = String::from(
        "[server]\nlisten = \"127.0.0.1:0\"\n[routing]\nhash = \"nginx\"\nkey = [\"header:x-device-id\"]\nmissing_key = \"spread\"\n",
    );
    for (i, line) in f.servers.iter().enumerate() {
        let (address, weight, down) = server_parts(line);
        text.push_str(&format!("[[backends]]\nid = \"s{i}\"\naddress = \"{address}\"\nweight = {weight}\n"));
        if down {
            text.push_str("state = \"draining\"\n");
        }
    }
    Config::parse(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", f.name))
}

/// The index of the backend the table sends a request with this ID to.
fn chosen(table: &RoutingTable, id: &str) -> usize {
    let uri = Uri::from_static("/");
    let mut headers = HeaderMap::new();
    headers.insert(
        HeaderName::from_static("x-device-id"),
        HeaderValue::from_bytes(id.as_bytes()).expect("a header value"),
    );
    match table.decide(&uri, &headers, |_| None) {
        Decision::Device { first, .. } => table.position(&first.backend.id).expect("a known backend"),
        other => panic!("{id:?}: {other:?}"),
    }
}

#[test]
fn nginx_mode_routes_every_recorded_id_where_nginx_did() {
    let ids = sticky_proxy::tools::sample::varied_ids(SEED, COUNT);
    for f in fixtures() {
        let table = RoutingTable::offline(&config_for(&f));
        let wrong: Vec<String> = ids
            .iter()
            .zip(&f.answers)
            .enumerate()
            .filter(|(_, (id, &want))| chosen(&table, id) != want)
            .map(|(i, (id, want))| format!("#{i} {id:?}: nginx {want}, sticky-proxy {}", chosen(&table, id)))
            .collect();
        assert!(
            wrong.is_empty(),
            "{}: {} of {COUNT} differ, e.g.\n{}",
            f.name,
            wrong.len(),
            wrong[..wrong.len().min(10)].join("\n")
        );
    }
}

#[test]
fn the_recorded_ids_are_varied() {
    let ids = sticky_proxy::tools::sample::varied_ids(SEED, COUNT);
    let count = |p: fn(&String) -> bool| ids.iter().filter(|id| p(id)).count();
    assert!(count(|id| id.contains('%')) > 1_000);
    assert!(count(|id| !id.is_ascii()) > 800);
    assert!(count(|id| id.len() > 500) > 50);
    assert!(count(|id| id.len() <= 3) > 500);
    assert!(ids.iter().all(|id| !id.is_empty() && id.trim() == id && !id.chars().any(char::is_control)));
}

#[test]
fn the_tie_fixtures_decide_between_tie_rules() {
    // Both tie fixtures list colliding servers (a point of each has the
    // same hash) in opposite orders. nginx's answers must be ones that only
    // "first listed wins" explains, for IDs on both sides of every pair.
    let ids = sticky_proxy::tools::sample::varied_ids(SEED, COUNT);
    for f in fixtures().into_iter().filter(|f| f.name.starts_with("ties")) {
        let identities: Vec<Vec<u8>> = f.servers.iter().map(|s| nginx_identity(s)).collect();
        let members: Vec<Member> = identities.iter().map(|i| Member { identity: i, weight: 1 }).collect();
        let by_identity = Ring::with_ties(&members, NGINX_REPLICAS, Ties::SmallerIdentity);
        let first_listed = Ring::with_ties(&members, NGINX_REPLICAS, Ties::FirstListed);
        let decided: Vec<usize> = ids
            .iter()
            .zip(&f.answers)
            .filter(|(id, _)| by_identity.owner(id.as_bytes()) != first_listed.owner(id.as_bytes()))
            .map(|(id, &nginx)| {
                assert_eq!(first_listed.owner(id.as_bytes()), Some(nginx), "{}: {id:?}", f.name);
                nginx
            })
            .collect();
        // Three colliding pairs, (0, 1), (2, 3), (4, 5); the rules disagree
        // on those listed with the larger identity first, and some IDs land
        // on each such tie.
        assert!(decided.len() >= 30, "{}: only {} IDs on a tie", f.name, decided.len());
        for pair in [0, 2, 4] {
            if identities[pair] > identities[pair + 1] {
                assert!(decided.contains(&pair), "{}: no ID on the tie of servers {pair} and {}", f.name, pair + 1);
            }
        }
    }
}
