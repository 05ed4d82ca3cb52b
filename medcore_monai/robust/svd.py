"""SVD-based parameter-efficient adaptation of a SAM image encoder, merged back into plain weights.

S-SAM style (Paranjape et al., 2024; SVDiff, Han et al., 2023): each adapted weight ``W = U·diag(S)·Vh``
keeps its singular vectors frozen and trains one ``scale`` and one ``shift`` per singular value::

    W' = U · diag(relu(scale ⊙ S + shift)) · Vh        (scale = 1, shift = 0 at init, so W' = W)

For ViT-B, adapting ``attn.qkv``, ``attn.proj``, ``mlp.lin1`` and ``mlp.lin2`` of the 12 blocks trains
12 x 4 x 768 x 2 = 73,728 parameters (about 0.08 % of the encoder); the three convs (``patch_embed.proj``
reshaped to 768 x 768, ``neck.0`` and ``neck.2`` reshaped to 256 x 2304) add 1,280 x 2 more.

Typical use::

    names = apply_svd_adaptation(sam.image_encoder)          # everything else in the encoder is frozen
    opt = torch.optim.AdamW(svd_parameters(sam.image_encoder), lr=1e-3)
    ...  # loss = task_loss + lam * svd_regulariser(sam.image_encoder)
    merge_svd_adaptation(sam.image_encoder)                   # plain nn.Linear / nn.Conv2d weights again
    save_sam(sam, "adapted.pt")                               # stock keys: pruning and export keep working

``W'`` is rebuilt on every forward, which costs about 14 % of ViT-B's encoder FLOPs during training (the
factored form ``x·V·diag·Uᵀ`` is dearer at 4,096 tokens). For inference on an adapted, unmerged model,
wrap the forwards in ``torch.nn.utils.parametrize.cached()`` so each ``W'`` is built once per context; or,
better, merge. Pruning (``slim_block_``) reads the current weights and rebuilds the layers, so it silently
drops an unmerged adaptation: merge first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "DEFAULT_TARGETS",
    "CONV_TARGETS",
    "SVDScaleShift",
    "apply_svd_adaptation",
    "svd_adapted_layers",
    "svd_parameters",
    "svd_parameter_count",
    "svd_regulariser",
    "merge_svd_adaptation",
    "is_svd_adapted",
]

DEFAULT_TARGETS: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")
"""Linear layers of every encoder block (suffixes of qualified module names)."""

CONV_TARGETS: tuple[str, ...] = ("patch_embed.proj", "neck.0", "neck.2")
"""The encoder's Conv2d layers, adapted when ``include_convs=True``."""

# Attribute holding the requires_grad flags seen by apply_svd_adaptation, so merging can restore them.
_FLAGS_ATTR = "_medcore_svd_requires_grad"


def _svd_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps U and Vh orthonormal to ~1e-15; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _buffer_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # Half/bfloat16 factors would lose the accuracy the float64 SVD bought.
    return torch.promote_types(weight_dtype, torch.float32)


