"""Run reports: PNG figures and a readable ``report.md``."""

from .markdown import render_report_markdown, write_report_markdown
from .plots import (
    plot_budget_curves,
    plot_kept_per_block,
    plot_leverage_histogram,
    plot_score_scatter,
    save_figure_atomic,
)

__all__ = [
    "plot_budget_curves",
    "plot_kept_per_block",
    "plot_leverage_histogram",
    "plot_score_scatter",
    "render_report_markdown",
    "save_figure_atomic",
    "write_report_markdown",
]
