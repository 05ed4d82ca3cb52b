"""A rectified-flow velocity field over a dataset's images: the transport that explanation paths follow.

Time runs from ``t = 0`` (Gaussian noise) to ``t = 1`` (data), so the flow carries a noise sample to an image along
``dx/dt = v(x, t)``. The network is MONAI's ``DiffusionModelUNet`` and the training objective is MONAI's
``RFlowScheduler`` (its timesteps count down from noise, ``timestep = (1 - t) * 1000``); reflow rounds retrain on
(noise, generated image) pairs, which straightens the paths.

Training is a plain loop on an in-memory tensor of images, seeded per step (the noise, the timesteps and the
batch of step ``k`` depend only on the seed and ``k``), so a run resumed from its checkpoint ends with the same
weights as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..files import atomic_torch_save

__all__ = ["FlowConfig", "VelocityField", "train_flow", "save_flow", "load_flow", "flow_input_problems"]

logger = logging.getLogger(__name__)

_NUM_TIMESTEPS = 1000
_FORMAT = "medcore-flow-1"


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """Shape of the flow's images and of its velocity UNet.

    Args:
        size: side of the square working images (flow space).
        channels: image channels (1 for grey scans, 3 for colour).
        widths: UNet channels per level (each level halves the resolution).
        res_blocks: residual blocks per level.
        groups: group-norm groups (must divide every width).
    """

    size: int = 64
    channels: int = 3
    widths: tuple[int, ...] = (32, 64, 64)
    res_blocks: int = 1
    groups: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        problems = []
        if self.channels not in (1, 3):
            problems.append(f"channels must be 1 or 3, got {self.channels}")
        downsampling = 2 ** (len(self.widths) - 1)
        if self.size < 8 or self.size % downsampling:
            problems.append(
                f"size {self.size} must be >= 8 and divisible by {downsampling} ({len(self.widths)} levels)"
            )
        if any(w % self.groups for w in self.widths):
            problems.append(f"every width in {self.widths} must be divisible by groups={self.groups}")
        if problems:
            raise ConfigError("invalid flow configuration: " + "; ".join(problems))


class VelocityField(nn.Module):
    """``v(x, t)``: the flow's velocity at images ``x`` ``[B, C, S, S]`` and times ``t`` in [0, 1] (1 = data)."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        self.config = config
        self.metadata: dict[str, Any] = {}  # what it was trained on (datasets, image count), saved with it
        self.training_record: dict[str, Any] = {}  # how: settings and wall time, when loaded from a training checkpoint
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=config.channels,
            out_channels=config.channels,
            channels=config.widths,
            attention_levels=(False,) * len(config.widths),
            num_res_blocks=config.res_blocks,
            num_head_channels=config.widths[-1],
            norm_num_groups=config.groups,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Velocity ``[B, C, S, S]`` at images ``x`` and times ``t`` (a float or one per image)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        return self.unet(x, (1.0 - t) * _NUM_TIMESTEPS)

    def check_images(self, images: torch.Tensor, what: str = "images") -> None:
        """Raise one clear error if ``images`` are not ``[B, C, S, S]`` finite tensors of this flow's shape."""
        problems = flow_input_problems(self.config, images, what)
        if problems:
            raise DataError("; ".join(problems))


def flow_input_problems(config: FlowConfig, images: torch.Tensor, what: str = "images") -> list[str]:
    """What keeps ``images`` from being used in flow space (shape, channels, size, NaN/Inf)."""
    expected = (config.channels, config.size, config.size)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        return [
            f"{what} have shape {tuple(images.shape)} but the flow was trained on [B, {config.channels}, "
            f"{config.size}, {config.size}] images; train a flow at this size and channel count or set "
            "flow_size/flow_channels to the flow's"
        ]
    if not torch.isfinite(images).all():
        return [f"{what} contain NaN or infinite values"]
    return []


# --------------------------------------------------------------------------------------------------- saving


