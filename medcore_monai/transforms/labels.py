"""One label policy for every mask format: which pixels are the structure to segment.

* ``label_value=None`` (default): every non-zero label is foreground, in PNG, TIFF, BMP and NIfTI alike
  (a hippocampus mask with labels 1 and 2 is one structure).
* ``label_value=k``: only pixels equal to ``k`` are foreground (one structure of a multi-label mask).
* JPEG masks are the one exception: lossy compression scatters values around the true labels (a 0/255
  Kvasir-SEG mask holds every value from 0 to 255), so they are thresholded at half their value range. With
  ``label_value`` set, a JPEG mask is a mistake the policy refuses, since exact label values do not survive JPEG.

A non-JPEG mask with many distinct values (more than :data:`MAX_LABELS`) looks like a grey-level image rather
than a label map; it is still binarised by the rule above, and a warning names the file once.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ..data.errors import DataError

__all__ = ["MAX_LABELS", "BinarizeLabeld", "binarize_label", "is_lossy_mask"]

logger = logging.getLogger(__name__)

MAX_LABELS = 32
_LOSSY_SUFFIXES = (".jpg", ".jpeg")


def _source(mask: Any) -> str:
    return str(mask.meta.get("filename_or_obj", "")) if isinstance(mask, MetaTensor) else ""


def is_lossy_mask(mask: Any) -> bool:
    """Whether the mask was read from a JPEG file (its values are blurred by compression)."""
    return _source(mask).lower().endswith(_LOSSY_SUFFIXES)


def binarize_label(mask: torch.Tensor, label_value: int | None = None, source: str = "<mask>") -> torch.Tensor:
    """Float32 0/1 foreground of a channel-first mask under the module's policy (first channel only).

    Args:
        mask: ``(C, *spatial)`` label map (RGB JPEG masks repeat the value in every channel).
        label_value: the label to segment; ``None`` takes every non-zero label.
        source: file name for messages; a ``.jpg``/``.jpeg`` name selects the lossy rule.

    Raises:
        DataError: for ``label_value`` with a JPEG mask, or a non-finite mask.
    """
    plane = (mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(mask))[:1].float()
    if not bool(torch.isfinite(plane).all()):
        raise DataError(f"mask {source} holds NaN or infinite values")
    if source.lower().endswith(_LOSSY_SUFFIXES):
        if label_value is not None:
            raise DataError(
                f"mask {source} is a JPEG: its label values are blurred by compression, so label_value="
                f"{label_value} cannot be matched; use a lossless format (PNG, NIfTI) or label_value: null"
            )
        low, high = float(plane.min()), float(plane.max())
        return (plane > (low + high) / 2).float() if high > low else torch.zeros_like(plane)
    if label_value is not None:
        return (plane == float(label_value)).float()
    distinct = torch.unique(plane).numel()
    if distinct > MAX_LABELS:
        logger.warning(
            "mask %s has %d distinct values: it looks like a grey-level image, not a label map; every non-zero "
            "pixel is taken as foreground (set label_value or save the mask as a label map)",
            source,
            distinct,
        )
    return (plane != 0).float()


class BinarizeLabeld(MapTransform):
    """Binarise label maps with the project's label policy (see the module docstring)."""

    def __init__(
        self, keys: KeysCollection = ("label",), label_value: int | None = None, allow_missing_keys: bool = False
    ) -> None:
        """Create the transform.

        Args:
            keys: keys of channel-first label maps (MetaTensors from ``LoadImaged`` carry their file name).
            label_value: the label to segment; ``None`` takes every non-zero label.
            allow_missing_keys: skip absent keys instead of raising ``KeyError``.
        """
        super().__init__(keys, allow_missing_keys)
        if label_value is not None and (isinstance(label_value, bool) or not float(label_value).is_integer()):
            raise ValueError(f"label_value must be an integer label or null, got {label_value!r}")
        self.label_value = None if label_value is None else int(label_value)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace every key by its 0/1 foreground, keeping the metadata (geometry, file name)."""
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key]
            binary = binarize_label(mask, self.label_value, _source(mask) or str(d.get("name", key)))
            d[key] = (
                MetaTensor(binary, meta=dict(mask.meta), applied_operations=[])
                if isinstance(mask, MetaTensor)
                else binary
            )
        return d
