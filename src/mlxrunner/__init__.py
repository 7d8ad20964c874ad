"""mlxrunner: a model-runner subprocess for MLX (image generation, LLMs, embeddings).

The hot paths live in the C++ extension ``mlxrunner._core``; this package does argument
parsing, model resolution, weight loading, tokenization and the HTTP server.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path

from mlxrunner.early_signals import install_if_started_as_the_runner

# First thing: a runner stopped in its first instant exits cleanly (early_signals.py says why).
install_if_started_as_the_runner()

__version__ = "0.1.0"


def _route_mlx_cpu_blas() -> str:
    """Load csrc/blas/cpu_blas_shim.c's library globally, before mlx.core loads libmlx; returns the BLAS in use.

    Linux's mlx[cpu] wheel links the reference BLAS (~40x slower sgemm on x86). With the shim
    loaded RTLD_GLOBAL first, libmlx's cblas_* imports bind to OpenBLAS instead, or to MKL where the
    `mkl` package is installed (MLXRUNNER_CPU_BLAS: auto, mkl, openblas or reference). This only works
    if mlxrunner is imported before mlx.core; otherwise MLX keeps its reference BLAS (still correct).
    """
    from mlxrunner.settings import cpu_blas_requested

    requested = cpu_blas_requested()
    if sys.platform != "linux" or requested == "reference":
        return "reference"
    # Next to _core (found without importing it: _core itself loads libmlx).
    core = importlib.util.find_spec("mlxrunner._core")
    shim_path = Path(core.origin).with_name("_cpu_blas_shim.so") if core and core.origin else None
    if "mlx.core" in sys.modules or shim_path is None or not shim_path.exists():
        return "reference"
    # OpenBLAS's idle workers spin for 2^28 cycles before sleeping. Between MLX's many small ops
    # they never sleep, and any other busy thread (the other core's work, the server's) then
    # slows every matmul several-fold: a Z-Image DiT step went from 0.35 s to 3.7 s with a
    # compile running beside it. Sleeping after 2^4 cycles costs nothing measurable when the
    # machine is quiet. An explicit setting wins.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    try:
        shim = ctypes.CDLL(str(shim_path), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    except OSError:
        return "reference"
    if requested in ("auto", "mkl") and _route_to_mkl(shim, required=requested == "mkl"):
        return "mkl"
    return "openblas"


def _route_to_mkl(shim: ctypes.CDLL, required: bool) -> bool:
    """Have the shim serve MLX's products from MKL's runtime library, where the `mkl` package installed one.

    MKL's products of the sizes a CPU image or embedding model runs are ~10-25 % faster than OpenBLAS's on x86
    (benchmarks/README.md). A missing library is silent under "auto" and a warning under an explicit "mkl"."""
    import warnings

    library = _mkl_runtime_library()
    if library is None:
        if required:
            warnings.warn("MLXRUNNER_CPU_BLAS=mkl, but the mkl package is not installed (pip install "
                          "'mlxrunner[mkl]'): OpenBLAS serves MLX's CPU matmuls", RuntimeWarning, stacklevel=3)
        return False
    # MKL's OpenMP workers spin for 200 ms after each product by default: between MLX's many small ops they would
    # hold the cores that our CPU kernels' threads need (as OpenBLAS's did, above; MiniLM's 32 long texts 735 ->
    # 916 ms at 50 ms). Sleeping at once (0) costs a wake-up per product instead: one sentence at a time 30 % slower
    # than at 10 ms, which is what we take (benchmarks/README.md). Read when MKL starts its threads; an explicit
    # setting wins.
    os.environ.setdefault("KMP_BLOCKTIME", "10")
    shim.mlxrunner_blas_error.restype = ctypes.c_char_p
    if shim.mlxrunner_blas_use(str(library).encode()) != 0:
        warnings.warn(f"MKL's {library} could not serve MLX's CPU matmuls "
                      f"({shim.mlxrunner_blas_error().decode(errors='replace')}): OpenBLAS does", RuntimeWarning,
                      stacklevel=3)
        return False
    return True


def _mkl_runtime_library() -> Path | None:
    """libmkl_rt from the `mkl` package's files (pip puts it in the environment's lib/), or None."""
    import importlib.metadata

    try:
        files = importlib.metadata.distribution("mkl").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.startswith("libmkl_rt.so"):
            path = Path(file.locate())
            if path.exists():
                return path
    return None


def _warn_when_mlx_came_first(route: str) -> None:
    """Say so when mlx.core was imported before mlxrunner on Linux and MLX computes on the CPU: its matmuls then
    keep the reference BLAS, and a CPU image or LLM runs many times slower (a small Z-Image step 0.07 -> 3.2 s)
    with nothing else to show why."""
    from mlxrunner.settings import cpu_blas_requested

    if (route != "reference" or sys.platform != "linux" or cpu_blas_requested() == "reference"
            or "mlx.core" not in sys.modules):
        return
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        import warnings

        warnings.warn("mlx.core was imported before mlxrunner, so MLX's CPU matmuls keep the reference BLAS (tens of "
                      "times slower than OpenBLAS on x86): import mlxrunner first, or set MLXRUNNER_CPU_BLAS=reference "
                      "to choose the reference BLAS and silence this", RuntimeWarning, stacklevel=3)


#: Which BLAS serves MLX's CPU matmuls in this process: "mkl", "openblas" or "reference".
cpu_blas = _route_mlx_cpu_blas()
_warn_when_mlx_came_first(cpu_blas)


def _reuse_freed_cpu_buffers() -> None:
    """Have glibc's malloc keep the buffers MLX's CPU backend frees for its next arrays.

    MLX's CPU backend mallocs each array's buffer and frees it once the graph is done with it. glibc serves a
    buffer above its mmap threshold (128 KiB at first, rising to the largest size freed so far) as a fresh mapping,
    and gives the top of its heap back to the kernel once twice that is free there; so the next layer's or the
    next image's buffers are new pages, which the kernel zeroes at their first write, 4 KiB at a time: about a
    tenth of the small Z-Image's VAE decode on the CPU. Buffers up to 32 MiB (glibc's most) taken from the heap
    and up to 256 MiB of free heap kept make them reused: that decode at 256² ran ~20 % faster, and the process's
    peak RSS grew by what stays free in the heap (309 -> 413 MB for that image; benchmarks/README.md). Values the
    user set in glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ win.
    """
    if sys.platform != "linux" or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & os.environ.keys():
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a libc without mallopt
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 256 << 20)


_reuse_freed_cpu_buffers()


def _keep_compiled_gpu_kernels() -> None:
    """Let the NVIDIA driver keep every GPU kernel it compiles on disk (before anything starts CUDA).

    MLX's CUDA wheel carries kernels the driver compiles for the GPU at their first use: ~53 s for a
    4-bit Qwen3-4B on a fresh H200, which the LLM pays at load (its warm-up) rather than in a request.
    The driver keeps the results in ~/.nv/ComputeCache, so the next start warms up in under a second,
    as long as they fit its size cap; a quantized image model with its text encoder needs more than
    the cap some drivers default to. 4 GiB is the most the driver accepts. A value the user set wins.
    """
    os.environ.setdefault("CUDA_CACHE_MAXSIZE", str(4 << 30))


_keep_compiled_gpu_kernels()


def _float32_means_float32_on_cuda() -> None:
    """Float32 products on CUDA in float32, not TF32 (MLX's CUDA default; PyTorch's is float32 for matmuls).

    With TF32 a float32 matrix product keeps 10 bits of each input's mantissa, but only where MLX takes cuBLAS
    (two rows or more): a decode step of one row runs MLX's own float32 kernel. So a float32 model's batched
    rows (llm/batch.py) parted from their lone runs after a near-tie, and float32 checkpoints did not compute
    what the reference computes. The networks run in bfloat16 on a GPU unless the checkpoint is float32, so
    this costs nothing elsewhere. MLX reads the variable once, at its first float32 product; a value the user
    set wins (MLX_ENABLE_TF32=1 for the speed).
    """
    os.environ.setdefault("MLX_ENABLE_TF32", "0")


_float32_means_float32_on_cuda()


def _load_libmlx_before_core() -> None:
    """Import mlx.core now (after the BLAS shim), so libmlx is loaded before anything loads _core.

    _core finds libmlx through its rpath ($ORIGIN/../mlx/lib), which holds only when mlx and
    mlxrunner share a site-packages. Installed apart (pip --target, PYTHONPATH layouts, as on the
    GPU machine), `from mlxrunner import _core` failed with "libmlx.so: cannot open shared object
    file" unless mlx.core had been imported first. A failure here is left for
    mlxrunner.backend.import_mlx to explain when MLX is actually needed.
    """
    try:
        import mlx.core  # noqa: F401
    except Exception:
        pass


_load_libmlx_before_core()
