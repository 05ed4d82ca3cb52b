"""RobustMedSAM workflows through the bundle: fuse, degraded-image evaluation, corrupted and SVD fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from medcore_monai.demo import write_synthetic_pairs
from medcore_monai.engines.robust import CleanDegradedPair, prepare_pair_batch
from medcore_monai.networks import (
    MedSAM,
    RobustMedSAM,
    as_medsam,
    build_robust_sam,
    build_sam,
    load_sam,
    read_checkpoint,
    read_model_state,
    save_sam,
    slim_block_,
)
from medcore_monai.networks.checkpoint import plain_state_dict
from medcore_monai.robust import apply_svd_adaptation, is_svd_adapted
from medcore_monai.transforms import CORRUPTIONS, RandCorruptiond
from medcore_monai.workflows import fuse

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"


def _chain(error: BaseException) -> str:
    """The messages of an exception and its causes (MONAI wraps errors raised inside config expressions)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


def _run(workflow: str, overrides: dict, keep: list | None = None):
    """Run a bundle workflow; ``keep`` receives the workflow, to read its objects afterwards."""
    base = [str(CONFIGS / "train.yaml")] if workflow in ("evaluate", "finetune") else []  # overlays on train.yaml
    flow = ConfigWorkflow(
        config_file=[*base, str(CONFIGS / f"{workflow}.yaml")],
        run_id=workflow,
        workflow_type=None,
        **({"bundle_root": str(REPO / "bundle")} | overrides),
    )
    if keep is not None:
        keep.append(flow)
    flow.initialize()
    result = flow.run()
    flow.finalize()
    return result


def _finetune(checkpoint, data_root, out, **keys) -> ConfigWorkflow:
    """One quick fine-tuning epoch through the bundle's ``finetune`` run (train.yaml + finetune.yaml).

    The best model is ``<out>/model.pt``; returns the workflow, whose objects the tests inspect.
    """
    common = {"checkpoint": str(checkpoint), "data_roots": [str(data_root)], "finetune_dir": str(out)}
    flows: list[ConfigWorkflow] = []
    _run("finetune", common | {"epochs": 1, "batch_size": 2, "progress": False} | keys, keep=flows)
    return flows[0]


def _changed_keys(before_path, after_path) -> set[str]:
    before, after = load_sam(before_path).state_dict(), load_sam(after_path).state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("robust_ckpt")
    medsam = build_sam("tiny", seed=0)
    slim_block_(medsam.image_encoder.blocks[1], [0, 2], range(300))  # a pruned (compact) MedSAM
    save_sam(medsam, folder / "medsam_pruned.pt")
    torch.save({"model": build_robust_sam("tiny", seed=5).state_dict()}, folder / "robustsam_tiny.pth")
    torch.save(build_sam("tiny", seed=0).state_dict(), folder / "medsam_dense.pth")
    return folder


@pytest.fixture(scope="module")
def png_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust_pngs")
    write_synthetic_pairs(root, 8, 96, seed=11)
    return root


@pytest.fixture(scope="module")
def fused(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused")
    summary = _run(
        "fuse",
        {
            "checkpoint": str(checkpoints / "medsam_pruned.pt"),
            "robustsam_ckpt": str(checkpoints / "robustsam_tiny.pth"),
            "fuse_dir": str(out),
        },
    )
    return Path(summary[0]["checkpoint"]), out


def test_fuse_workflow_keeps_the_pruned_encoder_and_the_robust_decoder(checkpoints, fused):
    path, out = fused
    model = load_sam(path)
    assert isinstance(as_medsam(model), RobustMedSAM)
    assert (
        model.image_encoder.blocks[1].attn.num_heads == 2 and model.image_encoder.blocks[1].mlp.lin1.out_features == 300
    )
    medsam = read_model_state(checkpoints / "medsam_pruned.pt")
    robust = read_checkpoint(checkpoints / "robustsam_tiny.pth")["model"]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in medsam.items() if not k.startswith("mask_decoder."))
    assert all(torch.equal(state[k], v) for k, v in robust.items() if k.startswith("mask_decoder."))
    report = json.loads((out / "fusion.json").read_text())
    assert report["sha256"] and report["fusion"]


