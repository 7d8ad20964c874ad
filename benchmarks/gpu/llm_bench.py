"""LLM prefill and decode on one GPU: ours (mlxrunner's C++ loop) against mlx-lm, same weights, same MLX.

    python -m benchmarks.gpu.llm_bench --models-dir DIR --out FILE.json \\
        [--only qwen3-0.6b,qwen3-4b,llama3-8b | tiny] [--prompt 1024] [--decode 256] [--rounds 3] \\
        [--chunk 2048] [--bandwidth-gib 2] [--build-only]

1. Builds the missing random-weight bf16 folders (benchmarks.gpu.llm_shapes.py), each in its own
   subprocess, so torch and its CUDA context never live in the timed process.
2. Measures the device's copy bandwidth with MLX: a bf16 array (2 GiB) negated 8 times in a chain
   per timing, (bytes read + written) / time, median of 10 after 3 warm-ups.
3. Per model: loads ours (`mlxrunner.llm.load`) and mlx-lm (`mlx_lm.load`) into this process. One
   run = a fresh generator on a `--prompt`-token prompt (ids (17*i+3) % 499), the first token (its
   time = time to first token = the prefill, tok/s = prompt / time), then `--decode` - 1 more tokens,
   batch 1, greedy (decode tok/s over those). Ours: `_core.Generator(decoder, ids, greedy, chunk)`;
   mlx-lm: `generate_step(..., prefill_step_size=chunk)`; both prefill all but the last prompt token
   in chunks of `--chunk` (2048 by default: a 1,024-token prompt is one chunk), then the last token,
   and both run one step ahead of the host. One warm-up run per side, then `--rounds` rounds, the
   sides alternating (and who goes first alternating); medians are reported.
4. Roofline for decode: bytes per token = the weights read per token (every tensor once; a tied
   embedding once, as the lm_head; an untied embedding table only one row, the gather) + the bf16 KV
   cache read at the mean context of the timed tokens (prompt + decode / 2); roofline tok/s =
   copy bandwidth / bytes per token.
5. Memory per side: weights (active memory added by the load) and the peak of a run above what
   was resident before it (`mx.reset_peak_memory()` before each run); "peak alone" = the two summed.

Writes the JSON after every model (a timeout keeps what finished) and prints a markdown table.
A model that fails is recorded with its error; the others still run; the exit status is 0.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.gpu.llm_shapes import MARKER, SHAPES  # (no torch import at module level there)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODELS = ["qwen3-0.6b", "qwen3-4b", "llama3-8b"]
SIDES = ["ours", "mlx-lm"]
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "U16": 2, "I32": 4,
               "U32": 4, "I64": 8, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
GB = 1e9


def prompt(n: int) -> list[int]:
    return [(17 * i + 3) % 499 for i in range(n)]


def log(*args) -> None:
    print(*args, flush=True)


# --- building (subprocess) -------------------------------------------------------------------------


def build(name: str, folder: Path) -> dict:
    if (folder / MARKER).exists():
        return {"built": False}
    log(f"[build] {name} -> {folder}")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu.llm_shapes", name, str(folder)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0 or not (folder / MARKER).exists():
        raise RuntimeError(f"building {name} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    log(f"[build] {name}: {seconds:.1f} s, {_folder_bytes(folder) / GB:.2f} GB on disk")
    return {"built": True, "seconds": round(seconds, 2)}


def build_quantized(name: str, bits: int, source: Path, folder: Path) -> dict:
    """mlx-lm's own converter (affine, group 64, what mlx-community publishes) on the bf16 folder: both
    sides then load the very same packed files."""
    if (folder / MARKER).exists():
        return {"built": False}
    log(f"[build] {name} -> {folder}")
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(source), "--mlx-path",
                           str(folder), "-q", "--q-bits", str(bits), "--q-group-size", "64"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"quantizing {name} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    (folder / MARKER).write_text("ok\n")
    seconds = time.perf_counter() - started
    log(f"[build] {name}: {seconds:.1f} s, {_folder_bytes(folder) / GB:.2f} GB on disk")
    return {"built": True, "seconds": round(seconds, 2)}


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


# --- weights and the roofline ------------------------------------------------------------------------


def tensor_bytes(folder: Path) -> dict[str, tuple[int, list[int]]]:
    """name -> (bytes, shape), from the safetensors headers (no data read)."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            out[name] = (end - start, info["shape"])
    return out


