"""Checked bundle configuration: unknown keys fail, command-line values get the type of their default.

MONAI merges every config file and ``--key value`` override into one dictionary and never complains about a key
that nothing reads, so a typo (``--head_sparsty 0.2``) silently keeps the default. Fire, which parses the command
line, turns ``--leverage false`` into the *string* ``"false"``, which Python treats as true. The bundle's
``initialize`` section therefore starts with :func:`check_bundle_keys`, which compares the merged configuration of
the running workflow with the keys the bundle's own config files define:

* a top-level key no bundle config file defines fails, naming the key and the closest known keys;
* a value whose default is a boolean or a number is converted from its command-line spelling (``false``,
  ``True``, ``1e-5``) or refused with the expected type;
* ``null`` or ``None`` becomes None (``--flow_checkpoint null``).

Nested ids (``train#trainer#max_epochs``) are checked by MONAI itself: a misspelt argument of a component fails
when the component is instantiated.
"""

from __future__ import annotations

import difflib
import inspect
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, install_short_errors
from .logs import install_log_filters

__all__ = [
    "ConfigError",
    "bundle_defaults",
    "check_bundle_keys",
    "check_config_values",
    "check_inputs",
    "check_prune_inputs",
    "VOLATILE_SETTINGS",
    "fingerprint_differences",
    "input_problems",
    "raise_problems",
    "run_fingerprint",
    "settings_snapshot",
]

_RESERVED = {"_meta_", "_requires_"}
_EXPRESSION_PREFIXES = ("$", "@", "%")
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
_NULL = {"null", "none"}  # YAML's and Python's spellings of "no value" on the command line


def _read(path: Path) -> Mapping[str, Any]:
    text = path.read_text()
    content = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return content if isinstance(content, Mapping) else {}


def bundle_defaults(config_dir: str | Path) -> dict[str, Any]:
    """Top-level keys of every workflow config in ``config_dir`` with their first literal default.

    ``metadata.json`` and ``logging.conf`` are not workflow configs; ``+key`` (MONAI's list-merge syntax) counts
    as ``key``.
    """
    defaults: dict[str, Any] = {}
    for path in sorted(Path(config_dir).glob("*")):
        if path.suffix not in (".yaml", ".yml", ".json") or path.name == "metadata.json":
            continue
        for key, value in _read(path).items():
            name = str(key).lstrip("+")
            # a scalar default types the setting even if another file uses the key otherwise (``leverage`` is a
            # prune switch and the leverage workflow's run section)
            if name not in defaults or (_is_scalar(value) and not _is_scalar(defaults[name])):
                defaults[name] = value
    return defaults


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float))


def _is_expression(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(_EXPRESSION_PREFIXES)


def _active_workflow() -> Any | None:
    """The ``monai.bundle.ConfigWorkflow`` whose ``initialize`` is running this check, if any.

    MONAI evaluates ``$`` expressions without handing them the parser; the workflow is found on the call stack.
    """
    from monai.bundle import ConfigWorkflow

    for frame_info in inspect.stack():
        candidate = frame_info.frame.f_locals.get("self")
        if isinstance(candidate, ConfigWorkflow):
            return candidate
    return None


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _converted(key: str, value: Any, default: Any) -> Any:
    """``value`` in the type of ``default`` (bool, int, float) or a :class:`ConfigError`; ``null``/``None`` is None."""
    if isinstance(value, str) and value.strip().lower() in _NULL:
        return None
    if value is None or _is_expression(value) or not _is_scalar(default) or isinstance(value, (list, dict)):
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE and not isinstance(value, float):
            return text in _TRUE
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value) if isinstance(default, float) else value
        try:
            number = float(str(value))
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(default, int):
            if not number.is_integer():
                raise ConfigError(f"{key} must be an integer, got {value!r}")
            return int(number)
        return number
    return value


