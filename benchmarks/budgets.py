"""Budget specs shared by the benchmarks: ``label=s`` (heads and MLP channels) or ``label=heads,mlp[,mbconv]``.

Imports nothing heavy, so the speed benchmark's timing processes stay as lean as before.
"""

from __future__ import annotations

Budget = tuple[float, float, float]  # head, MLP and MBConv sparsity


def parse_budget(spec: str) -> Budget:
    """``s`` (heads and MLP), ``heads,mlp`` or ``heads,mlp,mbconv``."""
    parts = [float(p) for p in spec.split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) not in (2, 3):
        raise SystemExit(f"a budget is one sparsity or heads,mlp[,mbconv], got {spec!r}")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else 0.0


def parse_labelled_budgets(values: list[str]) -> dict[str, Budget]:
    """``["label=spec", ...]`` -> ``{label: (heads, mlp, mbconv)}`` in the given order."""
    return {label: parse_budget(spec) for label, _, spec in (v.rpartition("=") for v in values)}