def roofline(folder: Path, config: dict, prompt_tokens: int, decode_tokens: int, bandwidth: float) -> dict:
    tensors = tensor_bytes(folder)
    total = sum(b for b, _ in tensors.values())
    params = sum(_numel(s) for _, s in tensors.values())
    # A quantized embedding is its packed weight plus scales (and biases): all rows of each count.
    embedding = [name for name in tensors if name.startswith("model.embed_tokens.")]
    embed_bytes = sum(tensors[name][0] for name in embedding)
    untied = "lm_head.weight" in tensors
    row = embed_bytes // tensors["model.embed_tokens.weight"][1][0]
    # Tied: the embedding is read whole as the lm_head (its gather row is in the same bytes).
    # Untied: the lm_head is read whole, the embedding table only one row (the gather).
    weights_read = total - embed_bytes + row if untied else total
    layers = config["num_hidden_layers"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_per_position = 2 * layers * kv_heads * head_dim * 2  # K and V, bf16
    # Timed tokens 2..n: the step producing token k attends over prompt + k - 1 positions.
    contexts = [prompt_tokens + k - 1 for k in range(2, decode_tokens + 1)] or [prompt_tokens]
    mean_context = statistics.fmean(contexts)
    per_token = weights_read + kv_per_position * mean_context
    return {"parameters": params, "weight_bytes_stored": total, "weight_bytes_read_per_token": weights_read,
            "tied_embeddings": not untied, "embedding_bytes": embed_bytes,
            "kv_bytes_per_position": kv_per_position, "mean_context": mean_context,
            "kv_bytes_read_per_token": kv_per_position * mean_context, "bytes_per_token": per_token,
            "copy_bandwidth_bytes_per_s": bandwidth, "tok_s": bandwidth / per_token}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- MLX -------------------------------------------------------------------------------------------


def copy_bandwidth(mx, gib: float, chain: int = 8, warmup: int = 3, reps: int = 10) -> dict:
    """(bytes read + written) / time of elementwise passes over a bf16 array (a copy's traffic)."""
    n = int(gib * 2**30) // 2
    a = mx.ones((n,), dtype=mx.bfloat16)
    mx.eval(a)
    mx.synchronize()

    def timed(passes: int) -> float:
        x = a
        for _ in range(passes):
            x = -x  # each pass reads and writes n bf16 (MLX may reuse the intermediate's buffer)
        mx.synchronize()
        started = time.perf_counter()
        mx.eval(x)
        mx.synchronize()
        seconds = time.perf_counter() - started
        del x
        return seconds

    out = {"array_bytes": 2 * n}
    for label, passes in (("single", 1), ("chain", chain)):
        for _ in range(warmup):
            timed(passes)
        times = [timed(passes) for _ in range(reps)]
        moved = 2 * (2 * n) * passes
        out[label] = {"passes": passes, "seconds": times, "bytes_per_s": moved / statistics.median(times),
                      "best_bytes_per_s": moved / min(times)}
    del a
    gc.collect()
    mx.clear_cache()
    out["bytes_per_s"] = max(out["single"]["bytes_per_s"], out["chain"]["bytes_per_s"])
    return out


class Ours:
    name = "ours"

    def __init__(self, folder: Path, chunk: int):
        from mlxrunner import _core
        from mlxrunner.llm import load
        from mlxrunner.llm.model import sampler_options
        from mlxrunner.request import Options

        self._core = _core
        self.chunk = chunk
        self.model = load(str(folder))
        self.options = sampler_options(Options(temperature=0.0, repeat_penalty=1.0, seed=1))

    def start(self, ids: list[int]):
        return self._core.Generator(self.model.decoder, ids, self.options, self.chunk)

    def finish(self, mx, generator) -> None:
        _sync_all(mx)  # the step dispatched after the last token read


class Peer:
    name = "mlx-lm"

    def __init__(self, folder: Path, chunk: int):
        import mlx_lm
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        self.chunk = chunk
        self.generate_step = generate_step
        self.sampler = make_sampler(temp=0.0)
        self.model, _ = mlx_lm.load(str(folder))

    def start(self, ids: list[int]):
        import mlx.core as mx

        steps = self.generate_step(mx.array(ids), self.model, max_tokens=-1, sampler=self.sampler,
                                   prefill_step_size=self.chunk)
        return _Tokens(steps)

    def finish(self, mx, generator) -> None:
        _sync_all(mx)
        generator.close()


class _Tokens:
    def __init__(self, steps):
        self.steps = steps

    def __next__(self) -> int:
        token, _ = next(self.steps)
        return int(token)

    def close(self) -> None:
        self.steps.close()
        self.steps = None


def _sync_all(mx) -> None:
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)
    mx.synchronize()


