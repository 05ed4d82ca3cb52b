"""The one checkpoint format, the layouts still read, MONAI/Ignite checkpoint handlers, and the import graph."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader, CheckpointSaver

from medcore_monai.networks import (
    CheckpointError,
    MedSAM,
    ModelManifest,
    RobustMedSAM,
    build_robust_sam,
    build_sam,
    checkpoint_image_size,
    extract_state_dict,
    load_medsam,
    load_sam,
    model_manifest,
    read_model_state,
    save_sam,
    slim_block_,
)
from medcore_monai.networks.build import COMPACT_FORMAT, FORMAT_VERSION
from medcore_monai.networks.manifest import DECODER_NAME
from medcore_monai.networks.prompt_channel import BoxChannelMedSAM

NETWORKS = Path(__file__).resolve().parents[1] / "medcore_monai" / "networks"
BOXES = torch.tensor([[20.0, 30.0, 180.0, 200.0], [5.0, 60.0, 120.0, 250.0]])


def _slim(sam: torch.nn.Module) -> torch.nn.Module:
    """Narrow block 1 to two heads and every third MLP channel (non-prefix kept indices)."""
    slim_block_(sam.image_encoder.blocks[1], keep_heads=[0, 2], keep_channels=range(0, 576, 3))
    return sam


@pytest.fixture(scope="module")
def compact_sam():
    return _slim(build_sam("tiny", seed=0))


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))


def _widths(sam: torch.nn.Module) -> list[tuple[int, int]]:
    return [(b.attn.num_heads, b.mlp.lin1.out_features) for b in sam.image_encoder.blocks]


# --------------------------------------------------------------------------- writing


def test_save_sam_writes_the_one_format(compact_sam, tmp_path):
    path = save_sam(compact_sam, tmp_path / "m.pt", metadata={"epoch": 3})
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert set(stored) == {"model", "medcore", "metadata", "format", "format_version"}
    assert (stored["format"], stored["format_version"]) == (COMPACT_FORMAT, FORMAT_VERSION) == ("medcore-sam", 2)
    assert list(stored["model"]) == list(compact_sam.state_dict())
    assert set(stored["medcore"]) == {"config", "blocks"}  # no "decoder" entry for a plain SAM decoder
    assert stored["medcore"]["blocks"][1]["kept_channels"] == list(range(0, 576, 3))
    assert stored["metadata"] == {"epoch": 3}


def test_robust_decoder_models_share_the_format(tmp_path):
    robust = _slim(build_robust_sam("tiny", seed=1))
    stored = torch.load(save_sam(RobustMedSAM(robust), tmp_path / "r.pt"), weights_only=True)
    assert stored["medcore"]["decoder"] == DECODER_NAME and stored["format_version"] == FORMAT_VERSION
    model = load_medsam(tmp_path / "r.pt")
    assert isinstance(model, RobustMedSAM) and _widths(model) == _widths(robust)


# --------------------------------------------------------------------------- reading


def test_version_one_layout_still_loads(compact_sam, tmp_path):
    path = tmp_path / "v1.pt"
    manifest = model_manifest(compact_sam)
    old = {"format": "medcore-sam", "format_version": 1, "medcore": manifest, "state_dict": compact_sam.state_dict()}
    torch.save(old, path)
    loaded = load_sam(path)
    assert _widths(loaded) == _widths(compact_sam)
    assert loaded.image_encoder.blocks[1].medcore_kept_channels == list(range(0, 576, 3))
    assert checkpoint_image_size(path) == 256


def test_extract_state_dict_prefers_model_then_state_dict():
    a, b, c = ({"w": torch.full((1,), float(i))} for i in range(3))
    assert extract_state_dict({"model_state_dict": c, "state_dict": b, "model": a})["w"] == 0
    assert extract_state_dict({"model_state_dict": c, "state_dict": b})["w"] == 1
    assert extract_state_dict({"model_state_dict": c})["w"] == 2
    assert list(extract_state_dict({"module.w": a["w"]})) == ["w"]


def test_read_model_state_reads_every_layout(compact_sam, tmp_path):
    state = compact_sam.state_dict()
    save_sam(compact_sam, tmp_path / "v2.pt")
    torch.save({"state_dict": state}, tmp_path / "v1.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    for name in ("v2.pt", "v1.pt", "ddp.pt"):
        assert list(read_model_state(tmp_path / name)) == list(state), name


def test_load_medsam_and_its_input_size(compact_sam, images, tmp_path):
    path = save_sam(compact_sam, tmp_path / "m.pt")
    model = load_medsam(path)
    assert type(model) is MedSAM and not model.pixel_normalize
    assert load_medsam(path, pixel_normalize=True).pixel_normalize
    assert checkpoint_image_size(path) == 256
    with torch.no_grad():
        assert torch.equal(model(images, BOXES), MedSAM(compact_sam)(images, BOXES))


@pytest.mark.parametrize("robust", [False, True])
def test_forward_returns_embeddings_from_one_pass(images, robust):
    sam = build_robust_sam("tiny", seed=2) if robust else build_sam("tiny", seed=2)
    model = (RobustMedSAM if robust else MedSAM)(sam)
    with torch.no_grad():
        embeddings, logits = model(images, BOXES, return_embeddings=True)
        assert torch.equal(logits, model(images, BOXES))
        assert torch.equal(embeddings, model.encode(images))
    assert embeddings.shape == (2, 256, 16, 16) and logits.shape == (2, 1, 64, 64)


# --------------------------------------------------------------------------- MONAI / Ignite handlers


def _run_saver(network: torch.nn.Module, save_dir: Path) -> Path:
    """One epoch of a no-op Ignite engine with MONAI's CheckpointSaver; the written file."""
    engine = Engine(lambda _engine, _batch: None)
    saver = CheckpointSaver(
        save_dir=str(save_dir), save_dict={"model": network, "medcore": ModelManifest(network)}, save_final=True
    )
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    (path,) = save_dir.glob("*.pt")
    return path


