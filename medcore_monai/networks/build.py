"""Building SAM / MedSAM models from presets and checkpoints, and saving compact (slimmed) models."""

from __future__ import annotations

import hashlib
import os
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    atomic_torch_save,
    extract_state_dict,
    load_state_dict_strict,
    plain_state_dict,
    read_checkpoint,
)
from .config import PROMPT_EMBED_DIM, SamConfig, get_preset, infer_sam_config
from .robust_decoder import has_robust_decoder
from .sam_import import sam_modeling
from .structure import kept_indices, slim_block_

__all__ = [
    "build_sam",
    "load_sam",
    "save_sam",
    "file_sha256",
    "COMPACT_FORMAT",
]

COMPACT_FORMAT = "medcore-sam"
FORMAT_VERSION = 1


def build_sam(config: SamConfig | str = "vit_b", seed: int | None = None) -> nn.Module:
    """Build a segment-anything ``Sam`` with the given architecture (random weights).

    Compact configs (per-block widths) are built dense, then each block is narrowed to its width, so
    the module classes are exactly segment-anything's.

    Args:
        config: a :class:`SamConfig` or a preset name (``vit_b``, ``vit_l``, ``vit_h``, ``tiny``).
        seed: seed for the random initialisation (``None`` uses the global RNG).
    """
    if isinstance(config, str):
        config = get_preset(config)
    modeling = sam_modeling()
    grid = config.grid_size
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        sam = modeling.Sam(
            image_encoder=modeling.ImageEncoderViT(
                depth=config.depth,
                embed_dim=config.embed_dim,
                img_size=config.img_size,
                mlp_ratio=config.mlp_ratio,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                num_heads=config.num_heads,
                patch_size=config.patch_size,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=config.global_attn_indexes,
                window_size=config.window_size,
                out_chans=config.out_chans,
            ),
            prompt_encoder=modeling.PromptEncoder(
                embed_dim=PROMPT_EMBED_DIM,
                image_embedding_size=(grid, grid),
                input_image_size=(config.img_size, config.img_size),
                mask_in_chans=16,
            ),
            mask_decoder=modeling.MaskDecoder(
                num_multimask_outputs=3,
                transformer=modeling.TwoWayTransformer(
                    depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8
                ),
                transformer_dim=PROMPT_EMBED_DIM,
                iou_head_depth=3,
                iou_head_hidden_dim=256,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)
    if config.is_compact:
        for i, blk in enumerate(sam.image_encoder.blocks):
            slim_block_(blk, range(config.heads_of(i)), range(config.mlp_dim_of(i)))
    sam.medcore_config = config
    return sam.eval()


def _restore_kept_indices(sam: nn.Module, manifest: list[dict[str, Any]]) -> None:
    for blk, entry in zip(sam.image_encoder.blocks, manifest):
        blk.medcore_kept_heads = list(entry["kept_heads"])
        blk.medcore_kept_channels = list(entry["kept_channels"])


def checkpoint_config(
    state: dict[str, torch.Tensor], manifest: dict[str, Any] | None, model_type: str, source: str
) -> SamConfig:
    """The architecture of a checkpoint: its compact manifest, else a preset name, else its tensor shapes."""
    if manifest is not None:
        return SamConfig.from_dict(manifest["config"])
    if model_type != "auto":
        return get_preset(model_type)
    try:
        return infer_sam_config(state)
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{source}: cannot infer the SAM architecture: {err}") from None


def load_sam(path: str | os.PathLike, model_type: str = "auto") -> nn.Module:
    """Build a SAM/MedSAM model from a checkpoint file, strictly.

    Accepts official raw state dicts (``sam_vit_b_01ec64.pth``, ``medsam_vit_b.pth``), dicts holding
    the state dict under ``model`` / ``state_dict`` / ``model_state_dict``, and this project's
    compact checkpoints written by :func:`save_sam`. Pickled whole models are refused.
    Checkpoints with a RobustSAM decoder (official RobustSAM, or RobustMedSAM files from
    :mod:`medcore_monai.networks.fusion`) give a model whose ``mask_decoder`` is a
    ``RobustMaskDecoder``; wrap it with ``fusion.as_medsam`` / ``RobustMedSAM``.

    Args:
        path: checkpoint file.
        model_type: ``auto`` reads the architecture from the tensor shapes; a preset name forces it
            (and a mismatch is reported key by key).

    Raises:
        CheckpointError: on a missing/unsafe file or any key or shape mismatch.
    """
    obj = read_checkpoint(path)
    state = extract_state_dict(obj, source=str(path))
    if has_robust_decoder(state):
        from .fusion import robust_sam_from_checkpoint  # deferred: fusion builds on this module

        return robust_sam_from_checkpoint(obj, source=str(path), model_type=model_type)
    manifest = obj.get("medcore") if isinstance(obj, dict) else None
    sam = build_sam(checkpoint_config(state, manifest, model_type, str(path)))
    load_state_dict_strict(sam, state, source=str(path))
    if manifest is not None:
        _restore_kept_indices(sam, manifest["blocks"])
    return sam


def compact_manifest(sam: nn.Module) -> list[dict[str, Any]]:
    """Per-block widths and the original indices of the kept heads and MLP channels."""
    out = []
    for blk in sam.image_encoder.blocks:
        heads, channels = kept_indices(blk)
        out.append(
            {
                "num_heads": blk.attn.num_heads,
                "mlp_dim": blk.mlp.lin1.out_features,
                "kept_heads": heads,
                "kept_channels": channels,
            }
        )
    return out


def current_config(sam: nn.Module) -> SamConfig:
    """The architecture of ``sam`` as it is now (after any slimming)."""
    base = getattr(sam, "medcore_config", None) or infer_sam_config(sam.state_dict())
    blocks = sam.image_encoder.blocks
    return base.with_widths([b.attn.num_heads for b in blocks], [b.mlp.lin1.out_features for b in blocks])


def save_sam(sam: nn.Module, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Save a (dense or compact) SAM model with its architecture and per-block widths, atomically.

    The file is a plain dict readable with ``torch.load(weights_only=True)``:
    ``{"format", "format_version", "medcore": {"config", "blocks"}, "state_dict", "metadata"}``.
    Parametrized weights (an SVD adaptation in training) are saved as their effective plain weights.
    """
    payload = {
        "format": COMPACT_FORMAT,
        "format_version": FORMAT_VERSION,
        "medcore": {"config": current_config(sam).to_dict(), "blocks": compact_manifest(sam)},
        "state_dict": {k: v.detach().cpu() for k, v in plain_state_dict(sam).items()},
        "metadata": metadata or {},
    }
    return atomic_torch_save(payload, path)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
