"""The prompt cache on one GPU: a 3,000-token prompt, then the same prompt + a follow-up, ours against mlx-lm's
server cache, same weights, same MLX, same run.

    python -m benchmarks.gpu.prompt_cache_bench --models-dir DIR --out FILE.json \\
        [--only qwen3-4b | tiny] [--folder PATH] [--prompt 3000] [--follow-up 64] [--rounds 5]

1. Builds the missing random-weight bf16 folder (benchmarks.gpu.llm_shapes, in a subprocess, as llm_bench
   does), or takes `--folder` as it is (a CPU check: `--folder tests/fixtures/llm/qwen3-tiny`).
2. Loads both sides (benchmarks/prompt_cache_sides.py): ours is `LanguageModel.stream` with its prompt
   cache; mlx-lm is its server's `LRUPromptCache` around `generate_step`. Prompt ids (17*i+3) % 499.
3. One warm-up pair per side and a cold run of the second prompt (its first token is the reference), then
   `--rounds` rounds, the sides alternating: clear the cache, time the first request (the prompt, one greedy
   token), time the second (prompt + follow-up, one greedy token). Each second request must report the
   prompt's tokens as cached and give the reference token.
4. Reports per side the medians of both times and of the rounds' second / first (the issue's goal for ours:
   <= 0.1), and the fastest second over the fastest first.

Writes the JSON and prints a markdown table.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.gpu.llm_bench import build, device, versions  # noqa: E402
from benchmarks.gpu.llm_shapes import SHAPES  # noqa: E402


def measure(folder: Path, prompt_tokens: int, follow_up: int, rounds: int) -> dict:
    from benchmarks.prompt_cache_sides import SIDES, prompt, side

    first_ids = prompt(prompt_tokens)
    second_ids = first_ids + prompt(follow_up, salt=7)
    sides, reference = {}, {}
    for name in SIDES:
        s = side(name, folder)
        s.request(first_ids)
        s.request(second_ids)  # warm-up of both shapes
        s.clear()
        reference[name] = s.request(second_ids)[1]
        sides[name] = s
    seconds: dict[str, dict[str, list[float]]] = {name: {"first": [], "second": [], "ratio": []} for name in SIDES}
    for i in range(rounds):
        for name in SIDES if i % 2 == 0 else SIDES[::-1]:
            s = sides[name]
            s.clear()
            first, _, cached = s.request(first_ids)
            assert cached == 0, (name, cached)
            second, token, cached = s.request(second_ids)
            assert cached == prompt_tokens, f"{name}: {cached} cached tokens, expected {prompt_tokens}"
            assert token == reference[name], f"{name}: a cache hit changed the first token"
            seconds[name]["first"].append(first)
            seconds[name]["second"].append(second)
            seconds[name]["ratio"].append(second / first)
    return {name: {"first_ms": statistics.median(v["first"]) * 1e3, "second_ms": statistics.median(v["second"]) * 1e3,
                   "second_over_first": statistics.median(v["ratio"]),
                   "best_over_best": min(v["second"]) / min(v["first"]), "rounds": rounds, "raw_s": v}
            for name, v in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "mlxrunner-bench")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--only", default="qwen3-4b", help=f"one of: {', '.join(SHAPES)} (default qwen3-4b)")
    parser.add_argument("--folder", type=Path, help="an existing model folder instead of a built shape")
    parser.add_argument("--prompt", type=int, default=3000)
    parser.add_argument("--follow-up", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.folder is None and args.only not in SHAPES:
        parser.error(f"unknown model {args.only!r}; known: {', '.join(SHAPES)}")
    folder = args.folder
    report: dict = {"settings": {"prompt": args.prompt, "follow_up": args.follow_up, "rounds": args.rounds}}
    if folder is None:
        folder = args.models_dir / args.only
        report["build"] = build(args.only, folder)

    import mlxrunner  # noqa: F401, I001  (before mlx.core, as the other benchmarks do)
    import mlx.core as mx

    report["model"] = str(folder)
    report["versions"] = versions(mx)
    report["device"] = device(mx)
    report["sides"] = measure(folder, args.prompt, args.follow_up, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nprompt cache, {folder.name}: {args.prompt}-token prompt, then it + {args.follow_up} "
          f"({report['device'].get('nvidia_smi', report['device']['default_device'])}; "
          f"host {report['device']['host_cpu']})\n")
    print("| side | first request ms | second request ms | second / first | best / best |")
    print("|---|---:|---:|---:|---:|")
    for name, row in report["sides"].items():
        print(f"| {name} | {row['first_ms']:.1f} | {row['second_ms']:.1f} | {row['second_over_first']:.3f} | "
              f"{row['best_over_best']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
