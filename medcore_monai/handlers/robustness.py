"""Degraded-image evaluation: the bundle's evaluator rerun under each corruption and severity (RobustMedSAM).

The corruption is applied where the model sees the image: at model size, after min-max scaling, appended to the
inferer's per-slice transform, seeded per sample name (so results do not depend on order or batching). Labels and
box prompts stay clean: the prompt is what a user would draw.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import Compose

from ..files import write_json_atomic, write_text_atomic
from .evaluation import EvaluationReport, macro_average

__all__ = ["corruption_grid", "corruption_sweep"]

logger = logging.getLogger(__name__)


def corruption_grid(corruptions: Sequence[str] | str | None, severities: Sequence[int]) -> list[tuple[str, int]]:
    """The ``(corruption, severity)`` pairs to evaluate (``"all"`` = every corruption).

    Raises:
        ValueError: naming unknown corruptions or severities.
    """
    from ..transforms.corruptions import CORRUPTIONS, SEVERITIES

    if not corruptions:
        return []
    names = (
        list(CORRUPTIONS)
        if corruptions == "all"
        else [corruptions]
        if isinstance(corruptions, str)
        else list(corruptions)
    )
    problems = [
        f"unknown corruption {n!r}; choose from {list(CORRUPTIONS)} or 'all'" for n in names if n not in CORRUPTIONS
    ]
    problems += [f"severity {s!r} is not one of {list(SEVERITIES)}" for s in severities if s not in SEVERITIES]
    if not severities:
        problems.append("severities is empty")
    if problems:
        raise ValueError("cannot evaluate corruptions:\n  " + "\n  ".join(problems))
    return [(n, int(s)) for n in names for s in severities]


@contextmanager
def _corrupted(inferer: Any, name: str, severity: int, seed: int):
    from ..transforms.corruptions import Corruptd

    clean = inferer.model_transform
    inferer.model_transform = Compose([clean, Corruptd(keys="image", name=name, severity=severity, seed=seed)])
    try:
        yield
    finally:
        inferer.model_transform = clean


def corruption_sweep(
    evaluator: Any,
    report: EvaluationReport,
    corruptions: Sequence[str] | str | None,
    severities: Sequence[int] = (1, 3, 5),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Rerun ``evaluator`` under every corruption and severity; add a ``robustness`` section to the report.

    Writes ``robustness.csv`` and ``robustness_dice.png`` beside ``evaluation.json`` and rewrites that file with
    metrics per corruption and severity (per dataset and macro), their means per severity and overall, and the
    clean macro metrics. Call it after the clean run (the report's metrics are the clean ones).

    Returns:
        The robustness section, or ``None`` without corruptions.
    """
    grid = corruption_grid(corruptions, severities)
    if not grid:
        return None
    clean = dict(report.results)
    table: dict[str, dict[str, Any]] = {}
    iterator = grid
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(grid, desc="corruptions", leave=False)
    with report.suspended():
        for name, severity in iterator:
            with _corrupted(evaluator.inferer, name, severity, seed):
                evaluator.run()
            table.setdefault(name, {})[str(severity)] = dict(report.results)
    report.results = clean
    section = _section(table, clean["macro"], report.output_dir)
    report.report["robustness"] = section
    write_json_atomic(report.output_dir / "evaluation.json", report.report)
    logger.info("robustness: mean degraded Dice %.4f (clean %.4f)", section["mean"]["dice"], clean["macro"]["dice"])
    return section


def _section(table: Mapping[str, Mapping[str, Any]], clean_macro: Mapping[str, float], output: Path) -> dict:
    from ..reports.corruptions import plot_robustness_heatmap

    severities = sorted({int(s) for per in table.values() for s in per})
    macros = [table[n][str(s)]["macro"] for n in table for s in severities]
    keys = list(macros[0])
    mean_by_severity = {str(s): macro_average({n: table[n][str(s)]["macro"] for n in table}) for s in severities}
    rows = [{"corruption": n, "severity": s} | table[n][str(s)]["macro"] for n in table for s in severities]
    header = list(rows[0])
    write_text_atomic(
        output / "robustness.csv",
        "\n".join([",".join(header)] + [",".join(str(r[k]) for k in header) for r in rows]) + "\n",
    )
    dice = {n: {s: table[n][str(s)]["macro"]["dice"] for s in severities} for n in table}
    figure = plot_robustness_heatmap(dice, output / "robustness_dice.png", metric="Dice", clean=clean_macro["dice"])
    return {
        "corruptions": {n: dict(per) for n, per in table.items()},
        "mean_by_severity": mean_by_severity,
        "mean": {k: float(np.mean([m[k] for m in macros])) for k in keys},
        "clean": dict(clean_macro),
        "note": "labels and box prompts stay clean; images are corrupted at model size after min-max scaling",
        "figure": Path(figure).name,
    }