def _run_loader(path: Path, load_dict: dict) -> None:
    engine = Engine(lambda _engine, _batch: None)
    CheckpointLoader(load_path=str(path), load_dict=load_dict, map_location="cpu")(engine)


def test_monai_checkpoint_saver_writes_a_loadable_file(compact_sam, images, tmp_path):
    path = _run_saver(torch.nn.DataParallel(MedSAM(compact_sam)), tmp_path)  # wrappers are unwrapped
    stored = torch.load(path, weights_only=True)
    assert set(stored) == {"model", "medcore"}
    loaded = load_sam(path)
    assert _widths(loaded) == _widths(compact_sam)
    assert loaded.image_encoder.blocks[1].medcore_kept_heads == [0, 2]
    with torch.no_grad():
        assert torch.equal(MedSAM(loaded)(images, BOXES), MedSAM(compact_sam)(images, BOXES))

    same_widths = _slim(build_sam("tiny", seed=9))
    _run_loader(path, {"model": same_widths})
    with torch.no_grad():
        assert torch.equal(MedSAM(same_widths)(images, BOXES), MedSAM(compact_sam)(images, BOXES))


def test_model_manifest_checks_widths_and_never_rebuilds(compact_sam, tmp_path):
    path = _run_saver(BoxChannelMedSAM(model=compact_sam), tmp_path)
    other = _slim(build_sam("tiny", seed=3))
    _run_loader(path, {"model": other, "medcore": ModelManifest(other)})
    dense = build_sam("tiny", seed=3)
    with pytest.raises(CheckpointError, match="block 1: checkpoint 2 heads / 192 MLP channels vs network 3 / 768"):
        ModelManifest(dense).load_state_dict(torch.load(path, weights_only=True)["medcore"])
    assert _widths(dense)[1] == (3, 768)  # unchanged
    with pytest.raises(CheckpointError, match="decoder"):
        ModelManifest(_slim(build_robust_sam("tiny"))).load_state_dict(model_manifest(compact_sam))


# --------------------------------------------------------------------------- import graph


def _sibling_imports(path: Path) -> tuple[set[str], list[str]]:
    """Modules of ``networks`` imported by ``path`` at top level, and any imported inside functions."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            if node in tree.body:
                top.update(names)
            else:
                nested.extend(names)
    return top, nested


def test_networks_modules_import_each_other_without_cycles():
    modules = {p.stem: p for p in NETWORKS.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        top, nested = _sibling_imports(path)
        assert not nested, f"{name} defers imports of {nested}"
        graph[name] = {m.split(".")[0] for m in top} & set(modules)

    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*stack, node, dep])}"
            if dep not in state:
                visit(dep, [*stack, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize("module", ["fusion", "build", "medsam", "manifest", "prompt_channel", "checkpoint"])
def test_each_networks_module_imports_first_in_a_fresh_interpreter(module):
    code = (
        f"import sys, medcore_monai.networks.{module}; "
        "print(any(m.startswith('medcore_monai.transforms') for m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", "the model layer must not import medcore_monai.transforms"
