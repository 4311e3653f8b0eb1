"""Reading and writing the image and label files of the datasets, with errors that name the file."""

from __future__ import annotations

import os
from typing import Iterable, Optional

import numpy as np

from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff")


def open_image(path: str):
    """A PIL image, fully decoded; a missing or unreadable file raises :class:`DataError` naming it."""
    from PIL import Image

    if not os.path.isfile(path):
        raise DataError(f"file not found: {path}", path, "missing")
    try:
        image = Image.open(path)
        image.load()  # decodes every pixel: a truncated or corrupt file fails here, not later
    except MemoryError:
        raise
    except Exception as error:  # PIL reports damage as OSError, SyntaxError, zlib or struct errors, ...
        detail = str(error) or type(error).__name__
        raise DataError(
            f"cannot read image file {path}: {detail} (re-extract or download it again)", path, "unreadable"
        ) from error
    return image


def read_rgb(path: str) -> np.ndarray:
    """An RGB image as a ``uint8`` array of shape ``(H, W, 3)``."""
    image = open_image(path)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def read_label_map(path: str) -> np.ndarray:
    """A single-channel label map (8-bit, 16-bit or palette PNG) as an integer array ``(H, W)``.

    Palette images give their indices, not colors, as the Vistas label files need.
    """
    image = open_image(path)
    array = np.asarray(image)
    if array.ndim != 2:
        raise DataError(
            f"{path}: expected a single-channel label map (one id per pixel), "
            f"got an image of mode {image.mode} with shape {array.shape}",
            path,
            "format",
        )
    if array.dtype.kind not in "iub":
        raise DataError(f"{path}: label map holds {array.dtype} values, expected integers", path, "format")
    return array


def check_label_ids(array: np.ndarray, valid: int, path: str, allowed_extra: Iterable[int] = ()) -> None:
    """Raise if ``array`` holds ids outside ``0..valid-1`` (other than ``allowed_extra``)."""
    if array.size == 0:
        return
    low, high = int(array.min()), int(array.max())
    if low >= 0 and high < valid:
        return
    values = np.unique(array)
    bad = [int(v) for v in values if not (0 <= v < valid) and int(v) not in set(allowed_extra)]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise DataError(f"{path}: label ids out of range (valid: 0..{valid - 1}): found {shown}", path, "label ids")


def check_same_size(label: np.ndarray, label_path: str, image_size: Optional[tuple], image_path: str) -> None:
    """Raise unless a label map covers its image, of ``(height, width)`` ``image_size``, pixel for pixel
    (``None``: the image's size is unknown, nothing to check)."""
    if image_size is not None and tuple(label.shape[:2]) != tuple(image_size[:2]):
        raise DataError(
            f"{label_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} is "
            f"{image_size[1]}x{image_size[0]}",
            label_path,
            "size",
        )


def write_label_png(path: str, array: np.ndarray, palette: Optional[list] = None, bits: Optional[int] = None) -> None:
    """Write a label map as PNG: ``bits`` 8 (palette optional) or 16; by default 8 when the values fit."""
    from PIL import Image

    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"a label map must be 2-D, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise ValueError(f"label values must lie in 0..65535 to be written as PNG ({path})")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if bits is None:
        bits = 8 if array.size == 0 or array.max() <= 255 else 16
    if bits not in (8, 16) or (bits == 8 and array.size and array.max() > 255):
        raise ValueError(f"cannot write {path} as a {bits}-bit PNG (values up to {array.max()})")
    if bits == 8:
        image = Image.fromarray(array.astype(np.uint8))
        if palette is not None:
            image.putpalette(palette)  # turns the "L" image into a "P" one, indices unchanged
    else:
        image = Image.fromarray(array.astype(np.uint16))
    image.save(path)


def write_rgb(path: str, array: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path)


def list_files(folder: str, suffixes: Iterable[str]) -> list:
    """Files directly in ``folder`` whose lower-cased names end with one of ``suffixes``, sorted."""
    suffixes = tuple(s.lower() for s in suffixes)
    return sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if name.lower().endswith(suffixes) and os.path.isfile(os.path.join(folder, name))
    )
