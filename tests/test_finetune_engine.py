"""The function-based fine-tuning engine (robustness benchmark, pair training): loss, best model, resume, masks."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from monai.data import DataLoader

from medcore_monai.demo import synthetic_items
from medcore_monai.engines.common import prepare_medsam_batch
from medcore_monai.engines.finetune import (
    HISTORY_FILE,
    _clip_gradients,
    cosine_lr_factor,
    finetune,
    finetune_loss,
)
from medcore_monai.networks import (
    MedSAM,
    StructuredMasks,
    attach_masks,
    build_sam,
    encoder_structure,
    load_sam,
    read_checkpoint,
)
from medcore_monai.transforms import medsam_preprocess

LR = 1e-3  # 10x the default so that two epochs visibly lower the loss of a random tiny model


@pytest.fixture(scope="module")
def samples():
    transform = medsam_preprocess(size=256, bbox_shift=0, seed=0)
    return [transform(item) for item in synthetic_items(4, 256, seed=0)]


def _loaders(samples, count=4):
    train = DataLoader(samples[:count], batch_size=2, shuffle=True)
    val = DataLoader(samples[:count], batch_size=2, shuffle=False)
    return train, val


def _fresh_model() -> MedSAM:
    return MedSAM(build_sam("tiny", seed=0))


@torch.no_grad()
def _mean_loss(model, loader) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        images, target, (boxes,), _ = prepare_medsam_batch(batch)
        total += float(finetune_loss(model(images, boxes), target)) * len(images)
        count += len(images)
    return total / count


@pytest.fixture(scope="module")
def baseline(samples, tmp_path_factory):
    """An uninterrupted two-epoch run (shared by several tests)."""
    model = _fresh_model()
    train, val = _loaders(samples)
    initial = _mean_loss(model, val)
    out = tmp_path_factory.mktemp("baseline")
    result = finetune(model, train, val, out, epochs=2, lr=LR, patience=0, progress=False)
    return model, result, out, initial


def test_loss_decreases(baseline):
    _, result, _, initial = baseline
    history = result["history"]
    assert [e["epoch"] for e in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert result["best_loss"] < initial
    assert all(e["val_loss"] == e["monitored_loss"] for e in history)


def test_best_checkpoint_reloads_and_matches(baseline, samples):
    model, result, out, _ = baseline
    best = result["best_checkpoint"]
    assert best.parent == out and best.is_file()
    assert read_checkpoint(best)["metadata"]["epoch"] == result["best_epoch"]
    reloaded = MedSAM(load_sam(best))
    batch = next(iter(DataLoader(samples, batch_size=2)))
    images, _, (boxes,), _ = prepare_medsam_batch(batch)
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(images, boxes), model(images, boxes))


def test_history_json_is_written(baseline):
    _, result, out, _ = baseline
    written = json.loads((out / HISTORY_FILE).read_text())
    assert written["epochs"] == result["history"]
    assert written["best_epoch"] == result["best_epoch"] and written["monitored"] == "val_loss"
    assert not written["stopped_early"]


def test_cosine_schedule():
    assert cosine_lr_factor(0, 1) == 1.0
    assert cosine_lr_factor(0, 5) == 1.0 and cosine_lr_factor(4, 5) == pytest.approx(0.01)
    assert cosine_lr_factor(2, 5) == pytest.approx(0.505)  # halfway: mean of 1 and 0.01
    assert cosine_lr_factor(1, 5) == pytest.approx(0.01 + 0.99 * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine_lr_factor(9, 5) == pytest.approx(0.01)  # constant after the end
    factors = [cosine_lr_factor(e, 20) for e in range(20)]
    assert factors == sorted(factors, reverse=True)


def test_learning_rate_follows_schedule(baseline):
    _, result, _, _ = baseline
    assert [e["lr"] for e in result["history"]] == pytest.approx([LR, 0.01 * LR])


def test_resume_continues_at_next_epoch_with_identical_results(baseline, samples, tmp_path):
    _, reference, reference_dir, _ = baseline
    train, val = _loaders(samples)
    first = finetune(_fresh_model(), train, val, tmp_path, epochs=1, lr=LR, patience=0, progress=False)
    assert [e["epoch"] for e in first["history"]] == [1]

    # a new process would rebuild the model from scratch; the checkpoint restores everything else
    second = finetune(_fresh_model(), train, val, tmp_path, epochs=2, lr=LR, patience=0, progress=False)
    assert second["start_epoch"] == 2 and second["epochs_completed"] == 2
    for got, want in zip(second["history"], reference["history"], strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    resumed = read_checkpoint(tmp_path / "checkpoint_latest.pth")["network"]
    uninterrupted = read_checkpoint(reference_dir / "checkpoint_latest.pth")["network"]
    for key, value in uninterrupted.items():
        assert torch.allclose(resumed[key], value, atol=1e-6), key

    third = finetune(_fresh_model(), train, val, tmp_path, epochs=2, lr=LR, patience=0, progress=False)
    assert third["start_epoch"] == 3 and third["history"] == second["history"]  # nothing left to run


def test_early_stopping_when_validation_loss_stalls(samples, tmp_path, caplog):
    train, val = _loaders(samples, count=2)
    with caplog.at_level(logging.INFO, logger="medcore_monai.engines.finetune"):
        # lr=0 keeps the weights, so the validation loss never improves after epoch 1
        result = finetune(_fresh_model(), train, val, tmp_path, epochs=5, lr=0.0, patience=1, amp=True, progress=False)
    assert "amp=True ignored" in caplog.text
    assert [e["epoch"] for e in result["history"]] == [1, 2]
    assert result["stopped_early"] and result["best_epoch"] == 1
    assert result["history"][0]["val_loss"] == result["history"][1]["val_loss"]

    again = finetune(_fresh_model(), train, val, tmp_path, epochs=5, lr=0.0, patience=1, progress=False)
    assert again["epochs_completed"] == 2 and again["start_epoch"] == 3  # a stopped run stays stopped


def _masks(model: MedSAM) -> StructuredMasks:
    masks = StructuredMasks.full(encoder_structure(model.image_encoder))
    for heads, channels in zip(masks.heads, masks.channels):
        heads[1] = False
        channels[::2] = False
    return masks


def test_attached_masks_stay_enforced(samples, tmp_path):
    model = _fresh_model()
    masks = _masks(model)
    train, _ = _loaders(samples, count=2)
    with attach_masks(model.image_encoder, masks):
        result = finetune(model, train, None, tmp_path, epochs=1, lr=LR, patience=0, progress=True)
    assert result["history"][0]["val_loss"] is None
    for blk, heads, channels in zip(model.image_encoder.blocks, masks.heads, masks.channels):
        head_dim = blk.attn.qkv.out_features // (3 * blk.attn.num_heads)
        removed_rows = (~heads).repeat_interleave(head_dim).repeat(3)  # rows of Q, K and V
        qkv_grad, lin1_grad = blk.attn.qkv.weight.grad, blk.mlp.lin1.weight.grad
        assert torch.all(qkv_grad[removed_rows] == 0) and qkv_grad[~removed_rows].abs().sum() > 0
        assert torch.all(lin1_grad[~channels] == 0) and lin1_grad[channels].abs().sum() > 0
        assert torch.all(blk.mlp.lin2.weight.grad[:, ~channels] == 0)
    assert all(p.grad is None for p in model.prompt_encoder.parameters())
    assert all(p.requires_grad for p in model.prompt_encoder.parameters())  # flags restored afterwards


def test_rejects_invalid_arguments(samples, tmp_path):
    train, val = _loaders(samples, count=2)
    with pytest.raises(ValueError, match="epochs"):
        finetune(_fresh_model(), train, val, tmp_path, epochs=0)
    with pytest.raises(ValueError, match="patience"):
        finetune(_fresh_model(), train, val, tmp_path, patience=-1)


def test_clipping_under_amp_unscales_first():
    # CPU GradScaler stands in for the CUDA one: same unscale_/step bookkeeping.
    layer = torch.nn.Linear(4, 1, bias=False)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(layer(torch.full((1, 4), 10.0)).sum()).backward()  # unscaled gradient norm 20
    before = layer.weight.detach().clone()
    _clip_gradients(list(layer.parameters()), max_norm=1.0)(
        SimpleNamespace(amp=True, scaler=scaler, optimizer=optimizer)
    )
    assert float(layer.weight.grad.norm()) == pytest.approx(1.0, rel=1e-4)
    scaler.step(optimizer)  # must not unscale a second time
    assert float((before - layer.weight.detach()).norm()) == pytest.approx(1.0, rel=1e-4)


def test_decoder_only_finetuning_leaves_encoder_and_flags_untouched(samples, tmp_path):
    model = _fresh_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.image_encoder.blocks[0].mlp.lin1.weight.requires_grad_(False)  # a caller's own flag survives
    train, val = _loaders(samples, 2)
    finetune(
        model,
        train,
        val,
        tmp_path,
        epochs=1,
        lr=LR,
        patience=0,
        progress=False,
        trainable=("mask_decoder",),
        tensorboard_dir=tmp_path / "tb",
    )
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2  # trainer and validation
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("mask_decoder.") for k in changed)
    assert not any(k.startswith("mask_decoder.iou_prediction_head.") for k in changed)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags["image_encoder.blocks.0.mlp.lin1.weight"] is False
    assert all(v for n, v in flags.items() if n != "image_encoder.blocks.0.mlp.lin1.weight")


def test_unknown_or_empty_trainable_modules_are_refused(samples, tmp_path):
    train, val = _loaders(samples, 2)
    with pytest.raises(ValueError, match="unknown trainable modules"):
        finetune(_fresh_model(), train, val, tmp_path, epochs=1, progress=False, trainable=("decoder",))
    model = _fresh_model()
    for p in model.mask_decoder.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        finetune(model, train, val, tmp_path, epochs=1, progress=False, trainable=("mask_decoder",))
