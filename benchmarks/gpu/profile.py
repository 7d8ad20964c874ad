"""GPU kernel profile of the rows below their speed goals: LLM decode, the prompt cache's follow-up, concurrent
requests' batched decode, MLX's CUDA graph settings, the image VAE, the image denoiser and each image phase's peak
memory.

    python -m benchmarks.gpu.profile --models-dir DIR --out OUTDIR [--cases llm,pcache,batch,vae,denoise,sweep] \\
        [--llm-models qwen3-0.6b,qwen3-4b,llama3-8b] [--tokens 32] [--sweep-models qwen3-0.6b,qwen3-4b] \\
        [--vae-latent 128] [--denoise-steps 2] [--denoise-size 1024] [--budget-s 560] [--keep-traces]

Kernels are captured with torch's profiler (Kineto over CUPTI): CUPTI's activity tracing records
every kernel the process launches, MLX's included, also the kernel nodes of the CUDA graphs MLX's
CUDA backend batches its work into. Any process that runs MLX imports mlxrunner and mlx.core
before torch (MLX's CUDA libraries load first). A region = `profile(CPU, CUDA)` around a Python
callable that ends with a device sync; its chrome trace (a temp file) is parsed: events of "cat"
"kernel" (name, ts, dur in µs). Per region: kernels, the sum of their durations, the union of their
intervals (GPU busy time), the region's wall time (perf_counter inside the profiler), busy fraction
= union / wall, the top 15 kernel names by total time and ms per coarse category (by name, first
match wins: attention, conv, matmul, reduction/norm, copy, elementwise, other; attention and conv
come before matmul because cuDNN's SDPA and convolution kernels have "gemm"/"xmma" in their names).
Memcpy/memset activity is reported apart, not counted as kernels.

If a region shows no kernels (CUPTI did not see MLX's), that is recorded ("torch profiler saw no
MLX kernels") and the same case is re-run, once per case and side, as a child of this script under
Nsight Compute (`ncu --profile-from-start off --metrics gpu__time_duration.sum --csv --page raw`),
the child calling cudaProfilerStart/Stop through ctypes around a short region (4 decode tokens, or
one VAE decode); ncu serialises kernels, so it gives per-kernel times but no busy fraction.

Cases (run in the order llm, vae, denoise, sweep; the sweep is the longest):
1. llm: per model (smallest first), ours (`_core.Generator`, as llm_bench.Ours) and mlx-lm
   (llm_bench.Peer) in this process: a 128-token prompt (llm_bench.prompt), a 40-token warm-up run;
   a fresh run, the first token (prefill) and 8 more, then 64 tokens timed without the profiler
   (so the profiler's overhead shows); another fresh run, first + 8 tokens, then `--tokens`
   profiled next() calls and a sync. Per token: wall, kernels, kernel sum, busy, busy fraction.
   Both sides run one step ahead of the host: the profiled region holds one step more than
   `--tokens` (the one dispatched by the last next()), for both sides alike.
2. vae: the Z-Image VAE (DIR/zimage-turbo, 16 latent channels) decoding seeded-normal float32
   latents [1, 16, 128, 128] (a 1024 x 1024 image): ours (`imagegen.vae.Vae`, built directly from
   the folder, untiled, as a 1024² request decodes) in this process; diffusers (AutoencoderKL, bf16,
   z / scaling_factor + shift_factor as its pipeline) in a child process so torch's CUDA allocations
   and MLX's never share one. Both sides end on host pixels in [0, 1]. One warm-up, one profiled
   decode, and the median of 3 unprofiled decodes.
2b. pcache: the prompt cache's second request on the Qwen3-4B shape (bf16), ours only: a 3,000-token prompt,
   then it + 64 tokens, one greedy token each (benchmarks/prompt_cache_sides.py's `Ours`), beside the same 64
   tokens as a fresh prompt, a 1-token prompt and the whole 3,064 tokens again (all cached); medians of 5 after a
   warm-up of each; then the second request profiled: whether its time is kernels or the host between them; then the
   fresh follow-up and the 1-token prompt profiled. Every profiled region also reports its timeline (`idle_timeline`):
   the device idle before the first kernel, after the last and between kernels (the largest gaps, and how much of it
   came after the device went idle and before the host's next launch: time the device waited on the host).
3. denoise: the Z-Image denoiser's kernels per step and each image phase's peak memory, ours and
   diffusers' (benchmarks/gpu/profile_image.py says how).
4. sweep: MLX reads MLX_USE_CUDA_GRAPHS, MLX_MAX_OPS_PER_BUFFER (kernels per CUDA graph before it is
   launched; 100 on an H100 by default) and MLX_MAX_MB_PER_BUFFER once at start-up, so each setting x
   model is a child process (no torch): both sides loaded, a 64-token warm-up each, then 2 rounds
   of a fresh 128-token-prompt run per side, decode tok/s over tokens 2..128, median of the rounds.

Writes OUT/profile.json and OUT/profile.md after every section (a kill keeps what finished); the
smallest chrome trace is kept gzipped in OUT if under 5 MB. Every section records its error and the
rest still run; sections past `--budget-s` are skipped and recorded; the exit status is always 0.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import bisect  # noqa: E402
import csv  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import importlib.metadata  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.gpu import profile_image  # noqa: E402
from benchmarks.gpu.llm_bench import DEFAULT_MODELS as DEFAULT_LLMS  # noqa: E402  (no mlx, no torch imported)
from benchmarks.gpu.llm_bench import SIDES  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SWEEP_MODELS = ["qwen3-0.6b", "qwen3-4b"]
VAE_FOLDER = "zimage-turbo"
CASES = ["llm", "pcache", "batch", "vae", "denoise", "sweep"]  # run order: the cheap, most wanted figures first
CHUNK = 2048  # prefill chunk, both sides (llm_bench's default)
PROMPT_TOKENS = 128
WARMUP_TOKENS = 40
SKIP_TOKENS = 8  # decoded unprofiled after the first token, so the profiled steps are steady state
UNPROFILED_TOKENS = 64
NCU_TOKENS = 4
NCU_TIMEOUT_S = 240
SWEEP_TIMEOUT_S = 120
SWEEP_MARK = "SWEEP_JSON "
TOP = 15
KEEP_TRACE_BYTES = 5 * 2**20
GRAPH_VARS = ("MLX_USE_CUDA_GRAPHS", "MLX_MAX_OPS_PER_BUFFER", "MLX_MAX_MB_PER_BUFFER")
SWEEP_SETTINGS: list[tuple[str, dict]] = [
    ("default", {}),
    ("ops=20", {"MLX_MAX_OPS_PER_BUFFER": "20"}),
    ("ops=50", {"MLX_MAX_OPS_PER_BUFFER": "50"}),
    ("ops=300", {"MLX_MAX_OPS_PER_BUFFER": "300"}),
    ("ops=1000", {"MLX_MAX_OPS_PER_BUFFER": "1000"}),
    ("graphs=0", {"MLX_USE_CUDA_GRAPHS": "0"}),
]
# First match wins (see the docstring for why attention and conv precede matmul).
CATEGORIES: list[tuple[str, re.Pattern]] = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in [
    ("attention", r"sdpa|attention|flash|fmha"),
    ("conv", r"conv|cudnn|implicit|fprop|dgrad|wgrad|winograd"),
    ("matmul", r"gemm|gemv|matmul|cutlass|sm90|cublas|xmma"),
    ("reduction/norm", r"reduce|norm|softmax|sum"),
    ("copy", r"copy|memcpy|fill|gather|scatter|slice|concat|transpose"),
    ("elementwise", r"compiled|fused|elementwise|binary|unary|ternary|rope|arange"),
]]
CATEGORY_NAMES = [name for name, _ in CATEGORIES] + ["other"]
CUDART_NAMES = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]


def log(*args) -> None:
    print(*args, flush=True)


def error_text() -> str:
    return traceback.format_exc()


def _text(output) -> str:
    """A subprocess output that may be bytes or None (TimeoutExpired's)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else str(output or "")


def last_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "?"


# --- kernel lists -> figures -------------------------------------------------------------------------


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def kernels_from_trace(trace) -> tuple[list[dict], list[dict]]:
    """A chrome trace (Kineto's export) -> (kernels, memcpy/memset ops), each {name, ts, dur} in µs."""
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    kernels, memops = [], []
    for ev in events or []:
        if not isinstance(ev, dict) or ev.get("ph") != "X":
            continue
        cat = str(ev.get("cat", "")).lower()
        if cat not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        try:
            row = {"name": str(ev.get("name", "?")), "ts": float(ev["ts"]), "dur": float(ev.get("dur", 0.0))}
        except (KeyError, TypeError, ValueError):
            continue
        (kernels if cat == "kernel" else memops).append(row)
    return kernels, memops


def busy_union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by [start, end) intervals (overlaps counted once)."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def summarize(kernels: list[dict], wall_s: float | None, per: int = 1, memops: list[dict] | None = None,
              empty_note: str = "torch profiler saw no MLX kernels") -> dict:
    """Figures of one region; kernels carry µs (ts None where the tool gives none: ncu)."""
    n = len(kernels)
    sum_us = sum(k["dur"] for k in kernels)
    timed = n > 0 and all(k.get("ts") is not None for k in kernels)
    busy_us = busy_union([(k["ts"], k["ts"] + k["dur"]) for k in kernels]) if timed else None
    by_name: dict[str, list] = {}
    cats = {c: 0.0 for c in CATEGORY_NAMES}
    for k in kernels:
        entry = by_name.setdefault(k["name"], [0, 0.0])
        entry[0] += 1
        entry[1] += k["dur"]
        cats[category(k["name"])] += k["dur"] / 1000
    top = sorted(by_name.items(), key=lambda item: -item[1][1])[:TOP]
    out = {
        "kernels": n, "distinct_kernels": len(by_name), "kernel_sum_ms": sum_us / 1000,
        "busy_ms": None if busy_us is None else busy_us / 1000,
        "wall_ms": None if wall_s is None else wall_s * 1000,
        "busy_fraction": busy_us / 1000 / (wall_s * 1000) if busy_us is not None and wall_s else None,
        "span_ms": (max(k["ts"] + k["dur"] for k in kernels) - min(k["ts"] for k in kernels)) / 1000 if timed else None,
        "per": per,
        "top": [{"name": name[:90], "count": c, "total_ms": us / 1000, "share": us / sum_us if sum_us else None,
                 "category": category(name)} for name, (c, us) in top],
        "categories_ms": cats,
    }
    if memops is not None:
        out["memops"] = {"count": len(memops), "ms": sum(m["dur"] for m in memops) / 1000}
    if per > 1:  # per token
        out["per_unit"] = {key: (None if out[key] is None else out[key] / per)
                           for key in ("kernels", "kernel_sum_ms", "busy_ms", "wall_ms")}
        out["per_unit"]["categories_ms"] = {c: ms / per for c, ms in cats.items()}
    if n == 0:
        out["note"] = empty_note
    return out