class SVDScaleShift(nn.Module):
    """Parametrization ``W -> W + U·diag(relu(scale ⊙ S + shift) - S)·Vh`` with trainable ``scale``/``shift``.

    Since ``W = U·diag(S)·Vh``, this equals the S-SAM form ``U·diag(relu(scale ⊙ S + shift))·Vh``. Writing it
    as the original weight plus a correction makes the identity at init exact (the correction is exactly
    zero for ``scale = 1, shift = 0`` because ``S >= 0``) instead of carrying the SVD's rounding error, and
    the frozen original is what ``parametrize`` keeps anyway.

    Conv weights ``(c_out, c_in, k, k)`` are factored as the matrix ``c_out x (c_in·k·k)``.

    Attributes:
        U: ``(out, r)`` left singular vectors (buffer, frozen), ``r = min(out, in)``.
        S: ``(r,)`` singular values, descending (buffer, frozen).
        Vh: ``(r, in)`` right singular vectors (buffer, frozen).
        scale: ``(r,)`` trainable, init 1.
        shift: ``(r,)`` trainable, init 0.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        """Factor ``weight`` once, on its device, in float64 (float32 where float64 is unavailable).

        Args:
            weight: the layer's weight, 2-D (Linear) or 4-D (Conv2d).
        """
        super().__init__()
        if weight.dim() not in (2, 4):
            raise ValueError(f"expected a 2-D or 4-D weight, got shape {tuple(weight.shape)}")
        self.weight_shape = tuple(weight.shape)
        matrix = weight.detach().reshape(weight.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix.to(_svd_dtype(weight.device)), full_matrices=False)
        dtype = _buffer_dtype(weight.dtype)
        # Persistent so a mid-training state_dict of the adapted model reloads exactly.
        self.register_buffer("U", u.to(dtype))
        self.register_buffer("S", s.to(dtype))
        self.register_buffer("Vh", vh.to(dtype))
        self.scale = nn.Parameter(torch.ones_like(self.S))
        self.shift = nn.Parameter(torch.zeros_like(self.S))

    @property
    def rank(self) -> int:
        """Number of singular values, ``min(out, in)``."""
        return int(self.S.numel())

    def adapted_singular_values(self) -> torch.Tensor:
        """``relu(scale ⊙ S + shift)``: the singular values of ``W'``."""
        return F.relu(self.scale * self.S + self.shift)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Return ``W'`` for the frozen original ``weight``, in the weight's dtype and shape."""
        delta_s = self.adapted_singular_values() - self.S
        delta = (self.U * delta_s) @ self.Vh
        return weight + delta.reshape(self.weight_shape).to(weight.dtype)

    def extra_repr(self) -> str:
        """Shape and rank, for ``print(model)``."""
        return f"shape={self.weight_shape}, rank={self.rank}"


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _find_layers(module: nn.Module, targets: Sequence[str], include_convs: bool) -> list[tuple[str, nn.Module]]:
    found = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and _matches(name, targets):
            found.append((name, sub))
        elif include_convs and isinstance(sub, nn.Conv2d) and _matches(name, CONV_TARGETS):
            found.append((name, sub))
    return found


def _svd_parametrizations(module: nn.Module) -> list[tuple[str, SVDScaleShift]]:
    """``(layer name, parametrization)`` for every adapted layer under ``module`` (module order)."""
    out = []
    for name, sub in module.named_modules():
        if parametrize.is_parametrized(sub, "weight"):
            for p in sub.parametrizations.weight:
                if isinstance(p, SVDScaleShift):
                    out.append((name, p))
    return out


def apply_svd_adaptation(
    module: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, include_convs: bool = False
) -> list[str]:
    """Add S-SAM scale-and-shift parametrizations to matching layers and freeze everything else.

    Names are matched as suffixes of qualified module names (``"attn.qkv"`` matches ``blocks.3.attn.qkv``),
    so pass ``sam.image_encoder``: on a whole ``Sam`` the default targets would also catch the mask
    decoder's ``mlp.lin1``/``mlp.lin2``. Works on compact (slimmed) encoders, whose layers are narrower:
    each layer gets ``min(out, in)`` singular values.

    Args:
        module: usually ``sam.image_encoder``.
        targets: suffixes of the ``nn.Linear`` layers to adapt.
        include_convs: also adapt the ``nn.Conv2d`` layers ``patch_embed.proj``, ``neck.0`` and ``neck.2``.

    Returns:
        Qualified names (relative to ``module``) of the adapted layers.

    Raises:
        ValueError: if nothing matches, or the module is already adapted or otherwise parametrized.
    """
    if is_svd_adapted(module):
        raise ValueError("module is already SVD-adapted; call merge_svd_adaptation first")
    layers = _find_layers(module, targets, include_convs)
    if not layers:
        raise ValueError(f"no nn.Linear matches {tuple(targets)} (include_convs={include_convs}) in the module")
    for name, layer in layers:
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(f"{name}.weight is already parametrized")
    # Factor everything first, so a failing SVD (e.g. non-finite weights) leaves the module untouched.
    svds = [SVDScaleShift(layer.weight) for _, layer in layers]
    # Remember the flags before freezing so merging gives back the model as it was.
    setattr(module, _FLAGS_ATTR, {n: p.requires_grad for n, p in module.named_parameters()})
    module.requires_grad_(False)
    for (_, layer), svd in zip(layers, svds):
        svd.parameter_order = list(layer._parameters)  # merging puts `weight` back in its place
        parametrize.register_parametrization(layer, "weight", svd)
    return [name for name, _ in layers]


def svd_adapted_layers(module: nn.Module) -> list[str]:
    """Qualified names of the SVD-adapted layers under ``module``."""
    return [name for name, _ in _svd_parametrizations(module)]


def is_svd_adapted(module: nn.Module) -> bool:
    """Whether any layer under ``module`` carries an :class:`SVDScaleShift` parametrization."""
    return bool(_svd_parametrizations(module))


def svd_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable ``scale`` and ``shift`` tensors of every adapted layer (for the optimiser)."""
    params = []
    for _, p in _svd_parametrizations(module):
        params.extend([p.scale, p.shift])
    return params


