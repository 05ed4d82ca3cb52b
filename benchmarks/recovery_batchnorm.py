"""Recovery with BatchNorm statistics updated or kept: what a short recovery does to the *dense* LiteMedSAM.

Usage::

    python benchmarks/recovery_batchnorm.py --data-root ../shared/data/kvasir_seg --medsam <lite_medsam.pth> \
        --steps 40 --lr 1e-4 --val-images 48 --out docs/benchmarks_recovery_batchnorm.json

The dense model is its own teacher, so a good recovery should leave it about where it is. Recovery runs batch 1
on the calibration images of the standard seed-42 split (as the cascade does); LiteMedSAM's TinyViT has 27
BatchNorm layers, and in train mode every step replaces part of their running statistics with one image's batch
statistics. Both variants start from the same weights, draw the same recovery images and are scored on the same
validation images (never the test split: this selects a design). ``bn_train`` monkeypatches the recovery's
freezing back to the old behaviour (every encoder module in train mode).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from common import SEED, dataset_setup, evaluate_summary, paired_bootstrap, write_results
from torch import nn

from medcore_monai.cascade import recover
from medcore_monai.engines import recovery as recovery_module
from medcore_monai.engines.recovery import RecoveryConfig, TeacherOutputs
from medcore_monai.transforms.samples import preprocess_split

_KEEPING = recovery_module.freeze_for_recovery


def _updating_statistics(model: nn.Module) -> list[nn.Parameter]:
    """The recovery's freezing as it was: BatchNorm layers left in train mode."""
    params = _KEEPING(model)
    getattr(model, "module", model).image_encoder.train()
    return params


def main() -> None:
    """Recover the dense model both ways and score it on validation images."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--medsam", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4])
    parser.add_argument("--cal-size", type=int, default=16)
    parser.add_argument("--val-images", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/benchmarks_recovery_batchnorm.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    setup = dataset_setup(args.data_root, args.medsam, None, args.cal_size, 1, "cpu")
    medsam = setup.medsam
    val = setup.data.split(setup.name, "val")[: args.val_images]
    samples = preprocess_split(val, medsam.img_size, 5, SEED, lowres_size=medsam.low_res_size)
    pooled = [s for group in setup.calibration.values() for s in group]
    rows = [{"variant": "dense", **evaluate_summary(medsam, samples, "cpu", per_image=True)}]
    for lr in args.lr:
        for variant, freeze in (("bn_train", _updating_statistics), ("bn_eval", _KEEPING)):
            recovery_module.freeze_for_recovery = freeze
            model = copy.deepcopy(medsam)
            teacher = TeacherOutputs(medsam, cache=True).precompute(pooled, "cpu")
            config = RecoveryConfig(steps=args.steps, lr=lr, seed=SEED)
            recover(model, teacher, pooled, config, "cpu", progress=False)
            rows.append({"variant": variant, "lr": lr, **evaluate_summary(model, samples, "cpu", per_image=True)})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_image"}), flush=True)
    recovery_module.freeze_for_recovery = _KEEPING
    for row in rows[1:]:
        row["vs_dense"] = {
            metric: paired_bootstrap(row["per_image"][metric], rows[0]["per_image"][metric])
            for metric in ("dice", "bf1", "hd95")
        }
    facts = {"steps": args.steps, "calibration_images": len(pooled), "validation_images": len(samples)}
    write_results(args.out, rows, "cpu", args.threads, start, **facts)


if __name__ == "__main__":
    main()
