"""The bundle in MONAI's own idiom: train.yaml ids, MONAI Label's way of driving it, overlays and overrides."""

from __future__ import annotations

import shutil
from pathlib import Path

import monai.bundle
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from medcore_monai.config import ConfigError
from medcore_monai.demo import write_synthetic_pairs
from medcore_monai.networks import StructuredMasks, build_sam, encoder_structure, load_sam, save_sam, slim_encoder_

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"


def _png_pairs(folder: Path, count: int, seed: int) -> list[dict[str, str]]:
    """MONAI Label's training items: bare {"image", "label"} paths, 0/1 PNG labels."""
    return write_synthetic_pairs(folder, count, 64, seed=seed, mask_value=1)


@pytest.fixture()
def bundle_copy(tmp_path) -> Path:
    """The shipped bundle in a temporary folder, as MONAI Label's app holds it (models/ is written to)."""
    target = tmp_path / "medcore_bundle"
    shutil.copytree(REPO / "bundle", target, ignore=shutil.ignore_patterns("eval", "model.pt"))
    return target


def _workflow(files, workflow_type=None, **overrides) -> ConfigWorkflow:
    config = [str(CONFIGS / f) for f in files]
    overrides = {"bundle_root": str(REPO / "bundle"), "progress": False} | overrides
    return ConfigWorkflow(config_file=config, workflow_type=workflow_type, **overrides)


def test_train_config_has_every_monai_train_property():
    workflow = _workflow(["train.yaml"], workflow_type="train")
    workflow.initialize()
    assert not workflow.check_properties()
    for key in ("train#dataset#data", "validate#dataset#data", "train#handlers", "network_def", "network"):
        assert key in workflow.parser


def test_inference_config_has_every_monai_infer_property():
    workflow = ConfigWorkflow(config_file=str(CONFIGS / "inference.yaml"), workflow_type="infer")
    workflow.initialize()
    assert not workflow.check_properties()


def test_monai_label_style_training_writes_the_one_checkpoint_format_and_keeps_pruned_widths(bundle_copy, tmp_path):
    # a pruned (compact) model served by the bundle: MONAI Label loads it into network_def, which reads its widths
    sam = build_sam("tiny", seed=0)
    structure = encoder_structure(sam.image_encoder)
    masks = StructuredMasks.full(structure)
    masks.heads[1][:2] = False
    masks.channels[3][::2] = False
    slim_encoder_(sam.image_encoder, masks)
    model_pt = bundle_copy / "models" / "model.pt"
    save_sam(sam, model_pt)
    before = load_sam(model_pt)

    items = _png_pairs(tmp_path / "datastore", 6, seed=3)
    config_file = bundle_copy / "configs" / "train.yaml"
    # what BundleTrainTask does: insert a CheckpointLoader of models/model.pt first in train#handlers
    parser = monai.bundle.ConfigParser()
    parser.read_config(str(config_file))
    handlers = parser.get("train#handlers")
    handlers.insert(
        0,
        {
            "_target_": "CheckpointLoader",
            "load_path": str(model_pt),
            "load_dict": {"model": "$@network"},
            "strict": False,
        },
    )
    overrides = {
        "bundle_root": str(bundle_copy),
        "device": torch.device("cpu"),
        "train#trainer#max_epochs": 1,
        "train#dataset#data": items[:4],
        "validate#dataset#data": items[4:],
        "train#handlers": handlers,
        "progress": False,
    }
    monai.bundle.run(
        run_id="run", init_id=None, final_id=None, meta_file=str(bundle_copy / "configs" / "metadata.json"),
        config_file=str(config_file), **overrides,
    )  # fmt: skip

    saved = torch.load(model_pt, map_location="cpu", weights_only=True)
    assert set(saved) >= {"model", "medcore"} and "image_encoder.patch_embed.proj.weight" in saved["model"]
    after = load_sam(model_pt)
    assert [b.attn.num_heads for b in after.image_encoder.blocks] == [
        b.attn.num_heads for b in sam.image_encoder.blocks
    ]
    assert after.image_encoder.blocks[3].mlp.lin1.out_features == sam.image_encoder.blocks[3].mlp.lin1.out_features
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert any(k.startswith("image_encoder.") for k in changed) and any(k.startswith("mask_decoder.") for k in changed)
    assert not any(k.startswith("prompt_encoder.") for k in changed)  # not among the trainable modules


