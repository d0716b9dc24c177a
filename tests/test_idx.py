"""IDX parsing on the real MNIST slice, and every way a file can be malformed."""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import SLICE_DIR

from pipeline import idx

TRAIN_IMAGES = SLICE_DIR / "train-images-idx3-ubyte.gz"
TRAIN_LABELS = SLICE_DIR / "train-labels-idx1-ubyte.gz"
TEST_IMAGES = SLICE_DIR / "t10k-images-idx3-ubyte.gz"
TEST_LABELS = SLICE_DIR / "t10k-labels-idx1-ubyte.gz"

# Counted once from the slice with np.bincount; a reader that drops, repeats or
# misreads labels changes them.
TRAIN_LABEL_COUNTS = [140, 172, 144, 142, 160, 137, 141, 177, 134, 153]
TEST_LABEL_COUNTS = [42, 67, 55, 45, 55, 50, 43, 49, 40, 54]

# SHA-256 of the decompressed files, as in tests/data/mnist-slice/README.md.
TRAIN_IMAGES_SHA256 = "4d8f7d76342c5f173375f4a0dd26deaab01218a319ce97dad9a3d5260e0a1c52"
TRAIN_LABELS_SHA256 = "b47cfb153a79f1c32c54791d05c5468886742eff6075a7e4c79d49587b851ca9"

IMAGE_BYTES = 28 * 28
TRAIN_IMAGES_SIZE = 16 + 1500 * IMAGE_BYTES  # header, then one byte per pixel


def exactly(message: str) -> str:
    """A `match=` pattern for the whole of a message, paths with dots and all."""
    return f"^{re.escape(message)}$"


def write_gz(path: Path, content: bytes) -> Path:
    path.write_bytes(gzip.compress(content, mtime=0))
    return path


@pytest.fixture(scope="module")
def train_images_content() -> bytes:
    return gzip.decompress(TRAIN_IMAGES.read_bytes())


@pytest.fixture(scope="module")
def train_labels_content() -> bytes:
    return gzip.decompress(TRAIN_LABELS.read_bytes())


# --- well-formed files -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "count"), [(TRAIN_IMAGES, 1500), (TEST_IMAGES, 500)], ids=["train", "test"]
)
def test_images_have_the_slice_shape(path: Path, count: int) -> None:
    images = idx.read(path, idx.IMAGES_MAGIC)

    assert images.shape == (count, 28, 28)
    assert images.dtype == np.uint8
    # Pixels span the whole byte range: a misplaced offset would not keep both ends.
    assert (images.min(), images.max()) == (0, 255)


@pytest.mark.parametrize(
    ("path", "first_labels", "counts"),
    [(TRAIN_LABELS, [5, 0, 4], TRAIN_LABEL_COUNTS), (TEST_LABELS, [7, 2, 1], TEST_LABEL_COUNTS)],
    ids=["train", "test"],
)
def test_labels_match_the_slice(path: Path, first_labels: list[int], counts: list[int]) -> None:
    labels = idx.read(path, idx.LABELS_MAGIC)

    assert labels.dtype == np.uint8
    assert labels.shape == (sum(counts),)
    assert labels[:3].tolist() == first_labels
    assert np.bincount(labels, minlength=10).tolist() == counts


def test_an_uncompressed_file_reads_like_its_archive(
    tmp_path: Path, train_labels_content: bytes
) -> None:
    plain = tmp_path / "train-labels-idx1-ubyte"
    plain.write_bytes(train_labels_content)

    labels = idx.read(plain, idx.LABELS_MAGIC)

    assert np.array_equal(labels, idx.read(TRAIN_LABELS, idx.LABELS_MAGIC))


# --- round trip ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "magic", "sha256"),
    [
        (TRAIN_IMAGES, idx.IMAGES_MAGIC, TRAIN_IMAGES_SHA256),
        (TRAIN_LABELS, idx.LABELS_MAGIC, TRAIN_LABELS_SHA256),
    ],
    ids=["images", "labels"],
)
def test_encode_reproduces_the_original_bytes(path: Path, magic: int, sha256: str) -> None:
    encoded = idx.encode(idx.read(path, magic))

    assert hashlib.sha256(encoded).hexdigest() == sha256


@pytest.mark.parametrize(
    "array",
    [
        np.arange(60, dtype=np.uint8).reshape(5, 3, 4),
        np.array([9, 0, 255], dtype=np.uint8),
        np.zeros((0, 28, 28), dtype=np.uint8),
    ],
    ids=["images", "labels", "no-images"],
)
def test_parse_inverts_encode(array: np.ndarray) -> None:
    magic = idx.IMAGES_MAGIC if array.ndim == 3 else idx.LABELS_MAGIC

    parsed = idx.parse(idx.encode(array), "array", magic)

    assert parsed.dtype == np.uint8
    assert parsed.shape == array.shape
    assert np.array_equal(parsed, array)


@pytest.mark.parametrize(
    ("array", "described"),
    [
        (np.zeros((2, 2), dtype=np.uint8), "uint8 with 2 dimensions"),
        (np.zeros(3, dtype=np.int64), "int64 with 1 dimensions"),
    ],
    ids=["2-d", "int64"],
)
def test_encode_rejects_what_idx_cannot_hold(array: np.ndarray, described: str) -> None:
    message = f"IDX encoding takes 1-d or 3-d uint8 arrays, got {described}"

    with pytest.raises(ValueError, match=exactly(message)):
        idx.encode(array)


# --- truncated files -------------------------------------------------------------------


