//! `sticky-proxy import-nginx`: reads an nginx config and writes the
//! sticky-proxy config (`routing.hash = "nginx"`) that routes like it.
//!
//! A small reader of nginx's config syntax (directives, blocks, quotes,
//! escapes, `#` comments, `include` with `*`/`?` globs in the last path
//! component, relative to the main file's directory as nginx resolves them)
//! feeds a translation of one `upstream` that uses `hash … consistent`: its
//! key variable (directly or through `map`s that pick the first non-empty
//! of several), its `server` lines and the `listen` of the `server` block
//! that proxies to it. Everything that is not carried over is reported with
//! its file and line, and whatever would make the result route differently
//! from nginx is flagged as such (`Import::routes_differently`).
//!
//! Hostile input is an error, not a hang or a crash: only regular files are
//! read, at most 16 MiB each and 64 MiB and 2^20 words in all; includes nest
//! at most 16 deep and blocks 256 deep; include masks match in
//! `mask × name` steps however many stars they hold; ids are made unique in
//! linear time; each hostname is looked up once, and at most 64 in all.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{self, Read};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::config::{parse_duration, Config};
use crate::routing::ring::MAX_MEMBERS;

/// Include nesting deeper than this is taken to be a loop.
const MAX_INCLUDE_DEPTH: usize = 16;

/// Most blocks open at once (`a { b { … } }`), counted across includes:
/// the reader recurses per block.
const MAX_BLOCK_DEPTH: usize = 256;

/// Most bytes read from one file (the main file or an include).
const MAX_FILE_BYTES: u64 = 16 << 20;

/// Most bytes read in all, the main file and every include together.
const MAX_TOTAL_BYTES: u64 = 64 << 20;

/// Most `server` hostnames looked up (each once; the `listen` is one more):
/// a lookup may wait seconds on the resolver, and a config may name a
/// host on every one of thousands of lines.
const MAX_LOOKUPS: usize = 64;

/// Most words (names and arguments) in all, the bound on memory: a word
/// read takes up to some 160 bytes in the directive tree (`a;a;a;…`, 80
/// times the bytes read). Three times what 62,500 servers (sticky-proxy's
/// most at 160 points each) with a few parameters take.
const MAX_WORDS: usize = 1 << 20;

/// A place in the nginx config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Location {
    /// The file, as found (the main file or an include).
    pub(crate) file: Rc<PathBuf>,
    /// 1-based line number.
    pub(crate) line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Something the import did not carry over as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Note {
    /// Where in the nginx config it comes from.
    pub(crate) at: Location,
    /// What was not carried over, and why.
    pub(crate) message: String,
    /// True when it makes the generated config route some requests
    /// differently from nginx.
    pub(crate) differs: bool,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.differs { "ROUTES DIFFERENTLY" } else { "note" };
        write!(f, "{}: {kind}: {}", self.at, self.message)
    }
}

/// The result of an import.
#[derive(Debug)]
pub(crate) struct Import {
    /// The sticky-proxy config, notes included as comments.
    pub(crate) toml: String,
    /// Everything not carried over as is.
    pub(crate) notes: Vec<Note>,
}

impl Import {
    /// Whether some requests would go elsewhere than behind nginx.
    pub(crate) fn routes_differently(&self) -> bool {
        self.notes.iter().any(|n| n.differs)
    }
}

/// Why nothing could be imported: `file:line: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImportError(pub(crate) String);

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ImportError {}

fn error_at<T>(at: &Location, message: impl fmt::Display) -> Result<T, ImportError> {
    Err(ImportError(format!("{at}: {message}")))
}

// ---- reading nginx's syntax -------------------------------------------------

/// One directive: `name args…;` or `name args… { block }`.
#[derive(Debug, Clone)]
struct Directive {
    name: String,
    args: Vec<String>,
    at: Location,
    block: Option<Vec<Directive>>,
}

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Semicolon,
    Open,
    Close,
}

/// Splits a file into nginx's tokens (`ngx_conf_read_token`).
struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    line: usize,
}

impl Lexer<'_> {
    /// The next token and the line it starts on; `None` at the end.
    fn next(&mut self) -> Result<Option<(Token, usize)>, (usize, String)> {
        // Whitespace and comments.
        while let Some(&c) = self.src.get(self.pos) {
            match c {
                b'\n' => self.line += 1,
                b' ' | b'\t' | b'\r' => {}
                b'#' => {
                    while self.src.get(self.pos).is_some_and(|&c| c != b'\n') {
                        self.pos += 1;
                    }
                    continue;
                }
                _ => break,
            }
            self.pos += 1;
        }
        let line = self.line;
        let Some(&c) = self.src.get(self.pos) else { return Ok(None) };
        let token = match c {
            b';' => Token::Semicolon,
            b'{' => Token::Open,
            b'}' => Token::Close,
            b'"' | b'\'' => return self.quoted(c).map(|w| Some((Token::Word(w), line))),
            _ => return self.bare().map(|w| Some((Token::Word(w), line))),
        };
        self.pos += 1;
        Ok(Some((token, line)))
    }

    fn quoted(&mut self, quote: u8) -> Result<String, (usize, String)> {
        let start_line = self.line;
        self.pos += 1;
        let mut raw = Vec::new();
        loop {
            let Some(&c) = self.src.get(self.pos) else {
                return Err((start_line, "a quoted string is not closed".into()));
            };
            self.pos += 1;
            match c {
                b'\\' => {
                    raw.push(c);
                    if let Some(&n) = self.src.get(self.pos) {
                        raw.push(n);
                        self.line += usize::from(n == b'\n');
                        self.pos += 1;
                    }
                }
                c if c == quote => break,
                c => {
                    self.line += usize::from(c == b'\n');
                    raw.push(c);
                }
            }
        }
        match self.src.get(self.pos) {
            None | Some(b' ' | b'\t' | b'\r' | b'\n' | b';' | b'{' | b'}') => Ok(unescape(&raw)),
            Some(&c) => Err((self.line, format!("unexpected {:?} after a quoted string", char::from(c)))),
        }
    }

    fn bare(&mut self) -> Result<String, (usize, String)> {
        let mut raw = Vec::new();
        while let Some(&c) = self.src.get(self.pos) {
            match c {
                b' ' | b'\t' | b'\r' | b'\n' | b';' | b'}' => break,
                // `${name}` is a variable, not a block.
                b'{' if raw.last() == Some(&b'$') => {
                    while let Some(&c) = self.src.get(self.pos) {
                        raw.push(c);
                        self.pos += 1;
                        if c == b'}' {
                            break;
                        }
                    }
                    continue;
                }
                b'{' => break,
                b'\\' => {
                    raw.push(c);
                    self.pos += 1;
                    if let Some(&n) = self.src.get(self.pos) {
                        raw.push(n);
                        self.pos += 1;
                    }
                    continue;
                }
                _ => raw.push(c),
            }
            self.pos += 1;
        }
        Ok(unescape(&raw))
    }
}

