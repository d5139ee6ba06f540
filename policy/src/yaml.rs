//! YAML → JSON values with a line index, so every error can name `file:line: field.path`.
//!
//! We build the tree ourselves from `yaml-rust2`'s marked events (a maintained YAML 1.2 parser)
//! instead of using a serde YAML crate: serde YAML crates only report the line of the first
//! error of a whole document, but validation reports many errors per document, each on the rule
//! it belongs to, which needs the line of every node. Plain scalars are resolved with the YAML
//! 1.2 core schema (null, booleans, integers, floats); quoted scalars are always strings.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// One YAML document of a file.
#[derive(Debug, Clone)]
pub struct Document {
    pub value: Value,
    /// Every node's line, as recorded while parsing.
    log: LineLog,
    /// Field path (`spec.ingress[1].toPorts`) → 1-based line, made from `log` when a line is
    /// first asked for: only documents with problems need it, and formatting and hashing the
    /// path of every node of a file with ten thousand rules costs more than the rest of the
    /// parse.
    lines: OnceLock<HashMap<String, usize>>,
    /// Line of the document's first node.
    pub line: usize,
}

impl Document {
    /// The line of `path`, or of its closest ancestor that has one.
    pub fn line_of(&self, path: &str) -> usize {
        let lines = self.lines.get_or_init(|| self.log.index());
        let mut p = path;
        loop {
            if let Some(l) = lines.get(p) {
                return *l;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.line,
            }
        }
    }
}

/// A syntax error in a YAML stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct YamlError {
    pub line: usize,
    pub message: String,
}

/// Parse every document of a YAML stream.
pub fn parse_documents(src: &str) -> Result<Vec<Document>, YamlError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(src);
    parser.load(&mut builder, true).map_err(|e| YamlError {
        line: e.marker().line(),
        message: e.info().to_string(),
    })?;
    if let Some(err) = builder.error {
        return Err(err);
    }
    Ok(builder.docs)
}

/// One step of a field path.
#[derive(Debug, Clone, Copy)]
enum Seg {
    /// The document itself (path ``).
    Root,
    /// `.key` (just `key` under the root): a range of [`LineLog::keys`].
    Key(u32, u32),
    /// `[i]`.
    Index(usize),
}

/// The lines of a document's nodes in the order the parser saw them, with their paths as
/// (parent, step) pairs: cheap to record, turned into `path → line` by [`LineLog::index`].
#[derive(Debug, Clone, Default)]
struct LineLog {
    /// Path ids: (parent id, step); a parent always has a smaller id.
    paths: Vec<(usize, Seg)>,
    /// Every key's text, back to back.
    keys: String,
    /// (path id, line, whether it replaces a line recorded earlier for the path).
    entries: Vec<(usize, usize, bool)>,
}

impl LineLog {
    fn path(&mut self, parent: usize, seg: Seg) -> usize {
        self.paths.push((parent, seg));
        self.paths.len() - 1
    }

    fn key(&mut self, parent: usize, key: &str) -> usize {
        let start = self.keys.len() as u32;
        self.keys.push_str(key);
        self.path(parent, Seg::Key(start, self.keys.len() as u32))
    }

    /// `path → line`: a node's first recorded line, or its key's line (as if every node had
    /// been entered into the map when it was seen).
    fn index(&self) -> HashMap<String, usize> {
        let mut text: Vec<String> = Vec::with_capacity(self.paths.len());
        for &(parent, seg) in &self.paths {
            let s = match seg {
                Seg::Root => String::new(),
                Seg::Key(a, b) => {
                    let key = &self.keys[a as usize..b as usize];
                    match text.get(parent).map(String::as_str) {
                        None | Some("") => key.to_string(),
                        Some(p) => format!("{p}.{key}"),
                    }
                }
                Seg::Index(i) => format!("{}[{i}]", text.get(parent).map_or("", String::as_str)),
            };
            text.push(s);
        }
        let mut out = HashMap::with_capacity(self.entries.len());
        for &(id, line, replaces) in &self.entries {
            let p = text[id].clone();
            if replaces {
                out.insert(p, line);
            } else {
                out.entry(p).or_insert(line);
            }
        }
        out
    }
}

enum Frame {
    Seq {
        items: Vec<Value>,
        anchor: usize,
        path: usize,
    },
    Map {
        map: Map<String, Value>,
        pending_key: Option<String>,
        /// Path id of the pending key's value.
        pending_path: usize,
        anchor: usize,
        path: usize,
        line: usize,
    },
}

