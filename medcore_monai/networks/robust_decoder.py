"""A RobustSAM-compatible mask decoder built on segment-anything's ``MaskDecoder``.

RobustSAM (Chen et al., CVPR 2024) keeps SAM's image and prompt encoders and extends the mask decoder
with anti-degradation modules:

* a Robust Output Token (ROT, ``custom_robust_token``) that replaces SAM's mask tokens in robust mode;
* AOTG (``custom_token_block``): instance-normalises each output token, splits it into chunks and
  maps every chunk through a small MLP, followed by ``robust_mlp``, the ROT's hypernetwork;
* three AMFG blocks (``fourier_mask_features``, ``fourier_first_layer_features``,
  ``fourier_last_layer_features``): a degradation-normalising selective-kernel convolution with
  squeeze-excitation, a Fourier-magnitude 1x1 convolution and a 3x3 fusion convolution, followed by a
  resampling head. They process the decoder's upscaled mask features, the output of the encoder's
  first global-attention block and the final image embedding; the three results are summed into the
  robust mask features.

Why this is our own module: the only packaged release, PyPI ``robust-segment-anything`` 1.0.0 (one
upload, June 2024, unmaintained since), declares torchvision as a hard dependency and imports it from
its package ``__init__`` (predictor -> utils.transforms), its transformer imports matplotlib, its
decoder cannot run without a global ``opt`` object, and its builders hard-code 1024 px inputs. None of
that fits this project (no CPU torchvision, tiny test configs), so the decoder is implemented here from
the published description. Only the module, parameter and buffer *names and shapes* follow the public
RobustSAM checkpoint, so the ``mask_decoder.*`` tensors of an official RobustSAM checkpoint load with
``strict=True``. For ViT-B the decoder has 63,504,072 parameters (SAM's has 4,058,340) and 209 state
dict entries, 89 of them beyond SAM's.

Behaviour notes (checked against the reference implementation on random weights, ViT-B and tiny
widths: clear mode bit-identical, robust mode within 1e-6 relative):

* **clear mode** (``robust=False``) is exactly segment-anything's decoder;
* **robust mode** decodes **one prompt for one image per call**: AOTG reshapes a single token into
  sub-tokens, so the reference code fails with a shape error for several prompts; here a clear
  ``ValueError`` is raised instead;
* the Fourier block applies the inverse FFT, as RobustSAM's code and checkpoints have done since the
  fix of 2024-07-16 (RobustSAM issue #7). Before that (and in the PyPI 1.0.0 wheel) the block returned
  its input unchanged, so checkpoints downloaded before that date do not match this module's robust path;
* AOTG yields ``num_mask_tokens`` sub-tokens per mask token. In the reference code the resulting
  hypernetwork weights are multiplied against one image, which puts sub-token 0 of mask token ``t`` at
  output channel ``t``; the single-mask output (channel 0) therefore uses sub-token 0 of token 0. This
  module returns the same channels 0..3 (so ``multimask_output=True`` gives 3 masks, matching the
  reference's first three multimask channels; the reference additionally emits 12 channels mixing the
  other sub-tokens, which are not reproduced).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .sam_import import sam_modeling

__all__ = [
    "ROBUST_DECODER_MODULES",
    "ROBUST_DETECTION_KEY",
    "AntiDegradationFeatureBlock",
    "ChannelAttention",
    "DegradationNormBlock",
    "FourierMagnitudeBlock",
    "RobustDecoderOutput",
    "RobustMaskDecoder",
    "RobustTokenBlock",
    "SelectiveKernelConv",
    "SpatialSelector",
    "has_robust_decoder",
    "is_robust_decoder_key",
]

_modeling = sam_modeling()
_SamMLP = importlib.import_module("segment_anything.modeling.mask_decoder").MLP
_LayerNorm2d = importlib.import_module("segment_anything.modeling.common").LayerNorm2d

#: Attribute names of the modules RobustSAM adds to SAM's mask decoder (checkpoint key prefixes).
ROBUST_DECODER_MODULES: tuple[str, ...] = (
    "custom_robust_token",
    "robust_mlp",
    "fourier_mask_features",
    "fourier_first_layer_features",
    "fourier_last_layer_features",
    "custom_token_block",
)

#: A full-model state dict holding this key has a RobustSAM decoder.
ROBUST_DETECTION_KEY = "mask_decoder.custom_robust_token.weight"

# Instance/batch-norm epsilon of the reference modules (PyTorch's default).
_NORM_EPS = 1e-5
# LeakyReLU slope of the reference selective-kernel branches (PyTorch's default).
_LEAKY_SLOPE = 0.01


def is_robust_decoder_key(key: str) -> bool:
    """Whether a full-model state-dict key belongs to one of RobustSAM's extra decoder modules."""
    if key.startswith("module."):
        key = key[len("module.") :]
    return any(key.startswith(f"mask_decoder.{name}.") for name in ROBUST_DECODER_MODULES)


