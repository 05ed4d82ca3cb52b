"""MBConv hidden channels (LiteMedSAM's stage 0) as a prunable group: ownership, scores, budgets, slimming, manifests.

The small TinyViT of ``test_litemedsam`` (one MBConv block of 64 hidden channels) stands in for LiteMedSAM; the
prune workflow with ``mbconv_sparsity`` runs there too (``test_prune_run_slims_a_tinyvit_model_without_a_parent``).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_litemedsam import SMALL, _small_sam

from medcore_monai.networks import (
    CheckpointError,
    MedSAM,
    StructuredMasks,
    build_sam,
    encoder_structure,
    load_sam,
    model_manifest,
    save_sam,
    slim_encoder_,
)
from medcore_monai.networks.conv_groups import conv_group_sums, conv_kept_indices, conv_structure
from medcore_monai.networks.manifest import ModelManifest
from medcore_monai.pruning import (
    BudgetShortfallWarning,
    CascadeConfig,
    compute_fisher,
    magnitude_scores,
    plan_masks,
    random_scores,
    zero_scores,
)
from medcore_monai.pruning.cascade import CascadeState, aligned_reference

TWO_MBCONV = replace(SMALL, depths=(2, 2, 2, 1))


def _two_mbconv_sam(seed: int = 0) -> torch.nn.Module:
    sam = build_sam(TWO_MBCONV, seed=seed)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, tensor in sam.image_encoder.state_dict().items():
            if name.endswith(("running_mean", "bn.bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return sam.eval()


def _per_channel(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    other = [d for d in range(tensor.ndim) if d != dim]
    return tensor.sum(dim=other) if other else tensor  # sum(dim=[]) would reduce everything


def _batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    label = torch.zeros(1, 1, 64, 64)
    label[..., 16:40, 20:48] = 1
    box = torch.tensor([[20.0, 16.0, 48.0, 40.0]])
    return [
        {"image": torch.rand(1, 3, 64, 64, generator=generator), "label_lowres": label, "box": box} for _ in range(n)
    ]


# --------------------------------------------------------------------------------------------- structure


def test_each_hidden_channel_owns_its_rows_filters_and_columns():
    sam = _small_sam()
    encoder = sam.image_encoder
    (block,) = conv_structure(encoder)
    assert (block.path, block.dim, block.hidden_dim, block.params_per_channel) == ("layers.0.blocks.0", 16, 64, 45)
    values = {name: torch.zeros_like(p) for name, p in encoder.named_parameters()}
    channel = torch.arange(1.0, 65.0)  # channel n holds n + 1 in every tensor it owns a slice of
    for name, dim in block.param_slices().values():
        shape = [1] * values[name].ndim
        shape[dim] = 64
        values[name] += channel.view(shape)
    (sums,) = conv_group_sums(values, [block])
    torch.testing.assert_close(sums, channel * block.params_per_channel)
    owned = sum(values[name].numel() for name, _ in block.param_slices().values())
    assert owned == 64 * block.params_per_channel
    assert conv_structure(build_sam("tiny").image_encoder) == []  # SAM's ViT has no MBConv groups


def test_litemedsam_has_two_mbconv_blocks_of_256_hidden_channels():
    encoder = build_sam("litemedsam", seed=0).image_encoder
    assert [(b.hidden_dim, b.params_per_channel) for b in conv_structure(encoder)] == [(256, 141), (256, 141)]


def test_repeated_slimming_composes_and_remembers_original_channels():
    sam = _two_mbconv_sam()
    images = torch.rand(2, 3, 64, 64)
    first = StructuredMasks.for_encoder(sam.image_encoder)
    first.convs[0][::2] = False  # keeps the odd channels 1, 3, ..., 63
    first.convs[1][40:] = False
    slim_encoder_(sam.image_encoder, first)
    second = StructuredMasks.for_encoder(sam.image_encoder)
    second.convs[0][:4] = False  # drops 1, 3, 5, 7
    slim_encoder_(sam.image_encoder, second)
    blocks = sam.image_encoder.conv_blocks()
    assert conv_kept_indices(blocks[0]) == list(range(9, 64, 2)) and conv_kept_indices(blocks[1]) == list(range(40))
    reference = _two_mbconv_sam()
    masks = StructuredMasks.for_encoder(reference.image_encoder)
    masks.convs[0][:] = False
    masks.convs[0][list(range(9, 64, 2))] = True
    masks.convs[1][40:] = False
    slim_encoder_(reference.image_encoder, masks)
    with torch.no_grad():
        torch.testing.assert_close(sam.image_encoder(images), reference.image_encoder(images))


# --------------------------------------------------------------------------------------------- scores


def test_zero_magnitude_and_random_scores_cover_the_mbconv_channels():
    sam = _small_sam()
    encoder = sam.image_encoder
    structure, convs = encoder_structure(encoder), conv_structure(encoder)
    weights = {n: p.detach() for n, p in encoder.named_parameters()}
    fisher = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) for n, p in weights.items()}
    zero = zero_scores(fisher, weights, structure, convs)
    expected = torch.zeros(64)
    for name, dim in convs[0].param_slices().values():
        expected += _per_channel(0.5 * fisher[name] * weights[name].square(), dim)
    torch.testing.assert_close(zero.convs[0], expected)
    without = zero_scores(fisher, weights, structure)
    assert without.convs == [] and all(torch.equal(a, b) for a, b in zip(without.heads, zero.heads))
    magnitude = magnitude_scores(weights, structure, convs)
    l1 = sum(_per_channel(weights[name].abs(), dim) for name, dim in convs[0].param_slices().values())
    torch.testing.assert_close(magnitude.convs[0], l1)
    # MBConv scores are drawn last, so the head and channel draws of a seed are what they were without them
    plain, with_convs = random_scores(structure, 3), random_scores(structure, 3, convs)
    assert all(torch.equal(a, b) for a, b in zip(plain.channels, with_convs.channels))
    assert with_convs.convs[0].shape == (64,) and plain.convs == []


def test_taylor_and_fisher_calibration_reach_the_mbconv_parameters():
    model = MedSAM(_small_sam())
    result = compute_fisher(model, _batches(2), progress=False, group_taylor=True)
    assert float(result.fisher["layers.0.blocks.0.conv1.c.weight"].sum()) > 0
    assert len(result.taylor_convs) == 1 and result.taylor_convs[0].shape == (64,)
    assert float(result.taylor_convs[0].sum()) > 0


def test_reset_reference_is_sliced_to_the_kept_mbconv_channels():
    sam = _small_sam()
    reference = {n: p.detach().clone() for n, p in sam.image_encoder.named_parameters()}
    masks = StructuredMasks.for_encoder(sam.image_encoder)
    masks.convs[0][5:20] = False
    slim_encoder_(sam.image_encoder, masks)
    aligned = aligned_reference(reference, sam.image_encoder)
    for name, param in sam.image_encoder.named_parameters():
        if name.startswith("layers.0.blocks.0."):
            torch.testing.assert_close(aligned[name], param.detach())


# --------------------------------------------------------------------------------------------- budgets


def test_mbconv_budget_uses_its_own_sensitivity_and_floors():
    masks = StructuredMasks.full([], conv_widths=[64, 64])
    scores = [torch.arange(64.0), torch.arange(64.0).flip(0)]
    sensitivity = torch.tensor([1.0, 3.0])  # the first block is less sensitive: it gives up more channels
    new, reports = plan_masks(
        masks, None, None, torch.zeros(0), conv_scores=scores, conv_sensitivity=sensitivity, conv_sparsity=0.5
    )
    (report,) = reports
    assert report.family == "mbconv" and report.total == 128 and report.achieved == 64
    assert report.per_block == [48, 16]
    assert new.convs[0][:48].sum() == 0 and new.convs[0][48:].all()  # the lowest-scored go first
    assert new.convs[1][-16:].sum() == 0
    with pytest.warns(BudgetShortfallWarning):  # 5 % floors keep 3 of 64 per block
        _, (short,) = plan_masks(
            masks, None, None, torch.zeros(0), conv_scores=scores, conv_sensitivity=sensitivity, conv_sparsity=0.99
        )
    assert short.per_block == [61, 61]
    with pytest.raises(ValueError, match="MBConv budgets need"):
        plan_masks(
            StructuredMasks.full([]),
            None,
            None,
            torch.zeros(0),
            conv_scores=scores,
            conv_sensitivity=sensitivity,
            conv_sparsity=0.5,
        )


def test_mlp_floors_follow_each_blocks_dense_width():
    # a compact TinyViT whose blocks are 512, 640 and 1280 wide when dense: 5 % floors are 26, 32 and 64
    masks = StructuredMasks(
        [torch.ones(1, dtype=torch.bool)] * 3, [torch.ones(w, dtype=torch.bool) for w in (40, 40, 80)]
    )
    scores = [torch.rand(40), torch.rand(40), torch.rand(80)]
    with pytest.warns(BudgetShortfallWarning):
        new, _ = plan_masks(masks, None, scores, torch.ones(3), mlp_sparsity=0.99, dense_mlp_dims=[512, 640, 1280])
    assert [int(m.sum()) for m in new.channels] == [26, 32, 64]


# --------------------------------------------------------------------------------------------- cascade and manifests


def test_masked_cascade_state_attaches_mbconv_masks_like_slimming():
    calibration = {"polyps": _batches(1)}
    outputs = []
    for slim in (True, False):
        model = MedSAM(_small_sam()).eval()
        state = CascadeState(
            model, None, calibration, CascadeConfig(score="zero", mbconv_sparsity=0.5, slim=slim), "cpu", progress=False
        )
        scores = random_scores(encoder_structure(model.image_encoder), 0, conv_structure(model.image_encoder))
        (report,) = state.plan(None, None, torch.ones(5), "mlp", scores.convs, torch.ones(1))
        assert report.achieved == 32 and len(state.kept_convs()[0]) == 32
        with torch.no_grad():
            outputs.append(model(*[_batches(1, seed=4)[0][k] for k in ("image", "box")]))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_mbconv_sparsity_on_a_vit_fails_before_calibration():
    from ignite.engine import Engine, Events

    from medcore_monai.handlers import PruningHandler

    handler = PruningHandler(CascadeConfig(score="zero", mbconv_sparsity=0.3), {"d": _batches(1)}, progress=False)
    engine = Engine(lambda *_: None)
    engine.network = MedSAM(build_sam("tiny", seed=0))
    handler.attach(engine)
    engine.add_event_handler(Events.STARTED, lambda e: e.terminate())
    with pytest.raises(ValueError, match="no MBConv blocks"):
        engine.run([0])


def test_manifests_guard_the_mbconv_widths(tmp_path):
    sam = _small_sam()
    masks = StructuredMasks.for_encoder(sam.image_encoder)
    masks.convs[0][::2] = False
    slim_encoder_(sam.image_encoder, masks)
    path = save_sam(sam, tmp_path / "compact.pt")
    payload = torch.load(path, weights_only=True)
    del payload["medcore"]["conv_blocks"]
    torch.save(payload, tmp_path / "no_conv_entries.pt")
    with pytest.raises(CheckpointError, match="lacks the MBConv"):
        load_sam(tmp_path / "no_conv_entries.pt")
    dense = _small_sam()
    with pytest.raises(CheckpointError, match="MBConv hidden widths"):
        ModelManifest(dense).load_state_dict(model_manifest(sam))
    loaded = load_sam(path)
    assert conv_kept_indices(loaded.image_encoder.conv_blocks()[0]) == list(range(1, 64, 2))


def _cascade_run(folder, interrupt_at=None):
    from medcore_monai.cascade import run_cascade
    from medcore_monai.demo import synthetic_items
    from medcore_monai.engines.recovery import RecoveryTrainer
    from medcore_monai.pruning import RecoveryConfig
    from medcore_monai.transforms import medsam_preprocess

    transform = medsam_preprocess(size=64, lowres_size=64)
    samples = [transform(item) | {"name": f"s{i}"} for i, item in enumerate(synthetic_items(3, 64, 1))]
    model = MedSAM(_small_sam(seed=7))
    config = CascadeConfig(
        head_sparsity=0.3,
        mlp_sparsity=0.3,
        mbconv_sparsity=0.5,
        score="zero",
        recovery=RecoveryConfig(steps=4, lr=1e-3),
    )
    original = RecoveryTrainer._iteration

    def interrupted(self, engine, batch):
        if engine.state.iteration == interrupt_at:
            raise KeyboardInterrupt("killed")
        return original(self, engine, batch)

    try:
        RecoveryTrainer._iteration = interrupted
        result = run_cascade(model, {"d": samples}, config, device="cpu", output_dir=folder, progress=False)
    finally:
        RecoveryTrainer._iteration = original
    return model, result


def test_an_interrupted_cascade_with_mbconv_pruning_resumes_to_the_same_model(tmp_path):
    first, result = _cascade_run(tmp_path / "a")
    assert [b.family for b in result.budgets] == ["heads", "channels", "mbconv"] and len(result.kept_convs[0]) == 32
    with pytest.raises(KeyboardInterrupt):
        _cascade_run(tmp_path / "b", interrupt_at=8)  # in the MLP step's recovery, after the MBConv slimming
    resumed, _ = _cascade_run(tmp_path / "b")
    assert resumed.image_encoder.conv_blocks()[0].conv1.c.out_channels == 32
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in first.state_dict().items())


def test_the_prune_workflow_refuses_mbconv_sparsity_for_a_vit_before_any_work(tmp_path):
    from medcore_monai.demo import write_synthetic_pairs
    from medcore_monai.errors import ConfigError
    from medcore_monai.prune import run_prune

    write_synthetic_pairs(tmp_path / "data", 4, 64, seed=0)
    checkpoint = tmp_path / "vit_tiny.pth"
    torch.save(build_sam("tiny", seed=0).state_dict(), checkpoint)
    settings = {"medsam_ckpt": str(checkpoint), "sam_ckpt": None, "score": "zero", "mbconv_sparsity": 0.3}
    with pytest.raises(ConfigError, match="no MBConv blocks"):
        run_prune(**settings, data_roots=[str(tmp_path / "data")], output_dir=str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "recovery").exists()
