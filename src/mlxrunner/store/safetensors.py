"""safetensors files -> ``mx.array``, with the header checked first.

A safetensors file is: 8 bytes little-endian header length N, N bytes of UTF-8 JSON, then the
data region; each tensor's ``data_offsets`` are relative to the start of the data region.

Two writers produce the files an Ollama store holds (docs/formats.md), and both must load:

* Go ``x/safetensors``: compact JSON, keys sorted, the header padded with ASCII spaces to a
  multiple of 8.
* MLX ``save_safetensors``: ``"__metadata__"`` always present, ``null`` when no metadata was
  given; no padding, so the data region may start at an unaligned offset.

Why ``mx.load`` and not numpy: MLX reads safetensors lazily straight into its own buffers
(no numpy copy) and keeps the stored dtype (bf16 has no numpy dtype). ``tests/unit/test_safetensors.py``
checks that ``mx.load`` accepts the space-padded Go header, the ``null`` metadata and unaligned
data, so no numpy fallback is needed. What ``mx.load`` does not do is explain a bad file, so
:func:`read_safetensors_header` validates the header first and raises :class:`ModelError`
naming the file and the problem.

A lazily loaded array keeps its file open until it is evaluated. A store of per-tensor blobs
can mean thousands of open files, so :func:`load_safetensors` raises the soft open-file limit
to the hard limit once (macOS starts processes at 256).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlxrunner.errors import ModelError

# The cap is generous (Go's runner stops at 1 MiB); it only guards against reading garbage.
MAX_HEADER_BYTES = 100 * 1024 * 1024
METADATA_KEY = "__metadata__"

# safetensors dtype string -> (bytes per element, what mx.load gives). This is MLX's own table
# (mlx/io/safetensors.cpp): both F8 formats come back as raw uint8.
SAFETENSORS_DTYPES: dict[str, tuple[int, mx.Dtype]] = {
    "F32": (4, mx.float32),
    "F16": (2, mx.float16),
    "BF16": (2, mx.bfloat16),
    "I64": (8, mx.int64),
    "I32": (4, mx.int32),
    "I16": (2, mx.int16),
    "I8": (1, mx.int8),
    "U64": (8, mx.uint64),
    "U32": (4, mx.uint32),
    "U16": (2, mx.uint16),
    "U8": (1, mx.uint8),
    "BOOL": (1, mx.bool_),
    "C64": (8, mx.complex64),
    "F8_E4M3": (1, mx.uint8),
    "F8_E8M0": (1, mx.uint8),
}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: what a tensor is, without reading its data."""

    dtype: str  # safetensors spelling, e.g. "BF16", "U32"
    shape: tuple[int, ...]
    begin: int  # offsets relative to the data region
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Parse and validate a safetensors header.

    Returns the header dict exactly as stored (``__metadata__`` included when present; it may
    be ``None``) and the absolute file offset where the data region starts.
    Raises :class:`ModelError` naming the file when the file is not a valid safetensors file.
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelError(f"{path}: not a safetensors file: only {file_size} bytes, need at least 8")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise ModelError(
                    f"{path}: safetensors header length {header_len} is over the {MAX_HEADER_BYTES}-byte limit"
                )
            if 8 + header_len > file_size:
                raise ModelError(
                    f"{path}: safetensors header length {header_len} runs past the end of the file "
                    f"({file_size} bytes); the file is truncated or not safetensors"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from e

    try:
        header = json.loads(raw.decode("utf-8"))  # JSON allows the trailing padding spaces
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: safetensors header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise ModelError(f"{path}: safetensors header is not a JSON object")

    data_offset = 8 + header_len
    _check_entries(path, header, file_size - data_offset)
    return header, data_offset


def _check_entries(path: Path, header: dict, data_size: int) -> None:
    metadata = header.get(METADATA_KEY)
    if metadata is not None and not isinstance(metadata, dict):
        raise ModelError(f"{path}: safetensors __metadata__ must be an object or null")
    for name, entry in header.items():
        if name != METADATA_KEY:
            _check_entry(path, name, entry, data_size)


def _check_entry(path: Path, name: str, entry: object, data_size: int) -> None:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise ModelError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        supported = " ".join(SAFETENSORS_DTYPES)
        raise ModelError(f"{where}: unsupported dtype {dtype!r} (supported: {supported})")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise ModelError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise ModelError(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    if begin > end or end > data_size:
        raise ModelError(
            f"{where}: data_offsets [{begin}, {end}] lie outside the {data_size}-byte data region "
            "(file truncated?)"
        )
    expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype][0]
    if end - begin != expected:
        raise ModelError(
            f"{where}: data_offsets span {end - begin} bytes but {dtype} {shape} needs {expected}"
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def header_metadata(header: dict) -> dict[str, str]:
    """The ``__metadata__`` map of a parsed header; ``{}`` when absent or ``null``."""
    return header.get(METADATA_KEY) or {}


def tensor_infos(header: dict) -> dict[str, TensorInfo]:
    """Every tensor entry of a parsed (validated) header, in header order."""
    return {
        name: TensorInfo(e["dtype"], tuple(e["shape"]), e["data_offsets"][0], e["data_offsets"][1])
        for name, e in header.items()
        if name != METADATA_KEY
    }


def tensor_byte_counts(path: str | os.PathLike) -> dict[str, int]:
    """Bytes of data per tensor, from the header alone."""
    header, _ = read_safetensors_header(path)
    return {name: info.nbytes for name, info in tensor_infos(header).items()}


def tensor_data_bytes(path: str | os.PathLike) -> int:
    """Total tensor data bytes in one file (header and padding excluded)."""
    return sum(tensor_byte_counts(path).values())


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Load every tensor of a safetensors file lazily, dtypes as stored.

    Returns ``(arrays, metadata)``; metadata is ``{}`` when the file has none or ``null``.
    """
    path = Path(path)
    read_safetensors_header(path)
    raise_open_file_limit()
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise ModelError(f"{path}: cannot load safetensors: {e}") from e
    return arrays, metadata


_open_file_limit_raised = False


def raise_open_file_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard limit, once per process.

    Each lazily loaded file stays open until its arrays are evaluated (see module docstring).
    """
    global _open_file_limit_raised
    if _open_file_limit_raised:
        return
    _open_file_limit_raised = True
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # macOS refuses RLIM_INFINITY for this limit; OPEN_MAX (10240) is what it accepts.
    target = 10240 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # keep the old limit; loading still works for smaller models
