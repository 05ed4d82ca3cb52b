"""Flow-space images from the bundle's preprocessed samples (model input, ``[3, M, M]`` in [0, 1])."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import MapTransform

from ..errors import ConfigError, DataError
from ..tensors import plain_tensor
from .targets import Region

__all__ = ["ToFlowSpaced", "flow_training_images", "grey_if_identical"]


class ToFlowSpaced(MapTransform):
    """The model input ``image`` (``[3, M, M]`` in [0, 1]) as flow space ``[3, S, S]`` in [-1, 1].

    With ``region_scale`` the window is the :class:`~.targets.Region` around ``box`` (put a box transform before
    this one); without, the whole image. Three channels are kept; :func:`flow_training_images` makes them grey
    when every image is grey. Put it last, so a cached dataset stores the small images.
    """

    def __init__(
        self, size: int, region_scale: float | None = None, keys: Sequence[Hashable] = ("image",), box_key: str = "box"
    ) -> None:
        super().__init__(keys)
        self.size = int(size)
        self.region_scale = region_scale
        self.box_key = box_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace each key's model input with its flow-space image."""
        d = dict(data)
        for key in self.key_iterator(d):
            image = plain_tensor(d[key])
            if self.region_scale is not None and d.get(self.box_key) is None:
                raise DataError(f"{d.get('name', 'a sample')}: region_scale needs a box ({self.box_key!r}) first")
            region = Region.around(d.get(self.box_key), self.region_scale, image.shape[-1])
            d[key] = region.to_flow(image[None], self.size, 3)[0]
        return d


def grey_if_identical(images: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """``[N, 3, S, S]`` as one channel when ``channels == 1``, or when ``channels`` is None and all three agree."""
    if channels is None:
        channels = 1 if bool((images - images[:, :1]).abs().max() < 1e-6) else 3
    if channels not in (1, 3):
        raise ConfigError(f"flow channels must be 1 or 3, got {channels}")
    return images.mean(1, keepdim=True) if channels == 1 else images


def flow_training_images(samples: Iterable[Mapping[str, Any]], channels: int | None = None) -> torch.Tensor:
    """Stack the flow-space images of samples (after :class:`ToFlowSpaced`) into ``[N, C, S, S]``."""
    images = [plain_tensor(s["image"]).float() for s in samples]
    if len(images) < 2:
        raise DataError(f"a flow needs at least two training images, got {len(images)}")
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) != 1:
        raise DataError(f"flow training images differ in shape {sorted(shapes)}; put ToFlowSpaced last")
    return grey_if_identical(torch.stack(images), channels)
