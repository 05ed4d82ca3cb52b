"""Recovery trainer and the pruning cascade on the tiny model."""

from __future__ import annotations

import pytest
import torch

from medcore_monai.cascade import recover, run_cascade
from medcore_monai.demo import synthetic_items
from medcore_monai.engines.recovery import RecoveryTrainer, TeacherOutputs
from medcore_monai.losses.recovery import RecoveryLossWeights, boundary_complexity, recovery_loss
from medcore_monai.networks import (
    MedSAM,
    StructuredMasks,
    attach_masks,
    build_sam,
    count_parameters,
    encoder_structure,
    kept_indices,
    slim_encoder_,
)
from medcore_monai.pruning.cascade import CascadeConfig, RecoveryConfig, aligned_reference
from medcore_monai.transforms import medsam_preprocess


@pytest.fixture(scope="module")
def calibration():
    transform = medsam_preprocess(size=256)
    data = {}
    for tag, seed in (("a", 0), ("b", 1)):
        samples = [transform(item) for item in synthetic_items(3, 256, seed)]
        for s in samples:
            s["name"] = f"{tag}_{s['name']}"
        data[tag] = samples
    return data


def _model(seed=0):
    return MedSAM(build_sam("tiny", seed=seed))


def _probe(calibration):
    sample = calibration["a"][0]
    return torch.as_tensor(sample["image"])[None].float(), torch.as_tensor(sample["box"])[None].float()


# ----------------------------------------------------------------------------------------------- recovery


def test_recovery_loss_terms_vanish_for_a_perfect_student():
    target = torch.zeros(1, 1, 16, 16)
    target[..., 4:12, 4:12] = 1
    logits = torch.where(target > 0, 30.0, -30.0)
    full = torch.nn.functional.interpolate(target, size=64, mode="nearest")
    emb = torch.randn(1, 8, 4, 4)
    terms = recovery_loss(logits, full, target, emb, emb, logits, RecoveryLossWeights())
    assert terms["feature"] == 0 and terms["logit"] == 0
    assert terms["seg"] < 0.05 and terms["loss"] < 0.2
    worse = recovery_loss(-logits, full, target, emb, emb + 1, logits, RecoveryLossWeights())
    assert worse["feature"] == pytest.approx(1.0) and worse["logit"] > 0 and worse["loss"] > terms["loss"]
    with pytest.raises(ValueError, match="finite"):
        RecoveryLossWeights(logit=-1.0)


def test_boundary_complexity_prefers_ragged_masks():
    blob = torch.zeros(64, 64)
    blob[16:48, 16:48] = 1
    ragged = blob.clone()
    ragged[16:48:2, 16:20] = 0
    assert boundary_complexity(ragged) > boundary_complexity(blob)
    assert boundary_complexity(torch.zeros(64, 64)) == pytest.approx(1e-4)


def test_teacher_cache_matches_live_teacher(calibration):
    model = _model()
    samples = calibration["a"]
    live, cached = TeacherOutputs(model, cache=False), TeacherOutputs(model, cache=True)
    cached.precompute(samples, "cpu")
    images = torch.stack([torch.as_tensor(s["image"]) for s in samples]).float()
    boxes = torch.stack([torch.as_tensor(s["box"]) for s in samples]).float()
    names = [s["name"] for s in samples]
    emb_live, logits_live, taps_live = live(names, images, boxes)
    emb_cached, logits_cached, taps_cached = cached(names, images, boxes)
    assert taps_live == taps_cached == ()  # none asked for
    assert torch.allclose(emb_live, emb_cached, atol=1e-5) and torch.allclose(logits_live, logits_cached, atol=1e-5)
    with pytest.raises(KeyError, match="no entry"):
        cached(["unknown"], images[:1], boxes[:1])


def test_recovery_trains_only_the_encoder_and_keeps_removed_groups_frozen(calibration):
    model = _model()
    structure = encoder_structure(model.image_encoder)
    masks = StructuredMasks.full(structure)
    masks.heads[0][1] = False
    masks.channels[1][:100] = False
    teacher = TeacherOutputs(model, cache=True)
    teacher.precompute(calibration["a"], "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with attach_masks(model.image_encoder, masks):
        log = recover(model, teacher, calibration["a"], RecoveryConfig(steps=3, lr=1e-3), progress=False)
    after = model.state_dict()
    assert len(log["losses"]) == 3
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("image_encoder."))
    assert not torch.equal(
        before["image_encoder.blocks.0.attn.qkv.weight"], after["image_encoder.blocks.0.attn.qkv.weight"]
    )
    proj = "image_encoder.blocks.0.attn.proj.weight"
    assert torch.equal(before[proj][:, 64:128], after[proj][:, 64:128])  # removed head 1: no gradient, no decay
    lin2 = "image_encoder.blocks.1.mlp.lin2.weight"
    assert torch.equal(before[lin2][:, :100], after[lin2][:, :100])
    assert all(p.requires_grad for p in model.parameters())  # the freezing is undone for later training


