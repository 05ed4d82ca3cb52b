"""Clean vs degraded Dice on the Kvasir-SEG test split: dense, pruned, and pruned with a fine-tuned decoder.

Usage::

    python benchmarks/robustness.py --kvasir-root ../shared/data/kvasir_seg \
        --medsam bundle/models/medsam_tiny.pth --sam bundle/models/sam_tiny.pth --out docs/benchmarks_robustness.json

Models, all from the shipped tiny pair and the project's standard split (seed 42; the test images were never
used for training, calibration, recovery or selection):

* ``dense``: medsam-tiny;
* ``pruned``: medsam-tiny pruned by MedCore (``dual``) at group sparsity ``--sparsity`` with recovery;
* ``pruned + decoder FT``: the pruned model whose plain SAM decoder is fine-tuned (decoder only) on
  corrupted training images, a control that isolates what training on corruptions alone buys;
* ``pruned + robust decoder``: RobustMedSAM's recipe on the pruned model: a RobustSAM-architecture decoder
  (SAM parts copied from the pruned model's decoder, anti-degradation modules new, since no tiny RobustSAM
  checkpoint exists) fine-tuned decoder-only on the same corrupted images, with the same optimiser and epochs.

Each model is evaluated on clean test images and on every corruption at each of ``--severities``
(corruptions are applied at model size after min-max scaling; box prompts stay clean, 0-5 px jitter).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import evaluate_summary, kvasir_setup, write_results
from monai.data import DataLoader

from medcore_monai.cascade import run_cascade
from medcore_monai.engines.evaluation import degraded
from medcore_monai.engines.finetune import finetune
from medcore_monai.engines.measure import model_cost
from medcore_monai.networks import MedSAM, RobustMaskDecoder, RobustMedSAM
from medcore_monai.pruning.cascade import CascadeConfig, RecoveryConfig
from medcore_monai.transforms import CORRUPTIONS, SEVERITIES, medsam_preprocess
from medcore_monai.transforms.corruptions import corrupted_once, with_random_corruption
from medcore_monai.transforms.samples import preprocess_split


def _with_robust_decoder(model: MedSAM) -> RobustMedSAM:
    robust = copy.deepcopy(model)
    config = robust.medcore_config
    robust.mask_decoder = RobustMaskDecoder.from_sam_decoder(robust.mask_decoder, config.embed_dim, config.grid_size)
    return RobustMedSAM(robust)


def _corrupted_training_data(items, val_samples, size: int, seed: int):
    """Training pipeline with a random corruption (or clean) per image, and a fixed corrupted validation set."""
    from medcore_monai.data.cache import build_dataset

    base = medsam_preprocess(size, bbox_shift=5, seed=seed, deterministic=False)
    pipeline = with_random_corruption(base, CORRUPTIONS, SEVERITIES, seed)
    return build_dataset(list(items), pipeline), corrupted_once(val_samples, CORRUPTIONS, SEVERITIES, seed)


def _decoder_finetuned(model, train_ds, val_ds, args, device) -> tuple[MedSAM, dict]:
    model = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as folder:
        result = finetune(
            model,
            DataLoader(train_ds, batch_size=args.batch_size, shuffle=True),
            DataLoader(val_ds, batch_size=args.batch_size),
            folder,
            epochs=args.epochs,
            lr=args.lr,
            patience=0,
            device=device,
            progress=False,
            seed=42,
            trainable=("mask_decoder",),
        )
    history = [{k: e[k] for k in ("epoch", "train_loss", "val_loss")} for e in result["history"]]
    return model.eval(), {"best_epoch": result["best_epoch"], "history": history}


def _robustness_rows(name: str, model, test_samples, severities, device, extra: dict) -> dict:
    clean = evaluate_summary(model, test_samples, device)
    degraded_rows = {}
    for corruption in CORRUPTIONS:
        for severity in severities:
            summary = evaluate_summary(model, degraded(test_samples, corruption, severity, seed=42), device)
            degraded_rows[f"{corruption}@{severity}"] = summary
    by_severity = {str(s): float(np.mean([degraded_rows[f"{c}@{s}"]["dice"] for c in CORRUPTIONS])) for s in severities}
    row = {
        "model": name,
        **model_cost(model),
        "clean": clean,
        "degraded": degraded_rows,
        "mean_degraded_dice": float(np.mean([r["dice"] for r in degraded_rows.values()])),
        "mean_degraded_dice_by_severity": by_severity,
        **extra,
    }
    print(json.dumps({k: v for k, v in row.items() if k not in ("degraded",)}, default=float), flush=True)
    return row


def main() -> None:
    """Build the four models, evaluate them clean and degraded, and write the JSON and figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kvasir-root", required=True)
    parser.add_argument("--medsam", required=True)
    parser.add_argument("--sam", required=True)
    parser.add_argument("--out", default="docs/benchmarks_robustness.json")
    parser.add_argument("--sparsity", type=float, default=0.63)
    parser.add_argument("--cal-size", type=int, default=128)
    parser.add_argument("--recovery-steps", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)  # RobustMedSAM paper; its repo default is 1e-4
    parser.add_argument("--severities", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--max-train", type=int, default=None, help="fewer training images (smoke runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from an existing --out JSON")
    parser.add_argument("--markdown", action="store_true", help="print the tables of an existing --out JSON")
    args = parser.parse_args()
    if args.plot_only or args.markdown:
        rows = json.loads(Path(args.out).read_text())["rows"]
        if args.markdown:
            print(markdown_tables(rows))
        if args.plot_only:
            plot_robustness(rows, Path(args.out).with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()

    setup = kvasir_setup(args.kvasir_root, args.medsam, args.sam, args.cal_size, args.max_test, device)
    data, dense, test_samples = setup.data, setup.medsam, setup.test_samples
    val_samples = preprocess_split(data.split("kvasir", "val")[: args.max_test], dense.img_size, bbox_shift=5, seed=42)
    train_items = data.split("kvasir", "train")[: args.max_train]
    train_ds, val_ds = _corrupted_training_data(train_items, val_samples, dense.img_size, 42)

    pruned = copy.deepcopy(dense)
    recovery = RecoveryConfig(steps=args.recovery_steps, lr=1e-5, seed=42)
    config = CascadeConfig(head_sparsity=args.sparsity, mlp_sparsity=args.sparsity, score="dual", recovery=recovery)
    run_cascade(pruned, setup.calibration, config, setup.reference, device, progress=False)
    vanilla_ft, vanilla_log = _decoder_finetuned(pruned, train_ds, val_ds, args, device)
    robust_ft, robust_log = _decoder_finetuned(_with_robust_decoder(pruned), train_ds, val_ds, args, device)

    rows = [
        _robustness_rows("dense", dense, test_samples, args.severities, device, {}),
        _robustness_rows("pruned", pruned, test_samples, args.severities, device, {}),
        _robustness_rows("pruned + decoder FT", vanilla_ft, test_samples, args.severities, device, vanilla_log),
        _robustness_rows("pruned + robust decoder", robust_ft, test_samples, args.severities, device, robust_log),
    ]
    write_results(
        args.out,
        rows,
        device,
        args.threads,
        start,
        test_images=len(setup.test_items),
        train_images=len(train_ds),
        severities=args.severities,
    )
    plot_robustness(rows, Path(args.out).with_suffix(".png"))


def markdown_tables(rows: list[dict]) -> str:
    """A summary table (cost, clean and degraded Dice/BF1) and a per-corruption Dice table."""
    severities = list(rows[0]["mean_degraded_dice_by_severity"])
    header = ["model", "encoder params", "total params", "total GFLOPs", "clean Dice", "clean BF1"]
    header += [f"degraded Dice, severity {s}" for s in severities] + ["mean degraded Dice", "mean degraded BF1"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        bf1 = np.mean([v["bf1"] for v in row["degraded"].values()])
        cells = [
            row["model"],
            f"{row['encoder_params'] / 1e6:.2f} M",
            f"{row['total_params'] / 1e6:.2f} M",
            f"{row['total_flops'] / 1e9:.2f}",
            f"{row['clean']['dice']:.4f}",
            f"{row['clean']['bf1']:.4f}",
            *(f"{row['mean_degraded_dice_by_severity'][s]:.4f}" for s in severities),
            f"{row['mean_degraded_dice']:.4f}",
            f"{bf1:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| corruption (Dice, mean over severities) | " + " | ".join(r["model"] for r in rows) + " |"]
    lines.append("|" + "---|" * (len(rows) + 1))
    for corruption in CORRUPTIONS:
        values = [np.mean([v["dice"] for k, v in r["degraded"].items() if k.split("@")[0] == corruption]) for r in rows]
        lines.append(f"| {corruption} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    return "\n".join(lines)


def plot_robustness(rows: list[dict], path: Path) -> Path:
    """Dice per corruption (mean over the severities) for each model, clean first."""
    from matplotlib.figure import Figure

    from medcore_monai.reports.plots import save_figure_atomic

    labels = ["clean", *CORRUPTIONS]
    figure = Figure(figsize=(12, 4.2), layout="constrained")
    axes = figure.subplots()
    width = 0.8 / len(rows)
    lowest, highest = 1.0, 0.0
    for i, row in enumerate(rows):
        values = [row["clean"]["dice"]]
        for corruption in CORRUPTIONS:
            values.append(np.mean([v["dice"] for k, v in row["degraded"].items() if k.split("@")[0] == corruption]))
        axes.bar(np.arange(len(labels)) + (i - (len(rows) - 1) / 2) * width, values, width, label=row["model"])
        lowest, highest = min(lowest, *values), max(highest, *values)
    axes.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    axes.set_ylabel("Dice (Kvasir-SEG test, mean over severities)")
    # the differences are a few points: zoom in rather than start at 0
    axes.set_ylim(max(0.0, lowest - 0.05), min(1.0, highest + 0.04))
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, ncols=len(rows))
    return save_figure_atomic(figure, path)


if __name__ == "__main__":
    main()
