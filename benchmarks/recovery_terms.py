"""How much each recovery loss term weighs at the start of recovery, on a pruned model and its calibration images.

Usage::

    python benchmarks/recovery_terms.py --data-root ../shared/data/kvasir_seg --medsam <lite_medsam.pth> \
        --method magnitude --budget "-49% FLOPs=0.67" --out docs/benchmarks_recovery_terms.json

The model is pruned as ``recovery_curve.py`` prunes it (both cascade steps, no recovery), then every term of
:func:`medcore_monai.losses.recovery_loss` is computed against the dense model's outputs on each calibration image,
unweighted and multiplied by its default weight, to show which terms a recovery with those weights optimises.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from common import dataset_setup, pruned_without_recovery, write_results

from medcore_monai.engines.common import plain_tensor
from medcore_monai.losses.recovery import RecoveryLossWeights, recovery_loss

TERMS = ("seg", "boundary", "feature", "logit", "frequency")


@torch.no_grad()
def _terms(student, teacher, sample) -> dict[str, float]:
    image = plain_tensor(sample["image"], "cpu").float()[None]
    box = plain_tensor(sample["box"], "cpu").float()[None]
    teacher_embedding = teacher.encode(image)
    teacher_logits = teacher.decode(teacher_embedding, box)
    embedding, logits = student(image, box, return_embeddings=True)
    full = plain_tensor(sample["label"], "cpu").float()[None]
    low = plain_tensor(sample["label_lowres"], "cpu").float()[None]
    terms = recovery_loss(logits, full, low, embedding, teacher_embedding, teacher_logits)
    out = {k: float(v) for k, v in terms.items()}
    out["teacher_embedding_variance"] = float(teacher_embedding.var())
    out["teacher_logit_abs_max"] = float(teacher_logits.abs().max())
    return out


def main() -> None:
    """Prune once and tabulate the recovery terms over the calibration images."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--medsam", required=True)
    parser.add_argument("--method", default="magnitude")
    parser.add_argument("--budget", default="-49% FLOPs=0.67")
    parser.add_argument("--cal-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="docs/benchmarks_recovery_terms.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    setup = dataset_setup(args.data_root, args.medsam, None, args.cal_size, 1, "cpu")
    dense = setup.medsam.eval()
    label, pruned = pruned_without_recovery(setup, args.method, args.budget)
    pruned.eval()
    samples = [s for group in setup.calibration.values() for s in group]
    per_image = [_terms(pruned, dense, s) for s in samples]
    weights = dataclasses.asdict(RecoveryLossWeights()) | {"seg": 1.0}
    rows = []
    for term in (*TERMS, "loss"):
        values = np.array([p[term] for p in per_image])
        weighted = values * weights.get(term, 1.0)
        total = np.array([p["loss"] for p in per_image])
        rows.append(
            {
                "term": term,
                "weight": weights.get(term, 1.0),
                "mean": float(values.mean()),
                "weighted_mean": float(weighted.mean()),
                "weighted_sd": float(weighted.std(ddof=1)),
                "share_of_loss": float((weighted / total).mean()),
            }
        )
        print(
            f"{term:10s} weight {rows[-1]['weight']:6g}  weighted {weighted.mean():8.3f} ± {weighted.std(ddof=1):.3f}"
            f"  share {rows[-1]['share_of_loss']:.3f}",
            flush=True,
        )
    facts = {"method": args.method, "budget": label, "images": len(samples)}
    facts["teacher_embedding_variance"] = float(np.mean([p["teacher_embedding_variance"] for p in per_image]))
    facts["teacher_logit_abs_max"] = float(np.mean([p["teacher_logit_abs_max"] for p in per_image]))
    write_results(args.out, rows, "cpu", args.threads, start, **facts)


if __name__ == "__main__":
    main()
