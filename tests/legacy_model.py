"""Frozen copy of the first parameter layout of RGFlow (checkpoint format 1): the oracle of tests/test_lean_path.py.

One ``nn.Linear`` (with ``torch.nn.utils.parametrizations.weight_norm``) per layer, separate
s and t networks per coupling half-step, names ``sublayers.S.blocks.B.halves.H.*``. The
modules below are kept as they were written (apart from imports), so that the stacked layout
of :mod:`rgkern.core.model` can be checked against them to float64 rounding; do not edit
them. :class:`RGFlow` is the current model with these sublayers in place of its own: the
frame (checks, the sublayer loop, prior, sampling) is shared, the layout under test is not.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import rgkern
from rgkern.core import ops, reference
from rgkern.core.geometry import Geometry

__all__ = ["RGFlow", "Swish", "ResidualMLP", "AffineCoupling", "RNVPBlock", "Sublayer"]


class Swish(nn.Module):
    """``x * sigmoid(beta * x)`` with a learned per-feature slope ``beta`` (starts at 1)."""

    def __init__(self, features: int):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(features))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


class ResidualMLP(nn.Module):
    """``dim -> hidden -> ... -> dim`` residual network used for ``s`` and ``t``.

    ``n_res`` residual blocks ``x <- (x + f(x)) / sqrt(2)``; ``f`` is [Swish, weight-normalised
    Linear] repeated ``n_mlp + 1`` times with widths ``dim, hidden, ..., hidden, dim``.
    """

    def __init__(self, dim: int, hidden: int, n_res: int, n_mlp: int):
        super().__init__()
        widths = [dim] + [hidden] * n_mlp + [dim]
        self.blocks = nn.ModuleList()
        for _ in range(n_res):
            layers = []
            for w_in, w_out in zip(widths[:-1], widths[1:]):
                layers += [Swish(w_in), weight_norm(nn.Linear(w_in, w_out))]
            self.blocks.append(nn.Sequential(*layers))

    def forward(self, x):
        for block in self.blocks:
            x = (x + block(x)) * (1 / math.sqrt(2))
        return x


class AffineCoupling(nn.Module):
    """One coupling half-step on patch rows ``(N, D)`` (see :func:`rgkern.reference.affine_coupling`).

    ``s`` and ``t`` are computed from the masked rows; their learned output scales start at
    zero, so the half-step starts as the identity.
    """

    def __init__(self, dim: int, hidden: int, n_res: int, n_mlp: int, flipped: bool):
        super().__init__()
        self.flipped = flipped
        self.s_net = ResidualMLP(dim, hidden, n_res, n_mlp)
        self.t_net = ResidualMLP(dim, hidden, n_res, n_mlp)
        self.s_scale = nn.Parameter(torch.zeros(dim))
        self.t_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, rows, mask, inverse: bool, backend: str):
        conditioner = rows * mask
        s_raw = self.s_net(conditioner)
        t_raw = self.t_net(conditioner)
        # The coupling of the torch path (the stand-alone Triton coupling op is gone).
        return reference.affine_coupling(rows, s_raw, t_raw, self.s_scale, self.t_scale, mask, inverse)


class RNVPBlock(nn.Module):
    """Two coupling half-steps with the checkerboard mask and its complement."""

    def __init__(self, dim: int, hidden: int, n_res: int, n_mlp: int):
        super().__init__()
        self.halves = nn.ModuleList([AffineCoupling(dim, hidden, n_res, n_mlp, flipped) for flipped in (False, True)])


class Sublayer(nn.Module):
    """A disentangler or decimator: a stack of RNVP blocks applied to every patch of a sublayer.

    All ``B*P`` patches share the weights. ``forward(x)`` returns the new image and the
    per-sample log-det ``(B,)`` of this sublayer (float64 for float64 input, else float32).
    """

    def __init__(self, geometry: Geometry, index: int, n_layers: int, hidden: int, n_res: int, n_mlp: int):
        super().__init__()
        self.geometry = geometry
        self.index = index
        self.blocks = nn.ModuleList([RNVPBlock(geometry.patch_dim, hidden, n_res, n_mlp) for _ in range(n_layers)])

    def extra_repr(self) -> str:
        return self.geometry.sublayers[self.index].name

    def transform_rows(self, rows: torch.Tensor, inverse: bool, backend: str):
        """Run the block stack on patch rows ``(N, D)``; returns rows and per-row log-det ``(N,)``."""
        masks = [self.geometry.coupling_mask(rows.device, rows.dtype, flipped) for flipped in (False, True)]
        logdet = rows.new_zeros(rows.shape[0], dtype=torch.float64 if rows.dtype == torch.float64 else torch.float32)
        half_steps = [(half, masks[half.flipped]) for block in self.blocks for half in block.halves]
        for half, mask in reversed(half_steps) if inverse else half_steps:
            rows, ld = half(rows, mask, inverse, backend)
            logdet = logdet + ld
        return rows, logdet

    def forward(self, x: torch.Tensor, inverse: bool = False, backend: str = "torch"):
        # The frame of the first layout: gather the rows in row order, the block stack, scatter.
        row_index = self.geometry.row_index(self.index, x.device)
        rows = ops.gather_patches(x, row_index, backend)
        rows, logdet = self.transform_rows(rows, inverse, backend)
        return ops.scatter_patches(x, rows, row_index, backend), logdet.view(x.shape[0], -1).sum(dim=1)


class RGFlow(rgkern.RGFlow):
    """:class:`rgkern.RGFlow` with the first layout's sublayers (same arguments, same state-dict names as then)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.sublayers = nn.ModuleList(
            Sublayer(self.geometry, s.index, cfg["n_layers"][s.level], cfg["hidden"][s.level], cfg["n_res"][s.level], cfg["n_mlp"][s.level])
            for s in self.geometry.sublayers
        )