def check_config_values(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``config``'s top-level keys against ``defaults``; return the values that need converting.

    Raises:
        ConfigError: naming every unknown key (with suggestions) and every value of the wrong type.
    """
    problems, changes = [], {}
    for key, value in config.items():
        if key in _RESERVED:
            continue
        if key not in defaults:
            problems.append(f"unknown key {key!r}{_suggest(key, defaults)}")
            continue
        try:
            converted = _converted(key, value, defaults[key])
        except ConfigError as error:
            problems.append(str(error))
            continue
        if type(converted) is not type(value) or converted != value:
            changes[key] = converted
    if problems:
        raise ConfigError("invalid bundle settings:\n  " + "\n  ".join(problems))
    return changes


def check_bundle_keys(workflow: Any | None = None) -> dict[str, Any]:
    """Check the running bundle's settings (see the module docstring) and convert command-line spellings.

    Args:
        workflow: the ``ConfigWorkflow``; by default the one whose ``initialize`` calls this.

    Returns:
        The converted settings (empty when nothing needed converting, or outside a bundle run).

    Raises:
        ConfigError: for unknown keys or values of the wrong type.
    """
    install_short_errors()
    install_log_filters()
    workflow = workflow or _active_workflow()
    if workflow is None:
        return {}
    _check_run_section(workflow)
    changes = check_config_values(workflow.parser.config, bundle_defaults(workflow.config_root_path))
    for key, value in changes.items():
        workflow.parser[key] = value
    return changes


def _check_run_section(workflow: Any) -> None:
    """The workflow's section must still be a list of steps: a setting of the same name must not replace it.

    ``leverage`` is both a prune setting and the leverage workflow's section; a preset listed after
    ``leverage.yaml`` that sets ``leverage: true`` would otherwise turn the run into a silent no-op.
    """
    run_id = getattr(workflow, "run_id", None)
    section = workflow.parser.config.get(run_id, [])
    if not isinstance(section, list):
        raise ConfigError(
            f"the workflow section {run_id!r} was replaced by the setting {run_id}: {section!r} (from a preset or "
            f"the command line); list presets before the workflow's own config file, or drop that setting"
        )


def _json_safe(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_json_safe(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _json_safe(v) for k, v in value.items())
    return False


def settings_snapshot(workflow: Any | None = None) -> dict[str, Any]:
    """The running bundle's top-level settings with their resolved values (components and sections left out).

    Reports record this, so a result can always be traced to the settings that produced it.
    """
    workflow = workflow or _active_workflow()
    if workflow is None:
        return {}
    snapshot: dict[str, Any] = {}
    for key, raw in workflow.parser.config.items():
        if key in _RESERVED or key in ("imports",) or isinstance(raw, (Mapping, list)) and _has_component(raw):
            continue
        try:
            value = workflow.parser.get_parsed_content(key)
        except Exception:  # noqa: BLE001 - a setting that cannot be resolved alone is not a plain setting
            continue
        value = str(value) if hasattr(value, "type") and type(value).__name__ == "device" else value
        if _json_safe(value):
            snapshot[key] = value
    return snapshot


def _has_component(raw: Any) -> bool:
    if isinstance(raw, Mapping):
        return "_target_" in raw or any(_has_component(v) for v in raw.values())
    if isinstance(raw, list):
        return any(_has_component(v) for v in raw) or any(isinstance(v, str) and v.startswith("$") for v in raw)
    return False


def input_problems(files: Mapping[str, str | None], data_roots: Any = None) -> list[str]:
    """What is wrong with a workflow's input files and data roots, every problem at once.

    Args:
        files: ``{setting name: path}`` of required files; ``None`` paths are not checked.
        data_roots: dataset folders or datalists (one path or a list); ``None`` when the workflow reads no data.
    """
    found = [f"{key} not found: {path}" for key, path in files.items() if path and not Path(str(path)).is_file()]
    if data_roots is not None:
        roots = [data_roots] if isinstance(data_roots, str) else list(data_roots)
        found += ["data_roots is empty"] if not roots else []
        found += [f"data root not found: {root}" for root in roots if not Path(str(root)).exists()]
    return found


def raise_problems(problems: Iterable[str], action: str | None = None) -> None:
    """Fail before any work with one :class:`ConfigError` listing every problem (nothing when there are none)."""
    found = [p for p in problems if p]
    if found:
        raise ConfigError(f"cannot start{f' {action}' if action else ''}:\n  " + "\n  ".join(found))


def check_inputs(files: Mapping[str, str | None], data_roots: Any = None, problems: Iterable[str] = ()) -> None:
    """Fail before any work with one message listing every missing input file and data root.

    Args:
        files: ``{setting name: path}``; ``None`` paths are not checked.
        data_roots: data roots to check (``None``: none).
        problems: further problems found by the caller (e.g. a score that needs ``sam_ckpt``).

    Raises:
        ConfigError: naming every problem.
    """
    raise_problems([*input_problems(files, data_roots), *problems])


def check_prune_inputs(
    medsam_ckpt: str | None,
    sam_ckpt: str | None,
    score: str,
    data_roots: Any,
    mbconv_sparsity: float = 0.0,
    recovery_images: Any = None,
) -> None:
    """:func:`check_inputs` for a pruning run: the scores ``dual`` and ``reset`` need a parent (``sam_ckpt``).

    The parent is the general-domain model the medical one was fine-tuned from, with the same architecture (the
    reset intervention compares them parameter by parameter). Without one (no parent of LiteMedSAM is available
    offline) the MedCore score is ``zero`` with boundary-aware Fisher. ``mbconv_sparsity`` needs a model with
    MBConv blocks (LiteMedSAM's TinyViT); ``recovery_images`` is null or a positive number of training images.
    """
    needs_sam = score in ("dual", "reset")
    problem = (
        f"score {score!r} needs sam_ckpt: the general-domain model the medical one was fine-tuned from, with the "
        "same architecture; without one use score zero (boundary-aware Fisher of removing each group)"
    )
    files = {"medsam_ckpt": medsam_ckpt, "sam_ckpt": sam_ckpt if needs_sam else None}
    missing = [] if medsam_ckpt else ["medsam_ckpt is not set"]
    problems = missing + ([problem] if needs_sam and not sam_ckpt else [])
    if needs_sam and not problems and not input_problems(files):
        problems += architecture_problems(medsam_ckpt, sam_ckpt)
    if mbconv_sparsity and medsam_ckpt and not input_problems({"medsam_ckpt": medsam_ckpt}):
        problems += mbconv_problems(medsam_ckpt, mbconv_sparsity)
    problems += recovery_images_problems(recovery_images)
    check_inputs(files, data_roots, problems)


def recovery_images_problems(recovery_images: Any) -> list[str]:
    """Why ``recovery_images`` is not null or a positive whole number of training images per dataset, if it isn't."""
    whole = isinstance(recovery_images, int) and not isinstance(recovery_images, bool)
    if recovery_images is None or (whole and recovery_images >= 1):
        return []
    return [
        f"recovery_images must be null (recover on the calibration images) or a positive number of training images "
        f"per dataset, got {recovery_images!r}"
    ]


def mbconv_problems(medsam_ckpt: str, mbconv_sparsity: float) -> list[str]:
    """Why ``mbconv_sparsity`` cannot apply to ``medsam_ckpt`` (its encoder has no MBConv blocks), if it can't."""
    from .networks import CheckpointError, TinyViTConfig
    from .networks.build import checkpoint_config
    from .networks.checkpoint import checkpoint_manifest, extract_state_dict, read_checkpoint
    from .networks.conv_groups import no_mbconv_blocks_message

    try:
        obj = read_checkpoint(medsam_ckpt)
        config = checkpoint_config(
            extract_state_dict(obj, source=medsam_ckpt), checkpoint_manifest(obj), "auto", medsam_ckpt
        )
    except CheckpointError as err:
        return [str(err)]
    return [] if isinstance(config, TinyViTConfig) else [no_mbconv_blocks_message(mbconv_sparsity)]


def architecture_problems(medsam_ckpt: str, sam_ckpt: str) -> list[str]:
    """Why ``sam_ckpt`` cannot be the parent of ``medsam_ckpt`` (another family or dense architecture), if it can't."""
    from dataclasses import replace

    from .networks import CheckpointError
    from .networks.build import checkpoint_config
    from .networks.checkpoint import checkpoint_manifest, extract_state_dict, read_checkpoint

    def dense(path: str):
        obj = read_checkpoint(path)
        config = checkpoint_config(extract_state_dict(obj, source=path), checkpoint_manifest(obj), "auto", path)
        return replace(config.dense(), name="")

    try:
        medical, parent = dense(medsam_ckpt), dense(sam_ckpt)
    except CheckpointError as err:
        return [str(err)]
    if medical != parent:
        return [
            f"sam_ckpt {sam_ckpt} is not a parent of medsam_ckpt: their architectures differ "
            f"({type(parent).__name__} vs {type(medical).__name__}); the reset intervention compares them parameter "
            "by parameter. Give the model the medical one was fine-tuned from, or use score zero"
        ]
    return []


#: Settings that do not change what a run computes: they never stop a run folder from resuming.
VOLATILE_SETTINGS = frozenset(
    {"progress", "device", "output_dir", "tensorboard_dir", "resume", "bundle_root", "dataset_dir", "ckpt_dir"}
)


def run_fingerprint(files: Mapping[str, str | None] | None = None, workflow: Any | None = None) -> dict[str, Any]:
    """What identifies a run's result: its effective settings and the SHA-256 of its input files.

    A run folder resumes only when this matches (see :class:`medcore_monai.handlers.TrainingCheckpoint`).

    Args:
        files: ``{setting: path}`` of input files (checkpoints) whose contents, not names, must match.
        workflow: the running ``ConfigWorkflow`` (default: found on the call stack).
    """
    from .networks import file_sha256

    settings = {k: v for k, v in settings_snapshot(workflow).items() if k not in VOLATILE_SETTINGS}
    hashes = {k: file_sha256(p) for k, p in (files or {}).items() if p and Path(str(p)).is_file()}
    return {"settings": settings, "inputs": hashes}


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`run_fingerprint` results (empty when they match)."""
    out = []
    for part in ("settings", "inputs"):
        old, new = dict(saved.get(part, {})), dict(current.get(part, {}))
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                what = "contents of " if part == "inputs" else ""
                out.append(f"{what}{key}: {_short(old.get(key, '<unset>'))} -> {_short(new.get(key, '<unset>'))}")
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
