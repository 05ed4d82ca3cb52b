"""Report figures (valid PNGs, atomic writes) and the markdown report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import image as mpl_image

from medcore_monai.reports import (
    plot_budget_curves,
    plot_kept_per_block,
    plot_leverage_histogram,
    plot_score_scatter,
    render_report_markdown,
    write_report_markdown,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_valid_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = mpl_image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.std() > 0  # something was drawn


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def test_plot_kept_per_block(tmp_path):
    out = plot_kept_per_block([12, 10, 6, 12], 12, [3072, 2000, 1024, 3072], [3072] * 4, tmp_path / "kept.png")
    assert out == tmp_path / "kept.png"
    _assert_valid_png(out)
    assert _no_temp_files(tmp_path)


def test_plot_kept_per_block_rejects_mismatched_totals(tmp_path):
    with pytest.raises(ValueError, match="per block"):
        plot_kept_per_block([1, 2], [3, 3, 3], [4, 4], 8, tmp_path / "bad.png")
    assert not list(tmp_path.iterdir())


def test_plot_leverage_histogram_creates_parent_and_handles_zeros(tmp_path):
    rng = np.random.default_rng(0)
    head = np.concatenate([rng.lognormal(0.5, 1.0, 2000), np.zeros(10)])
    mlp = torch.as_tensor(rng.lognormal(-0.5, 1.0, 3000))
    out = plot_leverage_histogram(head, mlp, tmp_path / "figs" / "leverage.png", blr95=2.887, tau=3)
    _assert_valid_png(out)
    assert _no_temp_files(out.parent)


def test_plot_leverage_histogram_empty_family(tmp_path):
    _assert_valid_png(plot_leverage_histogram(np.array([1.0, 2.0]), np.array([]), tmp_path / "one.png"))


def _budget_rows() -> list[dict]:
    rows = []
    for method, shift in (("medcore", 0.0), ("magnitude", -0.05)):
        for params, flops in ((89e6, 370e9), (60e6, 250e9), (36e6, 150e9)):
            quality = params / 89e6
            rows.append(
                {
                    "method": method,
                    "encoder_params": params,
                    "encoder_flops": flops,
                    "dice": 0.9 * quality + shift,
                    "bf1": 0.6 * quality + shift,
                    "hd95": 20 / quality,
                    "bf1_std": 0.02,
                }
            )
    rows.append({"method": "broken", "encoder_params": 50e6})  # no metrics: left out of every panel
    return rows


@pytest.mark.parametrize("x", ["encoder_params", "encoder_flops"])
def test_plot_budget_curves(tmp_path, x):
    out = plot_budget_curves(_budget_rows(), tmp_path / f"budget_{x}.png", x=x, metrics=("bf1", "hd95", "dice"))
    _assert_valid_png(out)
    assert _no_temp_files(tmp_path)


def test_plot_score_scatter_with_block_list_and_non_positive(tmp_path):
    rng = np.random.default_rng(1)
    zero = [torch.as_tensor(rng.lognormal(size=12)) for _ in range(4)]
    reset = [z * torch.as_tensor(rng.lognormal(0, 0.3, size=12)) for z in zero]
    zero[0][0] = 0.0  # cannot be shown on a log axis
    out = plot_score_scatter(zero, reset, tmp_path / "scores.png")
    _assert_valid_png(out)
    assert _no_temp_files(tmp_path)


def test_plot_score_scatter_matrix_and_size_check(tmp_path):
    scores = np.abs(np.random.default_rng(2).normal(size=(3, 12))) + 0.1
    _assert_valid_png(plot_score_scatter(scores, scores * 2, tmp_path / "matrix.png"))
    with pytest.raises(ValueError, match="per-block sizes"):
        plot_score_scatter([np.ones(3)], [np.ones(4)], tmp_path / "bad.png")


def test_plot_overwrites_existing_file(tmp_path):
    target = tmp_path / "kept.png"
    target.write_bytes(b"old")
    plot_kept_per_block([1, 2], 2, [3, 4], 4, target)
    _assert_valid_png(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.png"]


def test_plots_leave_no_open_figures(tmp_path):
    from matplotlib import pyplot as plt

    before = plt.get_fignums()
    plot_kept_per_block([1, 2], 2, [3, 4], 4, tmp_path / "a.png")
    plot_leverage_histogram([1.0, 2.0], [0.5], tmp_path / "b.png")
    assert plt.get_fignums() == before


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _full_report() -> dict:
    return {
        "title": "MedSAM pruning on Kvasir",
        "config": {"head_sparsity": 0.5, "mlp_sparsity": 0.7, "fisher": {"samples": 128, "loss": "bd|dice"}},
        "metrics": {
            "kvasir": {
                "before": {"dice": 0.91234, "iou": 0.85, "bf1": 0.5321, "hd95": 21.29, "hd95_region": 12.5},
                "after": {"dice": 0.90111, "iou": 0.84, "bf1": 0.5012, "hd95": 23.456, "hd95_region": 13.0},
            },
            "clinicdb": {"after": {"dice": 0.88, "bf1": 0.49}},
        },
        "cost": {
            "before": {"encoder_params": 89_670_000, "total_params": 93_735_000, "encoder_flops": 972e9},
            "after": {"encoder_params": 35_868_000, "total_params": 39_933_000, "encoder_flops": 404e9},
        },
        "budgets": [
            {"family": "heads", "requested_sparsity": 0.5, "achieved_sparsity": 0.5},
            {"family": "mlp", "requested_sparsity": 0.95, "achieved_sparsity": 0.792},
        ],
        "timing": {"fisher": 12.34, "scoring": 1.5, "recovery": 3723.0},
    }


def test_markdown_contains_tables_values_and_links(tmp_path):
    figure = tmp_path / "figures" / "kept.png"
    plot_kept_per_block([1, 2], 2, [3, 4], 4, figure)
    out = write_report_markdown(_full_report(), tmp_path / "report.md", images={"Kept width per block": figure})
    assert out == tmp_path / "report.md"
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# MedSAM pruning on Kvasir\n")
    # Config, flattened, with the pipe escaped.
    assert "| fisher.samples | 128 |" in text
    assert "bd\\|dice" in text
    # Metrics: before/after/change rows; clinicdb has only "after" and only the columns it has.
    assert "| Dataset | Stage | Dice | IoU | BF1 | HD95 | HD95 region |" in text
    assert "| kvasir | before | 0.9123 | 0.8500 | 0.5321 | 21.29 | 12.50 |" in text
    assert "| kvasir | change | -0.0112 | -0.0100 | -0.0309 | +2.17 | +0.50 |" in text
    assert "| clinicdb | after | 0.8800 | – | 0.4900 | – | – |" in text
    assert "clinicdb | change" not in text
    # Cost with relative change; total FLOPs absent from both stages -> no row.
    assert "| Encoder parameters | 89.67 M | 35.87 M | -60.0 % |" in text
    assert "| Encoder FLOPs | 972.00 G | 404.00 G | -58.4 % |" in text
    assert "Total FLOPs" not in text
    # Budgets with the shortfall flagged; timing with a total.
    assert "| mlp | 95.0 % | 79.2 % | shortfall |" in text
    assert "| heads | 50.0 % | 50.0 % |  |" in text
    assert "| recovery | 3723.0 | 1:02:03.0 |" in text
    assert "| **total** | 3736.8 |" in text
    # Image embedded with a link relative to the report's folder.
    assert "![Kept width per block](figures/kept.png)" in text
    assert _no_temp_files(tmp_path)


def test_markdown_skips_missing_sections(tmp_path):
    out = write_report_markdown({"metrics": {}, "budgets": [], "cost": {"before": {}}}, tmp_path / "r.md", images={})
    text = out.read_text(encoding="utf-8")
    assert text == "# MedCore pruning report\n"
    for heading in ("Run configuration", "Segmentation metrics", "Parameters", "Sparsity", "Timing", "Figures"):
        assert heading not in text


def test_markdown_partial_report_and_missing_image(tmp_path):
    report = {"timing": {"fisher": 4.0, "note": "n/a"}, "cost": {"after": {"encoder_params": 1_000_000}}}
    text = render_report_markdown(report, tmp_path, images={"Leverage": tmp_path / "nope.png"})
    assert "## Timing" in text and "| fisher | 4.0 | 4.0 s |" in text and "note" not in text
    assert "| Encoder parameters | – | 1.00 M | – |" in text
    assert "image not found (nope.png)" in text and "![Leverage]" not in text
    assert "## Segmentation metrics" not in text


def test_markdown_link_to_image_outside_report_folder(tmp_path):
    image = tmp_path / "plots" / "budget curves.png"
    plot_kept_per_block([1], 1, [1], 1, image)
    text = render_report_markdown({}, tmp_path / "reports" / "run1", images={"Budget": image})
    assert "![Budget](../../plots/budget%20curves.png)" in text


def test_markdown_stages_leverage_and_measured_total(tmp_path):
    report = {
        "stages": [
            {"stage": "dense", "encoder_params": 3_520_576, "encoder_flops": 2.16e9, "dice": 0.5, "bf1": 0.4}
            | {"hd95": 9.0},
            {"stage": "after heads", "encoder_params": 3_076_480, "encoder_flops": 1.74e9, "dice": 0.49, "bf1": 0.41},
        ],
        "leverage": {"summary": {"blr95": 4.2, "ci_low": 2.5, "ci_high": 5.75}},
        "timing": {"load": 1.0, "cascade": 10.0, "total": 12.5},
    }
    text = write_report_markdown(report, tmp_path / "report.md").read_text()
    assert "| dense | 3.52 M | 2.16 G | 0.5000 | 0.4000 | 9.00 |" in text
    assert "| after heads | 3.08 M | 1.74 G | 0.4900 | 0.4100 | – |" in text
    assert "BLR95 = 4.20 (bootstrap 95 % CI 2.50 to 5.75)" in text
    # the measured total wins over the sum of the stages, and appears once
    assert "| **total** | 12.5 |" in text and "| total |" not in text
