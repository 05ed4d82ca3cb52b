"""Architecture descriptions of SAM-family models: presets and inference from a state dict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

__all__ = [
    "SAM_PRESETS",
    "ModelConfig",
    "SamConfig",
    "TinyViTConfig",
    "config_from_dict",
    "get_preset",
    "infer_sam_config",
]

PROMPT_EMBED_DIM = 256


class _PerBlockWidths:
    """What both architecture descriptions derive from their dense widths and optional per-block (compact) widths.

    Subclasses provide ``grid_size``, ``dense_heads``, ``dense_mlp_dims`` and the fields ``block_heads`` /
    ``block_mlp_dims`` (``None``: dense).
    """

    block_heads: tuple[int, ...] | None
    block_mlp_dims: tuple[int, ...] | None

    @property
    def low_res_size(self) -> int:
        """Side of the mask decoder's low-resolution logits (4x the embedding grid)."""
        return 4 * self.grid_size

    @property
    def is_compact(self) -> bool:
        """Whether any block is narrower than the dense width."""
        return self.block_heads is not None or self.block_mlp_dims is not None

    def heads_of(self, block: int) -> int:
        """Number of attention heads of (prunable) block ``block``."""
        return self.block_heads[block] if self.block_heads is not None else self.dense_heads[block]

    def mlp_dim_of(self, block: int) -> int:
        """MLP hidden width of (prunable) block ``block``."""
        return self.block_mlp_dims[block] if self.block_mlp_dims is not None else self.dense_mlp_dims[block]

    def dense(self):
        """The same architecture at its dense widths."""
        return replace(self, block_heads=None, block_mlp_dims=None)

    def with_widths(self, heads: Sequence[int], mlp_dims: Sequence[int]):
        """Copy with per-block widths (all-dense collapses to ``None``)."""
        heads_t, mlp_t = tuple(int(h) for h in heads), tuple(int(m) for m in mlp_dims)
        return replace(
            self,
            block_heads=None if heads_t == self.dense_heads else heads_t,
            block_mlp_dims=None if mlp_t == self.dense_mlp_dims else mlp_t,
        )


