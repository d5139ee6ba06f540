//! TLS `serverNames` patterns (cnp-semantics §4): case-insensitive; `*` matches within one
//! label; unlike DNS rules, `**` anywhere spans several labels (Envoy's `SniPattern`).

use regex::Regex;

use super::L7Error;

#[derive(Debug, Clone)]
pub struct ServerNamePattern {
    source: String,
    regex: Option<Regex>,
}

impl ServerNamePattern {
    pub fn new(p: &str) -> Result<ServerNamePattern, L7Error> {
        if p.is_empty() || p.len() > 255 {
            return Err(L7Error::new("", "a server name has 1 to 255 characters"));
        }
        if let Some(c) = p
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*')))
        {
            return Err(L7Error::new(
                "",
                format!("`{p}` contains `{c}`, which a server name cannot"),
            ));
        }
        let lower = p.trim_end_matches('.').to_ascii_lowercase();
        let regex = if lower.contains('*') {
            let mut re = String::from("^");
            let mut chars = lower.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '*' if chars.peek() == Some(&'*') => {
                        while chars.peek() == Some(&'*') {
                            chars.next();
                        }
                        re.push_str("[-a-z0-9_.]*");
                    }
                    '*' => re.push_str("[-a-z0-9_]*"),
                    '.' => re.push_str("\\."),
                    c => re.push(c),
                }
            }
            re.push('$');
            Some(Regex::new(&re).map_err(|e| L7Error::new("", e.to_string()))?)
        } else {
            None
        };
        Ok(ServerNamePattern {
            source: lower,
            regex,
        })
    }

    pub fn matches(&self, sni: &str) -> bool {
        let s = sni.trim_end_matches('.').to_ascii_lowercase();
        match &self.regex {
            Some(r) => r.is_match(&s),
            None => self.source == s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_patterns() {
        let p = ServerNamePattern::new("*.example.com").unwrap();
        assert!(p.matches("API.example.com"));
        assert!(!p.matches("a.b.example.com"));
        let p = ServerNamePattern::new("**.example.com").unwrap();
        assert!(p.matches("a.b.example.com"));
        let p = ServerNamePattern::new("api.**.com").unwrap();
        assert!(p.matches("api.x.y.com"));
        assert!(
            ServerNamePattern::new("Exact.Example.com")
                .unwrap()
                .matches("exact.example.com.")
        );
        // `**` needs at least one label before the suffix; `*` may be empty within a label.
        assert!(
            !ServerNamePattern::new("**.example.com")
                .unwrap()
                .matches("example.com")
        );
        assert!(
            ServerNamePattern::new("api*.example.com")
                .unwrap()
                .matches("api.example.com")
        );
        assert_eq!(
            ServerNamePattern::new("a b").unwrap_err(),
            L7Error::new("", "`a b` contains ` `, which a server name cannot")
        );
        assert_eq!(
            ServerNamePattern::new("").unwrap_err(),
            L7Error::new("", "a server name has 1 to 255 characters")
        );
    }
}
