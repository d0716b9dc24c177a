"""Strict reading and writing of the IDX format that MNIST is distributed in.

An IDX file is a big-endian header (two zero bytes, a type code, the number of
dimensions, then one uint32 per dimension) followed by the data. MNIST uses unsigned
bytes only: images have magic 2051 (three dimensions), labels 2049 (one dimension).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
GZIP_MAGIC = b"\x1f\x8b"


class IdxFormatError(PipelineError):
    """A file that is not a well-formed IDX file of the expected kind."""


def decompress(payload: bytes, source: str) -> bytes:
    """Return the IDX bytes of a payload that may or may not be gzip-compressed."""
    if not payload.startswith(GZIP_MAGIC):
        return payload
    try:
        return gzip.decompress(payload)
    except (OSError, EOFError, zlib.error) as error:
        raise IdxFormatError(f"{source}: corrupt or truncated gzip data ({error})") from None


def parse(payload: bytes, source: str, expected_magic: int) -> np.ndarray:
    """Parse decompressed IDX bytes into a uint8 array, checking every header field."""
    if len(payload) < 4:
        raise IdxFormatError(f"{source}: {len(payload)} bytes is too short for an IDX header")
    # The magic number is the whole first word: zero, zero, type code, dimensions.
    magic, ndim = struct.unpack(">I", payload[:4])[0], payload[3]
    if magic != expected_magic:
        raise IdxFormatError(
            f"{source}: magic number {magic}, expected {expected_magic} "
            f"({'images' if expected_magic == IMAGES_MAGIC else 'labels'})"
        )
    header_size = 4 + 4 * ndim
    if len(payload) < header_size:
        raise IdxFormatError(f"{source}: truncated header ({len(payload)} bytes)")
    shape = struct.unpack(f">{ndim}I", payload[4:header_size])
    expected_size = header_size + int(np.prod(shape, dtype=np.int64))
    if len(payload) != expected_size:
        raise IdxFormatError(
            f"{source}: {len(payload)} bytes, but the header's dimensions {shape} "
            f"need exactly {expected_size} (truncated or padded file)"
        )
    return np.frombuffer(payload, dtype=np.uint8, offset=header_size).reshape(shape)


def read(path: Path, expected_magic: int) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not."""
    try:
        payload = path.read_bytes()
    except OSError as error:
        raise IdxFormatError(f"{path}: cannot read ({error.strerror})") from None
    return parse(decompress(payload, str(path)), str(path), expected_magic)


def encode(array: np.ndarray) -> bytes:
    """Encode a uint8 array of one (labels) or three (images) dimensions as IDX bytes."""
    if array.dtype != np.uint8 or array.ndim not in (1, 3):
        raise ValueError(
            f"IDX encoding takes 1-d or 3-d uint8 arrays, got {array.dtype} "
            f"with {array.ndim} dimensions"
        )
    magic = IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()
