"""Pruning quality on a test split: MedCore against the baselines at three budgets, with paired comparisons.

Usage::

    python benchmarks/quality.py --data-root ../shared/data/kvasir_seg \
        --medsam bundle/models/medsam_tiny.pth --sam bundle/models/sam_tiny.pth --out docs/benchmarks_quality.json
    # LiteMedSAM: no parent offline, so no dual/reset; budgets by encoder FLOPs; zero with and without the boundary
    python benchmarks/quality.py --data-root ../shared/data/kvasir_seg --medsam <lite_medsam.pth> \
        --methods zero zero-plain magnitude random:0 --budgets "-49% FLOPs=0.67" --no-dense-recovery \
        --out docs/benchmarks_quality_litemedsam.json
    # LiteMedSAM's MBConv hidden channels too: a budget label=heads,mlp,mbconv (here about -49 % FLOPs as well)
    python benchmarks/quality.py ... --budgets "-49% FLOPs=0.67" "-49% FLOPs with MBConv=0.58,0.58,0.5"
    # NIfTI volumes (MSD Hippocampus): calibration on training slices, test volumes scored per volume in mm
    python benchmarks/quality.py --data-root ../shared/data/msd_hippocampus --dataset-name hippocampus ...

The split is the project's standard one (seed 42, 60/20/20, calibration = first ``--cal-size`` training images;
slices of a volume stay in one split), the same the tiny pair was trained with, so the test images were never used
for training, calibration, recovery or selection. 2-D test images are scored at the model's input size with
0-5 px box jitter; test volumes by the bundle's own ``evaluate`` workflow (native resolution, per volume, mm).
One calibration (Fisher of the medical model per dataset, of SAM, grouped Taylor) serves every
method, so all methods share the block budgets and the identical recovery (same steps, same sampled images);
only the ranking inside blocks differs. The dense model gets the same two recoveries without pruning.
``zero-plain`` is the zero score without the boundary weighting of the calibration loss: it needs its own Fisher,
hence its own block budgets. Every pruned row is compared image by image with magnitude and random (seed 0) at the
same budget: mean difference and a paired bootstrap interval.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from budgets import Budget, parse_labelled_budgets
from common import dataset_setup, evaluate, paired_bootstrap, training_samples, write_results

from medcore_monai.cascade import recover, run_cascade
from medcore_monai.engines.measure import model_cost
from medcore_monai.engines.recovery import RecoveryConfig, TeacherOutputs, recovery_taps
from medcore_monai.losses.recovery import RecoveryLossWeights
from medcore_monai.networks import MedSAM
from medcore_monai.pruning.cascade import CascadeConfig, score_model_methods

METHODS = [("dual", 0), ("zero", 0), ("reset", 0), ("taylor", 0), ("magnitude", 0), ("random", 0), ("random", 1),
           ("random", 2)]  # fmt: skip
BUDGETS = {"-30%": (0.32, 0.32, 0.0), "-60%": (0.63, 0.63, 0.0), "-80%": (0.84, 0.84, 0.0)}


def _parse_methods(values: list[str] | None) -> list[tuple[str, int]]:
    if not values:
        return METHODS
    out = []
    for value in values:
        name, _, seed = value.partition(":")
        out.append((name, int(seed or 0)))
    return out


def _parse_budgets(values: list[str] | None) -> dict[str, Budget]:
    return parse_labelled_budgets(values) if values else BUDGETS


def _score(medsam, calibration, methods, reference, device):
    """Scores of every method; ``zero-plain`` from a calibration without the boundary weighting."""
    plain = [(m, s) for m, s in methods if m == "zero-plain"]
    weighted = [(m, s) for m, s in methods if m != "zero-plain"]
    scored = score_model_methods(medsam, calibration, weighted, CascadeConfig(), reference, device, progress=True)
    if plain:
        config = CascadeConfig(boundary_fisher_weight=0.0)
        unweighted = score_model_methods(medsam, calibration, [("zero", 0)], config, None, device, progress=True)
        scored[("zero-plain", 0)] = unweighted[("zero", 0)]
    return scored


def _comparisons(rows: list[dict]) -> None:
    """Per-image paired differences against magnitude and random (seed 0) at the same budget, in place."""
    for row in rows:
        if "per_image" not in row or "seed" not in row:
            continue
        for baseline in ("magnitude", "random"):
            same = [r for r in rows if r.get("seed") == 0 and r["budget"] == row["budget"]]
            other = next((r for r in same if r.get("method") == baseline), None)
            if other is None or other is row:
                continue
            row[f"vs_{baseline}"] = {
                k: paired_bootstrap(row["per_image"][k], other["per_image"][k]) for k in ("dice", "bf1", "hd95")
            }


def _dense_with_recovery(medsam, samples, recovery: RecoveryConfig, device) -> MedSAM:
    model = copy.deepcopy(medsam)
    teacher = TeacherOutputs(model, cache=True, taps=recovery_taps(model, recovery.loss))
    teacher.precompute(samples, device)
    for _ in ("heads", "mlp"):  # the same two recoveries the cascade runs
        recover(model, teacher, samples, recovery, device, progress=False)
    return model


def main() -> None:
    """Run every method and budget and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", "--kvasir-root", dest="data_root", required=True, help="images/ + masks/")
    parser.add_argument("--dataset-name", default="kvasir", help="the dataset's name in the split (default kvasir)")
    parser.add_argument("--medsam", required=True)
    parser.add_argument("--sam", default=None, help="the parent model (dual and reset scores need it)")
    parser.add_argument("--methods", nargs="+", default=None, help="method[:seed] ... (default: all eight)")
    parser.add_argument(
        "--budgets", nargs="+", default=None, help="label=sparsity or label=heads,mlp[,mbconv] (default -30/-60/-80 %%)"
    )
    parser.add_argument("--no-dense-recovery", action="store_true", help="skip the dense model's recovery row")
    parser.add_argument("--out", default="docs/benchmarks_quality.json")
    parser.add_argument("--cal-size", type=int, default=128)
    parser.add_argument("--recovery-steps", type=int, default=100, help="steps after each cascade step")
    parser.add_argument("--recovery-lr", type=float, default=1e-5)
    parser.add_argument("--feature-weight", type=float, default=None, help="feature distillation weight (default 0.5)")
    parser.add_argument("--logit-weight", type=float, default=None, help="logit distillation weight (default 2)")
    parser.add_argument(
        "--intermediate-weight", type=float, default=0.0, help="distillation weight of the encoder's stage outputs"
    )
    parser.add_argument(
        "--recovery-images",
        type=int,
        default=None,
        help="recover on the first N training images (default: calibration)",
    )
    parser.add_argument(
        "--reestimate-batchnorm", action="store_true", help="recompute BatchNorm statistics after each pruning step"
    )
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from an existing --out JSON")
    args = parser.parse_args()
    if args.plot_only:
        plot_curves(json.loads(Path(args.out).read_text())["rows"], Path(args.out).with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()

    setup = dataset_setup(
        args.data_root, args.medsam, args.sam, args.cal_size, args.max_test, device, name=args.dataset_name
    )
    medsam, reference, calibration = setup.medsam, setup.reference, setup.calibration
    loss = RecoveryLossWeights()
    loss = dataclasses.replace(
        loss,
        feature=loss.feature if args.feature_weight is None else args.feature_weight,
        logit=loss.logit if args.logit_weight is None else args.logit_weight,
        intermediate=args.intermediate_weight,
    )
    recovery = RecoveryConfig(steps=args.recovery_steps, lr=args.recovery_lr, seed=42, loss=loss)
    pooled = [s for group in calibration.values() for s in group]
    recovery_samples = training_samples(setup, args.recovery_images) if args.recovery_images else pooled

    methods, budgets = _parse_methods(args.methods), _parse_budgets(args.budgets)
    volumes = list(dict.fromkeys(item.get("volume") for item in setup.test_items))
    facts = {
        "dataset": setup.name,
        "test_images": len(setup.test_items),
        "test_volumes": len(volumes[: args.max_test]) if setup.volumes else None,
        "calibration_images": sum(len(v) for v in calibration.values()),
        "recovery_images": len(recovery_samples),
        "recovery_loss_weights": dataclasses.asdict(loss),
    }
    rows: list[dict] = []

    def add(row: dict) -> None:
        # every row is written as it comes, so an interrupted run keeps what it measured
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_image"}), flush=True)
        write_results(args.out, rows, device, args.threads, start, complete=False, **facts)

    add({"method": "dense (no recovery)", "budget": "0%", **model_cost(medsam), **evaluate(medsam, setup, device)})
    if not args.no_dense_recovery:
        dense = _dense_with_recovery(medsam, recovery_samples, recovery, device)
        add({"method": "dense + recovery", "budget": "0%", **model_cost(dense), **evaluate(dense, setup, device)})

    scored = _score(medsam, calibration, methods, reference, device)
    for budget, (heads, mlp, mbconv) in budgets.items():
        for (method, seed), precomputed in scored.items():
            model = copy.deepcopy(medsam)
            config = CascadeConfig(
                head_sparsity=heads,
                mlp_sparsity=mlp,
                mbconv_sparsity=mbconv,
                reestimate_batchnorm=args.reestimate_batchnorm,
                score="zero" if method == "zero-plain" else method,
                seed=seed,
                recovery=recovery,
            )
            result = run_cascade(
                model,
                calibration,
                config,
                reference,
                device,
                progress=False,
                precomputed=precomputed,
                recovery_samples=recovery_samples,
            )
            row = {"method": method, "seed": seed, "budget": budget, **model_cost(model)}
            row["achieved"] = [r.achieved_sparsity for r in result.budgets]
            add(row | evaluate(model, setup, device))
    _comparisons(rows)
    write_results(args.out, rows, device, args.threads, start, complete=True, **facts)
    _print_summary(rows)
    plot_curves(rows, Path(args.out).with_suffix(".png"))


def curve_rows(rows: list[dict]) -> list[dict]:
    """One row per (method, budget): seeds averaged, with ``<metric>_std``; the dense model starts every line.

    The dense start is the dense model after the same recoveries when that row was measured, else the dense model.
    """
    by_method = {r["method"]: r for r in rows}
    dense = by_method.get("dense + recovery") or by_method["dense (no recovery)"]
    grouped: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if "seed" in row:
            grouped.setdefault((row["method"], row["budget"]), []).append(row)
    out = []
    for method in dict.fromkeys(m for m, _ in grouped):
        out.append({**dense, "method": method})
        for (name, _), group in grouped.items():
            if name != method:
                continue
            merged = {"method": method, "encoder_params": group[0]["encoder_params"]}
            for key in ("dice", "bf1", "hd95"):
                values = [r[key] for r in group]
                merged[key] = float(np.mean(values))
                if len(values) > 1:
                    merged[f"{key}_std"] = float(np.std(values))
            out.append(merged)
    return out


def plot_curves(rows: list[dict], path: Path) -> Path:
    """Encoder parameters against BF1 and HD95, one line per method."""
    from medcore_monai.reports import plot_budget_curves

    return plot_budget_curves(curve_rows(rows), path, x="encoder_params", metrics=("bf1", "hd95"))


def _print_summary(rows: list[dict]) -> None:
    by_key: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_key.setdefault((row["budget"], row["method"]), []).append(row)
    for (budget, method), group in by_key.items():
        dice = np.mean([r["dice"] for r in group])
        bf1 = np.mean([r["bf1"] for r in group])
        print(f"{budget:>5} {method:<20} dice {dice:.4f} bf1 {bf1:.4f} (n={len(group)})")


if __name__ == "__main__":
    main()
