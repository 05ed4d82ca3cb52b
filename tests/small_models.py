"""Small model configurations shared by several test modules (imported as a plain module: tests/ is on sys.path)."""

from __future__ import annotations

from medcore_monai.networks import TinyViTConfig

#: A TinyViT with LiteMedSAM's structure (MBConv stage, three attention stages, stride-1 last merge) at 64 px.
SMALL_TINYVIT = TinyViTConfig(
    img_size=64,
    embed_dims=(16, 32, 40, 80),
    depths=(1, 2, 2, 1),
    stage_heads=(1, 2, 2, 4),
    window_sizes=(7, 7, 7, 7),
    merge_strides=(2, 2, 1),
    name="tinyvit_test",
)