REGION_MARK = "mlxr-region"  # the profiled callable's span on the trace's clock
HOST_LAUNCHES = ("cudaGraphLaunch", "cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
IDLE_SHOWN = 10


def idle_timeline(trace, kernels: list[dict]) -> dict:
    """Where a region's device sits idle: before its first kernel (the host building and queuing the first work),
    after its last (reading results back, the host's bookkeeping), and between kernels (the largest gaps, with the
    kernels either side and whether a launch from the host came just before the later one: the device waited on the
    host). Host launches are CUPTI's runtime/driver API events in the same trace (µs on the same clock)."""
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    region = next((e for e in events or [] if isinstance(e, dict) and e.get("name") == REGION_MARK
                   and e.get("ph") == "X"), None)
    timed = sorted((k for k in kernels if k.get("ts") is not None), key=lambda k: k["ts"])
    if region is None or not timed:
        return {"note": "no region mark or no timed kernels"}
    begin, end = float(region["ts"]), float(region["ts"]) + float(region.get("dur", 0.0))
    launches = sorted(float(e["ts"]) + float(e.get("dur", 0.0)) for e in events
                      if isinstance(e, dict) and e.get("ph") == "X" and str(e.get("name", "")) in HOST_LAUNCHES)
    api: dict[str, list[float]] = {}
    for e in events:
        if isinstance(e, dict) and e.get("ph") == "X" and str(e.get("cat", "")).lower() in ("cuda_runtime",
                                                                                               "cuda_driver"):
            entry = api.setdefault(str(e.get("name")), [0, 0.0])
            entry[0] += 1
            entry[1] += float(e.get("dur", 0.0))
    gaps, covered = [], timed[0]["ts"] + timed[0]["dur"]
    for before, after in zip(timed, timed[1:]):
        if after["ts"] > covered:
            last = bisect.bisect_right(launches, after["ts"])  # the host's launches that ended before this kernel
            waited = last > 0 and launches[last - 1] > covered  # the latest came after the device went idle
            gaps.append({"us": after["ts"] - covered, "before": before["name"][:60], "after": after["name"][:60],
                         "at_us": covered - begin, "waited_on_host": waited})
        covered = max(covered, after["ts"] + after["dur"])
    idle = sum(g["us"] for g in gaps)
    return {
        "region_us": end - begin, "lead_us": timed[0]["ts"] - begin, "tail_us": end - covered,
        "interior_idle_us": idle, "interior_gaps": len(gaps),
        "interior_idle_waiting_on_host_us": sum(g["us"] for g in gaps if g["waited_on_host"]),
        "gaps_over_5us": sum(1 for g in gaps if g["us"] > 5),
        "largest_gaps": sorted(gaps, key=lambda g: -g["us"])[:IDLE_SHOWN],
        "host_api": {name: {"count": c, "ms": us / 1000} for name, (c, us) in
                     sorted(api.items(), key=lambda item: -item[1][1])[:IDLE_SHOWN]},
    }


class KernelProfiler:
    """torch.profiler around a callable; the chrome trace goes to a temp dir and is parsed."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.traces: list[Path] = []

    def run(self, label: str, fn, per: int = 1, empty_note: str = "torch profiler saw no MLX kernels") -> dict:
        import torch  # after mlx (the callers imported it first)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with torch.profiler.record_function(REGION_MARK):
                started = time.perf_counter()
                fn()  # ends with a device sync
                wall = time.perf_counter() - started
        path = self.tmp / (re.sub(r"[^A-Za-z0-9._-]+", "_", label) + ".json")
        prof.export_chrome_trace(str(path))
        self.traces.append(path)
        trace = json.loads(path.read_text())
        kernels, memops = kernels_from_trace(trace)
        out = summarize(kernels, wall, per, memops, empty_note)
        out["timeline"] = idle_timeline(trace, kernels)
        out["trace_bytes"] = path.stat().st_size
        out["torch"] = torch.__version__
        return out

    def keep_small_traces(self, out_dir: Path, every: bool = False) -> str | None:
        """Gzip the smallest trace into OUT if it is small (the others are too big to keep); `every`: each trace
        that is small. The names kept, comma-separated."""
        existing = sorted((p for p in self.traces if p.exists()), key=lambda p: p.stat().st_size)
        kept = []
        for path in existing if every else existing[:1]:
            data = gzip.compress(path.read_bytes())
            if len(data) < KEEP_TRACE_BYTES:
                (out_dir / (path.name + ".gz")).write_bytes(data)
                kept.append(path.name + ".gz")
        return ", ".join(kept) or None


# --- Nsight Compute fallback -------------------------------------------------------------------------


def find_ncu() -> str | None:
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/usr/local/cuda/bin/ncu", "/usr/local/cuda-*/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def load_cudart():
    """(library, name) or (None, errors): MLX loaded its cudart already, so the soname resolves to it."""
    errors = []
    for name in CUDART_NAMES:
        try:
            return ctypes.CDLL(name), name
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    return None, "; ".join(errors)


NS_PER_UNIT = {"ns": 1.0, "nsecond": 1.0, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6, "s": 1e9,
               "second": 1e9}


def parse_ncu_csv(text: str) -> list[dict]:
    """ncu --csv --page raw log -> kernels {name, ts None, dur µs}; ncu's own ==PROF== lines are skipped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header = rows[0]
    name_col = header.index("Kernel Name")
    time_col = header.index("gpu__time_duration.sum")
    scale = 1.0
    body = rows[1:]
    if body and not body[0][0].strip().isdigit():  # the units row
        scale = NS_PER_UNIT.get(body[0][time_col].strip(), 1.0)
        body = body[1:]
    kernels = []
    for row in body:
        if len(row) <= max(name_col, time_col):
            continue
        try:
            ns = float(row[time_col].replace(",", "")) * scale
        except ValueError:
            continue
        kernels.append({"name": row[name_col], "ts": None, "dur": ns / 1000})
    return kernels


def ncu_fallback(args, spec: str, per: int, deadline: float) -> dict:
    """Re-run one case under ncu (a child of this script, `--ncu-child SPEC`)."""
    ncu = find_ncu()
    if ncu is None:
        return {"error": "ncu not found (PATH, /usr/local/cuda*/bin, /opt/nvidia/nsight-compute)"}
    timeout = min(NCU_TIMEOUT_S, deadline - time.perf_counter() - 10)
    if timeout < 30:
        return {"skipped": "time budget"}
    with tempfile.TemporaryDirectory(prefix="ncu-") as tmp:
        log_file, child_out = Path(tmp) / "ncu.csv", Path(tmp) / "child.json"
        command = [ncu, "--target-processes", "all", "--profile-from-start", "off", "--metrics",
                   "gpu__time_duration.sum", "--csv", "--page", "raw", "--log-file", str(log_file),
                   sys.executable, "-m", "benchmarks.gpu.profile", "--ncu-child", spec,
                   "--models-dir", str(args.models_dir), "--out", str(args.out), "--child-out", str(child_out),
                   "--vae-latent", str(args.vae_latent)]
        log(f"[ncu] {spec}")
        started = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout)
            tail, rc = proc.stdout[-3000:], proc.returncode
        except subprocess.TimeoutExpired as exc:
            tail, rc = _text(exc.stdout)[-3000:], "timeout"
        out: dict = {"command": " ".join(command), "rc": rc, "seconds": time.perf_counter() - started}
        if child_out.exists():
            out["child"] = json.loads(child_out.read_text())
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        kernels = parse_ncu_csv(text)
        if kernels:
            out["summary"] = summarize(kernels, None, per, empty_note="ncu saw no kernels")
        else:
            out["error"] = "no kernels in ncu's CSV"
            out["log_tail"] = text[-2000:]
            out["output_tail"] = str(tail)
    return out


