//! llama.cpp GBNF → llguidance Lark, for Fireworks' `response_format: {"type": "grammar"}`.
//!
//! GBNF matches characters with no lexer and no implicit whitespace; llguidance's Lark has both a
//! lexer and greedy (longest-match) terminals. The translation keeps GBNF's meaning: every terminal
//! is an exact string or one-character regex, and a string literal that a greedy lexer could
//! swallow where the grammar needs a shorter terminal is split into one-character literals.

mod lark;
mod parser;
mod runs;

use lark::Emitter;
use parser::{check_names, Parser};

/// The rule GBNF starts from.
const ROOT: &str = "root";

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

#[cfg(test)]
mod tests {
    use super::*;
    use llguidance::{api::TopLevelGrammar, Matcher, ParserFactory};
    use std::sync::OnceLock;
    use toktrie_hf_tokenizers::ByteTokenizer;

    /// The Lark rules of `gbnf`, one string per line, without the `start:` line.
    pub(super) fn lark_rules(gbnf: &str) -> Vec<String> {
        let lark = gbnf_to_lark(gbnf).unwrap_or_else(|e| panic!("{gbnf:?}: {e}"));
        let mut lines = lark.lines();
        assert_eq!(lines.next(), Some("start: g_root"));
        lines.map(str::to_string).collect()
    }

    /// The Lark body of the rule written first (GBNF's `root`).
    pub(super) fn root_body(gbnf: &str) -> String {
        let rules = lark_rules(gbnf);
        rules[0]
            .strip_prefix("g_root: ")
            .unwrap_or_else(|| panic!("{rules:?}"))
            .to_string()
    }

    pub(super) fn error(gbnf: &str) -> String {
        match gbnf_to_lark(gbnf) {
            Ok(lark) => panic!("{gbnf:?} translated to {lark:?}"),
            Err(e) => e.to_string(),
        }
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
        pub(super) fn new(gbnf: &str) -> Self {
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

        pub(super) fn accepts<const N: usize>(&self, texts: &[&str; N]) -> [bool; N] {
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
