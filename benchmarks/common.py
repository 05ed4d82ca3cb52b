"""What the Kvasir-SEG benchmarks share: the standard split and models, evaluation, and the result file."""

from __future__ import annotations

import json
import platform
import sys
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
class KvasirSetup:
    """The pair and the project's standard seed-42 split of Kvasir-SEG, with calibration and test samples."""

    data: SplitData
    medsam: MedSAM
    reference: MedSAM | None
    calibration: dict[str, list[dict[str, Any]]]
    test_items: list[dict[str, Any]]
    test_samples: Any


def kvasir_setup(
    kvasir_root: str, medsam: str, sam: str | None, cal_size: int, max_test: int | None, device
) -> KvasirSetup:
    """Load the model (and its parent, if any) and split Kvasir-SEG; test images get deterministic 0-5 px jitter.

    The decoder's target size comes from the model (``size // 4`` for SAM's ViT, ``size`` for LiteMedSAM).
    """
    data = prepare_splits([DatasetSpec(kvasir_root, "kvasir")], seed=SEED, cal_size=cal_size)
    model = MedSAM(load_sam(medsam)).to(device)
    reference = MedSAM(load_sam(sam), pixel_normalize=True).to(device) if sam else None
    calibration = tight_box_samples(data, model.img_size, seed=SEED, lowres_size=model.low_res_size)
    test_items = data.split("kvasir", "test")[:max_test]
    test_samples = preprocess_split(test_items, model.img_size, bbox_shift=5, seed=SEED, lowres_size=model.low_res_size)
    return KvasirSetup(data, model, reference, calibration, test_items, test_samples)


def evaluate_summary(model, samples, device, per_image: bool = False) -> dict:
    """Mean Dice, IoU, BF1, HD95 of ``model`` over preprocessed samples (and the per-image rows on request)."""
    rows = evaluate_model(model, DataLoader(samples, batch_size=8), device)
    summary = summarise(rows)
    if per_image:
        summary["per_image"] = {k: [float(r[k]) for r in rows] for k in ("dice", "iou", "bf1", "hd95") if k in rows[0]}
    return summary


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
