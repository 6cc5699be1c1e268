//! The TOML parser's errors as [`ConfigError`]s that name the field
//! (`backends[2].weight`) and say what is wrong in plain words.
//!
//! The parser's error carries a byte span and serde's message (`invalid
//! type: string "3", expected i64`). The span is mapped to a key path by
//! walking the document as the parser itself read it ([`DeTable`], whose
//! keys and values keep their spans), and the message is rewritten.

use std::fmt::Write as _;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::{line_of, ConfigError};

/// Keys written as `[[key]]`, one table per entry, and what an entry is.
const LISTS: &[(&str, &str)] = &[("backends", "backend"), ("server.tls.certificates", "certificate")];

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

fn render(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) if out.is_empty() => out.push_str(k),
            Step::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Step::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
        }
    }
    out
}

/// `backends[2].weight` without its indexes: `backends.weight`.
fn unindexed(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => in_index = true,
            ']' => in_index = false,
            c if !in_index => out.push(c),
            _ => {}
        }
    }
    out
}

/// Converts the parser's error on `text`.
pub(super) fn convert(text: &str, error: &toml::de::Error) -> ConfigError {
    let span = error.span().filter(|s| s.start <= s.end && s.end <= text.len());
    let line = span.as_ref().map(|s| line_of(text, s.start));
    let (field, message) = match &span {
        Some(span) => explain(text, error.message().trim(), span.clone()),
        None => (None, error.message().trim().to_string()),
    };
    ConfigError { file: None, line, field, message }
}

/// The field and the message for serde's `message` about `text[span]`.
fn explain(text: &str, message: &str, span: std::ops::Range<usize>) -> (Option<String>, String) {
    let (document, _) = DeTable::parse_recoverable(text);
    let at = text.get(span.clone()).unwrap_or("");
    // An empty span (a missing field of the document itself) is at no key.
    let path = if span.is_empty() && message.starts_with("missing field") {
        String::new()
    } else {
        render(&deepest_at(document.get_ref(), span.start))
    };
    let field = (!path.is_empty()).then(|| path.clone());

    if let Some(name) = quoted(message).filter(|_| message.starts_with("unknown field")) {
        let expected = backticked(message.split_once(", expected").map_or("", |(_, list)| list));
        return (field.or_else(|| Some(name.to_string())), unknown_field(name, &expected));
    }
    if let Some(name) = quoted(message).filter(|_| message.starts_with("missing field")) {
        let full = if path.is_empty() { name.to_string() } else { format!("{path}.{name}") };
        let hint = match full.as_str() {
            "server" | "routing" => format!("required: add a [{name}] section (see config.toml.example)"),
            _ => "required, and not set".to_string(),
        };
        return (Some(full), hint);
    }
    if let Some(value) = quoted(message).filter(|_| message.starts_with("unknown variant")) {
        let choices = message.split_once(", expected ").map_or("", |(_, c)| c);
        return (field, format!("{value:?} is not a choice here: expected {choices}"));
    }
    if message == "duplicate key" {
        return duplicate(text, document.get_ref(), span, at);
    }
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        if let Some((found, expected)) = rest.rsplit_once(", expected ") {
            let expected = plain_expected(expected);
            if expected == "a list" && found == "map" {
                if let Some(list) = list_advice(&path) {
                    return (field, list);
                }
            }
            let name = unindexed(&path);
            let header_of_one = at.starts_with("[[") && !LISTS.iter().any(|(list, _)| *list == name);
            if header_of_one && (expected == "a table" || found == "map") {
                return (Some(name.clone()), format!("`{name}` is one table: write [{name}], not [[{name}]]"));
            }
            return (field, format!("expected {expected}, found {}", plain_found(found)));
        }
    }
    // Syntax errors: the parser's own words are already plain.
    (field, message.to_string())
}

/// The first `` `…` `` of `message`.
fn quoted(message: &str) -> Option<&str> {
    let (_, rest) = message.split_once('`')?;
    Some(rest.split_once('`')?.0)
}

/// Every `` `…` `` of `text`.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

fn list_advice(path: &str) -> Option<String> {
    let key = unindexed(path);
    let (_, entry) = LISTS.iter().find(|(list, _)| *list == key)?;
    Some(format!("`{key}` is a list: write each {entry} as [[{key}]], not [{key}]"))
}

fn unknown_field(name: &str, expected: &[&str]) -> String {
    let close = expected
        .iter()
        .map(|known| (edit_distance(name, known), *known))
        .filter(|(d, known)| *d <= 2.max(known.len() / 4) && *d < known.len())
        .min();
    match (close, expected) {
        (Some((_, known)), _) => format!("unknown field; did you mean `{known}`?"),
        (None, []) => "unknown field; this table takes no fields".to_string(),
        (None, known) => format!("unknown field; the fields here are {}", known.join(", ")),
    }
}

