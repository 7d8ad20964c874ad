"""`mlxrunner generate` against `mlx_lm.generate`, as the commands a person types, in the same run.

    HF_HUB_OFFLINE=1 .bench/bin/python -m benchmarks.cpu.cli_llm [--pairs N] [--big] [--bf16] [--quantized]

Both commands get the same model folder, the same raw prompt (no chat template: the benchmark models have
none), greedy decoding with no penalty, the same number of tokens. Each pair runs both commands, the one that
goes first alternating, and records the command's wall time (process start, imports, load, prefill, decode,
exit: what a person waits for) and the prompt and generation speeds each command prints about itself. The
peer runs as `python -c "import mlxrunner; mlx_lm.generate.main()"` so that its MLX gets the same OpenBLAS
(see benchmarks/README.md). The two texts must be the same (mlx-lm's detokenizer drops the answer's leading
space: compared without it), so a fast but wrong command fails.

Models: the tiny fixture (1000 tokens from a prompt whose greedy reply has no end of sequence); with --big the
Qwen3-0.6B-shaped float32 model of llm_models.py (32 tokens); with --bf16 the same shape in bfloat16, as
checkpoints are published (32 tokens; texts compared, not asserted: the two sides' bf16 products round differently);
with --quantized that shape's 4- and 8-bit folders
made by mlx-lm's converter (64 tokens; what the two print is compared, not asserted equal: on random weights the
two products' different summation orders may pick different tokens at near-ties).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from benchmarks.cpu.llm_models import TINY, quantized_06b, qwen3_06b

PEER = "import mlxrunner, sys; from mlx_lm.generate import main; sys.argv[0] = 'mlx_lm.generate'; main()"
OURS_STATS = re.compile(r"prompt: (\d+) tokens, ([\d.]+) tokens/s \| generation: (\d+) tokens, ([\d.]+) tokens/s \| "
                        r"peak memory: ([\d.]+) GB")
PEER_STATS = re.compile(r"Prompt: (\d+) tokens, ([\d.]+) tokens-per-sec\nGeneration: (\d+) tokens, ([\d.]+) "
                        r"tokens-per-sec\nPeak memory: ([\d.]+) GB")
PROMPT = "hello world"


@dataclass
class Run:
    seconds: float
    text: str
    prompt_tokens: int
    prompt_rate: float
    tokens: int
    rate: float
    peak_gb: float


def ours(model: str, tokens: int) -> Run:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mlxrunner", "generate", "--model", model, "--raw", PROMPT,
                           "-n", str(tokens), "--temperature", "0", "--repeat-penalty", "1", "--log-level", "error"],
                          capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    stats = OURS_STATS.search(done.stderr)
    assert stats, done.stderr
    return Run(seconds, done.stdout.removesuffix("\n"), int(stats[1]), float(stats[2]), int(stats[3]),
               float(stats[4]), float(stats[5]))


def peer(model: str, tokens: int) -> Run:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEER, "--model", model, "--prompt", PROMPT, "--max-tokens",
                           str(tokens), "--temp", "0", "--ignore-chat-template"],
                          capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    stats = PEER_STATS.search(done.stdout)
    assert stats, done.stdout + done.stderr
    text = done.stdout.split("==========\n", 1)[1].rsplit("\n==========", 1)[0]
    return Run(seconds, text, int(stats[1]), float(stats[2]), int(stats[3]), float(stats[4]), float(stats[5]))


def compare(name: str, model: str, tokens: int, pairs: int, same_text: bool = True) -> None:
    runs: dict[str, list[Run]] = {"ours": [], "mlx-lm": []}
    for i in range(pairs):
        order = [("ours", ours), ("mlx-lm", peer)]
        for side, command in order if i % 2 == 0 else order[::-1]:
            runs[side].append(command(model, tokens))
    mine, theirs = runs["ours"][0], runs["mlx-lm"][0]
    equal = mine.text.removeprefix(" ") == theirs.text
    assert equal or not same_text, f"{name}: the two commands wrote different texts"
    assert (mine.prompt_tokens, mine.tokens) == (theirs.prompt_tokens, theirs.tokens), name
    print(f"\n{name}: prompt {mine.prompt_tokens} tokens, {mine.tokens} generated, {pairs} pairs, "
          f"texts {'equal' if equal else 'different'} ({len(theirs.text)} characters)")
    print(f"{'measure':<28} {'ours':>10} {'mlx-lm':>10} {'ours/peer':>10}")
    rows = [("command wall time, s", "seconds", False), ("prompt, tokens/s (own)", "prompt_rate", True),
            ("generation, tokens/s (own)", "rate", True), ("peak memory, GB (own)", "peak_gb", False)]
    for label, field, higher_is_better in rows:
        a = statistics.median(getattr(r, field) for r in runs["ours"])
        b = statistics.median(getattr(r, field) for r in runs["mlx-lm"])
        ratio = (a / b if higher_is_better else b / a) if a and b else float("nan")
        print(f"{label:<28} {a:>10.3f} {b:>10.3f} {ratio:>9.2f}x")
    print("(ours/peer > 1: ours is faster, or uses less memory; medians over the pairs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--big", action="store_true", help="also the Qwen3-0.6B-shaped float32 model (2.4 GB)")
    parser.add_argument("--bf16", action="store_true", help="also that shape in bfloat16 (1.2 GB)")
    parser.add_argument("--quantized", action="store_true", help="also that shape at 4 and 8 bits (mlx-lm's)")
    args = parser.parse_args()
    compare("tiny (qwen3-tiny, float32)", str(TINY), 1000, args.pairs)
    if args.big:
        compare("Qwen3-0.6B-shaped, float32", str(qwen3_06b("float32")), 32, max(1, args.pairs // 2))
    if args.bf16:
        compare("Qwen3-0.6B-shaped, bfloat16", str(qwen3_06b("bfloat16")), 32, max(1, args.pairs // 2),
                same_text=False)
    if args.quantized:
        for bits in (4, 8):
            compare(f"Qwen3-0.6B-shaped, {bits}-bit (mlx-lm's converter)", str(quantized_06b(bits)), 64, args.pairs,
                    same_text=False)


if __name__ == "__main__":
    main()
