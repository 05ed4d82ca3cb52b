"""The bundle's served pipeline (``configs/inference.yaml``): box-channel network, transforms and inferer, in process.

A real MONAI Label server runs the same config in ``tests/test_label_server.py``; these tests pin the pieces.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata
from monai.data import MetaTensor
from monai.transforms import Compose
from PIL import Image

from medcore_monai.inferers import BoxChannelInferer
from medcore_monai.networks import MedSAM, checkpoint_image_size, load_sam, model_manifest, save_sam, slim_block_
from medcore_monai.networks.prompt_channel import BoxChannelMedSAM, boxes_from_channel
from medcore_monai.transforms.medsam import (
    EnsureThreeChanneld,
    LoadImage2Dd,
    MinMaxScaled,
    ResizeForSAMd,
)
from medcore_monai.transforms.prompts import BoxToChanneld, EnsureSpatial2Dd, RestoreLoadedShaped, box_mask, parse_box

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "bundle" / "configs" / "inference.yaml"
METADATA = REPO / "bundle" / "configs" / "metadata.json"
SHIPPED = REPO / "bundle" / "models" / "medsam_tiny.pth"
SIZE = 256
HEIGHT, WIDTH = 70, 90  # not square, so a swapped axis cannot pass unnoticed
ROI = [22, 12, 80, 50]  # [x0, y0, x1, y1]: x = column, y = row of the PNG; ends exclusive


# --------------------------------------------------------------------------- fixtures and the emulator


def _ellipse() -> np.ndarray:
    rows, cols = np.mgrid[:HEIGHT, :WIDTH]
    return ((rows - 31) / 15) ** 2 + ((cols - 50) / 25) ** 2 < 1


@pytest.fixture(scope="module")
def png_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    base = np.where(_ellipse(), 190.0, 40.0) + rng.normal(0, 8, (HEIGHT, WIDTH))
    rgb = np.stack([base * f for f in (1.0, 0.85, 0.7)], axis=-1)  # channels differ: their order is checked too
    path = tmp_path_factory.mktemp("png") / "ellipse.png"
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def compact_sam():
    sam = load_sam(SHIPPED)
    slim_block_(sam.image_encoder.blocks[1], keep_heads=[0, 2], keep_channels=range(0, 768, 3))
    return sam


def _bundle(tmp_path: Path, payload=None, source: Path | None = None) -> Path:
    """A bundle folder whose ``models/model.pt`` is ``payload`` (torch.save) or a copy of ``source``."""
    models = tmp_path / "bundle" / "models"
    models.mkdir(parents=True)
    if payload is not None:
        torch.save(payload, models / "model.pt")
    else:
        (models / "model.pt").write_bytes(Path(source).read_bytes())
    return tmp_path / "bundle"


def serve(bundle_root: Path, request: dict, strict: bool = True) -> tuple[dict, torch.nn.Module]:
    """Run one request through the bundle's served pipeline (``configs/inference.yaml``), in process.

    The network is built from ``network_def`` and ``models/model.pt`` is loaded into it as MONAI Label loads it
    (``checkpoint.get("model", checkpoint)``); MONAI Label's own steps around it are exercised by the real server
    in ``tests/test_label_server.py``.
    """
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.config.update({"bundle_root": str(bundle_root), "device": "cpu"})
    network = parser.get_parsed_content("network_def", instantiate=True)
    checkpoint = torch.load(bundle_root / "models" / "model.pt", map_location="cpu")
    network.load_state_dict(checkpoint.get("model", checkpoint), strict=strict)
    network.eval()
    data = parser.get_parsed_content("preprocessing", instantiate=True)(copy.deepcopy(request))
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer", instantiate=True)(data["image"][None], network)[0]
    return parser.get_parsed_content("postprocessing", instantiate=True)(data), network


def _medsam_input(png: Path) -> torch.Tensor:
    """The project's own MedSAM pre-processing of a 2-D file: ``[1, 3, S, S]`` in (row, column) order."""
    pipeline = Compose(
        [
            LoadImage2Dd(keys=("image",)),
            EnsureThreeChanneld(keys=("image",)),
            ResizeForSAMd(size=SIZE, allow_missing_keys=True),
            MinMaxScaled(keys=("image",)),
        ]
    )
    return pipeline({"image": str(png)})["image"].as_tensor()[None]


def _scaled_box(roi, height: int, width: int) -> torch.Tensor:
    x0, y0, x1, y1 = roi
    return torch.tensor([[x0 * SIZE / width, y0 * SIZE / height, x1 * SIZE / width, y1 * SIZE / height]])


# --------------------------------------------------------------------------- the network_def


