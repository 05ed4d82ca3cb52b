"""Model layer: SAM/MedSAM building and loading, prunable structure, slimming and compact export.

Modules depend on each other one way only::

    config, checkpoint, conv_groups, sam_import, robust_decoder, taps  (leaves)
      <- structure     heads, MLP channels (and the MBConv channels of conv_groups): masks, slimming, FLOPs
      <- tiny_vit      LiteMedSAM's TinyViT image encoder; litemedsam: where its weights are
      <- manifest      architecture/width manifest, ModelManifest for checkpoint handlers
      <- medsam        MedSAM, RobustMedSAM, as_medsam, early-feature capture
      <- build         build/load/save (plain and RobustSAM decoder), the one checkpoint format
      <- fusion        RobustMedSAM checkpoint fusion
      <- prompt_channel, export
"""

from .build import (
    build_robust_sam,
    build_sam,
    checkpoint_image_size,
    compact_manifest,
    current_config,
    file_sha256,
    load_medsam,
    load_robust_sam,
    load_sam,
    save_robust_sam,
    save_sam,
)
from .checkpoint import (
    CheckpointError,
    extract_state_dict,
    load_state_dict_strict,
    read_checkpoint,
    read_model_state,
)
from .config import SAM_PRESETS, SamConfig, TinyViTConfig, config_from_dict, get_preset, infer_sam_config
from .conv_groups import ConvBlockStructure, conv_blocks, conv_structure
from .fusion import FusionReport, fuse_checkpoints, fuse_state_dicts, strip_robust_decoder
from .litemedsam import litemedsam_checkpoint
from .manifest import ModelManifest, model_manifest
from .medsam import MedSAM, RobustMedSAM, as_medsam
from .robust_decoder import RobustMaskDecoder, has_robust_decoder
from .sam_import import sam_modeling
from .structure import (
    BlockStructure,
    StructuredMasks,
    attach_masks,
    block_flops,
    count_parameters,
    encoder_flops,
    encoder_structure,
    group_sums,
    head_group_sums,
    kept_indices,
    measure_flops,
    mlp_group_sums,
    mlp_layers,
    prunable_blocks,
    slim_block_,
    slim_encoder_,
)
from .taps import captured_outputs, distillation_taps

__all__ = [
    "captured_outputs",
    "distillation_taps",
    "BlockStructure",
    "ConvBlockStructure",
    "FusionReport",
    "RobustMaskDecoder",
    "RobustMedSAM",
    "as_medsam",
    "build_robust_sam",
    "fuse_checkpoints",
    "fuse_state_dicts",
    "has_robust_decoder",
    "load_robust_sam",
    "save_robust_sam",
    "strip_robust_decoder",
    "CheckpointError",
    "MedSAM",
    "ModelManifest",
    "SAM_PRESETS",
    "SamConfig",
    "StructuredMasks",
    "TinyViTConfig",
    "config_from_dict",
    "conv_blocks",
    "conv_structure",
    "litemedsam_checkpoint",
    "mlp_layers",
    "prunable_blocks",
    "attach_masks",
    "block_flops",
    "build_sam",
    "checkpoint_image_size",
    "compact_manifest",
    "count_parameters",
    "current_config",
    "encoder_flops",
    "encoder_structure",
    "extract_state_dict",
    "file_sha256",
    "get_preset",
    "group_sums",
    "head_group_sums",
    "infer_sam_config",
    "kept_indices",
    "load_medsam",
    "load_sam",
    "load_state_dict_strict",
    "measure_flops",
    "mlp_group_sums",
    "model_manifest",
    "read_checkpoint",
    "read_model_state",
    "sam_modeling",
    "save_sam",
    "slim_block_",
    "slim_encoder_",
]
