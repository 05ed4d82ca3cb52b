"""RobustMedSAM checkpoint fusion: MedSAM's encoders with RobustSAM's mask decoder.

RobustMedSAM (Li et al., 2026) observes that SAM's image encoder holds the medical priors while the
mask decoder governs robustness to corruptions. Its fused initial checkpoint takes ``image_encoder.*``
and ``prompt_encoder.*`` from MedSAM and ``mask_decoder.*`` from RobustSAM (ViT-B); only the decoder is
then fine-tuned. This module provides:

* :func:`fuse_state_dicts` / :func:`fuse_checkpoints` - the validated fusion, keeping a compact (pruned)
  MedSAM encoder with its per-block widths and kept indices; files are written in the one checkpoint
  format of :func:`medcore_monai.networks.build.save_sam` (manifest entry ``"decoder": "robustsam"``);
* :func:`robust_state_schema` - the expected keys and shapes, without allocating weights;
* :func:`strip_robust_decoder` - the plain-SAM fallback that drops (and lists) the extra decoder tensors.

Building, loading and saving RobustSAM-decoder models live in :mod:`.build`
(``build_robust_sam``, ``load_robust_sam``, ``load_sam``); the box-prompted module ``RobustMedSAM`` in
:mod:`.medsam`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_torch_save
from .build import build_robust_sam, checkpoint_payload, file_sha256
from .checkpoint import (
    CheckpointError,
    checkpoint_manifest,
    extract_state_dict,
    format_keys,
    key_problems,
    read_checkpoint,
)
from .config import SamConfig, get_preset, infer_sam_config
from .manifest import checked_blocks, dense_blocks, make_manifest
from .robust_decoder import is_robust_decoder_key
from .structure import slim_block_

__all__ = [
    "FusionReport",
    "fuse_checkpoints",
    "fuse_state_dicts",
    "robust_state_schema",
    "strip_robust_decoder",
]

_ENCODER_PREFIXES = ("image_encoder.", "prompt_encoder.")
_DECODER_PREFIX = "mask_decoder."


def _medsam_architecture(obj: Any, state: Mapping[str, torch.Tensor], source: str) -> tuple[SamConfig, list]:
    """Config and block manifest of the MedSAM side (from its manifest, else from tensor shapes)."""
    manifest = checkpoint_manifest(obj)
    if manifest is not None:
        config = SamConfig.from_dict(manifest["config"])
        return config, checked_blocks(manifest.get("blocks"), config, source)
    try:
        config = infer_sam_config(state)
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{source}: cannot infer the SAM architecture: {err}") from None
    return config, dense_blocks(config)


def robust_state_schema(config: SamConfig | str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a :func:`build_robust_sam` model's state dict, without allocating its weights.

    The model is built on PyTorch's ``meta`` device (dense, then slimmed to the config's widths).
    """
    if isinstance(config, str):
        config = get_preset(config)
    with torch.device("meta"):
        model = build_robust_sam(replace(config, block_heads=None, block_mlp_dims=None))
    if config.is_compact:
        for i, block in enumerate(model.image_encoder.blocks):
            slim_block_(block, range(config.heads_of(i)), range(config.mlp_dim_of(i)))
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _part_problems(
    state: Mapping[str, torch.Tensor],
    schema: Mapping[str, tuple[int, ...]],
    prefixes: tuple[str, ...],
    source: str,
) -> list[str]:
    """Missing, unexpected and mis-shaped keys of the part of ``state`` under ``prefixes``."""
    given = {k: tuple(v.shape) for k, v in state.items() if k.startswith(prefixes)}
    wanted = {k: shape for k, shape in schema.items() if k.startswith(prefixes)}
    foreign = sorted(k for k in state if not k.startswith((*_ENCODER_PREFIXES, _DECODER_PREFIX)))
    problems = [f"{source}: {problem}" for problem in key_problems(given, wanted)]
    if foreign:
        problems.append(f"{source}: keys outside image_encoder/prompt_encoder/mask_decoder: {format_keys(foreign)}")
    return problems


