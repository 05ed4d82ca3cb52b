"""MedSAM-style box-prompted segmentation module around segment-anything's ``Sam``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MedSAM"]


class MedSAM(nn.Module):
    """``forward(images, boxes) -> low-resolution logits``, the way MedSAM uses SAM.

    Images are already MedSAM-normalised (min-max to [0, 1], model size, 3 channels): SAM's own
    ImageNet pixel normalisation is *not* applied, matching MedSAM's training. Set
    ``pixel_normalize=True`` to feed a general SAM its expected input statistics instead.

    Args:
        sam: a segment-anything ``Sam`` (dense or compact encoder).
        pixel_normalize: apply ``(x*255 - sam.pixel_mean) / sam.pixel_std`` before the encoder.
    """

    def __init__(self, sam: nn.Module, pixel_normalize: bool = False) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.pixel_normalize = pixel_normalize
        self.register_buffer("pixel_mean", sam.pixel_mean.detach().clone(), persistent=False)
        self.register_buffer("pixel_std", sam.pixel_std.detach().clone(), persistent=False)
        self.medcore_config = getattr(sam, "medcore_config", None)

    @property
    def img_size(self) -> int:
        """Side of the square model input."""
        return self.image_encoder.img_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``[B, 256, g, g]`` from ``[B, 3, S, S]`` images in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != self.img_size:
            raise ValueError(f"expected images [B, 3, {self.img_size}, {self.img_size}], got {tuple(images.shape)}")
        if self.pixel_normalize:
            images = (images * 255.0 - self.pixel_mean) / self.pixel_std
        return self.image_encoder(images)

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits ``[B, 1, 4g, 4g]`` for one box ``[x0, y0, x1, y1]`` per image.

        segment-anything's decoder repeats one image embedding per prompt, so each image is decoded
        on its own (the decoder is ~4 % of ViT-B's compute).
        """
        boxes = boxes.to(device=embeddings.device, dtype=embeddings.dtype).reshape(-1, 4)
        if boxes.shape[0] != embeddings.shape[0]:
            raise ValueError(f"{boxes.shape[0]} boxes for {embeddings.shape[0]} images; give one box per image")
        dense_pe = self.prompt_encoder.get_dense_pe()
        logits = []
        for emb, box in zip(embeddings, boxes):
            sparse, dense = self.prompt_encoder(points=None, boxes=box[None], masks=None)
            low_res, _ = self.mask_decoder(
                image_embeddings=emb[None],
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            logits.append(low_res)
        return torch.cat(logits, dim=0)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Low-resolution mask logits ``[B, 1, S/4, S/4]``."""
        return self.decode(self.encode(images), boxes)

    def predict_logits(self, images: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int] | None = None):
        """Logits bilinearly upsampled to ``size`` (default: the input size)."""
        low_res = self(images, boxes)
        size = size or images.shape[-2:]
        return F.interpolate(low_res, size=size, mode="bilinear", align_corners=False)
