"""A cancelled image job stops between transformer blocks, not only between steps: the denoising loops
call check_cancelled() after each block they queue (and once more per step, for the step's latents), and
what it raises unwinds through C++ to the caller. Real networks (the tiny fixtures), real C++ loops."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from mlxrunner import _core
from mlxrunner.errors import Cancelled
from mlxrunner.imagegen import load_pipeline

FIXTURES = Path(__file__).parents[1] / "fixtures"


class CancelAfter:
    """check_cancelled() that raises Cancelled on its n-th call (never when n is None), counting the calls
    made while denoising (the VAE decoder checks too, after the loop's last progress call)."""

    def __init__(self, n: int | None):
        self.n, self.calls, self.denoising = n, 0, True
        self.steps_started: list[int] = []

    def __call__(self) -> None:
        self.calls += self.denoising
        if self.calls == self.n:
            raise Cancelled("client disconnected")

    def progress(self, step: int, total: int) -> None:
        if step == total:
            self.denoising = False
        else:
            self.steps_started.append(step)


def blocks_per_step(pipe) -> int:
    """The checks of one step: one per queued block, plus the step's latents."""
    config = pipe.transformer.config
    if pipe.architecture == "ZImagePipeline":
        return config.n_refiner_layers + config.n_layers + 1
    return config.num_layers + config.num_single_layers + 1


@pytest.mark.parametrize("name", ["zimage-tiny", "flux2-klein-tiny"])
def test_every_block_of_every_step_is_a_cancel_point(name):
    pipe = load_pipeline(str(FIXTURES / name))
    check = CancelAfter(None)
    pipe.run("a fox", width=32, height=32, steps=3, seed=0, check_cancelled=check, progress=check.progress)
    assert check.calls == 3 * blocks_per_step(pipe) > 3 * 2


@pytest.mark.parametrize("name", ["zimage-tiny", "flux2-klein-tiny"])
def test_a_cancel_inside_a_step_stops_that_step(name):
    pipe = load_pipeline(str(FIXTURES / name))
    # Cancelled at the second block of the second step: the loop never reaches the third step's progress.
    check = CancelAfter(blocks_per_step(pipe) + 2)
    with pytest.raises(Cancelled, match="client disconnected"):
        pipe.run("a fox", width=32, height=32, steps=3, seed=0, check_cancelled=check, progress=check.progress)
    assert check.steps_started == [0, 1]
    assert check.calls == blocks_per_step(pipe) + 2


def test_a_step_cache_skip_is_still_cancellable_at_its_head_block():
    pipe = load_pipeline(str(FIXTURES / "zimage-tiny"))
    check = CancelAfter(None)
    result = pipe.run("a fox", width=32, height=32, steps=4, seed=0, guidance=0, check_cancelled=check,
                      progress=check.progress, cache_threshold=10.0)
    assert (result.step_cache.computed, result.step_cache.skipped) == (1, 3)
    # A computed step queues every block; a skipped one its refiner and head blocks (and its latents).
    config = pipe.transformer.config
    assert check.calls == blocks_per_step(pipe) + 3 * (config.n_refiner_layers + 1 + 1)


def test_the_loops_take_check_cancelled_directly():
    pipe = load_pipeline(str(FIXTURES / "zimage-tiny"))
    caption = pipe.embed_prompt("a fox")[0]
    noise = mx.zeros((1, 16, 4, 4))
    check = CancelAfter(1)
    with pytest.raises(Cancelled):
        _core.zimage_denoise(pipe.transformer, noise, [1.0, 0.5, 0.0], caption, check_cancelled=check)
    assert check.calls == 1