/// nginx's unescaping of every token: `\"`, `\'`, `\\`, `\t`, `\r`, `\n`;
/// any other backslash stays.
fn unescape(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\\' {
            if let Some(&n) = raw.get(i + 1) {
                let replaced = match n {
                    b'"' | b'\'' | b'\\' => Some(n),
                    b't' => Some(b'\t'),
                    b'r' => Some(b'\r'),
                    b'n' => Some(b'\n'),
                    _ => None,
                };
                if let Some(r) = replaced {
                    out.push(r);
                    i += 2;
                    continue;
                }
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads a config file and the files it includes into one directive tree.
struct Reader {
    /// Relative `include`s start here: the main file's directory, nginx's
    /// configuration prefix.
    prefix: PathBuf,
    /// Most bytes read from one file.
    max_file: u64,
    /// Most bytes read in all.
    max_total: u64,
    /// Bytes read so far.
    read: u64,
    /// Most words in all.
    max_words: usize,
    /// Words read so far.
    words: usize,
}

impl Reader {
    fn new(prefix: PathBuf) -> Reader {
        Reader { prefix, max_file: MAX_FILE_BYTES, max_total: MAX_TOTAL_BYTES, read: 0, max_words: MAX_WORDS, words: 0 }
    }

    /// The directives of `path`, which is `includes` includes and `blocks`
    /// blocks deep (`from` is the `include` that names it).
    fn file(
        &mut self,
        path: &Path,
        includes: usize,
        blocks: usize,
        from: Option<&Location>,
    ) -> Result<Vec<Directive>, ImportError> {
        let file = Rc::new(path.to_path_buf());
        let bytes = self.read(path, from)?;
        let mut lexer = Lexer { src: &bytes, pos: 0, line: 1 };
        let (directives, end) = self.block(&mut lexer, &file, includes, blocks)?;
        if let Some(line) = end {
            return error_at(&Location { file, line }, "unexpected \"}\"");
        }
        Ok(directives)
    }

    /// The bytes of a regular file, within the limits of one file and of
    /// the whole config: a device (`/dev/zero`), a pipe or a huge file is
    /// an error naming it, not a read until memory runs out.
    fn read(&mut self, path: &Path, from: Option<&Location>) -> Result<Vec<u8>, ImportError> {
        let fail = |why: &dyn fmt::Display| {
            ImportError(match from {
                Some(at) => format!("{at}: cannot read included {}: {why}", path.display()),
                None => format!("cannot read {}: {why}", path.display()),
            })
        };
        // Looked at before opening: opening a pipe would wait for a writer.
        let regular = |meta: std::io::Result<std::fs::Metadata>| match meta {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(fail(&"not a regular file")),
            Err(e) => Err(fail(&e)),
        };
        regular(std::fs::metadata(path))?;
        let file = std::fs::File::open(path).map_err(|e| fail(&e))?;
        // And again once open, in case it was replaced in between.
        regular(file.metadata())?;
        let left = self.max_total.saturating_sub(self.read);
        let limit = self.max_file.min(left);
        let mut bytes = Vec::new();
        file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| fail(&e))?;
        let n = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if n > limit {
            return Err(if limit == self.max_file {
                fail(&format_args!("larger than {}; not an nginx config this tool reads", mib(self.max_file)))
            } else {
                fail(&format_args!(
                    "the config and its includes come to more than {}; not an nginx config this tool reads",
                    mib(self.max_total)
                ))
            });
        }
        self.read += n;
        Ok(bytes)
    }

    /// Directives up to the end of the file, or up to a `}` (its line is
    /// returned).
    fn block(
        &mut self,
        lexer: &mut Lexer<'_>,
        file: &Rc<PathBuf>,
        includes: usize,
        blocks: usize,
    ) -> Result<(Vec<Directive>, Option<usize>), ImportError> {
        let at = |line| Location { file: Rc::clone(file), line };
        let mut out = Vec::new();
        let mut words: Vec<String> = Vec::new();
        let mut start = 0;
        loop {
            let next = lexer.next().map_err(|(line, e)| ImportError(format!("{}: {e}", at(line))))?;
            let Some((token, line)) = next else {
                if !words.is_empty() {
                    return error_at(&at(start), format!("\"{}\" is not terminated by \";\"", words[0]));
                }
                return Ok((out, None));
            };
            match token {
                Token::Word(w) => {
                    if words.is_empty() {
                        start = line;
                    }
                    self.words += 1;
                    if self.words > self.max_words {
                        return error_at(
                            &at(line),
                            format!("more than {} words in all; not an nginx config this tool reads", self.max_words),
                        );
                    }
                    words.push(w);
                }
                Token::Semicolon | Token::Open if words.is_empty() => {
                    return error_at(&at(line), "unexpected \";\" or \"{\"");
                }
                Token::Semicolon => {
                    let name = words.remove(0);
                    let args = std::mem::take(&mut words);
                    if name == "include" {
                        out.extend(self.include(&args, &at(start), includes, blocks)?);
                    } else {
                        out.push(Directive { name, args, at: at(start), block: None });
                    }
                }
                Token::Open => {
                    let name = words.remove(0);
                    let args = std::mem::take(&mut words);
                    if blocks >= MAX_BLOCK_DEPTH {
                        return error_at(
                            &at(start),
                            format!("the block of \"{name}\" nests more than {MAX_BLOCK_DEPTH} blocks deep"),
                        );
                    }
                    let (block, end) = self.block(lexer, file, includes, blocks + 1)?;
                    if end.is_none() {
                        return error_at(&at(start), format!("the block of \"{name}\" is not closed"));
                    }
                    out.push(Directive { name, args, at: at(start), block: Some(block) });
                }
                Token::Close if words.is_empty() => return Ok((out, Some(line))),
                Token::Close => {
                    return error_at(&at(start), format!("\"{}\" is not terminated by \";\"", words[0]));
                }
            }
        }
    }

    fn include(
        &mut self,
        args: &[String],
        at: &Location,
        includes: usize,
        blocks: usize,
    ) -> Result<Vec<Directive>, ImportError> {
        let [pattern] = args else {
            return error_at(at, "include takes one file or mask");
        };
        if includes >= MAX_INCLUDE_DEPTH {
            return error_at(at, format!("includes nest more than {MAX_INCLUDE_DEPTH} deep (a loop?)"));
        }
        let path = self.prefix.join(pattern);
        let mut out = Vec::new();
        if !pattern.contains(['*', '?', '[']) {
            return self.file(&path, includes + 1, blocks, Some(at));
        }
        // A mask: only its last component may hold wildcards here.
        let (Some(dir), Some(mask)) = (path.parent(), path.file_name().and_then(|m| m.to_str())) else {
            return error_at(at, format!("cannot read the include mask {pattern:?}"));
        };
        if dir.to_string_lossy().contains(['*', '?', '[']) || mask.contains('[') {
            return error_at(
                at,
                format!("include {pattern:?}: only * and ? in the last path component are supported; list the files instead"),
            );
        }
        // No match is fine, as in nginx; the files are read in name order.
        let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
                .filter(|e| e.file_name().to_str().is_some_and(|n| wildcard(mask.as_bytes(), n.as_bytes())))
                .map(|e| e.path())
                .collect(),
            Err(_) => Vec::new(),
        };
        files.sort();
        for file in files {
            out.extend(self.file(&file, includes + 1, blocks, Some(at))?);
        }
        Ok(out)
    }
}

