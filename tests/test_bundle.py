"""The MONAI bundle: metadata, and every workflow run the way users run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.bundle import ConfigWorkflow, verify_metadata
from PIL import Image

from medcore_monai.demo import synthetic_items, write_synthetic_pairs
from medcore_monai.networks import build_sam, load_sam

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.save(build_sam("tiny", seed=0).state_dict(), folder / "medsam_tiny.pth")
    torch.save(build_sam("tiny", seed=1).state_dict(), folder / "sam_tiny.pth")
    return folder


@pytest.fixture(scope="module")
def png_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pngs")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for size in (80, 96):  # two native sizes: predictions must come back at each image's own size
        for item in synthetic_items(4, size, seed=size):
            name = f"{item['name']}_{size}"
            image = (np.clip(np.moveaxis(item["image"], 0, -1), 0, 1) * 255).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / f"{name}.png")
            Image.fromarray(item["label"] * 255).save(root / "masks" / f"{name}.png")
    return root


def _run(workflow: str, overrides: dict, preset: str | None = None):
    bases = {"evaluate": ["train"], "prune": ["train"], "infer": ["train"], "leverage": ["train", "prune"]}
    base = [str(CONFIGS / f"{name}.yaml") for name in bases.get(workflow, [])]  # the overlays' own bases
    files = base + [str(CONFIGS / f"{workflow}.yaml")] + ([str(REPO / "configs" / preset)] if preset else [])
    overrides = {
        "bundle_root": str(REPO / "bundle")
    } | overrides  # the configs default to the repo-root-relative "bundle"
    flow = ConfigWorkflow(config_file=files, run_id=workflow, workflow_type=None, **overrides)
    flow.initialize()
    result = flow.run()
    flow.finalize()
    return result


def test_metadata_verifies_offline_against_the_shipped_schema():
    verify_metadata(
        meta_file=str(CONFIGS / "metadata.json"), filepath=str(REPO / "bundle" / "schema" / "meta_schema.json")
    )
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert list(meta["network_data_format"]["inputs"])[0] == "image"
    assert list(meta["network_data_format"]["outputs"])[0] == "pred"


def test_prune_then_evaluate_export_infer(checkpoints, png_dataset, tmp_path):
    common = {"data_roots": [str(png_dataset)], "device": "cpu", "progress": False}
    _run(
        "prune",
        common
        | {
            "medsam_ckpt": str(checkpoints / "medsam_tiny.pth"),
            "sam_ckpt": str(checkpoints / "sam_tiny.pth"),
            "sam_pixel_normalize": False,
            "output_dir": str(tmp_path / "prune"),
            "cal_size": 2,
            "recovery_steps": 1,
            "max_eval_images": 2,
            "head_sparsity": 0.3,
        },
    )
    report = json.loads((tmp_path / "prune" / "report.json").read_text())
    assert report["budgets"][0]["achieved"] == round(0.3 * 18)
    run_dir = tmp_path / "prune"  # the other workflows default to the run's pruned model and write beside it

    _run("evaluate", common | {"output_dir": str(run_dir), "eval_split": "all"})
    evaluation = json.loads((run_dir / "evaluation" / "evaluation.json").read_text())
    assert evaluation["split"] == "all" and evaluation["metrics"][png_dataset.name]["n"] == 8  # never-seen folder
    assert evaluation["metrics"][png_dataset.name]["units"] == "pixels"
    assert (run_dir / "evaluation" / "val_bf1_raw.csv").is_file()  # MetricsSaver's per-image values
    assert evaluation["cost"]["encoder_params"] == report["cost"]["after"]["encoder_params"]
    assert evaluation["latency"]["total_s"] > 0

    _run("export", {"output_dir": str(run_dir), "formats": ["torchscript"]})
    encoder = torch.jit.load(str(run_dir / "export" / "image_encoder.ts"))
    assert encoder(torch.rand(1, 3, 256, 256)).shape == (1, 256, 16, 16)
    assert load_sam(run_dir / "export" / "model.pt").medcore_config.is_compact

    _run("infer", common | {"output_dir": str(run_dir)})
    for image_path in sorted((png_dataset / "images").iterdir()):
        prediction = Image.open(run_dir / "predictions" / png_dataset.name / image_path.name)
        assert prediction.size == Image.open(image_path).size
        assert set(np.unique(np.asarray(prediction))) <= {0, 255}


def test_infer_writes_nifti_with_the_input_geometry(checkpoints, tmp_path):
    import nibabel as nib

    root = tmp_path / "vols"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    image = np.random.default_rng(0).normal(100, 10, (20, 24, 5)).astype(np.float32)
    label = np.zeros((20, 24, 5), dtype=np.uint8)
    label[5:12, 6:15, 1:4] = 1
    nib.save(nib.Nifti1Image(image, affine), root / "images" / "case1.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / "masks" / "case1.nii.gz")
    medsam = str(checkpoints / "medsam_tiny.pth")
    _run("infer", {"checkpoint": medsam, "data_roots": [str(root)], "device": "cpu", "output_dir": str(tmp_path / "o")})
    written = nib.load(tmp_path / "o" / "predictions" / "vols" / "case1.nii.gz")
    assert written.shape == (20, 24, 5) and np.allclose(written.affine, affine)
    assert not written.get_fdata()[..., [0, 4]].any()  # slices without foreground have no prompt


def test_leverage_and_finetune_workflows(checkpoints, png_dataset, tmp_path):
    common = {"data_roots": [str(png_dataset)], "device": "cpu", "progress": False}
    _run(
        "leverage",
        common
        | {
            "medsam_ckpt": str(checkpoints / "medsam_tiny.pth"),
            "sam_ckpt": str(checkpoints / "sam_tiny.pth"),
            "sam_pixel_normalize": False,
            "output_dir": str(tmp_path / "lev"),
            "cal_size": 2,
            "head_levels": [0.3, 0.6],
            "mlp_levels": [0.3, 0.6],
        },
    )
    assert "blr95" in json.loads((tmp_path / "lev" / "leverage.json").read_text())["summary"]
    # finetune is an overlay on train.yaml; it writes into the pruning run's folder (output_dir) by default
    finetune = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.yaml"), str(CONFIGS / "finetune.yaml")],
        run_id="finetune",
        workflow_type=None,
        bundle_root=str(REPO / "bundle"),
        **common,
        checkpoint=str(checkpoints / "medsam_tiny.pth"),
        output_dir=str(tmp_path / "ft"),
        epochs=1,
    )
    finetune.initialize()
    finetune.run()
    finetune.finalize()
    assert finetune.parser.get_parsed_content("train#trainer").state.epoch == 1
    assert load_sam(tmp_path / "ft" / "finetune" / "model.pt") is not None  # the best model, stock format
    assert (tmp_path / "ft" / "finetune" / "checkpoint_latest.pt").is_file()


def test_cli_prune_fails_early_on_a_missing_checkpoint(png_dataset, tmp_path):
    command = [
        sys.executable, "-m", "monai.bundle", "run", "prune",
        "--config_file", f"['{CONFIGS / 'train.yaml'}','{CONFIGS / 'prune.yaml'}']",
        "--medsam_ckpt", str(tmp_path / "missing.pth"),
        "--data_roots", f"['{png_dataset}']",
        "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode != 0
    assert f"error: cannot start:\n  medsam_ckpt not found: {tmp_path / 'missing.pth'}" in result.stderr
    assert "Traceback" not in result.stderr  # one clear message, not a stack (MEDCORE_DEBUG=1 shows it)
    assert not (tmp_path / "out" / "model_pruned.pt").exists()


def test_embedded_default_runs_on_shipped_models_and_sample(tmp_path):
    """The README's default job, shrunk: the shipped tiny pair on the shipped hippocampus volumes."""
    _run(
        "prune",
        {"output_dir": str(tmp_path), "cal_size": 4, "recovery_steps": 2, "max_eval_images": 12, "progress": False},
        preset="demo.yaml",
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["inputs"]["medsam_ckpt"]["sha256"] != report["inputs"]["sam_ckpt"]["sha256"]
    assert report["metrics"]["hippocampus"]["after"]["units"] == "mm, per volume"
    assert report["reduction"]["encoder_params"] > 0.3
    assert report["fisher_samples"]["sam"]["used"] == 4


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_presets_only_use_known_keys(preset):
    from medcore_monai.config import bundle_defaults, check_config_values

    content = yaml.safe_load((REPO / "configs" / preset).read_text())
    check_config_values({k.lstrip("+"): v for k, v in content.items()}, bundle_defaults(CONFIGS))


def test_a_preset_typo_fails_before_any_work(png_dataset, tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("head_sparsty: 0.2\nmlp_sparsity: 0.5\n")
    with pytest.raises(RuntimeError) as caught:
        _run("prune", {"data_roots": [str(png_dataset)], "output_dir": str(tmp_path / "out")}, preset=str(preset))
    error = caught.value
    while error.__cause__ is not None:
        error = error.__cause__
    assert "unknown key 'head_sparsty' (did you mean head_sparsity" in str(error)
    assert not (tmp_path / "out").exists()


def test_evaluation_counts_empty_masks(checkpoints, tmp_path):
    root = tmp_path / "data"
    write_synthetic_pairs(root, 3, 64, seed=9, mask_value=0)  # nothing to segment
    out = tmp_path / "run"
    common = {"data_roots": [str(root)], "device": "cpu", "progress": False, "latency": False, "eval_split": "all"}
    _run("evaluate", common | {"checkpoint": str(checkpoints / "medsam_tiny.pth"), "output_dir": str(out)})
    evaluation = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert evaluation["metrics"]["data"]["empty_masks"] == 3 and evaluation["metrics"]["data"]["n"] == 3


def test_a_preset_that_replaces_the_leverage_section_fails_instead_of_doing_nothing(tmp_path):
    files = ["train.yaml", "prune.yaml", "leverage.yaml"]
    base = [str(CONFIGS / name) for name in files]
    preset = str(REPO / "configs" / "demo.yaml")  # sets the prune setting `leverage: true`
    wrong = ConfigWorkflow(config_file=[*base, preset], run_id="leverage", workflow_type=None, output_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as caught:
        wrong.initialize()
    error = caught.value
    while error.__cause__ is not None:
        error = error.__cause__
    assert "workflow section 'leverage' was replaced by the setting leverage: True" in str(error)
    right = ConfigWorkflow(
        config_file=[*base[:2], preset, base[2]], run_id="leverage", workflow_type=None, output_dir=str(tmp_path)
    )
    right.initialize()  # presets listed before leverage.yaml leave its section in place
    assert isinstance(right.parser["leverage"], list)