def test_state_dict_keys_are_sam_keys_and_load_strictly():
    sam = load_sam(SHIPPED)
    net = BoxChannelMedSAM(checkpoint=str(SHIPPED))
    assert list(net.state_dict()) == list(sam.state_dict())
    assert list(MedSAM(sam).state_dict()) == list(sam.state_dict())
    net.load_state_dict(sam.state_dict(), strict=True)
    shared = BoxChannelMedSAM(model=sam)
    assert shared.image_encoder is sam.image_encoder  # a ready model is wrapped, not copied
    with pytest.raises(ValueError, match="exactly one"):
        BoxChannelMedSAM()


def test_forward_equals_medsam_with_the_box_of_the_channel():
    net = BoxChannelMedSAM(checkpoint=str(SHIPPED)).eval()
    x = torch.rand(2, 4, SIZE, SIZE)
    x[:, 3] = 0
    x[0, 3, 40:120, 60:200] = 1  # rows 40..119, columns 60..199
    boxes = torch.tensor([[60.0, 40.0, 199.0, 119.0], [0.0, 0.0, SIZE - 1.0, SIZE - 1.0]])  # empty -> whole image
    torch.testing.assert_close(boxes_from_channel(x[:, 3]), boxes)
    with torch.no_grad():
        out = net(x)
        expected = MedSAM(load_sam(SHIPPED)).eval().predict_logits(x[:, :3], boxes)
    assert out.shape == (2, 1, SIZE, SIZE)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="RGB \\+ box mask"):
        net(torch.rand(1, 3, SIZE, SIZE))


# --------------------------------------------------------------------------- the BundleInferTask contract


def test_metadata_is_read_as_a_2d_box_channel_model():
    verify_metadata(meta_file=str(METADATA), filepath=str(REPO / "bundle" / "schema" / "meta_schema.json"))
    meta = json.loads(METADATA.read_text())
    key, image = next(iter(meta["network_data_format"]["inputs"].items()))
    key_pred, pred = next(iter(meta["network_data_format"]["outputs"].items()))
    assert (key, key_pred) == ("image", "pred")
    assert len(image["spatial_shape"]) == 2 and image["num_channels"] == 4 and image["channel_def"]["3"] == "box"
    labels = {v.lower(): int(k) for k, v in pred["channel_def"].items() if v.lower() != "background"}
    assert labels == {"foreground": 1}  # the value of the post-processed 0/1 map
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    assert "run" not in parser.config  # pitfall P5
    assert checkpoint_image_size(SHIPPED) == image["spatial_shape"][0] == SIZE


def _reference_mask(png: Path, roi, checkpoint: Path = SHIPPED) -> np.ndarray:
    """MedSAM's own prediction for a PNG and an roi: ``(row, column)`` bool mask at native size."""
    medsam = MedSAM(load_sam(checkpoint)).eval()
    with torch.no_grad():
        logits = medsam.predict_logits(_medsam_input(png), _scaled_box(roi, HEIGHT, WIDTH), size=(HEIGHT, WIDTH))
    return (logits[0, 0] > 0).numpy()


@pytest.mark.parametrize("layout", ["model_key", "raw"])
def test_request_with_roi_matches_medsam(tmp_path, png_path, layout):
    state = load_sam(SHIPPED).state_dict()
    root = _bundle(tmp_path, {"model": state} if layout == "model_key" else state)
    data, _ = serve(root, {"image": str(png_path), "roi": ROI})

    pred = data["pred"]
    assert isinstance(pred, np.ndarray) and pred.dtype == np.uint8 and set(np.unique(pred)) <= {0, 1}
    assert pred.shape == (WIDTH, HEIGHT)  # MONAI's loaded (x, y) layout, no channel: what MONAI Label writes
    pred = pred.T.astype(bool)

    served = data["image"].as_tensor()  # native size, rows first: image channels and the box channel
    native = Compose([LoadImage2Dd(keys=("image",)), EnsureThreeChanneld(keys=("image",))])({"image": str(png_path)})
    torch.testing.assert_close(served[:3], native["image"].as_tensor().float())
    torch.testing.assert_close(served[3], box_mask(ROI, (WIDTH, HEIGHT))[0].T)

    assert (pred == _reference_mask(png_path, ROI)).mean() >= 0.99
    ellipse = _ellipse()
    assert (pred & ellipse).sum() / (pred | ellipse).sum() > 0.7  # the shipped tiny MedSAM finds the ellipse


