//! The model's text tokenizer (`tokenizer.json`): text to token ids and back.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use ember_core::{EmberError, Result};
use tokenizers::{DecoderWrapper, Tokenizer};

/// A loaded `tokenizer.json`, with what the server needs on top: the raw bytes of each token.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Ids of added tokens (specials like `<|im_end|>`); their text is stored verbatim, not byte-encoded.
    added_ids: HashSet<u32>,
    /// GPT-2 byte-level alphabet inverted, when the decoder is byte-level.
    byte_level: Option<HashMap<char, u8>>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `<dir>/tokenizer.json`, or else a tiktoken `<dir>/tiktoken.model` (Kimi K2).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            if dir.join("tiktoken.model").is_file() {
                return Self::from_json(&crate::tiktoken::tokenizer_json_from_dir(dir)?);
            }
            return Err(EmberError::Tokenizer(format!(
                "{} not found: the model directory must contain a Hugging Face tokenizer.json \
                 (or a tiktoken.model)",
                path.display()
            )));
        }
        let inner = Tokenizer::from_file(&path)
            .map_err(|e| EmberError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self::new(inner))
    }

    /// Parses the contents of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        let inner = Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| EmberError::Tokenizer(format!("invalid tokenizer.json: {e}")))?;
        Ok(Self::new(inner))
    }

    fn new(inner: Tokenizer) -> Self {
        let added_ids = inner.get_added_tokens_decoder().into_keys().collect();
        let byte_level = is_byte_level(inner.get_decoder()).then(|| {
            byte_level_alphabet()
                .into_iter()
                .enumerate()
                .map(|(byte, c)| (c, byte as u8))
                .collect()
        });
        Self {
            inner,
            added_ids,
            byte_level,
        }
    }

    /// The tokenizer as `tokenizer.json` text (what the grammar engine reads).
    pub fn to_json(&self) -> std::result::Result<String, String> {
        self.inner
            .to_string(false)
            .map_err(|e| format!("cannot serialise the tokenizer: {e}"))
    }

    /// Token ids of `text`, adding no special tokens (the chat template already wrote them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_as(text, false)
    }

    /// Token ids of `text` with the special tokens the tokenizer's post-processor adds, e.g. the
    /// `<|endoftext|>` whose hidden state Qwen3-Embedding pools.
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_as(text, true)
    }

    fn encode_as(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| EmberError::Tokenizer(format!("cannot tokenize the prompt: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`; with `skip_special_tokens` the special tokens (eos, chat markers) are left out.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| EmberError::Tokenizer(format!("cannot decode token ids: {e}")))
    }

    /// The vocabulary entry of `id` as stored in tokenizer.json (e.g. `Ġhello`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token given by its vocabulary entry (e.g. `</think>`), if it is one token.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether `id` is an added token (a special such as `<|im_end|>`), not ordinary text.
    pub fn is_special(&self, id: u32) -> bool {
        self.added_ids.contains(&id)
    }

    /// Number of ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The text of one token as OpenAI logprobs show it: the token decoded on its own, specials
    /// kept. A token holding part of a UTF-8 character shows as U+FFFD.
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id], false).unwrap_or_default()
    }

    /// The bytes one token stands for (the logprobs `bytes` field): exact even when the token is
    /// only part of a UTF-8 character, so a client can join them back into text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if !self.added_ids.contains(&id) {
            if let Some(piece) = self.id_to_token(id) {
                if let Some(bytes) = self.raw_bytes(&piece) {
                    return bytes;
                }
            }
        }
        self.token_text(id).into_bytes()
    }

    /// Bytes of a vocabulary piece when its encoding is known: byte-level BPE, or a `<0xHH>`
    /// byte-fallback piece.
    fn raw_bytes(&self, piece: &str) -> Option<Vec<u8>> {
        if let Some(alphabet) = &self.byte_level {
            return piece.chars().map(|c| alphabet.get(&c).copied()).collect();
        }
        let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
        (hex.len() == 2)
            .then(|| u8::from_str_radix(hex, 16).ok().map(|b| vec![b]))
            .flatten()
    }
}

