"""Tests for the MedSAM preprocessing transforms, the pipeline and the caching datasets."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset
from PIL import Image
from skimage.transform import resize

from medcore_monai.data import DataError, build_dataset, folder_pairs, read_image_2d
from medcore_monai.transforms import (
    BinarizeMaskd,
    BoxFromMaskd,
    EnsureThreeChanneld,
    LoadImage2Dd,
    MinMaxScaled,
    RandBoxFromMaskd,
    ResizeForSAMd,
    box_from_mask,
    jitter_seed,
    medsam_preprocess,
)

H, W = 40, 60
SIZE = 64
# Foreground rectangle rows 8..23, columns 12..41 in native pixels.
ROWS, COLS = slice(8, 24), slice(12, 42)


def rectangle(value: float = 1.0, shape: tuple[int, int] = (H, W), dtype=np.uint8) -> np.ndarray:
    mask = np.zeros(shape, dtype=dtype)
    mask[ROWS, COLS] = value
    return mask


def noisy_rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 230, size=(H, W, 3), dtype=np.uint8)


def model_mask(size: int = SIZE) -> torch.Tensor:
    """The 0/1 mask as it looks after the nearest-neighbour resize, as (1, size, size)."""
    native = rectangle(1.0, dtype=np.float32)
    resized = resize(native, (size, size), order=0, preserve_range=True, anti_aliasing=False)
    return torch.from_numpy(resized[None].astype(np.float32))


@pytest.fixture()
def png_item(tmp_path: Path) -> dict:
    Image.fromarray(noisy_rgb()).save(tmp_path / "img.png")
    Image.fromarray(rectangle(255)).save(tmp_path / "mask.png")
    return {"image": str(tmp_path / "img.png"), "label": str(tmp_path / "mask.png"), "name": "sample_0"}


@pytest.fixture()
def mixed_root(tmp_path: Path) -> Path:
    """One dataset folder with every supported file type and mask encoding."""
    root = tmp_path / "mixed"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(noisy_rgb(1)).save(root / "images" / "1.png")
    Image.fromarray(rectangle(255)).save(root / "masks" / "1.png")  # 0/255 PNG
    Image.fromarray(noisy_rgb(2)).save(root / "images" / "2.jpg", quality=80)
    Image.fromarray(np.stack([rectangle(255)] * 3, -1)).save(root / "masks" / "2.jpg", quality=75)  # JPEG RGB
    Image.fromarray(noisy_rgb(3)[..., 0]).save(root / "images" / "3.bmp")  # grey BMP
    Image.fromarray(rectangle(1)).save(root / "masks" / "3.png")  # 0/1 mask
    deep = np.random.default_rng(4).integers(0, 65535, size=(H, W, 3), dtype=np.uint16)
    tifffile.imwrite(root / "images" / "4.tif", deep)  # 16-bit RGB: only tifffile reads it exactly
    tifffile.imwrite(root / "masks" / "4.tiff", rectangle(1.0, dtype=np.float32))  # float mask
    rgba = np.concatenate([noisy_rgb(5), np.full((H, W, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(root / "images" / "5.png")
    Image.fromarray(rectangle(255)).save(root / "masks" / "5.bmp")
    return root


# --------------------------------------------------------------------------- loading


def test_load_paths_channel_first_with_meta(png_item: dict) -> None:
    out = LoadImage2Dd(keys=("image", "label"))(png_item)
    image, label = out["image"], out["label"]
    assert isinstance(image, MetaTensor) and image.dtype == torch.float32
    assert image.shape == (3, H, W) and label.shape == (1, H, W)
    np.testing.assert_array_equal(image.numpy(), np.moveaxis(noisy_rgb(), -1, 0))
    assert image.meta["filename_or_obj"] == png_item["image"]
    assert image.meta["original_shape"] == (H, W)
    assert image.meta["spacing"] == (1.0, 1.0)
    assert out["original_shape"].tolist() == [H, W]
    assert out["spacing"].tolist() == [1.0, 1.0]


def test_load_arrays_pass_through_with_spacing() -> None:
    item = {"image": np.ones((H, W), np.float32), "label": rectangle(), "name": "v_s001", "spacing": (0.7, 1.5)}
    out = LoadImage2Dd(keys=("image", "label"))(item)
    assert out["image"].shape == (1, H, W) and out["image"].dtype == torch.float32
    assert out["image"].meta["spacing"] == (0.7, 1.5)
    assert out["image"].meta["filename_or_obj"] == "v_s001"
    torch.testing.assert_close(out["spacing"], torch.tensor([0.7, 1.5]))


def test_load_size_mismatch_names_both_files(tmp_path: Path) -> None:
    Image.fromarray(noisy_rgb()).save(tmp_path / "photo.png")
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(tmp_path / "outline.png")
    item = {"image": str(tmp_path / "photo.png"), "label": str(tmp_path / "outline.png")}
    with pytest.raises(DataError, match="photo.png") as error:
        LoadImage2Dd(keys=("image", "label"))(item)
    assert "outline.png" in str(error.value)


# --------------------------------------------------------------------------- channels, masks, scaling


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_ensure_three_channels(channels: int) -> None:
    image = torch.arange(channels * 4, dtype=torch.float32).reshape(channels, 2, 2)
    out = EnsureThreeChanneld(keys=("image",))({"image": image})["image"]
    assert out.shape == (3, 2, 2)
    if channels in (1, 2):
        assert all(torch.equal(out[c], image[0]) for c in range(3))
    else:
        assert torch.equal(out, image[:3])


def test_ensure_three_channels_rejects_five(png_item: dict) -> None:
    loaded = LoadImage2Dd(keys=("image",))(png_item)
    loaded["image"] = MetaTensor(torch.zeros(5, H, W), meta=loaded["image"].meta)
    with pytest.raises(DataError, match="img.png"):
        EnsureThreeChanneld(keys=("image",))(loaded)


@pytest.mark.parametrize("value", [1, 255])
def test_binarize_zero_one_and_zero_255(value: int) -> None:
    out = BinarizeMaskd(keys=("label",))({"label": torch.from_numpy(rectangle(value)[None])})["label"]
    assert out.dtype == torch.float32 and out.shape == (1, H, W)
    np.testing.assert_array_equal(out[0].numpy(), rectangle(1))


def test_binarize_jpeg_mask_uses_first_channel(tmp_path: Path) -> None:
    Image.fromarray(np.stack([rectangle(255)] * 3, -1)).save(tmp_path / "m.jpg", quality=60)
    noisy = read_image_2d(tmp_path / "m.jpg")
    assert len(np.unique(noisy)) > 2  # the JPEG really is noisy
    out = BinarizeMaskd(keys=("label",))({"label": torch.from_numpy(np.moveaxis(noisy, -1, 0).copy())})["label"]
    np.testing.assert_array_equal(out[0].numpy(), rectangle(1))


def test_binarize_label_value_selects_one_label() -> None:
    labels = rectangle(2)
    labels[0:3, 0:3] = 1
    out = BinarizeMaskd(keys=("label",), label_value=1)({"label": torch.from_numpy(labels[None])})["label"]
    assert out.sum() == 9


def test_min_max_scale_joint_over_channels() -> None:
    image = torch.tensor([[[10.0, 20.0]], [[30.0, 50.0]]])
    out = MinMaxScaled(keys=("image",))({"image": image})["image"]
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.25]], [[0.5, 1.0]]]))
    constant = MinMaxScaled(keys=("image",))({"image": torch.full((3, 2, 2), 7.0)})["image"]
    assert torch.count_nonzero(constant) == 0


# --------------------------------------------------------------------------- resizing


def test_resize_shapes_and_skimage_reference() -> None:
    image = torch.from_numpy(np.moveaxis(noisy_rgb().astype(np.float32), -1, 0).copy())
    label = torch.from_numpy(rectangle(1, dtype=np.float32)[None])
    out = ResizeForSAMd(size=SIZE)({"image": image, "label": label})
    assert out["image"].shape == (3, SIZE, SIZE) and out["image"].dtype == torch.float32
    assert out["label"].shape == (1, SIZE, SIZE) and out["label_lowres"].shape == (1, SIZE // 4, SIZE // 4)
    assert set(out["label"].unique().tolist()) == {0.0, 1.0}
    assert set(out["label_lowres"].unique().tolist()) == {0.0, 1.0}
    reference = resize(noisy_rgb().astype(np.float64), (SIZE, SIZE), order=3, preserve_range=True, anti_aliasing=True)
    np.testing.assert_allclose(out["image"].numpy(), np.moveaxis(reference, -1, 0), atol=1e-3)
    torch.testing.assert_close(out["label"], model_mask())


def test_resize_rejects_sizes_not_divisible_by_four() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        ResizeForSAMd(size=30)


# --------------------------------------------------------------------------- boxes


def test_tight_box_on_known_rectangle() -> None:
    mask = torch.zeros(1, 32, 48)
    mask[0, 10:20, 30:45] = 1
    torch.testing.assert_close(box_from_mask(mask), torch.tensor([30.0, 10.0, 44.0, 19.0]))
    out = BoxFromMaskd()({"label": mask, "name": "x"})
    assert out["box"].dtype == torch.float32 and out["box"].shape == (4,)
    torch.testing.assert_close(out["box"], torch.tensor([30.0, 10.0, 44.0, 19.0]))


def test_jitter_enlarges_within_bounds_and_clamps() -> None:
    mask = torch.zeros(1, 32, 48)
    mask[0, 1:20, 30:47] = 1
    tight = box_from_mask(mask)
    transform = BoxFromMaskd(bbox_shift=5)
    for index in range(30):
        box = transform({"label": mask, "name": f"s{index}"})["box"]
        assert box[0] <= tight[0] and box[1] <= tight[1] and box[2] >= tight[2] and box[3] >= tight[3]
        assert (tight[:2] - box[:2]).max() <= 5 and (box[2:] - tight[2:]).max() <= 5
        assert box[0] >= 0 and box[1] >= 0 and box[2] <= 47 and box[3] <= 31


def test_deterministic_jitter_depends_on_name_and_seed() -> None:
    mask = model_mask()
    first = BoxFromMaskd(bbox_shift=8, seed=3)
    second = BoxFromMaskd(bbox_shift=8, seed=3)
    boxes = {name: first({"label": mask, "name": name})["box"] for name in ("a", "b", "c", "d", "e")}
    for name, box in boxes.items():
        torch.testing.assert_close(second({"label": mask, "name": name})["box"], box)
        torch.testing.assert_close(first({"label": mask, "name": name})["box"], box)  # no hidden state
    assert len({tuple(box.tolist()) for box in boxes.values()}) > 1
    other_seed = BoxFromMaskd(bbox_shift=8, seed=4)
    assert any(not torch.equal(other_seed({"label": mask, "name": n})["box"], b) for n, b in boxes.items())


def test_jitter_seed_is_sha256_prefix() -> None:
    expected = int.from_bytes(hashlib.sha256(b"7:case_12").digest()[:8], "big")
    assert jitter_seed(7, "case_12") == expected


def test_random_jitter_reproducible_with_set_random_state() -> None:
    mask = model_mask()

    def draws(seed: int) -> list[list[float]]:
        transform = RandBoxFromMaskd(bbox_shift=6)
        transform.set_random_state(seed=seed)
        return [transform({"label": mask})["box"].tolist() for _ in range(8)]

    assert draws(11) == draws(11)
    assert draws(11) != draws(12)
    assert len({tuple(box) for box in draws(11)}) > 1


def test_empty_mask_policies(png_item: dict) -> None:
    empty = torch.zeros(1, 16, 24)
    full = BoxFromMaskd()({"label": empty, "name": "e"})["box"]
    torch.testing.assert_close(full, torch.tensor([0.0, 0.0, 23.0, 15.0]))
    loaded = LoadImage2Dd(keys=("label",))(png_item)
    loaded["label"] = MetaTensor(torch.zeros(1, 16, 24), meta=loaded["label"].meta)
    with pytest.raises(DataError, match="mask.png"):
        BoxFromMaskd(empty_mask="error")(loaded)
    with pytest.raises(DataError, match="mask.png"):
        RandBoxFromMaskd(empty_mask="error")(loaded)
    with pytest.raises(ValueError, match="empty_mask"):
        BoxFromMaskd(empty_mask="skip")


# --------------------------------------------------------------------------- pipeline


def check_output(out: dict, size: int = SIZE) -> None:
    assert out["image"].shape == (3, size, size) and out["image"].dtype == torch.float32
    assert float(out["image"].min()) == 0.0 and float(out["image"].max()) == pytest.approx(1.0)
    assert out["label"].shape == (1, size, size) and out["label"].dtype == torch.float32
    assert set(out["label"].unique().tolist()) <= {0.0, 1.0}
    assert out["label_lowres"].shape == (1, size // 4, size // 4)
    assert out["box"].shape == (4,) and out["box"].dtype == torch.float32


def test_pipeline_on_every_file_type(mixed_root: Path) -> None:
    pipeline = medsam_preprocess(size=SIZE)
    expected_box = box_from_mask(model_mask())
    for item in folder_pairs(mixed_root):
        out = pipeline(item)
        check_output(out)
        torch.testing.assert_close(out["label"], model_mask(), msg=item["name"])
        torch.testing.assert_close(out["box"], expected_box, msg=item["name"])
        assert out["name"] == item["name"]
        assert out["original_shape"].tolist() == [H, W]
        assert out["spacing"].tolist() == [1.0, 1.0]


def test_pipeline_on_nifti_like_arrays() -> None:
    item = {
        "image": np.random.default_rng(0).random((H, W)).astype(np.float32) * 900,
        "label": rectangle(1),
        "name": "vol_s004",
        "spacing": (0.5, 0.8),
    }
    out = medsam_preprocess(size=SIZE, bbox_shift=3)(item)
    check_output(out)
    torch.testing.assert_close(out["spacing"], torch.tensor([0.5, 0.8]))
    assert torch.equal(out["image"][0], out["image"][1])


def test_pipeline_label_value_and_random_mode(png_item: dict) -> None:
    labels = {**png_item, "label": rectangle(2)}
    assert medsam_preprocess(size=SIZE, label_value=2)(labels)["label"].sum() > 0
    assert medsam_preprocess(size=SIZE, label_value=1)(labels)["label"].sum() == 0

    def boxes(seed: int) -> list[list[float]]:
        pipeline = medsam_preprocess(size=SIZE, bbox_shift=6, seed=seed, deterministic=False)
        return [pipeline(png_item)["box"].tolist() for _ in range(4)]

    assert boxes(5) == boxes(5)
    assert len({tuple(box) for box in boxes(5)}) > 1


# --------------------------------------------------------------------------- caching datasets


def test_build_dataset_modes_give_same_samples(mixed_root: Path, tmp_path: Path) -> None:
    items = folder_pairs(mixed_root)[:2]
    pipeline = medsam_preprocess(size=SIZE, bbox_shift=4)
    memory = build_dataset(items, pipeline, cache="memory", progress=False)
    disk = build_dataset(items, pipeline, cache="disk", cache_dir=tmp_path / "cache")
    plain = build_dataset(items, pipeline, cache="none")
    assert isinstance(memory, CacheDataset) and isinstance(disk, PersistentDataset)
    assert type(plain) is Dataset
    for index in range(len(items)):
        reference = plain[index]
        for dataset in (memory, disk):
            sample = dataset[index]
            torch.testing.assert_close(sample["image"].as_tensor(), reference["image"].as_tensor())
            assert torch.equal(torch.as_tensor(sample["box"]), reference["box"])
            assert sample["name"] == reference["name"]
            assert torch.as_tensor(sample["original_shape"]).tolist() == [H, W]


def test_disk_cache_is_reused_and_keyed_by_settings(mixed_root: Path, tmp_path: Path) -> None:
    items = folder_pairs(mixed_root)[:1]
    cache_dir = tmp_path / "cache"
    build_dataset(items, medsam_preprocess(size=SIZE), cache="disk", cache_dir=cache_dir)[0]
    files = sorted(cache_dir.iterdir())
    assert len(files) == 1
    Path(items[0]["image"]).unlink()  # a cache hit must not touch the source file again
    again = build_dataset(items, medsam_preprocess(size=SIZE), cache="disk", cache_dir=cache_dir)[0]
    assert again["image"].shape == (3, SIZE, SIZE)
    assert sorted(cache_dir.iterdir()) == files
    # Different settings need a new entry, so the deleted source file is looked for again.
    with pytest.raises(RuntimeError) as error:
        build_dataset(items, medsam_preprocess(size=32), cache="disk", cache_dir=cache_dir)[0]
    assert isinstance(error.value.__cause__, DataError) and "1.png" in str(error.value.__cause__)


def test_build_dataset_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="cache"):
        build_dataset([], medsam_preprocess(size=SIZE), cache="gpu")
    with pytest.raises(ValueError, match="cache_dir"):
        build_dataset([], medsam_preprocess(size=SIZE), cache="disk")


# --------------------------------------------------------------------------- real data


@pytest.mark.integration
def test_kvasir_pairs_through_pipeline(kvasir_root: Path) -> None:
    items = folder_pairs(kvasir_root)
    assert len(items) == 1000
    pipeline = medsam_preprocess(size=256, bbox_shift=5, seed=1)
    for item in items[:5]:
        out = pipeline(item)
        check_output(out, size=256)
        native = read_image_2d(item["label"])
        assert out["original_shape"].tolist() == list(native.shape[:2])
        # The jittered box contains the tight box of the resized mask and stays within 5 px of it.
        tight = box_from_mask(out["label"])
        assert torch.all(out["box"][:2] <= tight[:2]) and torch.all(out["box"][2:] >= tight[2:])
        assert torch.all((out["box"] - tight).abs() <= 5)
        assert 0.0 < float(out["label"].mean()) < 1.0
