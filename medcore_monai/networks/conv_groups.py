"""Convolutional prunable groups: the hidden channels of LiteMedSAM's stage-0 MBConv blocks.

An MBConv block is ``conv1`` (1x1 expand, ``Conv2dBN``), a depthwise 3x3 ``conv2`` (``Conv2dBN``) and ``conv3``
(1x1 project back to the residual width). Hidden channel ``n`` owns row ``n`` of ``conv1.c.weight``, entry ``n``
of ``conv1.bn`` (weight, bias, running statistics), filter ``n`` of the depthwise ``conv2.c.weight``, entry ``n``
of ``conv2.bn`` and column ``n`` of ``conv3.c.weight``: ``2 * dim + 9 + 4`` parameters (141 at LiteMedSAM's width
64). Nothing else reads the channel, so removing it is exact: the block computes what it computes with that
channel's input to ``conv3`` set to zero.

SAM's ViT has no such blocks: every function here sees an empty list there, so the ViT path is unchanged. An
encoder exposes its blocks through a ``conv_blocks()`` method (:meth:`.tiny_vit.TinyViTEncoder.conv_blocks`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ConvBlockStructure",
    "conv_blocks",
    "conv_group_sums",
    "conv_kept_indices",
    "no_mbconv_blocks_message",
    "conv_structure",
    "slim_conv_block_",
]


@dataclass(frozen=True)
class ConvBlockStructure:
    """Widths of one MBConv block and where its tensors live."""

    index: int
    path: str  # module path inside the encoder (``layers.0.blocks.1``)
    dim: int  # residual width (in and out)
    hidden_dim: int  # current hidden width (the prunable channels)

    @property
    def module_path(self) -> str:
        """The block's module path inside the encoder."""
        return self.path

    @property
    def params_per_channel(self) -> int:
        """conv1 row + its BN pair + the depthwise 3x3 filter + its BN pair + conv3 column (141 at width 64)."""
        return 2 * self.dim + 9 + 4

    def param_slices(self, prefix: str = "") -> dict[str, tuple[str, int]]:
        """Name of each tensor a hidden channel owns a slice of, with the dimension it is sliced along."""
        p = f"{prefix}{self.path}."
        return {
            "conv1.c.weight": (p + "conv1.c.weight", 0),
            "conv1.bn.weight": (p + "conv1.bn.weight", 0),
            "conv1.bn.bias": (p + "conv1.bn.bias", 0),
            "conv2.c.weight": (p + "conv2.c.weight", 0),
            "conv2.bn.weight": (p + "conv2.bn.weight", 0),
            "conv2.bn.bias": (p + "conv2.bn.bias", 0),
            "conv3.c.weight": (p + "conv3.c.weight", 1),
        }


def conv_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's MBConv blocks (``[]`` for SAM's ViT)."""
    return list(encoder.conv_blocks()) if hasattr(encoder, "conv_blocks") else []


def no_mbconv_blocks_message(mbconv_sparsity: float) -> str:
    """The one sentence for ``mbconv_sparsity`` asked of an encoder without MBConv blocks."""
    return (
        f"mbconv_sparsity {mbconv_sparsity} asks to prune MBConv hidden channels, but this encoder has no MBConv "
        "blocks (only LiteMedSAM's TinyViT has them): set mbconv_sparsity to 0"
    )


def conv_structure(encoder: nn.Module) -> list[ConvBlockStructure]:
    """Describe every MBConv block of a (dense or compact) encoder."""
    names = {id(module): name for name, module in encoder.named_modules()}
    return [
        ConvBlockStructure(i, names[id(blk)], dim=blk.conv1.c.in_channels, hidden_dim=blk.conv1.c.out_channels)
        for i, blk in enumerate(conv_blocks(encoder))
    ]


def conv_group_sums(
    values: Mapping[str, torch.Tensor], structure: Sequence[ConvBlockStructure], prefix: str = ""
) -> list[torch.Tensor]:
    """Sum a per-parameter map (Fisher x theta^2, |theta|, ...) over each hidden channel; ``[hidden]`` per block.

    Tensors absent from ``values`` (a map without the BN entries, say) contribute nothing.
    """
    out = []
    for blk in structure:
        total = None
        for name, dim in blk.param_slices(prefix).values():
            if name not in values:
                continue
            tensor = values[name]
            other = [d for d in range(tensor.ndim) if d != dim]
            part = tensor.sum(dim=other) if other else tensor
            total = part if total is None else total + part.to(total.device)
        if total is None:
            raise KeyError(f"no tensor of MBConv block {blk.path!r} in the map")
        out.append(total)
    return out


def conv_kept_indices(block: nn.Module) -> list[int]:
    """Original (dense) indices of the hidden channels a possibly slimmed MBConv block still holds."""
    return list(getattr(block, "medcore_kept_channels", None) or range(block.conv1.c.out_channels))


def _sliced_conv_bn(layer: nn.Sequential, out_index: torch.Tensor | None, in_index: torch.Tensor | None) -> None:
    """Slice a ``Conv2dBN`` in place: output channels (and the BN) by ``out_index``, input channels by ``in_index``."""
    conv, bn = layer.c, layer.bn
    weight = conv.weight.detach()
    depthwise = conv.groups > 1
    if out_index is not None:
        weight = weight.index_select(0, out_index.to(weight.device))
    if in_index is not None and not depthwise:
        weight = weight.index_select(1, in_index.to(weight.device))
    out_chans = weight.shape[0]
    in_chans = out_chans if depthwise else weight.shape[1]
    new = nn.Conv2d(
        in_chans,
        out_chans,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        groups=out_chans if depthwise else 1,
        bias=False,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
    new.weight.requires_grad_(conv.weight.requires_grad)
    layer.c = new
    if out_index is not None:
        layer.bn = _sliced_batch_norm(bn, out_index)


def _sliced_batch_norm(bn: nn.BatchNorm2d, index: torch.Tensor) -> nn.BatchNorm2d:
    index = index.to(bn.weight.device)
    new = nn.BatchNorm2d(len(index), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new = new.to(device=bn.weight.device, dtype=bn.weight.dtype)
    with torch.no_grad():
        for name in ("weight", "bias"):
            getattr(new, name).copy_(getattr(bn, name).detach().index_select(0, index))
            getattr(new, name).requires_grad_(getattr(bn, name).requires_grad)
        for name in ("running_mean", "running_var"):
            getattr(new, name).copy_(getattr(bn, name).index_select(0, index))
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def slim_conv_block_(block: nn.Module, keep: Sequence[int]) -> None:
    """Physically remove hidden channels from one MBConv block, in place.

    Indices refer to the block's *current* channels; the block remembers the original indices it holds
    (``medcore_kept_channels``), so repeated slimming composes.
    """
    width = block.conv1.c.out_channels
    index = sorted({int(i) for i in keep})
    if not index:
        raise ValueError("MBConv hidden channels: at least one channel must be kept")
    if index[0] < 0 or index[-1] >= width:
        raise ValueError(f"MBConv hidden channels: indices must lie in 0..{width - 1}, got {index[0]}..{index[-1]}")
    original = conv_kept_indices(block)
    kept = torch.tensor(index, dtype=torch.long)
    _sliced_conv_bn(block.conv1, out_index=kept, in_index=None)
    _sliced_conv_bn(block.conv2, out_index=kept, in_index=None)
    _sliced_conv_bn(block.conv3, out_index=None, in_index=kept)
    block.medcore_kept_channels = [original[i] for i in index]
