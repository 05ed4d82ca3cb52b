"""Recovery curves: a pruned model's quality against recovery steps, recovering on few or many training images.

Usage::

    python benchmarks/recovery_curve.py --data-root ../shared/data/kvasir_seg --medsam <lite_medsam.pth> \
        --method magnitude --budget "-49% FLOPs=0.67" --arms 16:1e-4 256:1e-4 --steps 400 --every 100 \
        --val-images 48 --test-images 100 --threads 2 --out docs/benchmarks_recovery_curve.json

The model is pruned once (both cascade steps, no recovery in between, block budgets from the usual 16-image
calibration), then each arm recovers a copy of it with the recovery trainer the cascade uses (AdamW; batch 1 and a
constant learning rate unless the arm sets ``batch=B`` or ``schedule=cosine``; images drawn by boundary complexity;
the dense model's cached outputs as teacher) on the first ``N`` images of the training split of the standard seed-42
split (``N`` = the calibration size is the cascade's own recovery set: the calibration images are the first ones of
the training split). Quality is measured on validation images every ``--every`` steps (this selects a design, so
never on the test split) and, for the final models, on the test
split with per-image paired differences against the dense model and between the arms.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch
from common import (
    SEED,
    dataset_setup,
    evaluate_summary,
    paired_bootstrap,
    pruned_without_recovery,
    training_samples,
    write_results,
)
from ignite.engine import Events

from medcore_monai.cascade import _recovery_trainer
from medcore_monai.engines.measure import model_cost
from medcore_monai.engines.recovery import (
    RecoveryConfig,
    TeacherOutputs,
    freeze_for_recovery,
    recovery_taps,
)
from medcore_monai.losses.recovery import RecoveryLossWeights
from medcore_monai.pruning import LR_SCHEDULES
from medcore_monai.transforms.samples import preprocess_split

METRICS = ("dice", "bf1", "hd95")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One recovery recipe: images, peak learning rate, loss weights, batch size and learning-rate schedule."""

    images: int
    lr: float
    loss: RecoveryLossWeights
    batch: int = 1
    schedule: str = "constant"

    @property
    def name(self) -> str:
        extra = "" if self.batch == 1 and self.schedule == "constant" else f", batch {self.batch}, {self.schedule}"
        if self.loss.intermediate > 0:
            extra += f", intermediate {self.loss.intermediate:g}"
        return f"{self.images} images, lr {self.lr:g}, feature {self.loss.feature:g}, logit {self.loss.logit:g}{extra}"


def _arm(value: str) -> Arm:
    """``images:lr[:feature,logit][:batch=B][:schedule=constant|cosine][:inter=W]``."""
    images, lr, *rest = value.split(":")
    loss, options = RecoveryLossWeights(), {}
    for field in rest:
        if "=" in field:
            key, option = field.split("=", 1)
            if key not in ("batch", "schedule", "inter"):
                raise argparse.ArgumentTypeError(f"unknown arm option {key!r} in {value!r}")
            options[key] = {"batch": int, "inter": float}.get(key, str)(option)
        else:
            feature, logit = (float(w) for w in field.split(","))
            loss = dataclasses.replace(loss, feature=feature, logit=logit)
    if options.get("schedule", "constant") not in LR_SCHEDULES:
        raise argparse.ArgumentTypeError(f"schedule must be one of {LR_SCHEDULES}: {value!r}")
    loss = dataclasses.replace(loss, intermediate=options.pop("inter", 0.0))
    return Arm(int(images), float(lr), loss, **options)


def _summary(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "per_image"}


def _recovery_curve(pruned, teacher, samples, arm: Arm, steps: int, every: int, val) -> tuple[object, list[dict]]:
    """Recover a copy of ``pruned`` for ``steps`` steps of ``arm``, scoring it on ``val`` every ``every`` steps."""
    model = copy.deepcopy(pruned)
    config = RecoveryConfig(steps, arm.lr, seed=SEED, batch_size=arm.batch, loss=arm.loss, lr_schedule=arm.schedule)
    trainer = _recovery_trainer(model, samples, config, teacher, "cpu", 1, None, [])  # the cascade's own trainer
    curve = [{"step": 0, **evaluate_summary(model, val, "cpu")}]
    clock = {"start": time.perf_counter(), "evaluating": 0.0}

    @trainer.on(Events.ITERATION_COMPLETED(every=every))
    def _score(engine) -> None:
        started = time.perf_counter()
        point = {"step": engine.state.iteration, **evaluate_summary(model, val, "cpu")}
        point["loss"] = sum(trainer.losses[1][-every:]) / every
        clock["evaluating"] += time.perf_counter() - started
        point["train_seconds"] = time.perf_counter() - clock["start"] - clock["evaluating"]
        curve.append(point)
        print(json.dumps(point), flush=True)
        freeze_for_recovery(model)  # evaluation left every module in eval mode

    trainer.run()
    return model, curve