fn is_byte_level(decoder: Option<&DecoderWrapper>) -> bool {
    matches!(decoder, Some(DecoderWrapper::ByteLevel(_)))
}

/// GPT-2's byte-level alphabet: entry `b` is the printable character that stands for byte `b`.
/// Printable Latin-1 bytes stand for themselves; the rest map to U+0100 upwards, in byte order.
pub(crate) fn byte_level_alphabet() -> Vec<char> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                char::from(b)
            } else {
                let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
                next += 1;
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::byte_level_tokenizer;

    #[test]
    fn byte_level_alphabet_matches_gpt2() {
        let alphabet = byte_level_alphabet();
        assert_eq!(alphabet[b' ' as usize], 'Ġ');
        assert_eq!(alphabet[b'\n' as usize], 'Ċ');
        assert_eq!(alphabet[b'a' as usize], 'a');
        assert_eq!(alphabet[0], 'Ā');
        assert_eq!(alphabet[0xAD], 'Ń');
        let distinct: HashSet<char> = alphabet.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn encode_decode_round_trip_without_added_specials() {
        let tok = byte_level_tokenizer();
        let ids = tok.encode("hello 中").unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello 中");
        // "hello" is one merged token; the CJK character is three byte tokens.
        assert_eq!(ids.len(), 1 + 1 + 3);
        let special = tok.encode("<|im_end|>").unwrap();
        assert_eq!(special.len(), 1);
        assert_eq!(tok.decode(&special, true).unwrap(), "");
        assert_eq!(tok.decode(&special, false).unwrap(), "<|im_end|>");
    }

    #[test]
    fn token_text_and_bytes() {
        let tok = byte_level_tokenizer();
        let ids = tok.encode("中").unwrap();
        assert_eq!(ids.len(), 3);
        // Each byte token of a 3-byte character is not text on its own, but its bytes are exact.
        assert_eq!(tok.token_text(ids[0]), "\u{FFFD}");
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id)).collect();
        assert_eq!(bytes, "中".as_bytes());
        let space_hello = tok.encode(" hello").unwrap();
        assert_eq!(tok.id_to_token(space_hello[0]).as_deref(), Some("Ġ"));
        let im_end = tok.encode("<|im_end|>").unwrap()[0];
        assert_eq!(tok.token_text(im_end), "<|im_end|>");
        assert_eq!(tok.token_bytes(im_end), b"<|im_end|>");
    }

    /// Every `tokenization` case of a `models/*/reference.json` (Kimi K2's tiktoken fixture:
    /// ids from the `tiktoken` library) encodes to the same ids and decodes back to its text.
    /// A case with `"allowed_special": "none"` (tiktoken's `encode_ordinary`) reads specials as text.
    #[test]
    fn model_fixtures_tokenize_like_their_reference() {
        let models = crate::testing::model_reference_cases("tokenization");
        // models/kimi-k2-tiktoken is committed; finding none means a broken path.
        assert!(
            !models.is_empty(),
            "no models/*/reference.json has tokenization cases"
        );
        for (dir, cases) in models {
            let name = dir.display();
            let tok = TextTokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut ordinary = tok.inner.clone();
            ordinary.set_encode_special_tokens(true);
            for (i, case) in cases.iter().enumerate() {
                let text = case["text"].as_str().unwrap();
                let expected: Vec<u32> = serde_json::from_value(case["ids"].clone())
                    .unwrap_or_else(|e| panic!("{name} case {i}: ids: {e}"));
                let ids = if case["allowed_special"] == "none" {
                    ordinary.encode(text, false).unwrap().get_ids().to_vec()
                } else {
                    tok.encode(text).unwrap()
                };
                assert_eq!(ids, expected, "{name} case {i}: ids of {text:?}");
                assert_eq!(
                    tok.decode(&ids, false).unwrap(),
                    text,
                    "{name} case {i}: decode"
                );
            }
        }
    }

    #[test]
    fn missing_file_is_named() {
        let err = TextTokenizer::from_dir(Path::new("/nonexistent/model")).unwrap_err();
        assert!(err
            .to_string()
            .contains("/nonexistent/model/tokenizer.json not found"));
    }
}
