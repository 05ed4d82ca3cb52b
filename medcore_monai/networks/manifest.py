"""The ``medcore`` manifest of a SAM model: its architecture, per-block widths and kept original indices.

Every checkpoint this project writes stores the manifest beside the weights (see
:func:`medcore_monai.networks.build.save_sam`), so a compact (pruned) encoder is rebuilt with its widths.
:class:`ModelManifest` exposes it to MONAI/Ignite checkpoint handlers::

    CheckpointSaver(save_dir, save_dict={"model": net, "medcore": ModelManifest(net)})

writes the same layout as ``save_sam`` (less ``format`` and ``metadata``), which ``load_sam`` reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .checkpoint import CheckpointError
from .config import ModelConfig, TinyViTConfig, infer_sam_config
from .conv_groups import conv_blocks, conv_kept_indices
from .robust_decoder import RobustMaskDecoder
from .structure import kept_indices, mlp_layers, prunable_blocks

__all__ = [
    "DECODER_NAME",
    "ModelManifest",
    "checked_blocks",
    "checked_conv_blocks",
    "compact_conv_manifest",
    "compact_manifest",
    "current_config",
    "dense_blocks",
    "make_manifest",
    "model_manifest",
    "restore_kept_indices",
    "unwrap_model",
]

#: Manifest value (``medcore.decoder``) marking a model with a RobustSAM decoder.
DECODER_NAME = "robustsam"

_PARALLEL_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (``model`` itself otherwise)."""
    while isinstance(model, _PARALLEL_WRAPPERS):
        model = model.module
    return model


def compact_manifest(sam: nn.Module) -> list[dict[str, Any]]:
    """Per-block widths and the original indices of the kept heads and MLP channels."""
    out = []
    for blk in prunable_blocks(unwrap_model(sam).image_encoder):
        heads, channels = kept_indices(blk)
        out.append(
            {
                "num_heads": blk.attn.num_heads,
                "mlp_dim": mlp_layers(blk)[0].out_features,
                "kept_heads": heads,
                "kept_channels": channels,
            }
        )
    return out


def compact_conv_manifest(sam: nn.Module) -> list[dict[str, Any]]:
    """Hidden width and original kept channel indices of each MBConv block (``[]`` for SAM's ViT)."""
    return [
        {"hidden_dim": blk.conv1.c.out_channels, "kept_channels": conv_kept_indices(blk)}
        for blk in conv_blocks(unwrap_model(sam).image_encoder)
    ]


def current_config(sam: nn.Module) -> ModelConfig:
    """The architecture of ``sam`` as it is now (after any slimming)."""
    sam = unwrap_model(sam)
    base = getattr(sam, "medcore_config", None) or infer_sam_config(sam.state_dict())
    blocks = prunable_blocks(sam.image_encoder)
    config = base.with_widths([b.attn.num_heads for b in blocks], [mlp_layers(b)[0].out_features for b in blocks])
    if isinstance(config, TinyViTConfig):
        config = config.with_mbconv_widths([b.conv1.c.out_channels for b in conv_blocks(sam.image_encoder)])
    return config


