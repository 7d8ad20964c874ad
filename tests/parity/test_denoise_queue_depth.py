"""The denoising loops' evaluation queue depth: one default, passed from the pipelines to `_core`."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from mlxrunner import _core
from mlxrunner.imagegen import load_pipeline

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.mark.parametrize("name", ["zimage-tiny", "flux2-klein-tiny"])
def test_pipelines_pass_their_queue_depth_to_the_loop(name):
    assert load_pipeline(str(FIXTURES / name)).denoise_queue_depth == _core.DEFAULT_DENOISE_QUEUE_DEPTH == 2
    pipe = load_pipeline(str(FIXTURES / name), denoise_queue_depth=-1)
    with pytest.raises(ValueError, match=r"queue_depth must be >= 0 \(0: unbounded\), got -1"):
        pipe.run("a fox", width=32, height=32, steps=1, seed=0)


def test_a_bad_flux2_queue_depth_is_named():
    pipe = load_pipeline(str(FIXTURES / "flux2-klein-tiny"))
    latents = mx.zeros((1, 4, pipe.transformer.config.in_channels))
    ids = mx.array(_core.flux2_image_ids(2, 2))
    prompt = mx.zeros((1, 3, pipe.transformer.config.joint_attention_dim))
    with pytest.raises(ValueError, match=r"queue_depth must be >= 0 \(0: unbounded\), got -3"):
        _core.flux2_denoise(pipe.transformer, latents, ids, [1.0, 0.0], prompt, queue_depth=-3)
