"""Entry points of the bundle workflows: prune, evaluate, export, infer, finetune, leverage.

Each function takes plain keyword settings (the bundle's config keys), checks its inputs before doing any
work, writes its outputs atomically into ``output_dir`` and returns a JSON-safe summary. The bundle configs
only call these.
"""

from __future__ import annotations

import ast
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from .data.datasets import (
    SplitData,
    dataset_specs,
    is_volumetric,
    load_items,
    prepare_splits,
    preprocess_split,
)
from .data.splits import SplitManifest
from .engines.common import input_problems, raise_problems
from .engines.evaluation import evaluate_items, predict_native, slices_to_volumes, summarise
from .engines.measure import model_cost
from .files import atomic_path, write_json_atomic, write_text_atomic
from .networks import MedSAM, RobustMedSAM, as_medsam, load_sam, read_checkpoint, read_model_state, save_sam
from .networks.build import file_sha256
from .prune import PruneSettings, run_prune

__all__ = [
    "check_preset_keys",
    "evaluate",
    "export",
    "finetune",
    "fuse",
    "infer",
    "leverage",
    "measure_latency",
    "prune",
]

logger = logging.getLogger(__name__)


def _config_files_from_argv(argv: Sequence[str]) -> list[str]:
    for i, token in enumerate(argv):
        value = None
        if token == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith("--config_file="):
            value = token.split("=", 1)[1]
        if value is not None:
            parsed = ast.literal_eval(value) if value.strip().startswith("[") else value
            return [str(v) for v in (parsed if isinstance(parsed, (list, tuple)) else [parsed])]
    return []


def _top_level_keys(path: str | Path) -> set[str]:
    content = yaml.safe_load(Path(path).read_text()) or {}
    return {str(k).lstrip("+") for k in content} if isinstance(content, dict) else set()


def check_preset_keys(argv: Sequence[str] | None = None) -> None:
    """Refuse presets (config files after the workflow's own) that set keys no bundle workflow knows.

    MONAI merges unknown keys silently, so a typo such as ``head_sparsty`` would otherwise be ignored. The known
    keys are the top-level keys of every workflow config beside the first ``--config_file``; the check reads the
    command line of ``python -m monai.bundle run`` and does nothing when there is no preset.

    Raises:
        ValueError: naming each preset file and its unknown keys.
    """
    files = _config_files_from_argv(list(sys.argv if argv is None else argv))
    if len(files) < 2:
        return
    known = set().union(*(_top_level_keys(p) for p in Path(files[0]).parent.glob("*.yaml")))
    problems = [f"{preset}: {sorted(unknown)}" for preset in files[1:] if (unknown := _top_level_keys(preset) - known)]
    if problems:
        raise ValueError(
            "unknown keys in preset files (typos?):\n  " + "\n  ".join(problems) + f"\nknown keys: {sorted(known)}"
        )


def prune(**settings: Any) -> dict[str, Any]:
    """Prune a MedSAM checkpoint (see :class:`medcore_monai.engines.prune.PruneSettings` for the keys)."""
    return run_prune(**settings)


def _problems_for_inputs(checkpoint: str | None, data_roots: Sequence[str] | None) -> list[str]:
    return input_problems({"checkpoint": checkpoint}, data_roots)


@torch.no_grad()
def measure_latency(model: MedSAM, device: torch.device, repeats: int = 5, warmup: int = 2) -> dict[str, float]:
    """Median seconds per image (batch 1) of the encoder and of the whole box-prompted forward."""
    size = model.img_size
    image = torch.rand(1, 3, size, size, device=device)
    box = torch.tensor([[size * 0.25, size * 0.25, size * 0.75, size * 0.75]], device=device)

    def timed(fn) -> float:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        return float(np.median(samples))

    model.eval()
    return {"encoder_s": timed(lambda: model.encode(image)), "total_s": timed(lambda: model(image, box))}


