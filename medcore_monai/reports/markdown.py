"""Human-readable ``report.md`` for a pruning run.

The report dictionary is the run's JSON report; every section is optional and is skipped when its key is
missing or empty, so partial runs (e.g. stopped before evaluation) still get a report:

* ``title`` (str) and ``config`` (dict, nested dicts are flattened to dotted keys);
* ``metrics[dataset]["before" | "after"] -> {dice, iou, bf1, hd95, hd95_region}``;
* ``cost["before" | "after"] -> {encoder_params, total_params, encoder_flops, total_flops}``;
* ``budgets``: list of ``{family, requested_sparsity, achieved_sparsity}``;
* ``timing``: ``{stage: seconds}``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import write_text_atomic

__all__ = ["render_report_markdown", "write_report_markdown"]

PathLike = str | os.PathLike

DEFAULT_TITLE = "MedCore pruning report"
METRIC_COLUMNS = (
    ("n", "n"),
    ("dice", "Dice"),
    ("iou", "IoU"),
    ("bf1", "BF1"),
    ("hd95", "HD95"),
    ("hd95_region", "HD95 region"),
)
COST_ROWS = (
    ("encoder_params", "Encoder parameters", 1e6, "M"),
    ("total_params", "Total parameters", 1e6, "M"),
    ("encoder_flops", "Encoder FLOPs", 1e9, "G"),
    ("total_flops", "Total FLOPs", 1e9, "G"),
)
# Distances are in pixels and need fewer digits than the [0, 1] overlap scores.
_DISTANCE_METRICS = {"hd95", "hd95_region"}
_MISSING = "–"
# Long lists in the config (per-block values, paths) would swamp the summary table.
_MAX_CELL_CHARS = 80


# --------------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """Text of one table cell: pipes escaped, newlines flattened, long values shortened."""
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= _MAX_CELL_CHARS else text[: _MAX_CELL_CHARS - 1] + "…"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _metric(value: Any, name: str) -> str:
    if not _is_number(value):
        return _MISSING
    if name == "n":
        return str(int(value))
    if not math.isfinite(value):
        return str(float(value))
    return f"{value:.2f}" if name in _DISTANCE_METRICS else f"{value:.4f}"


def _change(before: Any, after: Any, name: str) -> str:
    if name == "n" or not (_is_number(before) and _is_number(after)):
        return _MISSING
    delta = after - before
    return ("+" if delta >= 0 else "") + _metric(delta, name)


def _scaled(value: Any, scale: float, unit: str) -> str:
    return f"{value / scale:,.2f} {unit}" if _is_number(value) else _MISSING


def _percent(value: Any) -> str:
    return f"{100.0 * value:.1f} %" if _is_number(value) else _MISSING


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            items += _flatten(value, f"{name}.")
        else:
            items.append((name, value))
    return items


# --------------------------------------------------------------------------------------------------
# Sections (each returns [] when there is nothing to show)
# --------------------------------------------------------------------------------------------------


def _config_section(config: Any) -> list[str]:
    if not isinstance(config, Mapping) or not config:
        return []
    return ["## Run configuration", "", *_table(("Setting", "Value"), _flatten(config)), ""]


def _metric_rows(dataset: str, stages: Mapping[str, Any], names: list[str]) -> list[list[str]]:
    before, after = stages.get("before") or {}, stages.get("after") or {}
    rows = []
    for stage, values in (("before", before), ("after", after)):
        if values:
            rows.append([dataset, stage, *(_metric(values.get(n), n) for n in names)])
    if before and after:
        rows.append([dataset, "change", *(_change(before.get(n), after.get(n), n) for n in names)])
    return rows


def _metrics_section(metrics: Any) -> list[str]:
    if not isinstance(metrics, Mapping) or not metrics:
        return []
    per_dataset = {str(dataset): stages for dataset, stages in metrics.items() if isinstance(stages, Mapping)}
    present = {
        name
        for stages in per_dataset.values()
        for stage in stages.values()
        if isinstance(stage, Mapping)
        for name in stage
    }
    columns = [(key, label) for key, label in METRIC_COLUMNS if key in present]
    if not columns:
        return []
    names = [key for key, _ in columns]
    rows = [row for dataset, stages in per_dataset.items() for row in _metric_rows(dataset, stages, names)]
    if not rows:
        return []
    header = ("Dataset", "Stage", *(label for _, label in columns))
    units = {
        dataset: stage.get("units", "pixels")
        for dataset, stages in per_dataset.items()
        for stage in stages.values()
        if isinstance(stage, Mapping) and dataset != "macro"
    }
    unit_text = "; ".join(f"{d}: {u}" for d, u in units.items()) or "pixels"
    note = (
        f"Dice, IoU and BF1: higher is better; HD95: lower is better (units: {unit_text}). "
        "n: images (or volumes) evaluated."
    )
    return ["## Segmentation metrics", "", *_table(header, rows), "", note, ""]


def _evaluation_section(evaluation: Any) -> list[str]:
    if not isinstance(evaluation, Mapping):
        return []
    limit = evaluation.get("max_images")
    truncated = f", at most {limit} per dataset (max_eval_images)" if limit else ""
    empty = sum((evaluation.get("empty_masks") or {}).values())
    note = f" {empty} test masks were empty (scored; their box prompt was the whole image)." if empty else ""
    suspicious = sum((evaluation.get("suspicious_values") or {}).values())
    if suspicious:
        note += f" {suspicious} test images had suspicious values (CT-like under the MR rule; see the log)."
    return [f"Evaluated on the {evaluation.get('split', '?')} split{truncated}.{note}", ""]


def _cost_section(cost: Any) -> list[str]:
    if not isinstance(cost, Mapping):
        return []
    before, after = cost.get("before") or {}, cost.get("after") or {}
    rows = []
    for key, label, scale, unit in COST_ROWS:
        b, a = before.get(key), after.get(key)
        if b is None and a is None:
            continue
        change = f"{100.0 * (a - b) / b:+.1f} %" if _is_number(a) and _is_number(b) and b else _MISSING
        rows.append((label, _scaled(b, scale, unit), _scaled(a, scale, unit), change))
    if not rows:
        return []
    return ["## Parameters and FLOPs", "", *_table(("Quantity", "Before", "After", "Change"), rows), ""]


def _budget_section(budgets: Any) -> list[str]:
    if not isinstance(budgets, Sequence) or isinstance(budgets, str) or not budgets:
        return []
    rows = []
    for entry in budgets:
        if not isinstance(entry, Mapping):
            continue
        requested, achieved = entry.get("requested_sparsity"), entry.get("achieved_sparsity")
        # The allocator can fall short of the request (protected blocks, per-block minimum); say so.
        short = _is_number(requested) and _is_number(achieved) and achieved < requested - 1e-6
        rows.append(
            (entry.get("family", _MISSING), _percent(requested), _percent(achieved), "shortfall" if short else "")
        )
    if not rows:
        return []
    return ["## Sparsity budgets", "", *_table(("Family", "Requested", "Achieved", "Note"), rows), ""]


def _stages_section(stages: Any) -> list[str]:
    if not isinstance(stages, Sequence) or isinstance(stages, str) or not stages:
        return []
    rows = [
        (
            entry.get("stage", _MISSING),
            _scaled(entry.get("encoder_params"), 1e6, "M"),
            _scaled(entry.get("encoder_flops"), 1e9, "G"),
            *(_metric(entry.get(name), name) for name in ("dice", "bf1", "hd95")),
        )
        for entry in stages
        if isinstance(entry, Mapping)
    ]
    header = ("Stage", "Encoder params", "Encoder FLOPs", "Dice", "BF1", "HD95")
    return ["## Cascade stages (macro over datasets)", "", *_table(header, rows), ""]


def _leverage_section(leverage: Any) -> list[str]:
    summary = leverage.get("summary") if isinstance(leverage, Mapping) else None
    if not isinstance(summary, Mapping) or not _is_number(summary.get("blr95")):
        return []
    low, high = summary.get("ci_low"), summary.get("ci_high")
    interval = f" (bootstrap 95 % CI {low:.2f} to {high:.2f})" if _is_number(low) and _is_number(high) else ""
    return [
        "## Boundary leverage of the dense model",
        "",
        f"BLR95 = {summary['blr95']:.2f}{interval}: how much more a head-pruning step moves boundaries than an "
        "MLP-pruning step removing the same share of encoder parameters.",
        "",
    ]


def _format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{rest:04.1f}" if hours else f"{minutes}:{rest:04.1f} min"


def _timing_section(timing: Any) -> list[str]:
    if not isinstance(timing, Mapping):
        return []
    stages = [(str(stage), float(seconds)) for stage, seconds in timing.items() if _is_number(seconds)]
    if not stages:
        return []
    # a measured wall-clock total beats the sum of the stages (which misses the gaps between them)
    measured = dict(stages).pop("total", None)
    rows = [(stage, f"{seconds:.1f}", _format_seconds(seconds)) for stage, seconds in stages if stage != "total"]
    total = measured if measured is not None else sum(seconds for _, seconds in stages)
    rows.append(("**total**", f"{total:.1f}", _format_seconds(total)))
    return ["## Timing", "", *_table(("Stage", "Seconds", "Duration"), rows), ""]


def _relative_link(image: Path, folder: Path) -> str:
    """Link from the report's folder to ``image``, with forward slashes so it renders on every platform."""
    try:
        relative = os.path.relpath(Path(image).resolve(), folder.resolve())
    except ValueError:  # different drives on Windows: no relative path exists
        relative = str(Path(image).resolve())
    return Path(relative).as_posix().replace(" ", "%20")