/// `16 MiB`.
fn mib(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// Shell-style `*` and `?` matching (names starting with `.` need a literal
/// `.`, as glob does), byte by byte. Greedy, going back only to the last
/// `*` seen: at most `mask.len() × name.len()` steps, however many stars.
fn wildcard(mask: &[u8], name: &[u8]) -> bool {
    if name.first() == Some(&b'.') && mask.first() != Some(&b'.') {
        return false;
    }
    let (mut m, mut n) = (0, 0);
    // After the last `*`: where the mask goes on, and how much of the name
    // that star has taken so far.
    let mut star: Option<(usize, usize)> = None;
    while let Some(&c) = name.get(n) {
        match mask.get(m) {
            Some(b'*') => {
                m += 1;
                star = Some((m, n));
            }
            Some(&w) if w == b'?' || w == c => {
                m += 1;
                n += 1;
            }
            // A mismatch: the last star takes one more byte. Earlier stars
            // need not move: whatever they could match, the last one can.
            _ => match star {
                Some((after, taken)) => {
                    m = after;
                    n = taken + 1;
                    star = Some((after, taken + 1));
                }
                None => return false,
            },
        }
    }
    mask.get(m..).is_some_and(|rest| rest.iter().all(|&w| w == b'*'))
}

// ---- translating ------------------------------------------------------------

/// Looks up a hostname: the system's resolver, or the tests' own.
pub(crate) type Resolve<'a> = &'a dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>>;

fn system_resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    (host, port).to_socket_addrs().map(Iterator::collect)
}

/// Reads `file` (following its includes) and translates the upstream
/// `upstream`, or the only upstream that uses `hash`.
pub(crate) fn import(file: &Path, upstream: Option<&str>) -> Result<Import, ImportError> {
    import_with(file, upstream, &system_resolve)
}

/// [`import`], looking hostnames up with `resolve`.
pub(crate) fn import_with(file: &Path, upstream: Option<&str>, resolve: Resolve<'_>) -> Result<Import, ImportError> {
    let prefix = file.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let top = Reader::new(prefix).file(file, 0, 0, None)?;
    // nginx.conf has an http block; a conf.d snippet is http context itself.
    let http: Vec<&Directive> = {
        let blocks: Vec<&Directive> = top.iter().filter(|d| d.name == "http").collect();
        if blocks.is_empty() {
            top.iter().collect()
        } else {
            blocks.iter().flat_map(|d| d.block.iter().flatten()).collect()
        }
    };
    let upstreams: Vec<&Directive> = http.iter().copied().filter(|d| d.name == "upstream").collect();
    let hashed = |u: &&Directive| u.block.iter().flatten().any(|d| d.name == "hash");
    let chosen = match upstream {
        Some(name) => match upstreams.iter().find(|u| u.args.first().is_some_and(|a| a == name)) {
            Some(u) => *u,
            None => {
                let names: Vec<&str> = upstreams.iter().filter_map(|u| u.args.first()).map(String::as_str).collect();
                return Err(ImportError(format!(
                    "{}: no upstream {name:?} in http context (found: {})",
                    file.display(),
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                )));
            }
        },
        None => {
            let candidates: Vec<&Directive> = upstreams.iter().copied().filter(hashed).collect();
            match candidates.as_slice() {
                [one] => *one,
                [] => {
                    return Err(ImportError(format!(
                        "{}: no upstream uses `hash` (found {} upstream(s)); name one with --upstream",
                        file.display(),
                        upstreams.len()
                    )))
                }
                many => {
                    let list: Vec<String> = many
                        .iter()
                        .map(|u| format!("{} ({})", u.args.first().map_or("?", String::as_str), u.at))
                        .collect();
                    return Err(ImportError(format!(
                        "{}: several upstreams use `hash`: {}; choose one with --upstream NAME",
                        file.display(),
                        list.join(", ")
                    )));
                }
            }
        }
    };
    Translation { http: &http, notes: Vec::new(), resolve, resolved: HashMap::new(), unchecked: 0 }.run(chosen, file)
}

struct Translation<'a> {
    http: &'a [&'a Directive],
    notes: Vec<Note>,
    resolve: Resolve<'a>,
    /// Lookups done, by host and port: each at most once.
    resolved: HashMap<(String, u16), Result<Vec<SocketAddr>, String>>,
    /// Hostnames not looked up, past [`MAX_LOOKUPS`].
    unchecked: usize,
}

/// One `[[backends]]` entry.
struct Backend {
    id: String,
    address: String,
    weight: u32,
    down: bool,
    health: Option<(u32, String)>,
    /// The server line, for a comment.
    line: String,
    at: Location,
}