def test_fuse_workflow_refuses_missing_inputs_and_overwriting(checkpoints, tmp_path):
    with pytest.raises(Exception) as err:
        _run("fuse", {"checkpoint": str(checkpoints / "medsam_dense.pth"), "robustsam_ckpt": str(tmp_path / "no.pth")})
    assert "robustsam_ckpt not found" in _chain(err.value)
    with pytest.raises(ValueError, match="would overwrite an input checkpoint"):
        fuse(
            str(checkpoints / "medsam_dense.pth"),
            str(checkpoints / "robustsam_tiny.pth"),
            str(checkpoints),
            "medsam_dense.pth",
        )


def test_evaluate_reports_every_corruption_and_severity_for_a_fused_model(fused, png_dataset, tmp_path):
    path, _ = fused
    out = tmp_path / "evaluation"
    _run(
        "evaluate",
        {
            "checkpoint": str(path),
            "data_roots": [str(png_dataset)],
            "evaluate_dir": str(out),
            "corruptions": ["gauss_noise", "step_motion"],
            "severities": [1, 5],
            "progress": False,
            "latency": False,
        },
    )
    report = json.loads((out / "evaluation.json").read_text())
    robustness = report["robustness"]
    assert set(robustness["corruptions"]) == {"gauss_noise", "step_motion"}
    assert set(robustness["corruptions"]["gauss_noise"]) == {"1", "5"}
    dice = [
        robustness["corruptions"][n][s]["macro"]["dice"] for n in ("gauss_noise", "step_motion") for s in ("1", "5")
    ]
    assert robustness["mean"]["dice"] == pytest.approx(np.mean(dice))
    assert robustness["mean_by_severity"]["5"]["dice"] == pytest.approx(np.mean(dice[1::2]))
    assert robustness["clean"] == report["metrics"]["macro"]
    assert len(set(dice) | {report["metrics"]["macro"]["dice"]}) > 1  # the corruptions changed something
    assert (out / "robustness_dice.png").is_file()
    assert len((out / "robustness.csv").read_text().strip().splitlines()) == 1 + 4


def test_evaluate_refuses_unknown_corruptions_before_any_work(fused, png_dataset, tmp_path):
    with pytest.raises(Exception) as err:
        _run(
            "evaluate",
            {
                "checkpoint": str(fused[0]),
                "data_roots": [str(png_dataset)],
                "corruptions": ["fog"],
                "evaluate_dir": str(tmp_path),
            },
        )
    assert "unknown corruption 'fog'" in _chain(err.value)
    assert not (tmp_path / "evaluation.json").exists()


def test_decoder_only_finetuning_on_corrupted_images_keeps_the_encoder(fused, png_dataset, tmp_path):
    path, _ = fused
    out = tmp_path / "ft"
    flow = _finetune(path, png_dataset, out, trainable_modules=["mask_decoder"], corruptions="all", severities=[3])
    draw = flow.parser.get_parsed_content("train#preprocessing").transforms[-1]
    assert isinstance(draw, RandCorruptiond) and {c[0] for c in draw.choices if c} == set(CORRUPTIONS)
    train = flow.parser.get_parsed_content("train#dataset")
    drawn = [train[i]["corruption"] for i in range(len(train)) for _ in range(4)]
    assert any(d != "clean" for d in drawn) and all(d == "clean" or d.endswith("@3") for d in drawn)
    # validation: the same draw per sample name, at model size
    fixed = flow.parser.get_parsed_content("validate#inferer#model_transform").transforms[-1]
    sample = {"image": torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)), "name": "case_1"}
    assert torch.equal(fixed(sample)["image"], fixed(dict(sample))["image"])
    assert len({fixed(sample | {"name": f"case_{i}"})["corruption"] for i in range(40)}) > 3
    changed = _changed_keys(path, out / "model.pt")
    assert changed and all(k.startswith("mask_decoder.") for k in changed)
    assert any("fourier" in k or "robust" in k for k in changed)  # the RobustSAM modules trained too