def ncu_child(args) -> int:
    """Set the case up, then cudaProfilerStart/Stop around a short region (ncu profiles only that)."""
    result: dict = {"spec": args.ncu_child}
    try:
        import mlxrunner  # noqa: F401, I001  (first, as everywhere)
        import mlx.core as mx

        cudart, name = load_cudart()
        result["cudart"] = name if cudart else None
        if cudart is None:
            result["cudart_error"] = name
        case, *rest = args.ncu_child.split(":")
        if case == "llm":
            side_name, model = rest
            region, cleanup = _llm_ncu_region(mx, side_name, args.models_dir / model)
        elif case == "vae":
            region, cleanup = _vae_ncu_region(mx, args)
        else:
            raise ValueError(f"unknown ncu child case {args.ncu_child!r}")
        mx.synchronize()
        if cudart is not None:
            result["cudaProfilerStart"] = int(cudart.cudaProfilerStart())
        started = time.perf_counter()
        region()
        result["region_s"] = time.perf_counter() - started
        if cudart is not None:
            result["cudaProfilerStop"] = int(cudart.cudaProfilerStop())
        cleanup()
    except Exception:  # noqa: BLE001
        result["error"] = error_text()
    if args.child_out:
        Path(args.child_out).write_text(json.dumps(result, indent=2, default=str))
    log(json.dumps(result, default=str)[:2000])
    return 0


