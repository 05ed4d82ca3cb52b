"""RobustMedSAM: MedSAM's encoders with RobustSAM's mask decoder, by module-wise checkpoint fusion.

RobustMedSAM (Li et al., 2026) observes that SAM's image encoder holds the medical priors while the
mask decoder governs robustness to corruptions. Its fused initial checkpoint takes ``image_encoder.*``
and ``prompt_encoder.*`` from MedSAM and ``mask_decoder.*`` from RobustSAM (ViT-B); only the decoder is
then fine-tuned. This module provides:

* :func:`build_robust_sam` - a segment-anything ``Sam`` whose ``mask_decoder`` is a
  :class:`~medcore_monai.networks.robust_decoder.RobustMaskDecoder` (dense or compact encoder);
* :func:`encode_with_early_features` - runs the (unmodified) image encoder and captures the output of
  its first global-attention block with a temporary forward hook (RobustSAM's decoder needs it);
* :class:`RobustMedSAM` - the box-prompted :class:`~medcore_monai.networks.medsam.MedSAM` interface
  around such a model, decoding in robust mode by default;
* :func:`fuse_state_dicts` / :func:`fuse_checkpoints` - the validated fusion, keeping a compact (pruned)
  MedSAM encoder with its per-block widths and kept indices;
* :func:`load_robust_sam` / :func:`save_robust_sam` - strict loading and saving in this project's
  compact format (manifest entry ``"decoder": "robustsam"``); :func:`medcore_monai.networks.build.load_sam`
  hands RobustSAM-decoder checkpoints to :func:`robust_sam_from_checkpoint`;
* :func:`strip_robust_decoder` - the plain-SAM fallback that drops (and lists) the extra decoder tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..files import atomic_torch_save
from .build import (
    COMPACT_FORMAT,
    FORMAT_VERSION,
    _restore_kept_indices,
    build_sam,
    checkpoint_config,
    compact_manifest,
    current_config,
    file_sha256,
)
from .checkpoint import (
    CheckpointError,
    extract_state_dict,
    format_keys,
    key_problems,
    load_state_dict_strict,
    read_checkpoint,
)
from .config import SamConfig, get_preset, infer_sam_config
from .medsam import MedSAM
from .robust_decoder import RobustDecoderOutput, RobustMaskDecoder, is_robust_decoder_key
from .structure import slim_block_

__all__ = [
    "DECODER_NAME",
    "EARLY_FEATURES_ATTR",
    "FusionReport",
    "RobustEncoding",
    "RobustMedSAM",
    "as_medsam",
    "build_robust_sam",
    "capture_block_output",
    "early_feature_block",
    "encode_with_early_features",
    "fuse_checkpoints",
    "fuse_state_dicts",
    "load_robust_sam",
    "robust_sam_from_checkpoint",
    "robust_state_schema",
    "save_robust_sam",
    "strip_robust_decoder",
]

#: Manifest value (``medcore.decoder``) marking a checkpoint with a RobustSAM decoder.
DECODER_NAME = "robustsam"
#: Attribute of the tensor returned by :meth:`RobustMedSAM.encode` that holds the early features.
EARLY_FEATURES_ATTR = "medcore_early_features"

_ENCODER_PREFIXES = ("image_encoder.", "prompt_encoder.")
_DECODER_PREFIX = "mask_decoder."


# --------------------------------------------------------------------------------------------------
# Building, and the early encoder features
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed the global RNG inside the block and restore it afterwards (no-op for ``None``)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_robust_sam(config: SamConfig | str = "vit_b", seed: int | None = None) -> nn.Module:
    """A segment-anything ``Sam`` with a :class:`RobustMaskDecoder` (random weights).

    The SAM parts of the decoder are those :func:`~medcore_monai.networks.build.build_sam` creates for
    the same ``config`` and ``seed``, so clear-mode decoding equals that plain model's. Compact configs
    give a compact encoder, exactly as in ``build_sam``.

    Args:
        config: a :class:`SamConfig` or a preset name (``vit_b``, ``vit_l``, ``vit_h``, ``tiny``).
        seed: seed for the random initialisation (``None`` uses the global RNG).
    """
    if isinstance(config, str):
        config = get_preset(config)
    sam = build_sam(config, seed=seed)
    with _seeded(seed):
        sam.mask_decoder = RobustMaskDecoder.from_sam_decoder(
            sam.mask_decoder, encoder_dim=config.embed_dim, image_embedding_size=config.grid_size
        )
    return sam.eval()


def early_feature_block(image_encoder: nn.Module) -> int:
    """Index of the encoder's first global-attention block (ViT-B and tiny: 2), RobustSAM's early feature.

    Raises:
        ValueError: if every block uses windowed attention.
    """
    for index, block in enumerate(image_encoder.blocks):
        if block.window_size == 0:
            return index
    raise ValueError("the image encoder has no global-attention block; RobustSAM's decoder needs one")


class _Captured:
    """Holder for a tensor produced inside a :func:`capture_block_output` block."""

    def __init__(self) -> None:
        self._value: torch.Tensor | None = None

    @property
    def output(self) -> torch.Tensor:
        """The block's last output.

        Raises:
            RuntimeError: if the block did not run.
        """
        if self._value is None:
            raise RuntimeError("the hooked block did not run")
        return self._value


@contextlib.contextmanager
def capture_block_output(block: nn.Module) -> Iterator[_Captured]:
    """Record ``block``'s output while the context is open; the hook is removed on exit.

    A temporary hook leaves segment-anything's classes untouched, works for compact (slimmed)
    encoders, and keeps models free of persistent hooks (so they deep-copy and pickle cleanly).
    """
    captured = _Captured()

    def _record(_module: nn.Module, _inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        captured._value = output

    handle = block.register_forward_hook(_record)
    try:
        yield captured
    finally:
        handle.remove()


def encode_with_early_features(image_encoder: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a SAM image encoder and also return its first global block's output.

    Args:
        image_encoder: segment-anything ``ImageEncoderViT`` (dense or compact).
        images: encoder input ``[B, 3, S, S]`` (already normalised as the encoder expects).

    Returns:
        ``(embeddings [B, 256, g, g], early_features [B, g, g, embed_dim])``; the early map is BHWC, as
        RobustSAM's decoder takes it.
    """
    with capture_block_output(image_encoder.blocks[early_feature_block(image_encoder)]) as captured:
        embeddings = image_encoder(images)
    return embeddings, captured.output