def one_run(mx, side, ids: list[int], n: int) -> dict:
    gc.collect()
    _sync_all(mx)
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    started = time.perf_counter()
    generator = side.start(ids)
    tokens = [next(generator)]
    first = time.perf_counter()
    tokens += [next(generator) for _ in range(n - 1)]
    done = time.perf_counter()
    side.finish(mx, generator)
    peak = mx.get_peak_memory()
    del generator
    return {"ttft_s": first - started, "decode_s": done - first, "tokens": tokens,
            "run_peak_above_resident_bytes": peak - resident}


def load_side(mx, cls, folder: Path, chunk: int):
    gc.collect()
    mx.clear_cache()
    _sync_all(mx)
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    started = time.perf_counter()
    side = cls(folder, chunk)
    _sync_all(mx)
    seconds = time.perf_counter() - started
    return side, {"load_s": seconds, "weights_bytes": mx.get_active_memory() - before,
                  "load_peak_above_before_bytes": mx.get_peak_memory() - before}


def leading_equal(a: list[int], b: list[int]) -> int:
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def bench_model(mx, name: str, folder: Path, args, bandwidth: float) -> dict:
    config = json.loads((folder / "config.json").read_text())
    result: dict = {"folder": str(folder), "architecture": (config.get("architectures") or ["?"])[0],
                    "config": {k: config.get(k) for k in (
                        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                        "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings", "rope_theta",
                        "rms_norm_eps", "dtype", "torch_dtype")}}
    result["roofline"] = roofline(folder, config, args.prompt, args.decode, bandwidth)
    ids = prompt(args.prompt)
    sides, memory = {}, {}
    try:
        for cls in (Ours, Peer):
            log(f"[{name}] loading {cls.name}")
            sides[cls.name], memory[cls.name] = load_side(mx, cls, folder, args.chunk)
        for side in SIDES:  # warm-up: one full run each
            log(f"[{name}] warm-up {side}")
            warm = one_run(mx, sides[side], ids, args.decode)
            memory[side]["warmup_s"] = warm["ttft_s"] + warm["decode_s"]
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        for r in range(args.rounds):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                run = one_run(mx, sides[side], ids, args.decode)
                runs[side].append(run)
                log(f"[{name}] round {r + 1} {side}: ttft {1000 * run['ttft_s']:.1f} ms, "
                    f"decode {(args.decode - 1) / run['decode_s']:.1f} tok/s")
    finally:
        sides.clear()
        gc.collect()
        mx.clear_cache()

    for side in SIDES:
        ttft = statistics.median(r["ttft_s"] for r in runs[side])
        decode = statistics.median(r["decode_s"] for r in runs[side])
        extra = max(r["run_peak_above_resident_bytes"] for r in runs[side])
        result.setdefault("prefill", {})[side] = {
            "ttft_s": [r["ttft_s"] for r in runs[side]], "median_s": ttft, "tok_s": args.prompt / ttft}
        result.setdefault("decode", {})[side] = {
            "seconds": [r["decode_s"] for r in runs[side]], "median_s": decode,
            "tok_s": (args.decode - 1) / decode if args.decode > 1 else None}
        memory[side]["run_peak_above_resident_bytes"] = extra
        memory[side]["peak_alone_bytes"] = memory[side]["weights_bytes"] + extra
        memory[side]["rounds_identical"] = all(r["tokens"] == runs[side][0]["tokens"] for r in runs[side])
    result["memory"] = memory
    pre, dec = result["prefill"], result["decode"]
    result["prefill_ratio_ours_over_mlx_lm"] = pre["ours"]["tok_s"] / pre["mlx-lm"]["tok_s"]
    if args.decode > 1:
        result["decode_ratio_ours_over_mlx_lm"] = dec["ours"]["tok_s"] / dec["mlx-lm"]["tok_s"]
        roof = result["roofline"]["tok_s"]
        result["roofline"]["ours_fraction"] = dec["ours"]["tok_s"] / roof
        result["roofline"]["mlx_lm_fraction"] = dec["mlx-lm"]["tok_s"] / roof
    ours_tokens, peer_tokens = runs["ours"][0]["tokens"], runs["mlx-lm"][0]["tokens"]
    result["greedy_agreement"] = {
        "leading_ids_equal": leading_equal(ours_tokens, peer_tokens), "of": len(ours_tokens),
        "first_token_equal": ours_tokens[0] == peer_tokens[0],
        "ours_ids": ours_tokens, "mlx_lm_ids": peer_tokens}
    return result


