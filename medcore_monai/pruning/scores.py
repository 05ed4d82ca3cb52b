"""Group importance scores: MedCore's dual intervention and the baselines, all per block.

Scores are lists (one tensor per encoder block) for heads and for MLP channels, and one per MBConv block for its
hidden channels (TinyViT; empty for SAM's ViT); lower = pruned first.

* zero intervention  ``dz_g = 1/2 sum_{i in g} F^M_i theta_i^2`` (loss increase when the group is removed);
* reset intervention ``dr_g = 1/2 sum_{i in g} sqrt(F^M_i F^S_i + eps) (theta^M_i - theta^S_i)^2``
  (loss increase when the group is put back to its general-SAM value: what medical adaptation taught it);
* per-block mixture ``Q = alpha_b dz + (1 - alpha_b) dr`` with ``alpha_b = (1 + rho_b) / 2`` and
  ``rho_b`` the Pearson correlation of the (dataset-averaged) head scores of the block;
* dataset aggregation ``Q = sum_r pi_r Q_r + beta * spread_r(Q_r)``.

The reference code's spread is the variance, which is in score^2 units and so swamps the mean for
large-magnitude scores (the ranking then depends on the arbitrary loss scale). The default here is the
standard deviation, which scales with the scores, so multiplying every score by a constant leaves the
ranking unchanged; ``spread="variance"`` reproduces the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..networks.conv_groups import ConvBlockStructure, conv_group_sums
from ..networks.structure import BlockStructure, group_sums

__all__ = [
    "GroupScores",
    "zero_scores",
    "reset_scores",
    "alpha_per_block",
    "mix_scores",
    "aggregate_datasets",
    "magnitude_scores",
    "random_scores",
    "SCORE_METHODS",
]

SCORE_METHODS = ("dual", "zero", "reset", "random", "magnitude", "taylor")

Spread = Literal["std", "variance", "none"]


@dataclass
class GroupScores:
    """Per-block scores of attention heads and MLP channels, and per MBConv block of its hidden channels."""

    heads: list[torch.Tensor]
    channels: list[torch.Tensor]
    convs: list[torch.Tensor] = field(default_factory=list)

    def map(self, fn) -> GroupScores:
        """Apply ``fn`` to every per-block tensor."""
        return GroupScores([fn(h) for h in self.heads], [fn(c) for c in self.channels], [fn(c) for c in self.convs])

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All head scores and all channel scores, block-major."""
        return torch.cat(self.heads), torch.cat(self.channels)


def _grouped(
    values: Mapping[str, torch.Tensor], structure: Sequence[BlockStructure], convs: Sequence[ConvBlockStructure]
) -> GroupScores:
    heads, channels = group_sums(values, structure)
    return GroupScores(heads, channels, conv_group_sums(values, convs) if convs else [])


def zero_scores(
    fisher: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    structure: Sequence[BlockStructure],
    convs: Sequence[ConvBlockStructure] = (),
) -> GroupScores:
    """Diagonal second-order loss increase of zeroing each group (``convs``: also score these MBConv blocks)."""
    names = _group_tensors(fisher, convs)
    values = {n: 0.5 * fisher[n] * weights[n].to(fisher[n].device).float().square() for n in names}
    return _grouped(values, structure, convs)


def reset_scores(
    cross: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    reference_weights: Mapping[str, torch.Tensor],
    structure: Sequence[BlockStructure],
    convs: Sequence[ConvBlockStructure] = (),
) -> GroupScores:
    """Diagonal second-order loss increase of resetting each group to the reference (SAM) weights."""
    values = {}
    for name in _group_tensors(cross, convs):
        if name not in reference_weights:
            raise KeyError(f"reference (SAM) weights lack {name!r}; the pair must be aligned parameter by parameter")
        delta = weights[name].float().to(cross[name].device) - reference_weights[name].float().to(cross[name].device)
        if delta.shape != cross[name].shape:
            raise ValueError(f"{name}: model {tuple(cross[name].shape)} vs reference {tuple(delta.shape)}")
        values[name] = 0.5 * cross[name] * delta.square()
    return _grouped(values, structure, convs)


def _group_tensors(values: Mapping[str, torch.Tensor], convs: Sequence[ConvBlockStructure] = ()) -> list[str]:
    suffixes = (
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.attention_biases",  # TinyViT: one row per head
        "mlp.lin1.weight",
        "mlp.lin1.bias",
        "mlp.lin2.weight",
        "mlp.fc1.weight",  # TinyViT's MLP names
        "mlp.fc1.bias",
        "mlp.fc2.weight",
    )
    conv_paths = tuple(f"{c.module_path}." for c in convs)
    return [n for n in values if n.endswith(suffixes) or (conv_paths and n.startswith(conv_paths))]