def _evaluation_items(specs, split_manifest: str | None, split: str) -> dict[str, list[dict[str, Any]]]:
    if split_manifest is None:
        return {spec.name: load_items(spec) for spec in specs}
    data = SplitData({spec.name: load_items(spec) for spec in specs}, SplitManifest.load(split_manifest))
    return {name: data.split(name, split) for name in data.items}


def evaluate(
    checkpoint: str,
    data_roots: Sequence[str],
    output_dir: str = "outputs/evaluate",
    dataset_names: Sequence[str] | None = None,
    split_manifest: str | None = None,
    split: str = "test",
    device: str | None = None,
    seed: int = 42,
    bbox_shift: int = 5,
    max_images: int | None = None,
    label_value: int | None = None,
    latency_repeats: int = 5,
    progress: bool = True,
    corruptions: Sequence[str] | str | None = None,
    severities: Sequence[int] = (1, 3, 5),
) -> dict[str, Any]:
    """Dice, IoU, BF1, HD95 (surface, region) per dataset and macro, plus params, FLOPs and latency.

    Without ``split_manifest`` every image/mask pair under the data roots is evaluated; with it, only
    the named ``split``. Writes ``evaluation.json`` and per-image ``metrics_<dataset>.csv``.

    With ``corruptions`` (names from :data:`medcore_monai.transforms.CORRUPTIONS`, or ``"all"``) the same
    images are also evaluated degraded at each of ``severities``: ``evaluation.json`` gains a ``robustness``
    section (metrics per corruption and severity, means per severity and overall), and
    ``robustness.csv`` and ``robustness_dice.png`` are written.
    """
    problems = _problems_for_inputs(checkpoint, data_roots)
    if split_manifest is not None and not Path(split_manifest).is_file():
        problems.append(f"split_manifest not found: {split_manifest}")
    corruption_grid, corruption_problems = _corruption_grid(corruptions, severities)
    raise_problems(problems + corruption_problems, "evaluation")
    device_t = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = as_medsam(load_sam(checkpoint)).to(device_t)
    items = _evaluation_items(dataset_specs(data_roots, dataset_names, label_value), split_manifest, split)
    output = Path(output_dir)
    results: dict[str, Any] = {}
    degraded_rows: dict[tuple[str, int], dict[str, Any]] = {}
    for name, dataset_items in items.items():
        dataset_items = dataset_items[:max_images]
        samples = preprocess_split(dataset_items, model.img_size, bbox_shift, seed, label_value)
        rows = evaluate_items(model, dataset_items, device_t, seed, bbox_shift, label_value, progress, samples=samples)
        _write_csv(output / f"metrics_{name}.csv", rows)
        results[name] = summarise(rows) | {"units": "mm, per volume" if is_volumetric(dataset_items) else "pixels"}
        for corruption in _progress(corruption_grid, progress, f"corruptions ({name})"):
            rows = evaluate_items(
                model, dataset_items, device_t, seed, bbox_shift, label_value, corruption=corruption, samples=samples
            )
            degraded_rows.setdefault(corruption, {})[name] = summarise(rows)
    results["macro"] = _macro(results, list(items))
    report = {
        "checkpoint": {"path": checkpoint, "sha256": file_sha256(checkpoint)},
        "split": split if split_manifest else "all",
        "metrics": results,
        "cost": model_cost(model),
        "latency": measure_latency(model, device_t, repeats=latency_repeats) | {"device": str(device_t)},
    }
    if corruption_grid:
        report["robustness"] = _robustness_section(degraded_rows, list(items), results["macro"], output)
    write_json_atomic(output / "evaluation.json", report)
    return report


def _macro(results: dict[str, dict[str, Any]], datasets: Sequence[str]) -> dict[str, float]:
    keys = [k for k in results[datasets[0]] if k not in ("n", "units")]
    return {k: float(np.mean([results[d][k] for d in datasets])) for k in keys}