/// A key or table given twice; `at` is the repeated key's text.
fn duplicate(text: &str, document: &DeTable<'_>, span: std::ops::Range<usize>, at: &str) -> (Option<String>, String) {
    let line_start = text.get(..span.start).and_then(|t| t.rfind('\n')).map_or(0, |i| i + 1);
    let line = text.get(line_start..).and_then(|t| t.lines().next()).unwrap_or("").trim();
    if let Some(header) = line.strip_prefix('[') {
        // A table header: `[backends]` beside `[[backends]]`, or a table twice.
        let name: String =
            header.trim_matches(|c| c == '[' || c == ']').split('.').map(str::trim).collect::<Vec<_>>().join(".");
        if let Some(advice) = list_advice(&name) {
            return (Some(name), advice);
        }
        return (Some(name.clone()), format!("[{name}] appears twice: put its keys under one [{name}]"));
    }
    let table = render(&enclosing_table(document, span.start));
    let field = if table.is_empty() { at.to_string() } else { format!("{table}.{at}") };
    (Some(field), "set twice: keep one".to_string())
}

/// The deepest key whose key or value spans `offset`. Header tables span
/// only their header, so every node is visited, not just those on a path.
fn deepest_at(document: &DeTable<'_>, offset: usize) -> Vec<Step> {
    let mut best = Vec::new();
    let mut path = Vec::new();
    visit(document, &mut path, &mut |path, key, value| {
        let hit = key.is_some_and(|k| k.contains(&offset)) || value.contains(&offset);
        if hit && path.len() > best.len() {
            best = path.to_vec();
        }
    });
    best
}

/// The table being written at `offset`: the one whose header (or inline
/// table) starts last before it.
fn enclosing_table(document: &DeTable<'_>, offset: usize) -> Vec<Step> {
    let mut best: (usize, Vec<Step>) = (0, Vec::new());
    let mut path = Vec::new();
    visit(document, &mut path, &mut |path, _, value| {
        let is_table = value.is_table;
        if is_table
            && value.start <= offset
            && (value.start > best.0 || value.start == best.0 && path.len() > best.1.len())
        {
            best = (value.start, path.to_vec());
        }
    });
    best.1
}

/// Called with each key's path, the span of the key (none for an array
/// item) and where its value is.
type Visitor<'a> = dyn FnMut(&[Step], Option<std::ops::Range<usize>>, Place) + 'a;

/// Where a value was written, and whether it is a table.
struct Place {
    start: usize,
    end: usize,
    is_table: bool,
}

impl Place {
    fn contains(&self, offset: &usize) -> bool {
        (self.start..self.end).contains(offset)
    }
}

fn visit(table: &DeTable<'_>, path: &mut Vec<Step>, f: &mut Visitor<'_>) {
    for (key, value) in table.iter() {
        path.push(Step::Key(key.get_ref().to_string()));
        visit_value(value, Some(key.span()), path, f);
        path.pop();
    }
}

fn visit_value(
    value: &Spanned<DeValue<'_>>,
    key: Option<std::ops::Range<usize>>,
    path: &mut Vec<Step>,
    f: &mut Visitor<'_>,
) {
    let span = value.span();
    let is_table = matches!(value.get_ref(), DeValue::Table(_));
    f(path, key, Place { start: span.start, end: span.end, is_table });
    match value.get_ref() {
        DeValue::Table(t) => visit(t, path, f),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Step::Index(i));
                visit_value(item, None, path, f);
                path.pop();
            }
        }
        _ => {}
    }
}

/// serde's name for what was expected, in plain words.
fn plain_expected(expected: &str) -> String {
    match expected {
        "i8" | "i16" | "i32" | "i64" | "i128" | "u8" | "u16" | "u32" | "u64" | "u128" | "usize" | "isize" => {
            "a whole number".to_string()
        }
        "f32" | "f64" => "a number".to_string(),
        "a boolean" => "true or false".to_string(),
        "a string" | "a borrowed string" => "a string in quotes".to_string(),
        "a sequence" => "a list".to_string(),
        "a map" | "map" => "a table".to_string(),
        e if e.starts_with("struct ") => "a table".to_string(),
        e => e.to_string(),
    }
}