impl Translation<'_> {
    fn note(&mut self, at: &Location, differs: bool, message: impl Into<String>) {
        self.notes.push(Note { at: at.clone(), message: message.into(), differs });
    }

    fn run(mut self, upstream: &Directive, file: &Path) -> Result<Import, ImportError> {
        let name = upstream.args.first().cloned().unwrap_or_default();
        let body = upstream.block.as_deref().unwrap_or(&[]);
        let mut keys = None;
        let mut backends: Vec<Backend> = Vec::new();
        for d in body {
            match d.name.as_str() {
                "hash" => keys = Some(self.hash(d)?),
                "server" => {
                    if let Some(b) = self.server(d)? {
                        backends.push(b);
                    }
                }
                "ip_hash" | "least_conn" | "least_time" | "random" | "sticky" => {
                    self.note(&d.at, true, format!("`{}` replaces or changes the balancing; not carried over", d.name))
                }
                "keepalive" | "keepalive_requests" | "keepalive_time" | "keepalive_timeout" => self.note(
                    &d.at,
                    false,
                    format!("`{}`: connection reuse, no effect on routing; see upstream.pool_* instead", d.name),
                ),
                "zone" => self.note(&d.at, false, "`zone`: shared state of nginx workers; not needed"),
                other => self.note(&d.at, false, format!("`{other}` is not carried over")),
            }
        }
        let Some(keys) = keys else {
            return error_at(
                &upstream.at,
                format!("upstream {name:?} has no `hash` directive; only `hash … consistent` can be imported"),
            );
        };
        if backends.is_empty() {
            return error_at(&upstream.at, format!("upstream {name:?} has no usable `server`"));
        }
        // Checked here too, so that a huge upstream fails fast and short.
        if backends.len() > MAX_MEMBERS {
            return error_at(
                &upstream.at,
                format!(
                    "upstream {name:?} has {} usable servers; sticky-proxy takes at most {MAX_MEMBERS}",
                    backends.len()
                ),
            );
        }
        assign_ids(&mut backends);
        if self.unchecked > 0 {
            let message = format!(
                "{} more `server` hostnames not looked up (at most {MAX_LOOKUPS} are): whether they resolve to several addresses is not checked",
                self.unchecked
            );
            self.note(&upstream.at, false, message);
        }
        let listen = self.listen(&name, &upstream.at)?;

        let mut toml = format!(
            "# Imported by `sticky-proxy import-nginx {}` from upstream {name:?} ({}).\n",
            file.display(),
            upstream.at
        );
        if self.notes.iter().any(|n| n.differs) {
            toml.push_str("#\n# WARNING: this config routes some requests differently from nginx:\n");
            for n in self.notes.iter().filter(|n| n.differs) {
                toml.push_str(&format!("#   {n}\n"));
            }
        }
        let others: Vec<&Note> = self.notes.iter().filter(|n| !n.differs).collect();
        if !others.is_empty() {
            toml.push_str("#\n# Not carried over (no effect on where devices go):\n");
            for n in others {
                toml.push_str(&format!("#   {n}\n"));
            }
        }
        toml.push_str(&format!("\n[server]\nlisten = {}\n", toml_str(&listen.0)));
        if let Some(at) = &listen.1 {
            toml.push_str(&format!("# from {at}\n"));
        }
        let keys: Vec<String> = keys.iter().map(|k| toml_str(k)).collect();
        toml.push_str(&format!(
            "\n[routing]\n# nginx's placement: each backend's address as written, 160 points per weight.\nhash = \"nginx\"\nkey = [{}]\n# nginx sends requests with an empty key round robin.\nmissing_key = \"spread\"\n",
            keys.join(", ")
        ));
        for b in &backends {
            toml.push_str(&format!("\n# {}: server {}\n[[backends]]\n", b.at, b.line));
            toml.push_str(&format!("id = {}\naddress = {}\n", toml_str(&b.id), toml_str(&b.address)));
            if b.weight != 1 {
                toml.push_str(&format!("weight = {}\n", b.weight));
            }
            if b.down {
                toml.push_str("# nginx `down`: keeps its place on the ring, gets no requests.\nstate = \"draining\"\n");
            }
            if let Some((fall, fail_timeout)) = &b.health {
                toml.push_str(&format!(
                    "health = {{ fall = {fall}, rise = 1, fail_timeout = {} }}\n",
                    toml_str(fail_timeout)
                ));
            }
        }
        // The output must be a config the proxy accepts.
        if let Err(e) = Config::parse(&toml) {
            return Err(ImportError(format!("{}: the translation is not a valid config ({e}):\n{toml}", upstream.at)));
        }
        Ok(Import { toml, notes: self.notes })
    }

    /// `hash KEY [consistent]`: the key sources.
    fn hash(&mut self, d: &Directive) -> Result<Vec<String>, ImportError> {
        let (key, consistent) = match d.args.as_slice() {
            [key] => (key, false),
            [key, c] if c == "consistent" => (key, true),
            _ => return error_at(&d.at, "expected `hash KEY consistent;`"),
        };
        if !consistent {
            self.note(
                &d.at,
                true,
                "`hash` without `consistent` places keys by crc32 modulo the total weight; sticky-proxy can only reproduce `hash … consistent`, so devices will move",
            );
        }
        self.key_sources(key, &d.at, 0)
    }

    /// The key sources a variable expression stands for.
    fn key_sources(&mut self, value: &str, at: &Location, depth: usize) -> Result<Vec<String>, ImportError> {
        let Some(var) = single_variable(value) else {
            return error_at(at, format!("key {value:?}: only a single variable ($http_…, $arg_…, $cookie_…, or a map of them) can be translated"));
        };
        let var = var.to_ascii_lowercase();
        if let Some(h) = var.strip_prefix("http_") {
            return Ok(vec![format!("header:{}", h.replace('_', "-"))]);
        }
        if let Some(a) = var.strip_prefix("arg_") {
            return Ok(vec![format!("query:{a}")]);
        }
        if let Some(c) = var.strip_prefix("cookie_") {
            return Ok(vec![format!("cookie:{c}")]);
        }
        let map = self.http.iter().find(|d| {
            d.name == "map"
                && d.args.get(1).and_then(|v| single_variable(v)).is_some_and(|v| v.eq_ignore_ascii_case(&var))
        });
        match map {
            Some(map) if depth < 8 => self.map_sources(map, depth),
            Some(map) => error_at(&map.at, "maps nest too deep"),
            None => error_at(
                at,
                format!("key ${var}: not a header, query argument, cookie or map of them; sticky-proxy cannot take the device ID from it"),
            ),
        }
    }

    /// A `map` that picks the first non-empty of its source and one other
    /// value: `default $source; "" $other;`.
    fn map_sources(&mut self, map: &Directive, depth: usize) -> Result<Vec<String>, ImportError> {
        let source = map.args.first().map(String::as_str).unwrap_or_default();
        let unsupported = |why: &str| -> Result<Vec<String>, ImportError> {
            error_at(
                &map.at,
                format!("map {source} → {}: {why}; only `map $a $key {{ default $a; \"\" $b; }}` (first non-empty of $a, $b) can be translated", map.args.get(1).map_or("?", String::as_str)),
            )
        };
        let (mut default, mut empty) = (None, None);
        for entry in map.block.iter().flatten() {
            match (entry.name.as_str(), entry.args.as_slice()) {
                ("default", [v]) => default = Some(v.clone()),
                ("", [v]) => empty = Some(v.clone()),
                (other, _) => return unsupported(&format!("entry {other:?} at line {}", entry.at.line)),
            }
        }
        let same = |v: &Option<String>| v.as_deref().and_then(single_variable) == single_variable(source);
        if !same(&default) {
            return unsupported("the default is not the source variable");
        }
        let mut sources = self.key_sources(source, &map.at, depth + 1)?;
        if let Some(other) = empty {
            sources.extend(self.key_sources(&other, &map.at, depth + 1)?);
        }
        Ok(sources)
    }

    /// One `server` line of the upstream.
    fn server(&mut self, d: &Directive) -> Result<Option<Backend>, ImportError> {
        let Some(address) = d.args.first() else {
            return error_at(&d.at, "`server` needs an address");
        };
        let mut b = Backend {
            id: String::new(),
            address: address.clone(),
            weight: 1,
            down: false,
            health: None,
            line: d.args.join(" "),
            at: d.at.clone(),
        };
        let (mut max_fails, mut fail_timeout) = (None, None);
        for param in &d.args[1..] {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            match key {
                "weight" => match value.parse::<u32>() {
                    Ok(w) if w >= 1 => b.weight = w,
                    _ => return error_at(&d.at, format!("invalid {param:?}")),
                },
                "down" => b.down = true,
                "backup" => {
                    self.note(&d.at, false, format!("backup server {address} left out: nginx refuses `backup` after `hash`, and uses backups listed before it only when it falls back to round robin"));
                    return Ok(None);
                }
                "max_fails" => match value.parse::<u32>() {
                    Ok(n) => max_fails = Some(n),
                    Err(_) => return error_at(&d.at, format!("invalid {param:?}")),
                },
                "fail_timeout" => match nginx_duration(value) {
                    Some(t) => fail_timeout = Some(t),
                    None => return error_at(&d.at, format!("invalid {param:?}")),
                },
                "max_conns" => self.note(
                    &d.at,
                    false,
                    format!(
                        "{param}: no connection limit in sticky-proxy; nginx skips a full server like a failed one"
                    ),
                ),
                _ => self.note(&d.at, false, format!("server parameter {param:?} is not carried over")),
            }
        }
        match max_fails {
            Some(0) => self.note(&d.at, false, format!("{address}: max_fails=0 (never marked failed) has no equivalent; sticky-proxy marks it down after 1 failure")),
            Some(n) if n > 100 => self.note(&d.at, false, format!("{address}: max_fails={n} is more than sticky-proxy's limit of 100; using 100")),
            _ => {}
        }
        if max_fails.is_some_and(|n| n != 1) || fail_timeout.as_deref().is_some_and(|t| t != "10s") {
            let fall = max_fails.filter(|&n| n > 0).unwrap_or(1).min(100);
            b.health = Some((fall, fail_timeout.unwrap_or_else(|| "10s".into())));
            self.note(&d.at, false, format!("{address}: max_fails/fail_timeout become health.fall/fail_timeout: consecutive failures rather than failures within fail_timeout"));
        }
        if address.as_bytes().get(..5).is_some_and(|p| p.eq_ignore_ascii_case(b"unix:")) {
            self.note(&d.at, true, format!("{address}: sticky-proxy cannot connect to unix sockets; left out, so its devices go to other servers"));
            return Ok(None);
        }
        self.check_resolution(address, &d.at);
        Ok(Some(b))
    }

    /// A hostname that resolves to several addresses is several servers to
    /// nginx, sharing one place on the ring and taking its requests in turn.
    fn check_resolution(&mut self, address: &str, at: &Location) {
        let host = address.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty());
        let (host, port) = host.map_or((address, 80), |(h, p)| (h, p.parse().unwrap_or(80)));
        if host.starts_with('[') || host.parse::<std::net::Ipv4Addr>().is_ok() {
            return;
        }
        let Some(result) = self.lookup(host, port) else {
            return;
        };
        match result {
            Ok(mut addrs) => {
                addrs.sort();
                addrs.dedup();
                if addrs.len() > 1 {
                    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                    self.note(at, true, format!("{address} resolves to {} addresses ({}): nginx takes them in turn for this server's devices; sticky-proxy connects to the name, whichever address the resolver gives first", addrs.len(), list.join(", ")));
                }
            }
            Err(e) => {
                self.note(at, false, format!("{address} does not resolve here ({e}); nginx would not start with it"))
            }
        }
    }

    /// `host:port` looked up, once per import; `None` past [`MAX_LOOKUPS`].
    fn lookup(&mut self, host: &str, port: u16) -> Option<Result<Vec<SocketAddr>, String>> {
        let key = (host.to_string(), port);
        if let Some(known) = self.resolved.get(&key) {
            return Some(known.clone());
        }
        if self.resolved.len() >= MAX_LOOKUPS {
            self.unchecked += 1;
            return None;
        }
        let result = (self.resolve)(host, port).map_err(|e| e.to_string());
        self.resolved.insert(key, result.clone());
        Some(result)
    }

    /// The listen address of the first `server` block proxying to the
    /// upstream, and where it was found.
    fn listen(&mut self, upstream: &str, upstream_at: &Location) -> Result<(String, Option<Location>), ImportError> {
        let proxies: Vec<&Directive> =
            self.http.iter().copied().filter(|d| d.name == "server" && proxies_to(d, upstream)).collect();
        let Some(server) = proxies.first() else {
            self.note(
                upstream_at,
                false,
                format!("no server block has `proxy_pass http://{upstream}`; listening on 0.0.0.0:8080"),
            );
            return Ok(("0.0.0.0:8080".into(), None));
        };
        for other in &proxies[1..] {
            self.note(
                &other.at,
                false,
                "another server block proxies to this upstream; only the first one's listen is used",
            );
        }
        let listens: Vec<&Directive> = server.block.iter().flatten().filter(|d| d.name == "listen").collect();
        let Some(listen) = listens.first() else {
            self.note(&server.at, false, "the server block has no `listen`: nginx's default, *:80");
            return Ok(("0.0.0.0:80".into(), Some(server.at.clone())));
        };
        for other in &listens[1..] {
            self.note(
                &other.at,
                false,
                format!("only one listen address is carried over; `listen {}` is not", other.args.join(" ")),
            );
        }
        for param in listen.args.iter().skip(1) {
            self.note(&listen.at, false, format!("listen parameter {param:?} is not carried over"));
        }
        let Some(spec) = listen.args.first() else {
            return error_at(&listen.at, "`listen` needs an address");
        };
        let addr = listen_address(spec).or_else(|| {
            // `host:port`, as `ToSocketAddrs` for a str takes it.
            let (host, port) = spec.rsplit_once(':')?;
            let resolved = (self.resolve)(host, port.parse().ok()?).ok()?.into_iter().next()?;
            self.note(&listen.at, false, format!("listen {spec}: the name is resolved once, to {resolved}"));
            Some(resolved.to_string())
        });
        match addr {
            Some(a) => Ok((a, Some(listen.at.clone()))),
            None => error_at(&listen.at, format!("listen {spec:?}: not an address sticky-proxy can listen on")),
        }
    }
}