def has_robust_decoder(state: Mapping[str, object]) -> bool:
    """Whether a full-model state dict (optionally ``module.``-prefixed) carries a RobustSAM decoder."""
    return ROBUST_DETECTION_KEY in state or f"module.{ROBUST_DETECTION_KEY}" in state


class RobustDecoderOutput(NamedTuple):
    """Everything the robust decoder computes for one prompt.

    Attributes:
        masks: low-resolution mask logits ``[N, C, 4g, 4g]`` (``C`` = 1, or 3 with multimask output).
        iou_pred: predicted mask quality ``[N, C]``.
        robust_embeddings: fused AMFG mask features ``[N, transformer_dim/8, 4g, 4g]``; RobustSAM ties
            the degraded image's ones to the clean image's ones with an MSE loss.
        robust_token: transformer outputs of the mask tokens ``[N, num_mask_tokens, transformer_dim]``
            (SAM's tokens in clear mode, the ROT in robust mode); also tied by an MSE loss.
    """

    masks: torch.Tensor
    iou_pred: torch.Tensor
    robust_embeddings: torch.Tensor
    robust_token: torch.Tensor


class SpatialSelector(nn.Module):
    """Soft choice between two feature maps on a coarse spatial grid.

    The input is pooled to ``grid x grid`` cells, squeezed through a bottleneck and expanded into two
    logit maps; a softmax across the two gives per-cell, per-channel weights that are upsampled (nearest)
    to the input size.

    Args:
        channels: channels of the maps being weighted.
        reduction: bottleneck reduction of the pooled descriptor.
        grid: side of the pooled grid (4 in RobustSAM, which fixes the linear layers' widths to
            ``channels * 16``).
    """

    def __init__(self, channels: int, reduction: int = 16, grid: int = 4) -> None:
        super().__init__()
        self.grid = grid
        descriptor = channels * grid * grid
        hidden = descriptor // reduction
        self.fc = nn.Sequential(nn.Linear(descriptor, hidden, bias=False), nn.ReLU(inplace=True))
        self.att_conv1 = nn.Linear(hidden, descriptor)
        self.att_conv2 = nn.Linear(hidden, descriptor)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two weight maps shaped like ``x`` that sum to one."""
        b, c, h, w = x.shape
        hidden = self.fc(F.adaptive_avg_pool2d(x, self.grid).flatten(1))
        logits = torch.stack([self.att_conv1(hidden), self.att_conv2(hidden)])  # [2, B, C * grid^2]
        weights = logits.view(2, b, c, self.grid, self.grid).softmax(dim=0)
        weights = F.interpolate(weights.view(2 * b, c, self.grid, self.grid), size=(h, w), mode="nearest")
        first, second = weights.view(2, b, c, h, w).unbind(0)
        return first, second


class SelectiveKernelConv(nn.Module):
    """Two parallel convolutions, one after batch norm and one after instance norm, mixed spatially.

    Batch norm keeps the image statistics while instance norm removes per-image style (brightness,
    contrast, noise level); the selector decides per region which normalisation to trust.

    Args:
        channels: input and output channels.
        kernel_size: convolution kernel (odd; padding keeps the size).
        reduction: selector bottleneck reduction.
    """

    def __init__(self, channels: int, kernel_size: int = 3, reduction: int = 16) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=pad, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=pad, bias=False)
        self.selector = SpatialSelector(channels, reduction=reduction)
        # Name kept from the reference checkpoint (its buffers are stored under "BN").
        self.BN = nn.BatchNorm2d(channels, eps=_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Selectively mixed convolution of ``x`` (same shape)."""
        from_batch_norm = self.conv1(F.leaky_relu(self.BN(x), _LEAKY_SLOPE))
        from_instance_norm = self.conv2(F.leaky_relu(F.instance_norm(x, eps=_NORM_EPS), _LEAKY_SLOPE))
        weight_bn, weight_in = self.selector(from_batch_norm + from_instance_norm)
        return from_batch_norm * weight_bn + from_instance_norm * weight_in


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation gating of channels.

    Args:
        channels: channels of the input.
        reduction: bottleneck reduction.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.excitation = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` scaled by a per-channel gate computed from its spatial mean."""
        gate = self.excitation(x.mean(dim=(2, 3)))
        return x * gate[:, :, None, None]


class DegradationNormBlock(nn.Module):
    """Degradation-normalising block: input and its selective-kernel response, channel-gated.

    Args:
        channels: input channels; the output has twice as many.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        # Two container levels only so that the reference checkpoint's names
        # (``SEMBlock.maxpool_conv.0.*``) resolve; there is no pooling here.
        self.SEMBlock = nn.ModuleDict({"maxpool_conv": nn.Sequential(SelectiveKernelConv(channels))})
        self.channel_attention = ChannelAttention(2 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 2C, H, W]``: ``x`` stacked with its normalised response, then channel attention."""
        selected = self.SEMBlock["maxpool_conv"](x)
        return self.channel_attention(torch.cat([x, selected], dim=1))


class FourierMagnitudeBlock(nn.Module):
    """Re-weights the amplitude spectrum with a 1x1 convolution and keeps the phase.

    Many degradations (noise, blur, contrast changes) mostly alter amplitudes, while structure lives in
    the phase.

    Args:
        channels: half the input channels (the block follows :class:`DegradationNormBlock`).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_layer = nn.Conv2d(2 * channels, 2 * channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Real part of the inverse FFT of (convolved magnitude, original phase)."""
        # FFTs have no half-precision kernels on most devices: run the block in float32 even under
        # autocast (a no-op for float32 models), and hand back the caller's dtype.
        # (the meta device, used to count FLOPs, has no autocast state to switch off)
        no_autocast = torch.autocast(x.device.type, enabled=False) if x.device.type != "meta" else nullcontext()
        with no_autocast:
            spectrum = torch.fft.fft2(x.float(), dim=(-2, -1))
            magnitude = self.conv_layer(spectrum.abs().to(self.conv_layer.weight.dtype)).float()
            restored = torch.fft.ifft2(torch.polar(magnitude, spectrum.angle()), dim=(-2, -1)).real
        return restored.to(x.dtype)


class AntiDegradationFeatureBlock(nn.Module):
    """AMFG: anti-degradation refinement of a feature map, then a resampling head.

    In robust mode the map goes through :class:`DegradationNormBlock`, :class:`FourierMagnitudeBlock`
    and a 3x3 convolution back to ``channels``; in clear mode only the head runs (RobustSAM's clean
    branch).

    Args:
        channels: channels of the input map.
        head_name: attribute name of the head (``upsample_layer`` or ``downsample_layer``, as in the
            reference checkpoint).
        head: the resampling head.
    """

    def __init__(self, channels: int, head_name: str, head: nn.Module) -> None:
        super().__init__()
        self.dnc_block_combined = DegradationNormBlock(channels)
        self.fgm_block = FourierMagnitudeBlock(channels)
        self.conv_layer = nn.Conv2d(2 * channels, channels, kernel_size=3, padding=1)
        self.head_name = head_name
        self.add_module(head_name, head)

    @property
    def head(self) -> nn.Module:
        """The resampling head."""
        return getattr(self, self.head_name)

    def forward(self, x: torch.Tensor, robust: bool = True) -> torch.Tensor:
        """Refined (robust mode) and resampled features."""
        if robust:
            x = self.conv_layer(self.fgm_block(self.dnc_block_combined(x)))
        return self.head(x)


def _upsampling_head(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """Two stride-2 transposed convolutions (4x upsampling), as SAM's ``output_upscaling``."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, mid_channels, kernel_size=2, stride=2),
        _LayerNorm2d(mid_channels),
        nn.GELU(),
        nn.ConvTranspose2d(mid_channels, out_channels, kernel_size=2, stride=2),
    )


def _refining_head(channels: int, mid_channels: int) -> nn.Sequential:
    """Two 3x3 convolutions at constant resolution (RobustSAM names it ``downsample_layer``)."""
    return nn.Sequential(
        nn.Conv2d(channels, mid_channels, kernel_size=3, padding=1),
        _LayerNorm2d(mid_channels),
        nn.GELU(),
        nn.Conv2d(mid_channels, channels, kernel_size=3, padding=1),
    )


class RobustTokenBlock(nn.Module):
    """AOTG: normalise one output token, split it into chunks and expand every chunk to a token.

    Args:
        num_tokens: number of chunks (RobustSAM uses the number of mask tokens, 4).
        token_dim: token width (256); must be divisible by ``num_tokens``.
    """

    def __init__(self, num_tokens: int, token_dim: int) -> None:
        super().__init__()
        if token_dim % num_tokens:
            raise ValueError(f"token_dim {token_dim} is not divisible by num_tokens {num_tokens}")
        chunk = token_dim // num_tokens
        self.num_tokens = num_tokens
        self.mlp = nn.Sequential(nn.Linear(chunk, chunk), nn.ReLU(), nn.Linear(chunk, chunk * num_tokens))

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        """``[num_tokens, token_dim]`` sub-tokens from one token ``[1, token_dim]``.

        Raises:
            ValueError: for more than one token; the chunking treats the whole input as one token.
        """
        if token.ndim != 2 or token.shape[0] != 1:
            raise ValueError(f"AOTG takes one token [1, D] per call, got {tuple(token.shape)}")
        # The reference normalises twice (two instance norms in a row); the second pass only changes
        # values through epsilon, but is kept so outputs match the published weights exactly.
        for _ in range(2):
            token = F.layer_norm(token, token.shape[-1:], eps=_NORM_EPS)
        return self.mlp(token.reshape(self.num_tokens, -1))


class RobustMaskDecoder(_modeling.MaskDecoder):
    """segment-anything ``MaskDecoder`` plus RobustSAM's anti-degradation modules.

    The SAM parts keep their names (``transformer``, ``iou_token``, ``mask_tokens``,
    ``output_upscaling``, ``output_hypernetworks_mlps``, ``iou_prediction_head``), and the extra
    modules use RobustSAM's names (:data:`ROBUST_DECODER_MODULES`), so official RobustSAM decoder weights
    load strictly. Widths follow the encoder: ``encoder_dim`` sizes the early-feature AMFG block (and its
    spatial-selector linears, ``16 * encoder_dim`` wide).

    Args:
        transformer_dim: prompt/decoder width (256 for every SAM size).
        transformer: the two-way transformer; ``None`` builds SAM's (depth 2, 8 heads, MLP 2048).
        encoder_dim: channels of the image encoder's early feature map (its embed dim: 768 for ViT-B,
            192 for the tiny test config).
        image_embedding_size: side of the image-embedding grid (64 at 1024 px, 16 for tiny); the robust
            path checks that the image embeddings and early features have it.
        num_multimask_outputs: masks predicted in multimask mode.
        activation: activation of SAM's upscaling path.
        iou_head_depth: depth of the IoU head.
        iou_head_hidden_dim: width of the IoU head.
    """

    def __init__(
        self,
        *,
        transformer_dim: int = 256,
        transformer: nn.Module | None = None,
        encoder_dim: int = 768,
        image_embedding_size: int = 64,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        if transformer is None:
            transformer = _modeling.TwoWayTransformer(depth=2, embedding_dim=transformer_dim, mlp_dim=2048, num_heads=8)
        super().__init__(
            transformer_dim=transformer_dim,
            transformer=transformer,
            num_multimask_outputs=num_multimask_outputs,
            activation=activation,
            iou_head_depth=iou_head_depth,
            iou_head_hidden_dim=iou_head_hidden_dim,
        )
        self.encoder_dim = encoder_dim
        self.image_embedding_size = image_embedding_size
        mask_channels = transformer_dim // 8
        self.custom_robust_token = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.robust_mlp = _SamMLP(transformer_dim, transformer_dim, mask_channels, 3)
        self.fourier_mask_features = AntiDegradationFeatureBlock(
            mask_channels, "downsample_layer", _refining_head(mask_channels, transformer_dim // 4)
        )
        self.fourier_first_layer_features = AntiDegradationFeatureBlock(
            encoder_dim, "upsample_layer", _upsampling_head(encoder_dim, transformer_dim, mask_channels)
        )
        self.fourier_last_layer_features = AntiDegradationFeatureBlock(
            transformer_dim, "upsample_layer", _upsampling_head(transformer_dim, transformer_dim, mask_channels)
        )
        self.custom_token_block = RobustTokenBlock(self.num_mask_tokens, transformer_dim)

    @classmethod
    def from_sam_decoder(cls, decoder: nn.Module, encoder_dim: int, image_embedding_size: int) -> RobustMaskDecoder:
        """A robust decoder whose SAM parts are copies of ``decoder``'s; the robust modules are new.

        The result decodes exactly like ``decoder`` in clear mode.
        """
        robust = cls(
            transformer_dim=decoder.transformer_dim,
            transformer=copy.deepcopy(decoder.transformer),
            encoder_dim=encoder_dim,
            image_embedding_size=image_embedding_size,
            num_multimask_outputs=decoder.num_multimask_outputs,
            iou_head_depth=decoder.iou_prediction_head.num_layers,
            iou_head_hidden_dim=decoder.iou_prediction_head.layers[0].out_features,
        )
        robust.load_state_dict({**robust.state_dict(), **decoder.state_dict()}, strict=True)
        return robust

    def robust_state_keys(self) -> list[str]:
        """Decoder-relative state-dict keys of the RobustSAM modules (89 for the SAM layout)."""
        return [k for k in self.state_dict() if k.split(".", 1)[0] in ROBUST_DECODER_MODULES]

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        encoder_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        robust: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits and IoU predictions, like SAM's decoder.

        Args:
            image_embeddings: ``[1, transformer_dim, g, g]`` for one image.
            image_pe: dense positional encoding ``[1, transformer_dim, g, g]``.
            sparse_prompt_embeddings: ``[N, k, transformer_dim]`` (``N`` = 1 in robust mode).
            dense_prompt_embeddings: ``[N, transformer_dim, g, g]``.
            multimask_output: three masks instead of one.
            encoder_features: output of the image encoder's first global-attention block,
                ``[1, g, g, encoder_dim]`` (BHWC), or a sequence whose first item is that map (RobustSAM's
                convention). Required in robust mode, ignored in clear mode.
            robust: RobustSAM's robust path; ``False`` runs plain SAM decoding.

        Returns:
            ``(masks [N, C, 4g, 4g], iou_pred [N, C])``.

        Raises:
            ValueError: in robust mode, for several prompts or images, or missing/mis-shaped features.
        """
        if not robust:
            return super().forward(
                image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output
            )
        out = self.predict_with_robust_outputs(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            multimask_output,
            encoder_features,
            robust=True,
        )
        return out.masks, out.iou_pred

    def predict_with_robust_outputs(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        encoder_features: torch.Tensor | Sequence[torch.Tensor] | None,
        robust: bool = True,
    ) -> RobustDecoderOutput:
        """Masks plus the features RobustSAM's consistency losses compare.

        Run it with ``robust=False`` on the clean image and ``robust=True`` on its degraded copy, then
        tie ``robust_embeddings`` and ``robust_token`` of the two with MSE losses. Unlike
        :meth:`forward`'s clear mode, this always runs the AMFG heads (so ``encoder_features`` is needed
        in both modes); the masks are the same.

        Args: see :meth:`forward`.

        Returns:
            A :class:`RobustDecoderOutput`.
        """
        self._check_batch(image_embeddings, sparse_prompt_embeddings, robust)
        early = self._early_feature_map(encoder_features, image_embeddings)
        image_features = self.fourier_first_layer_features(early, robust) + self.fourier_last_layer_features(
            image_embeddings, robust
        )
        masks, iou_pred, robust_embeddings, robust_token = self._decode_all(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, image_features, robust
        )
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return RobustDecoderOutput(masks[:, chosen], iou_pred[:, chosen], robust_embeddings, robust_token)

    def _check_batch(self, image_embeddings: torch.Tensor, sparse: torch.Tensor, robust: bool) -> None:
        if image_embeddings.shape[0] != 1:
            raise ValueError(
                f"the decoder takes one image per call (got {image_embeddings.shape[0]} image embeddings); "
                "decode images one at a time"
            )
        if robust and sparse.shape[0] != 1:
            raise ValueError(
                f"RobustSAM's robust mode decodes one prompt per call, got {sparse.shape[0]} prompts: "
                "call the decoder once per prompt, or use robust=False (plain SAM) for batched prompts"
            )

    def _early_feature_map(
        self, encoder_features: torch.Tensor | Sequence[torch.Tensor] | None, image_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """Validate the early encoder features and return them channels-first ``[1, C, g, g]``."""
        if encoder_features is None:
            raise ValueError(
                "the robust decoder needs encoder_features: the output of the image encoder's first "
                "global-attention block, [1, g, g, encoder_dim] (see medcore_monai.networks.fusion)"
            )
        # RobustSAM passes the list of global-block outputs (or a stacked tensor) and uses the first.
        if torch.is_tensor(encoder_features) and encoder_features.ndim == 4:
            early = encoder_features
        else:
            early = encoder_features[0]
        grid = self.image_embedding_size
        if tuple(image_embeddings.shape[-2:]) != (grid, grid):
            raise ValueError(
                f"image embeddings must be {grid}x{grid} for this decoder, got {tuple(image_embeddings.shape)}"
            )
        expected = (image_embeddings.shape[0], grid, grid, self.encoder_dim)
        if tuple(early.shape) != expected:
            raise ValueError(f"encoder_features must be BHWC {expected}, got {tuple(early.shape)}")
        return early.permute(0, 3, 1, 2)

    def _decode_all(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        image_features: torch.Tensor,
        robust: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All mask channels, all IoU predictions, robust mask features and mask-token outputs."""
        mask_token_table = self.custom_robust_token.weight if robust else self.mask_tokens.weight
        prompts = sparse.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, mask_token_table], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(prompts, -1, -1), sparse], dim=1)
        src = torch.repeat_interleave(image_embeddings, prompts, dim=0) + dense
        pos = torch.repeat_interleave(image_pe, prompts, dim=0)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        # Image-level AMFG features are shared by every prompt of the image (broadcast over N).
        robust_embeddings = self.fourier_mask_features(upscaled, robust) + image_features
        if robust:
            hyper = self._robust_hypernetwork(mask_tokens_out)
            surface = robust_embeddings
        else:
            hyper = torch.stack(
                [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
            )
            surface = upscaled
        n, ch, sh, sw = surface.shape
        masks = (hyper @ surface.reshape(n, ch, sh * sw)).reshape(n, -1, sh, sw)
        return masks, self.iou_prediction_head(iou_token_out), robust_embeddings, mask_tokens_out

    def _robust_hypernetwork(self, mask_tokens_out: torch.Tensor) -> torch.Tensor:
        """``[1, num_mask_tokens, C]`` mask weights from the ROT outputs via AOTG and ``robust_mlp``.

        Output channel ``t`` uses AOTG sub-token 0 of mask token ``t`` (see the module docstring).
        """
        weights = [
            self.robust_mlp(self.custom_token_block(mask_tokens_out[:, t, :]))[0] for t in range(self.num_mask_tokens)
        ]
        return torch.stack(weights).unsqueeze(0)