def _corruption_grid(
    corruptions: Sequence[str] | str | None, severities: Sequence[int]
) -> tuple[list[tuple[str, int]], list[str]]:
    """The (corruption, severity) pairs to evaluate, and any problems with the request."""
    from .transforms.corruptions import CORRUPTIONS, SEVERITIES

    if not corruptions:
        return [], []
    if corruptions == "all":
        names = list(CORRUPTIONS)
    else:
        names = [corruptions] if isinstance(corruptions, str) else list(corruptions)
    choices = f"{list(CORRUPTIONS)} or 'all'"
    problems = [f"unknown corruption {n!r}; choose from {choices}" for n in names if n not in CORRUPTIONS]
    problems += [f"severity {s!r} is not one of {list(SEVERITIES)}" for s in severities if s not in SEVERITIES]
    if not severities:
        problems.append("severities is empty")
    return [(n, int(s)) for n in names for s in severities], problems


def _progress(values: Sequence[Any], enabled: bool, description: str):
    if not enabled or not values:
        return values
    from tqdm.auto import tqdm

    return tqdm(values, desc=description, leave=False)


def _robustness_section(
    rows: dict[tuple[str, int], dict[str, dict[str, float]]],
    datasets: Sequence[str],
    clean_macro: dict[str, float],
    output: Path,
) -> dict[str, Any]:
    """Metrics per corruption and severity (per dataset and macro), their means, a CSV and a Dice heatmap."""
    from .reports.corruptions import plot_robustness_heatmap

    table: dict[str, dict[str, Any]] = {}
    for (name, severity), per_dataset in rows.items():
        table.setdefault(name, {})[str(severity)] = per_dataset | {"macro": _macro(per_dataset, datasets)}
    severities = sorted({severity for _, severity in rows})
    macros = [t[str(s)]["macro"] for t in table.values() for s in severities]
    keys = list(macros[0])
    mean_by_severity = {
        str(s): {k: float(np.mean([t[str(s)]["macro"][k] for t in table.values()])) for k in keys} for s in severities
    }
    section = {
        "corruptions": table,
        "mean_by_severity": mean_by_severity,
        "mean": {k: float(np.mean([m[k] for m in macros])) for k in keys},
        "clean": clean_macro,
        "note": "labels and box prompts stay clean; images are corrupted at model size after min-max scaling",
    }
    csv_rows = [
        {"corruption": n, "severity": s} | table[n][str(s)]["macro"] for n in table for s in severities
    ]
    _write_csv(output / "robustness.csv", csv_rows)
    dice = {n: {s: table[n][str(s)]["macro"]["dice"] for s in severities} for n in table}
    section["figure"] = plot_robustness_heatmap(
        dice, output / "robustness_dice.png", metric="Dice", clean=clean_macro["dice"]
    ).name
    return section


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    keys = list(rows[0])
    lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]
    write_text_atomic(path, "\n".join(lines) + "\n")


def export(
    checkpoint: str,
    output_dir: str = "outputs/export",
    formats: Sequence[str] = ("torchscript", "onnx"),
) -> dict[str, Any]:
    """Export the (compact) image encoder to TorchScript and/or ONNX with a manifest; copy the checkpoint.

    Writes ``model.pt`` (the compact checkpoint, reloadable with :func:`medcore_monai.networks.load_sam`),
    ``image_encoder.ts`` / ``image_encoder.onnx`` (each verified against eager) and ``export_manifest.json``.
    """
    raise_problems(_problems_for_inputs(checkpoint, None), "export")
    unknown = sorted(set(formats) - {"torchscript", "onnx"})
    raise_problems([f"unknown export formats {unknown}; use torchscript and/or onnx"] if unknown else [], "export")
    from .networks.export import export_onnx, export_torchscript, write_export_manifest

    output = Path(output_dir)
    if output.resolve() == Path(checkpoint).resolve().parent and Path(checkpoint).name == "model.pt":
        raise ValueError(f"output_dir {output} would overwrite the input checkpoint {checkpoint}")
    sam = load_sam(checkpoint)
    files = [save_sam(sam, output / "model.pt", metadata={"exported_from": str(checkpoint)})]
    if "torchscript" in formats:
        files.append(export_torchscript(sam, output / "image_encoder.ts"))
    if "onnx" in formats:
        files.append(export_onnx(sam.image_encoder, output / "image_encoder.onnx"))
    manifest = write_export_manifest(
        sam, output / "export_manifest.json", extra={"source": str(checkpoint)}, files=files
    )
    return {"files": [str(f) for f in files], "manifest": str(manifest)}


