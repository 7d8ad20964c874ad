"""What one MLX operation costs the host on this device: chains of N dependent operations on a small array,
building the graph and evaluating it timed apart, per operation.

    python -m benchmarks.gpu.op_cost

Element-wise operations, MLX's fused RMSNorm, a custom CUDA kernel whose source carries 0 / 5 / 20 / 40 KB more
(comments: they change nothing but the source's length, which MLX 0.32 rebuilds and hashes at every launch), the
20 KB one with its body in a file the source #includes by absolute path (does NVRTC take it; what is left), a
64-row bfloat16 product (cuBLAS, which MLX plans anew at every call: a heuristic query and a stream capture) beside
the same product as `gather_mm` with one weight (each row a batch of one, all of them sorted on that weight: MLX
runs them as one CUTLASS grouped GEMM, without cuBLAS), at a small and at the 4B's gate|up shape, and a 64-row 4-bit
product. The small arrays make the GPU's own time ~1-2 us an operation, so the rest is the host's. Prints one line
per kind.
"""

# ruff: noqa: I001
from __future__ import annotations

import time

import mlxrunner  # noqa: F401  (before mlx.core, as the other benchmarks do)
import mlx.core as mx  # noqa: E402

CHAIN = 2000


def measure(name: str, step, start: mx.array, chain: int = CHAIN) -> None:
    for _ in range(2):  # warm-up: compiles, allocations
        y = start
        for _ in range(200):
            y = step(y)
        mx.eval(y)
    mx.synchronize()
    build = run = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        y = start
        for _ in range(chain):
            y = step(y)
        t1 = time.perf_counter()
        mx.eval(y)
        mx.synchronize()
        t2 = time.perf_counter()
        build, run = build + t1 - t0, run + t2 - t1
    print(f"{name:42s} build {build / 3 / chain * 1e6:6.2f} us/op   eval {run / 3 / chain * 1e6:6.2f} us/op",
          flush=True)


def padded_kernel(pad: int):
    source = "  const int i = threadIdx.x; if (i < x_shape[0]) out[i] = x[i] + static_cast<T>(1.0f);\n"
    source += ("// " + "x" * 97 + "\n") * (pad // 100)
    kernel = mx.fast.cuda_kernel(name=f"op_cost_{pad}", input_names=["x"], output_names=["out"], source=source)
    return lambda y: kernel(inputs=[y], template=[("T", mx.bfloat16)], grid=(256, 1, 1), threadgroup=(256, 1, 1),
                            output_shapes=[y.shape], output_dtypes=[y.dtype])[0]


def included_kernel(pad: int):
    """The padded kernel's body handed over as MLXRUNNER_KERNEL_SOURCES_BY_PATH=1 hands ours (`#include`d from a file
    by its absolute path): whether MLX's NVRTC takes such an include, and what a launch costs when the hashed source
    is one line."""
    from mlxrunner import _core

    body = ("const int i = threadIdx.x; if (i < x_shape[0]) out[i] = x[i] + static_cast<T>(1.0f);\n"
            + ("// " + "x" * 97 + "\n") * (pad // 100))
    kernel = mx.fast.cuda_kernel(name=f"op_cost_included_{pad}", input_names=["x"], output_names=["out"],
                                 source=_core.kernel_source_included(body, ["x"]))
    return lambda y: kernel(inputs=[y], template=[("T", mx.bfloat16)], grid=(256, 1, 1), threadgroup=(256, 1, 1),
                            output_shapes=[y.shape], output_dtypes=[y.dtype])[0]


def grouped_product(w: mx.array):
    """x [M, K] @ w.T as gather_mm with one weight: each row a batch of one, every row on weight 0, sorted."""
    stacked = mx.transpose(w)[None]  # [1, K, N], read transposed in place
    def product(x: mx.array) -> mx.array:
        indices = mx.zeros((x.shape[0],), mx.uint32)
        out = mx.gather_mm(x[:, None, :], stacked, rhs_indices=indices, sorted_indices=True)
        return out.reshape(x.shape[0], w.shape[0])
    return product


def products(rows: int, dtype: mx.Dtype = mx.bfloat16, timed: bool = True) -> None:
    """The many-row product both ways: same numbers (printed), then the cost of each."""
    for n in (2560, 19456):
        w = (mx.random.normal((n, 2560)) * 0.02).astype(dtype)
        x = mx.random.normal((rows, 2560)).astype(dtype)
        grouped = grouped_product(w)
        mx.eval(w, x)
        difference = mx.abs((x @ w.T).astype(mx.float32) - grouped(x).astype(mx.float32)).max().item()
        print(f"{rows} x 2560 @ 2560 x {n}: matmul and gather_mm differ by at most {difference:g}", flush=True)
        if not timed:
            continue
        # Each step feeds the product's first 2,560 columns back, scaled, so the chain stays [rows, 2560].
        measure(f"{rows} x 2560 @ 2560 x {n} matmul", lambda y, w=w: (y @ w.T)[:, :2560] * 0.5, x, chain=400)
        measure(f"{rows} x 2560 @ 2560 x {n} gather_mm", lambda y, g=grouped: g(y)[:, :2560] * 0.5, x, chain=400)


def main() -> int:
    x = mx.zeros((256,), mx.bfloat16)
    weight = mx.ones((256,), mx.bfloat16)
    mx.eval(x, weight)
    measure("add", lambda y: y + 1, x)
    measure("multiply", lambda y: y * y, x)
    measure("fast.rms_norm", lambda y: mx.fast.rms_norm(y, weight, 1e-6), x)
    if not mx.cuda.is_available():
        products(8, mx.float32, timed=False)  # the CPU (gather_mm: float32 only) checks that the two ways agree
        print("(no CUDA: the custom kernels and the 64-row products are the GPU's rows)")
        return 0
    for pad in (0, 5000, 20000, 40000):
        measure(f"cuda_kernel, source +{pad} bytes", padded_kernel(pad), x)
    try:
        measure("cuda_kernel, 20 KB body #included", included_kernel(20000), x)
    except Exception as error:  # noqa: BLE001  (the question is whether it compiles at all)
        print(f"cuda_kernel, body #included by absolute path: failed ({str(error)[:300]})", flush=True)
    products(64)
    w = (mx.random.normal((2560, 2560)) * 0.02).astype(mx.bfloat16)
    x64 = mx.random.normal((64, 2560)).astype(mx.bfloat16)
    packed = mx.quantize(w, group_size=64, bits=4)
    mx.eval(w, x64, *packed)
    measure("64 rows, 4-bit quantized_matmul", lambda y: mx.quantized_matmul(
        y, *packed, transpose=True, group_size=64, bits=4) * 0.5, x64, chain=400)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