def _recovery_run(calibration, folder, interrupt_at=None, schedule="constant"):
    model = _model()
    teacher = TeacherOutputs(model, cache=True).precompute(calibration["a"], "cpu")
    original = RecoveryTrainer._iteration

    def interrupted(self, engine, batch):
        if engine.state.iteration == interrupt_at:
            raise KeyboardInterrupt("killed")  # like SIGINT/SIGKILL between two iterations
        return original(self, engine, batch)

    config = RecoveryConfig(steps=8, lr=1e-3, seed=5, lr_schedule=schedule)
    try:
        RecoveryTrainer._iteration = interrupted
        log = recover(model, teacher, calibration["a"], config, progress=False, checkpoint_dir=folder)
    finally:
        RecoveryTrainer._iteration = original
    return model, log


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_recovery_is_reproducible_and_an_interrupted_run_resumes_bit_identically(calibration, tmp_path, schedule):
    first, first_log = _recovery_run(calibration, tmp_path / "a", schedule=schedule)
    second, second_log = _recovery_run(calibration, tmp_path / "b", schedule=schedule)
    assert first_log["losses"] == second_log["losses"] and len(first_log["losses"]) == 8
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())

    with pytest.raises(KeyboardInterrupt):
        _recovery_run(calibration, tmp_path / "c", interrupt_at=7, schedule=schedule)  # saved after iteration 6
    (tmp_path / "c" / ".checkpoint_latest.pt.abc123.pt").write_bytes(b"")  # a save killed half-way
    resumed, resumed_log = _recovery_run(calibration, tmp_path / "c", schedule=schedule)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in first.state_dict().items())
    assert resumed_log["losses"] == first_log["losses"]  # the history before the interruption is kept
    assert not list((tmp_path / "c").glob(".checkpoint_latest.pt.*"))  # stale temporary removed


def test_a_cosine_recovery_schedule_changes_only_the_step_sizes(calibration, tmp_path):
    constant, constant_log = _recovery_run(calibration, tmp_path / "a")
    cosine, cosine_log = _recovery_run(calibration, tmp_path / "b", schedule="cosine")
    assert constant_log["losses"][0] == cosine_log["losses"][0]  # same model, same first image: same first loss
    assert constant_log["losses"][3:] != cosine_log["losses"][3:]  # from the third step on, the steps shrink
    weights = "image_encoder.blocks.0.attn.qkv.weight"
    assert not torch.equal(constant.state_dict()[weights], cosine.state_dict()[weights])


# ----------------------------------------------------------------------------------------------- cascade


def _config(**kwargs):
    base = {"head_sparsity": 0.5, "mlp_sparsity": 0.5, "recovery": RecoveryConfig(steps=2, lr=1e-4)}
    return CascadeConfig(**(base | kwargs))


def test_dual_cascade_meets_budgets_and_prunes_lowest_scores(calibration):
    model, reference = _model(0), _model(1)
    dense_params = count_parameters(model.image_encoder)
    result = run_cascade(model, calibration, _config(), reference_model=reference, progress=False)
    heads, channels = result.budgets
    assert heads.achieved == round(0.5 * 18) and channels.achieved == round(0.5 * 6 * 768)
    structure = encoder_structure(build_sam("tiny").image_encoder)
    removed = heads.achieved * structure[0].params_per_head + channels.achieved * structure[0].params_per_channel
    assert count_parameters(model.image_encoder) == dense_params - removed
    scores = torch.as_tensor(result.scores["head_scores"]).reshape(6, 3)
    for block, kept in enumerate(result.kept_heads):
        dropped = [h for h in range(3) if h not in kept]
        if dropped and kept:
            assert scores[block, dropped].max() <= scores[block, kept].min()
    assert {"alpha_per_block", "zero_heads_per_dataset", "reset_heads_per_dataset"} <= set(result.scores)
    assert set(result.fisher_counts) == {"initial:a", "initial:b", "sam"}


def test_slim_and_masked_cascades_compute_the_same_model(calibration):
    slim_model, masked_model, reference = _model(), _model(), _model(1)
    slim = run_cascade(slim_model, calibration, _config(slim=True), reference_model=reference, progress=False)
    masked = run_cascade(masked_model, calibration, _config(slim=False), reference_model=reference, progress=False)
    assert slim.kept_heads == masked.kept_heads and slim.kept_channels == masked.kept_channels
    assert any(len(h) < 3 for h in masked.kept_heads)
    # the masked cascade ends compact too: no hooks left, the masked groups are gone from the network
    assert [kept_indices(b) for b in masked_model.image_encoder.blocks] == list(
        zip(masked.kept_heads, masked.kept_channels)
    )
    assert count_parameters(masked_model) == count_parameters(slim_model)
    assert not any(m._forward_pre_hooks for m in masked_model.modules())
    images, boxes = _probe(calibration)
    with torch.no_grad():
        assert (slim_model(images, boxes) - masked_model(images, boxes)).abs().max() < 1e-3


