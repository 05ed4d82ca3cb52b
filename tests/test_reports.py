"""Report figures (valid PNGs, atomic writes) and the markdown report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import image as mpl_image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from medcore_monai.reports import (
    plot_budget_curves,
    plot_kept_per_block,
    plot_leverage_histogram,
    plot_score_scatter,
    render_report_markdown,
    write_report_markdown,
)
from medcore_monai.reports.corruptions import heatmap_figure, plot_robustness_heatmap
from medcore_monai.reports.plots import _score_figure
from medcore_monai.transforms.corruptions import CORRUPTIONS

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


def _scatter_state(figure) -> tuple[np.ndarray | None, list[float] | None]:
    """(colour value per drawn point, colour bar ticks) of a score scatter figure."""
    points = figure.axes[0].collections[0]
    colour_bars = figure.axes[1:]
    ticks = list(colour_bars[0].get_yticks()) if colour_bars else None
    return points.get_array(), ticks


def _flat_scores(blocks: int, heads: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    zero = rng.lognormal(size=blocks * heads)
    return zero, zero * rng.lognormal(0, 0.3, size=zero.size)


def test_score_scatter_per_block_colours_are_block_indices():
    rng = np.random.default_rng(4)
    zero = [torch.as_tensor(rng.lognormal(size=3)) for _ in range(6)]
    reset = [z * 2 for z in zero]
    colours, ticks = _scatter_state(_score_figure(zero, reset, "t"))
    assert np.array_equal(colours, np.repeat(np.arange(6), 3))
    assert ticks == [0, 1, 2, 3, 4, 5]


def test_score_scatter_flat_with_heads_per_block_colours_by_block():
    # the prune engine's call: flat, block-major head scores of 12 blocks x 12 heads
    zero, reset = _flat_scores(12, 12)
    figure = _score_figure(zero, reset, "t", heads_per_block=12)
    colours, ticks = _scatter_state(figure)
    assert colours.min() == 0 and colours.max() == 11
    assert np.array_equal(colours, np.arange(144) // 12)
    assert ticks == list(range(12))
    assert figure.axes[1].get_ylabel() == "Encoder block"
    # discrete bar: one colour per block, boundaries half-way between block indices
    norm = figure.axes[0].collections[0].norm
    assert list(norm.boundaries) == [b - 0.5 for b in range(13)] and norm.Ncmap == 12


def test_score_scatter_flat_with_explicit_blocks_and_hidden_points():
    zero, reset = _flat_scores(3, 4)
    blocks = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2])  # pruned widths: blocks differ in size
    zero[-1] = 0.0  # hidden, but block 2 still has shown points
    colours, ticks = _scatter_state(_score_figure(zero, reset, "t", blocks=blocks))
    assert np.array_equal(colours, blocks[:-1])
    assert ticks == [0, 1, 2]


def test_score_scatter_many_blocks_tick_every_nth_block():
    zero, reset = _flat_scores(32, 2)
    _, ticks = _scatter_state(_score_figure(zero, reset, "t", heads_per_block=2))
    assert ticks == list(range(0, 32, 2))


def test_score_scatter_flat_without_blocks_has_no_colour_bar(tmp_path):
    zero, reset = _flat_scores(4, 3)
    figure = _score_figure(zero, reset, "t")
    assert len(figure.axes) == 1  # no colour bar claiming a block axis
    assert figure.axes[0].collections[0].get_array() is None
    _assert_valid_png(plot_score_scatter(zero, reset, tmp_path / "flat.png"))
    _assert_valid_png(plot_score_scatter(zero, reset, tmp_path / "blocks.png", heads_per_block=3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heads_per_block": 5}, "do not split"),
        ({"heads_per_block": 0}, "do not split"),
        ({"blocks": np.zeros(11)}, "one non-negative integer"),
        ({"blocks": np.full(12, 0.5)}, "one non-negative integer"),
        ({"blocks": np.zeros(12), "heads_per_block": 3}, "not both"),
    ],
)
def test_score_scatter_rejects_inconsistent_blocks(tmp_path, kwargs, message):
    zero, reset = _flat_scores(4, 3)
    with pytest.raises(ValueError, match=message):
        plot_score_scatter(zero, reset, tmp_path / "bad.png", **kwargs)
    assert not (tmp_path / "bad.png").exists()


def test_score_scatter_rejects_blocks_with_per_block_scores_and_mixed_forms(tmp_path):
    scores = np.ones((2, 3))
    with pytest.raises(ValueError, match="per-block scores carry"):
        plot_score_scatter(scores, scores, tmp_path / "bad.png", heads_per_block=3)
    with pytest.raises(ValueError, match="both be flat"):
        plot_score_scatter(scores.ravel(), scores, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="same size"):
        plot_score_scatter(np.ones(3), np.ones(4), tmp_path / "bad.png")


def _robustness_table(corruptions: int, severities: tuple[int, ...]) -> dict[str, dict[int, float]]:
    rng = np.random.default_rng(5)
    return {name: {s: float(rng.uniform(0.3, 0.9)) for s in severities} for name in CORRUPTIONS[:corruptions]}


def _drawn_inside_figure(figure) -> bool:
    """True when everything drawn (suptitle, labels, drawn tick labels, colour bar) lies inside the figure."""
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)  # runs constrained layout
    drawn = figure.get_tightbbox(renderer)  # inches, over the artists actually drawn
    width, height = figure.get_size_inches()
    slack = 1.0 / figure.dpi  # one pixel of rounding
    return drawn.x0 >= -slack and drawn.y0 >= -slack and drawn.x1 <= width + slack and drawn.y1 <= height + slack


@pytest.mark.parametrize(
    ("corruptions", "severities", "min_size"),
    [(12, (1, 3, 5), (700, 600)), (1, (3,), (650, 250))],
)
def test_robustness_heatmap_size_scales_with_the_table(tmp_path, corruptions, severities, min_size):
    table = _robustness_table(corruptions, severities)
    out = plot_robustness_heatmap(table, tmp_path / "sub" / "heatmap.png", clean=0.862)
    with Image.open(out) as png:
        width, height = png.size
    assert width >= min_size[0] and height >= min_size[1]
    assert _drawn_inside_figure(heatmap_figure(table, clean=0.862))


def test_robustness_heatmap_grows_with_rows_and_columns(tmp_path):
    sizes = {}
    for shape in ((3, (1,)), (3, (1, 2, 3, 4, 5)), (12, (1,))):
        out = plot_robustness_heatmap(_robustness_table(*shape), tmp_path / f"{shape[0]}x{len(shape[1])}.png")
        with Image.open(out) as png:
            sizes[shape[0], len(shape[1])] = png.size
    assert sizes[3, 5][0] > sizes[3, 1][0] and sizes[3, 5][1] == sizes[3, 1][1]
    assert sizes[12, 1][1] > sizes[3, 1][1] and sizes[12, 1][0] == sizes[3, 1][0]


def test_robustness_heatmap_long_title_is_wrapped_inside_the_image():
    title = "Dice of the pruned tiny MedSAM under RobustMedSAM corruptions on the hippocampus sample, all severities"
    figure = heatmap_figure(_robustness_table(1, (3,)), title=title)
    assert "\n" in figure.get_suptitle()
    assert _drawn_inside_figure(figure)


def test_robustness_heatmap_rejects_an_empty_table(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_robustness_heatmap({}, tmp_path / "empty.png")


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
