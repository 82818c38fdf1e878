#!/usr/bin/env python3
"""Build ember's tiny Qwen3-Embedding fixture (deterministic, offline): models/qwen3-embedding-tiny/.

The shapes and tokenizer of qwen3-tiny (run make_tiny_models.py first), laid out as Qwen/Qwen3-Embedding-0.6B is on
the Hub:
  config.json                      `architectures: ["Qwen3ForCausalLM"]`, older Hub key spelling (rope_theta,
                                   torch_dtype), eos/bos = <|endoftext|>, tied embeddings
  model.safetensors                saved from Qwen3Model: keys WITHOUT the `model.` prefix (`embed_tokens.weight`,
                                   `layers.0...`, `norm.weight`) and no lm_head
  modules.json                     sentence-transformers: Transformer -> 1_Pooling -> 2_Normalize
  1_Pooling/config.json            pooling_mode_lasttoken
  config_sentence_transformers.json  the query / document prompts, cosine similarity
  tokenizer.json                   qwen3-tiny's, with a TemplateProcessing post-processor that appends <|endoftext|>
  tokenizer_config.json            Qwen2Tokenizer, padding_side "left"
  reference.json                   float32 transformers embeddings (AutoModel, last token after the final norm, L2
                                   normalised, exactly as the Qwen3-Embedding model card computes them)

Usage:  /work/venv/bin/python models/make_tiny_qwen3_embedding.py
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_tiny_deepseek as ds  # noqa: E402
import make_tiny_models as mt  # noqa: E402

NAME = "qwen3-embedding-tiny"
OUT = HERE / NAME
BASE = HERE / "qwen3-tiny"
SEED = 5001
BATCH_TOL = 1e-5                 # left-padded batch (the model card's way) vs each input alone, max abs difference
QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
# Texts of different lengths (1 to ~180 tokens before the appended <|endoftext|>), plus an instructed query.
TEXTS = mt.PROMPTS + [QUERY_PROMPT + "What does the license permit?"]
DIMENSIONS = [(2, 16), (4, 40)]  # (input index, dimensions): Matryoshka truncation then re-normalisation

README_BEGIN = "<!-- make_tiny_qwen3_embedding.py: begin -->"
README_END = "<!-- make_tiny_qwen3_embedding.py: end -->"


def hub_config(ids, vocab_size):
    """config.json in the spelling of Qwen/Qwen3-Embedding-0.6B's (saved by transformers 4.51)."""
    import transformers
    return dict(mt.COMMON_SHAPES, **{
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|endoftext|>"],
        "hidden_act": "silu",
        "initializer_range": mt.INIT_STD,
        "max_window_layers": mt.COMMON_SHAPES["num_hidden_layers"],
        "model_type": "qwen3",
        "rope_scaling": None,
        "rope_theta": mt.ROPE_THETA,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": transformers.__version__,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    })


def write_tokenizer(ids):
    """qwen3-tiny's tokenizer; the post-processor appends <|endoftext|> as Qwen3-Embedding's does."""
    tj = json.loads((BASE / "tokenizer.json").read_text(encoding="utf-8"))
    eot = "<|endoftext|>"
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": eot, "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": eot, "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": eot, "type_id": 1}}],
        "special_tokens": {eot: {"id": eot, "ids": [ids[eot]], "tokens": [eot]}},
    }
    mt.write_json(OUT / "tokenizer.json", tj)
    cfg = mt.tokenizer_config(ids, with_template=True)
    cfg["padding_side"] = "left"
    mt.write_json(OUT / "tokenizer_config.json", cfg)


def write_sentence_transformers_files(hidden):
    import transformers
    mt.write_json(OUT / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    (OUT / "1_Pooling").mkdir(exist_ok=True)
    mt.write_json(OUT / "1_Pooling" / "config.json", {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True,
        "include_prompt": True,
    })
    mt.write_json(OUT / "config_sentence_transformers.json", {
        "prompts": {"query": QUERY_PROMPT, "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
        "__version__": {"transformers": transformers.__version__, "pytorch": torch.__version__},
    })


def build_weights(cfg_json):
    """Seeded Qwen3Model, parameters rounded to bf16, saved with Qwen3Model's own (prefix-less) keys."""
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3Model
    cfg = Qwen3Config(**{k: v for k, v in cfg_json.items() if k not in ("architectures", "transformers_version")})
    torch.manual_seed(SEED)
    model = Qwen3Model._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(SEED)
    tok_size = mt.TOKENIZER_TOTAL
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            std_normal = torch.randn(p.shape, generator=gen)
            v = 1.0 + mt.NORM_STD * std_normal if name.endswith("norm.weight") else mt.INIT_STD * std_normal
            p.copy_(v.to(torch.bfloat16).to(torch.float32))
        model.embed_tokens.weight[tok_size:] = 0
    sd = {k: t.detach().to(torch.bfloat16).contiguous().clone() for k, t in model.state_dict().items()}
    assert "embed_tokens.weight" in sd and not any(k.startswith("model.") or k.startswith("lm_head") for k in sd)
    save_file(sd, str(OUT / "model.safetensors"), metadata={"format": "pt"})


def last_token_pool(last_hidden_states, attention_mask):
    """The Qwen3-Embedding model card's pooling."""
    left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
    if left_padding:
        return last_hidden_states[:, -1]
    lengths = attention_mask.sum(dim=1) - 1
    return last_hidden_states[torch.arange(last_hidden_states.shape[0]), lengths]


@torch.no_grad()
def embed_ids(model, ids):
    """Unnormalised last-token hidden state of one token sequence."""
    out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out.last_hidden_state[0, -1].float()


def write_readme_section(versions, ref):
    lengths = [len(e["token_ids"]) for e in ref["inputs"]]
    files = "\n".join(f"| `{NAME}/{p.relative_to(OUT)}` | {p.stat().st_size:,} |"
                      for p in sorted(OUT.rglob("*")) if p.is_file())
    text = f"""{README_BEGIN}
## Qwen3-Embedding checkpoint (`make_tiny_qwen3_embedding.py`)

`qwen3-embedding-tiny`: the dense shapes and tokenizer of `qwen3-tiny` (own weights, seed {SEED}), laid out as
`Qwen/Qwen3-Embedding-0.6B` is on the Hub, for the `/v1/embeddings` tests. Run after `make_tiny_models.py`:

```sh
/work/venv/bin/python models/make_tiny_qwen3_embedding.py
```

Generated with transformers {versions['transformers']}, torch {versions['torch']}.

* `config.json`: `architectures: ["Qwen3ForCausalLM"]` (as the Hub's), older key spelling (`rope_theta`,
  `torch_dtype`), `bos_token_id` = `eos_token_id` = `<|endoftext|>`, `tie_word_embeddings: true`.
* `model.safetensors` was saved from `Qwen3Model`: keys have **no `model.` prefix** (`embed_tokens.weight`,
  `layers.N.*`, `norm.weight`) and there is no `lm_head`.
* sentence-transformers files: `modules.json` (Transformer, `1_Pooling`, `2_Normalize`),
  `1_Pooling/config.json` with `pooling_mode_lasttoken: true`, `config_sentence_transformers.json` (query prompt).
* `tokenizer.json`: `qwen3-tiny`'s with a `TemplateProcessing` post-processor that appends `<|endoftext|>`
  ({ref['special_token_ids']['<|endoftext|>']}) to every encoding with special tokens, as Qwen3-Embedding's does;
  `tokenizer_config.json` has `padding_side: "left"`.

`reference.json`, computed from the saved files with `AutoModel.from_pretrained(dir, dtype=float32,
attn_implementation="eager")` exactly as the model card does: tokenize with special tokens (so `<|endoftext|>` ends
every input), take the last token's hidden state after the final norm, L2-normalise.

```
model, dtype ("float32"), transformers_version, torch_version, hidden_size, special_token_ids,
inputs[]:       text, token_ids (tokenizer(text), <|endoftext|> appended), embedding (normalised, hidden_size floats)
token_inputs[]: token_ids (given as ids, used as they are: no <|endoftext|> appended), embedding
dimensions[]:   input (index into inputs), dimensions, embedding (first `dimensions` values of the raw last-token
                state, re-normalised)
batch_max_abs_diff  # the left-padded batch of all inputs (the model card's way) vs each input alone
```

Input token lengths: {lengths}; batch vs alone max abs difference {ref['batch_max_abs_diff']:.2e}.

| file | bytes |
|---|---|
{files}
{README_END}
"""
    ds.replace_readme_section(README_BEGIN, README_END, text)


def main():
    import transformers
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    versions = dict(transformers=transformers.__version__, torch=torch.__version__)
    base_ref = json.loads((BASE / "reference.json").read_text(encoding="utf-8"))
    ids = base_ref["special_token_ids"]
    base_cfg = json.loads((BASE / "config.json").read_text(encoding="utf-8"))
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    cfg_json = hub_config(ids, base_cfg["vocab_size"])
    mt.write_json(OUT / "config.json", cfg_json)
    write_tokenizer(ids)
    write_sentence_transformers_files(cfg_json["hidden_size"])
    build_weights(cfg_json)

    tok = AutoTokenizer.from_pretrained(str(OUT))
    assert tok.padding_side == "left" and tok.pad_token == "<|endoftext|>"
    model, info = AutoModel.from_pretrained(str(OUT), dtype=torch.float32, attn_implementation="eager",
                                            output_loading_info=True)
    model.eval()
    assert type(model).__name__ == "Qwen3Model", type(model)
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
    assert not bad and not info.get("error_msgs"), f"loading info: {info}"

    # As the model card: one left-padded batch, last token pooled, normalised.
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    batched = F.normalize(last_token_pool(out.last_hidden_state, batch["attention_mask"]), p=2, dim=1)

    inputs, raw = [], []
    for i, text in enumerate(TEXTS):
        tid = tok(text)["input_ids"]
        assert tid[-1] == ids["<|endoftext|>"] and tid[:-1] == tok(text, add_special_tokens=False)["input_ids"]
        h = embed_ids(model, tid)
        raw.append(h)
        inputs.append({"text": text, "token_ids": tid, "embedding": F.normalize(h, dim=0).tolist()})
    alone = torch.tensor([e["embedding"] for e in inputs])
    batch_diff = float((alone - batched).abs().max())
    assert batch_diff < BATCH_TOL, f"batched and single embeddings differ by {batch_diff}"

    token_inputs = []
    for tid in ([7, 300, 1200, 45, 999], inputs[3]["token_ids"][:-1]):
        token_inputs.append({"token_ids": tid, "embedding": F.normalize(embed_ids(model, tid), dim=0).tolist()})
    dims = [{"input": i, "dimensions": d, "embedding": F.normalize(raw[i][:d], dim=0).tolist()}
            for i, d in DIMENSIONS]

    ref = {
        "model": NAME,
        "dtype": "float32",
        "transformers_version": versions["transformers"],
        "torch_version": versions["torch"],
        "hidden_size": cfg_json["hidden_size"],
        "special_token_ids": ids,
        "inputs": inputs,
        "token_inputs": token_inputs,
        "dimensions": dims,
        "batch_max_abs_diff": batch_diff,
    }
    mt.write_json(OUT / "reference.json", ref, indent=1)
    write_readme_section(versions, ref)
    mt.log(f"wrote {OUT}: token lengths {[len(e['token_ids']) for e in inputs]}, batch diff {batch_diff:.2e}")


if __name__ == "__main__":
    main()