# --------------------------------------------------------------------------------------------------
# The MedSAM-style module
# --------------------------------------------------------------------------------------------------


class RobustEncoding(NamedTuple):
    """Encoder outputs RobustSAM's decoder needs.

    Attributes:
        embeddings: image embeddings ``[B, 256, g, g]``.
        early_features: first global-attention block output ``[B, g, g, embed_dim]``.
    """

    embeddings: torch.Tensor
    early_features: torch.Tensor


class RobustMedSAM(MedSAM):
    """:class:`MedSAM`'s ``forward(images, boxes) -> low-res logits`` with RobustSAM's decoder.

    One box per image; each image is decoded on its own (robust mode takes one prompt per call).
    ``robust=True`` (the default) uses RobustSAM's robust path, ``robust=False`` plain SAM decoding
    with the same weights.

    Args:
        sam: a model from :func:`build_robust_sam` / :func:`load_robust_sam` (anything with
            ``image_encoder``, ``prompt_encoder``, a :class:`RobustMaskDecoder` ``mask_decoder``,
            ``pixel_mean`` and ``pixel_std``).
        pixel_normalize: see :class:`MedSAM`.
        robust: decode in robust mode.

    Raises:
        TypeError: if ``sam.mask_decoder`` is not a :class:`RobustMaskDecoder`.
    """

    def __init__(self, sam: nn.Module, pixel_normalize: bool = False, robust: bool = True) -> None:
        if not isinstance(getattr(sam, "mask_decoder", None), RobustMaskDecoder):
            raise TypeError(
                "RobustMedSAM needs a model with a RobustMaskDecoder (build_robust_sam / load_robust_sam); "
                "use MedSAM for a plain SAM decoder"
            )
        super().__init__(sam, pixel_normalize=pixel_normalize)
        self.robust = robust
        self.early_block = early_feature_block(self.image_encoder)

    def encode_features(self, images: torch.Tensor) -> RobustEncoding:
        """Image embeddings and early features of ``[B, 3, S, S]`` images in [0, 1]."""
        with capture_block_output(self.image_encoder.blocks[self.early_block]) as captured:
            embeddings = super().encode(images)
        return RobustEncoding(embeddings, captured.output)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``[B, 256, g, g]``, as :meth:`MedSAM.encode`.

        The early features travel with the returned tensor (attribute ``medcore_early_features``), so
        ``decode(encode(images), boxes)`` works as for MedSAM. A tensor derived from it (``.to()``,
        indexing, a cache) loses them: then pass ``early_features`` to :meth:`decode` explicitly, e.g.
        from :meth:`encode_features`.
        """
        encoding = self.encode_features(images)
        setattr(encoding.embeddings, EARLY_FEATURES_ATTR, encoding.early_features)
        return encoding.embeddings

    def decode(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor,
        early_features: torch.Tensor | None = None,
        robust: bool | None = None,
    ) -> torch.Tensor:
        """Low-resolution logits ``[B, 1, 4g, 4g]`` for one box ``[x0, y0, x1, y1]`` per image.

        Args:
            embeddings: image embeddings ``[B, 256, g, g]``.
            boxes: ``[B, 4]`` in model-input pixels.
            early_features: ``[B, g, g, embed_dim]``; defaults to the ones attached by :meth:`encode`.
            robust: override :attr:`robust` for this call.

        Raises:
            ValueError: for a box count that differs from the image count, or robust decoding without
                early features.
        """
        robust = self.robust if robust is None else robust
        logits = [
            self.mask_decoder(*inputs, multimask_output=False, encoder_features=early, robust=robust)[0]
            for inputs, early in self._prompts(embeddings, boxes, early_features, need_early=robust)
        ]
        return torch.cat(logits, dim=0)

    def robust_outputs(
        self, images: torch.Tensor, boxes: torch.Tensor, robust: bool | None = None
    ) -> RobustDecoderOutput:
        """Logits plus robust mask features and mask tokens, batched over images.

        For RobustSAM's consistency losses run it on clean images with ``robust=False`` and on their
        degraded copies with ``robust=True``; compare ``robust_embeddings`` and ``robust_token``.
        """
        robust = self.robust if robust is None else robust
        encoding = self.encode_features(images)
        outputs = [
            self.mask_decoder.predict_with_robust_outputs(*inputs, False, early, robust=robust)
            for inputs, early in self._prompts(encoding.embeddings, boxes, encoding.early_features, need_early=True)
        ]
        return RobustDecoderOutput(*(torch.cat(parts, dim=0) for parts in zip(*outputs)))

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Low-resolution mask logits ``[B, 1, S/4, S/4]``."""
        encoding = self.encode_features(images)
        return self.decode(encoding.embeddings, boxes, encoding.early_features)

    def _prompts(
        self, embeddings: torch.Tensor, boxes: torch.Tensor, early_features: torch.Tensor | None, need_early: bool
    ) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor | None]]:
        """Per image: decoder inputs ``(embedding, dense PE, sparse, dense)`` and its early features."""
        if early_features is None:
            early_features = getattr(embeddings, EARLY_FEATURES_ATTR, None)
        if early_features is None and need_early:
            raise ValueError(
                "robust decoding needs the early encoder features: decode(encode(images), boxes) carries "
                "them; for embeddings from elsewhere pass early_features= (see encode_features)"
            )
        boxes = boxes.to(device=embeddings.device, dtype=embeddings.dtype).reshape(-1, 4)
        if boxes.shape[0] != embeddings.shape[0]:
            raise ValueError(f"{boxes.shape[0]} boxes for {embeddings.shape[0]} images; give one box per image")
        dense_pe = self.prompt_encoder.get_dense_pe()
        for i, (emb, box) in enumerate(zip(embeddings, boxes)):
            sparse, dense = self.prompt_encoder(points=None, boxes=box[None], masks=None)
            early = None if early_features is None else early_features[i : i + 1]
            yield (emb[None], dense_pe, sparse, dense), early


