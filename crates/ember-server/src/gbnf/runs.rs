//! Runs: character-class repetitions (`[a-z]*`, `[^"]{1,64}`, `.+`) that can be written as one
//! regex terminal instead of one terminal per character.
//!
//! Written one character per terminal, every byte of every token the mask checks passes through
//! llguidance's Earley parser (about 40 µs a mask on a 2k vocabulary); as one terminal the lexer's
//! automaton decides it alone (under 1 µs). But llguidance's lexer is greedy: a run terminal ends
//! only where its next character cannot extend it, and where two terminals are alive at once it
//! keeps the longer one. A run keeps GBNF's meaning exactly when neither can matter:
//!
//! - **(a) its end is forced:** no character the run matches can come right after it (so
//!   wherever GBNF ends the run, the greedy lexer ends it too), and no token terminal can;
//! - **(b) nothing competes with it:** no other terminal that can start where the run starts
//!   begins with a character the run matches, so after its first character the run is the only
//!   terminal alive.
//!
//! "Can come after" and "can start where" are computed over the whole grammar, Glushkov style:
//! every terminal occurrence, which occurrences can follow which (rules are context-free, so
//! over-approximated by unioning every reference), and two occurrences may start at one position
//! when they may start the input or follow terminals that can end on the same character. Both
//! are over-approximations, so a run is merged only when it is safe; the rest stay one character
//! per terminal. Deciding one run changes the terminals others see, so the analysis repeats
//! with the survivors until every remaining run passes.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::lark::{lark_class, lark_string, regex_char};
use super::{Node, RuleDef, TokenRef, ROOT};

/// The largest bounded repetition merged into a run: counted repetition in a regex is
/// expanded into automaton states, so large bounds stay as Lark repetitions.
const MAX_RUN_BOUND: u32 = 100;

/// Grammars with more terminal occurrences than this are written one character per terminal:
/// the analysis is quadratic in them in the worst case, and this runs before every request.
const MAX_OCCURRENCES: usize = 4096;

/// How many times the rule summaries may be recomputed before the analysis gives up (each
/// pass is linear in the grammar; chains of rules converge in about as many passes as rules).
const MAX_PASSES: usize = 256;

/// Set elements the analysis may touch in all before it gives up (runs are an optimization: a
/// grammar built to make the analysis slow is written one character per terminal instead).
const WORK_BUDGET: usize = 4_000_000;

/// Inclusive code point ranges, sorted and disjoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct CharSet(Vec<(u32, u32)>);

impl CharSet {
    fn all() -> Self {
        CharSet(vec![(0, char::MAX as u32)])
    }

    fn one(c: char) -> Self {
        CharSet(vec![(c as u32, c as u32)])
    }

    fn from_ranges(mut ranges: Vec<(u32, u32)>) -> Self {
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
        for (low, high) in ranges {
            match merged.last_mut() {
                Some(last) if low <= last.1.saturating_add(1) => last.1 = last.1.max(high),
                _ => merged.push((low, high)),
            }
        }
        CharSet(merged)
    }

    /// The characters `[...]` (or `[^...]`) matches.
    pub(super) fn of_class(negated: bool, ranges: &[(char, char)]) -> Self {
        let set = Self::from_ranges(ranges.iter().map(|&(l, h)| (l as u32, h as u32)).collect());
        if !negated {
            return set;
        }
        let mut out = Vec::new();
        let mut next = 0u32;
        for &(low, high) in &set.0 {
            if low > next {
                out.push((next, low - 1));
            }
            next = high + 1;
        }
        if next <= char::MAX as u32 {
            out.push((next, char::MAX as u32));
        }
        CharSet(out)
    }

    fn union(&mut self, other: &CharSet) {
        if !other.0.is_empty() {
            let mut ranges = std::mem::take(&mut self.0);
            ranges.extend_from_slice(&other.0);
            *self = Self::from_ranges(ranges);
        }
    }

