"""TinyViT image encoder of LiteMedSAM (MobileSAM's TinyViT-5M with a stride-1 patch embedding), written here.

No timm and no torchvision: the modules below reproduce the computation of the TinyViT code that LiteMedSAM ships,
with the same parameter and buffer names, so ``lite_medsam.pth`` loads strictly into a segment-anything ``Sam``
whose ``image_encoder`` is a :class:`TinyViTEncoder`.

Layout (LiteMedSAM at 256 px): a patch embedding of two 1x1 ``Conv2dBN`` (3 -> 32 -> 64), stage 0 of two MBConv
blocks on a 256x256 map, then three stages of :class:`TinyViTBlock` (2 x 128 wide / 4 heads, 6 x 160 / 5 heads,
2 x 320 / 10 heads) on 128x128, 64x64 and 64x64 token grids, a :class:`PatchMerging` between stages, and SAM's neck
(320 -> 256). Every attention head is 32 wide.

Differences from SAM's ViT that matter for pruning (see :mod:`.structure`):

* ``attn.qkv`` is ``Linear(dim, 3 * dim)`` viewed as ``(heads, 3 * head_dim)``: head ``h`` owns the contiguous rows
  ``[h * 3d, (h + 1) * 3d)`` = ``q_h | k_h | v_h`` (SAM's q, k and v are thirds of the output);
* each attention block has a learned bias per head and window offset (``attention_biases [heads, offsets]``),
  gathered into ``[heads, ws^2, ws^2]`` at every forward, so removing heads needs no cache to be rebuilt;
* blocks have no norms of their own (the attention and the MLP each start with a LayerNorm), and a depthwise 3x3
  ``local_conv`` acts on the residual stream between attention and MLP.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .sam_import import sam_modeling

__all__ = [
    "Conv2dBN",
    "MBConv",
    "PatchMerging",
    "TinyViTAttention",
    "TinyViTBlock",
    "TinyViTEncoder",
    "TinyViTMlp",
]


class Conv2dBN(nn.Sequential):
    """A bias-free ``Conv2d`` (``c``) followed by ``BatchNorm2d`` (``bn``)."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chans, out_chans, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_chans))


class PatchEmbed(nn.Module):
    """Two ``Conv2dBN`` with a GELU between them (1x1 stride 1 in LiteMedSAM: the map keeps the input size)."""

    def __init__(self, in_chans: int, embed_dim: int, kernel: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, kernel, stride),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, kernel, stride),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, embed_dim, H / stride^2, W / stride^2]``."""
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise 3x3, 1x1 project, residual, GELU.

    ``hidden`` (default ``dim * expand_ratio``) is narrower in a compact encoder whose hidden channels were pruned.
    """

    def __init__(self, dim: int, expand_ratio: float, hidden: int | None = None) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio) if hidden is None else int(hidden)
        self.conv1 = Conv2dBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, dim)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same shape in and out (``[B, dim, H, W]``)."""
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1x1 conv, depthwise 3x3 conv with ``stride``, 1x1 conv; returns tokens ``[B, L, out_dim]``."""

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.input_resolution = resolution
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, H * W, dim]`` or a map ``[B, dim, H, W]`` in, tokens out."""
        if x.ndim == 3:
            height, width = self.input_resolution
            x = x.view(x.shape[0], height, width, -1).permute(0, 3, 1, 2)
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


class Stage(nn.Module):
    """A stage: its blocks (MBConv on a map, or :class:`TinyViTBlock` on tokens), then an optional merge."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks in order, then the merge (which returns tokens)."""
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


def _window_offsets(window: int) -> tuple[int, torch.Tensor]:
    """Number of distinct ``(|dy|, |dx|)`` offsets in a window and the ``[ws^2, ws^2]`` index of each pair."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    indices = []
    for p1 in points:
        for p2 in points:
            offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            indices.append(offsets.setdefault(offset, len(offsets)))
    return len(offsets), torch.tensor(indices, dtype=torch.long).view(len(points), len(points))


class TinyViTAttention(nn.Module):
    """Multi-head attention inside a window, with a learned bias per head and window offset.

    ``qkv`` rows are grouped per head (``q_h | k_h | v_h``, see the module docstring); ``num_heads`` may shrink
    when heads are pruned, the head width ``key_dim`` never does.
    """

    qkv_layout = "per_head"

    def __init__(self, dim: int, num_heads: int, key_dim: int, window: int) -> None:
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.scale = key_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * num_heads * key_dim)
        self.proj = nn.Linear(num_heads * key_dim, dim)
        count, index = _window_offsets(window)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, count))
        self.register_buffer("attention_bias_idxs", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B_windows, ws^2, dim] -> [B_windows, ws^2, dim]``."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, tokens, self.num_heads, 3 * self.key_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.key_dim, dim=3)
        bias = self.attention_biases[:, self.attention_bias_idxs]
        attn = (q @ k.transpose(-2, -1) * self.scale + bias).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, self.num_heads * self.key_dim)
        return self.proj(out)


class TinyViTMlp(nn.Module):
    """LayerNorm, ``fc1``, GELU, ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same shape in and out."""
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (zero-padded windows), depthwise ``local_conv``, MLP; residuals around attention and MLP."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        num_heads: int,
        head_dim: int,
        window: int,
        mlp_dim: int,
        local_conv: int = 3,
    ) -> None:
        super().__init__()
        self.input_resolution, self.window_size = resolution, window
        self.attn = TinyViTAttention(dim, num_heads, head_dim, window)
        self.local_conv = Conv2dBN(dim, dim, local_conv, groups=dim)
        self.mlp = TinyViTMlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, H * W, dim]`` in and out."""
        height, width = self.input_resolution
        batch, length, channels = x.shape
        x = x + self._windowed_attention(x.view(batch, height, width, channels)).view(batch, length, channels)
        x = self.local_conv(x.transpose(1, 2).reshape(batch, channels, height, width))
        x = x.view(batch, channels, length).transpose(1, 2)
        return x + self.mlp(x)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        ws = self.window_size
        pad_b, pad_r = (ws - height % ws) % ws, (ws - width % ws) % ws
        if pad_b or pad_r:  # padded tokens are zeros before the attention's LayerNorm, and are not masked
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        rows, cols = (height + pad_b) // ws, (width + pad_r) // ws
        windows = x.view(batch, rows, ws, cols, ws, channels).transpose(2, 3).reshape(-1, ws * ws, channels)
        out = self.attn(windows).view(batch, rows, cols, ws, ws, channels).transpose(2, 3)
        out = out.reshape(batch, rows * ws, cols * ws, channels)
        return out[:, :height, :width].contiguous() if (pad_b or pad_r) else out