def save_flow(flow: VelocityField, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``{"format", "config", "metadata", "model", **training, **extra}`` atomically (see :func:`load_flow`).

    Without ``extra`` the file holds what using the flow needs (no optimizer state), e.g. to ship a trained flow.
    """
    content = {
        "format": _FORMAT,
        "config": dataclasses.asdict(flow.config),
        "metadata": flow.metadata,
        "model": flow.state_dict(),
        **flow.training_record,
    }
    content.update(extra or {})
    return atomic_torch_save(content, path)


def _read_flow_file(path: str | os.PathLike) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"flow checkpoint not found: {path}")
    content = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(content, dict) or content.get("format") != _FORMAT:
        raise ConfigError(f"{path} is not a flow checkpoint written by medcore_monai.explain (format {_FORMAT})")
    return content


def load_flow(path: str | os.PathLike, device: torch.device | str = "cpu") -> VelocityField:
    """The velocity field saved at ``path``, in eval mode with gradients off for its parameters."""
    content = _read_flow_file(path)
    flow = VelocityField(FlowConfig(**content["config"]))
    flow.load_state_dict(content["model"])
    flow.metadata = dict(content.get("metadata") or {})
    flow.training_record = {k: content[k] for k in ("settings", "training_seconds") if k in content}
    flow.requires_grad_(False)
    return flow.to(device).eval()


# --------------------------------------------------------------------------------------------------- training


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + step)
    return generator


@torch.no_grad()
def generate(flow: VelocityField, start: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Where the flow carries ``start`` ``[B, C, S, S]``: Euler steps forward over the increasing ``times``."""
    x = start
    for k in range(len(times) - 1):
        x = x + (times[k + 1] - times[k]) * flow(x, times[k])
    return x


def _reflow_pairs(teacher: VelocityField, count: int, steps: int, seed: int, batch: int) -> tuple[torch.Tensor, ...]:
    device = next(teacher.parameters()).device
    shape = (count, teacher.config.channels, teacher.config.size, teacher.config.size)
    noise = torch.randn(shape, generator=_step_generator(seed, -1, device), device=device)
    teacher.eval()
    times = torch.linspace(0.0, 1.0, steps + 1, device=device)
    images = torch.cat([generate(teacher, noise[i : i + batch], times) for i in range(0, count, batch)])
    return noise, images


@dataclasses.dataclass
class _Run:
    """One training run's state and settings (what a checkpoint holds besides the weights)."""

    flow: VelocityField
    optimizer: torch.optim.Optimizer
    settings: dict[str, Any]
    checkpoint: str | os.PathLike | None
    save_every: int
    progress: bool
    teacher: dict[str, torch.Tensor] | None = None  # weights that made this reflow round's pairs
    seconds_before: float = 0.0  # training time of the runs this one resumed
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def save(self, round_index: int, step: int) -> None:
        if self.checkpoint is None:
            return
        extra = {
            "optimizer": self.optimizer.state_dict(),
            "round": round_index,
            "step": step,
            "settings": self.settings,
            "teacher": self.teacher,
            "training_seconds": self.seconds(),
        }
        save_flow(self.flow, self.checkpoint, extra)


def train_flow(
    images: torch.Tensor,
    config: FlowConfig,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 2e-4,
    seed: int = 0,
    reflow_rounds: int = 0,
    reflow_pairs: int = 512,
    reflow_ode_steps: int = 16,
    checkpoint: str | os.PathLike | None = None,
    save_every: int = 200,
    device: torch.device | str = "cpu",
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> VelocityField:
    """Train a velocity field on ``images`` ``[N, C, S, S]`` in [-1, 1], then ``reflow_rounds`` reflow rounds.

    Each round runs ``steps`` optimisation steps; a reflow round starts from the previous round's weights and
    trains on ``reflow_pairs`` (noise, image) pairs that those weights generate with ``reflow_ode_steps`` Euler
    steps. With ``checkpoint`` set, the state (weights, optimizer, round, step and the reflow teacher) is saved
    there every ``save_every`` steps and at the end of each round, and a later call with the same arguments
    resumes from it (a finished checkpoint is returned at once). ``metadata`` (e.g. the datasets) is saved with
    the flow and must match on resume.

    Returns:
        The trained field in eval mode, on ``device``.
    """
    device = torch.device(device)
    if images.ndim != 4 or images.shape[0] < 2:
        raise DataError(f"train_flow needs at least two images [N, C, S, S], got {tuple(images.shape)}")
    problems = flow_input_problems(config, images, "training images")
    if problems:
        raise DataError("; ".join(problems))
    torch.manual_seed(seed)  # the initial weights
    flow = VelocityField(config).to(device)
    flow.metadata = dict(metadata or {})
    settings = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "reflow_rounds": reflow_rounds,
        "reflow_pairs": reflow_pairs,
        "reflow_ode_steps": reflow_ode_steps,
    }
    run = _Run(flow, torch.optim.AdamW(flow.parameters(), lr=lr), settings, checkpoint, save_every, progress)
    start_round, start_step = _resume(run, config) if checkpoint is not None and Path(checkpoint).is_file() else (0, 0)
    for round_index in range(start_round, reflow_rounds + 1):
        source, target = None, images.to(device)
        if round_index > 0:
            if run.teacher is None or round_index != start_round or start_step == 0:
                run.teacher = {k: v.detach().clone() for k, v in flow.state_dict().items()}
            teacher = VelocityField(config).to(device)
            teacher.load_state_dict(run.teacher)
            source, target = _reflow_pairs(teacher, reflow_pairs, reflow_ode_steps, seed + round_index, batch_size)
        first = start_step if round_index == start_round else 0
        _train_round(run, source, target, round_index, first)
    flow.training_record = {"settings": settings, "training_seconds": run.seconds()}
    flow.requires_grad_(False)
    return flow.eval()


def _train_round(run: _Run, source: torch.Tensor | None, target: torch.Tensor, round_index: int, first: int) -> None:
    from monai.networks.schedulers import RFlowScheduler
    from tqdm.auto import tqdm

    scheduler = RFlowScheduler(num_train_timesteps=_NUM_TIMESTEPS, use_discrete_timesteps=False)
    steps, batch_size, seed = run.settings["steps"], run.settings["batch_size"], run.settings["seed"] + round_index
    device = target.device
    run.flow.train()
    bar = tqdm(range(first, steps), desc=f"flow round {round_index}", disable=not run.progress, leave=False)
    for step in bar:
        generator = _step_generator(seed, step, device)
        index = torch.randint(target.shape[0], (batch_size,), generator=generator, device=device)
        x1 = target[index]
        x0 = source[index] if source is not None else torch.randn(x1.shape, generator=generator, device=device)
        timesteps = torch.rand(x1.shape[0], generator=generator, device=device) * scheduler.num_train_timesteps
        loss = torch.nn.functional.mse_loss(run.flow.unet(scheduler.add_noise(x1, x0, timesteps), timesteps), x1 - x0)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % run.save_every == 0 or step + 1 == steps:
            run.save(round_index, step + 1)
    run.flow.eval()


def _resume(run: _Run, config: FlowConfig) -> tuple[int, int]:
    content = _read_flow_file(run.checkpoint)
    same_data = dict(content.get("metadata") or {}) == run.flow.metadata
    if FlowConfig(**content["config"]) != config or content.get("settings") != run.settings or not same_data:
        raise ConfigError(
            f"{run.checkpoint} holds a flow trained with other settings ({content['config']}, "
            f"{content.get('settings')}, {content.get('metadata')}); remove it or pass the settings it was trained with"
        )
    run.flow.load_state_dict(content["model"])
    if "optimizer" in content:  # a flow saved for use only (save_flow) has no optimizer state
        run.optimizer.load_state_dict(content["optimizer"])
    run.teacher = content.get("teacher")
    run.seconds_before = float(content.get("training_seconds", 0.0))
    # a flow saved for use only is a finished run
    round_index = int(content.get("round", run.settings["reflow_rounds"]))
    step = int(content.get("step", run.settings["steps"]))
    if step >= run.settings["steps"]:
        round_index, step = round_index + 1, 0
    logger.info("resuming flow training from %s (round %d, step %d)", run.checkpoint, round_index, step)
    return round_index, step


def as_flow_config(value: FlowConfig | dict[str, Any] | None, **defaults: Any) -> FlowConfig:
    """A :class:`FlowConfig` from a config dict (bundle YAML) or keyword defaults."""
    if isinstance(value, FlowConfig):
        return value
    merged = {**defaults, **(value or {})}
    if isinstance(merged.get("widths"), Sequence):
        merged["widths"] = tuple(merged["widths"])
    return FlowConfig(**merged)