@pytest.mark.parametrize("roi", [None, []])
def test_missing_roi_segments_with_the_whole_image_box(tmp_path, png_path, roi):
    root = _bundle(tmp_path, source=SHIPPED)  # the shipped fp16 raw state dict as model.pt
    request = {"image": str(png_path)} | ({} if roi is None else {"roi": roi})
    data, _ = serve(root, request)
    assert data["pred"].shape == (WIDTH, HEIGHT)
    whole = [0, 0, WIDTH, HEIGHT]  # exclusive ends: the box [0, 0, W - 1, H - 1] the network reads off an empty channel
    assert (data["pred"].T.astype(bool) == _reference_mask(png_path, whole)).mean() >= 0.99


@pytest.mark.parametrize(
    ("roi", "message"),
    [
        ([10, 10, 40], "must be 4 numbers"),
        ([10, 10, 40, 40, 2, 5], "must be 4 numbers"),
        ([40, 10, 10, 40], "every start below its end"),
        ([10, 30, 40, 30], "every start below its end"),
        ([200, 200, 300, 300], "outside the image"),
        ([-50, 5, -1, 20], "outside the image"),
        ([0, float("nan"), 10, 10], "non-finite"),
        (["a", 1, 2, 3], "must be numbers"),
    ],
)
def test_invalid_roi_is_a_clear_error(tmp_path, png_path, roi, message):
    root = _bundle(tmp_path, source=SHIPPED)
    with pytest.raises(RuntimeError) as raised:  # MONAI's Compose wraps the transform's ValueError
        serve(root, {"image": str(png_path), "roi": roi})
    cause = raised.value.__cause__
    assert isinstance(cause, ValueError) and message in str(cause)


def test_roi_is_clipped_rounded_and_exclusive():
    assert parse_box([-5, 2.4, 12.2, 100], (10, 20)) == ((0, 10), (2, 20))
    mask = box_mask([1, 2, 3, 5], (4, 6))[0]
    assert mask.sum() == 2 * 3 and mask[1:3, 2:5].all()  # x indexes axis 0, ends exclusive
    assert box_mask(None, (4, 6)).sum() == 0
    volume_box = box_mask([1, 2, 3, 5, 4, 6], (4, 6, 8))[0]  # MONAI Label's 3-D order: x0 y0 x1 y1 z0 z1
    assert volume_box.sum() == 2 * 3 * 2 and volume_box[1:3, 2:5, 4:6].all()
    assert parse_box([0, 0, 4, 6, -3, 2.5], (4, 6, 8))[2] == (0, 3)
    with pytest.raises(ValueError, match="must be 6 numbers"):
        parse_box([0, 0, 4, 6], (4, 6, 8))
    with pytest.raises(ValueError, match="outside the image"):
        parse_box([0, 0, 4, 6, 8, 9], (4, 6, 8))


def _version1_checkpoint(sam: torch.nn.Module, path: Path) -> Path:
    """The layout save_sam wrote before format version 2: the state under ``state_dict``."""
    payload = {"format": "medcore-sam", "format_version": 1, "medcore": model_manifest(sam)}
    torch.save({**payload, "state_dict": sam.state_dict(), "metadata": {}}, path)
    return path


@pytest.mark.parametrize("layout", ["save_sam", "version1"])
def test_compact_pruned_checkpoint_through_the_config(tmp_path, png_path, compact_sam, layout):
    path = tmp_path / "compact.pt"
    if layout == "save_sam":
        save_sam(compact_sam, path)
    else:
        _version1_checkpoint(compact_sam, path)
    root = _bundle(tmp_path, source=path)
    # Version 1 stored the state under "state_dict": MONAI Label then finds no "model" key, its default
    # non-strict load changes nothing, and the weights the network_def read from the same file stay in place.
    data, network = serve(root, {"image": str(png_path), "roi": ROI}, strict=layout == "save_sam")

    block = network.image_encoder.blocks[1]
    assert block.attn.num_heads == 2 and block.mlp.lin1.out_features == 256
    assert data["pred"].shape == (WIDTH, HEIGHT)
    assert (data["pred"].T.astype(bool) == _reference_mask(png_path, ROI, checkpoint=path)).mean() >= 0.99


def test_two_dimensional_nifti_matches_the_png(tmp_path, png_path):
    nib = pytest.importorskip("nibabel")
    grey = np.asarray(Image.open(png_path))[..., 0].astype(np.float32)
    nifti = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(grey.T[..., None], np.eye(4)), nifti)  # stored X x Y x 1, x = column
    grey_png = tmp_path / "grey.png"
    Image.fromarray(grey.astype(np.uint8)).save(grey_png)
    root = _bundle(tmp_path, source=SHIPPED)

    from_nifti, _ = serve(root, {"image": str(nifti), "roi": ROI})
    from_png, _ = serve(root, {"image": str(grey_png), "roi": ROI})
    assert from_nifti["pred"].shape == (WIDTH, HEIGHT, 1)  # the loaded shape, for MONAI Label's writer
    np.testing.assert_array_equal(from_nifti["pred"][..., 0], from_png["pred"])