/// serde's description of what was found (`string "3"`, `integer `3``),
/// in plain words.
fn plain_found(found: &str) -> String {
    if let Some(s) = found.strip_prefix("string ") {
        return format!("the string {s}");
    }
    if let Some(rest) = found.strip_prefix("integer ") {
        let number = quoted(rest).unwrap_or(rest);
        return match rest.ends_with(" as i128") || rest.ends_with(" as u128") {
            true => format!("{number}, which is too large"),
            false => format!("the whole number {number}"),
        };
    }
    if let Some(rest) = found.strip_prefix("floating point ") {
        return format!("the number {}", quoted(rest).unwrap_or(rest));
    }
    if let Some(rest) = found.strip_prefix("boolean ") {
        return quoted(rest).unwrap_or(rest).to_string();
    }
    match found {
        "map" => "a table".to_string(),
        "sequence" => "a list".to_string(),
        f => f.to_string(),
    }
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substituted = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substituted.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const SERVER: &str = "[server]\nlisten = \"127.0.0.1:8080\"\n";
    const ROUTING: &str = "[routing]\nkey = [\"header:x-device-id\"]\n";
    const THREE: &str = "[[backends]]\nid = \"a\"\naddress = \"127.0.0.1:9001\"\n\
                         [[backends]]\nid = \"b\"\naddress = \"127.0.0.1:9002\"\n\
                         [[backends]]\nid = \"c\"\naddress = \"127.0.0.1:9003\"\n";

    fn error_for(text: &str) -> ConfigError {
        match Config::parse(text) {
            Ok(_) => panic!("config should have been rejected:\n{text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn an_unknown_field_is_named_by_its_path_with_a_suggestion() {
        let e = error_for(&format!("{SERVER}shutdown_grac = \"5s\"\n{ROUTING}{THREE}"));
        assert_eq!(e.field.as_deref(), Some("server.shutdown_grac"), "{e}");
        assert_eq!(e.line, Some(3), "{e}");
        assert_eq!(e.message, "unknown field; did you mean `shutdown_grace`?");
        let e = error_for(&format!("{SERVER}{ROUTING}{THREE}colour = \"red\"\n"));
        assert_eq!(e.field.as_deref(), Some("backends[2].colour"), "{e}");
        assert!(e.message.contains("the fields here are id, address, weight"), "{e}");
        let e = error_for(&format!("typo = 1\n{SERVER}{ROUTING}{THREE}"));
        assert_eq!(e.field.as_deref(), Some("typo"), "{e}");
    }

    #[test]
    fn a_wrong_type_says_what_was_expected_in_plain_words() {
        let e = error_for(&format!("{SERVER}{ROUTING}{THREE}weight = \"3\"\n"));
        assert_eq!(e.to_string(), "line 14: backends[2].weight: expected a whole number, found the string \"3\"");
        for (line, field, message) in [
            ("workers = 1.5", "server.workers", "expected a whole number, found the number 1.5"),
            ("h2c = \"yes\"", "server.h2c", "expected true or false, found the string \"yes\""),
            ("keepalive_requests = 99999999999999999999", "server.keepalive_requests", "which is too large"),
            ("send_timeout = 60", "server.send_timeout", "expected a string in quotes, found the whole number 60"),
        ] {
            let e = error_for(&format!("{SERVER}{line}\n{ROUTING}{THREE}"));
            assert_eq!(e.field.as_deref(), Some(field), "{line}: {e}");
            assert!(e.message.contains(message), "{line}: {e}");
        }
        let e = error_for(&format!("{SERVER}[routing]\nkey = \"header:x-device-id\"\n{THREE}"));
        assert_eq!(e.to_string(), "line 4: routing.key: expected a list, found the string \"header:x-device-id\"");
        let e = error_for(&format!("{SERVER}{ROUTING}not_here = {{ status = [421, \"404\"] }}\n{THREE}"));
        assert_eq!(e.field.as_deref(), Some("routing.not_here.status[1]"), "{e}");
        let e = error_for(&format!("{SERVER}{ROUTING}{THREE}[backends.health]\nfall = \"2\"\n"));
        assert_eq!(e.field.as_deref(), Some("backends[2].health.fall"), "{e}");
        let e = error_for(&format!("{SERVER}{ROUTING}{THREE}[backends.health]\nobserve = \"all\"\n"));
        assert_eq!(e.field.as_deref(), Some("backends[2].health.observe"), "{e}");
        assert_eq!(e.message, "\"all\" is not a choice here: expected `connect` or `responses`");
    }

    #[test]
    fn a_list_written_as_one_table_is_explained() {
        let advice = "`backends` is a list: write each backend as [[backends]], not [backends]";
        let one = "[backends]\nid = \"a\"\naddress = \"127.0.0.1:9001\"\n";
        let two = "[backends]\nid = \"b\"\naddress = \"127.0.0.1:9002\"\n";
        let listed = "[[backends]]\nid = \"c\"\naddress = \"127.0.0.1:9003\"\n";
        for (text, line) in [
            (format!("{SERVER}{ROUTING}{one}"), 5),
            (format!("{SERVER}{ROUTING}{one}{two}"), 8),
            (format!("{SERVER}{ROUTING}{listed}{two}"), 8),
            (format!("{SERVER}{ROUTING}{one}{listed}"), 8),
        ] {
            let e = error_for(&text);
            assert_eq!(
                (e.field.as_deref(), e.message.as_str(), e.line),
                (Some("backends"), advice, Some(line)),
                "{text}"
            );
        }
        let e = error_for(&format!(
            "{SERVER}[server.tls]\nlisten = \"127.0.0.1:8443\"\ncert = \"c\"\nkey = \"k\"\n\
             [server.tls.certificates]\ncert = \"c\"\nkey = \"k\"\n{ROUTING}{THREE}"
        ));
        assert_eq!(e.field.as_deref(), Some("server.tls.certificates"), "{e}");
        assert!(e.message.contains("write each certificate as [[server.tls.certificates]]"), "{e}");
        let e = error_for(&format!("[[server]]\nlisten = \"127.0.0.1:8080\"\n{ROUTING}{THREE}"));
        assert_eq!(e.to_string(), "line 1: server: `server` is one table: write [server], not [[server]]");
    }

    #[test]
    fn missing_and_repeated_fields_are_named() {
        let e = error_for(&format!("[server]\nworkers = 2\n{ROUTING}{THREE}"));
        assert_eq!((e.field.as_deref(), e.line), (Some("server.listen"), Some(1)), "{e}");
        let e = error_for(&format!("{SERVER}{THREE}"));
        assert_eq!(e.field.as_deref(), Some("routing"), "{e}");
        assert!(e.message.contains("add a [routing] section"), "{e}");
        let e = error_for(&format!("{SERVER}{ROUTING}{THREE}[[backends]]\naddress = \"127.0.0.1:9004\"\n"));
        assert_eq!((e.field.as_deref(), e.line), (Some("backends[3].id"), Some(14)), "{e}");
        let e = error_for(&format!("{SERVER}listen = \"127.0.0.1:8081\"\n{ROUTING}{THREE}"));
        assert_eq!(e.to_string(), "line 3: server.listen: set twice: keep one");
        let e = error_for(&format!("{SERVER}{ROUTING}{THREE}id = \"d\"\n"));
        assert_eq!(e.field.as_deref(), Some("backends[2].id"), "{e}");
        let e = error_for(&format!("{SERVER}{ROUTING}[routing]\nhash = \"ring\"\n{THREE}"));
        assert_eq!(e.to_string(), "line 5: routing: [routing] appears twice: put its keys under one [routing]");
    }

    #[test]
    fn syntax_errors_keep_the_parsers_words_and_gain_the_field() {
        let e = error_for(&format!("{SERVER}{ROUTING}{THREE}tls = yes\n"));
        assert_eq!(e.field.as_deref(), Some("backends[2].tls"), "{e}");
        assert!(e.message.contains("must be quoted"), "{e}");
        let e = error_for("[server\nlisten =");
        assert_eq!(e.line, Some(1), "{e}");
    }

    #[test]
    fn no_text_makes_the_error_mapping_panic() {
        let example = include_str!("../../config.toml.example");
        let cuts = example.char_indices().map(|(i, _)| i).step_by(9);
        for text in cuts.map(|i| example[..i].to_string()).chain(example.lines().enumerate().flat_map(|(n, _)| {
            let lines: Vec<&str> = example.lines().collect();
            let mut doubled = lines.clone();
            doubled.insert(n, lines[n]);
            let mut bracketed = lines.clone();
            let single = format!("[{}", lines[n]);
            bracketed[n] = &single;
            [doubled.join("\n"), bracketed.join("\n")]
        })) {
            if let Err(e) = Config::parse(&text) {
                assert!(!e.message.is_empty(), "{e}");
                assert!(e.line.is_some() || e.field.is_some(), "located: {e}");
            }
        }
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("shutdown_grac", "shutdown_grace"), 1);
        assert_eq!(edit_distance("", "ab"), 2);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn paths_render_with_indexes() {
        let path = [Step::Key("backends".into()), Step::Index(2), Step::Key("weight".into())];
        assert_eq!(render(&path), "backends[2].weight");
        assert_eq!(unindexed("backends[2].health"), "backends.health");
    }

    #[test]
    fn serde_words_become_plain() {
        assert_eq!(plain_expected("i64"), "a whole number");
        assert_eq!(plain_expected("struct RawServer"), "a table");
        assert_eq!(plain_found("string \"3\""), "the string \"3\"");
        assert_eq!(plain_found("integer `8080`"), "the whole number 8080");
        assert_eq!(plain_found("integer `99999999999999999999` as i128"), "99999999999999999999, which is too large");
        assert_eq!(plain_found("floating point `1.5`"), "the number 1.5");
        assert_eq!(plain_found("boolean `true`"), "true");
    }
}
