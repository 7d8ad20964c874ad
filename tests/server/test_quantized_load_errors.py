"""A broken quantized checkpoint stops the runner at load: exit 1, `Error:` naming the tensor and why."""

from __future__ import annotations

import mlx.core as mx
import pytest
from conftest import run_cli
from mflux_writer import write_mflux_folder
from quant_helpers import BAD_CASES

# The four the issue names; tests/unit/test_store_quant.py covers every case at the store level.
CASES = ["truncated-scales", "group-does-not-divide", "mode-mlx-lacks", "3-bits-mxfp4"]


@pytest.mark.parametrize("case", CASES)
def test_bad_quantized_llm_exits_1_naming_the_tensor(tmp_path, case):
    bad = BAD_CASES[case]
    result = run_cli("--model", str(bad.build(tmp_path / "m")), "--port", "0")
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: ") and f"tensor '{bad.tensor}': " in line, line
    assert all(e in line for e in bad.expected), line


def test_bad_mflux_folder_exits_1_naming_the_tensor(tmp_path):
    """An mflux folder whose quantization_level says 7 bits: MLX has no 7-bit affine."""
    folder = write_mflux_folder("flux2-klein-tiny", tmp_path / "mflux", 4)
    shard = folder / "transformer" / "0.safetensors"
    mx.save_safetensors(str(shard), mx.load(str(shard)), metadata={"quantization_level": "7"})
    result = run_cli("--model", str(folder), "--port", "0")
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: ") and "tensor '" in line and "not 7" in line and "quantization_level" in line, line
