"""Run folders: a rerun never mixes states, an interrupted pruning run resumes to the same model."""

from __future__ import annotations

import json

import pytest
import torch

from medcore_monai.bundle import run_workflow
from medcore_monai.config import ConfigError
from medcore_monai.demo import write_synthetic_pairs
from medcore_monai.engines.recovery import RecoveryTrainer
from medcore_monai.networks import build_sam, kept_indices, load_sam


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_folders")
    torch.save(build_sam("tiny", seed=0).state_dict(), root / "medsam.pth")
    torch.save(build_sam("tiny", seed=1).state_dict(), root / "sam.pth")
    write_synthetic_pairs(root / "data", 8, 64, seed=5)
    return root


def _prune(inputs, out, **extra):
    settings = {
        "medsam_ckpt": str(inputs / "medsam.pth"),
        "sam_ckpt": str(inputs / "sam.pth"),
        "sam_pixel_normalize": False,
        "data_roots": [str(inputs / "data")],
        "output_dir": str(out),
        "device": "cpu",
        "cal_size": 3,
        "recovery_steps": 4,
        "head_sparsity": 0.3,
        "mlp_sparsity": 0.3,
        "progress": False,
    }
    run_workflow("prune", ("train.yaml", "prune.yaml"), **(settings | extra))
    return json.loads((out / "report.json").read_text())


def _weights(path):
    return load_sam(path).state_dict()


def test_a_rerun_with_other_settings_is_refused_and_resume_false_starts_over(inputs, tmp_path):
    out = tmp_path / "run"
    first = _prune(inputs, out)
    assert first["resumed_from"] is None
    with pytest.raises(ConfigError, match=r"recovery_lr: 1e-05 -> 0\.001") as caught:
        _prune(inputs, out, recovery_lr=1e-3)
    assert "--resume false" in str(caught.value)
    again = _prune(inputs, out)  # same settings: nothing left to do, the same outputs again
    assert again["resumed_from"]["iteration"] == 8
    assert again["recovery"] == first["recovery"]
    fresh = _prune(inputs, out, recovery_lr=1e-3, resume=False)
    assert fresh["resumed_from"] is None and fresh["config"]["recovery_lr"] == 1e-3


@pytest.mark.parametrize("slim", [True, False], ids=["slimmed", "masked"])
def test_an_interrupted_pruning_run_resumes_to_the_uninterrupted_model(inputs, tmp_path, monkeypatch, slim):
    """Masked runs (``slim: false``) too: their masks are hooks, outside the saved network, and must be restored."""
    whole = _prune(inputs, tmp_path / "whole", slim=slim)
    original = RecoveryTrainer._iteration

    def killed_at_6(self, engine, batch):
        if engine.state.iteration == 6:  # second stage, after the checkpoint of iteration 5
            raise KeyboardInterrupt("killed")
        return original(self, engine, batch)

    monkeypatch.setattr(RecoveryTrainer, "_iteration", killed_at_6)
    with pytest.raises(KeyboardInterrupt):
        _prune(inputs, tmp_path / "cut", slim=slim)
    monkeypatch.setattr(RecoveryTrainer, "_iteration", original)
    resumed = _prune(inputs, tmp_path / "cut", slim=slim)
    assert resumed["resumed_from"]["iteration"] == 5
    assert resumed["recovery"] == whole["recovery"]  # the loss history before the interruption is kept
    assert resumed["budgets"] == whole["budgets"] and resumed["kept_heads"] == whole["kept_heads"]
    a, b = _weights(tmp_path / "whole" / "model_pruned.pt"), _weights(tmp_path / "cut" / "model_pruned.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["metrics"]["macro"]["after"] == whole["metrics"]["macro"]["after"]
    saved = load_sam(tmp_path / "cut" / "model_pruned.pt").image_encoder.blocks
    assert [kept_indices(block)[0] for block in saved] == whole["kept_heads"]
    assert resumed["reduction"]["encoder_params"] > 0.1  # the saved model is the pruned one, not the dense weights


def test_recovery_on_more_training_images_than_the_calibration_set(inputs, tmp_path):
    calibration_only = _prune(inputs, tmp_path / "calibration")
    assert calibration_only["recovery_images"] == {"data": 3}  # cal_size
    wider = _prune(inputs, tmp_path / "train", recovery_images=4)
    splits = json.loads((tmp_path / "train" / "splits.json").read_text())
    assert len(splits["splits"]["data"]["train"]) >= 4
    assert wider["recovery_images"] == {"data": 4}
    assert wider["recovery"] != calibration_only["recovery"]  # other images drawn, other losses
    assert wider["kept_heads"] == calibration_only["kept_heads"]  # calibration and scores are unchanged


def test_an_unreadable_mask_gives_one_error_naming_the_file(inputs, tmp_path):
    from medcore_monai.data import DataError

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for image in sorted((inputs / "data" / "images").iterdir()):
        (data / "images" / image.name).write_bytes(image.read_bytes())
        mask = (inputs / "data" / "masks" / image.name).read_bytes()
        (data / "masks" / f"{image.stem}.jpg").write_bytes(mask[: len(mask) // 2])  # truncated: a broken download
    with pytest.raises(DataError, match=r"Cannot read image .*masks/synthetic_\d+\.jpg"):
        _prune(inputs, tmp_path / "out", data_roots=[str(data)])
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.slow
def test_the_command_line_exits_with_one_error_line_and_code_1_never_an_abort(tmp_path):
    """A truncated mask JPEG used to end in SIGABRT (exit 134) after the right message in about half of the runs."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    write_synthetic_pairs(data, 12, 96, seed=3)  # the reproduction's data: aborted 2-3 times in 6 before the fix
    mask = sorted((data / "masks").iterdir())[3]  # one broken download among good masks, still being cached
    Image.open(mask).convert("L").save(mask.with_suffix(".jpg"), quality=90)
    mask.unlink()
    broken = mask.with_suffix(".jpg").read_bytes()
    mask.with_suffix(".jpg").write_bytes(broken[: len(broken) // 2])
    configs = "['bundle/configs/train.yaml','bundle/configs/prune.yaml','configs/demo.yaml']"
    for attempt in range(4):
        command = [sys.executable, "-m", "monai.bundle", "run", "prune", "--config_file", configs]
        command += ["--data_roots", f"['{data}']", "--output_dir", str(tmp_path / f"out{attempt}")]
        done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
        assert done.returncode == 1, f"attempt {attempt}: exit {done.returncode}\n{done.stderr[-2000:]}"
        assert "error: Cannot read image" in done.stderr and "Traceback" not in done.stderr
        assert "terminate called" not in done.stderr
