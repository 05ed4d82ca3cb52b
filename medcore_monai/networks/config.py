"""Architecture descriptions of SAM-family models: presets and inference from a state dict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

__all__ = ["SamConfig", "SAM_PRESETS", "get_preset", "infer_sam_config"]

PROMPT_EMBED_DIM = 256


@dataclass(frozen=True)
class SamConfig:
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
    def grid_size(self) -> int:
        """Token grid side length (image embedding size)."""
        return self.img_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the mask decoder's low-resolution logits (4x the token grid)."""
        return 4 * self.grid_size

    @property
    def is_compact(self) -> bool:
        """Whether any block is narrower than the dense width."""
        return self.block_heads is not None or self.block_mlp_dims is not None

    def heads_of(self, block: int) -> int:
        """Number of attention heads of ``block``."""
        return self.block_heads[block] if self.block_heads is not None else self.num_heads

    def mlp_dim_of(self, block: int) -> int:
        """MLP hidden width of ``block``."""
        return self.block_mlp_dims[block] if self.block_mlp_dims is not None else self.mlp_dim

    def with_widths(self, heads: Sequence[int], mlp_dims: Sequence[int]) -> SamConfig:
        """Copy with per-block widths (``None`` entries collapse to dense)."""
        heads_t = tuple(int(h) for h in heads)
        mlp_t = tuple(int(m) for m in mlp_dims)
        return replace(
            self,
            block_heads=None if all(h == self.num_heads for h in heads_t) else heads_t,
            block_mlp_dims=None if all(m == self.mlp_dim for m in mlp_t) else mlp_t,
        )

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


SAM_PRESETS: dict[str, SamConfig] = {
    "vit_b": SamConfig(),
    "vit_l": SamConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23), name="vit_l"),
    "vit_h": SamConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31), name="vit_h"),
    # Same classes as ViT-B, small enough for CPU tests: 256 px, 16x16 tokens, windows of 7 (so the grid
    # is padded to 21 like ViT-B's 64 -> 70), two global blocks, head_dim 64, full-size decoder.
    "tiny": SamConfig(
        img_size=256, embed_dim=192, depth=6, num_heads=3, window_size=7, global_attn_indexes=(2, 5), name="tiny"
    ),
}


def get_preset(name: str) -> SamConfig:
    """Return a named architecture (``vit_b``, ``vit_l``, ``vit_h``, ``tiny``)."""
    try:
        return SAM_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model type {name!r}; choose one of {sorted(SAM_PRESETS)}") from None


def _block_indices(state_dict: Mapping[str, torch.Tensor]) -> list[int]:
    prefix = "image_encoder.blocks."
    return sorted({int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)})


def infer_sam_config(state_dict: Mapping[str, torch.Tensor], name: str | None = None) -> SamConfig:
    """Read the architecture off a SAM state dict's tensor shapes.

    Works for the official ViT-B/L/H checkpoints, MedSAM, the tiny preset and compact (pruned)
    encoders whose blocks have fewer heads or MLP channels.

    Raises:
        ValueError: if the state dict does not look like a SAM image encoder.
    """
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
