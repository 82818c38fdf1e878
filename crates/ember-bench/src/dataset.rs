//! The prompts of a benchmark, made as vLLM's datasets make them (`vllm/benchmarks/datasets.py`):
//! `random` (synthetic token runs of controlled length), `prefix_repetition` (a few shared
//! prefixes with random suffixes, for prefix caching), `sharegpt` (first turns of real
//! conversations) and `custom` (given prompts).

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use tokenizers::{PostProcessor, Tokenizer};

/// One request to send.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRequest {
    pub prompt: String,
    /// Prompt tokens by the client's tokenizer (0 when there is none).
    pub prompt_len: usize,
    /// `max_tokens` to ask for.
    pub output_len: usize,
}

/// The model's tokenizer, as the datasets use it.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    /// Ordinary token ids: the base vocabulary less the special tokens.
    allowed: Vec<u32>,
    /// Tokens the tokenizer adds around a prompt (a BOS, say).
    special_tokens_to_add: usize,
}

impl PromptTokenizer {
    /// Loads `dir/tokenizer.json` (or `dir` itself when it is the file).
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let tokenizer = Tokenizer::from_file(&file).map_err(|e| {
            anyhow::anyhow!(
                "cannot load the tokenizer {}: {e}; pass --tokenizer <dir with tokenizer.json>",
                file.display()
            )
        })?;
        let special: HashSet<u32> = tokenizer
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| *id)
            .collect();
        let vocab_size = tokenizer.get_vocab_size(false) as u32;
        let allowed: Vec<u32> = (0..vocab_size).filter(|id| !special.contains(id)).collect();
        if allowed.is_empty() {
            bail!("the tokenizer {} has no ordinary tokens", file.display());
        }
        let special_tokens_to_add = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        Ok(Self {
            tokenizer,
            allowed,
            special_tokens_to_add,
        })
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("cannot tokenize a prompt: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("cannot decode token ids: {e}"))
    }

    /// `len` ordinary tokens drawn uniformly.
    fn random_tokens(&self, len: usize, rng: &mut impl Rng) -> Vec<u32> {
        (0..len)
            .map(|_| self.allowed[rng.random_range(0..self.allowed.len())])
            .collect()
    }

    /// Text that tokenizes to `target` tokens, from `tokens` decoded and re-encoded: a run of
    /// ids can re-tokenize to a different count, so truncate or pad with random ordinary tokens
    /// and try again, at most 10 times (vLLM's `gen_prompt_decode_to_target_len`). Returns the
    /// text and its token ids, whose count may still differ slightly after the last try.
    pub fn decode_to_len(
        &self,
        mut tokens: Vec<u32>,
        target: usize,
        rng: &mut impl Rng,
    ) -> Result<(String, Vec<u32>)> {
        for attempt in 0..=10 {
            let text = self.decode(&tokens)?;
            tokens = self.encode(&text)?;
            if tokens.len() == target || attempt == 10 {
                return Ok((text, tokens));
            }
            if tokens.len() > target {
                tokens.truncate(target);
            } else {
                let pad = self.random_tokens(target - tokens.len(), rng);
                tokens.extend(pad);
            }
        }
        unreachable!("the loop returns on its last attempt")
    }
}

/// Lengths of `random` prompts and completions.
#[derive(Debug, Clone, Copy)]
pub struct RandomLengths {
    pub input_len: usize,
    pub output_len: usize,
    /// Each length is uniform in `[len·(1−r), len·(1+r)]`.
    pub range_ratio: f64,
    /// Tokens of one random prefix shared by every prompt.
    pub prefix_len: usize,
}

/// Integers uniform in `[floor(len·(1−r)), ceil(len·(1+r))]`, at least `min`.
fn length_range(len: usize, ratio: f64, min: usize) -> (usize, usize) {
    let lo = ((len as f64) * (1.0 - ratio)).floor() as usize;
    let hi = ((len as f64) * (1.0 + ratio)).ceil() as usize;
    (lo.max(min), hi.max(min))
}

