"""Losses, Fisher calibration, dual-intervention scores and budgets on hand-checkable cases."""

from __future__ import annotations

import warnings

import pytest
import torch

from medcore_monai.losses import boundary_band, boundary_weighted_bce_dice
from medcore_monai.networks import MedSAM, StructuredMasks, attach_masks, build_sam, encoder_structure
from medcore_monai.pruning import (
    BudgetShortfallWarning,
    GroupScores,
    aggregate_datasets,
    allocate_quota,
    alpha_per_block,
    block_sensitivity,
    compute_fisher,
    cross_fisher,
    magnitude_scores,
    mix_scores,
    plan_masks,
    random_scores,
    reset_scores,
    select_removals,
    zero_scores,
)

# ----------------------------------------------------------------------------------------------- losses


def test_boundary_band_is_dilation_minus_erosion():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    band = boundary_band(mask)[0, 0]
    expected = torch.zeros(8, 8)
    expected[1:7, 1:7] = 1  # dilation
    expected[3:5, 3:5] = 0  # minus erosion
    assert torch.equal(band, expected)


def test_boundary_band_treats_outside_as_background():
    mask = torch.ones(1, 1, 5, 5)
    band = boundary_band(mask)[0, 0]
    assert band[0].sum() == 5 and band[2, 2] == 0


def test_boundary_weight_increases_loss_on_boundary_errors():
    target = torch.zeros(1, 1, 16, 16)
    target[..., 4:12, 4:12] = 1
    logits = torch.where(target > 0, 4.0, -4.0)
    logits[..., 4, 4:12] = -4.0  # wrong on the boundary row
    plain = boundary_weighted_bce_dice(logits, target, boundary_weight=0.0)
    weighted = boundary_weighted_bce_dice(logits, target, boundary_weight=3.0)
    assert weighted > plain
    summed = boundary_weighted_bce_dice(logits, target, boundary_weight=3.0, reduction="sum")
    # summing over the 256 pixels instead of averaging scales the BCE part by 256
    dice = boundary_weighted_bce_dice(
        logits, target, boundary_weight=0.0
    ) - torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert float(summed - dice) == pytest.approx(256 * float(weighted - dice), rel=1e-5)


def test_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="differ"):
        boundary_weighted_bce_dice(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 5, 5))


# ----------------------------------------------------------------------------------------------- Fisher


@pytest.fixture(scope="module")
def tiny_model():
    return MedSAM(build_sam("tiny", seed=0))


