"""Recovery and the bundle's fine-tuning under two processes (gloo on CPU): DDP keeps the replicas identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ignite.distributed as idist
import pytest
import torch

from medcore_monai.cascade import recover
from medcore_monai.demo import write_synthetic_pairs
from medcore_monai.engines.distributed import world_size
from medcore_monai.engines.recovery import RecoveryConfig, TeacherOutputs
from medcore_monai.networks import MedSAM, build_sam, load_sam, read_checkpoint


def _samples(n=4):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        label = torch.zeros(1, 256, 256)
        label[:, 40 + 4 * i : 160, 48 : 176 - 4 * i] = 1
        out.append(
            {
                "image": torch.rand(3, 256, 256, generator=g),
                "label": label,
                "label_lowres": label[:, ::4, ::4].clone(),
                "box": torch.tensor([48.0, 40.0 + 4 * i, 176.0 - 4 * i, 160.0]),
                "name": f"s{i}",
            }
        )
    return out


def _flat_encoder(model: MedSAM) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.image_encoder.parameters()])


def _gather_to_file(tensor: torch.Tensor, out_file: str, extra: dict) -> None:
    gathered = idist.all_gather(tensor[None])
    if idist.get_rank() == 0:
        torch.save({"params": gathered, "world": world_size()} | extra, out_file)


def _recovery_worker(local_rank, out_file, tmp_dir):
    model = MedSAM(build_sam("tiny", seed=0))
    teacher = TeacherOutputs(model, cache=False)
    teacher.precompute(_samples(), "cpu")
    torch.manual_seed(idist.get_rank())  # the ranks must not agree by accident
    with torch.no_grad():
        for p in model.image_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    # DDP broadcasts rank 0's weights at wrap time, so all ranks start from the same student
    log = recover(model, teacher, _samples(), RecoveryConfig(steps=3, lr=1e-3), "cpu", tmp_dir, progress=False)
    _gather_to_file(_flat_encoder(model), out_file, {"losses": log["losses"]})


@pytest.mark.slow
def test_two_process_recovery_keeps_replicas_identical(tmp_path):
    out_file = tmp_path / "recovery.pt"
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(_recovery_worker, str(out_file), str(tmp_path / "ckpt"))
    result = torch.load(out_file, weights_only=True)
    params = result["params"]
    assert result["world"] == 2 and len(result["losses"]) == 3
    start = _flat_encoder(MedSAM(build_sam("tiny", seed=0)))
    # each rank drew different images: without gradient averaging the replicas would differ
    assert torch.equal(params[0], params[1])
    assert not torch.allclose(params[0], start)
    assert (tmp_path / "ckpt" / "checkpoint_latest.pt").is_file()  # written once, by rank 0


REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"


def _torchrun_bundle(run_id: str | None, configs: list[str], port: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m monai.bundle run [run_id] --config_file [...] ...`` from the repository."""
    files = str([str(CONFIGS / name) for name in configs])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        "-m", "monai.bundle", "run", *([run_id] if run_id else []), "--config_file", files,
        "--bundle_root", str(REPO / "bundle"), "--progress", "false", *args,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