/// vLLM's `random` dataset: each prompt is a shared random prefix then a run of consecutive
/// ordinary token ids from a random offset, fitted to its sampled length.
pub fn random(
    tok: &PromptTokenizer,
    n: usize,
    lengths: RandomLengths,
    rng: &mut impl Rng,
) -> Result<Vec<SampleRequest>> {
    if !(0.0..1.0).contains(&lengths.range_ratio) {
        bail!(
            "--random-range-ratio {} must be in [0, 1)",
            lengths.range_ratio
        );
    }
    let real_input_len = lengths.input_len.saturating_sub(tok.special_tokens_to_add);
    let (in_lo, in_hi) = length_range(real_input_len, lengths.range_ratio, 0);
    let (out_lo, out_hi) = length_range(lengths.output_len, lengths.range_ratio, 1);
    if lengths.prefix_len + in_lo < 1 {
        bail!(
            "--random-input-len {} is too small for a prompt of at least one token; raise it \
             or --random-prefix-len",
            lengths.input_len
        );
    }
    let input_lens: Vec<usize> = (0..n).map(|_| rng.random_range(in_lo..=in_hi)).collect();
    let output_lens: Vec<usize> = (0..n).map(|_| rng.random_range(out_lo..=out_hi)).collect();
    let vocab = tok.allowed.len();
    let offsets: Vec<usize> = (0..n).map(|_| rng.random_range(0..vocab)).collect();
    let prefix = tok.random_tokens(lengths.prefix_len, rng);
    (0..n)
        .map(|i| {
            let mut tokens = prefix.clone();
            tokens.extend((0..input_lens[i]).map(|k| tok.allowed[(offsets[i] + i + k) % vocab]));
            let (prompt, ids) =
                tok.decode_to_len(tokens, lengths.prefix_len + input_lens[i], rng)?;
            Ok(SampleRequest {
                prompt,
                prompt_len: ids.len(),
                output_len: output_lens[i],
            })
        })
        .collect()
}

/// Sizes of the `prefix_repetition` dataset.
#[derive(Debug, Clone, Copy)]
pub struct PrefixRepetition {
    pub prefix_len: usize,
    pub suffix_len: usize,
    pub num_prefixes: usize,
    pub output_len: usize,
}

/// vLLM's `prefix_repetition` dataset: `num_prefixes` random prefixes, each followed by
/// `n / num_prefixes` random suffixes, shuffled. Tokens are drawn from the ordinary vocabulary
/// (vLLM draws from all of it, specials included, which a server would then parse as specials).
pub fn prefix_repetition(
    tok: &PromptTokenizer,
    n: usize,
    sizes: PrefixRepetition,
    rng: &mut impl Rng,
) -> Result<Vec<SampleRequest>> {
    let per_prefix = n.checked_div(sizes.num_prefixes).unwrap_or(0);
    if per_prefix == 0 {
        bail!(
            "--num-prompts {n} must be at least --prefix-repetition-num-prefixes {}",
            sizes.num_prefixes
        );
    }
    let mut requests = Vec::with_capacity(per_prefix * sizes.num_prefixes);
    for _ in 0..sizes.num_prefixes {
        let (_, prefix) = tok.decode_to_len(
            tok.random_tokens(sizes.prefix_len, rng),
            sizes.prefix_len,
            rng,
        )?;
        for _ in 0..per_prefix {
            let (_, suffix) = tok.decode_to_len(
                tok.random_tokens(sizes.suffix_len, rng),
                sizes.suffix_len,
                rng,
            )?;
            let tokens: Vec<u32> = prefix.iter().chain(&suffix).copied().collect();
            requests.push(SampleRequest {
                prompt: tok.decode(&tokens)?,
                prompt_len: tokens.len(),
                output_len: sizes.output_len,
            });
        }
    }
    requests.shuffle(rng);
    Ok(requests)
}

