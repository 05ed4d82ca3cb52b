"""Per-dataset evaluation summaries from an evaluator's metric handlers, written as ``evaluation.json``.

MONAI's metric handlers reduce over every item an evaluator saw. A run over several datasets needs each
dataset's mean and ``n`` and their macro average, in the units the metrics were computed in (pixels for 2-D
images, millimetres per volume for NIfTI). :class:`DatasetMetrics` records which dataset each item came from
and splits the handlers' per-item details (``save_details=True``) accordingly; :class:`EvaluationReport` adds
the model's cost and latency and writes the summary.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor

from ..engines.measure import measure_latency, model_cost
from ..files import write_json_atomic
from ..networks import file_sha256
from ..transforms.volumes import VALUE_WARNING

__all__ = ["DatasetMetrics", "EvaluationReport", "macro_average", "metric_key"]

logger = logging.getLogger(__name__)


def metric_key(name: str) -> str:
    """Report name of an evaluator metric (``val_bf1`` -> ``bf1``)."""
    return name[len("val_") :] if name.startswith("val_") else name


_COUNTS = ("n", "units", "empty_masks", "suspicious_values")


def macro_average(per_dataset: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean over datasets of every metric they all have (counts and units excluded)."""
    rows = list(per_dataset.values())
    keys = [k for k in rows[0] if k not in _COUNTS and all(k in r for r in rows)]
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def _item_info(item: Mapping[str, Any]) -> tuple[str, str, bool]:
    image = item.get("image")
    volume = isinstance(image, torch.Tensor) and image.ndim == 4
    name = item.get("name")
    if name is None and isinstance(image, MetaTensor):
        name = image.meta.get("filename_or_obj", "")
    return str(item.get("dataset", "data")), str(name), volume


class DatasetMetrics:
    """Per-dataset means of an evaluator's metrics (needs the metric handlers' ``save_details``).

    After each run ``results`` holds ``{dataset: {metric: mean, "n": items, "units": ...}, "macro": {...}}``.
    """

    def __init__(self) -> None:
        self.items: list[tuple[str, str, bool]] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.empty: dict[str, int] = {}
        self.suspicious: dict[str, int] = {}

    def attach(self, engine: Engine) -> None:
        """Reset at start, record items per iteration, summarise when the run completes."""
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.COMPLETED, self._summarise)

    def _reset(self, _: Engine) -> None:
        self.items, self.results, self.empty, self.suspicious = [], {}, {}, {}

    def _record(self, engine: Engine) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        self.items += [_item_info(item) for item in items]
        for item, (dataset, name, _) in zip(items, self.items[-len(items) :]):
            label = item.get("label")
            if isinstance(label, torch.Tensor) and not bool((label > 0).any()):
                # a policy, not an error: scored (both-empty is a match), warned about, counted in the report
                logger.warning("%s: the mask of %s is empty; its box prompt is the whole image", dataset, name)
                self.empty[dataset] = self.empty.get(dataset, 0) + 1
            image = item.get("image")
            if isinstance(image, MetaTensor) and image.meta.get(VALUE_WARNING):  # warned when it was loaded
                self.suspicious[dataset] = self.suspicious.get(dataset, 0) + 1

    def _summarise(self, engine: Engine) -> None:
        details = getattr(engine.state, "metric_details", {}) or {}
        datasets = list(dict.fromkeys(d for d, _, _ in self.items))
        for dataset in datasets:
            rows = [i for i, (d, _, _) in enumerate(self.items) if d == dataset]
            volumes = {self.items[i][2] for i in rows}
            summary: dict[str, Any] = {"n": len(rows), "units": "mm, per volume" if volumes == {True} else "pixels"}
            summary["empty_masks"] = self.empty.get(dataset, 0)
            summary["suspicious_values"] = self.suspicious.get(dataset, 0)
            for name, values in details.items():
                per_item = torch.as_tensor(values).reshape(len(self.items), -1).float().mean(dim=1)
                chosen = [float(per_item[i]) for i in rows]
                finite = [v for v in chosen if math.isfinite(v)]
                summary[metric_key(name)] = float(np.mean(finite)) if finite else float("nan")
            self.results[dataset] = summary
        if datasets:
            self.results["macro"] = macro_average({d: self.results[d] for d in datasets})

    def names(self) -> list[str]:
        """Item names in evaluation order."""
        return [name for _, name, _ in self.items]


class EvaluationReport(DatasetMetrics):
    """Write ``evaluation.json`` (per-dataset and macro metrics, n, split, cost, latency) when an evaluation ends.

    Args:
        output_dir: folder of ``evaluation.json``.
        network: the evaluated model (cost and latency are measured on it).
        checkpoint: the checkpoint file it was loaded from (its SHA-256 is recorded).
        split: which split was evaluated (``test``, ``val``, ``all``, ...).
        device: device for the latency measurement (default: the network's).
        latency: measure latency.
        extra: more JSON-safe entries for the report (e.g. the data roots).
    """

    def __init__(
        self,
        output_dir: str | Path,
        network: torch.nn.Module,
        checkpoint: str | None = None,
        split: str = "test",
        device: torch.device | str | None = None,
        latency: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.output_dir, self.network, self.checkpoint = Path(output_dir), network, checkpoint
        self.split, self.device, self.latency, self.extra = split, device, latency, dict(extra or {})
        self.report: dict[str, Any] = {}
        self._suspended = False

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Keep ``evaluation.json`` as it is during extra runs (e.g. degraded images); metrics still update."""
        self._suspended = True
        try:
            yield
        finally:
            self._suspended = False

    def attach(self, engine: Engine) -> None:
        """Record as :class:`DatasetMetrics` does, then write the report."""
        super().attach(engine)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _write(self, engine: Engine) -> None:
        if self._suspended:
            return
        device = self.device or next(self.network.parameters()).device
        self.report = {
            "checkpoint": {"path": self.checkpoint, "sha256": file_sha256(self.checkpoint)}
            if self.checkpoint
            else None,
            "split": self.split,
            "n": {d: r["n"] for d, r in self.results.items() if d != "macro"},
            "metrics": self.results,
            "cost": model_cost(self.network),
            "latency": measure_latency(self.network, device) if self.latency else None,
            **self.extra,
        }
        path = write_json_atomic(self.output_dir / "evaluation.json", self.report)
        macro = self.results.get("macro", {})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in macro.items())
        logger.info("evaluated %d items (%s split): %s; written to %s", len(self.items), self.split, shown, path)
