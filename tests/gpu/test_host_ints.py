"""A request's prompt tokens into device memory through a kernel's parameters (nn/cuda_host_ints.h).

On CUDA `_core.cuda_int32_from_host` must give back exactly the ints it was handed, as int32 [1, n], for every n from
1 to 512 across the three kernels' capacities (16, 64, 512) and their edges, any int32 (negative, the extremes), and
decline (None) for n = 0 and n > 512, where the decoder keeps MLX's array from host memory. Off CUDA it declines for
every n. A model's logits with it (MLXRUNNER_HOST_INTS_BY_KERNEL=1: every prompt chunk goes through it) are checked
against the plain build by tests/gpu/test_measuring_switches.py. The PTX's shape is checked on any machine.
"""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest
from conftest import ON_GPU

from mlxrunner import _core

ON_CUDA = ON_GPU and mx.cuda.is_available()


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 63, 64, 65, 300, 511, 512])
def test_the_ints_come_back_as_they_went(n):
    values = np.random.default_rng(n).integers(-(2**31), 2**31, size=n, dtype=np.int64).astype(np.int32)
    values[0] = 2**31 - 1
    out = _core.cuda_int32_from_host(values.tolist())
    if not ON_CUDA:
        assert out is None
        return
    assert out.dtype == mx.int32 and out.shape == (1, n)
    np.testing.assert_array_equal(np.array(out)[0], values)


@pytest.mark.parametrize("n", [0, 513, 4096])
def test_it_declines_what_no_kernel_holds(n):
    assert _core.cuda_int32_from_host(list(range(n))) is None


def test_the_ptx_stores_each_value_below_the_count_at_its_place():
    ptx = _core.host_ints_ptx(16)
    params = re.findall(r"\.param \.u32 param_v(\d+)", ptx)
    assert params == [str(k) for k in range(16)]
    stores = re.findall(r"setp\.gt\.u32 %in_range, %count, (\d+);\n  ld\.param\.u32 %value, \[param_v(\d+)\];\n"
                        r"  @%in_range st\.global\.u32 \[%dst\+(\d+)\], %value;", ptx)
    assert [(int(a), int(b), int(c)) for a, b, c in stores] == [(k, k, 4 * k) for k in range(16)]
    assert ".entry mlxr_host_ints_16(" in ptx and ptx.rstrip().endswith("ret;\n}".rstrip())


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on CUDA only (off CUDA it declines: tested above)")
def test_a_buffer_used_again_holds_the_new_values():
    """The output comes from MLX's buffer cache: a second call of the same size, its first freed, must not show the
    first call's values."""
    first = _core.cuda_int32_from_host(list(range(64)))
    del first
    mx.clear_cache()
    second = _core.cuda_int32_from_host(list(range(100, 164)))
    np.testing.assert_array_equal(np.array(second)[0], np.arange(100, 164))
