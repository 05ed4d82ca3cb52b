"""End-to-end demo of the model layer and pruning core on real or synthetic images.

Run ``python -m medcore_monai.demo --help``. Steps: build or load a SAM/MedSAM model, preprocess the
images the MedSAM way, compute the boundary-aware Fisher of the encoder on them, score heads and MLP
channels (zero intervention: no SAM reference needed), prune to the requested budgets, slim the model
physically, check that the slim model equals the masked one, evaluate both, and save the compact
checkpoint plus ``report.json`` in ``--output-dir`` (default :data:`DEFAULT_OUTPUT_DIR`). The demo never writes
to the bundle's default job folder ``outputs/demo``: that folder's ``report.md`` and ``report.json`` belong to
one bundle run, and a demo report there would silently replace the bundle's.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader

from .data import folder_pairs
from .engines.evaluation import evaluate_model, summarise
from .files import write_json_atomic
from .networks import (
    MedSAM,
    StructuredMasks,
    attach_masks,
    build_sam,
    count_parameters,
    encoder_flops,
    encoder_structure,
    load_sam,
    save_sam,
    slim_encoder_,
)
from .pruning import block_sensitivity, compute_fisher, plan_masks, zero_scores
from .transforms import medsam_preprocess

logger = logging.getLogger("medcore_monai.demo")

DEFAULT_OUTPUT_DIR = "outputs/model_layer_demo"
BUNDLE_OUTPUT_DIR = "outputs/demo"  # output_dir of configs/demo.yaml, the bundle's default job


def synthetic_items(count: int, size: int, seed: int) -> list[dict[str, Any]]:
    """Noisy channel-first images with one elliptical object each (for runs without a dataset)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    items = []
    for i in range(count):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        ry, rx = rng.uniform(0.1, 0.25, 2) * size
        mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0).astype(np.uint8)
        image = rng.normal(0.3, 0.05, (3, size, size)) + mask[None] * rng.uniform(0.2, 0.5, (3, 1, 1))
        items.append({"image": image.astype(np.float32), "label": mask, "name": f"synthetic_{i:03d}"})
    return items


def write_synthetic_pairs(
    root: str | Path, count: int, size: int, seed: int, mask_value: int = 255
) -> list[dict[str, str]]:
    """Save :func:`synthetic_items` as an image/mask folder (``images/<name>.png``, ``masks/<name>.png``).

    Masks are ``0/mask_value`` PNGs. Returns the ``{"image", "label"}`` path items, in the order written.
    """
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    pairs = []
    for item in synthetic_items(count, size, seed=seed):
        image = (np.clip(np.moveaxis(item["image"], 0, -1), 0, 1) * 255).astype(np.uint8)
        image_path, label_path = root / "images" / f"{item['name']}.png", root / "masks" / f"{item['name']}.png"
        Image.fromarray(image).save(image_path)
        Image.fromarray((item["label"] * mask_value).astype(np.uint8)).save(label_path)
        pairs.append({"image": str(image_path), "label": str(label_path)})
    return pairs


def _data(args: argparse.Namespace, size: int) -> tuple[list[dict[str, Any]], str]:
    if args.data_root:
        pairs = folder_pairs(args.data_root)[: args.num_images]
        source = f"{args.data_root} ({len(pairs)} pairs)"
    else:
        pairs = synthetic_items(args.num_images, size, args.seed)
        source = f"synthetic ellipses ({len(pairs)})"
    transform = medsam_preprocess(size=size, bbox_shift=0, seed=args.seed)
    return [transform(item) for item in pairs], source


def _model(args: argparse.Namespace) -> torch.nn.Module:
    if args.checkpoint:
        return load_sam(args.checkpoint)
    return build_sam(args.model_type, seed=args.seed)