def test_a_datastore_mixing_2d_images_and_volumes_batches(tmp_path):
    """MONAI Label's datastore items: bare PNG pairs and a NIfTI volume pair in one training set."""
    import nibabel as nib

    items = _png_pairs(tmp_path / "pngs", 3, seed=1)
    volume = np.random.default_rng(0).normal(100.0, 20.0, (48, 40, 6)).astype(np.float32)
    label = np.zeros(volume.shape, dtype=np.uint8)
    label[10:30, 12:28, 1:5] = 1
    for name, array in (("case.nii.gz", volume), ("case_label.nii.gz", label)):
        nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / name)
    items.append({"image": str(tmp_path / "case.nii.gz"), "label": str(tmp_path / "case_label.nii.gz")})
    workflow = _workflow(["train.yaml"], **{"train#dataset#data": items, "batch_size": 7})
    workflow.initialize()
    batches = list(workflow.parser.get_parsed_content("train#dataloader"))

    assert len(batches) == 1 and batches[0]["image"].shape == (7, 3, 256, 256)  # 3 images + the 4 labelled slices
    pngs = sorted(Path(item["image"]).stem for item in items[:3])  # names come from the image files
    assert sorted(batches[0]["name"]) == sorted([*pngs, "case_s001", "case_s002", "case_s003", "case_s004"])
    assert sorted(batches[0]["slice_index"].tolist()) == [0, 0, 0, 1, 2, 3, 4]


def test_user_overrides_take_effect(tmp_path):
    overlay = tmp_path / "mine.yaml"
    overlay.write_text(
        "+train#handlers:\n  - {_target_: GarbageCollector, trigger_event: epoch}\n"
        "optimizer#lr: 0.5\n"
        "loss#lambda_dice: 0.25\n"
    )
    items = _png_pairs(tmp_path / "data", 3, seed=1)
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.yaml"), str(overlay)],
        workflow_type=None,
        bundle_root=str(REPO / "bundle"),
        progress=False,
        device="cpu",
        **{"train#dataset#data": items, "validate#dataset#data": items[:1], "patience": "0"},
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.optimizer.param_groups[0]["lr"] == 0.5
    assert trainer.loss_function.lambda_dice == 0.25
    collectors = [
        h for h in workflow.parser.get_parsed_content("train#handlers") if type(h).__name__ == "GarbageCollector"
    ]
    assert len(collectors) == 1 and trainer.has_event_handler(collectors[0], Events.EPOCH_COMPLETED)
    # "0" from a command line became the integer default type, which disables early stopping
    assert workflow.parser["patience"] == 0
    assert not any(
        type(h).__name__ == "EarlyStopHandler" for h in workflow.parser.get_parsed_content("validate#handlers")
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"head_sparsty": 0.2}, "unknown key 'head_sparsty' (did you mean head_sparsity"),
        ({"epoch": 3}, "unknown key 'epoch' (did you mean epochs"),
        ({"progress": "maybe"}, "progress must be true or false, got 'maybe'"),
        ({"epochs": "many"}, "epochs must be a number, got 'many'"),
    ],
)
def test_a_misspelt_or_mistyped_key_fails_at_start_naming_it(override, message):
    workflow = _workflow(["train.yaml", "evaluate.yaml"], **override)
    with pytest.raises(RuntimeError) as caught:
        workflow.initialize()
    error = caught.value
    while error is not None and not isinstance(error, ConfigError):
        error = error.__cause__
    assert error is not None and message in str(error)


def test_command_line_booleans_are_parsed():
    workflow = _workflow(["train.yaml"], progress="false", amp="True")
    workflow.initialize()
    assert workflow.parser["progress"] is False and workflow.parser["amp"] is True


def test_ct_preset_windows_hounsfield_units_and_cuts_slices(tmp_path):
    import nibabel as nib

    root = tmp_path / "ct"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    volume = np.full((40, 40, 8), -1000.0, dtype=np.float32)  # air
    volume[5:35, 5:35] = rng.normal(40.0, 10.0, (30, 30, 8))  # soft tissue around the window level
    volume[18:22, 18:22] = 1200.0  # bone, far above the window
    label = np.zeros_like(volume, dtype=np.uint8)
    label[10:20, 12:24, 2:6] = 1
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), root / "images" / "case1.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / "masks" / "case1.nii.gz")
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.yaml"), str(REPO / "configs" / "ct.yaml")],
        workflow_type=None,
        bundle_root=str(REPO / "bundle"),
        progress=False,
    )
    workflow.initialize()
    load = monai.transforms.Compose(workflow.parser.get_parsed_content("transforms#load"))
    loaded = load({"image": str(root / "images" / "case1.nii.gz"), "label": str(root / "masks" / "case1.nii.gz")})
    image = loaded["image"]
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0  # air and bone clipped by the window
    tissue = image[0, 5:15, 5:35]  # soft tissue only (the bone rows are 18-21)
    assert abs(float(tissue.mean()) - (40.0 + 160.0) / 400.0) < 0.05  # level 40 HU, width 400 HU -> 0.5
    slices = monai.transforms.Compose(workflow.parser.get_parsed_content("transforms#slices"))(loaded)
    assert [s["slice_index"] for s in slices] == [2, 3, 4, 5]
    assert slices[0]["image"].shape == (1, 40, 40) and torch.allclose(
        slices[0]["label"].pixdim, torch.tensor([0.8, 0.8], dtype=torch.float64)
    )


