"""Serving the bundle with MONAI Label: emulates ``BundleInferTask`` (monailabel 0.8.5) without installing it.

The emulation follows ``monailabel/tasks/infer/bundle.py`` and ``basic_infer.py``: parse
``configs/inference.yaml``, set ``bundle_root``, build ``network_def``, load ``models/model.pt`` into
a deep copy of it (``checkpoint.get("model", checkpoint)``), run the pre-transforms one by one on the
request dict, ``inferer(image[None], network)`` under ``no_grad``, the post-transforms, and finally
``Restored`` (resize to ``image.meta["spatial_shape"]``, drop a singleton channel).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata
from monai.inferers import SimpleInferer
from monai.transforms import Compose, LoadImaged, Resize
from PIL import Image

from medcore_monai.networks import MedSAM, checkpoint_image_size, load_sam, model_manifest, save_sam, slim_block_
from medcore_monai.networks.prompt_channel import BoxChannelMedSAM, boxes_from_channel
from medcore_monai.transforms.medsam import (
    EnsureThreeChanneld,
    LoadImage2Dd,
    MinMaxScaled,
    ResizeForSAMd,
    box_from_mask,
)
from medcore_monai.transforms.prompts import BoxToChanneld, EnsureSpatial2Dd, box_mask, parse_box

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


def _restored(data: dict) -> dict:
    """MONAI Label's ``Restored``: resize to the loaded spatial shape, drop a singleton channel."""
    pred, shape = data["pred"], tuple(int(s) for s in data["image"].meta["spatial_shape"])
    if tuple(pred.shape[1:]) != shape:
        pred = Resize(spatial_size=shape, mode="nearest")(pred)
    data["pred"] = pred[0] if pred.ndim > 3 or pred.shape[0] == 1 else pred
    return data


def serve(bundle_root: Path, request: dict, strict: bool = True) -> tuple[dict, torch.nn.Module]:
    """Run one request the way ``BundleInferTask.__call__`` does; returns the post-processed data."""
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.config.update({"bundle_root": str(bundle_root)})
    network_def = parser.get_parsed_content("network_def", instantiate=True)
    meta = json.loads(METADATA.read_text())
    key_image = next(iter(meta["network_data_format"]["inputs"]))
    key_pred = next(iter(meta["network_data_format"]["outputs"]))

    network = copy.deepcopy(network_def).to(torch.device("cpu"))  # BasicInferTask._get_network
    checkpoint = torch.load(bundle_root / "models" / "model.pt", map_location="cpu")
    network.load_state_dict(checkpoint.get("model", checkpoint), strict=strict)
    network.eval()

    parser.config.update({"device": "cpu"})  # _update_device
    pre = parser.get_parsed_content("preprocessing", instantiate=True)
    pre = list(pre.transforms) if isinstance(pre, Compose) else pre
    data = copy.deepcopy(request) | {"image_path": request["image"]}
    for transform in pre:
        if isinstance(transform, LoadImaged):
            transform._loader.image_only = False
        data = transform(data)
    with torch.no_grad():
        data[key_pred] = SimpleInferer()(data[key_image][None], network)[0]
    post = parser.get_parsed_content("postprocessing", instantiate=True)
    for transform in list(post.transforms) if isinstance(post, Compose) else post:
        data = transform(data)
    return _restored(data), network


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


@pytest.mark.parametrize("layout", ["model_key", "raw"])
def test_request_with_roi_matches_medsam(tmp_path, png_path, layout):
    state = load_sam(SHIPPED).state_dict()
    root = _bundle(tmp_path, {"model": state} if layout == "model_key" else state)
    data, network = serve(root, {"image": str(png_path), "roi": ROI})

    pred = data["pred"]
    assert pred.dtype == torch.uint8 and set(pred.unique().tolist()) <= {0, 1}
    assert tuple(pred.shape) == (WIDTH, HEIGHT)  # MONAI's (x, y) order; MONAI Label's writer transposes back
    pred = pred.as_tensor().T.numpy().astype(bool)

    image = _medsam_input(png_path)
    served = data["image"].as_tensor()
    torch.testing.assert_close(served[:3], image[0])  # same pixels and orientation as MedSAM's pre-processing
    native = box_mask(ROI, (WIDTH, HEIGHT))[0].T  # the roi drawn in (row, column)
    resized = ResizeForSAMd(size=SIZE)({"image": torch.zeros(1, HEIGHT, WIDTH), "label": native[None]})["label"]
    torch.testing.assert_close(boxes_from_channel(served[3][None])[0], box_from_mask(resized))

    medsam = MedSAM(load_sam(SHIPPED)).eval()
    with torch.no_grad():
        reference = medsam.predict_logits(image, _scaled_box(ROI, HEIGHT, WIDTH), size=(HEIGHT, WIDTH))[0, 0] > 0
    assert (pred == reference.numpy()).mean() >= 0.99
    ellipse = _ellipse()
    assert (pred & ellipse).sum() / (pred | ellipse).sum() > 0.7  # the shipped tiny MedSAM finds the ellipse