/// vLLM's `sharegpt` dataset: the first human turn of shuffled conversations with at least two
/// turns, asking for as many tokens as the recorded answer (or `output_len`), skipping prompts
/// under 4 or over 1024 tokens, answers under 4, and pairs over 2048; repeats samples when the
/// file has too few.
pub fn sharegpt(
    path: &Path,
    tok: &PromptTokenizer,
    n: usize,
    output_len: Option<usize>,
    rng: &mut impl Rng,
) -> Result<Vec<SampleRequest>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --dataset-path {}", path.display()))?;
    let entries: Vec<serde_json::Value> = serde_json::from_str(&text).with_context(|| {
        format!(
            "--dataset-path {} is not a ShareGPT JSON list of {{\"conversations\": [...]}}",
            path.display()
        )
    })?;
    let mut pairs: Vec<(String, String)> = entries
        .iter()
        .filter_map(|e| {
            let turns = e["conversations"].as_array()?;
            let value = |i: usize| turns.get(i)?["value"].as_str().map(str::to_string);
            Some((value(0)?, value(1)?))
        })
        .collect();
    pairs.shuffle(rng);
    let mut requests = Vec::new();
    for (prompt, answer) in pairs {
        if requests.len() >= n {
            break;
        }
        let prompt_len = tok.encode(&prompt)?.len();
        let out = match output_len {
            Some(len) => len,
            None => tok.encode(&answer)?.len(),
        };
        let too_short = prompt_len < 4 || (output_len.is_none() && out < 4);
        if too_short || prompt_len > 1024 || prompt_len + out > 2048 {
            continue;
        }
        requests.push(SampleRequest {
            prompt,
            prompt_len,
            output_len: out,
        });
    }
    if requests.is_empty() {
        bail!(
            "--dataset-path {} has no usable conversations (two turns, prompt of 4 to 1024 tokens)",
            path.display()
        );
    }
    oversample(&mut requests, n, rng);
    Ok(requests)
}

/// The `custom` dataset: `prompts` in order, repeated to `n`, each asking for `output_len`.
/// Without a tokenizer the prompt lengths are 0 until the server's usage reports them.
pub fn custom(
    prompts: &[String],
    tok: Option<&PromptTokenizer>,
    n: usize,
    output_len: usize,
) -> Result<Vec<SampleRequest>> {
    if prompts.is_empty() {
        bail!("the custom dataset has no prompts; pass --prompt or a --dataset-path with lines");
    }
    prompts
        .iter()
        .cycle()
        .take(n)
        .map(|prompt| {
            let prompt_len = match tok {
                Some(tok) => tok.encode(prompt)?.len(),
                None => 0,
            };
            Ok(SampleRequest {
                prompt: prompt.clone(),
                prompt_len,
                output_len,
            })
        })
        .collect()
}

/// Prompts of a custom file: JSON lines with a `"prompt"` field (vLLM's format), else one
/// prompt per non-empty line.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --dataset-path {}", path.display()))?;
    let lines = text.lines().filter(|l| !l.trim().is_empty());
    Ok(lines
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["prompt"].as_str().map(str::to_string))
                .unwrap_or_else(|| line.to_string())
        })
        .collect())
}

