"""Box-prompted MedSAM inference at each image's own resolution, slice by slice for volumes.

MedSAM's evaluation protocol: every 2-D image (or every slice of a volume that holds the structure) is brought to
the model size, prompted with a box drawn from its mask, and the low-resolution logits are upsampled bilinearly
back to the native size; slices without the structure get no prompt and predict nothing. :class:`BoxPromptInferer`
does this as a MONAI ``Inferer``, so a ``SupervisedEvaluator`` compares native predictions with native labels and
the metric handlers read the voxel spacing from the labels (3-D metrics in mm for volumes).

The model-size preparation is the bundle's own dictionary transforms (``model_transform``: resize, min-max
scaling, box from the mask, optionally a corruption), applied to each ``{"image", "label", "name"}`` slice.

:class:`BoxChannelInferer` is the served variant (MONAI Label): the prompt is a box drawn as the input's last channel
rather than a mask, and the network is a ``BoxChannelMedSAM``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import nn

from .geometry import min_max_scale, resize_image, resize_mask
from .transforms.volumes import slice_name

__all__ = ["UNPROMPTED_LOGIT", "BoxChannelInferer", "BoxPromptInferer", "prepare_prompted_batch"]

#: Logit of pixels of slices without a prompt (sigmoid ~ 0): they predict background.
UNPROMPTED_LOGIT = -100.0


def _plain(value: Any) -> torch.Tensor:
    return value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)


def _slice_indices(mask: torch.Tensor, axis: int) -> list[int]:
    """Indices along spatial ``axis`` of the slices of a spatial mask ``[H, W, D]`` that hold any ``True``."""
    reached = mask.any(dim=tuple(d for d in range(mask.ndim) if d != axis))
    return [int(i) for i in torch.nonzero(reached).flatten()]


def _fill_slices(
    out: torch.Tensor, indices: Sequence[int], axis: int, batch_size: int, predict: Callable[[list[int]], torch.Tensor]
) -> None:
    """Write ``predict(chunk)`` (``[n, H, W]`` logits of those slices) into ``out`` ``[H, W, D]``, in chunks."""
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start : start + batch_size])
        for i, logits in zip(chunk, predict(chunk)):
            out.select(axis, i).copy_(logits)


def _to_native(low_res: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Model-size logits ``[n, 1, h, w]`` upsampled bilinearly (MedSAM's way) to ``like``'s plane: ``[n, H, W]``."""
    size = tuple(like.shape[-2:])
    return F.interpolate(low_res.float(), size=size, mode="bilinear", align_corners=False)[:, 0].to(like.device)


def _names(batchdata: Mapping[str, Any], count: int) -> list[str]:
    names = batchdata.get("name")
    if names is None:  # bare MONAI Label items: the file name identifies the sample
        image = batchdata["image"]
        files = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
        names = files if isinstance(files, (list, tuple)) else [files or f"item{i}" for i in range(count)]
    names = names if isinstance(names, (list, tuple)) else [names]
    return [str(n) for n in names]


def prepare_prompted_batch(
    batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **_: Any
) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, Any]]:
    """``prepare_batch`` for evaluators using :class:`BoxPromptInferer`.

    The native label is both the target and the prompt source (MedSAM boxes come from the masks); names seed the
    per-sample box jitter, ``slice_axis`` says how volumes are cut.
    """
    images, labels = batchdata["image"], batchdata["label"]
    axes = batchdata.get("slice_axis")
    kwargs = {"prompts": labels, "names": _names(batchdata, len(images))}
    if axes is not None:
        kwargs["slice_axes"] = [int(a) for a in torch.as_tensor(axes).reshape(-1).tolist()]
    return images.to(device, non_blocking=non_blocking), labels.to(device, non_blocking=non_blocking), (), kwargs


