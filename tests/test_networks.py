"""Model layer: import without torchvision, strict checkpoint loading, structure, masking, slimming, export."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from medcore_monai.networks import (
    CheckpointError,
    MedSAM,
    StructuredMasks,
    attach_masks,
    block_flops,
    build_sam,
    count_parameters,
    encoder_flops,
    encoder_structure,
    get_preset,
    group_sums,
    infer_sam_config,
    kept_indices,
    load_sam,
    save_sam,
    slim_block_,
    slim_encoder_,
)


@pytest.fixture(scope="module")
def tiny_sam():
    return build_sam("tiny", seed=0)


def _random_masks(structure, generator, head_keep=0.6, channel_keep=0.5):
    heads, channels = [], []
    for blk in structure:
        h = torch.rand(blk.num_heads, generator=generator) < head_keep
        h[torch.randint(blk.num_heads, (1,), generator=generator)] = True
        c = torch.rand(blk.mlp_dim, generator=generator) < channel_keep
        c[0] = True
        heads.append(h)
        channels.append(c)
    return StructuredMasks(heads, channels)


def _images_and_boxes(n=2, size=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    boxes = torch.tensor([[20.0, 30.0, 180.0, 200.0], [5.0, 60.0, 120.0, 250.0]])[:n]
    return images, boxes


def test_segment_anything_modeling_imports_when_torchvision_is_broken(tmp_path):
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    code = textwrap.dedent(
        """
        import pickle
        import monai.transforms  # MONAI probes segment_anything and leaves its submodules behind
        import torch
        from medcore_monai.networks import build_sam, MedSAM
        sam = build_sam("tiny", seed=0)
        pickle.dumps(type(sam))  # the parent package must be importable again
        out = MedSAM(sam)(torch.rand(1, 3, 256, 256), torch.tensor([[10.0, 10.0, 100.0, 100.0]]))
        print(tuple(out.shape))
        """
    )
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 1, 64, 64)"


@pytest.mark.parametrize("layout", ["raw", "model", "state_dict", "model_state_dict", "ddp"])
def test_official_layouts_load_and_reproduce_outputs(tiny_sam, tmp_path, layout):
    state = tiny_sam.state_dict()
    payload = {
        "raw": state,
        "model": {"model": state, "epoch": 3},
        "state_dict": {"state_dict": state, "optimizer": {}},
        "model_state_dict": {"model_state_dict": state},
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    loaded = load_sam(path)
    assert loaded.medcore_config == get_preset("tiny")
    images, boxes = _images_and_boxes()
    with torch.no_grad():
        assert torch.equal(MedSAM(loaded)(images, boxes), MedSAM(tiny_sam)(images, boxes))


def test_forced_model_type_mismatch_lists_keys(tiny_sam, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_sam(path, model_type="vit_b")
    msg = str(err.value)
    # ViT-B has six more blocks of 14 tensors each (2 norms x 2, qkv x 2, proj x 2, 2 rel-pos, lin1/lin2 x 2).
    assert "missing keys (84): image_encoder.blocks.10." in msg
    assert "image_encoder.blocks.0.attn.qkv.weight: checkpoint (576, 192) vs model (2304, 768)" in msg


def test_unexpected_and_missing_keys_are_reported(tiny_sam, tmp_path):
    state = dict(tiny_sam.state_dict())
    state.pop("mask_decoder.iou_prediction_head.layers.0.weight")
    state["mask_decoder.extra_robust_module.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_sam(path)
    msg = str(err.value)
    assert "missing keys (1): mask_decoder.iou_prediction_head.layers.0.weight" in msg
    assert "unexpected keys (1): mask_decoder.extra_robust_module.weight" in msg
    assert str(path) in msg


def test_pickled_whole_model_is_refused(tiny_sam, tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(tiny_sam, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_sam(path)


def test_missing_file_and_no_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_sam(tmp_path / "nope.pth")
    path = tmp_path / "weird.pth"
    torch.save({"epoch": 1, "notes": "x"}, path)
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_sam(path)


def test_infer_config_recognises_presets():
    for name in ("tiny", "vit_b"):
        sam = build_sam(name)
        assert infer_sam_config(sam.state_dict()) == get_preset(name)


def test_group_sums_of_ones_count_each_groups_parameters(tiny_sam):
    encoder = tiny_sam.image_encoder
    structure = encoder_structure(encoder)
    ones = {k: torch.ones_like(v) for k, v in encoder.state_dict().items()}
    heads, channels = group_sums(ones, structure)
    for blk, h, c in zip(structure, heads, channels):
        assert torch.all(h == blk.params_per_head)
        assert torch.all(c == blk.params_per_channel)
    prunable = sum(float(h.sum()) + float(c.sum()) for h, c in zip(heads, channels))
    shared_per_block = sum(
        p.numel()
        for name, p in encoder.blocks[0].named_parameters()
        if name in {"attn.proj.bias", "mlp.lin2.bias"} or "norm" in name or "rel_pos" in name
    )
    assert prunable < count_parameters(encoder)
    assert shared_per_block > 0


def test_group_sums_pick_the_right_slices(tiny_sam):
    encoder = tiny_sam.image_encoder
    structure = encoder_structure(encoder)
    blk = structure[1]
    values = {k: torch.zeros_like(v) for k, v in encoder.state_dict().items()}
    d, e = blk.head_dim, blk.embed_dim
    values["blocks.1.attn.qkv.weight"][e + 2 * d : e + 3 * d] = 1.0  # K rows of head 2
    values["blocks.1.attn.proj.weight"][:, d : 2 * d] = 2.0  # proj columns of head 1
    values["blocks.1.mlp.lin2.weight"][:, 5] = 3.0  # channel 5
    heads, channels = group_sums(values, structure)
    assert heads[1].tolist() == [0.0, 2.0 * e * d, float(d * e)]
    assert channels[1][5] == 3.0 * e and float(channels[1].sum()) == 3.0 * e
    assert all(float(h.sum()) == 0 for i, h in enumerate(heads) if i != 1)


def test_vit_b_structure_matches_known_counts():
    sam = build_sam("vit_b")
    structure = encoder_structure(sam.image_encoder)
    assert count_parameters(sam.image_encoder) == 89_670_912
    assert count_parameters(sam) == 93_735_472
    assert [b.is_global for b in structure] == [i in (2, 5, 8, 11) for i in range(12)]
    assert {b.params_per_head for b in structure} == {196_800}
    assert {b.params_per_channel for b in structure} == {1_537}


def test_masked_dense_equals_slimmed_model(tiny_sam):
    structure = encoder_structure(tiny_sam.image_encoder)
    masks = _random_masks(structure, torch.Generator().manual_seed(3))
    images, boxes = _images_and_boxes()
    dense = MedSAM(tiny_sam)
    with torch.no_grad(), attach_masks(tiny_sam.image_encoder, masks):
        expected = dense(images, boxes)
        expected_emb = tiny_sam.image_encoder(images)
    slim = build_sam("tiny")
    slim.load_state_dict(tiny_sam.state_dict())
    slim_encoder_(slim.image_encoder, masks)
    with torch.no_grad():
        got_emb = slim.image_encoder(images)
        got = MedSAM(slim)(images, boxes)
    assert (got_emb - expected_emb).abs().max() <= 1e-5
    assert (got - expected).abs().max() <= 1e-5
    assert count_parameters(slim.image_encoder) < count_parameters(tiny_sam.image_encoder)
    removed_heads = sum(int((~m).sum()) for m in masks.heads)
    removed_channels = sum(int((~m).sum()) for m in masks.channels)
    expected_params = (
        count_parameters(tiny_sam.image_encoder)
        - removed_heads * structure[0].params_per_head
        - removed_channels * structure[0].params_per_channel
    )
    assert count_parameters(slim.image_encoder) == expected_params


def test_masks_give_zero_gradient_to_removed_groups(tiny_sam):
    sam = build_sam("tiny", seed=0)
    structure = encoder_structure(sam.image_encoder)
    masks = _random_masks(structure, torch.Generator().manual_seed(4))
    images, boxes = _images_and_boxes(n=1)
    with attach_masks(sam.image_encoder, masks):
        MedSAM(sam)(images, boxes).square().mean().backward()
    grads = {k: p.grad for k, p in sam.image_encoder.named_parameters()}
    heads, channels = group_sums({k: g.abs() for k, g in grads.items()}, structure)
    for h, c, hm, cm in zip(heads, channels, masks.heads, masks.channels):
        assert torch.all(h[~hm] == 0) and torch.all(h[hm] > 0)
        assert torch.all(c[~cm] == 0)


def test_repeated_slimming_composes_original_indices(tiny_sam):
    sam = build_sam("tiny")
    sam.load_state_dict(tiny_sam.state_dict())
    blk = sam.image_encoder.blocks[0]
    slim_block_(blk, [0, 2], [1, 3, 5, 7, 9])
    slim_block_(blk, [1], [0, 4])
    heads, channels = kept_indices(blk)
    assert heads == [2] and channels == [1, 9]
    reference = tiny_sam.image_encoder.blocks[0]
    d = 64
    assert torch.equal(blk.attn.proj.weight, reference.attn.proj.weight[:, 2 * d : 3 * d])
    assert torch.equal(blk.mlp.lin1.weight, reference.mlp.lin1.weight[[1, 9]])


def test_slimming_rejects_empty_or_out_of_range():
    sam = build_sam("tiny")
    with pytest.raises(ValueError, match="at least one"):
        slim_block_(sam.image_encoder.blocks[0], [], None)
    with pytest.raises(ValueError, match="0..2"):
        slim_block_(sam.image_encoder.blocks[0], [3], None)


def test_compact_checkpoint_round_trip(tiny_sam, tmp_path):
    structure = encoder_structure(tiny_sam.image_encoder)
    masks = _random_masks(structure, torch.Generator().manual_seed(5))
    slim = build_sam("tiny")
    slim.load_state_dict(tiny_sam.state_dict())
    slim_encoder_(slim.image_encoder, masks)
    path = save_sam(slim, tmp_path / "out" / "compact.pth", metadata={"note": "test"})
    raw = torch.load(path, weights_only=True)
    assert raw["medcore"]["blocks"][0]["kept_heads"] == masks.kept_heads()[0]
    reloaded = load_sam(path)
    assert reloaded.medcore_config.block_heads == tuple(len(k) for k in masks.kept_heads())
    assert [kept_indices(b)[1] for b in reloaded.image_encoder.blocks] == masks.kept_channels()
    images, boxes = _images_and_boxes()
    with torch.no_grad():
        assert torch.equal(MedSAM(reloaded)(images, boxes), MedSAM(slim)(images, boxes))
    assert not list(tmp_path.joinpath("out").glob(".compact.pth.*")), "temporary file left behind"


def test_measured_flops_fall_when_groups_are_removed(tiny_sam):
    dense_flops = encoder_flops(tiny_sam.image_encoder)
    per_block = block_flops(tiny_sam.image_encoder)
    assert all(f > 0 for f in per_block) and sum(per_block) < dense_flops
    slim = build_sam("tiny")
    slim.load_state_dict(tiny_sam.state_dict())
    slim_block_(slim.image_encoder.blocks[0], [0], None)
    slim_flops = block_flops(slim.image_encoder)
    assert slim_flops[0] < per_block[0] and slim_flops[1:] == per_block[1:]
    # Two of three heads gone: qkv, attention and proj FLOPs of the block shrink to a third.
    attn_dense = per_block[0] - 2 * 2 * 256 * 192 * 768  # minus the MLP's two matmuls (16x16 tokens)
    attn_slim = slim_flops[0] - 2 * 2 * 256 * 192 * 768
    assert attn_slim * 3 == pytest.approx(attn_dense, rel=0.02)


def test_medsam_module_validates_inputs(tiny_sam):
    model = MedSAM(tiny_sam)
    with pytest.raises(ValueError, match="expected images"):
        model(torch.rand(1, 3, 128, 128), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="one box per image"):
        model(torch.rand(2, 3, 256, 256), torch.zeros(1, 4))
    images, boxes = _images_and_boxes(n=1)
    with torch.no_grad():
        up = model.predict_logits(images, boxes)
        normalised = MedSAM(tiny_sam, pixel_normalize=True)(images, boxes)
    assert up.shape == (1, 1, 256, 256)
    assert not torch.allclose(normalised, model(images, boxes))


@pytest.mark.slow
def test_vit_b_official_checkpoint_round_trips_through_slimming(tmp_path):
    """ViT-B at 1024 px: official raw state dict -> load -> mask vs slim -> compact save -> reload."""
    original = build_sam("vit_b", seed=0)
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(original.state_dict(), path)
    del original
    sam = load_sam(path)
    assert sam.medcore_config == get_preset("vit_b")
    structure = encoder_structure(sam.image_encoder)
    masks = _random_masks(structure, torch.Generator().manual_seed(7), head_keep=0.5, channel_keep=0.4)
    images = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), attach_masks(sam.image_encoder, masks):
        expected = sam.image_encoder(images)
    slim_encoder_(sam.image_encoder, masks)
    compact_path = save_sam(sam, tmp_path / "compact_vit_b.pth")
    del sam
    reloaded = load_sam(compact_path)
    with torch.no_grad():
        got = reloaded.image_encoder(images)
    assert (got - expected).abs().max() <= 1e-5
    assert compact_path.stat().st_size < path.stat().st_size
