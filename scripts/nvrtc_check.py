"""Compile our CUDA kernel sources with NVRTC for sm_90a, as MLX 0.32's custom kernels hand them to it, on a machine
without a GPU: a kernel that does not compile is found here, not in a device call.

    python scripts/nvrtc_check.py --mlx-source DIR      # DIR: a checkout of MLX at the pinned version (v0.32.4)

What it needs, besides mlxrunner built in this environment (for `_core.compact_kernel_source`, the sources as the
kernels hand them over): NVIDIA's NVRTC (`nvidia-cuda-nvrtc`, CUDA 13) and CUDA runtime headers
(`nvidia-cuda-runtime`), and the CCCL headers of MLX's CUDA wheel (`mlx-cuda-13`, its `mlx/include/cccl`). It
downloads those three wheels with pip into --cache (the package registry; no GPU, nothing installed) and unpacks what
it uses. MLX's own device headers (`mlx/backend/cuda/device/*.cuh`, which the kernels include) are not in its wheels,
where they are compiled into libmlx, so they come from --mlx-source.

Each kernel is built as MLX's `fast::cuda_kernel` builds it (`backend/cuda/custom_kernel.cpp`): MLX's default header,
ours, then a `__global__` function in `mlx::core::cu` taking each input's pointer (and its shape, strides and ndim
where the source names them), the outputs' pointers, and the template arguments as constants in its body. The
template arguments and dtypes below are those the host code passes (csrc/nn/cuda_dit_fusion.cpp, cuda_norm_rope.cpp,
rope.cpp, cuda_batch_attention.cpp, cuda_decode_attention.cpp), for bfloat16 and float32 inputs where the kernel
takes both; of the decode product's many variants (cuda_matvec.cpp) only the plain one is listed yet. Whether a kernel
computes the right numbers is for the emulated-warp tests (tests/unit/test_dit_row_kernels.py,
test_batch_attention_kernel.py, ...) and the GPU tests; this checks only that NVRTC takes every variant. Exit status 1
if any does not compile.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path

import mlxrunner  # noqa: F401  (binds MLX's CPU BLAS before mlx is imported)
from mlxrunner import _core

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc" / "nn"
WHEELS = {"nvrtc": "nvidia-cuda-nvrtc==13.0.*", "runtime": "nvidia-cuda-runtime==13.0.*", "mlx": "mlx-cuda-13==0.32.4"}
CUDA_TYPE = {"bf16": "__nv_bfloat16", "f16": "__half", "float": "float", "int32": "int32_t", "uint32": "uint32_t"}
MLX_DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'


@cache  # each is read and compacted once, whichever variants use it
def kernel_string(path: str, name: str, switches: tuple[tuple[str, bool], ...] = ()) -> str:
    found = re.search(rf'constexpr const char\* {name} = R"\((.*?)\)";', (CSRC / path).read_text(), re.S)
    if not found:
        raise SystemExit(f"{name} is not in csrc/nn/{path}")
    return _core.compact_kernel_source(found.group(1), dict(switches))


def mlx_kernel_source(name: str, header: str, body: str, inputs: list, outputs: list, constants: dict) -> str:
    """The source MLX's custom kernel compiles: inputs and outputs as (name, dtype) pairs, constants by name (a dtype
    name for a type, a bool, or an int)."""
    params = []
    for input_name, dtype in inputs:
        params.append(f"    const {CUDA_TYPE[dtype]}* {input_name}")
        for suffix, kind in (("shape", "Shape"), ("strides", "Strides"), ("ndim", "int")):
            if f"{input_name}_{suffix}" in body:
                params.append(f"    const __grid_constant__ {kind} {input_name}_{suffix}")
    params += [f"    {CUDA_TYPE[dtype]}* {output_name}" for output_name, dtype in outputs]
    values = "".join(f"  using {k} = {CUDA_TYPE[v]};\n" if isinstance(v, str) else
                     f"  constexpr bool {k} = {str(v).lower()};\n" if isinstance(v, bool) else
                     f"  constexpr int {k} = {v};\n" for k, v in constants.items())
    return (MLX_DEFAULT_HEADER + header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
            f"__global__ void {name}(\n" + ",\n".join(params) + ") {\n" + values + "\n" + body +
            "\n}\n\n} // namespace mlx::core::cu\n")


def kernels():
    """(label, MLX source) for every variant the host code launches."""
    row_helpers = kernel_string("cuda_kernel_common.h", "kCudaRowHelpers")
    block_sum = kernel_string("cuda_kernel_common.h", "kCudaBlockSum")
    with_sum = block_sum + row_helpers
    for dtype in ("bf16", "float"):
        row = {"T": dtype, "EPS_BITS": 1, "PER_THREAD": 8}
        yield f"scaled_rms_norm/{dtype}", mlx_kernel_source(
            "mlxr_scaled_rms_norm", with_sum, kernel_string("cuda_dit_fusion.cpp", "kScaledRmsNorm"),
            [("x", dtype), ("weight", dtype), ("scale", dtype)], [("out", dtype)], row)
        for nxt in (0, 1):
            inputs = [("x", dtype), ("a", dtype), ("a_weight", dtype), ("gate", dtype)]
            inputs += [("next_weight", dtype), ("next_scale", dtype)] if nxt else []
            yield f"gated_residual/next={nxt}/{dtype}", mlx_kernel_source(
                "mlxr_gated_residual", with_sum + f"#define NEXT {nxt}\n",
                kernel_string("cuda_dit_fusion.cpp", "kGatedResidual"), inputs,
                [("h", dtype)] + ([("next", dtype)] if nxt else []), row | ({"NEXT_EPS_BITS": 1} if nxt else {}))
        for residual in (0, 1):
            inputs = [("x", dtype)] + ([("y", dtype), ("gate", dtype)] if residual else [])
            yield f"modulated_layer_norm/residual={residual}/{dtype}", mlx_kernel_source(
                "mlxr_modulated_layer_norm", with_sum + f"#define RESIDUAL {residual}\n",
                kernel_string("cuda_dit_fusion.cpp", "kModulatedLayerNorm"),
                inputs + [("one_plus_scale", dtype), ("shift", dtype)],
                ([("h", dtype)] if residual else []) + [("out", dtype)], row)
        for norm in (0, 1):
            inputs = [("x", dtype)] + ([("weight", dtype)] if norm else []) + [("cos_table", "float"),
                                                                               ("sin_table", "float")]
            yield f"head_norm_rope/norm={norm}/{dtype}", mlx_kernel_source(
                "mlxr_head_norm_rope_pairs", f"#define NORM {norm}\n",
                kernel_string("cuda_dit_fusion.cpp", "kHeadNormRopePairs"), inputs, [("out", dtype)],
                {"T": dtype, "D": 128, "PAIRS": 2} | ({"EPS_BITS": 1} if norm else {}))
        yield f"add_rms_norm/{dtype}", mlx_kernel_source(
            "mlxr_add_rms_norm", with_sum, kernel_string("cuda_norm_rope.cpp", "kAddRmsNorm"),
            [("x", dtype), ("delta", dtype), ("weight", dtype)], [("added", dtype), ("normed", dtype)], row)
        for norm in (0, 1):
            inputs = [("qkv", dtype)] + ([("q_weight", dtype), ("k_weight", dtype)] if norm else [])
            yield f"qk_norm_rope/norm={norm}/{dtype}", mlx_kernel_source(
                "mlxr_qk_norm_rope", kernel_string("cuda_norm_rope.h", "kCudaHeadNormRope"),
                kernel_string("cuda_norm_rope.cpp", "kQkRope", (("NORM", bool(norm)),)),
                inputs + [("inverse_frequencies", "float"), ("offsets", "int32")], [("q_out", dtype), ("k_out", dtype),
                                                                               ("v_out", dtype)],
                {"T": dtype, "D": 128, "Q_HEADS": 32, "KV_HEADS": 8, "TRADITIONAL": False} |
                ({"EPS_BITS": 1} if norm else {}))
        yield f"rope_pairs/{dtype}", mlx_kernel_source(
            "mlxr_rope_pairs", "", kernel_string("rope.cpp", "kRopePairsCuda"),
            [("x", dtype), ("cos_table", "float"), ("sin_table", "float")], [("out", dtype)], {"DT": dtype})
    # The widest row a Z-Image block has (3,840: 16 elements a thread), where registers bound the occupancy.
    yield "gated_residual/next=1/bf16/16", mlx_kernel_source(
        "mlxr_gated_residual", with_sum + "#define NEXT 1\n", kernel_string("cuda_dit_fusion.cpp", "kGatedResidual"),
        [(name, "bf16") for name in ("x", "a", "a_weight", "gate", "next_weight", "next_scale")],
        [("h", "bf16"), ("next", "bf16")], {"T": "bf16", "EPS_BITS": 1, "PER_THREAD": 16, "NEXT_EPS_BITS": 1})
    for dtype in ("bf16", "f16", "float"):
        yield f"argmax/{dtype}", mlx_kernel_source("mlxr_argmax", "", kernel_string("cuda_argmax.cpp", "kArgmax"),
                                                   [("z", dtype)], [("out", "int32")], {"T": dtype})
    for channels in (128, 512):  # the VAE's widest and narrowest images' channels
        yield f"group_norm_sums/{channels}/bf16", mlx_kernel_source(
            "mlxr_group_norm_sums", "", kernel_string("cuda_group_norm.cpp", "kGroupNormSums"), [("x", "bf16")],
            [("sums", "float")], {"T": "bf16", "C": channels, "GROUPS": 32, "CHUNK_PIXELS": 65536 // channels})
        for silu in (0, 1):
            yield f"group_norm/silu={silu}/{channels}/bf16", mlx_kernel_source(
                "mlxr_group_norm", f"#define SILU {silu}\n", kernel_string("cuda_group_norm.cpp", "kGroupNormApply"),
                [("x", "bf16"), ("sums", "float"), ("weight", "bf16"), ("bias", "bf16")], [("out", "bf16")],
                {"T": "bf16", "C": channels, "GROUPS": 32, "EPS_BITS": 1})
    # the tensor-core kernels' shared snippets: mma.sync and the asynchronous copies
    mma_and_copies = kernel_string("cuda_kernel_common.h", "kCudaMma") + kernel_string("cuda_kernel_common.h",
                                                                                        "kCudaAsyncCopies")
    yield "batch_decode_attention/bf16", mlx_kernel_source(
        "mlxr_batch_decode_attention", "", kernel_string("cuda_batch_attention.cpp", "kBatchAttentionSource"),
        [("q", "bf16"), ("keys", "bf16"), ("values", "bf16"), ("positions", "int32")], [("out", "bf16")],
        {"T": "bf16", "D": 128, "Q_HEADS": 32, "KV_HEADS": 8, "SCALE_BITS": 1})
    step_inputs = [("q", "bf16"), ("k", "bf16"), ("v", "bf16"), ("keys", "bf16"), ("values", "bf16"),
                   ("position", "int32")]
    step_parts = [("part_acc", "float"), ("part_max", "float"), ("part_sum", "float")]
    for d, q_heads, kv_heads in ((128, 32, 8), (128, 64, 8), (64, 16, 8)):
        constants = {"T": "bf16", "D": d, "Q_HEADS": q_heads, "KV_HEADS": kv_heads, "SCALE_BITS": 1}
        yield f"decode_attention_parts/{d}/{q_heads}x{kv_heads}", mlx_kernel_source(
            "mlxr_decode_attention_parts", "",
            kernel_string("cuda_decode_attention.cpp", "kDecodeAttentionParts",
                          (("MLXR_ROPE", False), ("MLXR_NORM", False))), step_inputs, step_parts, constants)
        # the variants that make the q/k norms and RoPE from the projected heads themselves
        for norm in (False, True):
            norms = [("q_weight", "bf16"), ("k_weight", "bf16")] if norm else []
            yield f"decode_attention_roped/norm={int(norm)}/{d}/{q_heads}x{kv_heads}", mlx_kernel_source(
                "mlxr_decode_attention_roped", kernel_string("cuda_norm_rope.h", "kCudaHeadNormRope"),
                kernel_string("cuda_decode_attention.cpp", "kDecodeAttentionParts",
                              (("MLXR_ROPE", True), ("MLXR_NORM", norm))),
                step_inputs + [("inverse_frequencies", "float")] + norms, step_parts,
                constants | {"TRADITIONAL": False} | ({"EPS_BITS": 1} if norm else {}))
    # The decode product's plain variant (its normed and heads variants are not listed yet), 4-bit and 16-bit weights.
    for bits in (4, 16):
        yield f"qmv_tc/bits={bits}/bf16", mlx_kernel_source(
            "mlxr_qmv_tc", "#define MLXR_STAGE 0\n" + kernel_string("cuda_kernel_common.h", "kCudaMma") +
            kernel_string("cuda_matvec.cpp", "kTensorCoreHelpers"),
            kernel_string("cuda_matvec.cpp", "kTensorCoreSource", (("MLXR_NORMED", False), ("MLXR_HEADS", False))),
            [("x", "bf16"), ("w", "uint32"), ("scales", "bf16"), ("biases", "bf16")], [("out", "bf16")],
            {"T": "bf16", "BITS": bits, "GROUP": 64, "XT": 1, "W": 4, "U": 2, "GATED": False})
    chunk_helpers = mma_and_copies + kernel_string("cuda_decode_attention.cpp", "kChunkAttentionHelpers")
    for dtype in ("bf16", "f16"):
        for d, q_heads, kv_heads in ((128, 32, 8), (128, 64, 8), (64, 16, 8), (128, 16, 16)):
            yield f"chunk_attention_parts/{d}/{q_heads}x{kv_heads}/{dtype}", mlx_kernel_source(
                "mlxr_chunk_attention_parts", chunk_helpers,
                kernel_string("cuda_decode_attention.cpp", "kChunkAttentionParts",
                              (("MLXR_ROPE", False), ("MLXR_NORM", False))),
                [("q", dtype), ("k", dtype), ("v", dtype), ("keys", dtype), ("values", dtype), ("position", "int32")],
                [("part_acc", "float"), ("part_max", "float"), ("part_sum", "float")],
                {"T": dtype, "D": d, "Q_HEADS": q_heads, "KV_HEADS": kv_heads, "SCALE_BITS": 1})
    # The chunk kernel's variants that read the q|k|v product and make the q/k norms and RoPE (the default).
    for norm in (False, True):
        norms = [("q_weight", "bf16"), ("k_weight", "bf16")] if norm else []
        yield f"chunk_attention_roped/norm={int(norm)}/128/32x8", mlx_kernel_source(
            "mlxr_chunk_attention_roped", chunk_helpers + kernel_string("cuda_norm_rope.h", "kCudaHeadNormRope"),
            kernel_string("cuda_decode_attention.cpp", "kChunkAttentionParts",
                          (("MLXR_ROPE", True), ("MLXR_NORM", norm))),
            [("qkv", "bf16"), ("keys", "bf16"), ("values", "bf16"), ("position", "int32"),
             ("inverse_frequencies", "float")] + norms,
            [("part_acc", "float"), ("part_max", "float"), ("part_sum", "float")],
            {"T": "bf16", "D": 128, "Q_HEADS": 32, "KV_HEADS": 8, "SCALE_BITS": 1, "TRADITIONAL": False}
            | ({"EPS_BITS": 1} if norm else {}))
    yield "decode_attention_merge/bf16", mlx_kernel_source(
        "mlxr_decode_attention_merge", "", kernel_string("cuda_decode_attention.cpp", "kDecodeAttentionMerge"),
        [("part_acc", "float"), ("part_max", "float"), ("part_sum", "float")], [("out", "bf16")],
        {"T": "bf16", "D": 128})


def unpacked_toolchain(cache: Path) -> Path:
    """The three wheels, downloaded once into `cache` and the parts used unpacked into cache/unpacked."""
    out = cache / "unpacked"
    if (out / "done").exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    *(f"--platform=manylinux_2_{n}_x86_64" for n in (35, 28, 17, 12)), "-d", str(cache),
                    *WHEELS.values()], check=True)
    wanted = ("nvidia/cu13/include/", "nvidia/cu13/lib/libnvrtc", "mlx/include/cccl/")
    for wheel in cache.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(out, [m for m in archive.namelist() if m.startswith(wanted)])
    (out / "done").touch()
    return out


def compile_with_nvrtc(nvrtc: ctypes.CDLL, label: str, source: str, include_dirs: list[Path],
                       resources: bool = False) -> str | None:
    """NVRTC's log if the source fails to compile for sm_90a, else None. resources: print ptxas's line of registers,
    barriers and shared memory (what bounds a kernel's occupancy), read without a GPU."""
    program = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"kernel.cu", 0, None, None) != 0:
        raise SystemExit(f"{label}: nvrtcCreateProgram failed")
    options = [b"--device-as-default-execution-space", b"--gpu-architecture=sm_90a"]
    if resources:
        options.append(b"--ptxas-options=-v")
    options += [f"--include-path={d}".encode() for d in include_dirs]
    result = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value + 1)
    nvrtc.nvrtcGetProgramLog(program, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    if result == 0 and resources:
        usage = [line for line in log.value.decode().splitlines() if "Used" in line or "spill" in line]
        print(f"{label}: " + "; ".join(line.split(":", 1)[-1].strip(" .") for line in usage))
    return None if result == 0 else log.value.decode(errors="replace")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mlx-source", required=True, type=Path, help="a checkout of MLX at the pinned version")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mlxrunner-nvrtc")
    parser.add_argument("--resources", action="store_true", help="print each kernel's registers and shared memory")
    args = parser.parse_args(argv)
    device_headers = args.mlx_source / "mlx" / "backend" / "cuda" / "device"
    if not (device_headers / "utils.cuh").exists():
        raise SystemExit(f"{args.mlx_source}: no mlx/backend/cuda/device/utils.cuh (an MLX source checkout?)")
    toolchain = unpacked_toolchain(args.cache)
    lib = toolchain / "nvidia" / "cu13" / "lib"
    # NVRTC dlopens its builtins library by name when it compiles: loaded here first, by path, that name finds it.
    ctypes.CDLL(str(next(lib.glob("libnvrtc-builtins.so.*"))), mode=ctypes.RTLD_GLOBAL)
    nvrtc = ctypes.CDLL(str(lib / "libnvrtc.so.13"))
    include_dirs = [args.mlx_source, toolchain / "mlx" / "include" / "cccl", toolchain / "nvidia" / "cu13" / "include"]
    failed = 0
    for label, source in kernels():
        log = compile_with_nvrtc(nvrtc, label, source, include_dirs, args.resources)
        print(("FAIL " if log else "ok   ") + label)
        if log:
            failed += 1
            print(log)
    print(f"{failed} of the kernels failed to compile" if failed else "every kernel compiled for sm_90a")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
