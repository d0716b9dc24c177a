"""New labelled digits: PNG (or any image) files in one folder per digit, made MNIST-like.

`data/incoming/7/photo.png` is a 7. Any size and colour mode is accepted and converted
as MNIST's digits were made: greyscale, a white digit on black, the digit scaled to fit
a 20x20 box and centred by its centre of mass in a 28x28 image. Files that cannot be
read as images and files outside a digit folder are reported by name and skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

DIGIT_BOX = 20  # MNIST fits each digit in 20x20 pixels inside the 28x28 image
MAX_PIXELS = 50_000_000  # larger files are rejected before they are decoded


@dataclass
class Incoming:
    """The accepted images and labels, and the rejected files with their reasons."""

    images: np.ndarray
    labels: np.ndarray
    rejected: dict[str, str] = field(default_factory=dict)


def to_mnist(image: Image.Image, size: int = 28) -> np.ndarray:
    """Convert any image of one digit to a uint8 (size, size) array, MNIST style."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    # Dark ink on a light background (paper, most drawings) is inverted: MNIST is white
    # on black. The border decides what the background is.
    if _border(grey).mean() > 127:
        grey = 255.0 - grey
    grey = np.clip(grey - np.median(_border(grey)), 0, None)
    if grey.max() == 0:
        return np.zeros((size, size), dtype=np.uint8)
    grey *= 255.0 / grey.max()  # full contrast, as MNIST's digits have
    rows, columns = np.nonzero(grey > 25)
    digit = grey[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]

    box = DIGIT_BOX * size // 28
    scale = box / max(digit.shape)
    height = max(1, round(digit.shape[0] * scale))
    width = max(1, round(digit.shape[1] * scale))
    resized = Image.fromarray(digit.astype(np.uint8)).resize((width, height), Image.LANCZOS)
    digit = np.asarray(resized, dtype=np.float64)

    # Centre of mass at the image centre, as in MNIST.
    total = digit.sum() or 1.0
    centre_row = (digit.sum(axis=1) * np.arange(height)).sum() / total
    centre_column = (digit.sum(axis=0) * np.arange(width)).sum() / total
    top = int(np.clip(round(size / 2 - centre_row), 0, size - height))
    left = int(np.clip(round(size / 2 - centre_column), 0, size - width))
    canvas = np.zeros((size, size), dtype=np.float64)
    canvas[top : top + height, left : left + width] = digit
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _border(grey: np.ndarray) -> np.ndarray:
    return np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])


def read_image(path: Path, size: int = 28) -> np.ndarray:
    """Open one image file and convert it; raises ValueError when it is not usable."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(
                    f"too large ({image.width}x{image.height}); at most {MAX_PIXELS:,} pixels"
                )
            image.draft("L", (4 * size, 4 * size))  # JPEGs decode small, cheaply
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                image = _to_8_bit(image)
            image.thumbnail((16 * size, 16 * size))  # plenty for 28x28, and bounded memory
            digit = to_mnist(image, size)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"not a readable image ({error})") from None
    if digit.max() == 0:
        raise ValueError("blank: no digit found")
    return digit


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit and float images scaled to 0-255 (Pillow's own conversion clips them)."""
    values = np.asarray(image, dtype=np.float64)
    low, high = values.min(), values.max()
    scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0
    return Image.fromarray(scaled.astype(np.uint8))


def read_folder(folder: Path, num_classes: int = 10, size: int = 28) -> Incoming:
    """Read every file under `folder/<digit>/`, in name order; report the rest."""
    images, labels, rejected = [], [], {}
    if folder.is_dir():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            relative = path.relative_to(folder)
            if any(part.startswith(".") for part in relative.parts):
                continue  # .gitkeep and editors' hidden files
            label = relative.parts[0] if len(relative.parts) > 1 else None
            if label is None or not label.isdigit() or int(label) >= num_classes:
                rejected[str(relative)] = f"not in a digit folder 0-{num_classes - 1}"
                continue
            try:
                images.append(read_image(path, size))
                labels.append(int(label))
            except ValueError as error:
                rejected[str(relative)] = str(error)
    for name, reason in rejected.items():
        log.warning("%s: skipped, %s", folder / name, reason)
    return Incoming(
        images=np.array(images, dtype=np.uint8).reshape(-1, size, size),
        labels=np.array(labels, dtype=np.uint8),
        rejected=rejected,
    )