def warm_up(mx, side, ids) -> None:
    """One throwaway run of WARMUP_TOKENS: first-use allocations and kernel builds stay out of the figures."""
    gen = side.start(ids)
    for _ in range(WARMUP_TOKENS):
        next(gen)
    side.finish(mx, gen)


def steady_generator(mx, side, ids):
    """A fresh run past its first token (prefill) and SKIP_TOKENS more, synced: the next tokens are steady state."""
    from benchmarks.gpu.llm_bench import _sync_all

    gen = side.start(ids)
    for _ in range(1 + SKIP_TOKENS):
        next(gen)
    _sync_all(mx)
    return gen


def _llm_ncu_region(mx, side_name: str, folder: Path):
    from benchmarks.gpu.llm_bench import Ours, Peer, _sync_all, prompt

    side = (Ours if side_name == "ours" else Peer)(folder, CHUNK)
    ids = prompt(PROMPT_TOKENS)
    warm_up(mx, side, ids)
    gen = steady_generator(mx, side, ids)

    def region():
        for _ in range(NCU_TOKENS):
            next(gen)
        _sync_all(mx)

    return region, lambda: side.finish(mx, gen)


def _vae_ncu_region(mx, args):
    vae, latents = ours_vae(mx, args)
    vae.decode(latents, tile=None)  # warm-up
    return (lambda: (vae.decode(latents, tile=None), mx.synchronize())), (lambda: None)


# --- case: llm ---------------------------------------------------------------------------------------


def free(mx) -> None:
    gc.collect()
    mx.clear_cache()


def llm_side(mx, side, profiler: KernelProfiler, model: str, tokens: int) -> dict:
    from benchmarks.gpu.llm_bench import _sync_all, prompt

    ids = prompt(PROMPT_TOKENS)
    out: dict = {}
    warm_up(mx, side, ids)

    # Unprofiled, so the profiler's own overhead on the wall time shows.
    gen = steady_generator(mx, side, ids)
    started = time.perf_counter()
    for _ in range(UNPROFILED_TOKENS):
        next(gen)
    _sync_all(mx)
    out["unprofiled_ms_per_token"] = 1000 * (time.perf_counter() - started) / UNPROFILED_TOKENS
    side.finish(mx, gen)
    del gen

    gen = steady_generator(mx, side, ids)

    def region():
        for _ in range(tokens):
            next(gen)
        _sync_all(mx)

    out["profile"] = profiler.run(f"llm-{model}-{side.name}", region, per=tokens)
    side.finish(mx, gen)
    del gen
    return out


def case_llm(mx, args, report: dict, profiler: KernelProfiler, save, deadline: float) -> None:
    from benchmarks.gpu.llm_bench import Ours, Peer

    section = report.setdefault("llm", {"settings": {
        "prompt": PROMPT_TOKENS, "warmup_tokens": WARMUP_TOKENS, "skipped_tokens": 1 + SKIP_TOKENS,
        "profiled_tokens": args.tokens, "unprofiled_tokens": UNPROFILED_TOKENS, "chunk": CHUNK},
        "models": {}})
    ncu_done: set[str] = set()
    for model in args.llm_models:
        entry = section["models"].setdefault(model, {})
        folder = args.models_dir / model
        for cls in (Ours, Peer):
            if time.perf_counter() > deadline:
                entry[cls.name] = {"skipped": "time budget"}
                continue
            log(f"[llm] {model} {cls.name}")
            side = None
            try:
                if not (folder / "config.json").exists():
                    raise FileNotFoundError(f"{folder}/config.json missing (build it with benchmarks.gpu.llm_shapes)")
                free(mx)
                started = time.perf_counter()
                side = cls(folder, CHUNK)
                load_s = time.perf_counter() - started
                result = llm_side(mx, side, profiler, model, args.tokens)
                result["load_s"] = load_s
                entry[cls.name] = result
                prof = result["profile"]
                log(f"[llm] {model} {cls.name}: {result['unprofiled_ms_per_token']:.2f} ms/token unprofiled, "
                    f"{prof['wall_ms'] / args.tokens:.2f} profiled, {prof['kernels'] / args.tokens:.0f} kernels/token, "
                    f"busy {_pct(prof['busy_fraction'])}")
                if prof["kernels"] == 0 and cls.name not in ncu_done:
                    ncu_done.add(cls.name)
                    del side
                    side = None
                    free(mx)
                    result["ncu"] = ncu_fallback(args, f"llm:{cls.name}:{model}", NCU_TOKENS, deadline)
            except Exception:  # noqa: BLE001  (one side's failure must not stop the rest)
                entry[cls.name] = {"error": error_text()}
                log(f"[llm] {model} {cls.name} ERROR\n{entry[cls.name]['error']}")
            finally:
                del side
                free(mx)
            save()


# --- case: pcache ------------------------------------------------------------------------------------

PCACHE_MODEL = "qwen3-4b"
PCACHE_PROMPT, PCACHE_FOLLOW_UP, PCACHE_ROUNDS = 3000, 64, 5


