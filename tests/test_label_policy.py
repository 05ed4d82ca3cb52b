"""One label policy for every mask format (issue: PNG masks with labels 0/1/2 were read as all background)."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImaged
from PIL import Image

from medcore_monai.data import DataError, Image2DReader
from medcore_monai.transforms import BinarizeLabeld


def _load(path):
    return LoadImaged(keys="label", reader=Image2DReader(), image_only=True, ensure_channel_first=True)(
        {"label": str(path)}
    )


def _labels(shape=(20, 24)):
    mask = np.zeros(shape, dtype=np.uint8)
    mask[2:8, 3:9] = 1
    mask[10:16, 12:20] = 2
    return mask


@pytest.mark.parametrize("suffix", [".png", ".tif", ".nii.gz"])
def test_every_non_zero_label_is_foreground_in_every_lossless_format(tmp_path, suffix):
    mask = _labels()
    path = tmp_path / f"mask{suffix}"
    if suffix == ".nii.gz":
        nib.save(nib.Nifti1Image(mask[..., None], np.eye(4)), path)
    else:
        Image.fromarray(mask).save(path)
    binary = BinarizeLabeld(keys="label")(_load(path))["label"]
    assert int(binary.sum()) == int((mask > 0).sum())  # both labels, in PNG, TIFF and NIfTI alike
    one = BinarizeLabeld(keys="label", label_value=2)(_load(path))["label"]
    assert int(one.sum()) == int((mask == 2).sum())


def test_jpeg_masks_are_thresholded_at_half_their_range_and_refuse_a_label_value(tmp_path):
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.jpg", quality=70)
    loaded = _load(tmp_path / "mask.jpg")
    assert set(torch.unique(loaded["label"]).tolist()) != {0.0, 255.0}  # compression moved the values (0 -> 1)
    binary = BinarizeLabeld(keys="label")(loaded)["label"]
    assert abs(int(binary.sum()) - 16 * 16) <= 16  # noise near 0 is not foreground
    with pytest.raises(DataError, match="is a JPEG"):
        BinarizeLabeld(keys="label", label_value=255)(loaded)


def test_a_grey_level_mask_is_named_in_a_warning(tmp_path, caplog):
    ramp = np.tile(np.arange(64, dtype=np.uint8) * 4, (8, 1))
    Image.fromarray(ramp).save(tmp_path / "grey.png")
    with caplog.at_level(logging.WARNING):
        BinarizeLabeld(keys="label")(_load(tmp_path / "grey.png"))
    assert "grey.png has 64 distinct values" in caplog.text


def test_a_non_integer_label_value_is_refused():
    with pytest.raises(ValueError, match="label_value must be an integer"):
        BinarizeLabeld(keys="label", label_value=1.5)


def test_ct_values_under_the_mr_rule_are_named_in_a_warning(caplog):
    from monai.data import MetaTensor

    from medcore_monai.transforms import ClipNonzeroPercentilesd

    volume = MetaTensor(torch.full((1, 4, 4, 4), -1000.0), meta={"filename_or_obj": "ct_case.nii.gz"})
    volume[0, 1:3, 1:3] = 40.0
    with caplog.at_level(logging.WARNING):
        clipped = ClipNonzeroPercentilesd(keys="image")({"image": volume})["image"]
    assert "ct_case.nii.gz has values down to -1000" in caplog.text and "configs/ct.yaml" in caplog.text
    assert float(clipped.min()) >= -1000.0  # the MR rule still ran: a documented policy, not an error


def test_an_image_and_mask_of_different_sizes_fail_naming_both(tmp_path):
    from medcore_monai.transforms import ReadImaged

    Image.fromarray(np.zeros((20, 24), dtype=np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(np.zeros((20, 25), dtype=np.uint8)).save(tmp_path / "mask.png")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), dtype=np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 5), dtype=np.uint8), np.eye(4)), tmp_path / "lab.nii.gz")
    load = ReadImaged(keys=["image", "label"], image_only=True, ensure_channel_first=True)
    for image, label in (("image.png", "mask.png"), ("vol.nii.gz", "lab.nii.gz")):
        with pytest.raises(DataError, match=rf"sizes differ: .*{image} is .*{label} is"):
            load({"image": str(tmp_path / image), "label": str(tmp_path / label)})