def test_svd_finetuning_writes_a_stock_checkpoint_whose_encoder_changed_in_singular_values(
    checkpoints, png_dataset, tmp_path
):
    source = checkpoints / "medsam_dense.pth"
    out = tmp_path / "svd"
    flow = _finetune(source, png_dataset, out, lr=1e-2, trainable_modules=["image_encoder"], svd_adaptation=True)
    network = flow.parser.get_parsed_content("network")
    assert not is_svd_adapted(network)  # merged back when training ended
    assert all(p.requires_grad for p in network.image_encoder.parameters())  # and the flags given back
    tuned = load_sam(out / "model.pt")  # loads strictly: stock keys, no parametrization left
    original = load_sam(source)
    assert set(tuned.state_dict()) == set(original.state_dict())
    w0 = original.image_encoder.blocks[0].attn.qkv.weight.detach().double()
    w1 = tuned.image_encoder.blocks[0].attn.qkv.weight.detach().double()
    assert not torch.allclose(w0, w1)
    u, _, vh = torch.linalg.svd(w0, full_matrices=False)
    # the adapted weight lives in the original singular bases: U^T W' V is diagonal
    inner = u.T @ w1 @ vh.T
    off_diagonal = inner - torch.diag(torch.diagonal(inner))
    assert off_diagonal.abs().max() < 1e-4 * inner.abs().max()
    for name in ("patch_embed.proj.weight", "neck.0.weight", "pos_embed"):
        assert torch.equal(original.image_encoder.state_dict()[name], tuned.image_encoder.state_dict()[name])
    assert all(
        torch.equal(v, tuned.state_dict()[k]) for k, v in original.state_dict().items() if k.startswith("mask_decoder.")
    )


def test_svd_option_needs_a_trainable_encoder(checkpoints, png_dataset, tmp_path):
    with pytest.raises(Exception) as err:
        _run(
            "finetune",
            {
                "checkpoint": str(checkpoints / "medsam_dense.pth"),
                "data_roots": [str(png_dataset)],
                "finetune_dir": str(tmp_path),
                "trainable_modules": ["mask_decoder"],
                "svd_adaptation": True,
            },
        )
    assert "svd_adaptation trains the image encoder" in _chain(err.value)


def test_plain_state_dict_bakes_parametrized_weights_under_stock_keys():
    sam = build_sam("tiny", seed=0)
    keys = list(sam.state_dict())
    apply_svd_adaptation(sam.image_encoder)
    with torch.no_grad():
        sam.image_encoder.blocks[0].mlp.lin1.parametrizations.weight[0].shift.add_(0.1)
    plain = plain_state_dict(sam)
    assert sorted(plain) == sorted(keys)
    assert torch.equal(plain["image_encoder.blocks.0.mlp.lin1.weight"], sam.image_encoder.blocks[0].mlp.lin1.weight)
    fresh = build_sam("tiny", seed=1)
    fresh.load_state_dict(plain, strict=True)


def test_rand_corruption_draws_clean_and_each_corruption_reproducibly():
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    draw = RandCorruptiond(keys="image", names=["gauss_noise", "contrast"], severities=[1, 3]).set_random_state(seed=4)
    seen = [draw({"image": image, "name": str(i)})["corruption"] for i in range(200)]
    assert set(seen) == {"clean", "gauss_noise@1", "gauss_noise@3", "contrast@1", "contrast@3"}
    # clean is as likely as each corruption (over its severities): 1/3 here
    assert 0.25 < seen.count("clean") / len(seen) < 0.42
    again = RandCorruptiond(keys="image", names=["gauss_noise", "contrast"], severities=[1, 3]).set_random_state(seed=4)
    first, second = draw.set_random_state(seed=9)({"image": image}), again.set_random_state(seed=9)({"image": image})
    assert first["corruption"] == second["corruption"] and torch.equal(first["image"], second["image"])
    clean = [d for d in (draw({"image": image}) for _ in range(30)) if d["corruption"] == "clean"]
    assert clean and all(torch.equal(d["image"], image) for d in clean)
    with pytest.raises(ValueError):
        RandCorruptiond(keys="image", names=["fog"])