class BoxPromptInferer(Inferer):
    """Native-resolution box-prompted inference of 2-D images ``[B, C, H, W]`` or volumes ``[B, C, H, W, D]``.

    Args:
        model_transform: dictionary transform turning a native ``{"image", "label", "name"}`` slice into the
            model input (``image [3, S, S]``, ``box [4]``), e.g. resize + min-max + deterministic box.
        slice_axis: spatial axis along which volumes are cut (a batch's ``slice_axes`` take precedence).
        batch_size: slices per network call.
        image_key: key of the image in the transformed sample.
        box_key: key of the box prompt in the transformed sample.
    """

    def __init__(
        self,
        model_transform: Callable[[dict[str, Any]], Mapping[str, Any]],
        slice_axis: int = 2,
        batch_size: int = 8,
        image_key: str = "image",
        box_key: str = "box",
    ) -> None:
        super().__init__()
        self.model_transform = model_transform
        self.slice_axis, self.batch_size = int(slice_axis), int(batch_size)
        self.image_key, self.box_key = image_key, box_key

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        prompts: torch.Tensor | None = None,
        names: Sequence[str] | None = None,
        slice_axes: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Logits ``[B, 1, *spatial]`` at the inputs' resolution (``UNPROMPTED_LOGIT`` where nothing was prompted).

        Raises:
            ValueError: without ``prompts`` (masks to draw boxes from) or for inputs that are neither 2-D nor 3-D.
        """
        if prompts is None:
            raise ValueError("BoxPromptInferer needs prompts: the masks its boxes are drawn from")
        if inputs.ndim not in (4, 5):
            raise ValueError(f"expected [B, C, H, W] or [B, C, H, W, D] inputs, got {tuple(inputs.shape)}")
        names = list(names) if names is not None else [f"item{i}" for i in range(len(inputs))]
        outputs = []
        for b in range(inputs.shape[0]):
            axis = int(slice_axes[b]) if slice_axes is not None else self.slice_axis
            outputs.append(self._item(inputs[b], prompts[b], names[b], axis, network))
        return torch.stack(outputs)

    def _item(self, image: torch.Tensor, prompt: torch.Tensor, name: str, axis: int, network: nn.Module):
        image, prompt = _plain(image), _plain(prompt)
        out = torch.full((1, *image.shape[1:]), UNPROMPTED_LOGIT, dtype=torch.float32, device=image.device)
        if image.ndim == 3:
            out[0] = self._predict([(image, prompt, name)], network)[0]
            return out

        def predict(chunk: list[int]) -> torch.Tensor:
            slices = [(image.select(axis + 1, i), prompt.select(axis + 1, i), slice_name(name, i)) for i in chunk]
            return self._predict(slices, network)

        _fill_slices(out[0], _slice_indices((prompt > 0).any(dim=0), axis), axis, self.batch_size, predict)
        return out

    def _predict(self, slices: Sequence[tuple[torch.Tensor, torch.Tensor, str]], network: nn.Module):
        """Native-size logits ``[n, H, W]`` of 2-D slices ``(image [C, H, W], mask [1, H, W], name)``."""
        samples = [self.model_transform({"image": im.cpu(), "label": pr.cpu(), "name": n}) for im, pr, n in slices]
        device = next(network.parameters()).device
        images = torch.stack([_plain(s[self.image_key]) for s in samples]).to(device).float()
        boxes = torch.stack([_plain(s[self.box_key]) for s in samples]).to(device).float()
        return _to_native(network(images, boxes), slices[0][0])


class BoxChannelInferer(Inferer):
    """Native-resolution inference of inputs whose last channel is a box prompt: 2-D images or volumes.

    This is how the bundle is served (``configs/inference.yaml``, MONAI Label's ``inferer(image[None], network)``).
    Each 2-D plane ``[C + 1, H, W]`` is brought to the model size the MedSAM way (image channels: bicubic,
    anti-aliased resize and min-max scaling; box channel: nearest neighbour), the network (a
    :class:`~medcore_monai.networks.prompt_channel.BoxChannelMedSAM`) gives model-size logits, and these are upsampled
    bilinearly to the plane's native size. A 2-D image is one plane (an empty box channel means the whole image). A
    volume ``[C + 1, H, W, D]`` is cut along ``slice_axis``; only slices the box reaches are run, the others get
    :data:`UNPROMPTED_LOGIT`.

    Args:
        size: model input size (256 for the tiny models and LiteMedSAM, 1024 for ViT-B).
        slice_axis: spatial axis along which volumes are cut (2: the ``z`` of a 3-D ``roi``).
        batch_size: slices per network call.
    """

    def __init__(self, size: int, slice_axis: int = 2, batch_size: int = 8) -> None:
        super().__init__()
        if int(size) < 1 or int(batch_size) < 1:
            raise ValueError(f"size and batch_size must be positive, got {size} and {batch_size}")
        self.size, self.slice_axis, self.batch_size = int(size), int(slice_axis), int(batch_size)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """Logits ``[B, 1, *spatial]`` at the inputs' resolution.

        Raises:
            ValueError: for inputs that are neither ``[B, C + 1, H, W]`` nor ``[B, C + 1, H, W, D]``.
        """
        inputs = _plain(inputs)
        if inputs.ndim not in (4, 5) or inputs.shape[1] < 2:
            raise ValueError(f"expected [B, C + 1, H, W] or [B, C + 1, H, W, D] inputs, got {tuple(inputs.shape)}")
        if inputs.ndim == 4:
            return self._planes(list(inputs), network)[:, None]
        return torch.stack([self._volume(volume, network) for volume in inputs])

    def _volume(self, volume: torch.Tensor, network: nn.Module) -> torch.Tensor:
        axis = self.slice_axis
        out = torch.full((1, *volume.shape[1:]), UNPROMPTED_LOGIT, dtype=torch.float32, device=volume.device)

        def predict(chunk: list[int]) -> torch.Tensor:
            return self._planes([volume.select(axis + 1, i) for i in chunk], network)

        _fill_slices(out[0], _slice_indices(volume[-1] > 0.5, axis), axis, self.batch_size, predict)
        return out

    def _planes(self, planes: Sequence[torch.Tensor], network: nn.Module) -> torch.Tensor:
        """Native-size logits ``[n, H, W]`` of same-size planes ``[C + 1, H, W]`` (box channel last)."""
        device = next(network.parameters()).device
        batch = torch.stack([self._model_input(p) for p in planes]).to(device)
        return _to_native(network(batch), planes[0])

    def _model_input(self, plane: torch.Tensor) -> torch.Tensor:
        image = min_max_scale(resize_image(plane[:-1], self.size))
        return torch.cat([image, resize_mask(plane[-1:], self.size)])
