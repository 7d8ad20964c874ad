"""Which BLAS serves MLX's CPU matrix products (mlxrunner/__init__.py, csrc/blas/cpu_blas_shim.c): OpenBLAS, or
Intel's MKL where the `mkl` package is installed (the test extra installs it on x86-64 Linux).

Each case runs in a fresh process, since the route is chosen when mlxrunner is imported, before MLX loads. The
products are checked against NumPy's in float64 for every type the shim forwards (sgemm, dgemm, cgemm), at a size
that runs on one thread and one that the BLAS splits over its threads, and matrix-vector products (an LLM decode
step's, which OpenBLAS's route hands to sgemv) in every layout; and under the baseline CPU loops, whose
convolution and attention call the BLAS from every core at once with its threads held to one (through the shim's
thread count), against MLX's own operations.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                                reason="the mkl package is for x86-64 Linux; elsewhere OpenBLAS (Linux) or "
                                       "Accelerate (macOS) serves")

PRODUCTS = textwrap.dedent("""
    import mlxrunner, mlx.core as mx, numpy as np
    print(mlxrunner.cpu_blas)
    rng = np.random.default_rng(0)
    for m, k, n in ((8, 8, 8), (300, 500, 400)):  # one thread (under 2^22 multiply-adds); the BLAS's threads
        for dtype, mx_dtype, tolerance in ((np.float32, mx.float32, 1e-4), (np.float64, mx.float64, 1e-12),
                                           (np.complex64, mx.complex64, 1e-4)):
            a = rng.standard_normal((m, k)).astype(dtype)
            b = rng.standard_normal((k, n)).astype(dtype)
            if dtype == np.complex64:
                a, b = a + 1j * rng.standard_normal((m, k)), b + 1j * rng.standard_normal((k, n))
                a, b = a.astype(dtype), b.astype(dtype)
            ours = np.array(mx.matmul(mx.array(a, dtype=mx_dtype), mx.array(b, dtype=mx_dtype)))
            assert ours.dtype == dtype
            want = a.astype(np.complex128) @ b.astype(np.complex128)
            error = np.abs(ours - want).max() / np.abs(want).max()
            assert error < tolerance, (m, k, n, dtype, error)
    # Matrix-vector products (one row or one column of output: OpenBLAS's go to its sgemv), each operand as itself
    # and as the transposed view of its transpose (MLX then hands the BLAS the other layout).
    for m, k, n in ((1, 1024, 3072), (1, 64, 48), (300, 256, 1), (1, 7, 1)):
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        want = a.astype(np.float64) @ b.astype(np.float64)
        for left in (mx.array(a), mx.array(np.ascontiguousarray(a.T)).T):
            for right in (mx.array(b), mx.array(np.ascontiguousarray(b.T)).T):
                ours = np.array(mx.matmul(left, right))
                error = np.abs(ours - want).max() / np.abs(want).max()
                assert error < 1e-5, (m, k, n, error)
    # MKL loads its computing libraries at its first product: they are in the process only where it computed.
    computed_by_mkl = any("libmkl_core" in line for line in open("/proc/self/maps"))
    assert computed_by_mkl == (mlxrunner.cpu_blas == "mkl"), computed_by_mkl
    print("products ok")
""")


def run(code: str, *args: str, **env: str) -> list[str]:
    """`code` in a fresh `python -c` with `args` and `env` added: its stdout's words (it must exit 0)."""
    ran = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    return ran.stdout.split()


@pytest.mark.parametrize("requested, served", [("auto", "mkl"), ("mkl", "mkl"), ("openblas", "openblas")])
def test_each_route_serves_the_products(requested, served):
    assert run(PRODUCTS, MLXRUNNER_CPU_BLAS=requested) == [served, "products", "ok"]


def test_mkl_serves_the_cpu_kernels_that_call_the_blas_from_every_core():
    """The baseline loops' convolution (im2col bands, a product per core) and attention (a head per core, one BLAS
    thread each) under MKL: MLX's own operations' numbers, as under OpenBLAS."""
    code = textwrap.dedent("""
        import mlxrunner, mlx.core as mx, numpy as np
        from mlxrunner import _core
        assert mlxrunner.cpu_blas == "mkl" and _core.cpu_loops() == "baseline"
        rng = np.random.default_rng(1)
        x = mx.array(rng.standard_normal((1, 64, 64, 32)).astype(np.float32))
        w = mx.array(rng.standard_normal((32, 3, 3, 32)).astype(np.float32))
        ours, theirs = np.array(_core.conv2d_cpu(x, w, 1)), np.array(mx.conv2d(x, w, 1, 1))
        assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max(), "convolution"
        q, k, v = (mx.array(rng.standard_normal((1, 8, 200, 64)).astype(np.float32)) for _ in range(3))
        ours = np.array(_core.masked_attention(q, k, v))
        theirs = np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125))
        assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max(), "attention"
        print("kernels ok")
    """)
    assert run(code, MLXRUNNER_CPU_BLAS="mkl", MLXRUNNER_CPU_LOOPS="baseline") == ["kernels", "ok"]


def test_minilm_on_mkl_matches_sentence_transformers():
    """A whole model on MKL's route: MiniLM's vectors for the goldens' sentences (recorded with sentence-transformers)
    in one batch, as tests/parity/test_embedding_parity.py holds them on OpenBLAS's."""
    code = textwrap.dedent("""
        import json, sys
        import mlxrunner, numpy as np
        from mlxrunner import store
        from mlxrunner.embed.bert import BertEmbedder
        assert mlxrunner.cpu_blas == "mkl"
        goldens = json.load(open(sys.argv[1]))["sentences"]
        vectors = BertEmbedder(store.resolve("all-minilm")).embed([g["text"] for g in goldens]).vectors
        for g, v in zip(goldens, vectors):
            want = np.array(g["embedding"])
            cosine = float(v @ want / np.linalg.norm(v) / np.linalg.norm(want))
            assert cosine >= 0.99999, (g["id"], cosine)
        print(len(goldens), "vectors ok")
    """)
    goldens = Path(__file__).resolve().parents[1] / "goldens" / "minilm.json"
    count, *rest = run(code, str(goldens), MLXRUNNER_CPU_BLAS="mkl")
    assert int(count) >= 20 and rest == ["vectors", "ok"]


def test_a_library_that_cannot_serve_leaves_openblas_serving():
    """The shim opens MKL's library by path: a path that does not load is an error it reports, and the products
    stay OpenBLAS's."""
    code = textwrap.dedent("""
        import ctypes, importlib.util
        from pathlib import Path
        import mlxrunner
        shim = ctypes.CDLL(str(Path(importlib.util.find_spec("mlxrunner._core").origin).with_name("_cpu_blas_shim.so")))
        shim.mlxrunner_blas_error.restype = ctypes.c_char_p
        assert shim.mlxrunner_blas_use(b"/nonexistent/libmkl_rt.so.3") == -1
        assert b"/nonexistent/libmkl_rt.so.3" in shim.mlxrunner_blas_error()
    """) + PRODUCTS
    assert run(code, MLXRUNNER_CPU_BLAS="openblas") == ["openblas", "products", "ok"]
