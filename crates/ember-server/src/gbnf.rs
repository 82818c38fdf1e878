//! llama.cpp GBNF → llguidance Lark, for Fireworks' `response_format: {"type": "grammar"}`.
//!
//! GBNF matches characters with no lexer and no implicit whitespace; llguidance's Lark has both a
//! lexer and greedy (longest-match) terminals. The translation keeps GBNF's meaning: every terminal
//! is an exact string or one-character regex, and a string literal that a greedy lexer could
//! swallow where the grammar needs a shorter terminal is split into one-character literals.

use std::collections::{HashMap, HashSet};

mod runs;

/// The rule GBNF starts from.
const ROOT: &str = "root";
/// How deep groups and stacked repetitions may nest, so deep input cannot exhaust our stack.
const MAX_NESTING: usize = 64;
/// Parenthesis depth past which a group becomes its own Lark rule: llguidance's Lark parser
/// refuses expressions nested about 30 deep.
const LARK_MAX_GROUP_DEPTH: usize = 16;
/// The largest repetition count Lark's `{m,n}` can carry (`i32::MAX` there means "no maximum").
const MAX_REPETITION: u32 = i32::MAX as u32 - 1;

/// A GBNF grammar that cannot be read, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GbnfError {
    /// The text is not GBNF at this point (1-based line and column; columns count characters).
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        /// Line of the offending text.
        line: usize,
        /// Column of the offending text.
        column: usize,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A rule refers to a rule that the grammar never defines.
    #[error("line {line}, column {column}: rule \"{name}\" is not defined; add `{name} ::= ...` or fix the name")]
    UndefinedRule {
        /// The undefined name, as written.
        name: String,
        /// Line of the first reference.
        line: usize,
        /// Column of the first reference.
        column: usize,
    },
    /// A rule is defined twice.
    #[error("line {line}, column {column}: rule \"{name}\" is already defined on line {first_line}; join the definitions with '|'")]
    DuplicateRule {
        /// The rule name.
        name: String,
        /// Line of the second definition.
        line: usize,
        /// Column of the second definition.
        column: usize,
        /// Line of the first definition.
        first_line: usize,
    },
    /// There is no `root` rule, where GBNF output starts.
    #[error("the grammar has no \"root\" rule; GBNF output starts at `root ::= ...`")]
    MissingRoot,
}

/// Translates llama.cpp GBNF into an llguidance Lark grammar whose start rule is GBNF's `root`.
pub fn gbnf_to_lark(gbnf: &str) -> Result<String, GbnfError> {
    translate(gbnf, true)
}

/// [`gbnf_to_lark`], optionally without [`runs`] (every class repetition one character per
/// terminal), which the tests use as the oracle for runs.
fn translate(gbnf: &str, merge_runs: bool) -> Result<String, GbnfError> {
    let rules = Parser::new(gbnf).parse_grammar()?;
    check_names(gbnf, &rules)?;
    Ok(Emitter::new(&rules, merge_runs).emit_grammar(&rules))
}

/// One `name ::= body` definition.
#[derive(Debug)]
struct RuleDef {
    name: String,
    /// Byte offset of the name, for errors.
    at: usize,
    body: Node,
}

/// A GBNF expression.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// `a | b | ...` (two or more alternatives).
    Alt(Vec<Node>),
    /// `a b ...`; empty for a rule or alternative that matches nothing.
    Seq(Vec<Node>),
    /// `"..."`, decoded to characters.
    Literal(Vec<char>),
    /// `[...]` or `[^...]` as inclusive ranges.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// `.`: any one character.
    AnyChar,
    /// A rule reference, with its byte offset for errors.
    Ref { name: String, at: usize },
    /// `item{min,max}`, also standing for `*` `+` `?`; `max: None` is unbounded.
    Repeat {
        item: Box<Node>,
        min: u32,
        max: Option<u32>,
    },
    /// `<[id]>`, `!<[id]>` or `<text>`: one tokenizer token rather than characters.
    Token(TokenRef),
}

