"""Tiled VAE decode against the untiled decode of the same latents (the tiny Z-Image VAE, float32, CPU).

diffusers' own tiled decode is matched in test_zimage_parity.py; this file checks what tiling must give
whatever the reference: away from the seams the tiled image is the untiled one within a stated tolerance,
across the seams there is no step (the linear blend spreads each tile-to-tile difference over the
overlap), peak memory is lower, and a cancel lands between tiles.

Geometry here: 24 x 24 latents (192² pixels) in tiles of 8 latents with 25 % overlap, so tiles start every
6 latents (48 px), each keeps 48 px and blends the next 16 px with its neighbour: bands [48k, 48k + 16).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from image_helpers import check_cancel_lands_between_tiles

from mlxrunner.imagegen import load_pipeline
from mlxrunner.imagegen.vae import decode_working_bytes

FIXTURE = Path(__file__).parents[1] / "fixtures" / "zimage-tiny"
LATENTS, TILE, STRIDE_PX, BAND_PX = 24, 8, 48, 16
# Every tile runs the decoder's mid-block attention over its own pixels only, so even away from the seams a
# tile differs from the whole-image decode; on this random VAE the mean |Δ| measured 0.046 (image std 0.22).
AWAY_FROM_SEAMS_MEAN_TOL = 0.06


@pytest.fixture(scope="module")
def vae():
    return load_pipeline(str(FIXTURE)).vae


@pytest.fixture(scope="module")
def latents():
    return mx.array(np.random.default_rng(3).standard_normal((1, 16, LATENTS, LATENTS)).astype(np.float32))


@pytest.fixture(scope="module")
def untiled(vae, latents):
    return vae.decode_float(latents, tile=0)


@pytest.fixture(scope="module")
def tiled(vae, latents):
    return vae.decode_float(latents, tile=TILE)


def seam_bands(size: int) -> np.ndarray:
    """True on the pixels (of one axis) where two tiles are blended."""
    band = np.zeros(size, bool)
    for start in range(STRIDE_PX, size, STRIDE_PX):
        band[start:start + BAND_PX] = True
    return band


def test_away_from_the_seams_tiled_is_the_untiled_image_within_tolerance(tiled, untiled):
    assert tiled.shape == untiled.shape == (8 * LATENTS, 8 * LATENTS, 3)
    band = seam_bands(8 * LATENTS)
    away = ~(band[:, None] | band[None, :])
    difference = np.abs(tiled - untiled).mean(-1)
    assert difference[away].mean() <= AWAY_FROM_SEAMS_MEAN_TOL
    assert np.corrcoef(tiled.ravel(), untiled.ravel())[0, 1] > 0.9  # the same picture
    assert difference.max() > 1e-3  # and tiling really ran


def steps_across(image: np.ndarray, axis: int) -> np.ndarray:
    """The mean |difference| between neighbouring pixel lines along `axis` (one value per line pair)."""
    other = 1 - axis
    return np.abs(np.diff(image, axis=axis)).mean(axis=(other, 2))


def stitched_without_blending(vae, latents) -> np.ndarray:
    """The same tiles as tile=8 decodes, each decoded alone and cut to the pixels it keeps, no blend."""
    z = (latents.astype(vae.dtype) / vae.scaling_factor + vae.shift_factor).transpose(0, 2, 3, 1)
    stride = STRIDE_PX // 8
    rows = []
    for i in range(0, LATENTS, stride):
        tiles = [np.asarray(vae.decoder.decode(z[:, i:i + TILE, j:j + TILE, :]))[0][:STRIDE_PX, :STRIDE_PX]
                 for j in range(0, LATENTS, stride)]
        rows.append(np.concatenate(tiles, 1))
    return np.clip(np.concatenate(rows, 0) * 0.5 + 0.5, 0, 1)


@pytest.mark.parametrize("axis", [0, 1])
def test_no_seam_step(vae, latents, tiled, untiled, axis):
    # A seam shows as a jump in the error against the untiled image where one tile hands over to the
    # next. Blended, no neighbouring lines' error differs by more than twice the typical line-to-line change;
    # the same tiles butted together without the blend jump by 4x that at every cut (what this test detects).
    blended = steps_across(tiled - untiled, axis)
    assert blended.max() <= 2 * np.median(blended)
    cut = steps_across(stitched_without_blending(vae, latents) - untiled, axis)
    cuts = [STRIDE_PX * k - 1 for k in range(1, LATENTS * 8 // STRIDE_PX)]
    assert all(cut[x] > 4 * np.median(cut) for x in cuts), cut[cuts]


def test_tiles_lower_the_peak_memory(vae, latents):
    def peak(tile: int) -> int:
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        vae.decode_float(latents, tile=tile)
        return mx.get_peak_memory() - before

    # Measured at 64 x 64 latents (512² pixels): 841 MiB untiled, 215 MiB in tiles of 32, 58 MiB in tiles of 16.
    assert peak(TILE) < 0.5 * peak(0)


def test_a_1024_decode_in_one_pass_holds_the_working_set_the_memory_check_predicts(vae):
    # The decoder runs block by block and its attention over all 16,384 pixels in bands: as one graph with one score
    # matrix this decode held 1,133 MiB, 3.4x the prediction.
    latents = mx.array(np.random.default_rng(4).standard_normal((1, 16, 128, 128)).astype(np.float32))
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    vae.decode_float(latents, tile=0)
    held = mx.get_peak_memory() - before
    predicted = decode_working_bytes(vae.config, 1024, 1024, vae.dtype)
    assert 0.8 * predicted < held <= predicted, (held, predicted)


def test_a_cancel_lands_between_tiles(vae, latents):
    tiles = (LATENTS // (STRIDE_PX // 8)) ** 2
    check_cancel_lands_between_tiles(
        lambda tile, check: vae.decode_float(latents, tile=tile, check_cancelled=check), TILE, tiles)