def case_pcache(mx, args, report: dict, profiler: KernelProfiler, save, deadline: float) -> None:
    from benchmarks.prompt_cache_sides import Ours, prompt

    section = report.setdefault("pcache", {"settings": {"model": PCACHE_MODEL, "prompt": PCACHE_PROMPT,
                                                        "follow_up": PCACHE_FOLLOW_UP, "rounds": PCACHE_ROUNDS}})
    first = prompt(PCACHE_PROMPT)
    second = first + prompt(PCACHE_FOLLOW_UP, salt=7)
    ours = Ours(args.models_dir / PCACHE_MODEL)

    def after_first():  # the cache holds the first prompt; the second request is then timed
        ours.clear()
        ours.request(first)

    def after_second():  # the cache holds the whole second sequence
        after_first()
        ours.request(second)

    requests = {"second (prompt cached)": (after_first, second),
                "the follow-up alone, fresh": (ours.clear, second[-PCACHE_FOLLOW_UP:]),
                "1 token, fresh": (ours.clear, prompt(1, salt=3)), "all 3,064 again (cached)": (after_second, second)}
    medians = {}
    for name, (setup, ids) in requests.items():
        times = []
        for _ in range(1 + PCACHE_ROUNDS):  # the first is a warm-up
            setup()
            times.append(ours.request(ids)[0])
        medians[name] = 1000 * statistics.median(times[1:])
    section["unprofiled_ms"] = medians
    log("[pcache] " + ", ".join(f"{k} {v:.1f} ms" for k, v in medians.items()))
    after_first()
    section["profile"] = profiler.run("pcache-second", lambda: ours.request(second), per=1)
    ours.clear()  # the same 64 tokens as a fresh prompt: the second request less its attention over cached keys
    section["profile_fresh_follow_up"] = profiler.run("pcache-fresh", lambda: ours.request(second[-PCACHE_FOLLOW_UP:]))
    ours.clear()
    section["profile_one_token"] = profiler.run("pcache-one", lambda: ours.request(prompt(1, salt=3)))
    save()


# --- case: batch -------------------------------------------------------------------------------------

BATCH_MODEL, BATCH_ROWS, BATCH_STEPS = "llama3-8b", 16, 8


def batch_of_rows(model_folder: Path, rows: int):
    """A BatchGenerator holding `rows` sequences of different lengths (24, 25, ... tokens: the rows need the
    attention mask, as concurrent requests do), each prefilled alone as the scheduler prefills them."""
    from mlxrunner import _core
    from mlxrunner.llm.batch import prefilled
    from mlxrunner.llm.model import PREFILL_CHUNK, LanguageModel
    from mlxrunner.store import resolve

    model = LanguageModel(resolve(str(model_folder)), max_batch=1)  # no scheduler of its own: this one is driven here
    greedy = _core.SamplerOptions.from_dict({"temperature": 0.0, "repeat_penalty": 1.0})
    batch = _core.BatchGenerator(model.decoder)
    for row in range(rows):
        prompt = [(7 * i + 13 * row) % 1000 + 3 for i in range(24 + row)]
        batch.add(prompt, greedy, -1, prefilled(model.decoder, prompt, greedy, PREFILL_CHUNK))
    return model, batch


def case_batch(mx, args, report: dict, profiler: KernelProfiler, save, deadline: float) -> None:
    """Concurrent requests' decode (issue 19's streams): one step of BATCH_ROWS sequences, per step."""
    section = report.setdefault("batch", {"settings": {"model": BATCH_MODEL, "rows": BATCH_ROWS,
                                                       "steps": BATCH_STEPS}})
    model, batch = batch_of_rows(args.models_dir / BATCH_MODEL, BATCH_ROWS)

    def steps(n: int) -> None:
        for _ in range(n):
            batch.step()
        mx.synchronize()

    steps(4)  # each kernel variant of this batch size compiles and loads on its first step
    started = time.perf_counter()
    steps(BATCH_STEPS)
    section["unprofiled_ms_per_step"] = 1000 * (time.perf_counter() - started) / BATCH_STEPS
    log(f"[batch] {BATCH_ROWS} rows: {section['unprofiled_ms_per_step']:.2f} ms a step unprofiled")
    section["profile"] = profiler.run("batch", lambda: steps(BATCH_STEPS), per=BATCH_STEPS)
    del batch, model
    free(mx)
    save()


# --- case: vae ---------------------------------------------------------------------------------------


def vae_latents(size: int):
    import numpy as np

    return np.random.default_rng(0).standard_normal((1, 16, size, size)).astype(np.float32)


def ours_vae(mx, args):
    from mlxrunner import store
    from mlxrunner.imagegen.vae import Vae

    vae = Vae(store.resolve(str(args.models_dir / VAE_FOLDER)))
    return vae, mx.array(vae_latents(args.vae_latent))


def case_vae(mx, args, report: dict, profiler: KernelProfiler, save, deadline: float) -> None:
    section = report.setdefault("vae", {"settings": {
        "model": f"{VAE_FOLDER} (Z-Image's AutoencoderKL; Klein's patchified decode not used)",
        "latents": [1, 16, args.vae_latent, args.vae_latent], "image": 8 * args.vae_latent,
        "latents_from": "numpy default_rng(0).standard_normal, float32"}})
    log("[vae] ours")
    try:
        vae, latents = ours_vae(mx, args)
        section["settings"]["ours_dtype"] = str(vae.dtype)
        vae.decode(latents, tile=None)  # warm-up; returns host uint8 pixels, so it has completed
        section["ours"] = {"unprofiled_ms": median_ms(lambda: vae.decode(latents, tile=None), 3)}
        section["ours"]["profile"] = profiler.run("vae-ours",
                                                  lambda: (vae.decode(latents, tile=None), mx.synchronize()))
        log(f"[vae] ours: {section['ours']['unprofiled_ms']:.1f} ms unprofiled, "
            f"{section['ours']['profile']['kernels']} kernels")
        del vae, latents
        free(mx)
        if section["ours"]["profile"]["kernels"] == 0:
            section["ours"]["ncu"] = ncu_fallback(args, "vae:ours", 1, deadline)
    except Exception:  # noqa: BLE001
        section["ours"] = {"error": error_text()}
        log(f"[vae] ours ERROR\n{section['ours']['error']}")
    free(mx)
    save()
    diffusers_child(section, "vae", ["--vae-latent", str(args.vae_latent)], args, deadline, NCU_TIMEOUT_S)
    save()