def svd_parameter_count(module: nn.Module) -> int:
    """Number of trainable SVD elements: ``2 x sum(min(out, in))`` over the adapted layers."""
    return sum(p.numel() for p in svd_parameters(module))


def svd_regulariser(module: nn.Module) -> torch.Tensor:
    """S-SAM regulariser ``(sum ||1 - scale||_1 + ||shift||_1) / count``, zero at init.

    The L1 penalty pulls each singular value back to its pretrained value and lets most of them stay
    exactly there. Dividing by the number of scale/shift elements makes it a mean absolute deviation,
    so one regularisation weight means the same for ViT-B, a tiny test model or a pruned encoder.

    Raises:
        ValueError: if ``module`` is not SVD-adapted.
    """
    params = _svd_parametrizations(module)
    if not params:
        raise ValueError("module is not SVD-adapted")
    total = sum((1 - p.scale).abs().sum() + p.shift.abs().sum() for _, p in params)
    return total / svd_parameter_count(module)


def _restore_requires_grad(module: nn.Module) -> None:
    # The flags may sit on a submodule (adapted sam.image_encoder, merged through sam).
    for sub in module.modules():
        flags = sub.__dict__.pop(_FLAGS_ATTR, None)
        if flags is None:
            continue
        for name, param in sub.named_parameters():
            param.requires_grad_(flags.get(name, True))


def _restore_parameter_order(layer: nn.Module, order: list[str] | None) -> None:
    # remove_parametrizations re-registers `weight` after `bias`; stock key order keeps state dicts
    # (and anything that lists or hashes them) identical to an unadapted model's.
    if order is None:
        return
    params = layer._parameters
    ordered = {k: params[k] for k in order if k in params}
    ordered.update((k, v) for k, v in params.items() if k not in ordered)
    params.clear()
    params.update(ordered)


def merge_svd_adaptation(module: nn.Module) -> int:
    """Bake each ``W'`` into a plain weight, remove the parametrizations and unfreeze.

    The weight keeps its ``nn.Parameter`` identity (``parametrize`` writes ``W'`` into it in place), and
    ``state_dict()`` has exactly the stock segment-anything keys again, in the stock order. ``requires_grad``
    flags are restored to what they were before :func:`apply_svd_adaptation`.

    Returns:
        Number of merged layers (0 if nothing was adapted).
    """
    adapted = [(module.get_submodule(name) if name else module, p) for name, p in _svd_parametrizations(module)]
    with torch.no_grad():
        for layer, svd in adapted:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
            _restore_parameter_order(layer, getattr(svd, "parameter_order", None))
    _restore_requires_grad(module)
    return len(adapted)
