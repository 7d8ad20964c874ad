"""The measuring switches of the C++ core, each switched on in a subprocess on CUDA (elsewhere they change nothing):

- MLXRUNNER_HALF_MATVEC=1: half-precision weights' decode products (1 to 8 rows) through our tensor-core kernel, with
  its fused norms, RoPE and gated SiLU (nn/cuda_matvec.h);
- MLXRUNNER_KERNEL_SOURCES_BY_PATH=1: our kernels' sources handed to MLX as one #include line
  (nn/cuda_kernel_common.h);
- MLXRUNNER_HOST_INTS_BY_KERNEL=1: a prompt's tokens written to device memory by a kernel whose parameters carry them
  (nn/cuda_host_ints.h) instead of read by the GPU from MLX's managed array;
- MLXRUNNER_EARLY_DISPATCH=3: a waited-for forward queued to the device after its first layer, then every 3 layers
  (text/decoder.cpp's LayerPacer), instead of after every layer.

Under each, a Linear's product of 1 to 64 rows, and of a batch of sequences, must be x @ W.T to bfloat16 precision,
and a bfloat16 copy of the tiny Qwen3 must give prompts' logits (2, 5, 9 and 40 tokens: one forward each, so the
decode kernels' row counts and beyond) as it does without the switch, to bfloat16 precision: the products may sum in
another order.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ON_GPU, bf16_model_copy, run_script_json

ON_CUDA = ON_GPU and mx.cuda.is_available()
ROOT = Path(__file__).resolve().parents[2]
QWEN3 = ROOT / "tests" / "fixtures" / "llm" / "qwen3-tiny"
SWITCHES = [("MLXRUNNER_HALF_MATVEC", "1"), ("MLXRUNNER_KERNEL_SOURCES_BY_PATH", "1"),
            ("MLXRUNNER_HOST_INTS_BY_KERNEL", "1"), ("MLXRUNNER_EARLY_DISPATCH", "3")]

PRODUCTS = r"""
import json
import mlxrunner
import mlx.core as mx
from mlxrunner import _core

mx.random.seed(0)
worst = 0.0
w = (mx.random.normal((384, 256)) * 0.05).astype(mx.bfloat16)
for shape in [(1, 1), (1, 2), (1, 7), (1, 8), (1, 33), (1, 64), (3, 5), (2, 32)]:
    x = mx.random.normal((*shape, 256)).astype(mx.bfloat16)
    got = _core.linear(x, w, None).astype(mx.float32)
    want = (x.astype(mx.float32) @ w.astype(mx.float32).T)
    assert got.shape == want.shape, (got.shape, want.shape)
    worst = max(worst, (mx.abs(got - want).max() / mx.abs(want).max()).item())
print(json.dumps({"worst": worst}))
"""

MODEL = r"""
import json, sys
import mlxrunner
from mlxrunner.llm import load

model = load(sys.argv[1])
print(json.dumps({"logits": [model.logits(list(range(3, 3 + n))).tolist() for n in (2, 5, 9, 40)]}))
"""


def run(script: str, *args: str, switch: tuple[str, str] | None) -> dict:
    """The script with every measuring switch unset, then `switch` (name, value) set."""
    return run_script_json(script, *args, unset=dict(SWITCHES), environment=dict([switch]) if switch else None)


@pytest.fixture(scope="module")
def bf16_qwen3(tmp_path_factory) -> Path:
    # float32 products would take cuBLAS anyway
    return bf16_model_copy(QWEN3, tmp_path_factory.mktemp("switches") / "qwen3-tiny-bf16")


@pytest.mark.skipif(not ON_CUDA, reason="the switches act on CUDA only")
@pytest.mark.parametrize("switch", SWITCHES, ids=[name for name, _ in SWITCHES])
def test_products_under_the_switch_are_the_products(switch):
    assert run(PRODUCTS, switch=switch)["worst"] < 1e-2  # bfloat16 outputs, float32 sums on both sides


@pytest.mark.skipif(not ON_CUDA, reason="the switches act on CUDA only")
@pytest.mark.parametrize("switch", SWITCHES, ids=[name for name, _ in SWITCHES])
def test_a_models_logits_do_not_change_under_the_switch(switch, bf16_qwen3):
    switched, plain = run(MODEL, str(bf16_qwen3), switch=switch), run(MODEL, str(bf16_qwen3), switch=None)
    for got, want in zip(switched["logits"], plain["logits"]):
        got, want = np.array(got), np.array(want)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 0.1 + 1e-2 * np.abs(want).max()  # conftest's bf16 logits tolerance on CUDA


SOURCES_IN_ONE_PROCESS = r"""
import glob, json, os, sys, tempfile
import mlxrunner
from mlxrunner import _core
from mlxrunner.llm import load

model = load(sys.argv[1])
ids = list(range(3, 43))
pattern = os.path.join(tempfile.gettempdir(), "mlxrunner-kernels-*", "*.cuh")
seen, files = {}, []
for setting in ("0", "1", "0"):
    os.environ["MLXRUNNER_KERNEL_SOURCES_BY_PATH"] = setting
    _core.reread_switches()
    seen.setdefault(setting, []).append(model.logits(ids).tolist())
    files.append(set(glob.glob(pattern)))
print(json.dumps({"logits": seen, "included_files": len(files[1] - files[0])}))
"""


@pytest.mark.skipif(not ON_CUDA, reason="the switches act on CUDA only")
def test_the_kernel_sources_switch_takes_effect_within_a_process(bf16_qwen3):
    """Our kernels choose their form (the source, or one #include line of it) at each call, so a benchmark can time
    both in one process (follow_up_slack.py --same-process): the same kernels, the same bits either way, and the
    included form's files written when it is turned on."""
    got = run(SOURCES_IN_ONE_PROCESS, str(bf16_qwen3), switch=None)
    plain, included = got["logits"]["0"], got["logits"]["1"]
    assert plain[0] == plain[1] == included[0]
    assert got["included_files"] > 0
