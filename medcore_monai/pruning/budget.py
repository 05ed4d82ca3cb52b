"""Per-block pruning budgets and mask selection.

A sparsity target is a fraction of the *original* dense groups of the whole encoder (heads, MLP
channels, or MBConv hidden channels). It is split over the non-protected blocks in inverse proportion to each block's
sensitivity (sum of its Fisher), capped by per-block floors, and the lowest-scored groups of each
block are removed. Removed groups never return: selection only considers groups still kept.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..networks.structure import BlockStructure, StructuredMasks

__all__ = [
    "BudgetReport",
    "BudgetShortfallWarning",
    "allocate_quota",
    "block_sensitivity",
    "min_keep_per_block",
    "plan_family",
    "plan_masks",
    "select_removals",
]

logger = logging.getLogger(__name__)


class BudgetShortfallWarning(UserWarning):
    """The floors or protected blocks leave too little capacity to meet the requested sparsity."""


@dataclass
class BudgetReport:
    """Requested vs achieved removals for one group family."""

    family: str
    requested: int
    achieved: int
    total: int
    per_block: list[int]

    @property
    def requested_sparsity(self) -> float:
        """Requested fraction of the original groups."""
        return self.requested / self.total

    @property
    def achieved_sparsity(self) -> float:
        """Fraction of the original groups removed after this step (including earlier removals)."""
        return self.achieved / self.total

    def to_dict(self) -> dict:
        """JSON-safe summary."""
        return {
            "family": self.family,
            "requested": self.requested,
            "achieved": self.achieved,
            "total": self.total,
            "requested_sparsity": self.requested_sparsity,
            "achieved_sparsity": self.achieved_sparsity,
            "per_block": self.per_block,
        }


def block_sensitivity(
    fisher: Mapping[str, torch.Tensor], blocks: int | Sequence[BlockStructure], prefix: str = ""
) -> torch.Tensor:
    """Sum of the Fisher entries of every parameter of each prunable block (qkv, proj, MLP, norms, rel-pos, ...).

    Args:
        fisher: per-parameter Fisher keyed like the encoder's parameters.
        blocks: the encoder structure (:func:`~medcore_monai.networks.encoder_structure`), or a block count for a
            ViT whose blocks are ``blocks.{i}``.
        prefix: key prefix in ``fisher`` (e.g. ``"image_encoder."``).
    """
    names = [f"blocks.{i}" for i in range(blocks)] if isinstance(blocks, int) else [b.module_path for b in blocks]
    paths = [f"{name}." for name in names]
    sens = torch.zeros(len(paths), dtype=torch.float64)
    for name, values in fisher.items():
        rest = name[len(prefix) :] if name.startswith(prefix) else None
        index = next((i for i, path in enumerate(paths) if rest is not None and rest.startswith(path)), None)
        if index is not None:
            sens[index] += float(values.double().sum())
    return sens


def allocate_quota(
    n_remove: int, sensitivity: torch.Tensor, capacity: Sequence[int], protected: Sequence[int] = ()
) -> list[int]:
    """Split ``n_remove`` over blocks in proportion to ``1 / sensitivity``, within each block's capacity.

    Rounded shares are clipped to ``[0, capacity_b]``; a deficit goes to the blocks with the most
    headroom left, a surplus is taken from the largest quotas. If the eligible capacity is smaller than
    ``n_remove`` every eligible block is filled and the caller reports the shortfall.
    """
    depth = len(capacity)
    eligible = [b for b in range(depth) if b not in set(protected) and capacity[b] > 0]
    quota = [0] * depth
    if n_remove <= 0 or not eligible:
        return quota
    inv = torch.tensor([1.0 / (float(sensitivity[b]) + 1e-12) for b in eligible], dtype=torch.float64)
    shares = inv / inv.sum()
    for b, share in zip(eligible, shares.tolist()):
        quota[b] = min(capacity[b], max(0, round(share * n_remove)))
    target = min(n_remove, sum(capacity[b] for b in eligible))
    while sum(quota) < target:
        b = max(eligible, key=lambda i: (capacity[i] - quota[i], -i))
        quota[b] += min(capacity[b] - quota[b], target - sum(quota))
    while sum(quota) > target:
        b = max(eligible, key=lambda i: (quota[i], -i))
        quota[b] -= min(quota[b], sum(quota) - target)
    return quota


def select_removals(scores: Sequence[torch.Tensor], kept: Sequence[torch.Tensor], quota: Sequence[int]):
    """New keep-masks removing, per block, the ``quota_b`` lowest-scored groups among those still kept.

    Ties are broken by the lower index (stable sort), so results are deterministic.
    """
    new_masks = []
    for block_scores, block_kept, n in zip(scores, kept, quota):
        mask = block_kept.clone().bool()
        if n > 0:
            candidates = torch.nonzero(mask).flatten()
            order = torch.sort(block_scores[candidates].double().cpu(), stable=True).indices
            mask[candidates[order[:n]]] = False
        new_masks.append(mask)
    return new_masks


def _capacity(kept: Sequence[torch.Tensor], min_keep: Sequence[int]) -> list[int]:
    return [max(0, int(k.sum()) - m) for k, m in zip(kept, min_keep)]


def plan_family(
    family: str,
    sparsity: float,
    scores: Sequence[torch.Tensor],
    kept: Sequence[torch.Tensor],
    sensitivity: torch.Tensor,
    min_keep: Sequence[int],
    protected: Sequence[int] = (),
    additional: bool = False,
    total: int | None = None,
    warn: bool = True,
) -> tuple[list[torch.Tensor], BudgetReport]:
    """Masks and report for one family (``heads`` or ``channels``).

    Args:
        family: label for messages.
        sparsity: fraction of the original groups to have removed (``additional=False``) or to remove
            on top of what is already removed (``additional=True``, continuation mode).
        scores: per-block scores.
        kept: per-block current keep-masks (dense width = original groups).
        sensitivity: per-block sensitivity.
        min_keep: per-block floor of kept groups.
        protected: blocks never pruned in this step.
        additional: interpret ``sparsity`` as additional removals.
        total: number of groups of the original dense encoder, when ``kept`` describes an already
            slimmed (compact) encoder; default: the masks' widths.
        warn: warn (and log) when the budget cannot be met.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{family} sparsity must lie in [0, 1), got {sparsity}")
    total = sum(k.numel() for k in kept) if total is None else int(total)
    already = total - sum(int(k.sum()) for k in kept)
    wanted = round(sparsity * total)
    n_remove = wanted if additional else max(0, wanted - already)
    quota = allocate_quota(n_remove, sensitivity, _capacity(kept, min_keep), protected)
    masks = select_removals(scores, kept, quota)
    report = BudgetReport(family, already + n_remove, already + sum(quota), total, quota)
    if warn and report.achieved < report.requested:
        message = (
            f"{family}: requested {report.requested}/{total} removed ({report.requested_sparsity:.1%}) but floors "
            f"and protected blocks allow only {report.achieved} ({report.achieved_sparsity:.1%})"
        )
        warnings.warn(message, BudgetShortfallWarning, stacklevel=2)
        logger.warning(message)
    return masks, report


