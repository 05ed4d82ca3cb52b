"""The explain pipeline on the shipped tiny MedSAM and hippocampus sample: completeness, bad inputs, the bundle run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from medcore_monai.explain import (
    ExplainSettings,
    FlowConfig,
    explain_image,
    invert,
    prepare_flow,
    save_flow,
    train_flow,
)
from medcore_monai.networks import build_sam, load_medsam

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
SMALL_FLOW = {"size": 32, "widths": [16, 32], "groups": 8, "steps": 40, "batch_size": 16, "region_scale": 2.0}


def _parser(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "explain.yaml")])
    parser.update({"bundle_root": str(REPO / "bundle"), "progress": False, "prune_dir": "/nonexistent"} | overrides)
    return parser


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    """Explain samples and a small flow trained on the training split, both from the bundle's own config."""
    parser = _parser(flow_checkpoint=None, flow_settings=SMALL_FLOW, max_images=2)
    samples = parser.get_parsed_content("explain_data#dataset")
    training = parser.get_parsed_content("flow_data#dataset")
    folder = tmp_path_factory.mktemp("flow")
    flow = prepare_flow(None, training, SMALL_FLOW, folder, progress=False)
    return samples, flow, training


@pytest.fixture(scope="module")
def medsam():
    return load_medsam(str(REPO / "bundle" / "models" / "medsam_tiny.pth")).eval().requires_grad_(False)


def test_completeness_gap_of_the_real_pipeline_is_below_1e_3(sample_data, medsam):
    samples, flow, _ = sample_data
    settings = ExplainSettings(methods=("transport",), path_steps=8, points=4, deletion_steps=4)
    checked = 0
    for sample in list(samples)[:6]:
        explanation = explain_image(sample["name"], sample["image"], sample["box"], medsam, flow, settings)
        numbers = explanation.metrics["transport"]
        if explanation.notes:  # an empty mask: the target is zero and nothing is attributed
            continue
        assert abs(numbers["target_value"] - numbers["baseline_value"]) > 1e-3
        assert numbers["relative_completeness_gap"] < 1e-3
        assert explanation.path["round_trip_error"] < 1e-2
        checked += 1
    assert checked >= 2


def test_the_dense_and_pruned_maps_share_the_path_and_their_difference_is_measured(sample_data, medsam):
    samples, flow, _ = sample_data
    other = load_medsam(str(REPO / "bundle" / "models" / "sam_tiny.pth")).eval().requires_grad_(False)
    settings = ExplainSettings(methods=("transport",), path_steps=4, points=2, deletion_steps=4)
    sample = samples[0]
    explanation = explain_image(sample["name"], sample["image"], sample["box"], other, flow, settings, reference=medsam)
    compared = explanation.compression
    torch.testing.assert_close(compared["pruned"], explanation.attributions["transport"].spatial())
    torch.testing.assert_close(compared["difference"], compared["pruned"] - compared["dense"])
    assert 0.0 <= compared["difference_band_mass"] <= 1.0
    assert compared["difference_l1"] > 0
    same = explain_image(sample["name"], sample["image"], sample["box"], medsam, flow, settings, reference=medsam)
    assert same.compression["difference_l1"] == 0.0


def test_bad_inputs_give_one_clear_error(sample_data, medsam, tmp_path):
    samples, flow, training = sample_data
    settings = ExplainSettings(methods=("transport",), path_steps=2, points=1)
    sample = samples[0]
    with pytest.raises(ValueError, match="no box prompt"):
        explain_image("x", sample["image"], None, medsam, flow, settings)
    with pytest.raises(ValueError, match="NaN"):
        explain_image("x", torch.full_like(sample["image"], float("nan")), sample["box"], medsam, flow, settings)
    with pytest.raises(ValueError, match="flow was trained on"):  # a path in another flow space
        invert(flow, torch.zeros(1, 48, 48))
    colour = sample["image"].clone()
    colour[0] = 0.0
    with pytest.raises(ValueError, match="grey"):
        explain_image("x", colour, sample["box"], medsam, flow, settings)
    with pytest.raises(ValueError, match="trained on \\['hippocampus'\\], not on \\['kvasir'\\]"):
        prepare_flow(save_flow(flow, tmp_path / "f.pt"), training, {}, tmp_path, datasets=["kvasir"])
    with pytest.raises(ValueError, match="unknown flow settings \\['sise'\\]"):
        prepare_flow(None, training, {"sise": 32}, tmp_path)
    with pytest.raises(ValueError, match="unknown or no explanation methods"):
        ExplainSettings(methods=("lime",))