#[derive(Default)]
struct Builder {
    docs: Vec<Document>,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Value>,
    log: LineLog,
    doc_line: usize,
    error: Option<YamlError>,
}

const MAX_DEPTH: usize = 128;

impl Builder {
    /// The path id the next value will have.
    fn next_path(&mut self) -> usize {
        let (parent, seg) = match self.stack.last() {
            None => (0, Seg::Root),
            Some(Frame::Seq { items, path, .. }) => (*path, Seg::Index(items.len())),
            Some(Frame::Map {
                pending_key: Some(_),
                pending_path,
                ..
            }) => return *pending_path,
            Some(Frame::Map { path, .. }) => {
                let path = *path;
                return self.log.key(path, "");
            }
        };
        self.log.path(parent, seg)
    }

    /// Record `line` for path id `path` unless the path has one.
    fn note(&mut self, path: usize, line: usize) {
        self.log.entries.push((path, line, false));
    }

    fn fail(&mut self, line: usize, message: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(YamlError {
                line,
                message: message.into(),
            });
        }
    }

    /// Attach a finished value to its parent (or finish the document).
    fn push_value(&mut self, v: Value, anchor: usize, line: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, v.clone());
        }
        match self.stack.last_mut() {
            None => {
                let log = std::mem::take(&mut self.log);
                self.docs.push(Document {
                    value: v,
                    log,
                    lines: OnceLock::new(),
                    line: self.doc_line,
                });
            }
            Some(Frame::Seq { items, .. }) => items.push(v),
            Some(Frame::Map {
                map, pending_key, ..
            }) => match pending_key.take() {
                Some(k) => {
                    if map.contains_key(&k) {
                        let msg = format!("duplicate key `{k}`");
                        self.fail(line, msg);
                    } else {
                        map.insert(k, v);
                    }
                }
                None => {
                    let key = match v {
                        Value::String(s) => s,
                        Value::Null => "null".to_string(),
                        Value::Bool(b) => b.to_string(),
                        Value::Number(n) => n.to_string(),
                        _ => {
                            self.fail(line, "a mapping key must be a scalar");
                            String::new()
                        }
                    };
                    let parent = match self.stack.last() {
                        Some(Frame::Map { path, .. }) => *path,
                        _ => 0,
                    };
                    let id = self.log.key(parent, &key);
                    self.log.entries.push((id, line, true));
                    if let Some(Frame::Map {
                        pending_key,
                        pending_path,
                        ..
                    }) = self.stack.last_mut()
                    {
                        *pending_key = Some(key);
                        *pending_path = id;
                    }
                }
            },
        }
    }

    fn in_key_position(&self) -> bool {
        matches!(
            self.stack.last(),
            Some(Frame::Map {
                pending_key: None,
                ..
            })
        )
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let line = mark.line();
        match ev {
            Event::DocumentStart => {
                self.doc_line = line;
                self.anchors.clear();
                self.log = LineLog::default();
            }
            Event::Scalar(s, style, anchor, _tag) => {
                let key_pos = self.in_key_position();
                if !key_pos {
                    let p = self.next_path();
                    self.note(p, line);
                }
                let v = if style == TScalarStyle::Plain {
                    resolve_plain(&s)
                } else {
                    Value::String(s)
                };
                self.push_value(v, anchor, line);
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if self.in_key_position() {
                    self.fail(line, "a mapping key must be a scalar");
                    return;
                }
                if self.stack.len() >= MAX_DEPTH {
                    self.fail(line, format!("nesting deeper than {MAX_DEPTH} levels"));
                    return;
                }
                let path = self.next_path();
                self.note(path, line);
                if matches!(ev, Event::SequenceStart(..)) {
                    self.stack.push(Frame::Seq {
                        items: Vec::new(),
                        anchor,
                        path,
                    });
                } else {
                    self.stack.push(Frame::Map {
                        map: Map::new(),
                        pending_key: None,
                        pending_path: 0,
                        anchor,
                        path,
                        line,
                    });
                }
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq { items, anchor, .. }) = self.stack.pop() {
                    self.push_value(Value::Array(items), anchor, line);
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map {
                    map,
                    anchor,
                    line: start,
                    ..
                }) = self.stack.pop()
                {
                    self.push_value(Value::Object(map), anchor, start);
                }
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(v) => {
                    if !self.in_key_position() {
                        let p = self.next_path();
                        self.note(p, line);
                    }
                    self.push_value(v, 0, line);
                }
                None => self.fail(line, "alias to an unknown anchor"),
            },
            Event::DocumentEnd | Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
        }
    }
}

