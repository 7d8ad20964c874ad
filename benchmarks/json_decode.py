"""What holding an answer to JSON costs per token, on any LLM folder, on whatever device MLX has (the CPU here, the
GPU on the lent machine):

    python -m benchmarks.json_decode FOLDER [--tokens 64] [--rounds 3] [--out FILE.json]

Three ways, greedy, rounds alternating, medians of ms per generated token (the first token's prefill left out):
- free: the plain loop;
- any object: held to JSON; a random-weight model's draws are nearly all refused, so this is the refused-draw
  regime (no guessing ahead: each draw is checked, then masked and drawn again);
- a string field: held to {"text": <string>}; once inside the string nearly every draw is allowed, so this is
  the regime of a trained model's draws, where the generator guesses ahead (docs/models/llm.md).
The model needs no chat template (the prompt is token ids).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import mlxrunner  # noqa: F401  (before mlx: the CPU's BLAS routing)
from mlxrunner.request import Options
from mlxrunner.text.json_schema import compile_schema

STRING_FIELD = {"type": "object", "additionalProperties": False, "required": ["text"],
                "properties": {"text": {"type": "string"}}}


def ms_per_token(model, tokens: int, way: str) -> float:
    held = {"free": {}, "any object": {"json_output": True},
            "a string field": {"json_schema": compile_schema(STRING_FIELD)}}[way]
    final = None
    prompt = [(17 * i + 3) % 499 for i in range(32)]
    for item in model.stream(prompt, Options(temperature=0, repeat_penalty=1.0, num_predict=tokens), **held):
        if hasattr(item, "eval_duration"):
            final = item
    return final.eval_duration / 1e6 / max(1, final.eval_count - 1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.json_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from mlxrunner import backend
    from mlxrunner.llm import load

    model = load(args.folder)
    ways = ("free", "any object", "a string field")
    for way in ways:  # warm-up: kernels, the vocabulary's bytes
        ms_per_token(model, 8, way)
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(args.rounds):
        for way in ways:
            times[way].append(ms_per_token(model, args.tokens, way))
    result = {"device": backend.detect().summary(), "folder": args.folder, "tokens": args.tokens,
              "ms_per_token": {way: statistics.median(t) for way, t in times.items()}}
    free = result["ms_per_token"]["free"]
    for way in ways:
        print(f"{way:15s} {result['ms_per_token'][way]:8.2f} ms/token  {result['ms_per_token'][way] / free:5.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
