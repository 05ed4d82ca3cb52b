"""Tests for reading 2-D files, paired folders, datalists and NIfTI slices."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from medcore_monai.data import (
    DataError,
    datalist_items,
    drop_empty_masks,
    folder_pairs,
    has_foreground,
    nifti_slices,
    normalise_intensity,
    read_image_2d,
    sample_stem,
)

H, W = 20, 30


def rectangle_mask(value: int = 255, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[5:12, 8:20] = value
    return mask


def rgb_image(seed: int = 0, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def write_pair(root: Path, stem: str, image_suffix: str = ".png", mask_suffix: str = ".png") -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb_image()).save(root / "images" / f"{stem}{image_suffix}")
    Image.fromarray(rectangle_mask()).save(root / "masks" / f"{stem}{mask_suffix}")


@pytest.fixture()
def paired_root(tmp_path: Path) -> Path:
    root = tmp_path / "toyset"
    for stem in ("10", "2", "b", "1", "a"):
        write_pair(root, stem)
    (root / "images" / "notes.txt").write_text("not an image")
    (root / "images" / ".hidden.png").write_bytes(b"")
    return root


# --------------------------------------------------------------------------- read_image_2d


def test_read_png_rgb_and_grey(tmp_path: Path) -> None:
    rgb, grey = rgb_image(), rectangle_mask()
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(grey).save(tmp_path / "grey.bmp")
    np.testing.assert_array_equal(read_image_2d(tmp_path / "rgb.png"), rgb)
    np.testing.assert_array_equal(read_image_2d(tmp_path / "grey.bmp"), grey)


def test_read_jpeg_is_channel_last(tmp_path: Path) -> None:
    Image.fromarray(rgb_image()).save(tmp_path / "x.jpeg")
    array = read_image_2d(tmp_path / "x.jpeg")
    assert array.shape == (H, W, 3) and array.dtype == np.uint8


def test_read_16bit_rgb_tiff_keeps_full_precision(tmp_path: Path) -> None:
    # Pillow decodes 16-bit RGB TIFFs to 8 bits; the reader must notice and use tifffile.
    data = np.random.default_rng(1).integers(0, 65535, size=(H, W, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "deep.tif", data)
    array = read_image_2d(tmp_path / "deep.tif")
    assert array.dtype == np.uint16
    np.testing.assert_array_equal(array, data)


def test_read_float64_tiff_needs_tifffile(tmp_path: Path) -> None:
    data = np.random.default_rng(2).random((H, W))
    tifffile.imwrite(tmp_path / "float.tiff", data)
    np.testing.assert_array_equal(read_image_2d(tmp_path / "float.tiff"), data)


def test_read_planar_tiff_becomes_channel_last(tmp_path: Path) -> None:
    data = np.random.default_rng(3).random((3, H, W)).astype(np.float32)
    tifffile.imwrite(tmp_path / "planar.tif", data, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image_2d(tmp_path / "planar.tif"), np.moveaxis(data, 0, -1))


def test_read_16bit_grey_tiff_with_pillow(tmp_path: Path) -> None:
    data = (np.arange(H * W, dtype=np.uint16).reshape(H, W) * 97).astype(np.uint16)
    tifffile.imwrite(tmp_path / "grey16.tif", data)
    np.testing.assert_array_equal(read_image_2d(tmp_path / "grey16.tif"), data)


@pytest.mark.parametrize("name", ["broken.png", "broken.jpg", "broken.tif"])
def test_read_corrupt_file_names_it(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match=name):
        read_image_2d(tmp_path / name)


def test_read_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="absent.png"):
        read_image_2d(tmp_path / "absent.png")
    (tmp_path / "scan.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match="scan.gif"):
        read_image_2d(tmp_path / "scan.gif")


# --------------------------------------------------------------------------- folder_pairs


def test_folder_pairs_items_and_order(paired_root: Path) -> None:
    items = folder_pairs(paired_root)
    assert [item["name"] for item in items] == ["1", "2", "10", "a", "b"]
    first = items[0]
    assert set(first) == {"image", "label", "name", "dataset"}
    assert first["dataset"] == "toyset"
    assert first["image"] == str(paired_root / "images" / "1.png")
    assert first["label"] == str(paired_root / "masks" / "1.png")
    assert folder_pairs(paired_root, dataset="custom")[0]["dataset"] == "custom"


def test_folder_pairs_matches_different_suffixes(tmp_path: Path) -> None:
    write_pair(tmp_path, "case", image_suffix=".jpg", mask_suffix=".png")
    (item,) = folder_pairs(tmp_path)
    assert item["image"].endswith("case.jpg") and item["label"].endswith("case.png")


def test_folder_pairs_custom_subfolders(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    Image.fromarray(rgb_image()).save(tmp_path / "img" / "x.png")
    Image.fromarray(rectangle_mask()).save(tmp_path / "gt" / "x.png")
    assert folder_pairs(tmp_path, image_dir="img", mask_dir="gt")[0]["name"] == "x"


def test_folder_pairs_missing_root_and_subfolders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        folder_pairs(tmp_path / "nowhere")
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="images"):
        folder_pairs(tmp_path)
    with pytest.raises(DataError, match="labels"):
        (tmp_path / "images").mkdir()
        folder_pairs(tmp_path, mask_dir="labels")


def test_folder_pairs_unpaired_files_are_listed(paired_root: Path) -> None:
    Image.fromarray(rgb_image()).save(paired_root / "images" / "lonely_image.png")
    Image.fromarray(rectangle_mask()).save(paired_root / "masks" / "lonely_mask.png")
    with pytest.raises(DataError, match="lonely_image") as error:
        folder_pairs(paired_root)
    assert "lonely_mask" in str(error.value)


def test_folder_pairs_duplicate_stems(paired_root: Path) -> None:
    Image.fromarray(rgb_image()).save(paired_root / "images" / "a.jpg")
    with pytest.raises(DataError, match=r"a\.jpg") as error:
        folder_pairs(paired_root)
    assert "a.png" in str(error.value)


def test_folder_pairs_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="images"):
        folder_pairs(tmp_path)


def test_folder_pairs_drop_empty(paired_root: Path) -> None:
    Image.fromarray(np.zeros((H, W), np.uint8)).save(paired_root / "masks" / "2.png")
    names = [item["name"] for item in folder_pairs(paired_root, drop_empty=True)]
    assert names == ["1", "10", "a", "b"]


def test_has_foreground_variants() -> None:
    assert has_foreground(rectangle_mask(1))
    assert has_foreground(rectangle_mask(255))
    assert not has_foreground(np.full((4, 4), 100, np.uint8) * (np.arange(4) < 2))  # max 100 > 1: needs > 127
    labels = rectangle_mask(2)
    assert has_foreground(labels, label_value=2) and not has_foreground(labels, label_value=1)
    assert has_foreground(np.stack([rectangle_mask()] * 3, axis=-1))


def test_drop_empty_accepts_arrays() -> None:
    items = [{"label": rectangle_mask(1), "name": "x"}, {"label": np.zeros((3, 3)), "name": "y"}]
    assert [item["name"] for item in drop_empty_masks(items)] == ["x"]


def test_sample_stem_handles_nifti() -> None:
    assert sample_stem("/a/b/case_001.nii.gz") == "case_001"
    assert sample_stem("case.nii") == "case"
    assert sample_stem("x.y.png") == "x.y"


# --------------------------------------------------------------------------- datalists


def write_datalist(root: Path, content: dict) -> Path:
    path = root / "dataset.json"
    path.write_text(json.dumps(content))
    return path


def test_datalist_items(paired_root: Path) -> None:
    content = {
        "name": "Toy",
        "training": [
            {"image": "images/1.png", "label": "masks/1.png"},
            {"image": "images/a.png", "label": "masks/a.png"},
        ],
        "test": ["images/b.png"],
    }
    path = write_datalist(paired_root, content)
    items = datalist_items(path)
    assert [item["name"] for item in items] == ["1", "a"]
    assert all(item["dataset"] == "Toy" for item in items)
    assert items[0]["image"] == str(paired_root / "images" / "1.png")
    test_items = datalist_items(path, key="test", dataset="other")
    assert test_items == [{"image": str(paired_root / "images" / "b.png"), "name": "b", "dataset": "other"}]


def test_datalist_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.json"):
        datalist_items(tmp_path / "missing.json")
    path = write_datalist(tmp_path, {"training": []})
    with pytest.raises(DataError, match="validation") as error:
        datalist_items(path, key="validation")
    assert "dataset.json" in str(error.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        datalist_items(tmp_path / "bad.json")
    duplicated = {"training": [{"image": "a/x.png", "label": "m/x.png"}, {"image": "b/x.png", "label": "n/x.png"}]}
    with pytest.raises(DataError, match="dataset.json"):
        datalist_items(write_datalist(tmp_path, duplicated))


# --------------------------------------------------------------------------- NIfTI slices

SPACING = (0.5, 0.8, 2.0)
VOLUME_SHAPE = (6, 7, 5)


def toy_volume() -> tuple[np.ndarray, np.ndarray]:
    image = np.arange(np.prod(VOLUME_SHAPE), dtype=np.float32).reshape(VOLUME_SHAPE) + 1
    label = np.zeros(VOLUME_SHAPE, dtype=np.uint8)
    label[1:3, 2:4, 1] = 1  # 4 pixels of label 1 in slice 1
    label[2:5, 1:3, 3] = 2  # 6 pixels of label 2 in slice 3
    label[0, 0, 4] = 1  # a single pixel in slice 4
    return image, label


def save_nifti(path: Path, data: np.ndarray, spacing: tuple[float, ...] = SPACING) -> None:
    padded = [*spacing, 1.0, 1.0, 1.0][:3]
    image = nib.Nifti1Image(data, np.diag([*padded, 1.0]))
    image.header.set_zooms(spacing[: data.ndim])
    nib.save(image, str(path))


@pytest.fixture()
def nifti_items(tmp_path: Path) -> list[dict]:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image, label = toy_volume()
    for stem in ("vol_a", "vol_b"):
        save_nifti(tmp_path / "images" / f"{stem}.nii.gz", image)
        save_nifti(tmp_path / "masks" / f"{stem}.nii.gz", label)
    return folder_pairs(tmp_path, dataset="toy3d")


def test_nifti_slices_keeps_foreground_slices(nifti_items: list[dict]) -> None:
    slices = nifti_slices(nifti_items, intensity="none")
    assert [s["name"] for s in slices] == [f"{v}_s{k:03d}" for v in ("vol_a", "vol_b") for k in (1, 3, 4)]
    image, label = toy_volume()
    first = slices[0]
    assert first["image"].dtype == np.float32 and first["image"].shape == (6, 7)
    np.testing.assert_array_equal(first["image"], image[:, :, 1])
    assert first["label"].dtype == np.uint8
    np.testing.assert_array_equal(first["label"], (label[:, :, 1] > 0).astype(np.uint8))
    assert first["volume"] == "vol_a" and first["slice_index"] == 1
    assert first["spacing"] == pytest.approx((0.5, 0.8))
    assert first["dataset"] == "toy3d"


def test_nifti_slices_label_value_and_min_pixels(nifti_items: list[dict]) -> None:
    label_two = nifti_slices(nifti_items[:1], label_value=2)
    assert [s["slice_index"] for s in label_two] == [3]
    assert label_two[0]["label"].sum() == 6
    at_least_four = nifti_slices(nifti_items[:1], min_foreground_pixels=4)
    assert [s["slice_index"] for s in at_least_four] == [1, 3]
    assert len(nifti_slices(nifti_items[:1], min_foreground_pixels=0)) == VOLUME_SHAPE[2]


def test_nifti_slices_other_axis(nifti_items: list[dict]) -> None:
    slices = nifti_slices(nifti_items[:1], axis=0, intensity="none")
    image, _ = toy_volume()
    assert slices[0]["image"].shape == (7, 5)
    np.testing.assert_array_equal(slices[0]["image"], image[slices[0]["slice_index"]])
    assert slices[0]["spacing"] == pytest.approx((0.8, 2.0))


def test_nifti_shape_mismatch_names_both_files(tmp_path: Path) -> None:
    image, label = toy_volume()
    save_nifti(tmp_path / "img.nii.gz", image)
    save_nifti(tmp_path / "lab.nii.gz", label[:, :, :3])
    with pytest.raises(DataError, match="img.nii.gz") as error:
        nifti_slices([{"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}])
    assert "lab.nii.gz" in str(error.value)


def test_nifti_unreadable_and_not_3d(tmp_path: Path) -> None:
    (tmp_path / "junk.nii.gz").write_bytes(b"junk")
    save_nifti(tmp_path / "flat.nii.gz", np.zeros((4, 4), np.float32), spacing=(1.0, 1.0))
    with pytest.raises(DataError, match="junk.nii.gz"):
        nifti_slices([{"image": str(tmp_path / "junk.nii.gz"), "label": str(tmp_path / "junk.nii.gz")}])
    with pytest.raises(DataError, match="flat.nii.gz"):
        nifti_slices([{"image": str(tmp_path / "flat.nii.gz"), "label": str(tmp_path / "flat.nii.gz")}])


def test_intensity_modes() -> None:
    volume = np.zeros((10, 10, 10), np.float32)
    volume[1:, :, :] = np.linspace(1, 1000, 900, dtype=np.float32).reshape(9, 10, 10)
    volume[5, 5, 5] = 1e6  # outlier that MR clipping must remove
    clipped = normalise_intensity(volume, "mr")
    nonzero = volume[volume != 0]
    assert clipped.max() == pytest.approx(np.percentile(nonzero, 99.5))
    assert clipped[1:].min() == pytest.approx(np.percentile(nonzero, 0.5))
    ct = normalise_intensity(np.array([-1000.0, 0.0, 1000.0]), "ct")
    np.testing.assert_allclose(ct, [-160.0, 0.0, 240.0])
    np.testing.assert_array_equal(normalise_intensity(volume, "none"), volume)
    with pytest.raises(ValueError, match="pet"):
        normalise_intensity(volume, "pet")


# --------------------------------------------------------------------------- real data


@pytest.mark.integration
def test_hippocampus_slices_through_pipeline(hippocampus_root: Path) -> None:
    from medcore_monai.transforms import medsam_preprocess

    volumes = folder_pairs(hippocampus_root)
    assert len(volumes) == 20
    slices = nifti_slices(volumes)
    assert {s["volume"] for s in slices} == {v["name"] for v in volumes}
    assert all(s["label"].sum() >= 1 for s in slices)
    assert all(s["spacing"] == (1.0, 1.0) for s in slices)
    pipeline = medsam_preprocess(size=64)
    for sample in slices:
        out = pipeline(sample)
        assert out["image"].shape == (3, 64, 64) and out["label_lowres"].shape == (1, 16, 16)
        assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
        assert out["label"].sum() > 0
        assert out["spacing"].tolist() == [1.0, 1.0]
        assert out["original_shape"].tolist() == list(sample["image"].shape)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_an_image_with_non_finite_values_is_refused_naming_the_file(tmp_path: Path, bad: float) -> None:
    from medcore_monai.data.errors import DataError
    from medcore_monai.transforms import EnsureFinited, ReadImaged

    volume = np.random.default_rng(0).random((8, 8, 4)).astype(np.float32)
    volume[1, 2, 3] = bad
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "case.nii.gz")
    nib.save(nib.Nifti1Image((volume > 0.5).astype(np.uint8), np.eye(4)), tmp_path / "mask.nii.gz")
    item = {"image": str(tmp_path / "case.nii.gz"), "label": str(tmp_path / "mask.nii.gz")}
    reader = ReadImaged(keys=["image", "label"], image_only=True, ensure_channel_first=True)
    with pytest.raises(DataError, match=r"case\.nii\.gz holds 1 NaN or infinite values of 256"):
        reader(item)
    finite = volume.copy()
    finite[1, 2, 3] = 0.0
    nib.save(nib.Nifti1Image(finite, np.eye(4)), tmp_path / "case.nii.gz")
    loaded = reader(item)
    assert EnsureFinited(keys=["image", "label"])(loaded) is not None  # finite data pass unchanged


def test_split_head_and_split_groups_take_the_first_slices_of_a_split_in_manifest_order() -> None:
    from medcore_monai.data import SplitDatalists, split_groups

    root = Path(__file__).resolve().parents[1] / "bundle" / "sample_data" / "hippocampus"
    datalists = SplitDatalists([str(root)], cal_size=5)
    (name,) = datalists.dataset_list
    train = datalists.manifest.splits[name]["train"]
    head = datalists.split_head("train", 7)
    assert {f"{item['volume']}_s{i:03d}" for item in head for i in item["slices"]} == set(train[:7])
    assert train[:5] == datalists.manifest.splits[name]["calibration"]  # the head begins with the calibration
    samples = [{"name": n, "dataset": name, "value": k} for k, n in enumerate(reversed(train[:9]))]
    groups = split_groups(samples, datalists, "train", 7)
    assert [s["name"] for s in groups[name]] == [f"{name}/{n}" for n in train[:7]]  # manifest order, named
    with pytest.raises(DataError, match="2 train samples are not in the dataset"):
        split_groups(samples[2:], datalists, "train", 9)
    with pytest.raises(ValueError, match="positive"):
        datalists.split_head("train", 0)
