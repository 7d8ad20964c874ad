"""The per-layer KV cache (csrc/text/kv_cache.h) against a NumPy record of every position, and the
sliding-window mask against its definition: a window of W lets a token see itself and the W - 1 before."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxrunner import _core

HEADS, DIM = 2, 4


def positions(start: int, count: int) -> np.ndarray:
    """Keys whose every element is their position: [1, H, count, D]."""
    values = np.arange(start, start + count, dtype=np.float32)
    return np.broadcast_to(values[None, None, :, None], (1, HEADS, count, DIM)).copy()


def held_positions(keys) -> list[int]:
    return [int(p) for p in np.array(keys)[0, 0, :, 0]]


def append(cache, start: int, count: int):
    k = positions(start, count)
    keys, values = cache.update_and_fetch(mx.array(k), mx.array(-k))
    assert np.array_equal(np.array(values), -np.array(keys))
    return held_positions(keys)


# Chunk sizes as a prefill of several chunks then decoding feeds them, crossing a window of 8 many times.
CHUNKS = [3, 1, 1, 12, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 5, 1, 1, 20, 7, 1, 2, 1, 1, 1]


@pytest.mark.parametrize("window", [0, 1, 8, 300])
def test_attention_sees_the_positions_its_window_needs(window):
    cache = _core.KVCache(window)
    seen = 0
    for count in CHUNKS:
        got = append(cache, seen, count)
        end = seen + count
        if window == 0:
            assert got == list(range(end))
        elif count > 1:  # a chunk: the W - 1 before it, then itself, in order (its mask needs the order)
            assert got == list(range(max(0, seen - (window - 1)), end))
        else:  # one query: the last W positions, in any order
            assert sorted(got) == list(range(max(0, end - window), end))
        seen = end
        assert cache.offset == seen
    if window:
        assert cache.held <= window - 1 + max(CHUNKS)


def test_a_rotating_cache_stays_bounded():
    cache = _core.KVCache(8)
    append(cache, 0, 20)
    for position in range(20, 1000):
        append(cache, position, 1)
    assert cache.held == 8
    assert cache.nbytes == 2 * 8 * HEADS * DIM * 4  # keys and values, float32, 8 slots


def test_trim_and_copy():
    full = _core.KVCache()
    append(full, 0, 10)
    snapshot = full.copy()
    assert full.can_trim_to(4)
    full.trim_to(4)
    assert append(full, 4, 2) == [0, 1, 2, 3, 4, 5]
    assert snapshot.offset == 10 and append(snapshot, 10, 1) == list(range(11))

    rotating = _core.KVCache(8)
    append(rotating, 0, 6)
    assert rotating.can_trim_to(3)  # nothing evicted yet
    rotating.trim_to(3)
    assert append(rotating, 3, 1) == [0, 1, 2, 3]
    for position in range(4, 12):
        append(rotating, position, 1)
    assert not rotating.can_trim_to(11)  # positions 0..3 are gone: a prefix's window cannot come back
    with pytest.raises(ValueError, match="cannot trim"):
        rotating.trim_to(11)
    assert rotating.can_trim_to(rotating.offset)


@pytest.mark.parametrize("queries, keys, window", [(1, 1, 1), (5, 5, 2), (4, 11, 8), (12, 12, 8), (1, 8, 8)])
def test_sliding_window_mask(queries, keys, window):
    got = np.array(_core.sliding_window_mask(queries, keys, window))
    query_positions = np.arange(keys - queries, keys)[:, None]
    distance = query_positions - np.arange(keys)[None, :]
    assert np.array_equal(got, (distance >= 0) & (distance < window))


def test_trimming_nothing_leaves_a_wrapped_rotating_cache_as_it_was():
    """The prompt cache trims a reused sequence by 0 when the new prompt extends it whole: a wrapped rotating
    cache must then go on as if untouched (it once reset its slots, and the next chunk saw the wrong keys)."""
    cache = _core.KVCache(8)
    append(cache, 0, 40)
    for position in range(40, 46):
        append(cache, position, 1)
    assert cache.can_trim_to(46) and not cache.can_trim_to(45)
    cache.trim_to(46)
    assert append(cache, 46, 12) == list(range(39, 58))


def test_a_copy_stops_both_sides_writing_in_place_until_their_buffers_are_replaced():
    """The CUDA attention kernels write new positions into the cache's buffers themselves (nn/cuda_decode_attention.h),
    which must never reach a snapshot: only a full cache whose buffers no copy shares may be written so."""
    assert _core.KVCache().writes_in_place  # no buffers yet: reserve makes them
    assert not _core.KVCache(8).writes_in_place  # rotating caches never
    cache = _core.KVCache()
    append(cache, 0, 3)
    assert cache.writes_in_place
    kept = cache.copy()
    assert not cache.writes_in_place and not kept.writes_in_place
    append(cache, 3, 1)  # an update through MLX: new buffers for this side
    assert cache.writes_in_place and not kept.writes_in_place
    assert append(kept, 3, 2) == list(range(5))  # the snapshot still holds its own positions 0..2
    assert kept.writes_in_place


def test_reserve_makes_room_for_the_kernel_and_keeps_the_held_positions():
    """What Decoder::attention hands the in-place kernels: the whole buffers, with room for the new positions (grown in
    steps of 256, the held positions carried over), the cache's offset moved past them."""
    cache = _core.KVCache()
    like = mx.zeros((1, HEADS, 3, DIM))
    keys, values = cache.reserve(3, like)
    assert keys.shape == values.shape == (1, HEADS, 256, DIM) and cache.offset == 3
    append(cache, 3, 250)  # MLX's update: positions 3..252 (0..2 hold what the kernel would have written)
    keys, _ = cache.reserve(10, like)
    assert keys.shape == (1, HEADS, 512, DIM) and cache.offset == 263
    assert held_positions(keys)[3:253] == list(range(3, 253))
    kept = cache.copy()
    with pytest.raises(Exception, match="in place"):
        cache.reserve(1, like)
    keys, values = cache.append_buffers(mx.array(positions(263, 2)), mx.array(-positions(263, 2)))
    assert keys.shape == (1, HEADS, 512, DIM) and cache.offset == 265 and kept.offset == 263
    assert held_positions(keys)[253:265] == [0] * 10 + [263, 264]  # the reserved slots as nothing wrote them
    assert cache.writes_in_place and not kept.writes_in_place
    with pytest.raises(Exception, match="rotating"):
        _core.KVCache(8).append_buffers(mx.array(positions(0, 2)), mx.array(positions(0, 2)))
