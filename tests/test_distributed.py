"""Fisher calibration under two processes (gloo on CPU) equals the single-process result."""

from __future__ import annotations

import ignite.distributed as idist
import pytest
import torch

from medcore_monai.networks import MedSAM, build_sam
from medcore_monai.pruning.fisher import compute_fisher, shard_for_process


def _samples(n=4):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        label = torch.zeros(1, 1, 64, 64)
        label[..., 10 + i : 40, 12 : 44 - i] = 1
        out.append(
            {
                "image": torch.rand(1, 3, 256, 256, generator=g),
                "label_lowres": label,
                "box": torch.tensor([[48.0 - i, 40.0, 176.0, 160.0 + i]]),
            }
        )
    return out


def _distributed_fisher(local_rank, out_file):
    model = MedSAM(build_sam("tiny", seed=0))
    result = compute_fisher(model, shard_for_process(_samples()), progress=False)
    if idist.get_rank() == 0:
        torch.save({"fisher": result.fisher, "used": result.used, "world": idist.get_world_size()}, out_file)


@pytest.mark.slow
def test_two_process_fisher_equals_single_process(tmp_path):
    out_file = tmp_path / "fisher.pt"
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(_distributed_fisher, str(out_file))
    distributed = torch.load(out_file, weights_only=True)
    single = compute_fisher(MedSAM(build_sam("tiny", seed=0)), _samples(), progress=False)
    assert distributed["world"] == 2 and distributed["used"] == single.used == 4
    for name, value in single.fisher.items():
        assert torch.allclose(distributed["fisher"][name], value, rtol=1e-4, atol=1e-10), name
