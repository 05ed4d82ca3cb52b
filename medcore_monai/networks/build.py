"""Building, loading and saving SAM / MedSAM models (plain or with a RobustSAM decoder), in one checkpoint format.

Every checkpoint this project writes is a plain dict readable with ``torch.load(weights_only=True)``::

    {"model": state_dict, "medcore": manifest, "metadata": {...}, "format": "medcore-sam", "format_version": 2}

``manifest`` is ``{"config": SamConfig.to_dict(), "blocks": [per-block widths and kept original indices]}``
plus ``"decoder": "robustsam"`` for RobustSAM-decoder models (see :mod:`.manifest`). The state sits under
``model`` because MONAI Label (``checkpoint.get("model", checkpoint)``) and MONAI's ``CheckpointLoader``
look there; ``CheckpointSaver(save_dict={"model": net, "medcore": ModelManifest(net)})`` writes the same
layout without ``format`` / ``metadata``.

Reading (:func:`load_sam`) also accepts format version 1 (state under ``state_dict``), ``{"model": sd}``,
``model_state_dict``, and official raw or ``module.``-prefixed state dicts (SAM, MedSAM, RobustSAM).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    atomic_torch_save,
    checkpoint_manifest,
    extract_state_dict,
    load_state_dict_strict,
    plain_state_dict,
    read_checkpoint,
)
from .config import (
    PROMPT_EMBED_DIM,
    ModelConfig,
    SamConfig,
    TinyViTConfig,
    config_from_dict,
    get_preset,
    infer_sam_config,
)
from .manifest import (
    DECODER_NAME,
    checked_blocks,
    checked_conv_blocks,
    compact_manifest,
    current_config,
    model_manifest,
    restore_kept_indices,
    unwrap_model,
)
from .medsam import MedSAM, as_medsam
from .robust_decoder import RobustMaskDecoder, has_robust_decoder
from .sam_import import sam_modeling
from .structure import slim_block_
from .tiny_vit import TinyViTEncoder

__all__ = [
    "COMPACT_FORMAT",
    "FORMAT_VERSION",
    "build_robust_sam",
    "build_sam",
    "checkpoint_config",
    "checkpoint_image_size",
    "checkpoint_payload",
    "compact_manifest",
    "current_config",
    "file_sha256",
    "load_medsam",
    "load_robust_sam",
    "load_sam",
    "robust_sam_from_checkpoint",
    "sam_from_checkpoint",
    "save_robust_sam",
    "save_sam",
]

#: ``format`` entry of this project's checkpoints.
COMPACT_FORMAT = "medcore-sam"
#: 2: state under ``model``; 1 (read only): state under ``state_dict``.
FORMAT_VERSION = 2


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def _image_encoder(config: ModelConfig) -> nn.Module:
    """segment-anything's ``ImageEncoderViT``, or the project's TinyViT encoder for LiteMedSAM configs."""
    if isinstance(config, TinyViTConfig):
        return TinyViTEncoder(
            img_size=config.img_size,
            embed_dims=config.embed_dims,
            depths=config.depths,
            num_heads=config.stage_heads,
            window_sizes=config.window_sizes,
            mlp_ratio=config.mlp_ratio,
            mbconv_expand=config.mbconv_expand,
            merge_strides=config.merge_strides,
            block_heads=config.block_heads,
            block_mlp_dims=config.block_mlp_dims,
            mbconv_hidden_dims=config.mbconv_hidden_dims,
            out_chans=config.out_chans,
        )
    return sam_modeling().ImageEncoderViT(
        depth=config.depth,
        embed_dim=config.embed_dim,
        img_size=config.img_size,
        mlp_ratio=config.mlp_ratio,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=config.num_heads,
        patch_size=config.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=config.global_attn_indexes,
        window_size=config.window_size,
        out_chans=config.out_chans,
    )


def build_sam(config: ModelConfig | str = "vit_b", seed: int | None = None) -> nn.Module:
    """Build a segment-anything ``Sam`` with the given architecture (random weights).

    ViT encoders are segment-anything's ``ImageEncoderViT``; compact ViT configs (per-block widths) are built dense,
    then each block is narrowed to its width, so the module classes are exactly segment-anything's. LiteMedSAM
    configs get a :class:`~medcore_monai.networks.tiny_vit.TinyViTEncoder` built at their widths.

    Args:
        config: a :class:`SamConfig` / :class:`TinyViTConfig` or a preset name (``vit_b``, ``vit_l``, ``vit_h``,
            ``tiny``, ``litemedsam``).
        seed: seed for the random initialisation (``None`` uses the global RNG).
    """
    if isinstance(config, str):
        config = get_preset(config)
    modeling = sam_modeling()
    grid = config.grid_size
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        sam = modeling.Sam(
            image_encoder=_image_encoder(config),
            prompt_encoder=modeling.PromptEncoder(
                embed_dim=PROMPT_EMBED_DIM,
                image_embedding_size=(grid, grid),
                input_image_size=(config.img_size, config.img_size),
                mask_in_chans=16,
            ),
            mask_decoder=modeling.MaskDecoder(
                num_multimask_outputs=3,
                transformer=modeling.TwoWayTransformer(
                    depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8
                ),
                transformer_dim=PROMPT_EMBED_DIM,
                iou_head_depth=3,
                iou_head_hidden_dim=256,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)
    if config.is_compact and isinstance(config, SamConfig):
        for i, blk in enumerate(sam.image_encoder.blocks):
            slim_block_(blk, range(config.heads_of(i)), range(config.mlp_dim_of(i)))
    sam.medcore_config = config
    return sam.eval()


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

    The SAM parts of the decoder are those :func:`build_sam` creates for the same ``config`` and
    ``seed``, so clear-mode decoding equals that plain model's. Compact configs give a compact encoder,
    exactly as in ``build_sam``.

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


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def checkpoint_config(
    state: dict[str, torch.Tensor], manifest: dict[str, Any] | None, model_type: str, source: str
) -> ModelConfig:
    """The architecture of a checkpoint: its compact manifest, else a preset name, else its tensor shapes."""
    if manifest is not None:
        return config_from_dict(manifest["config"])
    if model_type != "auto":
        return get_preset(model_type)
    try:
        return infer_sam_config(state)
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{source}: cannot infer the SAM architecture: {err}") from None


def _manifest_decoder(manifest: Mapping[str, Any] | None, source: str) -> str | None:
    """The decoder a manifest names (``None``: SAM's own, or no manifest).

    Raises:
        CheckpointError: for a decoder this project does not know.
    """
    decoder = manifest.get("decoder") if manifest is not None else None
    if decoder not in (None, DECODER_NAME):
        raise CheckpointError(f"{source}: manifest names decoder {decoder!r}; known: {DECODER_NAME!r}")
    return decoder


def _is_robust(state: Mapping[str, torch.Tensor], manifest: Mapping[str, Any] | None, source: str) -> bool:
    """Whether a checkpoint holds a RobustSAM decoder (by its manifest's ``decoder``, or by its keys)."""
    return _manifest_decoder(manifest, source) == DECODER_NAME or has_robust_decoder(state)


def _from_checkpoint(obj: Any, source: str, model_type: str, robust: bool) -> nn.Module:
    """Build the model a checkpoint describes (plain or RobustSAM decoder) and load it strictly."""
    state = extract_state_dict(obj, source=source)
    manifest = checkpoint_manifest(obj)
    config = checkpoint_config(state, manifest, model_type, source)
    sam = build_robust_sam(config) if robust else build_sam(config)
    load_state_dict_strict(sam, state, source=source)
    if manifest is not None:
        conv_entries = checked_conv_blocks(manifest.get("conv_blocks"), config, source)
        restore_kept_indices(sam, checked_blocks(manifest.get("blocks"), config, source), conv_entries)
    return sam


def sam_from_checkpoint(obj: Any, source: str = "checkpoint", model_type: str = "auto") -> nn.Module:
    """Build a SAM/MedSAM model from loaded checkpoint content, strictly (see :func:`load_sam`).

    Args:
        obj: what :func:`~medcore_monai.networks.checkpoint.read_checkpoint` returned.
        source: name for error messages.
        model_type: ``auto`` (manifest, else tensor shapes) or a preset name.
    """
    state = extract_state_dict(obj, source=source)
    return _from_checkpoint(obj, source, model_type, robust=_is_robust(state, checkpoint_manifest(obj), source))


def load_sam(path: str | os.PathLike, model_type: str = "auto") -> nn.Module:
    """Build a SAM/MedSAM model from a checkpoint file, strictly.

    Accepts this project's checkpoints (format versions 2 and 1, and ``CheckpointSaver`` files with a
    :class:`~medcore_monai.networks.manifest.ModelManifest`), official raw or ``module.``-prefixed state
    dicts (``sam_vit_b_01ec64.pth``, ``medsam_vit_b.pth``) and dicts holding the state under ``model`` /
    ``state_dict`` / ``model_state_dict``. Pickled whole models are refused. A manifest restores the
    per-block widths and kept indices of a compact (pruned) encoder. Checkpoints with a RobustSAM
    decoder give a model whose ``mask_decoder`` is a ``RobustMaskDecoder``; wrap it with
    :func:`~medcore_monai.networks.medsam.as_medsam` (or use :func:`load_medsam`).

    Args:
        path: checkpoint file.
        model_type: ``auto`` reads the architecture from the manifest or the tensor shapes; a preset
            name forces it for files without a manifest (and a mismatch is reported key by key).

    Raises:
        CheckpointError: on a missing/unsafe file or any key or shape mismatch.
    """
    return sam_from_checkpoint(read_checkpoint(path), source=str(path), model_type=model_type)


def robust_sam_from_checkpoint(obj: Any, source: str = "checkpoint", model_type: str = "auto") -> nn.Module:
    """Build a RobustSAM-decoder ``Sam`` from loaded checkpoint content and load it strictly.

    Accepts official RobustSAM state dicts (raw or ``module.``-prefixed, possibly nested under
    ``model``/``state_dict``) and this project's RobustSAM-decoder files (``save_sam``,
    :func:`~medcore_monai.networks.fusion.fuse_checkpoints`).

    Raises:
        CheckpointError: on any key or shape mismatch, or a manifest naming another decoder.
    """
    _manifest_decoder(checkpoint_manifest(obj), source)
    return _from_checkpoint(obj, source, model_type, robust=True)


def load_robust_sam(path: str | os.PathLike, model_type: str = "auto") -> nn.Module:
    """Build a RobustSAM-decoder ``Sam`` from a checkpoint file, strictly (see :func:`robust_sam_from_checkpoint`).

    Wrap the result in :class:`~medcore_monai.networks.medsam.RobustMedSAM` for box-prompted inference.
    """
    return robust_sam_from_checkpoint(read_checkpoint(path), source=str(path), model_type=model_type)


def load_medsam(checkpoint: str | os.PathLike, pixel_normalize: bool = False, model_type: str = "auto") -> MedSAM:
    """A box-prompted :class:`MedSAM` (``RobustMedSAM`` for RobustSAM-decoder files) from a checkpoint file.

    Meant as a MONAI bundle ``network_def``::

        network_def:
          _target_: medcore_monai.networks.load_medsam
          checkpoint: "$@bundle_root + '/models/model.pt'"

    Args:
        checkpoint: any file :func:`load_sam` reads (compact widths are kept).
        pixel_normalize: see :class:`MedSAM`.
        model_type: see :func:`load_sam`.
    """
    return as_medsam(load_sam(checkpoint, model_type=model_type), pixel_normalize=pixel_normalize)


def checkpoint_image_size(checkpoint: str | os.PathLike) -> int:
    """Model input size of a SAM/MedSAM checkpoint (256 for the tiny models, 1024 for ViT-B).

    Read from the manifest, else from the tensor shapes, without building the model; lets a bundle's
    preprocessing resize to whatever model is served.
    """
    obj = read_checkpoint(checkpoint)
    manifest = checkpoint_manifest(obj)
    if manifest is not None:
        return int(manifest["config"]["img_size"])
    return infer_sam_config(extract_state_dict(obj, source=str(checkpoint))).img_size


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def checkpoint_payload(
    state: Mapping[str, torch.Tensor], manifest: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The one checkpoint layout (module docstring) for a state dict and its manifest (tensors moved to the CPU)."""
    return {
        "model": {k: v.detach().cpu() for k, v in state.items()},
        "medcore": dict(manifest),
        "metadata": dict(metadata or {}),
        "format": COMPACT_FORMAT,
        "format_version": FORMAT_VERSION,
    }


def save_sam(sam: nn.Module, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Save a (dense or compact, plain or RobustSAM-decoder) SAM model in the one format, atomically.

    Args:
        sam: a ``Sam``, ``MedSAM``/``RobustMedSAM`` or ``BoxChannelMedSAM``, possibly inside
            DistributedDataParallel. Parametrized weights (an SVD adaptation in training) are saved as
            their effective plain weights.
        path: output file.
        metadata: JSON-safe extra information (epoch, metrics, provenance).
    """
    sam = unwrap_model(sam)
    return atomic_torch_save(checkpoint_payload(plain_state_dict(sam), model_manifest(sam), metadata), path)


def save_robust_sam(sam: nn.Module, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """:func:`save_sam` for a model that must have a RobustSAM decoder.

    Raises:
        TypeError: if the model's decoder is not a :class:`RobustMaskDecoder`.
    """
    if not isinstance(getattr(unwrap_model(sam), "mask_decoder", None), RobustMaskDecoder):
        raise TypeError("save_robust_sam needs a model with a RobustMaskDecoder; use save_sam for plain SAM")
    return save_sam(sam, path, metadata)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
