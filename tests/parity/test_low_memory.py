"""--low-memory: the text encoder and the transformer are held in turn, never both. The images are the
normal mode's, bit for bit, and every phase's peak memory (MLX's own count, which the CPU keeps too) is lower."""

from __future__ import annotations

import gc
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxrunner import loader
from mlxrunner.detect import detect
from mlxrunner.errors import ModelError
from mlxrunner.imagegen import Cancelled, load_pipeline
from mlxrunner.store import resolve

FIXTURES = Path(__file__).parents[1] / "fixtures"
MODELS = ["zimage-tiny", "flux2-klein-tiny"]
REQUEST = dict(width=64, height=64, steps=2, seed=3)


def load_and_run(folder: Path, low_memory: bool) -> tuple[int, list]:
    """(arrays alive after loading, two runs' results), with nothing else of this module alive. MLX's buffer
    cache is off meanwhile, so that a phase's peak counts the arrays it needed (a cached buffer may be handed out
    for a smaller request and is counted whole)."""
    gc.collect()
    mx.clear_cache()
    previous_limit = mx.set_cache_limit(0)
    try:
        before = mx.get_active_memory()
        pipe = load_pipeline(str(folder), low_memory=low_memory)
        loaded = mx.get_active_memory() - before
        return loaded, [pipe.run("a red fox", **REQUEST) for _ in range(2)]
    finally:
        mx.set_cache_limit(previous_limit)


@pytest.mark.parametrize("model", MODELS)
def test_low_memory_draws_the_same_image_with_less_memory_in_every_phase(model):
    normal_loaded, normal = load_and_run(FIXTURES / model, low_memory=False)
    low_loaded, low = load_and_run(FIXTURES / model, low_memory=True)
    assert low_loaded < normal_loaded  # only the text encoder (and the VAE) is read at load
    for n, lo in zip(normal, low):  # the second run reads the transformer again (the prompt's embedding is kept)
        assert np.array_equal(np.asarray(n.image), np.asarray(lo.image))
        assert set(lo.peak_memory) == {"encode", "denoise", "decode"}
    # Each phase's lower peak of the two runs: one run's denoise phase may hold ~2 MB more, as much as the tiny text
    # encoder this mode saves. MLX queues operations ahead of its CPU worker and holds a queued operation's inputs
    # until it has run, so how many of a step's intermediates are alive at once depends on how far ahead the queue
    # got: timing, in either mode (the VAE evaluates block by block and does not vary). A single run's peaks cannot
    # order the modes.
    for phase in ("encode", "denoise", "decode"):
        low_peak, normal_peak = (min(run.peak_memory[phase] for run in runs) for runs in (low, normal))
        assert 0 < low_peak < normal_peak, (phase, [r.peak_memory for r in low], [r.peak_memory for r in normal])


def test_the_memory_check_counts_one_of_text_encoder_and_transformer_under_low_memory_and_chooses_it():
    source = resolve(str(FIXTURES / "zimage-tiny"))
    detected = detect(source)
    normal = loader.predicted_weight_bytes(source, detected, low_memory=False)
    low = loader.predicted_weight_bytes(source, detected, low_memory=True)
    assert normal > low > 0
    # Float32 fixture: no upcast. Z-Image reads its text encoder's hidden_states[-2]: its last layer is never loaded.
    unread = sum(v.nbytes for name, v in source.tensors("text_encoder").items() if ".layers.3." in name)
    assert unread > 0
    assert abs(normal - (source.total_tensor_bytes() - unread)) < 0.01 * normal
    previous = mx.get_memory_limit()
    try:
        # Too little for both at once: the runner holds them in turn rather than refuse.
        limit = (normal + low) // 2
        assert loader.load(str(FIXTURES / "zimage-tiny"), memory_limit=limit, warm_up=False).image_model.low_memory
        assert not loader.load(str(FIXTURES / "zimage-tiny"), memory_limit=2 * normal,
                               warm_up=False).image_model.low_memory
        with pytest.raises(ModelError, match="insufficient memory for image generation"):
            loader.load(str(FIXTURES / "zimage-tiny"), memory_limit=low - 1, warm_up=False)
    finally:
        mx.set_memory_limit(previous)


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the decode's bytes per pixel were measured for the CPU here")
@pytest.mark.parametrize("low_memory", [False, True], ids=["normal", "low-memory"])
def test_the_predicted_peak_is_the_measured_one_within_a_fifth(low_memory):
    source = resolve(str(FIXTURES / "zimage-tiny"))
    predicted = loader.predicted_peak_bytes(source, detect(source), low_memory, side=128)
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()  # what this test process held already
    pipe = load_pipeline(str(FIXTURES / "zimage-tiny"), low_memory=low_memory)
    runs = [pipe.run("a red fox", width=128, height=128, steps=2, seed=3) for _ in range(2)]
    measured = max(runs[1].peak_memory.values()) - before
    assert abs(measured - predicted) < 0.2 * predicted, (measured, predicted)


def test_a_cancelled_low_memory_run_frees_the_transformer_too():
    gc.collect()
    mx.clear_cache()
    pipe = load_pipeline(str(FIXTURES / "zimage-tiny"), low_memory=True)
    expected = np.asarray(pipe.generate("a red fox", **REQUEST))
    after_a_run = mx.get_active_memory()
    with pytest.raises(Cancelled):
        pipe.run("a red fox", progress=lambda step, total: step < 1, **REQUEST)  # stops before the second step
    assert mx.get_active_memory() <= after_a_run  # neither network is left held
    assert np.array_equal(np.asarray(pipe.generate("a red fox", **REQUEST)), expected)


@pytest.mark.parametrize("model", MODELS)
def test_low_memory_queues_one_transformer_block_unless_asked(model):
    """One block queued on the device under --low-memory (the denoise's peak is most of that mode's peak); the
    normal mode keeps the default, and an explicit depth wins in either."""
    from mlxrunner.imagegen.pipeline import DEFAULT_DENOISE_QUEUE_DEPTH, LOW_MEMORY_DENOISE_QUEUE_DEPTH

    folder = str(FIXTURES / model)
    assert load_pipeline(folder, low_memory=True).denoise_queue_depth == LOW_MEMORY_DENOISE_QUEUE_DEPTH == 1
    assert load_pipeline(folder).denoise_queue_depth == DEFAULT_DENOISE_QUEUE_DEPTH
    assert load_pipeline(folder, low_memory=True, denoise_queue_depth=3).denoise_queue_depth == 3