def _images_section(images: Mapping[str, PathLike] | None, folder: Path) -> list[str]:
    if not images:
        return []
    lines = ["## Figures", ""]
    for caption, image in images.items():
        if not Path(image).is_file():
            lines += [f"*{caption}: image not found ({Path(image).name}).*", ""]
            continue
        lines += [f"### {caption}", "", f"![{caption}]({_relative_link(Path(image), folder)})", ""]
    return lines


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def render_report_markdown(
    report: Mapping[str, Any], folder: PathLike, images: Mapping[str, PathLike] | None = None
) -> str:
    """Markdown text of the report (see the module docstring for the expected keys).

    Args:
        report: Run report dictionary.
        folder: Folder the markdown file will live in (image links are relative to it).
        images: Caption -> image path, embedded in this order.

    Returns:
        The markdown text.
    """
    lines = [f"# {report.get('title') or DEFAULT_TITLE}", ""]
    lines += _config_section(report.get("config"))
    lines += _metrics_section(report.get("metrics"))
    lines += _evaluation_section(report.get("evaluation"))
    lines += _cost_section(report.get("cost"))
    lines += _budget_section(report.get("budgets"))
    lines += _stages_section(report.get("stages"))
    lines += _leverage_section(report.get("leverage"))
    lines += _timing_section(report.get("timing"))
    lines += _images_section(images, Path(folder))
    return "\n".join(lines).rstrip() + "\n"


def write_report_markdown(
    report: Mapping[str, Any], path: PathLike, images: Mapping[str, PathLike] | None = None
) -> Path:
    """Write ``report.md`` atomically (temporary file in the same folder, then ``os.replace``).

    Args:
        report: Run report dictionary; missing or empty sections are skipped.
        path: Output markdown path (parent folders are created).
        images: Caption -> PNG path, embedded with links relative to ``path``'s folder.

    Returns:
        The markdown path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(target, render_report_markdown(report, target.parent, images))