def test_truncated_content_names_both_sizes(tmp_path: Path, train_images_content: bytes) -> None:
    # Cut in the middle of an image, as an interrupted decompression would.
    cut = train_images_content[: len(train_images_content) // 2]
    path = write_gz(tmp_path / "train-images-idx3-ubyte.gz", cut)
    message = (
        f"{path}: {len(cut)} bytes, but the header's dimensions (1500, 28, 28) "
        f"need exactly {TRAIN_IMAGES_SIZE} (truncated or padded file)"
    )

    with pytest.raises(idx.IdxFormatError, match=exactly(message)):
        idx.read(path, idx.IMAGES_MAGIC)


def test_truncated_archive_is_reported_as_gzip_damage(tmp_path: Path) -> None:
    archive = TRAIN_IMAGES.read_bytes()
    path = tmp_path / TRAIN_IMAGES.name
    path.write_bytes(archive[: len(archive) - 1000])
    problem = "Compressed file ended before the end-of-stream marker was reached"
    message = f"{path}: corrupt or truncated gzip data ({problem})"

    with pytest.raises(idx.IdxFormatError, match=exactly(message)):
        idx.read(path, idx.IMAGES_MAGIC)


def test_corrupt_archive_is_reported_as_gzip_damage(tmp_path: Path) -> None:
    archive = bytearray(TRAIN_LABELS.read_bytes())
    archive[-8] ^= 0xFF  # the stored CRC-32 of the content no longer matches it
    path = tmp_path / TRAIN_LABELS.name
    path.write_bytes(archive)

    message = f"{path}: corrupt or truncated gzip data (CRC check failed)"

    with pytest.raises(idx.IdxFormatError, match=exactly(message)):
        idx.read(path, idx.LABELS_MAGIC)


# --- wrong magic -----------------------------------------------------------------------


def test_labels_read_as_images_are_rejected() -> None:
    message = f"{TRAIN_LABELS}: magic number 2049, expected 2051 (images)"

    with pytest.raises(idx.IdxFormatError, match=exactly(message)):
        idx.read(TRAIN_LABELS, idx.IMAGES_MAGIC)


def test_images_read_as_labels_are_rejected() -> None:
    message = f"{TEST_IMAGES}: magic number 2051, expected 2049 (labels)"

    with pytest.raises(idx.IdxFormatError, match=exactly(message)):
        idx.read(TEST_IMAGES, idx.LABELS_MAGIC)


def test_garbage_is_rejected_by_its_magic(tmp_path: Path) -> None:
    # What a mirror's error page looks like once saved under the MNIST name.
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"<html><body>Service Unavailable</body></html>")
    magic = int.from_bytes(b"<htm", "big")
    message = f"{path}: magic number {magic}, expected 2051 (images)"

    with pytest.raises(idx.IdxFormatError, match=exactly(message)):
        idx.read(path, idx.IMAGES_MAGIC)


# --- wrong counts and short headers ----------------------------------------------------


def test_one_image_missing_is_rejected(tmp_path: Path, train_images_content: bytes) -> None:
    # The header still says 1,500 images, the data holds 1,499.
    short = train_images_content[:-IMAGE_BYTES]
    path = write_gz(tmp_path / "train-images-idx3-ubyte.gz", short)
    message = (
        f"{path}: {TRAIN_IMAGES_SIZE - IMAGE_BYTES} bytes, but the header's dimensions "
        f"(1500, 28, 28) need exactly {TRAIN_IMAGES_SIZE} (truncated or padded file)"
    )

    with pytest.raises(idx.IdxFormatError, match=exactly(message)):
        idx.read(path, idx.IMAGES_MAGIC)


def test_one_label_missing_is_rejected(tmp_path: Path, train_labels_content: bytes) -> None:
    path = write_gz(tmp_path / "train-labels-idx1-ubyte.gz", train_labels_content[:-1])
    message = (
        f"{path}: 1507 bytes, but the header's dimensions (1500,) need exactly 1508 "
        "(truncated or padded file)"
    )

    with pytest.raises(idx.IdxFormatError, match=exactly(message)):
        idx.read(path, idx.LABELS_MAGIC)


def test_trailing_bytes_are_rejected(train_labels_content: bytes) -> None:
    message = (
        "padded: 1509 bytes, but the header's dimensions (1500,) need exactly 1508 "
        "(truncated or padded file)"
    )

    with pytest.raises(idx.IdxFormatError, match=exactly(message)):
        idx.parse(train_labels_content + b"\x00", "padded", idx.LABELS_MAGIC)


@pytest.mark.parametrize("size", [0, 3])
def test_a_header_shorter_than_the_magic_is_rejected(tmp_path: Path, size: int) -> None:
    path = write_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", b"\x00\x00\x08"[:size])
    message = f"{path}: {size} bytes is too short for an IDX header"

    with pytest.raises(idx.IdxFormatError, match=exactly(message)):
        idx.read(path, idx.LABELS_MAGIC)


def test_a_header_cut_inside_the_dimensions_is_rejected(
    tmp_path: Path, train_images_content: bytes
) -> None:
    # The magic promises three dimensions (12 bytes); only two and a half arrive.
    path = write_gz(tmp_path / "train-images-idx3-ubyte.gz", train_images_content[:14])

    message = f"{path}: truncated header (14 bytes)"

    with pytest.raises(idx.IdxFormatError, match=exactly(message)):
        idx.read(path, idx.IMAGES_MAGIC)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.gz"
    message = f"{path}: cannot read (No such file or directory)"

    with pytest.raises(idx.IdxFormatError, match=exactly(message)):
        idx.read(path, idx.IMAGES_MAGIC)
