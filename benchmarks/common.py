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
    reference: MedSAM
    calibration: dict[str, list[dict[str, Any]]]
    test_items: list[dict[str, Any]]
    test_samples: Any


def kvasir_setup(kvasir_root: str, medsam: str, sam: str, cal_size: int, max_test: int | None, device) -> KvasirSetup:
    """Load the pair and split Kvasir-SEG; test images are decoded once, with deterministic 0-5 px box jitter."""
    data = prepare_splits([DatasetSpec(kvasir_root, "kvasir")], seed=SEED, cal_size=cal_size)
    model = MedSAM(load_sam(medsam)).to(device)
    reference = MedSAM(load_sam(sam), pixel_normalize=True).to(device)
    calibration = tight_box_samples(data, model.img_size, seed=SEED)
    test_items = data.split("kvasir", "test")[:max_test]
    test_samples = preprocess_split(test_items, model.img_size, bbox_shift=5, seed=SEED)
    return KvasirSetup(data, model, reference, calibration, test_items, test_samples)


def evaluate_summary(model, samples, device) -> dict:
    """Mean Dice, IoU, BF1, HD95 of ``model`` over preprocessed samples."""
    return summarise(evaluate_model(model, DataLoader(samples, batch_size=8), device))


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
