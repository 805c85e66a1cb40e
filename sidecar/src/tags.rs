//! Tag names: the filter appends one JSON line per tag to `STATE/tags.jsonl`
//! (`{"seq":..,"name":..,"app":..,"time_ns":..}`); the ring's Tag records
//! carry only the id (`aux`, which is the tag's sequence number).
//!
//! The parser is deliberately tiny (no JSON dependency): one flat object per
//! line with string keys; `seq` an unsigned integer, `name` a string, `app`
//! a boolean (false when absent); other keys may hold any scalar. A line
//! that is not such an object (nested values, bad escapes, a torn last
//! line) is skipped. A later line for the same id replaces an earlier one.

use std::collections::HashMap;
use std::path::Path;

/// File name of the tag log in the filter's state directory.
pub const TAGS_FILE: &str = "tags.jsonl";

/// Tag names by id from `state_dir/tags.jsonl`: id -> (name, app
/// consistent). A missing or unreadable file gives an empty map (tags then
/// ship under their default names); bad lines are skipped.
pub fn load_tag_names(state_dir: &Path) -> HashMap<u64, (String, bool)> {
    let mut map = HashMap::new();
    let Ok(bytes) = std::fs::read(state_dir.join(TAGS_FILE)) else {
        return map;
    };
    for line in bytes.split(|&b| b == b'\n') {
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        if let Some((seq, name, app)) = parse_line(line) {
            map.insert(seq, (name, app));
        }
    }
    map
}

/// Parse one line: `Some((seq, name, app))` when it is a flat object with
/// at least `seq` and `name`.
pub(crate) fn parse_line(line: &str) -> Option<(u64, String, bool)> {
    let mut p = Parser {
        b: line.as_bytes(),
        i: 0,
    };
    let (mut seq, mut name, mut app) = (None, None, None);
    p.ws();
    p.eat(b'{')?;
    p.ws();
    if p.eat(b'}').is_none() {
        loop {
            p.ws();
            let key = p.string()?;
            p.ws();
            p.eat(b':')?;
            p.ws();
            match key.as_str() {
                "seq" => seq = Some(p.uint()?),
                "name" => name = Some(p.string()?),
                "app" => app = Some(p.boolean()?),
                _ => p.skip_scalar()?,
            }
            p.ws();
            if p.eat(b',').is_some() {
                continue;
            }
            p.eat(b'}')?;
            break;
        }
    }
    p.ws();
    if p.i != p.b.len() {
        return None;
    }
    Some((seq?, name?, app.unwrap_or(false)))
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        if self.peek() == Some(c) {
            self.i += 1;
            Some(())
        } else {
            None
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.b.get(self.i..)?.starts_with(word) {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }

    fn boolean(&mut self) -> Option<bool> {
        match self.peek()? {
            b't' => self.literal(b"true").map(|()| true),
            b'f' => self.literal(b"false").map(|()| false),
            _ => None,
        }
    }

    fn uint(&mut self) -> Option<u64> {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        // Reject fractions and exponents: ids are integers.
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        std::str::from_utf8(self.b.get(start..self.i)?)
            .ok()?
            .parse()
            .ok()
    }

    fn number(&mut self) -> Option<()> {
        let start = self.i;
        while matches!(
            self.peek(),
            Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
        ) {
            self.i += 1;
        }
        (self.i > start).then_some(())
    }

    fn skip_scalar(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b't' | b'f' => self.boolean().map(drop),
            b'n' => self.literal(b"null"),
            _ => self.number(),
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let s = std::str::from_utf8(self.b.get(self.i..self.i + 4)?).ok()?;
        let v = u32::from_str_radix(s, 16).ok()?;
        self.i += 4;
        Some(v)
    }

    /// A JSON string with its escapes decoded.
    fn string(&mut self) -> Option<String> {
        self.eat(b'"')?;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let c = self.peek()?;
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = self.peek()?;
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xd800..0xdc00).contains(&hi) {
                                self.literal(b"\\u")?;
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return None;
                                }
                                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                            } else {
                                hi
                            };
                            char::from_u32(code)?
                        }
                        _ => return None,
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                c if c < 0x20 => return None,
                c => out.push(c),
            }
        }
        // The input is UTF-8 and we only split it at ASCII bytes.
        String::from_utf8(out).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_filter_lines() {
        let l = r#"{"seq":42,"name":"before-upgrade","app":true,"time_ns":1700000000000000000}"#;
        assert_eq!(parse_line(l), Some((42, "before-upgrade".into(), true)));
        let l = r#" { "name" : "a\"b\\c\u00e9\ud83d\ude00" , "seq" : 7 } "#;
        assert_eq!(
            parse_line(l),
            Some((7, "a\"b\\c\u{e9}\u{1f600}".into(), false))
        );
    }

    #[test]
    fn skips_bad_lines() {
        for l in [
            "",
            "{",
            r#"{"seq":1}"#,
            r#"{"seq":-1,"name":"x"}"#,
            r#"{"seq":1.5,"name":"x"}"#,
            r#"{"seq":1,"name":"x","extra":{"nested":1}}"#,
            r#"{"seq":1,"name":"x"} trailing"#,
            r#"{"seq":1,"name":"bad \q escape"}"#,
            r#"{"seq":1,"name":"\ud800 lone"}"#,
            r#"{"seq":99999999999999999999999,"name":"x"}"#,
            r#"{"seq":1,"name":"torn"#,
        ] {
            assert_eq!(parse_line(l), None, "{l}");
        }
    }

    #[test]
    fn loads_file_later_lines_win() {
        let dir = std::env::temp_dir().join(format!(
            "ferry-sidecar-tags-{}-{}",
            std::process::id(),
            crate::tests::unique()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(load_tag_names(&dir).is_empty());
        let mut text = Vec::new();
        text.extend_from_slice(b"{\"seq\":1,\"name\":\"one\",\"app\":false,\"time_ns\":5}\n");
        text.extend_from_slice(b"\xff\xfe not utf8\n");
        text.extend_from_slice(b"{\"seq\":2,\"name\":\"two\",\"app\":true,\"time_ns\":6}\n");
        text.extend_from_slice(b"{\"seq\":1,\"name\":\"uno\",\"app\":true,\"time_ns\":7}\n");
        text.extend_from_slice(b"{\"seq\":3,\"na");
        std::fs::write(dir.join(TAGS_FILE), text).unwrap();
        let m = load_tag_names(&dir);
        assert_eq!(m.len(), 2);
        assert_eq!(m[&1], ("uno".to_string(), true));
        assert_eq!(m[&2], ("two".to_string(), true));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
