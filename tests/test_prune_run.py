"""End-to-end pruning runs (`run_prune`) and the leverage analysis on the tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medcore_monai.demo import synthetic_items, write_synthetic_pairs
from medcore_monai.engines.leverage import run_leverage_analysis
from medcore_monai.networks import MedSAM, build_sam, count_parameters, encoder_structure, load_sam
from medcore_monai.prune import run_prune
from medcore_monai.transforms import medsam_preprocess


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.save(build_sam("tiny", seed=0).state_dict(), folder / "medsam_tiny.pth")  # raw, like medsam_vit_b.pth
    torch.save({"model": build_sam("tiny", seed=1).state_dict()}, folder / "sam_tiny.pth")
    return folder / "medsam_tiny.pth", folder / "sam_tiny.pth"


@pytest.fixture(scope="module")
def png_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("polyps")
    write_synthetic_pairs(root, 10, 96, seed=3)
    return root


def _settings(checkpoints, roots, out, **extra):
    medsam, sam = checkpoints
    return {
        "medsam_ckpt": str(medsam),
        "sam_ckpt": str(sam),
        "data_roots": [str(r) for r in roots],
        "output_dir": str(out),
        "device": "cpu",
        "head_sparsity": 0.5,
        "mlp_sparsity": 0.5,
        "cal_size": 3,
        "recovery_steps": 2,
        "max_eval_images": 2,
        "progress": False,
    } | extra


def _check_run(report, out, head_sparsity, mlp_sparsity):
    for name in ("report.json", "report.md", "scores.npz", "splits.json", "model_pruned.pt", "kept_per_block.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["budgets"] == report["budgets"]
    structure = encoder_structure(build_sam("tiny").image_encoder)
    heads, channels = report["budgets"]
    assert heads["achieved"] == round(head_sparsity * 18) and channels["achieved"] == round(mlp_sparsity * 4608)
    removed = heads["achieved"] * structure[0].params_per_head + channels["achieved"] * structure[0].params_per_channel
    before, after = report["cost"]["before"], report["cost"]["after"]
    assert before["encoder_params"] - after["encoder_params"] == removed
    assert after["encoder_flops"] < before["encoder_flops"] and after["total_flops"] < before["total_flops"]
    pruned = load_sam(out / "model_pruned.pt")
    assert count_parameters(pruned.image_encoder) == after["encoder_params"]
    for per_dataset in report["metrics"].values():
        for stage in ("before", "after"):
            assert all(math.isfinite(v) for k, v in per_dataset[stage].items() if k != "units")
    scores = np.load(out / "scores.npz")
    assert scores["head_scores"].shape == (18,) and scores["mlp_scores"].shape == (4608,)
    text = (out / "report.md").read_text()
    assert "Segmentation metrics" in text and "| Dataset | Stage | n |" in text
    assert report["evaluation"]["split"] == "test" and f"Evaluated on the {report['evaluation']['split']} split" in text
    for name, per_dataset in report["metrics"].items():  # every number says how many images it averages
        assert name == "macro" or per_dataset["before"]["n"] == report["evaluation"]["n"][name] >= 1


def test_prune_run_on_png_folder(checkpoints, png_dataset, tmp_path):
    out = tmp_path / "run"
    report = run_prune(**_settings(checkpoints, [png_dataset], out))
    _check_run(report, out, 0.5, 0.5)
    assert report["datasets"][png_dataset.name] == {"train": 6, "val": 2, "test": 2, "calibration": 3}
    assert report["inputs"]["medsam_ckpt"]["sha256"] and report["fisher_samples"]["sam"]["used"] == 3


def test_prune_run_reports_stages_leverage_and_tensorboard(checkpoints, png_dataset, tmp_path):
    out = tmp_path / "run"
    settings = _settings(
        checkpoints,
        [png_dataset],
        out,
        leverage=True,
        leverage_head_levels=[0.3, 0.6],
        leverage_mlp_levels=[0.3, 0.6],
        leverage_samples=2,
        tensorboard_dir=str(out / "tb"),
    )
    report = run_prune(**settings)
    stages = report["stages"]
    assert [s["stage"] for s in stages] == ["dense", "after heads", "after mlp"]
    params = [s["encoder_params"] for s in stages]
    assert params[0] > params[1] > params[2] == report["cost"]["after"]["encoder_params"]
    assert stages[2]["bf1"] == report["metrics"]["macro"]["after"]["bf1"]
    assert math.isfinite(report["leverage"]["summary"]["blr95"])
    assert report["leverage"]["grid"]["head_levels"] == [0.3, 0.6]
    assert report["fisher_samples"]["sam"]["used"] == 3  # the scores came from before the cascade
    text = (out / "report.md").read_text()
    for image in ("budget_curve.png", "leverage/leverage_histogram.png", "kept_per_block.png"):
        assert (out / image).is_file() and f"]({image})" in text, image
    assert "Cascade stages" in text and "BLR95 =" in text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "tb"))
    accumulator.Reload()
    losses = [e.step for e in accumulator.Scalars("recovery/loss")]
    assert losses == [1, 2, 3, 4]  # both stages' recovery iterations (2 each), one writer for the run


def test_prune_run_fails_early_with_every_problem_listed(checkpoints, tmp_path):
    with pytest.raises(ValueError) as err:
        run_prune(**_settings(checkpoints, [tmp_path / "missing"], tmp_path / "o", sam_ckpt=None))
    message = str(err.value)
    assert "data root not found" in message and "needs sam_ckpt" in message
    with pytest.raises(ValueError, match="unknown key 'head_sparsty' \\(did you mean head_sparsity"):
        run_prune(**_settings(checkpoints, [tmp_path], tmp_path / "o", head_sparsty=0.2))
    with pytest.raises(ValueError, match="medsam_ckpt not found"):
        run_prune(**_settings(checkpoints, [tmp_path], tmp_path / "o", medsam_ckpt=str(tmp_path / "none.pth")))
    for bad in (0, -3, 2.5, "all"):
        with pytest.raises(ValueError, match=f"recovery_images must be null .* got {bad!r}"):
            run_prune(**_settings(checkpoints, [tmp_path], tmp_path / "o", recovery_images=bad))


@pytest.mark.integration
def test_prune_tiny_model_on_real_kvasir_and_hippocampus(checkpoints, kvasir_root, hippocampus_root, tmp_path):
    out = tmp_path / "real"
    report = run_prune(
        **_settings(
            checkpoints,
            [kvasir_root, hippocampus_root],
            out,
            dataset_names=["kvasir", "hippocampus"],
            head_sparsity=0.5,
            mlp_sparsity=0.7,
            protected_blocks=[5],
        )
    )
    _check_run(report, out, 0.5, 0.7)
    assert report["datasets"]["hippocampus"]["calibration"] == 3
    assert report["metrics"]["hippocampus"]["after"]["units"] == "mm, per volume"
    assert report["metrics"]["kvasir"]["after"]["units"] == "pixels"
    assert set(report["metrics"]) == {"kvasir", "hippocampus", "macro"}
    assert len(report["kept_heads"][5]) == 3  # protected block untouched


def test_leverage_analysis_writes_blr95_and_leaves_model_unchanged(tmp_path):
    transform = medsam_preprocess(size=256)
    calibration = {"a": [transform(item) for item in synthetic_items(2, 256, 0)]}
    model = MedSAM(build_sam("tiny", seed=0))
    sample = calibration["a"][0]
    image, box = torch.as_tensor(sample["image"])[None], torch.as_tensor(sample["box"])[None]
    with torch.no_grad():
        before = model(image, box)
    result = run_leverage_analysis(
        model,
        calibration,
        reference_model=MedSAM(build_sam("tiny", seed=1)),
        head_levels=(0.3, 0.6),
        mlp_levels=(0.3, 0.6),
        output_dir=tmp_path,
        n_bootstrap=50,
        progress=False,
    )
    with torch.no_grad():
        assert torch.equal(model(image, box), before)
    summary = result["summary"]
    assert summary["n_head_steps"] == 2 and summary["n_mlp_steps"] == 2
    assert math.isfinite(summary["blr95"]) and summary["ci_low"] <= summary["blr95"] <= summary["ci_high"]
    grid = result["grid"]["param_reduction_pct"]
    assert grid[0][0] < grid[1][0] and grid[0][0] < grid[0][1]
    assert (tmp_path / "leverage.json").is_file() and (tmp_path / "leverage_histogram.png").is_file()


def test_prune_run_restarts_a_cosine_recovery_schedule_at_each_stage(checkpoints, png_dataset, tmp_path):
    """``recovery_lr_schedule: cosine`` enables the bundle's ``StageLrSchedule`` handler on the rebuilt optimizers."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from medcore_monai.bundle import BUNDLE_DIR
    from medcore_monai.handlers.training import stage_lr_factor

    settings = _settings(checkpoints, [png_dataset], tmp_path / "run", recovery_steps=4, recovery_lr=1e-3)
    files = [str(BUNDLE_DIR / "configs" / name) for name in ("train.yaml", "prune.yaml")]
    flow = ConfigWorkflow(
        config_file=files, run_id="prune", workflow_type=None, bundle_root=str(BUNDLE_DIR),
        recovery_lr_schedule="cosine", evaluate_stages=False, **settings,
    )  # fmt: skip
    flow.initialize()
    trainer = flow.parser.get_parsed_content("train#trainer")
    lrs: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: lrs.append(e.optimizer.param_groups[0]["lr"]))
    flow.run()
    flow.finalize()
    stage = [1e-3 * stage_lr_factor("cosine", step, 4) for step in range(4)]
    assert lrs == pytest.approx(stage + stage) and stage[-1] == pytest.approx(0.25e-3)


def test_prune_run_distils_the_encoder_taps_when_weighted(checkpoints, png_dataset, tmp_path):
    """``intermediate_distill_weight > 0`` gives the bundle's teacher the encoder's taps and the loss their term."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from medcore_monai.bundle import BUNDLE_DIR

    settings = _settings(checkpoints, [png_dataset], tmp_path / "run", recovery_steps=2)
    files = [str(BUNDLE_DIR / "configs" / name) for name in ("train.yaml", "prune.yaml")]
    flow = ConfigWorkflow(
        config_file=files, run_id="prune", workflow_type=None, bundle_root=str(BUNDLE_DIR),
        intermediate_distill_weight=2.0, evaluate_stages=False, **settings,
    )  # fmt: skip
    flow.initialize()
    assert flow.parser.get_parsed_content("teacher_taps") == ["blocks.2", "blocks.5"]  # the tiny ViT's global blocks
    trainer = flow.parser.get_parsed_content("train#trainer")
    terms: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: terms.append(e.state.output["loss_intermediate"]))
    flow.run()
    flow.finalize()
    assert len(terms) == 4 and all(t > 0 for t in terms)