def _pearson(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> float:
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    den = a.square().mean().sqrt() * b.square().mean().sqrt()
    if float(a.square().mean().sqrt()) <= tol or float(b.square().mean().sqrt()) <= tol:
        return 1.0
    return float((a * b).mean() / den)


def alpha_per_block(zero_heads: Sequence[torch.Tensor], reset_heads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``alpha_b = (1 + rho_b) / 2`` from the correlation of zero and reset head scores in each block.

    Where the two interventions agree (rho near 1), the zero score dominates; where they disagree the
    reset score gets more weight. A block whose scores are constant (or that has one head) gets
    ``alpha = 1``.
    """
    rhos = [max(-1.0, min(1.0, _pearson(z, r))) if z.numel() > 1 else 1.0 for z, r in zip(zero_heads, reset_heads)]
    return (1.0 + torch.tensor(rhos, dtype=torch.float64)) / 2.0


def mix_scores(zero: GroupScores, reset: GroupScores, alpha: torch.Tensor) -> GroupScores:
    """Per-block mixture ``alpha_b * zero + (1 - alpha_b) * reset`` (the same alpha for heads and channels)."""
    a = [float(x) for x in alpha]
    # MBConv blocks hold no heads, so they have no alpha of their own: the encoder's mean alpha mixes them
    mean = sum(a) / len(a) if a else 1.0
    return GroupScores(
        heads=[ab * z + (1 - ab) * r for ab, z, r in zip(a, zero.heads, reset.heads)],
        channels=[ab * z + (1 - ab) * r for ab, z, r in zip(a, zero.channels, reset.channels)],
        convs=[mean * z + (1 - mean) * r for z, r in zip(zero.convs, reset.convs)],
    )


def normalised_weights(pi: Sequence[float] | None, count: int) -> torch.Tensor:
    """Dataset weights pi normalised to sum 1 (``None``: equal weights)."""
    weights = torch.ones(count, dtype=torch.float64) if pi is None else torch.tensor(pi, dtype=torch.float64)
    if weights.numel() != count or bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError(f"pi must have {count} non-negative weights with a positive sum, got {list(weights)}")
    return weights / weights.sum()


def _aggregate_tensors(per_dataset: Sequence[torch.Tensor], pi: torch.Tensor, beta: float, spread: Spread):
    stacked = torch.stack([t.double() for t in per_dataset])  # [R, n]
    mean = (pi.to(stacked.device)[:, None] * stacked).sum(0)
    if len(per_dataset) == 1 or beta == 0 or spread == "none":
        return mean
    var = stacked.var(dim=0, unbiased=False)
    return mean + beta * (var if spread == "variance" else var.sqrt())


def aggregate_datasets(
    per_dataset: Sequence[GroupScores], pi: Sequence[float] | None = None, beta: float = 0.3, spread: Spread = "std"
) -> GroupScores:
    """Combine per-dataset scores: pi-weighted mean plus ``beta`` times the spread across datasets.

    Groups that matter a lot for one dataset but not the others get a bonus (they are kept). The
    spread is the population standard deviation (``std``, scale-equivariant, default) or the
    variance (``variance``, the MedCore reference behaviour, not scale-invariant).
    """
    if not per_dataset:
        raise ValueError("no per-dataset scores to aggregate")
    if spread not in ("std", "variance", "none"):
        raise ValueError(f"spread must be 'std', 'variance' or 'none', got {spread!r}")
    weights = normalised_weights(pi, len(per_dataset))

    def combined(family: str) -> list[torch.Tensor]:
        blocks = len(getattr(per_dataset[0], family))
        return [
            _aggregate_tensors([getattr(s, family)[b] for s in per_dataset], weights, beta, spread)
            for b in range(blocks)
        ]

    return GroupScores(combined("heads"), combined("channels"), combined("convs"))


def magnitude_scores(
    weights: Mapping[str, torch.Tensor], structure: Sequence[BlockStructure], convs: Sequence[ConvBlockStructure] = ()
) -> GroupScores:
    """Weight-magnitude baseline: L1 norm of each group's parameters."""
    return _grouped({n: w.detach().float().abs() for n, w in weights.items()}, structure, convs)


def random_scores(
    structure: Sequence[BlockStructure], seed: int, convs: Sequence[ConvBlockStructure] = ()
) -> GroupScores:
    """Seeded random baseline (uniform scores, so a random subset is removed per block).

    The MBConv scores are drawn after the head and channel scores, so adding them leaves those unchanged.
    """
    gen = torch.Generator().manual_seed(seed)
    return GroupScores(
        heads=[torch.rand(b.num_heads, generator=gen, dtype=torch.float64) for b in structure],
        channels=[torch.rand(b.mlp_dim, generator=gen, dtype=torch.float64) for b in structure],
        convs=[torch.rand(c.hidden_dim, generator=gen, dtype=torch.float64) for c in convs],
    )