@pytest.mark.parametrize("slim", [True, False], ids=["slimmed", "masked"])
def test_continuation_prunes_only_unprotected_blocks_of_a_compact_model(calibration, slim):
    model, reference = _model(), _model(1)
    stage1 = _config(head_sparsity=0.4, protected_blocks=(4, 5))
    run_cascade(model, calibration, stage1, reference_model=reference, progress=False)
    first = [kept_indices(b) for b in model.image_encoder.blocks]
    result = run_cascade(
        model,
        calibration,
        _config(head_sparsity=0.1, mlp_sparsity=0.1, protected_blocks=(0, 1, 2, 3), continuation=True, slim=slim),
        reference_model=reference,
        progress=False,
    )
    second = [kept_indices(b) for b in model.image_encoder.blocks]
    assert list(zip(result.kept_heads, result.kept_channels)) == second  # indices of the dense encoder
    assert second[:4] == first[:4]
    for (h1, c1), (h2, c2) in zip(first, second):
        assert set(h2) <= set(h1) and set(c2) <= set(c1)  # nothing regrows
    heads, channels = result.budgets
    assert heads.achieved - round(0.4 * 18) == round(0.1 * 18)
    assert channels.achieved - round(0.5 * 6 * 768) == round(0.1 * 6 * 768)


@pytest.mark.parametrize("score", ["zero", "reset", "random", "magnitude", "taylor"])
def test_every_baseline_runs_through_the_same_interface(calibration, score):
    model = _model()
    result = run_cascade(model, calibration, _config(score=score), reference_model=_model(1), progress=False)
    assert [r.achieved for r in result.budgets] == [9, 2304]


def test_random_baseline_depends_on_seed_only(calibration):
    kept = []
    for seed in (1, 1, 2):
        model = _model()
        kept.append(run_cascade(model, calibration, _config(score="random", seed=seed), progress=False).kept_channels)
    assert kept[0] == kept[1] and kept[0] != kept[2]


def test_reset_scores_need_a_reference(calibration):
    with pytest.raises(ValueError, match="needs the general SAM"):
        run_cascade(_model(), calibration, _config(score="dual"), reference_model=None, progress=False)
    with pytest.raises(ValueError, match="score must be one of"):
        CascadeConfig(score="l2")


def test_recomputed_mlp_scores_are_recorded(calibration):
    result = run_cascade(
        _model(), calibration, _config(recompute_mlp_scores=True), reference_model=_model(1), progress=False
    )
    assert "mlp_scores_recomputed" in result.scores and "initial:a" in result.fisher_counts
    assert "after_heads:a" in result.fisher_counts


def test_aligned_reference_slices_dense_tensors_to_kept_groups():
    dense = build_sam("tiny", seed=0)
    reference = {k: v.clone() for k, v in dense.image_encoder.state_dict().items()}
    structure = encoder_structure(dense.image_encoder)
    masks = StructuredMasks.full(structure)
    masks.heads[2][0] = False
    masks.channels[3][5:300] = False
    slim_encoder_(dense.image_encoder, masks)
    aligned = aligned_reference(reference, dense.image_encoder)
    for name, tensor in dense.image_encoder.state_dict().items():
        assert torch.equal(aligned[name], tensor), name


def test_precomputed_scores_give_the_same_cascade(calibration):
    from medcore_monai.pruning.cascade import score_model

    config = _config(score="zero")
    direct_model = _model()
    direct = run_cascade(direct_model, calibration, config, progress=False)
    reused_model = _model()
    precomputed = score_model(reused_model, calibration, config, progress=False)
    reused = run_cascade(reused_model, calibration, config, progress=False, precomputed=precomputed)
    assert reused.kept_heads == direct.kept_heads and reused.kept_channels == direct.kept_channels
    assert "fisher" not in reused.timing
    with pytest.raises(ValueError, match="recompute_mlp_scores"):
        run_cascade(_model(), calibration, _config(recompute_mlp_scores=True), precomputed=precomputed)


def test_recovery_can_train_on_other_images_than_the_calibration(calibration):
    transform = medsam_preprocess(size=256)
    others = [transform(item) | {"name": f"other_{k}"} for k, item in enumerate(synthetic_items(2, 256, 7))]
    default = run_cascade(_model(), calibration, _config(score="magnitude"), progress=False)
    wider = run_cascade(_model(), calibration, _config(score="magnitude"), progress=False, recovery_samples=others)
    assert wider.kept_heads == default.kept_heads  # the same calibration decides what is removed
    assert wider.recovery["heads"]["losses"] != default.recovery["heads"]["losses"]
    with pytest.raises(ValueError, match="at least one"):
        run_cascade(_model(), calibration, _config(score="magnitude"), progress=False, recovery_samples=[])