class TinyViTEncoder(nn.Module):
    """LiteMedSAM's image encoder: ``[B, 3, S, S] -> [B, out_chans, S / 4, S / 4]`` (``[B, 256, 64, 64]`` at 256 px).

    Args:
        img_size: input side (256 for LiteMedSAM).
        embed_dims: width of stage 0 (MBConv) and of the three attention stages.
        depths: blocks per stage.
        num_heads: dense heads per stage (stage 0 has none).
        window_sizes: attention window per stage.
        mlp_ratio: dense MLP hidden width over the stage width.
        mbconv_expand: MBConv hidden width over the stage-0 width.
        merge_strides: stride of the :class:`PatchMerging` after stages 0, 1 and 2.
        block_heads: heads of each attention block (compact encoders); ``None`` for dense.
        block_mlp_dims: MLP hidden width of each attention block; ``None`` for dense.
        mbconv_hidden_dims: hidden width of each stage-0 MBConv block; ``None`` for dense.
        out_chans: width of the image embedding (SAM's 256).
    """

    def __init__(
        self,
        img_size: int = 256,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand: float = 4.0,
        merge_strides: Sequence[int] = (2, 2, 1),
        block_heads: Sequence[int] | None = None,
        block_mlp_dims: Sequence[int] | None = None,
        mbconv_hidden_dims: Sequence[int] | None = None,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size, self.in_chans = img_size, 3
        self.patch_embed = PatchEmbed(self.in_chans, embed_dims[0])
        side = img_size
        resolutions = [side]
        for stride in merge_strides:
            side //= stride
            resolutions.append(side)
        self.grid_size = resolutions[-1]
        attention_blocks = sum(depths[1:])
        stages = list(zip(embed_dims[1:], num_heads[1:], depths[1:]))
        heads = list(block_heads or [h for _, h, d in stages for _ in range(d)])
        mlps = list(block_mlp_dims or [int(e * mlp_ratio) for e, _, d in stages for _ in range(d)])
        if len(heads) != attention_blocks or len(mlps) != attention_blocks:
            raise ValueError(f"give widths for all {attention_blocks} attention blocks")

        def merge(stage: int) -> PatchMerging | None:
            if stage == len(depths) - 1:
                return None
            size = (resolutions[stage], resolutions[stage])
            return PatchMerging(size, embed_dims[stage], embed_dims[stage + 1], merge_strides[stage])

        hidden = list(mbconv_hidden_dims or [int(embed_dims[0] * mbconv_expand)] * depths[0])
        if len(hidden) != depths[0]:
            raise ValueError(f"give hidden widths for all {depths[0]} MBConv blocks")
        mbconv = [MBConv(embed_dims[0], mbconv_expand, width) for width in hidden]
        self.layers = nn.ModuleList([Stage(mbconv, merge(0))])
        block = 0
        for stage in range(1, len(depths)):
            size = (resolutions[stage], resolutions[stage])
            dim, head_dim = embed_dims[stage], embed_dims[stage] // num_heads[stage]
            blocks = [
                TinyViTBlock(dim, size, heads[i], head_dim, window_sizes[stage], mlps[i])
                for i in range(block, block + depths[stage])
            ]
            block += depths[stage]
            self.layers.append(Stage(blocks, merge(stage)))
        layer_norm_2d = sam_modeling().common.LayerNorm2d  # SAM's neck, same keys as segment-anything's
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            layer_norm_2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            layer_norm_2d(out_chans),
        )

    def prunable_blocks(self) -> list[TinyViTBlock]:
        """The attention blocks, in order (stage 0's MBConv blocks hold no heads or MLP channels)."""
        return [block for layer in self.layers[1:] for block in layer.blocks]

    def conv_blocks(self) -> list[MBConv]:
        """Stage 0's MBConv blocks, whose hidden channels are the encoder's convolutional prunable groups."""
        return list(self.layers[0].blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding ``[B, out_chans, grid, grid]``."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = x.view(x.shape[0], self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        return self.neck(x)
