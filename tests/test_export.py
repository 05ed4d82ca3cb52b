"""TorchScript / ONNX export of the compact image encoder, the export manifest, and export errors."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import random
import sys

import numpy as np
import pytest
import torch
from torch import nn

from medcore_monai.networks import (
    MedSAM,
    SamConfig,
    StructuredMasks,
    attach_masks,
    build_sam,
    count_parameters,
    encoder_flops,
    encoder_structure,
    save_sam,
    slim_encoder_,
)
from medcore_monai.networks import export as export_module
from medcore_monai.networks.export import (
    DEFAULT_ATOL,
    ExportError,
    export_onnx,
    export_torchscript,
    write_export_manifest,
)

requires_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="onnx / onnxruntime not installed (pip install 'medcore-monai[export]')",
)
both_exporters = pytest.mark.parametrize(
    "exporter", [export_torchscript, pytest.param(export_onnx, marks=requires_onnx)], ids=["torchscript", "onnx"]
)


def _random_masks(encoder: nn.Module, seed: int = 0) -> StructuredMasks:
    generator = torch.Generator().manual_seed(seed)
    structure = encoder_structure(encoder)
    heads = [torch.rand(b.num_heads, generator=generator) < 0.6 for b in structure]
    channels = [torch.rand(b.mlp_dim, generator=generator) < 0.5 for b in structure]
    for h, c in zip(heads, channels):  # every block keeps at least one group of each kind
        h[0] = c[0] = True
    return StructuredMasks(heads=heads, channels=channels)


@pytest.fixture(scope="module")
def dense_sam():
    return build_sam("tiny", seed=0)


@pytest.fixture(scope="module")
def masks(dense_sam):
    return _random_masks(dense_sam.image_encoder)


@pytest.fixture(scope="module")
def slim_sam(dense_sam, masks):
    sam = copy.deepcopy(dense_sam)
    slim_encoder_(sam.image_encoder, masks)
    return sam


def _images(batch: int, seed: int = 7) -> torch.Tensor:
    return torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(seed))


def _eager(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder(images)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_slim_encoder_is_actually_narrower(slim_sam, masks):
    widths = [blk.attn.num_heads for blk in slim_sam.image_encoder.blocks]
    assert widths == [int(m.sum()) for m in masks.heads] and min(widths) < 3


def test_torchscript_roundtrip_matches_eager(slim_sam, tmp_path):
    path = export_torchscript(slim_sam, tmp_path / "encoder.pt")
    loaded = torch.jit.load(str(path))
    images = _images(3)  # a batch size never seen while tracing
    assert torch.allclose(loaded(images), _eager(slim_sam.image_encoder, images), atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["encoder.pt"]  # no temporary file left behind


def test_torchscript_of_hook_masked_dense_encoder_equals_slim(dense_sam, masks, slim_sam, tmp_path):
    masked = copy.deepcopy(dense_sam)
    with attach_masks(masked.image_encoder, masks):
        path = export_torchscript(MedSAM(masked), tmp_path / "masked.pt")
    images = _images(1)
    assert torch.allclose(torch.jit.load(str(path))(images), _eager(slim_sam.image_encoder, images), atol=1e-4)


@requires_onnx
def test_onnx_roundtrip_matches_eager(slim_sam, tmp_path):
    import onnx
    import onnxruntime as ort

    path = export_onnx(slim_sam.image_encoder, tmp_path / "encoder.onnx", opset=17)
    model = onnx.load(str(path))
    assert model.opset_import[0].version == 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("images", "image_embeddings")
    assert inp.shape[0] == "batch" and inp.shape[1:] == [3, 256, 256]
    images = _images(3)
    result = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    assert result.shape == (3, 256, 16, 16)
    assert torch.allclose(result, _eager(slim_sam.image_encoder, images), atol=1e-4)


def _run_exported(path, images: torch.Tensor) -> torch.Tensor:
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    with torch.no_grad():
        return torch.jit.load(str(path))(images)


@both_exporters
def test_exported_encoder_agrees_with_eager_on_other_batch_sizes(slim_sam, tmp_path, exporter):
    suffix = ".onnx" if exporter is export_onnx else ".pt"
    path = exporter(slim_sam.image_encoder, tmp_path / f"encoder{suffix}", example_inputs=_images(2))
    for batch in (1, 5):  # smaller and larger than the traced batch of 2
        images = _images(batch, seed=batch)
        result = _run_exported(path, images)
        assert result.shape == (batch, 256, 16, 16)
        torch.testing.assert_close(result, _eager(slim_sam.image_encoder, images), rtol=0.0, atol=DEFAULT_ATOL)


@both_exporters
def test_conversion_and_first_check_are_monais(slim_sam, tmp_path, exporter, monkeypatch):
    name = "convert_to_onnx" if exporter is export_onnx else "convert_to_torchscript"
    converter, calls = getattr(export_module, name), []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return converter(*args, **kwargs)

    monkeypatch.setattr(export_module, name, spy)
    path = exporter(slim_sam.image_encoder, tmp_path / "encoder.bin")
    assert path.is_file() and len(calls) == 1
    assert calls[0]["verify"] is True and calls[0]["device"] == torch.device("cpu")
    assert (calls[0]["rtol"], calls[0]["atol"]) == (0.0, DEFAULT_ATOL)


@both_exporters
def test_export_leaves_the_callers_model_and_global_state_alone(slim_sam, tmp_path, exporter, monkeypatch):
    # MONAI's converters call model.eval() and model.to(device), and their verification reseeds torch, numpy
    # and random and resets cudnn.benchmark.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    model = copy.deepcopy(slim_sam.image_encoder).double().train()  # float64: exported from a float32 copy

    def seed_all() -> None:
        torch.manual_seed(5)
        np.random.seed(5)
        random.seed(5)

    def draw() -> tuple:
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()

    seed_all()
    exporter(model, tmp_path / "encoder.bin")
    after_export = draw()
    seed_all()
    assert after_export == draw()
    assert torch.backends.cudnn.benchmark is True
    assert model.training and all(p.dtype == torch.float64 for p in model.parameters())


def test_reexport_replaces_previous_artifact(slim_sam, tmp_path):
    path = tmp_path / "encoder.pt"
    export_torchscript(slim_sam, path)
    export_torchscript(slim_sam, path, example_inputs=_images(2))
    assert torch.jit.load(str(path))(_images(1)).shape == (1, 256, 16, 16)


def test_manifest_describes_compact_model(slim_sam, masks, tmp_path):
    exported = export_torchscript(slim_sam, tmp_path / "encoder.pt")
    model = MedSAM(slim_sam)
    path = write_export_manifest(model, tmp_path / "manifest.json", extra={"note": "test"}, files=[exported])
    manifest = json.loads(path.read_text())

    blocks = manifest["blocks"]
    assert [b["kept_heads"] for b in blocks] == masks.kept_heads()
    assert [b["kept_channels"] for b in blocks] == masks.kept_channels()
    assert [b["num_heads"] for b in blocks] == [len(k) for k in masks.kept_heads()]
    assert [b["mlp_dim"] for b in blocks] == [len(k) for k in masks.kept_channels()]
    assert manifest["encoder_params"] == count_parameters(slim_sam.image_encoder)
    assert manifest["total_params"] == count_parameters(slim_sam)
    assert manifest["encoder_flops"] == encoder_flops(slim_sam.image_encoder)
    config = SamConfig.from_dict(manifest["config"])
    assert config.block_heads == tuple(b["num_heads"] for b in blocks)
    assert manifest["files"]["encoder.pt"] == {
        "path": "encoder.pt",
        "sha256": _sha256(exported),
        "bytes": exported.stat().st_size,
    }
    assert manifest["io"]["output"]["shape"] == ["batch", 256, 16, 16]
    assert manifest["extra"] == {"note": "test"} and "torch" in manifest["versions"]


@requires_onnx
def test_missing_onnxruntime_is_a_clear_error(slim_sam, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ExportError, match="onnxruntime"):
        export_onnx(slim_sam.image_encoder, tmp_path / "encoder.onnx")
    assert not list(tmp_path.iterdir())


@requires_onnx
def test_failing_onnx_exporter_is_reported(slim_sam, tmp_path, monkeypatch):
    def broken_export(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(ExportError, match="unsupported operator"):
        export_onnx(slim_sam.image_encoder, tmp_path / "encoder.onnx")
    assert not list(tmp_path.iterdir())


@both_exporters
def test_never_overwrites_a_checkpoint(slim_sam, tmp_path, exporter):
    checkpoint = save_sam(slim_sam, tmp_path / "model.pth")
    before = _sha256(checkpoint)
    with pytest.raises(ExportError, match="refusing to overwrite"):
        exporter(slim_sam.image_encoder, checkpoint)
    with pytest.raises(ExportError, match="refusing to overwrite"):
        write_export_manifest(slim_sam, checkpoint)
    assert _sha256(checkpoint) == before


class _DataDependent(nn.Module):
    """Traces one branch only, so a second input taking the other branch exposes the bad trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 if x.mean() > 2.0 else x - 1.0


