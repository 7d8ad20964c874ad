"""`mlxrunner embed --model NAME TEXT...`: embed texts and print the vectors' cosine similarities.

The texts come as arguments, as repeated `-p/--prompt` (the prompt flag every command takes), from a file
(--input-file, a text per line), or, when none of those is given and stdin is not a terminal, from stdin.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np

from mlxrunner.cli.common import add_model_flags, fail, load_with_bar, settings_from
from mlxrunner.detect import Mode
from mlxrunner.models import Embedder
from mlxrunner.progress import ProgressBar

log = logging.getLogger("mlxrunner")

BATCH = 64  # texts per embed call: the progress bar moves between batches


def embed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxrunner embed", allow_abbrev=False,
                                     description="Embed texts and print the vectors' cosine similarities.")
    add_model_flags(parser)
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed")
    parser.add_argument("--prompt", "-p", action="append", default=[], metavar="TEXT",
                        help="a text to embed, after the TEXT arguments (repeatable)")
    parser.add_argument("--input-file", help="embed each line of this file ('-' = stdin; without TEXT, --prompt "
                        "or --input-file, stdin is read when it is not a terminal)")
    parser.add_argument("--json", action="store_true", help="print {\"embeddings\": [[...]]} as JSON")
    parser.add_argument("--no-normalize", action="store_true", help="skip the model's L2 normalisation")
    return parser


def main(argv: list[str]) -> int:
    parser = embed_parser()
    args = parser.parse_args(argv)
    texts = [*args.texts, *args.prompt]
    input_file = args.input_file or ("-" if not texts and not sys.stdin.isatty() else None)
    if input_file:
        stream = sys.stdin if input_file == "-" else open(input_file, encoding="utf-8")
        with stream:
            texts += [line.rstrip("\n") for line in stream]
    if not texts:
        parser.error("nothing to embed: give TEXT arguments, --prompt TEXT, --input-file, or pipe lines on stdin")
    settings = settings_from(args, parser)

    try:
        loaded = load_with_bar(settings)
        if loaded.mode is not Mode.EMBEDDING:
            return fail(f"{settings.model} is a {loaded.mode.value} model, not an embedding model")
        vectors = embed_with_progress(loaded.embedder, texts, normalize=False if args.no_normalize else None)
    except Exception as exc:
        log.debug("embed failed", exc_info=True)
        return fail(str(exc))
    if args.json:
        print(json.dumps({"embeddings": vectors.tolist()}))
    else:
        print_similarities(texts, vectors)
    return 0


def embed_with_progress(model: Embedder, texts: list[str], normalize: bool | None) -> np.ndarray:
    parts = []
    with ProgressBar("embedding", total=len(texts)) as bar:
        for start in range(0, len(texts), BATCH):
            parts.append(model.embed(texts[start:start + BATCH], normalize=normalize).vectors)
            bar.update(min(len(texts), start + BATCH))
    return np.concatenate(parts)


def print_similarities(texts: list[str], vectors: np.ndarray) -> None:
    norms = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    unit = vectors / norms
    print(f"{len(texts)} embeddings of {vectors.shape[1]} dimensions")
    for i, text in enumerate(texts):
        head = ", ".join(f"{x:+.4f}" for x in vectors[i, :4])
        print(f"[{i}] [{head}, ...]  {text[:60]!r}")
    if len(texts) > 1:
        print("cosine similarity:")
        sims = unit @ unit.T
        for i in range(len(texts)):
            print(f"[{i}] " + " ".join(f"{s:+.3f}" for s in sims[i]))
