"""SVD scale-and-shift adaptation (S-SAM style) of the image encoder, and merging it back."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medcore_monai.networks.build import build_sam, load_sam, save_sam
from medcore_monai.networks.structure import slim_block_
from medcore_monai.robust.svd import (
    SVDScaleShift,
    apply_svd_adaptation,
    is_svd_adapted,
    merge_svd_adaptation,
    svd_adapted_layers,
    svd_parameter_count,
    svd_parameters,
    svd_regulariser,
)

# tiny preset: embed 192, 6 blocks, MLP 768. Per block qkv 576x192, proj 192x192, lin1 768x192, lin2 192x768:
# min(out, in) = 192 each -> 4 x 192 = 768 singular values per block, 6 x 768 = 4,608, x2 (scale + shift).
TINY_LINEAR_COUNT = 6 * 4 * 192 * 2  # 9,216
# patch_embed.proj 192 x (3*16*16) -> 192, neck.0 256 x 192 -> 192, neck.2 256 x (256*9) -> 256.
TINY_CONV_COUNT = (192 + 192 + 256) * 2  # 1,280


@pytest.fixture
def sam() -> nn.Module:
    return build_sam("tiny", seed=0)


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))


def _encode(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder(x)


def _expected_count(encoder: nn.Module, names: list[str]) -> int:
    total = 0
    for name in names:
        weight = encoder.get_submodule(name).weight
        total += min(weight.shape[0], weight[0].numel())
    return 2 * total


def _train(encoder: nn.Module, x: torch.Tensor, steps: int = 3) -> list[float]:
    """A few Adam steps pulling the embedding towards a fixed random target; returns the losses."""
    target = torch.randn(_encode(encoder, x).shape, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(svd_parameters(encoder), lr=5e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (encoder(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    losses.append((_encode(encoder, x) - target).pow(2).mean().item())
    return losses


def test_parametrization_reproduces_weight_at_init():
    torch.manual_seed(0)
    for weight in (torch.randn(48, 16), torch.randn(8, 3, 4, 4), torch.randn(6, 40)):
        p = SVDScaleShift(weight)
        assert p.rank == min(weight.shape[0], weight[0].numel())
        rebuilt = ((p.U * p.S) @ p.Vh).reshape(weight.shape)
        assert (rebuilt - weight).norm() / weight.norm() < 1e-5
        assert torch.equal(p(weight), weight)  # the correction is exactly zero at init


def test_identity_at_init(sam, image):
    encoder = sam.image_encoder
    reference = _encode(encoder, image)
    names = apply_svd_adaptation(encoder)
    assert len(names) == 24 and names[0] == "blocks.0.attn.qkv"
    assert is_svd_adapted(encoder)
    torch.testing.assert_close(_encode(encoder, image), reference, atol=1e-5, rtol=0)


def test_only_svd_parameters_get_gradients_and_count(sam, image):
    encoder = sam.image_encoder
    names = apply_svd_adaptation(encoder)
    assert svd_parameter_count(encoder) == TINY_LINEAR_COUNT == _expected_count(encoder, names)
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in svd_parameters(encoder)}
    assert sum(p.numel() for p in trainable) == TINY_LINEAR_COUNT

    encoder(image).square().mean().backward()
    svd_ids = {id(p) for p in svd_parameters(encoder)}
    for name, param in encoder.named_parameters():
        if id(param) in svd_ids:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_training_changes_output_and_merge_matches(sam, image):
    encoder = sam.image_encoder
    stock_keys = list(build_sam("tiny").state_dict().keys())
    reference = _encode(encoder, image)
    apply_svd_adaptation(encoder)
    assert svd_regulariser(encoder).item() == 0.0

    losses = _train(encoder, image)
    assert losses[-1] < losses[0]
    adapted = _encode(encoder, image)
    assert (adapted - reference).abs().max() > 1e-3
    assert svd_regulariser(encoder).item() > 0.0

    original_param = encoder.blocks[0].attn.qkv.parametrizations.weight.original
    assert merge_svd_adaptation(encoder) == 24
    assert not is_svd_adapted(encoder) and svd_adapted_layers(encoder) == []
    assert encoder.blocks[0].attn.qkv.weight is original_param  # same Parameter, now holding W'
    assert type(encoder.blocks[0].attn.qkv) is nn.Linear
    torch.testing.assert_close(_encode(encoder, image), adapted, atol=1e-5, rtol=0)
    assert list(sam.state_dict().keys()) == stock_keys
    assert all(p.requires_grad for p in sam.parameters())


def test_merged_model_survives_save_load(sam, image, tmp_path):
    apply_svd_adaptation(sam.image_encoder)
    _train(sam.image_encoder, image, steps=1)
    merge_svd_adaptation(sam)  # merging through the parent finds the adapted encoder layers
    expected = _encode(sam.image_encoder, image)

    path = save_sam(sam, tmp_path / "adapted.pt")
    loaded = load_sam(path)
    assert torch.equal(_encode(loaded.image_encoder, image), expected)


def test_compact_encoder(sam, image, tmp_path):
    encoder = sam.image_encoder
    slim_block_(encoder.blocks[0], [0, 2], range(100))
    slim_block_(encoder.blocks[1], [1], range(300))
    reference = _encode(encoder, image)

    names = apply_svd_adaptation(encoder)
    # block 0: qkv 384x192 -> 192, proj 192x128 -> 128, lin1 100x192 -> 100, lin2 192x100 -> 100  = 520
    # block 1: qkv 192x192 -> 192, proj 192x64 -> 64, lin1 300x192 -> 192, lin2 192x300 -> 192   = 640
    # blocks 2..5 unchanged: 4 x 768 = 3,072
    assert svd_parameter_count(encoder) == 2 * (520 + 640 + 3072) == _expected_count(encoder, names)
    torch.testing.assert_close(_encode(encoder, image), reference, atol=1e-5, rtol=0)

    _train(encoder, image, steps=1)
    adapted = _encode(encoder, image)
    merge_svd_adaptation(encoder)
    torch.testing.assert_close(_encode(encoder, image), adapted, atol=1e-5, rtol=0)
    loaded = load_sam(save_sam(sam, tmp_path / "compact.pt"))
    assert loaded.image_encoder.blocks[0].medcore_kept_heads == [0, 2]
    assert torch.equal(_encode(loaded.image_encoder, image), _encode(encoder, image))


def test_include_convs(sam, image):
    encoder = sam.image_encoder
    stock_keys = list(sam.state_dict().keys())
    reference = _encode(encoder, image)
    names = apply_svd_adaptation(encoder, include_convs=True)
    convs = [n for n in names if isinstance(encoder.get_submodule(n), nn.Conv2d)]
    assert convs == ["patch_embed.proj", "neck.0", "neck.2"]
    assert svd_parameter_count(encoder) == TINY_LINEAR_COUNT + TINY_CONV_COUNT == _expected_count(encoder, names)
    torch.testing.assert_close(_encode(encoder, image), reference, atol=1e-5, rtol=0)

    _train(encoder, image, steps=1)
    adapted = _encode(encoder, image)
    assert merge_svd_adaptation(encoder) == 27
    torch.testing.assert_close(_encode(encoder, image), adapted, atol=1e-5, rtol=0)
    assert list(sam.state_dict().keys()) == stock_keys


def test_errors(sam):
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        apply_svd_adaptation(sam.image_encoder, targets=("attn.nonexistent",))
    with pytest.raises(ValueError, match="not SVD-adapted"):
        svd_regulariser(sam.image_encoder)
    apply_svd_adaptation(sam.image_encoder, targets=("mlp.lin1",))
    with pytest.raises(ValueError, match="already SVD-adapted"):
        apply_svd_adaptation(sam.image_encoder)
    assert merge_svd_adaptation(sam.image_encoder) == 6
    assert merge_svd_adaptation(sam.image_encoder) == 0


def test_requires_grad_flags_restored(sam):
    encoder = sam.image_encoder
    encoder.pos_embed.requires_grad_(False)
    encoder.blocks[0].attn.qkv.weight.requires_grad_(False)
    apply_svd_adaptation(encoder)
    assert not any(p.requires_grad for n, p in encoder.named_parameters() if "parametrizations" not in n)
    merge_svd_adaptation(encoder)
    frozen = {n for n, p in encoder.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed", "blocks.0.attn.qkv.weight"}


def test_deepcopy_of_adapted_encoder(sam, image):
    apply_svd_adaptation(sam.image_encoder)
    clone = copy.deepcopy(sam.image_encoder)
    assert is_svd_adapted(clone)
    torch.testing.assert_close(_encode(clone, image), _encode(sam.image_encoder, image), atol=0, rtol=0)


@pytest.mark.slow
def test_vit_b_counts_match_spec():
    # Built on the meta device: the counts depend on shapes only, and a float64 SVD of ViT-B's 48 layers
    # takes about a minute on one CPU core.
    with torch.device("meta"):
        encoder = build_sam("vit_b").image_encoder
    names = apply_svd_adaptation(encoder)
    assert len(names) == 48
    # 12 blocks x 4 layers x 768 singular values x (scale + shift)
    assert svd_parameter_count(encoder) == 73_728 == 12 * 4 * 768 * 2
    assert sum(p.numel() for p in encoder.parameters() if p.requires_grad) == 73_728

    merge_svd_adaptation(encoder)
    apply_svd_adaptation(encoder, include_convs=True)
    # the convs add 768 (patch_embed 768 x 768) + 256 (neck.0 256 x 768) + 256 (neck.2 256 x 2304) values
    assert svd_parameter_count(encoder) == 73_728 + 2 * 1_280