def as_medsam(sam: nn.Module, pixel_normalize: bool = False) -> MedSAM:
    """Wrap ``sam`` in :class:`RobustMedSAM` if it has a RobustSAM decoder, else in :class:`MedSAM`."""
    if isinstance(getattr(sam, "mask_decoder", None), RobustMaskDecoder):
        return RobustMedSAM(sam, pixel_normalize=pixel_normalize)
    return MedSAM(sam, pixel_normalize=pixel_normalize)


# --------------------------------------------------------------------------------------------------
# State dicts: fusion, schema, stripping
# --------------------------------------------------------------------------------------------------


def _strip_module_prefix(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Drop ``module.`` (DistributedDataParallel) from every key that has it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name in out:
            raise CheckpointError(f"{source}: key {name!r} appears both with and without a 'module.' prefix")
        out[name] = value
    return out


def _plain_state(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside any accepted checkpoint layout, without ``module.`` prefixes."""
    return _strip_module_prefix(extract_state_dict(obj, source=source), source)


def _manifest(obj: Any) -> Mapping[str, Any] | None:
    """The ``medcore`` manifest (this project's) of a checkpoint object, if it has one."""
    manifest = obj.get("medcore") if isinstance(obj, Mapping) else None
    return manifest if isinstance(manifest, Mapping) else None


def _dense_blocks(config: SamConfig) -> list[dict[str, Any]]:
    """Block manifest of an encoder that was never slimmed (kept indices are the first ``width``)."""
    return [
        {
            "num_heads": config.heads_of(i),
            "mlp_dim": config.mlp_dim_of(i),
            "kept_heads": list(range(config.heads_of(i))),
            "kept_channels": list(range(config.mlp_dim_of(i))),
        }
        for i in range(config.depth)
    ]


def _checked_blocks(blocks: Any, config: SamConfig, source: str) -> list[dict[str, Any]]:
    """The manifest's per-block entries, checked against the config's widths."""
    if not isinstance(blocks, list) or len(blocks) != config.depth:
        raise CheckpointError(f"{source}: manifest lists {len(blocks or [])} blocks for a {config.depth}-block encoder")
    for i, entry in enumerate(blocks):
        heads, channels = len(entry["kept_heads"]), len(entry["kept_channels"])
        if (heads, channels) != (config.heads_of(i), config.mlp_dim_of(i)):
            raise CheckpointError(
                f"{source}: manifest block {i} keeps {heads} heads / {channels} MLP channels but the config "
                f"says {config.heads_of(i)} / {config.mlp_dim_of(i)}"
            )
    return [dict(entry) for entry in blocks]


def _medsam_architecture(obj: Any, state: Mapping[str, torch.Tensor], source: str) -> tuple[SamConfig, list]:
    """Config and block manifest of the MedSAM side (from its manifest, else from tensor shapes)."""
    manifest = _manifest(obj)
    if manifest is not None:
        config = SamConfig.from_dict(manifest["config"])
        return config, _checked_blocks(manifest.get("blocks"), config, source)
    try:
        config = infer_sam_config(state)
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{source}: cannot infer the SAM architecture: {err}") from None
    return config, _dense_blocks(config)


def robust_state_schema(config: SamConfig | str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a :func:`build_robust_sam` model's state dict, without allocating its weights.

    The model is built on PyTorch's ``meta`` device (dense, then slimmed to the config's widths).
    """
    if isinstance(config, str):
        config = get_preset(config)
    with torch.device("meta"):
        model = build_robust_sam(replace(config, block_heads=None, block_mlp_dims=None))
    if config.is_compact:
        for i, block in enumerate(model.image_encoder.blocks):
            slim_block_(block, range(config.heads_of(i)), range(config.mlp_dim_of(i)))
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _part_problems(
    state: Mapping[str, torch.Tensor],
    schema: Mapping[str, tuple[int, ...]],
    prefixes: tuple[str, ...],
    source: str,
) -> list[str]:
    """Missing, unexpected and mis-shaped keys of the part of ``state`` under ``prefixes``."""
    given = {k: tuple(v.shape) for k, v in state.items() if k.startswith(prefixes)}
    wanted = {k: shape for k, shape in schema.items() if k.startswith(prefixes)}
    foreign = sorted(k for k in state if not k.startswith((*_ENCODER_PREFIXES, _DECODER_PREFIX)))
    problems = [f"{source}: {problem}" for problem in key_problems(given, wanted)]
    if foreign:
        problems.append(f"{source}: keys outside image_encoder/prompt_encoder/mask_decoder: {format_keys(foreign)}")
    return problems


@dataclass(frozen=True)
class FusionReport:
    """What :func:`fuse_state_dicts` took from where.

    Attributes:
        config: architecture of the fused model (the MedSAM side's, widths included).
        blocks: per-block manifest of the encoder (widths and kept original indices).
        from_medsam: tensors taken from MedSAM (image and prompt encoder).
        from_robustsam: tensors taken from RobustSAM (mask decoder).
        medsam_unused: MedSAM keys not used (its own mask decoder).
        robustsam_unused: RobustSAM keys not used (its image and prompt encoder).
    """

    config: SamConfig
    blocks: list[dict[str, Any]]
    from_medsam: int
    from_robustsam: int
    medsam_unused: tuple[str, ...]
    robustsam_unused: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (counts, not key lists)."""
        return {
            "config": self.config.to_dict(),
            "from_medsam": self.from_medsam,
            "from_robustsam": self.from_robustsam,
            "medsam_unused": len(self.medsam_unused),
            "robustsam_unused": len(self.robustsam_unused),
        }


def fuse_state_dicts(
    medsam_state: Mapping[str, Any],
    robustsam_state: Mapping[str, Any],
    *,
    medsam_source: str = "MedSAM checkpoint",
    robustsam_source: str = "RobustSAM checkpoint",
) -> tuple[dict[str, torch.Tensor], FusionReport]:
    """RobustMedSAM's module-wise fusion: encoders from MedSAM, mask decoder from RobustSAM.

    Both arguments may be raw state dicts, ``module.``-prefixed ones, dicts holding them under
    ``model`` / ``state_dict`` / ``model_state_dict``, or (MedSAM side) this project's compact
    checkpoints, whose manifest supplies the per-block widths and kept indices. The expected keys and
    shapes are those of :func:`build_robust_sam` for the MedSAM side's architecture.

    Args:
        medsam_state: MedSAM (or any SAM) checkpoint content; ``image_encoder.*`` and
            ``prompt_encoder.*`` are taken from it.
        robustsam_state: RobustSAM checkpoint content; ``mask_decoder.*`` is taken from it.
        medsam_source: name of the MedSAM side in error messages.
        robustsam_source: name of the RobustSAM side in error messages.

    Returns:
        The fused state dict (tensors shared with the inputs, keys in model order) and a
        :class:`FusionReport`.

    Raises:
        CheckpointError: naming every missing, unexpected or mis-shaped key and the side it came from.
    """
    medsam = _plain_state(medsam_state, medsam_source)
    robustsam = _plain_state(robustsam_state, robustsam_source)
    config, blocks = _medsam_architecture(medsam_state, medsam, medsam_source)
    schema = robust_state_schema(config)
    problems = _part_problems(medsam, schema, _ENCODER_PREFIXES, medsam_source)
    problems += _part_problems(robustsam, schema, (_DECODER_PREFIX,), robustsam_source)
    if not any(is_robust_decoder_key(k) for k in robustsam):
        problems.append(
            f"{robustsam_source}: no RobustSAM decoder modules (e.g. mask_decoder.custom_robust_token.weight); "
            "is it a plain SAM/MedSAM checkpoint?"
        )
    if problems:
        raise CheckpointError("cannot fuse RobustMedSAM:\n  " + "\n  ".join(problems))
    fused = {k: medsam[k] if k.startswith(_ENCODER_PREFIXES) else robustsam[k] for k in schema}
    report = FusionReport(
        config=config,
        blocks=blocks,
        from_medsam=sum(k.startswith(_ENCODER_PREFIXES) for k in fused),
        from_robustsam=sum(k.startswith(_DECODER_PREFIX) for k in fused),
        medsam_unused=tuple(sorted(k for k in medsam if not k.startswith(_ENCODER_PREFIXES))),
        robustsam_unused=tuple(sorted(k for k in robustsam if not k.startswith(_DECODER_PREFIX))),
    )
    return fused, report


def strip_robust_decoder(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Plain-SAM fallback: remove RobustSAM's extra decoder tensors, and say which.

    The result loads strictly into a vanilla SAM of the same architecture (SAM's own decoder weights
    are kept), instead of a silent ``strict=False``.

    Args:
        state: a full-model state dict (or any checkpoint layout :func:`extract_state_dict` accepts).

    Returns:
        ``(vanilla_state, dropped_keys)``, ``module.`` prefixes removed; 89 keys are dropped for the
        SAM layout.
    """
    plain = _plain_state(state, "state dict")
    dropped = sorted(k for k in plain if is_robust_decoder_key(k))
    removed = set(dropped)
    return {k: v for k, v in plain.items() if k not in removed}, dropped


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _compact_payload(
    state: Mapping[str, torch.Tensor], config: SamConfig, blocks: list[dict[str, Any]], metadata: dict[str, Any]
) -> dict[str, Any]:
    """The compact checkpoint layout of ``save_sam``, with the decoder named."""
    return {
        "format": COMPACT_FORMAT,
        "format_version": FORMAT_VERSION,
        "medcore": {"config": config.to_dict(), "blocks": blocks, "decoder": DECODER_NAME},
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "metadata": metadata,
    }


def fuse_checkpoints(
    medsam_path: str | os.PathLike,
    robustsam_path: str | os.PathLike,
    out_path: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Fuse two checkpoint files into a RobustMedSAM checkpoint, written atomically.

    The output uses the compact format of :func:`~medcore_monai.networks.build.save_sam` (so a pruned
    MedSAM encoder keeps its widths and kept indices) with ``medcore.decoder = "robustsam"``; its
    metadata gains a ``fusion`` entry with the sources, their SHA-256 and the tensor counts.

    Args:
        medsam_path: MedSAM checkpoint (official ``medsam_vit_b.pth``, a training checkpoint, or a
            compact one from this project).
        robustsam_path: RobustSAM checkpoint (e.g. ``robustsam_checkpoint_b.pth``).
        out_path: where to write the fused checkpoint.
        metadata: extra JSON-safe metadata to store.

    Raises:
        CheckpointError: if a file is unreadable or the checkpoints do not fit (see
            :func:`fuse_state_dicts`).
    """
    medsam_obj, robustsam_obj = read_checkpoint(medsam_path), read_checkpoint(robustsam_path)
    fused, report = fuse_state_dicts(
        medsam_obj,
        robustsam_obj,
        medsam_source=f"MedSAM checkpoint {medsam_path}",
        robustsam_source=f"RobustSAM checkpoint {robustsam_path}",
    )
    provenance = {
        "medsam": str(medsam_path),
        "medsam_sha256": file_sha256(medsam_path),
        "robustsam": str(robustsam_path),
        "robustsam_sha256": file_sha256(robustsam_path),
        **report.to_dict(),
    }
    payload = _compact_payload(fused, report.config, report.blocks, {**(metadata or {}), "fusion": provenance})
    return atomic_torch_save(payload, out_path)


def save_robust_sam(sam: nn.Module, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Save a RobustSAM-decoder model (``Sam`` or :class:`RobustMedSAM`) like ``save_sam``, atomically.

    Identical to :func:`~medcore_monai.networks.build.save_sam` plus the manifest entry
    ``"decoder": "robustsam"`` (``save_sam`` files of such models load too: the decoder is also
    recognised by its keys).

    Raises:
        TypeError: if the model's decoder is not a :class:`RobustMaskDecoder`.
    """
    if not isinstance(getattr(sam, "mask_decoder", None), RobustMaskDecoder):
        raise TypeError("save_robust_sam needs a model with a RobustMaskDecoder; use save_sam for plain SAM")
    return atomic_torch_save(
        _compact_payload(sam.state_dict(), current_config(sam), compact_manifest(sam), metadata or {}), path
    )


def robust_sam_from_checkpoint(obj: Any, source: str = "checkpoint", model_type: str = "auto") -> nn.Module:
    """Build a RobustSAM-decoder ``Sam`` from loaded checkpoint content and load it strictly.

    Accepts official RobustSAM state dicts (raw or ``module.``-prefixed, possibly nested under
    ``model``/``state_dict``) and files from :func:`fuse_checkpoints` / :func:`save_robust_sam` /
    ``save_sam``.

    Args:
        obj: what :func:`~medcore_monai.networks.checkpoint.read_checkpoint` returned.
        source: name for error messages.
        model_type: ``auto`` (manifest, else tensor shapes) or a preset name.

    Raises:
        CheckpointError: on any key or shape mismatch, or a manifest naming another decoder.
    """
    state = _plain_state(obj, source)
    manifest = _manifest(obj)
    if manifest is not None:
        decoder = manifest.get("decoder", DECODER_NAME)
        if decoder != DECODER_NAME:
            raise CheckpointError(f"{source}: manifest names decoder {decoder!r}, expected {DECODER_NAME!r}")
    config = checkpoint_config(state, manifest, model_type, source)
    sam = build_robust_sam(config)
    load_state_dict_strict(sam, state, source=source)
    if manifest is not None:
        _restore_kept_indices(sam, _checked_blocks(manifest.get("blocks"), config, source))
    return sam


def load_robust_sam(path: str | os.PathLike, model_type: str = "auto") -> nn.Module:
    """Build a RobustSAM-decoder ``Sam`` from a checkpoint file, strictly (see :func:`robust_sam_from_checkpoint`).

    Wrap the result in :class:`RobustMedSAM` for box-prompted inference.
    """
    return robust_sam_from_checkpoint(read_checkpoint(path), source=str(path), model_type=model_type)
