//! Finding where one JSON value ends in text that is still arriving, without building it.
//!
//! The stream must forward argument text as it is generated, so it cannot wait for a whole value
//! and hand it to serde_json; this scanner only tracks strings, escapes and bracket depth.
//! serde_json still validates every value once it is complete.

/// What feeding one more character told the scanner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scan {
    /// The value goes on.
    More,
    /// This character closed the value.
    End,
    /// The value (a bare number or literal) ended just before this character, which is not part of it.
    EndBefore,
    /// No JSON value starts with this character.
    Invalid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unstarted,
    Container,
    String,
    Scalar,
}

/// Incremental end-of-value finder for one JSON value (leading whitespace is the caller's job).
#[derive(Debug, Clone)]
pub(super) struct ValueScanner {
    kind: Kind,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl ValueScanner {
    /// A scanner that has seen nothing yet.
    pub(super) fn new() -> Self {
        Self {
            kind: Kind::Unstarted,
            depth: 0,
            in_string: false,
            escaped: false,
        }
    }

    /// Advances over one character of the value.
    pub(super) fn feed(&mut self, c: char) -> Scan {
        match self.kind {
            Kind::Unstarted => match c {
                '{' | '[' => {
                    self.kind = Kind::Container;
                    self.depth = 1;
                    Scan::More
                }
                '"' => {
                    self.kind = Kind::String;
                    self.in_string = true;
                    Scan::More
                }
                c if is_scalar_char(c) => {
                    self.kind = Kind::Scalar;
                    Scan::More
                }
                _ => Scan::Invalid,
            },
            Kind::String => match self.string_char(c) {
                true => Scan::More,
                false => Scan::End,
            },
            Kind::Container if self.in_string => {
                self.in_string = self.string_char(c);
                Scan::More
            }
            Kind::Container => match c {
                '"' => {
                    self.in_string = true;
                    Scan::More
                }
                '{' | '[' => {
                    self.depth += 1;
                    Scan::More
                }
                '}' | ']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        Scan::End
                    } else {
                        Scan::More
                    }
                }
                _ => Scan::More,
            },
            Kind::Scalar if is_scalar_char(c) => Scan::More,
            Kind::Scalar => Scan::EndBefore,
        }
    }

    /// Steps through a character inside a string; false when it was the closing quote.
    fn string_char(&mut self, c: char) -> bool {
        if self.escaped {
            self.escaped = false;
        } else if c == '\\' {
            self.escaped = true;
        } else if c == '"' {
            return false;
        }
        true
    }
}

/// Characters of numbers and of `true`, `false`, `null` (serde_json judges the spelling later).
fn is_scalar_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '+' | '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte length of the first value in `text`, or None if it is invalid or unfinished.
    fn value_len(text: &str) -> Option<usize> {
        let mut scanner = ValueScanner::new();
        for (i, c) in text.char_indices() {
            match scanner.feed(c) {
                Scan::More => {}
                Scan::End => return Some(i + c.len_utf8()),
                Scan::EndBefore => return Some(i),
                Scan::Invalid => return None,
            }
        }
        None
    }

    #[test]
    fn an_object_ends_at_its_matching_brace_even_with_braces_and_quotes_in_strings() {
        let text = r#"{"a": {"b": "}{\"]"}, "c": [1, {"d": 2}]} tail"#;
        assert_eq!(value_len(text), Some(text.len() - " tail".len()));
    }

    #[test]
    fn a_string_ends_at_its_unescaped_closing_quote() {
        assert_eq!(value_len(r#""get\"x\\" , "#), Some(10));
    }

    #[test]
    fn a_bare_number_ends_before_the_delimiter() {
        assert_eq!(value_len("-12.5e3, "), Some(7));
        assert_eq!(value_len("true}"), Some(4));
    }

    #[test]
    fn an_unfinished_or_impossible_value_has_no_end() {
        assert_eq!(value_len(r#"{"a": "}"#), None);
        assert_eq!(value_len("}"), None);
    }
}
