"""label_app's bundle set-up, which runs without MONAI Label: which folder is served, and its models/model.pt."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from medcore_monai.networks import load_sam, save_sam, slim_block_

REPO = Path(__file__).resolve().parents[1]


def _bundle_setup():
    spec = importlib.util.spec_from_file_location("label_bundle_setup", REPO / "label_app" / "lib" / "bundle_setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup = _bundle_setup()


def test_default_folder_serves_the_repository_configs_and_the_shipped_model(tmp_path):
    folder = setup.prepare_bundle(tmp_path / "app", {})
    assert folder == (tmp_path / "app" / "model" / "medsam").resolve()
    assert (folder / "configs").resolve() == (REPO / "bundle" / "configs").resolve()  # never a stale copy
    stored = torch.load(folder / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert {"model", "medcore"} <= set(stored)  # the one checkpoint format, which MONAI Label loads strictly
    shipped = load_sam(REPO / "bundle" / "models" / "medsam_tiny.pth").state_dict()
    assert all(torch.equal(stored["model"][k], v.float()) for k, v in shipped.items())


def test_a_pruned_checkpoint_is_installed_once_and_training_results_are_kept(tmp_path, caplog):
    sam = load_sam(REPO / "bundle" / "models" / "medsam_tiny.pth")
    slim_block_(sam.image_encoder.blocks[0], keep_heads=[1], keep_channels=range(0, 768, 2))
    pruned = save_sam(sam, tmp_path / "pruned.pt")
    folder = setup.prepare_bundle(tmp_path / "app", {"checkpoint": str(pruned)})
    model = folder / "models" / "model.pt"
    assert load_sam(model).image_encoder.blocks[0].attn.num_heads == 1

    model.write_bytes(model.read_bytes())  # stands for weights MONAI Label trained
    before = model.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING):
        setup.prepare_bundle(tmp_path / "app", {"checkpoint": str(REPO / "bundle" / "models" / "medsam_tiny.pth")})
    assert model.stat().st_mtime_ns == before and "delete it to serve" in caplog.text


def test_an_own_bundle_folder_is_served_as_it_is(tmp_path):
    folder = tmp_path / "mine"
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "inference.yaml").write_text((REPO / "bundle" / "configs" / "inference.yaml").read_text())
    assert setup.prepare_bundle(tmp_path / "app", {"bundle": str(folder)}) == folder.resolve()
    assert (folder / "models" / "model.pt").is_file() and not (folder / "configs").is_symlink()


@pytest.mark.parametrize(
    ("conf", "message"),
    [({"bundle": "nowhere"}, "no configs/inference.yaml"), ({"checkpoint": "missing.pt"}, "not found: missing.pt")],
)
def test_bad_app_settings_are_clear_errors(tmp_path, conf, message):
    with pytest.raises(FileNotFoundError, match=message):
        setup.prepare_bundle(tmp_path / "app", conf)
