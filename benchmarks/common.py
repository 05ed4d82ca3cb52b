"""What the benchmarks share: the standard split and models, evaluation (2-D images or volumes), the result file."""

from __future__ import annotations

import copy
import csv
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader

from medcore_monai.engines.evaluation import evaluate_model, summarise
from medcore_monai.networks import MedSAM, load_sam
from medcore_monai.transforms.samples import DatasetSpec, SplitData, prepare_splits, preprocess_split, tight_box_samples

SEED = 42


@dataclass
class DatasetSetup:
    """A model (and its parent, if any) and the project's standard seed-42 split of one dataset.

    ``volumes`` is true for NIfTI data: its slices are calibration samples, its test split is scored per volume
    in millimetres by the bundle's evaluator (:func:`evaluate_volumes`).
    """

    root: str
    name: str
    data: SplitData
    medsam: MedSAM
    reference: MedSAM | None
    calibration: dict[str, list[dict[str, Any]]]
    test_items: list[dict[str, Any]]
    test_samples: Any
    max_test: int | None = None

    @property
    def volumes(self) -> bool:
        """Whether the items are slices of volumes."""
        return "volume" in self.test_items[0]


def dataset_setup(
    root: str,
    medsam: str,
    sam: str | None,
    cal_size: int,
    max_test: int | None,
    device,
    name: str = "kvasir",
) -> DatasetSetup:
    """Load the model (and its parent, if any) and split the dataset; test images get deterministic 0-5 px jitter.

    The decoder's target size comes from the model (``size // 4`` for SAM's ViT, ``size`` for LiteMedSAM).
    ``max_test`` limits test images (2-D) or test volumes.
    """
    data = prepare_splits([DatasetSpec(root, name)], seed=SEED, cal_size=cal_size)
    model = MedSAM(load_sam(medsam)).to(device)
    reference = MedSAM(load_sam(sam), pixel_normalize=True).to(device) if sam else None
    calibration = tight_box_samples(data, model.img_size, seed=SEED, lowres_size=model.low_res_size)
    test_items = data.split(name, "test")
    test_samples = None  # volumes are read by the bundle's evaluator
    if "volume" not in test_items[0]:
        test_items = test_items[:max_test]
        test_samples = preprocess_split(test_items, model.img_size, 5, SEED, lowres_size=model.low_res_size)
    return DatasetSetup(root, name, data, model, reference, calibration, test_items, test_samples, max_test)


def kvasir_setup(
    kvasir_root: str, medsam: str, sam: str | None, cal_size: int, max_test: int | None, device
) -> DatasetSetup:
    """:func:`dataset_setup` of Kvasir-SEG."""
    return dataset_setup(kvasir_root, medsam, sam, cal_size, max_test, device, name="kvasir")


def training_samples(setup: DatasetSetup, count: int) -> list[dict[str, Any]]:
    """The first ``count`` training images with tight boxes, named like the calibration samples (which they include:
    the calibration images are the first ones of the training split)."""
    model = setup.medsam
    items = setup.data.split(setup.name, "train")[:count]
    samples = preprocess_split(items, model.img_size, 0, SEED, lowres_size=model.low_res_size)
    return [dict(samples[i]) | {"name": f"{setup.name}/{samples[i]['name']}"} for i in range(len(samples))]


def pruned_without_recovery(setup: DatasetSetup, method: str, budget: str) -> tuple[str, MedSAM]:
    """``(label, model)``: a copy of the setup's model pruned by both cascade steps with no recovery in between.

    ``budget`` is one ``label=spec`` of :mod:`budgets`; block budgets come from the setup's calibration.
    """
    from budgets import parse_labelled_budgets

    from medcore_monai.cascade import run_cascade
    from medcore_monai.engines.recovery import RecoveryConfig
    from medcore_monai.pruning.cascade import CascadeConfig, score_model_methods

    (label, (heads, mlp, mbconv)), *_ = parse_labelled_budgets([budget]).items()
    medsam = setup.medsam
    scored = score_model_methods(medsam, setup.calibration, [(method, 0)], CascadeConfig(), None, "cpu", False)
    pruned = copy.deepcopy(medsam)
    cascade = CascadeConfig(
        head_sparsity=heads,
        mlp_sparsity=mlp,
        mbconv_sparsity=mbconv,
        score=method,
        recovery=RecoveryConfig(steps=0),
    )
    run_cascade(pruned, setup.calibration, cascade, None, "cpu", progress=False, precomputed=scored[(method, 0)])
    return label, pruned


def evaluate_summary(model, samples, device, per_image: bool = False) -> dict:
    """Mean Dice, IoU, BF1, HD95 of ``model`` over preprocessed samples (and the per-image rows on request)."""
    rows = evaluate_model(model, DataLoader(samples, batch_size=8), device)
    summary = summarise(rows)
    if per_image:
        summary["per_image"] = {k: [float(r[k]) for r in rows] for k in ("dice", "iou", "bf1", "hd95") if k in rows[0]}
    return summary


def evaluate_volumes(model, setup: DatasetSetup, device) -> dict:
    """Per-volume metrics in mm of the test split, by the bundle's own ``evaluate`` workflow.

    The model is saved to a temporary checkpoint and the split manifest beside it, so the bundle scores exactly
    the test volumes of ``setup`` (native resolution, slice by slice, metrics per volume in mm). Returns the
    dataset's means and ``per_image`` (per volume, in file order) like :func:`evaluate_summary`.
    """
    from medcore_monai.bundle import run_workflow
    from medcore_monai.networks import save_sam

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = save_sam(model, Path(folder) / "model.pt")
        setup.data.manifest.save(Path(folder) / "splits.json")
        run_workflow(
            "evaluate",
            ["train.yaml", "evaluate.yaml"],
            checkpoint=str(checkpoint),
            data_roots=[setup.root],
            dataset_names=[setup.name],
            output_dir=folder,
            max_eval_images=setup.max_test,
            latency=False,
            progress=False,
            device=f"$torch.device('{device}')",
        )
        report = json.loads((Path(folder) / "evaluation" / "evaluation.json").read_text())
        summary = dict(report["metrics"][setup.name])
        raw = Path(folder) / "evaluation"
        summary["per_image"] = {key: _raw_column(raw / f"val_{key}_raw.csv") for key in ("dice", "iou", "bf1", "hd95")}
    return summary


def _raw_column(path: Path) -> list[float]:
    with path.open() as handle:
        return [float(row["mean"]) for row in csv.DictReader(handle)]


def evaluate(model, setup: DatasetSetup, device) -> dict:
    """Test-split metrics with per-item values: per image at model size (2-D) or per volume in mm (NIfTI)."""
    if setup.volumes:
        return evaluate_volumes(model, setup, device)
    return evaluate_summary(model, setup.test_samples, device, per_image=True)


def paired_bootstrap(a, b, n_bootstrap: int = 2000, seed: int = 0, ci: float = 0.95) -> dict:
    """Mean of the per-image difference ``a - b`` with its percentile bootstrap interval (images resampled)."""
    import numpy as np

    from medcore_monai.reports.statistics import mean_interval

    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return mean_interval(diff, n_bootstrap, seed, ci)


def write_results(out: str | Path, rows: list[dict], device, threads: int, start: float, **facts: Any) -> None:
    """``{"meta", "rows"}`` JSON with the date, machine, command line and run time next to ``facts``."""
    meta = {
        "date": date.today().isoformat(),
        "device": str(device),
        "machine": f"{platform.machine()}, {threads} threads, torch {torch.__version__}",
        "command": " ".join(sys.argv),
        **facts,
        "seconds": time.perf_counter() - start,
    }
    Path(out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float))
