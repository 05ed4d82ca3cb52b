"""Distilling the encoder's intermediate outputs (stage / global-block taps) during recovery."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from small_models import SMALL_TINYVIT

from medcore_monai.cascade import recover, run_cascade
from medcore_monai.demo import synthetic_items
from medcore_monai.engines.recovery import RecoveryTrainer, TeacherOutputs, recovery_loader
from medcore_monai.losses.recovery import RecoveryLossWeights, intermediate_gap, recovery_loss
from medcore_monai.networks import (
    MedSAM,
    StructuredMasks,
    build_sam,
    captured_outputs,
    distillation_taps,
    encoder_structure,
    slim_encoder_,
)
from medcore_monai.pruning.cascade import CascadeConfig, RecoveryConfig
from medcore_monai.transforms import medsam_preprocess

TINYVIT = SMALL_TINYVIT
ONLY_INTERMEDIATE = RecoveryLossWeights(boundary=0.0, feature=0.0, logit=0.0, frequency=0.0, intermediate=10.0)


def _samples(size: int, count: int = 3, seed: int = 0) -> list[dict]:
    transform = medsam_preprocess(size=size, lowres_size=size if size < 256 else 256)
    return [transform(item) | {"name": f"s{i}"} for i, item in enumerate(synthetic_items(count, size, seed))]


def _batch(samples):
    images = torch.stack([torch.as_tensor(s["image"]) for s in samples]).float()
    boxes = torch.stack([torch.as_tensor(s["box"]) for s in samples]).float()
    return [s["name"] for s in samples], images, boxes


def _masked_half(encoder) -> StructuredMasks:
    masks = StructuredMasks.for_encoder(encoder)
    for heads in masks.heads:
        if len(heads) > 1:
            heads[len(heads) // 2 :] = False
    for channels in masks.channels:
        channels[: len(channels) // 2] = False
    return masks


def _mlp_width(encoder) -> int:
    return sum(b.mlp_dim for b in encoder_structure(encoder))


def test_taps_are_tinyvit_stages_and_vit_global_blocks():
    tinyvit = build_sam(TINYVIT, seed=0).image_encoder
    assert distillation_taps(tinyvit) == ["layers.0", "layers.1", "layers.2", "layers.3"]
    vit = build_sam("tiny", seed=0).image_encoder
    global_blocks = [f"blocks.{i}" for i, b in enumerate(vit.blocks) if b.window_size == 0]
    assert global_blocks and distillation_taps(vit) == global_blocks
    with pytest.raises(TypeError, match="no distillation taps"):
        distillation_taps(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("config", [TINYVIT, "tiny"], ids=["tinyvit", "vit"])
def test_a_slimmed_encoder_keeps_the_tap_shapes_and_the_hooks_leave_with_the_block(config):
    dense = build_sam(config, seed=1).image_encoder.eval()
    slim = build_sam(config, seed=1).image_encoder.eval()
    slim_encoder_(slim, _masked_half(slim))
    assert _mlp_width(slim) < _mlp_width(dense)
    size = 64 if config is TINYVIT else 256
    images = torch.rand(2, 3, size, size)
    taps = distillation_taps(dense)
    with torch.no_grad(), captured_outputs(dense, taps) as teacher, captured_outputs(slim, taps) as student:
        dense(images), slim(images)
    assert all(t is not None and t.shape == s.shape for t, s in zip(teacher, student))
    assert not torch.equal(teacher[-1], student[-1])  # pruning changed what flows, not its shape
    assert all(not m._forward_hooks for m in dense.modules())


def test_intermediate_gap_is_scale_free_and_checks_its_inputs():
    teacher = [torch.randn(2, 8, 4, 4), 100.0 * torch.randn(2, 16, 2, 2)]
    assert intermediate_gap(teacher, teacher) == 0
    noisy = [t + 0.1 * t.std() * torch.randn_like(t) for t in teacher]
    gap = intermediate_gap(noisy, teacher)
    assert gap == pytest.approx(0.01, rel=0.25)  # 10 % noise on each tap, whatever its scale
    with pytest.raises(ValueError, match="matching taps"):
        intermediate_gap(teacher[:1], teacher)
    with pytest.raises(ValueError, match="does not match"):
        intermediate_gap([teacher[1], teacher[0]], teacher)


def test_the_intermediate_term_adds_to_the_loss_only_when_weighted():
    target = torch.zeros(1, 1, 16, 16)
    target[..., 4:12, 4:12] = 1
    full = torch.nn.functional.interpolate(target, size=64, mode="nearest")
    logits, emb = torch.randn(1, 1, 16, 16), torch.randn(1, 8, 4, 4)
    student, teacher = [torch.randn(1, 8, 4, 4)], [torch.randn(1, 8, 4, 4)]
    plain = recovery_loss(logits, full, target, emb, emb, logits, RecoveryLossWeights(), student, teacher)
    weights = RecoveryLossWeights(intermediate=3.0)
    weighted = recovery_loss(logits, full, target, emb, emb, logits, weights, student, teacher)
    assert "intermediate" not in plain
    assert weighted["intermediate"] == intermediate_gap(student, teacher)
    assert weighted["loss"] == pytest.approx(float(plain["loss"] + 3.0 * weighted["intermediate"]), rel=1e-6)
    with pytest.raises(ValueError, match="finite"):
        RecoveryLossWeights(intermediate=float("nan"))


def test_cached_teacher_taps_match_the_live_teacher():
    model = MedSAM(build_sam(TINYVIT, seed=2))
    samples = _samples(64)
    taps = distillation_taps(model.image_encoder)
    live = TeacherOutputs(model, cache=False, taps=taps)
    cached = TeacherOutputs(model, cache=True, taps=taps).precompute(samples, "cpu")
    a, b = live(*_batch(samples)), cached(*_batch(samples))
    assert len(a.taps) == len(b.taps) == 4
    torch.testing.assert_close(a.embedding, b.embedding, atol=1e-5, rtol=1e-5)
    for x, y in zip(a.taps, b.taps):  # cached in bfloat16
        assert y.dtype == torch.float32 and y.shape == x.shape
        torch.testing.assert_close(y, x, atol=1e-2 * float(x.abs().max()), rtol=1e-2)
    assert TeacherOutputs(model, cache=False)(*_batch(samples)).taps == ()


def test_a_trainer_asked_to_distil_taps_needs_a_teacher_that_records_them():
    model = MedSAM(build_sam(TINYVIT, seed=2))
    samples = _samples(64)
    with pytest.raises(ValueError, match="needs a teacher that records"):
        RecoveryTrainer(
            device="cpu", max_epochs=1, train_data_loader=recovery_loader(samples, 1, 1, 0), network=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), teacher=TeacherOutputs(model),
            loss_weights=ONLY_INTERMEDIATE,
        )  # fmt: skip


def _tap_gap(model, teacher, samples) -> float:
    names, images, boxes = _batch(samples)
    taps = distillation_taps(model.image_encoder)
    with torch.no_grad(), captured_outputs(model.image_encoder, taps) as student:
        model.eval().encode(images)
    return float(intermediate_gap(student, teacher(names, images, boxes).taps))


def test_recovery_with_the_intermediate_term_pulls_the_taps_towards_the_teacher():
    samples = _samples(64, count=4, seed=3)
    gaps = {}
    for weight in (0.0, 10.0):
        dense = MedSAM(build_sam(TINYVIT, seed=4))
        taps = distillation_taps(dense.image_encoder)
        teacher = TeacherOutputs(dense, cache=True, taps=taps).precompute(samples, "cpu")
        model = MedSAM(build_sam(TINYVIT, seed=4))
        slim_encoder_(model.image_encoder, _masked_half(model.image_encoder))
        before = _tap_gap(model, teacher, samples)
        loss = dataclasses.replace(ONLY_INTERMEDIATE, intermediate=weight)
        recover(model, teacher, samples, RecoveryConfig(steps=15, lr=1e-4, loss=loss), progress=False)
        gaps[weight] = (before, _tap_gap(model, teacher, samples))
    assert gaps[0.0][0] == gaps[10.0][0] > 0  # the same pruned model
    assert gaps[10.0][1] < 0.7 * gaps[10.0][0] and gaps[10.0][1] < gaps[0.0][1]


def test_a_cascade_distils_the_taps_through_slimming():
    samples = _samples(64, count=3, seed=5)
    model = MedSAM(build_sam(TINYVIT, seed=6))
    loss = RecoveryLossWeights(intermediate=5.0)
    config = CascadeConfig(
        head_sparsity=0.4, mlp_sparsity=0.4, score="magnitude", slim=True,
        recovery=RecoveryConfig(steps=2, lr=1e-3, loss=loss),
    )  # fmt: skip
    seen = []
    original = RecoveryTrainer._iteration

    def spy(self, engine, batch):
        output = original(self, engine, batch)
        seen.append(output["loss_intermediate"])
        return output

    RecoveryTrainer._iteration = spy
    try:
        result = run_cascade(model, {"d": samples}, config, device="cpu", progress=False)
    finally:
        RecoveryTrainer._iteration = original
    assert result is not None and len(seen) == 4 and all(v > 0 for v in seen)
    assert _mlp_width(model.image_encoder) < _mlp_width(build_sam(TINYVIT).image_encoder)
