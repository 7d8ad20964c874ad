"""Which MLX backend this process computes on (CUDA, Metal or CPU), found once at start-up.

On Linux MLX's backend is a separate package: `mlx-cpu` or `mlx-cuda-13` (mlxrunner's `.[cpu]` and
`.[cuda]` extras). A CUDA backend whose runtime cannot load (no NVIDIA driver, no libcuda.so.1, the
CUDA libraries pip installs beside it missing) fails at `import mlx.core` with a bare loader message
such as "libnccl.so.2: cannot open shared object file"; `import_mlx` turns that into an error that
says what is missing and what to install instead.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Iterator

from mlxrunner.settings import CPU_DTYPES, DEFAULT_CPU_DTYPE

# The dtype the CPU computes image and embedding models in (--cpu-dtype): "float32" upcasts bf16/f16
# weights as they load, because MLX's CPU backend has no BLAS path for half-precision matrix products
# (a 128 x 1024 x 3072 product: 250 ms in bf16, 7.5 ms in float32; benchmarks/README.md); "stored" keeps
# the checkpoint's dtype (half the memory). Other backends always keep it.
_cpu_dtype = DEFAULT_CPU_DTYPE

# MLX's backend packages, by distribution name.
CUDA_PACKAGES = ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda")
CPU_PACKAGES = ("mlx-cpu",)


class BackendError(RuntimeError):
    """MLX cannot start on this machine; the message says why and what to install."""


@dataclass(frozen=True)
class Backend:
    name: str  # "cuda", "metal" or "cpu"
    device: str  # e.g. "NVIDIA H100 80GB HBM3", "Apple M3 Max", "AMD EPYC"
    memory_bytes: int | None  # the device's memory where MLX reports it
    mlx_version: str
    package: str | None  # the backend distribution on Linux (mlx-cuda-13, mlx-cpu), None on macOS

    def summary(self) -> str:
        import mlxrunner

        memory = f" memory={self.memory_bytes / 2**30:.1f}GiB" if self.memory_bytes else ""
        package = f" package={self.package}" if self.package else ""
        # On the CPU, which BLAS serves MLX's matrix products (mlxrunner/__init__.py) sets their speed.
        blas = f" cpu_blas={mlxrunner.cpu_blas}" if self.name == "cpu" else ""
        return f"backend={self.name} device={self.device!r}{memory} mlx={self.mlx_version}{package}{blas}"


def installed_backend_packages() -> list[str]:
    found = []
    for name in CUDA_PACKAGES + CPU_PACKAGES:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def explain_import_failure(exc: BaseException, packages: list[str]) -> str:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    cuda = [p for p in packages if p in CUDA_PACKAGES]
    if cuda:
        also_cpu = " (mlx-cpu is installed too: the two clash, keep one)" if "mlx-cpu" in packages else ""
        return (f"MLX's CUDA backend ({cuda[0]}) could not load the CUDA runtime: {reason}{also_cpu}. It needs an "
                f"NVIDIA driver (libcuda.so.1) and the CUDA 13 libraries pip installs with it (nvidia-*). "
                f"Without an NVIDIA GPU, use the CPU backend: pip uninstall {cuda[0]} && pip install 'mlxrunner[cpu]'")
    if sys.platform == "linux" and not packages:
        return (f"MLX could not be imported: {reason}. On Linux MLX needs a backend package: "
                f"pip install 'mlxrunner[cpu]' (or 'mlxrunner[cuda]' for NVIDIA GPUs)")
    return f"MLX could not be imported: {reason}"


def import_mlx() -> ModuleType:
    """`mlx.core`, or a BackendError that says what is missing."""
    try:
        return importlib.import_module("mlx.core")
    except (ImportError, OSError) as exc:
        raise BackendError(explain_import_failure(exc, installed_backend_packages())) from exc


def detect() -> Backend:
    mx = import_mlx()
    if mx.cuda.is_available():
        name = "cuda"
    elif mx.metal.is_available():
        name = "metal"
    else:
        name = "cpu"
    try:
        info = mx.device_info()
    except Exception:  # older MLX, or a device that cannot describe itself: the name is enough
        info = {}
    memory = info.get("memory_size") or info.get("total_memory")
    packages = installed_backend_packages()
    return Backend(name=name, device=str(info.get("device_name") or mx.default_device()),
                   memory_bytes=int(memory) if memory else None, mlx_version=mx.__version__,
                   package=packages[0] if packages else None)


def set_cpu_dtype(dtype: str) -> None:
    """What compute_weights does on the CPU from now on (one of CPU_DTYPES); the runner sets it once."""
    global _cpu_dtype
    if dtype not in CPU_DTYPES:
        raise ValueError(f"cpu dtype must be one of {', '.join(CPU_DTYPES)}, got {dtype!r}")
    _cpu_dtype = dtype


def upcasts_on_this_device() -> bool:
    """Whether compute_weights turns bf16/f16 into float32 here."""
    mx = import_mlx()
    return _cpu_dtype == "float32" and mx.default_device() == mx.cpu


def computed_bytes(weights: dict) -> int:
    """The memory `weights` take once compute_weights has converted them (read from shapes, nothing loaded)."""
    mx = import_mlx()
    factor = 2 if upcasts_on_this_device() else 1
    return sum(w.nbytes * (factor if w.dtype in (mx.bfloat16, mx.float16) else 1) for w in weights.values())


def compute_weights(weights: dict) -> dict:
    """A component's weights as this backend computes with them: on the CPU (unless set_cpu_dtype("stored"))
    bf16 and f16 tensors become float32, packed ones and their scales included; elsewhere as stored. Lazy:
    each tensor converts as it is read, so loading holds one tensor's extra copy at a time."""
    mx = import_mlx()
    if not upcasts_on_this_device():
        return weights
    half = (mx.bfloat16, mx.float16)
    return {name: value.astype(mx.float32) if value.dtype in half else value for name, value in weights.items()}


# MLX's peak memory is reset at each image phase to measure that phase (imagegen/pipeline.py); the peak since
# start, which /health reports, is kept here across those resets.
_peak_before_reset = 0


def reset_peak_memory() -> int:
    """MLX's peak since the last reset (and resets it); peak_memory() still counts it."""
    global _peak_before_reset
    mx = import_mlx()
    peak = mx.get_peak_memory()
    _peak_before_reset = max(_peak_before_reset, peak)
    mx.reset_peak_memory()
    return peak


def lower_cache_limit(limit: int) -> int:
    """MLX's buffer cache held to at most `limit` bytes from now on (never raised: MLX keeps 32 MiB on the CPU, its
    memory limit on a GPU); lowering it frees the cached buffers above it. Returns the limit it had."""
    mx = import_mlx()
    previous = mx.set_cache_limit(limit)
    if previous < limit:
        mx.set_cache_limit(previous)
    return previous


@contextmanager
def cache_limit(limit: int) -> Iterator[None]:
    """lower_cache_limit while the block runs, then the previous limit back: what an earlier, larger job left cached
    is let go as this one starts, instead of sitting beside its arrays."""
    previous = lower_cache_limit(limit)
    try:
        yield
    finally:
        import_mlx().set_cache_limit(previous)


def peak_memory() -> int:
    """The most memory MLX's arrays held at once since the process started."""
    return max(_peak_before_reset, import_mlx().get_peak_memory())
