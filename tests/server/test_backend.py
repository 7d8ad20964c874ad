"""The MLX backend: detected and logged at start-up; a CUDA backend that cannot start is a clear error."""

import os
import re
import sys

import mlx.core as mx
from conftest import run_cli

from mlxrunner import backend
from mlxrunner.launcher import Runner

# What `import mlx.core` raises with mlx-cuda-13 installed where its CUDA libraries are missing (seen on
# a machine without NVIDIA's libraries; without a driver the library named is libcuda.so.1 instead).
CUDA_LOADER_MESSAGE = "libnccl.so.2: cannot open shared object file: No such file or directory"


def test_detect_names_the_backend_mlx_computes_on():
    found = backend.detect()
    expected = "cuda" if mx.cuda.is_available() else "metal" if mx.metal.is_available() else "cpu"
    assert found.name == expected
    assert found.mlx_version == mx.__version__
    assert found.device and f"backend={expected}" in found.summary()
    if expected == "cpu":  # which BLAS serves the CPU's products: the suite's (tests/conftest.py)
        import mlxrunner

        assert f"cpu_blas={mlxrunner.cpu_blas}" in found.summary()
    if sys.platform == "linux":
        assert found.package in backend.installed_backend_packages()


def test_runner_logs_the_backend_at_start_up():
    with Runner.start("all-minilm", timeout=120) as runner:
        lines = list(runner.stderr_tail)
    line = next(line for line in lines if "backend=" in line)
    assert f"mlx={mx.__version__}" in line and re.search(r"backend=(cpu|cuda|metal) device=", line)
    if "backend=cpu" in line and sys.platform == "linux":
        assert "cpu_blas=openblas" in line  # the runner inherits the suite's MLXRUNNER_CPU_BLAS


def shadow_mlx(root, message: str, packages: list[str]):
    """A directory that, first on PYTHONPATH, makes `import mlx.core` fail the way a broken backend does,
    with `packages` installed as far as importlib.metadata can tell."""
    (root / "mlx").mkdir()
    (root / "mlx" / "__init__.py").write_text("")
    (root / "mlx" / "core.py").write_text(f"raise ImportError({message!r})\n")
    for name in packages:
        info = root / f"{name.replace('-', '_')}-0.32.4.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.32.4\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}


def test_cuda_backend_without_its_runtime_is_a_clear_error_for_every_entry_point(tmp_path):
    env = shadow_mlx(tmp_path, CUDA_LOADER_MESSAGE, ["mlx-cuda-13"])
    for args in (["--model", "all-minilm", "--port", "0"], ["embed", "--model", "all-minilm", "hello"],
                 ["generate", "--model", "all-minilm", "--prompt", "x", "-o", str(tmp_path / "x.png")]):
        result = run_cli(*args, env=env)
        assert result.returncode == 1, (args, result.stderr[-2000:])
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: MLX's CUDA backend (mlx-cuda-13) could not load the CUDA runtime: "), last
        assert "libnccl.so.2" in last and "pip install 'mlxrunner[cpu]'" in last, last
        assert "Traceback" not in result.stderr


def test_linux_without_any_backend_package_says_which_to_install():
    message = backend.explain_import_failure(ImportError("libmlx.so: cannot open shared object file"), [])
    if sys.platform == "linux":
        assert "needs a backend package" in message and "mlxrunner[cpu]" in message and "mlxrunner[cuda]" in message
    assert "libmlx.so" in message


def test_both_backends_installed_is_named_as_the_clash():
    message = backend.explain_import_failure(ImportError("boom"), ["mlx-cuda-13", "mlx-cpu"])
    assert "clash" in message and "mlx-cuda-13" in message