@pytest.mark.parametrize("roi", [None, []])
def test_missing_roi_segments_with_the_whole_image_box(tmp_path, png_path, roi):
    root = _bundle(tmp_path, source=SHIPPED)  # the shipped fp16 raw state dict as model.pt
    request = {"image": str(png_path)} | ({} if roi is None else {"roi": roi})
    data, network = serve(root, request)
    assert tuple(data["pred"].shape) == (WIDTH, HEIGHT)
    assert set(data["pred"].unique().tolist()) <= {0, 1}

    image = _medsam_input(png_path)
    whole = torch.tensor([[0.0, 0.0, SIZE - 1.0, SIZE - 1.0]])
    with torch.no_grad():
        expected = MedSAM(load_sam(SHIPPED)).eval().predict_logits(image, whole)
        served = network(data["image"][None])
    torch.testing.assert_close(served, expected)


@pytest.mark.parametrize(
    ("roi", "message"),
    [
        ([10, 10, 40], "four numbers"),
        ([10, 10, 40, 40, 2, 5], "four numbers"),
        ([40, 10, 10, 40], "x0 < x1 and y0 < y1"),
        ([10, 30, 40, 30], "x0 < x1 and y0 < y1"),
        ([200, 200, 300, 300], "outside the image"),
        ([-50, 5, -1, 20], "outside the image"),
        ([0, float("nan"), 10, 10], "non-finite"),
        (["a", 1, 2, 3], "four numbers"),
    ],
)
def test_invalid_roi_is_a_clear_error(tmp_path, png_path, roi, message):
    root = _bundle(tmp_path, source=SHIPPED)
    with pytest.raises(ValueError, match=message):
        serve(root, {"image": str(png_path), "roi": roi})


def test_roi_is_clipped_rounded_and_exclusive():
    assert parse_box([-5, 2.4, 12.2, 100], (10, 20)) == (0, 2, 10, 20)
    mask = box_mask([1, 2, 3, 5], (4, 6))[0]
    assert mask.sum() == 2 * 3 and mask[1:3, 2:5].all()  # x indexes axis 0, ends exclusive
    assert box_mask(None, (4, 6)).sum() == 0


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
    medsam = MedSAM(load_sam(path)).eval()
    with torch.no_grad():
        served_input = data["image"][None].as_tensor()
        expected = medsam.predict_logits(served_input[:, :3], boxes_from_channel(served_input[:, 3]))
        served = network(served_input)
    torch.testing.assert_close(served, expected)
    assert tuple(data["pred"].shape) == (WIDTH, HEIGHT)


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
    assert tuple(from_nifti["pred"].shape) == (WIDTH, HEIGHT, 1)  # the loaded shape, for MONAI Label's writer
    torch.testing.assert_close(from_nifti["pred"][..., 0].as_tensor(), from_png["pred"].as_tensor())


def test_a_volume_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="2-D images"):
        EnsureSpatial2Dd(keys="image")({"image": torch.zeros(1, 8, 8, 4)})
    with pytest.raises(ValueError, match="channel-first 2-D"):
        BoxToChanneld(keys="image")({"image": torch.zeros(3, 8, 8, 4), "roi": [0, 0, 2, 2]})


def test_label_checkpoint_round_trips(tmp_path, compact_sam):
    path = save_sam(compact_sam, tmp_path / "model.pt")
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert {"model", "medcore"} <= set(stored) and list(stored["model"]) == list(compact_sam.state_dict())
    rebuilt = load_sam(path)
    assert rebuilt.image_encoder.blocks[1].attn.num_heads == 2
    assert checkpoint_image_size(path) == SIZE
