"""The measuring switch MLXRUNNER_GROUPED_PRODUCT_ROWS (nn/linear.cpp): on CUDA, half-precision products of 2 to N
rows run as gather_mm on one weight (a CUTLASS grouped GEMM) instead of cuBLAS. Switched on in a subprocess, a
Linear's product of 1 to 64 rows, and of a batch of sequences, must be x @ W.T to bfloat16 precision, and a bfloat16
copy of the tiny Qwen3 must give a prompt's logits as it does without the switch (to bfloat16 precision: the two
GEMMs sum in different orders). CUDA only: elsewhere the switch changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ON_GPU

ON_CUDA = ON_GPU and mx.cuda.is_available()
ROOT = Path(__file__).resolve().parents[2]
QWEN3 = ROOT / "tests" / "fixtures" / "llm" / "qwen3-tiny"

PRODUCTS = r"""
import json
import mlxrunner
import mlx.core as mx
from mlxrunner import _core

mx.random.seed(0)
worst = 0.0
w = (mx.random.normal((384, 256)) * 0.05).astype(mx.bfloat16)
for shape in [(1, 1), (1, 2), (1, 7), (1, 33), (1, 64), (3, 5), (2, 32)]:
    x = mx.random.normal((*shape, 256)).astype(mx.bfloat16)
    got = _core.linear(x, w, None).astype(mx.float32)
    want = (x.astype(mx.float32) @ w.astype(mx.float32).T)
    assert got.shape == want.shape, (got.shape, want.shape)
    worst = max(worst, (mx.abs(got - want).max() / mx.abs(want).max()).item())
print(json.dumps({"worst": worst}))
"""

LOGITS = r"""
import json, sys
import mlxrunner
from mlxrunner.llm import load

model = load(sys.argv[1])
print(json.dumps([model.logits(list(range(3, 3 + n))).tolist() for n in (2, 9, 40)]))
"""


def run(script: str, *args: str, rows: str | None) -> object:
    env = dict(os.environ)
    env.pop("MLXRUNNER_GROUPED_PRODUCT_ROWS", None)
    if rows is not None:
        env["MLXRUNNER_GROUPED_PRODUCT_ROWS"] = rows
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not ON_CUDA, reason="the switch acts on CUDA only")
def test_grouped_products_are_the_products():
    assert run(PRODUCTS, rows="64")["worst"] < 1e-2  # bfloat16 outputs, float32 accumulation on both sides


@pytest.mark.skipif(not ON_CUDA, reason="the switch acts on CUDA only")
def test_a_models_logits_do_not_change_with_grouped_products(tmp_path):
    bf16 = tmp_path / "qwen3-tiny-bf16"  # the float32 fixture's products would take cuBLAS either way
    shutil.copytree(QWEN3, bf16)
    weights = mx.load(str(bf16 / "model.safetensors"))
    mx.save_safetensors(str(bf16 / "model.safetensors"),
                        {name: value.astype(mx.bfloat16) for name, value in weights.items()}, metadata={"format": "pt"})
    grouped, plain = run(LOGITS, str(bf16), rows="64"), run(LOGITS, str(bf16), rows=None)
    for got, want in zip(grouped, plain):
        got, want = np.array(got), np.array(want)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 0.1 + 1e-2 * np.abs(want).max()  # conftest's bf16 logits tolerance on CUDA