@dataclass(frozen=True)
class SamConfig(_PerBlockWidths):
    """Everything needed to rebuild a SAM model with segment-anything's classes.

    ``block_heads`` / ``block_mlp_dims`` hold per-block widths of a compact (physically pruned)
    encoder; ``None`` means every block has the dense width.
    """

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    out_chans: int = PROMPT_EMBED_DIM
    name: str = "vit_b"
    block_heads: tuple[int, ...] | None = None
    block_mlp_dims: tuple[int, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} outside 0..{self.depth - 1}")
        for label, widths, dense in (
            ("block_heads", self.block_heads, self.num_heads),
            ("block_mlp_dims", self.block_mlp_dims, self.mlp_dim),
        ):
            if widths is None:
                continue
            if len(widths) != self.depth:
                raise ValueError(f"{label} has {len(widths)} entries for {self.depth} blocks")
            if any(not 1 <= w <= dense for w in widths):
                raise ValueError(f"{label} {list(widths)} must lie in 1..{dense} per block")

    @property
    def head_dim(self) -> int:
        """Width of one attention head (unchanged by pruning)."""
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        """Dense MLP hidden width."""
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def dense_heads(self) -> tuple[int, ...]:
        """Dense heads of each block."""
        return (self.num_heads,) * self.depth

    @property
    def dense_mlp_dims(self) -> tuple[int, ...]:
        """Dense MLP hidden width of each block."""
        return (self.mlp_dim,) * self.depth

    @property
    def grid_size(self) -> int:
        """Token grid side length (image embedding size)."""
        return self.img_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary (round-trips through :meth:`from_dict`)."""
        out = asdict(self)
        out["global_attn_indexes"] = list(self.global_attn_indexes)
        for key in ("block_heads", "block_mlp_dims"):
            out[key] = None if out[key] is None else list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SamConfig keys: {sorted(unknown)}")
        kwargs = dict(data)
        kwargs["global_attn_indexes"] = tuple(kwargs.get("global_attn_indexes", ()))
        for key in ("block_heads", "block_mlp_dims"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


@dataclass(frozen=True)
class TinyViTConfig(_PerBlockWidths):
    """Architecture of a SAM with LiteMedSAM's TinyViT image encoder (:class:`.tiny_vit.TinyViTEncoder`).

    Stage 0 is MBConv; stages 1-3 hold the attention blocks, numbered 0..``depth - 1`` across stages, whose
    ``block_heads`` / ``block_mlp_dims`` record compact (pruned) widths (``None``: dense). ``mbconv_hidden_dims``
    records the hidden widths of the stage-0 MBConv blocks (``None``: dense). ``stage_heads[0]`` is unused.
    """

    img_size: int = 256
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    stage_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand: float = 4.0
    merge_strides: tuple[int, ...] = (2, 2, 1)
    out_chans: int = PROMPT_EMBED_DIM
    name: str = "litemedsam"
    block_heads: tuple[int, ...] | None = None
    block_mlp_dims: tuple[int, ...] | None = None
    mbconv_hidden_dims: tuple[int, ...] | None = None

    family = "tinyvit"

    def __post_init__(self) -> None:
        stages = len(self.depths)
        for label in ("embed_dims", "stage_heads", "window_sizes"):
            if len(getattr(self, label)) != stages:
                raise ValueError(f"{label} needs one entry per stage ({stages})")
        if len(self.merge_strides) != stages - 1:
            raise ValueError(f"merge_strides needs {stages - 1} entries (between stages)")
        for stage in range(1, stages):
            if self.embed_dims[stage] % self.stage_heads[stage]:
                raise ValueError(f"stage {stage}: width {self.embed_dims[stage]} is not divisible by its heads")
        for label, widths, dense in (
            ("block_heads", self.block_heads, self.dense_heads),
            ("block_mlp_dims", self.block_mlp_dims, self.dense_mlp_dims),
        ):
            if widths is None:
                continue
            if len(widths) != self.depth:
                raise ValueError(f"{label} has {len(widths)} entries for {self.depth} attention blocks")
            if any(not 1 <= w <= d for w, d in zip(widths, dense)):
                raise ValueError(f"{label} {list(widths)} must lie in 1..{list(dense)} per block")
        if self.mbconv_hidden_dims is not None:
            dense = self.dense_mbconv_hidden_dims
            if len(self.mbconv_hidden_dims) != len(dense):
                count = len(self.mbconv_hidden_dims)
                raise ValueError(f"mbconv_hidden_dims has {count} entries for {len(dense)} MBConv blocks")
            if any(not 1 <= w <= d for w, d in zip(self.mbconv_hidden_dims, dense)):
                raise ValueError(f"mbconv_hidden_dims {list(self.mbconv_hidden_dims)} must lie in 1..{dense[0]}")

    @property
    def is_compact(self) -> bool:
        """Whether any attention block or MBConv block is narrower than the dense width."""
        return super().is_compact or self.mbconv_hidden_dims is not None

    @property
    def dense_mbconv_hidden_dims(self) -> tuple[int, ...]:
        """Dense hidden width of each stage-0 MBConv block."""
        return (int(self.embed_dims[0] * self.mbconv_expand),) * self.depths[0]

    def mbconv_hidden_of(self, block: int) -> int:
        """Hidden width of MBConv block ``block``."""
        dims = self.mbconv_hidden_dims or self.dense_mbconv_hidden_dims
        return dims[block]

    def dense(self) -> TinyViTConfig:
        """The same architecture at its dense widths (attention blocks and MBConv blocks)."""
        return replace(self, block_heads=None, block_mlp_dims=None, mbconv_hidden_dims=None)

    def with_mbconv_widths(self, hidden: Sequence[int]) -> TinyViTConfig:
        """Copy with MBConv hidden widths (all-dense collapses to ``None``)."""
        widths = tuple(int(w) for w in hidden)
        return replace(self, mbconv_hidden_dims=None if widths == self.dense_mbconv_hidden_dims else widths)

    @property
    def depth(self) -> int:
        """Number of attention blocks (the prunable blocks)."""
        return sum(self.depths[1:])

    @property
    def block_stages(self) -> tuple[int, ...]:
        """Stage of each attention block."""
        return tuple(stage for stage in range(1, len(self.depths)) for _ in range(self.depths[stage]))

    @property
    def dense_heads(self) -> tuple[int, ...]:
        """Dense heads of each attention block."""
        return tuple(self.stage_heads[s] for s in self.block_stages)

    @property
    def dense_mlp_dims(self) -> tuple[int, ...]:
        """Dense MLP hidden width of each attention block."""
        return tuple(int(self.embed_dims[s] * self.mlp_ratio) for s in self.block_stages)

    @property
    def grid_size(self) -> int:
        """Side of the image embedding (64 at 256 px)."""
        side = self.img_size
        for stride in self.merge_strides:
            side //= stride
        return side

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary with ``family: tinyvit`` (round-trips through :func:`config_from_dict`)."""
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        out["family"] = self.family
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TinyViTConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise."""
        kwargs = {k: v for k, v in data.items() if k != "family"}
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown TinyViTConfig keys: {sorted(unknown)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()})


#: Either architecture description.
ModelConfig = SamConfig | TinyViTConfig


def config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """A :class:`SamConfig` or :class:`TinyViTConfig` from its ``to_dict`` form."""
    if data.get("family") == TinyViTConfig.family:
        return TinyViTConfig.from_dict(data)
    return SamConfig.from_dict(data)


SAM_PRESETS: dict[str, ModelConfig] = {
    "vit_b": SamConfig(),
    "vit_l": SamConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23), name="vit_l"),
    "vit_h": SamConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31), name="vit_h"),
    # Same classes as ViT-B, small enough for CPU tests: 256 px, 16x16 tokens, windows of 7 (so the grid
    # is padded to 21 like ViT-B's 64 -> 70), two global blocks, head_dim 64, full-size decoder.
    "tiny": SamConfig(
        img_size=256, embed_dim=192, depth=6, num_heads=3, window_size=7, global_attn_indexes=(2, 5), name="tiny"
    ),
    # LiteMedSAM (MedSAM on laptops): TinyViT-5M with a stride-1 patch embedding, 256 px, 64x64 embedding.
    "litemedsam": TinyViTConfig(),
}


def get_preset(name: str) -> ModelConfig:
    """Return a named architecture (``vit_b``, ``vit_l``, ``vit_h``, ``tiny``, ``litemedsam``)."""
    try:
        return SAM_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model type {name!r}; choose one of {sorted(SAM_PRESETS)}") from None


def _block_indices(state_dict: Mapping[str, torch.Tensor], prefix: str = "image_encoder.blocks.") -> list[int]:
    """Indices of the numbered modules under ``prefix`` (a ViT's blocks, or a TinyViT stage's)."""
    return sorted({int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)})


def infer_sam_config(state_dict: Mapping[str, torch.Tensor], name: str | None = None) -> ModelConfig:
    """Read the architecture off a SAM state dict's tensor shapes.

    Works for the official ViT-B/L/H checkpoints, MedSAM, the tiny preset, LiteMedSAM (TinyViT) and compact
    (pruned) encoders whose blocks have fewer heads or MLP channels.

    Raises:
        ValueError: if the state dict does not look like a SAM image encoder.
    """
    if _TINY_VIT_KEY in state_dict:
        return infer_tiny_vit_config(state_dict, name)
    try:
        patch_w = state_dict["image_encoder.patch_embed.proj.weight"]
        pos = state_dict["image_encoder.pos_embed"]
    except KeyError as err:
        raise ValueError(f"not a SAM state dict: missing {err.args[0]!r}") from None
    blocks = _block_indices(state_dict)
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"not a SAM state dict: image encoder blocks {blocks}")
    embed_dim, patch_size = int(patch_w.shape[0]), int(patch_w.shape[-1])
    grid = int(pos.shape[1])
    head_dim = int(state_dict["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
    dense_heads = embed_dim // head_dim
    heads, mlp_dims, global_idx, window = [], [], [], 0
    for b in blocks:
        key = f"image_encoder.blocks.{b}."
        heads.append(int(state_dict[key + "attn.qkv.weight"].shape[0]) // (3 * head_dim))
        mlp_dims.append(int(state_dict[key + "mlp.lin1.weight"].shape[0]))
        span = (int(state_dict[key + "attn.rel_pos_h"].shape[0]) + 1) // 2
        if span == grid:
            global_idx.append(b)
        else:
            window = span
    dense_mlp = max(mlp_dims)
    preset = next(
        (
            p
            for p in SAM_PRESETS.values()
            if (p.embed_dim, p.depth, p.img_size) == (embed_dim, len(blocks), grid * patch_size)
        ),
        None,
    )
    if preset is not None and preset.mlp_dim >= dense_mlp:
        dense_mlp = preset.mlp_dim
    config = SamConfig(
        img_size=grid * patch_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=len(blocks),
        num_heads=dense_heads,
        mlp_ratio=dense_mlp / embed_dim,
        window_size=window,
        global_attn_indexes=tuple(global_idx),
        out_chans=int(state_dict["image_encoder.neck.0.weight"].shape[0]),
        name=name or (preset.name if preset is not None else "custom"),
    )
    return config.with_widths(heads, mlp_dims)


_TINY_VIT_KEY = "image_encoder.layers.0.blocks.0.conv1.c.weight"


def _stage_blocks(state_dict: Mapping[str, torch.Tensor], stage: int) -> list[int]:
    return _block_indices(state_dict, f"image_encoder.layers.{stage}.blocks.")


def _merge_stride(out_dim: int) -> int:
    # Not stored in any tensor (the depthwise kernel is 3x3 either way): TinyViT-SAM's rule keeps the resolution
    # when merging into its widest stages.
    return 1 if out_dim in (320, 448, 576) else 2


def infer_tiny_vit_config(state_dict: Mapping[str, torch.Tensor], name: str | None = None) -> TinyViTConfig:
    """Read a TinyViT (LiteMedSAM) architecture off a state dict's tensor shapes, compact widths included.

    A stage's dense head count is its width over the head width (heads are removed whole, never narrowed); the
    input size is not stored in any tensor and is LiteMedSAM's 256.
    """
    dims = [int(state_dict[_TINY_VIT_KEY].shape[1])]
    # stage 0 (MBConv) has no attention: its head count and window are placeholders, upstream's values
    depths, heads, windows = [len(_stage_blocks(state_dict, 0))], [TinyViTConfig.stage_heads[0]], [7]
    block_heads: list[int] = []
    block_mlps: list[int] = []
    stage = 1
    while blocks := _stage_blocks(state_dict, stage):
        first = f"image_encoder.layers.{stage}.blocks.{blocks[0]}."
        dim = int(state_dict[first + "attn.qkv.weight"].shape[1])
        for b in blocks:
            key = f"image_encoder.layers.{stage}.blocks.{b}."
            biases = state_dict[key + "attn.attention_biases"]
            block_heads.append(int(biases.shape[0]))
            block_mlps.append(int(state_dict[key + "mlp.fc1.weight"].shape[0]))
        head_dim = int(state_dict[first + "attn.proj.weight"].shape[1]) // block_heads[-len(blocks)]
        dims.append(dim)
        depths.append(len(blocks))
        heads.append(dim // head_dim)
        windows.append(round(int(state_dict[first + "attn.attention_biases"].shape[1]) ** 0.5))
        stage += 1
    stages = [s for s in range(1, len(depths)) for _ in range(depths[s])]
    observed_ratio = max(m / dims[s] for m, s in zip(block_mlps, stages))
    config = TinyViTConfig(
        embed_dims=tuple(dims),
        depths=tuple(depths),
        stage_heads=tuple(heads),
        window_sizes=tuple(windows),
        mlp_ratio=max(TinyViTConfig.mlp_ratio, observed_ratio),
        mbconv_expand=int(state_dict[_TINY_VIT_KEY].shape[0]) / dims[0],
        merge_strides=tuple(_merge_stride(d) for d in dims[1:]),
        out_chans=int(state_dict["image_encoder.neck.0.weight"].shape[0]),
        name=name or "litemedsam",
    )
    return config.with_widths(block_heads, block_mlps)
