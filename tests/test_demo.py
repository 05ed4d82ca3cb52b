"""The README's default job (`python -m medcore_monai.demo`) runs end to end and reports consistent numbers."""

from __future__ import annotations

import json

import pytest

from medcore_monai.demo import main


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


@pytest.mark.integration
def test_demo_on_kvasir(tmp_path, kvasir_root):
    report, _ = _run(tmp_path, "--data-root", str(kvasir_root))
    assert report["data"].endswith("(2 pairs)")
    for metrics in report["metrics"].values():
        assert metrics["n"] == 2 and 0.0 <= metrics["dice"] <= 1.0 and metrics["hd95"] >= 0.0
