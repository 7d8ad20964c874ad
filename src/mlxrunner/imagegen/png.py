"""PNG out, compressed on several cores at once.

Every generated image is encoded before the client gets it, so the encode sits on the critical path of
every request: Pillow's encoder (one thread, adaptive row filters) took 0.16-0.23 s for a 1024x1024 image
on the GPU machine's CPU, a quarter of a Klein image's whole time. This writer
- filters rows with PNG's "Up" filter (each byte minus the byte above it), in numpy: one vectorised
  subtraction instead of trying five filters per row;
- deflates with Intel's ISA-L (the `isal` package: zlib's API and format, its level 1 5.5x faster than zlib's
  level 1 and a few % smaller on a photo-like 1024x1024 image, 20x faster on noise; benchmarks/README.md);
- cuts the filtered rows into bands and deflates the bands on a pool of threads (the GIL is released).
  Each band but the last ends with a sync flush, which ends its deflate blocks on a byte boundary without
  ending the stream, so the bands' outputs concatenate into one valid deflate stream (as pigz does); the
  zlib header and the Adler-32 of all rows wrap it;
- writes the chunks PNG needs (IHDR, iTXt for the metadata, IDAT, IEND) with their CRCs.
Pillow reads the result back to the same pixels and text (tests/unit/test_png.py); the file is a few %
larger than Pillow's at the same level because bands do not share their deflate window.
"""

from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from isal import isal_zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
UP_FILTER = 2
# ISA-L's levels are 0-3; 1 took 9.5 ms for 2.02 MB on a photo-like 1024x1024 image on two cores, where 2 took
# 10.8 ms for 2.01 MB and zlib's level 1 52 ms for 2.14 MB (benchmarks/README.md, "PNG out").
COMPRESS_LEVEL = 1
# Rows per band at the least: fewer rows and the bands' separate windows start to cost size.
MIN_BAND_ROWS = 64

DEFLATE_THREADS = min(8, os.cpu_count() or 1)
_deflaters = ThreadPoolExecutor(max_workers=DEFLATE_THREADS, thread_name_prefix="png-deflate")


def encode_png(pixels: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """RGB uint8 pixels [H, W, 3] -> PNG bytes, with `text` as iTXt chunks (UTF-8: any prompt survives)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"encode_png takes uint8 RGB pixels [H, W, 3], not {pixels.dtype} {pixels.shape}")
    height, width, _ = pixels.shape
    rows = _up_filtered_rows(pixels)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    chunks = [_chunk(b"IHDR", header)]
    chunks += [_chunk(b"iTXt", _itxt(key, str(value))) for key, value in (text or {}).items()]
    chunks += [_chunk(b"IDAT", _zlib_stream(rows)), _chunk(b"IEND", b"")]
    return SIGNATURE + b"".join(chunks)


def _up_filtered_rows(pixels: np.ndarray) -> np.ndarray:
    """[H, 1 + 3W] uint8: each row's filter-type byte, then the row minus the row above (mod 256)."""
    flat = np.ascontiguousarray(pixels).reshape(pixels.shape[0], -1)
    out = np.empty((flat.shape[0], flat.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = UP_FILTER
    out[0, 1:] = flat[0]  # the row above the first is zeros
    np.subtract(flat[1:], flat[:-1], out=out[1:, 1:])  # uint8 arithmetic wraps mod 256, as PNG wants
    return out


def _zlib_stream(rows: np.ndarray) -> bytes:
    """The rows as one zlib stream, its deflate blocks made band by band on the thread pool."""
    bands = max(1, min(DEFLATE_THREADS, rows.shape[0] // MIN_BAND_ROWS))
    edges = np.linspace(0, rows.shape[0], bands + 1).astype(int)
    last = bands - 1
    parts = _deflaters.map(lambda i: _deflate_band(rows[edges[i]:edges[i + 1]], final=i == last), range(bands))
    data = memoryview(rows).cast("B")
    return b"\x78\x01" + b"".join(parts) + struct.pack(">I", isal_zlib.adler32(data))


def _deflate_band(band: np.ndarray, final: bool) -> bytes:
    deflater = isal_zlib.compressobj(COMPRESS_LEVEL, isal_zlib.DEFLATED, -15)  # raw deflate: one header, written once
    body = deflater.compress(memoryview(np.ascontiguousarray(band)).cast("B"))
    return body + deflater.flush(isal_zlib.Z_FINISH if final else isal_zlib.Z_SYNC_FLUSH)


def _itxt(key: str, value: str) -> bytes:
    # keyword, NUL, compression flag 0, method 0, empty language tag NUL, empty translated keyword NUL, text
    return key.encode("latin-1") + b"\x00\x00\x00\x00\x00" + value.encode("utf-8")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", isal_zlib.crc32(data, isal_zlib.crc32(kind)))
