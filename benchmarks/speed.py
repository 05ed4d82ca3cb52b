"""Dense vs compact encoder latency and peak memory, side by side, at three pruning budgets.

Usage::

    python benchmarks/speed.py --models tiny vit_b --device cpu --repeats 5 --out docs/benchmarks_speed.json

For each model (random weights: timing does not depend on them) it builds the dense encoder and compact
encoders with about 30 %, 60 % and 80 % of the encoder parameters removed (weight-magnitude scores, the
same block budgets the pruning cascade uses), then times a batch-1 forward of each in a fresh process
(median of ``--repeats`` after warm-up) and records the peak resident memory of that process. The
ratio of interest is latency_compact / latency_dense against FLOPs_compact / FLOPs_dense (goal: within
1.1x). FLOPs are measured with torch.utils.flop_counter.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

BUDGETS = {"dense": 0.0, "-30%": 0.32, "-60%": 0.63, "-80%": 0.84}


def build_encoder(model_type: str, sparsity: float) -> torch.nn.Module:
    """Dense or magnitude-pruned compact encoder of a preset."""
    from medcore_monai.networks import StructuredMasks, build_sam, encoder_structure, slim_encoder_
    from medcore_monai.pruning import block_sensitivity, magnitude_scores, plan_masks

    sam = build_sam(model_type, seed=0)
    encoder = sam.image_encoder.eval()
    if sparsity > 0:
        structure = encoder_structure(encoder)
        scores = magnitude_scores(dict(encoder.named_parameters()), structure)
        ones = {n: torch.ones_like(p) for n, p in encoder.named_parameters()}
        masks, _ = plan_masks(
            StructuredMasks.full(structure),
            scores.heads,
            scores.channels,
            block_sensitivity(ones, len(structure)),
            head_sparsity=sparsity,
            mlp_sparsity=sparsity,
        )
        slim_encoder_(encoder, masks)
    return encoder


def measure_one(model_type: str, sparsity: float, device: str, repeats: int, warmup: int, threads: int) -> dict:
    """Time one encoder in this process (called in a child process by ``main``)."""
    from medcore_monai.networks import count_parameters, encoder_flops

    torch.set_num_threads(threads)
    encoder = build_encoder(model_type, sparsity)
    params, flops = count_parameters(encoder), encoder_flops(encoder)
    dev = torch.device(device)
    encoder.to(dev)
    x = torch.rand(1, 3, encoder.img_size, encoder.img_size, device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            encoder(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    times.sort()
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "params": params,
        "flops": flops,
        "latency_s": times[len(times) // 2],
        "peak_mem_mib": peak,
        "rss_before_mib": baseline_rss / 1024,
    }


def _child(args: argparse.Namespace, model_type: str, sparsity: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [
            sys.executable, __file__, "--child", model_type, str(sparsity), "--device", args.device,
            "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads),
            "--out", out.name,
        ]  # fmt: skip
        subprocess.run(command, check=True)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    """Run every model and budget in fresh processes and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "vit_b"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="docs/benchmarks_speed.json")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "SPARSITY"))
    args = parser.parse_args()
    if args.child:
        result = measure_one(args.child[0], float(args.child[1]), args.device, args.repeats, args.warmup, args.threads)
        Path(args.out).write_text(json.dumps(result))
        return
    rows = []
    for model_type in args.models:
        dense = None
        for label, sparsity in BUDGETS.items():
            result = _child(args, model_type, sparsity)
            dense = dense or result
            row = {
                "model": model_type,
                "budget": label,
                **result,
                "params_kept": result["params"] / dense["params"],
                "flops_kept": result["flops"] / dense["flops"],
                "latency_ratio": result["latency_s"] / dense["latency_s"],
            }
            row["latency_over_flops"] = row["latency_ratio"] / row["flops_kept"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = f"{platform.machine()}, {args.threads} threads per measurement, torch {torch.__version__}"
    meta = {"date": date.today().isoformat(), "device": args.device, "machine": machine, "command": " ".join(sys.argv)}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