@pytest.mark.slow
def test_torchrun_bundle_finetune_on_two_processes(tmp_path):
    """The documented command line: ``torchrun ... -m monai.bundle run finetune`` with multi_gpu_train.yaml.

    Each process trains on its half of the training images with DDP; only rank 0 writes the best model and the
    training state. Done with SVD adaptation, whose parametrization must exist before DDP wraps the model.
    """
    data = tmp_path / "data"
    write_synthetic_pairs(data, 10, 64, seed=3)
    checkpoint = tmp_path / "medsam_tiny.pth"
    torch.save(build_sam("tiny", seed=0).state_dict(), checkpoint)
    out = tmp_path / "ft"
    result = _torchrun_bundle(
        "finetune", ["train.yaml", "finetune.yaml", "multi_gpu_train.yaml"], 29517,
        "--checkpoint", str(checkpoint), "--data_roots", f"['{data}']", "--finetune_dir", str(out),
        "--epochs", "1", "--batch_size", "2",
        "--svd_adaptation", "true", "--trainable_modules", "['image_encoder']", "--lr", "0.01",
    )  # fmt: skip
    logs = result.stdout + result.stderr
    # 6 training images (of 10: 2 validation, 2 test), batches of 2: 3 iterations in one process, 2 in each of two
    assert "Epoch: 1/1, Iter: 2/2" in logs and "Iter: 3/3" not in logs
    assert logs.count("Epoch: 1/1, Iter: 1/2") == 1  # only rank 0 logs
    state = read_checkpoint(out / "checkpoint_latest.pt")
    assert state["engine"]["epoch"] == 1 and any(".parametrizations.weight." in k for k in state["model"])
    tuned, original = load_sam(out / "model.pt"), load_sam(checkpoint)  # plain weights, stock keys
    assert set(tuned.state_dict()) == set(original.state_dict())
    changed = {k for k, v in original.state_dict().items() if not torch.equal(v, tuned.state_dict()[k])}
    assert changed and all(k.startswith("image_encoder.") for k in changed)


@pytest.mark.slow
def test_torchrun_bundle_prune_on_two_processes(tmp_path):
    """``torchrun ... -m monai.bundle run prune``: shared calibration (summed Fisher), DDP recovery, one report."""
    data = tmp_path / "data"
    write_synthetic_pairs(data, 10, 64, seed=3)
    out = tmp_path / "prune"
    result = _torchrun_bundle(
        "prune", ["train.yaml", "prune.yaml"], 29519,
        "--data_roots", f"['{data}']", "--output_dir", str(out), "--device", "cpu", "--cal_size", "2",
        "--recovery_steps", "2", "--sam_pixel_normalize", "false",
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert "world size: 2" in log and log.count("pruned: encoder parameters") == 1  # rank 0 reports
    report = json.loads((out / "report.json").read_text())
    assert report["fisher_samples"]["sam"]["used"] == 2  # each process calibrated one image; the sums were added
    assert report["recovery"]["mlp"]["steps"] == 2
    assert load_sam(out / "model_pruned.pt").medcore_config.is_compact


@pytest.mark.slow
def test_torchrun_train_with_the_multi_gpu_overlay(tmp_path):
    """``torchrun ... run --config_file "['train.yaml','multi_gpu_train.yaml']"`` with a device given as a string."""
    data = tmp_path / "data"
    write_synthetic_pairs(data, 10, 64, seed=4)
    _torchrun_bundle(
        None, ["train.yaml", "multi_gpu_train.yaml"], 29521,
        "--data_roots", f"['{data}']", "--ckpt_dir", str(tmp_path / "models"),
        "--device", "cpu", "--epochs", "1", "--batch_size", "2",
    )  # fmt: skip
    assert load_sam(tmp_path / "models" / "model.pt") is not None  # written once, by rank 0


_EXIT_SCRIPT = """
import sys
import torch
from medcore_monai.engines.distributed import initialise_from_environment, shut_down
# a long switch interval keeps the GIL with the main thread up to its exit, widening the race this guards
sys.setswitchinterval(5.0)
initialise_from_environment()
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 2))
model(torch.rand(4, 8)).sum().backward()
# collectives still in flight when the final barrier starts: their tensors are freed after it
for _ in range(16):
    torch.distributed.all_reduce(torch.ones(3), async_op=True)
shut_down()
"""


@pytest.mark.slow
def test_processes_exit_cleanly_after_shut_down(tmp_path):
    """No gloo worker may free tensors while Python exits ("terminate called without an active exception").

    With a plain barrier and ``destroy_process_group`` in place of ``shut_down``, this launch aborted in each
    of three tries here (and the bundle's two-process training about one run in eight).
    """
    script = tmp_path / "exit.py"
    script.write_text(_EXIT_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", "29523"]
    result = subprocess.run([*command, str(script)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