def diffusers_child(section: dict, case: str, extra: list[str], args, deadline: float, limit_s: float) -> None:
    """section["diffusers"] from this script run as `--{case}-child diffusers` in a child process (torch's
    CUDA allocations never share a process with MLX's), or a skip past the time budget."""
    if time.perf_counter() > deadline:
        section["diffusers"] = {"skipped": "time budget"}
        return
    log(f"[{case}] diffusers (child)")
    section["diffusers"] = run_json_child(
        [f"--{case}-child", "diffusers", "--models-dir", str(args.models_dir), "--out", str(args.out), *extra], None,
        min(limit_s, deadline - time.perf_counter()))


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def vae_child_diffusers(args) -> dict:
    import diffusers
    import torch

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)  # CPU: a smoke test

    def sync():
        if cuda:
            torch.cuda.synchronize()

    out: dict = {"device": device, "dtype": str(dtype), "torch": torch.__version__, "diffusers": diffusers.__version__}
    started = time.perf_counter()
    vae = diffusers.AutoencoderKL.from_pretrained(str(args.models_dir / VAE_FOLDER), subfolder="vae",
                                                  torch_dtype=dtype).to(device)
    sync()
    out["load_s"] = time.perf_counter() - started
    latents = torch.from_numpy(vae_latents(args.vae_latent)).to(device)
    shift = vae.config.shift_factor or 0.0

    def decode():
        # As ZImagePipeline: cast to the VAE dtype, then z / scaling + shift; as its "np" output: to [0, 1] on the host.
        with torch.inference_mode():
            z = latents.to(dtype) / vae.config.scaling_factor + shift
            image = vae.decode(z, return_dict=False)[0]
            pixels = (image / 2 + 0.5).clamp(0, 1).float().cpu().numpy()
        sync()
        return pixels

    decode()  # warm-up
    out["unprofiled_ms"] = median_ms(decode, 3)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="vae-prof-") as tmp:
        out["profile"] = KernelProfiler(Path(tmp)).run("vae-diffusers", decode,
                                                         empty_note="torch profiler saw no CUDA kernels")
    if cuda:
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return out


def run_json_child(child_args: list[str], env: dict | None, timeout: float) -> dict:
    """This script as a child that writes its result to --child-out; errors and timeouts recorded."""
    if timeout < 20:
        return {"skipped": "time budget"}
    with tempfile.TemporaryDirectory(prefix="profile-child-") as tmp:
        child_out = Path(tmp) / "out.json"
        command = [sys.executable, "-m", "benchmarks.gpu.profile", *child_args, "--child-out", str(child_out)]
        started = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=timeout)
            tail, rc = proc.stdout[-3000:], proc.returncode
        except subprocess.TimeoutExpired as exc:
            tail, rc = _text(exc.stdout)[-3000:], "timeout"
        seconds = time.perf_counter() - started
        if child_out.exists():
            result = json.loads(child_out.read_text())
        else:
            result = {"error": f"the child wrote no result (exit {rc})"}
        result["child_seconds"] = seconds
        result["child_rc"] = rc
        if "error" in result:
            result["output_tail"] = tail
            log(f"[child] {' '.join(child_args[:2])} ERROR: {last_line(result['error'])}\n{tail[-1500:]}")
        return result


def vae_child(args) -> int:
    try:
        result = vae_child_diffusers(args)
    except Exception:  # noqa: BLE001
        result = {"error": error_text()}
    Path(args.child_out).write_text(json.dumps(result, indent=2, default=str))
    return 0


def denoise_child(args) -> int:
    try:
        result = profile_image.diffusers_side(args, KernelProfiler, median_ms)
    except Exception:  # noqa: BLE001
        result = {"error": error_text()}
    Path(args.child_out).write_text(json.dumps(result, indent=2, default=str))
    return 0


# --- case: sweep -------------------------------------------------------------------------------------


def sweep_child(args) -> int:
    """Both sides of one model under this process's MLX graph settings -> one JSON line (no torch here)."""
    result: dict = {"model": args.sweep_child, "env": {k: os.environ.get(k) for k in GRAPH_VARS}}
    try:
        import mlxrunner  # noqa: F401, I001
        import mlx.core as mx

        from benchmarks.gpu.llm_bench import Ours, Peer, _sync_all, prompt

        result["mlx"] = getattr(mx, "__version__", "?")
        result["device"] = str(mx.default_device())
        folder = args.models_dir / args.sweep_child
        ids = prompt(PROMPT_TOKENS)
        sides = {cls.name: cls(folder, CHUNK) for cls in (Ours, Peer)}

        def run(side, n: int) -> float:
            gen = side.start(ids)
            next(gen)
            _sync_all(mx)
            started = time.perf_counter()
            for _ in range(n - 1):
                next(gen)
            _sync_all(mx)
            seconds = time.perf_counter() - started
            side.finish(mx, gen)
            return (n - 1) / seconds

        for side in sides.values():
            run(side, 64)  # warm-up
        rates: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(2):
            for name in SIDES if r % 2 == 0 else SIDES[::-1]:
                rates[name].append(run(sides[name], 128))
        result["tok_s_rounds"] = rates
        result["tok_s"] = {name: statistics.median(v) for name, v in rates.items()}
        result["ratio_ours_over_mlx_lm"] = result["tok_s"]["ours"] / result["tok_s"]["mlx-lm"]
    except Exception:  # noqa: BLE001
        result["error"] = error_text()
    print(SWEEP_MARK + json.dumps(result), flush=True)
    return 0


def case_sweep(args, report: dict, save, deadline: float) -> None:
    section = report.setdefault("sweep", {"settings": {
        "prompt": PROMPT_TOKENS, "warmup_tokens": 64, "decode_tokens": 128, "rounds": 2,
        "tok_s": "over tokens 2..128, median of the rounds"}, "rows": []})
    for label, overrides in SWEEP_SETTINGS:
        for model in args.sweep_models:
            row: dict = {"setting": label, "env": overrides, "model": model}
            section["rows"].append(row)
            remaining = deadline - time.perf_counter()
            if remaining < 30:
                row["skipped"] = "time budget"
                continue
            if not (args.models_dir / model / "config.json").exists():
                row["error"] = f"{args.models_dir / model}/config.json missing"
                continue
            env = {k: v for k, v in os.environ.items() if k not in GRAPH_VARS}
            env.update(overrides)
            command = [sys.executable, "-m", "benchmarks.gpu.profile", "--sweep-child", model,
                       "--models-dir", str(args.models_dir), "--out", str(args.out)]
            log(f"[sweep] {label} {model}")
            started = time.perf_counter()
            try:
                proc = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, timeout=min(SWEEP_TIMEOUT_S, remaining - 10))
                lines = [line for line in proc.stdout.splitlines() if line.startswith(SWEEP_MARK)]
                if lines:
                    row.update(json.loads(lines[-1][len(SWEEP_MARK):]))
                else:
                    row["error"] = f"no result line (exit {proc.returncode})"
                if "error" in row:
                    row["output_tail"] = proc.stdout[-2000:]
            except subprocess.TimeoutExpired:
                row["error"] = "timeout"
            except Exception:  # noqa: BLE001
                row["error"] = error_text()
            row["seconds"] = time.perf_counter() - started
            if "tok_s" in row:
                log(f"[sweep] {label} {model}: ours {row['tok_s']['ours']:.1f} tok/s, mlx-lm "
                    f"{row['tok_s']['mlx-lm']:.1f}, ratio {row['ratio_ours_over_mlx_lm']:.3f}")
            else:
                log(f"[sweep] {label} {model}: ERROR {last_line(row.get('error', '?'))}")
            save()