def _batches(n, batch_size=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n // batch_size):
        label = torch.zeros(batch_size, 1, 64, 64)
        label[..., 16:40, 20:48] = 1
        batches.append(
            {
                "image": torch.rand(batch_size, 3, 256, 256, generator=g),
                "label_lowres": label,
                "box": torch.tensor([[80.0, 64.0, 192.0, 160.0]] * batch_size),
            }
        )
    return batches


def test_fisher_is_mean_of_per_sample_squared_gradients(tiny_model):
    data = _batches(3)
    result = compute_fisher(tiny_model, data, progress=False)
    assert result.used == 3 and result.skipped == 0
    name = "blocks.1.attn.qkv.weight"
    squares = []
    for batch in data:
        tiny_model.zero_grad()
        loss = boundary_weighted_bce_dice(tiny_model(batch["image"], batch["box"]), batch["label_lowres"])
        loss.backward()
        squares.append(tiny_model.image_encoder.get_parameter(name).grad.square())
    expected = torch.stack(squares).mean(0)
    assert torch.allclose(result.fisher[name], expected, rtol=1e-4, atol=1e-12)
    # decoder stays frozen, only encoder entries exist
    assert all(not n.startswith("mask_decoder") for n in result.fisher)


def test_batched_calibration_equals_batch_of_one(tiny_model):
    single = compute_fisher(tiny_model, _batches(4, batch_size=1), progress=False)
    batched = compute_fisher(tiny_model, _batches(4, batch_size=2), progress=False)
    name = "blocks.0.mlp.lin1.weight"
    assert batched.used == 4
    # same images in the same order (generator consumed identically): same per-sample Fisher
    assert torch.allclose(single.fisher[name], batched.fisher[name], rtol=1e-4, atol=1e-12)


def test_non_finite_samples_are_skipped_and_counted(tiny_model):
    data = _batches(2)
    data[1]["image"] = torch.full_like(data[1]["image"], float("nan"))
    result = compute_fisher(tiny_model, data, progress=False)
    assert result.used == 1 and result.skipped == 1
    assert all(torch.isfinite(v).all() for v in result.fisher.values())


def test_all_skipped_raises(tiny_model):
    data = _batches(1)
    data[0]["image"] = torch.full_like(data[0]["image"], float("nan"))
    with pytest.raises(RuntimeError, match="accepted no sample"):
        compute_fisher(tiny_model, data, progress=False)


def test_removed_groups_get_zero_fisher(tiny_model):
    structure = encoder_structure(tiny_model.image_encoder)
    masks = StructuredMasks.full(structure)
    masks.heads[2][1] = False
    masks.channels[0][:10] = False
    with attach_masks(tiny_model.image_encoder, masks):
        result = compute_fisher(tiny_model, _batches(1), progress=False, group_taylor=True)
    scores = zero_scores(result.fisher, dict(tiny_model.image_encoder.named_parameters()), structure)
    assert scores.heads[2][1] == 0 and scores.heads[2][0] > 0
    assert torch.all(scores.channels[0][:10] == 0) and torch.all(scores.channels[0][10:] > 0)
    assert result.taylor_heads[2][1] == 0 and result.taylor_heads[2][0] > 0


# ----------------------------------------------------------------------------------------------- scores


def test_zero_and_reset_scores_by_hand():
    sam = build_sam("tiny", seed=0)
    structure = encoder_structure(sam.image_encoder)
    weights = {n: torch.zeros_like(p) for n, p in sam.image_encoder.named_parameters()}
    fisher = {n: torch.zeros_like(p) for n, p in weights.items()}
    reference = {n: torch.zeros_like(p) for n, p in weights.items()}
    # head 1 of block 0: one Q weight of 2 with Fisher 3 -> zero score 0.5*3*4 = 6
    weights["blocks.0.attn.qkv.weight"][64, 0] = 2.0
    fisher["blocks.0.attn.qkv.weight"][64, 0] = 3.0
    reference["blocks.0.attn.qkv.weight"][64, 0] = 1.0
    fisher_sam = {n: torch.zeros_like(p) for n, p in weights.items()}
    fisher_sam["blocks.0.attn.qkv.weight"][64, 0] = 12.0
    dz = zero_scores(fisher, weights, structure)
    dr = reset_scores(cross_fisher(fisher, fisher_sam, eps=0.0), weights, reference, structure)
    assert dz.heads[0].tolist() == [0.0, 6.0, 0.0]
    assert dr.heads[0].tolist() == [0.0, 0.5 * 6.0 * 1.0, 0.0]  # sqrt(3*12)=6, (2-1)^2=1


def test_alpha_rule():
    z = [
        torch.tensor([1.0, 2.0, 3.0]),
        torch.tensor([1.0, 2.0, 3.0]),
        torch.tensor([5.0, 5.0, 5.0]),
        torch.tensor([4.0]),
    ]
    r = [
        torch.tensor([2.0, 4.0, 6.0]),
        torch.tensor([3.0, 2.0, 1.0]),
        torch.tensor([1.0, 2.0, 3.0]),
        torch.tensor([1.0]),
    ]
    alpha = alpha_per_block(z, r)
    assert alpha.tolist() == pytest.approx([1.0, 0.0, 1.0, 1.0])


def test_mix_uses_block_alpha_for_heads_and_channels():
    zero = GroupScores([torch.tensor([1.0, 1.0])], [torch.tensor([10.0])])
    reset = GroupScores([torch.tensor([3.0, 5.0])], [torch.tensor([20.0])])
    mixed = mix_scores(zero, reset, torch.tensor([0.25]))
    assert mixed.heads[0].tolist() == [2.5, 4.0]
    assert mixed.channels[0].tolist() == [17.5]


def test_aggregation_mean_and_spread():
    a = GroupScores([torch.tensor([1.0, 4.0])], [torch.tensor([0.0])])
    b = GroupScores([torch.tensor([3.0, 4.0])], [torch.tensor([2.0])])
    std = aggregate_datasets([a, b], pi=[1, 3], beta=0.5, spread="std")
    # weighted mean 0.25*1+0.75*3 = 2.5, population std 1 -> 3.0; second head: 4 + 0
    assert std.heads[0].tolist() == pytest.approx([3.0, 4.0])
    var = aggregate_datasets([a, b], pi=[1, 3], beta=0.5, spread="variance")
    assert var.heads[0].tolist() == pytest.approx([3.0, 4.0])  # variance 1 as well
    single = aggregate_datasets([a], beta=0.5)
    assert single.heads[0].tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="non-negative"):
        aggregate_datasets([a, b], pi=[1, -1])


def test_std_spread_ranking_is_scale_invariant_but_variance_is_not():
    # head 0: mean 10, no spread; head 1: mean 9, spread 1 (std) / 1 (variance at scale 1)
    a = GroupScores([torch.tensor([10.0, 8.0])], [torch.tensor([1.0])])
    b = GroupScores([torch.tensor([10.0, 10.0])], [torch.tensor([1.0])])

    def order(scale, spread):
        scaled = [s.map(lambda t: t * scale) for s in (a, b)]
        return torch.argsort(aggregate_datasets(scaled, beta=0.3, spread=spread).heads[0]).tolist()

    assert order(1.0, "std") == order(1e4, "std")
    assert order(1.0, "variance") != order(1e4, "variance")


