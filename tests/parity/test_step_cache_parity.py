"""The first-block step cache against diffusers 0.42.1's FirstBlockCache (goldens from
scripts/goldens_step_cache.py; no torch here), and what caching must leave alone.

Z-Image (tiny, float32, CPU, initial latents injected), without and with CFG: the runner skips exactly the
steps diffusers skipped at the same threshold and ends on the same latents. diffusers has no working
FirstBlockCache for FLUX.2, so Klein is checked for what must hold whatever the reference: the first step
always runs, CFG's two calls are counted apart, and caching that skips nothing is bit-identical to no caching.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import float32_tol
from image_helpers import rel_error
from safetensors.numpy import load_file

from mlxrunner import _core
from mlxrunner.imagegen import load_pipeline

FIXTURES = Path(__file__).parents[1] / "fixtures"
GOLDENS = Path(__file__).parents[1] / "goldens" / "step_cache"
REL_TOL = float32_tol(1e-4, 1e-2)
# How far the uncached run must be from a cached golden for the skips to count as having changed it: three times
# the GPU's tolerance (the uncached runs are 0.066 and 0.288 away, the same on the CPU and on CUDA). 100 x REL_TOL
# was 0.01 on the CPU but 1.0 on a GPU, where it failed the right answer.
SKIPS_CHANGED_IT = 0.03


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDENS / "reference.safetensors"))


@pytest.fixture(scope="module")
def meta():
    return json.loads((GOLDENS / "reference.json").read_text())["cases"]


@pytest.fixture(scope="module")
def zimage():
    return load_pipeline(str(FIXTURES / "zimage-tiny"))


@pytest.fixture(scope="module")
def klein_base():
    return load_pipeline(str(FIXTURES / "flux2-klein-base-tiny"))


def run_zimage(pipe, case: dict, latents, threshold):
    return pipe.run(case["prompt"], negative_prompt=case["negative_prompt"], width=case["size"], height=case["size"],
                    steps=case["steps"], guidance=case["guidance"], latents=latents, cache_threshold=threshold)


@pytest.mark.parametrize("name", ["zimage_t2i", "zimage_cfg"])
def test_zimage_skips_the_steps_diffusers_skips_and_ends_on_its_latents(zimage, golden, meta, name):
    case = meta[name]
    result = run_zimage(zimage, case, golden[f"{name}/init_latents"], case["threshold"])
    assert (result.step_cache.computed, result.step_cache.skipped) == (case["computed"], case["skipped"])
    assert rel_error(result.latents, golden[f"{name}/final_latents"]) <= REL_TOL
    # The skipped steps changed the result: the golden is not simply the uncached run.
    uncached = run_zimage(zimage, case, golden[f"{name}/init_latents"], None)
    assert uncached.step_cache is None
    assert rel_error(uncached.latents, golden[f"{name}/final_latents"]) > SKIPS_CHANGED_IT


@pytest.mark.parametrize("name", ["zimage_t2i", "zimage_cfg"])
def test_zimage_skips_exactly_the_steps_diffusers_skips(zimage, golden, meta, name):
    case = meta[name]
    caption = zimage.embed_prompt(case["prompt"])[0]
    negative = zimage.embed_prompt(case["negative_prompt"] or "")[0] if case["guidance"] > 0 else None
    cache = _core.StepCache(case["threshold"])
    _core.zimage_denoise(zimage.transformer, mx.array(golden[f"{name}/init_latents"]),
                         zimage.sigmas(case["steps"], case["size"], case["size"]), caption, negative,
                         case["guidance"], cache=cache)
    decisions = cache.decisions(0)
    assert [step for step, computed in enumerate(decisions) if computed] == case["computed_steps"]
    assert len(decisions) == case["steps"] and cache.decisions(1) == []


def test_zimage_cache_that_skips_nothing_is_bit_identical_to_no_cache(zimage, golden, meta):
    case = meta["zimage_t2i"]
    tiny = run_zimage(zimage, case, golden["zimage_t2i/init_latents"], 1e-6)
    assert (tiny.step_cache.computed, tiny.step_cache.skipped) == (case["steps"], 0)
    off = run_zimage(zimage, case, golden["zimage_t2i/init_latents"], None)
    np.testing.assert_array_equal(tiny.latents, off.latents)


def run_klein(pipe, threshold, steps=12):
    return pipe.run("a lighthouse at night", width=64, height=64, steps=steps, guidance=4.0, seed=5,
                    cache_threshold=threshold)


def test_klein_cfg_counts_both_calls_and_skips_nothing_bit_identically(klein_base):
    off = run_klein(klein_base, None)
    tiny = run_klein(klein_base, 1e-6)
    assert (tiny.step_cache.computed, tiny.step_cache.skipped) == (2 * 12, 0)  # cond and uncond, each step
    np.testing.assert_array_equal(tiny.latents, off.latents)


def test_klein_large_threshold_runs_only_the_first_step_of_each_branch(klein_base):
    off = run_klein(klein_base, None)
    result = run_klein(klein_base, 10.0)
    assert (result.step_cache.computed, result.step_cache.skipped) == (2, 2 * 11)
    # Reusing the first step's residual everywhere still makes an image near the uncached one, not noise.
    assert 0 < rel_error(result.latents, off.latents) < 1.0
