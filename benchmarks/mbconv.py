"""Are LiteMedSAM's MBConv hidden channels worth pruning? Quality lost and time saved per FLOP, against MLP channels.

Usage::

    python benchmarks/mbconv.py --data-root ../shared/data/kvasir_seg --medsam <lite_medsam.pth> \\
        --images 32 --fractions 0.25 0.5 0.75 --out docs/benchmarks_mbconv_litemedsam.json

Stage 0 of LiteMedSAM's TinyViT is two MBConv blocks (1x1 expand to 256 channels, depthwise 3x3, 1x1 project) on
the full 256x256 map; the cascade does not prune them (``docs/models.md``). This probe removes a fraction of each
block's hidden channels physically and compares with removing MLP channels (uniformly in every attention block)
for the *same measured encoder FLOPs*. Both groups are ranked the same simple way, by the L2 norm of the channel's
column in the projection back to the residual stream (for MBConv after folding the projection's BatchNorm), and
neither gets any recovery: it probes the group, not a score. Reported per configuration: encoder FLOPs and
parameters (measured), encoder latency (eager, ``--threads``, median of ``--repeats`` rounds interleaved over the
configurations, so a busy machine slows every configuration alike), Dice/BF1/HD95 on validation images (the
standard seed-42 split; never the test split), and the paired differences MBConv - MLP at equal FLOPs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from common import dataset_setup, evaluate_summary, paired_bootstrap, write_results
from torch import nn

from medcore_monai.engines.measure import model_cost
from medcore_monai.networks.structure import prunable_blocks, slim_block_
from medcore_monai.networks.tiny_vit import MBConv
from medcore_monai.transforms.samples import preprocess_split


def _keep_top(norms: torch.Tensor, fraction: float) -> torch.Tensor:
    keep = max(1, round(len(norms) * (1.0 - fraction)))
    return torch.argsort(norms, descending=True)[:keep].sort().values


def _sliced_conv_bn(layer: nn.Sequential, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    """Keep output channels ``rows`` (conv rows and BatchNorm entries) and input channels ``cols``, in place."""
    conv, norm = layer.c, layer.bn
    weight = conv.weight.detach()
    if cols is not None and conv.groups == 1:
        weight = weight[:, cols]
    if rows is not None:
        weight = weight[rows]
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(norm, name)
            kept = tensor.detach()[rows].clone()
            setattr(norm, name, nn.Parameter(kept) if isinstance(tensor, nn.Parameter) else kept)
        norm.num_features = len(rows)
    groups = len(rows) if conv.groups > 1 and rows is not None else conv.groups
    out_chans, in_chans = weight.shape[0], weight.shape[1] * groups
    new = nn.Conv2d(in_chans, out_chans, conv.kernel_size, conv.stride, conv.padding, groups=groups, bias=False)
    new.weight = nn.Parameter(weight.clone())
    layer.c = new.to(conv.weight.device)


def slim_mbconv_(block: MBConv, fraction: float) -> None:
    """Remove ``fraction`` of an MBConv block's hidden channels (smallest folded projection columns), in place."""
    project = block.conv3
    scale = project.bn.weight.detach() / torch.sqrt(project.bn.running_var + project.bn.eps)
    norms = (scale[:, None] * project.c.weight.detach()[:, :, 0, 0]).norm(dim=0)
    keep = _keep_top(norms, fraction)
    _sliced_conv_bn(block.conv1, rows=keep, cols=None)
    _sliced_conv_bn(block.conv2, rows=keep, cols=None)
    _sliced_conv_bn(block.conv3, rows=None, cols=keep)


def slim_mlp_uniform_(encoder: nn.Module, fraction: float) -> None:
    """Remove ``fraction`` of the MLP channels of every attention block (smallest ``fc2`` columns), in place."""
    for block in prunable_blocks(encoder):
        slim_block_(block, None, _keep_top(block.mlp.fc2.weight.detach().norm(dim=0), fraction).tolist())


def mbconv_blocks(encoder: nn.Module) -> list[MBConv]:
    """The encoder's MBConv blocks."""
    return [m for m in encoder.modules() if isinstance(m, MBConv)]


def variant(medsam: nn.Module, group: str, fraction: float) -> nn.Module:
    """A copy of ``medsam`` with ``fraction`` of the ``group`` (``mbconv`` or ``mlp``) channels removed."""
    model = copy.deepcopy(medsam)
    encoder = model.image_encoder
    if group == "mbconv":
        for block in mbconv_blocks(encoder):
            slim_mbconv_(block, fraction)
    elif fraction > 0:
        slim_mlp_uniform_(encoder, fraction)
    return model.eval()


def _time_rounds(models: dict[str, nn.Module], image: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median encoder latency per model, measured in interleaved rounds after one warm-up each."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.image_encoder(image)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model.image_encoder(image)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    """Build the variants, measure them side by side and write the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--medsam", required=True, help="a LiteMedSAM checkpoint")
    parser.add_argument("--images", type=int, default=32, help="validation images scored")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="docs/benchmarks_mbconv_litemedsam.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, start = torch.device("cpu"), time.perf_counter()
    setup = dataset_setup(args.data_root, args.medsam, None, 1, 1, device)
    medsam = setup.medsam.eval()
    if not mbconv_blocks(medsam.image_encoder):
        raise SystemExit("this model has no MBConv blocks (the probe is for LiteMedSAM's TinyViT)")
    items = setup.data.split(setup.name, "val")[: args.images]
    samples = preprocess_split(items, medsam.img_size, 5, 42, lowres_size=medsam.low_res_size)

    # MLP fractions that remove the same FLOPs as each MBConv fraction, from the slope of each group
    dense_flops = model_cost(medsam)["encoder_flops"]
    slope = {g: (dense_flops - model_cost(variant(medsam, g, 0.5))["encoder_flops"]) / 0.5 for g in ("mbconv", "mlp")}
    models = {"dense": medsam}
    for fraction in args.fractions:
        models[f"mbconv {fraction:.2f}"] = variant(medsam, "mbconv", fraction)
        matched = fraction * slope["mbconv"] / slope["mlp"]
        models[f"mlp {matched:.3f} (same FLOPs as mbconv {fraction:.2f})"] = variant(medsam, "mlp", matched)
    image = samples[0]["image"][None].to(device)
    latency = _time_rounds(models, image, args.repeats)

    rows = []
    for name, model in models.items():
        row = {"variant": name, **model_cost(model), "encoder_latency_s": latency[name]}
        row |= evaluate_summary(model, samples, device, per_image=True)
        row["flops_kept"] = row["encoder_flops"] / dense_flops
        row["latency_kept"] = latency[name] / latency["dense"]
        rows.append(row)
        print({k: v for k, v in row.items() if k != "per_image"}, flush=True)
    for mb, mlp in zip(rows[1::2], rows[2::2]):
        mb["vs_mlp_same_flops"] = {
            k: paired_bootstrap(mb["per_image"][k], mlp["per_image"][k]) for k in ("dice", "bf1", "hd95")
        }
    write_results(args.out, rows, device, args.threads, start, images=len(items), split="val")
    print(f"written to {Path(args.out)}")


if __name__ == "__main__":
    main()
