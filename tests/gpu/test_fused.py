"""The GPU's fused kernels, checked on any machine.

On a GPU, `_core` runs its element-wise chains (SiLU, the gated MLPs, the DiTs' RoPE, GroupNorm's normalise + SiLU,
a ResnetBlock's bias + residual) as kernels fused by `mx::compile`; on the CPU it runs the same
arithmetic as plain ops, so the rest of the suite never exercises the fused functions off a GPU.
MLXRUNNER_FUSE_ON_CPU=1 makes `_core` compile them on the CPU too (MLX builds them with the system C++
compiler), and this test re-runs the parity tests that go through them, against the same diffusers
and transformers goldens, in a subprocess with that switch on.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ON_GPU

ROOT = Path(__file__).resolve().parents[2]

# Every test here goes through at least one fused function: the DiTs' SiLU / gated MLPs / RoPE, the VAE's
# GroupNorm (+ SiLU) and ResnetBlock outputs, in float32 and bfloat16; the LLM's gated MLP.
FUSED_PATHS = [
    "tests/parity/test_zimage_parity.py::test_final_latents_and_image",
    "tests/parity/test_zimage_parity.py::test_vae_decoder_alone",
    "tests/parity/test_zimage_parity.py::test_bfloat16_pipeline_within_bf16_tolerance",
    "tests/parity/test_flux2_parity.py::test_final_latents_and_image",
    "tests/parity/test_flux2_parity.py::test_vae_encode_path",
    "tests/parity/test_flux2_parity.py::test_bfloat16_pipeline_follows_diffusers_bf16_timesteps",
    "tests/parity/test_llm_parity.py::test_prompt_logits",
]


@pytest.mark.skipif(ON_GPU, reason="on a GPU the whole suite already runs the fused kernels")
def test_fused_kernels_match_the_goldens_on_the_cpu():
    env = dict(os.environ, MLXRUNNER_FUSE_ON_CPU="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FUSED_PATHS],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "failed" not in proc.stdout, tail
    assert "skipped" not in proc.stdout, tail  # every listed test really ran