/// Repeats random members of `requests` until there are `n`.
fn oversample(requests: &mut Vec<SampleRequest>, n: usize, rng: &mut impl Rng) {
    let original = requests.clone();
    while requests.len() < n {
        if let Some(r) = original.choose(rng) {
            requests.push(r.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn demo_tokenizer() -> PromptTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/qwen3-moe-tiny");
        PromptTokenizer::from_path(&dir).unwrap()
    }

    #[test]
    fn lengths_follow_vllm_bounds() {
        assert_eq!(length_range(100, 0.25, 0), (75, 125));
        assert_eq!(length_range(10, 0.33, 0), (6, 14));
        assert_eq!(length_range(1, 0.5, 1), (1, 2));
        assert_eq!(length_range(0, 0.0, 1), (1, 1));
    }

    #[test]
    fn random_prompts_have_the_asked_token_counts_and_no_specials() {
        let tok = demo_tokenizer();
        let lengths = RandomLengths {
            input_len: 32,
            output_len: 16,
            range_ratio: 0.0,
            prefix_len: 0,
        };
        let reqs = random(&tok, 20, lengths, &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(reqs.len(), 20);
        for r in &reqs {
            assert_eq!(r.output_len, 16);
            let ids = tok.encode(&r.prompt).unwrap();
            assert_eq!(ids.len(), r.prompt_len);
            assert!((30..=34).contains(&r.prompt_len), "{}", r.prompt_len);
            assert!(ids.iter().all(|id| tok.allowed.contains(id)));
        }
        let again = random(&tok, 20, lengths, &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(reqs, again, "the same seed gives the same prompts");
    }

    #[test]
    fn random_ranges_and_shared_prefixes() {
        let tok = demo_tokenizer();
        let lengths = RandomLengths {
            input_len: 40,
            output_len: 20,
            range_ratio: 0.5,
            prefix_len: 8,
        };
        let reqs = random(&tok, 50, lengths, &mut StdRng::seed_from_u64(1)).unwrap();
        assert!(reqs.iter().all(|r| (10..=30).contains(&r.output_len)));
        assert!(reqs.iter().any(|r| r.output_len != reqs[0].output_len));
        assert!(reqs
            .iter()
            .all(|r| r.prompt_len >= 8 + 20 - 2 && r.prompt_len <= 8 + 60 + 2));
        let head = |r: &SampleRequest| tok.encode(&r.prompt).unwrap()[..6].to_vec();
        assert!(
            reqs.iter().all(|r| head(r) == head(&reqs[0])),
            "one shared prefix"
        );
        let bad = RandomLengths {
            range_ratio: 1.0,
            ..lengths
        };
        assert!(random(&tok, 1, bad, &mut StdRng::seed_from_u64(1)).is_err());
    }

    #[test]
    fn prefix_repetition_shares_each_prefix_among_its_prompts() {
        let tok = demo_tokenizer();
        let sizes = PrefixRepetition {
            prefix_len: 16,
            suffix_len: 8,
            num_prefixes: 2,
            output_len: 5,
        };
        let reqs = prefix_repetition(&tok, 6, sizes, &mut StdRng::seed_from_u64(2)).unwrap();
        assert_eq!(reqs.len(), 6);
        let mut prefixes: Vec<Vec<u32>> = reqs
            .iter()
            .map(|r| tok.encode(&r.prompt).unwrap()[..12].to_vec())
            .collect();
        prefixes.sort();
        prefixes.dedup();
        assert_eq!(prefixes.len(), 2, "two distinct prefixes");
        assert!(reqs.iter().all(|r| r.output_len == 5 && r.prompt_len == 24));
        assert!(prefix_repetition(&tok, 1, sizes, &mut StdRng::seed_from_u64(2)).is_err());
    }

    #[test]
    fn custom_prompts_cycle_and_read_from_lines_or_jsonl() {
        let dir = std::env::temp_dir().join(format!("ember-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("prompts.jsonl");
        std::fs::write(&file, "{\"prompt\": \"Hello\"}\n\nplain line\n").unwrap();
        let prompts = read_prompts(&file).unwrap();
        assert_eq!(prompts, ["Hello", "plain line"]);
        let reqs = custom(&prompts, None, 3, 7).unwrap();
        let texts: Vec<&str> = reqs.iter().map(|r| r.prompt.as_str()).collect();
        assert_eq!(texts, ["Hello", "plain line", "Hello"]);
        assert!(reqs.iter().all(|r| r.output_len == 7 && r.prompt_len == 0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sharegpt_takes_first_turns_filters_and_oversamples() {
        let dir = std::env::temp_dir().join(format!("ember-bench-sg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sharegpt.json");
        let long = "the license of the software is ".repeat(3);
        let data = serde_json::json!([
            {"conversations": [{"from": "human", "value": long}, {"from": "gpt", "value": long}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": long}]},
            {"conversations": [{"from": "human", "value": long}]},
        ]);
        std::fs::write(&file, data.to_string()).unwrap();
        let tok = demo_tokenizer();
        let reqs = sharegpt(&file, &tok, 3, None, &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(reqs.len(), 3);
        let want = tok.encode(&long).unwrap().len();
        assert!(reqs
            .iter()
            .all(|r| r.prompt == long && r.prompt_len == want && r.output_len == want));
        let fixed = sharegpt(&file, &tok, 1, Some(3), &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(fixed[0].output_len, 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
