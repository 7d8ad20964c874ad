"""Tiled VAE encode (FLUX.2 Klein's reference images) against the untiled encode of the same image (the tiny
FLUX.2 VAE, float32, CPU): away from the seams the tiled latents are the untiled ones within a stated
tolerance, across the seams there is no step, a cancel lands between tiles, and a request's vae_tile reaches
the encoder.

Geometry: a 256² image (32 x 32 latents) in tiles of 128 px (16 latents) with 25 % overlap, so tiles start
every 96 px (12 latents), each keeps 12 latents and blends the next 4 with its neighbour: bands [12k, 12k + 4).
The image is a smooth pattern with a little noise, alike everywhere: each tile's GroupNorms see statistics
close to the whole image's, as they would on a photograph.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from image_helpers import check_cancel_lands_between_tiles
from PIL import Image

from mlxrunner.errors import Cancelled, RequestError
from mlxrunner.imagegen import load_pipeline
from mlxrunner.imagegen.flux2_klein import encoder_input

FIXTURE = Path(__file__).parents[1] / "fixtures" / "flux2-klein-base-tiny"
SIDE, TILE_PX = 256, 128
LATENTS, TILE, STRIDE, BAND = SIDE // 8, TILE_PX // 8, 12, 4
# Every tile's GroupNorms and mid-block attention see only its own pixels, so even away from the seams a tile
# differs from the whole-image encode: on this random VAE the mean |Δ| measured 0.029 (latent std 0.27).
AWAY_FROM_SEAMS_MEAN_TOL = 0.04


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(str(FIXTURE))


@pytest.fixture(scope="module")
def image() -> mx.array:
    """[1, SIDE, SIDE, 3] in [-1, 1], NHWC as the encoder takes it."""
    y, x = np.mgrid[0:SIDE, 0:SIDE] / 64.0
    pattern = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(7 * x) * np.cos(3 * y)], -1)
    noise = np.random.default_rng(0).standard_normal(pattern.shape)
    return mx.array(np.clip(0.8 * pattern + 0.2 * noise, -1, 1).astype(np.float32)[None])


@pytest.fixture(scope="module")
def untiled(pipe, image) -> np.ndarray:
    return np.asarray(pipe.vae.encoder.encode(image, 0))[0]


@pytest.fixture(scope="module")
def tiled(pipe, image) -> np.ndarray:
    return np.asarray(pipe.vae.encoder.encode(image, TILE_PX))[0]


def seam_bands(size: int) -> np.ndarray:
    """True on the latents (of one axis) where two tiles are blended."""
    band = np.zeros(size, bool)
    for start in range(STRIDE, size, STRIDE):
        band[start:start + BAND] = True
    return band


def test_away_from_the_seams_tiled_is_the_untiled_encode_within_tolerance(tiled, untiled):
    assert tiled.shape == untiled.shape == (LATENTS, LATENTS, 4)
    band = seam_bands(LATENTS)
    away = ~(band[:, None] | band[None, :])
    difference = np.abs(tiled - untiled).mean(-1)
    assert difference[away].mean() <= AWAY_FROM_SEAMS_MEAN_TOL
    assert np.corrcoef(tiled.ravel(), untiled.ravel())[0, 1] > 0.95  # the same latents
    assert difference.max() > 1e-3  # and tiling really ran


def stitched_without_blending(pipe, image) -> np.ndarray:
    """The same tiles as the tiled encode, each encoded alone and cut to the latents it keeps, no blend."""
    step = STRIDE * 8
    rows = []
    for i in range(0, SIDE, step):
        tiles = [np.asarray(pipe.vae.encoder.encode(image[:, i:i + TILE_PX, j:j + TILE_PX, :], 0))[0][:STRIDE, :STRIDE]
                 for j in range(0, SIDE, step)]
        rows.append(np.concatenate(tiles, 1))
    return np.concatenate(rows, 0)


@pytest.mark.parametrize("axis", [0, 1])
def test_no_seam_step(pipe, image, tiled, untiled, axis):
    # As for the tiled decode (test_vae_tiling.py): a seam is a jump in the error against the untiled encode where
    # one tile hands over to the next. Blended, no neighbouring lines' error differs by more than twice the typical
    # line-to-line change (measured: at most 1.85x); the tiles butted together without the blend jump by more than
    # twice it at every cut (measured: 2.2-3.0x), which is what this test detects.
    def steps_across(latents: np.ndarray) -> np.ndarray:
        return np.abs(np.diff(latents, axis=axis)).mean(axis=(1 - axis, 2))

    blended = steps_across(tiled - untiled)
    assert blended.max() <= 2 * np.median(blended)
    cut = steps_across(stitched_without_blending(pipe, image) - untiled)
    cuts = [STRIDE * k - 1 for k in range(1, LATENTS // STRIDE + 1) if STRIDE * k < LATENTS]
    assert all(cut[x] > 2 * np.median(blended) for x in cuts), cut[cuts]


def test_a_cancel_lands_between_tiles(pipe, image):
    tiles = len(range(0, LATENTS, STRIDE)) ** 2
    untiled_checks = check_cancel_lands_between_tiles(
        lambda tile, check: pipe.vae.encoder.encode(image, tile, check), TILE_PX, tiles)
    assert untiled_checks >= 2


def reference_of(image: mx.array) -> Image.Image:
    return Image.fromarray(np.round((np.asarray(image[0]) + 1) * 127.5).astype(np.uint8))


def test_a_request_vae_tile_tiles_the_reference_encode(pipe, image):
    """Through the pipeline: vae_tile reaches the encoder (tiles of 128 px); by size (absent) a 256² reference
    is one pass, as vae_tile 0."""
    pixels = pipe.prepare_references([reference_of(image)])[0]
    by_size = np.asarray(pipe.reference_tokens([pixels])[0])
    one_pass = np.asarray(pipe.reference_tokens([pixels], vae_tile=0)[0])
    in_tiles = np.asarray(pipe.reference_tokens([pixels], vae_tile=TILE_PX)[0])
    expected = np.asarray(pipe.vae.encode_tokens(encoder_input(pixels), TILE))
    assert np.array_equal(by_size, one_pass)
    assert np.array_equal(in_tiles, expected)
    assert np.abs(in_tiles - one_pass).max() > 1e-3


def test_a_cancel_during_the_reference_encode_stops_the_run(pipe, image):
    seen = []

    def cancel_at_the_third_block():
        seen.append(1)
        if len(seen) == 3:
            raise Cancelled("client disconnected")

    with pytest.raises(Cancelled):
        pipe.run("make it blue", images=[reference_of(image)], steps=1, seed=1, vae_tile=TILE_PX,
                 check_cancelled=cancel_at_the_third_block)
    assert len(seen) == 3


@pytest.mark.parametrize("vae_tile", [-64, 100, 4096, "128", True])
def test_bad_vae_tile_is_a_request_error_naming_the_field(pipe, vae_tile):
    with pytest.raises(RequestError) as caught:
        pipe.run("a cat", width=64, height=64, steps=1, vae_tile=vae_tile)
    assert caught.value.field == "vae_tile"
