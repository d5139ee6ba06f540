//! YAML → JSON values with a line index, so every error can name `file:line: field.path`.
//!
//! We build the tree ourselves from `yaml-rust2`'s marked events (a maintained YAML 1.2 parser)
//! instead of using a serde YAML crate: serde YAML crates only report the line of the first
//! error of a whole document, but validation reports many errors per document, each on the rule
//! it belongs to, which needs the line of every node. Plain scalars are resolved with the YAML
//! 1.2 core schema (null, booleans, integers, floats); quoted scalars are always strings.

use std::collections::HashMap;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// One YAML document of a file.
#[derive(Debug, Clone)]
pub struct Document {
    pub value: Value,
    /// Field path (`spec.ingress[1].toPorts`) → 1-based line.
    lines: HashMap<String, usize>,
    /// Line of the document's first node.
    pub line: usize,
}

impl Document {
    /// The line of `path`, or of its closest ancestor that has one.
    pub fn line_of(&self, path: &str) -> usize {
        let mut p = path;
        loop {
            if let Some(l) = self.lines.get(p) {
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

enum Frame {
    Seq {
        items: Vec<Value>,
        anchor: usize,
        path: String,
    },
    Map {
        map: Map<String, Value>,
        pending_key: Option<String>,
        anchor: usize,
        path: String,
        line: usize,
    },
}

#[derive(Default)]
struct Builder {
    docs: Vec<Document>,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Value>,
    lines: HashMap<String, usize>,
    doc_line: usize,
    error: Option<YamlError>,
}

const MAX_DEPTH: usize = 128;

impl Builder {
    /// The path the next value will have.
    fn next_path(&self) -> String {
        match self.stack.last() {
            None => String::new(),
            Some(Frame::Seq { items, path, .. }) => format!("{path}[{}]", items.len()),
            Some(Frame::Map {
                pending_key, path, ..
            }) => {
                let key = pending_key.as_deref().unwrap_or("");
                if path.is_empty() {
                    key.to_string()
                } else {
                    format!("{path}.{key}")
                }
            }
        }
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
                let lines = std::mem::take(&mut self.lines);
                self.docs.push(Document {
                    value: v,
                    lines,
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
                    let path = match self.stack.last() {
                        Some(Frame::Map { path, .. }) if !path.is_empty() => {
                            format!("{path}.{key}")
                        }
                        _ => key.clone(),
                    };
                    self.lines.insert(path, line);
                    if let Some(Frame::Map { pending_key, .. }) = self.stack.last_mut() {
                        *pending_key = Some(key);
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
                self.lines.clear();
            }
            Event::Scalar(s, style, anchor, _tag) => {
                let key_pos = self.in_key_position();
                if !key_pos {
                    let p = self.next_path();
                    self.lines.entry(p).or_insert(line);
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
                self.lines.entry(path.clone()).or_insert(line);
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
                        self.lines.entry(p).or_insert(line);
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
