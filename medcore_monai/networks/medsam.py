"""MedSAM-style box-prompted segmentation modules around segment-anything's ``Sam``.

* :class:`MedSAM` - ``forward(images, boxes) -> low-res logits`` with SAM's own mask decoder;
* :class:`RobustMedSAM` - the same interface around a model whose ``mask_decoder`` is a
  :class:`~medcore_monai.networks.robust_decoder.RobustMaskDecoder` (RobustMedSAM, Li et al., 2026),
  decoding in robust mode by default;
* :func:`encode_with_early_features` / :func:`capture_block_output` - run the (unmodified) image
  encoder and capture the output of its first global-attention block with a temporary forward hook
  (RobustSAM's decoder needs it);
* :func:`as_medsam` - the right wrapper for a model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .robust_decoder import RobustDecoderOutput, RobustMaskDecoder

__all__ = [
    "EARLY_FEATURES_ATTR",
    "MedSAM",
    "RobustEncoding",
    "RobustMedSAM",
    "as_medsam",
    "capture_block_output",
    "early_feature_block",
    "encode_with_early_features",
]

#: Attribute of the tensor returned by :meth:`RobustMedSAM.encode` that holds the early features.
EARLY_FEATURES_ATTR = "medcore_early_features"


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

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's logits: 4x the embedding grid (256 for ViT-B at 1024 px and LiteMedSAM at 256)."""
        return 4 * int(self.prompt_encoder.image_embedding_size[0])

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

    def forward(
        self, images: torch.Tensor, boxes: torch.Tensor, return_embeddings: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits ``[B, 1, S/4, S/4]``.

        Args:
            images: ``[B, 3, S, S]`` MedSAM-normalised images.
            boxes: ``[B, 4]`` box prompts in model-input pixels.
            return_embeddings: also return the image embeddings, as ``(embeddings, logits)``. Training
                steps that use both must get them from this one call: DistributedDataParallel
                synchronises gradients per forward call, not per ``encode``/``decode``.
        """
        embeddings = self.encode(images)
        logits = self.decode(embeddings, boxes)
        return (embeddings, logits) if return_embeddings else logits

    def predict_logits(self, images: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int] | None = None):
        """Logits bilinearly upsampled to ``size`` (default: the input size)."""
        low_res = self(images, boxes)
        size = size or images.shape[-2:]
        return F.interpolate(low_res, size=size, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------------
# RobustSAM's early encoder features
# --------------------------------------------------------------------------------------------------


def early_feature_block(image_encoder: nn.Module) -> int:
    """Index of the encoder's first global-attention block (ViT-B and tiny: 2), RobustSAM's early feature.

    Raises:
        ValueError: if every block uses windowed attention.
    """
    if not hasattr(image_encoder, "blocks"):
        raise ValueError(
            f"RobustSAM's decoder reads the early features of a ViT's first global-attention block; "
            f"{type(image_encoder).__name__} (LiteMedSAM's TinyViT) has no such block"
        )
    for index, block in enumerate(image_encoder.blocks):
        if block.window_size == 0:
            return index
    raise ValueError("the image encoder has no global-attention block; RobustSAM's decoder needs one")


class _Captured:
    """Holder for a tensor produced inside a :func:`capture_block_output` block."""

    def __init__(self) -> None:
        self._value: torch.Tensor | None = None

    @property
    def output(self) -> torch.Tensor:
        """The block's last output.

        Raises:
            RuntimeError: if the block did not run.
        """
        if self._value is None:
            raise RuntimeError("the hooked block did not run")
        return self._value


@contextlib.contextmanager
def capture_block_output(block: nn.Module) -> Iterator[_Captured]:
    """Record ``block``'s output while the context is open; the hook is removed on exit.

    A temporary hook leaves segment-anything's classes untouched, works for compact (slimmed)
    encoders, and keeps models free of persistent hooks (so they deep-copy and pickle cleanly).
    """
    captured = _Captured()

    def _record(_module: nn.Module, _inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        captured._value = output

    handle = block.register_forward_hook(_record)
    try:
        yield captured
    finally:
        handle.remove()


def encode_with_early_features(image_encoder: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a SAM image encoder and also return its first global block's output.

    Args:
        image_encoder: segment-anything ``ImageEncoderViT`` (dense or compact).
        images: encoder input ``[B, 3, S, S]`` (already normalised as the encoder expects).

    Returns:
        ``(embeddings [B, 256, g, g], early_features [B, g, g, embed_dim])``; the early map is BHWC, as
        RobustSAM's decoder takes it.
    """
    with capture_block_output(image_encoder.blocks[early_feature_block(image_encoder)]) as captured:
        embeddings = image_encoder(images)
    return embeddings, captured.output


# --------------------------------------------------------------------------------------------------
# RobustMedSAM
# --------------------------------------------------------------------------------------------------


class RobustEncoding(NamedTuple):
    """Encoder outputs RobustSAM's decoder needs.

    Attributes:
        embeddings: image embeddings ``[B, 256, g, g]``.
        early_features: first global-attention block output ``[B, g, g, embed_dim]``.
    """

    embeddings: torch.Tensor
    early_features: torch.Tensor


class RobustMedSAM(MedSAM):
    """:class:`MedSAM`'s ``forward(images, boxes) -> low-res logits`` with RobustSAM's decoder.

    One box per image; each image is decoded on its own (robust mode takes one prompt per call).
    ``robust=True`` (the default) uses RobustSAM's robust path, ``robust=False`` plain SAM decoding
    with the same weights.

    Args:
        sam: a model from :func:`build_robust_sam` / :func:`load_robust_sam` (anything with
            ``image_encoder``, ``prompt_encoder``, a :class:`RobustMaskDecoder` ``mask_decoder``,
            ``pixel_mean`` and ``pixel_std``).
        pixel_normalize: see :class:`MedSAM`.
        robust: decode in robust mode.

    Raises:
        TypeError: if ``sam.mask_decoder`` is not a :class:`RobustMaskDecoder`.
    """

    def __init__(self, sam: nn.Module, pixel_normalize: bool = False, robust: bool = True) -> None:
        if not isinstance(getattr(sam, "mask_decoder", None), RobustMaskDecoder):
            raise TypeError(
                "RobustMedSAM needs a model with a RobustMaskDecoder (build_robust_sam / load_robust_sam); "
                "use MedSAM for a plain SAM decoder"
            )
        super().__init__(sam, pixel_normalize=pixel_normalize)
        self.robust = robust
        self.early_block = early_feature_block(self.image_encoder)

    def encode_features(self, images: torch.Tensor) -> RobustEncoding:
        """Image embeddings and early features of ``[B, 3, S, S]`` images in [0, 1]."""
        with capture_block_output(self.image_encoder.blocks[self.early_block]) as captured:
            embeddings = super().encode(images)
        return RobustEncoding(embeddings, captured.output)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``[B, 256, g, g]``, as :meth:`MedSAM.encode`.

        The early features travel with the returned tensor (attribute ``medcore_early_features``), so
        ``decode(encode(images), boxes)`` works as for MedSAM. A tensor derived from it (``.to()``,
        indexing, a cache) loses them: then pass ``early_features`` to :meth:`decode` explicitly, e.g.
        from :meth:`encode_features`.
        """
        encoding = self.encode_features(images)
        setattr(encoding.embeddings, EARLY_FEATURES_ATTR, encoding.early_features)
        return encoding.embeddings

    def decode(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor,
        early_features: torch.Tensor | None = None,
        robust: bool | None = None,
    ) -> torch.Tensor:
        """Low-resolution logits ``[B, 1, 4g, 4g]`` for one box ``[x0, y0, x1, y1]`` per image.

        Args:
            embeddings: image embeddings ``[B, 256, g, g]``.
            boxes: ``[B, 4]`` in model-input pixels.
            early_features: ``[B, g, g, embed_dim]``; defaults to the ones attached by :meth:`encode`.
            robust: override :attr:`robust` for this call.

        Raises:
            ValueError: for a box count that differs from the image count, or robust decoding without
                early features.
        """
        robust = self.robust if robust is None else robust
        logits = [
            self.mask_decoder(*inputs, multimask_output=False, encoder_features=early, robust=robust)[0]
            for inputs, early in self._prompts(embeddings, boxes, early_features, need_early=robust)
        ]
        return torch.cat(logits, dim=0)

    def robust_outputs(
        self, images: torch.Tensor, boxes: torch.Tensor, robust: bool | None = None
    ) -> RobustDecoderOutput:
        """Logits plus robust mask features and mask tokens, batched over images.

        For RobustSAM's consistency losses run it on clean images with ``robust=False`` and on their
        degraded copies with ``robust=True``; compare ``robust_embeddings`` and ``robust_token``.
        """
        robust = self.robust if robust is None else robust
        encoding = self.encode_features(images)
        outputs = [
            self.mask_decoder.predict_with_robust_outputs(*inputs, False, early, robust=robust)
            for inputs, early in self._prompts(encoding.embeddings, boxes, encoding.early_features, need_early=True)
        ]
        return RobustDecoderOutput(*(torch.cat(parts, dim=0) for parts in zip(*outputs)))

    def forward(
        self, images: torch.Tensor, boxes: torch.Tensor, return_embeddings: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits ``[B, 1, S/4, S/4]`` (and the embeddings, see :meth:`MedSAM.forward`)."""
        encoding = self.encode_features(images)
        logits = self.decode(encoding.embeddings, boxes, encoding.early_features)
        return (encoding.embeddings, logits) if return_embeddings else logits

    def _prompts(
        self, embeddings: torch.Tensor, boxes: torch.Tensor, early_features: torch.Tensor | None, need_early: bool
    ) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor | None]]:
        """Per image: decoder inputs ``(embedding, dense PE, sparse, dense)`` and its early features."""
        if early_features is None:
            early_features = getattr(embeddings, EARLY_FEATURES_ATTR, None)
        if early_features is None and need_early:
            raise ValueError(
                "robust decoding needs the early encoder features: decode(encode(images), boxes) carries "
                "them; for embeddings from elsewhere pass early_features= (see encode_features)"
            )
        boxes = boxes.to(device=embeddings.device, dtype=embeddings.dtype).reshape(-1, 4)
        if boxes.shape[0] != embeddings.shape[0]:
            raise ValueError(f"{boxes.shape[0]} boxes for {embeddings.shape[0]} images; give one box per image")
        dense_pe = self.prompt_encoder.get_dense_pe()
        for i, (emb, box) in enumerate(zip(embeddings, boxes)):
            sparse, dense = self.prompt_encoder(points=None, boxes=box[None], masks=None)
            early = None if early_features is None else early_features[i : i + 1]
            yield (emb[None], dense_pe, sparse, dense), early


def as_medsam(sam: nn.Module, pixel_normalize: bool = False) -> MedSAM:
    """Wrap ``sam`` in :class:`RobustMedSAM` if it has a RobustSAM decoder, else in :class:`MedSAM`."""
    if isinstance(getattr(sam, "mask_decoder", None), RobustMaskDecoder):
        return RobustMedSAM(sam, pixel_normalize=pixel_normalize)
    return MedSAM(sam, pixel_normalize=pixel_normalize)