def check_output_dir(output_dir: str | Path) -> Path:
    """Return ``output_dir`` as a path, refusing the bundle's default job folder.

    Args:
        output_dir: Folder the demo is asked to write to (relative paths resolve against the working directory,
            as the bundle's do).

    Returns:
        ``output_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``output_dir`` is the bundle's ``outputs/demo`` folder.
    """
    path = Path(output_dir)
    if path.resolve() == Path(BUNDLE_OUTPUT_DIR).resolve():
        raise ValueError(
            f"{output_dir} is the bundle's default job folder; the demo would overwrite its report.json. "
            f"Use another --output-dir (default: {DEFAULT_OUTPUT_DIR})."
        )
    return path


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Execute the demo and return the report (also written to ``output_dir/report.json``).

    Raises:
        ValueError: If ``args.output_dir`` is the bundle's default job folder (checked before any work).
    """
    output_dir = check_output_dir(args.output_dir)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    sam = _model(args).to(device)
    model = MedSAM(sam)
    samples, source = _data(args, model.img_size)
    loader = DataLoader(samples, batch_size=1, shuffle=False)

    dense_params = count_parameters(sam.image_encoder)
    dense_flops = encoder_flops(sam.image_encoder)
    dense_metrics = summarise(evaluate_model(model, loader, device))

    fisher = compute_fisher(model, loader, device=device, progress=not args.quiet)
    structure = encoder_structure(sam.image_encoder)
    scores = zero_scores(fisher.fisher, dict(sam.image_encoder.named_parameters()), structure)
    masks, budget = plan_masks(
        StructuredMasks.full(structure),
        scores.heads,
        scores.channels,
        block_sensitivity(fisher.fisher, len(structure)),
        head_sparsity=args.head_sparsity,
        mlp_sparsity=args.mlp_sparsity,
    )
    probe = next(iter(loader))
    with torch.no_grad(), attach_masks(sam.image_encoder, masks):
        masked_logits = model(probe["image"].to(device), probe["box"].to(device))
        masked_metrics = summarise(evaluate_model(model, loader, device))
    slim_encoder_(sam.image_encoder, masks)
    with torch.no_grad():
        slim_logits = model(probe["image"].to(device), probe["box"].to(device))
    max_diff = float((slim_logits - masked_logits).abs().max())
    slim_metrics = summarise(evaluate_model(model, loader, device))

    checkpoint = save_sam(sam, output_dir / "compact_model.pth", metadata={"demo": vars(args)})
    report = {
        "source_model": args.checkpoint or f"random {args.model_type} (seed {args.seed})",
        "data": source,
        "fisher_samples": {"used": fisher.used, "skipped": fisher.skipped},
        "budgets": [r.to_dict() for r in budget],
        "encoder_params": {"dense": dense_params, "compact": count_parameters(sam.image_encoder)},
        "encoder_flops": {"dense": dense_flops, "compact": encoder_flops(sam.image_encoder)},
        "kept_heads_per_block": [len(k) for k in masks.kept_heads()],
        "kept_channels_per_block": [len(k) for k in masks.kept_channels()],
        "max_abs_diff_masked_vs_compact": max_diff,
        "metrics": {"dense": dense_metrics, "masked": masked_metrics, "compact": slim_metrics},
        "compact_checkpoint": str(checkpoint),
        "seconds": time.perf_counter() - start,
    }
    write_json_atomic(output_dir / "report.json", report)
    return report


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the demo."""
    parser = argparse.ArgumentParser(prog="python -m medcore_monai.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="SAM/MedSAM checkpoint (official formats); default: random tiny model")
    parser.add_argument("--model-type", default="tiny", help="preset used without --checkpoint (default: tiny)")
    parser.add_argument("--data-root", help="folder with images/ and masks/ (e.g. Kvasir-SEG); default: synthetic")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--head-sparsity", type=float, default=0.5)
    parser.add_argument("--mlp-sparsity", type=float, default=0.5)
    parser.add_argument(
        "--output-dir",
        default=DEFAULT_OUTPUT_DIR,
        help=f"folder for compact_model.pth and report.json (default: {DEFAULT_OUTPUT_DIR}; {BUNDLE_OUTPUT_DIR}, "
        "the bundle's default job folder, is refused)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_output_dir(args.output_dir)
    except ValueError as error:
        parser.error(str(error))  # exits with status 2, before any model is built
    report = run_demo(args)
    print(json.dumps({k: report[k] for k in ("encoder_params", "encoder_flops", "metrics")}, indent=2))
    print(f"max |masked - compact| = {report['max_abs_diff_masked_vs_compact']:.2e}; report in {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
