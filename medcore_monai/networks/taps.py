"""Intermediate outputs of a SAM image encoder that keep their width under pruning (for distillation).

Pruning removes heads, MLP channels and MBConv hidden channels inside blocks, never the residual stream, so the
output of a TinyViT stage or of a ViT block has the same shape in the pruned encoder as in the dense one and can
be compared directly. The taps are TinyViT's stage outputs (the PatchMerging after each stage included) and
SAM ViT's global-attention blocks (where every windowed span ends; the last block when none is global).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["distillation_taps", "captured_outputs"]


def distillation_taps(encoder: nn.Module) -> list[str]:
    """Module paths (inside ``encoder``) whose outputs a pruned encoder shares in shape with its dense teacher.

    Raises:
        TypeError: for an encoder that is neither SAM's ViT nor the TinyViT of LiteMedSAM.
    """
    stages = getattr(encoder, "layers", None)
    if isinstance(stages, nn.ModuleList) and len(stages):
        return [f"layers.{i}" for i in range(len(stages))]
    blocks = getattr(encoder, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        global_blocks = [f"blocks.{i}" for i, b in enumerate(blocks) if getattr(b, "window_size", 0) == 0]
        return global_blocks or [f"blocks.{len(blocks) - 1}"]
    raise TypeError(f"no distillation taps known for a {type(encoder).__name__} image encoder")


@contextmanager
def captured_outputs(module: nn.Module, paths: Sequence[str]) -> Iterator[list[torch.Tensor | None]]:
    """Within the block, forward passes of ``module`` store the outputs of its submodules ``paths`` in the list.

    The list holds one entry per path, in order (``None`` until that submodule has run); each forward overwrites
    it. Hooks are removed on exit, so a slimmed module (new layers) never keeps a stale hook.
    """
    outputs: list[torch.Tensor | None] = [None] * len(paths)
    handles = []
    for index, path in enumerate(paths):

        def store(_module: nn.Module, _args: object, output: torch.Tensor, index: int = index) -> None:
            outputs[index] = output

        handles.append(module.get_submodule(path).register_forward_hook(store))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