# --- environment and the summary ---------------------------------------------------------------------


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in importlib.metadata.distributions():  # metadata only: nothing imported (torch stays out)
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("mlx") or name in ("torch", "diffusers", "transformers", "numpy"):
            out[name] = dist.version
    try:
        out["repo_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001  (informative only)
        out["repo_commit"] = None
    return out


def gpu_name() -> str | None:
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return smi.stdout.strip() or None if smi.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _cats(summary: dict, per: int = 1, digits: int = 1) -> str:
    cats = summary.get("categories_ms", {})
    return " | ".join(_f(cats.get(c, 0.0) / per, digits) for c in CATEGORY_NAMES)


def _profile_row(cells: list[str], unprofiled_ms, p: dict, per: int, digits: int, sum_digits: int) -> str:
    """A markdown row of one profiled region: its label cells, then its figures per token / decode / step."""
    busy = None if p["busy_ms"] is None else p["busy_ms"] / per
    return ("| " + " | ".join(cells) + f" | {_f(unprofiled_ms, digits)} | {_f(p['wall_ms'] / per, digits)} | "
            f"{p['kernels'] / per:.0f} | {_f(p['kernel_sum_ms'] / per, sum_digits)} | {_f(busy, sum_digits)} | "
            f"{_pct(p['busy_fraction'])} | {_cats(p, per, sum_digits)} |")


def _missing_row(cells: list[str], r: dict) -> str:
    """The row of a region that has no profile: why (skipped, or its error's last line)."""
    reason = r.get("skipped") or last_line(r.get("error", "not run"))
    return "| " + " | ".join(cells) + f" | {reason} |" + " |" * (5 + len(CATEGORY_NAMES))


def _profile_head(labels: list[str]) -> list[str]:
    """The header and rule of a table of _profile_row / _missing_row rows with these label columns."""
    columns = [*labels, "ms unprofiled", "ms profiled", "kernels", "kernel-sum ms", "busy ms", "busy", *CATEGORY_NAMES]
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _top_lines(label: str, summary: dict, per: int, n: int = 5, unit: str | None = None) -> list[str]:
    unit = unit or ("ms/token" if per > 1 else "ms")
    items = [f"`{t['name'][:70]}` {t['count'] / per:.1f}x {t['total_ms'] / per:.3f} {unit} ({_pct(t['share'])})"
             for t in summary.get("top", [])[:n]]
    return [f"- {label}: " + ("; ".join(items) if items else summary.get("note", "no kernels"))]


def _ncu_lines(label: str, ncu: dict | None, per: int) -> list[str]:
    if not ncu:
        return []
    if "summary" not in ncu:
        reason = ncu.get("skipped") or last_line(ncu.get("error", "?"))
        return [f"- {label}: ncu fallback failed: {reason}"]
    s = ncu["summary"]
    start = (ncu.get("child") or {}).get("cudaProfilerStart")
    warn = f" (cudaProfilerStart returned {start})" if start else ""
    unit = "token" if per > 1 else "decode"
    return [f"- {label}: ncu fallback{warn} ({per} {unit}{'s' if per > 1 else ''}): {s['kernels'] / per:.1f} kernels "
            f"and {s['kernel_sum_ms'] / per:.3f} ms per {unit}; categories ms: "
            + ", ".join(f"{c} {ms / per:.3f}" for c, ms in s["categories_ms"].items() if ms)]


def markdown(report: dict) -> str:
    v = report.get("versions", {})
    lines = [f"# GPU kernel profile: {report.get('gpu') or 'no nvidia-smi'}", "",
             "versions: " + ", ".join(f"{k} {v[k]}" for k in ("mlx", "mlx-cuda", "mlx-cuda-13", "mlx-lm", "torch",
                                                             "diffusers") if k in v)
             + f"; commit {str(v.get('repo_commit'))[:10]}; MLX device {report.get('mlx_device', '?')}", ""]
    if "llm" in report:
        llm = report["llm"]
        tokens = llm["settings"]["profiled_tokens"]
        lines += [f"## LLM decode (prompt {PROMPT_TOKENS}, {tokens} profiled tokens; per token)", "",
                  *_profile_head(["model", "side"])]
        notes = []
        for model, entry in llm["models"].items():
            for side in SIDES:
                r = entry.get(side, {})
                p = r.get("profile")
                if not p:
                    lines.append(_missing_row([model, side], r))
                    continue
                lines.append(_profile_row([model, side], r["unprofiled_ms_per_token"], p, tokens, 2, 3))
                notes += _top_lines(f"{model} {side}", p, tokens)
                notes += _ncu_lines(f"{model} {side}", r.get("ncu"), NCU_TOKENS)
        lines += ["", "Top kernels (count and ms per token):", "", *notes, ""]
    if "pcache" in report and "profile" in report["pcache"]:
        pc = report["pcache"]
        lines += [f"## Prompt cache, {pc['settings']['model']}: the second request ({pc['settings']['prompt']}-token "
                  f"prompt cached, + {pc['settings']['follow_up']})", "",
                  "Unprofiled medians: " + ", ".join(f"{k} {_f(v, 1)} ms" for k, v in pc["unprofiled_ms"].items()),
                  "", *_profile_head(["request"]),
                  _profile_row(["second"], pc["unprofiled_ms"]["second (prompt cached)"], pc["profile"], 1, 1, 2),
                  "", *_top_lines("second request", pc["profile"], 1), ""]
    if "batch" in report and "profile" in report["batch"]:
        bt = report["batch"]
        s = bt["settings"]
        lines += [f"## Batched decode, {s['model']}: {s['rows']} sequences of different lengths, per step", "",
                  *_profile_head(["rows"]),
                  _profile_row([str(s["rows"])], bt["unprofiled_ms_per_step"], bt["profile"], s["steps"], 1, 2),
                  "", *_top_lines("batch step", bt["profile"], s["steps"], unit="ms/step"), ""]
    if "vae" in report:
        vae = report["vae"]
        s = vae["settings"]
        lines += [f"## VAE decode, {s['image']}x{s['image']} ({s['model']})", "", *_profile_head(["side"])]
        notes = []
        for side in ("ours", "diffusers"):
            r = vae.get(side, {})
            p = r.get("profile")
            if not p:
                lines.append(_missing_row([side], r))
                continue
            lines.append(_profile_row([side], r.get("unprofiled_ms"), p, 1, 1, 1))
            notes += _top_lines(side, p, 1)
            notes += _ncu_lines(side, r.get("ncu"), 1)
        lines += ["", "Top kernels (count and ms per decode):", "", *notes, ""]
    if "denoise" in report:
        lines += profile_image.markdown_lines(report["denoise"], head=_profile_head, row=_profile_row,
                                              missing_row=_missing_row, top_lines=_top_lines, f=_f)
    if "sweep" in report:
        lines += ["## MLX CUDA graph settings vs decode tok/s (prompt 128, tokens 2..128, median of 2)", "",
                  "| setting | model | ours tok/s | mlx-lm tok/s | ours / mlx-lm |", "|---|---|---|---|---|"]
        for row in report["sweep"]["rows"]:
            if "tok_s" in row:
                lines.append(f"| {row['setting']} | {row['model']} | {_f(row['tok_s']['ours'], 1)} | "
                             f"{_f(row['tok_s']['mlx-lm'], 1)} | {_f(row['ratio_ours_over_mlx_lm'], 3)} |")
            else:
                reason = row.get("skipped") or last_line(row.get("error", "?"))
                lines.append(f"| {row['setting']} | {row['model']} | {reason} | | |")
        lines.append("")
    errors = report.get("errors", {})
    if errors:
        lines += ["## Section errors", ""] + [f"- {k}: {last_line(e)}" for k, e in errors.items()] + [""]
    lines.append(f"total {report.get('wall_s', 0):.0f} s")
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--llm-models", default=",".join(DEFAULT_LLMS))
    parser.add_argument("--sweep-models", default=",".join(DEFAULT_SWEEP_MODELS))
    parser.add_argument("--tokens", type=int, default=32, help="profiled decode tokens per side")
    parser.add_argument("--vae-latent", type=int, default=128, help="latent height = width (128: a 1024² image)")
    parser.add_argument("--denoise-steps", type=int, default=2, help="denoising steps profiled per side")
    parser.add_argument("--denoise-size", type=int, default=1024, help="image side of the denoise case")
    parser.add_argument("--keep-traces", action="store_true",
                        help="keep every region's chrome trace under 5 MB (gzipped in OUT), not only the smallest")
    parser.add_argument("--budget-s", type=float, default=560,
                        help="skip sections that would start past this many seconds (the device's limit is 600)")
    # internal modes (this script as its own child)
    parser.add_argument("--sweep-child", help=argparse.SUPPRESS)
    parser.add_argument("--vae-child", help=argparse.SUPPRESS)
    parser.add_argument("--denoise-child", help=argparse.SUPPRESS)
    parser.add_argument("--ncu-child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    args.llm_models = [m.strip() for m in args.llm_models.split(",") if m.strip()]
    args.sweep_models = [m.strip() for m in args.sweep_models.split(",") if m.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sweep_child:
        return sweep_child(args)
    if args.vae_child:
        return vae_child(args)
    if args.denoise_child:
        return denoise_child(args)
    if args.ncu_child:
        return ncu_child(args)

    started = time.perf_counter()
    deadline = started + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": sys.argv, "settings": {"cases": args.cases, "llm_models": args.llm_models,
                                                       "sweep_models": args.sweep_models, "tokens": args.tokens},
                    "gpu": gpu_name(), "versions": versions(), "errors": {}}

    def save() -> None:
        report["wall_s"] = time.perf_counter() - started
        (args.out / "profile.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (args.out / "profile.md").write_text(markdown(report) + "\n")

    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        report["errors"]["cases"] = f"unknown case(s) {unknown}; known: {', '.join(CASES)}"
    mx = None
    if {"llm", "pcache", "batch", "vae", "denoise"} & set(args.cases):
        try:
            import mlxrunner  # noqa: F401, I001  (first: MLX's CUDA libraries load before torch's)
            import mlx.core as mx

            report["mlx_device"] = str(mx.default_device())
        except Exception:  # noqa: BLE001
            report["errors"]["import mlx"] = error_text()
    save()
    tmp = Path(tempfile.mkdtemp(prefix="mlx-profile-"))
    profiler = KernelProfiler(tmp)
    try:
        for case in CASES:
            if case not in args.cases:
                continue
            if time.perf_counter() > deadline:
                report["errors"][case] = "skipped: time budget"
                continue
            log(f"== {case}")
            try:
                if case == "llm":
                    case_llm(mx, args, report, profiler, save, deadline)
                elif case == "pcache":
                    case_pcache(mx, args, report, profiler, save, deadline)
                elif case == "batch":
                    case_batch(mx, args, report, profiler, save, deadline)
                elif case == "vae":
                    case_vae(mx, args, report, profiler, save, deadline)
                elif case == "denoise":
                    profile_image.case_denoise(mx, args, report, profiler, save, deadline, median_ms=median_ms,
                                               free=free, diffusers_child=diffusers_child, log=log,
                                               error_text=error_text)
                else:
                    case_sweep(args, report, save, deadline)
            except Exception:  # noqa: BLE001  (one case's failure must not stop the others)
                report["errors"][case] = error_text()
                log(f"[{case}] ERROR\n{report['errors'][case]}")
            save()
        try:
            report["kept_trace"] = profiler.keep_small_traces(args.out, every=args.keep_traces)
        except Exception:  # noqa: BLE001
            report["errors"]["keep trace"] = error_text()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            save()
            log("")
            log((args.out / "profile.md").read_text())
        except Exception:  # noqa: BLE001
            log(error_text())
    return 0


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001  (always exit 0; what is known is already written)
        traceback.print_exc()
    sys.exit(0)
