"""Prunable structure of a SAM image encoder: head and MLP-channel groups, counts, FLOPs, masks, slimming.

Group definitions (``d`` = head_dim, ``E`` = embed dim). SAM's ViT (every size):

* head ``h`` of a block owns rows ``h*d .. h*d+d-1`` of each of the Q, K and V thirds of ``attn.qkv``
  (weight and bias) and columns ``h*d .. h*d+d-1`` of ``attn.proj.weight``;
* MLP channel ``n`` owns row ``n`` of ``mlp.lin1`` (weight and bias) and column ``n`` of ``mlp.lin2.weight``.

LiteMedSAM's TinyViT (:mod:`.tiny_vit`; its attention blocks; stage 0's MBConv hidden channels are the
convolutional groups of :mod:`.conv_groups`, which :class:`StructuredMasks` carries as ``convs``):

* head ``h`` owns the contiguous rows ``h*3d .. (h+1)*3d-1`` of ``attn.qkv`` (``q_h | k_h | v_h``), columns
  ``h*d .. h*d+d-1`` of ``attn.proj.weight`` and row ``h`` of ``attn.attention_biases``;
* MLP channel ``n`` owns row ``n`` of ``mlp.fc1`` (weight and bias) and column ``n`` of ``mlp.fc2.weight``.

Shared tensors (``proj.bias``, ``lin2.bias``, rel-pos tables, norms) belong to no group and are never
pruned. Removing whole heads keeps head_dim, the attention scale and the rel-pos tables valid, because
segment-anything's attention infers head_dim from the qkv width and applies the shared (2S-1, d) tables
per head.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .conv_groups import conv_blocks, conv_structure, slim_conv_block_

__all__ = [
    "BlockStructure",
    "mlp_layers",
    "prunable_blocks",
    "encoder_structure",
    "head_group_sums",
    "mlp_group_sums",
    "group_sums",
    "count_parameters",
    "measure_flops",
    "encoder_flops",
    "block_flops",
    "StructuredMasks",
    "attach_masks",
    "slim_block_",
    "slim_encoder_",
    "kept_indices",
    "head_qkv_rows",
]


@dataclass(frozen=True)
class BlockStructure:
    """Widths of one encoder block and the parameter cost of each prunable group."""

    index: int
    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    window_size: int
    has_qkv_bias: bool
    path: str = ""  # module path inside the encoder; "" means SAM's ``blocks.{index}``
    qkv_layout: str = "thirds"  # "thirds" (SAM: q, k, v thirds) or "per_head" (TinyViT: q_h | k_h | v_h rows)
    mlp_names: tuple[str, str] = ("lin1", "lin2")
    bias_offsets: int = 0  # columns of a per-head learned attention bias (TinyViT), 0 for none

    @property
    def is_global(self) -> bool:
        """Global (not windowed) attention."""
        return self.window_size == 0

    @property
    def params_per_head(self) -> int:
        """Q/K/V rows (+bias), proj columns and attention-bias row of one head: 196,800 for ViT-B."""
        qkv = 3 * self.head_dim * (self.embed_dim + int(self.has_qkv_bias))
        return qkv + self.embed_dim * self.head_dim + self.bias_offsets

    @property
    def params_per_channel(self) -> int:
        """lin1 row + bias + lin2 column of one MLP channel: 1,537 for ViT-B."""
        return 2 * self.embed_dim + 1

    @property
    def module_path(self) -> str:
        """The block's module path inside the encoder (``blocks.3``, ``layers.1.blocks.0``)."""
        return self.path or f"blocks.{self.index}"

    def param_slices(self, prefix: str = "") -> dict[str, str]:
        """Names of the tensors that hold this block's groups (for documentation and scoring).

        ``attention_biases`` names the per-head bias table; only TinyViT blocks have that tensor.
        """
        p = f"{prefix}{self.module_path}."
        mlp_in, mlp_out = self.mlp_names
        return {
            "qkv.weight": p + "attn.qkv.weight",
            "qkv.bias": p + "attn.qkv.bias",
            "proj.weight": p + "attn.proj.weight",
            "attention_biases": p + "attn.attention_biases",
            "lin1.weight": p + f"mlp.{mlp_in}.weight",
            "lin1.bias": p + f"mlp.{mlp_in}.bias",
            "lin2.weight": p + f"mlp.{mlp_out}.weight",
        }


def prunable_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The blocks that hold heads and MLP channels: a ViT's ``blocks``, a TinyViT's attention blocks."""
    if hasattr(encoder, "prunable_blocks"):
        return list(encoder.prunable_blocks())
    blocks = getattr(encoder, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(encoder).__name__} has no `blocks`; expected a SAM or TinyViT image encoder")
    return list(blocks)


def _mlp_names(block: nn.Module) -> tuple[str, str]:
    return ("lin1", "lin2") if hasattr(block.mlp, "lin1") else ("fc1", "fc2")


def mlp_layers(block: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The MLP's input and output layers (SAM: ``lin1``/``lin2``; TinyViT: ``fc1``/``fc2``)."""
    first, second = _mlp_names(block)
    return getattr(block.mlp, first), getattr(block.mlp, second)