def test_baselines_are_deterministic_and_shaped():
    sam = build_sam("tiny", seed=0)
    structure = encoder_structure(sam.image_encoder)
    r1, r2, r3 = random_scores(structure, 1), random_scores(structure, 1), random_scores(structure, 2)
    assert all(torch.equal(x, y) for x, y in zip(r1.heads, r2.heads))
    assert not torch.equal(r1.channels[0], r3.channels[0])
    mag = magnitude_scores(dict(sam.image_encoder.named_parameters()), structure)
    mlp = sam.image_encoder.blocks[0].mlp
    with torch.no_grad():
        by_hand = mlp.lin1.weight[3].abs().sum() + mlp.lin1.bias[3].abs() + mlp.lin2.weight[:, 3].abs().sum()
    assert float(mag.channels[0][3]) == pytest.approx(float(by_hand))


# ----------------------------------------------------------------------------------------------- budgets


def test_quota_inverse_sensitivity_and_rounding():
    assert allocate_quota(8, torch.tensor([1.0, 2.0, 2.0]), capacity=[10, 10, 10]) == [4, 2, 2]
    # 7/3 rounds to 2 each; the missing one goes to the block with the most headroom (lowest index on ties)
    assert allocate_quota(7, torch.ones(3), capacity=[10, 10, 10]) == [3, 2, 2]
    # 0.5*6=3, 0.25*6=1.5 -> 2 (twice): one too many, taken from the largest quota
    assert allocate_quota(6, torch.tensor([1.0, 2.0, 2.0]), capacity=[10, 10, 10]) == [2, 2, 2]


def test_quota_respects_caps_and_protected_blocks():
    quota = allocate_quota(10, torch.tensor([1.0, 100.0, 1.0, 1.0]), capacity=[2, 8, 8, 8], protected=[3])
    assert quota[3] == 0 and quota[0] == 2 and sum(quota) == 10
    assert all(q <= c for q, c in zip(quota, [2, 8, 8, 8]))
    short = allocate_quota(30, torch.ones(2), capacity=[4, 5])
    assert short == [4, 5]


def test_select_removals_lowest_first_and_never_regrows():
    kept = [torch.tensor([True, False, True, True])]
    scores = [torch.tensor([5.0, 0.0, 1.0, 1.0])]
    masks = select_removals(scores, kept, [2])
    # index 1 was already removed and stays removed; ties (2, 3) broken by lower index
    assert masks[0].tolist() == [True, False, False, False]


def test_plan_masks_reports_achieved_and_warns_on_shortfall():
    sam = build_sam("tiny")
    structure = encoder_structure(sam.image_encoder)
    masks = StructuredMasks.full(structure)
    scores = random_scores(structure, 0)
    sens = torch.ones(len(structure))
    new, reports = plan_masks(masks, scores.heads, scores.channels, sens, 0.5, 0.5, protected=[5])
    heads_rep, chan_rep = reports
    assert heads_rep.total == 18 and heads_rep.requested == 9 and heads_rep.achieved == 9
    assert int(sum((~m).sum() for m in new.heads)) == 9 and bool(new.heads[5].all())
    assert chan_rep.achieved == round(0.5 * 6 * 768)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, reports = plan_masks(masks, scores.heads, None, sens, head_sparsity=0.9, protected=[4, 5])
    assert any(issubclass(w.category, BudgetShortfallWarning) for w in caught)
    # floors: 1 head kept in each of 4 eligible blocks, 2 protected blocks keep 3 -> at most 8 removable
    assert reports[0].achieved == 8 and reports[0].achieved_sparsity < reports[0].requested_sparsity


def test_continuation_prunes_only_new_blocks_and_keeps_old_removals():
    sam = build_sam("tiny")
    structure = encoder_structure(sam.image_encoder)
    scores = random_scores(structure, 0)
    sens = torch.ones(len(structure))
    stage1, _ = plan_masks(StructuredMasks.full(structure), scores.heads, None, sens, 0.3, protected=[4, 5])
    stage2, rep = plan_masks(stage1, scores.heads, None, sens, 0.1, protected=[0, 1, 2, 3], additional=True)
    for old, new in zip(stage1.heads[:4], stage2.heads[:4]):
        assert torch.equal(old, new)
    assert all(not bool((n & ~o).any()) for o, n in zip(stage1.heads, stage2.heads))  # nothing regrows
    assert rep[0].achieved - 5 == round(0.1 * 18)  # stage 1 removed round(0.3*18)=5


def test_block_sensitivity_sums_per_block():
    fisher = {
        "blocks.0.attn.qkv.weight": torch.ones(2, 2),
        "blocks.0.norm1.weight": torch.ones(3),
        "blocks.1.mlp.lin1.weight": torch.full((2,), 2.0),
        "neck.0.weight": torch.ones(5),
    }
    assert block_sensitivity(fisher, 2).tolist() == [7.0, 4.0]