/// A token terminal.
#[derive(Debug, Clone, PartialEq)]
enum TokenRef {
    /// `<[id]>`, or any token but `id` when negated.
    Id { id: u32, negated: bool },
    /// `<text>`: the special token whose text is `<text>` (angle brackets included).
    Text(String),
}

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
struct Parser<'a> {
    src: &'a str,
    pos: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Self {
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

    fn parse_grammar(&mut self) -> Result<Vec<RuleDef>, GbnfError> {
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
fn check_names(src: &str, rules: &[RuleDef]) -> Result<(), GbnfError> {
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

/// The Lark name of GBNF rule `name`: `g_` and the name with `_` doubled and each uppercase
/// letter written `_` + lowercase, since Lark rule names are lowercase. The mapping is
/// injective and never yields `start` or the `n<k>` names of hoisted groups.
fn lark_rule_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    out.push_str("g_");
    for c in name.chars() {
        match c {
            'A'..='Z' => {
                out.push('_');
                out.push(c.to_ascii_lowercase());
            }
            '_' => out.push_str("__"),
            _ => out.push(c),
        }
    }
    out
}

/// `chars` as a Lark (JSON-syntax) string literal.
fn lark_string(chars: &[char]) -> String {
    let mut out = String::with_capacity(chars.len() + 2);
    out.push('"');
    for &c in chars {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            // Lark's string syntax refuses raw control characters.
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A character inside a Lark regex class; everything but ASCII letters and digits is written
/// `\x{..}` so no character can act as regex syntax or end the `/.../` literal.
fn regex_char(c: char) -> String {
    if c.is_ascii_alphanumeric() {
        c.to_string()
    } else {
        format!("\\x{{{:x}}}", c as u32)
    }
}

fn lark_class(negated: bool, ranges: &[(char, char)]) -> String {
    let mut out = String::from(if negated { "/[^" } else { "/[" });
    for &(low, high) in ranges {
        out.push_str(&regex_char(low));
        if high != low {
            out.push('-');
            out.push_str(&regex_char(high));
        }
    }
    out.push_str("]/");
    out
}

/// Terminals of a grammar: string literals, and the characters one-character terminals match.
#[derive(Default)]
struct Terminals<'n> {
    literals: HashSet<&'n [char]>,
    /// Inclusive code point ranges matched by some class or `.`; sorted once collected.
    matched: Vec<(u32, u32)>,
}

impl<'n> Terminals<'n> {
    fn of(rules: &'n [RuleDef]) -> Self {
        let mut terminals = Terminals::default();
        rules.iter().for_each(|r| terminals.collect(&r.body));
        terminals.matched.sort_unstable();
        terminals
    }

    fn collect(&mut self, node: &'n Node) {
        match node {
            Node::Alt(nodes) | Node::Seq(nodes) => nodes.iter().for_each(|n| self.collect(n)),
            Node::Repeat { item, .. } => self.collect(item),
            Node::Literal(chars) if !chars.is_empty() => {
                self.literals.insert(chars);
            }
            Node::Class {
                negated: false,
                ranges,
            } => self
                .matched
                .extend(ranges.iter().map(|&(low, high)| (low as u32, high as u32))),
            Node::Class {
                negated: true,
                ranges,
            } => {
                let mut ranges: Vec<(u32, u32)> =
                    ranges.iter().map(|&(l, h)| (l as u32, h as u32)).collect();
                ranges.sort_unstable();
                let mut next = 0;
                for (low, high) in ranges {
                    if low > next {
                        self.matched.push((next, low - 1));
                    }
                    next = next.max(high + 1);
                }
                if next <= char::MAX as u32 {
                    self.matched.push((next, char::MAX as u32));
                }
            }
            Node::AnyChar => self.matched.push((0, char::MAX as u32)),
            _ => {}
        }
    }

    /// Whether some class or `.` matches `c`.
    fn one_char_terminal_matches(&self, c: char) -> bool {
        let c = c as u32;
        // Ranges may overlap, so any range starting at or before `c` may hold it.
        let starts_before = self.matched.partition_point(|&(low, _)| low <= c);
        self.matched[..starts_before]
            .iter()
            .any(|&(_, high)| high >= c)
    }

    /// Literals to emit one character at a time. llguidance's lexer takes the longest terminal,
    /// so literal `L` would win over a terminal matching a proper prefix of `L` even where only
    /// the shorter parse fits (`[a-z]* "end"` on "endend"). Splitting each such `L` leaves every
    /// remaining literal with no other terminal matching any proper prefix of it, which makes
    /// greedy lexing exact. Split literals add one-character terminals, so splitting spreads to
    /// literals starting with their characters.
    fn literals_to_split(&self) -> HashSet<&'n [char]> {
        let mut sorted: Vec<&'n [char]> = self.literals.iter().copied().collect();
        sorted.sort_unstable();
        let mut pending = Vec::new();
        let mut by_first: HashMap<char, Vec<&'n [char]>> = HashMap::new();
        // In sorted order a literal's extensions follow it, so a stack of the literals that
        // prefix the current one finds every literal extending another in one pass.
        let mut prefixes: Vec<&'n [char]> = Vec::new();
        for &literal in &sorted {
            while prefixes.last().is_some_and(|p| !literal.starts_with(p)) {
                prefixes.pop();
            }
            if literal.len() > 1 {
                if !prefixes.is_empty() || self.one_char_terminal_matches(literal[0]) {
                    pending.push(literal);
                }
                by_first.entry(literal[0]).or_default().push(literal);
            }
            prefixes.push(literal);
        }
        let mut split = HashSet::new();
        let mut split_chars = HashSet::new();
        while let Some(literal) = pending.pop() {
            if !split.insert(literal) {
                continue;
            }
            for &c in literal {
                if split_chars.insert(c) {
                    pending.extend(by_first.get(&c).into_iter().flatten());
                }
            }
        }
        split
    }
}

/// Where an expression is written, which decides whether it needs parentheses.
#[derive(Clone, Copy, PartialEq)]
enum Place {
    /// A whole rule body or group body: alternatives may stand bare.
    Body,
    /// An item of a sequence.
    Item,
    /// The operand of a repetition.
    Operand,
}

/// Writes parsed rules as Lark.
struct Emitter {
    split: HashSet<Vec<char>>,
    /// Repetitions written as one regex terminal (see [`runs`]), by node address.
    runs: HashSet<*const Node>,
    /// Lark rules for groups hoisted out of deep nesting, as (name, body).
    hoisted: Vec<(String, String)>,
}

impl Emitter {
    fn new(rules: &[RuleDef], merge_runs: bool) -> Self {
        let split = Terminals::of(rules)
            .literals_to_split()
            .into_iter()
            .map(<[char]>::to_vec)
            .collect();
        let runs = if merge_runs {
            runs::runs_of(rules, &split)
        } else {
            HashSet::new()
        };
        Emitter {
            split,
            runs,
            hoisted: Vec::new(),
        }
    }

    fn emit_grammar(mut self, rules: &[RuleDef]) -> String {
        let mut out = format!("start: {}\n", lark_rule_name(ROOT));
        // `root` first so the output reads top-down like most GBNF.
        let ordered = rules
            .iter()
            .filter(|r| r.name == ROOT)
            .chain(rules.iter().filter(|r| r.name != ROOT));
        for rule in ordered {
            let body = self.emit(&rule.body, Place::Body, 0);
            out.push_str(&format!("{}: {body}\n", lark_rule_name(&rule.name)));
        }
        for (name, body) in &self.hoisted {
            out.push_str(&format!("{name}: {body}\n"));
        }
        out
    }

    /// Parenthesizes what `inner` writes, or past the depth llguidance accepts, makes it a rule.
    fn group(&mut self, depth: usize, inner: impl FnOnce(&mut Self, usize) -> String) -> String {
        if depth < LARK_MAX_GROUP_DEPTH {
            return format!("({})", inner(self, depth + 1));
        }
        let index = self.hoisted.len();
        let name = format!("n{index}");
        // Reserve the slot first: groups nested in `inner` are hoisted after this one.
        self.hoisted.push((name.clone(), String::new()));
        self.hoisted[index].1 = inner(self, 0);
        name
    }

    fn emit_items(&mut self, items: &[Node], place: Place, depth: usize) -> String {
        match items {
            [] => "\"\"".to_string(),
            [one] => self.emit(one, place, depth),
            _ if place == Place::Operand => {
                self.group(depth, |e, d| e.emit_items(items, Place::Body, d))
            }
            _ => items
                .iter()
                .map(|n| self.emit(n, Place::Item, depth))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    fn emit(&mut self, node: &Node, place: Place, depth: usize) -> String {
        match node {
            Node::Alt(alternatives) => {
                let write = |e: &mut Self, d: usize| {
                    alternatives
                        .iter()
                        .map(|a| e.emit(a, Place::Body, d))
                        .collect::<Vec<_>>()
                        .join(" | ")
                };
                if place == Place::Body {
                    write(self, depth)
                } else {
                    self.group(depth, write)
                }
            }
            Node::Seq(items) => self.emit_items(items, place, depth),
            Node::Literal(chars) if self.split.contains(chars) => {
                let singles: Vec<Node> = chars.iter().map(|&c| Node::Literal(vec![c])).collect();
                self.emit_items(&singles, place, depth)
            }
            Node::Literal(chars) => lark_string(chars),
            Node::Class { negated, ranges } => lark_class(*negated, ranges),
            Node::AnyChar => "/(?s:.)/".to_string(),
            Node::Ref { name, .. } => lark_rule_name(name),
            Node::Token(TokenRef::Id { id, negated: false }) => format!("<[{id}]>"),
            Node::Token(TokenRef::Id { id, negated: true }) => format!("<[^{id}]>"),
            Node::Token(TokenRef::Text(text)) => text.clone(),
            Node::Repeat { item, min, max } if self.runs.contains(&(node as *const Node)) => {
                let run = runs::run_regex(item, *min, *max);
                match (*min, place) {
                    (0, Place::Operand) => self.group(depth, |_, _| format!("{run}?")),
                    (0, _) => format!("{run}?"),
                    _ => run,
                }
            }
            Node::Repeat { item, min, max } => {
                let suffix = match (*min, *max) {
                    (_, Some(0)) => return "\"\"".to_string(),
                    (1, Some(1)) => return self.emit(item, place, depth),
                    (0, None) => "*".to_string(),
                    (1, None) => "+".to_string(),
                    (0, Some(1)) => "?".to_string(),
                    (m, None) => format!("{{{m},}}"),
                    (m, Some(n)) if m == n => format!("{{{m}}}"),
                    (m, Some(n)) => format!("{{{m},{n}}}"),
                };
                if place == Place::Operand {
                    self.group(depth, |e, d| {
                        format!("{}{suffix}", e.emit(item, Place::Operand, d))
                    })
                } else {
                    format!("{}{suffix}", self.emit(item, Place::Operand, depth))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llguidance::{api::TopLevelGrammar, Matcher, ParserFactory};
    use std::sync::OnceLock;
    use toktrie_hf_tokenizers::ByteTokenizer;

    /// The Lark rules of `gbnf`, one string per line, without the `start:` line.
    fn lark_rules(gbnf: &str) -> Vec<String> {
        let lark = gbnf_to_lark(gbnf).unwrap_or_else(|e| panic!("{gbnf:?}: {e}"));
        let mut lines = lark.lines();
        assert_eq!(lines.next(), Some("start: g_root"));
        lines.map(str::to_string).collect()
    }

    /// The Lark body of the rule written first (GBNF's `root`).
    fn root_body(gbnf: &str) -> String {
        let rules = lark_rules(gbnf);
        rules[0]
            .strip_prefix("g_root: ")
            .unwrap_or_else(|| panic!("{rules:?}"))
            .to_string()
    }

    fn error(gbnf: &str) -> String {
        match gbnf_to_lark(gbnf) {
            Ok(lark) => panic!("{gbnf:?} translated to {lark:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn alternatives_of_literals() {
        assert_eq!(
            gbnf_to_lark(r#"root ::= "yes" | "no""#).unwrap(),
            "start: g_root\ng_root: \"yes\" | \"no\"\n"
        );
    }

    #[test]
    fn sequences_groups_and_operators() {
        assert_eq!(
            lark_rules("root ::= (\"a\" b)* \"cc\"+ b? (b | \"d\")\nb ::= \"b\""),
            [
                "g_root: (\"a\" g_b)* \"cc\"+ g_b? (g_b | \"d\")",
                "g_b: \"b\""
            ]
        );
        // Stacked operators nest; an empty alternative and an empty rule become "".
        assert_eq!(root_body("root ::= \"xy\"*? | "), "(\"xy\"*)? | \"\"");
        assert_eq!(root_body("root ::="), "\"\"");
    }

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
    fn rule_names_map_injectively_and_never_to_start() {
        assert_eq!(lark_rule_name("root"), "g_root");
        assert_eq!(lark_rule_name("My-Rule"), "g__my-_rule");
        assert_eq!(lark_rule_name("my-rule"), "g_my-rule");
        assert_eq!(lark_rule_name("my_rule"), "g_my__rule");
        assert_eq!(lark_rule_name("start"), "g_start");
        assert_eq!(lark_rule_name("9lives"), "g_9lives");
        let names = ["aB", "a_b", "ab", "AB", "a__b", "_ab", "a-b"];
        let mapped: HashSet<String> = names.iter().map(|n| lark_rule_name(n)).collect();
        assert_eq!(mapped.len(), names.len());
        assert_eq!(
            lark_rules("root ::= start\nstart ::= \"s\""),
            ["g_root: g_start", "g_start: \"s\""]
        );
    }

    #[test]
    fn root_comes_first() {
        assert_eq!(
            lark_rules("a ::= \"a\"\nroot ::= a"),
            ["g_root: g_a", "g_a: \"a\""]
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
    fn literals_a_greedy_lexer_could_misread_are_split() {
        // "end" starts with a letter [a-z] also matches, so it is written char by char.
        assert_eq!(
            root_body("root ::= [a-z]* \"end\""),
            r#"/[a-z]/* "e" "n" "d""#
        );
        // "ab" extends "a"; "abc" then starts with the split "ab"'s 'a'; "xy" is safe.
        assert_eq!(
            root_body("root ::= (\"a\" | \"ab\") \"abc\"+ \"xy\""),
            r#"("a" | "a" "b") ("a" "b" "c")+ "xy""#
        );
        // A negated class overlaps what it does not exclude: [^a] matches 'c' but not 'a'.
        assert_eq!(
            root_body("root ::= [^a] \"ab\" [0-9] \"cd\""),
            r#"/[^a]/ "ab" /[0-9]/ "c" "d""#
        );
        // Any '.' overlaps every literal.
        assert_eq!(root_body("root ::= . \"ok\""), r#"/(?s:.)/ "o" "k""#);
    }

    #[test]
    fn deep_groups_become_rules() {
        let depth = 40;
        let gbnf = format!("root ::= {}\"x\"{}", "(".repeat(depth), ")*".repeat(depth));
        let lark = gbnf_to_lark(&gbnf).unwrap();
        assert!(lark.lines().any(|l| l.starts_with("n0: ")), "{lark}");
        assert!(
            lark.lines()
                .all(|l| l.matches('(').count() <= LARK_MAX_GROUP_DEPTH),
            "{lark}"
        );
        assert_eq!(
            GrammarTester::new(&gbnf).accepts(&["", "x", "xxx"]),
            [true; 3]
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

    /// The tokenizer of the tiny Qwen3-MoE fixture, loaded once.
    pub(super) fn tok_env() -> &'static llguidance::toktrie::TokEnv {
        static ENV: OnceLock<llguidance::toktrie::TokEnv> = OnceLock::new();
        ENV.get_or_init(|| {
            let path = crate::testing::fixture_dir("qwen3-moe-tiny").join("tokenizer.json");
            ByteTokenizer::from_file(&path)
                .and_then(|t| t.into_tok_env(None))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
    }

    /// Runs texts through llguidance constrained by a translated GBNF grammar.
    pub(super) struct GrammarTester {
        factory: ParserFactory,
        pub(super) lark: String,
    }

    impl GrammarTester {
        fn new(gbnf: &str) -> Self {
            Self::from_lark(gbnf_to_lark(gbnf).unwrap_or_else(|e| panic!("{gbnf:?}: {e}")))
        }

        pub(super) fn from_lark(lark: String) -> Self {
            let mut factory = ParserFactory::new_simple(tok_env()).unwrap();
            factory.quiet();
            let tester = GrammarTester { factory, lark };
            // Compile once up front so a bad translation fails with llguidance's reason.
            if let Some(e) = tester.matcher().get_error() {
                panic!("llguidance rejected\n{}\n{e}", tester.lark);
            }
            tester
        }

        pub(super) fn matcher(&self) -> Matcher {
            let grammar = TopLevelGrammar::from_lark(self.lark.clone());
            Matcher::new(self.factory.create_parser(grammar))
        }

        /// Whether the grammar lets a model emit exactly `text` (as the tokenizer splits it)
        /// and then stop.
        fn accepts_one(&self, text: &str) -> bool {
            let mut matcher = self.matcher();
            let tokens = tok_env().tokenize_bytes(text.as_bytes());
            let valid = matcher.validate_tokens(&tokens).unwrap();
            if valid < tokens.len() {
                return false;
            }
            matcher.consume_tokens(&tokens).unwrap();
            matcher.is_accepting().unwrap()
        }

        fn accepts<const N: usize>(&self, texts: &[&str; N]) -> [bool; N] {
            texts.map(|t| self.accepts_one(t))
        }
    }

    #[test]
    fn yes_or_no_accepts_exactly_yes_and_no() {
        let tester = GrammarTester::new(r#"root ::= "yes" | "no""#);
        assert_eq!(tester.accepts(&["yes", "no"]), [true, true]);
        assert_eq!(
            tester.accepts(&["", "y", "yesno", "Yes", " yes", "yes ", "maybe"]),
            [false; 7]
        );
    }

    /// llama.cpp's grammars/json.gbnf, as published.
    pub(super) const JSON_GBNF: &str = r#"root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"#;

    #[test]
    fn json_grammar_accepts_json_and_rejects_the_rest() {
        let tester = GrammarTester::new(JSON_GBNF);
        assert_eq!(
            tester.accepts(&[
                "{}",
                r#"{"a": 1}"#,
                r#"{"a": [1, 2.5e3, -0.25, true, null], "b": {"c": "x\"y\\u00e9 é"}}"#,
                "{\n  \"nested\": [[[]], {\"k\": false}]\n}",
            ]),
            [true; 4]
        );
        assert_eq!(
            tester.accepts(&[
                "",
                "[1]",
                r#"{"a": 01}"#,
                r#"{"a": [1,]}"#,
                r#"{"a" 1}"#,
                "{\"a\": \"line\nbreak\"}",
                r#"{"a": "\q"}"#,
                r#"{"a": tru}"#,
                r#"{"a": 1}}"#,
            ]),
            [false; 9]
        );
    }

    #[test]
    fn counted_repetition_and_negated_class() {
        let tester = GrammarTester::new(r#"root ::= [^x\n]{2,3} "x""#);
        assert_eq!(tester.accepts(&["abx", "a☃x", "abcx", "😀😀x"]), [true; 4]);
        assert_eq!(
            tester.accepts(&["ax", "abcdx", "axx", "a\nx", "abc"]),
            [false; 5]
        );
    }

    #[test]
    fn rule_names_with_dashes_and_uppercase() {
        let tester = GrammarTester::new(
            "root ::= My-Rule my-rule\nMy-Rule ::= \"A\" | \"B\"\nmy-rule ::= [0-9]",
        );
        assert_eq!(tester.accepts(&["A1", "B9"]), [true, true]);
        assert_eq!(tester.accepts(&["1A", "AB", "a1", "A"]), [false; 4]);
    }

    #[test]
    fn dot_matches_any_one_character_including_newline() {
        let tester = GrammarTester::new("root ::= . . \"!\"");
        assert_eq!(tester.accepts(&["ab!", "\né!", "😀!!"]), [true; 3]);
        assert_eq!(tester.accepts(&["a!", "abc!"]), [false, false]);
    }

    #[test]
    fn split_literals_keep_context_free_meaning() {
        // Unsplit, llguidance's greedy lexer would take "end" at the first "e" and reject these.
        let tester = GrammarTester::new("root ::= [a-z]* \"end\"");
        assert_eq!(tester.accepts(&["end", "endend", "xend"]), [true; 3]);
        assert_eq!(tester.accepts(&["endx", "en"]), [false, false]);
        let tester = GrammarTester::new("root ::= (\"a\" | \"ab\") \"bc\"");
        assert_eq!(tester.accepts(&["abc", "abbc"]), [true, true]);
    }

    #[test]
    fn no_whitespace_is_skipped() {
        let tester = GrammarTester::new("root ::= \"a\" \"b\" [c]");
        assert_eq!(
            tester.accepts(&["abc", "a bc", "ab c", " abc"]),
            [true, false, false, false]
        );
    }

    #[test]
    fn token_ids_constrain_tokens() {
        let env = tok_env();
        let x = env.tokenize_bytes(b"x");
        assert_eq!(x.len(), 1);
        let tester = GrammarTester::new(&format!("root ::= !<[{}]> \"!\"", x[0]));
        assert_eq!(tester.accepts(&["y!", "x!"]), [true, false]);
    }
}
