"""Where the host's time goes in the prompt cache's follow-up: a native profile of the request, in buckets.

    python -m benchmarks.gpu.host_profile --models-dir DIR [--only qwen3-4b | --folder PATH] [--seconds 10]
        [--rate 1000] [--out FILE.json] [--stacks FILE.txt]
    python -m benchmarks.gpu.host_profile --summarize STACKS.txt      # a profile taken before, again

The follow-up is prompt_cache_bench's second request (a 3,000-token prompt, then it + 64 tokens, one greedy token,
`LanguageModel.stream`), run again and again: after each, the stored sequence is trimmed back to the prompt, so that
every request takes it over as the benchmark's does. Once the loop is warm, py-spy (`pip install py-spy`; not a
dependency of the project) samples this process's native and Python stacks for `--seconds`; then the samples inside
the request are put in buckets by the frames they hold (first match wins, in BUCKETS' order) and printed as shares.

Build the core with its symbols, or its frames show as addresses:
    pip install --no-build-isolation -C install.strip=false -C cmake.define.MLXRUNNER_KEEP_SYMBOLS=ON .
Sampling slows the request (session 38's H100: 9.3 ms median under py-spy at 1,000 Hz, ~7.3 without); the shares are
what the profile is for.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

PROMPT_TOKENS, FOLLOW_UP_TOKENS = 3000, 64
REQUEST_FRAME = "follow_up"  # follow_up_request below (and any frame so named): its samples are the request's

# (bucket, frame substrings): a sample goes to the first bucket one of whose substrings a frame of its stack holds.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("cuBLAS products (MLX's Matmul::eval_gpu: cuBLASLt's planning, launch and stream capture)",
     ("Matmul::eval_gpu",)),
    ("a queued piece's commit (CUDA graph update and launch, completion handler)", ("CommandEncoder::commit",)),
    ("our kernels' encoding (MLX's CustomKernel::eval_gpu)", ("CustomKernel::eval_gpu",)),
    ("our kernels' operations built (mx::fast::cuda_kernel's source rebuilt each call)", ("fast::cuda_kernel",)),
    ("other operations encoded (gpu::eval, cpu::eval)", ("gpu::eval", "cpu::eval")),
    ("MLX's evaluation bookkeeping (eval_impl)", ("eval_impl",)),
    ("the rest of building the layers (Decoder::forward)", ("Decoder::forward",)),
    ("waiting for the token", ("array::wait", "Event::wait")),
    ("the rest of the request (Python, the prompt cache, the sampler)", ("",)),
]


def summarize(stacks: str) -> dict:
    """py-spy's raw output (`frame;frame;... count` a line) -> {"samples": n, "shares": {bucket: fraction}} over the
    samples inside REQUEST_FRAME."""
    counts: Counter[str] = Counter()
    for line in stacks.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if REQUEST_FRAME not in stack or not n.isdigit():
            continue
        frames = stack.split(";")
        inside = frames[max(i for i, f in enumerate(frames) if REQUEST_FRAME in f) + 1:]
        bucket = next(name for name, marks in BUCKETS if any(m in f for m in marks for f in inside or [""]))
        counts[bucket] += int(n)
    total = sum(counts.values())
    return {"samples": total,
            "shares": {name: counts[name] / total if total else 0.0 for name, _ in BUCKETS}}


def follow_up_request(ours, prompt_ids: list[int], second_ids: list[int]) -> float:
    """One follow-up as the benchmark times it (`Ours.request`, s), the stored sequence trimmed back to the prompt
    after it."""
    seconds, _, cached = ours.request(second_ids)
    assert cached == len(prompt_ids), cached
    cache = ours.model.prompt_cache
    stored = cache.sequences()[-1]  # the follow-up's sequence: a prompt one longer takes it whole (a hand-over)
    caches, reused = cache.fetch(stored + [0])
    assert reused == len(stored), reused
    assert caches.trim(caches.length - len(prompt_ids)), "the follow-up's positions could not be trimmed off"
    cache.insert(prompt_ids, caches)
    return seconds


def profile(folder: Path, seconds: float, rate: int, stacks_out: Path | None) -> dict:
    import mlxrunner  # noqa: F401, I001  (before mlx.core, as the other benchmarks do)

    from benchmarks.prompt_cache_sides import Ours, prompt

    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not on PATH (pip install py-spy)")
    ours = Ours(folder)
    prompt_ids = prompt(PROMPT_TOKENS)
    second_ids = prompt_ids + prompt(FOLLOW_UP_TOKENS, salt=7)
    ours.clear()
    ours.request(prompt_ids)
    warm = [follow_up_request(ours, prompt_ids, second_ids) for _ in range(10)]
    raw = stacks_out or Path(tempfile.mkstemp(suffix=".txt")[1])
    sampler = subprocess.Popen([spy, "record", "--native", "--idle", "-r", str(rate), "-f", "raw",
                                "--pid", str(os.getpid()), "--duration", str(int(seconds)), "-o", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    profiled = []
    while sampler.poll() is None:
        profiled.append(follow_up_request(ours, prompt_ids, second_ids))
    if sampler.returncode != 0:
        raise SystemExit(f"py-spy failed: {sampler.stderr.read()[-2000:]}")
    out = summarize(raw.read_text())
    out.update(follow_up_ms_unprofiled=statistics.median(warm) * 1e3,
               follow_up_ms_profiled=statistics.median(profiled) * 1e3, requests_profiled=len(profiled))
    return out


def table(report: dict) -> str:
    lines = ["| where | share of the follow-up's host samples |", "|---|---:|"]
    lines += [f"| {name} | {share:.1%} |" for name, share in report["shares"].items()]
    timed = ""
    if "follow_up_ms_profiled" in report:
        timed = (f"; the follow-up {report['follow_up_ms_unprofiled']:.2f} ms (median) before sampling, "
                 f"{report['follow_up_ms_profiled']:.2f} ms while sampled ({report['requests_profiled']} requests)")
    return "\n".join(lines) + f"\n\n{report['samples']} samples{timed}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "mlxrunner-bench")
    parser.add_argument("--only", default="qwen3-4b")
    parser.add_argument("--folder", type=Path, help="an existing model folder instead of a built shape")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=1000, help="samples a second")
    parser.add_argument("--out", type=Path, help="the report as JSON")
    parser.add_argument("--stacks", type=Path, help="keep py-spy's raw stacks here")
    parser.add_argument("--summarize", type=Path, help="bucket a raw stacks file taken before, and stop")
    args = parser.parse_args(argv)
    if args.summarize:
        report = summarize(args.summarize.read_text())
    else:
        folder = args.folder or args.models_dir / args.only
        if not (folder / "config.json").exists():
            parser.error(f"no model at {folder} (build it with benchmarks.gpu.llm_bench --build-only)")
        report = profile(folder, args.seconds, args.rate, args.stacks)
    print(table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