/// Backend ids from the addresses (what nginx's logs show), made plain and
/// unique: `[fd00::6]:8080` → `fd00::6:8080`; a repeated address gets `-2`…
/// (the first of `-2`, `-3`, … not taken yet). Linear: a set of the ids
/// taken, and for each plain id the suffix to try next.
fn assign_ids(backends: &mut [Backend]) {
    let mut taken: HashSet<String> = HashSet::with_capacity(backends.len());
    let mut next: HashMap<String, u64> = HashMap::new();
    for b in backends.iter_mut() {
        let plain: String = b
            .address
            .chars()
            .filter(|c| !matches!(c, '[' | ']'))
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '/' | '-') { c } else { '-' })
            .take(240)
            .collect();
        let plain = if plain.is_empty() { "backend".to_string() } else { plain };
        let id = if taken.contains(&plain) {
            // Every suffix below the one stored was taken when tried, and
            // ids are never given back.
            let n = next.entry(plain.clone()).or_insert(2);
            loop {
                let id = format!("{plain}-{n}");
                *n += 1;
                if !taken.contains(&id) {
                    break id;
                }
            }
        } else {
            plain
        };
        taken.insert(id.clone());
        b.id = id;
    }
}

/// `$name` or `${name}`, alone, without any other text.
fn single_variable(value: &str) -> Option<&str> {
    let name = value.strip_prefix('$')?;
    let name = name.strip_prefix('{').and_then(|n| n.strip_suffix('}')).unwrap_or(name);
    (!name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')).then_some(name)
}

/// Whether a server block (or a location in it) proxies to `upstream`.
fn proxies_to(block: &Directive, upstream: &str) -> bool {
    block.block.iter().flatten().any(|d| {
        let target = (d.name == "proxy_pass")
            .then(|| d.args.first())
            .flatten()
            .and_then(|url| url.split_once("://"))
            .map(|(_, rest)| rest.split(['/', '?']).next().unwrap_or(rest));
        target == Some(upstream) || proxies_to(d, upstream)
    })
}

/// A `listen` address as a socket address: `8080`, `*:8080`,
/// `127.0.0.1:8080`, `127.0.0.1` (port 80), `[::]:8080`.
fn listen_address(spec: &str) -> Option<String> {
    if let Ok(port) = spec.parse::<u16>() {
        return Some(format!("0.0.0.0:{port}"));
    }
    if let Some(port) = spec.strip_prefix("*:") {
        return port.parse::<u16>().ok().map(|p| format!("0.0.0.0:{p}"));
    }
    if let Ok(a) = spec.parse::<SocketAddr>() {
        return Some(a.to_string());
    }
    if let Ok(ip) = spec.parse::<std::net::Ipv4Addr>() {
        return Some(format!("{ip}:80"));
    }
    let v6 = spec.strip_prefix('[').and_then(|s| s.strip_suffix(']'))?;
    v6.parse::<std::net::Ipv6Addr>().ok().map(|ip| format!("[{ip}]:80"))
}

/// nginx's time (`10`, `10s`, `1m`, `500ms`, `1h`) as a sticky-proxy duration.
fn nginx_duration(value: &str) -> Option<String> {
    let text = if value.bytes().all(|b| b.is_ascii_digit()) { format!("{value}s") } else { value.to_string() };
    parse_duration(&text).filter(|d| !d.is_zero()).map(|_| text)
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(text: &str) -> Vec<Token> {
        let mut lexer = Lexer { src: text.as_bytes(), pos: 0, line: 1 };
        let mut out = Vec::new();
        while let Some((t, _)) = lexer.next().expect("valid") {
            out.push(t);
        }
        out
    }

    fn word(s: &str) -> Token {
        Token::Word(s.into())
    }

    #[test]
    fn tokens_follow_nginx() {
        assert_eq!(
            tokens("map $a ${b} { \"\" 'x y'; default \"q\\\"\\t\"; } # c ; {\nz\\;w;"),
            [
                word("map"),
                word("$a"),
                word("${b}"),
                Token::Open,
                word(""),
                word("x y"),
                Token::Semicolon,
                word("default"),
                word("q\"\t"),
                Token::Semicolon,
                Token::Close,
                // An escaped ';' does not end the word; its backslash stays.
                word("z\\;w"),
                Token::Semicolon,
            ]
        );
        let mut bad = Lexer { src: b"a \"b\"c;", pos: 0, line: 1 };
        assert!(bad.next().is_ok());
        assert!(bad.next().is_err());
    }

    #[test]
    fn wildcards_match_like_glob() {
        assert!(wildcard(b"*.conf", b"a.conf"));
        assert!(!wildcard(b"*.conf", b".hidden.conf"));
        assert!(wildcard(b".*", b".hidden"));
        assert!(wildcard(b"site?.conf", b"site1.conf"));
        assert!(!wildcard(b"site?.conf", b"site.conf"));
        assert!(!wildcard(b"*.conf", b"a.conf.bak"));
        assert!(wildcard(b"*", b"x"));
        assert!(wildcard(b"**", b""));
        assert!(!wildcard(b"?", b""));
        assert!(wildcard(b"a*b*c", b"abxbxc"));
        assert!(!wildcard(b"a*b*c", b"abxbxcx"));
    }

    /// The old recursive matcher: right, but exponential in the stars.
    fn reference(mask: &[u8], name: &[u8]) -> bool {
        fn go(m: &[u8], n: &[u8]) -> bool {
            match (m.first(), n.first()) {
                (None, None) => true,
                (Some(b'*'), _) => go(&m[1..], n) || (!n.is_empty() && go(m, &n[1..])),
                (Some(b'?'), Some(_)) => go(&m[1..], &n[1..]),
                (Some(a), Some(b)) if a == b => go(&m[1..], &n[1..]),
                _ => false,
            }
        }
        !(name.first() == Some(&b'.') && mask.first() != Some(&b'.')) && go(mask, name)
    }

    /// Every string of up to `len` bytes from `alphabet`.
    fn strings(alphabet: &[u8], len: usize) -> Vec<Vec<u8>> {
        let mut all = vec![Vec::new()];
        let mut last = vec![Vec::new()];
        for _ in 0..len {
            last = last
                .iter()
                .flat_map(|s: &Vec<u8>| alphabet.iter().map(move |&c| [s.as_slice(), &[c]].concat()))
                .collect();
            all.extend(last.iter().cloned());
        }
        all
    }

    #[test]
    fn wildcards_agree_with_the_recursive_matcher() {
        let masks = strings(b"ab.*?", 5);
        let names = strings(b"ab.", 5);
        for mask in &masks {
            for name in &names {
                assert_eq!(
                    wildcard(mask, name),
                    reference(mask, name),
                    "{:?} on {:?}",
                    String::from_utf8_lossy(mask),
                    String::from_utf8_lossy(name)
                );
            }
        }
    }

    #[test]
    fn many_stars_match_in_polynomial_time() {
        // The recursive matcher takes seconds from 6 stars on, and would
        // not finish these in any time.
        let mask = format!("{}b.conf", "a*".repeat(40));
        let a = "a".repeat(200);
        assert!(!wildcard(mask.as_bytes(), format!("{a}.conf").as_bytes()));
        assert!(wildcard(mask.as_bytes(), format!("{a}b.conf").as_bytes()));
        assert!(!wildcard(mask.as_bytes(), format!("{}b.conf", "a".repeat(39)).as_bytes()));
        let mask = format!("{}?b", "*?".repeat(40));
        assert!(!wildcard(mask.as_bytes(), a.as_bytes()));
        assert!(wildcard(mask.as_bytes(), format!("{a}b").as_bytes()));
    }

    fn backends(addresses: &[String]) -> Vec<Backend> {
        let at = Location { file: Rc::new(PathBuf::from("nginx.conf")), line: 1 };
        addresses
            .iter()
            .map(|a| Backend {
                id: String::new(),
                address: a.clone(),
                weight: 1,
                down: false,
                health: None,
                line: a.clone(),
                at: at.clone(),
            })
            .collect()
    }

    fn ids(addresses: &[String]) -> Vec<String> {
        let mut b = backends(addresses);
        assign_ids(&mut b);
        b.into_iter().map(|b| b.id).collect()
    }

    #[test]
    fn ids_are_plain_and_unique() {
        let addresses: Vec<String> = [
            "[fd00::6]:8080",
            "10.0.0.1",
            "10.0.0.1-2",
            "10.0.0.1",
            "10.0.0.1",
            "",
            "a b",
            "a b",
            "10.0.0.1-3-2",
            "10.0.0.1-3",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            ids(&addresses),
            [
                "fd00::6:8080",
                "10.0.0.1",
                "10.0.0.1-2",
                // -2 is taken by the address written so.
                "10.0.0.1-3",
                "10.0.0.1-4",
                "backend",
                "a-b",
                "a-b-2",
                "10.0.0.1-3-2",
                // Taken by the second repeat of 10.0.0.1.
                "10.0.0.1-3-3",
            ]
        );
    }

    #[test]
    fn ids_of_a_huge_upstream() {
        // 50,000 servers: 30,000 distinct, one of them repeated 20,000
        // times, among addresses that look like its repeats. The ids used
        // to be found by scanning all the ids taken for every candidate,
        // so this was cubic and did not finish.
        let mut addresses: Vec<String> =
            (0..30_000u32).map(|i| format!("10.{}.{}.{}:80", i >> 16, (i >> 8) & 255, i & 255)).collect();
        addresses.extend((2..1_000).step_by(3).map(|n| format!("10.0.0.0:80-{n}")));
        let repeats = 50_000 - addresses.len();
        addresses.extend(std::iter::repeat_n("10.0.0.0:80".to_string(), repeats));
        let ids = ids(&addresses);
        assert_eq!(ids.len(), 50_000);
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 50_000, "unique");
        assert_eq!(ids[..30_000], addresses[..30_000]);
        assert_eq!(ids[30_000..30_333], addresses[30_000..30_333]);
        // The repeats take -3, -4, -6, -7, …: every suffix not written.
        let mut want = (3..).filter(|n| n % 3 != 2 || *n >= 1_000).map(|n| format!("10.0.0.0:80-{n}"));
        for id in &ids[30_333..] {
            assert_eq!(Some(id), want.next().as_ref());
        }
    }

    /// A fresh directory holding `files`, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str, files: &[(&str, &[u8])]) -> Dir {
            let dir = std::env::temp_dir().join(format!("sticky-proxy-nginx-unit-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("mkdir");
            for (path, content) in files {
                std::fs::write(dir.join(path), content).expect("write");
            }
            Dir(dir)
        }

        fn read(&self, max_file: u64, max_total: u64) -> Result<Vec<Directive>, ImportError> {
            let mut reader = Reader { max_file, max_total, ..Reader::new(self.0.clone()) };
            reader.file(&self.0.join("nginx.conf"), 0, 0, None)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_are_bounded_per_file_and_in_all() {
        let dir = Dir::new(
            "limits",
            &[
                ("nginx.conf", b"include a.conf;\ninclude b.conf;\n"),
                ("a.conf", &[b'#'; 100]),
                ("b.conf", &[b'#'; 100]),
            ],
        );
        let nginx = dir.0.join("nginx.conf").display().to_string();
        assert!(dir.read(100, 232).is_ok(), "each file up to the limit, 232 bytes in all");
        let e = dir.read(99, 1_000).expect_err("a.conf is over 99 bytes").0;
        assert_eq!(
            e,
            format!(
                "{nginx}:1: cannot read included {}: larger than 99 bytes; not an nginx config this tool reads",
                dir.0.join("a.conf").display()
            )
        );
        let e = dir.read(100, 231).expect_err("231 bytes in all").0;
        assert_eq!(e, format!("{nginx}:2: cannot read included {}: the config and its includes come to more than 231 bytes; not an nginx config this tool reads", dir.0.join("b.conf").display()));
        let e = dir.read(31, 1_000).expect_err("the main file is 32 bytes").0;
        assert!(e.starts_with(&format!("cannot read {nginx}: larger than 31 bytes")), "{e}");
        assert_eq!(mib(MAX_FILE_BYTES), "16 MiB");
    }

    #[test]
    fn words_are_bounded_in_all() {
        let dir = Dir::new("words", &[("nginx.conf", b"a b;\ninclude x.conf;\n"), ("x.conf", b"c;\nd e;\n")]);
        let read = |max_words| {
            let mut reader = Reader { max_words, ..Reader::new(dir.0.clone()) };
            reader.file(&dir.0.join("nginx.conf"), 0, 0, None)
        };
        assert_eq!(read(7).map(|d| d.len()), Ok(3), "a, c and d: 7 words with the include");
        let e = read(6).expect_err("7 words").0;
        assert_eq!(
            e,
            format!(
                "{}:2: more than 6 words in all; not an nginx config this tool reads",
                dir.0.join("x.conf").display()
            )
        );
    }

    #[test]
    #[cfg(unix)]
    fn only_regular_files_are_read() {
        let dir = Dir::new("special", &[("nginx.conf", b"http {\n  include sub/*;\n}\n")]);
        std::fs::create_dir(dir.0.join("sub")).expect("mkdir");
        std::fs::write(dir.0.join("sub/a.conf"), "").expect("write");
        std::os::unix::fs::symlink("/dev/null", dir.0.join("sub/null")).expect("symlink");
        let e = dir.read(MAX_FILE_BYTES, MAX_TOTAL_BYTES).expect_err("/dev/null is a device").0;
        let (nginx, null) = (dir.0.join("nginx.conf"), dir.0.join("sub/null"));
        assert_eq!(e, format!("{}:2: cannot read included {}: not a regular file", nginx.display(), null.display()));
        let e = Dir::new("none", &[]).read(MAX_FILE_BYTES, MAX_TOTAL_BYTES).expect_err("no nginx.conf").0;
        assert!(e.starts_with("cannot read ") && e.contains("nginx.conf: "), "{e}");
    }

    #[test]
    fn blocks_nest_at_most_256_deep_across_includes() {
        let open = |n: usize| "a {\n".repeat(n);
        let close = |n: usize| "}\n".repeat(n);
        // 200 blocks here and 56 in the include: the limit.
        let main = format!("{}include inner.conf;\n{}", open(200), close(200));
        let dir = Dir::new(
            "deep",
            &[("nginx.conf", main.as_bytes()), ("inner.conf", format!("{}{}", open(56), close(56)).as_bytes())],
        );
        assert!(dir.read(MAX_FILE_BYTES, MAX_TOTAL_BYTES).is_ok());
        let dir = Dir::new(
            "deeper",
            &[("nginx.conf", main.as_bytes()), ("inner.conf", format!("{}{}", open(57), close(57)).as_bytes())],
        );
        let e = dir.read(MAX_FILE_BYTES, MAX_TOTAL_BYTES).expect_err("257 deep").0;
        assert_eq!(
            e,
            format!("{}:57: the block of \"a\" nests more than 256 blocks deep", dir.0.join("inner.conf").display())
        );
    }

    #[test]
    fn variables_and_addresses() {
        assert_eq!(single_variable("$http_x_id"), Some("http_x_id"));
        assert_eq!(single_variable("${arg_id}"), Some("arg_id"));
        assert_eq!(single_variable("$host$uri"), None);
        assert_eq!(single_variable("x$a"), None);
        assert_eq!(listen_address("8080").as_deref(), Some("0.0.0.0:8080"));
        assert_eq!(listen_address("*:81").as_deref(), Some("0.0.0.0:81"));
        assert_eq!(listen_address("[::]:82").as_deref(), Some("[::]:82"));
        assert_eq!(listen_address("10.0.0.1").as_deref(), Some("10.0.0.1:80"));
        assert_eq!(listen_address("unix:/x"), None);
        assert_eq!(nginx_duration("30").as_deref(), Some("30s"));
        assert_eq!(nginx_duration("1m").as_deref(), Some("1m"));
        assert_eq!(nginx_duration("x"), None);
        assert_eq!(toml_str("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn hostnames_are_looked_up_once_each_and_64_at_most() {
        // Found by the fuzz tests: 122 lines `server 10.0.0ver ...;` were
        // 122 lookups of one name, 25 s on a resolver that drops queries.
        let mut conf = String::from("upstream u {\n  hash $http_x consistent;\n");
        for i in 0..500 {
            conf.push_str(&format!("  server same.invalid weight=1;\n  server host-{i}.invalid;\n"));
        }
        conf.push_str("}\nserver { listen name.invalid:8080; location / { proxy_pass http://u; } }\n");
        let dir = Dir::new("lookups", &[("nginx.conf", conf.as_bytes())]);
        let asked = std::cell::RefCell::new(Vec::new());
        let resolve = |host: &str, port: u16| {
            asked.borrow_mut().push(format!("{host}:{port}"));
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
        };
        let import = import_with(&dir.0.join("nginx.conf"), None, &resolve).expect("imports");
        let asked = asked.into_inner();
        // `same.invalid` once, 63 others, and the listen.
        assert_eq!(asked.len(), MAX_LOOKUPS + 1, "{asked:?}");
        assert_eq!(asked.iter().filter(|a| *a == "same.invalid:80").count(), 1);
        assert_eq!(asked.last().map(String::as_str), Some("name.invalid:8080"));
        assert!(import.toml.contains("listen = \"127.0.0.1:8080\""), "{}", import.toml);
        // The 500 distinct names past the first 63.
        let unchecked = format!("{} more `server` hostnames not looked up", 500 - (MAX_LOOKUPS - 1));
        assert!(import.notes.iter().any(|n| n.message.starts_with(&unchecked)), "{:?}", import.notes);
    }
}