def test_the_bundle_explain_workflow_writes_json_and_figures(tmp_path):
    checkpoint = tmp_path / "pruned_stand_in.pth"
    torch.save(build_sam("tiny", seed=3).state_dict(), checkpoint)
    overrides = {
        "bundle_root": str(REPO / "bundle"),
        "output_dir": str(tmp_path / "out"),
        "prune_dir": str(tmp_path / "no_run"),
        "checkpoint": str(checkpoint),
        "reference_checkpoint": str(REPO / "bundle" / "models" / "medsam_tiny.pth"),
        "flow_checkpoint": None,
        "flow_settings": SMALL_FLOW,
        "max_images": 2,
        "explain_methods": ["transport", "ig_black", "occlusion"],
        "explain_settings#path_steps": 4,
        "explain_settings#points": 2,
        "explain_settings#deletion_steps": 4,
        "explain_settings#extra_removals": ["black"],
        "progress": False,
    }
    files = [str(CONFIGS / "train.yaml"), str(CONFIGS / "explain.yaml")]
    workflow = ConfigWorkflow(config_file=files, run_id="explain", workflow_type=None, **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    out = tmp_path / "out"
    report = json.loads((out / "explain.json").read_text())
    assert report["inputs"]["checkpoint"] == str(checkpoint)
    assert report["flow"]["datasets"] == ["hippocampus"] and report["flow"]["region_scale"] == 2.0
    assert len(report["images"]) == 2
    for image in report["images"]:
        assert set(image["methods"]) == {"transport", "ig_black", "occlusion"}
        for method, numbers in image["methods"].items():
            assert {"target_value", "deletion_auc", "insertion_auc", "deletion_auc_black", "seconds"} <= set(numbers)
            assert (numbers["completeness_gap"] is None) == (method == "occlusion")
        assert "difference_band_mass" in image["compression"]
        stem = image["name"]
        assert (out / "figures" / f"{stem}_methods.png").stat().st_size > 0
        assert (out / "figures" / f"{stem}_compression.png").stat().st_size > 0
    summary = report["summary"]
    assert summary["images"] + len(summary["left_out"]) == 2
    assert summary["transport"]["deletion_auc"]["n"] == summary["images"] > 0
    assert summary["path"]["field_mismatch"]["n"] == summary["images"]
    assert (out / "flow.pt").is_file()


def test_a_flow_trained_to_the_end_is_reused_not_retrained(tmp_path):
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    config = FlowConfig(size=16, channels=1, widths=(8, 16), groups=4)
    first = train_flow(images, config, steps=3, batch_size=4, checkpoint=tmp_path / "f.pt", progress=False)
    stamp = (tmp_path / "f.pt").stat().st_mtime_ns
    again = train_flow(images, config, steps=3, batch_size=4, checkpoint=tmp_path / "f.pt", progress=False)
    assert (tmp_path / "f.pt").stat().st_mtime_ns == stamp
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_the_embedded_default_explains_with_the_shipped_flow(tmp_path):
    """`python -m monai.bundle run explain` on a fresh checkout: the shipped model, sample and flow, offline."""
    from medcore_monai.bundle import run_workflow

    run_workflow(
        "explain",
        ("train.yaml", "explain.yaml"),
        output_dir=str(tmp_path),
        prune_dir=str(tmp_path / "no_pruning_run"),
        max_images=1,
        explain_methods=["transport"],
        progress=False,
    )
    report = json.loads((tmp_path / "explain.json").read_text())
    assert report["inputs"]["flow_checkpoint"].endswith("bundle/models/flow_hippocampus.pt")
    assert report["inputs"]["reference_checkpoint"] is None
    assert report["flow"]["datasets"] == ["hippocampus"] and report["flow"]["config"]["size"] == 64
    assert not (tmp_path / "flow.pt").exists()  # nothing trained
    image = report["images"][0]
    assert image["path"]["round_trip_error"] < 0.2 and image["path"]["field_mismatch"] < 0.05
    assert (tmp_path / "figures" / f"{image['name']}_methods.png").is_file()


def test_a_flow_of_other_data_stops_the_command_line_run_with_one_sentence(tmp_path):
    import subprocess
    import sys

    from medcore_monai.demo import write_synthetic_pairs

    write_synthetic_pairs(tmp_path / "polyps", 6, 64, seed=2)
    command = [
        sys.executable, "-m", "monai.bundle", "run", "explain",
        "--config_file", "['bundle/configs/train.yaml','bundle/configs/explain.yaml']",
        "--data_roots", f"['{tmp_path / 'polyps'}']", "--prune_dir", str(tmp_path / "none"),
        "--output_dir", str(tmp_path / "out"), "--progress", "false",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode != 0
    assert "error: the flow bundle/models/flow_hippocampus.pt was trained on ['hippocampus'], not on ['polyps']" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "explain.json").exists()
