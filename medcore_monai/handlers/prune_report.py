"""The pruning run's outputs, written when the recovery trainer completes.

``report.json`` (settings, inputs with SHA-256, split sizes, budgets, kept indices, cost before/after, metrics per
dataset and stage with ``n``, BLR95 if measured, recovery losses and images, timing), ``report.md`` with plots,
``scores.npz`` and ``model_pruned.pt`` in the project's one checkpoint format.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from ..files import atomic_path, write_json_atomic

__all__ = ["PruneReport"]

logger = logging.getLogger(__name__)

_COST_KEYS = ("encoder_params", "total_params", "encoder_flops", "total_flops")


def _metrics_of(row: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    per_dataset = dict(row.get("datasets", {}))
    macro = {k: v for k, v in row.items() if k not in (*_COST_KEYS, "method", "stage", "datasets")}
    return per_dataset | {"macro": macro}


class PruneReport:
    """Write the pruning run's outputs into ``output_dir`` when the trainer completes (rank 0 only).

    Args:
        output_dir: the run folder.
        settings: the run's settings, recorded in the report (JSON-safe values).
        inputs: ``{name: checkpoint path}`` whose SHA-256 are recorded (``None`` paths are skipped).
        datalists: the run's :class:`medcore_monai.data.SplitDatalists` (split sizes, ``splits.json``), if any.
        eval_split: the split the stage metrics were computed on.
        max_eval_images: the evaluation truncation, stated in the report.
        checkpoint_name: file name of the pruned model.
    """

    def __init__(
        self,
        output_dir: str | Path,
        settings: Mapping[str, Any] | None = None,
        inputs: Mapping[str, str | None] | None = None,
        datalists: Any | None = None,
        eval_split: str = "test",
        max_eval_images: int | None = None,
        checkpoint_name: str = "model_pruned.pt",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.settings, self.inputs = dict(settings or {}), dict(inputs or {})
        self.datalists, self.eval_split, self.max_eval_images = datalists, eval_split, max_eval_images
        self.checkpoint_name = checkpoint_name
        self.report: dict[str, Any] = {}
        self._start = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        """Write the outputs when the trainer completes."""
        self._start = time.perf_counter()  # before the other STARTED handlers calibrate and evaluate
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _started(self, _: Engine) -> None:
        if self.datalists is not None and _is_main():
            self.datalists.save(self.output_dir / "splits.json")

    def build(self, engine: Engine) -> dict[str, Any]:
        """The report dictionary (also ``self.report``)."""
        from ..networks import file_sha256

        pruning, stages = engine.state.pruning, list(getattr(engine.state, "stages", []))
        dense, final = stages[0], stages[-1]
        before, after = _metrics_of(dense), _metrics_of(final)
        kept_heads, kept_channels = pruning.kept(engine)
        recovery = {
            name: {"steps": len(engine.losses.get(i + 1, [])), "losses": engine.losses.get(i + 1, [])}
            for i, name in enumerate(pruning.applied)
        }
        self.report = {
            "config": self.settings,
            "environment": {
                "torch": torch.__version__,
                "python": platform.python_version(),
                "device": str(engine.state.device),
            },
            "inputs": {k: {"path": str(p), "sha256": file_sha256(p)} for k, p in self.inputs.items() if p},
            "split_manifest": "splits.json" if self.datalists is not None else None,
            "datasets": self.datalists.counts() if self.datalists is not None else {},
            "evaluation": {
                "split": self.eval_split,
                "max_images": self.max_eval_images,
                "n": {d: r.get("n") for d, r in before.items() if d != "macro"},
                "empty_masks": {d: r.get("empty_masks", 0) for d, r in before.items() if d != "macro"},
                "suspicious_values": {d: r.get("suspicious_values", 0) for d, r in before.items() if d != "macro"},
            },
            "budgets": pruning.budgets,
            "kept_heads": kept_heads,
            "kept_channels": kept_channels,
            "kept_mbconv_channels": pruning.kept_convs(engine),
            "cost": {"before": {k: dense[k] for k in _COST_KEYS}, "after": {k: final[k] for k in _COST_KEYS}},
            "reduction": {k: 1.0 - final[k] / dense[k] for k in ("encoder_params", "total_params", "encoder_flops")},
            "metrics": {d: {"before": before[d], "after": after.get(d, {})} for d in before},
            "stages": [{k: v for k, v in row.items() if k != "datasets"} for row in stages],
            "leverage": getattr(engine.state, "leverage", None),
            "fisher_samples": pruning.fisher_counts,
            "recovery": recovery,
            "recovery_images": _images_per_dataset(getattr(engine.data_loader, "dataset", None) or []),
            "timing": dict(pruning.timing)
            | {f"recovery_{name}": engine.seconds.get(i + 1, 0.0) for i, name in enumerate(pruning.applied)}
            | dict(getattr(engine.state, "stage_timing", {}))
            | {"total": time.perf_counter() - self._start},
            "resumed_from": getattr(engine.state, "resumed_from", None),
            "outputs": {"checkpoint": self.checkpoint_name, "scores": "scores.npz", "report_md": "report.md"},
        }
        return self.report

    def write(self, engine: Engine) -> None:
        """Build the report and write every output file."""
        from ..networks import save_sam

        report = self.build(engine)
        if not _is_main():
            return
        model = getattr(engine.network, "module", engine.network)
        save_sam(model, self.output_dir / self.checkpoint_name, metadata={"prune_report": "report.json"})
        with atomic_path(self.output_dir / "scores.npz") as tmp:
            np.savez(tmp, **engine.state.pruning.details)
        self._write_markdown(report, engine)
        write_json_atomic(self.output_dir / "report.json", report)
        macro = report["metrics"]["macro"]
        logger.info(
            "pruned: encoder parameters -%.1f%%, BF1 %.4f -> %.4f; outputs in %s",
            100 * report["reduction"]["encoder_params"],
            macro["before"].get("bf1", float("nan")),
            macro["after"].get("bf1", float("nan")),
            self.output_dir,
        )

    def _write_markdown(self, report: dict[str, Any], engine: Engine) -> None:
        from ..reports import plot_budget_curves, plot_kept_per_block, plot_score_scatter, write_report_markdown

        model = getattr(engine.network, "module", engine.network)
        config = model.medcore_config
        out = self.output_dir
        images = {
            "Kept heads and MLP channels per block": plot_kept_per_block(
                [len(k) for k in report["kept_heads"]],
                config.dense_heads,
                [len(k) for k in report["kept_channels"]],
                config.dense_mlp_dims,
                out / "kept_per_block.png",
            )
        }
        units = {m["before"].get("units") for d, m in report["metrics"].items() if d != "macro"}
        unit = "mm" if units == {"mm, per volume"} else "px" if units == {"pixels"} else "px / mm"
        images["Encoder parameters vs BF1 and HD95 across the cascade"] = plot_budget_curves(
            report["stages"], out / "budget_curve.png", metrics=("bf1", "hd95"), distance_unit=unit
        )
        if report["leverage"] is not None:
            images[f"Boundary leverage (BLR95 {report['leverage']['summary']['blr95']:.2f})"] = (
                out / "leverage" / "leverage_histogram.png"
            )
        details = engine.state.pruning.details
        if "reset_heads_per_dataset" in details:
            zero, reset = details["zero_heads_per_dataset"].mean(0), details["reset_heads_per_dataset"].mean(0)
            blocks = np.repeat(np.arange(len(config.dense_heads)), config.dense_heads)  # block of each flat score
            scatter = out / "score_scatter.png"
            images["Zero vs reset head scores"] = plot_score_scatter(zero, reset, scatter, blocks=blocks)
        write_report_markdown(report, out / "report.md", images)


def _images_per_dataset(samples: Any) -> dict[str, int]:
    """How many images (slices) recovery drew from, per dataset (sample names are ``<dataset>/<sample>``)."""
    counts: dict[str, int] = {}
    for sample in samples:
        dataset = str(sample["name"]).rpartition("/")[0] or "data"
        counts[dataset] = counts.get(dataset, 0) + 1
    return counts


def _is_main() -> bool:
    import ignite.distributed as idist

    return idist.get_rank() == 0