def _qkv_layout(block: nn.Module) -> str:
    return getattr(block.attn, "qkv_layout", "thirds")


def _block_paths(encoder: nn.Module, blocks: Sequence[nn.Module]) -> list[str]:
    names = {id(module): name for name, module in encoder.named_modules()}
    return [names[id(block)] for block in blocks]


def head_qkv_rows(heads: torch.Tensor, head_dim: int, layout: str, total_heads: int) -> torch.Tensor:
    """Rows of ``attn.qkv`` that the given heads own, in head order.

    Args:
        heads: head indices.
        head_dim: width of one head.
        layout: ``thirds`` (SAM: q, k, v are thirds of the rows) or ``per_head`` (TinyViT: ``q_h | k_h | v_h``).
        total_heads: heads of the qkv layer the rows index (needed for ``thirds``).
    """
    if layout == "per_head":
        return (heads[:, None] * 3 * head_dim + torch.arange(3 * head_dim)).flatten()
    cols = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
    width = total_heads * head_dim
    return torch.cat([cols, cols + width, cols + 2 * width])


def encoder_structure(encoder: nn.Module) -> list[BlockStructure]:
    """Describe every prunable block of a (dense or compact) SAM or TinyViT image encoder."""
    out = []
    blocks = prunable_blocks(encoder)
    paths = _block_paths(encoder, blocks)
    for i, blk in enumerate(blocks):
        attn = blk.attn
        heads = attn.num_heads
        biases = getattr(attn, "attention_biases", None)
        out.append(
            BlockStructure(
                index=i,
                embed_dim=attn.qkv.in_features,
                num_heads=heads,
                head_dim=attn.qkv.out_features // (3 * heads),
                mlp_dim=mlp_layers(blk)[0].out_features,
                window_size=blk.window_size,
                has_qkv_bias=attn.qkv.bias is not None,
                path="" if paths[i] == f"blocks.{i}" else paths[i],
                qkv_layout=_qkv_layout(blk),
                mlp_names=_mlp_names(blk),
                bias_offsets=0 if biases is None else int(biases.shape[1]),
            )
        )
    return out