    fn intersects(&self, other: &CharSet) -> bool {
        let (mut i, mut j) = (0, 0);
        while i < self.0.len() && j < other.0.len() {
            let (a, b) = (self.0[i], other.0[j]);
            if a.0 <= b.1 && b.0 <= a.1 {
                return true;
            }
            if a.1 < b.1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        false
    }
}

/// The characters one repeated item matches, if it is a single-character terminal.
fn run_item_chars(item: &Node) -> Option<CharSet> {
    match item {
        Node::Class { negated, ranges } => Some(CharSet::of_class(*negated, ranges)),
        Node::AnyChar => Some(CharSet::all()),
        Node::Literal(chars) if chars.len() == 1 => Some(CharSet::one(chars[0])),
        _ => None,
    }
}

/// The regex (without slashes) of one character of a run's item.
pub(super) fn run_item_regex(item: &Node) -> String {
    match item {
        Node::Class { negated, ranges } => {
            let class = lark_class(*negated, ranges);
            class[1..class.len() - 1].to_string()
        }
        Node::AnyChar => "(?s:.)".to_string(),
        Node::Literal(chars) => regex_char(chars[0]),
        _ => unreachable!("only single-character items form runs"),
    }
}

/// Whether `node` is a repetition that could be a run: a single-character item repeated with
/// small counts (at most [`MAX_RUN_BOUND`] at least, no bound or a small one at most, and at
/// least twice at most).
fn is_candidate(node: &Node) -> bool {
    match node {
        Node::Repeat { item, min, max } => {
            run_item_chars(item).is_some()
                && *min <= MAX_RUN_BOUND
                && max.is_none_or(|m| (2..=MAX_RUN_BOUND).contains(&m))
        }
        _ => false,
    }
}

/// A terminal occurrence of the grammar as it would be written.
struct Occurrence {
    /// The Lark terminal it is written as: equal keys are one lexeme to llguidance.
    key: String,
    /// Characters it may start with.
    first: CharSet,
    /// Characters it may end with.
    last: CharSet,
}

/// Marks "end of input" in follow sets.
const END: usize = usize::MAX;

#[derive(Clone, Default, PartialEq)]
struct Summary {
    nullable: bool,
    first: BTreeSet<usize>,
    last: BTreeSet<usize>,
}

/// Terminal occurrences and which may follow which, for one choice of merged runs.
struct Flow<'n> {
    split: &'n HashSet<Vec<char>>,
    runs: &'n HashSet<*const Node>,
    occurrences: Vec<Occurrence>,
    /// (node, character index in a split literal) → occurrence.
    ids: HashMap<(*const Node, usize), usize>,
    rules: HashMap<&'n str, Summary>,
    /// Occurrence → occurrences (or [`END`]) that may come right after it.
    follow: Vec<BTreeSet<usize>>,
    too_big: bool,
    /// Set elements touched so far (see [`WORK_BUDGET`]).
    work: usize,
}

impl<'n> Flow<'n> {
    fn new(
        rules: &'n [RuleDef],
        split: &'n HashSet<Vec<char>>,
        runs: &'n HashSet<*const Node>,
    ) -> Option<Self> {
        let mut flow = Flow {
            split,
            runs,
            occurrences: Vec::new(),
            ids: HashMap::new(),
            rules: HashMap::new(),
            follow: Vec::new(),
            too_big: false,
            work: 0,
        };
        let mut converged = false;
        for _ in 0..MAX_PASSES {
            let mut changed = false;
            for rule in rules {
                let summary = flow.walk(&rule.body, false);
                if flow.rules.get(rule.name.as_str()) != Some(&summary) {
                    flow.rules.insert(&rule.name, summary);
                    changed = true;
                }
            }
            if flow.too_big {
                return None;
            }
            if !changed {
                converged = true;
                break;
            }
        }
        if !converged {
            return None;
        }
        flow.follow = vec![BTreeSet::new(); flow.occurrences.len()];
        for rule in rules {
            flow.walk(&rule.body, true);
        }
        if flow.too_big {
            return None;
        }
        if let Some(root) = flow.rules.get(ROOT) {
            for &t in &root.last.clone() {
                flow.follow[t].insert(END);
            }
        }
        Some(flow)
    }

