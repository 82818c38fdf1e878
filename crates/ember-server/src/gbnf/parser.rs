//! Reads llama.cpp GBNF text into [`RuleDef`]s and checks its rule names.

use std::collections::HashMap;

use super::{GbnfError, Node, RuleDef, TokenRef, ROOT};

/// How deep groups and stacked repetitions may nest, so deep input cannot exhaust our stack.
const MAX_NESTING: usize = 64;
/// The largest repetition count Lark's `{m,n}` can carry (`i32::MAX` there means "no maximum").
const MAX_REPETITION: u32 = i32::MAX as u32 - 1;

/// 1-based line and column (in characters) of byte offset `at`.
fn line_column(src: &str, at: usize) -> (usize, usize) {
    let before = &src[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The characters GBNF allows in rule names (llama.cpp's README also allows '_').
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// How a character is quoted in messages.
fn show(c: Option<char>) -> String {
    match c {
        None => "end of grammar".to_string(),
        Some(c) => format!("{c:?}"),
    }
}

/// Recursive-descent reader over the GBNF text.
pub(super) struct Parser<'a> {
    src: &'a str,
    pos: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    pub(super) fn new(src: &'a str) -> Self {
        Parser {
            src,
            pos: 0,
            depth: 0,
        }
    }

    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn peek_second(&self) -> Option<char> {
        self.rest().chars().nth(1)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn error_at(&self, at: usize, message: impl Into<String>) -> GbnfError {
        let (line, column) = line_column(self.src, at);
        GbnfError::Syntax {
            line,
            column,
            message: message.into(),
        }
    }

    fn error(&self, message: impl Into<String>) -> GbnfError {
        self.error_at(self.pos, message)
    }

    /// Skips blanks and `#` comments, and line breaks when `newlines` is set.
    fn skip_layout(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' => self.pos += 1,
                '\r' | '\n' if newlines => self.pos += 1,
                '#' => {
                    let rest = self.rest();
                    self.pos += rest.find(['\r', '\n']).unwrap_or(rest.len());
                }
                _ => break,
            }
        }
    }

    /// Whether `name ::=` starts at the current position.
    fn at_rule_start(&self) -> bool {
        let rest = self.rest();
        let name_len = rest.len() - rest.trim_start_matches(is_name_char).len();
        name_len > 0
            && rest[name_len..]
                .trim_start_matches([' ', '\t'])
                .starts_with("::=")
    }

    /// Whether only blanks precede the current position on its line.
    fn at_line_start(&self) -> bool {
        self.src[..self.pos]
            .trim_end_matches([' ', '\t'])
            .ends_with(['\n', '\r'])
    }

    /// Skips layout between sequence items. Inside parentheses line breaks are layout; outside,
    /// a line break ends the rule only when the next non-blank line starts `name ::=` (or there
    /// is none), so rules may continue on following lines.
    fn skip_item_layout(&mut self, nested: bool) {
        self.skip_layout(nested);
        if nested || !matches!(self.peek(), Some('\r' | '\n')) {
            return;
        }
        let line_end = self.pos;
        self.skip_layout(true);
        if self.peek().is_none() || self.at_rule_start() {
            self.pos = line_end;
        }
    }

    pub(super) fn parse_grammar(&mut self) -> Result<Vec<RuleDef>, GbnfError> {
        let mut rules = Vec::new();
        self.skip_layout(true);
        while self.peek().is_some() {
            rules.push(self.parse_rule()?);
            self.skip_layout(true);
        }
        Ok(rules)
    }

    fn parse_name(&mut self) -> Result<String, GbnfError> {
        let rest = self.rest();
        let len = rest.len() - rest.trim_start_matches(is_name_char).len();
        if len == 0 {
            return Err(self.error(format!(
                "expected a rule name (letters, digits, '-', '_'), found {}",
                show(self.peek())
            )));
        }
        self.pos += len;
        Ok(rest[..len].to_string())
    }

    fn parse_rule(&mut self) -> Result<RuleDef, GbnfError> {
        let at = self.pos;
        let name = self.parse_name()?;
        self.skip_layout(false);
        if !self.rest().starts_with("::=") {
            return Err(self.error(format!("expected '::=' after rule name {name:?}")));
        }
        self.pos += 3;
        self.skip_layout(true);
        let body = self.parse_alternates(false)?;
        match self.peek() {
            None | Some('\r' | '\n') => {}
            // `x ::= a |` followed on the next line by another rule: an empty last alternative.
            Some(_) if self.at_rule_start() && self.at_line_start() => {}
            Some(')') => {
                return Err(self.error(format!("unmatched ')' in rule {name:?}")));
            }
            Some(c) => {
                return Err(self.error(format!("unexpected {c:?} in rule {name:?}")));
            }
        }
        Ok(RuleDef { name, at, body })
    }

    fn enter(&mut self, at: usize) -> Result<(), GbnfError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(self.error_at(
                at,
                format!("groups and repetitions nest more than {MAX_NESTING} deep; split the rule into smaller rules"),
            ));
        }
        Ok(())
    }

    fn parse_alternates(&mut self, nested: bool) -> Result<Node, GbnfError> {
        let mut alternatives = vec![self.parse_sequence(nested)?];
        while self.peek() == Some('|') {
            self.pos += 1;
            self.skip_layout(true);
            alternatives.push(self.parse_sequence(nested)?);
        }
        Ok(if alternatives.len() == 1 {
            alternatives.remove(0)
        } else {
            Node::Alt(alternatives)
        })
    }

    fn parse_sequence(&mut self, nested: bool) -> Result<Node, GbnfError> {
        let mut items = Vec::new();
        // Repetitions stacked on the last item (`a*?`), which nest like groups.
        let mut stacked = 0;
        loop {
            self.skip_item_layout(nested);
            let at = self.pos;
            let Some(c) = self.peek() else { break };
            if !matches!(c, '*' | '+' | '?' | '{') {
                // The repetitions stacked so far wrap the previous item only.
                self.depth -= stacked;
                stacked = 0;
            }
            let item = match c {
                '"' => self.parse_literal()?,
                '[' => self.parse_class()?,
                '.' => {
                    self.pos += 1;
                    Node::AnyChar
                }
                '(' => self.parse_group()?,
                '<' | '!' => self.parse_token()?,
                '*' | '+' | '?' | '{' => {
                    let Some(item) = items.pop() else {
                        return Err(self.error(format!("{c:?} has nothing before it to repeat")));
                    };
                    let (min, max) = self.parse_repetition()?;
                    stacked += 1;
                    self.enter(at)?;
                    items.push(Node::Repeat {
                        item: Box::new(item),
                        min,
                        max,
                    });
                    continue;
                }
                c if is_name_char(c) => {
                    if self.at_rule_start() {
                        if !nested && self.at_line_start() {
                            break;
                        }
                        return Err(self.error(
                            "a rule definition cannot start inside another rule; put `name ::=` at the start of its own line",
                        ));
                    }
                    Node::Ref {
                        name: self.parse_name()?,
                        at,
                    }
                }
                _ => break,
            };
            items.push(item);
        }
        self.depth -= stacked;
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Node::Seq(items)
        })
    }

    fn parse_group(&mut self) -> Result<Node, GbnfError> {
        let open = self.pos;
        self.pos += 1;
        self.enter(open)?;
        self.skip_layout(true);
        let inner = self.parse_alternates(true)?;
        self.depth -= 1;
        if self.peek() != Some(')') {
            let (line, column) = line_column(self.src, open);
            return Err(self.error(format!(
                "expected ')' to close the '(' at line {line}, column {column}, found {}",
                show(self.peek())
            )));
        }
        self.pos += 1;
        Ok(inner)
    }

    fn parse_literal(&mut self) -> Result<Node, GbnfError> {
        let open = self.pos;
        self.pos += 1;
        let mut chars = Vec::new();
        loop {
            match self.peek() {
                None => {
                    return Err(
                        self.error_at(open, "unterminated string literal; close it with '\"'")
                    )
                }
                Some('"') => {
                    self.pos += 1;
                    return Ok(Node::Literal(chars));
                }
                Some(_) => chars.push(self.parse_char()?),
            }
        }
    }

    fn parse_class(&mut self) -> Result<Node, GbnfError> {
        let open = self.pos;
        self.pos += 1;
        let negated = self.peek() == Some('^');
        if negated {
            self.pos += 1;
        }
        let mut ranges = Vec::new();
        loop {
            match self.peek() {
                None => {
                    return Err(
                        self.error_at(open, "unterminated character class; close it with ']'")
                    )
                }
                Some(']') => {
                    self.pos += 1;
                    break;
                }
                Some(_) => {}
            }
            let low = self.parse_char()?;
            // As in llama.cpp, a '-' right before ']' is a literal '-'.
            if self.peek() == Some('-') && !matches!(self.peek_second(), Some(']') | None) {
                self.pos += 1;
                let high_at = self.pos;
                let high = self.parse_char()?;
                if high < low {
                    return Err(self.error_at(
                        high_at,
                        format!(
                            "character range {low:?}-{high:?} is reversed; write {high:?}-{low:?}"
                        ),
                    ));
                }
                ranges.push((low, high));
            } else {
                ranges.push((low, low));
            }
        }
        if ranges.is_empty() {
            return Err(self.error_at(
                open,
                "empty character class matches nothing; list at least one character",
            ));
        }
        Ok(Node::Class { negated, ranges })
    }

    /// One character of a literal or class, with llama.cpp's escapes.
    fn parse_char(&mut self) -> Result<char, GbnfError> {
        let at = self.pos;
        let Some(c) = self.bump() else {
            return Err(self.error("unexpected end of grammar"));
        };
        if c != '\\' {
            return Ok(c);
        }
        let escape = self.bump();
        let digits = match escape {
            Some('x') => 2,
            Some('u') => 4,
            Some('U') => 8,
            Some('n') => return Ok('\n'),
            Some('r') => return Ok('\r'),
            Some('t') => return Ok('\t'),
            Some(c @ ('\\' | '"' | '[' | ']' | '-')) => return Ok(c),
            other => {
                return Err(self.error_at(
                    at,
                    format!(
                        "unknown escape '\\{}'; GBNF knows \\n \\r \\t \\\\ \\\" \\[ \\] \\- \\xHH \\uHHHH \\UHHHHHHHH",
                        other.map_or(String::new(), String::from)
                    ),
                ))
            }
        };
        let escape = escape.unwrap_or_default();
        let hex: String = self
            .rest()
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .take(digits)
            .collect();
        if hex.len() != digits {
            return Err(self.error_at(
                at,
                format!("expected {digits} hex digits after '\\{escape}'"),
            ));
        }
        self.pos += digits;
        u32::from_str_radix(&hex, 16)
            .ok()
            .and_then(char::from_u32)
            .ok_or_else(|| {
                self.error_at(at, format!("'\\{escape}{hex}' is not a Unicode character"))
            })
    }

    fn parse_number(&mut self) -> Result<u32, GbnfError> {
        let at = self.pos;
        let rest = self.rest();
        let digits =
            &rest[..rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len()];
        if digits.is_empty() {
            return Err(self.error(format!("expected a number, found {}", show(self.peek()))));
        }
        self.pos += digits.len();
        digits
            .parse::<u32>()
            .ok()
            .filter(|&n| n <= MAX_REPETITION)
            .ok_or_else(|| {
                self.error_at(
                    at,
                    format!("repetition count {digits} is above the limit of {MAX_REPETITION}"),
                )
            })
    }

    /// `*`, `+`, `?`, `{m}`, `{m,}` or `{m,n}` as `(min, max)`.
    fn parse_repetition(&mut self) -> Result<(u32, Option<u32>), GbnfError> {
        let at = self.pos;
        match self.bump() {
            Some('*') => return Ok((0, None)),
            Some('+') => return Ok((1, None)),
            Some('?') => return Ok((0, Some(1))),
            _ => {}
        }
        self.skip_layout(false);
        let min = self.parse_number()?;
        self.skip_layout(false);
        let max = match self.bump() {
            Some('}') => return Ok((min, Some(min))),
            Some(',') => {
                self.skip_layout(false);
                let max = if self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    Some(self.parse_number()?)
                } else {
                    None
                };
                self.skip_layout(false);
                if self.bump() != Some('}') {
                    return Err(self.error_at(
                        self.pos.saturating_sub(1),
                        "expected '}' to close the repetition",
                    ));
                }
                max
            }
            other => {
                return Err(self.error_at(
                    self.pos - other.map_or(0, char::len_utf8),
                    format!(
                        "expected ',' or '}}' in the repetition, found {}",
                        show(other)
                    ),
                ))
            }
        };
        if let Some(max) = max.filter(|&max| max < min) {
            return Err(self.error_at(
                at,
                format!("repetition {{{min},{max}}} has its minimum above its maximum"),
            ));
        }
        Ok((min, max))
    }

    fn parse_token(&mut self) -> Result<Node, GbnfError> {
        let at = self.pos;
        let negated = self.peek() == Some('!');
        if negated {
            self.pos += 1;
            if self.peek() != Some('<') {
                return Err(
                    self.error("expected '<' after '!'; a negated token looks like !<[123]>")
                );
            }
        }
        let rest = self.rest();
        let Some(end) = rest.find('>') else {
            return Err(self.error_at(at, "unterminated token; close it with '>'"));
        };
        let text = &rest[..=end];
        self.pos += end + 1;
        if let Some(id) = text.strip_prefix("<[").and_then(|t| t.strip_suffix("]>")) {
            let id = id.parse::<u32>().map_err(|_| {
                self.error_at(
                    at,
                    format!("token id in {text} is not a number; write e.g. <[123]>"),
                )
            })?;
            return Ok(Node::Token(TokenRef::Id { id, negated }));
        }
        if negated {
            return Err(self.error_at(
                at,
                format!("negated token text !{text} cannot be translated without the vocabulary; write the token id, e.g. !<[123]>"),
            ));
        }
        if text.len() <= 2
            || text[1..text.len() - 1].contains(|c: char| c.is_whitespace() || c == '<')
        {
            return Err(self.error_at(
                at,
                format!("token {text} must be a special token's text without spaces, e.g. <think>"),
            ));
        }
        Ok(Node::Token(TokenRef::Text(text.to_string())))
    }
}

