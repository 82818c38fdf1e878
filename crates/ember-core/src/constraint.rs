//! Constrained decoding's contract between the HTTP side, which compiles a grammar or JSON
//! schema, and the engine, which applies its token masks while sampling. The engine knows no
//! grammar engine; it only asks which tokens may come next and reports the one it chose.

use std::fmt;
use std::sync::Arc;

/// The tokens a request may sample next: a bitset over token ids (bit `id % 32` of word
/// `id / 32`). Ids past the end of the set are not allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMask {
    words: Vec<u32>,
}

impl TokenMask {
    /// A mask from its 32-bit words, as grammar engines lay them out.
    pub fn from_words(words: Vec<u32>) -> Self {
        Self { words }
    }

    /// A mask allowing exactly `ids`, for a vocabulary of `vocab_size` tokens.
    pub fn allowing(vocab_size: usize, ids: impl IntoIterator<Item = u32>) -> Self {
        let mut mask = Self {
            words: vec![0; vocab_size.div_ceil(32)],
        };
        for id in ids {
            mask.allow(id);
        }
        mask
    }

    /// Whether `id` may be sampled.
    pub fn allows(&self, id: u32) -> bool {
        self.words
            .get(id as usize / 32)
            .is_some_and(|w| w >> (id % 32) & 1 == 1)
    }

    /// Lets `id` be sampled too (the set grows to hold it).
    pub fn allow(&mut self, id: u32) {
        let word = id as usize / 32;
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        self.words[word] |= 1 << (id % 32);
    }

    /// Whether no token at all is allowed.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Number of allowed tokens.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }
}

/// One request's live constraint: which tokens may come next, advanced token by token.
/// Errors end the request with their message (the HTTP side has already checked the grammar).
pub trait TokenConstraint: Send {
    /// The tokens allowed at the next position.
    fn allowed_tokens(&mut self) -> Result<TokenMask, String>;
    /// Records the sampled token (never an end-of-sequence token, which the engine handles).
    fn accept_token(&mut self, token: u32) -> Result<(), String>;
    /// Records `token` and answers true only if [`Self::allowed_tokens`] would allow it, found
    /// without computing the whole mask; false leaves the constraint as it was. The engine then
    /// falls back to the mask, so an implementation may say false whenever it cannot tell
    /// cheaply, as this default always does (never an end-of-sequence token here either).
    fn try_accept_token(&mut self, _token: u32) -> Result<bool, String> {
        Ok(false)
    }
    /// Whether the output is complete and nothing more may follow: the request stops.
    fn is_finished(&self) -> bool;
}

/// A compiled grammar that starts a fresh [`TokenConstraint`] for each sequence that uses it
/// (the `n` choices of a request each get their own).
pub trait ConstraintSpec: Send + Sync {
    /// A constraint at the start of the output.
    fn start(&self) -> Box<dyn TokenConstraint>;
    /// What it constrains to, for logs and debug output.
    fn describe(&self) -> String;
}

/// A shared [`ConstraintSpec`], carried in [`crate::SamplingParams`]. Two are equal when they
/// are the same compiled grammar.
#[derive(Clone)]
pub struct Constraint(pub Arc<dyn ConstraintSpec>);

impl PartialEq for Constraint {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Constraint({})", self.0.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mask_allows_exactly_its_ids() {
        let mut mask = TokenMask::allowing(70, [0, 31, 32, 69]);
        assert!(mask.allows(0) && mask.allows(31) && mask.allows(32) && mask.allows(69));
        assert!(!mask.allows(1) && !mask.allows(33) && !mask.allows(70) && !mask.allows(9999));
        assert_eq!(mask.count(), 4);
        mask.allow(100);
        assert!(mask.allows(100));
        assert_eq!(mask.count(), 5);
        assert!(TokenMask::allowing(64, []).is_empty());
        assert!(!mask.is_empty());
    }
}