def make_manifest(
    config: ModelConfig,
    blocks: list[dict[str, Any]],
    robust_decoder: bool = False,
    conv_blocks: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The manifest dict.

    ``{"config", "blocks"}``, plus ``"conv_blocks"`` for MBConv blocks (TinyViT) and ``"decoder": "robustsam"``
    for RobustSAM decoders.
    """
    manifest: dict[str, Any] = {"config": config.to_dict(), "blocks": blocks}
    if conv_blocks:
        manifest["conv_blocks"] = conv_blocks
    if robust_decoder:
        manifest["decoder"] = DECODER_NAME
    return manifest


def model_manifest(model: nn.Module) -> dict[str, Any]:
    """The manifest of a SAM-like model as it is now.

    Args:
        model: a segment-anything ``Sam``, a :class:`~medcore_monai.networks.medsam.MedSAM` (or
            ``RobustMedSAM``), a ``BoxChannelMedSAM``, or any of them inside DistributedDataParallel.
    """
    model = unwrap_model(model)
    robust = isinstance(getattr(model, "mask_decoder", None), RobustMaskDecoder)
    return make_manifest(current_config(model), compact_manifest(model), robust, compact_conv_manifest(model))


def dense_blocks(config: ModelConfig) -> list[dict[str, Any]]:
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


def checked_blocks(blocks: Any, config: ModelConfig, source: str) -> list[dict[str, Any]]:
    """The manifest's per-block entries, checked against the config's widths.

    Raises:
        CheckpointError: for a block count or a kept-index count that differs from the config.
    """
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


def checked_conv_blocks(entries: Any, config: ModelConfig, source: str) -> list[dict[str, Any]]:
    """The manifest's MBConv entries, checked against the config.

    A manifest without them (written before MBConv pruning existed) means dense MBConv blocks, which the config
    must then say too.

    Raises:
        CheckpointError: for an entry count or a kept-channel count that differs from the config.
    """
    if not isinstance(config, TinyViTConfig):
        if entries:
            raise CheckpointError(f"{source}: manifest lists MBConv blocks for an encoder without them")
        return []
    widths = [config.mbconv_hidden_of(i) for i in range(config.depths[0])]
    if entries is None:
        if config.mbconv_hidden_dims is not None:
            raise CheckpointError(f"{source}: manifest lacks the MBConv blocks' kept channels of a compact encoder")
        return [{"hidden_dim": w, "kept_channels": list(range(w))} for w in widths]
    if not isinstance(entries, list) or len(entries) != len(widths):
        raise CheckpointError(f"{source}: manifest lists {len(entries or [])} MBConv blocks, the config {len(widths)}")
    for i, (entry, width) in enumerate(zip(entries, widths)):
        if len(entry["kept_channels"]) != width:
            raise CheckpointError(
                f"{source}: manifest MBConv block {i} keeps {len(entry['kept_channels'])} hidden channels but the "
                f"config says {width}"
            )
    return [dict(entry) for entry in entries]


def restore_kept_indices(
    sam: nn.Module, blocks: list[Mapping[str, Any]], conv_entries: list[Mapping[str, Any]] = ()
) -> None:
    """Set the blocks' record of the original indices they keep.

    Attention blocks take their heads and MLP channels from ``blocks``; MBConv blocks their hidden channels from
    ``conv_entries``.
    """
    encoder = unwrap_model(sam).image_encoder
    for blk, entry in zip(prunable_blocks(encoder), blocks):
        blk.medcore_kept_heads = list(entry["kept_heads"])
        blk.medcore_kept_channels = list(entry["kept_channels"])
    for blk, entry in zip(conv_blocks(encoder), conv_entries):
        blk.medcore_kept_channels = list(entry["kept_channels"])


def _widths(blocks: list[Mapping[str, Any]]) -> list[tuple[int, int]]:
    return [(int(entry["num_heads"]), int(entry["mlp_dim"])) for entry in blocks]


class ModelManifest:
    """A network's manifest as a checkpointable object for MONAI / Ignite handlers.

    ``state_dict()`` describes the network as it is when the checkpoint is written (after any
    slimming); ``load_state_dict()`` only checks that a stored manifest fits the network (it never
    rebuilds it: build the network with :func:`medcore_monai.networks.load_sam` for that) and then
    restores the blocks' record of their kept original indices.

    Args:
        network: a ``Sam``, ``MedSAM``/``RobustMedSAM`` or ``BoxChannelMedSAM``, possibly inside
            DistributedDataParallel / DataParallel (unwrapped at each call, so wrapping later is fine).
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def state_dict(self) -> dict[str, Any]:
        """The manifest of the network as it is now."""
        return model_manifest(self.network)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check that a stored manifest's per-block widths (and decoder) equal the network's.

        Raises:
            CheckpointError: naming the first differing blocks, when widths or decoder differ.
        """
        current = self.state_dict()
        stored_blocks = list(state.get("blocks") or [])
        stored, actual = _widths(stored_blocks), _widths(current["blocks"])
        if stored != actual:
            diffs = [
                f"block {i}: checkpoint {s[0]} heads / {s[1]} MLP channels vs network {a[0]} / {a[1]}"
                for i, (s, a) in enumerate(zip(stored, actual))
                if s != a
            ]
            if len(stored) != len(actual):
                diffs.insert(0, f"checkpoint has {len(stored)} blocks, network {len(actual)}")
            raise CheckpointError(
                "checkpoint manifest does not match the network's encoder widths (build the network from the "
                "checkpoint with medcore_monai.networks.load_sam / load_medsam instead):\n  " + "\n  ".join(diffs[:12])
            )
        stored_convs = [int(e["hidden_dim"]) for e in state.get("conv_blocks") or []]
        actual_convs = [int(e["hidden_dim"]) for e in current.get("conv_blocks") or []]
        if stored_convs and stored_convs != actual_convs:
            raise CheckpointError(
                f"checkpoint manifest's MBConv hidden widths {stored_convs} differ from the network's {actual_convs} "
                "(build the network from the checkpoint with medcore_monai.networks.load_sam / load_medsam instead)"
            )
        if state.get("decoder") != current.get("decoder"):
            raise CheckpointError(
                f"checkpoint manifest names decoder {state.get('decoder')!r}, the network has "
                f"{current.get('decoder')!r}"
            )
        restore_kept_indices(self.network, stored_blocks, list(state.get("conv_blocks") or []))
