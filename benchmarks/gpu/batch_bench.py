"""Concurrent LLM streams on one GPU: our runner's batched decode against mlx-lm's server, same weights, same
MLX, same run.

    python -m benchmarks.gpu.batch_bench --models-dir DIR --out FILE.json \\
        [--only qwen3-4b,llama3-8b] [--streams 1,4,16,64] [--tokens 128] [--peer-python PYTHON] [--smoke]

1. Builds the missing random-weight bf16 folders (benchmarks.gpu.llm_shapes, in a subprocess, as llm_bench
   does); `--smoke` takes the tiny test fixture instead (tests/fixtures/llm/qwen3-tiny), streams 1,4,8 and 32
   tokens: a check of the script on a CPU.
2. Per model and side, one server (benchmarks/batch_serving.py) started for the most streams asked
   (ours: `--max-batch N`; mlx-lm: `--decode-concurrency N`): per level of concurrency, one untimed round of 8
   tokens a stream (each batch size's kernels load on first use), then one timed round: every stream sends a
   ~30-token prompt of its own at once and asks for `--tokens` greedy tokens. Aggregate tok/s = all streams'
   generated tokens / wall time from the first request to the last answer (prefill included).
3. The sides take turns per model (ours first, then mlx-lm), one server alive at a time.

Reports per model and level: both sides' aggregate tok/s, ours / mlx-lm (the issue's goal: >= 1.3 at every
level), ours / our single stream (goal: >= 6 at 16 streams), and on how many streams the two sides' texts agree
(but for the leading space mlx-lm's detokenizer drops; greedy on random weights: bf16 kernels of different batch
sizes may part ways after a near-tie).
Writes the JSON after every model and prints a markdown table.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.batch_serving import SIDES, Server, prompts  # noqa: E402
from benchmarks.gpu.llm_bench import ROOT, build  # noqa: E402

DEFAULT_MODELS = ["qwen3-4b", "llama3-8b"]
SMOKE_FOLDER = ROOT / "tests" / "fixtures" / "llm" / "qwen3-tiny"
WARM_UP_TOKENS = 8


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def bench_side(side: str, folder: Path, streams: list[int], tokens: int, peer_python: str) -> dict:
    started = time.perf_counter()
    server = Server.start(side, folder, max(streams), python=sys.executable if side == "ours" else peer_python)
    levels = {}
    try:
        log(f"  {side}: ready in {time.perf_counter() - started:.1f} s")
        for n in streams:
            texts = prompts(n)
            server.streams(texts, WARM_UP_TOKENS)
            timed = server.streams(texts, tokens)
            levels[n] = {"tok_s": timed.tok_s, "tokens": timed.tokens, "seconds": timed.seconds, "texts": timed.texts}
            log(f"  {side}: {n} streams: {timed.tokens} tokens in {timed.seconds:.2f} s = {timed.tok_s:.1f} tok/s")
    except Exception:
        log(f"  {side}: the server's log ends with:\n{server.log_tail()}")  # why it died, if it did
        raise
    finally:
        server.stop()
    return levels


def bench_model(folder: Path, streams: list[int], tokens: int, python: str) -> dict:
    sides = {side: bench_side(side, folder, streams, tokens, python) for side in SIDES}
    rows = []
    for n in streams:
        ours, peer = sides["ours"][n], sides["mlx-lm"][n]
        rows.append({
            "streams": n, "ours_tok_s": ours["tok_s"], "mlx_lm_tok_s": peer["tok_s"],
            "ours_over_mlx_lm": ours["tok_s"] / peer["tok_s"],
            "ours_over_single_stream": ours["tok_s"] / sides["ours"][streams[0]]["tok_s"],
            # mlx-lm's detokenizer drops the first token's leading space; the tokens are the same.
            "same_text": sum(a.lstrip() == b.lstrip() for a, b in zip(ours["texts"], peer["texts"])),
            "ours_tokens": ours["tokens"], "mlx_lm_tokens": peer["tokens"],
        })
    return {"levels": rows}


def table(report: dict) -> str:
    lines = [f"{report['tokens']} greedy tokens a stream, ~30-token prompts; aggregate tok/s over all streams.", "",
             "| model | streams | ours tok/s | mlx-lm tok/s | ours / mlx-lm | ours / ours at 1 stream | same text |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, result in report["models"].items():
        if "error" in result:
            lines.append(f"| {name} | failed: {result['error'].strip().splitlines()[-1]} | | | | | |")
            continue
        for r in result["levels"]:
            lines.append(f"| {name} | {r['streams']} | {r['ours_tok_s']:.1f} | {r['mlx_lm_tok_s']:.1f} | "
                         f"{r['ours_over_mlx_lm']:.2f}x | {r['ours_over_single_stream']:.2f}x | "
                         f"{r['same_text']}/{r['streams']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, help="where the random-weight folders are (built if missing)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--streams", default="1,4,16,64")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--peer-python", default=sys.executable, help="the Python whose mlx_lm serves the peer")
    parser.add_argument("--smoke", action="store_true", help="the tiny fixture, 1/4/8 streams, 32 tokens (CPU)")
    args = parser.parse_args()
    if args.smoke:
        models = {"tiny": SMOKE_FOLDER}
        streams, tokens = [1, 4, 8], 32
    else:
        if args.models_dir is None:
            parser.error("--models-dir is required (unless --smoke)")
        models = {name: args.models_dir / name for name in args.only.split(",")}
        streams, tokens = [int(n) for n in args.streams.split(",")], args.tokens
    report = {"tokens": tokens, "streams": streams, "models": {}}
    for name, folder in models.items():
        log(f"{name}: {folder}")
        try:
            if not args.smoke:
                build(name, folder)
            report["models"][name] = bench_model(folder, streams, tokens, args.peer_python)
        except Exception:  # noqa: BLE001 - recorded; the other models still run
            report["models"][name] = {"error": traceback.format_exc()}
            log(report["models"][name]["error"])
        args.out.write_text(json.dumps(report, indent=1))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
