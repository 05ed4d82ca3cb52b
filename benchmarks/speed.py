"""Dense vs compact encoder latency and peak memory, side by side, at three pruning budgets.

Usage::

    python benchmarks/speed.py --models tiny vit_b --device cpu --repeats 5 --out docs/benchmarks_speed.json
    python benchmarks/speed.py --models litemedsam --threads 1 2 --backends eager onnx --whole-model \
        --calibration 4 --out docs/benchmarks_speed_litemedsam.json

For each model (random weights: timing does not depend on them) it builds the dense encoder and compact
encoders with about 30 %, 60 % and 80 % of the encoder parameters removed (weight-magnitude scores, the
same block budgets the pruning cascade uses), then times a batch-1 forward of each in a fresh process
(median of ``--repeats`` after warm-up) and records the peak resident memory of that process. The
ratio of interest is latency_compact / latency_dense against FLOPs_compact / FLOPs_dense (goal: within
1.1x). FLOPs are measured with torch.utils.flop_counter.

LiteMedSAM's budgets are chosen by encoder FLOPs (about 32 %, 49 % and 64 % fewer): its heads and MLP channels carry
75 % of the FLOPs, so with one head per block kept the largest reachable cut is about 67 %. ``--threads`` takes
several counts (each a fresh process), ``--backends onnx`` also times the exported encoder in ONNX Runtime,
``--whole-model`` times encoder + prompt encoder + decoder with one box, and ``--calibration N`` times the
boundary-aware Fisher calibration per image against one forward + backward of the same model (its floor).
``--budgets label=heads,mlp[,mbconv] ...`` replaces the budgets (the dense model is always measured first); a third
number also removes that fraction of LiteMedSAM's MBConv hidden channels, e.g.::

    python benchmarks/speed.py --models litemedsam --threads 1 2 --backends eager onnx \
        --budgets "-49% FLOPs=0.67" "-49% FLOPs with MBConv=0.58,0.58,0.5" "-70% FLOPs with MBConv=0.9,0.9,0.5"
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
from budgets import Budget, parse_budget, parse_labelled_budgets

DENSE: Budget = (0.0, 0.0, 0.0)
BUDGETS = {"dense": DENSE, "-30%": (0.32, 0.32, 0.0), "-60%": (0.63, 0.63, 0.0), "-80%": (0.84, 0.84, 0.0)}
MODEL_BUDGETS = {
    "litemedsam": {
        "dense": DENSE,
        "-32% FLOPs": (0.40, 0.40, 0.0),
        "-49% FLOPs": (0.67, 0.67, 0.0),
        "-64% FLOPs": (0.90, 0.90, 0.0),
    }
}


def budgets_of(model_type: str) -> dict[str, Budget]:
    """Label -> head, MLP and MBConv sparsity of each measured budget."""
    return MODEL_BUDGETS.get(model_type, BUDGETS)


def build_model(model_type: str, sparsity: Budget) -> torch.nn.Module:
    """A ``Sam`` of a preset whose encoder is dense or magnitude-pruned (compact)."""
    import warnings

    from medcore_monai.networks import StructuredMasks, build_sam, conv_structure, encoder_structure, slim_encoder_
    from medcore_monai.pruning import block_sensitivity, magnitude_scores, plan_masks

    sam = build_sam(model_type, seed=0).eval()
    encoder = sam.image_encoder
    heads, mlp, mbconv = sparsity
    if heads or mlp or mbconv:
        structure, convs = encoder_structure(encoder), conv_structure(encoder)
        scores = magnitude_scores(dict(encoder.named_parameters()), structure, convs)
        ones = {n: torch.ones_like(p) for n, p in encoder.named_parameters()}
        with warnings.catch_warnings():  # the largest budgets hit the floors; the measured FLOPs say what was cut
            warnings.simplefilter("ignore")
            masks, _ = plan_masks(
                StructuredMasks.for_encoder(encoder),
                scores.heads,
                scores.channels,
                block_sensitivity(ones, structure),
                head_sparsity=heads,
                mlp_sparsity=mlp,
                conv_scores=scores.convs if mbconv else None,
                conv_sensitivity=block_sensitivity(ones, convs),
                conv_sparsity=mbconv,
            )
        slim_encoder_(encoder, masks)
    return sam


def _peak_rss_mib() -> float:
    """Peak resident memory of this process image in MiB.

    Linux's ``ru_maxrss`` survives ``execve``, so a child would report its parent's peak; ``VmHWM`` is the high-water
    mark of this address space only.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(run, repeats: int, warmup: int, device: torch.device) -> float:
    """Median seconds of ``run()`` over ``repeats`` calls after ``warmup`` calls."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def _onnx_runner(encoder: torch.nn.Module, x: torch.Tensor, threads: int, folder: str):
    import onnxruntime

    from medcore_monai.networks.export import export_onnx

    path = export_onnx(encoder, Path(folder) / "encoder.onnx")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.cpu().numpy()}
    return lambda: session.run(None, feed)


def measure_one(
    model_type: str,
    sparsity: Budget,
    device: str,
    repeats: int,
    warmup: int,
    threads: int,
    backend: str = "eager",
    whole_model: bool = False,
) -> dict:
    """Time one encoder (or whole model) in this process (called in a child process by ``main``)."""
    from medcore_monai.networks import MedSAM, count_parameters, encoder_flops, measure_flops

    torch.set_num_threads(threads)
    sam = build_model(model_type, sparsity)
    encoder = sam.image_encoder
    params, flops = count_parameters(encoder), encoder_flops(encoder)
    dev = torch.device(device)
    sam.to(dev)
    x = torch.rand(1, 3, encoder.img_size, encoder.img_size, device=dev)
    box = torch.tensor([[0.2, 0.2, 0.8, 0.8]], device=dev) * encoder.img_size
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline_rss = _peak_rss_mib()
    if whole_model:  # FLOPs of what is timed: encoder, prompt encoder and decoder with one box
        flops = measure_flops(MedSAM(sam).eval(), x, box)[0]
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        if backend == "onnx":
            run = _onnx_runner(encoder, x, threads, folder)
        elif whole_model:
            model = MedSAM(sam).eval()
            run = lambda: model(x, box)  # noqa: E731
        else:
            run = lambda: encoder(x)  # noqa: E731
        latency = _timed(run, repeats, warmup, dev)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _peak_rss_mib()
    return {
        "params": params,
        "flops": flops,
        "latency_s": latency,
        "peak_mem_mib": peak,
        "rss_before_mib": baseline_rss,
    }


def measure_calibration(model_type: str, images: int, threads: int, repeats: int) -> dict:
    """Seconds per image of the boundary-aware Fisher calibration vs one forward + backward of the same model."""
    from medcore_monai.losses import boundary_weighted_bce_dice
    from medcore_monai.networks import MedSAM
    from medcore_monai.pruning import FisherCalibration

    torch.set_num_threads(threads)
    model = MedSAM(build_model(model_type, DENSE)).eval()
    size, low = model.img_size, model.low_res_size
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i in range(images):
        label = torch.zeros(1, low, low)
        label[:, low // 4 : 3 * low // 4, low // 3 : 2 * low // 3] = 1.0
        samples.append(
            {
                "image": torch.rand(3, size, size, generator=generator),
                "label_lowres": label,
                "box": torch.tensor([size / 4, size / 4, 3 * size / 4, 3 * size / 4]),
                "name": f"calibration{i}",
            }
        )

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        sample = samples[0]
        logits = model(sample["image"][None], sample["box"][None])
        boundary_weighted_bce_dice(logits, sample["label_lowres"][None], 1.0).backward()

    floor = _timed(forward_backward, repeats, 1, torch.device("cpu"))
    calibration = FisherCalibration(boundary_weight=1.0, progress=False)
    start = time.perf_counter()
    calibration(model, samples, torch.device("cpu"))
    per_image = (time.perf_counter() - start) / images
    return {"threads": threads, "images": images, "fisher_s_per_image": per_image, "forward_backward_s": floor}


def _calibration_child(args: argparse.Namespace, model_type: str, threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [
            sys.executable, __file__, "--child-calibration", model_type, "--calibration", str(args.calibration),
            "--threads", str(threads), "--repeats", str(args.repeats), "--out", out.name,
        ]  # fmt: skip
        subprocess.run(command, check=True)
        return json.loads(Path(out.name).read_text())


def _child(args: argparse.Namespace, model_type: str, sparsity: Budget, threads: int, backend: str, whole: bool):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [
            sys.executable, __file__, "--child", model_type, ",".join(map(str, sparsity)), "--device", args.device,
            "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(threads),
            "--backends", backend, "--out", out.name,
        ] + (["--whole-model"] if whole else [])  # fmt: skip
        subprocess.run(command, check=True)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    """Run every model, budget, thread count and backend in fresh processes and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "vit_b"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--backends", nargs="+", default=["eager"], choices=["eager", "onnx"])
    parser.add_argument("--whole-model", action="store_true", help="also time encoder + decoder with one box")
    parser.add_argument("--calibration", type=int, default=0, help="images for the calibration-cost measurement")
    parser.add_argument(
        "--budgets", nargs="+", default=None, help="label=heads,mlp[,mbconv] ... (replaces the default)"
    )
    parser.add_argument("--out", default="docs/benchmarks_speed.json")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "SPARSITY"))
    parser.add_argument("--child-calibration", metavar="MODEL")
    args = parser.parse_args()
    if args.child_calibration:
        result = measure_calibration(args.child_calibration, args.calibration, args.threads[0], args.repeats)
        Path(args.out).write_text(json.dumps(result | {"peak_mem_mib": _peak_rss_mib()}))
        return
    if args.child:
        result = measure_one(
            args.child[0], parse_budget(args.child[1]), args.device, args.repeats, args.warmup, args.threads[0],
            args.backends[0], args.whole_model,
        )  # fmt: skip
        Path(args.out).write_text(json.dumps(result))
        return
    chosen = {"dense": DENSE} | parse_labelled_budgets(args.budgets) if args.budgets else None
    rows, calibration = [], []
    scopes = [("eager", False)] + [("onnx", False)] * ("onnx" in args.backends) + [("eager", True)] * args.whole_model
    for model_type in args.models:
        for threads in args.threads:
            for backend, whole in scopes:
                dense = None
                for label, sparsity in (chosen or budgets_of(model_type)).items():
                    result = _child(args, model_type, sparsity, threads, backend, whole)
                    dense = dense or result
                    row = {
                        "model": model_type,
                        "scope": "model" if whole else "encoder",
                        "backend": backend,
                        "threads": threads,
                        "budget": label,
                        **result,
                        "params_kept": result["params"] / dense["params"],
                        "flops_kept": result["flops"] / dense["flops"],
                        "latency_ratio": result["latency_s"] / dense["latency_s"],
                    }
                    row["latency_over_flops"] = row["latency_ratio"] / row["flops_kept"]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            if args.calibration:
                calibration.append({"model": model_type, **_calibration_child(args, model_type, threads)})
                print(json.dumps(calibration[-1]), flush=True)
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}"
    meta = {"date": date.today().isoformat(), "device": args.device, "machine": machine, "command": " ".join(sys.argv)}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "calibration": calibration}, indent=2))


if __name__ == "__main__":
    main()