def main() -> None:
    """Prune once, recover each arm with its curve, score the final models on the test split."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--dataset-name", default="kvasir")
    parser.add_argument("--medsam", required=True)
    parser.add_argument("--method", default="magnitude")
    parser.add_argument("--budget", default="-49% FLOPs=0.67", help="label=sparsity or label=heads,mlp[,mbconv]")
    arm_help = "images:lr[:feature,logit][:batch=B][:schedule=cosine][:inter=W]"
    parser.add_argument("--arms", nargs="+", type=_arm, default=["16:1e-4", "256:1e-4"], help=arm_help)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--cal-size", type=int, default=16)
    parser.add_argument("--val-images", type=int, default=48)
    parser.add_argument("--test-images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="docs/benchmarks_recovery_curve.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    setup = dataset_setup(args.data_root, args.medsam, None, args.cal_size, args.test_images, "cpu", args.dataset_name)
    medsam = setup.medsam
    val_items = setup.data.split(setup.name, "val")[: args.val_images]
    val = preprocess_split(val_items, medsam.img_size, 5, SEED, lowres_size=medsam.low_res_size)
    label, pruned = pruned_without_recovery(setup, args.method, args.budget)
    facts = {"method": args.method, "budget": label, "steps": args.steps, "validation_images": len(val)}
    facts |= {"test_images": len(setup.test_items), "calibration_images": args.cal_size}
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        print(json.dumps({k: v for k, v in _summary(row).items() if k != "curve"}), flush=True)
        write_results(args.out, rows, "cpu", args.threads, start, complete=False, **facts)

    add(
        {
            "arm": "dense",
            **model_cost(medsam),
            "val": evaluate_summary(medsam, val, "cpu"),
            **evaluate_summary(medsam, setup.test_samples, "cpu", per_image=True),
        }
    )
    # arms with the same images share one teacher cache, with the encoder's taps when an arm distils them
    teachers: dict[tuple[int, tuple[str, ...]], tuple[list[dict], TeacherOutputs, float]] = {}
    for arm in args.arms:
        arm_start = time.perf_counter()
        taps = recovery_taps(medsam, arm.loss)
        key = (arm.images, tuple(taps))
        if key not in teachers:
            samples = training_samples(setup, arm.images)
            teacher = TeacherOutputs(medsam, cache=True, taps=taps).precompute(samples, "cpu")
            teachers[key] = (samples, teacher, time.perf_counter() - arm_start)
        samples, teacher, teacher_seconds = teachers[key]
        model, curve = _recovery_curve(pruned, teacher, samples, arm, args.steps, args.every, val)
        row = {"arm": arm.name, "images": len(samples), "lr": arm.lr, "feature_weight": arm.loss.feature}
        row |= {"logit_weight": arm.loss.logit, "intermediate_weight": arm.loss.intermediate}
        row |= {"batch": arm.batch, "schedule": arm.schedule}
        row |= {**model_cost(model), "curve": curve, "teacher_seconds": teacher_seconds}
        row["seconds"] = time.perf_counter() - arm_start
        add(row | evaluate_summary(model, setup.test_samples, "cpu", per_image=True))
    dense, first, *others = rows
    for row in [first, *others]:
        row["vs_dense"] = {m: paired_bootstrap(row["per_image"][m], dense["per_image"][m]) for m in METRICS}
    for row in others:
        row["vs_first_arm"] = {m: paired_bootstrap(row["per_image"][m], first["per_image"][m]) for m in METRICS}
    write_results(args.out, rows, "cpu", args.threads, start, complete=True, **facts)


if __name__ == "__main__":
    main()
