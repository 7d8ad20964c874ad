"""An image's bytes are made where its pixels are (vae.to_uint8_on_device): the same bytes as diffusers' host
conversion (image_helpers.to_uint8: x 255 in float32, round half to even, cast) for every value a decode can give, ties
included. Runs on the default device: the CPU here, the GPU under tests/gpu's runs."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from image_helpers import to_uint8

from mlxrunner.imagegen.vae import to_uint8_on_device


def both(values: np.ndarray, dtype=mx.float32) -> tuple[np.ndarray, np.ndarray]:
    pixels = mx.array(values).astype(dtype)
    return to_uint8(np.asarray(pixels.astype(mx.float32))), to_uint8_on_device(pixels)


def test_every_bfloat16_and_float16_value_in_the_unit_interval():
    # All 2^16 bit patterns of each half type, kept where they lie in [0, 1] (a decode clamps to it).
    bits = np.arange(1 << 16, dtype=np.uint32)
    bf16 = (bits << 16).view(np.float32)
    f16 = bits.astype(np.uint16).view(np.float16).astype(np.float32)
    for values, dtype in ((bf16, mx.bfloat16), (f16, mx.float16)):
        values = values[(values >= 0) & (values <= 1)]
        host, device = both(values, dtype)
        assert len(values) > 10_000
        np.testing.assert_array_equal(host, device)


def test_float32_values_whose_product_is_a_tie_round_half_to_even():
    # x * 255 rounded to float32 lands on k + 0.5 for these; half to even sends 2.5 to 2 and 3.5 to 4.
    ties = np.float32(np.arange(256) + 0.5) / np.float32(255)
    near = np.concatenate([np.nextafter(ties, np.float32(0)), ties, np.nextafter(ties, np.float32(1))])
    values = np.clip(near, 0, 1).astype(np.float32)
    host, device = both(values)
    np.testing.assert_array_equal(host, device)
    assert host[256 + 2] == 2 and host[256 + 3] == 4  # the ties of 2.5 and 3.5


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1, width=32), min_size=1, max_size=64))
def test_any_float32_image_in_the_unit_interval(values):
    host, device = both(np.asarray(values, np.float32).reshape(-1, 1, 1) * np.ones((1, 2, 3), np.float32))
    np.testing.assert_array_equal(host, device)
