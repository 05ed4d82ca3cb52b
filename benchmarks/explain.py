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


def _method_rows(summary: dict, images: list[dict], methods: list[str]) -> list[dict]:
    """The workflow's per-method summary, with each baseline's paired difference to the transport path."""
    rows = []
    for method in methods:
        row = {"method": method, "n": summary["images"], **summary[method]}
        if method != "transport" and "transport" in methods:
            for key in [k for k in summary[method] if k.startswith(("deletion_auc", "insertion_auc"))]:
                transport = [i["methods"]["transport"][key] for i in images]
                row[f"transport_minus_{key}"] = paired_bootstrap(transport, [i["methods"][method][key] for i in images])
        rows.append(row)
    return rows


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    work = Path(args.work_dir)
    returned = run_workflow(
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
    result = returned[0] if isinstance(returned, list) else returned  # the run section's value, one per step
    report = json.loads(Path(result["explain_json"]).read_text())
    images = [i for i in report["images"] if not i["notes"]]  # as in the summary: an empty mask attributes nothing
    summary = report["summary"]
    rows = _method_rows(summary, images, args.methods)
    facts = {
        "images": summary["images"],
        "target": args.target,
        "settings": report["settings"],
        "flow": report["flow"],
        "inputs": report["inputs"],
        "path": summary.get("path"),
        "left_out": summary["left_out"],
    }
    if "compression" in summary:
        facts["compression"] = summary["compression"]
    write_results(args.out, rows, "cpu", args.threads, start, **facts)
    if args.figure_dir:
        Path(args.figure_dir).mkdir(parents=True, exist_ok=True)
        for figure in result["figures"][:2]:
            shutil.copy(figure, Path(args.figure_dir) / Path(figure).name)
    for row in rows:
        print(json.dumps(row, default=float))


if __name__ == "__main__":
    main()