/// Rejects duplicate rules, undefined references and a missing `root`.
pub(super) fn check_names(src: &str, rules: &[RuleDef]) -> Result<(), GbnfError> {
    let mut defined: HashMap<&str, usize> = HashMap::new();
    for rule in rules {
        if let Some(&first) = defined.get(rule.name.as_str()) {
            let (line, column) = line_column(src, rule.at);
            return Err(GbnfError::DuplicateRule {
                name: rule.name.clone(),
                line,
                column,
                first_line: line_column(src, first).0,
            });
        }
        defined.insert(&rule.name, rule.at);
    }
    for rule in rules {
        if let Some((name, at)) = first_undefined(&rule.body, &defined) {
            let (line, column) = line_column(src, at);
            return Err(GbnfError::UndefinedRule {
                name: name.to_string(),
                line,
                column,
            });
        }
    }
    if !defined.contains_key(ROOT) {
        return Err(GbnfError::MissingRoot);
    }
    Ok(())
}

fn first_undefined<'n>(node: &'n Node, defined: &HashMap<&str, usize>) -> Option<(&'n str, usize)> {
    match node {
        Node::Alt(nodes) | Node::Seq(nodes) => {
            nodes.iter().find_map(|n| first_undefined(n, defined))
        }
        Node::Repeat { item, .. } => first_undefined(item, defined),
        Node::Ref { name, at } if !defined.contains_key(name.as_str()) => Some((name, *at)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{error, lark_rules, root_body};
    use super::*;

    #[test]
    fn counted_repetition() {
        assert_eq!(
            root_body("root ::= \"a1\"{3} \"b1\"{2,} \"c1\"{2,5} \"d1\"{ 0 , 1 } \"e1\"{0,} \"f1\"{1,} \"g1\"{1}"),
            "\"a1\"{3} \"b1\"{2,} \"c1\"{2,5} \"d1\"? \"e1\"* \"f1\"+ \"g1\""
        );
        // Lark refuses {0}: zero repetitions match the empty string.
        assert_eq!(
            root_body("root ::= \"a\"{0} (\"b\" \"c\"){0,0}"),
            "\"\" \"\""
        );
    }

    #[test]
    fn string_escapes() {
        assert_eq!(
            root_body(r#"root ::= "\n\t\r\\\"\[\]\-\x41\u00e9\U0001F600\x7f""#),
            r#""\u000a\u0009\u000d\\\"[]-Aé😀\u007f""#
        );
        // Raw UTF-8 stays as written.
        assert_eq!(root_body("root ::= \"ぁ😀\""), "\"ぁ😀\"");
    }

    #[test]
    fn character_classes() {
        assert_eq!(root_body("root ::= [a-z0-9_]"), r"/[a-z0-9\x{5f}]/");
        assert_eq!(root_body(r#"root ::= [^"\\]"#), r"/[^\x{22}\x{5c}]/");
        assert_eq!(
            root_body(r"root ::= [\]\[\-\x00-\x1F/ぁ-ゟ]"),
            r"/[\x{5d}\x{5b}\x{2d}\x{0}-\x{1f}\x{2f}\x{3041}-\x{309f}]/"
        );
        // A '-' first or right before ']' is a plain '-', as in llama.cpp.
        assert_eq!(root_body("root ::= [-a] [a-]"), r"/[\x{2d}a]/ /[a\x{2d}]/");
    }

    #[test]
    fn dot_is_any_character() {
        assert_eq!(root_body("root ::= . \"x\""), "/(?s:.)/ \"x\"");
    }

    #[test]
    fn comments_and_rules_spanning_lines() {
        let gbnf = "# header comment\n\
                    root ::= \"a\" # trailing comment\n  \
                    b   # continues: this line starts no rule\n  \
                    | \"c\"\n\
                    \n\
                    b ::= (\n  \"x\" # inside a group\n\n  | \"y\"\n)\n\
                    c ::= \"1\" |\n  \"2\"";
        assert_eq!(
            lark_rules(gbnf),
            [
                "g_root: \"a\" g_b | \"c\"",
                "g_b: \"x\" | \"y\"",
                "g_c: \"1\" | \"2\""
            ]
        );
        // A trailing '|' before the next rule leaves an empty last alternative.
        assert_eq!(
            lark_rules("root ::= \"a\" |\nb ::= \"b\"")[0],
            "g_root: \"a\" | \"\""
        );
    }

    #[test]
    fn tokens() {
        assert_eq!(
            root_body("root ::= <[42]> !<[7]>* <think>"),
            "<[42]> <[^7]>* <think>"
        );
    }

    #[test]
    fn syntax_errors_say_where_and_why() {
        assert_eq!(
            error("# comment\nroot  = \"a\""),
            "line 2, column 7: expected '::=' after rule name \"root\""
        );
        assert_eq!(
            error("root ::= \"abc"),
            "line 1, column 10: unterminated string literal; close it with '\"'"
        );
        assert_eq!(
            error("root ::= [a-z"),
            "line 1, column 10: unterminated character class; close it with ']'"
        );
        assert_eq!(
            error(r#"root ::= "\q""#),
            r#"line 1, column 11: unknown escape '\q'; GBNF knows \n \r \t \\ \" \[ \] \- \xHH \uHHHH \UHHHHHHHH"#
        );
        assert_eq!(
            error(r#"root ::= "\x4""#),
            r"line 1, column 11: expected 2 hex digits after '\x'"
        );
        assert_eq!(
            error(r#"root ::= "\uD800""#),
            r"line 1, column 11: '\uD800' is not a Unicode character"
        );
        assert_eq!(
            error("root ::= [z-a]"),
            "line 1, column 13: character range 'z'-'a' is reversed; write 'a'-'z'"
        );
        assert_eq!(
            error("root ::= []"),
            "line 1, column 10: empty character class matches nothing; list at least one character"
        );
        assert_eq!(
            error("root ::= * \"a\""),
            "line 1, column 10: '*' has nothing before it to repeat"
        );
        assert_eq!(
            error("root ::= (\"a\" | \"b\"\n"),
            "line 2, column 1: expected ')' to close the '(' at line 1, column 10, found end of grammar"
        );
        assert_eq!(
            error("root ::= \"a\" )"),
            "line 1, column 14: unmatched ')' in rule \"root\""
        );
        assert_eq!(
            error("root ::= \"a\" ; \"b\""),
            "line 1, column 14: unexpected ';' in rule \"root\""
        );
        assert_eq!(
            error("root ::= \"a\"{5,2}"),
            "line 1, column 13: repetition {5,2} has its minimum above its maximum"
        );
        assert_eq!(
            error("root ::= \"a\"{x}"),
            "line 1, column 14: expected a number, found 'x'"
        );
        assert_eq!(
            error("root ::= \"a\"{2;"),
            "line 1, column 15: expected ',' or '}' in the repetition, found ';'"
        );
        assert_eq!(
            error("root ::= \"a\"{99999999999}"),
            "line 1, column 14: repetition count 99999999999 is above the limit of 2147483646"
        );
        assert_eq!(
            error("root ::= \"a\" b ::= \"b\""),
            "line 1, column 14: a rule definition cannot start inside another rule; put `name ::=` at the start of its own line"
        );
        assert_eq!(
            error("root ::= !<think>"),
            "line 1, column 10: negated token text !<think> cannot be translated without the vocabulary; write the token id, e.g. !<[123]>"
        );
        assert_eq!(
            error("root ::= <[x]>"),
            "line 1, column 10: token id in <[x]> is not a number; write e.g. <[123]>"
        );
        assert_eq!(
            error("root ::= ::= \"a\""),
            "line 1, column 10: unexpected ':' in rule \"root\""
        );
    }

    #[test]
    fn nesting_past_the_limit_is_an_error_not_a_stack_overflow() {
        let gbnf = format!("root ::= {}\"x\"", "(".repeat(100_000));
        assert_eq!(
            error(&gbnf),
            "line 1, column 74: groups and repetitions nest more than 64 deep; split the rule into smaller rules"
        );
        let stacked = format!("root ::= \"x\"{}", "?".repeat(100));
        assert!(error(&stacked).contains("nest more than 64 deep"));
    }

    #[test]
    fn name_errors() {
        assert_eq!(
            error("root ::= item\n"),
            "line 1, column 10: rule \"item\" is not defined; add `item ::= ...` or fix the name"
        );
        assert_eq!(
            error("root ::= \"a\"\nx ::= \"b\"\n  root ::= \"c\""),
            "line 3, column 3: rule \"root\" is already defined on line 1; join the definitions with '|'"
        );
        assert_eq!(
            error("Root ::= \"a\""),
            "the grammar has no \"root\" rule; GBNF output starts at `root ::= ...`"
        );
        assert_eq!(
            error("# only a comment\n"),
            GbnfError::MissingRoot.to_string()
        );
    }
}