@dataclass(frozen=True)
class FusionReport:
    """What :func:`fuse_state_dicts` took from where.

    Attributes:
        config: architecture of the fused model (the MedSAM side's, widths included).
        blocks: per-block manifest of the encoder (widths and kept original indices).
        from_medsam: tensors taken from MedSAM (image and prompt encoder).
        from_robustsam: tensors taken from RobustSAM (mask decoder).
        medsam_unused: MedSAM keys not used (its own mask decoder).
        robustsam_unused: RobustSAM keys not used (its image and prompt encoder).
    """

    config: SamConfig
    blocks: list[dict[str, Any]]
    from_medsam: int
    from_robustsam: int
    medsam_unused: tuple[str, ...]
    robustsam_unused: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (counts, not key lists)."""
        return {
            "config": self.config.to_dict(),
            "from_medsam": self.from_medsam,
            "from_robustsam": self.from_robustsam,
            "medsam_unused": len(self.medsam_unused),
            "robustsam_unused": len(self.robustsam_unused),
        }


def fuse_state_dicts(
    medsam_state: Mapping[str, Any],
    robustsam_state: Mapping[str, Any],
    *,
    medsam_source: str = "MedSAM checkpoint",
    robustsam_source: str = "RobustSAM checkpoint",
) -> tuple[dict[str, torch.Tensor], FusionReport]:
    """RobustMedSAM's module-wise fusion: encoders from MedSAM, mask decoder from RobustSAM.

    Both arguments may be raw state dicts, ``module.``-prefixed ones, dicts holding them under
    ``model`` / ``state_dict`` / ``model_state_dict``, or (MedSAM side) this project's compact
    checkpoints, whose manifest supplies the per-block widths and kept indices. The expected keys and
    shapes are those of :func:`build_robust_sam` for the MedSAM side's architecture.

    Args:
        medsam_state: MedSAM (or any SAM) checkpoint content; ``image_encoder.*`` and
            ``prompt_encoder.*`` are taken from it.
        robustsam_state: RobustSAM checkpoint content; ``mask_decoder.*`` is taken from it.
        medsam_source: name of the MedSAM side in error messages.
        robustsam_source: name of the RobustSAM side in error messages.

    Returns:
        The fused state dict (tensors shared with the inputs, keys in model order) and a
        :class:`FusionReport`.

    Raises:
        CheckpointError: naming every missing, unexpected or mis-shaped key and the side it came from.
    """
    medsam = extract_state_dict(medsam_state, source=medsam_source)
    robustsam = extract_state_dict(robustsam_state, source=robustsam_source)
    config, blocks = _medsam_architecture(medsam_state, medsam, medsam_source)
    schema = robust_state_schema(config)
    problems = _part_problems(medsam, schema, _ENCODER_PREFIXES, medsam_source)
    problems += _part_problems(robustsam, schema, (_DECODER_PREFIX,), robustsam_source)
    if not any(is_robust_decoder_key(k) for k in robustsam):
        problems.append(
            f"{robustsam_source}: no RobustSAM decoder modules (e.g. mask_decoder.custom_robust_token.weight); "
            "is it a plain SAM/MedSAM checkpoint?"
        )
    if problems:
        raise CheckpointError("cannot fuse RobustMedSAM:\n  " + "\n  ".join(problems))
    fused = {k: medsam[k] if k.startswith(_ENCODER_PREFIXES) else robustsam[k] for k in schema}
    report = FusionReport(
        config=config,
        blocks=blocks,
        from_medsam=sum(k.startswith(_ENCODER_PREFIXES) for k in fused),
        from_robustsam=sum(k.startswith(_DECODER_PREFIX) for k in fused),
        medsam_unused=tuple(sorted(k for k in medsam if not k.startswith(_ENCODER_PREFIXES))),
        robustsam_unused=tuple(sorted(k for k in robustsam if not k.startswith(_DECODER_PREFIX))),
    )
    return fused, report


def strip_robust_decoder(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Plain-SAM fallback: remove RobustSAM's extra decoder tensors, and say which.

    The result loads strictly into a vanilla SAM of the same architecture (SAM's own decoder weights
    are kept), instead of a silent ``strict=False``.

    Args:
        state: a full-model state dict (or any checkpoint layout :func:`extract_state_dict` accepts).

    Returns:
        ``(vanilla_state, dropped_keys)``, ``module.`` prefixes removed; 89 keys are dropped for the
        SAM layout.
    """
    plain = extract_state_dict(state, source="state dict")
    dropped = sorted(k for k in plain if is_robust_decoder_key(k))
    removed = set(dropped)
    return {k: v for k, v in plain.items() if k not in removed}, dropped


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def fuse_checkpoints(
    medsam_path: str | os.PathLike,
    robustsam_path: str | os.PathLike,
    out_path: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Fuse two checkpoint files into a RobustMedSAM checkpoint, written atomically.

    The output uses the compact format of :func:`~medcore_monai.networks.build.save_sam` (so a pruned
    MedSAM encoder keeps its widths and kept indices) with ``medcore.decoder = "robustsam"``; its
    metadata gains a ``fusion`` entry with the sources, their SHA-256 and the tensor counts.

    Args:
        medsam_path: MedSAM checkpoint (official ``medsam_vit_b.pth``, a training checkpoint, or a
            compact one from this project).
        robustsam_path: RobustSAM checkpoint (e.g. ``robustsam_checkpoint_b.pth``).
        out_path: where to write the fused checkpoint.
        metadata: extra JSON-safe metadata to store.

    Raises:
        CheckpointError: if a file is unreadable or the checkpoints do not fit (see
            :func:`fuse_state_dicts`).
    """
    medsam_obj, robustsam_obj = read_checkpoint(medsam_path), read_checkpoint(robustsam_path)
    fused, report = fuse_state_dicts(
        medsam_obj,
        robustsam_obj,
        medsam_source=f"MedSAM checkpoint {medsam_path}",
        robustsam_source=f"RobustSAM checkpoint {robustsam_path}",
    )
    provenance = {
        "medsam": str(medsam_path),
        "medsam_sha256": file_sha256(medsam_path),
        "robustsam": str(robustsam_path),
        "robustsam_sha256": file_sha256(robustsam_path),
        **report.to_dict(),
    }
    manifest = make_manifest(report.config, report.blocks, robust_decoder=True)
    payload = checkpoint_payload(fused, manifest, {**(metadata or {}), "fusion": provenance})
    return atomic_torch_save(payload, out_path)
