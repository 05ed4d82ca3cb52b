"""Pruning runs from Python: :func:`run_prune` runs the bundle's ``prune`` workflow.

It writes into ``output_dir``: ``report.json``, ``report.md`` with PNG plots, ``scores.npz``, ``splits.json``,
the compact pruned checkpoint ``model_pruned.pt`` (reloadable with :func:`medcore_monai.networks.load_sam`) and
the resumable training state under ``recovery/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .bundle import run_workflow

__all__ = ["run_prune"]


def run_prune(**settings: Any) -> dict[str, Any]:
    """Prune a MedSAM checkpoint with the bundle's ``prune`` workflow (``train.yaml`` + ``prune.yaml``).

    ``settings`` are the bundle's config ids (``medsam_ckpt``, ``sam_ckpt``, ``data_roots``, ``output_dir``,
    ``head_sparsity``, ...; ``docs/bundle.md``). Unknown ids fail before any work.

    Returns:
        The report (also in ``<output_dir>/report.json``).
    """
    output_dir = Path(settings.get("output_dir", "outputs/prune"))
    run_workflow("prune", ("train.yaml", "prune.yaml"), **settings)
    return json.loads((output_dir / "report.json").read_text())
