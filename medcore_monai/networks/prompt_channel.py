"""MedSAM as a MONAI Label ``network_def``: the box prompt arrives as a fourth input channel.

MONAI Label's ``BundleInferTask`` calls ``inferer(image[None], network)``: the network sees only the
image tensor, never the request's prompts. :class:`BoxChannelMedSAM` therefore takes
``[B, 4, S, S]`` tensors whose last channel is a binary box mask (drawn by
:class:`medcore_monai.transforms.prompts.BoxToChanneld` from the request's ``roi``), recovers the
box from it and runs :class:`~medcore_monai.networks.medsam.MedSAM`.

Its ``state_dict()`` keys are exactly segment-anything ``Sam``'s (``image_encoder.*``,
``prompt_encoder.*``, ``mask_decoder.*``), so MONAI Label's own loading of ``models/model.pt``
(``checkpoint.get("model", checkpoint)``: this project's checkpoint format from
:func:`~medcore_monai.networks.build.save_sam`, or a raw state dict) into it works strictly.
"""

from __future__ import annotations

import os

import torch
from monai.data import MetaTensor
from torch import nn

from ..geometry import box_from_mask
from .build import checkpoint_image_size, load_sam
from .medsam import MedSAM, as_medsam

# checkpoint_image_size lives in .build; it stays importable from here for bundle configs.
__all__ = ["BoxChannelMedSAM", "boxes_from_channel", "checkpoint_image_size"]

_IMAGE_CHANNELS = 3
_INPUT_CHANNELS = _IMAGE_CHANNELS + 1


def boxes_from_channel(box_channel: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Box prompts ``[B, 4]`` (``[x0, y0, x1, y1]``, x = last axis) from box-mask planes.

    Each box is the tight box of the plane's pixels above ``threshold``, with inclusive maxima, the
    convention of :func:`medcore_monai.geometry.box_from_mask` (MedSAM's boxes from masks).
    An empty plane gives the whole-image box ``[0, 0, W-1, H-1]``.

    Args:
        box_channel: ``[B, H, W]`` or ``[B, 1, H, W]`` box masks.
        threshold: Values above it are inside the box (0.5 suits 0/1 masks, also after interpolation).

    Returns:
        float32 tensor ``[B, 4]`` on ``box_channel``'s device.
    """
    planes = box_channel[:, 0] if box_channel.ndim == 4 else box_channel
    if planes.ndim != 3:
        raise ValueError(f"expected box masks [B, H, W] or [B, 1, H, W], got {tuple(box_channel.shape)}")
    boxes = [box_from_mask(plane > threshold, empty_mask="full_box") for plane in planes]
    return torch.stack(boxes).to(box_channel.device)


class BoxChannelMedSAM(nn.Module):
    """Box-prompted MedSAM with ``forward(x[B, 4, S, S]) -> logits[B, 1, S, S]``.

    Channels 0-2 of ``x`` are the MedSAM-normalised image (model size, min-max scaled to [0, 1]);
    channel 3 is a binary mask of the box prompt at the same size. The box is the tight box of the
    mask (see :func:`boxes_from_channel`); an **empty box channel means the whole image** is the box,
    which is how a request without ``roi`` is served. The decoder's low-resolution logits are
    upsampled bilinearly to ``S x S`` (threshold at 0, or at 0.5 after a sigmoid).

    The module holds SAM's three sub-modules under SAM's own attribute names and nothing else
    persistent, so ``state_dict()`` keys equal the checkpoint's keys: a state dict saved from a
    segment-anything ``Sam``, a :class:`MedSAM` or this class loads into any of them.

    Args:
        checkpoint: SAM/MedSAM checkpoint, built with :func:`medcore_monai.networks.load_sam`, so
            compact (pruned) checkpoints keep their per-block widths.
        model: A ready segment-anything ``Sam`` (or :class:`MedSAM`), used instead of ``checkpoint``;
            its sub-modules are shared, not copied.
        pixel_normalize: Apply SAM's ImageNet pixel normalisation (for a general SAM; MedSAM models
            are trained without it), see :class:`MedSAM`.
        box_threshold: Box-channel values above it are inside the box.

    Raises:
        ValueError: if neither or both of ``checkpoint`` and ``model`` are given.
        medcore_monai.networks.CheckpointError: if the checkpoint is missing or not a SAM model.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        model: nn.Module | None = None,
        pixel_normalize: bool = False,
        box_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        if (checkpoint is None) == (model is None):
            raise ValueError("give exactly one of `checkpoint` (a file) or `model` (a SAM module)")
        sam = load_sam(checkpoint) if model is None else model
        self.image_encoder = sam.image_encoder
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        # Non-persistent, as in segment-anything's Sam: checkpoints do not hold them.
        self.register_buffer("pixel_mean", sam.pixel_mean.detach().clone(), persistent=False)
        self.register_buffer("pixel_std", sam.pixel_std.detach().clone(), persistent=False)
        self.pixel_normalize = pixel_normalize
        self.box_threshold = box_threshold
        self.medcore_config = getattr(sam, "medcore_config", None)

    @property
    def img_size(self) -> int:
        """Side of the square model input."""
        return self.image_encoder.img_size

    def medsam(self) -> MedSAM:
        """A :class:`MedSAM` (or :class:`RobustMedSAM`) over this module's sub-modules (shared, not copied).

        Built per call rather than stored: a stored one would be a second registered owner of the
        sub-modules (doubling the state-dict keys) and its pixel statistics would not follow
        ``.to(device)``. Building it costs microseconds.
        """
        return as_medsam(self, pixel_normalize=self.pixel_normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mask logits ``[B, 1, S, S]`` for images with a box-mask channel ``[B, 4, S, S]``."""
        if isinstance(x, MetaTensor):  # MONAI Label passes MetaTensors; SAM needs no metadata tracing
            x = x.as_tensor()
        expected = (_INPUT_CHANNELS, self.img_size, self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected input [B, {_INPUT_CHANNELS}, {self.img_size}, {self.img_size}] (RGB + box mask), "
                f"got {tuple(x.shape)}; check the preprocessing size"
            )
        boxes = boxes_from_channel(x[:, _IMAGE_CHANNELS], self.box_threshold)
        return self.medsam().predict_logits(x[:, :_IMAGE_CHANNELS], boxes)
