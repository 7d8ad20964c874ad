"""MLX's buffer cache sized per image job (ImagePipeline.working_bytes): a small job after a big one does not keep
the big job's cached buffers, the images are the same as without the limit, and the previous limit comes back.

MLX keeps 32 MiB of cache on the CPU and up to the memory limit on a GPU; these tests give the process a GPU's
limit (the memory limit), where a big job's buffers would otherwise stay cached through the next jobs.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxrunner import backend
from mlxrunner.imagegen import load_pipeline

FIXTURE = Path(__file__).parents[1] / "fixtures" / "zimage-tiny"
SMALL = {"prompt": "a fox in the snow", "width": 64, "height": 64, "steps": 2, "seed": 3}
BIG = {"prompt": "a fox in the snow", "width": 384, "height": 384, "steps": 1, "seed": 3}


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(str(FIXTURE))


@pytest.fixture
def gpu_like_cache_limit():
    """The process's cache limit as a GPU's default (the memory limit), and MLX's own back after."""
    limit = mx.get_memory_limit()
    previous = mx.set_cache_limit(limit)
    yield limit
    mx.set_cache_limit(previous)


def job_bytes(pipe, fields: dict) -> int:
    request = pipe.resolve_request(fields["width"], fields["height"], fields["steps"], fields["seed"], None, None,
                                   None, None)
    return pipe.working_bytes(request)


def pixels(pipe, fields: dict) -> np.ndarray:
    return np.asarray(pipe.run(**fields).image)


def test_a_small_job_after_a_big_one_does_not_keep_its_cache(pipe, gpu_like_cache_limit):
    mx.clear_cache()
    small_alone = pixels(pipe, SMALL)
    pixels(pipe, BIG)
    after_big = mx.get_cache_memory()
    assert after_big > job_bytes(pipe, SMALL), after_big  # the big job left more cached than the small one needs
    small_after_big = pixels(pipe, SMALL)
    assert mx.get_cache_memory() <= job_bytes(pipe, SMALL) < after_big
    assert np.array_equal(small_after_big, small_alone)
    assert mx.set_cache_limit(gpu_like_cache_limit) == gpu_like_cache_limit  # the process's limit is back


def test_images_are_the_same_without_the_job_limit(pipe, gpu_like_cache_limit, monkeypatch):
    limited = pixels(pipe, SMALL), pixels(pipe, BIG)
    held_to_the_job = backend.cache_limit
    monkeypatch.setattr(backend, "cache_limit", lambda limit: held_to_the_job(gpu_like_cache_limit))
    unlimited = pixels(pipe, SMALL), pixels(pipe, BIG)
    assert all(np.array_equal(a, b) for a, b in zip(limited, unlimited))


def test_the_limit_never_raises_mlx_own():
    previous = mx.set_cache_limit(1 << 20)
    try:
        with backend.cache_limit(1 << 30):
            assert mx.set_cache_limit(1 << 20) == 1 << 20  # not raised to the job's 1 GiB
        with backend.cache_limit(1 << 10):
            assert mx.set_cache_limit(1 << 10) == 1 << 10  # lowered to the job's
        assert mx.set_cache_limit(1 << 20) == 1 << 20  # and back
    finally:
        mx.set_cache_limit(previous)
