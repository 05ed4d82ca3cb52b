"""Explain benchmark: transport-path attributions vs IG, GradientSHAP and occlusion on Kvasir-SEG test images.

Runs the bundle's ``explain`` workflow (the same code users run) and summarises its ``explain.json``: per method the
mean deletion and insertion AUC over images with a 95 % bootstrap interval, the paired difference of every baseline
to the transport path (images resampled), completeness gaps and time per image; with a reference model the share
of the dense-vs-pruned difference inside the boundary band.

    python benchmarks/explain.py --data-root ../shared/data/kvasir_seg --checkpoint outputs/kvasir/model_pruned.pt \\
        --reference bundle/models/medsam_tiny.pth --flow outputs/explain_kvasir/flow.pt \\
        --split-manifest outputs/kvasir/splits.json --images 50 --out docs/benchmarks_explain.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from common import paired_bootstrap, write_results

from medcore_monai.bundle import run_workflow
from medcore_monai.reports.statistics import mean_interval

BASELINES = ("ig_black", "ig_blur", "gradient_shap", "occlusion")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--checkpoint", required=True, help="the model explained")
    parser.add_argument("--reference", default=None, help="the dense model, for the dense-vs-pruned difference")
    parser.add_argument("--flow", required=True, help="a flow trained on the data's training split")
    parser.add_argument("--split-manifest", default=None, help="the pruning run's splits.json")
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--methods", nargs="+", default=["transport", *BASELINES])
    parser.add_argument("--target", default="dice_self")
    parser.add_argument("--path-steps", type=int, default=16)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--deletion-steps", type=int, default=16)
    parser.add_argument("--extra-removals", nargs="*", default=["black"], help="also score deletion with these")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default="outputs/benchmark_explain")
    parser.add_argument("--out", required=True)
    parser.add_argument("--figure-dir", default=None, help="copy the first image's figures here")
    return parser.parse_args()


def _method_rows(images: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        values = {key: [i["methods"][method][key] for i in images] for key in images[0]["methods"][method]}
        row = {"method": method, "n": len(images)}
        auc_keys = [key for key in values if key.startswith(("deletion_auc", "insertion_auc"))]
        for key in [*auc_keys, "relative_completeness_gap", "seconds"]:
            if all(v is not None for v in values[key]):
                row[key] = mean_interval(values[key])
        if method != "transport" and "transport" in methods:
            transport = [i["methods"]["transport"] for i in images]
            for key in auc_keys:
                row[f"transport_minus_{key}"] = paired_bootstrap([t[key] for t in transport], values[key])
        rows.append(row)
    return rows


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    work = Path(args.work_dir)
    summary = run_workflow(
        "explain",
        ("train.yaml", "explain.yaml"),
        data_roots=[args.data_root],
        checkpoint=args.checkpoint,
        reference_checkpoint=args.reference,
        flow_checkpoint=args.flow,
        split_manifest=args.split_manifest,
        prune_dir=str(work / "no_pruning_run"),
        max_images=args.images,
        target=args.target,
        explain_methods=args.methods,
        output_dir=str(work),
        device="cpu",
        progress=True,
        **{
            "explain_settings#path_steps": args.path_steps,
            "explain_settings#points": args.points,
            "explain_settings#deletion_steps": args.deletion_steps,
            "explain_settings#extra_removals": args.extra_removals,
        },
    )
    result = summary[0] if isinstance(summary, list) else summary  # the run section's value, one per step
    report = json.loads(Path(result["explain_json"]).read_text())
    images = [i for i in report["images"] if not i["notes"]]  # an empty mask leaves nothing to attribute
    rows = _method_rows(images, args.methods)
    compared = [i["compression"] for i in images if "compression" in i]
    path_keys = ("round_trip_error", "field_mismatch", "straight_line_field_mismatch")
    facts = {
        "images": len(images),
        "target": args.target,
        "settings": report["settings"],
        "flow": report["flow"],
        "inputs": report["inputs"],
        "path": {key: mean_interval([i["path"][key] for i in images]) for key in path_keys},
        "left_out": report["summary"]["left_out"],
    }
    if compared:
        facts["compression"] = {
            key: mean_interval([c[key] for c in compared]) for key in ("difference_band_mass", "band_area_fraction")
        }
    write_results(args.out, rows, "cpu", args.threads, start, **facts)
    if args.figure_dir:
        Path(args.figure_dir).mkdir(parents=True, exist_ok=True)
        for figure in result["figures"][:2]:
            shutil.copy(figure, Path(args.figure_dir) / Path(figure).name)
    for row in rows:
        print(json.dumps(row, default=float))


if __name__ == "__main__":
    main()