# --- reporting -------------------------------------------------------------------------------------


def versions(mx) -> dict:
    out = {"python": platform.python_version(), "mlx.__version__": getattr(mx, "__version__", "?")}
    for dist in importlib.metadata.distributions():
        dist_name = (dist.metadata["Name"] or "").lower()
        if dist_name.startswith("mlx") or dist_name in ("transformers", "torch", "safetensors", "numpy"):
            out[dist_name] = dist.version
    import mlxrunner

    out["mlxrunner.__file__"] = mlxrunner.__file__
    out["mlxrunner.cpu_blas"] = getattr(mlxrunner, "cpu_blas", None)
    try:
        out["repo_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout
        out["repo_dirty"] = bool(dirty.strip())
    except Exception:  # noqa: BLE001  (informative only)
        out["repo_commit"] = None
    return out


def host_cpu() -> str:
    """The host's CPU model, core count and clock as Linux reports it: a host-bound figure (the prompt cache's
    follow-up) moves with the host between machines of the same GPU (sessions 36-41's H100s). A virtual machine may
    name its CPU only "Intel(R) Xeon(R) Processor"; its clock then still tells hosts apart."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or "unknown CPU"
    clock = f", {float(fields['cpu MHz']):.0f} MHz" if fields.get("cpu MHz") else ""
    return f"{model}, {os.cpu_count()} cores{clock}"


def device(mx) -> dict:
    out = {"default_device": str(mx.default_device()), "host_cpu": host_cpu()}
    if hasattr(mx, "device_info"):
        try:
            out["device_info"] = mx.device_info()
        except Exception as exc:  # noqa: BLE001
            out["device_info"] = f"error: {exc}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.memory,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            out["nvidia_smi"] = smi.stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return out


def _f(x, digits=1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _b(n: float) -> str:
    return f"{n / GB:.3f} GB" if n >= 0.1 * GB else f"{n / 1e6:.3f} MB"


def table(report: dict) -> str:
    lines = ["| model | prefill ours tok/s | mlx-lm | ratio | decode ours tok/s | mlx-lm | ratio | roofline tok/s "
             "| ours % | mlx-lm % |", "|" + "---|" * 10]
    notes = []
    for name, r in report["models"].items():
        if "error" in r:
            lines.append(f"| {name} | error | | | | | | | | |")
            notes.append(f"{name}: {r['error'].strip().splitlines()[-1]}")
            continue
        pre, dec, roof = r["prefill"], r["decode"], r["roofline"]
        lines.append(
            f"| {name} | {_f(pre['ours']['tok_s'])} | {_f(pre['mlx-lm']['tok_s'])} | "
            f"{_f(r['prefill_ratio_ours_over_mlx_lm'], 2)}x | {_f(dec['ours']['tok_s'])} | "
            f"{_f(dec['mlx-lm']['tok_s'])} | {_f(r.get('decode_ratio_ours_over_mlx_lm'), 2)}x | "
            f"{_f(roof['tok_s'])} | {_f(100 * roof.get('ours_fraction', 0))} | "
            f"{_f(100 * roof.get('mlx_lm_fraction', 0))} |")
        g, m = r["greedy_agreement"], r["memory"]
        notes.append(
            f"{name}: greedy ids agree {g['leading_ids_equal']}/{g['of']} leading; bytes/token "
            f"{_b(roof['bytes_per_token'])} (weights {_b(roof['weight_bytes_read_per_token'])} + KV "
            f"{_b(roof['kv_bytes_read_per_token'])} at mean context {roof['mean_context']:.0f}); memory "
            + "; ".join(f"{s} weights {_b(m[s]['weights_bytes'])} + run peak "
                        f"{_b(m[s]['run_peak_above_resident_bytes'])}, load {m[s]['load_s']:.1f} s"
                        for s in SIDES))
    bw = report["copy_bandwidth"]
    head = (f"copy bandwidth (MLX, {bw['array_bytes'] / 2**30:.2f} GiB bf16, read+write): "
            f"{bw['bytes_per_s'] / GB:,.0f} GB/s (single pass {bw['single']['bytes_per_s'] / GB:,.0f}, "
            f"chain of {bw['chain']['passes']} {bw['chain']['bytes_per_s'] / GB:,.0f}); "
            f"prompt {report['settings']['prompt']} tokens, decode {report['settings']['decode']} "
            f"(tok/s over the last {report['settings']['decode'] - 1}), chunk {report['settings']['chunk']} both "
            f"sides, {report['settings']['rounds']} rounds, medians; ratio = ours / mlx-lm (> 1: ours faster)")
    return "\n".join([head, "", *lines, "", *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--only", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated, of: {', '.join(SHAPES)} (default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--decode", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk, both sides")
    parser.add_argument("--bandwidth-gib", type=float, default=None,
                        help="bandwidth array size (default 2 GiB; 0.25 on a CPU device)")
    parser.add_argument("--quantize", default="",
                        help="comma-separated bits (e.g. 4,8): also run NAME-qB, mlx-lm's affine group-64 "
                             "conversion of each model (instead of the bf16 model, with --quantized-only)")
    parser.add_argument("--quantized-only", action="store_true", help="skip the bf16 runs of --quantize models")
    parser.add_argument("--build-only", action="store_true", help="build the missing folders and exit")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(SHAPES)}")
    args.models_dir.mkdir(parents=True, exist_ok=True)

    report: dict = {"settings": {"models": names, "prompt": args.prompt, "decode": args.decode,
                                 "rounds": args.rounds, "chunk": args.chunk, "prompt_ids": "(17*i+3) % 499",
                                 "sampling": "greedy (temperature 0), batch 1"},
                    "builds": {}, "models": {}}
    for name in names:  # torch lives only in these subprocesses
        try:
            report["builds"][name] = build(name, args.models_dir / name)
        except Exception:  # noqa: BLE001
            report["builds"][name] = {"error": traceback.format_exc()}
            log(report["builds"][name]["error"])
    quantized = []
    for bits in [int(b) for b in args.quantize.split(",") if b.strip()]:
        for name in names:
            qname = f"{name}-q{bits}"
            quantized.append(qname)
            try:
                if "error" in report["builds"][name]:
                    raise RuntimeError("the bf16 build failed")
                report["builds"][qname] = build_quantized(qname, bits, args.models_dir / name,
                                                          args.models_dir / qname)
            except Exception:  # noqa: BLE001
                report["builds"][qname] = {"error": traceback.format_exc()}
                log(report["builds"][qname]["error"])
    names = (quantized if args.quantized_only else names + quantized)
    report["settings"]["models"] = names
    if args.build_only:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        return 0

    import mlxrunner  # noqa: F401, I001  (before mlx.core, as the other benchmarks do)
    import mlx.core as mx

    report["versions"] = versions(mx)
    report["device"] = device(mx)
    log(f"[env] {report['versions']}")
    log(f"[env] {report['device']}")
    gib = args.bandwidth_gib if args.bandwidth_gib is not None else (
        0.25 if "cpu" in str(mx.default_device()) else 2.0)
    report["copy_bandwidth"] = copy_bandwidth(mx, gib)
    bandwidth = report["copy_bandwidth"]["bytes_per_s"]
    log(f"[bandwidth] {bandwidth / GB:,.1f} GB/s")

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")

    save()
    for name in names:
        started = time.perf_counter()
        try:
            if "error" in report["builds"][name]:
                raise RuntimeError("the build failed: " + report["builds"][name]["error"])
            report["models"][name] = bench_model(mx, name, args.models_dir / name, args, bandwidth)
        except Exception:  # noqa: BLE001  (one model's failure must not stop the others)
            report["models"][name] = {"error": traceback.format_exc()}
            log(f"[{name}] ERROR\n{report['models'][name]['error']}")
        report["models"][name]["wall_s"] = time.perf_counter() - started
        gc.collect()
        mx.clear_cache()
        save()
    text = table(report)
    report["table"] = text
    save()
    log("")
    log(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
