"""An aligned general / medical pair of tiny SAM models, made the way MedSAM was made from SAM.

MedCore's reset score compares a medical model with the general model it was fine-tuned from, parameter
by parameter. Real SAM / MedSAM ViT-B weights are not always at hand, so this module builds such a pair
from scratch with the ``tiny`` preset (same classes as ViT-B, 256 px input):

1. ``sam-tiny``: the whole model trained for box-prompted segmentation of general, non-medical images
   (:mod:`medcore_monai.transforms.synthetic`), with SAM's ImageNet pixel normalisation;
2. ``medsam-tiny``: ``sam-tiny`` fine-tuned on the Kvasir-SEG training split with MedSAM's recipe: [0, 1]
   inputs without SAM's normalisation, box prompts jittered by 0-5 px, Dice + BCE on the low-resolution
   logits, image encoder and mask decoder trained, prompt encoder frozen.

Both stages use AdamW with a linear warm-up and a cosine decay, and gradient-norm clipping. The split is
the pruning runs' (seed 42, 20 % validation, 20 % test), so the test images are never trained or
selected on. Run ``python -m medcore_monai.engines.pair --help``; outputs in ``--output-dir``:

* ``sam_tiny.pth`` / ``medsam_tiny.pth``: fp16 raw state dicts (``torch.save(model.state_dict())``,
  loadable with :func:`medcore_monai.networks.load_sam`);
* ``pair_report.json``: settings, wall times, training curves, SHA-256 of both files, and Dice / IoU / BF1
  / HD95 of both models on the Kvasir-SEG validation split (deterministic 5 px box jitter, seed 42) and on
  held-out general scenes.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_torch_save, write_json_atomic
from ..networks import MedSAM, build_sam, count_parameters, file_sha256, load_sam
from ..transforms.medsam import box_from_mask
from ..transforms.samples import dataset_specs, prepare_splits, preprocess_split
from ..transforms.synthetic import synthetic_scene
from .common import plain_tensor
from .evaluation import evaluate_model, summarise
from .finetune import finetune_loss

__all__ = [
    "GENERAL_FILE",
    "MEDICAL_FILE",
    "REPORT_FILE",
    "SampleBank",
    "StageConfig",
    "build_pair",
    "default_cache_dir",
    "evaluate_bank",
    "finetune_medical",
    "general_stage_config",
    "load_kvasir",
    "main",
    "medical_stage_config",
    "save_fp16_state_dict",
    "train_general_sam",
    "warmup_cosine_factor",
]

GENERAL_FILE = "sam_tiny.pth"
MEDICAL_FILE = "medsam_tiny.pth"
REPORT_FILE = "pair_report.json"

GENERAL_STEPS = 900
MEDICAL_STEPS = 550
SPLIT_SEED = 42  # the pruning runs' split and evaluation-jitter seed
EVAL_BBOX_SHIFT = 5
GENERAL_VAL_SCENES = 64
# Scene seeds are (seed << 32) + index; validation scenes sit in the upper half of the index range so they
# never coincide with a training scene.
_VAL_SCENE_OFFSET = 1 << 31


# --------------------------------------------------------------------------- settings and schedule


@dataclass(frozen=True)
class StageConfig:
    """Optimisation settings of one training stage.

    Attributes:
        steps: Optimiser steps.
        lr: Peak learning rate (AdamW).
        batch_size: Images per step.
        warmup_steps: Steps of linear warm-up from ``lr / warmup_steps``.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` (cosine decay after warm-up).
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient-norm clipping threshold.
        bbox_shift: Maximum box jitter per side in pixels (drawn uniformly from ``[0, bbox_shift]``).
        seed: Seed of the initialisation (general stage) and of the data order and augmentation.
        log_every: Steps between entries of the training history.
    """

    steps: int
    lr: float
    batch_size: int = 8
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    bbox_shift: int = 5
    seed: int = 0
    log_every: int = 25

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr} and {self.min_lr_ratio}")


def general_stage_config(steps: int = GENERAL_STEPS, seed: int = 0, **overrides: Any) -> StageConfig:
    """The recipe used for ``sam-tiny``: training from scratch, so a higher rate and a longer warm-up."""
    settings = {"lr": 4e-4, "warmup_steps": 100, "weight_decay": 0.05} | overrides
    return StageConfig(steps=steps, seed=seed, **settings)


def medical_stage_config(steps: int = MEDICAL_STEPS, seed: int = 0, **overrides: Any) -> StageConfig:
    """The recipe used for ``medsam-tiny`` (MedSAM: AdamW, weight decay 0.01, 0-5 px box jitter)."""
    settings = {"lr": 2e-4, "warmup_steps": 30, "weight_decay": 0.01} | overrides
    return StageConfig(steps=steps, seed=seed, **settings)


def warmup_cosine_factor(step: int, steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier of the 0-based ``step``: linear warm-up to 1, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(steps - warmup_steps - 1, 1)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# --------------------------------------------------------------------------- in-memory samples


@dataclass
class SampleBank:
    """Preprocessed samples held as stacked tensors, so training steps never decode or resize images.

    Attributes:
        images: ``[N, 3, S, S]`` float32 in [0, 1].
        labels: ``[N, 1, S, S]`` 0/1 masks.
        labels_lowres: ``[N, 1, S/4, S/4]`` 0/1 masks (the decoder's output size).
        boxes: ``[N, 4]`` box prompts ``x0, y0, x1, y1`` (as preprocessed, i.e. the evaluation boxes).
        names: Sample names.
    """

    images: torch.Tensor
    labels: torch.Tensor
    labels_lowres: torch.Tensor
    boxes: torch.Tensor
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def from_samples(cls, samples: Iterator[dict[str, Any]] | Sequence[dict[str, Any]]) -> SampleBank:
        """Stack sample dicts (``medsam_preprocess`` / ``synthetic_scene`` layout) into a bank."""
        columns: dict[str, list[torch.Tensor]] = {"image": [], "label": [], "label_lowres": [], "box": []}
        names = []
        for sample in samples:
            for key, values in columns.items():
                # MetaTensors from a disk cache would trace every operation in the model: keep the data only.
                values.append(plain_tensor(sample[key]).float())
            names.append(str(sample["name"]))
        if not names:
            raise ValueError("no samples to hold")
        stacked = {key: torch.stack(values) for key, values in columns.items()}
        return cls(stacked["image"], stacked["label"], stacked["label_lowres"], stacked["box"], names)

    def batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        """Consecutive evaluation batches (``image``, ``label``, ``box``, ``name``) in bank order."""
        for start in range(0, len(self), batch_size):
            window = slice(start, start + batch_size)
            yield {
                "image": self.images[window],
                "label": self.labels[window],
                "box": self.boxes[window],
                "name": self.names[window],
            }


def _scene_seed(seed: int, index: int) -> int:
    return (seed << 32) + index


def general_validation_bank(seed: int, count: int = GENERAL_VAL_SCENES, size: int = 256) -> SampleBank:
    """Held-out general scenes with tight boxes (never drawn during training with the same ``seed``)."""
    return SampleBank.from_samples(
        synthetic_scene(_scene_seed(seed, _VAL_SCENE_OFFSET + i), size=size) for i in range(count)
    )


# --------------------------------------------------------------------------- training loop

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _progress(iterable: Any, desc: str, enabled: bool, total: int) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    # When logging to a file, refresh rarely so the log stays readable.
    return tqdm(iterable, desc=desc, total=total, mininterval=0.5 if sys.stderr.isatty() else 30.0)


def train_steps(
    model: MedSAM,
    parameters: Sequence[nn.Parameter],
    next_batch: Callable[[int], Batch],
    config: StageConfig,
    device: torch.device,
    desc: str = "train",
    progress: bool = True,
) -> list[dict[str, float]]:
    """Run ``config.steps`` AdamW steps of Dice + BCE on the low-resolution logits.

    Args:
        model: The wrapped model (trained in place).
        parameters: The parameters to optimise (the rest stay as they are).
        next_batch: ``step -> (images [B, 3, S, S], label_lowres [B, 1, S/4, S/4], boxes [B, 4])`` on CPU.
        config: Optimisation settings.
        device: Where to train.
        desc: Progress-bar label.
        progress: Show a progress bar.

    Returns:
        History: one entry per ``config.log_every`` steps with the mean loss of those steps, the learning
        rate and the elapsed seconds.
    """
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    model.to(device).train()
    history: list[dict[str, float]] = []
    window: list[float] = []
    start = time.perf_counter()
    bar = _progress(range(config.steps), desc, progress, config.steps)
    for step in bar:
        lr = config.lr * warmup_cosine_factor(step, config.steps, config.warmup_steps, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, target, boxes = (t.to(device) for t in next_batch(step))
        loss = finetune_loss(model(images, boxes), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        window.append(float(loss.detach()))
        if len(window) == config.log_every or step == config.steps - 1:
            entry = {"step": step + 1, "loss": sum(window) / len(window), "lr": lr}
            history.append(entry | {"elapsed_s": time.perf_counter() - start})
            window = []
            if progress:
                bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{lr:.2e}")
    model.eval()
    return history


def _general_batch(config: StageConfig, size: int, natural_fraction: float) -> Callable[[int], Batch]:
    def next_batch(step: int) -> Batch:
        first = step * config.batch_size
        scenes = [
            synthetic_scene(_scene_seed(config.seed, first + i), size, config.bbox_shift, natural_fraction)
            for i in range(config.batch_size)
        ]
        return tuple(torch.stack([s[key] for s in scenes]) for key in ("image", "label_lowres", "box"))

    return next_batch


def train_general_sam(
    config: StageConfig | None = None,
    model_type: str = "tiny",
    device: torch.device | str = "cpu",
    natural_fraction: float = 0.3,
    progress: bool = True,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train a SAM from scratch on general box-prompted scenes (``sam-tiny``).

    Every parameter is trained, and inputs get SAM's own ImageNet pixel normalisation (as the general SAM
    expects; the pruning runs feed the reference model that way by default). Step ``t`` draws the scenes
    ``(seed << 32) + t * batch_size + i``, so the data stream is fixed by the seed alone.

    Args:
        config: Optimisation settings (default: :func:`general_stage_config`).
        model_type: SAM preset to build.
        device: Where to train.
        natural_fraction: Share of skimage photographs among the scenes.
        progress: Show a progress bar.

    Returns:
        The trained segment-anything ``Sam`` (eval mode) and its training history.
    """
    config = config or general_stage_config()
    sam = build_sam(model_type, seed=config.seed)
    model = MedSAM(sam, pixel_normalize=True)
    next_batch = _general_batch(config, model.img_size, natural_fraction)
    history = train_steps(model, list(sam.parameters()), next_batch, config, torch.device(device), "sam-tiny", progress)
    return sam.eval(), history


def _dihedral(tensor: torch.Tensor, quarter_turns: int, flip: bool) -> torch.Tensor:
    """One of the 8 rotations / reflections of a square ``[C, H, W]`` tensor."""
    tensor = torch.rot90(tensor, quarter_turns, dims=(-2, -1))
    return tensor.flip(-1) if flip else tensor


def _shuffled_indices(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless epochs of a seeded permutation, cut into full batches (a short tail is dropped)."""
    batch_size = min(batch_size, count)
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _medical_batch(bank: SampleBank, config: StageConfig) -> Callable[[int], Batch]:
    generator = torch.Generator().manual_seed(config.seed)
    indices = _shuffled_indices(len(bank), config.batch_size, generator)

    def next_batch(step: int) -> Batch:
        images, targets, boxes = [], [], []
        for i in next(indices).tolist():
            # Polyps have no canonical orientation: a random rotation / reflection per sample.
            turns, flip = (
                int(torch.randint(4, (), generator=generator)),
                bool(torch.randint(2, (), generator=generator)),
            )
            label = _dihedral(bank.labels[i], turns, flip)
            shifts = torch.randint(0, config.bbox_shift + 1, (4,), generator=generator).tolist()
            images.append(_dihedral(bank.images[i], turns, flip))
            targets.append(_dihedral(bank.labels_lowres[i], turns, flip))
            boxes.append(box_from_mask(label, shifts))
        return torch.stack(images), torch.stack(targets), torch.stack(boxes)

    return next_batch


def finetune_medical(
    general_sam: nn.Module,
    train_bank: SampleBank,
    config: StageConfig | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Fine-tune a copy of a general SAM on medical images the way MedSAM was (``medsam-tiny``).

    Inputs are MedSAM's min-max [0, 1] images without SAM's pixel normalisation; the image encoder and
    mask decoder are trained, the prompt encoder is frozen; every sample gets a random rotation /
    reflection and a fresh 0-``bbox_shift`` px box jitter. ``general_sam`` itself is not modified.

    Args:
        general_sam: The general model (e.g. from :func:`train_general_sam`).
        train_bank: Preprocessed medical training samples.
        config: Optimisation settings (default: :func:`medical_stage_config`).
        device: Where to train.
        progress: Show a progress bar.

    Returns:
        The fine-tuned ``Sam`` (eval mode) and its training history.
    """
    config = config or medical_stage_config()
    sam = copy.deepcopy(general_sam)
    for parameter in sam.prompt_encoder.parameters():
        parameter.requires_grad_(False)
    trainable = [p for module in (sam.image_encoder, sam.mask_decoder) for p in module.parameters()]
    model = MedSAM(sam, pixel_normalize=False)
    history = train_steps(
        model, trainable, _medical_batch(train_bank, config), config, torch.device(device), "medsam-tiny", progress
    )
    for parameter in sam.prompt_encoder.parameters():
        parameter.requires_grad_(True)
    return sam.eval(), history


# --------------------------------------------------------------------------- files and evaluation


def save_fp16_state_dict(sam: nn.Module, path: str | os.PathLike) -> Path:
    """``torch.save(state_dict)`` with floating-point tensors in fp16 (half the size), atomically."""
    state = {
        key: (value.detach().cpu().half() if value.is_floating_point() else value.detach().cpu())
        for key, value in sam.state_dict().items()
    }
    return atomic_torch_save(state, path)


def evaluate_bank(
    model: MedSAM, bank: SampleBank, device: torch.device | str = "cpu", batch_size: int = 8
) -> dict[str, float]:
    """Mean Dice / IoU / BF1 / HD95 of ``model`` on a bank, with the bank's own boxes."""
    return summarise(evaluate_model(model.to(device), bank.batches(batch_size), device))


def default_cache_dir() -> Path:
    """Where preprocessed Kvasir-SEG samples are cached: ``$XDG_CACHE_HOME/medcore_monai`` (or ``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medcore_monai" / "pair"


def load_kvasir(
    root: str | os.PathLike,
    cache_dir: str | os.PathLike,
    size: int = 256,
    progress: bool = True,
) -> tuple[SampleBank, SampleBank, dict[str, Any]]:
    """Kvasir-SEG training (tight boxes) and validation (5 px deterministic jitter) banks at ``size`` px.

    The split is the pruning runs' (:func:`~medcore_monai.data.prepare_splits` with seed 42 and default
    fractions); preprocessing goes through the project's disk cache, so only the first run decodes the
    JPEGs.

    Returns:
        Training bank, validation bank and a description of the data for the report.
    """
    split = prepare_splits(dataset_specs([root]), seed=SPLIT_SEED)
    (dataset,) = split.items
    banks = []
    for name, bbox_shift in (("train", 0), ("val", EVAL_BBOX_SHIFT)):
        items = split.split(dataset, name)
        samples = preprocess_split(items, size, bbox_shift, SPLIT_SEED, cache="disk", cache_dir=cache_dir)
        banks.append(SampleBank.from_samples(_progress(samples, f"load {name}", progress, len(samples))))
    info = {
        "root": str(Path(root).resolve()),
        "dataset": dataset,
        "split_seed": SPLIT_SEED,
        "fractions": split.manifest.fractions,
        "n_train": len(banks[0]),
        "n_val": len(banks[1]),
        "eval_bbox_shift": EVAL_BBOX_SHIFT,
        "eval_jitter_seed": SPLIT_SEED,
        "test_split_used": False,
    }
    return banks[0], banks[1], info


# --------------------------------------------------------------------------- the whole pair


def _file_entry(path: Path, pixel_normalize: bool) -> dict[str, Any]:
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "dtype": "float16",
        "pixel_normalize": pixel_normalize,
        "params": count_parameters(load_sam(path)),
    }


def build_pair(
    kvasir_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    general: StageConfig | None = None,
    medical: StageConfig | None = None,
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    natural_fraction: float = 0.3,
    general_val_scenes: int = GENERAL_VAL_SCENES,
    progress: bool = True,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train ``sam-tiny`` then ``medsam-tiny``, save both in fp16 and evaluate the saved files.

    Args:
        kvasir_root: Kvasir-SEG folder (``images/`` and ``masks/``); it is read, never copied.
        output_dir: Where the two checkpoints and the report are written.
        general: ``sam-tiny`` settings (default :func:`general_stage_config`).
        medical: ``medsam-tiny`` settings (default :func:`medical_stage_config`).
        device: Torch device for training and evaluation.
        cache_dir: Disk cache of preprocessed Kvasir-SEG samples (default :func:`default_cache_dir`).
        natural_fraction: Share of skimage photographs among the general scenes.
        general_val_scenes: Held-out general scenes the report evaluates both models on.
        progress: Show progress bars.
        command: The command line, recorded in the report.

    Returns:
        The report (also written to ``pair_report.json``).
    """
    general = general or general_stage_config()
    medical = medical or medical_stage_config()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}

    start = time.perf_counter()
    train_bank, val_bank, data_info = load_kvasir(kvasir_root, cache_dir or default_cache_dir(), progress=progress)
    timing["load_kvasir_s"] = time.perf_counter() - start

    start = time.perf_counter()
    sam, general_history = train_general_sam(
        general, device=device, natural_fraction=natural_fraction, progress=progress
    )
    timing["train_sam_tiny_s"] = time.perf_counter() - start
    general_path = save_fp16_state_dict(sam, output_dir / GENERAL_FILE)

    start = time.perf_counter()
    # Start from the saved fp16 weights, so the pair is aligned exactly as it is distributed.
    medsam, medical_history = finetune_medical(load_sam(general_path), train_bank, medical, device, progress)
    timing["train_medsam_tiny_s"] = time.perf_counter() - start
    medical_path = save_fp16_state_dict(medsam, output_dir / MEDICAL_FILE)

    start = time.perf_counter()
    general_val = general_validation_bank(general.seed, general_val_scenes, size=val_bank.images.shape[-1])
    metrics = _evaluate_pair(general_path, medical_path, {"kvasir_val": val_bank, "general_val": general_val}, device)
    timing["evaluate_s"] = time.perf_counter() - start

    report = {
        "command": list(command) if command is not None else None,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "device": device,
        },
        "models": {
            "sam_tiny": _file_entry(general_path, pixel_normalize=True),
            "medsam_tiny": _file_entry(medical_path, pixel_normalize=False),
        },
        "data": {
            "kvasir": data_info,
            "general": {"natural_fraction": natural_fraction, "scenes_per_step": general.batch_size},
        },
        "training": {
            "sam_tiny": {"config": asdict(general), "trainable": "all", "history": general_history},
            "medsam_tiny": {
                "config": asdict(medical),
                "trainable": "image_encoder + mask_decoder (prompt_encoder frozen)",
                "augmentation": "random rot90 / flip, box jitter 0-bbox_shift px",
                "history": medical_history,
            },
        },
        "metrics": metrics,
        "wall_time_s": timing | {"total_s": sum(timing.values())},
    }
    write_json_atomic(output_dir / REPORT_FILE, report)
    return report


def _evaluate_pair(
    general_path: Path, medical_path: Path, banks: dict[str, SampleBank], device: str
) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics of the saved files on every bank (Kvasir-SEG validation, held-out general scenes)."""
    models = {
        "sam_tiny": MedSAM(load_sam(general_path), pixel_normalize=True),
        # The general model fed MedSAM-style inputs: where the medical fine-tune started from.
        "sam_tiny_minmax_input": MedSAM(load_sam(general_path), pixel_normalize=False),
        "medsam_tiny": MedSAM(load_sam(medical_path), pixel_normalize=False),
    }
    return {
        bank_name: {name: evaluate_bank(model, bank, device) for name, model in models.items()}
        for bank_name, bank in banks.items()
    }


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m medcore_monai.engines.pair",
        description="Train an aligned sam-tiny (general images) / medsam-tiny (Kvasir-SEG fine-tune) pair.",
    )
    parser.add_argument("--kvasir-root", required=True, help="Kvasir-SEG folder with images/ and masks/")
    parser.add_argument("--output-dir", required=True, help="where sam_tiny.pth, medsam_tiny.pth and the report go")
    parser.add_argument("--general-steps", type=int, default=GENERAL_STEPS, help="sam-tiny optimiser steps")
    parser.add_argument("--medical-steps", type=int, default=MEDICAL_STEPS, help="medsam-tiny optimiser steps")
    parser.add_argument("--general-lr", type=float, default=general_stage_config().lr)
    parser.add_argument("--medical-lr", type=float, default=medical_stage_config().lr)
    parser.add_argument("--batch-size", type=int, default=StageConfig(steps=1, lr=1.0).batch_size)
    parser.add_argument("--seed", type=int, default=0, help="initialisation, data order and augmentation seed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--cache-dir", default=None, help=f"preprocessed Kvasir cache (default {default_cache_dir()})")
    parser.add_argument("--natural-fraction", type=float, default=0.3, help="share of skimage photographs")
    parser.add_argument("--general-val-scenes", type=int, default=GENERAL_VAL_SCENES, help="held-out general scenes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; prints the validation metrics and returns the report."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    report = build_pair(
        kvasir_root=args.kvasir_root,
        output_dir=args.output_dir,
        general=general_stage_config(args.general_steps, args.seed, lr=args.general_lr, batch_size=args.batch_size),
        medical=medical_stage_config(args.medical_steps, args.seed, lr=args.medical_lr, batch_size=args.batch_size),
        device=args.device,
        cache_dir=args.cache_dir,
        natural_fraction=args.natural_fraction,
        general_val_scenes=args.general_val_scenes,
        progress=not args.no_progress,
        command=[sys.executable, "-m", "medcore_monai.engines.pair", *(sys.argv[1:] if argv is None else argv)],
    )
    for name, summary in report["metrics"]["kvasir_val"].items():
        scores = "  ".join(f"{key} {summary[key]:.4f}" for key in ("dice", "bf1", "hd95"))
        print(f"kvasir val {name:>22}: {scores}")
    print(f"wrote {Path(args.output_dir) / REPORT_FILE}")
    return report


if __name__ == "__main__":
    main()
