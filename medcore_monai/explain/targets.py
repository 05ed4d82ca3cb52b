"""Scalar targets of a box-prompted segmentation model, as functions of flow-space images.

The map from flow space (``[N, C, S, S]`` in [-1, 1]) to the model's input is fixed and differentiable and lives
inside the target: rescale to [0, 1], replicate grey to three channels, bilinear upsampling to the region's size
and pasting into the (fixed) rest of the model input (:class:`Region`). No per-image normalisation happens inside
(it would couple every pixel to every other). The box stays fixed.

Targets (``kind``), all on the decoder's low-resolution logits:

* ``dice_self``: soft Dice of ``sigmoid(logits)`` against the model's own mask at the image ("why this mask");
* ``dice_label``: soft Dice against the ground truth ("why this error");
* ``boundary_energy``: mean squared logit in a band around the predicted boundary (dilation XOR erosion of the
  mask), MedCore's boundary view: how sharply the model places the contour;
* ``box_logit``: mean logit inside the box.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError

__all__ = ["TARGETS", "Region", "boundary_band", "SegmentationTarget"]

TARGETS = ("dice_self", "dice_label", "boundary_energy", "box_logit")


@dataclasses.dataclass(frozen=True)
class Region:
    """The square of the model input that flow space covers: ``[y0, y0 + side) x [x0, x0 + side)`` model pixels.

    Boundaries of small structures (a hippocampus is a few pixels of a whole slice at 64 px) only get resolution
    when flow space is a window around the box; the rest of the model input stays fixed.
    """

    x0: int
    y0: int
    side: int

    @classmethod
    def around(cls, box: Any, scale: float | None, image_size: int, min_side: int = 16) -> Region:
        """A square of ``scale`` times the box's longer side, centred on it, inside the image (``None``: all of it)."""
        if scale is None:
            return cls(0, 0, int(image_size))
        x0, y0, x1, y1 = (float(v) for v in torch.as_tensor(box).reshape(-1)[:4])
        side = int(min(image_size, max(min_side, round(scale * max(x1 - x0, y1 - y0)))))
        left = int(min(max(round((x0 + x1 - side) / 2), 0), image_size - side))
        top = int(min(max(round((y0 + y1 - side) / 2), 0), image_size - side))
        return cls(left, top, side)

    def to_flow(self, images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
        """Model inputs ``[N, 3, M, M]`` in [0, 1] to flow space: crop, area resize, grey by channel mean, [-1, 1]."""
        crop = images[..., self.y0 : self.y0 + self.side, self.x0 : self.x0 + self.side].float()
        crop = F.interpolate(crop, size=(size, size), mode="area")
        if channels == 1:
            crop = crop.mean(1, keepdim=True)
        return crop * 2.0 - 1.0

    def to_model(self, images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Flow images ``[N, C, S, S]`` pasted (bilinear, grey to three channels) into ``context`` ``[3, M, M]``."""
        window = (images + 1.0) / 2.0
        if window.shape[1] == 1:
            window = window.expand(-1, 3, -1, -1)
        window = F.interpolate(window, size=(self.side, self.side), mode="bilinear", align_corners=False)
        out = context.to(window)[None].expand(images.shape[0], -1, -1, -1).clone()
        out[..., self.y0 : self.y0 + self.side, self.x0 : self.x0 + self.side] = window
        return out

    def mask_to_flow(self, mask: torch.Tensor, model_size: int, size: int) -> torch.Tensor:
        """A mask on any square grid over the model input ``[g, g]`` as a flow-space mask ``[S, S]`` (nearest)."""
        full = F.interpolate(mask[None, None].float(), size=(model_size, model_size), mode="nearest")
        crop = full[..., self.y0 : self.y0 + self.side, self.x0 : self.x0 + self.side]
        return F.interpolate(crop, size=(size, size), mode="nearest")[0, 0] > 0.5

    def box_in_flow(self, box: torch.Tensor, size: int) -> torch.Tensor:
        """A box in model pixels as flow pixels."""
        offset = torch.tensor([self.x0, self.y0, self.x0, self.y0], dtype=torch.float32)
        return (torch.as_tensor(box).float().cpu() - offset) * (size / self.side)


def boundary_band(mask: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Pixels within ``radius`` of the boundary of a binary mask ``[..., H, W]``: dilation XOR erosion."""
    shape = mask.shape
    m = mask.reshape(-1, 1, *shape[-2:]).float()
    kernel = 2 * radius + 1
    dilated = F.max_pool2d(m, kernel, stride=1, padding=radius)
    eroded = -F.max_pool2d(-m, kernel, stride=1, padding=radius)
    return (dilated - eroded).reshape(shape) > 0.5


def _soft_dice(probs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, probs.ndim))
    return 2.0 * (probs * reference).sum(dims) / (probs.sum(dims) + reference.sum(dims)).clamp_min(1e-6)


class SegmentationTarget(nn.Module):
    """``f(flow images [N, C, S, S]) -> [N]``: one of :data:`TARGETS` for a model, a fixed box and an image.

    Args:
        model: a box-prompted model, ``model(images [N, 3, M, M], boxes [N, 4]) -> logits [N, 1, g, g]``, with
            ``img_size`` (M).
        box: ``[4]`` box ``[x0, y0, x1, y1]`` in model pixels.
        kind: one of :data:`TARGETS`.
        image: the flow-space image ``[C, S, S]`` being explained (its prediction defines the own mask and band).
        region: where flow space sits in the model input.
        context: the model input ``[3, M, M]`` that flow space is pasted into.
        label: ground-truth mask at any size ``[H, W]`` (needed by ``dice_label``).
        band_radius: half-width of the boundary band in low-resolution logit pixels.
        mask_from: a second model whose mask at ``image`` defines the own mask and band, so two models are
            explained against the same reference (dense vs pruned).
    """

    def __init__(
        self,
        model: nn.Module,
        box: torch.Tensor,
        kind: str,
        image: torch.Tensor,
        region: Region,
        context: torch.Tensor,
        label: torch.Tensor | None = None,
        band_radius: int = 2,
        mask_from: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if kind not in TARGETS:
            raise ConfigError(f"unknown target {kind!r}; use one of {', '.join(TARGETS)}")
        if kind == "dice_label" and label is None:
            raise DataError("target 'dice_label' needs the ground-truth label of the image")
        box = torch.as_tensor(box, dtype=torch.float32).reshape(-1)
        if box.numel() != 4 or not torch.isfinite(box).all() or not (box[2] > box[0] and box[3] > box[1]):
            raise DataError(f"the image needs a box [x0, y0, x1, y1] with x1 > x0 and y1 > y0, got {box.tolist()}")
        self.model = model
        self.kind = kind
        self.model_size = int(model.img_size)
        self.region = region
        self.register_buffer("context", context.detach().float().to(image.device))
        self.register_buffer("box", box.to(image.device))
        with torch.no_grad():
            own = self.logits(image[None], mask_from or model)[0, 0] > 0
        grid = own.shape[-1]
        self.register_buffer("own_mask", own.float())
        self.register_buffer("band", boundary_band(own, band_radius).float())
        self.register_buffer("box_mask", self._box_mask(grid).to(image.device))
        if label is not None:
            resized = F.interpolate(
                torch.as_tensor(label).float().reshape(1, 1, *label.shape[-2:]), (grid, grid), mode="area"
            )[0, 0]
            self.register_buffer("label", (resized > 0.5).float().to(image.device))

    def _box_mask(self, grid: int) -> torch.Tensor:
        scale = grid / self.model_size
        x0, y0, x1, y1 = (float(v) * scale for v in self.box)
        ys, xs = torch.meshgrid(torch.arange(grid) + 0.5, torch.arange(grid) + 0.5, indexing="ij")
        return ((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)).float()

    def logits(self, images: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Low-resolution logits ``[N, 1, g, g]`` of ``model`` (default: the explained one) at flow images."""
        model = model or self.model
        boxes = self.box.to(images)[None].expand(images.shape[0], 4)
        return model(self.region.to_model(images, self.context), boxes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The target ``[N]`` at flow images ``[N, C, S, S]``."""
        logits = self.logits(images)[:, 0]
        if self.kind == "dice_self":
            return _soft_dice(torch.sigmoid(logits), self.own_mask.expand_as(logits))
        if self.kind == "dice_label":
            return _soft_dice(torch.sigmoid(logits), self.label.expand_as(logits))
        if self.kind == "boundary_energy":
            return (logits.square() * self.band).sum((1, 2)) / self.band.sum().clamp_min(1.0)
        return (logits * self.box_mask).sum((1, 2)) / self.box_mask.sum().clamp_min(1.0)