    fn occurrence(
        &mut self,
        node: &Node,
        index: usize,
        make: impl FnOnce() -> Occurrence,
    ) -> usize {
        let key = (node as *const Node, index);
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        if self.occurrences.len() >= MAX_OCCURRENCES {
            self.too_big = true;
        }
        let id = self.occurrences.len();
        self.occurrences.push(make());
        self.ids.insert(key, id);
        id
    }

    fn single(&mut self, node: &Node, key: String, chars: CharSet) -> Summary {
        let id = self.occurrence(node, 0, || Occurrence {
            key,
            first: chars.clone(),
            last: chars,
        });
        Summary {
            nullable: false,
            first: BTreeSet::from([id]),
            last: BTreeSet::from([id]),
        }
    }

    /// Counts `elements` against [`WORK_BUDGET`].
    fn spend(&mut self, elements: usize) {
        self.work += elements;
        if self.work > WORK_BUDGET {
            self.too_big = true;
        }
    }

    fn link(&mut self, from: &BTreeSet<usize>, to: &BTreeSet<usize>, emit: bool) {
        if emit {
            self.spend(from.len() * to.len());
            for &f in from {
                self.follow[f].extend(to.iter().copied());
            }
        }
    }

    fn walk(&mut self, node: &Node, emit: bool) -> Summary {
        if self.too_big {
            return Summary::default();
        }
        match node {
            Node::Literal(chars) if chars.is_empty() => Summary {
                nullable: true,
                ..Summary::default()
            },
            Node::Literal(chars) if self.split.contains(chars) => {
                let ids: Vec<usize> = chars
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| {
                        self.occurrence(node, i, || Occurrence {
                            key: lark_string(&[c]),
                            first: CharSet::one(c),
                            last: CharSet::one(c),
                        })
                    })
                    .collect();
                for pair in ids.windows(2) {
                    self.link(&BTreeSet::from([pair[0]]), &BTreeSet::from([pair[1]]), emit);
                }
                Summary {
                    nullable: false,
                    first: BTreeSet::from([ids[0]]),
                    last: BTreeSet::from([ids[ids.len() - 1]]),
                }
            }
            Node::Literal(chars) => {
                let id = self.occurrence(node, 0, || Occurrence {
                    key: lark_string(chars),
                    first: CharSet::one(chars[0]),
                    last: CharSet::one(chars[chars.len() - 1]),
                });
                Summary {
                    nullable: false,
                    first: BTreeSet::from([id]),
                    last: BTreeSet::from([id]),
                }
            }
            Node::Class { negated, ranges } => self.single(
                node,
                lark_class(*negated, ranges),
                CharSet::of_class(*negated, ranges),
            ),
            Node::AnyChar => self.single(node, ".".to_string(), CharSet::all()),
            // A token's text is not characters the lexer sees: it conflicts with everything.
            Node::Token(token) => {
                let key = match token {
                    TokenRef::Id { id, negated } => {
                        format!("<[{}{id}]>", if *negated { "^" } else { "" })
                    }
                    TokenRef::Text(text) => text.clone(),
                };
                self.single(node, key, CharSet::all())
            }
            Node::Ref { name, .. } => {
                let summary = self.rules.get(name.as_str()).cloned().unwrap_or_default();
                self.spend(summary.first.len() + summary.last.len());
                summary
            }
            Node::Alt(alternatives) => {
                let mut out = Summary::default();
                for a in alternatives {
                    let s = self.walk(a, emit);
                    out.nullable |= s.nullable;
                    out.first.extend(s.first);
                    out.last.extend(s.last);
                }
                out
            }
            Node::Seq(items) => {
                let mut out = Summary {
                    nullable: true,
                    ..Summary::default()
                };
                for item in items {
                    let s = self.walk(item, emit);
                    self.link(&out.last, &s.first, emit);
                    if out.nullable {
                        out.first.extend(s.first.iter().copied());
                    }
                    if s.nullable {
                        out.last.extend(s.last);
                    } else {
                        out.last = s.last;
                    }
                    out.nullable &= s.nullable;
                }
                out
            }
            Node::Repeat { max: Some(0), .. } => Summary {
                nullable: true,
                ..Summary::default()
            },
            Node::Repeat { item, min, max } => {
                if self.runs.contains(&(node as *const Node)) {
                    let chars = run_item_chars(item).expect("runs are candidates");
                    let mut s =
                        self.single(node, format!("run {}", run_regex(item, *min, *max)), chars);
                    s.nullable = *min == 0;
                    return s;
                }
                let mut s = self.walk(item, emit);
                if *max != Some(1) {
                    let (last, first) = (s.last.clone(), s.first.clone());
                    self.link(&last, &first, emit);
                }
                s.nullable |= *min == 0;
                s
            }
        }
    }

    /// Whether the run at occurrence `run` (matching `chars`) keeps GBNF's meaning.
    fn run_is_exact(&self, run: usize, chars: &CharSet, before: &[(bool, CharSet)]) -> bool {
        // (a) its end is forced.
        let ends_forced = self.follow[run]
            .iter()
            .all(|&next| next == END || !self.occurrences[next].first.intersects(chars));
        if !ends_forced {
            return false;
        }
        // (b) nothing that can start where it starts begins with one of its characters.
        let (run_at_start, run_after) = &before[run];
        let key = &self.occurrences[run].key;
        self.occurrences.iter().enumerate().all(|(other, o)| {
            let (at_start, after) = &before[other];
            let may_share_start = (*run_at_start && *at_start) || run_after.intersects(after);
            other == run || o.key == *key || !may_share_start || !o.first.intersects(chars)
        })
    }

    /// For each occurrence: whether it may start the input, and the characters the terminals
    /// right before it may end with.
    fn before(&self) -> Vec<(bool, CharSet)> {
        let mut before = vec![(false, CharSet::default()); self.occurrences.len()];
        if let Some(root) = self.rules.get(ROOT) {
            for &t in &root.first {
                before[t].0 = true;
            }
        }
        for (from, nexts) in self.follow.iter().enumerate() {
            for &next in nexts {
                if next != END {
                    let last = self.occurrences[from].last.clone();
                    before[next].1.union(&last);
                }
            }
        }
        before
    }
}