def min_keep_per_block(widths: Sequence[int], min_keep: int | None = None, min_fraction: float | None = None):
    """Per-block floors from an absolute count or a fraction of the dense width (at least 1)."""
    if min_keep is not None:
        return [max(1, min(int(min_keep), w)) for w in widths]
    fraction = 0.05 if min_fraction is None else float(min_fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"min_fraction must lie in (0, 1], got {fraction}")
    return [max(1, round(fraction * w)) for w in widths]


def plan_masks(
    masks: StructuredMasks,
    head_scores: Sequence[torch.Tensor] | None,
    channel_scores: Sequence[torch.Tensor] | None,
    sensitivity: torch.Tensor,
    head_sparsity: float = 0.0,
    mlp_sparsity: float = 0.0,
    min_keep_heads: int = 1,
    min_keep_mlp_fraction: float = 0.05,
    protected: Sequence[int] = (),
    additional: bool = False,
    warn: bool = True,
    dense_heads: Sequence[int] | None = None,
    dense_mlp_dims: Sequence[int] | None = None,
    conv_scores: Sequence[torch.Tensor] | None = None,
    conv_sensitivity: torch.Tensor | None = None,
    conv_sparsity: float = 0.0,
    dense_conv_dims: Sequence[int] | None = None,
) -> tuple[StructuredMasks, list[BudgetReport]]:
    """Apply head, MLP and/or MBConv budgets to ``masks``; families whose scores are ``None`` are left as they are.

    ``dense_heads`` / ``dense_mlp_dims`` / ``dense_conv_dims`` give the original dense width of every block when
    ``masks`` describes a compact encoder (default: the masks' widths), so sparsities stay fractions of the
    original model and the MLP and MBConv floors are fractions of each block's dense width. MBConv blocks get
    their own sensitivity (``conv_sensitivity``), the ``min_keep_mlp_fraction`` floor, and no protected blocks
    (protection names attention blocks).
    """
    heads, channels, convs, reports = list(masks.heads), list(masks.channels), list(masks.convs), []
    if head_scores is not None:
        dense = _dense_widths(dense_heads, heads)
        floors = min_keep_per_block(dense, min_keep=min_keep_heads)
        heads, rep = plan_family(
            "heads", head_sparsity, head_scores, heads, sensitivity, floors, protected, additional, sum(dense), warn
        )
        reports.append(rep)
    if channel_scores is not None:
        dense = _dense_widths(dense_mlp_dims, channels)
        floors = min_keep_per_block(dense, min_fraction=min_keep_mlp_fraction)
        channels, rep = plan_family(
            "channels", mlp_sparsity, channel_scores, channels, sensitivity, floors, protected, additional, sum(dense)
        )
        reports.append(rep)
    if conv_scores is not None:
        if conv_sensitivity is None or len(conv_scores) != len(convs):
            raise ValueError("MBConv budgets need masks.convs and a sensitivity for every MBConv block")
        dense = _dense_widths(dense_conv_dims, convs)
        floors = min_keep_per_block(dense, min_fraction=min_keep_mlp_fraction)
        convs, rep = plan_family(
            "mbconv", conv_sparsity, conv_scores, convs, conv_sensitivity, floors, (), additional, sum(dense), warn
        )
        reports.append(rep)
    return StructuredMasks(heads, channels, convs), reports


def _dense_widths(widths: Sequence[int] | None, masks: Sequence[torch.Tensor]) -> list[int]:
    """The dense width of each block: as given, or the masks' widths (a mask spans its block's dense width)."""
    return [int(w) for w in widths] if widths is not None else [m.numel() for m in masks]