def test_as_medsam_picks_the_wrapper_for_the_decoder():
    assert type(as_medsam(build_sam("tiny"))) is MedSAM
    assert type(as_medsam(build_robust_sam("tiny"))) is RobustMedSAM


def test_consistency_finetuning_trains_the_robust_decoder_on_clean_degraded_pairs(fused, png_dataset, tmp_path):
    path, _ = fused
    out = tmp_path / "consistency"
    flow = _finetune(
        path,
        png_dataset,
        out,
        trainable_modules=["mask_decoder"],
        corruptions=["gauss_noise", "rician_noise"],
        severities=[3],
        consistency_loss=True,
    )
    trainer = flow.parser.get_parsed_content("train#trainer")
    evaluator = flow.parser.get_parsed_content("validate#evaluator")
    assert isinstance(trainer.network, CleanDegradedPair) and trainer.prepare_batch is prepare_pair_batch
    assert evaluator.network is trainer.network.module  # validation scores the plain network
    assert np.isfinite(float(trainer.state.output["loss"].detach()))
    assert np.isfinite(evaluator.state.metrics["val_bf1"])
    changed = _changed_keys(path, out / "model.pt")
    assert changed and all(k.startswith("mask_decoder.") for k in changed)


def test_consistency_loss_needs_corruptions_and_a_robust_decoder(checkpoints, fused, png_dataset, tmp_path):
    common = {"data_roots": [str(png_dataset)], "finetune_dir": str(tmp_path), "consistency_loss": True}
    with pytest.raises(Exception) as err:
        _run("finetune", common | {"checkpoint": str(fused[0])})
    assert "consistency_loss compares clean and corrupted views" in _chain(err.value)
    with pytest.raises(Exception) as err:
        _run("finetune", common | {"checkpoint": str(checkpoints / "medsam_dense.pth"), "corruptions": "all"})
    assert "needs a RobustSAM decoder" in _chain(err.value)


def test_finetune_refuses_unknown_corruptions_before_any_work(checkpoints, png_dataset, tmp_path):
    out = tmp_path / "ft"
    keys = {"checkpoint": str(checkpoints / "medsam_dense.pth"), "data_roots": [str(png_dataset)]}
    with pytest.raises(Exception) as err:
        _run("finetune", keys | {"finetune_dir": str(out), "corruptions": ["fog"]})
    assert "unknown corruption 'fog'" in _chain(err.value)
    assert not out.exists()


def test_robust_consistency_loss_terms_and_weights():
    from medcore_monai.losses import RobustLossWeights, robust_consistency_loss

    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(2, 1, 8, 8, generator=g), (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    features, token = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 1, 16, generator=g)
    same = robust_consistency_loss(logits, target, features, features, token, token)
    assert same["token"] == 0 and same["features"] == 0
    assert same["loss"] == pytest.approx(float(20 * same["focal"] + same["dice"]))
    shifted = robust_consistency_loss(logits, target, features + 0.5, features, token + 1.0, token)
    assert shifted["features"] == pytest.approx(0.25) and shifted["token"] == pytest.approx(1.0)
    weights = RobustLossWeights(focal=0, dice=0, token=3, features=0)
    assert float(robust_consistency_loss(logits, target, features, features, token + 1.0, token, weights)["loss"]) == (
        pytest.approx(3.0)
    )


def test_rand_corruption_keeps_the_clean_view_when_asked():
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    draw = RandCorruptiond(keys="image", names=["gauss_noise"], include_clean=False, clean_key="image_clean")
    out = draw.set_random_state(seed=0)({"image": image})
    assert torch.equal(out["image_clean"], image) and not torch.equal(out["image"], image)
