"""General scenes and the tiny SAM / MedSAM pair: determinism, geometry, and a few-step smoke run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from medcore_monai.engines import pair
from medcore_monai.engines.pair import (
    SampleBank,
    StageConfig,
    evaluate_bank,
    finetune_medical,
    save_fp16_state_dict,
    train_general_sam,
    warmup_cosine_factor,
)
from medcore_monai.networks import MedSAM, load_sam, read_checkpoint
from medcore_monai.transforms.synthetic import natural_scene, synthetic_batch, synthetic_scene

SIZE = 256


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tiny model is faster on one thread than on two cores shared with other work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _covers(box: torch.Tensor, label: torch.Tensor) -> bool:
    rows, cols = torch.nonzero(label[0], as_tuple=True)
    x0, y0, x1, y1 = box.tolist()
    return x0 <= cols.min() and y0 <= rows.min() and x1 >= cols.max() and y1 >= rows.max()


# --------------------------------------------------------------------------- general scenes


@pytest.mark.parametrize("seed", [0, 7, 2**33 + 5])
def test_scene_is_deterministic_per_seed(seed):
    first, second = synthetic_scene(seed, bbox_shift=5), synthetic_scene(seed, bbox_shift=5)
    for key in ("image", "label", "label_lowres", "box"):
        assert torch.equal(first[key], second[key]), key
    assert first["name"] == second["name"] == f"synthetic-{seed}"


def test_different_seeds_give_different_scenes():
    assert not torch.equal(synthetic_scene(1)["image"], synthetic_scene(2)["image"])


@pytest.mark.parametrize("natural_fraction", [0.0, 1.0])
def test_scene_layout_values_and_box(natural_fraction):
    for seed in range(4):
        scene = synthetic_scene(seed, size=SIZE, bbox_shift=5, natural_fraction=natural_fraction)
        image, label, lowres, box = scene["image"], scene["label"], scene["label_lowres"], scene["box"]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert label.shape == (1, SIZE, SIZE) and lowres.shape == (1, SIZE // 4, SIZE // 4)
        assert set(label.unique().tolist()) == {0.0, 1.0}
        assert set(lowres.unique().tolist()) <= {0.0, 1.0} and float(lowres.sum()) > 0
        assert box.shape == (4,) and box.dtype == torch.float32
        assert _covers(box, label)
        assert 0 <= box[0] <= box[2] <= SIZE - 1 and 0 <= box[1] <= box[3] <= SIZE - 1


def test_tight_box_without_jitter():
    scene = synthetic_scene(3, bbox_shift=0)
    rows, cols = torch.nonzero(scene["label"][0], as_tuple=True)
    expected = [cols.min(), rows.min(), cols.max(), rows.max()]
    assert scene["box"].tolist() == [float(v) for v in expected]


def test_natural_scene_uses_photograph_regions():
    image, instances, candidates = natural_scene(np.random.default_rng(0), SIZE)
    assert image.shape == (3, SIZE, SIZE) and instances.shape == (SIZE, SIZE)
    assert candidates and all(int((instances == c).sum()) > 0 for c in candidates)


def test_scene_size_must_be_multiple_of_four():
    with pytest.raises(ValueError, match="multiple of 4"):
        synthetic_scene(0, size=250)


def test_batch_stacks_scenes():
    batch = synthetic_batch([0, 1], size=SIZE)
    assert batch["image"].shape == (2, 3, SIZE, SIZE) and batch["box"].shape == (2, 4)
    assert batch["name"] == ["synthetic-0", "synthetic-1"]


# --------------------------------------------------------------------------- schedule and batches


def test_warmup_cosine_schedule():
    factors = [warmup_cosine_factor(s, 100, 10, 0.05) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_shuffled_indices_cover_each_epoch():
    indices = pair._shuffled_indices(10, 3, torch.Generator().manual_seed(0))
    epoch = torch.cat([next(indices) for _ in range(3)])
    assert len(set(epoch.tolist())) == 9


def test_medical_batches_are_augmented_consistently():
    bank = SampleBank.from_samples([synthetic_scene(s, SIZE) for s in range(3)])
    images, targets, boxes = pair._medical_batch(bank, StageConfig(steps=1, lr=1e-4, batch_size=3, seed=0))(0)
    assert images.shape == (3, 3, SIZE, SIZE) and targets.shape == (3, 1, SIZE // 4, SIZE // 4)
    for target, box in zip(targets, boxes):
        # The low-resolution target must lie inside the (full-resolution) box after the same rotation.
        full = torch.nn.functional.interpolate(target[None], scale_factor=4, mode="nearest")[0]
        inside = torch.zeros_like(full)
        x0, y0, x1, y1 = (int(v) for v in box)
        inside[:, y0 - 3 : y1 + 4, x0 - 3 : x1 + 4] = 1
        assert float((full * (1 - inside)).sum()) == 0


# --------------------------------------------------------------------------- training smoke run


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    torch.manual_seed(0)
    config = StageConfig(steps=2, lr=1e-4, batch_size=2, warmup_steps=1, log_every=1)
    general, general_history = train_general_sam(config, progress=False)
    bank = SampleBank.from_samples([synthetic_scene(100 + s, SIZE) for s in range(4)])
    medical, medical_history = finetune_medical(general, bank, config, progress=False)
    folder = tmp_path_factory.mktemp("pair")
    paths = save_fp16_state_dict(general, folder / "sam.pth"), save_fp16_state_dict(medical, folder / "medsam.pth")
    return general, medical, general_history, medical_history, paths, bank


def test_training_histories(trained_pair):
    _, _, general_history, medical_history, _, _ = trained_pair
    for history in (general_history, medical_history):
        assert [h["step"] for h in history] == [1, 2]
        assert all(math.isfinite(h["loss"]) and h["lr"] > 0 for h in history)


def test_finetune_keeps_prompt_encoder_and_leaves_general_model_alone(trained_pair):
    general, medical, *_ = trained_pair
    for (name, a), b in zip(general.prompt_encoder.state_dict().items(), medical.prompt_encoder.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(p.requires_grad for p in medical.parameters())
    changed = [
        not torch.equal(a, b) for a, b in zip(general.image_encoder.parameters(), medical.image_encoder.parameters())
    ]
    assert any(changed)


def test_fp16_checkpoints_load_and_run(trained_pair):
    general, _, _, _, paths, bank = trained_pair
    for path in paths:
        raw = read_checkpoint(path)
        assert all(v.dtype == torch.float16 for v in raw.values() if v.is_floating_point())
        assert set(raw) == set(general.state_dict())
        model = MedSAM(load_sam(path))
        with torch.no_grad():
            logits = model(bank.images[:2], bank.boxes[:2])
        assert logits.shape == (2, 1, SIZE // 4, SIZE // 4) and torch.isfinite(logits).all()
    summary = evaluate_bank(MedSAM(load_sam(paths[1])), bank, batch_size=2)
    assert summary["n"] == len(bank) and 0.0 <= summary["dice"] <= 1.0


# --------------------------------------------------------------------------- command line on a tiny folder


def _tiny_folder(root, count=10, side=64):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        image = (rng.random((side, side, 3)) * 255).astype(np.uint8)
        mask = np.zeros((side, side), dtype=np.uint8)
        mask[10 + i : 40 + i, 12:44] = 255
        Image.fromarray(image).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i:02d}.png")
    return root


def test_cli_writes_pair_and_report(tmp_path):
    root = _tiny_folder(tmp_path / "kvasir")
    out = tmp_path / "out"
    args = ["--kvasir-root", str(root), "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")]
    args += ["--general-steps", "1", "--medical-steps", "1", "--batch-size", "2", "--general-val-scenes", "2"]
    report = pair.main([*args, "--no-progress"])
    saved = json.loads((out / pair.REPORT_FILE).read_text())
    assert saved["metrics"] == report["metrics"]
    assert saved["data"]["kvasir"]["n_train"] == 6 and saved["data"]["kvasir"]["n_val"] == 2
    for key, file in (("sam_tiny", pair.GENERAL_FILE), ("medsam_tiny", pair.MEDICAL_FILE)):
        assert saved["models"][key]["file"] == file and len(saved["models"][key]["sha256"]) == 64
        load_sam(out / file)
    assert set(saved["metrics"]["kvasir_val"]) == {"sam_tiny", "sam_tiny_minmax_input", "medsam_tiny"}
    assert saved["training"]["sam_tiny"]["config"]["steps"] == 1