/// The regex of a run: its item `min..=max` times (at least once; `min == 0` is written as an
/// optional run).
pub(super) fn run_regex(item: &Node, min: u32, max: Option<u32>) -> String {
    let one = run_item_regex(item);
    let low = min.max(1);
    let suffix = match max {
        None if low == 1 => "+".to_string(),
        None => format!("{{{low},}}"),
        Some(high) if high == low => format!("{{{low}}}"),
        Some(high) => format!("{{{low},{high}}}"),
    };
    format!("/{one}{suffix}/")
}

fn candidates<'n>(node: &'n Node, out: &mut Vec<&'n Node>) {
    if is_candidate(node) {
        out.push(node);
    }
    match node {
        Node::Alt(nodes) | Node::Seq(nodes) => nodes.iter().for_each(|n| candidates(n, out)),
        Node::Repeat { item, .. } => candidates(item, out),
        _ => {}
    }
}

/// The repetitions of `rules` to write as one run terminal each (by node address), given the
/// literals the emitter writes one character at a time.
pub(super) fn runs_of(rules: &[RuleDef], split: &HashSet<Vec<char>>) -> HashSet<*const Node> {
    let mut all = Vec::new();
    rules.iter().for_each(|r| candidates(&r.body, &mut all));
    let mut runs: HashSet<*const Node> = all.iter().map(|&n| n as *const Node).collect();
    while !runs.is_empty() {
        let Some(flow) = Flow::new(rules, split, &runs) else {
            return HashSet::new();
        };
        let before = flow.before();
        let exact: HashSet<*const Node> = all
            .iter()
            .filter(|&&node| runs.contains(&(node as *const Node)))
            .filter(|&&node| {
                let Node::Repeat { item, .. } = node else {
                    return false;
                };
                let chars = run_item_chars(item).expect("candidates have single-character items");
                // A run inside `x{0}` is never written and never walked.
                flow.ids
                    .get(&(node as *const Node, 0))
                    .is_some_and(|&id| flow.run_is_exact(id, &chars, &before))
            })
            .map(|&n| n as *const Node)
            .collect();
        if exact.len() == runs.len() {
            break;
        }
        runs = exact;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::super::parser::Parser;
    use super::super::tests::{tok_env, GrammarTester};
    use super::super::{gbnf_to_lark, translate, Node, RuleDef};
    use super::*;

    /// The Lark body of GBNF's `root`.
    fn root_body(gbnf: &str) -> String {
        let lark = gbnf_to_lark(gbnf).unwrap();
        let line = lark.lines().nth(1).unwrap();
        line.strip_prefix("g_root: ").unwrap().to_string()
    }

    #[test]
    fn repetitions_whose_end_is_forced_become_one_terminal() {
        assert_eq!(root_body("root ::= [a-z ]*"), r"/[a-z\x{20}]+/?");
        assert_eq!(
            root_body(r#"root ::= "<" [^>\\]{1,64} ">" .*"#),
            r#""<" /[^\x{3e}\x{5c}]{1,64}/ ">" /(?s:.)+/?"#
        );
        assert_eq!(
            lark_rules("root ::= \"{\\\"items\\\": [\" item (\", \" item)*\nitem ::= \"\\\"\" [a-z ]* \"\\\"\""),
            [
                r#"g_root: "{\"items\": [" g_item (", " g_item)*"#,
                r#"g_item: "\"" /[a-z\x{20}]+/? "\"""#,
            ]
        );
        // Each run ends where the next field begins; the literals split only because their
        // letters are in [a-z], and none of them can start where a run starts.
        assert_eq!(
            root_body(r#"root ::= "name: " [a-z]+ "\n" "age: " [0-9]{1,3}"#),
            r#""n" "a" "m" "e" ":" " " /[a-z]+/ "\u000a" "a" "g" "e" ":" " " /[0-9]{1,3}/"#
        );
        assert_eq!(root_body(r#"root ::= "x"+ "y""#), "/x+/ \"y\"");
    }

    #[test]
    fn repetitions_a_greedy_lexer_could_misread_stay_one_character_each() {
        // The next character may be one the run matches: GBNF may end the run there.
        assert_eq!(
            root_body("root ::= [a-z]* \"end\""),
            r#"/[a-z]/* "e" "n" "d""#
        );
        assert_eq!(root_body("root ::= [0-9]+ [0-9]"), "/[0-9]/+ /[0-9]/");
        assert_eq!(root_body("root ::= ([a-z]+)*"), "(/[a-z]/+)*");
        assert_eq!(root_body("root ::= x x\nx ::= [a-c]+ | \"d\""), "g_x g_x");
        assert!(gbnf_to_lark("root ::= x x\nx ::= [a-c]+ | \"d\"")
            .unwrap()
            .contains("/[a-c]/+"));
        // A token may follow: its text is not characters.
        assert_eq!(root_body("root ::= [a-z]+ <[7]>"), "/[a-z]/+ <[7]>");
        // Another terminal starting with a letter can start where the run starts.
        assert_eq!(
            root_body("root ::= (\"ab\" | [a-z]+) \"!\""),
            r#"("a" "b" | /[a-z]/+) "!""#
        );
        assert_eq!(
            root_body("root ::= (\"q\" [0-9] | [a-z]{2,4}) \";\""),
            r#"("q" /[0-9]/ | /[a-z]/{2,4}) ";""#
        );
        // Large bounds stay Lark repetitions.
        assert_eq!(
            root_body("root ::= [a-z]{200,} \"!\""),
            "/[a-z]/{200,} \"!\""
        );
        assert_eq!(
            root_body("root ::= [a-z]{1,500} \"!\""),
            "/[a-z]/{1,500} \"!\""
        );
    }

    #[test]
    fn a_grammar_too_costly_to_analyse_is_written_one_character_per_terminal() {
        // 300 rules, each a run or a sequence of the next 39: the rules' first and last sets grow
        // with every reference. Unbounded, the analysis took 5.7 s here (it would merge the runs:
        // neither ';' nor 'X' is a letter); the budget stops it within milliseconds.
        let mut gbnf = String::from("root ::= r0\n");
        for i in 0..300 {
            let later: Vec<String> = (i + 1..300.min(i + 40)).map(|j| format!("r{j}")).collect();
            gbnf.push_str(&format!(
                "r{i} ::= [a-z]+ \";\" | {} \"X\"\n",
                later.join(" ").trim()
            ));
        }
        let start = std::time::Instant::now();
        let lark = gbnf_to_lark(&gbnf).unwrap();
        assert!(start.elapsed().as_secs_f64() < 5.0, "{:?}", start.elapsed());
        assert!(!lark.contains("]+/"), "no run is merged: {}", &lark[..200]);
    }

    fn lark_rules(gbnf: &str) -> Vec<String> {
        gbnf_to_lark(gbnf)
            .unwrap()
            .lines()
            .skip(1)
            .map(str::to_string)
            .collect()
    }

    /// Grammars where runs apply, where they must not, and where they interact.
    const GRAMMARS: &[&str] = &[
        "root ::= [a-z ]*",
        "root ::= \"{\\\"items\\\": [\" item (\", \" item)*\nitem ::= \"\\\"\" [a-z ]* \"\\\"\"",
        "root ::= \"name: \" [a-z]+ \"\\n\" \"age: \" [0-9]{1,3}",
        "root ::= [a-z]* \"end\"",
        "root ::= (\"ab\" | [a-z]+) \"!\"",
        "root ::= (\"ab\" | [c-z]+) \"!\"",
        "root ::= [0-9]{1,3} (\".\" [0-9]{1,3}){3}",
        "root ::= \"\\\"\" [^\"\\\\]* \"\\\"\" ([ ]* \",\" [ ]* \"\\\"\" [^\"\\\\]* \"\\\"\")*",
        "root ::= x x\nx ::= [a-c]+ | \"d\"",
        "root ::= x \"!\" x\nx ::= [a-c]+ | \"d\"",
        "root ::= ([a-z]+ \",\")+ [0-9]+",
        "root ::= [a-z]{2,4} [0-9] | \"abc\"",
        "root ::= \"x\" .* ",
        "root ::= [ab]+ \"c\" | [bc]+ \"a\"",
        "root ::= w (\" \" w)*\nw ::= [a-z]+ | [0-9]+",
        "root ::= a? [a-z]+ \"!\"\na ::= \"a\"",
        "root ::= \"-\"? [0-9]+ (\".\" [0-9]+)? ([eE] [-+]? [0-9]+)?",
        // llama.cpp's grammars/json.gbnf, as published: `[ \t]{0,20}` and `[0-9]{0,15}` are runs.
        super::super::tests::JSON_GBNF,
        // llama.cpp's grammars/list.gbnf and a shape of its arithmetic.gbnf.
        "root ::= item+\nitem ::= \"- \" [^\\r\\n\\x0b\\x0c\\x85\\u2028\\u2029]+ \"\\n\"",
        "root ::= (expr \"=\" ws term \"\\n\")+\nexpr ::= term ([-+*/] term)*\nterm ::= ident | num | \"(\" ws expr \")\" ws\nident ::= [a-z] [a-z0-9_]* ws\nnum ::= [0-9]+ ws\nws ::= [ \\t\\n]*",
    ];

    /// Characters the sampler draws for classes, `.` and edits.
    const ALPHABET: &str = "abcdeqz xy019.,!-+eE;\"\\\n{}[]:";

    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) as usize) % n.max(1)
        }

        fn char_in(&mut self, set: &CharSet) -> Option<char> {
            let fits: Vec<char> = ALPHABET
                .chars()
                .filter(|&c| set.intersects(&CharSet::one(c)))
                .collect();
            (!fits.is_empty()).then(|| fits[self.below(fits.len())])
        }
    }

    /// A random string of the grammar's language (or, past the depth limit, a near miss).
    fn sample(node: &Node, rules: &[RuleDef], rng: &mut Rng, depth: usize, out: &mut String) {
        match node {
            Node::Alt(nodes) => sample(&nodes[rng.below(nodes.len())], rules, rng, depth, out),
            Node::Seq(nodes) => nodes.iter().for_each(|n| sample(n, rules, rng, depth, out)),
            Node::Literal(chars) => out.extend(chars),
            Node::Class { negated, ranges } => {
                out.extend(rng.char_in(&CharSet::of_class(*negated, ranges)))
            }
            Node::AnyChar => out.extend(rng.char_in(&CharSet::all())),
            Node::Ref { name, .. } if depth < 8 => {
                let rule = rules.iter().find(|r| &r.name == name).unwrap();
                sample(&rule.body, rules, rng, depth + 1, out)
            }
            Node::Ref { .. } | Node::Token(_) => {}
            Node::Repeat { item, min, max } => {
                let extra = max.map_or(4, |m| (m - min).min(4)) as usize;
                for _ in 0..*min as usize + rng.below(extra + 1) {
                    sample(item, rules, rng, depth, out);
                }
            }
        }
    }

    /// Sampled strings of `gbnf`'s language, half of them with one or two random edits.
    fn texts(gbnf: &str, count: usize, seed: u64) -> Vec<String> {
        let rules = Parser::new(gbnf).parse_grammar().unwrap();
        let root = rules.iter().find(|r| r.name == "root").unwrap();
        let mut rng = Rng(seed);
        let alphabet: Vec<char> = ALPHABET.chars().collect();
        (0..count)
            .map(|_| {
                let mut text = String::new();
                sample(&root.body, &rules, &mut rng, 0, &mut text);
                let mut chars: Vec<char> = text.chars().collect();
                for _ in 0..rng.below(2) * (1 + rng.below(2)) {
                    let at = rng.below(chars.len() + 1);
                    match rng.below(3) {
                        0 => chars.insert(at, alphabet[rng.below(alphabet.len())]),
                        1 if at < chars.len() => {
                            chars.remove(at);
                        }
                        _ if at < chars.len() => chars[at] = alphabet[rng.below(alphabet.len())],
                        _ => {}
                    }
                }
                chars.into_iter().collect()
            })
            .collect()
    }

    /// Runs change how a grammar is written, never what it admits: on sampled and edited
    /// strings of each grammar, the translation with runs and the one without agree on how
    /// many tokens are valid, on whether the valid prefix may stop, and on the mask after it.
    #[test]
    fn runs_admit_exactly_what_one_character_terminals_admit() {
        let mut merged = 0;
        for (g, gbnf) in GRAMMARS.iter().enumerate() {
            let with = GrammarTester::from_lark(translate(gbnf, true).unwrap());
            let without = GrammarTester::from_lark(translate(gbnf, false).unwrap());
            merged += usize::from(with.lark != without.lark);
            let (mut accepted, mut refused) = (0, 0);
            for text in texts(gbnf, 150, 17 + g as u64) {
                let tokens = tok_env().tokenize_bytes(text.as_bytes());
                let [a, b] = [&with, &without].map(|t| {
                    let mut m = t.matcher();
                    let valid = m.validate_tokens(&tokens).unwrap();
                    m.consume_tokens(&tokens[..valid]).unwrap();
                    let stops = m.is_accepting().unwrap();
                    let mask = (!m.is_stopped()).then(|| m.compute_mask().unwrap());
                    (valid, stops, mask)
                });
                let context = format!(
                    "{gbnf:?} on {text:?}\nwith runs: {}\nwithout: {}",
                    with.lark, without.lark
                );
                assert_eq!((a.0, a.1), (b.0, b.1), "valid tokens, may stop: {context}");
                assert!(a.2 == b.2, "masks differ: {context}");
                if a.0 == tokens.len() && a.1 {
                    accepted += 1;
                } else {
                    refused += 1;
                }
            }
            assert!(
                accepted > 10 && refused > 10,
                "{gbnf:?}: {accepted} accepted, {refused} refused"
            );
        }
        // Most of these grammars have a run to merge; the comparison is not vacuous.
        assert!(merged >= 10, "only {merged} grammars merged a run");
    }
}
