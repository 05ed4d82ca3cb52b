"""Reading 2-D image files (photographs, endoscopy frames, masks, microscopy TIFFs) into numpy arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medcore_monai.data.errors import DataError

__all__ = ["IMAGE_SUFFIXES_2D", "TIFF_SUFFIXES", "read_image_2d"]

TIFF_SUFFIXES: frozenset[str] = frozenset({".tif", ".tiff"})
IMAGE_SUFFIXES_2D: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp"}) | TIFF_SUFFIXES

_TIFF_BITS_PER_SAMPLE_TAG = 258
# Pillow modes that hold at most 8 bits per sample; a TIFF decoded into one of these from
# deeper samples has been silently truncated.
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
_MAX_CHANNELS = 4


def read_image_2d(path: str | Path) -> np.ndarray:
    """Read a 2-D image file into a numpy array in its stored layout.

    Pillow is tried first. TIFF files that Pillow cannot decode (float64, multi-channel
    float, planar) or would decode lossily (16-bit RGB read as 8-bit) are read with
    tifffile instead.

    Args:
        path: A ``.png``, ``.jpg``/``.jpeg``, ``.bmp`` or ``.tif``/``.tiff`` file.

    Returns:
        ``(H, W)`` for single-channel files, ``(H, W, C)`` (channel-last, C <= 4) otherwise.
        The dtype is the file's own (uint8, uint16, int32, float32, ...), in native byte order.
        Palette images are expanded to RGB(A); 1-bit images become uint8 0/1.

    Raises:
        DataError: if the file is missing, has an unsupported suffix, cannot be decoded or
            is not two-dimensional. The message names the file.
    """
    path = Path(path)
    _check_readable_suffix(path)
    if not path.is_file():
        raise DataError(f"Image file not found: {path}")
    try:
        array = _read_with_pillow(path)
    # Pillow signals broken files with several exception types (SyntaxError for some PNG faults).
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, _LossyDecodeError) as pillow_error:
        if path.suffix.lower() not in TIFF_SUFFIXES:
            raise DataError(f"Cannot read image {path}: {pillow_error}") from pillow_error
        array = _read_with_tifffile(path)
    return _as_native_2d(array, path)


class _LossyDecodeError(Exception):
    """Pillow would decode the file with fewer bits per sample than it stores."""


def _check_readable_suffix(path: Path) -> None:
    if path.suffix.lower() not in IMAGE_SUFFIXES_2D:
        supported = ", ".join(sorted(IMAGE_SUFFIXES_2D))
        raise DataError(f"Unsupported image type {path.suffix!r} for {path} (supported: {supported})")


def _read_with_pillow(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        if image.format == "TIFF" and _pillow_truncates_tiff(image):
            raise _LossyDecodeError(f"Pillow would truncate {path} to 8 bits")
        image.load()
        return _pillow_to_array(image)


def _pillow_truncates_tiff(image: Image.Image) -> bool:
    bits = image.tag_v2.get(_TIFF_BITS_PER_SAMPLE_TAG)
    if bits is None:
        return False
    bits = bits if isinstance(bits, tuple) else (bits,)
    return max(bits) > 8 and image.mode in _EIGHT_BIT_MODES


def _pillow_to_array(image: Image.Image) -> np.ndarray:
    if image.mode in {"P", "PA"}:
        # Palette indices are not intensities; expand them to the colours they stand for.
        has_alpha = image.mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    elif image.mode in {"CMYK", "YCbCr", "LAB", "HSV"}:
        image = image.convert("RGB")
    array = np.array(image)  # a writable copy, unlike np.asarray on a Pillow image
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return array


def _read_with_tifffile(path: Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            array = page.asarray()
            planar_separate = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and array.ndim == 3
    except Exception as error:  # tifffile raises many unrelated types for corrupt files
        raise DataError(f"Cannot read image {path}: {error}") from error
    if planar_separate:
        array = np.moveaxis(array, 0, -1)
    return array


def _as_native_2d(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] > _MAX_CHANNELS):
        raise DataError(
            f"Expected a 2-D image with at most {_MAX_CHANNELS} channels in {path}, got shape {array.shape}"
        )
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return np.ascontiguousarray(array)