def head_group_sums(
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    num_heads: int,
    layout: str = "thirds",
    attention_biases: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum per-parameter values (e.g. Fisher x theta^2) over each head's group; returns ``[num_heads]``.

    Args:
        qkv_weight: values shaped like ``attn.qkv.weight``.
        qkv_bias: values shaped like ``attn.qkv.bias``, or ``None``.
        proj_weight: values shaped like ``attn.proj.weight``.
        num_heads: heads of the block.
        layout: ``thirds`` (SAM: q, k, v are thirds of the qkv rows) or ``per_head`` (TinyViT: each head's
            ``q | k | v`` rows are contiguous).
        attention_biases: the per-head bias table ``[heads, offsets]`` (TinyViT), added to its head.
    """
    embed = qkv_weight.shape[1]
    if layout == "per_head":
        per_head = qkv_weight.reshape(num_heads, -1).sum(dim=1)
        if qkv_bias is not None:
            per_head = per_head + qkv_bias.reshape(num_heads, -1).sum(dim=1)
    else:
        per_head = qkv_weight.reshape(3, num_heads, -1, embed).sum(dim=(0, 2, 3))
        if qkv_bias is not None:
            per_head = per_head + qkv_bias.reshape(3, num_heads, -1).sum(dim=(0, 2))
    if attention_biases is not None:
        per_head = per_head + attention_biases.sum(dim=1)
    return per_head + proj_weight.reshape(proj_weight.shape[0], num_heads, -1).sum(dim=(0, 2))


def mlp_group_sums(
    lin1_weight: torch.Tensor, lin1_bias: torch.Tensor | None, lin2_weight: torch.Tensor
) -> torch.Tensor:
    """Sum per-parameter values over each MLP channel's group; returns ``[mlp_dim]``."""
    per_channel = lin1_weight.sum(dim=1) + lin2_weight.sum(dim=0)
    if lin1_bias is not None:
        per_channel = per_channel + lin1_bias
    return per_channel


def group_sums(
    values: Mapping[str, torch.Tensor], structure: Sequence[BlockStructure], prefix: str = ""
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-block head sums and MLP-channel sums of a per-parameter map keyed like the encoder state dict.

    Args:
        values: tensors shaped like the encoder parameters (``blocks.{i}.attn.qkv.weight`` ...).
        structure: from :func:`encoder_structure`.
        prefix: key prefix in ``values`` (e.g. ``"image_encoder."``).
    """
    heads, channels = [], []
    for blk in structure:
        names = blk.param_slices(prefix)
        heads.append(
            head_group_sums(
                values[names["qkv.weight"]],
                values.get(names["qkv.bias"]),
                values[names["proj.weight"]],
                blk.num_heads,
                layout=blk.qkv_layout,
                attention_biases=values.get(names["attention_biases"]),
            )
        )
        channels.append(
            mlp_group_sums(values[names["lin1.weight"]], values.get(names["lin1.bias"]), values[names["lin2.weight"]])
        )
    return heads, channels


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements."""
    return sum(p.numel() for p in module.parameters())


def measure_flops(module: nn.Module, *inputs: torch.Tensor) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward, measured by ``torch.utils.flop_counter`` on the meta device.

    The module is deep-copied to ``meta`` so no real compute or memory is spent (ViT-B at 1024 px
    costs nothing). Returns the total and a per-submodule breakdown keyed by qualified name.
    """
    meta_module = copy.deepcopy(module).to("meta").requires_grad_(False)
    meta_inputs = [x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta_module(*meta_inputs)
    per_module = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return int(counter.get_total_flops()), per_module


def _input_channels(encoder: nn.Module) -> int:
    return int(getattr(encoder, "in_chans", 0) or encoder.patch_embed.proj.in_channels)


def encoder_flops(encoder: nn.Module, batch_size: int = 1) -> int:
    """Measured FLOPs of the image encoder at its native input size."""
    size = encoder.img_size
    total, _ = measure_flops(encoder, torch.zeros(batch_size, _input_channels(encoder), size, size))
    return total


def block_flops(encoder: nn.Module) -> list[int]:
    """Measured FLOPs of each prunable block at the native input size (batch 1)."""
    size = encoder.img_size
    _, per_module = measure_flops(encoder, torch.zeros(1, _input_channels(encoder), size, size))
    top = type(encoder).__name__  # FlopCounterMode names the root module by its class
    return [per_module.get(f"{top}.{path}", 0) for path in _block_paths(encoder, prunable_blocks(encoder))]


@dataclass
class StructuredMasks:
    """Keep-masks (1 keep, 0 removed) of the encoder's prunable groups.

    Per block for heads and MLP channels; per MBConv block for its hidden channels (``convs``: empty for SAM's ViT,
    and for callers that leave the MBConv stage alone).
    """

    heads: list[torch.Tensor]
    channels: list[torch.Tensor]
    convs: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def full(cls, structure: Sequence[BlockStructure], conv_widths: Sequence[int] = ()) -> StructuredMasks:
        """Masks that keep everything (``conv_widths``: hidden widths of the MBConv blocks to cover)."""
        return cls(
            heads=[torch.ones(b.num_heads, dtype=torch.bool) for b in structure],
            channels=[torch.ones(b.mlp_dim, dtype=torch.bool) for b in structure],
            convs=[torch.ones(int(w), dtype=torch.bool) for w in conv_widths],
        )

    @classmethod
    def for_encoder(cls, encoder: nn.Module) -> StructuredMasks:
        """Masks that keep every head, MLP channel and MBConv hidden channel of ``encoder`` as it is now."""
        return cls.full(encoder_structure(encoder), [b.hidden_dim for b in conv_structure(encoder)])

    def kept_heads(self) -> list[list[int]]:
        """Indices of kept heads per block."""
        return [torch.nonzero(m).flatten().tolist() for m in self.heads]

    def kept_channels(self) -> list[list[int]]:
        """Indices of kept MLP channels per block."""
        return [torch.nonzero(m).flatten().tolist() for m in self.channels]

    def kept_convs(self) -> list[list[int]]:
        """Indices of kept MBConv hidden channels per MBConv block."""
        return [torch.nonzero(m).flatten().tolist() for m in self.convs]

    def intersect(self, other: StructuredMasks) -> StructuredMasks:
        """Groups kept by both (removed groups never return; a side without conv masks keeps every channel)."""
        if self.convs and other.convs:
            convs = [a & b for a, b in zip(self.convs, other.convs)]
        else:
            convs = list(self.convs or other.convs)
        return StructuredMasks(
            heads=[a & b for a, b in zip(self.heads, other.heads)],
            channels=[a & b for a, b in zip(self.channels, other.channels)],
            convs=convs,
        )


class _MaskHandles:
    """Removable set of forward pre-hooks (``remove()`` detaches them all)."""

    def __init__(self, handles: list) -> None:
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> _MaskHandles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _channel_multiplier(mask: torch.Tensor, trailing_dims: int = 0):
    """A forward pre-hook multiplying the input's channels by ``mask``.

    The channels are the last dimension (tokens), or the one before ``trailing_dims`` spatial dimensions
    (``[B, C, H, W]`` maps: 2).
    """
    mask = mask.detach().clone().reshape(-1, *([1] * trailing_dims))

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        return (x * mask.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])

    return hook


def attach_masks(encoder: nn.Module, masks: StructuredMasks) -> _MaskHandles:
    """Zero the outputs of removed heads and MLP channels with forward pre-hooks on proj / lin2.

    Acting on activations means removed groups contribute exactly nothing and get zero gradient, so
    the dense masked model computes what the slimmed model computes. MBConv hidden-channel masks (``convs``)
    act the same way on the input of each block's ``conv3``.
    """
    handles = []
    for blk, conv_mask in zip(conv_blocks(encoder), masks.convs):
        handles.append(blk.conv3.register_forward_pre_hook(_channel_multiplier(conv_mask, trailing_dims=2)))
    for blk, head_mask, channel_mask in zip(prunable_blocks(encoder), masks.heads, masks.channels):
        head_dim = blk.attn.qkv.out_features // (3 * blk.attn.num_heads)
        proj_mask = head_mask.repeat_interleave(head_dim)
        handles.append(blk.attn.proj.register_forward_pre_hook(_channel_multiplier(proj_mask)))
        handles.append(mlp_layers(blk)[1].register_forward_pre_hook(_channel_multiplier(channel_mask)))
    return _MaskHandles(handles)


def _validated_indices(indices: Sequence[int], width: int, what: str) -> torch.Tensor:
    idx = sorted({int(i) for i in indices})
    if not idx:
        raise ValueError(f"{what}: at least one group must be kept")
    if idx[0] < 0 or idx[-1] >= width:
        raise ValueError(f"{what}: indices must lie in 0..{width - 1}, got {idx[0]}..{idx[-1]}")
    return torch.tensor(idx, dtype=torch.long)


def _sliced_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = layer.weight.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        bias = None if bias is None else bias.index_select(0, rows.to(weight.device))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(layer.weight.requires_grad)
    if bias is not None:
        new.bias.requires_grad_(layer.bias.requires_grad)
    return new


def kept_indices(block: nn.Module) -> tuple[list[int], list[int]]:
    """Original (dense) indices of the heads and channels a possibly slimmed block still holds."""
    heads = getattr(block, "medcore_kept_heads", None) or list(range(block.attn.num_heads))
    channels = getattr(block, "medcore_kept_channels", None) or list(range(mlp_layers(block)[0].out_features))
    return list(heads), list(channels)


def slim_block_(block: nn.Module, keep_heads: Sequence[int] | None, keep_channels: Sequence[int] | None) -> None:
    """Physically remove heads / MLP channels from one block, in place.

    Indices refer to the block's *current* heads and channels. The block remembers the original
    indices it holds (``medcore_kept_heads`` / ``medcore_kept_channels``) so repeated slimming composes.
    """
    attn, mlp = block.attn, block.mlp
    orig_heads, orig_channels = kept_indices(block)
    if keep_heads is not None:
        heads = _validated_indices(keep_heads, attn.num_heads, "heads")
        head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        cols = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
        rows = head_qkv_rows(heads, head_dim, _qkv_layout(block), attn.num_heads)
        # scale stays head_dim**-0.5 (head_dim is unchanged), so the attribute is left as it is.
        attn.qkv = _sliced_linear(attn.qkv, rows=rows)
        attn.proj = _sliced_linear(attn.proj, cols=cols)
        if getattr(attn, "attention_biases", None) is not None:
            kept = attn.attention_biases.detach().index_select(0, heads.to(attn.attention_biases.device))
            attn.attention_biases = nn.Parameter(kept.clone(), requires_grad=attn.attention_biases.requires_grad)
        attn.num_heads = len(heads)
        block.medcore_kept_heads = [orig_heads[i] for i in heads.tolist()]
    if keep_channels is not None:
        first, second = _mlp_names(block)
        channels = _validated_indices(keep_channels, getattr(mlp, first).out_features, "MLP channels")
        setattr(mlp, first, _sliced_linear(getattr(mlp, first), rows=channels))
        setattr(mlp, second, _sliced_linear(getattr(mlp, second), cols=channels))
        block.medcore_kept_channels = [orig_channels[i] for i in channels.tolist()]


def slim_encoder_(encoder: nn.Module, masks: StructuredMasks) -> nn.Module:
    """Physically remove every group that ``masks`` marks as removed (indices relative to the current widths).

    MBConv blocks are slimmed only when ``masks.convs`` covers them.
    """
    for blk, heads, channels in zip(prunable_blocks(encoder), masks.kept_heads(), masks.kept_channels()):
        slim_block_(blk, heads, channels)
    for blk, kept in zip(conv_blocks(encoder), masks.kept_convs()):
        slim_conv_block_(blk, kept)
    return encoder