class _FrozenBatch(nn.Module):
    """``int()`` makes the traced batch size a constant: right on the example, wrong on any other batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(int(x.shape[0]), -1) * 2.0


class _CountsCalls(nn.Module):
    """Each eager call differs from the last, so even the example input fails MONAI's verification."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * self.calls


class _NoTensorOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> None:
        return None


def test_wrong_trace_is_caught_and_not_installed(tmp_path):
    with pytest.raises(ExportError, match="differs from eager"):
        export_torchscript(_DataDependent(), tmp_path / "bad.pt", example_inputs=torch.full((1, 4), 10.0))
    assert not list(tmp_path.iterdir())


@both_exporters
def test_frozen_batch_dimension_is_caught_and_not_installed(tmp_path, exporter):
    with pytest.raises(ExportError, match=r"differs from eager|batch dimension not dynamic"):
        exporter(_FrozenBatch(), tmp_path / "frozen.bin", example_inputs=torch.rand(1, 2, 3))
    assert not list(tmp_path.iterdir())


@both_exporters
def test_mismatch_on_the_example_input_is_an_export_error(tmp_path, exporter):
    with pytest.raises(ExportError, match="differs from eager on the example input"):
        exporter(_CountsCalls(), tmp_path / "bad.bin", example_inputs=torch.ones(1, 4))
    assert not list(tmp_path.iterdir())


def test_untraceable_module_raises_export_error(tmp_path):
    with pytest.raises(ExportError, match="trace failed"):
        export_torchscript(_NoTensorOutput(), tmp_path / "bad.pt", example_inputs=torch.ones(1, 4))


def test_non_encoder_without_example_inputs(tmp_path):
    with pytest.raises(ExportError, match="example_inputs"):
        export_torchscript(nn.Linear(4, 4), tmp_path / "linear.pt")


@requires_onnx
def test_onnx_size_limit_is_reported(slim_sam, tmp_path, monkeypatch):
    import medcore_monai.networks.export as export_module

    monkeypatch.setattr(export_module, "_PROTOBUF_LIMIT", 1024)
    with pytest.raises(ExportError, match="2 GiB"):
        export_onnx(slim_sam.image_encoder, tmp_path / "encoder.onnx")