def infer(
    checkpoint: str,
    data_roots: Sequence[str],
    output_dir: str = "outputs/infer",
    dataset_names: Sequence[str] | None = None,
    device: str | None = None,
    label_value: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Box-prompted predictions for every image of the data roots, at the input's geometry.

    Boxes come from the masks next to the images (tight boxes), as MedSAM is prompted with a box per object.
    2D inputs give ``<dataset>/<stem>.png`` (0/255, original size); NIfTI inputs give
    ``<dataset>/<volume>.nii.gz`` with the input volume's affine (slices without foreground stay empty).
    """
    raise_problems(_problems_for_inputs(checkpoint, data_roots), "inference")
    device_t = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = as_medsam(load_sam(checkpoint)).to(device_t).eval()
    output = Path(output_dir)
    written: list[str] = []
    for spec in dataset_specs(data_roots, dataset_names, label_value):
        items = load_items(spec)
        samples = preprocess_split(items, model.img_size, 0, 0, label_value, progress=progress)
        predictions = [predict_native(model, samples[i], device_t) for i in range(len(samples))]
        if "volume" in items[0]:
            written += _write_volumes(output / spec.name, items, predictions)
        else:
            for item, pred in zip(items, predictions):
                written.append(str(_write_png(output / spec.name / f"{item['name']}.png", pred)))
    return {"count": len(written), "files": written}


def _write_png(path: Path, mask: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    return path


def _write_volumes(folder: Path, items: Sequence[dict[str, Any]], predictions: Sequence[np.ndarray]) -> list[str]:
    import nibabel as nib

    written = []
    for volume, (item, labels) in slices_to_volumes(items, predictions).items():
        reference = nib.load(item["image_path"])
        path = folder / f"{volume}.nii.gz"
        with atomic_path(path) as tmp:
            nib.save(nib.Nifti1Image(labels, reference.affine, reference.header), tmp)
        written.append(str(path))
    return written


def finetune(
    checkpoint: str,
    data_roots: Sequence[str],
    output_dir: str = "outputs/finetune",
    dataset_names: Sequence[str] | None = None,
    split_manifest: str | None = None,
    device: str | None = None,
    seed: int = 42,
    epochs: int = 20,
    batch_size: int = 4,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    patience: int = 5,
    amp: bool = False,
    bbox_shift: int = 5,
    label_value: int | None = None,
    max_train_images: int | None = None,
    progress: bool = True,
    trainable_modules: Sequence[str] = ("image_encoder", "mask_decoder"),
    tensorboard_dir: str | None = None,
    corruptions: Sequence[str] | str | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    svd_adaptation: bool = False,
    svd_include_convs: bool = False,
    consistency_loss: bool = False,
) -> dict[str, Any]:
    """Fine-tune a (pruned, compact, or fused RobustMedSAM) model on the training split with early stopping.

    Uses the split manifest of the pruning run when given (so its test split stays unseen), otherwise
    makes the standard seeded split. Writes ``checkpoint_best.pth``, ``checkpoint_latest.pth``,
    ``history.json`` and ``splits.json``. Under ``torchrun`` each process trains on its shard of the data
    with DDP.

    RobustMedSAM-style options:

    * ``corruptions`` (names or ``"all"``): each training image is degraded by one corruption and severity
      drawn at random (or left clean, as often as each corruption), and the validation images by a fixed
      draw; with ``trainable_modules: [mask_decoder]`` this is decoder-only fine-tuning on corrupted data.
    * ``consistency_loss`` (a fused model with a RobustSAM decoder, and ``corruptions``): RobustSAM's loss,
      focal + Dice on the degraded view plus MSE between its robust features / token and the clean view's
      (:mod:`medcore_monai.engines.robust`), instead of Dice + BCE.
    * ``svd_adaptation``: the encoder's linear layers (and its convs with ``svd_include_convs``) train
      only a scale and shift of their singular values; the result is merged back into plain weights, so
      ``checkpoint_best.pth`` is a stock (prunable, exportable) checkpoint.
    """
    problems = _problems_for_inputs(checkpoint, data_roots)
    if split_manifest is not None and not Path(split_manifest).is_file():
        problems.append(f"split_manifest not found: {split_manifest}")
    corruption_grid, corruption_problems = _corruption_grid(corruptions, severities)
    if svd_adaptation and "image_encoder" not in trainable_modules:
        problems.append("svd_adaptation trains the image encoder: add image_encoder to trainable_modules")
    if consistency_loss and not corruption_grid:
        problems.append("consistency_loss compares clean and corrupted views: set corruptions")
    raise_problems(problems + corruption_problems, "fine-tuning")
    from .data.cache import build_dataset
    from .engines.distributed import (
        distributed_loader,
        initialise_from_environment,
        is_main_process,
        process_device,
    )
    from .engines.finetune import finetune as run_finetune
    from .transforms import medsam_preprocess
    from .transforms.corruptions import corrupted_once, with_random_corruption

    initialise_from_environment()
    device_t = process_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = as_medsam(load_sam(checkpoint))
    if consistency_loss and not isinstance(model, RobustMedSAM):
        raise_problems([f"consistency_loss needs a RobustSAM decoder; {checkpoint} has a plain one"], "fine-tuning")
    clean_key = "image_clean" if consistency_loss else None
    data = prepare_splits(
        dataset_specs(data_roots, dataset_names, label_value), seed=seed, manifest_path=split_manifest
    )
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        data.manifest.save(output / "splits.json")
    train_items = [i for name in data.items for i in data.split(name, "train")][:max_train_images]
    val_items = [i for name in data.items for i in data.split(name, "val")][:max_train_images]
    train_transform = medsam_preprocess(model.img_size, bbox_shift, seed, deterministic=False, label_value=label_value)
    if corruption_grid:
        train_transform = with_random_corruption(train_transform, *_grid_axes(corruption_grid), seed, clean_key)
    train_ds = build_dataset(train_items, train_transform, progress=progress)
    val_ds = preprocess_split(val_items, model.img_size, bbox_shift, seed, label_value)
    if corruption_grid:
        val_ds = corrupted_once(val_ds, *_grid_axes(corruption_grid), seed, clean_key)
    if svd_adaptation:
        from .robust.svd import apply_svd_adaptation, svd_parameter_count

        adapted = apply_svd_adaptation(model.image_encoder, include_convs=svd_include_convs)
        count = svd_parameter_count(model)
        logger.info("SVD adaptation of %d encoder layers: %d trainable values", len(adapted), count)
    result = run_finetune(
        model,
        distributed_loader(train_ds, batch_size, shuffle=True, seed=seed),
        distributed_loader(val_ds, batch_size, shuffle=False, seed=seed),
        output,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        patience=patience,
        amp=amp,
        device=device_t,
        progress=progress,
        seed=seed,
        trainable=tuple(trainable_modules),
        tensorboard_dir=tensorboard_dir,
        restore_best=not svd_adaptation,  # the best file holds merged weights: merge first, then restore
        objective=_consistency_objective(model) if consistency_loss else None,
    )
    if svd_adaptation:
        from .robust.svd import merge_svd_adaptation

        merge_svd_adaptation(model.image_encoder)
        if result["best_checkpoint"] is not None:
            model.load_state_dict(read_model_state(result["best_checkpoint"]), strict=True)
    result["corruptions"] = sorted({name for name, _ in corruption_grid})
    result["svd_adaptation"] = svd_adaptation
    result["loss"] = "robust consistency" if consistency_loss else "dice + bce"
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in result.items()}


def _consistency_objective(model):
    from .engines.robust import consistency_objective

    return consistency_objective(model)


def _grid_axes(grid: Sequence[tuple[str, int]]) -> tuple[list[str], list[int]]:
    return sorted({n for n, _ in grid}), sorted({s for _, s in grid})


def leverage(
    medsam_ckpt: str,
    data_roots: Sequence[str],
    output_dir: str = "outputs/leverage",
    sam_ckpt: str | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Boundary-leverage analysis (BLR95) of a checkpoint on the calibration images of the data roots.

    Accepts the prune settings (``score``, ``cal_size``, ``protected_blocks``, ...) plus ``head_levels``,
    ``mlp_levels``, ``tau`` and ``n_bootstrap``. Writes ``leverage.json`` and ``leverage_histogram.png``.
    """
    from .engines.leverage import run_leverage_analysis
    from .prune import calibration_samples  # the same calibration selection as pruning

    grid = {k: settings.pop(k) for k in ("head_levels", "mlp_levels", "tau", "n_bootstrap") if k in settings}
    config = PruneSettings.from_mapping(
        {"medsam_ckpt": medsam_ckpt, "sam_ckpt": sam_ckpt, "data_roots": list(data_roots), "output_dir": output_dir}
        | settings
    )
    problems = _problems_for_inputs(medsam_ckpt, data_roots)
    if config.score in ("dual", "reset") and not sam_ckpt:
        problems.append(f"score {config.score!r} needs sam_ckpt")
    raise_problems(problems, "leverage analysis")
    device_t = torch.device(config.device)
    model = as_medsam(load_sam(medsam_ckpt)).to(device_t)
    reference = MedSAM(load_sam(sam_ckpt), pixel_normalize=config.sam_pixel_normalize) if sam_ckpt else None
    data = prepare_splits(
        dataset_specs(data_roots, config.dataset_names, config.label_value), seed=config.seed, cal_size=config.cal_size
    )
    calibration = calibration_samples(model, data, config)
    return run_leverage_analysis(
        model,
        calibration,
        config.cascade_config(),
        reference,
        device=device_t,
        output_dir=output_dir,
        progress=config.progress,
        **grid,
    )


def fuse(
    checkpoint: str,
    robustsam_ckpt: str,
    output_dir: str = "outputs/fuse",
    filename: str = "model_fused.pt",
) -> dict[str, Any]:
    """RobustMedSAM's module-wise fusion: image and prompt encoders from ``checkpoint``, decoder from RobustSAM.

    ``checkpoint`` is a MedSAM checkpoint in any official layout or this project's compact (pruned) file;
    ``robustsam_ckpt`` an official RobustSAM checkpoint of the same encoder size. Every key is checked
    against the fused architecture; the fused file keeps a pruned encoder's widths and reloads with
    :func:`medcore_monai.networks.load_sam` (which then returns a RobustSAM-decoder model).

    Writes ``<output_dir>/<filename>`` and ``fusion.json`` (sources, SHA-256, tensor counts).
    """
    problems = _problems_for_inputs(checkpoint, None)
    if not Path(robustsam_ckpt).is_file():
        problems.append(f"robustsam_ckpt not found: {robustsam_ckpt}")
    target = Path(output_dir) / filename
    if target.resolve() in {Path(checkpoint).resolve(), Path(robustsam_ckpt).resolve()}:
        problems.append(f"output {target} would overwrite an input checkpoint")
    raise_problems(problems, "fusion")
    from .networks import fuse_checkpoints

    path = fuse_checkpoints(checkpoint, robustsam_ckpt, target)
    fused = read_checkpoint(path)
    summary = {
        "checkpoint": str(path),
        "sha256": file_sha256(path),
        "fusion": fused.get("metadata", {}).get("fusion", {}),
    }
    write_json_atomic(Path(output_dir) / "fusion.json", summary)
    return summary
