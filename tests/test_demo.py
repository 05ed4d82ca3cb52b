"""The README's default job (`python -m medcore_monai.demo`) runs end to end and reports consistent numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medcore_monai.demo import BUNDLE_OUTPUT_DIR, DEFAULT_OUTPUT_DIR, build_parser, check_output_dir, main


def _run(tmp_path, *extra):
    out = tmp_path / "demo"
    assert main(["--output-dir", str(out), "--num-images", "2", "--quiet", *extra]) == 0
    return json.loads((out / "report.json").read_text()), out


def test_demo_on_synthetic_images(tmp_path):
    report, out = _run(tmp_path, "--head-sparsity", "0.34", "--mlp-sparsity", "0.5")
    assert (out / "compact_model.pth").is_file()
    assert report["max_abs_diff_masked_vs_compact"] <= 1e-5
    # float rounding may flip the odd pixel whose logit is ~0, nothing more
    assert report["metrics"]["compact"] == pytest.approx(report["metrics"]["masked"], rel=1e-3)
    params, flops = report["encoder_params"], report["encoder_flops"]
    assert params["compact"] < params["dense"] and flops["compact"] < flops["dense"]
    heads, channels = report["budgets"]
    assert heads["achieved"] == round(0.34 * 18) and channels["achieved"] == round(0.5 * 6 * 768)
    assert report["fisher_samples"] == {"used": 2, "skipped": 0}


def test_demo_default_folder_is_its_own():
    default = build_parser().parse_args([]).output_dir
    assert default == DEFAULT_OUTPUT_DIR == "outputs/model_layer_demo"
    assert default != BUNDLE_OUTPUT_DIR == "outputs/demo"


def test_demo_writes_to_its_default_folder_and_not_the_bundle_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--num-images", "1", "--quiet"]) == 0
    assert (tmp_path / "outputs" / "model_layer_demo" / "report.json").is_file()
    assert (tmp_path / "outputs" / "model_layer_demo" / "compact_model.pth").is_file()
    assert not (tmp_path / "outputs" / "demo").exists()


@pytest.mark.parametrize("spelling", ["outputs/demo", "outputs/demo/", "./outputs/x/../demo"])
def test_demo_refuses_the_bundle_job_folder(tmp_path, monkeypatch, capsys, spelling):
    monkeypatch.chdir(tmp_path)
    bundle_job = tmp_path / "outputs" / "demo"
    bundle_job.mkdir(parents=True)
    (bundle_job / "report.json").write_text('{"bundle": true}')
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", spelling, "--num-images", "1", "--quiet"])
    assert exit_info.value.code == 2
    assert "bundle's default job folder" in capsys.readouterr().err
    assert sorted(p.name for p in bundle_job.iterdir()) == ["report.json"]
    assert (bundle_job / "report.json").read_text() == '{"bundle": true}'


def test_check_output_dir_accepts_other_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_dir("outputs/demo_b") == Path("outputs/demo_b")
    with pytest.raises(ValueError, match="outputs/demo"):
        check_output_dir(tmp_path / "outputs" / "demo")


@pytest.mark.integration
def test_demo_on_kvasir(tmp_path, kvasir_root):
    report, _ = _run(tmp_path, "--data-root", str(kvasir_root))
    assert report["data"].endswith("(2 pairs)")
    for metrics in report["metrics"].values():
        assert metrics["n"] == 2 and 0.0 <= metrics["dice"] <= 1.0 and metrics["hd95"] >= 0.0