def test_prune_overlay_has_every_monai_train_property_and_its_settings_reach_the_components():
    workflow = _workflow(
        ["train.yaml", "prune.yaml"],
        workflow_type="train",
        continuation="true",
        recovery_lr=3e-4,
        protected_blocks=[5],
        boundary_fisher_weight=5.0,
    )
    workflow.initialize()
    assert not workflow.check_properties()
    cascade = workflow.parser.get_parsed_content("cascade")
    assert cascade.continuation is True and cascade.protected_blocks == (5,) and cascade.recovery.lr == 3e-4
    assert workflow.parser.get_parsed_content("calibration#fisher").boundary_weight == 5.0  # the calibration engine
    optimizer = workflow.parser.get_parsed_content("optimizer")  # a factory: rebuilt after every slimming
    assert optimizer([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"] == 3e-4


def test_a_value_the_package_refuses_is_shown_as_one_sentence(capsys):
    from medcore_monai.errors import _short_excepthook, user_error

    workflow = _workflow(["train.yaml", "prune.yaml"], recovery_lr_schedule="cosin")
    workflow.initialize()
    with pytest.raises(RuntimeError) as caught:  # MONAI wraps the RecoveryConfig's refusal
        workflow.parser.get_parsed_content("cascade")
    shown = user_error(caught.value)
    assert isinstance(shown, ValueError) and "lr_schedule must be one of ('constant', 'cosine')" in str(shown)
    _short_excepthook(type(caught.value), caught.value, caught.value.__traceback__)
    assert capsys.readouterr().err.startswith("error: lr_schedule must be one of")
    try:  # a ValueError raised inside torch is an internal failure: the wrapper stays, with its traceback
        try:
            torch.nn.functional.binary_cross_entropy(torch.zeros(2), torch.zeros(3))
        except ValueError as inner:
            raise RuntimeError("Failed to instantiate") from inner
    except RuntimeError as wrapped:
        assert isinstance(wrapped.__cause__, ValueError) and user_error(wrapped) is wrapped


def test_a_misspelt_component_argument_fails_naming_it():
    workflow = _workflow(["train.yaml", "prune.yaml"], **{"cascade#min_keep_head": 2})
    workflow.initialize()
    with pytest.raises(RuntimeError) as caught:
        workflow.parser.get_parsed_content("cascade")
    chain, error = [], caught.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__
    assert any("min_keep_head" in message for message in chain)


def test_evaluating_a_small_folder_counts_ct_like_values_under_the_mr_rule(tmp_path, capfd):
    """Two volumes (too few to split) evaluated with eval_split all; the CT-like one is warned about and counted."""
    import json

    import nibabel as nib

    from medcore_monai.bundle import run_workflow

    root = tmp_path / "mixed"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name, low in (("ct_case", -1000.0), ("mr_case", 0.0)):
        volume = rng.normal(300, 50, (40, 40, 6)).astype(np.float32)
        volume[:5] = low
        label = np.zeros(volume.shape, np.uint8)
        label[10:25, 12:30, 1:5] = 1
        nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "images" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "masks" / f"{name}.nii.gz")
    out = tmp_path / "out"
    run_workflow(
        "evaluate", ("train.yaml", "evaluate.yaml"), output_dir=str(out),
        checkpoint=str(REPO / "bundle" / "models" / "medsam_tiny.pth"), data_roots=[str(root)], eval_split="all",
        latency=False, progress=False, device="cpu",
    )  # fmt: skip
    metrics = json.loads((out / "evaluation" / "evaluation.json").read_text())["metrics"]["mixed"]
    assert metrics["n"] == 2 and metrics["suspicious_values"] == 1
    captured = capfd.readouterr()
    log = captured.out + captured.err  # the bundle's logging.conf writes to standard output
    assert "ct_case.nii.gz has values down to -1000 (CT-like)" in log and "mr_case.nii.gz has" not in log


def test_command_line_null_and_none_mean_no_value():
    workflow = _workflow(["train.yaml"], split_manifest="null", tensorboard_dir="None")
    workflow.initialize()
    assert workflow.parser["split_manifest"] is None and workflow.parser["tensorboard_dir"] is None
