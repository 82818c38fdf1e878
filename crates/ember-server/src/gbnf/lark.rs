//! Writes parsed GBNF rules as an llguidance Lark grammar.

use std::collections::{HashMap, HashSet};

use super::{runs, Node, RuleDef, TokenRef, ROOT};

/// Parenthesis depth past which a group becomes its own Lark rule: llguidance's Lark parser
/// refuses expressions nested about 30 deep.
const LARK_MAX_GROUP_DEPTH: usize = 16;

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
pub(super) fn lark_string(chars: &[char]) -> String {
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
pub(super) fn regex_char(c: char) -> String {
    if c.is_ascii_alphanumeric() {
        c.to_string()
    } else {
        format!("\\x{{{:x}}}", c as u32)
    }
}

/// A GBNF character class as a Lark regex terminal, `/[...]/` or `/[^...]/`.
pub(super) fn lark_class(negated: bool, ranges: &[(char, char)]) -> String {
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
pub(super) struct Emitter {
    split: HashSet<Vec<char>>,
    /// Repetitions written as one regex terminal (see [`runs`]), by node address.
    runs: HashSet<*const Node>,
    /// Lark rules for groups hoisted out of deep nesting, as (name, body).
    hoisted: Vec<(String, String)>,
}

impl Emitter {
    pub(super) fn new(rules: &[RuleDef], merge_runs: bool) -> Self {
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

    pub(super) fn emit_grammar(mut self, rules: &[RuleDef]) -> String {
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
    use super::super::gbnf_to_lark;
    use super::super::tests::{lark_rules, root_body, GrammarTester};
    use super::*;

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
}
