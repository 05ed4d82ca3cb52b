"""RobustSAM-compatible decoder and RobustMedSAM checkpoint fusion (tiny config; ViT-B only for shapes)."""

from __future__ import annotations

import copy

import pytest
import torch

from medcore_monai.engines.evaluation import evaluate_model
from medcore_monai.networks import MedSAM, build_sam, current_config, kept_indices, load_sam, save_sam, slim_block_
from medcore_monai.networks.build import build_robust_sam, load_robust_sam, save_robust_sam
from medcore_monai.networks.checkpoint import CheckpointError, load_state_dict_strict
from medcore_monai.networks.fusion import fuse_checkpoints, fuse_state_dicts, robust_state_schema, strip_robust_decoder
from medcore_monai.networks.manifest import DECODER_NAME
from medcore_monai.networks.medsam import RobustMedSAM, as_medsam, encode_with_early_features
from medcore_monai.networks.robust_decoder import ROBUST_DECODER_MODULES, RobustMaskDecoder
from medcore_monai.networks.sam_import import sam_modeling

ENCODER_PREFIXES = ("image_encoder.", "prompt_encoder.")
BOXES = torch.tensor([[20.0, 30.0, 180.0, 200.0], [5.0, 60.0, 120.0, 250.0]])


def _randomise_norm_buffers(model: torch.nn.Module, seed: int) -> None:
    """Non-default BatchNorm statistics, so a wrong source or a skipped buffer shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                buf.fill_(7)


@pytest.fixture(scope="module")
def medsam():
    return build_sam("tiny", seed=0)


@pytest.fixture(scope="module")
def robustsam():
    model = build_robust_sam("tiny", seed=1)
    _randomise_norm_buffers(model, seed=2)
    return model


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def fused_logits(medsam, robustsam, images):
    """Logits of the fused model assembled by hand (the reference for file-based fusion)."""
    with torch.no_grad():
        return RobustMedSAM(_hand_built(medsam, robustsam))(images, BOXES)


def _write(state, path, layout):
    payload = {
        "raw": state,
        "ddp": {f"module.{k}": v for k, v in state.items()},
        "model": {"model": state, "epoch": 4},
    }[layout]
    torch.save(payload, path)
    return path


def _hand_built(medsam_model, robustsam_model):
    """The fused model assembled module by module, as the reference for the fusion."""
    hand = build_robust_sam(current_config(medsam_model))
    hand.image_encoder.load_state_dict(medsam_model.image_encoder.state_dict())
    hand.prompt_encoder.load_state_dict(medsam_model.prompt_encoder.state_dict())
    hand.mask_decoder.load_state_dict(robustsam_model.mask_decoder.state_dict())
    return hand


@pytest.mark.parametrize(("medsam_layout", "robust_layout"), [("raw", "ddp"), ("ddp", "model"), ("model", "raw")])
def test_fusion_takes_each_module_from_its_checkpoint(
    medsam, robustsam, images, fused_logits, tmp_path, medsam_layout, robust_layout
):
    med_path = _write(medsam.state_dict(), tmp_path / "medsam.pth", medsam_layout)
    rob_path = _write(robustsam.state_dict(), tmp_path / "robustsam.pth", robust_layout)
    out = fuse_checkpoints(med_path, rob_path, tmp_path / "out" / "robustmedsam.pth", metadata={"note": "t"})

    raw = torch.load(out, weights_only=True)
    assert raw["medcore"]["decoder"] == DECODER_NAME
    fused, med_state, rob_state = raw["model"], medsam.state_dict(), robustsam.state_dict()
    assert set(fused) == set(rob_state)
    for key, value in fused.items():
        source = med_state if key.startswith(ENCODER_PREFIXES) else rob_state
        assert torch.equal(value, source[key]), key
    fusion = raw["metadata"]["fusion"]
    assert raw["metadata"]["note"] == "t"
    assert fusion["from_robustsam"] == len(robustsam.mask_decoder.state_dict()) == 209
    assert fusion["from_medsam"] == sum(k.startswith(ENCODER_PREFIXES) for k in med_state)
    assert fusion["medsam_unused"] == len(medsam.mask_decoder.state_dict())
    assert len(fusion["medsam_sha256"]) == 64
    assert not list(out.parent.glob(".robustmedsam.pth.*")), "temporary file left behind"

    loaded = load_robust_sam(out)
    assert isinstance(loaded.mask_decoder, RobustMaskDecoder)
    with torch.no_grad():
        assert torch.equal(RobustMedSAM(loaded)(images, BOXES), fused_logits)


def test_fuse_state_dicts_reports_sources(medsam, robustsam):
    fused, report = fuse_state_dicts(medsam.state_dict(), {"state_dict": robustsam.state_dict()})
    assert report.from_medsam + report.from_robustsam == len(fused)
    assert report.from_robustsam == 209
    assert len(report.robustsam_unused) == report.from_medsam  # RobustSAM's own encoders, replaced
    assert all(k.startswith("mask_decoder.") for k in report.medsam_unused)
    assert report.config == current_config(medsam)
    assert report.to_dict()["from_medsam"] == report.from_medsam


def test_schema_matches_a_built_model():
    schema = robust_state_schema("tiny")
    built = {k: tuple(v.shape) for k, v in build_robust_sam("tiny").state_dict().items()}
    assert schema == built


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        ("missing", r"RobustSAM checkpoint .*missing keys \(1\): mask_decoder\.fourier_first_layer_features\.conv"),
        ("shape", r"RobustSAM checkpoint .*mask_decoder\.custom_token_block\.mlp\.0\.weight: checkpoint \(64, 32\)"),
        ("unexpected", r"RobustSAM checkpoint .*unexpected keys \(1\): mask_decoder\.extra\.weight"),
        ("plain", r"no RobustSAM decoder modules"),
    ],
)
def test_corrupted_robustsam_checkpoint_names_the_key(medsam, robustsam, tmp_path, corrupt, match):
    state = dict(robustsam.state_dict())
    if corrupt == "missing":
        del state["mask_decoder.fourier_first_layer_features.conv_layer.weight"]
    elif corrupt == "shape":
        state["mask_decoder.custom_token_block.mlp.0.weight"] = torch.zeros(64, 32)
    elif corrupt == "unexpected":
        state["mask_decoder.extra.weight"] = torch.zeros(1)
    else:
        state = medsam.state_dict()
    med_path = _write(medsam.state_dict(), tmp_path / "medsam.pth", "raw")
    rob_path = _write(state, tmp_path / "robustsam.pth", "raw")
    with pytest.raises(CheckpointError, match=match):
        fuse_checkpoints(med_path, rob_path, tmp_path / "fused.pth")
    assert not (tmp_path / "fused.pth").exists()


def test_incomplete_medsam_checkpoint_names_the_key(medsam, robustsam):
    state = dict(medsam.state_dict())
    del state["prompt_encoder.point_embeddings.0.weight"]
    with pytest.raises(CheckpointError, match=r"MedSAM checkpoint: missing keys .*point_embeddings\.0\.weight"):
        fuse_state_dicts(state, robustsam.state_dict())


def test_compact_medsam_keeps_widths_and_kept_indices(medsam, robustsam, images, tmp_path):
    slim = copy.deepcopy(medsam)
    slim_block_(slim.image_encoder.blocks[0], [0, 2], [1, 3, 5, 7, 100, 700])
    slim_block_(slim.image_encoder.blocks[2], [1], list(range(0, 768, 3)))
    slim_block_(slim.image_encoder.blocks[5], None, [9, 4])
    compact_path = save_sam(slim, tmp_path / "compact_medsam.pth")
    rob_path = _write(robustsam.state_dict(), tmp_path / "robustsam.pth", "ddp")
    out = fuse_checkpoints(compact_path, rob_path, tmp_path / "fused.pth")

    loaded = load_sam(out)
    assert isinstance(loaded.mask_decoder, RobustMaskDecoder)
    assert loaded.medcore_config == current_config(slim)
    assert loaded.medcore_config.block_heads == (2, 3, 1, 3, 3, 3)
    assert [kept_indices(b) for b in loaded.image_encoder.blocks] == [
        kept_indices(b) for b in slim.image_encoder.blocks
    ]
    with torch.no_grad():
        got = RobustMedSAM(loaded)(images, BOXES)
        expected = RobustMedSAM(_hand_built(slim, robustsam))(images, BOXES)
    assert torch.equal(got, expected)


def test_robust_medsam_forward_modes(robustsam, images):
    model = RobustMedSAM(robustsam)
    assert model.robust and model.img_size == 256
    with torch.no_grad():
        robust = model(images, BOXES)
        clear = RobustMedSAM(robustsam, robust=False)(images, BOXES)
        up = model.predict_logits(images, BOXES)
    assert robust.shape == clear.shape == (2, 1, 64, 64)
    assert up.shape == (2, 1, 256, 256)
    assert torch.isfinite(robust).all()
    assert not torch.allclose(robust, clear)

    # Clear mode is plain SAM decoding with the decoder's SAM weights.
    vanilla_state, dropped = strip_robust_decoder(robustsam.state_dict())
    vanilla = build_sam("tiny")
    load_state_dict_strict(vanilla, vanilla_state)
    with torch.no_grad():
        assert torch.equal(clear, MedSAM(vanilla)(images, BOXES))


def test_robust_path_runs_under_bfloat16_autocast(robustsam, images):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = RobustMedSAM(robustsam)(images[:1], BOXES[:1])
    assert logits.shape == (1, 1, 64, 64) and torch.isfinite(logits.float()).all()


def test_robust_mode_takes_one_prompt_per_call(robustsam, images):
    model = RobustMedSAM(robustsam)
    with torch.no_grad():
        encoding = model.encode_features(images[:1])
        sparse, dense = model.prompt_encoder(points=None, boxes=BOXES, masks=None)  # two boxes, one image
        args = (encoding.embeddings, model.prompt_encoder.get_dense_pe(), sparse, dense, False)
        with pytest.raises(ValueError, match="one prompt per call"):
            model.mask_decoder(*args, encoder_features=encoding.early_features)
        masks, iou = model.mask_decoder(*args, robust=False)
        multi, _ = model.mask_decoder(*args[:4], True, robust=False)
        # One prompt: RobustSAM's feature conventions (BHWC map, list of maps, stacked maps) all work.
        one = (*args[:2], sparse[:1], dense[:1])
        early = encoding.early_features
        single = model.mask_decoder(*one, False, encoder_features=early)[0]
        assert torch.equal(model.mask_decoder(*one, False, encoder_features=[early])[0], single)
        assert torch.equal(model.mask_decoder(*one, False, encoder_features=early[None])[0], single)
        robust_multi, robust_iou = model.mask_decoder(*one, True, encoder_features=early)
    assert masks.shape == (2, 1, 64, 64) and iou.shape == (2, 1)
    assert multi.shape == (2, 3, 64, 64)
    assert single.shape == (1, 1, 64, 64)
    assert robust_multi.shape == (1, 3, 64, 64) and robust_iou.shape == (1, 3)
    with pytest.raises(ValueError, match="encoder_features"):
        model.mask_decoder(*args[:2], sparse[:1], dense[:1], False)


def test_encode_decode_contract_and_hooks(robustsam, images):
    model = RobustMedSAM(robustsam)
    with torch.no_grad():
        expected = model(images, BOXES)
        embeddings = model.encode(images)
        assert torch.equal(model.decode(embeddings, BOXES), expected)
        encoding = model.encode_features(images)
        assert torch.equal(model.decode(encoding.embeddings.clone(), BOXES, encoding.early_features), expected)
        with pytest.raises(ValueError, match="early encoder features"):
            model.decode(embeddings.clone(), BOXES)
        assert model.decode(embeddings.clone(), BOXES, robust=False).shape == (2, 1, 64, 64)
    assert all(not blk._forward_hooks for blk in model.image_encoder.blocks)
    copy.deepcopy(model)  # no hook or cached tensor on the module


def test_early_features_of_a_compact_encoder(medsam):
    slim = copy.deepcopy(medsam)
    slim_block_(slim.image_encoder.blocks[1], [0], [2, 4, 6])
    encoder = slim.image_encoder
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        embeddings, early = encode_with_early_features(encoder, x)
        manual = encoder.patch_embed(x) + encoder.pos_embed
        for blk in encoder.blocks[:3]:  # tiny's first global block is block 2
            manual = blk(manual)
        assert torch.equal(embeddings, encoder(x))
    assert early.shape == (1, 16, 16, 192)
    assert torch.equal(early, manual)


def test_load_sam_recognises_robust_checkpoints(medsam, robustsam, tmp_path):
    for layout in ("raw", "ddp", "model"):
        path = _write(robustsam.state_dict(), tmp_path / f"robustsam_{layout}.pth", layout)
        loaded = load_sam(path)
        assert isinstance(loaded.mask_decoder, RobustMaskDecoder)
        assert isinstance(as_medsam(loaded), RobustMedSAM)
        reference = robustsam.state_dict()
        assert all(torch.equal(value, reference[key]) for key, value in loaded.state_dict().items())
    plain = load_sam(_write(medsam.state_dict(), tmp_path / "medsam.pth", "raw"))
    assert type(plain.mask_decoder) is sam_modeling().MaskDecoder
    assert type(as_medsam(plain)) is MedSAM
    with pytest.raises(TypeError, match="RobustMaskDecoder"):
        RobustMedSAM(plain)


def test_strip_robust_decoder_gives_a_strict_vanilla_state(robustsam):
    ddp_state = {f"module.{k}": v for k, v in robustsam.state_dict().items()}
    vanilla_state, dropped = strip_robust_decoder(ddp_state)
    assert len(dropped) == 89
    assert {k.split(".")[1] for k in dropped} == set(ROBUST_DECODER_MODULES)
    load_state_dict_strict(build_sam("tiny"), vanilla_state)


def test_save_round_trips_of_a_fused_model(medsam, robustsam, images, tmp_path):
    slim = copy.deepcopy(medsam)
    slim_block_(slim.image_encoder.blocks[3], [2], [0, 1, 2, 3])
    fused, report = fuse_state_dicts(slim.state_dict(), robustsam.state_dict())
    model = build_robust_sam(report.config)
    load_state_dict_strict(model, fused)
    with torch.no_grad():
        expected = RobustMedSAM(model)(images, BOXES)
    for saver in (save_sam, save_robust_sam):
        path = saver(RobustMedSAM(model), tmp_path / f"{saver.__name__}.pth")
        reloaded = load_sam(path)
        assert reloaded.medcore_config == report.config
        with torch.no_grad():
            assert torch.equal(RobustMedSAM(reloaded)(images, BOXES), expected)
    assert torch.load(tmp_path / "save_robust_sam.pth", weights_only=True)["medcore"]["decoder"] == DECODER_NAME
    with pytest.raises(TypeError):
        save_robust_sam(medsam, tmp_path / "plain.pth")


def test_evaluate_model_accepts_robust_medsam(robustsam, images):
    label = torch.zeros(2, 1, 256, 256)
    label[:, :, 40:180, 30:170] = 1
    batch = {"image": images, "label": label, "box": BOXES, "name": ["a", "b"]}
    rows = evaluate_model(RobustMedSAM(robustsam), [batch], device="cpu")
    assert [r["name"] for r in rows] == ["a", "b"]
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)


def test_robust_outputs_support_consistency_losses(robustsam, images):
    model = RobustMedSAM(copy.deepcopy(robustsam))
    clean = model.robust_outputs(images, BOXES, robust=False)
    degraded = model.robust_outputs(images + 0.1 * torch.randn_like(images), BOXES, robust=True)
    assert clean.masks.shape == degraded.masks.shape == (2, 1, 64, 64)
    assert clean.robust_embeddings.shape == (2, 32, 64, 64) and clean.robust_token.shape == (2, 4, 256)
    with torch.no_grad():
        assert torch.allclose(clean.masks, RobustMedSAM(robustsam, robust=False)(images, BOXES), atol=1e-5)
    loss = 100 * torch.nn.functional.mse_loss(degraded.robust_embeddings, clean.robust_embeddings.detach())
    loss = loss + 2 * torch.nn.functional.mse_loss(degraded.robust_token, clean.robust_token.detach())
    loss.backward()
    decoder = model.mask_decoder
    assert decoder.custom_robust_token.weight.grad is not None
    assert decoder.fourier_first_layer_features.conv_layer.weight.grad is not None


def test_vit_b_decoder_matches_robustsam_sizes():
    """Parameter and key counts measured on the official RobustSAM ViT-B decoder."""
    modeling = sam_modeling()
    decoder = RobustMaskDecoder(encoder_dim=768, image_embedding_size=64)
    vanilla = modeling.MaskDecoder(
        num_multimask_outputs=3,
        transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    state, vanilla_state = decoder.state_dict(), vanilla.state_dict()
    assert sum(p.numel() for p in decoder.parameters()) == 63_504_072
    assert sum(p.numel() for p in vanilla.parameters()) == 4_058_340
    assert len(state) == 209
    extra = set(state) - set(vanilla_state)
    assert len(extra) == 89 and sorted(extra) == sorted(decoder.robust_state_keys())
    assert all(state[k].shape == v.shape for k, v in vanilla_state.items())

    def params(name):
        return sum(p.numel() for p in getattr(decoder, name).parameters())

    assert params("fourier_first_layer_features") == 53_049_472
    assert params("fourier_last_layer_features") == 6_105_664
    assert params("robust_mlp") == 139_808
    assert params("fourier_mask_features") == 128_964
    assert params("custom_token_block") == 20_800
    assert params("custom_robust_token") == 1_024
    assert "fourier_first_layer_features.dnc_block_combined.SEMBlock.maxpool_conv.0.BN.running_mean" in state
    assert tuple(
        state["fourier_first_layer_features.dnc_block_combined.SEMBlock.maxpool_conv.0.selector.fc.0.weight"].shape
    ) == (
        768,
        12288,
    )
