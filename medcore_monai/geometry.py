"""Low-level image geometry shared by the transforms and the model layer.

MedSAM's resizes, its min-max scaling and its box-from-mask rule live here (not in
:mod:`medcore_monai.transforms`) so that :mod:`medcore_monai.networks` can use them without importing the
transform stack, and so that every caller resizes exactly as the models were pruned and evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from skimage.transform import resize

from medcore_monai.data.errors import DataError

__all__ = ["EMPTY_MASK_POLICIES", "box_from_mask", "min_max_scale", "resize_image", "resize_mask"]

#: What :func:`box_from_mask` does with an empty mask: the whole-image box, or an error.
EMPTY_MASK_POLICIES = ("full_box", "error")
_MINMAX_FLOOR = 1e-8


def _plain(tensor: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The data without MONAI metadata, so that arithmetic does not trace operations."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else torch.as_tensor(tensor)


def min_max_scale(image: torch.Tensor) -> torch.Tensor:
    """MedSAM's scaling ``(x - min) / max(max - min, 1e-8)``; a constant image becomes all zeros."""
    image = image.to(torch.float32)
    low, high = image.min(), image.max()
    return (image - low) / torch.clamp(high - low, min=_MINMAX_FLOOR)


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """MedSAM's image resize: bicubic, anti-aliased, ``[C, H, W] -> [C, size, size]`` float32 on the CPU.

    Args:
        image: channel-first image (any dtype; values are kept, ``preserve_range=True``).
        size: side of the square output.
    """
    # Channel by channel gives the same values as resizing (H, W, C) at once (the channel axis is
    # never interpolated) but is several times faster, as scipy then skips the 3-D spline filter.
    planes = image.detach().cpu().numpy()
    resized = [resize(plane, (size, size), order=3, preserve_range=True, anti_aliasing=True) for plane in planes]
    return torch.from_numpy(np.stack(resized).astype(np.float32))


def resize_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """MedSAM's mask resize: nearest-neighbour, ``[1, H, W] -> [1, size, size]`` float32 on the CPU.

    Args:
        mask: channel-first mask; only channel 0 is resized.
        size: side of the square output.
    """
    plane = mask[0].detach().cpu().numpy()
    resized = resize(plane, (size, size), order=0, preserve_range=True, anti_aliasing=False)
    return torch.from_numpy(np.ascontiguousarray(resized[None], dtype=np.float32))


def box_from_mask(
    mask: torch.Tensor | np.ndarray,
    shifts: Sequence[int] = (0, 0, 0, 0),
    empty_mask: str = "full_box",
    source: str = "<mask>",
) -> torch.Tensor:
    """Tight box ``[x_min, y_min, x_max, y_max]`` (inclusive pixel indices) of a mask's foreground.

    Args:
        mask: ``(H, W)`` or ``(1, H, W)`` mask; non-zero is foreground.
        shifts: Pixels to enlarge the box by on the x_min, y_min, x_max and y_max side; the
            result is clamped to the image.
        empty_mask: ``"full_box"``: an empty mask gives the whole image ``[0, 0, W-1, H-1]``;
            ``"error"``: raise.
        source: File or sample name used in the error message.

    Returns:
        float32 tensor ``[4]``.

    Raises:
        DataError: for an empty mask with ``empty_mask="error"``.
    """
    if empty_mask not in EMPTY_MASK_POLICIES:
        raise ValueError(f"empty_mask must be one of {EMPTY_MASK_POLICIES}, got {empty_mask!r}")
    plane = _plain(torch.as_tensor(mask))
    plane = plane[0] if plane.ndim == 3 else plane
    height, width = plane.shape
    rows, cols = torch.nonzero(plane, as_tuple=True)
    if rows.numel() == 0:
        if empty_mask == "error":
            raise DataError(f"Mask of {source} is empty at model size, so no box prompt can be derived")
        return torch.tensor([0, 0, width - 1, height - 1], dtype=torch.float32)
    x_min = max(0, int(cols.min()) - int(shifts[0]))
    y_min = max(0, int(rows.min()) - int(shifts[1]))
    x_max = min(width - 1, int(cols.max()) + int(shifts[2]))
    y_max = min(height - 1, int(rows.max()) + int(shifts[3]))
    return torch.tensor([x_min, y_min, x_max, y_max], dtype=torch.float32)