def _volume(tmp_path: Path, depth: int = 7) -> tuple[Path, np.ndarray]:
    """A small MR-like NIfTI volume (x = 70, y = 90, z = depth) holding the ellipse in every slice, and its mask."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(1)
    mask = np.repeat(_ellipse()[..., None], depth, axis=2)
    volume = np.where(mask, 400.0, 100.0) + rng.normal(0, 15, mask.shape)
    path = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.float32), np.diag([0.8, 0.8, 2.0, 1.0])), path)
    return path, mask


def test_a_volume_is_segmented_slice_by_slice_inside_its_3d_box(tmp_path):
    path, mask = _volume(tmp_path)
    root = _bundle(tmp_path, source=SHIPPED)
    roi = [12, 22, 50, 80, 2, 5]  # x = axis 0 (rows of the ellipse), y = axis 1, slices 2..4
    data, network = serve(root, {"image": str(path), "roi": roi})

    pred = data["pred"]
    assert pred.shape == mask.shape and pred.dtype == np.uint8 and set(np.unique(pred)) <= {0, 1}
    assert pred[..., :2].sum() == 0 and pred[..., 5:].sum() == 0  # slices outside the box are not segmented
    inside = pred[..., 2:5].astype(bool)
    assert (inside & mask[..., 2:5]).sum() / (inside | mask[..., 2:5]).sum() > 0.7

    # each slice is the 2-D pipeline of that slice: same prediction as serving it on its own (no transpose:
    # volume slices keep the layout train.yaml cuts them in)
    inferer = BoxChannelInferer(size=SIZE)
    plane = data["image"].as_tensor()[..., 3]
    with torch.no_grad():
        alone = inferer(plane[None], network)[0, 0] > 0
    np.testing.assert_array_equal(pred[..., 3], alone.numpy().astype(np.uint8))


@pytest.mark.parametrize(("roi", "message"), [(None, "a volume needs a box"), ([1, 2, 30, 40], "must be 6 numbers")])
def test_a_volume_without_a_3d_box_is_refused(tmp_path, roi, message):
    path, _ = _volume(tmp_path)
    root = _bundle(tmp_path, source=SHIPPED)
    with pytest.raises(RuntimeError) as raised:
        serve(root, {"image": str(path)} | ({} if roi is None else {"roi": roi}))
    assert message in str(raised.value.__cause__)


def test_dimension_checks_of_the_serving_transforms():
    with pytest.raises(ValueError, match="2-D images"):
        EnsureSpatial2Dd(keys="image")({"image": torch.zeros(1, 8, 8, 4)})
    volume = EnsureSpatial2Dd(keys="image", allow_volumes=True)({"image": torch.zeros(1, 8, 8, 4)})["image"]
    assert volume.shape == (1, 8, 8, 4)
    with pytest.raises(ValueError, match="2-D images or 3-D volumes"):
        EnsureSpatial2Dd(keys="image", allow_volumes=True)({"image": torch.zeros(1, 8, 8, 4, 3)})
    with pytest.raises(ValueError, match="channel-first 2-D or 3-D"):
        BoxToChanneld(keys="image")({"image": torch.zeros(3, 8), "roi": [0, 0, 2, 2]})
    with pytest.raises(ValueError, match="inputs"):
        BoxChannelInferer(size=SIZE)(torch.zeros(1, 4, 8), torch.nn.Identity())


def test_restore_loaded_shape_gives_what_monai_label_writes():
    image = MetaTensor(torch.zeros(4, 70, 90), meta={"spatial_shape": np.array([90, 70, 1])})
    pred = np.zeros((1, 90, 70), dtype=np.uint8)
    out = RestoreLoadedShaped(keys="pred")({"image": image, "pred": pred})["pred"]
    assert out.shape == (90, 70, 1)
    with pytest.raises(ValueError, match="loaded shape"):
        RestoreLoadedShaped(keys="pred")({"image": image, "pred": np.zeros((2, 90, 70))})


def test_label_checkpoint_round_trips(tmp_path, compact_sam):
    path = save_sam(compact_sam, tmp_path / "model.pt")
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert {"model", "medcore"} <= set(stored) and list(stored["model"]) == list(compact_sam.state_dict())
    rebuilt = load_sam(path)
    assert rebuilt.image_encoder.blocks[1].attn.num_heads == 2
    assert checkpoint_image_size(path) == SIZE