/// YAML 1.2 core schema resolution of a plain scalar.
fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let (sign, digits) = match s.strip_prefix('-') {
        Some(rest) => (-1i64, rest),
        None => (1, s.strip_prefix('+').unwrap_or(s)),
    };
    let int = if let Some(h) = digits.strip_prefix("0x") {
        i64::from_str_radix(h, 16).ok()
    } else if let Some(o) = digits.strip_prefix("0o") {
        i64::from_str_radix(o, 8).ok()
    } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse::<i64>().ok()
    } else {
        None
    };
    if let Some(i) = int {
        return Value::Number(Number::from(sign * i));
    }
    let looks_float = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        && s.bytes().any(|b| b.is_ascii_digit());
    if looks_float
        && let Ok(f) = s.parse::<f64>()
        && let Some(n) = Number::from_f64(f)
    {
        return Value::Number(n);
    }
    Value::String(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_recorded_per_path() {
        let src = "a: 1\nspec:\n  ingress:\n  - fromEndpoints:\n    - {}\n  - toPorts:\n    - ports: [{port: \"80\"}]\n";
        let docs = parse_documents(src).unwrap();
        assert_eq!(docs.len(), 1);
        let d = &docs[0];
        assert_eq!(d.line_of("a"), 1);
        assert_eq!(d.line_of("spec.ingress"), 3);
        assert_eq!(d.line_of("spec.ingress[0]"), 4);
        assert_eq!(d.line_of("spec.ingress[1].toPorts[0].ports[0].port"), 7);
        assert_eq!(d.line_of("spec.ingress[1].toPorts[0].nothing.here"), 7);
        assert_eq!(
            d.value["spec"]["ingress"][1]["toPorts"][0]["ports"][0]["port"],
            "80"
        );
    }

    #[test]
    fn lines_of_keys_values_and_lists() {
        let docs = parse_documents("- a:\n    b: 1\n  c:\n  - x\n  - y: 2\n").unwrap();
        let d = &docs[0];
        assert_eq!(d.line_of("[0]"), 1);
        assert_eq!(d.line_of("[0].a"), 1, "a key's line, not its value's");
        assert_eq!(d.line_of("[0].a.b"), 2);
        assert_eq!(d.line_of("[0].c"), 3);
        assert_eq!(d.line_of("[0].c[0]"), 4);
        assert_eq!(d.line_of("[0].c[1].y"), 5);
        assert_eq!(
            d.line_of("[0].c[7].z"),
            3,
            "the closest ancestor that exists"
        );
    }

    #[test]
    fn scalars_resolve_with_core_schema() {
        let docs = parse_documents("a: 80\nb: '80'\nc: true\nd: ~\ne: 1.5\nf: 08x\ng: -3").unwrap();
        let v = &docs[0].value;
        assert_eq!(v["a"], 80);
        assert_eq!(v["b"], "80");
        assert_eq!(v["c"], true);
        assert!(v["d"].is_null());
        assert_eq!(v["e"], 1.5);
        assert_eq!(v["f"], "08x");
        assert_eq!(v["g"], -3);
    }

    #[test]
    fn multiple_documents_and_their_lines() {
        let docs = parse_documents("a: 1\n---\nb: 2\nc:\n  d: 3\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].line_of("c.d"), 5);
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let err = parse_documents("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.message.contains("duplicate key `a`"), "{err}");
    }

    #[test]
    fn syntax_errors_carry_their_line() {
        let err = parse_documents("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.line >= 1, "{err}");
    }

    /// Regression (fuzz `policy_load`, `regression-lone-cr-line-numbers.yaml`): a lone `\r` is
    /// a YAML line break, so lines are counted as YAML counts them.
    #[test]
    fn lone_carriage_returns_are_line_breaks() {
        let docs = parse_documents("a: 1\rb: 2\r\nc: 3\n").unwrap();
        assert_eq!(docs[0].line_of("b"), 2);
        assert_eq!(docs[0].line_of("c"), 3);
    }

    #[test]
    fn anchors_and_aliases() {
        let docs = parse_documents("a: &x {k: v}\nb: *x\n").unwrap();
        assert_eq!(docs[0].value["b"]["k"], "v");
    }
}
