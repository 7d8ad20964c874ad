"""mlxrunner.store.safetensors: the header parser and mx.load on both writers' files (docs/formats.md)."""

from __future__ import annotations

import hashlib
import json
import struct

import mlx.core as mx
import numpy as np
import pytest
from ollama_store import RawTensor, go_safetensors, mlx_safetensors

from mlxrunner.errors import ModelError
from mlxrunner.store.safetensors import (
    load_safetensors,
    read_safetensors_header,
    tensor_byte_counts,
    tensor_data_bytes,
)

TINY_EXAMPLE = (
    bytes.fromhex("4000000000000000")
    + b'{"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}}' + b" " * 7
    + bytes(range(8))
)
TINY_SHA256 = "91a7a3ccae003cd480cf6d0dd096bd8e0eb555f8f5437af5ade311d4eb56ab1b"


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def raw_file(header: dict, data: bytes, pad: bool = False) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


# -- the writers of the test helper --------------------------------------------------------


def test_go_writer_reproduces_the_spec_example_byte_for_byte():
    blob = go_safetensors({"a": RawTensor("BF16", (2, 2), bytes(range(8)))})
    assert blob == TINY_EXAMPLE
    assert len(blob) == 80
    assert hashlib.sha256(blob).hexdigest() == TINY_SHA256


def test_go_writer_e0_header_for_a_large_bf16_tensor_is_80_bytes():
    # docs/formats.md: the "88 bytes of overhead" of a [3840,3840] BF16 blob keyed "data".
    header = {"data": {"dtype": "BF16", "shape": [3840, 3840], "data_offsets": [0, 29491200]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) + (-len(text) % 8) == 80


def test_mlx_writer_writes_null_metadata_and_no_padding():
    blob = mlx_safetensors({"data": mx.arange(3, dtype=mx.float32)})
    (n,) = struct.unpack("<Q", blob[:8])
    assert blob[8:8 + n].startswith(b'{"__metadata__":null,')
    assert not blob[8:8 + n].endswith(b" ")


# -- mx.load accepts both writers ----------------------------------------------------------


def test_go_padded_header_loads_with_mx_load(tmp_path):
    path = write(tmp_path, "go.safetensors", TINY_EXAMPLE)
    header, data_offset = read_safetensors_header(path)
    assert data_offset == 72
    assert header == {"a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}
    arrays, metadata = load_safetensors(path)
    assert metadata == {}
    assert arrays["a"].dtype == mx.bfloat16
    assert np.array(arrays["a"].view(mx.uint16)).tolist() == [[0x0100, 0x0302], [0x0504, 0x0706]]


def test_null_metadata_and_unaligned_data_load(tmp_path):
    values = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    # An odd header length puts the data region at an unaligned offset.
    blob = raw_file({"__metadata__": None, "xyz": {"data_offsets": [0, 12], "dtype": "F32", "shape": [3]}},
                    values.tobytes())
    path = write(tmp_path, "mlx.safetensors", blob)
    header, data_offset = read_safetensors_header(path)
    assert data_offset % 4 != 0
    assert header["__metadata__"] is None
    arrays, metadata = load_safetensors(path)
    assert metadata == {}
    assert np.array(arrays["xyz"]).tolist() == values.tolist()


def test_real_mlx_writer_blob_with_metadata_loads(tmp_path):
    source = mx.array(np.arange(12, dtype=np.float32).reshape(3, 4)).astype(mx.bfloat16)
    blob = mlx_safetensors({"k": source, "k.scale": mx.ones((3, 1), dtype=mx.bfloat16)},
                           {"quant_type": "int8", "group_size": "64"})
    arrays, metadata = load_safetensors(write(tmp_path, "m.safetensors", blob))
    assert metadata == {"quant_type": "int8", "group_size": "64"}
    assert arrays["k"].dtype == mx.bfloat16
    assert mx.array_equal(arrays["k"], source).item()


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32, mx.uint32, mx.int8])
def test_dtype_is_kept(tmp_path, dtype):
    source = mx.arange(8).reshape(2, 4).astype(dtype)
    arrays, _ = load_safetensors(write(tmp_path, "t.safetensors", go_safetensors({"t": source})))
    assert arrays["t"].dtype == dtype
    assert mx.array_equal(arrays["t"], source).item()


def test_f8_tensors_load_as_uint8(tmp_path):
    blob = go_safetensors({"f8": RawTensor("F8_E4M3", (4,), bytes([1, 2, 3, 4]))})
    arrays, _ = load_safetensors(write(tmp_path, "f8.safetensors", blob))
    assert arrays["f8"].dtype == mx.uint8


def test_byte_counts_come_from_the_header(tmp_path):
    blob = go_safetensors({"a": np.zeros((2, 3), np.float32), "b": RawTensor("BF16", (5,), bytes(10))})
    path = write(tmp_path, "c.safetensors", blob)
    assert tensor_byte_counts(path) == {"a": 24, "b": 10}
    assert tensor_data_bytes(path) == 34


# -- bad files: ModelError naming the file -------------------------------------------------


def expect_error(path, *words):
    with pytest.raises(ModelError) as info:
        load_safetensors(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message
    return message


def test_empty_and_short_files(tmp_path):
    expect_error(write(tmp_path, "empty.safetensors", b""), "at least 8")
    expect_error(write(tmp_path, "short.safetensors", b"\x10\x00\x00"), "at least 8")


def test_header_longer_than_file(tmp_path):
    expect_error(write(tmp_path, "long.safetensors", TINY_EXAMPLE[:40]), "past the end")


def test_header_over_limit(tmp_path):
    expect_error(write(tmp_path, "huge.safetensors", struct.pack("<Q", 200 << 20) + b"{}"), "limit")


def test_header_not_json(tmp_path):
    expect_error(write(tmp_path, "bad.safetensors", struct.pack("<Q", 4) + b"{xx}"), "not valid JSON")
    expect_error(write(tmp_path, "list.safetensors", struct.pack("<Q", 2) + b"[]"), "not a JSON object")


def test_truncated_data(tmp_path):
    expect_error(write(tmp_path, "trunc.safetensors", TINY_EXAMPLE[:-3]), "'a'", "outside")


def test_offsets_that_do_not_match_the_shape(tmp_path):
    blob = raw_file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(16))
    expect_error(write(tmp_path, "mismatch.safetensors", blob), "needs 16")


def test_unsupported_dtype(tmp_path):
    blob = raw_file({"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8))
    expect_error(write(tmp_path, "f64.safetensors", blob), "unsupported dtype 'F64'")


def test_bad_metadata_and_entries(tmp_path):
    expect_error(write(tmp_path, "md.safetensors", raw_file({"__metadata__": [1]}, b"")), "__metadata__")
    blob = raw_file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4))
    expect_error(write(tmp_path, "neg.safetensors", blob), "shape")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "cannot read")
